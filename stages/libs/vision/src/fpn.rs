//! The feature pyramid (torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool`):
//! 1x1 lateral convolutions, nearest top-down upsampling, 3x3 output convolutions, and an
//! extra level by max-pooling the coarsest output.

use tch::nn;
use tch::{Kind, Tensor};

use crate::lowp::Half;
use crate::onednn::{FusedConv, Post};

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        cin,
        cout,
        k,
        nn::ConvConfig {
            padding,
            // torchvision: kaiming_uniform_(a=1), bias 0.
            ws_init: nn::Init::Kaiming {
                dist: nn::init::NormalOrUniform::Uniform,
                fan: nn::init::FanInOut::FanIn,
                non_linearity: nn::init::NonLinearity::Linear,
            },
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        },
    )
}

/// The pyramid under `backbone.fpn`.
#[derive(Debug)]
pub struct Fpn {
    /// `inner_blocks.<i>.0`: laterals.
    pub inner: Vec<nn::Conv2D>,
    /// `layer_blocks.<i>.0`: outputs.
    pub layer: Vec<nn::Conv2D>,
    /// bf16 copies of `inner` then `layer` for inference on bf16 inputs (empty when off;
    /// training on bf16 inputs casts the weights on the fly).
    half: Vec<Half>,
    /// For inference on the CPU: `inner` then `layer` in oneDNN's fused kernels on packed
    /// weights (empty when off), in the kind inference runs in.
    fused: Vec<FusedConv>,
}

impl Fpn {
    /// A pyramid from `in_channels` (finest first) to `out_channels` per level.
    pub fn new(p: &nn::Path, in_channels: &[i64], out_channels: i64) -> Fpn {
        let inner = in_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| conv(p / "inner_blocks" / i / 0, c, out_channels, 1, 0))
            .collect();
        let layer = (0..in_channels.len())
            .map(|i| conv(p / "layer_blocks" / i / 0, out_channels, out_channels, 3, 1))
            .collect();
        Fpn {
            inner,
            layer,
            half: Vec::new(),
            fused: Vec::new(),
        }
    }

    /// Makes (or drops) the fused inference copies, in bf16 when `bf16` (after
    /// [`Fpn::set_bf16`]).
    pub fn set_fused(&mut self, on: bool, bf16: bool) {
        self.fused = Vec::new();
        if !on {
            return;
        }
        let convs = self.inner.iter().chain(&self.layer);
        let fused: Option<Vec<FusedConv>> = convs
            .enumerate()
            .map(|(i, c)| {
                let padding = if i < self.inner.len() { 0 } else { 1 };
                let (w, b) = match (bf16, self.half.get(i)) {
                    (true, Some(h)) => (h.w.shallow_clone(), h.b.as_ref()?.shallow_clone()),
                    _ => (c.ws.shallow_clone(), c.bs.as_ref()?.shallow_clone()),
                };
                FusedConv::new(&w, &b, 1, padding)
            })
            .collect();
        self.fused = fused.unwrap_or_default();
    }

    /// Makes (or drops) the bf16 copies that bf16 inputs run through.
    pub fn set_bf16(&mut self, on: bool) {
        self.half = if on {
            self.inner
                .iter()
                .chain(&self.layer)
                .map(Half::conv)
                .collect()
        } else {
            Vec::new()
        };
    }

    /// `c` on `x`; bf16 inputs go through `lowp` (the inference copy `half`, or in
    /// training the weights cast on the fly).
    fn conv(c: &nn::Conv2D, half: Option<&Half>, x: &Tensor, train: bool, padding: i64) -> Tensor {
        if x.kind() == Kind::BFloat16 {
            crate::lowp::conv2d_bf16(x, c, half, train, padding)
        } else {
            x.apply(c)
        }
    }

    /// Convolution `i` (`inner` then `layer`) through the fused kernels, at inference
    /// where it has them.
    fn fused(&self, i: usize, x: &Tensor, train: bool) -> Option<Tensor> {
        self.fused
            .get(i)
            .filter(|_| !train)?
            .try_forward(x, Post::None)
    }

    fn lateral(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        if let Some(y) = self.fused(i, x, train) {
            return y;
        }
        Self::conv(&self.inner[i], self.half.get(i), x, train, 0)
    }

    fn output(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        if let Some(y) = self.fused(self.inner.len() + i, x, train) {
            return y;
        }
        Self::conv(
            &self.layer[i],
            self.half.get(self.inner.len() + i),
            x,
            train,
            1,
        )
    }

    /// Levels '0'..'3' and 'pool', finest first (inference).
    pub fn forward(&self, xs: &[Tensor]) -> Vec<Tensor> {
        self.forward_t(xs, false)
    }

    /// As [`Fpn::forward`]; in training bf16 inputs go through the weights cast on the fly,
    /// never the inference copies (which would neither learn nor follow updates).
    pub fn forward_t(&self, xs: &[Tensor], train: bool) -> Vec<Tensor> {
        let n = xs.len();
        let mut last_inner = self.lateral(n - 1, &xs[n - 1], train);
        let mut results = vec![self.output(n - 1, &last_inner, train)];
        for idx in (0..n - 1).rev() {
            let lateral = self.lateral(idx, &xs[idx], train);
            let size = lateral.size();
            let top_down = last_inner.upsample_nearest2d([size[2], size[3]], None, None);
            last_inner = if train {
                lateral + top_down
            } else {
                // At inference the sum goes into the lateral's fresh output.
                let mut lateral = lateral;
                lateral.g_add_(&top_down)
            };
            results.insert(0, self.output(idx, &last_inner, train));
        }
        let pool = results[n - 1].max_pool2d([1, 1], [2, 2], [0, 0], [1, 1], false);
        results.push(pool);
        results
    }
}
