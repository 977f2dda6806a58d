//! The detector's core on tch: Faster R-CNN with a ResNet FPN backbone, built module for
//! module as torchvision builds it, with its parameters under torchvision's names.

pub mod boxes;
pub mod cuda;
pub mod data;
pub mod evaluate;
pub mod fpn;
pub mod heap;
pub mod lowp;
pub mod model;
pub mod onednn;
pub mod ops;
pub mod resnet;
pub mod roi_heads;
pub mod rpn;
pub mod stability;
pub mod testing;
pub mod train;
pub mod transform;

pub use boxes::Sampling;
pub use lowp::Bf16;
pub use model::{Detector, FasterRcnn, InferenceOptions, Losses, ModelConfig, Output, Target};
pub use resnet::{Depth, Norm};
pub use roi_heads::Detections;
pub use transform::{compose, InputMode, Transform};

/// What can go wrong in the vision core.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// An input the model cannot take (shape, channels, a missing template).
    #[error("bad input: {0}")]
    Input(String),
    /// A checkpoint that cannot be read or does not fit the model.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: String,
        /// Missing, unexpected or mis-shaped tensors, or the read error.
        message: String,
    },
    /// A dataset file that cannot be read or parsed.
    #[error("data: {0}")]
    Data(String),
    /// A dataset list or label file that `pcb-datasets` cannot read or parse.
    #[error("data: {0}")]
    Dataset(#[from] pcb_datasets::DatasetError),
    /// libtorch refused an operation.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}
