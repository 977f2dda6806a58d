//! `pcb bench vision`: inference and training seconds per 640x640 image for our Faster
//! R-CNN beside torchvision and ONNX Runtime (run by `stages/vision/bench/bench_reference.py`
//! in the same invocation), same weights, threads and input.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use pcb_vision::train::{Optimizer, OptimizerKind, TrainConfig};
use pcb_vision::{
    testing, Depth, Detector, InferenceOptions, InputMode, ModelConfig, Norm, Sampling, Target,
    Transform,
};
use tch::Tensor;

/// Flags of `pcb bench vision`.
#[derive(clap::Args, Clone, Debug)]
pub struct VisionBenchArgs {
    /// Python with torch 2.11, torchvision 0.26 and onnxruntime (deploy/requirements-bench.txt).
    #[arg(
        long,
        env = "PCB_BENCH_PYTHON",
        default_value = ".venv-bench/bin/python"
    )]
    pub python: String,
    /// Threads for every framework (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Image side.
    #[arg(long, default_value_t = 640)]
    pub size: i64,
    /// Models: r50, r18 or both.
    #[arg(long, default_value = "r50,r18")]
    pub models: String,
    /// Time ours only (no Python): the ratio columns then read "-".
    #[arg(long)]
    pub ours_only: bool,
}

fn timed(iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
}

fn detector(depth: Depth, size: i64) -> anyhow::Result<Detector> {
    let config = ModelConfig {
        num_classes: 7,
        backbone: depth,
        norm: Norm::Frozen,
        input: InputMode::Image,
        transform: Transform {
            min_size: size,
            max_size: size,
            ..Transform::default()
        },
        fpn_channels: 256,
        box_batch_size_per_image: 512,
        backbone_width: 64,
        representation_size: 1024,
        test_proposals: 1000,
    };
    let mut det = Detector::new(config, tch::Device::Cpu, Sampling::Random);
    testing::fill(&mut det)?;
    Ok(det)
}

/// Our timings for one backbone: (variant, seconds per image).
fn ours(depth: Depth, size: i64, iters: usize) -> anyhow::Result<Vec<(String, f64)>> {
    let mut det = detector(depth, size)?;
    let img = testing::image("bench", size, size);
    let mut rows = Vec::new();
    for (name, options) in [
        ("ours, plain", InferenceOptions::default()),
        (
            "ours, folded BN",
            InferenceOptions {
                fold_bn: true,
                ..InferenceOptions::default()
            },
        ),
        (
            "ours, folded BN + channels-last",
            InferenceOptions {
                fold_bn: true,
                channels_last: true,
                bf16: false,
                bf16_train: false,
            },
        ),
        (
            "ours, folded BN + channels-last + bf16",
            InferenceOptions {
                fold_bn: true,
                channels_last: true,
                bf16: true,
                bf16_train: false,
            },
        ),
    ] {
        det.model.prepare_inference(options);
        let s = timed(iters, || {
            tch::no_grad(|| det.model.detect(std::slice::from_ref(&img)))?;
            Ok(())
        })?;
        rows.push((format!("{name} infer"), s));
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
    let mut train_rows = Vec::new();
    for (name, options) in [
        ("ours train, plain", InferenceOptions::default()),
        (
            "ours train, folded BN + channels-last",
            InferenceOptions {
                fold_bn: true,
                channels_last: true,
                bf16: false,
                bf16_train: false,
            },
        ),
        (
            "ours train, + bf16 mixed precision",
            InferenceOptions {
                fold_bn: true,
                channels_last: true,
                bf16: false,
                bf16_train: true,
            },
        ),
    ] {
        det.model.prepare_inference(options);
        let s = timed(iters, || {
            Optimizer::zero_grad(&params);
            let l = det.model.losses(std::slice::from_ref(&img), &[target()])?;
            l.total().backward();
            opt.apply(&params, 1e-5);
            Ok(())
        })?;
        train_rows.push((name.to_string(), s));
    }
    rows.extend(train_rows);
    Ok(rows)
}

/// Runs both sides and prints the table.
pub fn run(args: &VisionBenchArgs) -> anyhow::Result<()> {
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let script = Path::new("stages/vision/bench/bench_reference.py");
    if !script.exists() {
        bail!("{} not found: run from the project root", script.display());
    }
    let reference: serde_json::Value = if args.ours_only {
        serde_json::json!({"threads": "-", "rows": {}})
    } else {
        reference(args, script)?
    };
    table(args, &reference)
}

fn reference(args: &VisionBenchArgs, script: &Path) -> anyhow::Result<serde_json::Value> {
    eprintln!("bench: torchvision and ONNX Runtime ({})", args.python);
    let out = std::process::Command::new(&args.python)
        .arg(script)
        .args(["--threads", &args.threads.to_string()])
        .args(["--iters", &args.iters.to_string()])
        .args(["--size", &args.size.to_string()])
        .args(["--models", &args.models])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| {
            format!(
                "running {} (install deploy/requirements-bench.txt)",
                args.python
            )
        })?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    serde_json::from_slice(&out.stdout).context("reference JSON")
}

fn table(args: &VisionBenchArgs, reference: &serde_json::Value) -> anyhow::Result<()> {
    println!(
        "threads: {} (ours), {} (torch); {}x{} input, 7 classes, frozen BN, deterministic weights; mean of {} after a warm-up; native bf16: {}",
        tch::get_num_threads(),
        reference["threads"],
        args.size,
        args.size,
        args.iters,
        if pcb_vision::lowp::cpu_has_bf16() {
            "yes"
        } else {
            "no (the bf16 row is emulated)"
        }
    );
    println!(
        "{:<6} {:<44} {:>10} {:>14}",
        "model", "path", "s/image", "vs torchvision"
    );
    for tag in args.models.split(',') {
        let depth = match tag {
            "r50" => Depth::R50,
            "r18" => Depth::R18,
            other => bail!("unknown model {other}"),
        };
        eprintln!("bench: ours {tag}");
        let row = &reference["rows"][tag];
        let tv_infer = row["torchvision_infer_s"].as_f64().unwrap_or(f64::NAN);
        let tv_train = row["torchvision_train_s"].as_f64().unwrap_or(f64::NAN);
        let line = |name: &str, s: f64, base: f64| {
            if base.is_finite() {
                println!("{tag:<6} {name:<44} {s:>10.3} {:>13.2}x", base / s);
            } else {
                println!("{tag:<6} {name:<44} {s:>10.3} {:>14}", "-");
            }
        };
        if !args.ours_only {
            line("torchvision infer", tv_infer, tv_infer);
            match row["onnxruntime_infer_s"].as_f64() {
                Some(s) => line("onnxruntime infer", s, tv_infer),
                None => println!("{tag:<6} onnxruntime infer: {}", row["onnxruntime_error"]),
            }
        }
        let mut first_train = true;
        for (name, s) in ours(depth, args.size, args.iters)? {
            if name.contains("train") {
                if first_train && !args.ours_only {
                    line("torchvision train", tv_train, tv_train);
                    first_train = false;
                }
                line(&name, s, tv_train);
            } else {
                line(&name, s, tv_infer);
            }
        }
    }
    Ok(())
}
