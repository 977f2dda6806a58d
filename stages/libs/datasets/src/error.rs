//! Why a dataset file could not be read, parsed or paired, in one place so that the ingester
//! (which turns these into dead letters) and training (which stops with them) report the
//! same problem in the same words: the file, and the line when there is one.

use std::path::PathBuf;

/// Why a label file (or a DeepPCB list) could not be turned into boxes.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    /// Reading the label file from disk failed.
    #[error("cannot read label file {}: {source}", path.display())]
    Read {
        /// The label file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text does not parse as the format it claims to be.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Syntax {
        /// The label file.
        path: PathBuf,
        /// 1-based line of the problem, when it can be pinned to one.
        line: Option<usize>,
        /// What was wrong, in words.
        message: String,
    },
    /// YOLO boxes carry only class indices; without the class list they mean nothing.
    #[error(
        "{}: YOLO labels need a class list (classes.txt, obj.names or classes.names) beside \
         the image or in a folder above it",
        path.display()
    )]
    MissingClassList {
        /// The YOLO label file.
        path: PathBuf,
    },
    /// YOLO boxes are normalised to the image size, which could not be read.
    #[error("{}: cannot convert YOLO boxes to pixels, the image size is unknown", path.display())]
    NoImageSize {
        /// The YOLO label file.
        path: PathBuf,
    },
}

/// Why a file could not be paired or a split list not loaded.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The image's name (or a folder on its way from the root) is not UTF-8, so it cannot be
    /// carried in the UTF-8 `source` field of a record.
    #[error("file name is not valid UTF-8: {}", path.to_string_lossy())]
    NonUtf8Name {
        /// The offending path.
        path: PathBuf,
    },
    /// The image is not under the watched root, so it has no relative path.
    #[error("{} is not under the watched directory {}", path.display(), root.display())]
    OutsideRoot {
        /// The image.
        path: PathBuf,
        /// The watched root.
        root: PathBuf,
    },
    /// Reading a DeepPCB split list failed.
    #[error("cannot read split list {}: {source}", path.display())]
    ReadList {
        /// The list file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Either kind of problem, for the calls that read a list and then the label files it names.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A label file, or a line of the list itself.
    #[error(transparent)]
    Labels(#[from] LabelError),
    /// The list file could not be read.
    #[error(transparent)]
    Pairing(#[from] PairError),
}
