//! Defect annotations in the four formats a watched tree may hold (DeepPCB, Pascal VOC, YOLO,
//! COCO), parsed into pixel [`BoxLabel`]s; class names are resolved here, class validity is
//! the encoder's call.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use pcb_schemas::{BoxLabel, CLASS_NAMES};
use quick_xml::events::Event;
use serde::Deserialize;

/// Why a label file could not be turned into boxes.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    /// Reading the label file from disk failed.
    #[error("cannot read label file {}: {source}", path.display())]
    Read {
        /// The label file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text does not parse as the format it claims to be.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Syntax {
        /// The label file.
        path: PathBuf,
        /// 1-based line of the problem, when it can be pinned to one.
        line: Option<usize>,
        /// What was wrong, in words.
        message: String,
    },
    /// YOLO boxes carry only class indices; without the class list they mean nothing.
    #[error(
        "{}: YOLO labels need a class list (classes.txt, obj.names or classes.names) beside \
         the image or in a folder above it",
        path.display()
    )]
    MissingClassList {
        /// The YOLO label file.
        path: PathBuf,
    },
    /// YOLO boxes are normalised to the image size, which could not be read.
    #[error("{}: cannot convert YOLO boxes to pixels, the image size is unknown", path.display())]
    NoImageSize {
        /// The YOLO label file.
        path: PathBuf,
    },
}

/// Class names in id order: id `i` (1-based) names `names[i - 1]`; 0 stays background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassMap {
    names: Vec<String>,
    /// `names` folded by [`fold`], so lookups need not re-fold the map every time.
    folded: Vec<String>,
}

/// Spellings other datasets (PKU-Market-PCB, Roboflow exports) use for DeepPCB's classes,
/// already folded; each maps to the folded canonical name it stands for.
const ALIASES: [(&str, &str); 4] = [
    ("spuriouscopper", "copper"),
    ("opencircuit", "open"),
    ("shortcircuit", "short"),
    ("mousebites", "mousebite"),
];

/// Folds case and the separators people vary (`pin_hole`, `Pin-Hole`, `pin hole`, `pinhole`)
/// so that they all compare equal.
fn fold(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, '_' | '-' | ' ' | '\t'))
        .flat_map(char::to_lowercase)
        .collect()
}

impl ClassMap {
    /// A map whose class id `i` is `names[i - 1]`.
    pub fn new(names: Vec<String>) -> ClassMap {
        let folded = names.iter().map(|n| fold(n)).collect();
        ClassMap { names, folded }
    }

    /// The id of `name`, ignoring case and `_`/`-`/space, and accepting the aliases other
    /// PCB datasets use (`spurious_copper` → `copper`, `mouse_bite` → `mousebite`, ...).
    pub fn id_of(&self, name: &str) -> Option<u16> {
        let wanted = fold(name.trim());
        if wanted.is_empty() {
            return None;
        }
        let index = self.folded.iter().position(|f| *f == wanted).or_else(|| {
            let canonical = ALIASES.iter().find(|(alias, _)| *alias == wanted)?.1;
            self.folded.iter().position(|f| f == canonical)
        })?;
        u16::try_from(index + 1).ok()
    }

    /// The name of class `id`; `None` for 0 (background) and ids past the end.
    pub fn name_of(&self, id: u16) -> Option<&str> {
        let index = usize::from(id).checked_sub(1)?;
        self.names.get(index).map(String::as_str)
    }

    /// Number of classes (the largest valid id).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the map has no class at all.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Class id and stored name for a name a label source gave: the canonical name when it is
    /// known, else id 0 with the name as given, so that the encoder can say which was unknown.
    fn resolve_name(&self, name: &str) -> (u16, String) {
        match self.id_of(name) {
            Some(id) => (id, self.name_of(id).unwrap_or(name).to_string()),
            None => (0, name.trim().to_string()),
        }
    }

    /// Class id and stored name for a numeric id: out-of-map ids are kept (with no name) so the
    /// encoder can reject them as unknown rather than the box silently changing class.
    fn resolve_id(&self, id: u16) -> (u16, String) {
        (id, self.name_of(id).unwrap_or_default().to_string())
    }
}

impl Default for ClassMap {
    /// DeepPCB's six classes, in the pipeline's [`CLASS_NAMES`] order.
    fn default() -> ClassMap {
        ClassMap::new(CLASS_NAMES.iter().map(|n| n.to_string()).collect())
    }
}

/// Reads a label file as text, naming the file in the error; a UTF-8 byte-order mark is
/// dropped because Windows tools write one and it would otherwise corrupt the first field.
pub fn read_label_file(path: &Path) -> Result<String, LabelError> {
    let bytes = std::fs::read(path).map_err(|source| LabelError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(strip_bom(&text).to_string()),
        Err(e) => Err(LabelError::Syntax {
            path: path.to_path_buf(),
            line: Some(line_at(e.as_bytes(), e.utf8_error().valid_up_to())),
            message: "not UTF-8 text".to_string(),
        }),
    }
}

fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// 1-based line number of byte `offset` in `bytes`.
fn line_at(bytes: &[u8], offset: usize) -> usize {
    let end = offset.min(bytes.len());
    bytes[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

fn syntax(path: &Path, line: Option<usize>, message: impl Into<String>) -> LabelError {
    LabelError::Syntax {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Parses a DeepPCB label file: one `x1 y1 x2 y2 type` line per defect, in pixels, `type`
/// being the class id. Commas are accepted as separators (some copies of the dataset use
/// them); an empty file means a labelled board without defects.
pub fn parse_deeppcb(
    text: &str,
    path: &Path,
    classes: &ClassMap,
) -> Result<Vec<BoxLabel>, LabelError> {
    let mut boxes = Vec::new();
    for (index, raw) in strip_bom(text).lines().enumerate() {
        let line = index + 1;
        let fields: Vec<&str> = raw
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|f| !f.is_empty())
            .collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != 5 {
            return Err(syntax(
                path,
                Some(line),
                format!(
                    "expected 5 numbers \"x1 y1 x2 y2 type\", found {}",
                    fields.len()
                ),
            ));
        }
        let mut coords = [0f32; 4];
        for (slot, (field, what)) in coords
            .iter_mut()
            .zip(fields.iter().zip(["x1", "y1", "x2", "y2"]))
        {
            *slot = parse_number(field, what, path, line)?;
        }
        let type_field = fields[4];
        let id: u16 = type_field.parse().map_err(|_| {
            syntax(
                path,
                Some(line),
                format!("type \"{type_field}\" is not a class id (an integer 0..=65535)"),
            )
        })?;
        let (class_id, class) = classes.resolve_id(id);
        let [x1, y1, x2, y2] = coords;
        boxes.push(BoxLabel {
            x1,
            y1,
            x2,
            y2,
            class_id,
            class,
        });
    }
    Ok(boxes)
}

/// A finite number; NaN and infinities parse as `f32` but would poison every later check.
fn parse_number(field: &str, what: &str, path: &Path, line: usize) -> Result<f32, LabelError> {
    match field.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(syntax(
            path,
            Some(line),
            format!("{what} \"{field}\" is not a number"),
        )),
    }
}

/// Maps byte offsets to line numbers cheaply while offsets only grow, as they do during a
/// single pass of the XML reader.
struct LineCounter<'a> {
    bytes: &'a [u8],
    offset: usize,
    line: usize,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a str) -> Self {
        LineCounter {
            bytes: text.as_bytes(),
            offset: 0,
            line: 1,
        }
    }

    fn line(&mut self, offset: u64) -> usize {
        let offset = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        if offset < self.offset {
            return line_at(self.bytes, offset);
        }
        self.line += self.bytes[self.offset..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.offset = offset;
        self.line
    }
}

/// One `<object>` being read, with the line of each part for error messages.
#[derive(Default)]
struct VocObject {
    line: usize,
    name: Option<(String, usize)>,
    has_bndbox: bool,
    /// xmin, ymin, xmax, ymax: text and line.
    coords: [Option<(String, usize)>; 4],
}

const VOC_COORDS: [&str; 4] = ["xmin", "ymin", "xmax", "ymax"];

/// The VOC reader's position in the element tree and what it has collected so far.
struct VocState<'p> {
    path: &'p Path,
    /// Element names from the root down to the current element.
    stack: Vec<String>,
    root_seen: bool,
    current: Option<VocObject>,
    objects: Vec<VocObject>,
}

impl VocState<'_> {
    fn open(&mut self, name: String, line: usize) -> Result<(), LabelError> {
        if self.stack.is_empty() {
            if self.root_seen {
                return Err(syntax(self.path, Some(line), "more than one root element"));
            }
            self.root_seen = true;
            if name != "annotation" {
                return Err(syntax(
                    self.path,
                    Some(line),
                    format!("root element is <{name}>, expected <annotation>"),
                ));
            }
        }
        if self.stack.len() == 1 && name == "object" {
            self.current = Some(VocObject {
                line,
                ..VocObject::default()
            });
        }
        if self.stack.len() == 2 && self.stack[1] == "object" && name == "bndbox" {
            if let Some(object) = self.current.as_mut() {
                object.has_bndbox = true;
            }
        }
        self.stack.push(name);
        Ok(())
    }

    fn close(&mut self) {
        let closed = self.stack.pop();
        if self.stack.len() == 1 && closed.as_deref() == Some("object") {
            if let Some(object) = self.current.take() {
                self.objects.push(object);
            }
        }
    }

    fn text(&mut self, text: &str, line: usize) {
        let Some(object) = self.current.as_mut() else {
            return;
        };
        // Only direct children of the object count: `<part>` boxes nest their own `<name>`.
        let slot = match self.stack.get(2..) {
            Some([name]) if name == "name" => &mut object.name,
            Some([bndbox, coord]) if bndbox == "bndbox" => {
                match VOC_COORDS.iter().position(|c| c == coord) {
                    Some(i) => &mut object.coords[i],
                    None => return,
                }
            }
            _ => return,
        };
        match slot {
            Some((existing, _)) => existing.push_str(text),
            None => *slot = Some((text.to_string(), line)),
        }
    }

    fn finish(self, classes: &ClassMap) -> Result<Vec<BoxLabel>, LabelError> {
        let path = self.path;
        if !self.root_seen {
            return Err(syntax(path, None, "no <annotation> element"));
        }
        let mut boxes = Vec::with_capacity(self.objects.len());
        for object in self.objects {
            let name = match &object.name {
                Some((name, _)) if !name.trim().is_empty() => name.trim().to_string(),
                _ => return Err(syntax(path, Some(object.line), "<object> has no <name>")),
            };
            if !object.has_bndbox {
                return Err(syntax(
                    path,
                    Some(object.line),
                    format!("<object> \"{name}\" has no <bndbox>"),
                ));
            }
            let mut coords = [0f32; 4];
            for ((slot, field), tag) in coords.iter_mut().zip(&object.coords).zip(VOC_COORDS) {
                let Some((value, line)) = field else {
                    return Err(syntax(
                        path,
                        Some(object.line),
                        format!("<bndbox> of \"{name}\" has no <{tag}>"),
                    ));
                };
                *slot = parse_number(value.trim(), &format!("<{tag}>"), path, *line)?;
            }
            let (class_id, class) = classes.resolve_name(&name);
            let [x1, y1, x2, y2] = coords;
            boxes.push(BoxLabel {
                x1,
                y1,
                x2,
                y2,
                class_id,
                class,
            });
        }
        Ok(boxes)
    }
}

/// Parses a Pascal VOC annotation: every `<object>` directly under `<annotation>` with its
/// `<name>` and `<bndbox>` (`xmin`, `ymin`, `xmax`, `ymax`, decimals allowed). Boxes nested
/// deeper (`<part>` in VOC's person layout) are not separate defects and are ignored; an
/// annotation without objects is a labelled board without defects.
pub fn parse_voc(text: &str, path: &Path, classes: &ClassMap) -> Result<Vec<BoxLabel>, LabelError> {
    let text = strip_bom(text);
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().trim_text(true);
    let mut lines = LineCounter::new(text);
    let mut state = VocState {
        path,
        stack: Vec::new(),
        root_seen: false,
        current: None,
        objects: Vec::new(),
    };
    loop {
        let event = match reader.read_event() {
            Ok(event) => event,
            Err(e) => {
                let line = lines.line(reader.error_position());
                return Err(syntax(path, Some(line), format!("invalid XML: {e}")));
            }
        };
        let line = lines.line(reader.buffer_position());
        match event {
            Event::Start(start) => {
                let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
                state.open(name, line)?;
            }
            Event::Empty(start) => {
                let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
                state.open(name, line)?;
                state.close();
            }
            Event::End(_) => state.close(),
            Event::Text(t) => {
                let value = t
                    .unescape()
                    .map_err(|e| syntax(path, Some(line), format!("invalid XML text: {e}")))?;
                state.text(&value, line);
            }
            Event::CData(c) => state.text(&String::from_utf8_lossy(&c.into_inner()), line),
            Event::Eof => break,
            _ => {}
        }
    }
    state.finish(classes)
}

/// Reads a YOLO class list (`classes.txt`, `obj.names`): one name per line, trimmed, blank
/// lines skipped; index `i` of the result is YOLO class `i`.
pub fn read_class_list(text: &str) -> Vec<String> {
    strip_bom(text)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses a YOLO label file: one `class cx cy w h` line per box, centre and size normalised to
/// 0..1 of the `width`×`height` image, converted here to pixel corners. `class` indexes
/// `yolo_names`, whose names are then resolved through `classes`; an index past the list
/// gets id 0 and class `#<index>`. Without a class list a file with boxes is
/// [`LabelError::MissingClassList`]; an empty file is a board without defects either way.
pub fn parse_yolo(
    text: &str,
    path: &Path,
    yolo_names: &[String],
    width: u32,
    height: u32,
    classes: &ClassMap,
) -> Result<Vec<BoxLabel>, LabelError> {
    let mut boxes = Vec::new();
    let (w_px, h_px) = (f64::from(width), f64::from(height));
    for (index, raw) in strip_bom(text).lines().enumerate() {
        let line = index + 1;
        let fields: Vec<&str> = raw.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if yolo_names.is_empty() {
            return Err(LabelError::MissingClassList {
                path: path.to_path_buf(),
            });
        }
        if width == 0 || height == 0 {
            return Err(LabelError::NoImageSize {
                path: path.to_path_buf(),
            });
        }
        if fields.len() != 5 {
            return Err(syntax(
                path,
                Some(line),
                format!(
                    "expected 5 numbers \"class cx cy w h\", found {}",
                    fields.len()
                ),
            ));
        }
        let class_field = fields[0];
        let class_index: usize = class_field.parse().map_err(|_| {
            syntax(
                path,
                Some(line),
                format!("class \"{class_field}\" is not a class index (an integer from 0)"),
            )
        })?;
        let mut values = [0f64; 4];
        for (slot, (field, what)) in values
            .iter_mut()
            .zip(fields[1..].iter().zip(["cx", "cy", "w", "h"]))
        {
            *slot = f64::from(parse_number(field, what, path, line)?);
        }
        let [cx, cy, w, h] = values;
        let (class_id, class) = match yolo_names.get(class_index) {
            Some(name) => classes.resolve_name(name),
            None => (0, format!("#{class_index}")),
        };
        // Corners are computed in f64 so that round numbers stay exact after the scaling.
        boxes.push(BoxLabel {
            x1: ((cx - w / 2.0) * w_px) as f32,
            y1: ((cy - h / 2.0) * h_px) as f32,
            x2: ((cx + w / 2.0) * w_px) as f32,
            y2: ((cy + h / 2.0) * h_px) as f32,
            class_id,
            class,
        });
    }
    Ok(boxes)
}

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
        let key = id_key(&category.id).ok_or_else(|| {
            syntax(
                path,
                None,
                format!(
                    "category \"{}\" has an id that is neither number nor string",
                    category.name
                ),
            )
        })?;
        categories.insert(key, classes.resolve_name(&category.name));
    }

    let mut index = CocoIndex::default();
    let mut names_by_id: HashMap<String, String> = HashMap::new();
    for image in &file.images {
        let key = id_key(&image.id).ok_or_else(|| {
            syntax(
                path,
                None,
                format!(
                    "image \"{}\" has an id that is neither number nor string",
                    image.file_name
                ),
            )
        })?;
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
        let (class_id, class) = categories
            .get(&category)
            .cloned()
            .unwrap_or_else(|| (0, format!("#{category}")));
        let boxes = index.by_name.entry(name.clone()).or_default();
        boxes.push(BoxLabel {
            x1: x as f32,
            y1: y as f32,
            x2: (x + w) as f32,
            y2: (y + h) as f32,
            class_id,
            class,
        });
    }
    Ok(index)
}

/// Width and height of an encoded image, read from its header alone (YOLO boxes need them
/// before the encoder ever decodes the pixels); `None` when the format is not recognised.
pub fn image_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn bx(x1: f32, y1: f32, x2: f32, y2: f32, class_id: u16, class: &str) -> BoxLabel {
        BoxLabel {
            x1,
            y1,
            x2,
            y2,
            class_id,
            class: class.to_string(),
        }
    }

    #[test]
    fn class_map_default_is_deeppcb_order() {
        let map = ClassMap::default();
        assert_eq!(map.len(), 6);
        assert!(!map.is_empty());
        assert_eq!(map.id_of("open"), Some(1));
        assert_eq!(map.id_of("pin-hole"), Some(6));
        assert_eq!(map.name_of(3), Some("mousebite"));
        assert_eq!(map.name_of(0), None);
        assert_eq!(map.name_of(7), None);
    }

    #[test]
    fn class_map_accepts_case_separator_variants_and_aliases() {
        let map = ClassMap::default();
        for name in ["pin_hole", "pinhole", "Pin Hole", "PIN-HOLE"] {
            assert_eq!(map.id_of(name), Some(6), "{name}");
        }
        for name in [
            "spurious_copper",
            "spurious copper",
            "Spurious-Copper",
            "COPPER",
        ] {
            assert_eq!(map.id_of(name), Some(5), "{name}");
        }
        assert_eq!(map.id_of("mouse_bite"), Some(3));
        assert_eq!(map.id_of("open_circuit"), Some(1));
        assert_eq!(map.id_of("Short"), Some(2));
        assert_eq!(map.id_of("missing_hole"), None);
        assert_eq!(map.id_of(""), None);
        // "spur" must not swallow "spurious copper" or vice versa.
        assert_eq!(map.id_of("spur"), Some(4));
    }

    #[test]
    fn class_map_aliases_only_apply_when_their_target_exists() {
        let map = ClassMap::new(vec!["scratch".into(), "copper".into()]);
        assert_eq!(map.id_of("spurious_copper"), Some(2));
        assert_eq!(map.id_of("mouse_bite"), None);
        assert_eq!(map.id_of("SCRATCH"), Some(1));
    }

    #[test]
    fn deeppcb_parses_spaces_commas_and_blank_lines() {
        let text = "10 20 30 40 1\n\n  50,60,70,80,6 \r\n5, 6, 7, 8, 3\n";
        let boxes = parse_deeppcb(text, &p("a.txt"), &ClassMap::default()).unwrap();
        assert_eq!(
            boxes,
            vec![
                bx(10.0, 20.0, 30.0, 40.0, 1, "open"),
                bx(50.0, 60.0, 70.0, 80.0, 6, "pin-hole"),
                bx(5.0, 6.0, 7.0, 8.0, 3, "mousebite"),
            ]
        );
    }

    #[test]
    fn deeppcb_empty_file_is_labelled_without_defects() {
        let map = ClassMap::default();
        assert_eq!(parse_deeppcb("", &p("a.txt"), &map).unwrap(), vec![]);
        assert_eq!(parse_deeppcb("\n  \n", &p("a.txt"), &map).unwrap(), vec![]);
    }

    #[test]
    fn deeppcb_unknown_type_keeps_its_id_without_name() {
        let boxes = parse_deeppcb("1 2 3 4 7\n", &p("a.txt"), &ClassMap::default()).unwrap();
        assert_eq!(boxes, vec![bx(1.0, 2.0, 3.0, 4.0, 7, "")]);
    }

    #[test]
    fn deeppcb_wrong_field_count_names_file_and_line() {
        let err = parse_deeppcb(
            "1 2 3 4 1\n5 6 7 8 2\n9 10 11 12\n",
            &p("labels/00041000.txt"),
            &ClassMap::default(),
        )
        .unwrap_err();
        assert!(matches!(err, LabelError::Syntax { line: Some(3), .. }));
        assert_eq!(
            err.to_string(),
            "labels/00041000.txt line 3: expected 5 numbers \"x1 y1 x2 y2 type\", found 4"
        );
    }

    #[test]
    fn deeppcb_non_numeric_fields_are_errors() {
        let map = ClassMap::default();
        let err = parse_deeppcb("1 2 abc 4 1\n", &p("a.txt"), &map).unwrap_err();
        assert_eq!(err.to_string(), "a.txt line 1: x2 \"abc\" is not a number");
        let err = parse_deeppcb("\n1 2 3 4 open\n", &p("a.txt"), &map).unwrap_err();
        assert!(matches!(err, LabelError::Syntax { line: Some(2), .. }));
        assert!(err.to_string().contains("type \"open\""), "{err}");
        let err = parse_deeppcb("1 2 3 4 -1\n", &p("a.txt"), &map).unwrap_err();
        assert!(err.to_string().contains("not a class id"), "{err}");
        let err = parse_deeppcb("1 2 NaN 4 1\n", &p("a.txt"), &map).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
    }

    #[test]
    fn bom_is_ignored() {
        let boxes = parse_deeppcb("\u{feff}1 2 3 4 2\n", &p("a.txt"), &ClassMap::default());
        assert_eq!(boxes.unwrap(), vec![bx(1.0, 2.0, 3.0, 4.0, 2, "short")]);
    }

    const VOC: &str = r#"<?xml version="1.0"?>
<annotation>
  <filename>board.jpg</filename>
  <size><width>640</width><height>480</height><depth>3</depth></size>
  <object>
    <name>Spurious_Copper</name>
    <difficult>0</difficult>
    <bndbox><xmin>10.5</xmin><ymin>20</ymin><xmax>30</xmax><ymax>40.25</ymax></bndbox>
  </object>
  <object>
    <name>scratch</name>
    <bndbox>
      <xmin>1</xmin>
      <ymin>2</ymin>
      <xmax>3</xmax>
      <ymax>4</ymax>
    </bndbox>
    <part><name>hand</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>1</xmax><ymax>1</ymax></bndbox></part>
  </object>
</annotation>
"#;

    #[test]
    fn voc_parses_objects_and_resolves_classes() {
        let boxes = parse_voc(VOC, &p("a.xml"), &ClassMap::default()).unwrap();
        assert_eq!(
            boxes,
            vec![
                bx(10.5, 20.0, 30.0, 40.25, 5, "copper"),
                bx(1.0, 2.0, 3.0, 4.0, 0, "scratch"),
            ]
        );
    }

    #[test]
    fn voc_without_objects_is_labelled_without_defects() {
        let text = "<annotation><filename>x.jpg</filename></annotation>";
        assert_eq!(
            parse_voc(text, &p("a.xml"), &ClassMap::default()).unwrap(),
            vec![]
        );
    }

    #[test]
    fn voc_missing_bndbox_names_the_object_line() {
        let text = "<annotation>\n<object>\n<name>short</name>\n</object>\n</annotation>\n";
        let err = parse_voc(text, &p("b.xml"), &ClassMap::default()).unwrap_err();
        assert!(
            matches!(err, LabelError::Syntax { line: Some(2), .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "b.xml line 2: <object> \"short\" has no <bndbox>"
        );
    }

    #[test]
    fn voc_missing_name_or_coordinate_is_an_error() {
        let map = ClassMap::default();
        let text = "<annotation><object><bndbox/></object></annotation>";
        let err = parse_voc(text, &p("b.xml"), &map).unwrap_err();
        assert!(err.to_string().contains("has no <name>"), "{err}");
        let text = "<annotation>\n<object><name>open</name>\n<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax></bndbox></object></annotation>";
        let err = parse_voc(text, &p("b.xml"), &map).unwrap_err();
        assert_eq!(
            err.to_string(),
            "b.xml line 2: <bndbox> of \"open\" has no <ymax>"
        );
    }

    #[test]
    fn voc_non_numeric_coordinate_names_its_line() {
        let text = "<annotation>\n<object>\n<name>open</name>\n<bndbox>\n<xmin>1</xmin>\n<ymin>two</ymin>\n<xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>";
        let err = parse_voc(text, &p("b.xml"), &ClassMap::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "b.xml line 6: <ymin> \"two\" is not a number"
        );
    }

    #[test]
    fn voc_malformed_xml_and_wrong_root_are_errors() {
        let map = ClassMap::default();
        let text = "<annotation>\n<object>\n<name>open</nam>\n</object></annotation>";
        let err = parse_voc(text, &p("c.xml"), &map).unwrap_err();
        assert!(
            matches!(err, LabelError::Syntax { line: Some(3), .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("c.xml line 3: invalid XML"),
            "{err}"
        );
        let err = parse_voc("<root/>", &p("c.xml"), &map).unwrap_err();
        assert!(err.to_string().contains("expected <annotation>"), "{err}");
        let err = parse_voc("", &p("c.xml"), &map).unwrap_err();
        assert_eq!(err.to_string(), "c.xml: no <annotation> element");
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn yolo_converts_normalised_centre_to_pixel_corners() {
        let map = ClassMap::default();
        let yolo = names(&["open", "short"]);
        let boxes = parse_yolo("0 0.5 0.5 0.25 0.5\n", &p("y.txt"), &yolo, 640, 480, &map);
        assert_eq!(
            boxes.unwrap(),
            vec![bx(240.0, 120.0, 400.0, 360.0, 1, "open")]
        );
        let boxes = parse_yolo("1 0.1 0.2 0.1 0.2\n\n", &p("y.txt"), &yolo, 100, 50, &map);
        assert_eq!(boxes.unwrap(), vec![bx(5.0, 5.0, 15.0, 15.0, 2, "short")]);
    }

    #[test]
    fn yolo_maps_names_through_the_class_map() {
        let map = ClassMap::default();
        let yolo = names(&["missing_hole", "mouse_bite", "spurious_copper"]);
        let text = "0 0.5 0.5 0.5 0.5\n1 0.5 0.5 0.5 0.5\n2 0.5 0.5 0.5 0.5\n9 0.5 0.5 0.5 0.5\n";
        let boxes = parse_yolo(text, &p("y.txt"), &yolo, 10, 10, &map).unwrap();
        let ids: Vec<(u16, &str)> = boxes
            .iter()
            .map(|b| (b.class_id, b.class.as_str()))
            .collect();
        assert_eq!(
            ids,
            vec![
                (0, "missing_hole"),
                (3, "mousebite"),
                (5, "copper"),
                (0, "#9")
            ]
        );
    }

    #[test]
    fn yolo_errors_name_the_line() {
        let map = ClassMap::default();
        let yolo = names(&["open"]);
        let err = parse_yolo("0 0.5 0.5 0.5\n", &p("y.txt"), &yolo, 10, 10, &map).unwrap_err();
        assert_eq!(
            err.to_string(),
            "y.txt line 1: expected 5 numbers \"class cx cy w h\", found 4"
        );
        let text = "0 0.5 0.5 0.5 0.5\nx 0.5 0.5 0.5 0.5\n";
        let err = parse_yolo(text, &p("y.txt"), &yolo, 10, 10, &map).unwrap_err();
        assert!(
            matches!(err, LabelError::Syntax { line: Some(2), .. }),
            "{err:?}"
        );
        let err = parse_yolo("0 0.5 zz 0.5 0.5\n", &p("y.txt"), &yolo, 10, 10, &map).unwrap_err();
        assert_eq!(err.to_string(), "y.txt line 1: cy \"zz\" is not a number");
    }

    #[test]
    fn yolo_without_class_list_or_size_fails_only_with_boxes() {
        let map = ClassMap::default();
        let err = parse_yolo("0 0.5 0.5 0.5 0.5\n", &p("y.txt"), &[], 10, 10, &map).unwrap_err();
        assert!(
            matches!(err, LabelError::MissingClassList { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("classes.txt"), "{err}");
        let yolo = names(&["open"]);
        let err = parse_yolo("0 0.5 0.5 0.5 0.5\n", &p("y.txt"), &yolo, 0, 0, &map).unwrap_err();
        assert!(matches!(err, LabelError::NoImageSize { .. }), "{err:?}");
        assert_eq!(
            parse_yolo("\n", &p("y.txt"), &[], 0, 0, &map).unwrap(),
            vec![]
        );
    }

    #[test]
    fn class_list_is_trimmed_and_skips_blanks() {
        assert_eq!(
            read_class_list("\u{feff}open\r\n\n  short \nmouse_bite\n"),
            names(&["open", "short", "mouse_bite"])
        );
        assert!(read_class_list("").is_empty());
    }

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
        assert!(
            matches!(err, LabelError::Syntax { line: Some(3), .. }),
            "{err:?}"
        );
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
    }

    #[test]
    fn read_label_file_reports_missing_file_and_bad_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.txt");
        let err = read_label_file(&missing).unwrap_err();
        assert!(matches!(err, LabelError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("none.txt"), "{err}");
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, b"1 2 3 4 1\n\xff\xfe\n").unwrap();
        let err = read_label_file(&bad).unwrap_err();
        assert!(
            matches!(err, LabelError::Syntax { line: Some(2), .. }),
            "{err:?}"
        );
        let good = dir.path().join("good.txt");
        std::fs::write(&good, "\u{feff}1 2 3 4 1\n").unwrap();
        assert_eq!(read_label_file(&good).unwrap(), "1 2 3 4 1\n");
    }

    #[test]
    fn image_dimensions_reads_the_header() {
        let img = image::RgbImage::new(37, 21);
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(image_dimensions(&png), Some((37, 21)));
        let mut bmp = Vec::new();
        img.write_to(&mut Cursor::new(&mut bmp), image::ImageFormat::Bmp)
            .unwrap();
        assert_eq!(image_dimensions(&bmp), Some((37, 21)));
        assert_eq!(image_dimensions(b"not an image"), None);
        assert_eq!(image_dimensions(&png[..20]), None);
    }
}
