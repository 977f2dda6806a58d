//! Deterministic pseudo-random weights and inputs that Python (numpy) reproduces bit for
//! bit, so parity with torchvision is tested without shipping a 160 MB checkpoint.
//!
//! Value `i` of tensor `name`: `u = splitmix64(fnv1a64(name) + i) >> 40` as a 24-bit
//! integer, `x = (2u / 2^24 - 1)` in f64, scaled per tensor kind, then cast to f32.
//! `tests/parity/make_golden.py` implements the same, and writes the golden JSON whose
//! numbers [`json_ints`] and [`json_floats`] read back.

use serde_json::Value;
use tch::{Kind, Tensor};

fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A network `pcb bench vision` times (and `bench_reference.py` builds under the same tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchModel {
    /// torchvision's R50-FPN.
    R50,
    /// The same with a ResNet-18.
    R18,
    /// The shape of the shipped compact model (pipelines/models/deeppcb-compact/model.json).
    Compact,
}

impl BenchModel {
    /// From its tag: `r50`, `r18` or `compact`.
    pub fn parse(tag: &str) -> Option<BenchModel> {
        match tag {
            "r50" => Some(BenchModel::R50),
            "r18" => Some(BenchModel::R18),
            "compact" => Some(BenchModel::Compact),
            _ => None,
        }
    }

    /// Its configuration on plain images of one `size`. The compact model's
    /// `box_batch_size_per_image` (128) stays at torchvision's 512, so that training rows
    /// compare like with like.
    pub fn config(self, size: i64) -> crate::ModelConfig {
        use crate::{Depth, InputMode, ModelConfig, Transform};
        let base = ModelConfig {
            input: InputMode::Image,
            transform: Transform {
                min_size: size,
                max_size: size,
                ..Transform::default()
            },
            ..ModelConfig::default()
        };
        match self {
            BenchModel::R50 => base,
            BenchModel::R18 => ModelConfig {
                backbone: Depth::R18,
                ..base
            },
            BenchModel::Compact => ModelConfig {
                backbone: Depth::R18,
                backbone_width: 16,
                fpn_channels: 64,
                representation_size: 256,
                test_proposals: 300,
                ..base
            },
        }
    }
}

/// `n` values uniform in [-1, 1) for `name`.
pub fn uniform(name: &str, n: usize) -> Vec<f64> {
    let seed = fnv1a64(name);
    (0..n as u64)
        .map(|i| {
            let u = (splitmix64(seed.wrapping_add(i)) >> 40) as f64;
            2.0 * u / 16_777_216.0 - 1.0
        })
        .collect()
}

/// The deterministic value of a parameter called `name` with `shape`: convolution and
/// linear weights with variance 1/fan_in (activations stay of order one through ResNet-50,
/// so detections and losses are meaningful), biases ±0.1, norm scales 0.75..1.25, running
/// means ±0.1, running variances 0.5..1.5.
pub fn parameter(name: &str, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let x = uniform(name, n as usize);
    let leaf = name.rsplit('.').next().unwrap_or("");
    let is_norm = name.contains(".bn") || name.contains("downsample.1.");
    let vals: Vec<f32> = x
        .iter()
        .map(|&v| {
            let out = match (leaf, is_norm) {
                ("weight", false) => {
                    let fan_in: i64 = shape.iter().skip(1).product::<i64>().max(1);
                    v * (3.0 / fan_in as f64).sqrt()
                }
                ("weight", true) => 1.0 + 0.25 * v,
                ("running_var", _) => 1.0 + 0.5 * v,
                ("running_mean", _) | ("bias", _) => 0.1 * v,
                _ => v,
            };
            out as f32
        })
        .collect();
    Tensor::from_slice(&vals).view(shape).to_kind(Kind::Float)
}

/// A deterministic input image `[3, h, w]` with values in 0..1.
pub fn image(name: &str, h: i64, w: i64) -> Tensor {
    let vals: Vec<f32> = uniform(name, (3 * h * w) as usize)
        .iter()
        .map(|&v| (0.5 + 0.5 * v) as f32)
        .collect();
    Tensor::from_slice(&vals).view([3, h, w])
}

/// Fills every parameter of `det` with [`parameter`]'s deterministic values (what the
/// parity goldens and the speed benchmark both run on).
pub fn fill(det: &mut crate::Detector) -> Result<(), crate::VisionError> {
    let tensors: Vec<(String, Tensor)> = det
        .shapes()
        .into_iter()
        .map(|(k, s)| {
            let t = parameter(&k, &s);
            (k, t)
        })
        .collect();
    det.load_tensors(tensors, "deterministic weights")
}

/// The integers of the JSON array `v` (a shape, labels, indices); `None` when it holds
/// anything else.
pub fn json_ints(v: &Value) -> Option<Vec<i64>> {
    v.as_array()?.iter().map(Value::as_i64).collect()
}

/// The numbers of the JSON array `v`, nested arrays flattened in order as a tensor's values
/// are; `None` when it holds anything else.
pub fn json_floats(v: &Value) -> Option<Vec<f64>> {
    let mut out = Vec::new();
    for x in v.as_array()? {
        match x {
            Value::Array(_) => out.extend(json_floats(x)?),
            _ => out.push(x.as_f64()?),
        }
    }
    Some(out)
}

/// `v` as a tensor of `rows` rows, for unit tests that write boxes out by hand.
#[cfg(test)]
pub(crate) fn t(v: &[f32], rows: i64) -> Tensor {
    Tensor::from_slice(v).view([rows, -1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers_flatten_in_order_and_refuse_other_values() {
        let v: Value = serde_json::json!([[1, 2.5], [3], 4]);
        assert_eq!(json_floats(&v), Some(vec![1.0, 2.5, 3.0, 4.0]));
        assert_eq!(json_ints(&serde_json::json!([3, -1])), Some(vec![3, -1]));
        assert_eq!(json_ints(&serde_json::json!([1.5])), None);
        assert_eq!(json_floats(&serde_json::json!([1, "x"])), None);
        assert_eq!(json_floats(&serde_json::json!({"a": 1})), None);
    }
}
