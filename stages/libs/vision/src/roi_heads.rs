//! The second stage: multi-scale RoI align, the two-MLP box head, the predictor, training
//! targets and losses, and post-processing into detections — torchvision's `roi_heads.py`.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::boxes::{
    BalancedSampler, BoxCoder, Matcher, Sampling, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS,
};
use crate::ops;

/// RoI align over pyramid levels '0'..'3', each box on the level its size calls for.
#[derive(Debug, Clone, Copy)]
pub struct MultiScaleRoIAlign {
    /// Output bins per side (7).
    pub output_size: i64,
    /// Samples per bin side (2).
    pub sampling_ratio: i64,
}

impl MultiScaleRoIAlign {
    /// Pooled features `[sum(R_i), C, 7, 7]` of `boxes` (per image) from `features`
    /// (levels '0'..'3'), for images measuring `image_sizes` before padding.
    pub fn forward(
        &self,
        features: &[Tensor],
        boxes: &[Tensor],
        image_sizes: &[(i64, i64)],
    ) -> Tensor {
        let max_h = image_sizes.iter().map(|s| s.0).max().unwrap_or(1);
        let max_w = image_sizes.iter().map(|s| s.1).max().unwrap_or(1);
        // torchvision infers each level's scale from its height, as a power of two.
        let scales: Vec<f64> = features
            .iter()
            .map(|f| {
                let approx = f.size()[2] as f64 / max_h as f64;
                2f64.powf(approx.log2().round())
            })
            .collect();
        let _ = max_w;
        let k_min = -scales[0].log2();
        let k_max = -scales[scales.len() - 1].log2();
        let device = features[0].device();
        let rois = Tensor::cat(
            &boxes
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let idx = Tensor::full([b.size()[0], 1], i as f64, (b.kind(), device));
                    Tensor::cat(&[idx, b.shallow_clone()], 1)
                })
                .collect::<Vec<_>>(),
            0,
        );
        let o = self.output_size;
        // LevelMapper: canonical size 224 on level 4, eps 1e-6.
        let levels = if features.len() == 1 {
            Tensor::zeros([rois.size()[0]], (Kind::Int64, device))
        } else {
            let all_boxes = Tensor::cat(boxes, 0);
            let s = ops::box_area(&all_boxes).sqrt();
            ((s / 224.0).log2() + 4.0 + 1e-6)
                .floor()
                .clamp(k_min, k_max)
                - k_min
        };
        // One pass over every level: the rows come out in the RoIs' order, bins outside
        // and channels inside (see `TwoMlpHead::forward_t`, which takes them as they are).
        ops::multi_level_roi_align(
            features,
            &scales,
            &levels.to_kind(Kind::Int64),
            &rois,
            (o, o),
            self.sampling_ratio,
            false,
        )
    }
}

/// `box_head`: `fc6` and `fc7` with ReLU.
#[derive(Debug)]
pub struct TwoMlpHead {
    /// `fc6`.
    pub fc6: nn::Linear,
    /// `fc7`.
    pub fc7: nn::Linear,
    /// bf16 copies of `fc6` and `fc7` for inference (empty when off).
    half: Option<HeadHalf>,
    /// Training runs `fc6` and `fc7` in bf16 (weights cast on the fly).
    pub train_bf16: bool,
    /// For inference: `fc6` with its input columns in the pooled rows' own order (see
    /// [`TwoMlpHead::set_bins_last`]).
    bins_last: Option<BinsLast>,
}

/// The bf16 inference copies of the box head.
#[derive(Debug)]
struct HeadHalf {
    /// `fc6` for rows in torchvision's order; none once [`BinsLast`] holds `fc6` in bf16
    /// (such rows then cast `fc6` on the fly).
    fc6: Option<crate::lowp::Half>,
    /// `fc7`.
    fc7: crate::lowp::Half,
}

/// A copy of `fc6` whose input columns run bin by bin, channels inside, the order in which
/// RoI align's bag writes its rows (torchvision's weights run channel by channel).
#[derive(Debug)]
struct BinsLast {
    /// `[representation, bins * C]`, f32 or bf16 as inference runs.
    w: Tensor,
    /// Bias in the same kind.
    b: Option<Tensor>,
    /// Bins per RoI (49).
    bins: i64,
}

/// `xs` (`[K, C, ph, pw]`) as `[K, ph * pw * C]` rows without a copy, when it is laid out
/// bins outside and channels inside, as [`ops::multi_level_roi_align`] returns it.
fn bins_last_rows(xs: &Tensor, bins: i64) -> Option<Tensor> {
    let size = xs.size();
    let &[k, c, h, w] = size.as_slice() else {
        return None;
    };
    if k < 1 || h * w != bins || xs.stride() != [h * w * c, 1, w * c, c] {
        return None;
    }
    Some(xs.permute([0, 2, 3, 1]).reshape([k, h * w * c]))
}

impl TwoMlpHead {
    /// From `in_features` (C*7*7) to `representation` (1024).
    pub fn new(p: &nn::Path, in_features: i64, representation: i64) -> Self {
        TwoMlpHead {
            fc6: nn::linear(p / "fc6", in_features, representation, Default::default()),
            fc7: nn::linear(
                p / "fc7",
                representation,
                representation,
                Default::default(),
            ),
            half: None,
            train_bf16: false,
            bins_last: None,
        }
    }

    /// Makes (or drops) the inference copy of `fc6` that takes pooled rows bins outside,
    /// channels inside (`bins` per RoI), in bf16 when `bf16`: the pooled features then go
    /// into `fc6` as the bag wrote them, with no transposing copy (for R50-FPN, 1000 RoIs,
    /// a 50 MB copy per board). In bf16 it takes the place of [`TwoMlpHead::set_bf16`]'s
    /// copy of `fc6`, which is dropped (so call it after that). Call again after the
    /// weights change.
    pub fn set_bins_last(&mut self, on: bool, bins: i64, bf16: bool) {
        self.bins_last = None;
        let size = self.fc6.ws.size();
        if !on || bins < 1 || size.len() != 2 || size[1] % bins != 0 {
            return;
        }
        let (r, c) = (size[0], size[1] / bins);
        let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
        self.bins_last = tch::no_grad(|| {
            Some(BinsLast {
                w: self
                    .fc6
                    .ws
                    .detach()
                    .view([r, c, bins])
                    .permute([0, 2, 1])
                    .reshape([r, bins * c])
                    .to_kind(kind)
                    .contiguous(),
                b: self.fc6.bs.as_ref().map(|b| b.detach().to_kind(kind)),
                bins,
            })
        });
        if let (true, Some(h)) = (bf16, self.half.as_mut()) {
            h.fc6 = None;
        }
    }

    /// Makes (or drops) the bf16 copies that inference runs through.
    pub fn set_bf16(&mut self, on: bool) {
        self.half = on.then(|| HeadHalf {
            fc6: Some(crate::lowp::Half::linear(&self.fc6)),
            fc7: crate::lowp::Half::linear(&self.fc7),
        });
    }

    /// `fc6` and `fc7` in bf16 (the result in f32) when inference has bf16 copies or
    /// training has `train_bf16`; in f32 otherwise.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if !train {
            if let Some((p, rows)) = self
                .bins_last
                .as_ref()
                .and_then(|p| bins_last_rows(xs, p.bins).map(|rows| (p, rows)))
            {
                // In place: each layer's output is fresh (see resnet's blocks).
                let x = rows.to_kind(p.w.kind()).linear(&p.w, p.b.as_ref()).relu_();
                return if p.w.kind() == Kind::BFloat16 {
                    crate::lowp::linear_bf16(
                        &x,
                        &self.fc7,
                        self.half.as_ref().map(|h| &h.fc7),
                        false,
                    )
                    .relu_()
                    .to_kind(Kind::Float)
                } else {
                    x.apply(&self.fc7).relu_()
                };
            }
        }
        let bf16 = if train {
            self.train_bf16
        } else {
            self.half.is_some()
        };
        if !bf16 {
            return self.forward(xs);
        }
        use crate::lowp::linear_bf16;
        let x = xs.flatten(1, -1).to_kind(Kind::BFloat16);
        let half = self.half.as_ref();
        let x = linear_bf16(&x, &self.fc6, half.and_then(|h| h.fc6.as_ref()), train).relu();
        linear_bf16(&x, &self.fc7, half.map(|h| &h.fc7), train)
            .relu()
            .to_kind(Kind::Float)
    }
}

impl Module for TwoMlpHead {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.flatten(1, -1)
            .apply(&self.fc6)
            .relu()
            .apply(&self.fc7)
            .relu()
    }
}

/// `box_predictor`: class logits and per-class box deltas.
#[derive(Debug)]
pub struct Predictor {
    /// `cls_score`.
    pub cls_score: nn::Linear,
    /// `bbox_pred`.
    pub bbox_pred: nn::Linear,
}

impl Predictor {
    /// For `num_classes` classes including background.
    pub fn new(p: &nn::Path, in_features: i64, num_classes: i64) -> Self {
        Predictor {
            cls_score: nn::linear(
                p / "cls_score",
                in_features,
                num_classes,
                Default::default(),
            ),
            bbox_pred: nn::linear(
                p / "bbox_pred",
                in_features,
                num_classes * 4,
                Default::default(),
            ),
        }
    }
}

/// Thresholds and counts of the box stage.
#[derive(Debug, Clone, Copy)]
pub struct BoxSettings {
    /// IoU at or above which a proposal is foreground.
    pub fg_iou_thresh: f64,
    /// IoU below which a proposal is background.
    pub bg_iou_thresh: f64,
    /// Proposals sampled per image for the loss.
    pub batch_size_per_image: i64,
    /// Share of positives among them.
    pub positive_fraction: f64,
    /// Minimum class score of a detection.
    pub score_thresh: f64,
    /// IoU of the per-class NMS.
    pub nms_thresh: f64,
    /// Detections kept per image.
    pub detections_per_img: i64,
}

impl Default for BoxSettings {
    fn default() -> Self {
        BoxSettings {
            fg_iou_thresh: 0.5,
            bg_iou_thresh: 0.5,
            batch_size_per_image: 512,
            positive_fraction: 0.25,
            score_thresh: 0.05,
            nms_thresh: 0.5,
            detections_per_img: 100,
        }
    }
}

/// Detections of one image, in the coordinates of the (resized) input.
#[derive(Debug)]
pub struct Detections {
    /// `[D, 4]`.
    pub boxes: Tensor,
    /// `[D]`, classes 1..num_classes-1.
    pub labels: Tensor,
    /// `[D]`.
    pub scores: Tensor,
}

/// One detection or ground-truth box read out of tensors: `x1 y1 x2 y2`, class, score.
pub type BoxRow = ([f32; 4], i64, f32);

/// Reads `[N, 4]` boxes, `[N]` labels and (optionally) `[N]` scores into rows; a missing
/// score reads as 1.
pub fn box_rows(
    boxes: &Tensor,
    labels: &Tensor,
    scores: Option<&Tensor>,
) -> Result<Vec<BoxRow>, tch::TchError> {
    let b = Vec::<f32>::try_from(&boxes.to_kind(Kind::Float).reshape([-1]))?;
    let l = Vec::<i64>::try_from(labels)?;
    let s = match scores {
        Some(t) => Vec::<f32>::try_from(&t.to_kind(Kind::Float))?,
        None => vec![1.0; l.len()],
    };
    Ok(l.iter()
        .enumerate()
        .map(|(k, &c)| {
            (
                [b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]],
                c,
                s[k],
            )
        })
        .collect())
}

impl Detections {
    /// The detections as rows, best first as the model ranks them.
    pub fn rows(&self) -> Result<Vec<BoxRow>, tch::TchError> {
        box_rows(&self.boxes, &self.labels, Some(&self.scores))
    }
}

/// The box stage.
#[derive(Debug)]
pub struct RoiHeads {
    /// Pooling.
    pub pool: MultiScaleRoIAlign,
    /// `box_head`.
    pub head: TwoMlpHead,
    /// `box_predictor`.
    pub predictor: Predictor,
    /// Deltas with weights (10, 10, 5, 5).
    pub coder: BoxCoder,
    /// Thresholds.
    pub settings: BoxSettings,
    /// Sampling of training proposals.
    pub sampler: BalancedSampler,
}

impl RoiHeads {
    /// The stage under `p` (torchvision: `roi_heads`), its box head `representation` wide
    /// (torchvision: 1024).
    pub fn new(
        p: &nn::Path,
        channels: i64,
        representation: i64,
        num_classes: i64,
        settings: BoxSettings,
        sampling: Sampling,
    ) -> Self {
        RoiHeads {
            pool: MultiScaleRoIAlign {
                output_size: 7,
                sampling_ratio: 2,
            },
            head: TwoMlpHead::new(&(p / "box_head"), channels * 49, representation),
            predictor: Predictor::new(&(p / "box_predictor"), representation, num_classes),
            coder: BoxCoder::new((10.0, 10.0, 5.0, 5.0)),
            settings,
            sampler: BalancedSampler {
                batch_size: settings.batch_size_per_image,
                positive_fraction: settings.positive_fraction,
                sampling,
            },
        }
    }

    /// Class logits and box deltas of `proposals` (inference: through the bf16 copies when
    /// there are some).
    pub fn predict(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
    ) -> (Tensor, Tensor) {
        self.head_outputs(features, proposals, image_sizes, false)
    }

    fn head_outputs(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
        train: bool,
    ) -> (Tensor, Tensor) {
        let pooled = self
            .pool
            .forward(&features[..features.len().min(4)], proposals, image_sizes);
        let x = self.head.forward_t(&pooled, train);
        (
            x.apply(&self.predictor.cls_score),
            x.apply(&self.predictor.bbox_pred),
        )
    }

    /// Training: the sampled proposals with their labels and regression targets, then
    /// `loss_classifier` and `loss_box_reg`. Each image's `negatives` (`[H, 4]`, boxes known
    /// to hold no defect) join its proposals and, unless a defect's box covers one at the
    /// foreground IoU, are always in its sample as background, on top of the sampled ones.
    pub fn losses(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
        gt_boxes: &[Tensor],
        gt_labels: &[Tensor],
        negatives: &[Tensor],
    ) -> (Tensor, Tensor) {
        let matcher = Matcher {
            high: self.settings.fg_iou_thresh,
            low: self.settings.bg_iou_thresh,
            allow_low_quality: false,
        };
        let mut sampled_props = Vec::new();
        let mut labels = Vec::new();
        let mut targets = Vec::new();
        for (k, ((props, gt), gl)) in proposals.iter().zip(gt_boxes).zip(gt_labels).enumerate() {
            let hard = negatives.get(k).map_or(0, |n| n.size()[0]);
            let mut parts = vec![props.detach(), gt.to_kind(props.kind())];
            if hard > 0 {
                parts.push(negatives[k].to_kind(props.kind()));
            }
            let props = Tensor::cat(&parts, 0);
            let (matched_idx, lab) = if gt.size()[0] == 0 {
                let n = props.size()[0];
                (
                    Tensor::zeros([n], (Kind::Int64, props.device())),
                    Tensor::zeros([n], (Kind::Int64, props.device())),
                )
            } else {
                let q = ops::box_iou(gt, &props);
                let m = matcher.assign(&q);
                let clamped = m.clamp_min(0);
                let lab = gl
                    .index_select(0, &clamped)
                    .masked_fill(&m.eq(BELOW_LOW_THRESHOLD), 0)
                    .masked_fill(&m.eq(BETWEEN_THRESHOLDS), -1);
                (clamped, lab)
            };
            let (pos, neg) = self.sample(&lab, hard);
            let keep = pos.logical_or(&neg).nonzero().squeeze_dim(1);
            let props = props.index_select(0, &keep);
            let lab = lab.index_select(0, &keep);
            let matched = matched_idx.index_select(0, &keep);
            let gt_for = if gt.size()[0] == 0 {
                Tensor::zeros([props.size()[0], 4], (props.kind(), props.device()))
            } else {
                gt.index_select(0, &matched)
            };
            targets.push(self.coder.encode(&gt_for, &props));
            sampled_props.push(props);
            labels.push(lab);
        }
        let (logits, deltas) = self.head_outputs(features, &sampled_props, image_sizes, true);
        let labels = Tensor::cat(&labels, 0);
        let targets = Tensor::cat(&targets, 0);
        let cls_loss = logits.cross_entropy_for_logits(&labels);
        let pos = labels.gt(0).nonzero().squeeze_dim(1);
        let n = deltas.size()[0];
        // Explicit class count: with no proposal at all, -1 would be ambiguous.
        let deltas = deltas.reshape([n, deltas.size()[1] / 4, 4]);
        let pos_labels = labels.index_select(0, &pos);
        let chosen = deltas.index(&[Some(pos.shallow_clone()), Some(pos_labels)]);
        let box_loss = chosen.smooth_l1_loss(
            &targets.index_select(0, &pos),
            tch::Reduction::Sum,
            1.0 / 9.0,
        ) / labels.numel().max(1) as f64;
        (cls_loss, box_loss)
    }

    /// The sampler's positive and negative masks over one image's `labels`, whose last
    /// `hard` rows are hard negatives: each of those labelled background is in the sample
    /// whatever the sampler drew (one a defect's box covers keeps its defect's label).
    fn sample(&self, labels: &Tensor, hard: i64) -> (Tensor, Tensor) {
        let (pos, neg) = self.sampler.sample(labels);
        if hard <= 0 {
            return (pos, neg);
        }
        let n = labels.size()[0];
        let last = Tensor::arange(n, (Kind::Int64, labels.device())).ge(n - hard);
        (pos, neg.logical_or(&last.logical_and(&labels.eq(0))))
    }

    /// Detections per image from the predictions over `proposals`.
    pub fn postprocess(
        &self,
        logits: &Tensor,
        deltas: &Tensor,
        proposals: &[Tensor],
        image_sizes: &[(i64, i64)],
    ) -> Vec<Detections> {
        let num_classes = logits.size()[1];
        let counts: Vec<i64> = proposals.iter().map(|p| p.size()[0]).collect();
        let all = Tensor::cat(proposals, 0);
        let pred_boxes =
            self.coder
                .decode(deltas, &all)
                .reshape([all.size()[0], deltas.size()[1] / 4, 4]);
        let scores = logits.softmax(-1, logits.kind());
        let mut out = Vec::new();
        for ((boxes, scores), &(h, w)) in pred_boxes
            .split_with_sizes(&counts, 0)
            .iter()
            .zip(scores.split_with_sizes(&counts, 0).iter())
            .zip(image_sizes)
        {
            let boxes = ops::clip_boxes_to_image(boxes, h, w);
            let labels = Tensor::arange(num_classes, (Kind::Int64, boxes.device()))
                .view([1, -1])
                .expand_as(scores);
            let boxes = boxes.slice(1, 1, None, 1).reshape([-1, 4]);
            let scores = scores.slice(1, 1, None, 1).reshape([-1]);
            let labels = labels.slice(1, 1, None, 1).reshape([-1]);
            let keep = scores
                .gt(self.settings.score_thresh)
                .nonzero()
                .squeeze_dim(1);
            let (boxes, scores, labels) = (
                boxes.index_select(0, &keep),
                scores.index_select(0, &keep),
                labels.index_select(0, &keep),
            );
            let keep = ops::remove_small_boxes(&boxes, 1e-2);
            let (boxes, scores, labels) = (
                boxes.index_select(0, &keep),
                scores.index_select(0, &keep),
                labels.index_select(0, &keep),
            );
            let keep = ops::batched_nms(&boxes, &scores, &labels, self.settings.nms_thresh);
            let keep = keep.narrow(0, 0, self.settings.detections_per_img.min(keep.size()[0]));
            out.push(Detections {
                boxes: boxes.index_select(0, &keep),
                labels: labels.index_select(0, &keep),
                scores: scores.index_select(0, &keep),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hard negatives are always in the sample as background, beyond the sampler's draw;
    /// one labelled a defect (a defect's box covers it) stays a positive candidate only.
    #[test]
    fn hard_negatives_are_always_sampled_as_background() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let settings = BoxSettings {
            batch_size_per_image: 4,
            ..BoxSettings::default()
        };
        let heads = RoiHeads::new(&vs.root(), 4, 8, 3, settings, Sampling::First);
        // Proposals: a positive, five negatives; then two hard rows, one background and one
        // that the matcher labelled class 2.
        let labels = Tensor::from_slice(&[1i64, 0, 0, 0, 0, 0, 0, 2]);
        let mask = |t: &Tensor| Vec::<bool>::try_from(t).unwrap();
        let (pos, neg) = heads.sample(&labels, 0);
        assert_eq!(
            mask(&neg),
            [false, true, true, true, false, false, false, false]
        );
        let (pos_h, neg_h) = heads.sample(&labels, 2);
        assert_eq!(mask(&pos_h), mask(&pos));
        assert_eq!(
            mask(&neg_h),
            [false, true, true, true, false, false, true, false]
        );
    }

    /// The inference copy of `fc6` that takes the bag's rows as they are gives the same
    /// output as torchvision's order through a transposing copy, in f32 and (to bf16's
    /// rounding) in bf16; training, or rows in torchvision's order, keep the plain path.
    #[test]
    fn the_bins_last_head_matches_torchvision_order() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let mut head = TwoMlpHead::new(&(vs.root() / "box_head"), 4 * 9, 8);
        // Pooled rows as the bag writes them: [K, 3, 3, C] viewed as [K, C, 3, 3].
        let rows = Tensor::randn([5, 3, 3, 4], (Kind::Float, tch::Device::Cpu));
        let pooled = rows.permute([0, 3, 1, 2]);
        assert!(bins_last_rows(&pooled, 9).is_some());
        assert!(bins_last_rows(&pooled.contiguous(), 9).is_none());
        let plain = tch::no_grad(|| head.forward(&pooled.contiguous()));
        for bf16 in [false, true] {
            head.set_bf16(bf16);
            head.set_bins_last(true, 9, bf16);
            let fast = tch::no_grad(|| head.forward_t(&pooled, false));
            let tol = if bf16 { 5e-2 } else { 1e-6 };
            let diff = (&fast - &plain).abs().max().double_value(&[]);
            assert!(diff < tol, "bf16 {bf16}: {diff}");
            assert_eq!(fast.kind(), Kind::Float);
            // Rows in torchvision's order still run (fc6 cast on the fly in bf16).
            let ordered = tch::no_grad(|| head.forward_t(&pooled.contiguous(), false));
            let diff = (&ordered - &plain).abs().max().double_value(&[]);
            assert!(diff < tol, "bf16 {bf16}, torchvision order: {diff}");
        }
        assert!(
            head.half.as_ref().is_some_and(|h| h.fc6.is_none()),
            "the bf16 bins-last copy replaces the bf16 copy of fc6"
        );
        head.set_bf16(false);
        head.set_bins_last(true, 9, false);
        let trained = head.forward_t(&pooled, true);
        let diff = (&trained - &plain).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "training path: {diff}");
        head.set_bins_last(false, 9, false);
        assert!(head.bins_last.is_none());
    }
}
