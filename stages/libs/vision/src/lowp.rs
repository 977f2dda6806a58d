//! bf16 weight copies for inference on CPUs with native bf16 arithmetic (AVX-512 BF16,
//! AMX), where oneDNN runs convolutions and matrix products in bf16 much faster than in f32.
//! Geometry (anchors, box decoding, RoI sampling, NMS) and the small predictor stay in f32.

use tch::{nn, Kind, Tensor};

/// A layer's weight and bias cast to bf16 (detached copies: refresh after weights change).
#[derive(Debug)]
pub struct Half {
    /// Weight.
    pub w: Tensor,
    /// Bias.
    pub b: Option<Tensor>,
}

impl Half {
    /// Copies `ws` (and `bs`) as bf16.
    pub fn of(ws: &Tensor, bs: Option<&Tensor>) -> Half {
        tch::no_grad(|| Half {
            w: ws.detach().to_kind(Kind::BFloat16),
            b: bs.map(|b| b.detach().to_kind(Kind::BFloat16)),
        })
    }

    /// A convolution's copy.
    pub fn conv(c: &nn::Conv2D) -> Half {
        Half::of(&c.ws, c.bs.as_ref())
    }

    /// A linear layer's copy.
    pub fn linear(l: &nn::Linear) -> Half {
        Half::of(&l.ws, l.bs.as_ref())
    }

    /// A stride-1 convolution with `padding` on a bf16 input.
    pub fn conv2d(&self, xs: &Tensor, padding: i64) -> Tensor {
        xs.conv2d(
            &self.w,
            self.b.as_ref(),
            [1, 1],
            [padding, padding],
            [1, 1],
            1,
        )
    }

    /// `xs @ w^T + b` on a bf16 input.
    pub fn linear_forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.w, self.b.as_ref())
    }
}

/// Training in bf16: a convolution with the f32 weights cast on the fly, so gradients reach
/// them (the master weights and the optimiser stay in f32, as with PyTorch's autocast).
pub fn conv2d_cast(
    xs: &Tensor,
    ws: &Tensor,
    bs: Option<&Tensor>,
    stride: i64,
    padding: i64,
) -> Tensor {
    let b = bs.map(|b| b.to_kind(Kind::BFloat16));
    xs.conv2d(
        &ws.to_kind(Kind::BFloat16),
        b.as_ref(),
        [stride, stride],
        [padding, padding],
        [1, 1],
        1,
    )
}

/// A stride-1 convolution on bf16 `xs`: through the inference copy `half` outside
/// training, else with the f32 weights cast on the fly (so that they learn).
pub fn conv2d_bf16(
    xs: &Tensor,
    c: &nn::Conv2D,
    half: Option<&Half>,
    train: bool,
    padding: i64,
) -> Tensor {
    match half {
        Some(h) if !train => h.conv2d(xs, padding),
        _ => conv2d_cast(xs, &c.ws, c.bs.as_ref(), 1, padding),
    }
}

/// A linear layer on bf16 `xs`, as [`conv2d_bf16`] chooses.
pub fn linear_bf16(xs: &Tensor, l: &nn::Linear, half: Option<&Half>, train: bool) -> Tensor {
    match half {
        Some(h) if !train => h.linear_forward(xs),
        _ => linear_cast(xs, l),
    }
}

/// Training in bf16: a linear layer with its f32 weights cast on the fly.
pub fn linear_cast(xs: &Tensor, l: &nn::Linear) -> Tensor {
    let b = l.bs.as_ref().map(|b| b.to_kind(Kind::BFloat16));
    xs.linear(&l.ws.to_kind(Kind::BFloat16), b.as_ref())
}

/// Whether inference runs in bf16.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bf16 {
    /// Where the CPU has native bf16 ([`cpu_has_bf16`]).
    #[default]
    Auto,
    /// Always (slow where bf16 is emulated).
    On,
    /// Never: f32 throughout.
    Off,
}

impl Bf16 {
    /// Whether it applies on this machine.
    pub fn enabled(self) -> bool {
        match self {
            Bf16::Auto => cpu_has_bf16(),
            Bf16::On => true,
            Bf16::Off => false,
        }
    }
}

impl std::str::FromStr for Bf16 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Bf16::Auto),
            "on" => Ok(Bf16::On),
            "off" => Ok(Bf16::Off),
            other => Err(format!("bf16 must be auto, on or off, not {other:?}")),
        }
    }
}

/// Whether this CPU computes in bf16 natively. Elsewhere oneDNN emulates bf16 and runs
/// slower than f32, so `auto` settings leave it off.
pub fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUs with AMX have AVX-512 BF16 as well.
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_settings_parse_and_resolve() {
        assert_eq!("auto".parse::<Bf16>(), Ok(Bf16::Auto));
        assert!(Bf16::On.enabled());
        assert!(!Bf16::Off.enabled());
        assert_eq!(Bf16::Auto.enabled(), cpu_has_bf16());
        assert!("yes"
            .parse::<Bf16>()
            .unwrap_err()
            .contains("auto, on or off"));
    }

    #[test]
    fn half_layers_agree_with_f32_to_bf16_precision() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let conv = nn::conv2d(
            vs.root() / "c",
            8,
            4,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        );
        let lin = nn::linear(vs.root() / "l", 16, 5, Default::default());
        let x = Tensor::randn([2, 8, 6, 6], (Kind::Float, tch::Device::Cpu));
        let want = x.apply(&conv);
        let got = Half::conv(&conv)
            .conv2d(&x.to_kind(Kind::BFloat16), 1)
            .to_kind(Kind::Float);
        let err = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert_eq!(got.size(), want.size());
        // bf16 keeps 8 significant bits: a relative error near 2^-8 per product, averaged.
        assert!(err < 2e-2 * scale, "conv: {err} vs scale {scale}");
        let v = Tensor::randn([3, 16], (Kind::Float, tch::Device::Cpu));
        let want = v.apply(&lin);
        let got = Half::linear(&lin)
            .linear_forward(&v.to_kind(Kind::BFloat16))
            .to_kind(Kind::Float);
        let err = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(err < 2e-2 * scale, "linear: {err} vs scale {scale}");
    }
}
