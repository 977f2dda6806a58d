//! The trainer stage: one process per rank, data-parallel Faster R-CNN training from the
//! `pcb.shards.<k>` streams with gradients all-reduced by libtorch's own c10d (Gloo).

pub mod data;
pub mod dist;
pub mod job;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pcb_common::{Context, Problems, Shutdown, Stage, Validate, Validated};
use pcb_schemas::{
    Snapshot, TrainCandidate, TrainProgress, OBJECTS_CANDIDATES, STREAM_SHARDS,
    SUBJECT_TRAIN_CANDIDATES, SUBJECT_TRAIN_PROGRESS,
};
use pcb_vision::train::TrainConfig;
use pcb_vision::{Depth, InputMode, ModelConfig, Norm, Sampling, Transform};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use dist::{Backend, DistConfig, DistError, GradSync, ProcessGroup};
pub use job::{JobError, JobSpec, JobState};

pcb_common::declare_stage!(
    /// The trainer stage (one rank of a job).
    Trainer = Trainer
);

/// A rank's own flags; each overrides the config and torchrun's variable of the same name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrainerArgs {
    /// This rank (overrides the config and `RANK`).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Ranks in the job (overrides the config and `WORLD_SIZE`).
    #[arg(long)]
    pub world_size: Option<usize>,
    /// Address of rank 0 (overrides the config and `MASTER_ADDR`).
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Port of rank 0's store (overrides the config and `MASTER_PORT`).
    #[arg(long)]
    pub master_port: Option<u16>,
}

/// Settings of a training job and of this rank in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerSettings {
    /// The job's name: its folder under `out_dir`, its store prefix, its progress messages.
    pub job: String,
    /// Name the trained model is offered to the registry under.
    pub model_name: String,
    /// This process's rank (`RANK` overrides it).
    pub rank: usize,
    /// Ranks in the job (`WORLD_SIZE` overrides it).
    pub world_size: usize,
    /// Address of rank 0, which hosts the rendezvous store (`MASTER_ADDR`).
    pub master_addr: String,
    /// Port of the store (`MASTER_PORT`).
    pub master_port: u16,
    /// Bound on the rendezvous and on every collective, in seconds: a peer silent this
    /// long is declared lost. Must cover rank 0's evaluation after each epoch.
    pub timeout_secs: u64,
    /// The job's rendezvous secret, the same on every rank: the store's keys live under
    /// it, and the store has no way to list them, so a process that reaches the store
    /// without it can neither read the job's keys nor take a rank's place. `pcb train`
    /// draws a new one per job (rank configs are mode 0600); set the same on each rank
    /// when starting ranks by hand. Empty: none (only the job name separates jobs).
    pub rendezvous_secret: String,
    /// Folder of job folders (checkpoints and the trained candidate; rank 0 writes);
    /// `pcb train` resolves a relative one under the pipeline's data dir.
    pub out_dir: PathBuf,
    /// Shards the router writes (`router.shard_count`).
    pub shard_count: u32,
    /// Train on the shard stream up to this sequence (0: its last sequence at job start).
    pub snapshot_seq: u64,
    /// Intra-op threads for libtorch (0: libtorch's default).
    pub threads: usize,
    /// Gradient bucket size for the all-reduce, in MiB.
    pub bucket_mib: usize,
    /// Rank 0 evaluates on the `val` split after every epoch.
    pub eval: bool,
    /// Publish a sha256 of the parameters with every step (slow on big models; for checks).
    pub param_digest: bool,
    /// `random` (torchvision's) or `first` (deterministic, for reproducibility checks).
    pub sampling: SamplingChoice,
    /// Batches decoded ahead of the model.
    pub prefetch_batches: usize,
    /// `auto` (GPU `rank mod count` when CUDA is present, else the CPU), `cpu` or `cuda`.
    /// CUDA is opened at run time (`libtorch_cuda.so` through `LD_LIBRARY_PATH` or the
    /// project's libtorch), so the same binary runs on machines without it.
    pub device: DeviceChoice,
    /// Collectives engine: `auto` (NCCL when the rank is on a GPU and the NCCL shim built by
    /// `deploy/build-nccl-shim.sh` loads, else Gloo), `gloo` (GPU ranks stage through host
    /// memory) or `nccl` (an error when unavailable).
    pub backend: BackendChoice,
    /// Retraining policy for `pcb up`: start a job whenever this many new labelled images
    /// reached the shard streams since the last job's snapshot (0: only by hand).
    pub retrain_every_images: u64,
    /// The network (`pcb_vision::ModelConfig`).
    pub model: ModelConfig,
    /// Optimiser, schedule, epochs, batch size per rank, crops, augmentation.
    pub optim: TrainConfig,
}

impl Default for TrainerSettings {
    fn default() -> Self {
        TrainerSettings {
            job: "pcb".into(),
            model_name: "pcb-defects".into(),
            rank: 0,
            world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            timeout_secs: 600,
            rendezvous_secret: String::new(),
            out_dir: PathBuf::from("jobs"),
            shard_count: pcb_schemas::DEFAULT_SHARD_COUNT,
            snapshot_seq: 0,
            threads: 0,
            bucket_mib: 25,
            eval: true,
            param_digest: false,
            sampling: SamplingChoice::Random,
            prefetch_batches: 2,
            device: DeviceChoice::Auto,
            backend: BackendChoice::Auto,
            retrain_every_images: 0,
            // The CPU recipe of the README: ResNet-18 FPN with 128 channels, trainable
            // batch norm from scratch, image + template + difference at the board's scale.
            model: ModelConfig {
                backbone: Depth::R18,
                norm: Norm::Batch,
                input: InputMode::ImageTemplateDiff,
                transform: Transform {
                    min_size: 0,
                    ..Transform::default()
                },
                fpn_channels: 128,
                box_batch_size_per_image: 128,
                ..ModelConfig::default()
            },
            optim: TrainConfig {
                lr: 1e-3,
                epochs: 9,
                lr_step_epochs: 6,
                batch_size: 4,
                crop: 320,
                ..TrainConfig::default()
            },
        }
    }
}

/// How training batches sample their proposals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplingChoice {
    /// At random, as torchvision does.
    Random,
    /// The first ones: deterministic, for reproducibility checks.
    First,
}

/// Where a rank computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The rank's GPU when CUDA loads, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// A GPU (an error when none is usable).
    Cuda,
}

impl DeviceChoice {
    /// The spelling `pcb_vision::cuda::device_for` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        }
    }
}

/// The collectives engine of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// NCCL for GPU ranks when the shim loads, else Gloo.
    Auto,
    /// Gloo (GPU ranks stage through host memory).
    Gloo,
    /// NCCL (an error when unavailable).
    Nccl,
}

impl BackendChoice {
    /// The spelling `Backend::resolve` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Gloo => "gloo",
            BackendChoice::Nccl => "nccl",
        }
    }
}

/// A rank's settings, validated.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rendezvous and collectives.
    pub dist: DistConfig,
    /// The configured collectives engine (`auto`, `gloo`, `nccl`), resolved by `run`.
    pub backend: String,
    /// What to train.
    pub job: JobSpec,
    /// Registry name of the result.
    pub model_name: String,
    /// Router's shard count.
    pub shard_count: u32,
    /// Fixed snapshot end, 0 for "now".
    pub snapshot_seq: u64,
    /// libtorch threads (0: default).
    pub threads: usize,
}

impl TrainerSettings {
    /// Takes `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` from the environment, as
    /// torchrun's workers do.
    pub fn apply_torchrun_env(&mut self, p: &mut Problems) {
        fn parse<T: std::str::FromStr>(name: &str, p: &mut Problems) -> Option<T> {
            let v = std::env::var(name).ok()?;
            match v.trim().parse() {
                Ok(x) => Some(x),
                Err(_) => {
                    p.push(name, format!("{v:?} is not a number"));
                    None
                }
            }
        }
        if let Some(r) = parse("RANK", p) {
            self.rank = r;
        }
        if let Some(w) = parse("WORLD_SIZE", p) {
            self.world_size = w;
        }
        if let Ok(a) = std::env::var("MASTER_ADDR") {
            self.master_addr = a;
        }
        if let Some(port) = parse("MASTER_PORT", p) {
            self.master_port = port;
        }
    }
}

impl Stage for Trainer {
    type Settings = TrainerSettings;
    type Error = TrainerError;
    type Args = TrainerArgs;

    /// torchrun's `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`, then the flags.
    fn apply_args(args: &TrainerArgs, file: &mut FileConfig, p: &mut Problems) {
        let t = &mut file.stage.settings;
        t.apply_torchrun_env(p);
        if let Some(r) = args.rank {
            t.rank = r;
        }
        if let Some(w) = args.world_size {
            t.world_size = w;
        }
        if let Some(a) = &args.master_addr {
            t.master_addr = a.clone();
        }
        if let Some(port) = args.master_port {
            t.master_port = port;
        }
    }

    async fn run(config: Config, ctx: Context) -> Result<(), TrainerError> {
        run(config, ctx.client, ctx.shutdown).await.map(|_| ())
    }
}

impl Validate for TrainerSettings {
    type Config = Options;

    fn validate(self, p: &mut Problems) -> Option<Options> {
        let t = self;
        let job_ok = !t.job.is_empty()
            && t.job
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        p.check(
            !job_ok,
            "trainer.job",
            "must be letters, digits, '-' or '_' (it names a folder and store keys)",
        );
        p.check(
            !t.rendezvous_secret
                .chars()
                .all(|c| c.is_ascii_alphanumeric()),
            "trainer.rendezvous_secret",
            "must be letters and digits (it is part of store keys)",
        );
        p.not_blank("trainer.model_name", &t.model_name);
        p.at_least("trainer.world_size", t.world_size, 1);
        p.check(
            t.world_size > 0 && t.rank >= t.world_size,
            "trainer.rank",
            format!("{} is not below world_size {}", t.rank, t.world_size),
        );
        p.not_blank("trainer.master_addr", &t.master_addr);
        p.check(
            t.master_port == 0,
            "trainer.master_port",
            "must be a port number",
        );
        p.at_least("trainer.timeout_secs", t.timeout_secs, 1);
        p.between("trainer.shard_count", t.shard_count, 1, 1024);
        p.at_least("trainer.bucket_mib", t.bucket_mib, 1);
        p.at_least("trainer.prefetch_batches", t.prefetch_batches, 1);
        if t.device == DeviceChoice::Cuda {
            if let Err(e) = pcb_vision::cuda::device_for("cuda", 0) {
                p.push("trainer.device", format!("cuda asked for, but {e}"));
            }
        }
        p.check(
            t.backend == BackendChoice::Nccl && t.device == DeviceChoice::Cpu,
            "trainer.backend",
            "nccl needs device = \"cuda\" or \"auto\" on a machine with GPUs",
        );
        let sampling = match t.sampling {
            SamplingChoice::Random => Sampling::Random,
            SamplingChoice::First => Sampling::First,
        };
        let o = &t.optim;
        p.at_least("trainer.optim.epochs", o.epochs, 1);
        p.at_least("trainer.optim.batch_size", o.batch_size, 1);
        p.check(
            !(o.lr > 0.0 && o.lr.is_finite()),
            "trainer.optim.lr",
            "must be a positive number",
        );
        p.at_least("trainer.optim.lr_step_epochs", o.lr_step_epochs, 1);
        p.check(
            o.crop < 0,
            "trainer.optim.crop",
            "must be 0 (whole boards) or a side in pixels",
        );
        for (field, why) in o.stability_problems() {
            p.push(&format!("trainer.optim.{field}"), why);
        }
        let m = &t.model;
        p.check(
            m.num_classes < 2,
            "trainer.model.num_classes",
            "must count background and at least one defect class",
        );
        p.at_least("trainer.model.fpn_channels", m.fpn_channels, 1);
        p.at_least("trainer.model.backbone_width", m.backbone_width, 1);
        p.at_least(
            "trainer.model.representation_size",
            m.representation_size,
            1,
        );
        p.at_least("trainer.model.test_proposals", m.test_proposals, 1);
        p.at_least(
            "trainer.model.box_batch_size_per_image",
            m.box_batch_size_per_image,
            1,
        );
        Some(Options {
            dist: DistConfig {
                master_addr: t.master_addr.clone(),
                master_port: t.master_port,
                rank: t.rank,
                world: t.world_size,
                timeout: Duration::from_secs(t.timeout_secs),
                job: if t.rendezvous_secret.is_empty() {
                    format!("pcb-train/{}/", t.job)
                } else {
                    format!("pcb-train/{}/{}/", t.job, t.rendezvous_secret)
                },
                // Resolved in `run`, once CUDA is opened, from `backend`.
                backend: Backend::Gloo,
            },
            backend: t.backend.as_str().to_string(),
            job: JobSpec {
                job: t.job.clone(),
                dir: t.out_dir.join(&t.job),
                model: t.model,
                optim: t.optim,
                sampling,
                bucket_bytes: t.bucket_mib << 20,
                eval: t.eval,
                param_digest: t.param_digest,
                prefetch: t.prefetch_batches,
                device: t.device.as_str().to_string(),
            },
            model_name: t.model_name,
            shard_count: t.shard_count,
            snapshot_seq: t.snapshot_seq,
            threads: t.threads,
        })
    }
}

/// Why a rank failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// Streams could not be provisioned or `/metrics` not served.
    #[error(transparent)]
    Start(#[from] pcb_common::stage::StartError),
    /// The snapshot could not be read.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// Rendezvous or store.
    #[error(transparent)]
    Dist(#[from] DistError),
    /// The training itself.
    #[error(transparent)]
    Job(#[from] JobError),
    /// A message could not be published.
    #[error("publishing {what}: {message}")]
    Publish {
        /// What.
        what: &'static str,
        /// The error.
        message: String,
    },
    /// A blocking task panicked or was cancelled.
    #[error("the {0} task ended abnormally")]
    Task(&'static str),
}

/// What rank 0 and the others agree on before training: the snapshot's end and, on a
/// restart, the state saved with the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plan {
    last_seq: u64,
    resume: Option<JobState>,
}

/// What each rank holds of the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Share {
    train: usize,
    val: usize,
    boxes_per_class: std::collections::BTreeMap<String, u64>,
}

fn store_json<T: Serialize>(group: &ProcessGroup, key: &str, v: &T) -> Result<(), DistError> {
    let bytes = serde_json::to_vec(v).map_err(|e| DistError::Argument(e.to_string()))?;
    group.store_set(key, &bytes)
}

fn load_json<T: serde::de::DeserializeOwned>(
    group: &ProcessGroup,
    key: &str,
) -> Result<T, DistError> {
    let bytes = group.store_get(key)?;
    serde_json::from_slice(&bytes).map_err(|e| DistError::Store {
        key: key.into(),
        message: format!("not the expected JSON: {e}"),
    })
}

/// The git revision the binary was built from, when the build knew it.
fn git_revision() -> Option<String> {
    option_env!("PCB_GIT_REVISION").map(str::to_string)
}

/// Whether another rank of this host sits on the same GPU: ranks per host come from
/// torchrun's `LOCAL_WORLD_SIZE`, else all of them when the master is on loopback (as
/// `pcb train` starts them), else one.
fn shares_gpu(dist: &DistConfig, device: tch::Device) -> bool {
    if device == tch::Device::Cpu {
        return false;
    }
    let local = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| {
            let loopback = matches!(dist.master_addr.as_str(), "127.0.0.1" | "localhost" | "::1");
            if loopback {
                dist.world
            } else {
                1
            }
        });
    local > pcb_vision::cuda::device_count()
}

/// A call on the process group, run on a blocking thread (the store's calls block).
type GroupCall = Box<dyn FnOnce(&ProcessGroup) -> Result<Vec<u8>, DistError> + Send>;

/// Runs this rank of the job to its end. Rank 0 then offers the model on
/// `pcb.train.candidates` and returns the candidate.
pub async fn run(
    config: Config,
    client: async_nats::Client,
    shutdown: Shutdown,
) -> Result<Option<TrainCandidate>, TrainerError> {
    // First of all libtorch work: CUDA must be loaded before libtorch first asks for it.
    let Validated {
        metrics: metrics_cfg,
        config,
        ..
    } = config;
    let device = pcb_vision::cuda::device_for(&config.job.device, config.dist.rank)
        .map_err(|e| TrainerError::Dist(DistError::Argument(e.to_string())))?;
    let metrics = pcb_common::Metrics::new(STAGE.name());
    let js = pcb_common::stage::prepare(STAGE, &client, &metrics, &metrics_cfg, &shutdown).await?;
    if config.threads > 0 {
        tch::set_num_threads(config.threads as i32);
    }
    let heap = pcb_vision::heap::keep_freed_buffers();
    tracing::info!(%heap, "allocator");
    let (rank, world) = (config.dist.rank, config.dist.world);
    let mut dist = config.dist.clone();
    dist.backend = Backend::resolve(&config.backend, device, shares_gpu(&dist, device))?;
    tracing::info!(rank, world, ?device, backend = ?dist.backend, master = %format!("{}:{}", config.dist.master_addr, config.dist.master_port), "joining the job");
    let group = Arc::new(
        tokio::task::spawn_blocking(move || ProcessGroup::join(&dist))
            .await
            .map_err(|_| TrainerError::Task("rendezvous"))??,
    );
    let blocking = |f: GroupCall| {
        let g = group.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&g))
                .await
                .map_err(|_| TrainerError::Task("store"))?
                .map_err(TrainerError::Dist)
        }
    };
    // Rank 0 fixes the snapshot (or takes the checkpoint's) and tells the others.
    let plan: Plan = if rank == 0 {
        let resume = job::saved_state(&config.job.dir)?;
        let last_seq = match resume.as_ref().and_then(|s| s.snapshot.as_ref()) {
            Some(s) => s.last_seq,
            None if config.snapshot_seq > 0 => config.snapshot_seq,
            None => data::last_sequence(&js, STREAM_SHARDS).await?,
        };
        let plan = Plan { last_seq, resume };
        let p = plan.clone();
        blocking(Box::new(move |g| {
            store_json(g, "plan", &p).map(|_| Vec::new())
        }))
        .await?;
        plan
    } else {
        let bytes = blocking(Box::new(|g| g.store_get("plan"))).await?;
        serde_json::from_slice(&bytes).map_err(|e| DistError::Store {
            key: "plan".into(),
            message: e.to_string(),
        })?
    };
    let train_shards = data::shards_of(rank, world, config.shard_count);
    let val_shards: Vec<u32> = if rank == 0 && config.job.eval {
        (0..config.shard_count).collect()
    } else {
        Vec::new()
    };
    let data = data::read_snapshot(
        &js,
        STREAM_SHARDS,
        &train_shards,
        &val_shards,
        config.shard_count,
        plan.last_seq,
    )
    .await?;
    if data.superseded > 0 {
        tracing::info!(
            superseded = data.superseded,
            "left out records replaced by a later one of the same image (relabelled)"
        );
    }
    for letter in &data.rejected {
        tracing::warn!(reason = %letter.reason, seq = ?letter.stream_seq, "skipping an unreadable shard record");
        pcb_common::ack::publish_dead_letter(&js, letter)
            .await
            .map_err(|e| TrainerError::Publish {
                what: "a dead letter",
                message: e.to_string(),
            })?;
    }
    let share = Share {
        train: data.train.len(),
        val: data.val.len(),
        boxes_per_class: data::boxes_per_class(&data.train),
    };
    // Every rank learns every share: the step count per epoch is the longest share's, so
    // no rank leaves a collective the others still wait in.
    let shares: Vec<Share> = blocking(Box::new(move |g| {
        store_json(g, &format!("share/{rank}"), &share)?;
        let all: Vec<Share> = (0..g.world())
            .map(|r| load_json(g, &format!("share/{r}")))
            .collect::<Result<_, _>>()?;
        serde_json::to_vec(&all).map_err(|e| DistError::Argument(e.to_string()))
    }))
    .await
    .and_then(|b| {
        serde_json::from_slice(&b)
            .map_err(|e| TrainerError::Dist(DistError::Argument(e.to_string())))
    })?;
    let batch = config.job.optim.batch_size.max(1);
    let steps_per_epoch = shares
        .iter()
        .map(|s| s.train.div_ceil(batch))
        .max()
        .unwrap_or(0);
    let mut boxes = std::collections::BTreeMap::new();
    for s in &shares {
        for (k, v) in &s.boxes_per_class {
            *boxes.entry(k.clone()).or_insert(0) += v;
        }
    }
    let snapshot = Snapshot {
        stream: STREAM_SHARDS.into(),
        first_seq: 1,
        last_seq: plan.last_seq,
        train_images: shares.iter().map(|s| s.train as u64).sum(),
        val_images: shares.iter().map(|s| s.val as u64).sum(),
        boxes_per_class: boxes,
    };
    tracing::info!(
        rank,
        last_seq = plan.last_seq,
        train = snapshot.train_images,
        val = snapshot.val_images,
        steps_per_epoch,
        "snapshot agreed"
    );
    if steps_per_epoch == 0 {
        return Err(TrainerError::Job(JobError::Io {
            path: format!("{STREAM_SHARDS} up to sequence {}", plan.last_seq),
            message: "no labelled training image in the snapshot: route some first".into(),
        }));
    }
    // Progress leaves through a channel so that publishing never holds up a step.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, TrainProgress)>();
    let publisher = {
        let js = js.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut failures = 0u64;
            while let Some((kind, p)) = rx.recv().await {
                // `/metrics`: steps and epochs done.
                metrics.count(kind);
                if pcb_common::publish(&js, SUBJECT_TRAIN_PROGRESS.into(), &p)
                    .await
                    .is_err()
                {
                    failures += 1;
                }
            }
            failures
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stop.store(true, Ordering::Relaxed);
        });
    }
    let spec = config.job.clone();
    let g = group.clone();
    let snap = snapshot.clone();
    let finished = tokio::task::spawn_blocking(move || {
        job::train_rank(
            &g,
            &spec,
            &data,
            steps_per_epoch,
            &snap,
            plan.resume.as_ref(),
            |kind, p| {
                let _ = tx.send((kind, p));
            },
            &stop,
        )
    })
    .await
    .map_err(|_| TrainerError::Task("training"))?;
    let failures = publisher.await.unwrap_or(0);
    if failures > 0 {
        tracing::warn!(failures, "some progress messages could not be published");
    }
    let finished = finished?;
    let Some(artifact) = finished.artifact else {
        return Ok(None);
    };
    let bytes = std::fs::read(&artifact).map_err(|e| JobError::Io {
        path: artifact.display().to_string(),
        message: e.to_string(),
    })?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    // The weights travel through the object store: the registry never reads a file named
    // by a message.
    let object = format!(
        "{}/{}/{sha256}.safetensors",
        config.model_name, config.job.job
    );
    let upload = async {
        let store = js.get_object_store(OBJECTS_CANDIDATES).await?;
        store.put(object.as_str(), &mut bytes.as_slice()).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    upload.await.map_err(|e| TrainerError::Publish {
        what: "the candidate's weights",
        message: format!("{OBJECTS_CANDIDATES}/{object}: {e}"),
    })?;
    let candidate = TrainCandidate {
        job: config.job.job.clone(),
        model: config.model_name.clone(),
        artifact: object,
        sha256,
        model_config: serde_json::to_value(&config.job.model).unwrap_or_default(),
        hyperparameters: serde_json::json!({
            "optim": config.job.optim,
            "world_size": world,
            "sampling": format!("{:?}", config.job.sampling),
        }),
        metrics: finished.state.last_report.clone(),
        snapshot,
        epoch_losses: finished.state.epoch_losses.clone(),
        git_revision: git_revision(),
        created_at_ms: pcb_common::now_ms(),
    };
    let path = config.job.dir.join("candidate").join("candidate.json");
    let json = serde_json::to_vec_pretty(&candidate).unwrap_or_default();
    std::fs::write(&path, json).map_err(|e| JobError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    pcb_common::publish(&js, SUBJECT_TRAIN_CANDIDATES.into(), &candidate)
        .await
        .map_err(|e| TrainerError::Publish {
            what: "the candidate",
            message: e.to_string(),
        })?;
    tracing::info!(artifact = %candidate.artifact, sha256 = %candidate.sha256, "candidate offered");
    Ok(Some(candidate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut f = FileConfig::default();
        f.stage.settings.job = "a/b".into();
        f.stage.settings.world_size = 2;
        f.stage.settings.rank = 2;
        f.stage.settings.master_port = 0;
        f.stage.settings.optim.epochs = 0;
        assert_eq!(
            f.validate().unwrap_err().keys(),
            [
                "trainer.job",
                "trainer.rank",
                "trainer.master_port",
                "trainer.optim.epochs",
            ]
        );
    }

    #[test]
    fn defaults_validate_into_the_cpu_recipe() {
        let c = FileConfig::default().validate().unwrap();
        assert_eq!(c.config.dist.world, 1);
        assert_eq!(c.config.job.model.fpn_channels, 128);
        assert_eq!(c.config.job.optim.batch_size, 4);
        assert_eq!(c.config.job.dir, PathBuf::from("jobs/pcb"));
    }
}
