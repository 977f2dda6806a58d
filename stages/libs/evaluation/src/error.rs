//! The one error type of the crate; each variant names the step that failed.

use std::path::PathBuf;

/// Why producing a report output failed. Evaluation itself cannot fail: odd inputs (NaN
/// scores, degenerate boxes, unknown class ids) have documented meanings instead.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Serialising the [`crate::Report`] to JSON failed.
    #[error("serialising the report to JSON: {source}")]
    SerializeReport {
        /// What serde_json said.
        source: serde_json::Error,
    },
    /// The embedded plot font could not be registered with plotters.
    #[error("registering the embedded plot font: {message}")]
    Font {
        /// What went wrong.
        message: String,
    },
    /// Drawing the precision/recall chart failed.
    #[error("drawing the precision/recall curves for {path}: {message}")]
    Plot {
        /// The PNG that was being made.
        path: PathBuf,
        /// What plotters said.
        message: String,
    },
    /// Encoding or writing the PNG failed.
    #[error("writing PNG {path}: {source}")]
    WritePng {
        /// The file.
        path: PathBuf,
        /// What the `image` crate said.
        source: image::ImageError,
    },
}
