//! The label parsers of `pcb-datasets` (DeepPCB, Pascal VOC, YOLO, COCO, the YOLO class list
//! and DeepPCB's split lists) on arbitrary UTF-8. Label files come from whoever fills the
//! watched folder: a file must parse or be refused with a `LabelError`, never panic the
//! ingester or a training run.
//!
//! Input: the first byte picks the parser (low 3 bits); for YOLO the next 8 bytes are the
//! image's width and height (u32, little-endian). The rest is read as UTF-8 (invalid
//! sequences replaced, as the parsers only take text); a `\0` splits it into the label text
//! and a class list (`classes.txt`), which then names the classes instead of DeepPCB's six.
//!
//! Besides not panicking, each parser is held to what it documents:
//! - DeepPCB and VOC boxes: every coordinate finite (`text::parse_number` refuses NaN and
//!   infinities "because they would poison every later check"). Neither promises
//!   `x1 <= x2`: the encoder refuses an inverted box as `label-degenerate`.
//! - every parser: no coordinate is NaN (YOLO and COCO compute corners from finite numbers;
//!   they may overflow to infinity, which the encoder refuses as `label-invalid`).
//! - class ids: a name the class map resolves has its id within the map, unknown names id 0.
//! - YOLO and COCO: the error cases their docs name (no class list, no image size, wrong
//!   number of fields) come back as errors, not boxes.
//! - DeepPCB lists: one entry per non-blank line, in order, and `key`, `board_id`,
//!   `image_path` work on every entry.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pcb_datasets::{
    parse_coco, parse_deeppcb, parse_list, parse_voc, parse_yolo, read_class_list, BoxLabel,
    ClassMap, LabelError,
};

fn corners(b: &BoxLabel) -> [f32; 4] {
    [b.x1, b.y1, b.x2, b.y2]
}

/// What every parser promises of a box it returns.
fn check_box(b: &BoxLabel, classes: &ClassMap) {
    assert!(!corners(b).iter().any(|v| v.is_nan()), "NaN corner: {b:?}");
    if b.class_id != 0 {
        // A resolved name has an id within the map; a numeric DeepPCB type is kept as given
        // (and named only when the map knows it).
        match classes.name_of(b.class_id) {
            Some(name) => assert_eq!(b.class, name, "{b:?}"),
            None => assert!(b.class.is_empty(), "unknown id {} named {b:?}", b.class_id),
        }
    }
}

fn check_finite(boxes: &[BoxLabel]) {
    for b in boxes {
        assert!(
            corners(b).iter().all(|v| v.is_finite()),
            "not finite: {b:?}"
        );
    }
}

fn syntax_has_line(e: &LabelError) {
    if let LabelError::Syntax {
        line: Some(line), ..
    } = e
    {
        assert!(*line >= 1, "line numbers are 1-based: {e}");
    }
    // Every error must render (the ingester puts it in a dead letter).
    let _ = e.to_string();
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (width, height, rest) = if selector & 7 == 2 {
        if rest.len() < 8 {
            return;
        }
        let (size, rest) = rest.split_at(8);
        let w = u32::from_le_bytes([size[0], size[1], size[2], size[3]]);
        let h = u32::from_le_bytes([size[4], size[5], size[6], size[7]]);
        (w, h, rest)
    } else {
        (0, 0, rest)
    };
    let text = String::from_utf8_lossy(rest);
    let (labels, class_list) = match text.split_once('\0') {
        Some((labels, list)) => (labels, Some(read_class_list(list))),
        None => (&*text, None),
    };
    let classes = match &class_list {
        Some(names) => ClassMap::new(names.clone()),
        None => ClassMap::default(),
    };
    let path = Path::new("fuzz/labels.txt");
    match selector & 7 {
        0 => match parse_deeppcb(labels, path, &classes) {
            Ok(boxes) => {
                check_finite(&boxes);
                boxes.iter().for_each(|b| check_box(b, &classes));
            }
            Err(e) => syntax_has_line(&e),
        },
        1 => match parse_voc(labels, path, &classes) {
            Ok(boxes) => {
                check_finite(&boxes);
                boxes.iter().for_each(|b| {
                    check_box(b, &classes);
                    assert!(b.class_id != 0 || !b.class.is_empty(), "{b:?}");
                });
            }
            Err(e) => syntax_has_line(&e),
        },
        2 => {
            let names = class_list.clone().unwrap_or_default();
            match parse_yolo(labels, path, &names, width, height, &classes) {
                Ok(boxes) => {
                    if !boxes.is_empty() {
                        assert!(!names.is_empty(), "boxes without a class list");
                        assert!(width > 0 && height > 0, "boxes without an image size");
                    }
                    boxes.iter().for_each(|b| check_box(b, &classes));
                }
                Err(e) => syntax_has_line(&e),
            }
        }
        3 => match parse_coco(labels, path, &classes) {
            Ok(index) => {
                let _ = index.len();
                let _ = index.get("a.jpg");
                let _ = index.get("boards\\a.jpg");
                for word in labels.split('"').take(64) {
                    if let Some(boxes) = index.get(word) {
                        boxes.iter().for_each(|b| check_box(b, &classes));
                    }
                }
            }
            Err(e) => syntax_has_line(&e),
        },
        4 => {
            let entries = parse_list(labels);
            let non_blank = labels
                .strip_prefix('\u{feff}')
                .unwrap_or(labels)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count();
            assert_eq!(entries.len(), non_blank, "one entry per non-blank line");
            for pair in entries.windows(2) {
                assert!(pair[0].line < pair[1].line, "entries out of order");
            }
            for entry in &entries {
                assert!(entry.line >= 1 && !entry.image.is_empty());
                let _ = entry.key();
                let _ = entry.board_id();
                let _ = entry.image_path(Path::new("root"));
            }
        }
        _ => {
            let names = read_class_list(labels);
            assert!(names.iter().all(|n| !n.is_empty() && n.trim() == n));
            let map = ClassMap::new(names.clone());
            for name in &names {
                // An id the map gives names one of its classes.
                if let Some(id) = map.id_of(name) {
                    assert!(
                        map.name_of(id).is_some(),
                        "id {id} of {name:?} names nothing"
                    );
                }
            }
        }
    }
});
