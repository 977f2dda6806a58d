//! Which files make up one board: the image, its defect-free template and its label source,
//! found by the naming rules of DeepPCB, Pascal VOC, YOLO and COCO trees, the same for a
//! watched folder as for a dataset read for training.

use std::path::{Component, Path, PathBuf};

use crate::error::PairError;

/// Extensions of the image files a dataset's boards may have.
const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "bmp", "tif", "tiff"];

/// YOLO class lists, in the order they are preferred within one folder.
const CLASS_LIST_NAMES: [&str; 3] = ["classes.txt", "obj.names", "classes.names"];

/// COCO files, in the order they are preferred within one folder.
const COCO_NAMES: [&str; 4] = [
    "annotations.json",
    "_annotations.coco.json",
    "instances.json",
    "coco.json",
];

/// Whether `name` has an image extension (jpg, jpeg, png, bmp, tif, tiff; any case).
pub fn is_image_name(name: &str) -> bool {
    split_ext(name).1.is_some_and(|ext| {
        IMAGE_EXTENSIONS
            .iter()
            .any(|known| ext.eq_ignore_ascii_case(known))
    })
}

/// The part of `stem` before a case-insensitive `suffix`, when there is a non-empty one.
pub(crate) fn strip_suffix_ci<'a>(stem: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = stem.len().checked_sub(suffix.len())?;
    let (head, tail) = (stem.get(..cut)?, stem.get(cut..)?);
    (!head.is_empty() && tail.eq_ignore_ascii_case(suffix)).then_some(head)
}

/// Whether `path` is a defect-free template image (`<id>_temp.<ext>`, or `<id>_template.<ext>`)
/// that travels with its board rather than being a board of its own.
pub fn is_template(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if !is_image_name(name) {
        return false;
    }
    let (stem, _) = split_ext(name);
    strip_suffix_ci(stem, "_temp").is_some() || strip_suffix_ci(stem, "_template").is_some()
}

/// Where a board's defect labels come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelSource {
    /// No labels found: the board is unlabelled.
    None,
    /// A DeepPCB `x1 y1 x2 y2 type` file.
    DeepPcb(PathBuf),
    /// A Pascal VOC XML file.
    Voc(PathBuf),
    /// A YOLO file, with the class list that names its indices when one was found.
    Yolo {
        /// The board's own `.txt`.
        file: PathBuf,
        /// `classes.txt`/`obj.names`/`classes.names` beside the image or above it.
        classes_file: Option<PathBuf>,
    },
    /// A COCO JSON file shared by many images; look the image up by file name.
    Coco(PathBuf),
}

impl LabelSource {
    /// The format name carried in `RawImage::label_format` (`deeppcb`, `voc`, `yolo`, `coco`);
    /// `None` when unlabelled.
    pub fn format(&self) -> Option<&'static str> {
        match self {
            LabelSource::None => None,
            LabelSource::DeepPcb(_) => Some("deeppcb"),
            LabelSource::Voc(_) => Some("voc"),
            LabelSource::Yolo { .. } => Some("yolo"),
            LabelSource::Coco(_) => Some("coco"),
        }
    }
}

/// One board as found in the watched tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The board image.
    pub image: PathBuf,
    /// The defect-free template beside it, if any.
    pub template: Option<PathBuf>,
    /// Where its labels come from.
    pub labels: LabelSource,
    /// Board identifier: DeepPCB's `<id>`, otherwise the file stem.
    pub board_id: String,
    /// The image path relative to the watched root, `/`-separated.
    pub rel: String,
}

impl Unit {
    /// Files that belong to this board alone and so move with it to `processed/` or
    /// `rejected/`: the template and a per-image label file. Shared files (a COCO JSON, a YOLO
    /// class list) stay, since other boards still need them.
    pub fn companions(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.template.iter().cloned().collect();
        match &self.labels {
            LabelSource::DeepPcb(file)
            | LabelSource::Voc(file)
            | LabelSource::Yolo { file, .. } => {
                files.push(file.clone());
            }
            LabelSource::None | LabelSource::Coco(_) => {}
        }
        files
    }
}

/// `path` relative to `root`, `/`-separated.
pub(crate) fn relative(path: &Path, root: &Path) -> Result<String, PairError> {
    let rest = path
        .strip_prefix(root)
        .map_err(|_| PairError::OutsideRoot {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
        })?;
    let mut parts = Vec::new();
    for component in rest.components() {
        match component {
            Component::Normal(part) => {
                parts.push(part.to_str().ok_or_else(|| PairError::NonUtf8Name {
                    path: path.to_path_buf(),
                })?)
            }
            Component::CurDir => {}
            // `..` or a second root would make the path escape the root after all.
            _ => {
                return Err(PairError::OutsideRoot {
                    path: path.to_path_buf(),
                    root: root.to_path_buf(),
                })
            }
        }
    }
    Ok(parts.join("/"))
}

/// The first existing file among `names`, looking in `dir` and then each folder above it up to
/// and including `root`, the nearest folder winning.
fn find_upwards(dir: &Path, root: &Path, names: &[&str]) -> Option<PathBuf> {
    let mut current = Some(dir);
    while let Some(folder) = current {
        if let Some(found) = names.iter().map(|n| folder.join(n)).find(|p| p.is_file()) {
            return Some(found);
        }
        if folder == root || !folder.starts_with(root) {
            break;
        }
        current = folder.parent();
    }
    None
}

/// The first of `candidates` that exists as a file.
fn first_file(candidates: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    candidates.into_iter().find(|p| p.is_file())
}

/// `dir` with its last folder named `from` (below `root`) replaced by `to`, for the layouts
/// that keep labels in a sibling tree (`images/…` ↔ `labels/…`, `JPEGImages` ↔ `Annotations`).
fn sibling_tree(dir: &Path, root: &Path, from: &str, to: &str) -> Option<PathBuf> {
    let rest = dir.strip_prefix(root).ok()?;
    let parts: Vec<_> = rest.components().collect();
    let at = parts
        .iter()
        .rposition(|c| c.as_os_str() == std::ffi::OsStr::new(from))?;
    let mut out = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        out.push(if i == at {
            std::ffi::OsStr::new(to)
        } else {
            part.as_os_str()
        });
    }
    Some(out)
}

/// `name` split at its last dot into stem and extension; a name without one (or a dotfile)
/// is all stem.
pub(crate) fn split_ext(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, Some(ext)),
        _ => (name, None),
    }
}

/// The defect-free template of the board image `image`, when one exists beside it:
/// `<base>_temp.<ext>`, else `<base>_template.<ext>`, where `<base>` is DeepPCB's `<id>` of an
/// `<id>_test.<ext>` image and the file stem of any other, and `<ext>` the image's own.
pub fn template_of(image: &Path) -> Option<PathBuf> {
    let (stem, ext) = split_ext(image.file_name()?.to_str()?);
    let base = strip_suffix_ci(stem, "_test").unwrap_or(stem);
    let dir = image.parent()?;
    first_file(["_temp", "_template"].map(|suffix| match ext {
        Some(ext) => dir.join(format!("{base}{suffix}.{ext}")),
        None => dir.join(format!("{base}{suffix}")),
    }))
}

/// Pairs `image` (a file under the watched `root`) with its template and labels. Rules, the
/// first that matches winning:
///
/// * DeepPCB, `<id>_test.<ext>`: board `<id>`, template `<id>_temp.<ext>` beside, labels
///   `<dir>/../<dirname>_not/<id>.txt` or `<dir>/<id>.txt` (DeepPCB format). When neither
///   exists the generic label rules below still apply, so that a YOLO image that happens to
///   be named `x_test.jpg` keeps its labels.
/// * Otherwise board = file stem; template `<stem>_temp.<ext>` or `<stem>_template.<ext>`
///   beside; labels `<stem>.xml` beside (VOC), `<stem>.txt` beside (YOLO, with the nearest
///   class list at or above the image), the same in a sibling `Annotations/` (for
///   `JPEGImages/`) or `labels/` (for `images/`) tree, then the nearest COCO file at or above
///   the image; else unlabelled.
///
/// Nothing above `root` is looked at.
pub fn pair(image: &Path, root: &Path) -> Result<Unit, PairError> {
    let name = image
        .file_name()
        .ok_or_else(|| PairError::OutsideRoot {
            path: image.to_path_buf(),
            root: root.to_path_buf(),
        })?
        .to_str()
        .ok_or_else(|| PairError::NonUtf8Name {
            path: image.to_path_buf(),
        })?;
    let rel = relative(image, root)?;
    let dir = image.parent().unwrap_or(root);
    let (stem, _) = split_ext(name);
    let template = template_of(image);

    if let Some(id) = strip_suffix_ci(stem, "_test") {
        // `group00041/00041/` keeps its labels in `group00041/00041_not/`, which must still be
        // inside the watched tree.
        let not_dir = match (dir.parent(), dir.file_name().and_then(|n| n.to_str())) {
            (Some(parent), Some(dir_name)) if dir != root && parent.starts_with(root) => {
                Some(parent.join(format!("{dir_name}_not")))
            }
            _ => None,
        };
        let deeppcb_labels = first_file(
            not_dir
                .map(|d| d.join(format!("{id}.txt")))
                .into_iter()
                .chain([dir.join(format!("{id}.txt"))]),
        );
        let labels = match deeppcb_labels {
            Some(file) => LabelSource::DeepPcb(file),
            None => generic_labels(dir, root, stem),
        };
        return Ok(Unit {
            image: image.to_path_buf(),
            template,
            labels,
            board_id: id.to_string(),
            rel,
        });
    }

    Ok(Unit {
        image: image.to_path_buf(),
        template,
        labels: generic_labels(dir, root, stem),
        board_id: stem.to_string(),
        rel,
    })
}

/// The VOC / YOLO / COCO label rules shared by every image.
fn generic_labels(dir: &Path, root: &Path, stem: &str) -> LabelSource {
    let voc_dirs = std::iter::once(dir.to_path_buf()).chain(sibling_tree(
        dir,
        root,
        "JPEGImages",
        "Annotations",
    ));
    if let Some(file) = first_file(voc_dirs.map(|d| d.join(format!("{stem}.xml")))) {
        return LabelSource::Voc(file);
    }
    let yolo_dirs =
        std::iter::once(dir.to_path_buf()).chain(sibling_tree(dir, root, "images", "labels"));
    if let Some(file) = first_file(yolo_dirs.map(|d| d.join(format!("{stem}.txt")))) {
        // The class list may sit beside the labels (sibling tree) or above the image.
        let label_dir = file.parent().unwrap_or(dir);
        let classes_file = find_upwards(label_dir, root, &CLASS_LIST_NAMES)
            .or_else(|| find_upwards(dir, root, &CLASS_LIST_NAMES));
        return LabelSource::Yolo { file, classes_file };
    }
    match find_upwards(dir, root, &COCO_NAMES) {
        Some(file) => LabelSource::Coco(file),
        None => LabelSource::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{touch, touched};
    use std::fs;

    #[test]
    fn image_names() {
        for name in [
            "a.jpg", "a.JPEG", "b.png", "c.Bmp", "d.tif", "e.TIFF", "x.y.jpg",
        ] {
            assert!(is_image_name(name), "{name}");
        }
        for name in ["a.txt", "jpg", ".jpg", "a.jpg.part", "a.gif", "a."] {
            assert!(!is_image_name(name), "{name}");
        }
    }

    #[test]
    fn templates_are_recognised() {
        assert!(is_template(Path::new("g/00041000_temp.jpg")));
        assert!(is_template(Path::new("board_template.PNG")));
        assert!(is_template(Path::new("board_TEMP.png")));
        assert!(!is_template(Path::new("00041000_test.jpg")));
        assert!(!is_template(Path::new("_temp.jpg")));
        assert!(!is_template(Path::new("a_temp.txt")));
        assert!(!is_template(Path::new("temperature.jpg")));
    }

    #[test]
    fn template_of_a_board_image() {
        let (dir, [temp, template, both, _]) = touched([
            "g/1/1000_temp.jpg",
            "line/b_template.png",
            "c_temp.bmp",
            "c_template.bmp",
        ]);
        let root = dir.path();
        assert_eq!(template_of(&root.join("g/1/1000_test.jpg")), Some(temp));
        assert_eq!(template_of(&root.join("line/b.png")), Some(template));
        // `_temp` wins over `_template`, and the extension must match the image's.
        assert_eq!(template_of(&root.join("c_test.bmp")), Some(both));
        assert_eq!(template_of(&root.join("c_test.jpg")), None);
        assert_eq!(template_of(&root.join("g/1/1001_test.jpg")), None);
    }

    #[test]
    fn deeppcb_layout_pairs_template_and_not_folder_labels() {
        let (dir, [image, template, labels]) = touched([
            "PCBData/group00041/00041/00041000_test.jpg",
            "PCBData/group00041/00041/00041000_temp.jpg",
            "PCBData/group00041/00041_not/00041000.txt",
        ]);
        let unit = pair(&image, dir.path()).unwrap();
        assert_eq!(
            unit,
            Unit {
                image: image.clone(),
                template: Some(template.clone()),
                labels: LabelSource::DeepPcb(labels.clone()),
                board_id: "00041000".into(),
                rel: "PCBData/group00041/00041/00041000_test.jpg".into(),
            }
        );
        assert_eq!(unit.labels.format(), Some("deeppcb"));
        assert_eq!(unit.companions(), vec![template, labels]);
    }

    #[test]
    fn deeppcb_labels_beside_the_image_and_missing_parts() {
        let (dir, [image, labels, lone]) = touched(["12_test.png", "12.txt", "sub/13_test.jpg"]);
        let unit = pair(&image, dir.path()).unwrap();
        assert_eq!(unit.board_id, "12");
        assert_eq!(unit.template, None);
        assert_eq!(unit.labels, LabelSource::DeepPcb(labels));
        assert_eq!(unit.rel, "12_test.png");

        let unit = pair(&lone, dir.path()).unwrap();
        assert_eq!(unit.board_id, "13");
        assert_eq!(unit.labels, LabelSource::None);
        assert!(unit.companions().is_empty());
    }

    #[test]
    fn deeppcb_not_folder_outside_the_root_is_ignored() {
        let (dir, [image, _]) = touched(["00041/00041000_test.jpg", "00041_not/00041000.txt"]);
        let root = dir.path().join("00041");
        assert_eq!(pair(&image, &root).unwrap().labels, LabelSource::None);
    }

    #[test]
    fn voc_beside_the_image_with_template() {
        let (dir, [image, xml, template, _]) = touched([
            "line1/board7.png",
            "line1/board7.xml",
            "line1/board7_template.png",
            "annotations.json",
        ]);
        let unit = pair(&image, dir.path()).unwrap();
        assert_eq!(unit.board_id, "board7");
        assert_eq!(unit.rel, "line1/board7.png");
        assert_eq!(unit.labels, LabelSource::Voc(xml.clone()));
        assert_eq!(unit.template, Some(template.clone()));
        assert_eq!(unit.companions(), vec![template, xml]);
    }

    #[test]
    fn yolo_with_class_list_in_a_parent() {
        let (dir, [image, txt, names, top, other, _]) = touched([
            "ds/train/b1.jpg",
            "ds/train/b1.txt",
            "ds/obj.names",
            "classes.txt",
            "other/b2.jpg",
            "other/b2.txt",
        ]);
        let unit = pair(&image, dir.path()).unwrap();
        assert_eq!(
            unit.labels,
            LabelSource::Yolo {
                file: txt.clone(),
                classes_file: Some(names)
            }
        );
        // The shared class list stays behind for the other boards.
        assert_eq!(unit.companions(), vec![txt]);

        let unit = pair(&other, dir.path()).unwrap();
        assert!(matches!(
            unit.labels,
            LabelSource::Yolo { classes_file: Some(ref c), .. } if c == &top
        ));
    }

    #[test]
    fn yolo_without_class_list_and_sibling_labels_tree() {
        // A class list above the watched root is not the tree's business.
        let (dir, [image, txt, _, nested, nested_txt, names]) = touched([
            "watched/b.jpg",
            "watched/b.txt",
            "classes.txt",
            "watched/set/images/train/c.jpg",
            "watched/set/labels/train/c.txt",
            "watched/set/labels/classes.txt",
        ]);
        let root = dir.path().join("watched");
        let yolo = |image: &Path| pair(image, &root).unwrap().labels;
        assert_eq!(
            yolo(&image),
            LabelSource::Yolo {
                file: txt,
                classes_file: None
            }
        );
        assert_eq!(
            yolo(&nested),
            LabelSource::Yolo {
                file: nested_txt,
                classes_file: Some(names)
            }
        );
    }

    #[test]
    fn voc_sibling_annotations_tree() {
        let (dir, [image, xml]) =
            touched(["VOC/JPEGImages/000001.jpg", "VOC/Annotations/000001.xml"]);
        assert_eq!(
            pair(&image, dir.path()).unwrap().labels,
            LabelSource::Voc(xml)
        );
    }

    #[test]
    fn coco_json_in_a_parent_is_shared() {
        let (dir, [image, json, _]) = touched([
            "export/train/x.jpg",
            "export/_annotations.coco.json",
            "coco.json",
        ]);
        let unit = pair(&image, dir.path()).unwrap();
        assert_eq!(unit.labels, LabelSource::Coco(json));
        assert_eq!(unit.labels.format(), Some("coco"));
        assert!(unit.companions().is_empty());

        let elsewhere = dir.path().join("elsewhere");
        let bare = touch(&elsewhere, "y.bmp");
        let unit = pair(&bare, &elsewhere).unwrap();
        assert_eq!(unit.labels, LabelSource::None);
        assert_eq!(unit.labels.format(), None);
    }

    #[test]
    fn test_named_image_without_deeppcb_labels_uses_generic_rules() {
        let (dir, [image, xml]) = touched(["unit_test.jpg", "unit_test.xml"]);
        let unit = pair(&image, dir.path()).unwrap();
        assert_eq!(unit.board_id, "unit");
        assert_eq!(unit.labels, LabelSource::Voc(xml));
    }

    #[test]
    fn non_utf8_name_is_an_error() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let not_utf8 = |name: &[u8]| root.join(std::ffi::OsStr::from_bytes(name));
        let image = not_utf8(b"bad\xff.jpg");
        fs::write(&image, b"x").unwrap();
        let err = pair(&image, root).unwrap_err();
        assert!(matches!(err, PairError::NonUtf8Name { ref path } if path == &image));
        assert!(
            err.to_string()
                .starts_with("file name is not valid UTF-8: ")
                && err.to_string().contains("bad\u{fffd}.jpg"),
            "{err}"
        );

        let nested = touch(&not_utf8(b"d\xfe"), "ok.jpg");
        assert!(matches!(
            pair(&nested, root),
            Err(PairError::NonUtf8Name { .. })
        ));
    }

    #[test]
    fn outside_root_is_an_error() {
        let err = pair(Path::new("/elsewhere/a.jpg"), Path::new("/watched")).unwrap_err();
        assert!(matches!(err, PairError::OutsideRoot { .. }), "{err:?}");
    }
}
