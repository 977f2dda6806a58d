//! Object-detection evaluation for the DeepPCB protocol, in pure Rust: mAP at IoU > 0.33
//! (DeepPCB), mAP@0.5 (VOC), the best-F score threshold, a terminal table, a JSON report and
//! a PNG of the precision/recall curves.
//!
//! Feed [`evaluate`] one [`ImageResult`] per test image; class ids are 1-based indexes into
//! the class-name list (`classes[i]` is class id `i + 1`, as in DeepPCB where 0 is the
//! background). See [`eval`] for the exact protocol, and [`official`] for the score of
//! DeepPCB's own evaluation script, reported beside it.

#![warn(missing_docs)]

pub mod error;
pub mod eval;
pub mod official;
pub mod plot;
pub mod report;

pub use error::MetricsError;
pub use eval::{evaluate, iou, DEEPPCB_IOU, VOC_IOU};
pub use official::{deeppcb_official, OfficialScore};
pub use plot::{plot_pr_curves, PLOT_HEIGHT, PLOT_WIDTH};
pub use report::{ClassReport, OperatingPoint, PrCurve, Report};

use serde::{Deserialize, Serialize};

/// A ground-truth box in pixel corners (`x1 < x2`, `y1 < y2`), with its 1-based class id.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GtBox {
    /// Left edge.
    pub x1: f32,
    /// Top edge.
    pub y1: f32,
    /// Right edge.
    pub x2: f32,
    /// Bottom edge.
    pub y2: f32,
    /// Class id: `i + 1` for `classes[i]`.
    pub class_id: u16,
}

/// A predicted box in pixel corners, with its 1-based class id and confidence score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Left edge.
    pub x1: f32,
    /// Top edge.
    pub y1: f32,
    /// Right edge.
    pub x2: f32,
    /// Bottom edge.
    pub y2: f32,
    /// Class id: `i + 1` for `classes[i]`.
    pub class_id: u16,
    /// Confidence; higher ranks first. NaN ranks below every number (see [`eval`]).
    pub score: f32,
}

/// The ground truth and the detections of one test image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageResult {
    /// The image's name, for the reader of a dumped result; the evaluation ignores it.
    pub image: String,
    /// Its annotated defects.
    pub ground_truth: Vec<GtBox>,
    /// What the model found in it.
    pub detections: Vec<Detection>,
}

impl GtBox {
    /// The box as `[x1, y1, x2, y2]`, the form [`iou`] takes.
    pub fn corners(&self) -> [f32; 4] {
        [self.x1, self.y1, self.x2, self.y2]
    }
}

impl Detection {
    /// The box as `[x1, y1, x2, y2]`, the form [`iou`] takes.
    pub fn corners(&self) -> [f32; 4] {
        [self.x1, self.y1, self.x2, self.y2]
    }
}

/// Builders of boxes, detections and images for the crate's tests, and the check of the
/// numbers they compute by hand.
#[cfg(test)]
pub(crate) mod testing {
    use crate::{Detection, GtBox, ImageResult};

    pub(crate) fn gt(x1: f32, y1: f32, x2: f32, y2: f32, class_id: u16) -> GtBox {
        GtBox {
            x1,
            y1,
            x2,
            y2,
            class_id,
        }
    }

    pub(crate) fn det(x1: f32, y1: f32, x2: f32, y2: f32, class_id: u16, score: f32) -> Detection {
        Detection {
            x1,
            y1,
            x2,
            y2,
            class_id,
            score,
        }
    }

    pub(crate) fn image(
        name: &str,
        ground_truth: Vec<GtBox>,
        detections: Vec<Detection>,
    ) -> ImageResult {
        ImageResult {
            image: name.to_string(),
            ground_truth,
            detections,
        }
    }

    /// The one image `a`, which is all the input most cases need.
    pub(crate) fn one_image(
        ground_truth: Vec<GtBox>,
        detections: Vec<Detection>,
    ) -> Vec<ImageResult> {
        vec![image("a", ground_truth, detections)]
    }

    /// The one image `a` with gt `[0, 0, 100, 100]` and a 0.9 detection `[0, 0, 100, y2]`,
    /// both of class 1, which overlap with IoU `y2 / 100` exactly (no `+1` in the areas).
    pub(crate) fn overlapping(y2: f32) -> Vec<ImageResult> {
        one_image(
            vec![gt(0., 0., 100., 100., 1)],
            vec![det(0., 0., 100., y2, 1, 0.9)],
        )
    }

    /// Hand-computed values are ratios of small integers, so only rounding separates them
    /// from what the code computes.
    const EPS: f64 = 1e-12;

    pub(crate) fn assert_close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() < EPS,
            "expected {expected}, got {actual}"
        );
    }
}
