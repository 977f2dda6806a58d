//! COCO JSON files (`annotations.json`, `_annotations.coco.json`, ...) shared by many images:
//! parsed once into an index from an image's file name to its pixel boxes.

use std::collections::HashMap;
use std::path::Path;

use pcb_schemas::BoxLabel;
use serde::Deserialize;

use crate::classes::ClassMap;
use crate::error::LabelError;
use crate::labelled;
use crate::text::{strip_bom, syntax};

/// Boxes of every image of one COCO file, looked up by the image's file name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CocoIndex {
    /// Keyed by `file_name` as the COCO file gives it (with `/` separators).
    by_name: HashMap<String, Vec<BoxLabel>>,
    /// Base name → full key; `None` when two images share a base name, because guessing
    /// between them would attach another board's defects.
    by_base: HashMap<String, Option<String>>,
}

impl CocoIndex {
    /// The boxes of the image named `file_name` (`Some(empty)`: listed without defects), tried
    /// as the COCO file spells it, then by base name so that a path relative to the watched
    /// root still finds `boards/x.jpg`. `None`: the image is not in this file, or its base name
    /// is ambiguous.
    pub fn get(&self, file_name: &str) -> Option<&Vec<BoxLabel>> {
        let normalised = file_name.replace('\\', "/");
        if let Some(boxes) = self.by_name.get(&normalised) {
            return Some(boxes);
        }
        let key = self.by_base.get(base_name(&normalised))?.as_ref()?;
        self.by_name.get(key)
    }

    /// Number of images listed.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether the file lists no image.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

fn base_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnnotation>,
    #[serde(default)]
    categories: Vec<CocoCategory>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: serde_json::Value,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    image_id: serde_json::Value,
    category_id: serde_json::Value,
    bbox: Vec<f64>,
}

#[derive(Deserialize)]
struct CocoCategory {
    id: serde_json::Value,
    name: String,
}

/// Exporters disagree on whether ids are numbers or strings; both become the same key.
fn id_key(id: &serde_json::Value) -> Option<String> {
    match id {
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// The key of the `id` of a category or an image (`kind`) called `name`, which must have one:
/// annotations find their image and category by it.
fn required_key(
    id: &serde_json::Value,
    kind: &str,
    name: &str,
    path: &Path,
) -> Result<String, LabelError> {
    id_key(id).ok_or_else(|| {
        syntax(
            path,
            None,
            format!("{kind} \"{name}\" has an id that is neither number nor string"),
        )
    })
}

/// Parses a COCO JSON file (`images`, `annotations` with `bbox: [x, y, w, h]`, `categories`)
/// into an index by image file name. Category names are resolved through `classes`; a
/// category id missing from `categories` gets class id 0 and class `#<id>`. Annotations of
/// images the file does not list are skipped with a warning.
pub fn parse_coco(text: &str, path: &Path, classes: &ClassMap) -> Result<CocoIndex, LabelError> {
    let file: CocoFile = serde_json::from_str(strip_bom(text)).map_err(|e| {
        let full = e.to_string();
        // serde_json appends " at line L column C"; the line goes in its own field.
        let what = full
            .rsplit_once(" at line ")
            .map_or(full.as_str(), |(m, _)| m);
        syntax(
            path,
            Some(e.line()),
            format!("invalid COCO JSON: {what} (column {})", e.column()),
        )
    })?;

    let mut categories: HashMap<String, (u16, String)> = HashMap::new();
    for category in &file.categories {
        let key = required_key(&category.id, "category", &category.name, path)?;
        categories.insert(key, classes.resolve_name(&category.name));
    }

    let mut index = CocoIndex::default();
    let mut names_by_id: HashMap<String, String> = HashMap::new();
    for image in &file.images {
        let key = required_key(&image.id, "image", &image.file_name, path)?;
        let name = image.file_name.replace('\\', "/");
        index.by_name.entry(name.clone()).or_default();
        names_by_id.insert(key, name);
    }
    for name in index.by_name.keys() {
        let base = base_name(name).to_string();
        index
            .by_base
            .entry(base)
            .and_modify(|slot| *slot = None)
            .or_insert_with(|| Some(name.clone()));
    }

    for (n, annotation) in file.annotations.iter().enumerate() {
        let image_key = id_key(&annotation.image_id);
        let Some(name) = image_key.as_ref().and_then(|k| names_by_id.get(k)) else {
            tracing::warn!(
                file = %path.display(),
                annotation = n,
                image_id = %annotation.image_id,
                "COCO annotation refers to an image the file does not list; skipped"
            );
            continue;
        };
        let [x, y, w, h] = annotation.bbox[..] else {
            return Err(syntax(
                path,
                None,
                format!(
                    "annotation {n} (image \"{name}\"): bbox must be [x, y, width, height], found {} numbers",
                    annotation.bbox.len()
                ),
            ));
        };
        let category = id_key(&annotation.category_id).unwrap_or_default();
        let class = categories
            .get(&category)
            .cloned()
            .unwrap_or_else(|| (0, format!("#{category}")));
        let boxes = index.by_name.entry(name.clone()).or_default();
        boxes.push(labelled([x, y, x + w, y + h].map(|v| v as f32), class));
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_syntax_at, bx, p};

    const COCO: &str = r#"{
      "images": [
        {"id": 1, "file_name": "boards/a.jpg", "width": 640, "height": 480},
        {"id": 2, "file_name": "b.png", "width": 100, "height": 100},
        {"id": "3", "file_name": "x\\c.jpg", "width": 10, "height": 10}
      ],
      "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [0.5, 1.5, 2, 3]},
        {"id": 12, "image_id": 1, "category_id": 42, "bbox": [1, 1, 1, 1]},
        {"id": 13, "image_id": 3, "category_id": 3, "bbox": [1, 2, 3, 4]},
        {"id": 14, "image_id": 99, "category_id": 1, "bbox": [1, 2, 3, 4]}
      ],
      "categories": [
        {"id": 1, "name": "Mouse_Bite"},
        {"id": 2, "name": "scratch"},
        {"id": 3, "name": "pinhole"}
      ]
    }"#;

    #[test]
    fn coco_index_by_file_name_and_base_name() {
        let index = parse_coco(COCO, &p("annotations.json"), &ClassMap::default()).unwrap();
        assert_eq!(index.len(), 3);
        let a = vec![
            bx(10.0, 20.0, 40.0, 60.0, 3, "mousebite"),
            bx(0.5, 1.5, 2.5, 4.5, 0, "scratch"),
            bx(1.0, 1.0, 2.0, 2.0, 0, "#42"),
        ];
        assert_eq!(index.get("boards/a.jpg"), Some(&a));
        assert_eq!(index.get("a.jpg"), Some(&a));
        assert_eq!(index.get("line1/boards/a.jpg"), Some(&a));
        assert_eq!(index.get("b.png"), Some(&vec![]));
        assert_eq!(
            index.get("c.jpg"),
            Some(&vec![bx(1.0, 2.0, 4.0, 6.0, 6, "pin-hole")])
        );
        assert_eq!(index.get("x/c.jpg").map(Vec::len), Some(1));
        assert_eq!(index.get("missing.jpg"), None);
    }

    #[test]
    fn coco_ambiguous_base_name_is_not_guessed() {
        let text = r#"{"images":[{"id":1,"file_name":"l1/a.jpg"},{"id":2,"file_name":"l2/a.jpg"}],
            "annotations":[{"image_id":1,"category_id":1,"bbox":[0,0,1,1]}],
            "categories":[{"id":1,"name":"open"}]}"#;
        let index = parse_coco(text, &p("coco.json"), &ClassMap::default()).unwrap();
        assert_eq!(index.get("l1/a.jpg").map(Vec::len), Some(1));
        assert_eq!(index.get("l2/a.jpg").map(Vec::len), Some(0));
        assert_eq!(index.get("a.jpg"), None);
    }

    #[test]
    fn coco_bad_json_names_the_line() {
        let text = "{\n\"images\": [\n{\"id\": 1 \"file_name\": \"a.jpg\"}\n]}";
        let err = parse_coco(text, &p("coco.json"), &ClassMap::default()).unwrap_err();
        assert_syntax_at(&err, 3);
        let shown = err.to_string();
        assert!(
            shown.starts_with("coco.json line 3: invalid COCO JSON: expected"),
            "{shown}"
        );
        assert!(!shown.contains("at line"), "{shown}");
    }

    #[test]
    fn coco_structural_errors() {
        let map = ClassMap::default();
        let err = parse_coco("{\"annotations\": []}", &p("coco.json"), &map).unwrap_err();
        assert!(err.to_string().contains("images"), "{err}");
        let text = r#"{"images":[{"id":1,"file_name":"a.jpg"}],
            "annotations":[{"image_id":1,"category_id":1,"bbox":[0,0,1]}]}"#;
        let err = parse_coco(text, &p("coco.json"), &map).unwrap_err();
        assert!(err.to_string().contains("found 3 numbers"), "{err}");
        // Annotations find images and categories by id, so neither may lack a usable one.
        let text = r#"{"images":[{"id":null,"file_name":"a.jpg"}]}"#;
        let err = parse_coco(text, &p("coco.json"), &map).unwrap_err();
        assert_eq!(
            err.to_string(),
            "coco.json: image \"a.jpg\" has an id that is neither number nor string"
        );
        let text = r#"{"images":[],"categories":[{"id":[1],"name":"open"}]}"#;
        let err = parse_coco(text, &p("coco.json"), &map).unwrap_err();
        assert!(
            err.to_string().contains("category \"open\" has an id"),
            "{err}"
        );
    }
}
