//! `pcb up` and `pcb demo`: a private nats-server (unless one is given), the streams, one
//! process per stage replica, restarts of crashed stages, and a clean stop of everything.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::pipeline::{PipelineFile, STAGES};
use crate::server::NatsServer;

/// What `up` and `demo` start from.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// An existing server instead of the private one.
    pub nats_url: Option<String>,
    /// The watched folder (default `<data_dir>/inbox`).
    pub watch: Option<PathBuf>,
    /// Override of the pipeline file's `data_dir`.
    pub data_dir: Option<PathBuf>,
    /// Override of the viewer's address (`stages.viewer.settings.addr`).
    pub viewer_addr: Option<String>,
    /// Register the shipped default model when the registry has no version of the
    /// detector's model.
    pub default_model: bool,
}

struct StageProcess {
    stage: &'static str,
    replica: usize,
    config: PathBuf,
    log: PathBuf,
    child: Child,
    restarts: u32,
    last_start: Instant,
    /// No longer restarted (a viewer that cannot start); the pipeline runs on without it.
    given_up: bool,
}

/// A started pipeline.
pub struct Running {
    server: Option<NatsServer>,
    stages: Vec<StageProcess>,
    bin_dir: PathBuf,
    /// The NATS URL everything uses.
    pub nats_url: String,
    /// The watched folder.
    pub watch_dir: PathBuf,
    /// The data dir.
    pub data_dir: PathBuf,
    /// The pipeline as started.
    pub pipeline: PipelineFile,
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Where the stage binaries are: `$PCB_BIN_DIR`, else beside `pcb` itself.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("PCB_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("locating the pcb binary")?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The file where `up` records the URL of its server, for `pcb status`.
pub fn url_file(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("nats.url")
}

impl Running {
    /// Starts the server (if needed), applies the streams and starts every stage.
    pub async fn start(opts: &UpOptions) -> anyhow::Result<Running> {
        let mut pipeline = PipelineFile::load(&opts.pipeline)?;
        let data_dir = absolute(
            opts.data_dir
                .as_ref()
                .unwrap_or(&pipeline.pipeline.data_dir),
        );
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating data dir {}", data_dir.display()))?;
        let watch_dir = match &opts.watch {
            Some(w) => absolute(w),
            None if pipeline.stages.ingester.settings.watch_dir == Path::new("inbox") => {
                data_dir.join("inbox")
            }
            None => absolute(&pipeline.stages.ingester.settings.watch_dir),
        };
        pipeline.stages.ingester.settings.watch_dir = watch_dir.clone();
        pipeline.pipeline.data_dir = data_dir.clone();
        if let Some(addr) = &opts.viewer_addr {
            pipeline.stages.viewer.settings.addr = addr.clone();
        }
        let viewer_url = viewer_url_file(&data_dir);
        let _ = std::fs::remove_file(&viewer_url);
        pipeline.stages.viewer.settings.url_file = viewer_url.display().to_string();
        let bin_dir = bin_dir()?;
        for stage in STAGES {
            if !bin_dir.join(stage).is_file() {
                bail!(
                    "stage binary {} not found; build every stage first: cargo build --release --workspace",
                    bin_dir.join(stage).display()
                );
            }
        }
        let url = opts
            .nats_url
            .clone()
            .or_else(|| (!pipeline.nats.url.is_empty()).then(|| pipeline.nats.url.clone()));
        let (server, nats_url) = match url {
            Some(u) => (None, u),
            None => {
                let dir = data_dir.join("nats");
                let s = tokio::task::spawn_blocking(move || NatsServer::start(&dir, 0)).await??;
                let u = s.url();
                eprintln!(
                    "pcb: private nats-server at {u} (store {})",
                    s.dir().display()
                );
                (Some(s), u)
            }
        };
        let nats = pcb_common::NatsConfig {
            url: nats_url.clone(),
            ..pipeline.nats.clone()
        };
        let client = pcb_common::connect(&nats, "pcb")
            .await
            .with_context(|| format!("connecting to {nats_url}"))?;
        let js = async_nats::jetstream::new(client.clone());
        let applied = pcb_common::apply_topology(&js, &pipeline.streams).await?;
        for (name, what) in applied {
            tracing::info!(stream = name, ?what, "stream");
        }
        let run_dir = data_dir.join("run");
        let configs = pipeline.write_stage_configs(&run_dir, &nats_url)?;
        std::fs::write(url_file(&data_dir), &nats_url)?;
        let logs = data_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut running = Running {
            server,
            stages: Vec::new(),
            bin_dir,
            nats_url,
            watch_dir,
            data_dir,
            pipeline,
        };
        for (stage, replica, config) in configs {
            let log = logs.join(format!("{stage}-{replica}.log"));
            let child = spawn_stage(&running.bin_dir, stage, &config, &log)?;
            running.stages.push(StageProcess {
                stage,
                replica,
                config,
                log,
                child,
                restarts: 0,
                last_start: Instant::now(),
                given_up: false,
            });
        }
        Ok(running)
    }

    /// The viewer's URL, once it listens (waits up to `wait`); None when it is off or
    /// did not come up.
    pub fn viewer_url(&self, wait: Duration) -> Option<String> {
        if self.pipeline.stages.viewer.replicas == 0 {
            return None;
        }
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(url) = std::fs::read_to_string(viewer_url_file(&self.data_dir)) {
                return Some(url.trim().to_string());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Log files of the stages.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        self.stages
            .iter()
            .map(|s| (format!("{}-{}", s.stage, s.replica), s.log.clone()))
            .collect()
    }

    /// Restarts any stage that exited, with a growing delay; a stage that keeps failing
    /// right after start is reported as an error.
    pub fn check_children(&mut self) -> anyhow::Result<()> {
        for s in &mut self.stages {
            if s.given_up {
                continue;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                let quick = s.last_start.elapsed() < Duration::from_secs(5);
                if quick && s.restarts >= 3 && s.stage == "viewer" {
                    // The data flows without it (its port taken, say): say so, carry on.
                    let tail = std::fs::read_to_string(&s.log)
                        .ok()
                        .and_then(|t| {
                            let mut lines = t.lines().rev();
                            lines
                                .clone()
                                .find(|l| l.starts_with("Error:"))
                                .or_else(|| lines.find(|l| !l.trim().is_empty()))
                                .map(str::to_string)
                        })
                        .unwrap_or_default();
                    eprintln!(
                        "pcb: the viewer keeps exiting ({status}): {tail}\npcb: the pipeline runs on without it; \
                         choose another address with --viewer-addr (log {})",
                        s.log.display()
                    );
                    s.given_up = true;
                    continue;
                }
                if quick && s.restarts >= 3 {
                    bail!(
                        "{}-{} keeps exiting ({status}); see {}",
                        s.stage,
                        s.replica,
                        s.log.display()
                    );
                }
                eprintln!(
                    "pcb: {}-{} exited ({status}); restarting (log {})",
                    s.stage,
                    s.replica,
                    s.log.display()
                );
                std::thread::sleep(Duration::from_millis(200 * (1 << s.restarts.min(5))));
                s.child = spawn_stage(&self.bin_dir, s.stage, &s.config, &s.log)?;
                s.restarts = if quick { s.restarts + 1 } else { 0 };
                s.last_start = Instant::now();
            }
        }
        Ok(())
    }

    /// Stops the stages (SIGTERM, in reverse order, so each finishes its in-flight work),
    /// then the private server.
    pub fn stop(&mut self) {
        for s in self.stages.iter().rev() {
            crate::process::send_signal(&s.child, crate::process::libc_sigterm());
        }
        for s in self.stages.iter_mut().rev() {
            crate::process::terminate(&mut s.child, Duration::from_secs(15));
        }
        if let Some(server) = &mut self.server {
            server.stop();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_stage(bin_dir: &Path, stage: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    crate::process::scrub_pcb_env(&mut Command::new(bin_dir.join(stage)))
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {stage}"))
}

/// The pipeline file's retraining policy: a `pcb train` job each time
/// `retrain_every_images` new labelled images reached the shard stream.
pub struct Retrainer {
    every: u64,
    state_file: PathBuf,
    last_seq: u64,
    job: Option<(String, Child)>,
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
    last_check: Instant,
}

impl Retrainer {
    /// The policy of a started pipeline; `None` when it is off.
    pub fn new(running: &Running, pipeline_file: &Path) -> Option<Retrainer> {
        let every = running
            .pipeline
            .stages
            .trainer
            .settings
            .retrain_every_images;
        if every == 0 {
            return None;
        }
        let state_file = running.data_dir.join("run").join("retrain.seq");
        let last_seq = std::fs::read_to_string(&state_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Some(Retrainer {
            every,
            state_file,
            last_seq,
            job: None,
            args: vec![
                "train".into(),
                "--nats-url".into(),
                running.nats_url.clone().into(),
                "--pipeline".into(),
                absolute(pipeline_file).into(),
                "--data-dir".into(),
                running.data_dir.clone().into(),
            ],
            log: running.data_dir.join("logs").join("retrain.log"),
            last_check: Instant::now() - Duration::from_secs(60),
        })
    }

    /// Starts a job when enough new labelled images arrived and none is running.
    pub async fn poll(&mut self, js: &async_nats::jetstream::Context) -> anyhow::Result<()> {
        if let Some((name, child)) = &mut self.job {
            match child.try_wait()? {
                None => return Ok(()),
                Some(status) => {
                    eprintln!(
                        "pcb: retraining job {name} ended ({status}); see {}",
                        self.log.display()
                    );
                    self.job = None;
                }
            }
        }
        if self.last_check.elapsed() < Duration::from_secs(5) {
            return Ok(());
        }
        self.last_check = Instant::now();
        let mut stream = js.get_stream(pcb_schemas::STREAM_SHARDS).await?;
        let last = stream.info().await?.state.last_sequence;
        if last < self.last_seq + self.every {
            return Ok(());
        }
        let name = format!("auto-{last}");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(std::env::current_exe()?)
            .args(&self.args)
            .arg("--job")
            .arg(&name)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting a retraining job")?;
        eprintln!(
            "pcb: {} new labelled images since sequence {}: retraining job {name} started (log {})",
            last - self.last_seq,
            self.last_seq,
            self.log.display()
        );
        self.last_seq = last;
        std::fs::write(&self.state_file, last.to_string())?;
        self.job = Some((name, child));
        Ok(())
    }

    /// Stops a running job (it resumes from its checkpoint under the same name).
    pub fn stop(&mut self) {
        if let Some((_, child)) = &mut self.job {
            crate::process::terminate(child, Duration::from_secs(15));
        }
    }
}

/// `pcb up`: runs until Ctrl-C.
pub async fn up(opts: UpOptions) -> anyhow::Result<()> {
    let mut running = Running::start(&opts).await?;
    print_banner(&running);
    if opts.default_model {
        ensure_default_model(&running).await;
    }
    println!("Ctrl-C stops every stage cleanly.");
    let shutdown = pcb_common::Shutdown::on_signals();
    let mut retrainer = Retrainer::new(&running, &opts.pipeline);
    let js = match &retrainer {
        Some(r) => {
            println!("  retraining:  a job every {} new labelled images", r.every);
            let client = pcb_common::connect(
                &pcb_common::NatsConfig {
                    url: running.nats_url.clone(),
                    ..running.pipeline.nats.clone()
                },
                "pcb-retrain",
            )
            .await?;
            Some(async_nats::jetstream::new(client))
        }
        None => None,
    };
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Err(e) = running.check_children() {
                    break Err(e);
                }
                if let (Some(r), Some(js)) = (retrainer.as_mut(), js.as_ref()) {
                    if let Err(e) = r.poll(js).await {
                        eprintln!("pcb: retraining policy: {e:#}");
                    }
                }
            }
        }
    };
    if let Some(r) = retrainer.as_mut() {
        r.stop();
    }
    eprintln!("pcb: stopping stages");
    tokio::task::spawn_blocking(move || running.stop()).await?;
    result
}

/// Registers the shipped default model and makes it live when the registry holds no
/// version of the detector's model; says so. A failure is reported and the pipeline runs
/// on (without a live model the detector waits, as before).
async fn ensure_default_model(running: &Running) {
    let name = running.pipeline.stages.detector.settings.model_name.clone();
    let outcome = async {
        let client = pcb_common::connect(
            &pcb_common::NatsConfig {
                url: running.nats_url.clone(),
                ..running.pipeline.nats.clone()
            },
            "pcb-default-model",
        )
        .await?;
        let js = async_nats::jetstream::new(client);
        crate::default_model::register_if_empty(&js, &name).await
    }
    .await;
    match outcome {
        Ok(Some(v)) => println!(
            "  model:       {name}@{v} is live, the {}",
            crate::default_model::summary()
        ),
        Ok(None) => {}
        Err(e) => eprintln!("pcb: could not register the shipped default model: {e:#}"),
    }
}

/// The real DeepPCB boards the demo drops beside its synthetic ones: eight boards of
/// DeepPCB's val.txt, named in this list (the images themselves stay in the dataset
/// folder; the project never carries them).
const DEEPPCB_SAMPLE: &str = include_str!("../../demo/deeppcb-sample.txt");

/// Copies the sample's boards (image, template, labels) from the dataset at `dataset` into
/// `into` in DeepPCB's layout, listed in `val.txt` with an empty `trainval.txt`, so the
/// ingester files them under the val split and no retraining job trains on them. The paths
/// come from our own list, never from a message. `None` when the dataset is not there.
fn stage_deeppcb_sample(dataset: &Path, into: &Path) -> anyhow::Result<Option<PathBuf>> {
    if !dataset.join("val.txt").is_file() {
        return Ok(None);
    }
    let _ = std::fs::remove_dir_all(into);
    for line in DEEPPCB_SAMPLE.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let (Some(image), Some(labels)) = (parts.next(), parts.next()) else {
            bail!("pipelines/demo/deeppcb-sample.txt: {line:?} is not `image labels`");
        };
        let stem = image.trim_end_matches(".jpg");
        for rel in [
            format!("{stem}_test.jpg"),
            format!("{stem}_temp.jpg"),
            labels.to_string(),
        ] {
            let (from, to) = (dataset.join(&rel), into.join(&rel));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        }
    }
    std::fs::write(into.join("val.txt"), DEEPPCB_SAMPLE)?;
    std::fs::write(into.join("trainval.txt"), "")?;
    Ok(Some(into.to_path_buf()))
}

/// Ground truth of the demo's boards: defect count by board id, from the label files the
/// list files of a DeepPCB-layout folder name (our own files: no message field is read
/// as a path).
#[derive(Debug, Default)]
struct Truth {
    synthetic: std::collections::BTreeMap<String, usize>,
    real: std::collections::BTreeMap<String, usize>,
}

fn truth_of(root: &Path) -> anyhow::Result<std::collections::BTreeMap<String, usize>> {
    let mut out = std::collections::BTreeMap::new();
    for list in ["trainval.txt", "test.txt", "val.txt"] {
        let path = root.join(list);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(image), Some(labels)) = (parts.next(), parts.next()) else {
                continue;
            };
            let id = Path::new(image)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let labels = root.join(labels);
            let defects = std::fs::read_to_string(&labels)
                .with_context(|| format!("reading {}", labels.display()))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count();
            out.insert(id, defects);
        }
    }
    Ok(out)
}

/// Verdicts set against the ground truth: (boards, agreeing, missed, false alarms).
#[derive(Debug, Default, Clone, Copy)]
struct Agreement {
    boards: usize,
    agree: usize,
    missed: usize,
    false_alarms: usize,
}

impl Agreement {
    fn add(&mut self, failed: bool, defects: usize) {
        self.boards += 1;
        match (failed, defects > 0) {
            (true, true) | (false, false) => self.agree += 1,
            (false, true) => self.missed += 1,
            (true, false) => self.false_alarms += 1,
        }
    }
}

impl std::fmt::Display for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} verdicts agree with the annotations ({} defective boards passed, {} clean boards failed)",
            self.agree, self.boards, self.missed, self.false_alarms
        )
    }
}

fn print_banner(r: &Running) {
    println!("pipeline up");
    println!("  NATS:        {}", r.nats_url);
    println!("  drop images: {}", r.watch_dir.display());
    println!("  processed:   {}", r.watch_dir.join("processed").display());
    println!("  rejected:    {}", r.watch_dir.join("rejected").display());
    for (name, log) in r.logs() {
        println!("  log {name:<12} {}", log.display());
    }
    println!("  status:      pcb status --nats-url {}", r.nats_url);
    match r.viewer_url(Duration::from_secs(15)) {
        Some(url) => println!("  viewer:      {url}"),
        None if r.pipeline.stages.viewer.replicas > 0 => {
            println!("  viewer:      not listening yet; see its log")
        }
        None => {}
    }
}

/// Where the viewer writes its URL under the data dir.
fn viewer_url_file(data_dir: &Path) -> PathBuf {
    data_dir.join("viewer.url")
}

/// What `pcb demo` does besides `up`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Boards to generate.
    pub count: usize,
    /// Generator seed.
    pub seed: u64,
    /// Give up waiting for the pipeline after this long.
    pub timeout: Duration,
    /// Keep the pipeline running after the summary.
    pub keep_running: bool,
    /// Epochs of the small model trained on the sample (0: no training, no detections
    /// unless a model is already live).
    pub train_epochs: usize,
    /// The DeepPCB dataset folder the eight real sample boards are copied from.
    pub deeppcb: PathBuf,
}

/// `pcb demo`: up, drop the synthetic sample into the watched folder, wait until it has
/// flowed through, print where everything went.
pub async fn demo(opts: UpOptions, demo: DemoOptions) -> anyhow::Result<()> {
    let mut running = Running::start(&opts).await?;
    print_banner(&running);
    if opts.default_model {
        ensure_default_model(&running).await;
    }
    let sample = running
        .data_dir
        .join(format!("sample-{}-{}", demo.count, demo.seed));
    if !sample.join("trainval.txt").exists() {
        println!(
            "generating {} synthetic boards (seed {}) in {}",
            demo.count,
            demo.seed,
            sample.display()
        );
        let (count, seed, dir) = (demo.count, demo.seed, sample.clone());
        tokio::task::spawn_blocking(move || {
            let opts = pcb_synth::SynthOptions {
                count,
                seed,
                ..Default::default()
            };
            pcb_synth::generate(&opts, &dir, &mut |_, _| {})
        })
        .await??;
    }
    let mut truth = Truth {
        synthetic: truth_of(&sample)?,
        ..Truth::default()
    };
    let mut copied = copy_tree(&sample, &running.watch_dir)?;
    let staged = running.data_dir.join("deeppcb-sample");
    match stage_deeppcb_sample(&demo.deeppcb, &staged)? {
        Some(real) => {
            truth.real = truth_of(&real)?;
            copied += copy_tree(&real, &running.watch_dir.join("deeppcb-sample"))?;
            println!(
                "with {} real DeepPCB boards from {} (MIT licence; Tang et al. 2019, \
                 tangsanli5201/DeepPCB)",
                truth.real.len(),
                demo.deeppcb.display()
            );
        }
        None => println!(
            "no DeepPCB dataset at {} (--deeppcb): synthetic boards only",
            demo.deeppcb.display()
        ),
    }
    let boards = demo.count + truth.real.len();
    println!(
        "dropped {copied} files into {}",
        running.watch_dir.display()
    );
    let client = async_nats::connect(&running.nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let bar = indicatif::ProgressBar::new(boards as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} waiting for the pipeline [{bar:40}] {pos}/{len} boards filed",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let deadline = Instant::now() + demo.timeout;
    let mut quiet = 0;
    let streams = loop {
        running.check_children()?;
        let streams = crate::status::collect(&js).await?;
        let left = crate::pairing_count(&running.watch_dir);
        bar.set_position(boards.saturating_sub(left) as u64);
        quiet = if left == 0 && crate::status::drained(&streams) {
            quiet + 1
        } else {
            0
        };
        if quiet >= 3 {
            break streams;
        }
        if Instant::now() > deadline {
            bar.abandon();
            bail!(
                "the pipeline did not finish within {:?}; {left} boards still in {}",
                demo.timeout,
                running.watch_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    bar.finish_and_clear();
    println!(
        "\n== demo summary ({boards} boards dropped: {} synthetic, {} DeepPCB) ==",
        demo.count,
        truth.real.len()
    );
    let c = |s: &str| crate::status::count(&streams, s);
    println!("{:<34} {:>8}", "pcb.images.raw", c("pcb.images.raw"));
    println!(
        "{:<34} {:>8}",
        "pcb.images.encoded",
        c("pcb.images.encoded")
    );
    println!(
        "{:<34} {:>8}",
        "pcb.shards.* (all shards)",
        crate::status::count_prefix(&streams, "pcb.shards.")
    );
    println!(
        "{:<34} {:>8}",
        "pcb.rejected.* (dead letters)",
        crate::status::count_prefix(&streams, "pcb.rejected.")
    );
    println!("\n{}", crate::status::render(&streams));
    let encoded = c("pcb.images.encoded");
    let detected = detect_step(&mut running, &opts, &demo, &js, encoded, deadline, &truth).await?;
    println!("{:<34} {:>8}", "pcb.detections", detected);
    if let Some(url) = running.viewer_url(Duration::from_secs(5)) {
        if demo.keep_running {
            println!("viewer: {url} (boards, overview, models)");
        } else {
            println!("viewer: {url} while the demo runs; pcb demo --keep-running keeps it up");
        }
    }
    if demo.keep_running {
        println!("pipeline still running; Ctrl-C stops it");
        let shutdown = pcb_common::Shutdown::on_signals();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => running.check_children()?,
            }
        }
    }
    tokio::task::spawn_blocking(move || running.stop()).await?;
    Ok(())
}

/// The demo's second half: train a small model on the shards (unless one is live), let
/// the registry promote it, and wait until the detector answered every encoded image;
/// prints a table of detections and returns how many there are.
async fn detect_step(
    running: &mut Running,
    opts: &UpOptions,
    demo: &DemoOptions,
    js: &async_nats::jetstream::Context,
    encoded: u64,
    deadline: Instant,
    truth: &Truth,
) -> anyhow::Result<u64> {
    let registry = pcb_registry::Registry::open(js).await?;
    let name = running.pipeline.stages.detector.settings.model_name.clone();
    let live = registry.live(&name).await?;
    match (&live, demo.train_epochs) {
        (Some(l), _) => println!("\n{name}@{} is live: no training needed", l.version),
        (None, 0) => {
            println!("\nno live model and --train-epochs 0: no detections");
            return Ok(0);
        }
        (None, epochs) => {
            println!("\ntraining a small model on the shards ({epochs} epoch(s), 1 rank)");
            crate::train_job::run(crate::train_job::JobOptions {
                pipeline: opts.pipeline.clone(),
                nats_url: Some(running.nats_url.clone()),
                data_dir: Some(running.data_dir.clone()),
                ranks: Some(1),
                epochs: Some(epochs),
                batch_size: None,
                lr: None,
                job: Some("demo".into()),
                max_restarts: 0,
                plain: true,
            })
            .await?;
        }
    }
    println!("waiting for the registry to promote it and the detector to answer {encoded} images");
    loop {
        running.check_children()?;
        let mut s = js.get_stream(pcb_schemas::STREAM_DETECTIONS).await?;
        let n = s.info().await?.state.messages;
        if n >= encoded {
            break;
        }
        if Instant::now() > deadline {
            bail!("{n} of {encoded} images detected within the timeout; see the detector's log");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stream = js.get_stream(pcb_schemas::STREAM_DETECTIONS).await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: pcb_schemas::SUBJECT_DETECTIONS.into(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut rows = Vec::new();
    let (mut pass, mut fail, mut total) = (0, 0, 0u64);
    let (mut on_real, mut on_synthetic) = (Agreement::default(), Agreement::default());
    while total < encoded {
        let Ok(Some(m)) = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut messages),
        )
        .await
        else {
            break;
        };
        let m = m?;
        let d: pcb_schemas::Detection = pcb_schemas::decode(&m.payload, None)?;
        total += 1;
        if d.verdict == "fail" {
            fail += 1;
        } else {
            pass += 1;
        }
        // The board id is only a key into our own table of annotations.
        if let Some(&n) = truth.real.get(&d.board_id) {
            on_real.add(d.verdict == "fail", n);
        } else if let Some(&n) = truth.synthetic.get(&d.board_id) {
            on_synthetic.add(d.verdict == "fail", n);
        }
        if rows.len() < 12 {
            rows.push(d);
        }
    }
    println!(
        "\n{:<14} {:<8} {:>7}  {:<22} {:<16} {:>8}",
        "board", "verdict", "defects", "top defect", "model", "ms"
    );
    for d in &rows {
        let top = d
            .defects
            .first()
            .map(|x| format!("{} {:.2}", x.class, x.score))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:<8} {:>7}  {:<22} {:<16} {:>8.1}",
            d.board_id,
            d.verdict,
            d.defects.len(),
            top,
            format!("{}@{}", d.model.name, d.model.version),
            d.inference_ms
        );
    }
    println!(
        "({total} detections: {pass} pass, {fail} fail; first {} shown)",
        rows.len()
    );
    if on_real.boards > 0 {
        println!("real DeepPCB boards: {on_real}");
    }
    if on_synthetic.boards > 0 {
        println!("synthetic boards:    {on_synthetic}");
    }
    Ok(total)
}

/// Copies every file of `from` into `to`, each under a temporary name first and renamed
/// when complete, like a well-behaved line-side uploader: labels and templates first, the
/// board images last, so an image never settles before the files that belong to it.
pub fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<usize> {
    let mut files = Vec::new();
    let mut stack = vec![from.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    let is_board = |p: &PathBuf| {
        let name = p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        pcb_ingester::pairing::is_image_name(&name) && !pcb_ingester::pairing::is_template(p)
    };
    files.sort_by_key(|p| (is_board(p), p.clone()));
    for path in &files {
        let dest = to.join(path.strip_prefix(from)?);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = dest.with_file_name(format!(
            ".{}.part",
            dest.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        std::fs::copy(path, &tmp)?;
        std::fs::rename(&tmp, &dest)?;
    }
    Ok(files.len())
}
