//! YOLO labels (`<stem>.txt` of `class cx cy w h` lines, normalised to the image) with the
//! class list that names their indices, converted to pixel boxes; the image size they need is
//! read from the image's header alone.

use std::io::Cursor;
use std::path::Path;

use pcb_schemas::BoxLabel;

use crate::classes::ClassMap;
use crate::error::LabelError;
use crate::labelled;
use crate::text::{field_lines, five_numbers, parse_four, parse_integer, strip_bom};

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
    for (line, fields) in field_lines(text, char::is_whitespace) {
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
            return Err(five_numbers(path, line, "class cx cy w h", fields.len()));
        }
        let class_index: usize = parse_integer(
            fields[0],
            "class",
            "a class index (an integer from 0)",
            path,
            line,
        )?;
        let [cx, cy, w, h] =
            parse_four(&fields[1..], ["cx", "cy", "w", "h"], path, line)?.map(f64::from);
        let class = match yolo_names.get(class_index) {
            Some(name) => classes.resolve_name(name),
            None => (0, format!("#{class_index}")),
        };
        // Corners are computed in f64 so that round numbers stay exact after the scaling.
        let corners = [
            (cx - w / 2.0) * w_px,
            (cy - h / 2.0) * h_px,
            (cx + w / 2.0) * w_px,
            (cy + h / 2.0) * h_px,
        ];
        boxes.push(labelled(corners.map(|v| v as f32), class));
    }
    Ok(boxes)
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
    use crate::testing::{assert_syntax_at, bx, p};

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
        assert_syntax_at(&err, 2);
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
