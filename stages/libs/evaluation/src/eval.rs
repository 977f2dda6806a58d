//! The evaluation protocol: IoU, score-ordered greedy matching, all-points average precision
//! and the best-F operating point, turned into a [`Report`].
//!
//! # Protocol
//!
//! Only the listed classes are evaluated: `classes[i]` is class id `i + 1`. Ground-truth
//! boxes and detections with any other class id (0, or past the list) are left out of every
//! number and only counted in [`Report::unlisted_ground_truth`] and
//! [`Report::unlisted_detections`].
//!
//! **Matching** (per class, per IoU criterion): all detections of the class over all images
//! are ranked by descending score; ties keep image order, then detection order (stable
//! sort). Walking that ranking, a detection is a true positive when some not-yet-matched
//! ground-truth box of the same class in the same image overlaps it with IoU strictly above
//! the criterion; it is then matched to the unmatched box of highest IoU (the first one on a
//! tie), which can no longer be matched. Every other detection is a false positive, so a
//! second detection of an already found defect, or a detection of the wrong class, is a
//! false positive. Unlike the VOC devkit, already-matched boxes are not candidates at all: the
//! devkit picks the highest-IoU box among all boxes and calls the detection a duplicate when
//! that one is taken, even if another free box overlaps enough; DeepPCB's boxes rarely touch,
//! so the two agree in practice, and this rule is the one that never penalises a detection
//! that has a free defect under it.
//!
//! **DeepPCB AP** uses IoU > [`DEEPPCB_IOU`] (0.33), the dataset's own criterion. **AP50**
//! uses IoU > [`VOC_IOU`] (0.5), strictly greater as in the VOC devkit (`ovmax > 0.5`), so a
//! box at exactly 0.5 does not count.
//!
//! **AP** is the area under the precision/recall curve with all-points interpolation (VOC
//! 2010+): after each ranked detection, recall = TP / #gt and precision = TP / (TP + FP);
//! the curve is framed by (recall 0, precision 0) and (recall 1, precision 0), precision is
//! made non-increasing from the right (each point takes the maximum precision at any higher
//! recall), and AP = Σ (rᵢ − rᵢ₋₁) · pᵢ over the points where recall changes. A class with
//! ground truth but no detections has AP 0. A class with no ground truth has no recall, so
//! its AP is `None` and it is left out of the mean; the mAPs are means over the classes that
//! have ground truth (`None` when none has).
//!
//! **Operating point**: with the DeepPCB matching, every distinct (non-NaN) detection score
//! is a candidate threshold `t`; the detections kept are those with `score >= t`. Because
//! matching walks the ranking in score order, the kept set is a prefix of the ranking and
//! its matches are those of the full run. Pooled over the listed classes, P = TP / kept,
//! R = TP / #gt and F = 2PR / (P + R); the threshold with the highest F is reported (on a
//! tie, the highest such threshold: fewer detections for the same F). Each class's P, R, F
//! at that threshold are reported too. A zero denominator gives 0 (no kept detections → P 0,
//! no ground truth → R 0, P + R = 0 → F 0).
//!
//! **NaN scores** are not rejected: they rank below every number (after −∞), so they still
//! count in the AP ranking (at its tail) but no threshold ever keeps them.
//!
//! **IoU** is continuous (no `+1` pixel convention): area = (x2 − x1) · (y2 − y1), with a
//! negative width or height taken as 0, so a malformed box overlaps nothing.
//!
//! **DeepPCB's own script**: beside these, the report carries the score DeepPCB's
//! `evaluation/script.py` would give (one pooled AP, gt-driven matching, P/R/F of a
//! submission; see [`crate::official`]) for two submissions: every detection
//! ([`Report::official_all`]) and the detections kept at the best-F threshold above
//! ([`Report::official_at_best`], `None` when there is no such threshold).

use std::cmp::Ordering;

use crate::official::deeppcb_official;
use crate::report::{ClassReport, OperatingPoint, PrCurve, Report};
use crate::{Detection, ImageResult};

/// DeepPCB's match criterion: a detection matches when IoU is strictly greater than this.
pub const DEEPPCB_IOU: f64 = 0.33;

/// The VOC / mAP@0.5 match criterion: a detection matches when IoU is strictly greater than
/// this, as in the VOC devkit.
pub const VOC_IOU: f64 = 0.5;

/// Intersection over union of two `[x1, y1, x2, y2]` boxes, continuous (no `+1`).
///
/// Returns 0 for boxes that do not overlap, for degenerate or inverted boxes and when a
/// coordinate is NaN or infinite, so that such a box simply matches nothing.
pub fn iou(a: [f32; 4], b: [f32; 4]) -> f64 {
    let [ax1, ay1, ax2, ay2] = a.map(f64::from);
    let [bx1, by1, bx2, by2] = b.map(f64::from);
    let iw = (ax2.min(bx2) - ax1.max(bx1)).max(0.0);
    let ih = (ay2.min(by2) - ay1.max(by1)).max(0.0);
    let inter = iw * ih;
    let area_a = (ax2 - ax1).max(0.0) * (ay2 - ay1).max(0.0);
    let area_b = (bx2 - bx1).max(0.0) * (by2 - by1).max(0.0);
    let union = area_a + area_b - inter;
    let value = inter / union;
    // `>` with a NaN is false, so NaN and 0/0 fall through to 0 as well.
    if union > 0.0 && value.is_finite() {
        value
    } else {
        0.0
    }
}

/// Descending score, NaN after every number; `Equal` on ties keeps the stable sort's
/// image-then-detection order.
pub(crate) fn by_score_desc(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => b.partial_cmp(&a).unwrap_or(Ordering::Equal),
    }
}

/// One detection of a class after matching, in ranking order.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ranked {
    score: f32,
    true_positive: bool,
}

/// The ranked, matched detections of one class and its ground-truth count.
#[derive(Debug, Clone, PartialEq)]
struct ClassMatch {
    ranked: Vec<Ranked>,
    ground_truth: usize,
}

/// Runs the greedy matching of the module docs for one class id and IoU criterion.
fn match_class(images: &[ImageResult], class_id: u16, min_iou: f64) -> ClassMatch {
    let gts: Vec<Vec<[f32; 4]>> = images
        .iter()
        .map(|img| {
            img.ground_truth
                .iter()
                .filter(|g| g.class_id == class_id)
                .map(|g| g.corners())
                .collect()
        })
        .collect();
    let mut taken: Vec<Vec<bool>> = gts.iter().map(|g| vec![false; g.len()]).collect();

    let mut dets: Vec<(usize, &Detection)> = images
        .iter()
        .enumerate()
        .flat_map(|(i, img)| img.detections.iter().map(move |d| (i, d)))
        .filter(|(_, d)| d.class_id == class_id)
        .collect();
    dets.sort_by(|a, b| by_score_desc(a.1.score, b.1.score));

    let ranked = dets
        .into_iter()
        .map(|(img, det)| {
            let mut best: Option<(usize, f64)> = None;
            for (k, gt) in gts[img].iter().enumerate() {
                if taken[img][k] {
                    continue;
                }
                let overlap = iou(det.corners(), *gt);
                if overlap > min_iou && best.is_none_or(|(_, b)| overlap > b) {
                    best = Some((k, overlap));
                }
            }
            if let Some((k, _)) = best {
                taken[img][k] = true;
            }
            Ranked {
                score: det.score,
                true_positive: best.is_some(),
            }
        })
        .collect();

    ClassMatch {
        ranked,
        ground_truth: gts.iter().map(Vec::len).sum(),
    }
}

/// The raw precision/recall point after each ranked detection; empty without ground truth,
/// where recall is undefined.
fn pr_curve(m: &ClassMatch) -> PrCurve {
    let mut curve = PrCurve::default();
    if m.ground_truth == 0 {
        return curve;
    }
    let mut tp = 0usize;
    for (i, r) in m.ranked.iter().enumerate() {
        tp += usize::from(r.true_positive);
        curve.recall.push(tp as f64 / m.ground_truth as f64);
        curve.precision.push(tp as f64 / (i + 1) as f64);
    }
    curve
}

/// All-points interpolated AP of a raw curve (VOC 2010+), as in the module docs.
fn average_precision(curve: &PrCurve) -> f64 {
    let mut mrec = Vec::with_capacity(curve.recall.len() + 2);
    mrec.push(0.0);
    mrec.extend_from_slice(&curve.recall);
    mrec.push(1.0);
    let mut mpre = Vec::with_capacity(curve.precision.len() + 2);
    mpre.push(0.0);
    mpre.extend_from_slice(&curve.precision);
    mpre.push(0.0);
    for i in (0..mpre.len() - 1).rev() {
        mpre[i] = mpre[i].max(mpre[i + 1]);
    }
    (0..mrec.len() - 1)
        .filter(|&i| mrec[i + 1] != mrec[i])
        .map(|i| (mrec[i + 1] - mrec[i]) * mpre[i + 1])
        .sum()
}

/// P, R, F from counts, with the zero-denominator conventions of the module docs.
pub(crate) fn prf(tp: usize, kept: usize, ground_truth: usize) -> (f64, f64, f64) {
    let p = if kept == 0 {
        0.0
    } else {
        tp as f64 / kept as f64
    };
    let r = if ground_truth == 0 {
        0.0
    } else {
        tp as f64 / ground_truth as f64
    };
    let f = if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    };
    (p, r, f)
}

/// TP and FP among a class's ranked detections kept at `threshold` (none when `None`).
fn kept_counts(ranked: &[Ranked], threshold: Option<f32>) -> (usize, usize) {
    let Some(t) = threshold else {
        return (0, 0);
    };
    ranked
        .iter()
        .filter(|r| r.score >= t)
        .fold((0, 0), |(tp, fp), r| {
            if r.true_positive {
                (tp + 1, fp)
            } else {
                (tp, fp + 1)
            }
        })
}

/// Sweeps every distinct score as a threshold over the pooled DeepPCB matches and returns
/// the best-F operating point.
fn best_operating_point(matches: &[ClassMatch]) -> OperatingPoint {
    let ground_truth: usize = matches.iter().map(|m| m.ground_truth).sum();
    let mut pooled: Vec<Ranked> = matches
        .iter()
        .flat_map(|m| m.ranked.iter().copied())
        .filter(|r| !r.score.is_nan())
        .collect();
    pooled.sort_by(|a, b| by_score_desc(a.score, b.score));

    let mut best = OperatingPoint {
        ground_truth,
        ..OperatingPoint::default()
    };
    let (mut tp, mut fp) = (0usize, 0usize);
    for (i, r) in pooled.iter().enumerate() {
        if r.true_positive {
            tp += 1;
        } else {
            fp += 1;
        }
        // A threshold keeps every detection tied with it, so only the last of a run of
        // equal scores is a candidate.
        if pooled.get(i + 1).is_some_and(|next| next.score == r.score) {
            continue;
        }
        let (precision, recall, f_score) = prf(tp, tp + fp, ground_truth);
        if best.threshold.is_none() || f_score > best.f_score {
            best = OperatingPoint {
                threshold: Some(r.score),
                precision,
                recall,
                f_score,
                true_positives: tp,
                false_positives: fp,
                ground_truth,
            };
        }
    }
    best
}

/// The mean of the defined APs, `None` when no class has one.
fn mean_defined(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let defined: Vec<f64> = values.flatten().collect();
    (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64)
}

/// Evaluates detections against ground truth with the protocol of the module docs.
///
/// `classes[i]` names class id `i + 1`; names past id 65535 are ignored, since no box can
/// carry them. `seconds` is the wall time the model took over `images`, giving
/// [`Report::images_per_sec`] when it is positive and finite.
pub fn evaluate(images: &[ImageResult], classes: &[&str], seconds: Option<f64>) -> Report {
    let listed: Vec<(u16, &str)> = classes
        .iter()
        .enumerate()
        .map_while(|(i, name)| u16::try_from(i + 1).ok().map(|id| (id, *name)))
        .collect();
    let is_listed = |id: u16| id >= 1 && usize::from(id) <= listed.len();

    let deeppcb: Vec<ClassMatch> = listed
        .iter()
        .map(|&(id, _)| match_class(images, id, DEEPPCB_IOU))
        .collect();
    let best = best_operating_point(&deeppcb);

    let class_reports: Vec<ClassReport> = listed
        .iter()
        .zip(&deeppcb)
        .map(|(&(class_id, name), m)| {
            let pr = pr_curve(m);
            let has_gt = m.ground_truth > 0;
            let ap_deeppcb = has_gt.then(|| average_precision(&pr));
            let ap50 = has_gt
                .then(|| average_precision(&pr_curve(&match_class(images, class_id, VOC_IOU))));
            let (tp, fp) = kept_counts(&m.ranked, best.threshold);
            let (precision, recall, f_score) = prf(tp, tp + fp, m.ground_truth);
            ClassReport {
                name: name.to_string(),
                class_id,
                ground_truth: m.ground_truth,
                detections: m.ranked.len(),
                ap_deeppcb,
                ap50,
                precision,
                recall,
                f_score,
                true_positives: tp,
                false_positives: fp,
                pr_curve: pr,
            }
        })
        .collect();

    let unlisted_ground_truth = images
        .iter()
        .flat_map(|img| &img.ground_truth)
        .filter(|g| !is_listed(g.class_id))
        .count();
    let unlisted_detections = images
        .iter()
        .flat_map(|img| &img.detections)
        .filter(|d| !is_listed(d.class_id))
        .count();

    // The script's scale, for comparison with the paper: everything submitted, and the
    // submission a user would make at our best-F threshold.
    let official_all = deeppcb_official(images, classes, None);
    let official_at_best = best
        .threshold
        .map(|t| deeppcb_official(images, classes, Some(t)));

    Report {
        map_deeppcb: mean_defined(class_reports.iter().map(|c| c.ap_deeppcb)),
        map50: mean_defined(class_reports.iter().map(|c| c.ap50)),
        classes: class_reports,
        best,
        images: images.len(),
        images_per_sec: seconds
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| images.len() as f64 / s),
        unlisted_ground_truth,
        unlisted_detections,
        official_all,
        official_at_best,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, det, gt, image, one_image, overlapping};
    use crate::GtBox;

    /// The report on [`one_image`] with one class, `c`, and no timing.
    fn evaluate_one(ground_truth: Vec<GtBox>, detections: Vec<Detection>) -> Report {
        evaluate(&one_image(ground_truth, detections), &["c"], None)
    }

    fn assert_all_close(actual: &[f64], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert_close(*a, *e);
        }
    }

    /// Two gt, three detections: 0.9 TP, 0.8 FP (nowhere), 0.7 TP.
    fn tp_fp_tp() -> Vec<ImageResult> {
        one_image(
            vec![gt(0., 0., 10., 10., 1), gt(20., 20., 30., 30., 1)],
            vec![
                det(20., 20., 30., 30., 1, 0.7),
                det(0., 0., 10., 10., 1, 0.9),
                det(50., 50., 60., 60., 1, 0.8),
            ],
        )
    }

    #[test]
    fn iou_is_continuous() {
        // inter 5*10 = 50, union 100 + 100 - 50 = 150.
        assert_close(iou([0., 0., 10., 10.], [5., 0., 15., 10.]), 50.0 / 150.0);
        assert_close(iou([0., 0., 10., 10.], [0., 0., 10., 10.]), 1.0);
        // Touching edges share no area.
        assert_close(iou([0., 0., 10., 10.], [10., 0., 20., 10.]), 0.0);
        assert_close(iou([0., 0., 0., 0.], [0., 0., 0., 0.]), 0.0);
        assert_close(iou([10., 10., 0., 0.], [0., 0., 10., 10.]), 0.0);
        assert_close(iou([f32::NAN, 0., 10., 10.], [0., 0., 10., 10.]), 0.0);
    }

    #[test]
    fn ap_of_tp_fp_tp() {
        // Ranked 0.9 TP, 0.8 FP, 0.7 TP over 2 gt:
        //   (R, P) = (0.5, 1), (0.5, 0.5), (1, 2/3).
        // Envelope: P = 1 up to R 0.5, then 2/3 up to R 1.
        // AP = 0.5 * 1 + 0.5 * 2/3 = 0.833333...
        let r = evaluate(&tp_fp_tp(), &["open"], None);
        let c = &r.classes[0];
        assert_all_close(&c.pr_curve.recall, &[0.5, 0.5, 1.0]);
        assert_all_close(&c.pr_curve.precision, &[1.0, 0.5, 2.0 / 3.0]);
        assert_close(c.ap_deeppcb.unwrap(), 0.5 + 0.5 * 2.0 / 3.0);
        assert_close(c.ap50.unwrap(), 0.5 + 0.5 * 2.0 / 3.0);
        assert_close(r.map_deeppcb.unwrap(), 0.5 + 0.5 * 2.0 / 3.0);
        assert_eq!((c.ground_truth, c.detections), (2, 3));
    }

    #[test]
    fn iou_thresholds_are_strict_and_between_them_only_deeppcb_matches() {
        // (IoU in hundredths, AP at DeepPCB's IoU > 0.33, AP at VOC's IoU > 0.5): 0.45 lies
        // between the two; 0.5 exactly is no VOC match, 0.33 exactly no DeepPCB one.
        for (hundredths, ap_deeppcb, ap50) in [(45., 1.0, 0.0), (50., 1.0, 0.0), (33., 0.0, 0.0)] {
            let r = evaluate(&overlapping(hundredths), &["c"], None);
            assert_close(r.classes[0].ap_deeppcb.unwrap(), ap_deeppcb);
            assert_close(r.classes[0].ap50.unwrap(), ap50);
        }
        assert_close(iou([0., 0., 100., 33.], [0., 0., 100., 100.]), 0.33);
    }

    #[test]
    fn second_detection_on_same_gt_is_false_positive() {
        // 0.9 TP, 0.8 FP (duplicate) over 1 gt: (R, P) = (1, 1), (1, 0.5); AP = 1.
        let r = evaluate_one(
            vec![gt(0., 0., 10., 10., 1)],
            vec![det(0., 0., 10., 10., 1, 0.9), det(1., 0., 10., 10., 1, 0.8)],
        );
        let c = &r.classes[0];
        assert_all_close(&c.pr_curve.recall, &[1.0, 1.0]);
        assert_all_close(&c.pr_curve.precision, &[1.0, 0.5]);
        assert_close(c.ap_deeppcb.unwrap(), 1.0);
        // Best threshold 0.9 keeps only the TP: P = R = F = 1.
        assert_eq!(r.best.threshold, Some(0.9));
        assert_close(r.best.f_score, 1.0);
    }

    #[test]
    fn matches_the_free_gt_of_highest_iou() {
        // gt A [0,0,10,10], gt B [4,0,14,10]; det1 [3,0,13,10] (IoU A 7/13, B 9/11) takes B;
        // det2 [0,0,10,10] then still finds A free (IoU 1) → both TP, AP 1.
        let r = evaluate_one(
            vec![gt(0., 0., 10., 10., 1), gt(4., 0., 14., 10., 1)],
            vec![det(3., 0., 13., 10., 1, 0.9), det(0., 0., 10., 10., 1, 0.8)],
        );
        assert_all_close(&r.classes[0].pr_curve.precision, &[1.0, 1.0]);
        assert_close(r.classes[0].ap_deeppcb.unwrap(), 1.0);
    }

    #[test]
    fn wrong_class_is_false_positive_and_class_without_gt_is_excluded() {
        // Class 1 has 1 gt found by a class-1 detection (AP 1); a class-2 detection on the same
        // box is a FP for class 2, which has no gt → AP None, not in the mean: mAP = 1.
        let imgs = one_image(
            vec![gt(0., 0., 10., 10., 1)],
            vec![
                det(0., 0., 10., 10., 1, 0.9),
                det(0., 0., 10., 10., 2, 0.95),
            ],
        );
        let r = evaluate(&imgs, &["one", "two"], None);
        assert_close(r.classes[0].ap_deeppcb.unwrap(), 1.0);
        assert_eq!(r.classes[1].ap_deeppcb, None);
        assert_eq!(r.classes[1].ap50, None);
        assert!(r.classes[1].pr_curve.recall.is_empty());
        assert_close(r.map_deeppcb.unwrap(), 1.0);
        assert_close(r.map50.unwrap(), 1.0);
        // Pooled: 0.95 FP (class 2), 0.9 TP. t=0.95: P 0, R 0, F 0; t=0.9: P 1/2, R 1,
        // F = 2 * 0.5 * 1 / 1.5 = 2/3.
        assert_eq!(r.best.threshold, Some(0.9));
        assert_close(r.best.precision, 0.5);
        assert_close(r.best.recall, 1.0);
        assert_close(r.best.f_score, 2.0 / 3.0);
        assert_close(r.classes[1].precision, 0.0);
        assert_eq!(r.classes[1].false_positives, 1);
    }

    #[test]
    fn class_with_gt_but_no_detection_has_ap_zero() {
        let imgs = one_image(vec![gt(0., 0., 10., 10., 2)], vec![]);
        let r = evaluate(&imgs, &["one", "two"], None);
        assert_eq!(r.classes[0].ap_deeppcb, None);
        assert_close(r.classes[1].ap_deeppcb.unwrap(), 0.0);
        assert_close(r.map_deeppcb.unwrap(), 0.0);
        assert_eq!(r.best.threshold, None);
        assert_eq!(r.best.ground_truth, 1);
    }

    #[test]
    fn empty_image_changes_nothing() {
        let base = evaluate(&tp_fp_tp(), &["open"], None);
        let mut imgs = tp_fp_tp();
        imgs.insert(0, image("empty", vec![], vec![]));
        imgs.push(image("empty2", vec![], vec![]));
        let r = evaluate(&imgs, &["open"], None);
        assert_eq!(r.classes, base.classes);
        assert_eq!(r.map_deeppcb, base.map_deeppcb);
        assert_eq!(r.best, base.best);
        assert_eq!(r.images, 3);
    }

    #[test]
    fn best_f_threshold() {
        // Pooled over two classes, 3 gt in total (2 of class 1, 1 of class 2):
        //   0.9 TP(c1), 0.8 FP(c2), 0.6 TP(c2), 0.5 TP(c1), 0.4 FP(c1).
        // t=0.9: P 1,   R 1/3, F = 2*(1/3)/(4/3)        = 0.5
        // t=0.8: P 1/2, R 1/3, F = 2*(1/6)/(5/6)        = 0.4
        // t=0.6: P 2/3, R 2/3, F                        = 2/3
        // t=0.5: P 3/4, R 1,   F = 2*(3/4)/(7/4) = 6/7 ≈ 0.857 ← best
        // t=0.4: P 3/5, R 1,   F = 2*(3/5)/(8/5) = 3/4
        let imgs = vec![
            image(
                "a",
                vec![gt(0., 0., 10., 10., 1), gt(20., 20., 30., 30., 1)],
                vec![
                    det(0., 0., 10., 10., 1, 0.9),
                    det(20., 20., 30., 30., 1, 0.5),
                    det(60., 60., 70., 70., 1, 0.4),
                ],
            ),
            image(
                "b",
                vec![gt(0., 0., 10., 10., 2)],
                vec![
                    det(40., 40., 50., 50., 2, 0.8),
                    det(0., 0., 10., 10., 2, 0.6),
                ],
            ),
        ];
        let r = evaluate(&imgs, &["one", "two"], Some(4.0));
        assert_eq!(r.best.threshold, Some(0.5));
        assert_close(r.best.precision, 0.75);
        assert_close(r.best.recall, 1.0);
        assert_close(r.best.f_score, 6.0 / 7.0);
        assert_eq!(
            (
                r.best.true_positives,
                r.best.false_positives,
                r.best.ground_truth
            ),
            (3, 1, 3)
        );
        // Per class at 0.5: class 1 keeps 0.9 TP, 0.5 TP → P 1, R 1, F 1;
        // class 2 keeps 0.8 FP, 0.6 TP → P 1/2, R 1, F 2/3.
        assert_close(r.classes[0].f_score, 1.0);
        assert_close(r.classes[1].precision, 0.5);
        assert_close(r.classes[1].recall, 1.0);
        assert_close(r.classes[1].f_score, 2.0 / 3.0);
        // Class 2: (R, P) = (0, 0), (1, 1/2) → envelope 1/2 over [0, 1] → AP 0.5.
        // Class 1: (0.5, 1), (1, 1), (1, 2/3) → AP 1. mAP = 0.75.
        assert_close(r.classes[1].ap_deeppcb.unwrap(), 0.5);
        assert_close(r.map_deeppcb.unwrap(), 0.75);
        // 2 images in 4 s.
        assert_close(r.images_per_sec.unwrap(), 0.5);
    }

    #[test]
    fn equal_scores_are_one_threshold_and_keep_input_order() {
        // Both at 0.7: the FP (first in image order) ranks first: (R, P) = (0, 0), (1, 1/2),
        // AP = 0.5. The only threshold 0.7 keeps both: P 1/2, R 1, F 2/3.
        let imgs = vec![
            image("a", vec![], vec![det(50., 50., 60., 60., 1, 0.7)]),
            image(
                "b",
                vec![gt(0., 0., 10., 10., 1)],
                vec![det(0., 0., 10., 10., 1, 0.7)],
            ),
        ];
        let r = evaluate(&imgs, &["c"], None);
        assert_all_close(&r.classes[0].pr_curve.precision, &[0.0, 0.5]);
        assert_close(r.classes[0].ap_deeppcb.unwrap(), 0.5);
        assert_eq!(r.best.threshold, Some(0.7));
        assert_close(r.best.f_score, 2.0 / 3.0);
    }

    #[test]
    fn nan_scores_rank_last_and_are_never_kept() {
        // NaN TP ranks after the 0.1 FP: (R, P) = (0, 0), (1, 1/2) → AP 0.5. The only
        // threshold is 0.1, keeping the FP alone: F 0.
        let imgs = one_image(
            vec![gt(0., 0., 10., 10., 1)],
            vec![
                det(0., 0., 10., 10., 1, f32::NAN),
                det(50., 50., 60., 60., 1, 0.1),
            ],
        );
        let r = evaluate(&imgs, &["c"], Some(f64::NAN));
        assert_close(r.classes[0].ap_deeppcb.unwrap(), 0.5);
        assert_eq!(r.best.threshold, Some(0.1));
        assert_close(r.best.f_score, 0.0);
        assert_eq!(r.images_per_sec, None);
    }

    #[test]
    fn unlisted_class_ids_are_counted_apart() {
        let r = evaluate_one(
            vec![gt(0., 0., 10., 10., 0), gt(0., 0., 10., 10., 1)],
            vec![det(0., 0., 10., 10., 7, 0.9), det(0., 0., 10., 10., 1, 0.8)],
        );
        assert_eq!((r.unlisted_ground_truth, r.unlisted_detections), (1, 1));
        assert_close(r.map_deeppcb.unwrap(), 1.0);
        assert_close(r.best.precision, 1.0);
    }

    #[test]
    fn no_classes_no_images() {
        let r = evaluate(&[], &[], Some(1.0));
        assert_eq!(r.map_deeppcb, None);
        assert_eq!(r.map50, None);
        assert_eq!(r.best.threshold, None);
        assert_close(r.images_per_sec.unwrap(), 0.0);
    }
}
