//! Builders the unit tests of every format share: paths, boxes and files in a scratch tree.

use std::path::{Path, PathBuf};

use pcb_schemas::BoxLabel;
use tempfile::TempDir;

use crate::error::LabelError;

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

/// A scratch folder holding `files`, each `(path relative to the folder, text)`, with their
/// full paths in the same order; the folder goes when the returned guard drops.
pub(crate) fn scratch<const N: usize>(files: [(&str, &str); N]) -> (TempDir, [PathBuf; N]) {
    let dir = tempfile::tempdir().unwrap();
    let paths = files.map(|(rel, text)| put(dir.path(), rel, text));
    (dir, paths)
}

/// [`scratch`] with some content in each file, for tests that care only that files exist.
pub(crate) fn touched<const N: usize>(rels: [&str; N]) -> (TempDir, [PathBuf; N]) {
    scratch(rels.map(|rel| (rel, "x")))
}

/// Asserts that `err` is a syntax error at line `line`.
pub(crate) fn assert_syntax_at(err: &LabelError, line: usize) {
    assert!(
        matches!(err, LabelError::Syntax { line: Some(at), .. } if *at == line),
        "{err:?}"
    );
}
