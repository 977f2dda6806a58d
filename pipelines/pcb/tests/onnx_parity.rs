//! The shipped default's ONNX export (`pipelines/models/deeppcb-compact/model.onnx`, made
//! by `make_onnx.sh` through `pipelines/export/onnx_export.py`) detects what our detector
//! detects: pcb_vision in f32 and ONNX Runtime (through `.venv/bin/python` and
//! `pipelines/export/ort_detect.py`) on the eight real DeepPCB boards the demo uses
//! (`pipelines/demo/deeppcb-sample.txt`, read from `../shared/datasets/deeppcb`). Every confident detection (score >= 0.5) of either side has a
//! counterpart on the other of the same class, IoU > 0.9 and a score within 0.02, and the
//! confident counts per board agree.
//!
//! No torch is needed: the graph is committed. A `.venv` without onnxruntime is a failure,
//! not a skip (deploy/setup.sh installs it from deploy/requirements-test.txt).

use std::path::{Path, PathBuf};
use std::process::Command;

use pcb_vision::data::{load_grey, read_list};
use pcb_vision::{compose, Bf16, Detector, InferenceOptions, ModelConfig, Sampling};

const CONFIDENT: f32 = 0.5;
const MIN_IOU: f32 = 0.9;
const SCORE_TOL: f32 = 0.02;

type Row = ([f32; 4], i64, f32);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    inter / (area(a) + area(b) - inter)
}

/// Writes the 8-bit grey pixels of `jpeg`, decoded by the same decoder as `load_grey`, as
/// a binary PGM: ONNX Runtime's side then reads exactly our input (Python's JPEG decoder
/// may round some pixels differently, and `.venv` has none anyway).
fn to_pgm(jpeg: &Path, out: &Path) {
    let img = image::open(jpeg).expect("board decodes").to_luma8();
    let (w, h) = img.dimensions();
    let mut bytes = format!("P5\n{w} {h}\n255\n").into_bytes();
    bytes.extend_from_slice(img.as_raw());
    std::fs::write(out, bytes).expect("write pgm");
}

/// The largest gaps seen between a detection and its counterpart.
#[derive(Default, Debug)]
struct Worst {
    score: f32,
    box_px: f32,
    min_iou: f32,
}

/// For each confident row of `from`, the best same-class row of `to` by IoU; returns the
/// failures as text and widens `worst`.
fn one_way(from: &[Row], to: &[Row], what: &str, worst: &mut Worst) -> Vec<String> {
    let mut bad = Vec::new();
    for (b, c, s) in from.iter().filter(|r| r.2 >= CONFIDENT) {
        let best = to
            .iter()
            .filter(|r| r.1 == *c)
            .map(|r| (iou(b, &r.0), r))
            .max_by(|x, y| x.0.total_cmp(&y.0));
        match best {
            Some((overlap, (b2, _, s2))) if overlap > MIN_IOU && (s - s2).abs() <= SCORE_TOL => {
                worst.score = worst.score.max((s - s2).abs());
                worst.min_iou = worst.min_iou.min(overlap);
                for k in 0..4 {
                    worst.box_px = worst.box_px.max((b[k] - b2[k]).abs());
                }
            }
            Some((overlap, (b2, _, s2))) => bad.push(format!(
                "{what}: class {c} score {s:.4} at {b:?}: nearest is {b2:?} score {s2:.4}, IoU {overlap:.3}"
            )),
            None => bad.push(format!(
                "{what}: class {c} score {s:.4} at {b:?} has no counterpart of its class"
            )),
        }
    }
    bad
}

#[test]
fn onnx_export_of_the_default_matches_our_detector() {
    let root = root();
    let models = root.join("pipelines/models/deeppcb-compact");
    // The images stay in the shared dataset; the project only names them. Without the
    // dataset this test fails: it checks nothing otherwise.
    let demo = root.join("../shared/datasets/deeppcb");
    assert!(
        demo.join("val.txt").is_file(),
        "the DeepPCB dataset is not at {} (README, Data)",
        demo.display()
    );
    let python = root.join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run deploy/setup.sh (it creates the venv with onnxruntime from deploy/requirements-test.txt)",
        python.display()
    );

    // Ours: the shipped weights in f32 (folded norms, channels-last, no bf16), as the
    // detector runs them with --bf16 off.
    let config: ModelConfig = serde_json::from_str(
        &std::fs::read_to_string(models.join("model.json")).expect("model.json"),
    )
    .expect("model.json parses");
    let mut det = Detector::new(config.clone(), tch::Device::Cpu, Sampling::First);
    det.load(&models.join("model.safetensors"))
        .expect("the shipped weights load");
    det.model
        .prepare_inference(InferenceOptions::fast(Bf16::Off));
    let boards = read_list(&demo, &root.join("pipelines/demo/deeppcb-sample.txt"))
        .expect("deeppcb-sample.txt");
    assert_eq!(boards.len(), 8, "the demo has eight DeepPCB boards");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut ours: Vec<Vec<Row>> = Vec::new();
    let mut cmd = Command::new(&python);
    cmd.arg(root.join("pipelines/export/ort_detect.py"))
        .arg(models.join("model.onnx"))
        .arg("--weights")
        .arg(models.join("model.safetensors"));
    for (i, b) in boards.iter().enumerate() {
        let template = b.template.as_ref().expect("DeepPCB boards have templates");
        let image = load_grey(&b.image).expect("image");
        let tpl = load_grey(template).expect("template");
        let input = compose(config.input, &image, Some(&tpl)).expect("compose");
        let out = tch::no_grad(|| det.model.detect(&[input])).expect("detect");
        ours.push(out.detections[0].rows().expect("rows"));
        let (pi, pt) = (
            dir.path().join(format!("{i}_test.pgm")),
            dir.path().join(format!("{i}_temp.pgm")),
        );
        to_pgm(&b.image, &pi);
        to_pgm(template, &pt);
        cmd.arg("--board").arg(&pi).arg(&pt);
    }

    // ONNX Runtime's.
    let run = cmd.output().expect("running .venv/bin/python");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !stderr.contains("No module named 'onnxruntime'")
            && !stderr.contains("No module named 'numpy'"),
        "{} lacks onnxruntime: run deploy/setup.sh or `.venv/bin/pip install -r deploy/requirements-test.txt`\n{stderr}",
        python.display()
    );
    assert!(run.status.success(), "ort_detect.py failed: {stderr}");
    let reply: serde_json::Value =
        serde_json::from_slice(&run.stdout).expect("ort_detect.py prints JSON");
    let recorded = reply["model"]["pcb.weights_sha256"]
        .as_str()
        .unwrap_or("none");
    let actual = reply["weights_sha256"].as_str().unwrap_or("?");
    assert_eq!(
        recorded, actual,
        "model.onnx was exported from other weights than model.safetensors: run \
         pipelines/models/deeppcb-compact/make_onnx.sh (needs .venv-bench)"
    );
    let theirs: Vec<Vec<Row>> = reply["boards"]
        .as_array()
        .expect("boards")
        .iter()
        .map(|b| {
            let f = |v: &serde_json::Value| v.as_f64().expect("number") as f32;
            let boxes = b["boxes"].as_array().expect("boxes");
            let labels = b["labels"].as_array().expect("labels");
            let scores = b["scores"].as_array().expect("scores");
            (0..boxes.len())
                .map(|k| {
                    let r = boxes[k].as_array().expect("box");
                    (
                        [f(&r[0]), f(&r[1]), f(&r[2]), f(&r[3])],
                        labels[k].as_i64().expect("label"),
                        f(&scores[k]),
                    )
                })
                .collect()
        })
        .collect();
    assert_eq!(theirs.len(), ours.len(), "one answer per board");

    // Compare.
    let mut worst = Worst {
        min_iou: 1.0,
        ..Worst::default()
    };
    let mut failures = Vec::new();
    for ((b, o), t) in boards.iter().zip(&ours).zip(&theirs) {
        let confident = |rows: &[Row]| rows.iter().filter(|r| r.2 >= CONFIDENT).count();
        let (no, nt) = (confident(o), confident(t));
        let mut board_worst = Worst {
            min_iou: 1.0,
            ..Worst::default()
        };
        let mut bad = one_way(o, t, "ours -> onnxruntime", &mut board_worst);
        bad.extend(one_way(t, o, "onnxruntime -> ours", &mut board_worst));
        if no != nt {
            bad.push(format!(
                "{no} confident detections of ours, {nt} of onnxruntime"
            ));
        }
        println!(
            "{}: {no} confident of {} (ours) / {nt} of {} (onnxruntime); max |score diff| {:.2e}, \
             max |box diff| {:.2e} px, min IoU {:.5}",
            b.name,
            o.len(),
            t.len(),
            board_worst.score,
            board_worst.box_px,
            board_worst.min_iou
        );
        worst.score = worst.score.max(board_worst.score);
        worst.box_px = worst.box_px.max(board_worst.box_px);
        worst.min_iou = worst.min_iou.min(board_worst.min_iou);
        failures.extend(bad.into_iter().map(|s| format!("{}: {s}", b.name)));
    }
    println!(
        "largest differences over {} boards: |score| {:.2e}, |box| {:.2e} px, min IoU {:.5} \
         (onnxruntime {})",
        boards.len(),
        worst.score,
        worst.box_px,
        worst.min_iou,
        reply["onnxruntime"]
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        ours.iter()
            .map(|o| o.iter().filter(|r| r.2 >= CONFIDENT).count())
            .sum::<usize>()
            > 0,
        "no confident detection on eight defective boards: the comparison would be empty"
    );
}
