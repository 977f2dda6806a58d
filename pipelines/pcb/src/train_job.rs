//! `pcb train` over the streams: starts every local rank of a job as a `trainer` process
//! (like torchrun's workers), shows one progress bar from `pcb.train.progress`, restarts
//! the ranks from the last checkpoint when one fails, and reports the candidate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use pcb_schemas::{
    decode, TrainCandidate, TrainProgress, SCHEMA_HEADER, SUBJECT_TRAIN_CANDIDATES,
    SUBJECT_TRAIN_PROGRESS,
};

/// Flags of `pcb train` in stream mode.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// Server (default: the pipeline file's, then the one `pcb up` started).
    pub nats_url: Option<String>,
    /// Data dir override.
    pub data_dir: Option<PathBuf>,
    /// Local ranks (default: `stages.trainer.replicas`).
    pub ranks: Option<usize>,
    /// Epochs override.
    pub epochs: Option<usize>,
    /// Boards per rank and step override.
    pub batch_size: Option<usize>,
    /// Learning rate override.
    pub lr: Option<f64>,
    /// Job name override.
    pub job: Option<String>,
    /// Restarts of the whole job after a rank fails (each resumes from the checkpoint).
    pub max_restarts: u32,
    /// Plain log lines instead of a bar.
    pub plain: bool,
}

struct Rank {
    rank: usize,
    child: Child,
    log: PathBuf,
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs the job to its end; returns the candidate rank 0 offered.
pub async fn run(
    opts: JobOptions,
    shutdown: &pcb_common::Shutdown,
) -> anyhow::Result<TrainCandidate> {
    let target = crate::reach::resolve(&crate::reach::Where {
        nats_url: opts.nats_url.clone(),
        pipeline: opts.pipeline.clone(),
        data_dir: opts.data_dir.clone(),
    })?;
    let rank_nats = target.nats_as(pcb_common::Identity::Stage(pcb_schemas::StageName::Trainer));
    let data_dir = target.data_dir.clone();
    let mut pipeline = target.pipeline.clone();
    let ranks = opts
        .ranks
        .unwrap_or(pipeline.stages.trainer.replicas)
        .max(1);
    let t = &mut pipeline.stages.trainer.settings;
    if let Some(e) = opts.epochs {
        t.optim.epochs = e;
    }
    if let Some(b) = opts.batch_size {
        t.optim.batch_size = b;
    }
    if let Some(lr) = opts.lr {
        t.optim.lr = lr;
    }
    if let Some(j) = &opts.job {
        t.job = j.clone();
    }
    // A new rendezvous secret per job: a process that reaches the store without it can
    // neither read the job's keys nor join it (the rank configs that carry it are 0600).
    t.rendezvous_secret = {
        use rand::RngCore as _;
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    t.world_size = ranks;
    if t.out_dir.is_relative() {
        t.out_dir = std::env::current_dir()?.join(&data_dir).join(&t.out_dir);
    }
    if t.threads == 0 {
        // Ranks on one machine share its cores; more threads than cores only thrash.
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        t.threads = (cores / ranks).max(1);
    }
    let job = t.job.clone();
    let epochs = t.optim.epochs;
    let bin = crate::supervisor::bin_dir()?.join(pcb_schemas::StageName::Trainer.name());
    if !bin.is_file() {
        bail!(
            "trainer binary {} not found; build it first: cargo build --release --workspace",
            bin.display()
        );
    }
    let client = target.connect("pcb-train").await?;
    let mut progress = client.subscribe(SUBJECT_TRAIN_PROGRESS).await?;
    let mut candidates = client.subscribe(SUBJECT_TRAIN_CANDIDATES).await?;
    let run_dir = data_dir.join("run");
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&run_dir)?;
    std::fs::create_dir_all(&logs)?;
    let bar = if opts.plain {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{job} ({ranks} ranks)"));
    let mut attempt = 0u32;
    loop {
        let port = crate::server::free_port()?;
        pipeline.stages.trainer.settings.master_port = port;
        let mut children = Vec::new();
        for r in 0..ranks {
            pipeline.stages.trainer.settings.rank = r;
            let config = run_dir.join(format!("trainer-{job}-{r}.toml"));
            pcb_common::identity::write_secret(
                &config,
                pipeline
                    .stage_config(pcb_schemas::StageName::Trainer, r, &rank_nats)
                    .as_bytes(),
            )?;
            let log = logs.join(format!("trainer-{job}-{r}.log"));
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            let mut cmd = Command::new(&bin);
            crate::process::scrub_pcb_env(&mut cmd)
                .arg("--config")
                .arg(&config)
                .env_remove("RANK")
                .env_remove("WORLD_SIZE")
                .env_remove("MASTER_ADDR")
                .env_remove("MASTER_PORT")
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out);
            let child = crate::process::spawn_tied(cmd)
                .with_context(|| format!("starting {}", bin.display()))?;
            children.push(Rank {
                rank: r,
                child,
                log,
            });
        }
        eprintln!(
            "pcb: job {job}: {ranks} rank(s) started (store on 127.0.0.1:{port}; logs {})",
            logs.join(format!("trainer-{job}-<rank>.log")).display()
        );
        let mut candidate = None;
        let mut failed: Option<(usize, String)> = None;
        let mut last_plain = Instant::now() - Duration::from_secs(60);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    for c in &mut children {
                        crate::process::terminate(&mut c.child, Duration::from_secs(10));
                    }
                    bar.abandon();
                    bail!("interrupted; `pcb train` again resumes job {job} from its last checkpoint");
                }
                Some(msg) = progress.next() => {
                    let header = msg.headers.as_ref().and_then(|h| h.get(SCHEMA_HEADER)).map(|v| v.as_str().to_string());
                    if let Ok(p) = decode::<TrainProgress>(&msg.payload, header.as_deref()) {
                        if p.job == job && p.rank == 0 {
                            let total = u64::from(p.epochs) * u64::from(p.steps_per_epoch);
                            bar.set_length(total);
                            bar.set_position(p.global_step.min(total));
                            let val = p.val_map.map(|m| format!("  val mAP {:.2}%", m * 100.0)).unwrap_or_default();
                            let line = format!(
                                "epoch {}/{} step {}/{}  loss {:.4}  {:.2} img/s  ETA {}{val}",
                                p.epoch + 1, p.epochs, p.step, p.steps_per_epoch, p.loss,
                                p.images_per_sec, humantime::format_duration(Duration::from_secs(p.eta_secs as u64)),
                            );
                            if opts.plain {
                                if p.val_map.is_some() || last_plain.elapsed() > Duration::from_secs(10) {
                                    println!("{line}");
                                    last_plain = Instant::now();
                                }
                            } else {
                                bar.set_message(line);
                            }
                        }
                    }
                }
                Some(msg) = candidates.next() => {
                    let header = msg.headers.as_ref().and_then(|h| h.get(SCHEMA_HEADER)).map(|v| v.as_str().to_string());
                    if let Ok(c) = decode::<TrainCandidate>(&msg.payload, header.as_deref()) {
                        if c.job == job {
                            candidate = Some(c);
                        }
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    let mut all_done = true;
                    for c in &mut children {
                        match c.child.try_wait()? {
                            Some(status) if !status.success() => {
                                failed.get_or_insert((c.rank, format!("{status}")));
                            }
                            Some(_) => {}
                            None => all_done = false,
                        }
                    }
                    if failed.is_some() || all_done {
                        break;
                    }
                }
            }
        }
        if let Some((rank, status)) = failed {
            // One rank down stops the job: the others would wait in a collective.
            for c in &mut children {
                crate::process::terminate(&mut c.child, Duration::from_secs(10));
            }
            let log = &children[rank].log;
            eprintln!(
                "pcb: job {job}: rank {rank} failed ({status}); last lines of {}:\n{}",
                log.display(),
                tail(log, 5)
            );
            if attempt >= opts.max_restarts {
                bar.abandon();
                bail!("job {job} failed after {attempt} restart(s); rerun `pcb train` to resume from the last checkpoint");
            }
            attempt += 1;
            eprintln!(
                "pcb: job {job}: restart {attempt}/{} from the last checkpoint",
                opts.max_restarts
            );
            continue;
        }
        // The candidate may still be in flight when the processes exit.
        if candidate.is_none() {
            let wait = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(msg) = candidates.next().await {
                    let header = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(SCHEMA_HEADER))
                        .map(|v| v.as_str().to_string());
                    if let Ok(c) = decode::<TrainCandidate>(&msg.payload, header.as_deref()) {
                        if c.job == job {
                            return Some(c);
                        }
                    }
                }
                None
            });
            candidate = wait.await.ok().flatten();
        }
        bar.finish_and_clear();
        let c = candidate.with_context(|| {
            format!(
                "job {job} ended without offering a candidate; see {}",
                children[0].log.display()
            )
        })?;
        println!(
            "job {job}: {epochs} epoch(s) on {ranks} rank(s) done; candidate {} (sha256 {})",
            c.artifact,
            &c.sha256[..12.min(c.sha256.len())]
        );
        return Ok(c);
    }
}
