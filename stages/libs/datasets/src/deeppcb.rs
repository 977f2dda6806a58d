//! DeepPCB label files (`<dir>_not/<id>.txt`, one `x1 y1 x2 y2 type` line per defect): one
//! parser for the ingester and for training, so that a file the pipeline accepts trains the
//! same boxes and a file it refuses is refused with the same message.

use std::path::Path;

use pcb_schemas::BoxLabel;

use crate::classes::ClassMap;
use crate::error::LabelError;
use crate::labelled;
use crate::text::{field_lines, five_numbers, parse_four, parse_integer, read_label_file};

/// Parses a DeepPCB label file: one `x1 y1 x2 y2 type` line per defect, in pixels, `type`
/// being the class id. Commas are accepted as separators (some copies of the dataset use
/// them); an empty file means a labelled board without defects.
pub fn parse_deeppcb(
    text: &str,
    path: &Path,
    classes: &ClassMap,
) -> Result<Vec<BoxLabel>, LabelError> {
    field_lines(text, |c| c.is_whitespace() || c == ',')
        .map(|(line, fields)| {
            let [x1, y1, x2, y2, kind] = fields[..] else {
                return Err(five_numbers(path, line, "x1 y1 x2 y2 type", fields.len()));
            };
            let coords = parse_four(&[x1, y1, x2, y2], ["x1", "y1", "x2", "y2"], path, line)?;
            let id: u16 = parse_integer(
                kind,
                "type",
                "a class id (an integer 0..=65535)",
                path,
                line,
            )?;
            Ok(labelled(coords, classes.resolve_id(id)))
        })
        .collect()
}

/// Reads and parses the DeepPCB label file at `path` ([`read_label_file`], then
/// [`parse_deeppcb`]).
pub fn read_deeppcb(path: &Path, classes: &ClassMap) -> Result<Vec<BoxLabel>, LabelError> {
    parse_deeppcb(&read_label_file(path)?, path, classes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_syntax_at, bx, p};

    /// `text` parsed as `a.txt` with the default class names.
    fn parse(text: &str) -> Result<Vec<BoxLabel>, LabelError> {
        parse_deeppcb(text, &p("a.txt"), &ClassMap::default())
    }

    #[test]
    fn deeppcb_parses_spaces_commas_and_blank_lines() {
        let text = "10 20 30 40 1\n\n  50,60,70,80,6 \r\n5, 6, 7, 8, 3\n";
        let boxes = parse(text).unwrap();
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
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("\n  \n").unwrap(), vec![]);
    }

    #[test]
    fn deeppcb_unknown_type_keeps_its_id_without_name() {
        let boxes = parse("1 2 3 4 7\n").unwrap();
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
        assert_syntax_at(&err, 3);
        assert_eq!(
            err.to_string(),
            "labels/00041000.txt line 3: expected 5 numbers \"x1 y1 x2 y2 type\", found 4"
        );
    }

    #[test]
    fn deeppcb_non_numeric_fields_are_errors() {
        let err = parse("1 2 abc 4 1\n").unwrap_err();
        assert_eq!(err.to_string(), "a.txt line 1: x2 \"abc\" is not a number");
        let err = parse("\n1 2 3 4 open\n").unwrap_err();
        assert_syntax_at(&err, 2);
        assert!(err.to_string().contains("type \"open\""), "{err}");
        let err = parse("1 2 3 4 -1\n").unwrap_err();
        assert!(err.to_string().contains("not a class id"), "{err}");
        let err = parse("1 2 NaN 4 1\n").unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
    }

    #[test]
    fn bom_is_ignored() {
        let boxes = parse("\u{feff}1 2 3 4 2\n");
        assert_eq!(boxes.unwrap(), vec![bx(1.0, 2.0, 3.0, 4.0, 2, "short")]);
    }

    /// Training used to parse with its own reader, which kept the byte-order mark in the
    /// first field ("\u{feff}1" is no number) and accepted infinite coordinates and negative
    /// types; read from disk, a file now gives training what it gives the ingester.
    #[test]
    fn read_from_disk_like_the_ingester_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let map = ClassMap::default();
        let bom = dir.path().join("bom.txt");
        std::fs::write(&bom, "\u{feff}10 20 30 40 5\r\n").unwrap();
        assert_eq!(
            read_deeppcb(&bom, &map).unwrap(),
            vec![bx(10.0, 20.0, 30.0, 40.0, 5, "copper")]
        );
        let inf = dir.path().join("inf.txt");
        std::fs::write(&inf, "1 2 inf 4 1\n").unwrap();
        let err = read_deeppcb(&inf, &map).unwrap_err();
        assert!(err
            .to_string()
            .ends_with("inf.txt line 1: x2 \"inf\" is not a number"));
        let negative = dir.path().join("neg.txt");
        std::fs::write(&negative, "1 2 3 4 -2\n").unwrap();
        assert!(read_deeppcb(&negative, &map).is_err());
        let err = read_deeppcb(&dir.path().join("none.txt"), &map).unwrap_err();
        assert!(matches!(err, LabelError::Read { .. }), "{err:?}");
    }
}
