//! Boards as the model sees them: DeepPCB-layout folders and list files read into tensors,
//! and the flips and quarter turns that suit PCB crops (defects have no preferred side).

use std::path::{Path, PathBuf};

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

/// Parses a DeepPCB annotation file: one `x1 y1 x2 y2 type` per line (spaces or commas).
pub fn parse_deeppcb_labels(text: &str, origin: &str) -> Result<Vec<([f32; 4], i64)>, VisionError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|f| !f.is_empty())
            .collect();
        let bad = || {
            VisionError::Data(format!(
                "{origin}:{}: expected `x1 y1 x2 y2 type`, got {line:?}",
                n + 1
            ))
        };
        if fields.len() != 5 {
            return Err(bad());
        }
        let mut v = [0f32; 4];
        for (i, f) in fields[..4].iter().enumerate() {
            v[i] = f.parse().map_err(|_| bad())?;
        }
        let class: i64 = fields[4].parse().map_err(|_| bad())?;
        if !(v[0] < v[2] && v[1] < v[3]) {
            return Err(VisionError::Data(format!(
                "{origin}:{}: empty box {v:?}",
                n + 1
            )));
        }
        out.push((v, class));
    }
    Ok(out)
}

/// The boards of a DeepPCB list file (`trainval.txt`, `val.txt`): each line names
/// `groupN/N/<id>.jpg groupN/N_not/<id>.txt` relative to `root`.
pub fn read_list(root: &Path, list: &Path) -> Result<Vec<BoardFile>, VisionError> {
    let text = std::fs::read_to_string(list)
        .map_err(|e| VisionError::Data(format!("reading list {}: {e}", list.display())))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.is_empty() {
            continue;
        }
        if parts.len() != 2 {
            return Err(VisionError::Data(format!(
                "{}:{}: expected `<image>.jpg <labels>.txt`, got {line:?}",
                list.display(),
                n + 1
            )));
        }
        let stem = parts[0].strip_suffix(".jpg").unwrap_or(parts[0]);
        let image = root.join(format!("{stem}_test.jpg"));
        let template = root.join(format!("{stem}_temp.jpg"));
        let labels = root.join(parts[1]);
        let text = std::fs::read_to_string(&labels)
            .map_err(|e| VisionError::Data(format!("reading labels {}: {e}", labels.display())))?;
        out.push(BoardFile {
            name: parts[0].to_string(),
            boxes: parse_deeppcb_labels(&text, &labels.display().to_string())?,
            template: template.exists().then_some(template),
            image,
        });
    }
    Ok(out)
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
    fn deeppcb_labels_parse_and_errors_name_the_line() {
        let got = parse_deeppcb_labels("10 20 30 40 1\n\n5,6,7,8,6\n", "a.txt").unwrap();
        assert_eq!(got, vec![([10., 20., 30., 40.], 1), ([5., 6., 7., 8.], 6)]);
        let e = parse_deeppcb_labels("1 2 3\n", "a.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.txt:1"), "{e}");
        let e = parse_deeppcb_labels("1 2 3 4 x\n", "b.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.txt:1"), "{e}");
        let e = parse_deeppcb_labels("0 0 0 4 1\n", "c.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty box"), "{e}");
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
