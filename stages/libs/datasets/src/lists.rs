//! DeepPCB's list files (`trainval.txt`, `test.txt`, `val.txt` at the dataset root, one
//! `groupN/N/<id>.jpg groupN/N_not/<id>.txt` line per board): read once here both for the
//! split the ingester gives a board and for the boards `pcb train` and `pcb eval` load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pcb_schemas::{BoxLabel, Split};

use crate::classes::ClassMap;
use crate::deeppcb::read_deeppcb;
use crate::error::{DatasetError, PairError};
use crate::pairing::{relative, split_ext, strip_suffix_ci, template_of};
use crate::text::{strip_bom, syntax};

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
    let (stem, _) = split_ext(name);
    let id = strip_suffix_ci(stem, "_test").unwrap_or(stem);
    match dir {
        Some(dir) => format!("{dir}/{id}"),
        None => id.to_string(),
    }
}

/// One line of a DeepPCB list file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// 1-based line in the list file.
    pub line: usize,
    /// The board image as listed, relative to the dataset root
    /// (`group00041/00041/00041000.jpg`, naming the file `00041000_test.jpg`).
    pub image: String,
    /// The label file as listed, relative to the dataset root
    /// (`group00041/00041_not/00041000.txt`); `None` when the line names only the image.
    pub labels: Option<String>,
}

impl ListEntry {
    /// The board's key, `groupN/N/<id>`, by which [`SplitLists`] matches image paths.
    pub fn key(&self) -> String {
        list_key(&self.image)
    }

    /// The board id, `<id>`.
    pub fn board_id(&self) -> String {
        let key = self.key();
        key.rsplit('/').next().unwrap_or(&key).to_string()
    }

    /// The board image under the dataset `root`: `<id>_test.<ext>` beside where the list's
    /// `<id>.<ext>` points (`jpg` when the entry has no extension).
    pub fn image_path(&self, root: &Path) -> PathBuf {
        let name = self.image.rsplit(['/', '\\']).next().unwrap_or(&self.image);
        let ext = split_ext(name.trim()).1.unwrap_or("jpg");
        root.join(format!("{}_test.{ext}", self.key()))
    }
}

/// Parses the text of a list file: one entry per line that names at least an image (the
/// first field; the second is the label file; more fields are ignored), blank lines skipped
/// and a byte-order mark dropped.
pub fn parse_list(text: &str) -> Vec<ListEntry> {
    strip_bom(text)
        .lines()
        .enumerate()
        .filter_map(|(index, line)| {
            let mut fields = line.split_whitespace();
            let image = fields.next()?.to_string();
            Some(ListEntry {
                line: index + 1,
                image,
                labels: fields.next().map(str::to_string),
            })
        })
        .collect()
}

/// Reads and parses the list file at `path`. The lists are ASCII in practice; a stray byte
/// that is not UTF-8 should cost one line, not the list.
pub fn read_list_file(path: &Path) -> Result<Vec<ListEntry>, PairError> {
    let bytes = std::fs::read(path).map_err(|source| PairError::ReadList {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_list(&String::from_utf8_lossy(&bytes)))
}

/// A board a list names, with its files found under the dataset root and its labels read.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedBoard {
    /// The image as the list names it, for reports.
    pub name: String,
    /// The board image, `<id>_test.<ext>` ([`ListEntry::image_path`]).
    pub image: PathBuf,
    /// Its template, when one exists ([`template_of`]).
    pub template: Option<PathBuf>,
    /// The label file the list names.
    pub labels: PathBuf,
    /// The boxes of that file, parsed as the ingester parses them.
    pub boxes: Vec<BoxLabel>,
}

/// The boards of the list file `list` of the dataset at `root`, their DeepPCB label files
/// parsed with `classes`. A line without a label file is an error (naming the list and the
/// line), as is a label file that cannot be read or parsed; the images are not opened.
pub fn read_list(
    root: &Path,
    list: &Path,
    classes: &ClassMap,
) -> Result<Vec<ListedBoard>, DatasetError> {
    let mut boards = Vec::new();
    for entry in read_list_file(list)? {
        let Some(labels) = &entry.labels else {
            let message = format!(
                "expected \"<image> <labels>\", found only the image \"{}\"",
                entry.image
            );
            return Err(syntax(list, Some(entry.line), message).into());
        };
        let labels = root.join(labels);
        let image = entry.image_path(root);
        boards.push(ListedBoard {
            boxes: read_deeppcb(&labels, classes)?,
            template: template_of(&image),
            name: entry.image,
            image,
            labels,
        });
    }
    Ok(boards)
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
        for entry in read_list_file(&path)? {
            map.insert(entry.key(), split);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::LabelError;
    use crate::testing::{bx, put, scratch};

    #[test]
    fn split_lists_at_the_root() {
        let (dir, _) = scratch([
            (
                "trainval.txt",
                "group00041/00041/00041000.jpg group00041/00041_not/00041000.txt\n\
                 group00041/00041/00041001.jpg group00041/00041_not/00041001.txt\n\n",
            ),
            (
                "test.txt",
                "group12000/12000/12000001.jpg group12000/12000_not/12000001.txt\r\n\
                 group00041/00041/00041001.jpg group00041/00041_not/00041001.txt\n",
            ),
        ]);
        let lists = SplitLists::load(dir.path()).unwrap();
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
        let (dir, _) = scratch([
            ("DeepPCB/PCBData/group1/1/1000_test.jpg", "x"),
            (
                "DeepPCB/PCBData/trainval.txt",
                "group1/1/1000.jpg group1/1_not/1000.txt\n",
            ),
            (
                "DeepPCB/PCBData/val.txt",
                "group1/1/1001.jpg group1/1_not/1001.txt\n",
            ),
            // Too deep to be a dataset root of this tree.
            ("a/b/c/trainval.txt", "x"),
        ]);
        let root = dir.path();
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
    fn list_lines_bom_blanks_and_short_lines() {
        let text = "\u{feff}group1/1/1000.jpg group1/1_not/1000.txt\r\n\n  \n\
                    .\\g2\\2\\2000_test.png g2/2_not/2000.txt extra\n\
                    g3/3/3000\n";
        let entries = parse_list(text);
        assert_eq!(
            entries,
            vec![
                ListEntry {
                    line: 1,
                    image: "group1/1/1000.jpg".into(),
                    labels: Some("group1/1_not/1000.txt".into()),
                },
                ListEntry {
                    line: 4,
                    image: ".\\g2\\2\\2000_test.png".into(),
                    labels: Some("g2/2_not/2000.txt".into()),
                },
                ListEntry {
                    line: 5,
                    image: "g3/3/3000".into(),
                    labels: None,
                },
            ]
        );
        assert_eq!(entries[0].key(), "group1/1/1000");
        assert_eq!(entries[0].board_id(), "1000");
        assert_eq!(entries[1].key(), "g2/2/2000");
        assert_eq!(entries[1].board_id(), "2000");
        let root = Path::new("/data");
        assert_eq!(
            entries[0].image_path(root),
            root.join("group1/1/1000_test.jpg")
        );
        assert_eq!(entries[1].image_path(root), root.join("g2/2/2000_test.png"));
        assert_eq!(entries[2].image_path(root), root.join("g3/3/3000_test.jpg"));
    }

    #[test]
    fn a_list_names_boards_with_template_and_labels() {
        // A byte-order mark in a label file parses for training as it does for ingest.
        let (dir, [template, first, second, list]) = scratch([
            ("group1/1/1000_temp.jpg", "x"),
            ("group1/1_not/1000.txt", "\u{feff}10 20 30 40 1\n"),
            ("group1/1_not/1001.txt", ""),
            (
                "trainval.txt",
                "group1/1/1000.jpg group1/1_not/1000.txt\ngroup1/1/1001.jpg group1/1_not/1001.txt\n",
            ),
        ]);
        let root = dir.path();
        let boards = read_list(root, &list, &ClassMap::default()).unwrap();
        assert_eq!(
            boards,
            vec![
                ListedBoard {
                    name: "group1/1/1000.jpg".into(),
                    image: root.join("group1/1/1000_test.jpg"),
                    template: Some(template),
                    labels: first,
                    boxes: vec![bx(10.0, 20.0, 30.0, 40.0, 1, "open")],
                },
                ListedBoard {
                    name: "group1/1/1001.jpg".into(),
                    image: root.join("group1/1/1001_test.jpg"),
                    template: None,
                    labels: second,
                    boxes: vec![],
                },
            ]
        );
    }

    #[test]
    fn a_list_with_bad_lines_or_labels_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let map = ClassMap::default();
        let err = read_list(root, &root.join("nope.txt"), &map).unwrap_err();
        assert!(
            matches!(err, DatasetError::Pairing(PairError::ReadList { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("nope.txt"), "{err}");

        let list = put(root, "val.txt", "\ng/1/1.jpg\n");
        let err = read_list(root, &list, &map).unwrap_err();
        assert!(
            matches!(
                err,
                DatasetError::Labels(LabelError::Syntax { line: Some(2), .. })
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().ends_with(
                "val.txt line 2: expected \"<image> <labels>\", found only the image \"g/1/1.jpg\""
            ),
            "{err}"
        );

        let list = put(root, "test.txt", "g/1/1.jpg g/1_not/1.txt\n");
        let err = read_list(root, &list, &map).unwrap_err();
        assert!(
            matches!(err, DatasetError::Labels(LabelError::Read { .. })),
            "{err:?}"
        );
        put(root, "g/1_not/1.txt", "1 2 3 4 1\n1 2 x 4 1\n");
        let err = read_list(root, &list, &map).unwrap_err().to_string();
        assert!(
            err.ends_with("1.txt line 2: x2 \"x\" is not a number"),
            "{err}"
        );
    }
}
