//! Runs a detector over listed boards and scores it with `pcb-evaluation` under the DeepPCB
//! protocol.

use std::time::Instant;

use pcb_evaluation::{Detection, GtBox, ImageResult, Report};

use crate::data::{Board, BoardFile};
use crate::model::Detector;
use crate::transform::compose;
use crate::VisionError;

/// DeepPCB's class names, class id = index + 1 (the pipeline's, from `pcb-datasets`).
pub const DEEPPCB_CLASSES: [&str; 6] = pcb_datasets::CLASS_NAMES;

/// Detects on every board (one at a time, as a line does) and evaluates; `progress` gets
/// the count done after each board.
pub fn evaluate(
    det: &Detector,
    files: &[BoardFile],
    classes: &[&str],
    progress: impl FnMut(usize),
) -> Result<(Report, Vec<ImageResult>), VisionError> {
    evaluate_boards(
        det,
        files.len(),
        |i| Ok((files[i].name.clone(), files[i].load()?)),
        classes,
        progress,
    )
}

/// [`evaluate`] over `count` boards that `board(i)` produces (from files, from a stream),
/// the ground truth being each board's own boxes (its hard negatives left out).
pub fn evaluate_boards(
    det: &Detector,
    count: usize,
    mut board: impl FnMut(usize) -> Result<(String, Board), VisionError>,
    classes: &[&str],
    mut progress: impl FnMut(usize),
) -> Result<(Report, Vec<ImageResult>), VisionError> {
    let mut results = Vec::with_capacity(count);
    let mut seconds = 0.0;
    for i in 0..count {
        let (name, board) = board(i)?;
        let input = compose(
            det.model.config.input,
            &board.image,
            board.template.as_ref(),
        )?
        .to_device(det.vs.device());
        let started = Instant::now();
        let out = tch::no_grad(|| det.model.detect(&[input]))?;
        seconds += started.elapsed().as_secs_f64();
        let detections = out.detections[0]
            .rows()?
            .into_iter()
            .map(|([x1, y1, x2, y2], c, score)| Detection {
                x1,
                y1,
                x2,
                y2,
                class_id: c as u16,
                score,
            })
            .collect();
        // A hard negative (a box an operator deleted) is no defect to find.
        let ground_truth = crate::roi_heads::box_rows(&board.boxes, &board.labels, None)?
            .into_iter()
            .filter(|(_, c, _)| *c != crate::model::HARD_NEGATIVE)
            .map(|([x1, y1, x2, y2], c, _)| GtBox {
                x1,
                y1,
                x2,
                y2,
                class_id: c as u16,
            })
            .collect();
        results.push(ImageResult {
            image: name,
            ground_truth,
            detections,
        });
        progress(i + 1);
    }
    let report = pcb_evaluation::evaluate(&results, classes, Some(seconds));
    Ok((report, results))
}
