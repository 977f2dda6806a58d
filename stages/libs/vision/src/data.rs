//! Boards as the model sees them: DeepPCB-layout folders and list files read into tensors,
//! and the flips and quarter turns that suit PCB crops (defects have no preferred side).

use std::path::{Path, PathBuf};

use pcb_datasets::{BoxLabel, ClassMap};
use tch::{Kind, Tensor};

use crate::VisionError;

/// One labelled board from a dataset folder.
#[derive(Debug, Clone)]
pub struct BoardFile {
    /// A name for reports (the list entry).
    pub name: String,
    /// The inspected image.
    pub image: PathBuf,
    /// Its defect-free template, when present.
    pub template: Option<PathBuf>,
    /// Boxes `x1 y1 x2 y2` in pixels with their class (1..=6 for DeepPCB).
    pub boxes: Vec<([f32; 4], i64)>,
}

/// A decoded board: `[1, H, W]` floats in 0..1 for image and template.
#[derive(Debug)]
pub struct Board {
    /// The inspected image.
    pub image: Tensor,
    /// The template.
    pub template: Option<Tensor>,
    /// `[G, 4]` boxes.
    pub boxes: Tensor,
    /// `[G]` classes.
    pub labels: Tensor,
}

/// `x1 y1 x2 y2` corners and class id of each box, as [`Board::new`] takes them.
pub fn box_rows(labels: &[BoxLabel]) -> Vec<([f32; 4], i64)> {
    labels
        .iter()
        .map(|b| ([b.x1, b.y1, b.x2, b.y2], i64::from(b.class_id)))
        .collect()
}

/// The boards of a DeepPCB list file (`trainval.txt`, `val.txt`): each line names
/// `groupN/N/<id>.jpg groupN/N_not/<id>.txt` relative to `root`, read by `pcb-datasets` as
/// the ingester reads them. A box the model cannot learn from (empty or inverted, or of a
/// class outside DeepPCB's six) is an error naming its file.
pub fn read_list(root: &Path, list: &Path) -> Result<Vec<BoardFile>, VisionError> {
    let classes = ClassMap::default();
    pcb_datasets::read_list(root, list, &classes)?
        .into_iter()
        .map(|board| {
            for (n, b) in board.boxes.iter().enumerate() {
                let problem = if !(b.x1 < b.x2 && b.y1 < b.y2) {
                    "is empty or inverted (needs x1 < x2 and y1 < y2)"
                } else if classes.name_of(b.class_id).is_none() {
                    "has no DeepPCB class (1..=6)"
                } else {
                    continue;
                };
                return Err(VisionError::Data(format!(
                    "{}: box {} ({}, {}, {}, {}) of class {} {problem}",
                    board.labels.display(),
                    n + 1,
                    b.x1,
                    b.y1,
                    b.x2,
                    b.y2,
                    b.class_id,
                )));
            }
            Ok(BoardFile {
                boxes: box_rows(&board.boxes),
                name: board.name,
                image: board.image,
                template: board.template,
            })
        })
        .collect()
}

/// Adds hard negatives to listed boards: `path` holds one `<image> x1 y1 x2 y2` line per
/// box that is known to hold no defect (a box an operator deleted), `<image>` as the list
/// names the board; blank lines and `#` comments are skipped. The boxes join the board's
/// with the label [`crate::model::HARD_NEGATIVE`]. Returns how many were added; a line
/// that does not parse, an empty or inverted box or a board not in the list is an error
/// naming the file and line.
pub fn add_negatives(files: &mut [BoardFile], path: &Path) -> Result<usize, VisionError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| VisionError::Data(format!("reading {}: {e}", path.display())))?;
    let index: std::collections::HashMap<String, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name.clone(), i))
        .collect();
    let mut added = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at =
            |why: String| VisionError::Data(format!("{} line {}: {why}", path.display(), n + 1));
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [image, coords @ ..] = fields.as_slice() else {
            continue;
        };
        if coords.len() != 4 {
            return Err(at(format!(
                "expected \"<image> x1 y1 x2 y2\", found {} fields",
                fields.len()
            )));
        }
        let mut b = [0f32; 4];
        for (v, c) in b.iter_mut().zip(coords) {
            *v = c
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| at(format!("\"{c}\" is not a number")))?;
        }
        if !(b[0] < b[2] && b[1] < b[3]) {
            return Err(at(format!(
                "box ({}, {}, {}, {}) is empty or inverted (needs x1 < x2 and y1 < y2)",
                b[0], b[1], b[2], b[3]
            )));
        }
        let &i = index
            .get(*image)
            .ok_or_else(|| at(format!("board \"{image}\" is not in the list")))?;
        files[i].boxes.push((b, crate::model::HARD_NEGATIVE));
        added += 1;
    }
    Ok(added)
}

/// Decodes an image file to a `[1, H, W]` grey tensor in 0..1.
pub fn load_grey(path: &Path) -> Result<Tensor, VisionError> {
    let img = image::open(path)
        .map_err(|e| VisionError::Data(format!("decoding {}: {e}", path.display())))?;
    Ok(grey_tensor(img))
}

/// Decodes an encoded image (JPEG, PNG, ...) held in memory to a `[1, H, W]` grey tensor.
pub fn decode_grey(bytes: &[u8], origin: &str) -> Result<Tensor, VisionError> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| VisionError::Data(format!("decoding {origin}: {e}")))?;
    Ok(grey_tensor(img))
}

impl Board {
    /// A board from decoded tensors and `x1 y1 x2 y2` boxes with their classes.
    pub fn new(image: Tensor, template: Option<Tensor>, boxes: &[([f32; 4], i64)]) -> Board {
        let flat: Vec<f32> = boxes.iter().flat_map(|(b, _)| *b).collect();
        let labels: Vec<i64> = boxes.iter().map(|(_, c)| *c).collect();
        Board {
            image,
            template,
            boxes: Tensor::from_slice(&flat).view([-1, 4]),
            labels: Tensor::from_slice(&labels),
        }
    }
}

fn grey_tensor(img: image::DynamicImage) -> Tensor {
    let img = img.to_luma8();
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw())
        .view([1, h as i64, w as i64])
        .to_kind(Kind::Float)
        / 255.0
}

impl BoardFile {
    /// Reads and decodes the board.
    pub fn load(&self) -> Result<Board, VisionError> {
        let image = load_grey(&self.image)?;
        let template = self.template.as_deref().map(load_grey).transpose()?;
        Ok(Board::new(image, template, &self.boxes))
    }
}

/// The boxes seen through a `size`-square window at `(x0, y0)`: shifted, clipped, and kept
/// when at least half of a box and 2 px each way remain visible (a defect cut in two
/// would teach the model to box fragments).
pub fn crop_boxes(
    boxes: &Tensor,
    labels: &Tensor,
    x0: i64,
    y0: i64,
    size: i64,
) -> (Tensor, Tensor) {
    if boxes.size()[0] == 0 {
        return (boxes.shallow_clone(), labels.shallow_clone());
    }
    let shift = Tensor::from_slice(&[x0 as f32, y0 as f32, x0 as f32, y0 as f32]).view([1, 4]);
    let moved = boxes - shift;
    let clipped = moved.clamp(0.0, size as f64);
    let area = |b: &Tensor| (b.select(1, 2) - b.select(1, 0)) * (b.select(1, 3) - b.select(1, 1));
    let w = clipped.select(1, 2) - clipped.select(1, 0);
    let h = clipped.select(1, 3) - clipped.select(1, 1);
    let keep = (area(&clipped) * 2.0)
        .ge_tensor(&area(&moved))
        .logical_and(&w.ge(2.0))
        .logical_and(&h.ge(2.0))
        .nonzero()
        .squeeze_dim(1);
    (
        clipped.index_select(0, &keep),
        labels.index_select(0, &keep),
    )
}

/// A flip and quarter-turn combination (the 8 symmetries of a square).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Symmetry {
    /// Mirror left-right first.
    pub hflip: bool,
    /// Then turn counter-clockwise this many quarter turns (0..4).
    pub quarter_turns: u8,
}

impl Symmetry {
    /// The `i`-th of the 8 symmetries.
    pub fn nth(i: u8) -> Symmetry {
        Symmetry {
            hflip: i & 4 != 0,
            quarter_turns: i & 3,
        }
    }

    /// Applies it to `[C, H, W]` images.
    pub fn image(&self, t: &Tensor) -> Tensor {
        let t = if self.hflip {
            t.flip([2])
        } else {
            t.shallow_clone()
        };
        if self.quarter_turns == 0 {
            t
        } else {
            t.rot90(self.quarter_turns as i64, [1, 2])
        }
    }

    /// Applies it to `[G, 4]` boxes of an image of `(h, w)` (before the transform).
    pub fn boxes(&self, b: &Tensor, h: i64, w: i64) -> Tensor {
        let mut b = b.shallow_clone();
        let (mut h, mut w) = (h as f64, w as f64);
        if self.hflip {
            b = Tensor::stack(
                &[
                    -b.select(1, 2) + w,
                    b.select(1, 1),
                    -b.select(1, 0) + w,
                    b.select(1, 3),
                ],
                1,
            );
        }
        for _ in 0..self.quarter_turns {
            // rot90 counter-clockwise: (x, y) -> (y, w - x); the image becomes w x h.
            b = Tensor::stack(
                &[
                    b.select(1, 1),
                    -b.select(1, 2) + w,
                    b.select(1, 3),
                    -b.select(1, 0) + w,
                ],
                1,
            );
            std::mem::swap(&mut h, &mut w);
        }
        let _ = h;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_boards_read_labels_as_the_ingester_does_and_refuse_unlearnable_boxes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("g/1_not")).unwrap();
        let list = root.join("list.txt");
        std::fs::write(&list, "g/1/7.jpg g/1_not/7.txt\n").unwrap();
        // A byte-order mark used to make the first line unreadable for training alone.
        std::fs::write(
            root.join("g/1_not/7.txt"),
            "\u{feff}10 20 30 40 1\n5,6,7,8,6\n",
        )
        .unwrap();
        let files = read_list(root, &list).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].name, "g/1/7.jpg");
        assert_eq!(files[0].image, root.join("g/1/7_test.jpg"));
        assert_eq!(files[0].template, None);
        assert_eq!(
            files[0].boxes,
            vec![([10., 20., 30., 40.], 1), ([5., 6., 7., 8.], 6)]
        );
        // Errors name the file and line as the ingester's dead letters do.
        std::fs::write(root.join("g/1_not/7.txt"), "1 2 3 4 x\n").unwrap();
        let e = read_list(root, &list).unwrap_err().to_string();
        assert!(e.contains("7.txt line 1: type \"x\""), "{e}");
        std::fs::write(root.join("g/1_not/7.txt"), "1 2 3\n").unwrap();
        let e = read_list(root, &list).unwrap_err().to_string();
        assert!(e.contains("7.txt line 1: expected 5 numbers"), "{e}");
        std::fs::write(root.join("g/1_not/7.txt"), "1 2 3 4 1\n0 0 0 4 1\n").unwrap();
        let e = read_list(root, &list).unwrap_err().to_string();
        assert!(
            e.contains("7.txt: box 2 (0, 0, 0, 4) of class 1 is empty"),
            "{e}"
        );
        std::fs::write(root.join("g/1_not/7.txt"), "1 2 3 4 7\n").unwrap();
        let e = read_list(root, &list).unwrap_err().to_string();
        assert!(
            e.contains("box 1 (1, 2, 3, 4) of class 7 has no DeepPCB class"),
            "{e}"
        );
    }

    #[test]
    fn negatives_join_their_boards_as_hard_negatives_and_bad_lines_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("g/1_not")).unwrap();
        let list = root.join("list.txt");
        std::fs::write(&list, "g/1/7.jpg g/1_not/7.txt\ng/1/8.jpg g/1_not/8.txt\n").unwrap();
        std::fs::write(root.join("g/1_not/7.txt"), "10 20 30 40 1\n").unwrap();
        std::fs::write(root.join("g/1_not/8.txt"), "").unwrap();
        let neg = root.join("negatives.txt");
        std::fs::write(
            &neg,
            "# deleted boxes\ng/1/8.jpg 1 2 3.5 4\n\ng/1/7.jpg 50 50 60 70\n",
        )
        .unwrap();
        let mut files = read_list(root, &list).unwrap();
        assert_eq!(add_negatives(&mut files, &neg).unwrap(), 2);
        let hard = crate::model::HARD_NEGATIVE;
        assert_eq!(
            files[0].boxes,
            vec![([10., 20., 30., 40.], 1), ([50., 50., 60., 70.], hard)]
        );
        assert_eq!(files[1].boxes, vec![([1., 2., 3.5, 4.], hard)]);
        for (text, want) in [
            (
                "g/1/9.jpg 1 2 3 4\n",
                "line 1: board \"g/1/9.jpg\" is not in the list",
            ),
            (
                "\ng/1/7.jpg 1 2 3\n",
                "line 2: expected \"<image> x1 y1 x2 y2\", found 4 fields",
            ),
            ("g/1/7.jpg 1 2 x 4\n", "line 1: \"x\" is not a number"),
            (
                "g/1/7.jpg 5 2 3 4\n",
                "line 1: box (5, 2, 3, 4) is empty or inverted",
            ),
        ] {
            std::fs::write(&neg, text).unwrap();
            let e = add_negatives(&mut files, &neg).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = add_negatives(&mut files, &root.join("none.txt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.txt"), "{e}");
    }

    #[test]
    fn crops_shift_clip_and_drop_boxes() {
        let boxes =
            Tensor::from_slice(&[10f32, 10., 20., 20., 95., 10., 115., 20., 0., 0., 4., 4.])
                .view([3, 4]);
        let labels = Tensor::from_slice(&[1i64, 2, 3]);
        // Window x 5..105, y 5..105: box 0 inside, box 1 half visible (kept, clipped),
        // box 2 mostly outside (dropped).
        let (b, l) = crop_boxes(&boxes, &labels, 5, 5, 100);
        assert_eq!(Vec::<i64>::try_from(&l).unwrap(), vec![1, 2]);
        assert_eq!(
            Vec::<f32>::try_from(&b.view([-1])).unwrap(),
            vec![5., 5., 15., 15., 90., 5., 100., 15.]
        );
    }

    #[test]
    fn symmetries_move_boxes_with_the_pixels() {
        // A single lit pixel block and its box must stay together under all 8 symmetries.
        let (h, w) = (6i64, 8i64);
        let img = Tensor::zeros([1, h, w], (Kind::Float, tch::Device::Cpu));
        let _ = img.narrow(1, 1, 2).narrow(2, 5, 3).fill_(1.0);
        let boxes = Tensor::from_slice(&[5f32, 1., 8., 3.]).view([1, 4]);
        for i in 0..8 {
            let s = Symmetry::nth(i);
            let t = s.image(&img);
            let b = Vec::<f32>::try_from(&s.boxes(&boxes, h, w).view([-1])).unwrap();
            let lit = t.nonzero();
            let ys = lit.select(1, 1);
            let xs = lit.select(1, 2);
            let want = [
                xs.min().double_value(&[]) as f32,
                ys.min().double_value(&[]) as f32,
                xs.max().double_value(&[]) as f32 + 1.0,
                ys.max().double_value(&[]) as f32 + 1.0,
            ];
            assert_eq!(b, want.to_vec(), "symmetry {i}");
        }
    }
}
