//! Faster R-CNN assembled as torchvision's `FasterRCNN(backbone=resnet_fpn_backbone(...))`:
//! transform, ResNet body, FPN, RPN and box stage, under torchvision's parameter names.

use std::collections::BTreeMap;

use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::boxes::Sampling;
use crate::fpn::Fpn;
use crate::resnet::{Depth, Norm, ResNet};
use crate::roi_heads::{BoxSettings, Detections, RoiHeads};
use crate::rpn::{Rpn, RpnSettings};
use crate::transform::{InputMode, Transform};
use crate::VisionError;

/// Everything that fixes the network's shape and behaviour.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Classes including background (DeepPCB: 6 defects + background = 7).
    pub num_classes: i64,
    /// ResNet-50 (the reference) or ResNet-18 (lighter, for CPU lines).
    pub backbone: Depth,
    /// Frozen batch norm (fine-tuning, torchvision's choice with pretrained weights) or
    /// trainable batch norm (from scratch).
    pub norm: Norm,
    /// The board alone or compared with its template.
    pub input: InputMode,
    /// Resizing and normalisation.
    pub transform: Transform,
    /// Channels of the pyramid, the RPN and the RoI features (torchvision: 256; fewer make
    /// a much cheaper model for CPUs, with the same parameter names but other shapes).
    #[serde(default = "default_fpn_channels")]
    pub fpn_channels: i64,
    /// Proposals sampled per image for the box-head losses in training (torchvision: 512).
    #[serde(default = "default_box_batch")]
    pub box_batch_size_per_image: i64,
    /// Channels of the backbone's stem and first stage, doubling stage by stage
    /// (torchvision: 64). 16 or 32 make a compact model with the same parameter names.
    #[serde(default = "default_backbone_width")]
    pub backbone_width: i64,
    /// Width of the box head's two fully connected layers (torchvision: 1024).
    #[serde(default = "default_representation_size")]
    pub representation_size: i64,
    /// Proposals kept per image at inference, before and after the RPN's NMS
    /// (torchvision: 1000). A board has a few dozen defects at most.
    #[serde(default = "default_test_proposals")]
    pub test_proposals: i64,
}

fn default_backbone_width() -> i64 {
    64
}

fn default_representation_size() -> i64 {
    1024
}

fn default_test_proposals() -> i64 {
    1000
}

fn default_box_batch() -> i64 {
    512
}

fn default_fpn_channels() -> i64 {
    256
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            num_classes: 7,
            backbone: Depth::R50,
            norm: Norm::Frozen,
            input: InputMode::ImageTemplateDiff,
            transform: Transform::default(),
            fpn_channels: 256,
            box_batch_size_per_image: 512,
            backbone_width: 64,
            representation_size: 1024,
            test_proposals: 1000,
        }
    }
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct Output {
    /// Detections per image, in original image coordinates.
    pub detections: Vec<Detections>,
    /// The pyramid levels ('0'..'3', 'pool'), in the kind the model computed them (bf16
    /// under bf16 inference).
    pub features: Vec<Tensor>,
    /// RPN objectness logits per level.
    pub objectness: Vec<Tensor>,
    /// RPN proposals per image (resized coordinates).
    pub proposals: Vec<Tensor>,
}

/// The four training losses, named as torchvision names them.
#[derive(Debug)]
pub struct Losses {
    /// `loss_classifier`.
    pub classifier: Tensor,
    /// `loss_box_reg`.
    pub box_reg: Tensor,
    /// `loss_objectness`.
    pub objectness: Tensor,
    /// `loss_rpn_box_reg`.
    pub rpn_box_reg: Tensor,
}

impl Losses {
    /// Their sum, what the optimiser minimises.
    pub fn total(&self) -> Tensor {
        &self.classifier + &self.box_reg + &self.objectness + &self.rpn_box_reg
    }
}

/// A training target: boxes `[G, 4]` (f32, x1 y1 x2 y2 in pixels) and labels `[G]` (i64).
#[derive(Debug)]
pub struct Target {
    /// Boxes.
    pub boxes: Tensor,
    /// Classes 1..num_classes-1, or [`HARD_NEGATIVE`] for a box that is known not to be a
    /// defect.
    pub labels: Tensor,
}

/// The label of a hard negative: a place an operator said holds no defect (a box they
/// deleted). The box stage always trains on it as background; the RPN never sees it.
/// A deleted box is most often one the model was sure of, and a random sample of
/// background proposals would rarely pick it (one in tens of the image's negatives), so
/// without this the correction would barely reach the model.
pub const HARD_NEGATIVE: i64 = 0;

/// CPU speed tricks, for inference and training alike (they change results only by
/// rounding: f32's, or bf16's where asked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InferenceOptions {
    /// Fold batch norms into the preceding convolutions: frozen ones always, trainable
    /// ones (with their running statistics) at inference only.
    pub fold_bn: bool,
    /// Run convolutions on channels-last (NHWC) tensors.
    pub channels_last: bool,
    /// Inference only: backbone, FPN, RPN head and box head in bf16 (folded norms implied),
    /// for CPUs with native bf16; boxes, scores and NMS stay f32. Changes results by
    /// bf16 rounding, so it is measured on `pcb eval` rather than parity-tested.
    pub bf16: bool,
    /// Training only: mixed precision as PyTorch's CPU autocast does it (convolutions and
    /// the box head's products in bf16 on f32 master weights; losses, RoI sampling and the
    /// optimiser in f32).
    pub bf16_train: bool,
    /// Inference on the CPU (with folded norms): the backbone's convolutions through
    /// oneDNN's fused kernels, ReLUs and residual sums inside the convolution, on weights
    /// packed once (`crate::onednn`). Changes results by rounding only.
    pub fused: bool,
}

impl InferenceOptions {
    /// Folded norms and channels-last, plus bf16 where `bf16` asks and the CPU has it
    /// natively (`auto` leaves it off elsewhere, where bf16 is emulated and slow).
    pub fn fast(bf16: crate::lowp::Bf16) -> InferenceOptions {
        InferenceOptions {
            fold_bn: true,
            channels_last: true,
            bf16: bf16.enabled(),
            bf16_train: false,
            fused: true,
        }
    }
}

/// Faster R-CNN with a ResNet FPN backbone.
#[derive(Debug)]
pub struct FasterRcnn {
    /// Inference tricks in force.
    pub inference: InferenceOptions,
    /// Its configuration.
    pub config: ModelConfig,
    /// `backbone.body`.
    pub body: ResNet,
    /// `backbone.fpn`.
    pub fpn: Fpn,
    /// `rpn`.
    pub rpn: Rpn,
    /// `roi_heads`.
    pub roi_heads: RoiHeads,
}

impl FasterRcnn {
    /// Builds the network under `p` (the VarStore root) with fresh weights.
    pub fn new(p: &nn::Path, config: ModelConfig, sampling: Sampling) -> FasterRcnn {
        let backbone = p / "backbone";
        let width = config.backbone_width;
        let body = ResNet::new(
            &(&backbone / "body"),
            config.backbone,
            3,
            config.norm,
            width,
        );
        let ch = config.fpn_channels;
        let fpn = Fpn::new(
            &(&backbone / "fpn"),
            &config.backbone.stage_channels(width),
            ch,
        );
        let defaults = RpnSettings::default();
        let rpn_settings = RpnSettings {
            pre_nms_top_n: (defaults.pre_nms_top_n.0, config.test_proposals),
            post_nms_top_n: (defaults.post_nms_top_n.0, config.test_proposals),
            ..defaults
        };
        let rpn = Rpn::new(&(p / "rpn"), ch, rpn_settings, sampling);
        let roi_heads = RoiHeads::new(
            &(p / "roi_heads"),
            ch,
            config.representation_size,
            config.num_classes,
            BoxSettings {
                batch_size_per_image: config.box_batch_size_per_image,
                ..BoxSettings::default()
            },
            sampling,
        );
        FasterRcnn {
            inference: InferenceOptions::default(),
            config,
            body,
            fpn,
            rpn,
            roi_heads,
        }
    }

    /// Inference on `images` (each `[3, H, W]`, floats in 0..1, see [`crate::compose`]).
    pub fn detect(&self, images: &[Tensor]) -> Result<Output, VisionError> {
        let batch = self.config.transform.apply(images, None)?;
        let features = self.features(&batch.images, false);
        let s = batch.images.size();
        let rpn = self
            .rpn
            .forward((s[2], s[3]), &batch.sizes, &features, None, false);
        // bf16 levels go to RoI align as they are: it pools them in bf16 for the bf16 box
        // head, with no f32 copy of the pyramid.
        let (logits, deltas) = self
            .roi_heads
            .predict(&features, &rpn.proposals, &batch.sizes);
        let dets = self
            .roi_heads
            .postprocess(&logits, &deltas, &rpn.proposals, &batch.sizes);
        let detections = dets
            .into_iter()
            .zip(batch.sizes.iter().zip(&batch.original))
            .map(|(d, (&size, &orig))| Detections {
                boxes: crate::transform::resize_boxes(&d.boxes, size, orig),
                labels: d.labels,
                scores: d.scores,
            })
            .collect();
        Ok(Output {
            detections,
            features,
            objectness: rpn.objectness,
            proposals: rpn.proposals,
        })
    }

    /// The training losses of a batch.
    pub fn losses(&self, images: &[Tensor], targets: &[Target]) -> Result<Losses, VisionError> {
        if images.len() != targets.len() {
            return Err(VisionError::Input(format!(
                "{} images but {} targets",
                images.len(),
                targets.len()
            )));
        }
        let boxes: Vec<Tensor> = targets.iter().map(|t| t.boxes.shallow_clone()).collect();
        for (i, t) in targets.iter().enumerate() {
            let (s, l) = (t.boxes.size(), t.labels.size());
            if s.len() != 2 || s[1] != 4 || l.len() != 1 || l[0] != s[0] {
                return Err(VisionError::Input(format!(
                    "target {i}: boxes must be [G, 4] and labels [G], got {s:?} and {l:?}"
                )));
            }
        }
        let batch = self.config.transform.apply(images, Some(&boxes))?;
        // Defects and hard negatives part after the resize, which moved both alike.
        let mut gt_boxes = Vec::with_capacity(targets.len());
        let mut gt_labels = Vec::with_capacity(targets.len());
        let mut negatives = Vec::with_capacity(targets.len());
        for (b, t) in batch.boxes.unwrap_or_default().iter().zip(targets) {
            let defect = t.labels.ne(HARD_NEGATIVE).nonzero().squeeze_dim(1);
            let negative = t.labels.eq(HARD_NEGATIVE).nonzero().squeeze_dim(1);
            gt_boxes.push(b.index_select(0, &defect));
            gt_labels.push(t.labels.index_select(0, &defect));
            negatives.push(b.index_select(0, &negative));
        }
        let features = self.features(&batch.images, true);
        let s = batch.images.size();
        let rpn = self
            .rpn
            .forward((s[2], s[3]), &batch.sizes, &features, Some(&gt_boxes), true);
        let features = in_f32(features);
        let (objectness, rpn_box_reg) = rpn
            .losses
            .ok_or_else(|| VisionError::Input("the RPN returned no losses".into()))?;
        let (classifier, box_reg) = self.roi_heads.losses(
            &features,
            &rpn.proposals,
            &batch.sizes,
            &gt_boxes,
            &gt_labels,
            &negatives,
        );
        Ok(Losses {
            classifier,
            box_reg,
            objectness,
            rpn_box_reg,
        })
    }

    /// Turns the inference tricks on or off; call again after loading new weights, since
    /// folded weights are copies.
    pub fn prepare_inference(&mut self, options: InferenceOptions) {
        let bf16 = options.bf16;
        self.body.fold(
            options.fold_bn || bf16,
            options.channels_last,
            bf16,
            options.fused,
        );
        self.fpn.set_bf16(bf16);
        self.fpn.set_fused(options.fused, bf16);
        let fast = options.fold_bn || options.channels_last || bf16;
        self.rpn.head.prepare(fast, bf16, options.fused);
        self.roi_heads.head.set_bf16(bf16);
        let o = self.roi_heads.pool.output_size;
        self.roi_heads.head.set_bins_last(fast, o * o, bf16);
        self.roi_heads.head.train_bf16 = options.bf16_train;
        self.inference = options;
    }

    /// Pyramid features of a padded batch (bf16 in inference with `bf16` on).
    pub fn features(&self, images: &Tensor, train: bool) -> Vec<Tensor> {
        let bf16 = (self.inference.bf16 && !train) || (self.inference.bf16_train && train);
        let x = match (self.inference.channels_last, bf16) {
            // Layout and type in one pass over the batch.
            (true, true) if images.dim() == 4 => {
                let s = images.size();
                let mut x =
                    Tensor::empty([s[0], s[2], s[3], s[1]], (Kind::BFloat16, images.device()))
                        .permute([0, 3, 1, 2]);
                tch::no_grad(|| x.copy_(images));
                x
            }
            (true, _) => crate::resnet::to_channels_last(images),
            (false, _) => images.shallow_clone(),
        };
        let x = if bf16 { x.to_kind(Kind::BFloat16) } else { x };
        self.fpn.forward_t(&self.body.forward_t(&x, train), train)
    }
}

/// Pyramid levels in f32 (bf16 ones cast), for RoI sampling and everything after it.
fn in_f32(features: Vec<Tensor>) -> Vec<Tensor> {
    if features.iter().all(|f| f.kind() == Kind::Float) {
        return features;
    }
    features.iter().map(|f| f.to_kind(Kind::Float)).collect()
}

/// A model with its variables.
#[derive(Debug)]
pub struct Detector {
    /// Variables, named as torchvision's `state_dict`.
    pub vs: nn::VarStore,
    /// The network.
    pub model: FasterRcnn,
}

impl Detector {
    /// A freshly initialised model on `device`.
    pub fn new(config: ModelConfig, device: Device, sampling: Sampling) -> Detector {
        let vs = nn::VarStore::new(device);
        let model = FasterRcnn::new(&vs.root(), config, sampling);
        Detector { vs, model }
    }

    /// Freezes the backbone body but its last `n` stages (torchvision's
    /// `trainable_backbone_layers`: 5 trains everything, 3 — its default when fine-tuning —
    /// keeps `conv1` and `layer1` fixed, 0 freezes the whole body).
    pub fn set_trainable_backbone_layers(&mut self, n: usize) {
        let order = ["layer4", "layer3", "layer2", "layer1", "conv1"];
        let trainable: Vec<&str> = order.iter().take(n.min(5)).copied().collect();
        for (name, t) in self.vs.variables() {
            let Some(rest) = name.strip_prefix("backbone.body.") else {
                continue;
            };
            // The stem's norm goes with conv1, as torchvision names it "bn1".
            let stage = if rest.starts_with("bn1.") {
                "conv1"
            } else {
                rest.split('.').next().unwrap_or("")
            };
            let on = trainable.contains(&stage) && !rest.contains("running_");
            if matches!(self.model.config.norm, Norm::Frozen)
                && !rest.contains("conv")
                && !rest.contains("downsample.0")
            {
                continue;
            }
            let _ = t.set_requires_grad(on);
        }
    }

    /// The parameters an optimiser updates, by name.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        // Sorted: replicas in other processes must list them in the same order (their
        // gradients travel in buckets), and a HashMap's order differs per process.
        let mut out: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Variable names and shapes, sorted.
    pub fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        self.vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.size()))
            .collect()
    }

    /// Loads a safetensors checkpoint, refusing one whose names or shapes differ from the
    /// model's (tch alone would ignore extra tensors).
    pub fn load(&mut self, path: &std::path::Path) -> Result<(), VisionError> {
        let tensors = Tensor::read_safetensors(path).map_err(|e| VisionError::Checkpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        self.load_tensors(tensors, &path.display().to_string())
    }

    /// Copies named tensors into the variables, all or nothing.
    pub fn load_tensors(
        &mut self,
        tensors: Vec<(String, Tensor)>,
        origin: &str,
    ) -> Result<(), VisionError> {
        let want = self.shapes();
        let mut problems = Vec::new();
        let mut have = BTreeMap::new();
        for (k, t) in tensors {
            have.insert(k, t);
        }
        let missing: Vec<&String> = want.keys().filter(|k| !have.contains_key(*k)).collect();
        let extra: Vec<&String> = have
            .keys()
            .filter(|k| !want.contains_key(*k) && !k.ends_with("num_batches_tracked"))
            .collect();
        if !missing.is_empty() {
            problems.push(format!("missing {}: {}", missing.len(), list(&missing)));
        }
        if !extra.is_empty() {
            problems.push(format!("unexpected {}: {}", extra.len(), list(&extra)));
        }
        for (k, shape) in &want {
            if let Some(t) = have.get(k) {
                if &t.size() != shape {
                    problems.push(format!("{k}: checkpoint {:?}, model {shape:?}", t.size()));
                }
            }
        }
        if !problems.is_empty() {
            return Err(VisionError::Checkpoint {
                path: origin.to_string(),
                message: problems.join("; "),
            });
        }
        let mut vars = self.vs.variables();
        tch::no_grad(|| {
            for (k, v) in vars.iter_mut() {
                if let Some(t) = have.get(k) {
                    v.copy_(&t.to_kind(v.kind()).to_device(v.device()));
                }
            }
        });
        let options = self.model.inference;
        self.model.prepare_inference(options);
        Ok(())
    }

    /// Writes the variables to a safetensors file.
    pub fn save(&self, path: &std::path::Path) -> Result<(), VisionError> {
        let vars = self.vs.variables();
        let named: Vec<(String, Tensor)> = vars
            .into_iter()
            .map(|(k, v)| (k, v.to_kind(Kind::Float).to_device(Device::Cpu)))
            .collect();
        Tensor::write_safetensors(&named, path).map_err(|e| VisionError::Checkpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }
}

fn list(names: &[&String]) -> String {
    let shown: Vec<&str> = names.iter().take(8).map(|s| s.as_str()).collect();
    if names.len() > 8 {
        format!("{}, ... ({} more)", shown.join(", "), names.len() - 8)
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Detector {
        let config = ModelConfig {
            backbone: Depth::R18,
            transform: Transform {
                min_size: 64,
                max_size: 96,
                ..Transform::default()
            },
            ..ModelConfig::default()
        };
        Detector::new(config, Device::Cpu, Sampling::First)
    }

    fn own_tensors(d: &Detector) -> Vec<(String, Tensor)> {
        d.vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().copy()))
            .collect()
    }

    #[test]
    fn trainable_backbone_layers_freeze_the_stem_first() {
        let mut d = small();
        let trainable = |d: &Detector| {
            d.vs.variables()
                .into_iter()
                .filter(|(k, t)| k.starts_with("backbone.body.") && t.requires_grad())
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        let all = trainable(&d).len();
        d.set_trainable_backbone_layers(3);
        let three = trainable(&d);
        assert!(three
            .iter()
            .all(|k| !k.starts_with("backbone.body.conv1")
                && !k.starts_with("backbone.body.layer1.")));
        assert!(three.iter().any(|k| k.starts_with("backbone.body.layer2.")));
        d.set_trainable_backbone_layers(0);
        assert!(trainable(&d).is_empty());
        d.set_trainable_backbone_layers(5);
        assert_eq!(trainable(&d).len(), all);
        // The heads stay trainable throughout.
        assert!(d.vs.variables()["rpn.head.conv.0.0.weight"].requires_grad());
    }

    #[test]
    fn checkpoint_problems_are_named() {
        let mut d = small();
        let mut t = own_tensors(&d);
        t.retain(|(k, _)| k != "roi_heads.box_predictor.cls_score.weight");
        t.push((
            "backbone.body.fc.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ));
        for (k, v) in t.iter_mut() {
            if k == "rpn.head.cls_logits.bias" {
                *v = Tensor::zeros([9], (Kind::Float, Device::Cpu));
            }
        }
        let e = d
            .load_tensors(t, "bad.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
        assert!(
            e.contains("missing 1: roi_heads.box_predictor.cls_score.weight"),
            "{e}"
        );
        assert!(e.contains("unexpected 1: backbone.body.fc.weight"), "{e}");
        assert!(
            e.contains("rpn.head.cls_logits.bias: checkpoint [9], model [3]"),
            "{e}"
        );
    }

    #[test]
    fn a_compact_model_keeps_the_names_and_narrows_the_shapes() {
        let wide = small();
        let config = ModelConfig {
            backbone_width: 16,
            representation_size: 256,
            test_proposals: 300,
            ..small().model.config
        };
        let compact = Detector::new(config.clone(), Device::Cpu, Sampling::First);
        let (ws, cs) = (wide.shapes(), compact.shapes());
        assert_eq!(
            ws.keys().collect::<Vec<_>>(),
            cs.keys().collect::<Vec<_>>(),
            "same torchvision names"
        );
        assert_eq!(cs["backbone.body.conv1.weight"], [16, 3, 7, 7]);
        assert_eq!(cs["backbone.body.layer4.1.conv2.weight"], [128, 128, 3, 3]);
        assert_eq!(cs["backbone.fpn.inner_blocks.3.0.weight"][1], 128);
        assert_eq!(cs["roi_heads.box_head.fc7.weight"], [256, 256]);
        assert_eq!(cs["roi_heads.box_predictor.cls_score.weight"][1], 256);
        assert_eq!(ws["roi_heads.box_head.fc7.weight"], [1024, 1024]);
        assert_eq!(compact.model.rpn.settings.post_nms_top_n.1, 300);
        assert_eq!(compact.model.rpn.settings.pre_nms_top_n.1, 300);
        let count = |d: &Detector| {
            d.shapes()
                .values()
                .map(|s| s.iter().product::<i64>())
                .sum::<i64>()
        };
        // 7.0 M parameters against 28.3 M (the FPN stays 256 wide here; the box head's
        // first layer, 256 x 49 inputs, dominates both).
        assert!(count(&compact) * 3 < count(&wide));
        // It detects, and a wide checkpoint does not load into it (shapes are named).
        let image = Tensor::rand([3, 80, 80], (Kind::Float, Device::Cpu));
        let out = tch::no_grad(|| compact.model.detect(&[image])).unwrap();
        assert_eq!(out.detections.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.safetensors");
        wide.save(&path).unwrap();
        let mut c = Detector::new(config, Device::Cpu, Sampling::First);
        let e = c.load(&path).unwrap_err().to_string();
        assert!(
            e.contains("backbone.body.conv1.weight: checkpoint [64, 3, 7, 7], model [16, 3, 7, 7]"),
            "{e}"
        );
        // A model.json written before these settings existed reads as torchvision's shape.
        let old = r#"{"num_classes":7,"backbone":"r18","norm":"batch","input":"image_template_diff",
            "transform":{"min_size":0,"max_size":1333},"fpn_channels":128,"box_batch_size_per_image":128}"#;
        let c: ModelConfig = serde_json::from_str(old).unwrap();
        assert_eq!(
            (c.backbone_width, c.representation_size, c.test_proposals),
            (64, 1024, 1000)
        );
    }

    #[test]
    fn save_and_load_round_trip_through_safetensors() {
        let d = small();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        d.save(&path).unwrap();
        let mut e = small();
        e.load(&path).unwrap();
        let a = d.vs.variables();
        for (k, v) in e.vs.variables() {
            assert!(v.equal(&a[&k]), "{k}");
        }
        let missing = dir.path().join("none.safetensors");
        let err = e.load(&missing).unwrap_err().to_string();
        assert!(err.contains("none.safetensors"), "{err}");
    }

    fn max_rel(a: &[Tensor], b: &[Tensor]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let (x, y) = (x.to_kind(Kind::Float), y.to_kind(Kind::Float));
                let scale = y.abs().max().double_value(&[]).max(1e-12);
                (x - y).abs().max().double_value(&[]) / scale
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn folded_batch_norm_and_bf16_inference_follow_the_plain_model() {
        let config = ModelConfig {
            norm: Norm::Batch,
            ..small().model.config
        };
        tch::manual_seed(7);
        let mut d = Detector::new(config, Device::Cpu, Sampling::First);
        // Two training passes move the running statistics off their initial 0 and 1, so
        // the fold has something to get wrong.
        let img = Tensor::rand([3, 64, 80], (Kind::Float, Device::Cpu));
        let t = || Target {
            boxes: Tensor::from_slice(&[8f32, 8., 30., 24.]).view([1, 4]),
            labels: Tensor::from_slice(&[1i64]),
        };
        for _ in 0..2 {
            let _ = d.model.losses(&[img.copy()], &[t()]).unwrap();
        }
        let batch = d.model.config.transform.apply(&[img.copy()], None).unwrap();
        let features = |d: &Detector| tch::no_grad(|| d.model.features(&batch.images, false));
        let plain = features(&d);
        d.model.prepare_inference(InferenceOptions {
            fold_bn: true,
            channels_last: true,
            bf16: false,
            bf16_train: false,
            fused: false,
        });
        assert!(d.model.body.stem.folded.is_some());
        let folded = features(&d);
        let err = max_rel(&folded, &plain);
        assert!(err < 1e-5, "folded batch norm: {err}");
        d.model.prepare_inference(InferenceOptions {
            fold_bn: true,
            channels_last: true,
            bf16: true,
            bf16_train: false,
            fused: false,
        });
        let half = features(&d);
        assert_eq!(half[0].kind(), Kind::BFloat16);
        let err = max_rel(&half, &plain);
        // bf16 keeps 8 significant bits; through 20-odd layers the error stays a few %.
        assert!(err < 5e-2, "bf16 features: {err}");
        // oneDNN's fused kernels: rounding apart, the same features, in f32 and bf16.
        for bf16 in [false, true] {
            d.model.prepare_inference(InferenceOptions {
                fold_bn: true,
                channels_last: true,
                bf16,
                bf16_train: false,
                fused: true,
            });
            let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
            // Made where this CPU's oneDNN runs the kind (bf16 needs AVX-512 there).
            let made = crate::onednn::runs(kind);
            assert_eq!(d.model.body.stem.fused.is_some(), made, "fused copies");
            let fused = features(&d);
            let err = max_rel(&fused, &plain);
            let tolerance = if bf16 { 5e-2 } else { 1e-5 };
            assert!(err < tolerance, "fused features, bf16 {bf16}: {err}");
        }
        let out = tch::no_grad(|| d.model.detect(&[img.copy()])).unwrap();
        assert_eq!(out.features[0].kind(), Kind::BFloat16);
        assert_eq!(out.objectness[0].kind(), Kind::Float);
        assert_eq!(out.detections[0].scores.kind(), Kind::Float);
        // Training is unaffected by the inference copies: same losses with and without.
        d.model.prepare_inference(InferenceOptions::default());
        tch::manual_seed(9);
        let a = d.model.losses(&[img.copy()], &[t()]).unwrap().total();
        d.model.prepare_inference(InferenceOptions {
            fold_bn: true,
            channels_last: false,
            bf16: true,
            bf16_train: false,
            fused: false,
        });
        tch::manual_seed(9);
        let b = d.model.losses(&[img.copy()], &[t()]).unwrap().total();
        assert_eq!(b.kind(), Kind::Float);
        let (a, b) = (a.double_value(&[]), b.double_value(&[]));
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
    }

    #[test]
    fn bf16_mixed_precision_training_tracks_f32_and_keeps_f32_gradients() {
        for norm in [Norm::Batch, Norm::Frozen] {
            let config = ModelConfig {
                norm,
                ..small().model.config
            };
            // Weights and image from `testing`, not the global generator, which tests on
            // other threads draw from at the same time: bf16's error depends on the values,
            // and this test must see the same ones every run.
            let mut d = Detector::new(config, Device::Cpu, Sampling::First);
            crate::testing::fill(&mut d).unwrap();
            let img = crate::testing::image("bf16-train", 64, 80);
            let t = || Target {
                boxes: Tensor::from_slice(&[8f32, 8., 30., 24., 40., 30., 70., 60.]).view([2, 4]),
                labels: Tensor::from_slice(&[1i64, 3]),
            };
            let params = d.trainable();
            // As `pcb train` sets it up on a bf16 CPU: inference copies exist beside the
            // training path, and must not stand in for the weights being trained.
            let mut step = |bf16_train: bool| {
                d.model.prepare_inference(InferenceOptions {
                    fold_bn: true,
                    channels_last: true,
                    bf16: bf16_train,
                    bf16_train,
                    fused: true,
                });
                crate::train::Optimizer::zero_grad(&params);
                tch::manual_seed(5);
                let l = d.model.losses(&[img.copy()], &[t()]).unwrap();
                let total = l.total();
                total.backward();
                let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad().copy()).collect();
                (total.double_value(&[]), grads)
            };
            let (want, g32) = step(false);
            let (got, g16) = step(true);
            assert!(
                (got - want).abs() < 3e-2 * want.abs(),
                "{norm:?}: loss {got} vs {want}"
            );
            for ((name, _), (a, b)) in params.iter().zip(g16.iter().zip(&g32)) {
                assert_eq!(a.kind(), Kind::Float, "{name}");
                assert_eq!(a.size(), b.size(), "{name}");
                // Each layer's own gradient points roughly the f32 way (bf16 noise grows
                // towards the stem; a layer that ran on a detached copy would have none).
                let cos = (a * b).sum(Kind::Float).double_value(&[])
                    / (a.norm().double_value(&[]) * b.norm().double_value(&[])).max(1e-30);
                assert!(
                    b.norm().double_value(&[]) == 0.0 || cos > 0.5,
                    "{norm:?} {name}: gradient cosine {cos}"
                );
            }
            // Every trainable layer still learns: its gradient is there and finite.
            let flat16 = Tensor::cat(&g16.iter().map(|g| g.flatten(0, -1)).collect::<Vec<_>>(), 0);
            let flat32 = Tensor::cat(&g32.iter().map(|g| g.flatten(0, -1)).collect::<Vec<_>>(), 0);
            assert!(bool::try_from(flat16.isfinite().all()).unwrap());
            let cos = (&flat16 * &flat32).sum(Kind::Float).double_value(&[])
                / (flat16.norm().double_value(&[]) * flat32.norm().double_value(&[]));
            assert!(cos > 0.95, "{norm:?}: gradient cosine {cos}");
        }
    }

    #[test]
    fn wrong_inputs_are_errors_not_panics() {
        let d = small();
        let grey = Tensor::ones([1, 40, 40], (Kind::Float, Device::Cpu));
        let e = d.model.detect(&[grey]).unwrap_err().to_string();
        assert!(e.contains("must be [3, H, W]"), "{e}");
        let e = d.model.detect(&[]).unwrap_err().to_string();
        assert!(e.contains("no images"), "{e}");
        let img = Tensor::ones([3, 40, 40], (Kind::Float, Device::Cpu));
        let t = Target {
            boxes: Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
            labels: Tensor::zeros([2], (Kind::Int64, Device::Cpu)),
        };
        let e = d.model.losses(&[img], &[t]).unwrap_err().to_string();
        assert!(e.contains("boxes must be [G, 4]"), "{e}");
    }

    #[test]
    fn an_image_without_defects_trains_as_a_negative() {
        let d = small();
        let img = Tensor::rand([3, 48, 64], (Kind::Float, Device::Cpu));
        let t = Target {
            boxes: Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
            labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
        };
        let l = d.model.losses(&[img], &[t]).unwrap();
        let total = l.total().double_value(&[]);
        assert!(total.is_finite() && total > 0.0, "{total}");
        assert_eq!(l.box_reg.double_value(&[]), 0.0);
        assert_eq!(l.rpn_box_reg.double_value(&[]), 0.0);
    }

    /// A box marked [`HARD_NEGATIVE`] reaches the box stage only, as background: the RPN's
    /// losses are those of the image without it, the box classifier's are not, and an image
    /// with nothing but a hard negative trains as one without defects plus that box.
    #[test]
    fn a_hard_negative_trains_the_box_stage_as_background() {
        let d = small();
        let img = Tensor::rand([3, 48, 64], (Kind::Float, Device::Cpu));
        let target = |rows: &[([f32; 4], i64)]| {
            let flat: Vec<f32> = rows.iter().flat_map(|(b, _)| *b).collect();
            let labels: Vec<i64> = rows.iter().map(|(_, c)| *c).collect();
            Target {
                boxes: Tensor::from_slice(&flat).view([-1, 4]),
                labels: Tensor::from_slice(&labels),
            }
        };
        let defect = ([4.0, 4.0, 20.0, 18.0], 1);
        let negative = ([30.0, 20.0, 50.0, 40.0], HARD_NEGATIVE);
        let losses = |rows: &[([f32; 4], i64)]| {
            tch::manual_seed(11);
            d.model.losses(&[img.copy()], &[target(rows)]).unwrap()
        };
        let v = |t: &Tensor| t.double_value(&[]);
        let plain = losses(&[defect]);
        let hard = losses(&[defect, negative]);
        assert_eq!(v(&plain.objectness), v(&hard.objectness));
        assert_eq!(v(&plain.rpn_box_reg), v(&hard.rpn_box_reg));
        assert_ne!(v(&plain.classifier), v(&hard.classifier));
        // One more (background) row in the sample: the same regression sum over more rows.
        assert!(
            v(&hard.box_reg) < v(&plain.box_reg),
            "{} vs {}",
            v(&hard.box_reg),
            v(&plain.box_reg)
        );
        let empty = losses(&[]);
        let only = losses(&[negative]);
        assert_eq!(v(&empty.objectness), v(&only.objectness));
        assert_eq!(v(&only.rpn_box_reg), 0.0);
        assert_eq!(v(&only.box_reg), 0.0);
        assert_ne!(v(&empty.classifier), v(&only.classifier));
        assert!(v(&only.classifier).is_finite());
    }
}
