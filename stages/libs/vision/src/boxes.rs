//! Box coding, matching and sampling: torchvision's `det_utils` (BoxCoder, Matcher,
//! BalancedPositiveNegativeSampler) with the same arithmetic.

use tch::{Kind, Tensor};

/// Encodes boxes as deltas against reference boxes and back.
#[derive(Debug, Clone, Copy)]
pub struct BoxCoder {
    /// Weights of (dx, dy, dw, dh).
    pub weights: (f64, f64, f64, f64),
    /// Upper bound of dw and dh before `exp`.
    pub clip: f64,
}

impl BoxCoder {
    /// A coder with torchvision's default clip, `log(1000 / 16)`.
    pub fn new(weights: (f64, f64, f64, f64)) -> Self {
        BoxCoder {
            weights,
            clip: (1000.0f64 / 16.0).ln(),
        }
    }

    /// Deltas that take `proposals` to `reference` (both `[N, 4]`).
    pub fn encode(&self, reference: &Tensor, proposals: &Tensor) -> Tensor {
        let (wx, wy, ww, wh) = self.weights;
        let col = |t: &Tensor, i: i64| t.select(1, i).unsqueeze(1);
        let ex_w = col(proposals, 2) - col(proposals, 0);
        let ex_h = col(proposals, 3) - col(proposals, 1);
        let ex_x = col(proposals, 0) + &ex_w * 0.5;
        let ex_y = col(proposals, 1) + &ex_h * 0.5;
        let gt_w = col(reference, 2) - col(reference, 0);
        let gt_h = col(reference, 3) - col(reference, 1);
        let gt_x = col(reference, 0) + &gt_w * 0.5;
        let gt_y = col(reference, 1) + &gt_h * 0.5;
        let dx = (gt_x - ex_x) * wx / &ex_w;
        let dy = (gt_y - ex_y) * wy / &ex_h;
        let dw = (gt_w / ex_w).log() * ww;
        let dh = (gt_h / ex_h).log() * wh;
        Tensor::cat(&[dx, dy, dw, dh], 1)
    }

    /// Boxes from deltas `[N, 4k]` against `boxes` `[N, 4]`: `[N, 4k]`.
    pub fn decode(&self, rel_codes: &Tensor, boxes: &Tensor) -> Tensor {
        let boxes = boxes.to_kind(rel_codes.kind());
        let (wx, wy, ww, wh) = self.weights;
        let widths = boxes.select(1, 2) - boxes.select(1, 0);
        let heights = boxes.select(1, 3) - boxes.select(1, 1);
        let ctr_x = boxes.select(1, 0) + &widths * 0.5;
        let ctr_y = boxes.select(1, 1) + &heights * 0.5;
        let dx = rel_codes.slice(1, 0, None, 4) / wx;
        let dy = rel_codes.slice(1, 1, None, 4) / wy;
        let dw = (rel_codes.slice(1, 2, None, 4) / ww).clamp_max(self.clip);
        let dh = (rel_codes.slice(1, 3, None, 4) / wh).clamp_max(self.clip);
        let pred_ctr_x = dx * widths.unsqueeze(1) + ctr_x.unsqueeze(1);
        let pred_ctr_y = dy * heights.unsqueeze(1) + ctr_y.unsqueeze(1);
        let pred_w = dw.exp() * widths.unsqueeze(1);
        let pred_h = dh.exp() * heights.unsqueeze(1);
        let half_w = pred_w * 0.5;
        let half_h = pred_h * 0.5;
        let x1 = &pred_ctr_x - &half_w;
        let y1 = &pred_ctr_y - &half_h;
        let x2 = pred_ctr_x + half_w;
        let y2 = pred_ctr_y + half_h;
        Tensor::stack(&[x1, y1, x2, y2], 2).flatten(1, -1)
    }
}

/// Below the low threshold: background.
pub const BELOW_LOW_THRESHOLD: i64 = -1;
/// Between the thresholds: ignored.
pub const BETWEEN_THRESHOLDS: i64 = -2;

/// Assigns to each prediction its best ground-truth box, or a negative code.
#[derive(Debug, Clone, Copy)]
pub struct Matcher {
    /// IoU at or above which a prediction is foreground.
    pub high: f64,
    /// IoU below which a prediction is background.
    pub low: f64,
    /// Also keep, for each ground truth, the predictions that overlap it best.
    pub allow_low_quality: bool,
}

impl Matcher {
    /// Matches of a `[G, P]` quality matrix: `[P]` indices into G, or the negative codes.
    pub fn assign(&self, quality: &Tensor) -> Tensor {
        let (matched_vals, matches) = quality.max_dim(0, false);
        let all_matches = matches.copy();
        let below = matched_vals.lt(self.low);
        let between = matched_vals
            .ge(self.low)
            .logical_and(&matched_vals.lt(self.high));
        let matches = matches
            .masked_fill(&below, BELOW_LOW_THRESHOLD)
            .masked_fill(&between, BETWEEN_THRESHOLDS);
        if !self.allow_low_quality {
            return matches;
        }
        let (best_per_gt, _) = quality.max_dim(1, false);
        let pairs = quality.eq_tensor(&best_per_gt.unsqueeze(1)).nonzero();
        let preds = pairs.select(1, 1);
        matches.index_put(
            &[Some(preds.shallow_clone())],
            &all_matches.index_select(0, &preds),
            false,
        )
    }
}

/// How a training batch picks its positives and negatives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// At random (torchvision's behaviour).
    Random,
    /// The first ones in index order: deterministic, for parity tests.
    First,
}

/// Picks up to `batch_size` labelled items per image, `positive_fraction` of them positive.
#[derive(Debug, Clone, Copy)]
pub struct BalancedSampler {
    /// Items per image.
    pub batch_size: i64,
    /// Share of positives at most.
    pub positive_fraction: f64,
    /// Random or first-in-order.
    pub sampling: Sampling,
}

impl BalancedSampler {
    /// Positive and negative masks (`Bool`, same length as `labels`) of one image, where
    /// label ≥ 1 is positive, 0 negative and -1 ignored.
    pub fn sample(&self, labels: &Tensor) -> (Tensor, Tensor) {
        let positive = labels.ge(1).nonzero().squeeze_dim(1);
        let negative = labels.eq(0).nonzero().squeeze_dim(1);
        let num_pos =
            ((self.batch_size as f64 * self.positive_fraction) as i64).min(positive.size()[0]);
        let num_neg = (self.batch_size - num_pos).min(negative.size()[0]);
        let pick = |idx: &Tensor, n: i64| match self.sampling {
            Sampling::Random => {
                let perm = Tensor::randperm(idx.size()[0], (Kind::Int64, idx.device()));
                idx.index_select(0, &perm.narrow(0, 0, n))
            }
            Sampling::First => idx.narrow(0, 0, n),
        };
        let pos = pick(&positive, num_pos);
        let neg = pick(&negative, num_neg);
        let mask = |sel: &Tensor| {
            Tensor::zeros_like(labels)
                .to_kind(Kind::Bool)
                .index_fill(0, sel, 1)
        };
        (mask(&pos), mask(&neg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::t;

    #[test]
    fn decode_inverts_encode() {
        let coder = BoxCoder::new((10.0, 10.0, 5.0, 5.0));
        let props = t(&[0., 0., 10., 10., 5., 5., 20., 30.], 2);
        let gt = t(&[1., 2., 12., 9., 4., 6., 25., 28.], 2);
        let deltas = coder.encode(&gt, &props);
        let back = coder.decode(&deltas, &props);
        let diff = (back - gt).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn matcher_codes_and_low_quality_matches() {
        // gt 0 overlaps pred 0 at 0.8, pred 1 at 0.4, pred 2 at 0.1.
        let q = t(&[0.8, 0.4, 0.1, 0.0, 0.35, 0.2], 2);
        let m = Matcher {
            high: 0.7,
            low: 0.3,
            allow_low_quality: false,
        };
        let got = Vec::<i64>::try_from(&m.assign(&q)).unwrap();
        assert_eq!(got, vec![0, -2, -1]);
        let m = Matcher {
            allow_low_quality: true,
            ..m
        };
        // gt 1's best is pred 1 (0.35): kept as a match even below the threshold.
        let got = Vec::<i64>::try_from(&m.assign(&q)).unwrap();
        assert_eq!(got, vec![0, 0, -1]);
    }

    #[test]
    fn sampler_respects_fraction_and_ignores() {
        let labels = Tensor::from_slice(&[1i64, 0, 0, -1, 2, 0, 0, 0]);
        let s = BalancedSampler {
            batch_size: 4,
            positive_fraction: 0.25,
            sampling: Sampling::First,
        };
        let (pos, neg) = s.sample(&labels);
        assert_eq!(
            Vec::<bool>::try_from(&pos).unwrap(),
            vec![true, false, false, false, false, false, false, false]
        );
        assert_eq!(
            Vec::<bool>::try_from(&neg).unwrap(),
            vec![false, true, true, false, false, true, false, false]
        );
        let s = BalancedSampler {
            sampling: Sampling::Random,
            ..s
        };
        let (pos, neg) = s.sample(&labels);
        assert_eq!(
            pos.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]),
            1
        );
        assert_eq!(
            neg.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]),
            3
        );
        assert_eq!(
            neg.get(3).int64_value(&[]),
            0,
            "ignored label never sampled"
        );
    }
}
