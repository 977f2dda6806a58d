//! The watched tree's walk: which files in it are boards to publish, leaving out files still
//! being written and the ingester's own `processed/` and `rejected/`. Pairing a board with its
//! template and labels, and DeepPCB's split lists, live in `pcb-datasets` (re-exported here
//! for the callers that know them by this path).

use std::path::{Path, PathBuf};

pub use pcb_datasets::pairing::{is_image_name, is_template, pair, template_of, LabelSource, Unit};
pub use pcb_datasets::{list_roots, PairError, SplitLists};

/// Suffixes of files still being written by copy tools and browsers.
const TEMP_SUFFIXES: [&str; 5] = [".tmp", ".part", ".partial", ".crdownload", ".filepart"];

/// Whether `name` is a file still being written or otherwise not meant for publishing: hidden
/// files (rsync and editors write `.name.XXXX`), `*.tmp`, `*.part`, `*.partial`,
/// `*.crdownload`, `*.filepart` and `name~`.
pub fn is_temp_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.starts_with('.')
        || name.ends_with('~')
        || TEMP_SUFFIXES.iter().any(|suffix| lower.ends_with(suffix))
}

/// Every publishable image under `root`, sorted: image files that are neither templates nor
/// temporary files, outside hidden folders and outside `exclude` (the ingester's own
/// `processed/` and `rejected/`; given absolute or relative to `root`). Folder symlinks are
/// not followed, so a link loop cannot hang the walk; symlinked files are listed. Names that
/// are not UTF-8 are listed too, so that [`pair`] can reject them visibly.
pub fn scan(root: &Path, exclude: &[PathBuf]) -> Vec<PathBuf> {
    let canonical_root = std::fs::canonicalize(root).ok();
    let mut excluded: Vec<PathBuf> = Vec::new();
    for dir in exclude {
        excluded.push(dir.clone());
        if dir.is_relative() {
            excluded.push(root.join(dir));
        }
        if let Ok(canonical) = std::fs::canonicalize(dir) {
            excluded.push(canonical);
        }
    }
    let is_excluded = |dir: &Path| {
        excluded.iter().any(|e| e == dir)
            || match (&canonical_root, dir.strip_prefix(root)) {
                (Some(canonical), Ok(rest)) => {
                    let alias = canonical.join(rest);
                    excluded.contains(&alias)
                }
                _ => false,
            }
    };

    let mut images = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read folder; skipped");
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read folder entry; skipped");
                    continue;
                }
            };
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Ok(file_type) = entry.file_type() else {
                tracing::warn!(path = %path.display(), "cannot stat; skipped");
                continue;
            };
            if file_type.is_dir() {
                if !name.starts_with('.') && !is_excluded(&path) {
                    pending.push(path);
                }
                continue;
            }
            // A symlink counts when it leads to a file; links to folders are never entered.
            let is_file = file_type.is_file() || (file_type.is_symlink() && path.is_file());
            if is_file && !is_temp_name(&name) && is_image_name(&name) && !is_template(&path) {
                images.push(path);
            }
        }
    }
    images.sort();
    images
}

/// A board whose labels came after it was published: its image (and template) in
/// `processed/`, and where to copy them back in the watched tree so that it is published
/// again, this time with the labels beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateLabels {
    /// The label file that came late.
    pub labels: PathBuf,
    /// (from, to): its template when it has one, then the image (last, so that the
    /// image, once there, finds everything it pairs with).
    pub copies: Vec<(PathBuf, PathBuf)>,
}

/// Label files (`.txt`, `.xml`, `.json`) under `root` that pair with no image there but
/// with an image already filed in `processed` (at the same place relative to the root): the
/// labels of a board published unlabelled. `checked` remembers the files looked at (by
/// modification time), so that other text files (split lists, notes) are looked at once;
/// files modified within `settle` wait. COCO files (many images each) are not matched.
pub fn late_labels(
    root: &Path,
    processed: &Path,
    exclude: &[PathBuf],
    checked: &mut std::collections::HashMap<PathBuf, std::time::SystemTime>,
    settle: std::time::Duration,
) -> Vec<LateLabels> {
    let is_label = |name: &str| {
        let lower = name.to_ascii_lowercase();
        [".txt", ".xml"].iter().any(|e| lower.ends_with(e)) && !is_temp_name(name)
    };
    let mut candidates = Vec::new();
    for path in walk(root, exclude) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !is_label(name) {
            continue;
        }
        let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
            continue;
        };
        if checked.get(&path) == Some(&modified)
            || modified.elapsed().map(|age| age < settle).unwrap_or(true)
        {
            continue;
        }
        checked.insert(path.clone(), modified);
        candidates.push(path);
    }
    checked.retain(|p, _| p.exists());
    if candidates.is_empty() || !processed.is_dir() {
        return Vec::new();
    }
    // Filed images by the stem their labels carry (`<id>` of DeepPCB's `<id>_test`).
    let mut by_stem: std::collections::HashMap<String, Vec<PathBuf>> = Default::default();
    for image in walk(processed, &[]) {
        let Some(name) = image.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !is_image_name(name) || is_template(&image) {
            continue;
        }
        let stem = name
            .rsplit_once('.')
            .map_or(name, |(s, _)| s)
            .to_ascii_lowercase();
        let key = stem.strip_suffix("_test").unwrap_or(&stem).to_string();
        by_stem.entry(key).or_default().push(image);
    }
    let mut found = Vec::new();
    for labels in candidates {
        let Some(stem) = labels.file_stem().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(filed) = by_stem.get(&stem.to_ascii_lowercase()) else {
            continue;
        };
        for image in filed {
            let Ok(rel) = image.strip_prefix(processed) else {
                continue;
            };
            let back = root.join(rel);
            if back.exists() {
                continue;
            }
            // Would the image, back in the watched tree, pair with these labels?
            let pairs = pair(&back, root).is_ok_and(|u| u.companions().contains(&labels));
            if !pairs {
                continue;
            }
            let mut copies = Vec::new();
            if let Some(t) = template_of(image) {
                if let Ok(trel) = t.strip_prefix(processed) {
                    copies.push((t.clone(), root.join(trel)));
                }
            }
            copies.push((image.clone(), back));
            found.push(LateLabels {
                labels: labels.clone(),
                copies,
            });
            break;
        }
    }
    found
}

/// Copies `from` to `to` the way an uploader would: a hidden temporary name beside `to`
/// (which the scan skips), then a rename, so the image never shows half-written.
pub fn copy_in(from: &Path, to: &Path) -> std::io::Result<()> {
    let dir = to.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = to.file_name().and_then(|n| n.to_str()).unwrap_or("board");
    let tmp = dir.join(format!(".{name}.pcb-late"));
    std::fs::copy(from, &tmp)?;
    std::fs::rename(&tmp, to)
}

/// Every file under `root` (not following folder links, skipping hidden folders and
/// `exclude`).
fn walk(root: &Path, exclude: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if ft.is_dir() {
                if !hidden && !exclude.iter().any(|e| *e == path || root.join(e) == path) {
                    pending.push(path);
                }
            } else if ft.is_file() {
                out.push(path);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Creates `rel` (and its folders) under `root` with some content.
    fn touch(root: &Path, rel: &str) -> PathBuf {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"x").unwrap();
        path
    }

    #[test]
    fn temp_names() {
        for name in [
            ".a.jpg.x1y2",
            "a.jpg.tmp",
            "a.JPG.PART",
            "a.partial",
            "a.jpg.crdownload",
            "a.jpg~",
        ] {
            assert!(is_temp_name(name), "{name}");
        }
        for name in ["a.jpg", "part.jpg", "tmp.png"] {
            assert!(!is_temp_name(name), "{name}");
        }
    }

    #[test]
    fn a_non_utf8_name_is_listed_for_pair_to_reject() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let image = root.join(std::ffi::OsStr::from_bytes(b"bad\xff.jpg"));
        fs::write(&image, b"x").unwrap();
        // The walk lists it so that the caller can reject it rather than ignore it forever.
        assert_eq!(scan(root, &[]), vec![image.clone()]);
        assert!(matches!(
            pair(&image, root),
            Err(PairError::NonUtf8Name { .. })
        ));
    }

    #[test]
    fn scan_skips_excluded_hidden_temp_and_templates() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let a = touch(root, "line1/a.jpg");
        let b = touch(root, "b.PNG");
        let test = touch(root, "g/1/1000_test.jpg");
        touch(root, "g/1/1000_temp.jpg");
        touch(root, "g/1_not/1000.txt");
        touch(root, "processed/old.jpg");
        touch(root, "rejected/bad.jpg");
        touch(root, ".cache/hidden.jpg");
        touch(root, ".c.jpg.Xy12");
        touch(root, "line1/c.jpg.part");
        touch(root, "line1/d.jpg.tmp");
        touch(root, "line1/notes.txt");
        let found = scan(root, &[root.join("processed"), PathBuf::from("rejected")]);
        assert_eq!(found, {
            let mut v = vec![a, b, test];
            v.sort();
            v
        });
    }

    #[test]
    fn scan_does_not_follow_folder_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let a = touch(root, "x/a.jpg");
        std::os::unix::fs::symlink(root, root.join("x/loop")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = touch(outside.path(), "t.jpg");
        std::os::unix::fs::symlink(&target, root.join("link.jpg")).unwrap();
        assert_eq!(scan(root, &[]), vec![root.join("link.jpg"), a]);
    }

    #[test]
    fn scan_of_a_missing_root_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(scan(&dir.path().join("nope"), &[]).is_empty());
    }
}
