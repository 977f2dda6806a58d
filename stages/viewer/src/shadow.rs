//! Shadow versions on the Models page: the answers on `pcb.shadow.detections`, one compact
//! entry per model and image, and their comparison with the live answers the index holds
//! for the same boards (agreement, boards whose verdict would change, defects per class).

use std::collections::{BTreeMap, HashMap};

use pcb_schemas::{Detection, Verdict};
use serde::Serialize;

/// What the comparison needs of one answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Board identifier.
    pub board_id: String,
    /// The version that answered.
    pub version: u64,
    /// `pass` or `fail`.
    pub verdict: Verdict,
    /// Defects per class.
    pub classes: Vec<(String, u32)>,
    /// Sequence of the message in its stream.
    pub seq: u64,
}

impl Answer {
    /// The compact answer of detection `d` (message `seq`).
    pub fn of(d: &Detection, seq: u64) -> Answer {
        let mut classes: Vec<(String, u32)> = Vec::new();
        for defect in &d.defects {
            match classes.iter_mut().find(|(c, _)| *c == defect.class) {
                Some((_, n)) => *n += 1,
                None => classes.push((defect.class.clone(), 1)),
            }
        }
        Answer {
            board_id: d.board_id.clone(),
            version: d.model.version,
            verdict: d.verdict,
            classes,
            seq,
        }
    }
}

/// The shadow answers, by model name and image.
#[derive(Debug, Default)]
pub struct ShadowIndex {
    by_model: HashMap<String, HashMap<String, Answer>>,
}

/// A board whose verdict the shadow version would change.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Changed {
    /// sha256 of the image (the board page's id).
    pub image_id: String,
    /// Board identifier.
    pub board_id: String,
    /// The live verdict.
    pub live: Verdict,
    /// The shadow version's.
    pub shadow: Verdict,
}

/// Defects of one class, live and shadow, over the compared boards.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassDiff {
    /// Class name.
    pub class: String,
    /// Defects the live answers report.
    pub live: u64,
    /// Defects the shadow answers report.
    pub shadow: u64,
}

/// Live and shadow verdicts against the corrected labels (a box: fail; none: pass).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct OnCorrected {
    /// Corrected boards both versions answered.
    pub boards: u64,
    /// Of those, boards whose live verdict the correction confirms.
    pub live_right: u64,
    /// Boards whose shadow verdict it confirms.
    pub shadow_right: u64,
}

/// A shadow version against the live answers on the boards both answered.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Comparison {
    /// The shadow version.
    pub version: u64,
    /// Boards with both a shadow answer by it and a live answer.
    pub boards: u64,
    /// Of those, boards with the same verdict.
    pub agree: u64,
    /// `agree / boards` (None: nothing compared yet).
    pub agreement: Option<f64>,
    /// Boards whose verdict would change.
    pub changed: u64,
    /// The most recent of them, newest first.
    pub changed_boards: Vec<Changed>,
    /// Shadow answers whose board has no live answer in the index (yet, or any more).
    pub unmatched: u64,
    /// Defects per class, by class name.
    pub classes: Vec<ClassDiff>,
}

impl ShadowIndex {
    /// Takes a shadow answer; an image answered again by the model keeps the newer one.
    pub fn add(&mut self, d: &Detection, seq: u64) {
        let answers = self.by_model.entry(d.model.name.clone()).or_default();
        match answers.get(&d.image_id) {
            Some(old) if old.seq > seq => {}
            _ => {
                answers.insert(d.image_id.clone(), Answer::of(d, seq));
            }
        }
    }

    /// Forgets the answers no longer in the stream (sequence below `first_seq`), so memory
    /// follows the stream's retention; returns how many went.
    pub fn evict_before(&mut self, first_seq: u64) -> usize {
        let mut gone = 0;
        for answers in self.by_model.values_mut() {
            let before = answers.len();
            answers.retain(|_, a| a.seq >= first_seq);
            gone += before - answers.len();
        }
        self.by_model.retain(|_, a| !a.is_empty());
        gone
    }

    /// The shadow answer of `name` for `image_id`: its version and verdict.
    pub fn verdict_of(&self, name: &str, image_id: &str) -> Option<(u64, Verdict)> {
        self.by_model
            .get(name)?
            .get(image_id)
            .map(|a| (a.version, a.verdict))
    }

    /// Who was right on the boards an operator corrected: `truth` gives a corrected board's
    /// verdict (fail when its labels have a box), `live` the live one.
    pub fn on_corrected(
        &self,
        name: &str,
        version: u64,
        live: impl Fn(&str) -> Option<Verdict>,
        truth: impl Fn(&str) -> Option<Verdict>,
    ) -> OnCorrected {
        let mut out = OnCorrected::default();
        for (image_id, a) in self.by_model.get(name).into_iter().flatten() {
            if a.version != version {
                continue;
            }
            let (Some(t), Some(l)) = (truth(image_id), live(image_id)) else {
                continue;
            };
            out.boards += 1;
            out.live_right += u64::from(l == t);
            out.shadow_right += u64::from(a.verdict == t);
        }
        out
    }

    /// Compares `name`'s shadow `version` with the live answers `live` gives by image id,
    /// listing at most `listed` changed boards.
    pub fn compare(
        &self,
        name: &str,
        version: u64,
        live: impl Fn(&str) -> Option<(Verdict, Vec<(String, u32)>)>,
        listed: usize,
    ) -> Comparison {
        let (mut boards, mut agree, mut unmatched) = (0u64, 0u64, 0u64);
        let mut changed: Vec<(u64, Changed)> = Vec::new();
        let mut classes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let answers = self.by_model.get(name);
        for (image_id, a) in answers.into_iter().flatten() {
            if a.version != version {
                continue;
            }
            let Some((live_verdict, live_classes)) = live(image_id) else {
                unmatched += 1;
                continue;
            };
            boards += 1;
            if live_verdict == a.verdict {
                agree += 1;
            } else {
                changed.push((
                    a.seq,
                    Changed {
                        image_id: image_id.clone(),
                        board_id: a.board_id.clone(),
                        live: live_verdict,
                        shadow: a.verdict,
                    },
                ));
            }
            for (c, n) in live_classes {
                classes.entry(c).or_default().0 += u64::from(n);
            }
            for (c, n) in &a.classes {
                classes.entry(c.clone()).or_default().1 += u64::from(*n);
            }
        }
        changed.sort_by_key(|c| std::cmp::Reverse(c.0));
        Comparison {
            version,
            boards,
            agree,
            agreement: (boards > 0).then(|| agree as f64 / boards as f64),
            changed: changed.len() as u64,
            changed_boards: changed.into_iter().take(listed).map(|(_, c)| c).collect(),
            unmatched,
            classes: classes
                .into_iter()
                .map(|(class, (live, shadow))| ClassDiff {
                    class,
                    live,
                    shadow,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcb_schemas::{Defect, ModelRef};

    fn det(id: &str, version: u64, classes: &[&str]) -> Detection {
        Detection {
            image_id: id.into(),
            board_id: format!("board-{id}"),
            line_id: "l".into(),
            source: format!("{id}.jpg"),
            captured_at: 0,
            detected_at: 0,
            model: ModelRef {
                name: "m".into(),
                version,
            },
            verdict: if classes.is_empty() {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
            defects: classes
                .iter()
                .map(|c| Defect {
                    x1: 0.,
                    y1: 0.,
                    x2: 1.,
                    y2: 1.,
                    class_id: 1,
                    class: c.to_string(),
                    score: 0.9,
                })
                .collect(),
            inference_ms: 1.0,
        }
    }

    #[test]
    fn agreement_changed_boards_and_classes_over_the_boards_both_answered() {
        let mut shadow = ShadowIndex::default();
        // Live: a passes, b fails with a short, c fails with two opens; d has no live answer.
        let live: HashMap<&str, Detection> = [
            ("a", det("a", 1, &[])),
            ("b", det("b", 1, &["short"])),
            ("c", det("c", 1, &["open", "open"])),
        ]
        .into_iter()
        .collect();
        shadow.add(&det("a", 2, &["spur"]), 1);
        shadow.add(&det("b", 2, &["short"]), 2);
        shadow.add(&det("c", 2, &["open"]), 3);
        shadow.add(&det("d", 2, &[]), 4);
        // An answer by an earlier shadow version is not compared with this one.
        shadow.add(&det("e", 1, &[]), 5);
        let lookup = |id: &str| {
            live.get(id).map(|d| {
                let a = Answer::of(d, 0);
                (a.verdict, a.classes)
            })
        };
        let c = shadow.compare("m", 2, lookup, 10);
        assert_eq!((c.boards, c.agree, c.changed, c.unmatched), (3, 2, 1, 1));
        assert_eq!(c.agreement, Some(2.0 / 3.0));
        assert_eq!(
            c.changed_boards,
            [Changed {
                image_id: "a".into(),
                board_id: "board-a".into(),
                live: Verdict::Pass,
                shadow: Verdict::Fail,
            }]
        );
        let per_class: Vec<(&str, u64, u64)> = c
            .classes
            .iter()
            .map(|d| (d.class.as_str(), d.live, d.shadow))
            .collect();
        assert_eq!(per_class, [("open", 2, 1), ("short", 1, 1), ("spur", 0, 1)]);
        // Corrected boards: a was corrected to a spur (fail: shadow right, live wrong), c
        // to clean (pass: both said fail, both wrong); b was not corrected.
        let truth = |id: &str| match id {
            "a" => Some(Verdict::Fail),
            "c" => Some(Verdict::Pass),
            _ => None,
        };
        let live_verdict = |id: &str| lookup(id).map(|(v, _)| v);
        let on = shadow.on_corrected("m", 2, live_verdict, truth);
        assert_eq!(
            on,
            OnCorrected {
                boards: 2,
                live_right: 0,
                shadow_right: 1
            }
        );
        assert_eq!(shadow.verdict_of("m", "a"), Some((2, Verdict::Fail)));
        assert_eq!(shadow.verdict_of("m", "zz"), None);
        // Another model's name compares nothing.
        assert_eq!(shadow.compare("other", 2, lookup, 10).agreement, None);
        // Eviction follows the stream: answers below its first sequence go.
        assert_eq!(shadow.evict_before(3), 2);
        assert_eq!(shadow.compare("m", 2, lookup, 10).boards, 1);
    }

    #[test]
    fn a_redelivered_answer_keeps_the_newer_and_the_list_is_capped_newest_first() {
        let mut shadow = ShadowIndex::default();
        for (i, id) in ["x", "y", "z"].iter().enumerate() {
            shadow.add(&det(id, 2, &["open"]), 10 + i as u64);
        }
        // An older message for x (a replay from the start) does not replace the newer.
        shadow.add(&det("x", 2, &[]), 1);
        let all_pass = |_: &str| Some((Verdict::Pass, Vec::new()));
        let c = shadow.compare("m", 2, all_pass, 2);
        assert_eq!(c.changed, 3);
        let ids: Vec<&str> = c
            .changed_boards
            .iter()
            .map(|b| b.image_id.as_str())
            .collect();
        assert_eq!(ids, ["z", "y"]);
    }
}
