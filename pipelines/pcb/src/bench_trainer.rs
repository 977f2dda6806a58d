//! `pcb bench trainer`: data-parallel training throughput on this machine — 1 rank × 1
//! thread, 1 rank × N threads and N ranks × 1 thread, the all-reduce time per step and the
//! scaling efficiency — beside the same step in torchvision with `torch.distributed` (Gloo,
//! DDP), run by `stages/trainer/bench/bench_ddp.py` in the same invocation.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pcb_trainer::{Backend, DistConfig, GradSync, ProcessGroup};
use pcb_vision::train::{Optimizer, OptimizerKind, TrainConfig};
use pcb_vision::{
    testing, Depth, Detector, InputMode, ModelConfig, Norm, Sampling, Target, Transform,
};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Flags of `pcb bench trainer`.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainerBenchArgs {
    #[command(flatten)]
    pub reference: crate::bench::ReferencePython,
    /// Timed steps after one warm-up step.
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// Images per step over all ranks (each of N ranks takes batch / N).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Side of the square training images (the trainer's default crop).
    #[arg(long, default_value_t = 320)]
    pub size: i64,
    /// Ranks (and threads) of the scaled rows (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub ranks: usize,
    /// Time ours only (no Python).
    #[arg(long)]
    pub ours_only: bool,
    /// Internal: run one rank and print its JSON result.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

/// One rank's part of a configuration (passed to a worker as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Worker {
    rank: usize,
    world: usize,
    threads: i32,
    port: u16,
    steps: usize,
    batch: usize,
    size: i64,
}

/// What a worker measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkerResult {
    rank: usize,
    /// Wall time of the timed steps.
    seconds: f64,
    /// Of which spent in the gradient all-reduce (GradSync::average).
    allreduce_seconds: f64,
    /// Trainable parameters all-reduced per step.
    params: i64,
}

/// The trainer's CPU recipe (ResNet-18 FPN-128, trainable batch norm, 7 classes) on plain
/// 3-channel images, as the Python side builds it.
fn model_config(size: i64) -> ModelConfig {
    ModelConfig {
        backbone: Depth::R18,
        norm: Norm::Batch,
        input: InputMode::Image,
        transform: Transform {
            min_size: size,
            max_size: size,
            ..Transform::default()
        },
        fpn_channels: 128,
        box_batch_size_per_image: 128,
        ..ModelConfig::default()
    }
}

fn target(size: i64) -> Target {
    let s = size as f64 / 160.0;
    Target {
        boxes: Tensor::from_slice(&[10f32, 12., 60., 50., 80., 20., 140., 90.]).view([2, 4]) * s,
        labels: Tensor::from_slice(&[1i64, 4]),
    }
}

fn run_worker(w: &Worker) -> anyhow::Result<WorkerResult> {
    tch::set_num_threads(w.threads);
    tch::manual_seed(1);
    let group = ProcessGroup::join(&DistConfig {
        master_addr: "127.0.0.1".into(),
        master_port: w.port,
        rank: w.rank,
        world: w.world,
        timeout: Duration::from_secs(300),
        job: "bench/".into(),
        backend: Backend::Gloo,
    })?;
    let mut det = Detector::new(model_config(w.size), tch::Device::Cpu, Sampling::Random);
    testing::fill(&mut det)?;
    let params = det.trainable();
    let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let count: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
    let sync = GradSync::new(
        tensors.iter().map(|t| t.shallow_clone()).collect(),
        25 << 20,
    );
    let mut opt = Optimizer::new(&TrainConfig {
        optimizer: OptimizerKind::Sgd,
        ..TrainConfig::default()
    });
    let local = w.batch / w.world + usize::from(w.rank < w.batch % w.world);
    let images: Vec<Tensor> = (0..local)
        .map(|i| testing::image(&format!("bench-{}-{i}", w.rank), w.size, w.size))
        .collect();
    let targets: Vec<Target> = (0..local).map(|_| target(w.size)).collect();
    let mut step = |allreduce: &mut f64| -> anyhow::Result<()> {
        Optimizer::zero_grad(&params);
        let losses = det.model.losses(&images, &targets)?;
        let total = losses.total();
        total.backward();
        let t = Instant::now();
        sync.average(&group, local, total.double_value(&[]))?;
        *allreduce += t.elapsed().as_secs_f64();
        opt.apply(&params, 1e-5);
        Ok(())
    };
    let mut warm = 0.0;
    step(&mut warm)?;
    group.barrier()?;
    let mut allreduce = 0.0;
    let t = Instant::now();
    for _ in 0..w.steps {
        step(&mut allreduce)?;
    }
    group.barrier()?;
    Ok(WorkerResult {
        rank: w.rank,
        seconds: t.elapsed().as_secs_f64(),
        allreduce_seconds: allreduce,
        params: count,
    })
}

/// One configuration of our side: `world` worker processes of `threads` threads each.
fn ours(args: &TrainerBenchArgs, world: usize, threads: i32) -> anyhow::Result<Row> {
    let exe = std::env::current_exe().context("locating pcb")?;
    let port = crate::server::free_port().context("a free port")?;
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let w = Worker {
                rank,
                world,
                threads,
                port,
                steps: args.steps,
                batch: args.batch,
                size: args.size,
            };
            let spec = serde_json::to_string(&w).context("worker spec")?;
            Command::new(&exe)
                .args(["bench", "trainer", "--worker", &spec])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a bench rank")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut results = Vec::new();
    for child in children {
        let out = child
            .wait_with_output()
            .context("waiting for a bench rank")?;
        if !out.status.success() {
            bail!("a bench rank failed ({})", out.status);
        }
        let r: WorkerResult = serde_json::from_slice(&out.stdout).context("rank result")?;
        results.push(r);
    }
    let seconds = results.iter().map(|r| r.seconds).fold(0.0, f64::max);
    let allreduce =
        results.iter().map(|r| r.allreduce_seconds).sum::<f64>() / results.len().max(1) as f64;
    Ok(Row {
        side: "ours (c10d Gloo)".into(),
        ranks: world,
        threads: threads as usize,
        images_per_s: (args.batch * args.steps) as f64 / seconds,
        allreduce_ms: if world > 1 {
            Some(1e3 * allreduce / args.steps as f64)
        } else {
            None
        },
        params: results.first().map(|r| r.params),
    })
}

/// One line of the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    side: String,
    ranks: usize,
    threads: usize,
    images_per_s: f64,
    allreduce_ms: Option<f64>,
    #[serde(default)]
    params: Option<i64>,
}

fn reference(args: &TrainerBenchArgs, n: usize) -> anyhow::Result<Vec<Row>> {
    args.reference.run_json(
        "torchvision + torch.distributed",
        Path::new("stages/trainer/bench/bench_ddp.py"),
        &[
            ("--steps", args.steps.to_string()),
            ("--batch", args.batch.to_string()),
            ("--size", args.size.to_string()),
            ("--ranks", n.to_string()),
        ],
    )
}

fn efficiency(rows: &[Row], side: &str, n: usize) -> Option<f64> {
    let find = |r: usize, t: usize| {
        rows.iter()
            .find(|x| x.side.starts_with(side) && x.ranks == r && x.threads == t)
            .map(|x| x.images_per_s)
    };
    Some(find(n, 1)? / (n as f64 * find(1, 1)?))
}

/// Runs both sides (or a worker) and prints the table.
pub fn run(args: &TrainerBenchArgs) -> anyhow::Result<()> {
    if let Some(spec) = &args.worker {
        let w: Worker = serde_json::from_str(spec).context("worker spec")?;
        let r = run_worker(&w)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    if args.batch == 0 || args.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let n = if args.ranks > 0 { args.ranks } else { cores };
    let mut rows = Vec::new();
    for (world, threads) in [(1, 1), (1, n), (n, 1)] {
        eprintln!("bench: ours, {world} rank(s) x {threads} thread(s)");
        rows.push(ours(args, world, threads as i32)?);
    }
    if !args.ours_only {
        rows.extend(reference(args, n)?);
    }
    println!(
        "ResNet-18 FPN-128 Faster R-CNN, trainable BN, {s}x{s} images, {b} images per step over all ranks, SGD; {k} timed steps after a warm-up; {c} cores",
        s = args.size,
        b = args.batch,
        k = args.steps,
        c = cores
    );
    println!(
        "{:<28} {:>5} {:>7} {:>10} {:>16} {:>12}",
        "side", "ranks", "threads", "images/s", "all-reduce/step", "vs torch"
    );
    for r in &rows {
        let peer = rows
            .iter()
            .find(|x| !x.side.starts_with("ours") && x.ranks == r.ranks && x.threads == r.threads);
        let ratio = match (r.side.starts_with("ours"), peer) {
            (true, Some(p)) => format!("{:.2}x", r.images_per_s / p.images_per_s),
            _ => "-".into(),
        };
        let ar = r
            .allreduce_ms
            .map_or("-".into(), |ms| format!("{ms:.1} ms"));
        println!(
            "{:<28} {:>5} {:>7} {:>10.3} {:>16} {:>12}",
            r.side, r.ranks, r.threads, r.images_per_s, ar, ratio
        );
    }
    if let Some(p) = rows.first().and_then(|r| r.params) {
        println!(
            "gradient all-reduced per step: {p} floats ({:.1} MiB)",
            p as f64 * 4.0 / 1048576.0
        );
    }
    for side in ["ours", "torchvision"] {
        if let Some(e) = efficiency(&rows, side, n) {
            println!(
                "scaling efficiency {side}: {n} ranks x 1 thread = {:.0}% of {n} x (1 rank x 1 thread)",
                100.0 * e
            );
        }
    }
    Ok(())
}
