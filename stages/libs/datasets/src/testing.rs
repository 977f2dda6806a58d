//! Builders the unit tests of every format share: paths, boxes and files in a scratch tree.

use std::path::{Path, PathBuf};

use pcb_schemas::BoxLabel;

/// A path from a string.
pub(crate) fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// A box with its class.
pub(crate) fn bx(x1: f32, y1: f32, x2: f32, y2: f32, class_id: u16, class: &str) -> BoxLabel {
    crate::labelled([x1, y1, x2, y2], (class_id, class.to_string()))
}

/// Creates `rel` (and its folders) under `root` with some content.
pub(crate) fn touch(root: &Path, rel: &str) -> PathBuf {
    put(root, rel, "x")
}

/// Writes `text` to `rel` under `root`, creating its folders.
pub(crate) fn put(root: &Path, rel: &str, text: &str) -> PathBuf {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}
