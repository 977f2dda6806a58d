//! The evaluation result and its two renderings: pretty JSON and a fixed-width terminal table.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::{MetricsError, OfficialScore};

/// Raw precision/recall points of one class under the DeepPCB matching, one per ranked
/// detection (before interpolation). Empty for a class without ground truth.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrCurve {
    /// Recall after each ranked detection, non-decreasing.
    pub recall: Vec<f64>,
    /// Precision after each ranked detection.
    pub precision: Vec<f64>,
}

/// The numbers of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    /// Class name as given to [`crate::evaluate`].
    pub name: String,
    /// 1-based class id.
    pub class_id: u16,
    /// Ground-truth boxes of the class.
    pub ground_truth: usize,
    /// Detections of the class, at any score.
    pub detections: usize,
    /// AP at IoU > 0.33; `None` without ground truth.
    pub ap_deeppcb: Option<f64>,
    /// AP at IoU > 0.5; `None` without ground truth.
    pub ap50: Option<f64>,
    /// Precision at the global best-F threshold.
    pub precision: f64,
    /// Recall at the global best-F threshold.
    pub recall: f64,
    /// F score at the global best-F threshold.
    pub f_score: f64,
    /// True positives kept at the global best-F threshold.
    pub true_positives: usize,
    /// False positives kept at the global best-F threshold.
    pub false_positives: usize,
    /// The DeepPCB precision/recall curve.
    pub pr_curve: PrCurve,
}

/// The score threshold with the best F over all listed classes pooled (DeepPCB matching).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    /// Keep detections with `score >= threshold`; `None` when there is no scored detection.
    pub threshold: Option<f32>,
    /// Pooled precision there.
    pub precision: f64,
    /// Pooled recall there.
    pub recall: f64,
    /// Pooled F score there.
    pub f_score: f64,
    /// True positives kept there.
    pub true_positives: usize,
    /// False positives kept there.
    pub false_positives: usize,
    /// Ground-truth boxes of all listed classes (so missed = this − true positives).
    pub ground_truth: usize,
}

/// Everything [`crate::evaluate`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// One entry per listed class, in class-id order.
    pub classes: Vec<ClassReport>,
    /// Mean DeepPCB AP over the classes with ground truth; `None` when none has any.
    pub map_deeppcb: Option<f64>,
    /// Mean AP50 over the classes with ground truth; `None` when none has any.
    pub map50: Option<f64>,
    /// The best-F operating point.
    pub best: OperatingPoint,
    /// Images evaluated, empty ones included.
    pub images: usize,
    /// Images per second of the timed run, when a positive finite time was given.
    pub images_per_sec: Option<f64>,
    /// Ground-truth boxes whose class id is not in the class list, left out of every number.
    pub unlisted_ground_truth: usize,
    /// Detections whose class id is not in the class list, left out of every number.
    pub unlisted_detections: usize,
    /// DeepPCB's own evaluation script's score (pooled AP, P/R/F; see [`crate::official`])
    /// with every detection submitted. Defaulted when reading a report that predates it.
    #[serde(default)]
    pub official_all: OfficialScore,
    /// The same with only the detections at or above [`Report::best`]'s threshold
    /// submitted; `None` when there is no such threshold (or in a report that predates it).
    #[serde(default)]
    pub official_at_best: Option<OfficialScore>,
}

/// A fraction as a percentage with two decimals, `-` when undefined.
fn pct(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{:.2}", v * 100.0))
}

/// `P x%`, `R y%` and `F z%` (as [`pct`] writes them) joined by `gap`.
fn prf_text(precision: f64, recall: f64, f_score: f64, gap: &str) -> String {
    let [p, r, f] = [precision, recall, f_score].map(|v| pct(Some(v)));
    format!("P {p}%{gap}R {r}%{gap}F {f}%")
}

impl Report {
    /// The report as pretty-printed JSON (NaN never occurs; undefined values are `null`).
    pub fn to_json(&self) -> Result<String, MetricsError> {
        serde_json::to_string_pretty(self)
            .map_err(|source| MetricsError::SerializeReport { source })
    }

    /// A fixed-width table for a terminal: one row per class (gt, detections, AP%, AP50%,
    /// and P%, R%, F% at the best threshold), a mAP row, the best threshold with its pooled
    /// P/R/F, the DeepPCB script's pooled AP (all detections) with its P/R/F at the best
    /// threshold, and the image count with images/s when known.
    pub fn table(&self) -> String {
        let name_width = self
            .classes
            .iter()
            .map(|c| c.name.chars().count())
            .chain([5])
            .max()
            .unwrap_or(5);
        let mut out = String::new();
        // Writing into a String cannot fail, so the fmt::Results are dropped.
        let _ = writeln!(
            out,
            "{:<name_width$} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7}",
            "class", "gt", "dets", "AP%", "AP50%", "P%", "R%", "F%"
        );
        let rule = "-".repeat(name_width + 7 * 2 + 8 * 5);
        let _ = writeln!(out, "{rule}");
        for c in &self.classes {
            let _ = writeln!(
                out,
                "{:<name_width$} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7}",
                c.name,
                c.ground_truth,
                c.detections,
                pct(c.ap_deeppcb),
                pct(c.ap50),
                pct(Some(c.precision)),
                pct(Some(c.recall)),
                pct(Some(c.f_score)),
            );
        }
        let _ = writeln!(out, "{rule}");
        let _ = writeln!(
            out,
            "{:<name_width$} {:>6} {:>6} {:>7} {:>7}",
            "mAP",
            self.classes.iter().map(|c| c.ground_truth).sum::<usize>(),
            self.classes.iter().map(|c| c.detections).sum::<usize>(),
            pct(self.map_deeppcb),
            pct(self.map50),
        );
        let b = &self.best;
        match b.threshold {
            Some(t) => {
                let _ = writeln!(
                    out,
                    "best threshold {t:.4}: {}  (TP {}, FP {}, FN {})",
                    prf_text(b.precision, b.recall, b.f_score, "  "),
                    b.true_positives,
                    b.false_positives,
                    b.ground_truth.saturating_sub(b.true_positives),
                );
            }
            None => {
                let _ = writeln!(out, "best threshold: none (no scored detection)");
            }
        }
        // The script's AP is over everything submitted; its P/R/F belong to one submission,
        // that of the best threshold when there is one.
        let official = &self.official_all;
        let (cut, at) = match &self.official_at_best {
            Some(
                o @ OfficialScore {
                    threshold: Some(t), ..
                },
            ) => (format!("at score >= {t:.4}"), o),
            _ => ("all detections".to_string(), official),
        };
        let _ = writeln!(
            out,
            "DeepPCB script (pooled): AP {}%  {cut}: {}",
            pct(Some(official.ap)),
            prf_text(at.precision, at.recall, at.f_score, " "),
        );
        let _ = write!(out, "images: {}", self.images);
        if let Some(rate) = self.images_per_sec {
            let _ = write!(out, ", {rate:.1} images/s");
        }
        if self.unlisted_ground_truth + self.unlisted_detections > 0 {
            let _ = write!(
                out,
                "; not evaluated (unknown class id): {} gt, {} detections",
                self.unlisted_ground_truth, self.unlisted_detections
            );
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::{evaluate, Detection, GtBox, ImageResult, Report};

    fn sample() -> Report {
        let images = vec![ImageResult {
            image: "00041000_test".to_string(),
            ground_truth: vec![
                GtBox {
                    x1: 0.,
                    y1: 0.,
                    x2: 10.,
                    y2: 10.,
                    class_id: 1,
                },
                GtBox {
                    x1: 20.,
                    y1: 20.,
                    x2: 30.,
                    y2: 30.,
                    class_id: 1,
                },
            ],
            detections: vec![
                Detection {
                    x1: 0.,
                    y1: 0.,
                    x2: 10.,
                    y2: 10.,
                    class_id: 1,
                    score: 0.9,
                },
                Detection {
                    x1: 50.,
                    y1: 50.,
                    x2: 60.,
                    y2: 60.,
                    class_id: 1,
                    score: 0.8,
                },
                Detection {
                    x1: 20.,
                    y1: 20.,
                    x2: 30.,
                    y2: 30.,
                    class_id: 1,
                    score: 0.7,
                },
            ],
        }];
        evaluate(&images, &["open", "mousebite"], Some(0.5))
    }

    #[test]
    fn table_lists_classes_map_and_threshold() {
        // AP open = 0.5 * 1 + 0.5 * 2/3 = 83.33%; mousebite has no gt → "-".
        // Best F: t=0.9 P 1 R 1/2 F 2/3; t=0.8 P 1/2 R 1/2 F 1/2; t=0.7 P 2/3 R 1 F 0.8 ← best.
        let table = sample().table();
        assert!(table.contains("open"), "{table}");
        assert!(table.contains("mousebite"), "{table}");
        assert!(table.contains("mAP"), "{table}");
        assert!(table.contains("83.33"), "{table}");
        assert!(
            table.contains("best threshold 0.7000: P 66.67%  R 100.00%  F 80.00%"),
            "{table}"
        );
        // The script's pool: g1 takes 0.9, g2 takes 0.7 (0.8 overlaps nothing):
        // AP = (1/1 + 2/3) / 2 = 83.33%; at 0.7 all three are submitted: P 2/3, R 1, F 0.8.
        assert!(
            table.contains(
                "DeepPCB script (pooled): AP 83.33%  at score >= 0.7000: P 66.67% R 100.00% F 80.00%"
            ),
            "{table}"
        );
        assert!(table.contains("images: 1, 2.0 images/s"), "{table}");
        let mousebite = table
            .lines()
            .find(|l| l.starts_with("mousebite"))
            .unwrap_or_default();
        assert!(mousebite.contains(" - "), "{mousebite}");
        // Every class row is as wide as the header.
        let header_len = table.lines().next().map(str::len);
        assert!(table
            .lines()
            .filter(|l| l.starts_with("open") || l.starts_with("mousebite"))
            .all(|l| Some(l.len()) == header_len));
    }

    #[test]
    fn json_round_trips_with_null_for_undefined_ap() {
        let report = sample();
        let json = report.to_json().expect("serialises");
        assert!(json.contains("\"ap_deeppcb\": null"), "{json}");
        let back: Report = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.classes.len(), 2);
        assert_eq!(back.best, report.best);
        assert!((back.map_deeppcb.unwrap_or_default() - (0.5 + 1.0 / 3.0)).abs() < 1e-9);
        assert_eq!(back.official_all, report.official_all);
        assert_eq!(back.official_at_best, report.official_at_best);
        assert!(json.contains("\"official_all\""), "{json}");
    }

    #[test]
    fn json_without_official_fields_still_parses() {
        // A report written before the script's score existed.
        let mut value = serde_json::to_value(sample()).expect("serialises");
        if let Some(map) = value.as_object_mut() {
            map.remove("official_all");
            map.remove("official_at_best");
        }
        let back: Report = serde_json::from_value(value).expect("parses");
        assert_eq!(back.official_all, crate::OfficialScore::default());
        assert_eq!(back.official_at_best, None);
    }

    #[test]
    fn table_without_threshold_shows_the_script_on_all_detections() {
        let images = vec![ImageResult {
            image: "a".to_string(),
            ground_truth: vec![GtBox {
                x1: 0.,
                y1: 0.,
                x2: 10.,
                y2: 10.,
                class_id: 1,
            }],
            detections: vec![],
        }];
        let report = evaluate(&images, &["open"], None);
        assert_eq!(report.official_at_best, None);
        let table = report.table();
        assert!(
            table.contains(
                "DeepPCB script (pooled): AP 0.00%  all detections: P 0.00% R 0.00% F 0.00%"
            ),
            "{table}"
        );
    }
}
