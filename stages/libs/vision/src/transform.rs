//! The input transform (torchvision's `GeneralizedRCNNTransform`): normalise, resize by the
//! min/max size rule, pad the batch to a multiple of 32, and map boxes back afterwards.

use tch::{Kind, Tensor};

use crate::VisionError;

/// What a board becomes before the network: always three channels, so that a torchvision
/// checkpoint's first convolution fits either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputMode {
    /// The board image alone (grey replicated to three channels).
    Image,
    /// Golden-board comparison: the image, its defect-free template and their absolute
    /// difference as the three channels.
    ImageTemplateDiff,
}

/// Builds the `[3, H, W]` input from an image and, for [`InputMode::ImageTemplateDiff`], its
/// template (both `[1|3, H, W]`, floats in 0..1).
pub fn compose(
    mode: InputMode,
    image: &Tensor,
    template: Option<&Tensor>,
) -> Result<Tensor, VisionError> {
    let grey = |t: &Tensor, what: &str| -> Result<Tensor, VisionError> {
        match t.size().as_slice() {
            [1, _, _] => Ok(t.shallow_clone()),
            [3, _, _] => Ok(t.mean_dim([0i64].as_slice(), true, Kind::Float)),
            other => Err(VisionError::Input(format!(
                "{what} must be [1|3, H, W], got {other:?}"
            ))),
        }
    };
    match mode {
        InputMode::Image => match image.size().as_slice() {
            [3, _, _] => Ok(image.shallow_clone()),
            [1, h, w] => Ok(image.expand([3, *h, *w], false).contiguous()),
            other => Err(VisionError::Input(format!(
                "image must be [1|3, H, W], got {other:?}"
            ))),
        },
        InputMode::ImageTemplateDiff => {
            let template = template.ok_or_else(|| {
                VisionError::Input(
                    "this model compares with the template, but the board has none".into(),
                )
            })?;
            let (i, t) = (grey(image, "image")?, grey(template, "template")?);
            if i.size() != t.size() {
                return Err(VisionError::Input(format!(
                    "template is {:?} but the image is {:?}",
                    &t.size()[1..],
                    &i.size()[1..]
                )));
            }
            let d = (&i - &t).abs();
            Ok(Tensor::cat(&[i, t, d], 0))
        }
    }
}

/// Sizes and normalisation of the transform.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Transform {
    /// Shorter side after resizing (torchvision: 800); 0 keeps every image at its own size
    /// (boards of a known scale, or training crops that must keep the boards' scale).
    pub min_size: i64,
    /// Longer side at most (torchvision: 1333).
    pub max_size: i64,
    /// Per-channel mean.
    pub mean: [f64; 3],
    /// Per-channel standard deviation.
    pub std: [f64; 3],
}

impl Default for Transform {
    fn default() -> Self {
        Transform {
            min_size: 800,
            max_size: 1333,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

/// A padded batch and what is needed to map results back.
#[derive(Debug)]
pub struct Batch {
    /// `[N, 3, Hp, Wp]`.
    pub images: Tensor,
    /// Each image's size after resizing, before padding.
    pub sizes: Vec<(i64, i64)>,
    /// Each image's original size.
    pub original: Vec<(i64, i64)>,
    /// Targets' boxes, resized.
    pub boxes: Option<Vec<Tensor>>,
}

impl Transform {
    /// The resized size of an `(h, w)` image, computed as torchvision does in eager mode:
    /// the scale as a Python float (f64), the size truncated.
    pub fn resized_size(&self, h: i64, w: i64) -> (i64, i64) {
        if self.min_size <= 0 {
            return (h, w);
        }
        let (lo, hi) = (h.min(w) as f64, h.max(w) as f64);
        let scale = (self.min_size as f64 / lo).min(self.max_size as f64 / hi);
        ((h as f64 * scale) as i64, (w as f64 * scale) as i64)
    }

    /// Normalises, resizes and pads `images` (each `[3, H, W]`), resizing `boxes` alike.
    pub fn apply(&self, images: &[Tensor], boxes: Option<&[Tensor]>) -> Result<Batch, VisionError> {
        if images.is_empty() {
            return Err(VisionError::Input("no images".into()));
        }
        let mut out = Vec::with_capacity(images.len());
        let mut sizes = Vec::new();
        let mut original = Vec::new();
        let mut new_boxes = Vec::new();
        for (i, img) in images.iter().enumerate() {
            let s = img.size();
            if s.len() != 3 || s[0] != 3 {
                return Err(VisionError::Input(format!(
                    "image {i} must be [3, H, W], got {s:?}"
                )));
            }
            let (h, w) = (s[1], s[2]);
            let opts = (img.kind(), img.device());
            let mean = Tensor::from_slice(&self.mean)
                .to_kind(img.kind())
                .to_device(opts.1)
                .view([3, 1, 1]);
            let std = Tensor::from_slice(&self.std)
                .to_kind(img.kind())
                .to_device(opts.1)
                .view([3, 1, 1]);
            let norm = (img - mean) / std;
            let (nh, nw) = self.resized_size(h, w);
            // At its own size a bilinear resize samples every pixel at its centre with
            // weights 1 and 0, so skipping it changes nothing (torchvision runs it anyway).
            let resized = if (nh, nw) == (h, w) {
                norm
            } else {
                norm.unsqueeze(0)
                    .upsample_bilinear2d([nh, nw], false, None, None)
                    .squeeze_dim(0)
            };
            out.push(resized);
            sizes.push((nh, nw));
            original.push((h, w));
            if let Some(b) = boxes.and_then(|b| b.get(i)) {
                new_boxes.push(resize_boxes(b, (h, w), (nh, nw)));
            }
        }
        let max_h = sizes.iter().map(|s| s.0).max().unwrap_or(0);
        let max_w = sizes.iter().map(|s| s.1).max().unwrap_or(0);
        let (ph, pw) = ((max_h + 31) / 32 * 32, (max_w + 31) / 32 * 32);
        let first = &out[0];
        if out.len() == 1 && sizes[0] == (ph, pw) {
            // One board already a multiple of 32: nothing to pad, no copy.
            return Ok(Batch {
                images: first.unsqueeze(0),
                sizes,
                original,
                boxes: boxes.map(|_| new_boxes),
            });
        }
        let batched = Tensor::zeros(
            [out.len() as i64, 3, ph, pw],
            (first.kind(), first.device()),
        );
        for (i, img) in out.iter().enumerate() {
            let s = img.size();
            batched
                .get(i as i64)
                .narrow(1, 0, s[1])
                .narrow(2, 0, s[2])
                .copy_(img);
        }
        Ok(Batch {
            images: batched,
            sizes,
            original,
            boxes: boxes.map(|_| new_boxes),
        })
    }
}

/// Scales `[N, 4]` boxes from an image of size `from` to one of size `to`, as torchvision's
/// `resize_boxes` (ratios in f32).
pub fn resize_boxes(boxes: &Tensor, from: (i64, i64), to: (i64, i64)) -> Tensor {
    let rh = to.0 as f32 / from.0 as f32;
    let rw = to.1 as f32 / from.1 as f32;
    let ratios = Tensor::from_slice(&[rw, rh, rw, rh])
        .to_kind(boxes.kind())
        .to_device(boxes.device());
    boxes * ratios.view([1, 4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_rule_follows_min_and_max() {
        let t = Transform::default();
        assert_eq!(t.resized_size(640, 640), (800, 800));
        assert_eq!(t.resized_size(400, 2000), (266, 1333));
        let t = Transform {
            min_size: 640,
            max_size: 640,
            ..Transform::default()
        };
        assert_eq!(t.resized_size(640, 640), (640, 640));
        let t = Transform {
            min_size: 0,
            ..Transform::default()
        };
        assert_eq!(t.resized_size(320, 640), (320, 640));
    }

    /// A board already at the target size and a multiple of 32 is only normalised: the
    /// same values as torchvision's resize to its own size (skipped here) and padding.
    #[test]
    fn a_board_at_its_own_size_is_not_resized_or_copied() {
        let t = Transform {
            min_size: 64,
            max_size: 64,
            ..Transform::default()
        };
        let img = Tensor::rand([3, 64, 64], (Kind::Float, tch::Device::Cpu));
        let batch = t.apply(&[img.copy()], None).unwrap();
        let mean = Tensor::from_slice(&t.mean)
            .to_kind(Kind::Float)
            .view([3, 1, 1]);
        let std = Tensor::from_slice(&t.std)
            .to_kind(Kind::Float)
            .view([3, 1, 1]);
        let norm = (img - mean) / std;
        let resized = norm
            .unsqueeze(0)
            .upsample_bilinear2d([64, 64], false, None, None);
        assert!(batch.images.equal(&resized), "bit for bit");
        assert_eq!(batch.sizes, vec![(64, 64)]);
    }

    #[test]
    fn batch_is_padded_to_32_and_boxes_scale() {
        let t = Transform {
            min_size: 100,
            max_size: 1000,
            ..Transform::default()
        };
        let img = Tensor::ones([3, 50, 70], (Kind::Float, tch::Device::Cpu));
        let boxes = Tensor::from_slice(&[10f32, 10., 20., 30.]).view([1, 4]);
        let b = t.apply(&[img], Some(&[boxes])).unwrap();
        assert_eq!(b.sizes, vec![(100, 140)]);
        assert_eq!(b.images.size(), vec![1, 3, 128, 160]);
        let got = Vec::<f32>::try_from(&b.boxes.unwrap()[0].view([-1])).unwrap();
        assert_eq!(got, vec![20., 20., 40., 60.]);
    }

    #[test]
    fn wrong_channels_and_missing_template_are_clear_errors() {
        let img = Tensor::ones([2, 8, 8], (Kind::Float, tch::Device::Cpu));
        let e = compose(InputMode::Image, &img, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[1|3, H, W]"), "{e}");
        let img = Tensor::ones([1, 8, 8], (Kind::Float, tch::Device::Cpu));
        let e = compose(InputMode::ImageTemplateDiff, &img, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("template"), "{e}");
        let tpl = Tensor::ones([1, 8, 9], (Kind::Float, tch::Device::Cpu));
        let e = compose(InputMode::ImageTemplateDiff, &img, Some(&tpl))
            .unwrap_err()
            .to_string();
        assert!(e.contains("template is"), "{e}");
        let ok = compose(InputMode::ImageTemplateDiff, &img, Some(&img)).unwrap();
        assert_eq!(ok.size(), vec![3, 8, 8]);
    }
}
