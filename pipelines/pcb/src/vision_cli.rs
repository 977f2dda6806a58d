//! `pcb train` and `pcb eval`: the vision core on a DeepPCB-layout folder and list file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use pcb_vision::data::read_list;
use pcb_vision::evaluate::DEEPPCB_CLASSES;
use pcb_vision::train::{OptimizerKind, TrainConfig};
use pcb_vision::{Depth, Detector, InputMode, ModelConfig, Norm, Sampling, Transform};

/// The model's shape, shared by train and eval.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Backbone: r50 (the reference) or r18 (lighter, for CPUs).
    #[arg(long, default_value = "r18", value_parser = ["r18", "r50"])]
    pub backbone: String,
    /// Batch norm: frozen (fine-tuning a checkpoint) or batch (from scratch).
    #[arg(long, default_value = "batch", value_parser = ["frozen", "batch"])]
    pub norm: String,
    /// Input: the image alone, or image, template and their difference.
    #[arg(long, default_value = "image-template-diff", value_parser = ["image", "image-template-diff"])]
    pub input: String,
    /// Shorter side after resizing (0: keep each board's own size).
    #[arg(long, default_value_t = 640)]
    pub min_size: i64,
    /// Longer side at most.
    #[arg(long, default_value_t = 640)]
    pub max_size: i64,
    /// Torch threads (0: libtorch's default, one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Channels of the pyramid, RPN and RoI features (torchvision: 256; 128 or 64 train
    /// several times faster on CPUs).
    #[arg(long, default_value_t = 256)]
    pub fpn_channels: i64,
    /// Proposals per board for the box-head losses when training (torchvision: 512).
    #[arg(long, default_value_t = 512)]
    pub box_batch_size: i64,
    /// Channels of the backbone's stem and first stage, doubling stage by stage
    /// (torchvision: 64; 16 or 32 make a compact model).
    #[arg(long, default_value_t = 64)]
    pub backbone_width: i64,
    /// Width of the box head's two fully connected layers (torchvision: 1024).
    #[arg(long, default_value_t = 1024)]
    pub representation_size: i64,
    /// Proposals kept per board at inference (torchvision: 1000).
    #[arg(long, default_value_t = 1000)]
    pub test_proposals: i64,
    /// Turn off the CPU speed-ups (norms folded into convolutions, channels-last, bf16).
    #[arg(long)]
    pub plain: bool,
    /// Inference in bf16: auto (where the CPU computes bf16 natively), on or off.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub bf16: String,
    /// Train with bf16 mixed precision (convolutions and box-head products in bf16 on f32
    /// weights); for CPUs with native bf16.
    #[arg(long)]
    pub bf16_train: bool,
    /// Device: auto (a GPU when CUDA loads and sees one, else the CPU), cpu, or cuda (an
    /// error when no GPU is usable).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
}

impl ModelArgs {
    /// The device `--device` asks for, said on stderr (with why, when `auto` falls back to
    /// the CPU). Call it before any other libtorch work: libtorch decides once, at its
    /// first operation that asks (seeding does), whether CUDA exists, and keeps "no" for
    /// the life of the process when libtorch_cuda was not loaded by then.
    pub fn device(&self) -> anyhow::Result<tch::Device> {
        let device = pcb_vision::cuda::device_for(&self.device, 0)
            .with_context(|| format!("--device {}", self.device))?;
        match (device, self.device.as_str()) {
            (tch::Device::Cpu, "auto") => match pcb_vision::cuda::load() {
                Err(e) => eprintln!("device: cpu (no GPU: {e})"),
                Ok(()) => eprintln!("device: cpu (CUDA loaded, but it sees no GPU)"),
            },
            (d, _) => eprintln!("device: {d:?}"),
        }
        Ok(device)
    }

    /// The speed-ups these flags ask for.
    pub fn speed(&self) -> pcb_vision::InferenceOptions {
        if self.plain {
            return pcb_vision::InferenceOptions::default();
        }
        pcb_vision::InferenceOptions {
            bf16_train: self.bf16_train,
            ..pcb_vision::InferenceOptions::fast(self.bf16.parse().unwrap_or_default())
        }
    }

    /// The model configuration these flags describe.
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            num_classes: DEEPPCB_CLASSES.len() as i64 + 1,
            backbone: if self.backbone == "r50" {
                Depth::R50
            } else {
                Depth::R18
            },
            norm: if self.norm == "frozen" {
                Norm::Frozen
            } else {
                Norm::Batch
            },
            input: if self.input == "image" {
                InputMode::Image
            } else {
                InputMode::ImageTemplateDiff
            },
            transform: Transform {
                min_size: self.min_size,
                max_size: self.max_size,
                ..Transform::default()
            },
            fpn_channels: self.fpn_channels,
            box_batch_size_per_image: self.box_batch_size,
            backbone_width: self.backbone_width,
            representation_size: self.representation_size,
            test_proposals: self.test_proposals,
        }
    }
}

/// Flags of `pcb train`.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Train in this process on a dataset folder (DeepPCB layout, such as
    /// ../shared/datasets/deeppcb) instead of a job over the shard streams.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// List file of the training boards, relative to --data unless absolute.
    #[arg(long, default_value = "trainval.txt")]
    pub list: PathBuf,
    /// Checkpoint folder of a folder run: written after every epoch, resumed from when
    /// present.
    #[arg(long, default_value = ".pcb-data/train")]
    pub out: PathBuf,
    /// Start from these weights (a torchvision export in safetensors, same names).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Optimiser.
    #[arg(long, default_value = "adam", value_parser = ["adam", "sgd"])]
    pub optimizer: String,
    /// Learning rate [folder default: 1e-3; streams: the pipeline file's].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Epochs [folder default: 12; streams: the pipeline file's].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Multiply the learning rate by 0.1 every this many epochs.
    #[arg(long, default_value_t = 3)]
    pub lr_step_epochs: usize,
    /// Boards per step (per rank over the streams) [folder default: 2; streams: the
    /// pipeline file's].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Use only the first N boards of the list (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Backbone stages trained, from the top (5: all; torchvision fine-tunes 3, keeping
    /// conv1 and layer1 as the checkpoint has them).
    #[arg(long, default_value_t = 5)]
    pub trainable_layers: usize,
    /// Train on random square crops of this side (0: whole boards); with `--min-size 0`
    /// the boards keep their scale, so a model trained on crops detects on whole boards.
    #[arg(long, default_value_t = 0)]
    pub crop: i64,
    /// Folder runs: a file of hard negatives, one `<image> x1 y1 x2 y2` line per box known
    /// to hold no defect (a box an operator deleted; `<image>` as the list names it): the
    /// box stage always trains on them as background.
    #[arg(long, value_name = "FILE")]
    pub negatives: Option<PathBuf>,
    /// Seed of the initial weights, the board order of each epoch and the RoI sampling.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Clip the gradients' global L2 norm to this before every step (0: no clipping).
    #[arg(long, default_value_t = pcb_vision::train::DEFAULT_CLIP_GRAD_NORM)]
    pub clip_grad_norm: f64,
    /// Optimiser steps over which the learning rate ramps up linearly from 0.1% (0: none).
    #[arg(long, default_value_t = 250)]
    pub warmup_steps: usize,
    /// Loss-spike guard: a running mean of 50 step losses (or an epoch's mean) above this
    /// many times the last good epoch's mean sends the run back to that epoch's checkpoint
    /// with half the learning rate (0: no guard).
    #[arg(long, default_value_t = 1.5)]
    pub spike_factor: f64,
    /// Streams: local ranks to start (default: the pipeline file's stages.trainer.replicas).
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Streams: NATS server (default: the pipeline file's, then the one `pcb up` started).
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Streams: pipeline file holding the job's settings ([stages.trainer.settings]).
    #[arg(long, default_value = "pipelines/local.toml", env = "PCB_PIPELINE")]
    pub pipeline: PathBuf,
    /// Streams: data dir (default: the pipeline file's).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Streams: job name (its checkpoint folder; the same name resumes).
    #[arg(long)]
    pub job: Option<String>,
    /// Streams: restarts of every rank from the last checkpoint after one fails.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    #[command(flatten)]
    pub model: ModelArgs,
}

impl TrainArgs {
    /// The stream job these flags describe.
    pub fn job_options(&self) -> crate::train_job::JobOptions {
        crate::train_job::JobOptions {
            pipeline: self.pipeline.clone(),
            nats_url: self.nats_url.clone(),
            data_dir: self.data_dir.clone(),
            ranks: self.ranks,
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            job: self.job.clone(),
            max_restarts: self.max_restarts,
            plain: !std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

/// Flags of `pcb eval`.
#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    /// Dataset root (DeepPCB layout).
    #[arg(long, default_value = "../shared/datasets/deeppcb")]
    pub data: PathBuf,
    /// List file of the evaluated boards, relative to --data unless absolute.
    #[arg(long, default_value = "val.txt")]
    pub list: PathBuf,
    /// Weights (safetensors): a `pcb train` folder's model.safetensors (its model.json then
    /// gives the model's shape, overriding the flags below) or any export.
    #[arg(long)]
    pub weights: PathBuf,
    /// JSON report.
    #[arg(long, default_value = "eval.json")]
    pub report: PathBuf,
    /// Precision-recall curves.
    #[arg(long, default_value = "eval-pr.png")]
    pub plot: PathBuf,
    /// Use only the first N boards of the list (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Also write each board's ground truth and detections, one JSON object a line (what a
    /// review queue ranks by).
    #[arg(long)]
    pub per_image: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

fn list_path(data: &Path, list: &Path) -> PathBuf {
    if list.is_absolute() {
        list.to_path_buf()
    } else {
        data.join(list)
    }
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn threads(n: i32) {
    if n > 0 {
        tch::set_num_threads(n);
    }
}

/// The boards of `list` under `data`, the first `limit` of them when not 0.
fn boards(
    data: &Path,
    list: &Path,
    limit: usize,
) -> anyhow::Result<Vec<pcb_vision::data::BoardFile>> {
    if !data.is_dir() {
        bail!(
            "dataset folder {} not found (DeepPCB layout expected; see README)",
            data.display()
        );
    }
    let mut files = read_list(data, &list_path(data, list))?;
    if limit > 0 {
        files.truncate(limit);
    }
    Ok(files)
}

/// `pcb train`.
pub fn train(args: &TrainArgs, data: &Path) -> anyhow::Result<()> {
    // First of all libtorch work (the seed included): it fixes whether CUDA exists.
    let device = args.model.device()?;
    if args.model.bf16_train && device == tch::Device::Cpu && !pcb_vision::lowp::cpu_has_bf16() {
        // Not refused (the result is the same), but a user following the bf16 recipe on
        // such a CPU should know why it crawls.
        eprintln!(
            "warning: --bf16-train on a CPU without native bf16 (AVX-512 BF16 or AMX): \
             libtorch emulates it, slower than f32 here; drop the flag"
        );
    }
    threads(args.model.threads);
    let mut files = boards(data, &args.list, args.limit)?;
    if let Some(path) = &args.negatives {
        let n = pcb_vision::data::add_negatives(&mut files, path)?;
        eprintln!("hard negatives: {n} boxes from {}", path.display());
    }
    // The same seed gives the same initial weights, as the trainer ranks do.
    tch::manual_seed(args.seed as i64);
    let mut det = Detector::new(args.model.config(), device, Sampling::Random);
    if let Some(w) = &args.weights {
        det.load(w)
            .with_context(|| format!("initial weights {}", w.display()))?;
    }
    det.model.prepare_inference(args.model.speed());
    det.set_trainable_backbone_layers(args.trainable_layers);
    let cfg = TrainConfig {
        optimizer: if args.optimizer == "sgd" {
            OptimizerKind::Sgd
        } else {
            OptimizerKind::Adam
        },
        lr: args.lr.unwrap_or(1e-3),
        epochs: args.epochs.unwrap_or(12),
        lr_step_epochs: args.lr_step_epochs,
        batch_size: args.batch_size.unwrap_or(2),
        seed: args.seed,
        weight_decay: if args.optimizer == "sgd" { 1e-4 } else { 0.0 },
        crop: args.crop,
        clip_grad_norm: args.clip_grad_norm,
        warmup_steps: args.warmup_steps,
        spike: pcb_vision::stability::SpikeGuardConfig {
            factor: args.spike_factor,
            ..Default::default()
        },
        ..TrainConfig::default()
    };
    let problems = cfg.stability_problems();
    if !problems.is_empty() {
        bail!(
            "{}",
            problems
                .iter()
                .map(|(field, why)| format!("{field}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("model.json"),
        serde_json::to_string_pretty(&args.model.config())?,
    )?;
    eprintln!(
        "training {:?} on {} boards for {} epochs into {}",
        args.model.backbone,
        files.len(),
        cfg.epochs,
        args.out.display()
    );
    let pb = bar(
        files.len() as u64,
        "epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
    );
    // Without a terminal the bar is hidden; a line every 50 boards keeps logs informative.
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let state = pcb_vision::train::train(&mut det, &files, &cfg, &args.out, |p| {
        if let Some(r) = &p.recovery {
            pb.println(format!("recovered: {r}"));
        }
        if plain && (p.done % 50 < cfg.batch_size || p.done >= p.total) {
            eprintln!(
                "epoch {}/{} {}/{} loss {:.3} lr {:.2e} grad norm {:.2} {:.2} img/s",
                p.epoch + 1,
                cfg.epochs,
                p.done,
                p.total,
                p.loss,
                p.lr,
                p.grad_norm,
                p.images_per_sec
            );
        }
        pb.set_prefix(format!("{}/{}", p.epoch + 1, cfg.epochs));
        pb.set_position(p.done as u64);
        pb.set_message(format!("loss {:.3} {:.2} img/s", p.loss, p.images_per_sec));
        if p.done >= p.total {
            pb.println(format!(
                "epoch {} done: mean loss {:.3}, lr {:.2e}, {}, {:.2} img/s",
                p.epoch + 1,
                p.mean_loss,
                p.lr,
                p.grads,
                p.images_per_sec
            ));
            pb.reset();
        }
    })?;
    pb.finish_and_clear();
    println!(
        "trained {} epochs ({} steps, {:.0} s); mean loss per epoch: {}",
        state.epochs_done,
        state.step,
        state.seconds,
        state
            .epoch_losses
            .iter()
            .map(|l| format!("{l:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(last) = state.grad_stats.last() {
        println!("last epoch: {last}");
    }
    println!(
        "loss-spike recoveries: {}{}",
        state.recoveries.len(),
        state
            .recoveries
            .iter()
            .map(|r| format!("\n  {r}"))
            .collect::<String>()
    );
    println!("weights: {}", args.out.join("model.safetensors").display());
    Ok(())
}

/// `pcb eval`.
pub fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    let device = args.model.device()?;
    threads(args.model.threads);
    let files = boards(&args.data, &args.list, args.limit)?;
    // A `pcb train` folder records the model's shape beside the weights; use it so that
    // the flags need not be repeated (and cannot disagree).
    let recorded = args.weights.with_file_name("model.json");
    let config: ModelConfig = if recorded.exists() {
        let text = std::fs::read_to_string(&recorded)?;
        let c = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", recorded.display()))?;
        eprintln!("model shape from {}", recorded.display());
        c
    } else {
        args.model.config()
    };
    let mut det = Detector::new(config, device, Sampling::Random);
    det.load(&args.weights)
        .with_context(|| format!("weights {}", args.weights.display()))?;
    let mut speed = args.model.speed();
    // `auto` means a CPU with native bf16; a GPU keeps f32 unless asked.
    if det.vs.device() != tch::Device::Cpu && args.model.bf16 == "auto" {
        speed.bf16 = false;
    }
    eprintln!("inference in {}", if speed.bf16 { "bf16" } else { "f32" });
    det.model.prepare_inference(speed);
    let pb = bar(files.len() as u64, "eval [{bar:30}] {pos}/{len} eta {eta}");
    let (report, per_image) =
        pcb_vision::evaluate::evaluate(&det, &files, &DEEPPCB_CLASSES, |n| {
            pb.set_position(n as u64)
        })?;
    pb.finish_and_clear();
    if let Some(path) = &args.per_image {
        let mut lines = String::new();
        for r in &per_image {
            lines.push_str(&serde_json::to_string(r)?);
            lines.push('\n');
        }
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    std::fs::write(&args.report, report.to_json()?)
        .with_context(|| format!("writing {}", args.report.display()))?;
    pcb_evaluation::plot_pr_curves(&report, &args.plot)?;
    print!("{}", report.table());
    println!(
        "report: {}  curves: {}",
        args.report.display(),
        args.plot.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Eval {
        #[command(flatten)]
        args: EvalArgs,
    }

    #[test]
    fn eval_writes_a_report_and_on_request_each_boards_detections() {
        // Parsing: without --per-image nothing is asked of it (an empty default would make
        // clap refuse every plain `pcb eval`).
        let plain = Eval::try_parse_from(["eval", "--weights", "w.safetensors"]).expect("parses");
        assert_eq!(plain.args.per_image, None);
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("boards");
        pcb_synth::generate(
            &pcb_synth::SynthOptions {
                count: 2,
                seed: 5,
                size: 128,
                val_fraction: 0.0,
            },
            &data,
            &mut |_, _| {},
        )
        .expect("synth");
        let weights = dir.path().join("model.safetensors");
        std::fs::write(&weights, crate::default_model::WEIGHTS).expect("weights");
        std::fs::write(
            dir.path().join("model.json"),
            serde_json::to_string(&crate::default_model::config().expect("config")).expect("json"),
        )
        .expect("model.json");
        let out = |name: &str| dir.path().join(name).display().to_string();
        let data_s = data.display().to_string();
        let weights_s = weights.display().to_string();
        let (report, plot, per) = (out("eval.json"), out("pr.png"), out("per.jsonl"));
        let mut argv = vec![
            "eval",
            "--data",
            &data_s,
            "--list",
            "trainval.txt",
            "--weights",
            &weights_s,
            "--report",
            &report,
            "--plot",
            &plot,
            "--bf16",
            "off",
        ];
        eval(&Eval::try_parse_from(argv.clone()).expect("parses").args).expect("plain eval");
        assert!(std::path::Path::new(&report).is_file());
        assert!(!std::path::Path::new(&per).exists());
        argv.extend(["--per-image", &per]);
        eval(&Eval::try_parse_from(argv).expect("parses").args).expect("eval");
        let lines: Vec<pcb_evaluation::ImageResult> = std::fs::read_to_string(&per)
            .expect("per-image file")
            .lines()
            .map(|l| serde_json::from_str(l).expect("an image result"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines.iter().all(|r| !r.ground_truth.is_empty()),
            "{lines:?}"
        );
    }
}
