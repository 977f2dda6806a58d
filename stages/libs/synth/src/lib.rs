//! Generates synthetic DeepPCB-style PCB crops with exact defect boxes, in DeepPCB's file layout.
//!
//! Boards are drawn like DeepPCB's (dark copper on a light substrate): octilinear traces of a
//! few widths, buses, pours and rows of square/round/oblong pads, most of them drilled. Each
//! board gets 3–12 defects of the six DeepPCB kinds; each box is the tight bounding box of the
//! pixels the defect changed plus a 2 px margin, so test and template are identical outside all
//! boxes (before JPEG encoding).
//!
//! Everything is a pure function of `(seed, board index)`: the key of a ChaCha8 generator comes
//! from the seed and its stream from the index, so any single board can be regenerated alone
//! and a run is byte-identical on every platform.

#![warn(missing_docs)]

mod defects;
mod geom;
mod layout;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, GrayImage};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use defects::{add_defects, BACKGROUND, COPPER};
use layout::{Layout, NO_OWNER};

/// DeepPCB class names; `CLASS_NAMES[class_id - 1]` names a class id.
pub const CLASS_NAMES: [&str; 6] = ["open", "short", "mousebite", "spur", "copper", "pin-hole"];

/// JPEG quality of written images: high enough that thresholding at 128 recovers the binary
/// image exactly in practice, like DeepPCB's own files.
const JPEG_QUALITY: u8 = 90;
/// First synthetic group number; DeepPCB's real groups are mostly far below it.
const FIRST_GROUP: u32 = 90_000;
/// Largest group number that still fits DeepPCB's 5-digit group field.
const LAST_GROUP: u32 = 99_999;
/// Real DeepPCB groups inside the synthetic range, skipped so names never clash.
const DEEPPCB_GROUPS: [u32; 2] = [90_100, 92_000];
/// DeepPCB ids are `<group><NNN>`; capping groups at 100 boards keeps NNN under 100 like DeepPCB.
const BOARDS_PER_GROUP: usize = 100;
/// ChaCha stream reserved for the train/val split so it never shares numbers with a board
/// (boards use their index as stream).
const SPLIT_STREAM: u64 = u64::MAX;

/// One annotated defect: an inclusive pixel box `[x1, x2] x [y1, y2]` and its DeepPCB class id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SynthDefect {
    /// Left column of the box (inclusive).
    pub x1: u32,
    /// Top row of the box (inclusive).
    pub y1: u32,
    /// Right column of the box (inclusive).
    pub x2: u32,
    /// Bottom row of the box (inclusive).
    pub y2: u32,
    /// DeepPCB class id, 1..=6 (see [`CLASS_NAMES`]).
    pub class_id: u8,
}

impl SynthDefect {
    /// The DeepPCB name of this defect's class.
    pub fn class_name(&self) -> &'static str {
        CLASS_NAMES
            .get(usize::from(self.class_id).wrapping_sub(1))
            .copied()
            .unwrap_or("unknown")
    }
}

/// One rendered board pair with its ground truth.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthBoard {
    /// Defect-free golden board; pixels are only 0 (copper) or 255 (substrate).
    pub template: GrayImage,
    /// The same board with the defects drawn in; binary like the template.
    pub test: GrayImage,
    /// Defect boxes; pixels outside all of them are equal in `test` and `template`.
    pub defects: Vec<SynthDefect>,
}

/// Renders board `index` of the run seeded by `seed` on a `size` x `size` canvas.
///
/// Feature sizes are in DeepPCB's scale (about 48 px/mm) whatever `size` is; very small canvases
/// may hold fewer than three defects, and `size == 0` gives empty images.
pub fn render_board(seed: u64, index: u64, size: u32) -> SynthBoard {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let n = size as usize;
    let layout = Layout::generate(n, &mut rng);
    let template: Vec<u8> = layout
        .owner
        .iter()
        .map(|&o| if o == NO_OWNER { BACKGROUND } else { COPPER })
        .collect();
    let mut test = template.clone();
    let defects = if n > 0 {
        add_defects(&layout, &mut test, &mut rng)
    } else {
        Vec::new()
    };
    SynthBoard {
        template: to_image(size, template),
        test: to_image(size, test),
        defects,
    }
}

/// Wraps a `size` x `size` pixel buffer as an image.
fn to_image(size: u32, pixels: Vec<u8>) -> GrayImage {
    // The buffer always holds size*size pixels, so from_raw cannot fail; the fallback only
    // keeps this free of panics.
    GrayImage::from_raw(size, size, pixels).unwrap_or_else(|| GrayImage::new(size, size))
}

/// Settings for [`generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct SynthOptions {
    /// Number of boards to write (at least 1).
    pub count: usize,
    /// Run seed; the same seed gives byte-identical output.
    pub seed: u64,
    /// Side of each square image in pixels (64..=4096).
    pub size: u32,
    /// Fraction of boards listed in `test.txt` instead of `trainval.txt` (0 <= f < 1).
    pub val_fraction: f64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            count: 100,
            seed: 0,
            size: 640,
            val_fraction: 0.2,
        }
    }
}

impl SynthOptions {
    /// Checks every option and reports all problems in one error, so a caller fixes them at once.
    fn validate(&self) -> Result<(), SynthError> {
        let mut problems = Vec::new();
        if self.count == 0 {
            problems.push("count must be at least 1".to_string());
        }
        if self.count > max_boards() {
            problems.push(format!(
                "count {} exceeds the {} boards that fit synthetic groups {FIRST_GROUP}..={LAST_GROUP}",
                self.count,
                max_boards()
            ));
        }
        if !(64..=4096).contains(&self.size) {
            problems.push(format!("size {} is outside 64..=4096", self.size));
        }
        if !(self.val_fraction >= 0.0 && self.val_fraction < 1.0) {
            problems.push(format!(
                "val_fraction {} is outside [0, 1)",
                self.val_fraction
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SynthError::InvalidOptions(problems.join("; ")))
        }
    }
}

/// What [`generate`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SynthSummary {
    /// Boards written.
    pub boards: usize,
    /// Defects over all boards.
    pub defects: usize,
    /// Defects per class; `per_class[class_id - 1]`.
    pub per_class: [usize; 6],
    /// Boards listed in `trainval.txt`.
    pub train: usize,
    /// Boards listed in `test.txt`.
    pub val: usize,
}

/// Why [`generate`] failed; each variant names the step and the path involved.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The options were rejected; the message lists every problem found.
    #[error("invalid synth options: {0}")]
    InvalidOptions(String),
    /// An output directory could not be created.
    #[error("failed to create directory {}: {source}", .path.display())]
    CreateDir {
        /// Directory being created.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// An image could not be JPEG-encoded.
    #[error("failed to encode JPEG for {}: {source}", .path.display())]
    EncodeJpeg {
        /// File the image was meant for.
        path: PathBuf,
        /// Underlying encoder error.
        source: image::ImageError,
    },
    /// A temporary file could not be written.
    #[error("failed to write {}: {source}", .path.display())]
    WriteFile {
        /// File being written.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// A finished temporary file could not be moved to its final name.
    #[error("failed to rename {} to {}: {source}", .from.display(), .to.display())]
    RenameFile {
        /// Temporary file.
        from: PathBuf,
        /// Final name.
        to: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
}

/// Most boards one run can name without leaving the synthetic group range.
fn max_boards() -> usize {
    ((LAST_GROUP - FIRST_GROUP + 1) as usize)
        .saturating_sub(DEEPPCB_GROUPS.len())
        .saturating_mul(BOARDS_PER_GROUP)
}

/// Group number of the `k`-th synthetic group, skipping real DeepPCB groups.
fn group_number(k: usize) -> Option<u32> {
    let mut g = FIRST_GROUP.checked_add(u32::try_from(k).ok()?)?;
    // Ascending order matters: a bump past one real group may land on the next.
    for r in DEEPPCB_GROUPS {
        if g >= r {
            g += 1;
        }
    }
    (g <= LAST_GROUP).then_some(g)
}

/// Where one board's files go, relative to the output root.
#[derive(Clone, Debug)]
struct BoardPlan {
    /// DeepPCB group number.
    group: u32,
    /// Eight-digit DeepPCB image id.
    id: String,
    /// Whether the board is listed in `test.txt`.
    val: bool,
}

impl BoardPlan {
    /// Directory of the image pair.
    fn image_dir(&self) -> String {
        format!("group{0:05}/{0:05}", self.group)
    }

    /// Directory of the annotation file.
    fn note_dir(&self) -> String {
        format!("group{0:05}/{0:05}_not", self.group)
    }

    /// The DeepPCB list line: the `.jpg` name stands for the `_test`/`_temp` pair.
    fn list_line(&self) -> String {
        format!(
            "{}/{}.jpg {}/{}.txt\n",
            self.image_dir(),
            self.id,
            self.note_dir(),
            self.id
        )
    }
}

/// Names and splits every board of the run.
fn plan(opts: &SynthOptions) -> Result<Vec<BoardPlan>, SynthError> {
    let mut val = vec![false; opts.count];
    let n_val = ((opts.count as f64 * opts.val_fraction).round() as usize)
        .min(opts.count.saturating_sub(1));
    let mut order: Vec<usize> = (0..opts.count).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    rng.set_stream(SPLIT_STREAM);
    order.shuffle(&mut rng);
    for &i in &order[..n_val] {
        val[i] = true;
    }
    (0..opts.count)
        .map(|i| {
            let group = group_number(i / BOARDS_PER_GROUP).ok_or_else(|| {
                SynthError::InvalidOptions(format!("board {i} has no free group number"))
            })?;
            Ok(BoardPlan {
                group,
                id: format!("{group:05}{:03}", i % BOARDS_PER_GROUP),
                val: val[i],
            })
        })
        .collect()
}

/// Writes `bytes` under a hidden temporary name and renames it into place, so a directory
/// watcher never sees a half-written `.jpg`/`.txt`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|source| SynthError::WriteFile {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| {
        // Best effort: a leftover temp file is harmless but untidy.
        let _ = std::fs::remove_file(&tmp);
        SynthError::RenameFile {
            from: tmp.clone(),
            to: path.to_path_buf(),
            source,
        }
    })
}

/// Grey JPEG bytes of `img`; `path` only labels errors.
fn encode_jpeg(img: &GrayImage, path: &Path) -> Result<Vec<u8>, SynthError> {
    let mut buf = Vec::with_capacity(64 * 1024);
    JpegEncoder::new_with_quality(&mut buf, JPEG_QUALITY)
        .encode(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::L8,
        )
        .map_err(|source| SynthError::EncodeJpeg {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(buf)
}

/// DeepPCB annotation text: one `x1 y1 x2 y2 type` line per defect.
fn annotation_text(defects: &[SynthDefect]) -> String {
    defects
        .iter()
        .map(|d| format!("{} {} {} {} {}\n", d.x1, d.y1, d.x2, d.y2, d.class_id))
        .collect()
}

/// Renders and writes one board; returns its defect count per class.
fn write_board(
    opts: &SynthOptions,
    out: &Path,
    index: usize,
    p: &BoardPlan,
) -> Result<[usize; 6], SynthError> {
    let board = render_board(opts.seed, index as u64, opts.size);
    let img_dir = out.join(p.image_dir());
    let test_path = img_dir.join(format!("{}_test.jpg", p.id));
    let temp_path = img_dir.join(format!("{}_temp.jpg", p.id));
    let note_path = out.join(p.note_dir()).join(format!("{}.txt", p.id));
    let test_jpg = encode_jpeg(&board.test, &test_path)?;
    let temp_jpg = encode_jpeg(&board.template, &temp_path)?;
    // The test image goes last: a watcher keyed on `_test.jpg` then finds its template and
    // annotation already in place.
    write_atomic(&note_path, annotation_text(&board.defects).as_bytes())?;
    write_atomic(&temp_path, &temp_jpg)?;
    write_atomic(&test_path, &test_jpg)?;
    let mut counts = [0usize; 6];
    for d in &board.defects {
        if let Some(c) = counts.get_mut(usize::from(d.class_id).wrapping_sub(1)) {
            *c += 1;
        }
    }
    Ok(counts)
}

/// `create_dir_all` with the path kept in the error.
fn create_dir(path: &Path) -> Result<(), SynthError> {
    std::fs::create_dir_all(path).map_err(|source| SynthError::CreateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `opts.count` boards under `out` in DeepPCB's layout and returns what was written.
///
/// Layout: `groupG/G/<id>_test.jpg` and `<id>_temp.jpg` (grey JPEG), `groupG/G_not/<id>.txt`
/// (`x1 y1 x2 y2 type` lines), and `trainval.txt` / `test.txt` listing
/// `groupG/G/<id>.jpg groupG/G_not/<id>.txt` per board, with `val_fraction` of the boards in
/// `test.txt`. Groups start at 90000 with at most 100 boards each. Every file is written under a
/// hidden temporary name and renamed into place; the two list files are written last.
/// `progress(done, total)` is called on the calling thread after each board. Boards are rendered
/// on up to four threads, which changes only the order of progress calls, never the output.
pub fn generate(
    opts: &SynthOptions,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SynthSummary, SynthError> {
    opts.validate()?;
    let plans = plan(opts)?;
    create_dir(out)?;
    let mut last_group = None;
    for p in &plans {
        if last_group != Some(p.group) {
            create_dir(&out.join(p.image_dir()))?;
            create_dir(&out.join(p.note_dir()))?;
            last_group = Some(p.group);
        }
    }

    let total = plans.len();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(total);
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let mut summary = SynthSummary::default();
    let mut first_error: Option<(usize, SynthError)> = None;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, abort, plans) = (&next, &abort, &plans);
            scope.spawn(move || {
                while !abort.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = plans.get(i) else { break };
                    let result = write_board(opts, out, i, p);
                    if result.is_err() {
                        abort.store(true, Ordering::Relaxed);
                    }
                    if tx.send((i, result)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for (i, result) in rx {
            match result {
                Ok(counts) => {
                    summary.boards += 1;
                    for (acc, c) in summary.per_class.iter_mut().zip(counts) {
                        *acc += c;
                    }
                    progress(summary.boards, total);
                }
                // Report the lowest failing board so the error does not depend on timing.
                Err(e) => {
                    if first_error.as_ref().is_none_or(|(j, _)| i < *j) {
                        first_error = Some((i, e));
                    }
                }
            }
        }
    });
    if let Some((_, e)) = first_error {
        return Err(e);
    }

    summary.defects = summary.per_class.iter().sum();
    let (mut train, mut val) = (String::new(), String::new());
    for p in &plans {
        if p.val {
            val.push_str(&p.list_line());
            summary.val += 1;
        } else {
            train.push_str(&p.list_line());
            summary.train += 1;
        }
    }
    write_atomic(&out.join("trainval.txt"), train.as_bytes())?;
    write_atomic(&out.join("test.txt"), val.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inside(d: &SynthDefect, x: u32, y: u32) -> bool {
        d.x1 <= x && x <= d.x2 && d.y1 <= y && y <= d.y2
    }

    #[test]
    fn same_seed_same_board_other_seed_or_index_differs() {
        let a = render_board(7, 3, 640);
        let b = render_board(7, 3, 640);
        assert_eq!(a, b);
        let c = render_board(8, 3, 640);
        let d = render_board(7, 4, 640);
        assert_ne!(a.template, c.template);
        assert_ne!(a.template, d.template);
        assert_ne!(a.defects, c.defects);
    }

    #[test]
    fn boxes_are_valid_exact_and_disjoint() {
        let mut sizes = Vec::new();
        for i in 0..40 {
            let b = render_board(11, i, 640);
            assert!(
                (3..=12).contains(&b.defects.len()),
                "board {i}: {} defects",
                b.defects.len()
            );
            for (k, d) in b.defects.iter().enumerate() {
                assert!(d.x1 < d.x2 && d.y1 < d.y2, "{d:?}");
                assert!(d.x2 < 640 && d.y2 < 640, "{d:?}");
                assert!((1..=6).contains(&d.class_id));
                let (w, h) = (d.x2 - d.x1 + 1, d.y2 - d.y1 + 1);
                assert!(w.min(h) >= 7 && w.max(h) <= 60, "box {w}x{h} {d:?}");
                sizes.push(w.max(h));
                for e in &b.defects[k + 1..] {
                    let overlap = d.x1 <= e.x2 && e.x1 <= d.x2 && d.y1 <= e.y2 && e.y1 <= d.y2;
                    assert!(!overlap, "board {i}: {d:?} overlaps {e:?}");
                }
                // Tight: after removing the 2 px margin, each edge row/column holds a change
                // (unless the margin was clipped at the canvas border).
                let changed = |x: u32, y: u32| b.test.get_pixel(x, y) != b.template.get_pixel(x, y);
                let (cx1, cy1, cx2, cy2) = (d.x1 + 2, d.y1 + 2, d.x2 - 2, d.y2 - 2);
                if d.x1 > 0 && d.y1 > 0 && d.x2 < 639 && d.y2 < 639 {
                    assert!((cy1..=cy2).any(|y| changed(cx1, y)), "left edge {d:?}");
                    assert!((cy1..=cy2).any(|y| changed(cx2, y)), "right edge {d:?}");
                    assert!((cx1..=cx2).any(|x| changed(x, cy1)), "top edge {d:?}");
                    assert!((cx1..=cx2).any(|x| changed(x, cy2)), "bottom edge {d:?}");
                }
            }
            for (x, y, p) in b.test.enumerate_pixels() {
                if !b.defects.iter().any(|d| inside(d, x, y)) {
                    assert_eq!(p, b.template.get_pixel(x, y), "board {i} pixel {x},{y}");
                }
            }
        }
        sizes.sort_unstable();
        let median = sizes[sizes.len() / 2];
        assert!((12..=40).contains(&median), "median box side {median}");
    }

    #[test]
    fn images_are_binary_with_both_colours() {
        for i in 0..10 {
            let b = render_board(5, i, 640);
            for img in [&b.template, &b.test] {
                assert!(img.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
                let dark = img.pixels().filter(|p| p.0[0] == 0).count() as f64 / (640.0 * 640.0);
                assert!(
                    (0.03..0.8).contains(&dark),
                    "board {i}: copper fraction {dark}"
                );
            }
        }
    }

    #[test]
    fn every_class_appears_over_fifty_boards() {
        let mut per_class = [0usize; 6];
        let mut total = 0;
        for i in 0..50 {
            for d in render_board(0, i, 640).defects {
                per_class[usize::from(d.class_id) - 1] += 1;
                total += 1;
            }
        }
        println!("defects per class over 50 boards: {per_class:?} (total {total})");
        for (name, &n) in CLASS_NAMES.iter().zip(&per_class) {
            assert!(n * 20 >= total, "class {name} only {n} of {total}");
        }
    }

    #[test]
    fn small_and_degenerate_sizes_do_not_panic() {
        for size in [0, 1, 17, 64, 100] {
            let b = render_board(3, 1, size);
            assert_eq!(b.test.dimensions(), (size, size));
            for d in &b.defects {
                assert!(d.x2 < size && d.y2 < size);
            }
        }
    }

    #[test]
    fn group_numbers_skip_real_deeppcb_groups() {
        assert_eq!(group_number(0), Some(90_000));
        assert_eq!(group_number(99), Some(90_099));
        assert_eq!(group_number(100), Some(90_101));
        assert_eq!(group_number(1_998), Some(91_999));
        assert_eq!(group_number(1_999), Some(92_001));
        let last = (LAST_GROUP - FIRST_GROUP) as usize - DEEPPCB_GROUPS.len();
        assert_eq!(group_number(last), Some(LAST_GROUP));
        assert_eq!(group_number(last + 1), None);
        assert_eq!(max_boards(), (last + 1) * BOARDS_PER_GROUP);
    }

    #[test]
    fn invalid_options_report_every_problem() {
        let opts = SynthOptions {
            count: 0,
            seed: 1,
            size: 32,
            val_fraction: 1.0,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let err = generate(&opts, dir.path(), &mut |_, _| {}).expect_err("must fail");
        let msg = err.to_string();
        assert!(matches!(err, SynthError::InvalidOptions(_)));
        assert!(msg.contains("count"), "{msg}");
        assert!(msg.contains("size 32"), "{msg}");
        assert!(msg.contains("val_fraction"), "{msg}");
        let nan = SynthOptions {
            val_fraction: f64::NAN,
            ..SynthOptions::default()
        };
        assert!(nan.validate().is_err());
        let big = SynthOptions {
            count: max_boards() + 1,
            size: 5000,
            ..SynthOptions::default()
        };
        let msg = big.validate().expect_err("too many").to_string();
        assert!(msg.contains("exceeds") && msg.contains("5000"), "{msg}");
        assert!(SynthOptions::default().validate().is_ok());
        assert_eq!(
            std::fs::read_dir(dir.path()).map(|d| d.count()).ok(),
            Some(0)
        );
    }

    fn read_list(path: &Path) -> Vec<(String, String)> {
        std::fs::read_to_string(path)
            .expect("list file")
            .lines()
            .map(|l| {
                let (a, b) = l.split_once(' ').expect("two fields");
                (a.to_string(), b.to_string())
            })
            .collect()
    }

    #[test]
    fn generate_writes_deeppcb_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("synth");
        let opts = SynthOptions {
            count: 105,
            seed: 42,
            size: 160,
            val_fraction: 0.2,
        };
        let mut calls = Vec::new();
        let summary = generate(&opts, &out, &mut |d, t| calls.push((d, t))).expect("generate");
        assert_eq!(calls.len(), 105);
        assert_eq!(calls.last(), Some(&(105, 105)));
        assert_eq!(summary.boards, 105);
        assert_eq!((summary.train, summary.val), (84, 21));
        assert_eq!(summary.defects, summary.per_class.iter().sum::<usize>());

        let train = read_list(&out.join("trainval.txt"));
        let val = read_list(&out.join("test.txt"));
        assert_eq!((train.len(), val.len()), (84, 21));
        let mut per_class = [0usize; 6];
        let mut ids = Vec::new();
        for (img, note) in train.iter().chain(&val) {
            let stem = img.strip_suffix(".jpg").expect(".jpg entry");
            let (group_dir, id) = stem.rsplit_once('/').expect("id");
            assert_eq!(id.len(), 8, "{id}");
            assert!(group_dir.starts_with("group9"), "{group_dir}");
            assert_eq!(note, &format!("{group_dir}_not/{id}.txt"));
            ids.push(id.to_string());
            for suffix in ["_test.jpg", "_temp.jpg"] {
                let path = out.join(format!("{stem}{suffix}"));
                let img = image::open(&path).expect("jpeg decodes").to_luma8();
                assert_eq!(img.dimensions(), (160, 160));
            }
            let text = std::fs::read_to_string(out.join(note)).expect("annotation");
            for line in text.lines() {
                let v: Vec<u32> = line
                    .split(' ')
                    .map(|f| f.parse().expect("integer field"))
                    .collect();
                assert_eq!(v.len(), 5, "{line}");
                assert!(v[0] < v[2] && v[1] < v[3] && v[2] < 160 && v[3] < 160);
                per_class[v[4] as usize - 1] += 1;
            }
        }
        assert_eq!(per_class, summary.per_class);
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 105);
        assert!(ids.contains(&"90000000".to_string()));
        assert!(ids.contains(&"90000099".to_string()));
        assert!(ids.contains(&"90001004".to_string()));
        assert!(out.join("group90001/90001_not/90001004.txt").is_file());
        // No temporary files are left behind.
        for g in [
            "group90000/90000",
            "group90000/90000_not",
            "group90001/90001",
        ] {
            let leftovers = std::fs::read_dir(out.join(g))
                .expect("dir")
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
                .count();
            assert_eq!(leftovers, 0, "{g}");
        }

        // A second run with the same options writes byte-identical files.
        let out2 = dir.path().join("again");
        generate(&opts, &out2, &mut |_, _| {}).expect("generate again");
        for rel in [
            "trainval.txt",
            "test.txt",
            "group90001/90001/90001003_test.jpg",
            "group90000/90000/90000017_temp.jpg",
            "group90000/90000_not/90000017.txt",
        ] {
            let a = std::fs::read(out.join(rel)).expect("first");
            let b = std::fs::read(out2.join(rel)).expect("second");
            assert!(a == b, "{rel} differs between runs");
        }
    }

    #[test]
    fn unwritable_output_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        let opts = SynthOptions {
            count: 2,
            size: 64,
            ..SynthOptions::default()
        };
        let err = generate(&opts, &file, &mut |_, _| {}).expect_err("must fail");
        assert!(matches!(err, SynthError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }

    #[test]
    fn class_names_match_ids() {
        let d = SynthDefect {
            x1: 0,
            y1: 0,
            x2: 1,
            y2: 1,
            class_id: 6,
        };
        assert_eq!(d.class_name(), "pin-hole");
        assert_eq!(SynthDefect { class_id: 0, ..d }.class_name(), "unknown");
        assert_eq!(SynthDefect { class_id: 1, ..d }.class_name(), "open");
    }
}
