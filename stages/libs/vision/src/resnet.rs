//! ResNet bodies (torchvision's `resnet18`/`resnet50` without avgpool and fc), with frozen or
//! trainable batch norm, returning the four stage outputs the FPN consumes.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::onednn::{FusedConv, Post};

/// How the backbone normalises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// torchvision's `FrozenBatchNorm2d`: fixed statistics and affine (fine-tuning).
    Frozen,
    /// `BatchNorm2d` with batch statistics in training (training from scratch).
    Batch,
}

/// A normalisation layer under `p` with torchvision's parameter names.
#[derive(Debug)]
pub enum NormLayer {
    /// Fixed scale and shift.
    Frozen {
        /// `weight`.
        weight: Tensor,
        /// `bias`.
        bias: Tensor,
        /// `running_mean`.
        mean: Tensor,
        /// `running_var`.
        var: Tensor,
    },
    /// Trainable batch norm.
    Batch(nn::BatchNorm),
}

impl NormLayer {
    /// Creates the layer for `channels` under `p`.
    pub fn new(p: nn::Path, channels: i64, norm: Norm) -> Self {
        match norm {
            Norm::Frozen => NormLayer::Frozen {
                weight: p.ones_no_train("weight", &[channels]),
                bias: p.zeros_no_train("bias", &[channels]),
                mean: p.zeros_no_train("running_mean", &[channels]),
                var: p.ones_no_train("running_var", &[channels]),
            },
            Norm::Batch => NormLayer::Batch(nn::batch_norm2d(p, channels, Default::default())),
        }
    }

    /// Per-channel (scale, shift) of a frozen layer, for folding into a convolution.
    pub fn frozen_affine(&self) -> Option<(Tensor, Tensor)> {
        match self {
            NormLayer::Frozen {
                weight,
                bias,
                mean,
                var,
            } => {
                // torchvision's FrozenBatchNorm2d uses eps = 1e-5.
                let scale = weight * (var + 1e-5).rsqrt();
                let shift = bias - mean * &scale;
                Some((scale, shift))
            }
            NormLayer::Batch(_) => None,
        }
    }

    /// Per-channel (scale, shift) that this layer applies in evaluation: a frozen layer's
    /// own, or a batch norm's from its running statistics (valid until the next training
    /// step changes them).
    pub fn eval_affine(&self) -> Option<(Tensor, Tensor)> {
        match self {
            NormLayer::Frozen { .. } => self.frozen_affine(),
            NormLayer::Batch(bn) => tch::no_grad(|| {
                let ones = bn.running_var.ones_like();
                let zeros = bn.running_mean.zeros_like();
                let weight = bn.ws.as_ref().unwrap_or(&ones);
                let bias = bn.bs.as_ref().unwrap_or(&zeros);
                // tch's BatchNormConfig default, which every layer here is built with.
                let scale = weight * (&bn.running_var + 1e-5).rsqrt();
                let shift = bias - &bn.running_mean * &scale;
                Some((scale, shift))
            }),
        }
    }
}

impl ModuleT for NormLayer {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            NormLayer::Frozen { .. } => {
                let (scale, shift) = self.frozen_affine().unwrap_or_else(|| unreachable!());
                xs * scale.reshape([1, -1, 1, 1]) + shift.reshape([1, -1, 1, 1])
            }
            NormLayer::Batch(bn) => bn.forward_t(xs, train),
        }
    }
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        cin,
        cout,
        k,
        nn::ConvConfig {
            stride,
            padding,
            bias: false,
            // torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
            ws_init: nn::Init::Kaiming {
                dist: nn::init::NormalOrUniform::Normal,
                fan: nn::init::FanInOut::FanOut,
                non_linearity: nn::init::NonLinearity::ReLU,
            },
            ..Default::default()
        },
    )
}

/// A convolution followed by its norm.
#[derive(Debug)]
pub struct ConvNorm {
    /// The convolution (no bias).
    pub conv: nn::Conv2D,
    /// Its norm.
    pub norm: NormLayer,
    /// For inference: the norm folded into the convolution (weight, bias), in bf16 when
    /// asked.
    pub folded: Option<(Tensor, Tensor)>,
    /// For inference on the CPU: the folded convolution in oneDNN's fused kernels (see
    /// [`crate::onednn`]), when asked and available.
    pub fused: Option<FusedConv>,
    /// The convolution's stride and padding (tch keeps its own private).
    geometry: (i64, i64),
}

impl ConvNorm {
    /// A `k`x`k` convolution from `cin` to `cout` channels under `conv_path`, padded by `k / 2`
    /// as torchvision's ResNet pads every one, and its norm under `norm_path`.
    fn new(
        conv_path: nn::Path,
        norm_path: nn::Path,
        (cin, cout): (i64, i64),
        k: i64,
        stride: i64,
        norm: Norm,
    ) -> Self {
        let padding = k / 2;
        ConvNorm {
            conv: conv(conv_path, cin, cout, k, stride, padding),
            norm: NormLayer::new(norm_path, cout, norm),
            folded: None,
            fused: None,
            geometry: (stride, padding),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let (s, p) = self.geometry;
        if train && xs.kind() == tch::Kind::BFloat16 {
            // Mixed-precision training: bf16 convolutions on the f32 weights; a batch norm
            // takes the bf16 activations with its f32 statistics (libtorch's mixed kernel).
            return match self.norm.frozen_affine() {
                Some((scale, shift)) => {
                    let w = &self.conv.ws * scale.reshape([-1, 1, 1, 1]);
                    crate::lowp::conv2d_cast(xs, &w, Some(&shift), s, p)
                }
                None => self.norm.forward_t(
                    &crate::lowp::conv2d_cast(xs, &self.conv.ws, None, s, p),
                    true,
                ),
            };
        }
        if let Some((w, b)) = &self.folded {
            if !train {
                return xs.conv2d(w, Some(b), [s, s], [p, p], [1, 1], 1);
            }
            // Training: fold afresh each step (the weight changes), gradients flowing
            // through the product; one weight-sized multiply instead of a pass over the
            // activations.
            if let Some((scale, shift)) = self.norm.frozen_affine() {
                let w = &self.conv.ws * scale.reshape([-1, 1, 1, 1]);
                return xs.conv2d(&w, Some(&shift), [s, s], [p, p], [1, 1], 1);
            }
        }
        self.norm.forward_t(&xs.apply(&self.conv), train)
    }

    /// Inference through the fused kernels: `None` when this convolution has none or not
    /// for `xs`'s kind, or when the call failed (logged once; the plain path then runs).
    fn fused(&self, xs: &Tensor, post: Post) -> Option<Tensor> {
        self.fused.as_ref()?.try_forward(xs, post)
    }

    /// Folds the norm into the convolution's weights for inference (a trainable batch norm
    /// with its running statistics), in channels-last layout and bf16 when asked, and with
    /// oneDNN's fused kernels when `fused`; `on == false` undoes it. Training steps keep
    /// using the layers themselves.
    fn fold(&mut self, on: bool, channels_last: bool, bf16: bool, fused: bool) {
        self.folded = match (on, self.norm.eval_affine()) {
            (true, Some((scale, shift))) => tch::no_grad(|| {
                let w = self.conv.ws.detach() * scale.reshape([-1, 1, 1, 1]);
                let w = if channels_last {
                    crate::resnet::to_channels_last(&w)
                } else {
                    w
                };
                if bf16 {
                    Some((
                        w.to_kind(tch::Kind::BFloat16),
                        shift.to_kind(tch::Kind::BFloat16),
                    ))
                } else {
                    Some((w, shift.detach()))
                }
            }),
            _ => None,
        };
        let (s, p) = self.geometry;
        self.fused = match &self.folded {
            Some((w, b)) if fused => FusedConv::new(w, b, s, p),
            _ => None,
        };
    }
}

/// The same values with NHWC strides (libtorch's channels-last), which oneDNN's CPU
/// convolutions run faster on and pass on to their outputs.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    if t.dim() != 4 {
        return t.shallow_clone();
    }
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// `downsample` of a block: `0` the 1x1 convolution, `1` its norm.
fn downsample(p: &nn::Path, cin: i64, cout: i64, stride: i64, norm: Norm) -> ConvNorm {
    let d = p / "downsample";
    ConvNorm::new(&d / 0, &d / 1, (cin, cout), 1, stride, norm)
}

/// Whether ReLUs and sums may write into a convolution's fresh output instead of
/// allocating another activation: at inference, where autograd records nothing that needs
/// the copies.
fn in_place(xs: &Tensor, train: bool) -> bool {
    !train && !xs.requires_grad()
}

/// A residual block, basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1).
#[derive(Debug)]
pub struct Block {
    /// The main path, in order.
    pub convs: Vec<ConvNorm>,
    /// The shortcut projection, when shapes change.
    pub downsample: Option<ConvNorm>,
}

impl Block {
    fn basic(p: nn::Path, cin: i64, planes: i64, stride: i64, norm: Norm) -> Block {
        let convs = vec![
            ConvNorm::new(&p / "conv1", &p / "bn1", (cin, planes), 3, stride, norm),
            ConvNorm::new(&p / "conv2", &p / "bn2", (planes, planes), 3, 1, norm),
        ];
        let downsample =
            (stride != 1 || cin != planes).then(|| downsample(&p, cin, planes, stride, norm));
        Block { convs, downsample }
    }

    fn bottleneck(p: nn::Path, cin: i64, planes: i64, stride: i64, norm: Norm) -> Block {
        let out = planes * 4;
        let convs = vec![
            ConvNorm::new(&p / "conv1", &p / "bn1", (cin, planes), 1, 1, norm),
            ConvNorm::new(&p / "conv2", &p / "bn2", (planes, planes), 3, stride, norm),
            ConvNorm::new(&p / "conv3", &p / "bn3", (planes, out), 1, 1, norm),
        ];
        let downsample =
            (stride != 1 || cin != out).then(|| downsample(&p, cin, out, stride, norm));
        Block { convs, downsample }
    }

    /// Inference through oneDNN's fused kernels (each ReLU and the residual sum inside a
    /// convolution): `None` when a convolution has none or a call failed, for the plain
    /// path to run. Without a shortcut projection the sum goes into the input's storage
    /// when `reuse_input` (the caller reads the input no more), else into a copy.
    fn forward_fused(&self, xs: &Tensor, reuse_input: bool) -> Option<Tensor> {
        let (last, inner) = self.convs.split_last()?;
        let mut y = xs.shallow_clone();
        for c in inner {
            y = c.fused(&y, Post::Relu)?;
        }
        let mut sum = match &self.downsample {
            Some(d) => d.fused(xs, Post::None)?,
            None if reuse_input => xs.shallow_clone(),
            None => xs.copy(),
        };
        last.fused.as_ref()?.try_add_relu_(&y, &mut sum)?;
        Some(sum)
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let in_place = in_place(xs, train);
        let mut y = xs.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, c) in self.convs.iter().enumerate() {
            y = c.forward_t(&y, train);
            if i < last {
                y = if in_place { y.relu_() } else { y.relu() };
            }
        }
        let identity = match &self.downsample {
            Some(d) => d.forward_t(xs, train),
            None => xs.shallow_clone(),
        };
        if in_place {
            let mut y = y;
            let _ = y.g_add_(&identity);
            y.relu_()
        } else {
            (y + identity).relu()
        }
    }
}

/// Which ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Depth {
    /// ResNet-18: basic blocks 2-2-2-2, stage widths 64..512.
    R18,
    /// ResNet-50: bottlenecks 3-4-6-3, stage widths 256..2048.
    R50,
}

impl Depth {
    /// Output channels of layer1..layer4 when the stem is `width` wide (torchvision: 64).
    pub fn stage_channels(self, width: i64) -> [i64; 4] {
        let expansion = match self {
            Depth::R18 => 1,
            Depth::R50 => 4,
        };
        [1, 2, 4, 8].map(|k| width * k * expansion)
    }
}

/// The ResNet body: `conv1`, `bn1`, max-pool, `layer1`..`layer4`.
#[derive(Debug)]
pub struct ResNet {
    /// The stem.
    pub stem: ConvNorm,
    /// layer1..layer4.
    pub layers: Vec<Vec<Block>>,
}

impl ResNet {
    /// Builds the body under `p` (torchvision: `backbone.body`) for `in_channels` inputs,
    /// its stem `width` channels wide (torchvision: 64; stage i has `width << i` planes).
    pub fn new(p: &nn::Path, depth: Depth, in_channels: i64, norm: Norm, width: i64) -> ResNet {
        let stem = ConvNorm::new(p / "conv1", p / "bn1", (in_channels, width), 7, 2, norm);
        let counts: [usize; 4] = match depth {
            Depth::R18 => [2, 2, 2, 2],
            Depth::R50 => [3, 4, 6, 3],
        };
        let mut cin = width;
        let mut layers = Vec::new();
        for (i, &n) in counts.iter().enumerate() {
            let planes = width << i;
            let stride = if i == 0 { 1 } else { 2 };
            let lp = p / format!("layer{}", i + 1);
            let mut blocks = Vec::new();
            for b in 0..n {
                let s = if b == 0 { stride } else { 1 };
                let block = match depth {
                    Depth::R18 => Block::basic(&lp / b, cin, planes, s, norm),
                    Depth::R50 => Block::bottleneck(&lp / b, cin, planes, s, norm),
                };
                cin = match depth {
                    Depth::R18 => planes,
                    Depth::R50 => planes * 4,
                };
                blocks.push(block);
            }
            layers.push(blocks);
        }
        ResNet { stem, layers }
    }

    /// Folds the norms into the convolutions for inference (see [`ConvNorm`]), as bf16
    /// copies when `bf16` (the body's input must then be bf16); call again after loading
    /// new weights or training.
    pub fn fold(&mut self, on: bool, channels_last: bool, bf16: bool, fused: bool) {
        self.stem.fold(on, channels_last, bf16, fused);
        for block in self.layers.iter_mut().flatten() {
            for c in block.convs.iter_mut() {
                c.fold(on, channels_last, bf16, fused);
            }
            if let Some(d) = block.downsample.as_mut() {
                d.fold(on, channels_last, bf16, fused);
            }
        }
    }

    /// The outputs of layer1..layer4.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let in_place = in_place(xs, train);
        let stem = match in_place.then(|| self.stem.fused(xs, Post::Relu)).flatten() {
            Some(stem) => stem,
            None if in_place => self.stem.forward_t(xs, train).relu_(),
            None => self.stem.forward_t(xs, train).relu(),
        };
        let mut x = stem.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut outs = Vec::with_capacity(4);
        for (l, layer) in self.layers.iter().enumerate() {
            for (b, block) in layer.iter().enumerate() {
                // A block's input is read afterwards only when it is a layer's output
                // (kept in `outs`): the input of a later layer's first block.
                let reuse_input = b > 0 || l == 0;
                let fused = in_place.then(|| block.forward_fused(&x, reuse_input));
                x = match fused.flatten() {
                    Some(y) => y,
                    None => block.forward_t(&x, train),
                };
            }
            outs.push(x.shallow_clone());
        }
        outs
    }
}
