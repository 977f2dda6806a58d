//! `pcb demo`: `up`, the synthetic sample and a few real DeepPCB boards dropped into the
//! watched folder, a small model trained when none is live, and a summary of what flowed
//! where and how the verdicts compare with the annotations. SIGTERM or Ctrl-C stops it
//! cleanly at any phase.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use pcb_common::Shutdown;

use crate::supervisor::{Running, UpOptions};
use crate::up::{ensure_default_model, print_banner};

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
    for entry in pcb_datasets::parse_list(DEEPPCB_SAMPLE) {
        let Some(labels) = &entry.labels else {
            bail!(
                "pipelines/demo/deeppcb-sample.txt line {}: {:?} is not `image labels`",
                entry.line,
                entry.image
            );
        };
        let image = entry.image_path(dataset);
        let template = pcb_datasets::template_of(&image)
            .with_context(|| format!("{} has no template", image.display()))?;
        for from in [image, template, dataset.join(labels)] {
            let to = into.join(from.strip_prefix(dataset)?);
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
    let classes = pcb_datasets::ClassMap::default();
    let mut out = std::collections::BTreeMap::new();
    for list in ["trainval.txt", "test.txt", "val.txt"] {
        let Ok(entries) = pcb_datasets::read_list_file(&root.join(list)) else {
            continue;
        };
        for entry in entries {
            let Some(labels) = &entry.labels else {
                continue;
            };
            let defects = pcb_datasets::read_deeppcb(&root.join(labels), &classes)?.len();
            out.insert(entry.board_id(), defects);
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
/// flowed through, print where everything went. `shutdown` (SIGTERM, Ctrl-C) stops every
/// process it started, whatever phase it is in.
pub async fn demo(opts: UpOptions, demo: DemoOptions, shutdown: &Shutdown) -> anyhow::Result<()> {
    let interrupted = || anyhow!("interrupted: every stage and the private server were stopped");
    let mut running = tokio::select! {
        biased;
        r = Running::start(&opts) => r?,
        _ = shutdown.cancelled() => return Err(interrupted()),
    };
    // The demo's own steps come first, so that a step that handles the signal itself (a
    // training job stops its ranks) does; any other step is simply abandoned.
    let result = tokio::select! {
        biased;
        r = run_demo(&mut running, &opts, &demo, shutdown) => r,
        _ = shutdown.cancelled() => Err(interrupted()),
    };
    tokio::task::spawn_blocking(move || running.stop()).await?;
    result
}

async fn run_demo(
    running: &mut Running,
    opts: &UpOptions,
    demo: &DemoOptions,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    print_banner(running);
    if opts.default_model {
        ensure_default_model(running).await;
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
    let js = running.jetstream("pcb-demo").await?;
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
    let until = Awaited {
        encoded,
        deadline,
        truth: &truth,
    };
    let detected = detect_step(running, opts, demo, &js, until, shutdown).await?;
    println!("{:<34} {:>8}", "pcb.detections", detected);
    if let Some(url) = running.viewer_url(Duration::from_secs(5)) {
        if demo.keep_running {
            println!("viewer: {url} (boards, overview, models)");
        } else {
            println!("viewer: {url} while the demo runs; pcb demo --keep-running keeps it up");
        }
    }
    if demo.keep_running {
        println!("pipeline still running; Ctrl-C or SIGTERM stops it");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => running.check_children()?,
            }
        }
    }
    Ok(())
}

/// What the demo's second half waits for: an answer to every encoded image before the
/// deadline, checked against the boards' ground truth.
struct Awaited<'a> {
    encoded: u64,
    deadline: Instant,
    truth: &'a Truth,
}

/// The demo's second half: train a small model on the shards (unless one is live), let
/// the registry promote it, and wait until the detector answered every encoded image;
/// prints a table of detections and returns how many there are.
async fn detect_step(
    running: &mut Running,
    opts: &UpOptions,
    demo: &DemoOptions,
    js: &async_nats::jetstream::Context,
    until: Awaited<'_>,
    shutdown: &Shutdown,
) -> anyhow::Result<u64> {
    let Awaited {
        encoded,
        deadline,
        truth,
    } = until;
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
            crate::train_job::run(
                crate::train_job::JobOptions {
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
                },
                shutdown,
            )
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
