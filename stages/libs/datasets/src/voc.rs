//! Pascal VOC annotations (`<stem>.xml` beside the image or in a sibling `Annotations/`):
//! every `<object>` of the `<annotation>` with its `<name>` and `<bndbox>`, read as pixel boxes
//! with errors that name the line of the XML.

use std::path::Path;

use pcb_schemas::BoxLabel;
use quick_xml::events::Event;

use crate::classes::ClassMap;
use crate::error::LabelError;
use crate::labelled;
use crate::text::{line_at, parse_number, strip_bom, syntax};

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
            boxes.push(labelled(coords, classes.resolve_name(&name)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_syntax_at, bx, p};

    /// `text` parsed as `a.xml` with the default class names.
    fn parse(text: &str) -> Result<Vec<BoxLabel>, LabelError> {
        parse_voc(text, &p("a.xml"), &ClassMap::default())
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
        let boxes = parse(VOC).unwrap();
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
        assert_eq!(parse(text).unwrap(), vec![]);
    }

    #[test]
    fn voc_errors_name_the_file_and_line() {
        for (text, message) in [
            (
                "<annotation>\n<object>\n<name>short</name>\n</object>\n</annotation>\n",
                "a.xml line 2: <object> \"short\" has no <bndbox>",
            ),
            (
                "<annotation><object><bndbox/></object></annotation>",
                "a.xml line 1: <object> has no <name>",
            ),
            (
                "<annotation>\n<object><name>open</name>\n<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax></bndbox></object></annotation>",
                "a.xml line 2: <bndbox> of \"open\" has no <ymax>",
            ),
            (
                "<annotation>\n<object>\n<name>open</name>\n<bndbox>\n<xmin>1</xmin>\n<ymin>two</ymin>\n<xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>",
                "a.xml line 6: <ymin> \"two\" is not a number",
            ),
            (
                "<root/>",
                "a.xml line 1: root element is <root>, expected <annotation>",
            ),
            ("", "a.xml: no <annotation> element"),
        ] {
            assert_eq!(parse(text).unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn voc_malformed_xml_names_its_line() {
        let text = "<annotation>\n<object>\n<name>open</nam>\n</object></annotation>";
        let err = parse(text).unwrap_err();
        assert_syntax_at(&err, 3);
        assert!(
            err.to_string().starts_with("a.xml line 3: invalid XML"),
            "{err}"
        );
    }
}
