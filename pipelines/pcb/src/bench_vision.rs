//! `pcb bench vision`: inference and training seconds per 640x640 image for our Faster
//! R-CNN beside torchvision (f32 and bf16 autocast), ONNX Runtime and OpenVINO (f32 and bf16),
//! run by `stages/libs/vision/bench/bench_reference.py` in the same invocation, same weights,
//! threads and input; and how each path's detections on that input match torchvision's.

use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use pcb_vision::train::{Optimizer, OptimizerKind, TrainConfig};
use pcb_vision::{testing, Detections, Detector, InferenceOptions, ModelConfig, Sampling, Target};
use tch::{Kind, Tensor};

/// Flags of `pcb bench vision`.
#[derive(clap::Args, Clone, Debug)]
pub struct VisionBenchArgs {
    #[command(flatten)]
    pub reference: crate::bench::ReferencePython,
    /// Threads for every framework (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Timed repetitions after one warm-up (at least).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Each timing repeats until it has run at least this long, on both sides: a few
    /// calls of a 15 ms model are at the mercy of one scheduler hiccup.
    #[arg(long, default_value_t = 1.0)]
    pub min_seconds: f64,
    /// Image side.
    #[arg(long, default_value_t = 640)]
    pub size: i64,
    /// Models, comma-separated: r50 (R50-FPN), r18 (R18-FPN), compact (the ResNet-18 of
    /// pipelines/models/deeppcb-compact: 16-wide stem, 64 FPN channels, 256-wide box head,
    /// 300 proposals).
    #[arg(long, default_value = "r50,r18")]
    pub models: String,
    /// Time ours only (no Python): the ratio columns then read "-".
    #[arg(long)]
    pub ours_only: bool,
    /// The bf16 rows (ours, torchvision's autocast, OpenVINO's bf16 hint): `auto` times them
    /// only on a CPU with native bf16 (without it torchvision emulates bf16 at minutes per
    /// image), `on` always, `off` never.
    #[arg(long, value_enum, default_value_t = Bf16Rows::Auto)]
    pub bf16: Bf16Rows,
}

/// Which bf16 rows the bench times.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Rows {
    /// Only where the CPU has native bf16.
    Auto,
    /// Always (emulated where the CPU lacks it).
    On,
    /// Never.
    Off,
}

impl Bf16Rows {
    /// Whether the bf16 rows run on this CPU.
    fn run(self) -> bool {
        match self {
            Bf16Rows::Auto => pcb_vision::lowp::cpu_has_bf16(),
            Bf16Rows::On => true,
            Bf16Rows::Off => false,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Bf16Rows::Auto => "auto",
            Bf16Rows::On => "on",
            Bf16Rows::Off => "off",
        }
    }
}

/// A model of the bench; bench_reference.py builds the same one under the same tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    R50,
    R18,
    Compact,
}

impl Model {
    fn parse(tag: &str) -> anyhow::Result<Model> {
        Ok(match tag {
            "r50" => Model::R50,
            "r18" => Model::R18,
            "compact" => Model::Compact,
            other => bail!("unknown model {other} (r50, r18 or compact)"),
        })
    }

    fn label(self) -> &'static str {
        match self {
            Model::R50 => "R50-FPN",
            Model::R18 => "R18-FPN",
            Model::Compact => "compact",
        }
    }

    fn config(self, size: i64) -> ModelConfig {
        let shape = match self {
            Model::R50 => testing::BenchModel::R50,
            Model::R18 => testing::BenchModel::R18,
            Model::Compact => testing::BenchModel::Compact,
        };
        shape.config(size)
    }
}

/// Seconds per call of `f` after one warm-up: the mean of at least `iters` calls and at
/// least `min_s` seconds (bench_reference.py's rule).
fn timed(
    iters: usize,
    min_s: f64,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    let t = Instant::now();
    let mut n = 0usize;
    while n < iters.max(1) || t.elapsed().as_secs_f64() < min_s {
        f()?;
        n += 1;
    }
    Ok(t.elapsed().as_secs_f64() / n as f64)
}

fn detector(model: Model, size: i64) -> anyhow::Result<Detector> {
    let mut det = Detector::new(model.config(size), tch::Device::Cpu, Sampling::Random);
    testing::fill(&mut det)?;
    Ok(det)
}

/// One row of ours: inference seconds, training seconds where the path trains, and the
/// detections of its last inference run.
struct OurRow {
    path: &'static str,
    infer_s: f64,
    train_s: Option<f64>,
    detections: Option<Detections>,
}

/// Our timings for one model.
fn ours(
    model: Model,
    size: i64,
    (iters, min_s): (usize, f64),
    bf16: bool,
) -> anyhow::Result<Vec<OurRow>> {
    let mut det = detector(model, size)?;
    let img = testing::image("bench", size, size);
    let folded = InferenceOptions {
        fold_bn: true,
        ..InferenceOptions::default()
    };
    let fast = InferenceOptions {
        fold_bn: true,
        channels_last: true,
        ..InferenceOptions::default()
    };
    // What `pcb eval` and the detector run: oneDNN's fused kernels on packed weights.
    let fused = InferenceOptions {
        fused: true,
        ..fast
    };
    // (path, inference options, training options where the path trains): bf16 inference
    // pairs with bf16 mixed-precision training, folded BN alone has no training row.
    let mut variants = vec![
        (
            "ours, plain",
            InferenceOptions::default(),
            Some(InferenceOptions::default()),
        ),
        ("ours, folded BN", folded, None),
        ("ours, folded BN + channels-last", fast, Some(fast)),
        ("ours, folded BN + channels-last + fused", fused, None),
    ];
    if bf16 {
        variants.push((
            "ours, folded BN + channels-last + bf16",
            InferenceOptions { bf16: true, ..fast },
            Some(InferenceOptions {
                bf16_train: true,
                ..fast
            }),
        ));
        variants.push((
            "ours, folded BN + channels-last + fused + bf16",
            InferenceOptions {
                bf16: true,
                ..fused
            },
            None,
        ));
    }
    let mut rows = Vec::new();
    // Every inference first, on the deterministic weights torchvision has: the training
    // steps below move them.
    for (path, options, _) in &variants {
        det.model.prepare_inference(*options);
        let mut last = None;
        let infer_s = timed(iters, min_s, || {
            let out = tch::no_grad(|| det.model.detect(std::slice::from_ref(&img)))?;
            last = out.detections.into_iter().next();
            Ok(())
        })?;
        rows.push(OurRow {
            path,
            infer_s,
            train_s: None,
            detections: last,
        });
    }
    // The same target as the Python side: the first parity target scaled to the image.
    let scale = size as f32 / 160.0;
    let target = || Target {
        boxes: Tensor::from_slice(&[10f32, 12., 60., 50., 80., 20., 140., 90.]).view([2, 4])
            * scale as f64,
        labels: Tensor::from_slice(&[1i64, 4]),
    };
    let params = det.trainable();
    let mut opt = Optimizer::new(&TrainConfig {
        optimizer: OptimizerKind::Sgd,
        ..TrainConfig::default()
    });
    for (row, (_, _, train)) in rows.iter_mut().zip(&variants) {
        let Some(options) = train else { continue };
        det.model.prepare_inference(*options);
        row.train_s = Some(timed(iters, min_s, || {
            Optimizer::zero_grad(&params);
            let l = det.model.losses(std::slice::from_ref(&img), &[target()])?;
            l.total().backward();
            opt.apply(&params, 1e-5);
            Ok(())
        })?);
    }
    Ok(rows)
}

/// Runs both sides and prints the table.
pub fn run(args: &VisionBenchArgs) -> anyhow::Result<()> {
    // Before the Python side, which takes minutes, so that a typo fails at once.
    let models = args
        .models
        .split(',')
        .map(|t| Ok((t.to_string(), Model::parse(t)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let script = Path::new("stages/libs/vision/bench/bench_reference.py");
    if !script.exists() {
        bail!("{} not found: run from the project root", script.display());
    }
    let reference: serde_json::Value = if args.ours_only {
        serde_json::json!({"threads": "-", "rows": {}})
    } else {
        reference(args, script)?
    };
    table(args, &models, &reference)
}

fn reference(args: &VisionBenchArgs, script: &Path) -> anyhow::Result<serde_json::Value> {
    args.reference.run_json(
        "torchvision, ONNX Runtime and OpenVINO",
        script,
        &[
            ("--threads", args.threads.to_string()),
            ("--iters", args.iters.to_string()),
            ("--min-seconds", args.min_seconds.to_string()),
            ("--size", args.size.to_string()),
            ("--models", args.models.clone()),
            ("--bf16", args.bf16.as_str().to_string()),
        ],
    )
}

/// One table row: the ratio columns are torchvision's f32 seconds over this path's (above
/// 1: faster than torchvision); a path without training leaves its training cells blank.
fn line(model: &str, path: &str, infer: f64, train: Option<f64>, base: (f64, f64)) {
    let ratio = |s: f64, base: f64| {
        if base.is_finite() {
            format!("{:.2}x", base / s)
        } else {
            "-".to_string()
        }
    };
    let (train_s, train_ratio) = match train {
        Some(s) => (format!("{s:.3}"), ratio(s, base.1)),
        None => (String::new(), String::new()),
    };
    println!(
        "{model:<8} {path:<46} {infer:>9.3} {:>14} {train_s:>9} {train_ratio:>14}",
        ratio(infer, base.0)
    );
}

/// Every number under `v`, nested arrays flattened in order.
fn numbers(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(numbers).collect(),
        v => v.as_f64().into_iter().collect(),
    }
}

/// Whether a row has a tolerance to meet: ours in f32 must match torchvision as the parity
/// tests ask (stages/libs/vision/tests/parity.rs); bf16 paths only report.
const PARITY_SCORE: f64 = 1e-3;
const PARITY_BOX: f64 = 1e-3;

/// How `ours` matches torchvision's f32 detections `theirs` (bench_reference.py's
/// `agreement`, the same measure): each of torchvision's top 20 (the tail holds near-equal
/// scores) is matched to our nearest box of the same label anywhere in our list, since
/// near-equal scores come out in either order; boxes relative to at least 10 px. Returns the
/// line and whether it is within the parity tests' tolerance.
fn agreement(ours: &Detections, theirs: &serde_json::Value) -> anyhow::Result<(String, bool)> {
    const TOP: usize = 20;
    const BOX_FLOOR: f64 = 10.0;
    let to_vec = |t: &Tensor| -> anyhow::Result<Vec<f64>> {
        Ok(Vec::<f64>::try_from(
            &t.to_kind(Kind::Double).reshape([-1]),
        )?)
    };
    let (boxes, scores) = (to_vec(&ours.boxes)?, to_vec(&ours.scores)?);
    let labels = to_vec(&ours.labels)?;
    let (ref_boxes, ref_scores) = (numbers(&theirs["boxes"]), numbers(&theirs["scores"]));
    let ref_labels = numbers(&theirs["labels"]);
    let n = TOP.min(ref_scores.len());
    if ref_boxes.len() < 4 * n || ref_labels.len() < n || boxes.len() < 4 * scores.len() {
        bail!("detections: boxes or labels missing");
    }
    let (mut unmatched, mut worst_box, mut worst_score) = (0, 0.0f64, 0.0f64);
    for k in 0..n {
        let rb = &ref_boxes[4 * k..4 * k + 4];
        let distance = |j: usize| {
            (0..4)
                .map(|c| (boxes[4 * j + c] - rb[c]).abs() / rb[c].abs().max(BOX_FLOOR))
                .fold(0.0, f64::max)
        };
        let nearest = (0..scores.len())
            .filter(|&j| labels[j] == ref_labels[k])
            .map(|j| (distance(j), j))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        match nearest {
            Some((d, j)) => {
                worst_box = worst_box.max(d);
                worst_score = worst_score.max((scores[j] - ref_scores[k]).abs());
            }
            None => unmatched += 1,
        }
    }
    let ok = scores.len() == ref_scores.len()
        && unmatched == 0
        && worst_score <= PARITY_SCORE
        && worst_box <= PARITY_BOX;
    Ok((
        format!(
            "{} vs {} detections, top {n}: {unmatched} unmatched, box {worst_box:.1e}, score {worst_score:.1e}",
            scores.len(),
            ref_scores.len()
        ),
        ok,
    ))
}

fn table(
    args: &VisionBenchArgs,
    models: &[(String, Model)],
    reference: &serde_json::Value,
) -> anyhow::Result<()> {
    let native_bf16 = if pcb_vision::lowp::cpu_has_bf16() {
        "yes"
    } else if !args.bf16.run() {
        "no (bf16 rows left out; --bf16 on times the emulation)"
    } else if args.ours_only {
        "no (our bf16 row is emulated)"
    } else {
        "no (our and torchvision's bf16 rows are emulated; OpenVINO's notes say what it ran)"
    };
    // A string ("-" with --ours-only) without JSON's quotes.
    let threads = match &reference["threads"] {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    println!(
        "threads: {} (ours), {threads} (torch, OpenVINO); {}x{} input, 7 classes, frozen BN, deterministic weights; mean of at least {} runs and {} s after a warm-up; native bf16: {native_bf16}",
        tch::get_num_threads(),
        args.size,
        args.size,
        args.iters,
        args.min_seconds,
    );
    // Set at start by main; this call reports what that did. The reference rows run in
    // their own Python process with glibc's defaults.
    println!(
        "ours: {}; torch, OpenVINO: their own process, glibc's default heap",
        pcb_vision::heap::keep_freed_buffers()
    );
    if models.iter().any(|(_, m)| *m == Model::Compact) {
        println!("compact: ResNet-18 FPN, 16-wide stem, 64 FPN channels, 256-wide box head, 300 proposals at inference");
    }
    println!(
        "{:<8} {:<46} {:>9} {:>14} {:>9} {:>14}",
        "model", "path", "infer s", "vs torchvision", "train s", "vs torchvision"
    );
    for (tag, model) in models {
        let label = model.label();
        eprintln!("bench: ours {tag}");
        let row = &reference["rows"][tag.as_str()];
        let base = (
            row["torchvision_infer_s"].as_f64().unwrap_or(f64::NAN),
            row["torchvision_train_s"].as_f64().unwrap_or(f64::NAN),
        );
        // Reference paths, torchvision's first, in the script's order.
        let mut agreements = Vec::new();
        for p in row["paths"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let path = p["path"].as_str().unwrap_or("?");
            match p["infer_s"].as_f64() {
                Some(s) => line(label, path, s, p["train_s"].as_f64(), base),
                None => println!("{label:<8} {path}: {}", p["error"]),
            }
            if let Some(a) = p["agreement"].as_str() {
                agreements.push(format!("{path}: {a}"));
            }
        }
        let mut mismatch = false;
        for r in ours(
            *model,
            args.size,
            (args.iters, args.min_seconds),
            args.bf16.run(),
        )? {
            line(label, r.path, r.infer_s, r.train_s, base);
            if let (Some(d), false) = (&r.detections, args.ours_only) {
                let (text, ok) = agreement(d, &row["detections"])?;
                // Only our f32 paths have a tolerance to meet; bf16 rounding moves boxes.
                let f32_path = !r.path.contains("bf16");
                mismatch |= f32_path && !ok;
                let flag = if f32_path && !ok {
                    " (OUTSIDE the parity tolerance)"
                } else {
                    ""
                };
                agreements.push(format!("{}: {text}{flag}", r.path));
            }
        }
        for note in row["notes"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            println!("  {label}: {}", note.as_str().unwrap_or("?"));
        }
        if !agreements.is_empty() {
            println!("  {label}: detections on the bench input against torchvision f32:");
            for a in &agreements {
                println!("    {a}");
            }
        }
        if mismatch {
            eprintln!("bench: {label}: our f32 detections differ from torchvision's beyond the parity tolerance (score {PARITY_SCORE}, box {PARITY_BOX} relative)");
        }
    }
    Ok(())
}
