//! The score of DeepPCB's own evaluation script (`evaluation/script.py` with
//! `rrc_evaluation_funcs.py` in `tangsanli5201/DeepPCB`, an ICDAR "robust reading" script),
//! re-implemented so that our numbers can be set beside the paper's (98.6% mAP, 98.2% F).
//!
//! # The script's rule
//!
//! All of it is one pool over every class; there is no per-class AP.
//!
//! 1. **Submission order.** The parser sorts each image's detections by descending confidence
//!    before anything else (`rrc_evaluation_funcs.py`, `get_tl_line_values_from_file_contents`,
//!    `np.argsort(-confidences)`), so the order of the lines in a submitted file does not
//!    matter; ground-truth boxes stay in file order. Here, each image's submitted detections
//!    are sorted the same way, with a stable sort (ties keep [`ImageResult::detections`]
//!    order, NaN after every number). numpy's default quicksort is not a stable sort (the
//!    numpy of the script's Python 2 days fell back to a stable insertion sort only below 17
//!    entries), so on tied scores the script's own order is implementation-defined. Our
//!    detector emits detections already sorted by descending score, which makes this sort a
//!    no-op for it.
//! 2. **Matching** (per image, `script.py` lines 357–372): for each ground-truth box in file
//!    order, the first detection in that sorted order that is still free and overlaps it
//!    with IoU **strictly** above 0.33 is paired with it, and both are used up. The pair is
//!    *correct* when the classes agree (`transcription_match` on the class labels). A pair of
//!    different classes still uses up both, so the wrong-class detection is incorrect *and*
//!    the box it covered cannot be found by a later, right-class detection. The candidate is
//!    the first free one, not the one of highest IoU.
//! 3. **IoU** is the area IoU of the two rectangles (the script builds 4-point polygons and
//!    intersects them; for axis-aligned boxes that is the rectangle overlap), continuous, with
//!    no `+1` pixel convention (`polygon_from_points` is called without `correctOffset`).
//!    [`crate::iou`] is exactly that formula.
//! 4. **AP** (`compute_ap`, applied to the pool at lines 421–424): every submitted detection
//!    of every image, sorted by descending confidence; walking it, each correct detection
//!    adds the precision at its rank (`correct so far / rank`); the sum is divided by the
//!    number of ground-truth boxes. No interpolation, no precision envelope. With no
//!    detection, or no ground truth (then nothing can be correct), AP is 0. Ties are broken
//!    here by image order, then by the per-image order of step 1, with a stable sort; the
//!    script's order on ties depends on numpy's quicksort and on Python's dict order of the
//!    images, so when a correct and an incorrect detection share a score its AP is not
//!    uniquely defined and ours is one of its values.
//! 5. **P, R, F** (`hmean`, lines 426–428) over everything submitted: P = correct / submitted,
//!    R = correct / ground truth, F = 2PR / (P + R); a zero denominator gives 0.
//! 6. **No confidence threshold** is applied by the script: P, R and F are those of the
//!    submission's own threshold, and AP too only sees what was submitted. `threshold` plays
//!    the submitter's part: detections with `score >= threshold` are submitted (`None`: all,
//!    NaN scores included). Because matching runs in descending score order, cutting the
//!    submission at a threshold leaves the surviving detections' matches unchanged.
//!
//! The script's "don't care" boxes (`###` labels) and word spotting do not occur in DeepPCB
//! (labels are class numbers) and are not modelled.
//!
//! # Choices made here
//!
//! * Only listed classes take part, as everywhere in this crate (`classes[i]` is class id
//!   `i + 1`): other ground-truth boxes and detections are dropped before matching, as if they
//!   were not in the files, so an unlisted detection cannot use up a box.
//! * Coordinates are used as given. The script only reads integer coordinates, so a real
//!   submission of our sub-pixel boxes would first round them; that can only move a pair whose
//!   IoU lies within rounding of 0.33.
//! * Every [`ImageResult`] is a sample with a ground-truth file, empty ones included (their
//!   detections still count as submitted), as for the script's test set.
//! * The published script cannot read the published `evaluation/gt.zip` as it stands (it
//!   expects comma-separated 8-point lines, `LTRB: False`, the zip holds `x1 y1 x2 y2 type`
//!   with spaces), so the paper's numbers came from some converted form; the rule above is
//!   unaffected by the format.
//!
//! # How it differs from our per-class protocol ([`crate::eval`])
//!
//! Ours matches per class, detection-driven in score order, each detection taking the free
//! same-class box of highest IoU; a wrong-class detection is a false positive of its class
//! but uses up nothing. Our AP is the all-points interpolated area, per class, averaged over
//! classes (mAP). The script pools the classes into one AP with uninterpolated precision, and
//! its gt-driven matching lets a wrong-class or merely earlier-ranked detection take a box
//! away from a better one; the two numbers are on different scales and are reported side by
//! side.

use serde::{Deserialize, Serialize};

use crate::eval::{by_score_desc, iou, prf, DEEPPCB_IOU};
use crate::{Detection, GtBox, ImageResult};

/// What DeepPCB's evaluation script would report for one submission.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OfficialScore {
    /// The submission's cut: detections with `score >= threshold` were submitted; `None`:
    /// all of them.
    pub threshold: Option<f32>,
    /// The script's `AP`: precision at each correct detection of the pooled, score-sorted
    /// submission, summed and divided by the number of ground-truth boxes.
    pub ap: f64,
    /// The script's `precision`: correct / submitted (0 with nothing submitted).
    pub precision: f64,
    /// The script's `recall`: correct / ground truth (0 without ground truth).
    pub recall: f64,
    /// The script's `hmean`: 2PR / (P + R) (0 when P + R = 0).
    pub f_score: f64,
    /// Pairs with IoU > 0.33 and the same class.
    pub correct: usize,
    /// Pairs with IoU > 0.33 but different classes: both sides used up, neither counted.
    pub wrong_class: usize,
    /// Detections submitted (listed classes, at or above the threshold).
    pub submitted: usize,
    /// Ground-truth boxes of the listed classes.
    pub ground_truth: usize,
}

/// One submitted detection after matching: its confidence and whether its pair is correct.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scored {
    score: f32,
    correct: bool,
}

/// The outcome of matching one image.
#[derive(Debug, Default)]
struct ImageMatch {
    /// The submitted detections in the script's (score-sorted) order.
    scored: Vec<Scored>,
    correct: usize,
    wrong_class: usize,
}

/// Step 2 of the module docs on one image: gt-driven, first free detection in score order.
fn match_image(ground_truth: &[&GtBox], mut detections: Vec<&Detection>) -> ImageMatch {
    detections.sort_by(|a, b| by_score_desc(a.score, b.score));
    let mut pair_correct: Vec<Option<bool>> = vec![None; detections.len()];
    let mut out = ImageMatch::default();
    for gt in ground_truth {
        let free_overlap = detections
            .iter()
            .zip(&pair_correct)
            .position(|(d, pair)| pair.is_none() && iou(d.corners(), gt.corners()) > DEEPPCB_IOU);
        if let Some(k) = free_overlap {
            let correct = detections[k].class_id == gt.class_id;
            pair_correct[k] = Some(correct);
            if correct {
                out.correct += 1;
            } else {
                out.wrong_class += 1;
            }
        }
    }
    out.scored = detections
        .iter()
        .zip(&pair_correct)
        .map(|(d, pair)| Scored {
            score: d.score,
            correct: *pair == Some(true),
        })
        .collect();
    out
}

/// Step 4 of the module docs: uninterpolated AP of the pooled submission.
fn pooled_ap(mut pool: Vec<Scored>, ground_truth: usize) -> f64 {
    if ground_truth == 0 {
        // Nothing can be correct without ground truth, so the script's sum is 0 as well.
        return 0.0;
    }
    pool.sort_by(|a, b| by_score_desc(a.score, b.score));
    let mut correct = 0usize;
    let mut sum = 0.0;
    for (n, s) in pool.iter().enumerate() {
        if s.correct {
            correct += 1;
            // Summed in rank order, then divided once, as the script does, so that the
            // value agrees to the last bit on the same ranking.
            sum += correct as f64 / (n + 1) as f64;
        }
    }
    sum / ground_truth as f64
}

/// Scores `images` the way DeepPCB's `evaluation/script.py` would, with the detections of
/// `score >= threshold` (all of them for `None`) as the submission; see the module docs.
///
/// `classes[i]` names class id `i + 1`; boxes of other class ids are left out, as in
/// [`crate::evaluate`]. `ImageResult::detections` may be in any order: each image's are
/// ranked by descending score as the script does, ties keeping the given order.
pub fn deeppcb_official(
    images: &[ImageResult],
    classes: &[&str],
    threshold: Option<f32>,
) -> OfficialScore {
    // Same listing rule as `evaluate`: ids 1..=len, and no id past u16::MAX exists.
    let listed = classes.len().min(usize::from(u16::MAX));
    let is_listed = |id: u16| id >= 1 && usize::from(id) <= listed;
    // NaN >= t is false, so a threshold never submits a NaN score.
    let submitted = |d: &Detection| threshold.is_none_or(|t| d.score >= t);

    let mut score = OfficialScore {
        threshold,
        ..OfficialScore::default()
    };
    let mut pool: Vec<Scored> = Vec::new();
    for img in images {
        let gts: Vec<&GtBox> = img
            .ground_truth
            .iter()
            .filter(|g| is_listed(g.class_id))
            .collect();
        let dets: Vec<&Detection> = img
            .detections
            .iter()
            .filter(|d| is_listed(d.class_id) && submitted(d))
            .collect();
        score.ground_truth += gts.len();
        score.submitted += dets.len();
        let m = match_image(&gts, dets);
        score.correct += m.correct;
        score.wrong_class += m.wrong_class;
        pool.extend(m.scored);
    }
    score.ap = pooled_ap(pool, score.ground_truth);
    (score.precision, score.recall, score.f_score) =
        prf(score.correct, score.submitted, score.ground_truth);
    score
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate;
    use crate::testing::{assert_close, det, gt, image, one_image, overlapping};

    /// Checks every number of a score against hand-computed values.
    fn assert_score(
        s: &OfficialScore,
        (ap, p, r, f): (f64, f64, f64, f64),
        (correct, wrong_class, submitted, ground_truth): (usize, usize, usize, usize),
    ) {
        assert_close(s.ap, ap);
        assert_close(s.precision, p);
        assert_close(s.recall, r);
        assert_close(s.f_score, f);
        assert_eq!(
            (s.correct, s.wrong_class, s.submitted, s.ground_truth),
            (correct, wrong_class, submitted, ground_truth),
            "{s:?}"
        );
    }

    const CLASSES: [&str; 2] = ["open", "short"];

    /// Three images, classes 1 (open) and 2 (short):
    ///
    /// * a: g1 [0,0,10,10] c1, g2 [20,20,30,30] c2. Given in this (unsorted) order:
    ///   d2 [1,1,10,10] c1 0.6 (duplicate of g1, IoU 81/100), d4 [20,20,30,30] c2 0.7,
    ///   d1 [0,0,10,10] c1 0.9, d3 [20,20,30,30] c1 0.8 (wrong class on g2).
    /// * b: g3 [0,0,10,10] c2, g4 [50,50,60,60] c1 (missed). d5 [0,0,10,10] c2 0.95,
    ///   d6 [80,80,90,90] c1 0.2 (low-score false positive, overlaps nothing).
    /// * c: g5 [0,0,10,10] c1. d8 [0,0,10,10] class 7 0.99 (unlisted), d7 [0,0,10,10] c1 0.4.
    fn hand_case() -> Vec<ImageResult> {
        vec![
            image(
                "a",
                vec![gt(0., 0., 10., 10., 1), gt(20., 20., 30., 30., 2)],
                vec![
                    det(1., 1., 10., 10., 1, 0.6),
                    det(20., 20., 30., 30., 2, 0.7),
                    det(0., 0., 10., 10., 1, 0.9),
                    det(20., 20., 30., 30., 1, 0.8),
                ],
            ),
            image(
                "b",
                vec![gt(0., 0., 10., 10., 2), gt(50., 50., 60., 60., 1)],
                vec![
                    det(0., 0., 10., 10., 2, 0.95),
                    det(80., 80., 90., 90., 1, 0.2),
                ],
            ),
            image(
                "c",
                vec![gt(0., 0., 10., 10., 1)],
                vec![
                    det(0., 0., 10., 10., 7, 0.99),
                    det(0., 0., 10., 10., 1, 0.4),
                ],
            ),
        ]
    }

    #[test]
    fn hand_case_all_detections() {
        // Image a, sorted by score: d1 0.9, d3 0.8, d4 0.7, d2 0.6.
        //   g1 takes the first free overlap, d1 (IoU 1): same class → correct.
        //   g2 takes d3 (IoU 1, first in score order): class 1 ≠ 2 → wrong class, and d4,
        //   the right class, finds g2 used up → incorrect. d2 (duplicate) stays unpaired.
        // Image b: g3 takes d5 → correct; g4 has no overlap (missed); d6 unpaired.
        // Image c: d8 (class 7) is not listed, so it does not take g5; g5 takes d7 → correct.
        // gt = 5, submitted = 7 (d1..d7), correct = 3 (d1, d5, d7), wrong class = 1 (d3).
        // Pool by score: d5 .95 ✓, d1 .9 ✓, d3 .8 ✗, d4 .7 ✗, d2 .6 ✗, d7 .4 ✓, d6 .2 ✗
        //   AP = (1/1 + 2/2 + 3/6) / 5 = 2.5 / 5 = 0.5
        //   P = 3/7, R = 3/5, F = 2·(3/7)(3/5) / (3/7 + 3/5) = (18/35) / (36/35) = 0.5
        let s = deeppcb_official(&hand_case(), &CLASSES, None);
        assert_eq!(s.threshold, None);
        assert_score(&s, (0.5, 3.0 / 7.0, 0.6, 0.5), (3, 1, 7, 5));
    }

    #[test]
    fn hand_case_threshold_filters_the_submission() {
        // score >= 0.5 drops d7 (0.4) and d6 (0.2); matches of the rest are unchanged.
        // Pool: d5 ✓, d1 ✓, d3 ✗, d4 ✗, d2 ✗ → AP = (1 + 1) / 5 = 0.4;
        // correct 2 of 5 submitted, 5 gt → P = R = F = 0.4.
        let s = deeppcb_official(&hand_case(), &CLASSES, Some(0.5));
        assert_eq!(s.threshold, Some(0.5));
        assert_score(&s, (0.4, 0.4, 0.4, 0.4), (2, 1, 5, 5));
        // score >= 0.3 keeps d7 back: AP = (1 + 1 + 3/6) / 5 = 0.5; P = 3/6, R = 3/5,
        // F = 2·0.5·0.6 / 1.1 = 6/11.
        let s = deeppcb_official(&hand_case(), &CLASSES, Some(0.3));
        assert_score(&s, (0.5, 0.5, 0.6, 6.0 / 11.0), (3, 1, 6, 5));
        // A threshold equal to a score keeps it (>=): at 0.2 everything listed is in.
        let s = deeppcb_official(&hand_case(), &CLASSES, Some(0.2));
        assert_score(&s, (0.5, 3.0 / 7.0, 0.6, 0.5), (3, 1, 7, 5));
        // Above every score nothing is submitted: all zero, the gt still counted.
        let s = deeppcb_official(&hand_case(), &CLASSES, Some(0.999));
        assert_score(&s, (0.0, 0.0, 0.0, 0.0), (0, 0, 0, 5));
    }

    #[test]
    fn detections_are_ranked_by_score_not_given_order() {
        // The hand case with every image's detections reversed scores the same, since the
        // script sorts each image's submission by confidence before matching. (Walking
        // `hand_case`'s given order instead, g1 would take the duplicate d2 and g2 the
        // right-class d4.)
        let reversed: Vec<ImageResult> = hand_case()
            .into_iter()
            .map(|mut img| {
                img.detections.reverse();
                img
            })
            .collect();
        assert_eq!(
            deeppcb_official(&reversed, &CLASSES, None),
            deeppcb_official(&hand_case(), &CLASSES, None)
        );
    }

    #[test]
    fn equal_scores_keep_the_given_order() {
        // Both detections cover g at 0.7; the first given wins the box, the second is the
        // duplicate. Classes differ, so the order decides between correct and wrong class.
        let wrong_first = one_image(
            vec![gt(0., 0., 10., 10., 1)],
            vec![det(0., 0., 10., 10., 2, 0.7), det(0., 0., 10., 10., 1, 0.7)],
        );
        let s = deeppcb_official(&wrong_first, &CLASSES, None);
        assert_eq!((s.correct, s.wrong_class), (0, 1));
        let mut right_first = wrong_first;
        right_first[0].detections.reverse();
        let s = deeppcb_official(&right_first, &CLASSES, None);
        assert_eq!((s.correct, s.wrong_class), (1, 0));
        // Pool: ✓ then ✗ → AP = (1/1) / 1 = 1; P = 1/2, R = 1, F = 2/3.
        assert_score(&s, (1.0, 0.5, 1.0, 2.0 / 3.0), (1, 0, 2, 1));
    }

    #[test]
    fn gt_order_greedy_differs_from_score_order_greedy() {
        // gt A [0,0,10,10], gt B [4,0,14,10], both class 1.
        // hi [3,0,13,10] 0.9: IoU A = 70/130 ≈ 0.54, IoU B = 90/110 ≈ 0.82.
        // lo [-2,0,8,10] 0.8: IoU A = 80/120 ≈ 0.67, IoU B = 40/160 = 0.25 (< 0.33).
        let boxes = [gt(0., 0., 10., 10., 1), gt(4., 0., 14., 10., 1)];
        let dets = vec![det(3., 0., 13., 10., 1, 0.9), det(-2., 0., 8., 10., 1, 0.8)];
        let imgs = one_image(boxes.to_vec(), dets.clone());
        // Script, gt A first: A takes hi (the first free overlap in score order); B's only
        // overlap is hi, already taken → B missed, lo unpaired.
        // Pool: hi ✓, lo ✗ → AP = (1/1) / 2 = 0.5; P = 1/2, R = 1/2, F = 1/2.
        let s = deeppcb_official(&imgs, &CLASSES, None);
        assert_score(&s, (0.5, 0.5, 0.5, 0.5), (1, 0, 2, 2));
        // Our score-order protocol: hi takes B (higher IoU), lo then takes A → both true
        // positives, AP 1.
        let ours = evaluate(&imgs, &CLASSES, None);
        assert_eq!(ours.classes[0].pr_curve.precision, vec![1.0, 1.0]);
        assert_close(ours.map_deeppcb.unwrap_or_default(), 1.0);
        // The script depends on the gt file order: with B first, B takes hi and A takes lo.
        // Pool: hi ✓, lo ✓ → AP = (1 + 1) / 2 = 1; P = R = F = 1.
        let swapped = one_image(vec![boxes[1], boxes[0]], dets);
        let s = deeppcb_official(&swapped, &CLASSES, None);
        assert_score(&s, (1.0, 1.0, 1.0, 1.0), (2, 0, 2, 2));
    }

    #[test]
    fn iou_of_exactly_033_does_not_match() {
        // gt [0,0,100,100]; det [0,0,100,33]: inter 3300, union 10000 → IoU 0.33, and the
        // script needs > 0.33. [0,0,100,34] → 0.34 matches. Continuous areas (no +1): with
        // +1 the first would be 3434/10201 ≈ 0.3366 and match.
        let s = deeppcb_official(&overlapping(33.), &CLASSES, None);
        assert_score(&s, (0.0, 0.0, 0.0, 0.0), (0, 0, 1, 1));
        let s = deeppcb_official(&overlapping(34.), &CLASSES, None);
        assert_score(&s, (1.0, 1.0, 1.0, 1.0), (1, 0, 1, 1));
    }

    #[test]
    fn empty_inputs_give_zeros() {
        let zero = OfficialScore::default();
        assert_eq!(deeppcb_official(&[], &CLASSES, None), zero);
        assert_eq!(deeppcb_official(&[], &[], Some(0.5)).ground_truth, 0);
        // Ground truth, nothing submitted: AP 0, P 0 (0/0), R 0, F 0.
        let no_dets = one_image(vec![gt(0., 0., 10., 10., 1)], vec![]);
        let s = deeppcb_official(&no_dets, &CLASSES, None);
        assert_score(&s, (0.0, 0.0, 0.0, 0.0), (0, 0, 0, 1));
        // Detections, no ground truth: AP 0, P 0/1, R 0 (0/0), F 0.
        let no_gt = vec![
            image("a", vec![], vec![det(0., 0., 10., 10., 1, 0.9)]),
            image("b", vec![], vec![]),
        ];
        let s = deeppcb_official(&no_gt, &CLASSES, None);
        assert_score(&s, (0.0, 0.0, 0.0, 0.0), (0, 0, 1, 0));
        // No listed class: everything is left out.
        let s = deeppcb_official(&no_gt, &[], None);
        assert_score(&s, (0.0, 0.0, 0.0, 0.0), (0, 0, 0, 0));
    }

    #[test]
    fn nan_scores_are_submitted_only_without_threshold_and_rank_last() {
        // g1, g2 (both class 1); NaN detection on g1, 0.5 detection on nothing.
        // None: both submitted, NaN last in the pool: ✗ then ✓ → AP = (1/2) / 2 = 0.25;
        // P = 1/2, R = 1/2, F = 1/2.
        let imgs = one_image(
            vec![gt(0., 0., 10., 10., 1), gt(20., 20., 30., 30., 1)],
            vec![
                det(0., 0., 10., 10., 1, f32::NAN),
                det(50., 50., 60., 60., 1, 0.5),
            ],
        );
        let s = deeppcb_official(&imgs, &CLASSES, None);
        assert_score(&s, (0.25, 0.5, 0.5, 0.5), (1, 0, 2, 2));
        // Any threshold drops the NaN: only the miss is submitted.
        let s = deeppcb_official(&imgs, &CLASSES, Some(0.0));
        assert_score(&s, (0.0, 0.0, 0.0, 0.0), (0, 0, 1, 2));
    }
}
