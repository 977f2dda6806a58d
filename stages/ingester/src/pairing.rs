//! Which files in the watched tree make up one board: the image, its defect-free template, its
//! label source, and the dataset split DeepPCB's own lists give it.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use pcb_schemas::Split;

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

/// Extensions of the image files the ingester publishes.
const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "bmp", "tif", "tiff"];

/// Suffixes of files still being written by copy tools and browsers.
const TEMP_SUFFIXES: [&str; 5] = [".tmp", ".part", ".partial", ".crdownload", ".filepart"];

/// YOLO class lists, in the order they are preferred within one folder.
const CLASS_LIST_NAMES: [&str; 3] = ["classes.txt", "obj.names", "classes.names"];

/// COCO files, in the order they are preferred within one folder.
const COCO_NAMES: [&str; 4] = [
    "annotations.json",
    "_annotations.coco.json",
    "instances.json",
    "coco.json",
];

/// Whether `name` has an image extension (jpg, jpeg, png, bmp, tif, tiff; any case).
pub fn is_image_name(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => IMAGE_EXTENSIONS
            .iter()
            .any(|known| ext.eq_ignore_ascii_case(known)),
        _ => false,
    }
}

/// Whether `name` is a file still being written or otherwise not meant for publishing: hidden
/// files (rsync and editors write `.name.XXXX`), `*.tmp`, `*.part`, `*.partial`,
/// `*.crdownload`, `*.filepart` and `name~`.
pub fn is_temp_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.starts_with('.')
        || name.ends_with('~')
        || TEMP_SUFFIXES.iter().any(|suffix| lower.ends_with(suffix))
}

/// The part of `stem` before a case-insensitive `suffix`, when there is a non-empty one.
fn strip_suffix_ci<'a>(stem: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = stem.len().checked_sub(suffix.len())?;
    let (head, tail) = (stem.get(..cut)?, stem.get(cut..)?);
    (!head.is_empty() && tail.eq_ignore_ascii_case(suffix)).then_some(head)
}

/// Whether `path` is a defect-free template image (`<id>_temp.<ext>`, or `<id>_template.<ext>`)
/// that travels with its board rather than being a board of its own.
pub fn is_template(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if !is_image_name(name) {
        return false;
    }
    let stem = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
    strip_suffix_ci(stem, "_temp").is_some() || strip_suffix_ci(stem, "_template").is_some()
}

/// Where a board's defect labels come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelSource {
    /// No labels found: the board is unlabelled.
    None,
    /// A DeepPCB `x1 y1 x2 y2 type` file.
    DeepPcb(PathBuf),
    /// A Pascal VOC XML file.
    Voc(PathBuf),
    /// A YOLO file, with the class list that names its indices when one was found.
    Yolo {
        /// The board's own `.txt`.
        file: PathBuf,
        /// `classes.txt`/`obj.names`/`classes.names` beside the image or above it.
        classes_file: Option<PathBuf>,
    },
    /// A COCO JSON file shared by many images; look the image up by file name.
    Coco(PathBuf),
}

impl LabelSource {
    /// The format name carried in `RawImage::label_format` (`deeppcb`, `voc`, `yolo`, `coco`);
    /// `None` when unlabelled.
    pub fn format(&self) -> Option<&'static str> {
        match self {
            LabelSource::None => None,
            LabelSource::DeepPcb(_) => Some("deeppcb"),
            LabelSource::Voc(_) => Some("voc"),
            LabelSource::Yolo { .. } => Some("yolo"),
            LabelSource::Coco(_) => Some("coco"),
        }
    }
}

/// One board as found in the watched tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The board image.
    pub image: PathBuf,
    /// The defect-free template beside it, if any.
    pub template: Option<PathBuf>,
    /// Where its labels come from.
    pub labels: LabelSource,
    /// Board identifier: DeepPCB's `<id>`, otherwise the file stem.
    pub board_id: String,
    /// The image path relative to the watched root, `/`-separated.
    pub rel: String,
}

impl Unit {
    /// Files that belong to this board alone and so move with it to `processed/` or
    /// `rejected/`: the template and a per-image label file. Shared files (a COCO JSON, a YOLO
    /// class list) stay, since other boards still need them.
    pub fn companions(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.template.iter().cloned().collect();
        match &self.labels {
            LabelSource::DeepPcb(file)
            | LabelSource::Voc(file)
            | LabelSource::Yolo { file, .. } => {
                files.push(file.clone());
            }
            LabelSource::None | LabelSource::Coco(_) => {}
        }
        files
    }
}

/// `path` relative to `root`, `/`-separated.
fn relative(path: &Path, root: &Path) -> Result<String, PairError> {
    let rest = path
        .strip_prefix(root)
        .map_err(|_| PairError::OutsideRoot {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
        })?;
    let mut parts = Vec::new();
    for component in rest.components() {
        match component {
            Component::Normal(part) => {
                parts.push(part.to_str().ok_or_else(|| PairError::NonUtf8Name {
                    path: path.to_path_buf(),
                })?)
            }
            Component::CurDir => {}
            // `..` or a second root would make the path escape the root after all.
            _ => {
                return Err(PairError::OutsideRoot {
                    path: path.to_path_buf(),
                    root: root.to_path_buf(),
                })
            }
        }
    }
    Ok(parts.join("/"))
}

/// The first existing file among `names`, looking in `dir` and then each folder above it up to
/// and including `root`, the nearest folder winning.
fn find_upwards(dir: &Path, root: &Path, names: &[&str]) -> Option<PathBuf> {
    let mut current = Some(dir);
    while let Some(folder) = current {
        if let Some(found) = names.iter().map(|n| folder.join(n)).find(|p| p.is_file()) {
            return Some(found);
        }
        if folder == root || !folder.starts_with(root) {
            break;
        }
        current = folder.parent();
    }
    None
}

/// The first of `candidates` that exists as a file.
fn first_file(candidates: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    candidates.into_iter().find(|p| p.is_file())
}

/// `dir` with its last folder named `from` (below `root`) replaced by `to`, for the layouts
/// that keep labels in a sibling tree (`images/…` ↔ `labels/…`, `JPEGImages` ↔ `Annotations`).
fn sibling_tree(dir: &Path, root: &Path, from: &str, to: &str) -> Option<PathBuf> {
    let rest = dir.strip_prefix(root).ok()?;
    let parts: Vec<_> = rest.components().collect();
    let at = parts
        .iter()
        .rposition(|c| c.as_os_str() == std::ffi::OsStr::new(from))?;
    let mut out = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        out.push(if i == at {
            std::ffi::OsStr::new(to)
        } else {
            part.as_os_str()
        });
    }
    Some(out)
}

/// Pairs `image` (a file under the watched `root`) with its template and labels. Rules, the
/// first that matches winning:
///
/// * DeepPCB, `<id>_test.<ext>`: board `<id>`, template `<id>_temp.<ext>` beside, labels
///   `<dir>/../<dirname>_not/<id>.txt` or `<dir>/<id>.txt` (DeepPCB format). When neither
///   exists the generic label rules below still apply, so that a YOLO image that happens to
///   be named `x_test.jpg` keeps its labels.
/// * Otherwise board = file stem; template `<stem>_temp.<ext>` or `<stem>_template.<ext>`
///   beside; labels `<stem>.xml` beside (VOC), `<stem>.txt` beside (YOLO, with the nearest
///   class list at or above the image), the same in a sibling `Annotations/` (for
///   `JPEGImages/`) or `labels/` (for `images/`) tree, then the nearest COCO file at or above
///   the image; else unlabelled.
///
/// Nothing above `root` is looked at.
pub fn pair(image: &Path, root: &Path) -> Result<Unit, PairError> {
    let name = image
        .file_name()
        .ok_or_else(|| PairError::OutsideRoot {
            path: image.to_path_buf(),
            root: root.to_path_buf(),
        })?
        .to_str()
        .ok_or_else(|| PairError::NonUtf8Name {
            path: image.to_path_buf(),
        })?;
    let rel = relative(image, root)?;
    let dir = image.parent().unwrap_or(root);
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, Some(ext)),
        _ => (name, None),
    };
    let with_ext = |base: &str| match ext {
        Some(ext) => format!("{base}.{ext}"),
        None => base.to_string(),
    };

    if let Some(id) = strip_suffix_ci(stem, "_test") {
        let template = first_file([
            dir.join(with_ext(&format!("{id}_temp"))),
            dir.join(with_ext(&format!("{id}_template"))),
        ]);
        // `group00041/00041/` keeps its labels in `group00041/00041_not/`, which must still be
        // inside the watched tree.
        let not_dir = match (dir.parent(), dir.file_name().and_then(|n| n.to_str())) {
            (Some(parent), Some(dir_name)) if dir != root && parent.starts_with(root) => {
                Some(parent.join(format!("{dir_name}_not")))
            }
            _ => None,
        };
        let deeppcb_labels = first_file(
            not_dir
                .map(|d| d.join(format!("{id}.txt")))
                .into_iter()
                .chain([dir.join(format!("{id}.txt"))]),
        );
        let labels = match deeppcb_labels {
            Some(file) => LabelSource::DeepPcb(file),
            None => generic_labels(dir, root, stem),
        };
        return Ok(Unit {
            image: image.to_path_buf(),
            template,
            labels,
            board_id: id.to_string(),
            rel,
        });
    }

    let template = first_file([
        dir.join(with_ext(&format!("{stem}_temp"))),
        dir.join(with_ext(&format!("{stem}_template"))),
    ]);
    Ok(Unit {
        image: image.to_path_buf(),
        template,
        labels: generic_labels(dir, root, stem),
        board_id: stem.to_string(),
        rel,
    })
}

/// The VOC / YOLO / COCO label rules shared by every image.
fn generic_labels(dir: &Path, root: &Path, stem: &str) -> LabelSource {
    let voc_dirs = std::iter::once(dir.to_path_buf()).chain(sibling_tree(
        dir,
        root,
        "JPEGImages",
        "Annotations",
    ));
    if let Some(file) = first_file(voc_dirs.map(|d| d.join(format!("{stem}.xml")))) {
        return LabelSource::Voc(file);
    }
    let yolo_dirs =
        std::iter::once(dir.to_path_buf()).chain(sibling_tree(dir, root, "images", "labels"));
    if let Some(file) = first_file(yolo_dirs.map(|d| d.join(format!("{stem}.txt")))) {
        // The class list may sit beside the labels (sibling tree) or above the image.
        let label_dir = file.parent().unwrap_or(dir);
        let classes_file = find_upwards(label_dir, root, &CLASS_LIST_NAMES)
            .or_else(|| find_upwards(dir, root, &CLASS_LIST_NAMES));
        return LabelSource::Yolo { file, classes_file };
    }
    match find_upwards(dir, root, &COCO_NAMES) {
        Some(file) => LabelSource::Coco(file),
        None => LabelSource::None,
    }
}

/// Normalises a DeepPCB list entry or an image path to `groupN/N/<id>`: `/` separators, no
/// leading `./`, no extension, no `_test` suffix (the lists name `<id>.jpg` for the file
/// that is really `<id>_test.jpg`).
fn list_key(path: &str) -> String {
    let path = path.trim().replace('\\', "/");
    let path = path.trim_start_matches("./");
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, path),
    };
    let stem = match name.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem,
        _ => name,
    };
    let id = strip_suffix_ci(stem, "_test").unwrap_or(stem);
    match dir {
        Some(dir) => format!("{dir}/{id}"),
        None => id.to_string(),
    }
}

/// DeepPCB's own train/val assignment, from `trainval.txt` (train) and `test.txt` / `val.txt`
/// (val) in one or more dataset roots inside the watched tree.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SplitLists {
    /// Per dataset root: its path relative to the watched root (`""` or `"a/b/"`) and the
    /// split of each `groupN/N/<id>` key.
    lists: Vec<(String, HashMap<String, Split>)>,
}

impl SplitLists {
    /// Loads the lists of the dataset at `root`; image paths given to
    /// [`split_of`](Self::split_of) are then relative to `root`. `trainval.txt` must exist;
    /// `test.txt` and `val.txt` are read when present and win over `trainval.txt` for a board
    /// listed in both, since a held-out board must never leak into training.
    pub fn load(root: &Path) -> Result<SplitLists, PairError> {
        let map = load_lists(root)?;
        Ok(SplitLists {
            lists: vec![(String::new(), map)],
        })
    }

    /// Loads every dataset found by [`list_roots`] under the watched `root`, so that
    /// [`split_of`](Self::split_of) takes paths relative to the watched root. No list at all
    /// gives empty lists, not an error: most watched trees are not DeepPCB.
    pub fn load_all(root: &Path) -> Result<SplitLists, PairError> {
        let mut lists = Vec::new();
        for dataset in list_roots(root) {
            let prefix = match relative(&dataset, root)? {
                rel if rel.is_empty() => rel,
                rel => format!("{rel}/"),
            };
            lists.push((prefix, load_lists(&dataset)?));
        }
        Ok(SplitLists { lists })
    }

    /// The split the lists give the image at `rel` (e.g.
    /// `group00041/00041/00041000_test.jpg`, or `PCBData/group00041/…` when the dataset is a
    /// folder of the watched root); `None` when no list names it.
    pub fn split_of(&self, rel: &str) -> Option<Split> {
        let rel = rel.replace('\\', "/");
        self.lists.iter().find_map(|(prefix, map)| {
            let rest = rel.strip_prefix(prefix.as_str())?;
            map.get(&list_key(rest)).copied()
        })
    }

    /// Number of boards the lists assign.
    pub fn len(&self) -> usize {
        self.lists.iter().map(|(_, map)| map.len()).sum()
    }

    /// Whether no list assigns any board.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn load_lists(root: &Path) -> Result<HashMap<String, Split>, PairError> {
    let mut map = HashMap::new();
    for (name, split, required) in [
        ("trainval.txt", Split::Train, true),
        ("test.txt", Split::Val, false),
        ("val.txt", Split::Val, false),
    ] {
        let path = root.join(name);
        if !required && !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|source| PairError::ReadList {
            path: path.clone(),
            source,
        })?;
        // The lists are ASCII in practice; a stray byte should cost one line, not the list.
        for line in String::from_utf8_lossy(&bytes).lines() {
            if let Some(image) = line.split_whitespace().next() {
                map.insert(list_key(image), split);
            }
        }
    }
    Ok(map)
}

/// Dataset roots inside the watched `root`: `root` itself and folders up to two levels below
/// it that hold a `trainval.txt`, sorted. Hidden folders and symlinks are not entered.
pub fn list_roots(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut level = vec![root.to_path_buf()];
    for depth in 0..=2 {
        let mut next = Vec::new();
        for dir in &level {
            if dir.join("trainval.txt").is_file() {
                found.push(dir.clone());
            }
            if depth < 2 {
                next.extend(subdirs(dir));
            }
        }
        level = next;
    }
    found.sort();
    found
}

/// Real (non-symlink), non-hidden folders directly in `dir`; unreadable ones are skipped.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect()
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
    fn image_and_temp_names() {
        for name in [
            "a.jpg", "a.JPEG", "b.png", "c.Bmp", "d.tif", "e.TIFF", "x.y.jpg",
        ] {
            assert!(is_image_name(name), "{name}");
        }
        for name in ["a.txt", "jpg", ".jpg", "a.jpg.part", "a.gif", "a."] {
            assert!(!is_image_name(name), "{name}");
        }
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
    fn templates_are_recognised() {
        assert!(is_template(Path::new("g/00041000_temp.jpg")));
        assert!(is_template(Path::new("board_template.PNG")));
        assert!(is_template(Path::new("board_TEMP.png")));
        assert!(!is_template(Path::new("00041000_test.jpg")));
        assert!(!is_template(Path::new("_temp.jpg")));
        assert!(!is_template(Path::new("a_temp.txt")));
        assert!(!is_template(Path::new("temperature.jpg")));
    }

    #[test]
    fn deeppcb_layout_pairs_template_and_not_folder_labels() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let image = touch(root, "PCBData/group00041/00041/00041000_test.jpg");
        let template = touch(root, "PCBData/group00041/00041/00041000_temp.jpg");
        let labels = touch(root, "PCBData/group00041/00041_not/00041000.txt");
        let unit = pair(&image, root).unwrap();
        assert_eq!(
            unit,
            Unit {
                image: image.clone(),
                template: Some(template.clone()),
                labels: LabelSource::DeepPcb(labels.clone()),
                board_id: "00041000".into(),
                rel: "PCBData/group00041/00041/00041000_test.jpg".into(),
            }
        );
        assert_eq!(unit.labels.format(), Some("deeppcb"));
        assert_eq!(unit.companions(), vec![template, labels]);
    }

    #[test]
    fn deeppcb_labels_beside_the_image_and_missing_parts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let image = touch(root, "12_test.png");
        let labels = touch(root, "12.txt");
        let unit = pair(&image, root).unwrap();
        assert_eq!(unit.board_id, "12");
        assert_eq!(unit.template, None);
        assert_eq!(unit.labels, LabelSource::DeepPcb(labels));
        assert_eq!(unit.rel, "12_test.png");

        let lone = touch(root, "sub/13_test.jpg");
        let unit = pair(&lone, root).unwrap();
        assert_eq!(unit.board_id, "13");
        assert_eq!(unit.labels, LabelSource::None);
        assert!(unit.companions().is_empty());
    }

    #[test]
    fn deeppcb_not_folder_outside_the_root_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("00041");
        let image = touch(&root, "00041000_test.jpg");
        touch(dir.path(), "00041_not/00041000.txt");
        assert_eq!(pair(&image, &root).unwrap().labels, LabelSource::None);
    }

    #[test]
    fn voc_beside_the_image_with_template() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let image = touch(root, "line1/board7.png");
        let xml = touch(root, "line1/board7.xml");
        let template = touch(root, "line1/board7_template.png");
        touch(root, "annotations.json");
        let unit = pair(&image, root).unwrap();
        assert_eq!(unit.board_id, "board7");
        assert_eq!(unit.rel, "line1/board7.png");
        assert_eq!(unit.labels, LabelSource::Voc(xml.clone()));
        assert_eq!(unit.template, Some(template.clone()));
        assert_eq!(unit.companions(), vec![template, xml]);
    }

    #[test]
    fn yolo_with_class_list_in_a_parent() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let image = touch(root, "ds/train/b1.jpg");
        let txt = touch(root, "ds/train/b1.txt");
        let names = touch(root, "ds/obj.names");
        touch(root, "classes.txt");
        let unit = pair(&image, root).unwrap();
        assert_eq!(
            unit.labels,
            LabelSource::Yolo {
                file: txt.clone(),
                classes_file: Some(names)
            }
        );
        // The shared class list stays behind for the other boards.
        assert_eq!(unit.companions(), vec![txt]);

        let other = touch(root, "other/b2.jpg");
        touch(root, "other/b2.txt");
        let unit = pair(&other, root).unwrap();
        assert!(matches!(
            unit.labels,
            LabelSource::Yolo { classes_file: Some(ref c), .. } if c == &root.join("classes.txt")
        ));
    }

    #[test]
    fn yolo_without_class_list_and_sibling_labels_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("watched");
        let image = touch(&root, "b.jpg");
        let txt = touch(&root, "b.txt");
        // A class list above the watched root is not the tree's business.
        touch(dir.path(), "classes.txt");
        let unit = pair(&image, &root).unwrap();
        assert_eq!(
            unit.labels,
            LabelSource::Yolo {
                file: txt,
                classes_file: None
            }
        );

        let image = touch(&root, "set/images/train/c.jpg");
        let txt = touch(&root, "set/labels/train/c.txt");
        let names = touch(&root, "set/labels/classes.txt");
        let unit = pair(&image, &root).unwrap();
        assert_eq!(
            unit.labels,
            LabelSource::Yolo {
                file: txt,
                classes_file: Some(names)
            }
        );
    }

    #[test]
    fn voc_sibling_annotations_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let image = touch(root, "VOC/JPEGImages/000001.jpg");
        let xml = touch(root, "VOC/Annotations/000001.xml");
        assert_eq!(pair(&image, root).unwrap().labels, LabelSource::Voc(xml));
    }

    #[test]
    fn coco_json_in_a_parent_is_shared() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let image = touch(root, "export/train/x.jpg");
        let json = touch(root, "export/_annotations.coco.json");
        touch(root, "coco.json");
        let unit = pair(&image, root).unwrap();
        assert_eq!(unit.labels, LabelSource::Coco(json));
        assert_eq!(unit.labels.format(), Some("coco"));
        assert!(unit.companions().is_empty());

        let bare = touch(&root.join("elsewhere"), "y.bmp");
        let unit = pair(&bare, &root.join("elsewhere")).unwrap();
        assert_eq!(unit.labels, LabelSource::None);
        assert_eq!(unit.labels.format(), None);
    }

    #[test]
    fn test_named_image_without_deeppcb_labels_uses_generic_rules() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let image = touch(root, "unit_test.jpg");
        let xml = touch(root, "unit_test.xml");
        let unit = pair(&image, root).unwrap();
        assert_eq!(unit.board_id, "unit");
        assert_eq!(unit.labels, LabelSource::Voc(xml));
    }

    #[test]
    fn non_utf8_name_is_an_error() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let image = root.join(std::ffi::OsStr::from_bytes(b"bad\xff.jpg"));
        fs::write(&image, b"x").unwrap();
        let err = pair(&image, root).unwrap_err();
        assert!(matches!(err, PairError::NonUtf8Name { ref path } if path == &image));
        assert!(
            err.to_string()
                .starts_with("file name is not valid UTF-8: ")
                && err.to_string().contains("bad\u{fffd}.jpg"),
            "{err}"
        );
        // The walk lists it so that the caller can reject it rather than ignore it forever.
        assert_eq!(scan(root, &[]), vec![image]);

        let bad_dir = root.join(std::ffi::OsStr::from_bytes(b"d\xfe"));
        let nested = touch(&bad_dir, "ok.jpg");
        assert!(matches!(
            pair(&nested, root),
            Err(PairError::NonUtf8Name { .. })
        ));
    }

    #[test]
    fn outside_root_is_an_error() {
        let err = pair(Path::new("/elsewhere/a.jpg"), Path::new("/watched")).unwrap_err();
        assert!(matches!(err, PairError::OutsideRoot { .. }), "{err:?}");
    }

    #[test]
    fn split_lists_at_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(
            root.join("trainval.txt"),
            "group00041/00041/00041000.jpg group00041/00041_not/00041000.txt\n\
             group00041/00041/00041001.jpg group00041/00041_not/00041001.txt\n\n",
        )
        .unwrap();
        fs::write(
            root.join("test.txt"),
            "group12000/12000/12000001.jpg group12000/12000_not/12000001.txt\r\n\
             group00041/00041/00041001.jpg group00041/00041_not/00041001.txt\n",
        )
        .unwrap();
        let lists = SplitLists::load(root).unwrap();
        assert_eq!(lists.len(), 3);
        assert_eq!(
            lists.split_of("group00041/00041/00041000_test.jpg"),
            Some(Split::Train)
        );
        assert_eq!(
            lists.split_of("group12000/12000/12000001_test.jpg"),
            Some(Split::Val)
        );
        // Listed in both: the held-out list wins.
        assert_eq!(
            lists.split_of("group00041/00041/00041001_test.jpg"),
            Some(Split::Val)
        );
        assert_eq!(lists.split_of("group00041/00041/00041002_test.jpg"), None);
        assert_eq!(lists.split_of("00041000_test.jpg"), None);
    }

    #[test]
    fn split_lists_in_a_subfolder_of_the_watched_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(root, "DeepPCB/PCBData/group1/1/1000_test.jpg");
        fs::write(
            root.join("DeepPCB/PCBData/trainval.txt"),
            "group1/1/1000.jpg group1/1_not/1000.txt\n",
        )
        .unwrap();
        fs::write(
            root.join("DeepPCB/PCBData/val.txt"),
            "group1/1/1001.jpg group1/1_not/1001.txt\n",
        )
        .unwrap();
        // Too deep to be a dataset root of this tree.
        touch(root, "a/b/c/trainval.txt");
        assert_eq!(list_roots(root), vec![root.join("DeepPCB/PCBData")]);
        let lists = SplitLists::load_all(root).unwrap();
        assert_eq!(
            lists.split_of("DeepPCB/PCBData/group1/1/1000_test.jpg"),
            Some(Split::Train)
        );
        assert_eq!(
            lists.split_of("DeepPCB/PCBData/group1/1/1001_test.jpg"),
            Some(Split::Val)
        );
        assert_eq!(lists.split_of("group1/1/1000_test.jpg"), None);
    }

    #[test]
    fn split_lists_missing_are_empty_or_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let lists = SplitLists::load_all(dir.path()).unwrap();
        assert!(lists.is_empty());
        assert_eq!(lists.split_of("a/b.jpg"), None);
        let err = SplitLists::load(dir.path()).unwrap_err();
        assert!(matches!(err, PairError::ReadList { .. }), "{err:?}");
        assert!(err.to_string().contains("trainval.txt"), "{err}");
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
