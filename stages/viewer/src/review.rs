//! Label corrections from the board page: the boxes an operator saves are checked against
//! the image and the classes, and become a label revision, a `pcb.images.raw` record with
//! the board's own image and template, the corrected labels and who saved them when. It
//! flows like any labelled board (encoder, router, shards), so the next training snapshot
//! carries it; the detector leaves it unanswered (the board has its answer).

use base64::Engine;
use pcb_schemas::{
    record_id, BoxLabel, EncodedImage, LabelRevision, ModelRef, RawImage, CLASS_NAMES,
};
use serde::{Deserialize, Serialize};

/// Most boxes one board may be saved with.
pub const MAX_BOXES: usize = 200;
/// Longest note, in characters.
pub const MAX_NOTE_CHARS: usize = 500;

/// What the board page posts to `/api/boards/<id>/labels`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsBody {
    /// Every defect of the board as the operator sees it (empty: no defect).
    pub labels: Vec<BoxBody>,
    /// Who saves them.
    pub by: String,
    /// Why, in a few words.
    #[serde(default)]
    pub note: Option<String>,
    /// The viewer's token, when it has one.
    #[serde(default)]
    pub token: Option<String>,
}

/// One box, in pixels of the image.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BoxBody {
    /// Left.
    pub x1: f32,
    /// Top.
    pub y1: f32,
    /// Right.
    pub x2: f32,
    /// Bottom.
    pub y2: f32,
    /// One of the pipeline's classes.
    pub class: String,
}

/// Checks every box against the image's size and the classes, reporting each problem.
pub fn check_boxes(boxes: &[BoxBody], width: u32, height: u32) -> Result<Vec<BoxLabel>, String> {
    if boxes.len() > MAX_BOXES {
        return Err(format!(
            "{} boxes: at most {MAX_BOXES} per board",
            boxes.len()
        ));
    }
    let (w, h) = (width as f32, height as f32);
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (i, b) in boxes.iter().enumerate() {
        let n = i + 1;
        let Some(class_index) = CLASS_NAMES.iter().position(|c| *c == b.class) else {
            problems.push(format!(
                "box {n}: class {:?} is not one of {}",
                b.class.chars().take(40).collect::<String>(),
                CLASS_NAMES.join(", ")
            ));
            continue;
        };
        let finite = [b.x1, b.y1, b.x2, b.y2].iter().all(|v| v.is_finite());
        if !finite
            || b.x1 < 0.0
            || b.y1 < 0.0
            || b.x2 > w
            || b.y2 > h
            || b.x2 - b.x1 < 1.0
            || b.y2 - b.y1 < 1.0
        {
            problems.push(format!(
                "box {n}: ({}, {})-({}, {}) must lie in the {width}x{height} image, at least 1 pixel each way",
                b.x1, b.y1, b.x2, b.y2
            ));
            continue;
        }
        out.push(BoxLabel {
            x1: b.x1,
            y1: b.y1,
            x2: b.x2,
            y2: b.y2,
            class_id: class_index as u16 + 1,
            class: b.class.clone(),
        });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems.join("; "))
    }
}

/// The labels' digest (`l<16 hex>`) that a record id carries, when there are labels.
pub fn labels_digest(image_id: &str, labels: Option<&[BoxLabel]>) -> Option<String> {
    labels?;
    record_id(image_id, labels)
        .split_once('.')
        .map(|(_, d)| d.to_string())
}

/// Who saves a revision, of which board, reviewing which answer.
pub struct Reviewer<'a> {
    /// The operator's name.
    pub by: &'a str,
    /// The operator's note.
    pub note: Option<&'a str>,
    /// The model version whose answer is on the page.
    pub reviewed: Option<ModelRef>,
    /// Now, ms since the Unix epoch.
    pub at_ms: i64,
    /// The boxes of the answer on the page (the reviewed version's defects).
    pub answer: &'a [BoxLabel],
}

/// The boxes of `answer` that `saved` does not keep: for each, no saved box of its class
/// at IoU 0.5 or more. A box moved a little or kept as it was is kept; a box whose class
/// was changed counts as deleted, which training reads as "not this class here" (the
/// saved box of the new class over it still makes it a defect there).
pub fn deleted_boxes(answer: &[BoxLabel], saved: &[BoxLabel]) -> Vec<BoxLabel> {
    answer
        .iter()
        .filter(|a| {
            !saved.iter().any(|s| {
                s.class_id == a.class_id && pcb_evaluation::iou(corners(a), corners(s)) >= 0.5
            })
        })
        .cloned()
        .collect()
}

fn corners(b: &BoxLabel) -> [f32; 4] {
    [b.x1, b.y1, b.x2, b.y2]
}

/// The label revision of the board `record` with `labels`: its own image and template
/// bytes (or their references, when they are in the image files' bucket), the record's
/// metadata, and the revision mark with the answer's boxes the labels delete.
pub fn revision_record(
    record: &EncodedImage,
    labels: Vec<BoxLabel>,
    who: Reviewer<'_>,
) -> Result<RawImage, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    // A file in the image files' bucket is named by the same reference, not stored again.
    let image = match &record.image_ref {
        Some(_) => Vec::new(),
        None => b64
            .decode(&record.image_b64)
            .map_err(|e| format!("the stored image does not decode: {e}"))?,
    };
    let template = match (&record.template_ref, &record.template_b64) {
        (Some(_), _) => None,
        (None, Some(t)) => Some(
            b64.decode(t)
                .map_err(|e| format!("the stored template does not decode: {e}"))?,
        ),
        (None, None) => None,
    };
    let deleted = deleted_boxes(who.answer, &labels);
    Ok(RawImage {
        image_id: record.image_id.clone(),
        image,
        template,
        labels: Some(labels),
        label_format: Some("viewer".into()),
        board_id: record.board_id.clone(),
        line_id: record.line_id.clone(),
        source: record.source.clone(),
        captured_at_ms: record.captured_at_ms,
        split_hint: record.split_hint,
        revision: Some(LabelRevision {
            by: who.by.to_string(),
            at_ms: who.at_ms,
            replaces: labels_digest(&record.image_id, record.labels.as_deref()),
            reviewed: who.reviewed,
            note: who.note.map(str::to_string),
            deleted,
        }),
        image_ref: record.image_ref.clone(),
        template_ref: record.template_ref.clone(),
    })
}

/// One entry of a board's label history: the labels a record carried, and who set them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HistoryEntry {
    /// The record's stream sequence.
    pub seq: u64,
    /// `ingester` (the board as it came) or `viewer` (a revision).
    pub from: &'static str,
    /// Who saved it (revisions).
    pub by: Option<String>,
    /// When: the revision's time, or the encoder's.
    pub at_ms: i64,
    /// The operator's note.
    pub note: Option<String>,
    /// The model answer the operator reviewed, `name@version`.
    pub reviewed: Option<String>,
    /// Its labels' digest (None: unlabelled).
    pub digest: Option<String>,
    /// The labels it replaced.
    pub replaces: Option<String>,
    /// Its boxes (None: unlabelled).
    pub labels: Option<Vec<BoxBody>>,
}

impl HistoryEntry {
    /// The entry of the record at `seq`.
    pub fn of(seq: u64, r: &EncodedImage) -> HistoryEntry {
        let rev = r.revision.as_ref();
        HistoryEntry {
            seq,
            from: if rev.is_some() { "viewer" } else { "ingester" },
            by: rev.map(|v| v.by.clone()),
            at_ms: rev.map_or(r.encoded_at_ms, |v| v.at_ms),
            note: rev.and_then(|v| v.note.clone()),
            reviewed: rev
                .and_then(|v| v.reviewed.as_ref())
                .map(|m| format!("{}@{}", m.name, m.version)),
            digest: labels_digest(&r.image_id, r.labels.as_deref()),
            replaces: rev.and_then(|v| v.replaces.clone()),
            labels: r.labels.as_ref().map(|ls| {
                ls.iter()
                    .map(|l| BoxBody {
                        x1: l.x1,
                        y1: l.y1,
                        x2: l.x2,
                        y2: l.y2,
                        class: l.class.clone(),
                    })
                    .collect()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(x1: f32, y1: f32, x2: f32, y2: f32, class: &str) -> BoxBody {
        BoxBody {
            x1,
            y1,
            x2,
            y2,
            class: class.into(),
        }
    }

    #[test]
    fn boxes_are_checked_against_the_image_and_the_classes_all_at_once() {
        let ok = check_boxes(&[bx(1.0, 2.0, 30.0, 40.0, "short")], 64, 64).expect("valid");
        assert_eq!(ok[0].class_id, 2);
        assert_eq!(ok[0].class, "short");
        let e = check_boxes(
            &[
                bx(1.0, 2.0, 30.0, 40.0, "scratch"),
                bx(-1.0, 2.0, 30.0, 40.0, "open"),
                bx(10.0, 10.0, 10.5, 40.0, "spur"),
                bx(0.0, 0.0, f32::NAN, 4.0, "spur"),
                bx(0.0, 0.0, 65.0, 4.0, "spur"),
            ],
            64,
            64,
        )
        .expect_err("invalid");
        for n in 1..=5 {
            assert!(e.contains(&format!("box {n}:")), "{e}");
        }
        assert!(e.contains("\"scratch\" is not one of open, short"), "{e}");
        assert!(check_boxes(&[], 64, 64).expect("none").is_empty());
        let many: Vec<BoxBody> = (0..=MAX_BOXES)
            .map(|_| bx(0.0, 0.0, 2.0, 2.0, "open"))
            .collect();
        assert!(check_boxes(&many, 64, 64).is_err());
    }

    fn record(labels: Option<Vec<BoxLabel>>) -> EncodedImage {
        let b64 = base64::engine::general_purpose::STANDARD;
        EncodedImage {
            image_id: "ab".repeat(32),
            board_id: "b1".into(),
            line_id: "line-1".into(),
            source: "line-1/b1.png".into(),
            captured_at_ms: 5,
            encoded_at_ms: 6,
            image_b64: b64.encode(b"image bytes"),
            width: 64,
            height: 64,
            channels: 1,
            format: "png".into(),
            sha256: "ab".repeat(32),
            labels,
            label_format: Some("voc".into()),
            template_b64: Some(b64.encode(b"template bytes")),
            split_hint: Some(pcb_schemas::Split::Train),
            revision: None,
            image_ref: None,
            template_ref: None,
        }
    }

    #[test]
    fn a_revision_is_the_boards_own_image_with_the_new_labels_and_who_saved_them() {
        let old = check_boxes(&[bx(1.0, 1.0, 9.0, 9.0, "open")], 64, 64).expect("old");
        let new = check_boxes(&[bx(2.0, 2.0, 20.0, 20.0, "spur")], 64, 64).expect("new");
        let r = record(Some(old.clone()));
        // The answer on the page: the spur kept (moved by a pixel), a false open deleted,
        // and a short where the spur is, whose class the operator changed.
        let answer = check_boxes(
            &[
                bx(2.0, 2.0, 20.0, 21.0, "spur"),
                bx(40.0, 40.0, 50.0, 50.0, "open"),
                bx(2.0, 2.0, 20.0, 20.0, "short"),
            ],
            64,
            64,
        )
        .expect("answer");
        let raw = revision_record(
            &r,
            new.clone(),
            Reviewer {
                by: "ana",
                note: Some("missed spur"),
                reviewed: Some(ModelRef {
                    name: "pcb".into(),
                    version: 2,
                }),
                at_ms: 99,
                answer: &answer,
            },
        )
        .expect("revision");
        assert_eq!(raw.revision.as_ref().expect("marked").deleted, answer[1..]);
        assert_eq!(raw.image, b"image bytes");
        assert_eq!(raw.template.as_deref(), Some(&b"template bytes"[..]));
        assert_eq!(raw.labels.as_deref(), Some(&new[..]));
        assert_eq!(raw.split_hint, r.split_hint);
        assert_eq!(
            (raw.board_id.as_str(), raw.line_id.as_str()),
            ("b1", "line-1")
        );
        let rev = raw.revision.as_ref().expect("marked");
        assert_eq!((rev.by.as_str(), rev.at_ms), ("ana", 99));
        assert_eq!(rev.replaces, labels_digest(&r.image_id, Some(&old)));
        assert!(rev.replaces.as_deref().is_some_and(|d| d.starts_with('l')));
        // A new record of its own: its id differs from the board's first one.
        assert_ne!(
            record_id(&raw.image_id, raw.labels.as_deref()),
            record_id(&r.image_id, r.labels.as_deref())
        );
        // An unlabelled board replaces nothing.
        let raw = revision_record(
            &record(None),
            new,
            Reviewer {
                by: "ana",
                note: None,
                reviewed: None,
                at_ms: 1,
                answer: &[],
            },
        )
        .expect("revision");
        let mark = raw.revision.expect("marked");
        assert_eq!(mark.replaces, None);
        assert!(mark.deleted.is_empty(), "no answer, nothing deleted");
        // A board whose files are in the image files' bucket: the revision names them by
        // the same references (nothing stored again, nothing carried inline).
        let mut large = record(None);
        large.image_b64 = String::new();
        large.template_b64 = None;
        large.image_ref = Some(pcb_schemas::ObjectRef::of(b"image bytes"));
        large.template_ref = Some(pcb_schemas::ObjectRef::of(b"template bytes"));
        let raw = revision_record(
            &large,
            vec![],
            Reviewer {
                by: "ana",
                note: None,
                reviewed: None,
                at_ms: 1,
                answer: &[],
            },
        )
        .expect("revision");
        assert!(raw.image.is_empty());
        assert_eq!(raw.template, None);
        assert_eq!(raw.image_ref, large.image_ref);
        assert_eq!(raw.template_ref, large.template_ref);
        let mut bad = record(None);
        bad.image_b64 = "%%%".into();
        assert!(revision_record(
            &bad,
            vec![],
            Reviewer {
                by: "a",
                note: None,
                reviewed: None,
                at_ms: 1,
                answer: &[],
            }
        )
        .is_err());
    }

    #[test]
    fn the_history_says_where_each_labelling_came_from() {
        let first = HistoryEntry::of(3, &record(None));
        assert_eq!(
            (first.from, first.at_ms, first.labels),
            ("ingester", 6, None)
        );
        let mut r = record(Some(vec![]));
        r.revision = Some(LabelRevision {
            by: "ana".into(),
            at_ms: 9,
            replaces: None,
            reviewed: Some(ModelRef {
                name: "pcb".into(),
                version: 2,
            }),
            note: Some("no defect".into()),
            deleted: Vec::new(),
        });
        let e = HistoryEntry::of(7, &r);
        assert_eq!(e.from, "viewer");
        assert_eq!(e.by.as_deref(), Some("ana"));
        assert_eq!(e.reviewed.as_deref(), Some("pcb@2"));
        assert_eq!(e.labels, Some(vec![]));
        assert!(e.digest.is_some());
    }
}
