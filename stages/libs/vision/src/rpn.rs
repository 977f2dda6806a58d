//! The region proposal network: anchors per pyramid level, the shared RPN head, proposal
//! decoding and filtering, and (in training) its losses — torchvision's `rpn.py`.

use tch::nn;
use tch::{Kind, Tensor};

use crate::boxes::{BalancedSampler, BoxCoder, Matcher, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS};
use crate::ops;

/// Anchors of several sizes and aspect ratios at every position of every level.
#[derive(Debug, Clone)]
pub struct AnchorGenerator {
    /// One anchor size per level (torchvision: 32, 64, 128, 256, 512).
    pub sizes: Vec<f64>,
    /// Aspect ratios (height / width) at every level.
    pub ratios: Vec<f64>,
}

impl Default for AnchorGenerator {
    fn default() -> Self {
        AnchorGenerator {
            sizes: vec![32.0, 64.0, 128.0, 256.0, 512.0],
            ratios: vec![0.5, 1.0, 2.0],
        }
    }
}

impl AnchorGenerator {
    /// Anchors per position.
    pub fn per_location(&self) -> i64 {
        self.ratios.len() as i64
    }

    /// Zero-centred anchors of one size, rounded like torchvision's `generate_anchors`.
    fn cell_anchors(&self, size: f64) -> Tensor {
        let ratios = Tensor::from_slice(&self.ratios).to_kind(Kind::Float);
        let scales = Tensor::from_slice(&[size]).to_kind(Kind::Float);
        let h_ratios = ratios.sqrt();
        let w_ratios = h_ratios.reciprocal();
        let ws = (w_ratios.unsqueeze(1) * scales.unsqueeze(0)).view([-1]);
        let hs = (h_ratios.unsqueeze(1) * scales.unsqueeze(0)).view([-1]);
        (Tensor::stack(&[-&ws, -&hs, ws, hs], 1) / 2.0).round()
    }

    /// All anchors of an image batch padded to `image_size`, one `[sum(HWA), 4]` tensor
    /// shared by every image.
    pub fn anchors(&self, image_size: (i64, i64), features: &[Tensor]) -> Tensor {
        let mut all = Vec::with_capacity(features.len());
        for (level, f) in features.iter().enumerate() {
            let s = f.size();
            let (gh, gw) = (s[2], s[3]);
            let (stride_h, stride_w) = (image_size.0 / gh, image_size.1 / gw);
            let opts = (Kind::Int64, f.device());
            let shifts_x = (Tensor::arange(gw, opts) * stride_w).to_kind(Kind::Float);
            let shifts_y = (Tensor::arange(gh, opts) * stride_h).to_kind(Kind::Float);
            let grid = Tensor::meshgrid_indexing(&[shifts_y, shifts_x], "ij");
            let (sy, sx) = (grid[0].reshape([-1]), grid[1].reshape([-1]));
            let shifts = Tensor::stack(&[&sx, &sy, &sx, &sy], 1);
            let base = self
                .cell_anchors(self.sizes[level.min(self.sizes.len() - 1)])
                .to_device(f.device());
            all.push((shifts.view([-1, 1, 4]) + base.view([1, -1, 4])).reshape([-1, 4]));
        }
        Tensor::cat(&all, 0)
    }
}

/// `rpn.head`: a shared 3x3 convolution, then objectness and box deltas per anchor.
#[derive(Debug)]
pub struct RpnHead {
    /// `conv.0.0`.
    pub conv: nn::Conv2D,
    /// `cls_logits`.
    pub cls_logits: nn::Conv2D,
    /// `bbox_pred`.
    pub bbox_pred: nn::Conv2D,
    /// Inference copies (none until [`RpnHead::prepare`]).
    inference: Option<HeadInference>,
}

/// What [`RpnHead`] runs at inference: `conv` in bf16 when bf16 runs, and `cls_logits` and
/// `bbox_pred` as one 1x1 convolution (objectness channels first) in the features' kind,
/// one pass over each level's activations instead of two. Detached copies: prepare again
/// after the weights change.
#[derive(Debug)]
struct HeadInference {
    /// `conv` in bf16, for bf16 features.
    conv: Option<crate::lowp::Half>,
    /// `[cls_logits; bbox_pred]`, weight and bias.
    both: crate::lowp::Half,
    /// Anchors per position (the objectness channels).
    anchors: i64,
    /// `conv` with its ReLU, then `both`, in oneDNN's fused kernels on packed weights
    /// (CPU inference, when asked).
    fused: Option<(crate::onednn::FusedConv, crate::onednn::FusedConv)>,
}

impl RpnHead {
    /// The head for `channels` inputs and `anchors` anchors per position.
    pub fn new(p: &nn::Path, channels: i64, anchors: i64) -> RpnHead {
        let cfg = |padding| nn::ConvConfig {
            padding,
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        RpnHead {
            conv: nn::conv2d(p / "conv" / 0 / 0, channels, channels, 3, cfg(1)),
            cls_logits: nn::conv2d(p / "cls_logits", channels, anchors, 1, cfg(0)),
            bbox_pred: nn::conv2d(p / "bbox_pred", channels, anchors * 4, 1, cfg(0)),
            inference: None,
        }
    }

    /// Makes the inference copies (see [`HeadInference`]), for bf16 features when `bf16`;
    /// `on == false` drops them (torchvision's two convolutions, cast on the fly for bf16
    /// features).
    pub fn prepare(&mut self, on: bool, bf16: bool, fused: bool) {
        use crate::lowp::Half;
        if !on {
            self.inference = None;
            return;
        }
        let inference = tch::no_grad(|| {
            let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
            let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a.detach(), b.detach()], 0);
            let w = cat(&self.cls_logits.ws, &self.bbox_pred.ws);
            let w = crate::resnet::to_channels_last(&w).to_kind(kind);
            let b = match (&self.cls_logits.bs, &self.bbox_pred.bs) {
                (Some(a), Some(b)) => Some(cat(a, b).to_kind(kind)),
                _ => None,
            };
            let conv = bf16.then(|| Half::conv(&self.conv));
            let fused = fused.then(|| {
                use crate::onednn::FusedConv;
                let (cw, cb) = match &conv {
                    Some(h) => (h.w.shallow_clone(), h.b.as_ref()?.shallow_clone()),
                    None => (self.conv.ws.detach(), self.conv.bs.as_ref()?.detach()),
                };
                let first = FusedConv::new(&cw, &cb, 1, 1)?;
                Some((first, FusedConv::new(&w, b.as_ref()?, 1, 0)?))
            });
            HeadInference {
                conv,
                both: Half { w, b },
                anchors: self.cls_logits.ws.size()[0],
                fused: fused.flatten(),
            }
        });
        self.inference = Some(inference);
    }

    /// Objectness `[N, A, H, W]` and deltas `[N, 4A, H, W]` per level, in f32 whatever
    /// the features' kind.
    pub fn forward(&self, features: &[Tensor]) -> (Vec<Tensor>, Vec<Tensor>) {
        self.forward_t(features, false)
    }

    /// As [`RpnHead::forward`]; in training bf16 features go through the weights cast on
    /// the fly, never the inference copies (which would neither learn nor follow updates).
    pub fn forward_t(&self, features: &[Tensor], train: bool) -> (Vec<Tensor>, Vec<Tensor>) {
        let inference = self.inference.as_ref().filter(|i| {
            !train && (i.both.w.kind() == Kind::BFloat16) == features.iter().any(is_bf16)
        });
        if let Some(i) = inference {
            return features
                .iter()
                .map(|f| {
                    let a = i.anchors;
                    let fused = i.fused.as_ref().and_then(|(c, both)| {
                        let t = c.try_forward(f, crate::onednn::Post::Relu)?;
                        both.try_forward(&t, crate::onednn::Post::None)
                    });
                    if let Some(both) = fused {
                        let both = both.to_kind(Kind::Float);
                        return (both.narrow(1, 0, a), both.narrow(1, a, 4 * a));
                    }
                    // In place: the convolution's output is fresh (see resnet's blocks).
                    let t = match &i.conv {
                        Some(h) => h.conv2d(f, 1),
                        None => f.apply(&self.conv),
                    }
                    .relu_();
                    // Cast whole, then split: a cast of each (strided) part takes a slow
                    // path.
                    let both = i.both.conv2d(&t, 0).to_kind(Kind::Float);
                    let a = i.anchors;
                    (both.narrow(1, 0, a), both.narrow(1, a, 4 * a))
                })
                .unzip();
        }
        features
            .iter()
            .map(|f| {
                if is_bf16(f) {
                    use crate::lowp::conv2d_cast;
                    let c =
                        |x: &Tensor, l: &nn::Conv2D, p| conv2d_cast(x, &l.ws, l.bs.as_ref(), 1, p);
                    let t = c(f, &self.conv, 1).relu();
                    (
                        c(&t, &self.cls_logits, 0).to_kind(Kind::Float),
                        c(&t, &self.bbox_pred, 0).to_kind(Kind::Float),
                    )
                } else {
                    let t = f.apply(&self.conv).relu();
                    (t.apply(&self.cls_logits), t.apply(&self.bbox_pred))
                }
            })
            .unzip()
    }
}

/// The `k` best anchors of each level of each image (`objectness` `[N, A]`, levels of
/// `per_level` anchors one after the other), best first, as `[N, sum(min(k, n))]` indices
/// into `A`: what `topk` per level gives, by selection instead of a heap (on the compact
/// model the RPN took 0.2 ms less than with libtorch's `topk` per level, its split and its
/// concatenation). Ties go to the lower index; NaN counts as the largest value, as in
/// `topk`. `None` when the scores cannot be read back or there are none.
fn host_top_k(objectness: &Tensor, per_level: &[i64], k: i64) -> Option<Tensor> {
    let size = objectness.size();
    let (n, a) = (*size.first()?, *size.get(1)?);
    let scores =
        Vec::<f32>::try_from(objectness.to_kind(Kind::Float).contiguous().view([-1])).ok()?;
    let (nu, au) = (usize::try_from(n).ok()?, usize::try_from(a).ok()?);
    if au == 0 || scores.len() != nu * au || per_level.iter().sum::<i64>() != a {
        return None;
    }
    let best_first = |x: &(f32, i64), y: &(f32, i64)| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1));
    let mut out = Vec::new();
    let mut kept = 0;
    let mut pairs = Vec::new();
    for image in scores.chunks(au) {
        let mut offset = 0usize;
        kept = 0;
        for &count in per_level {
            let count = usize::try_from(count).ok()?;
            let take = usize::try_from(k).ok()?.min(count);
            pairs.clear();
            pairs.extend(
                image[offset..offset + count]
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (v, (offset + i) as i64)),
            );
            if take > 0 && take < count {
                pairs.select_nth_unstable_by(take - 1, best_first);
            }
            pairs.truncate(take);
            pairs.sort_unstable_by(best_first);
            out.extend(pairs.iter().map(|p| p.1));
            kept += take;
            offset += count;
        }
    }
    Some(Tensor::from_slice(&out).view([n, kept as i64]))
}

fn is_bf16(t: &Tensor) -> bool {
    t.kind() == Kind::BFloat16
}

/// `[N, A*C, H, W]` -> `[N, H*W*A, C]`, torchvision's `permute_and_flatten`.
fn permute_and_flatten(layer: &Tensor, c: i64) -> Tensor {
    let s = layer.size();
    let (n, ac, h, w) = (s[0], s[1], s[2], s[3]);
    let a = ac / c;
    layer
        .view([n, a, c, h, w])
        .permute([0, 3, 4, 1, 2])
        .reshape([n, -1, c])
}

/// Proposal counts and thresholds of the RPN.
#[derive(Debug, Clone, Copy)]
pub struct RpnSettings {
    /// Top-scoring anchors per level before NMS (train, test).
    pub pre_nms_top_n: (i64, i64),
    /// Proposals kept per image after NMS (train, test).
    pub post_nms_top_n: (i64, i64),
    /// IoU of NMS between proposals.
    pub nms_thresh: f64,
    /// IoU above which an anchor is positive.
    pub fg_iou_thresh: f64,
    /// IoU below which an anchor is negative.
    pub bg_iou_thresh: f64,
    /// Anchors sampled per image for the loss.
    pub batch_size_per_image: i64,
    /// Share of positives among them.
    pub positive_fraction: f64,
    /// Minimum objectness probability.
    pub score_thresh: f64,
}

impl Default for RpnSettings {
    fn default() -> Self {
        RpnSettings {
            pre_nms_top_n: (2000, 1000),
            post_nms_top_n: (2000, 1000),
            nms_thresh: 0.7,
            fg_iou_thresh: 0.7,
            bg_iou_thresh: 0.3,
            batch_size_per_image: 256,
            positive_fraction: 0.5,
            score_thresh: 0.0,
        }
    }
}

/// What the RPN hands on and, in training, its losses.
#[derive(Debug)]
pub struct RpnOutput {
    /// Proposals `[P_i, 4]` per image, best first.
    pub proposals: Vec<Tensor>,
    /// Their objectness probabilities.
    pub scores: Vec<Tensor>,
    /// Raw objectness logits per level (for parity checks).
    pub objectness: Vec<Tensor>,
    /// `loss_objectness` and `loss_rpn_box_reg` when targets were given.
    pub losses: Option<(Tensor, Tensor)>,
}

/// The region proposal network.
#[derive(Debug)]
pub struct Rpn {
    /// The anchors.
    pub anchors: AnchorGenerator,
    /// `rpn.head`.
    pub head: RpnHead,
    /// Counts and thresholds.
    pub settings: RpnSettings,
    /// Deltas against anchors, weights 1.
    pub coder: BoxCoder,
    /// How loss anchors are sampled.
    pub sampler: BalancedSampler,
    /// The anchors of the last padded batch size and level sizes: the same for every board
    /// of a line, so they are built once, not per board.
    anchor_cache: std::sync::Mutex<Option<(AnchorKey, Tensor)>>,
}

/// What a batch's anchors depend on: the padded size, each level's size and the device.
type AnchorKey = ((i64, i64), Vec<(i64, i64)>, tch::Device);

impl Rpn {
    /// The RPN under `p` (torchvision: `rpn`).
    pub fn new(
        p: &nn::Path,
        channels: i64,
        settings: RpnSettings,
        sampler: crate::boxes::Sampling,
    ) -> Rpn {
        let anchors = AnchorGenerator::default();
        let head = RpnHead::new(&(p / "head"), channels, anchors.per_location());
        Rpn {
            anchors,
            head,
            settings,
            coder: BoxCoder::new((1.0, 1.0, 1.0, 1.0)),
            sampler: BalancedSampler {
                batch_size: settings.batch_size_per_image,
                positive_fraction: settings.positive_fraction,
                sampling: sampler,
            },
            anchor_cache: std::sync::Mutex::new(None),
        }
    }

    /// Proposals for a batch padded to `batch_size`, whose images measure `image_sizes`;
    /// with `targets` (boxes per image), also the losses.
    pub fn forward(
        &self,
        batch_size: (i64, i64),
        image_sizes: &[(i64, i64)],
        features: &[Tensor],
        targets: Option<&[Tensor]>,
        train: bool,
    ) -> RpnOutput {
        let (objectness, deltas) = self.head.forward_t(features, train);
        let anchors = self.cached_anchors(batch_size, features);
        let num_images = image_sizes.len() as i64;
        let per_level: Vec<i64> = objectness
            .iter()
            .map(|o| {
                let s = o.size();
                s[1] * s[2] * s[3]
            })
            .collect();
        let obj_flat = Tensor::cat(
            &objectness
                .iter()
                .map(|o| permute_and_flatten(o, 1))
                .collect::<Vec<_>>(),
            1,
        )
        .flatten(0, -2);
        let deltas_flat = Tensor::cat(
            &deltas
                .iter()
                .map(|d| permute_and_flatten(d, 4))
                .collect::<Vec<_>>(),
            1,
        )
        .reshape([-1, 4]);
        let (boxes, scores) = self.filter(
            &deltas_flat.detach().view([num_images, -1, 4]),
            &anchors,
            &obj_flat,
            image_sizes,
            &per_level,
            train,
        );
        let losses = targets.map(|t| self.losses(&anchors, t, &obj_flat, &deltas_flat));
        RpnOutput {
            proposals: boxes,
            scores,
            objectness,
            losses,
        }
    }

    /// The batch's anchors, from the cache when the sizes are those of the last batch.
    fn cached_anchors(&self, batch_size: (i64, i64), features: &[Tensor]) -> Tensor {
        let key: AnchorKey = (
            batch_size,
            features
                .iter()
                .map(|f| {
                    let s = f.size();
                    (s[2], s[3])
                })
                .collect(),
            features.first().map_or(tch::Device::Cpu, Tensor::device),
        );
        // A poisoned lock only means another thread panicked mid-update: rebuild.
        let mut cache = match self.anchor_cache.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((k, anchors)) = cache.as_ref() {
            if *k == key {
                return anchors.shallow_clone();
            }
        }
        let anchors = self.anchors.anchors(batch_size, features);
        *cache = Some((key, anchors.shallow_clone()));
        anchors
    }

    /// The proposals kept per image: the top anchors of each level by objectness, decoded
    /// (only those: decoding is per box, so decoding the chosen few gives the same boxes as
    /// torchvision's decoding of all), clipped, filtered and NMS'd per level.
    fn filter(
        &self,
        deltas: &Tensor,
        anchors: &Tensor,
        objectness: &Tensor,
        image_sizes: &[(i64, i64)],
        per_level: &[i64],
        train: bool,
    ) -> (Vec<Tensor>, Vec<Tensor>) {
        let num_images = image_sizes.len() as i64;
        let device = deltas.device();
        let objectness = objectness.detach().reshape([num_images, -1]);
        let levels = Tensor::cat(
            &per_level
                .iter()
                .enumerate()
                .map(|(i, &n)| Tensor::full([n], i as i64, (Kind::Int64, device)))
                .collect::<Vec<_>>(),
            0,
        )
        .reshape([1, -1])
        .expand_as(&objectness);
        let pre_nms = if train {
            self.settings.pre_nms_top_n.0
        } else {
            self.settings.pre_nms_top_n.1
        };
        let post_nms = if train {
            self.settings.post_nms_top_n.0
        } else {
            self.settings.post_nms_top_n.1
        };
        let top = match (device == tch::Device::Cpu)
            .then(|| host_top_k(&objectness, per_level, pre_nms))
            .flatten()
        {
            Some(top) => top,
            None => {
                let mut top = Vec::new();
                let mut offset = 0;
                for (ob, &n) in objectness
                    .split_with_sizes(per_level, 1)
                    .iter()
                    .zip(per_level)
                {
                    let k = pre_nms.min(n);
                    let (_, idx) = ob.topk(k, 1, true, true);
                    top.push(idx + offset);
                    offset += n;
                }
                Tensor::cat(&top, 1)
            }
        };
        let rows = Tensor::arange(num_images, (Kind::Int64, device)).unsqueeze(1);
        let index = [Some(rows.shallow_clone()), Some(top.shallow_clone())];
        let objectness = objectness.index(&index);
        let levels = levels.index(&index);
        let k = top.size()[1];
        let proposals = self
            .coder
            .decode(
                &deltas.index(&index).reshape([-1, 4]),
                &anchors.index_select(0, &top.reshape([-1])),
            )
            .view([num_images, k, 4]);
        let prob = objectness.sigmoid();
        let mut out_boxes = Vec::new();
        let mut out_scores = Vec::new();
        for (i, &(h, w)) in image_sizes.iter().enumerate() {
            let i = i as i64;
            let boxes = ops::clip_boxes_to_image(&proposals.get(i), h, w);
            let (mut scores, mut lvl) = (prob.get(i), levels.get(i));
            let keep = ops::remove_small_boxes(&boxes, 1e-3);
            let mut boxes = boxes.index_select(0, &keep);
            scores = scores.index_select(0, &keep);
            lvl = lvl.index_select(0, &keep);
            let keep = scores
                .ge(self.settings.score_thresh)
                .nonzero()
                .squeeze_dim(1);
            boxes = boxes.index_select(0, &keep);
            scores = scores.index_select(0, &keep);
            lvl = lvl.index_select(0, &keep);
            let keep = ops::batched_nms(&boxes, &scores, &lvl, self.settings.nms_thresh);
            let keep = keep.narrow(0, 0, post_nms.min(keep.size()[0]));
            out_boxes.push(boxes.index_select(0, &keep));
            out_scores.push(scores.index_select(0, &keep));
        }
        (out_boxes, out_scores)
    }

    fn losses(
        &self,
        anchors: &Tensor,
        targets: &[Tensor],
        objectness: &Tensor,
        deltas: &Tensor,
    ) -> (Tensor, Tensor) {
        let matcher = Matcher {
            high: self.settings.fg_iou_thresh,
            low: self.settings.bg_iou_thresh,
            allow_low_quality: true,
        };
        let mut labels = Vec::new();
        let mut reg_targets = Vec::new();
        for gt in targets {
            let n = anchors.size()[0];
            let (matched_boxes, lab) = if gt.size()[0] == 0 {
                (
                    Tensor::zeros_like(anchors),
                    Tensor::zeros([n], (Kind::Float, anchors.device())),
                )
            } else {
                let quality = ops::box_iou(gt, anchors);
                let matched = matcher.assign(&quality);
                let boxes = gt.index_select(0, &matched.clamp_min(0));
                let lab = matched
                    .ge(0)
                    .to_kind(Kind::Float)
                    .masked_fill(&matched.eq(BELOW_LOW_THRESHOLD), 0.0)
                    .masked_fill(&matched.eq(BETWEEN_THRESHOLDS), -1.0);
                (boxes, lab)
            };
            reg_targets.push(self.coder.encode(&matched_boxes, anchors));
            labels.push(lab);
        }
        let mut pos = Vec::new();
        let mut neg = Vec::new();
        for l in &labels {
            let (p, n) = self.sampler.sample(l);
            pos.push(p);
            neg.push(n);
        }
        let pos = Tensor::cat(&pos, 0).nonzero().squeeze_dim(1);
        let neg = Tensor::cat(&neg, 0).nonzero().squeeze_dim(1);
        let sampled = Tensor::cat(&[&pos, &neg], 0);
        let objectness = objectness.flatten(0, -1);
        let labels = Tensor::cat(&labels, 0);
        let reg_targets = Tensor::cat(&reg_targets, 0);
        let box_loss = deltas.index_select(0, &pos).smooth_l1_loss(
            &reg_targets.index_select(0, &pos),
            tch::Reduction::Sum,
            1.0 / 9.0,
        ) / sampled.numel().max(1) as f64;
        let obj_loss = objectness
            .index_select(0, &sampled)
            .binary_cross_entropy_with_logits::<Tensor>(
                &labels.index_select(0, &sampled),
                None,
                None,
                tch::Reduction::Mean,
            );
        (obj_loss, box_loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host selection gives `topk`'s indices per level and image on distinct scores,
    /// every index once on ties (lower first), and a level smaller than k whole.
    #[test]
    fn host_top_k_matches_topk_per_level() {
        tch::manual_seed(5);
        let per_level = [40i64, 12, 3];
        let scores = Tensor::randn([2, 55], (Kind::Float, tch::Device::Cpu));
        let got = host_top_k(&scores, &per_level, 5).unwrap();
        let mut want = Vec::new();
        let mut offset = 0;
        for (level, &n) in scores
            .split_with_sizes(&per_level[..], 1)
            .iter()
            .zip(&per_level)
        {
            want.push(level.topk(5.min(n), 1, true, true).1 + offset);
            offset += n;
        }
        let want = Tensor::cat(&want, 1);
        assert_eq!(got.size(), vec![2, 13]);
        assert!(got.equal(&want), "{got:?} vs {want:?}");
        let ties = Tensor::from_slice(&[1f32, 3., 3., 2., 3., f32::NAN]).view([1, 6]);
        let got = Vec::<i64>::try_from(host_top_k(&ties, &[6], 4).unwrap().view([-1])).unwrap();
        assert_eq!(got, vec![5, 1, 2, 4]);
    }

    /// The prepared head (one 1x1 convolution for objectness and deltas, plain or in
    /// oneDNN's fused kernels) gives the two convolutions' outputs, in f32 and bf16, on
    /// channels-last and plain maps; unprepared
    /// and in training it runs them as torchvision does.
    #[test]
    fn the_prepared_head_matches_the_two_convolutions() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let mut head = RpnHead::new(&(vs.root() / "head"), 8, 3);
        tch::manual_seed(3);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                v.copy_(&(Tensor::randn_like(&v) * 0.3));
            }
        });
        let maps: Vec<Tensor> = [12i64, 6, 3]
            .iter()
            .map(|&side| Tensor::randn([2, 8, side, side], (Kind::Float, tch::Device::Cpu)))
            .collect();
        let (obj, deltas) = tch::no_grad(|| head.forward(&maps));
        for (bf16, fused) in [(false, false), (true, false), (false, true), (true, true)] {
            head.prepare(true, bf16, fused);
            let prepared = head.inference.as_ref().expect("prepared");
            // Made when asked, where this CPU's oneDNN runs the kind (bf16: AVX-512).
            let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
            let made = fused && crate::onednn::runs(kind);
            assert_eq!(prepared.fused.is_some(), made, "fused copies");
            for channels_last in [false, true] {
                let input: Vec<Tensor> = maps
                    .iter()
                    .map(|m| {
                        let m = if channels_last {
                            crate::resnet::to_channels_last(m)
                        } else {
                            m.shallow_clone()
                        };
                        if bf16 {
                            m.to_kind(Kind::BFloat16)
                        } else {
                            m
                        }
                    })
                    .collect();
                let (o, d) = tch::no_grad(|| head.forward(&input));
                let tolerance = if bf16 { 0.1 } else { 1e-5 };
                for (got, want) in o.iter().zip(&obj).chain(d.iter().zip(&deltas)) {
                    assert_eq!(got.size(), want.size());
                    assert_eq!(got.kind(), Kind::Float);
                    let diff = (got - want).abs().max().double_value(&[]);
                    assert!(
                        diff < tolerance,
                        "bf16 {bf16}, fused {fused}: differs by {diff}"
                    );
                }
                let flat = permute_and_flatten(&d[0], 4);
                let want = permute_and_flatten(&deltas[0], 4);
                assert!((flat - want).abs().max().double_value(&[]) < tolerance);
            }
        }
        head.prepare(false, false, false);
        let (o, _) = tch::no_grad(|| head.forward(&maps));
        assert!(o[0].equal(&obj[0]));
    }

    /// The anchors of a batch size are built once and handed out again while the sizes
    /// hold; another size gets its own, equal to a fresh build.
    #[test]
    fn anchors_are_cached_per_batch_and_level_size() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let rpn = Rpn::new(
            &(vs.root() / "rpn"),
            4,
            RpnSettings::default(),
            crate::boxes::Sampling::Random,
        );
        let maps = |side: i64| -> Vec<Tensor> {
            (0..5)
                .map(|l| {
                    Tensor::zeros(
                        [1, 4, side >> l, side >> l],
                        (Kind::Float, tch::Device::Cpu),
                    )
                })
                .collect()
        };
        let small = maps(16);
        let first = rpn.cached_anchors((64, 64), &small);
        let again = rpn.cached_anchors((64, 64), &small);
        // The same tensor, not a rebuilt one.
        assert_eq!(first.data_ptr(), again.data_ptr());
        assert!(first.equal(&rpn.anchors.anchors((64, 64), &small)));
        let large = maps(32);
        let other = rpn.cached_anchors((128, 128), &large);
        assert_ne!(other.size(), first.size());
        assert!(other.equal(&rpn.anchors.anchors((128, 128), &large)));
    }
}
