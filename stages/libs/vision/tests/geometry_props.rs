//! Property tests of box geometry: IoU is symmetric, within [0, 1] and 1 for a box with
//! itself; the box coder's decode undoes its encode (within its clip: sizes less than 60
//! times apart, as torchvision's `log(1000 / 16)`); NMS keeps boxes by decreasing score,
//! no two of them overlapping above the threshold, and drops only boxes that overlap a
//! kept one with a score at least as high.

use pcb_vision::boxes::BoxCoder;
use pcb_vision::ops::{box_iou, nms};
use proptest::prelude::*;
use tch::{Kind, Tensor};

/// A box with positive width and height inside 0..1000.
fn a_box() -> impl Strategy<Value = [f32; 4]> {
    (0f32..900.0, 0f32..900.0, 1f32..100.0, 1f32..100.0)
        .prop_map(|(x, y, w, h)| [x, y, x + w, y + h])
}

fn tensor(boxes: &[[f32; 4]]) -> Tensor {
    let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).reshape([boxes.len() as i64, 4])
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("floats")
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        // Failing cases are printed, not written beside the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn iou_is_symmetric_bounded_and_one_with_itself(a in prop::collection::vec(a_box(), 1..8), b in prop::collection::vec(a_box(), 1..8)) {
        let (ta, tb) = (tensor(&a), tensor(&b));
        let ab = values(&box_iou(&ta, &tb));
        let ba = values(&box_iou(&tb, &ta).transpose(0, 1).contiguous());
        for (x, y) in ab.iter().zip(&ba) {
            prop_assert!((x - y).abs() < 1e-6);
            prop_assert!((-1e-6..=1.0 + 1e-6).contains(x), "{x}");
        }
        let aa = box_iou(&ta, &ta).diagonal(0, 0, 1);
        for v in values(&aa) {
            prop_assert!((v - 1.0).abs() < 1e-5, "{v}");
        }
    }

    #[test]
    fn decoding_undoes_encoding(
        pairs in prop::collection::vec(
            (a_box(), a_box()).prop_filter("within the coder's clip", |(r, p)| {
                let ratio = |a: f32, b: f32| (a / b).max(b / a);
                ratio(r[2] - r[0], p[2] - p[0]) < 60.0 && ratio(r[3] - r[1], p[3] - p[1]) < 60.0
            }),
            1..8,
        )
    ) {
        let coder = BoxCoder::new((10.0, 10.0, 5.0, 5.0));
        let reference = tensor(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
        let proposals = tensor(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
        let deltas = coder.encode(&reference, &proposals);
        let back = coder.decode(&deltas, &proposals);
        for (x, y) in values(&back).iter().zip(values(&reference)) {
            prop_assert!((x - y).abs() < 1e-2, "{x} vs {y}");
        }
    }

    #[test]
    fn nms_keeps_a_non_overlapping_set_in_score_order(
        items in prop::collection::vec((a_box(), 0f32..1.0), 1..24),
        threshold in 0.1f64..0.9,
    ) {
        let boxes = tensor(&items.iter().map(|i| i.0).collect::<Vec<_>>());
        let scores = Tensor::from_slice(&items.iter().map(|i| i.1).collect::<Vec<_>>());
        let keep = Vec::<i64>::try_from(nms(&boxes, &scores, threshold)).expect("indices");
        let iou = box_iou(&boxes, &boxes);
        let at = |i: i64, j: i64| iou.double_value(&[i, j]);
        for w in keep.windows(2) {
            prop_assert!(items[w[0] as usize].1 >= items[w[1] as usize].1, "score order");
        }
        for (n, &i) in keep.iter().enumerate() {
            for &j in &keep[n + 1..] {
                prop_assert!(at(i, j) <= threshold + 1e-6, "kept {i} and {j} overlap {}", at(i, j));
            }
        }
        for j in 0..items.len() as i64 {
            if !keep.contains(&j) {
                let covered = keep.iter().any(|&i| at(i, j) > threshold && items[i as usize].1 >= items[j as usize].1);
                prop_assert!(covered, "box {j} dropped without a better kept box over it");
            }
        }
    }
}
