//! The ingester stage: a watched directory → `pcb.images.raw`. A file leaves the watched
//! directory only after JetStream acknowledged its record (to `processed/`), or after its
//! dead letter was stored (to `rejected/`, with a `.reason.txt` beside it).

pub mod pairing;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream;
use pcb_common::ack::{ConsumerSpec, Delivery};
use pcb_common::{Context, Metrics, Outcome, Problems, Rejection, Stage, Validate};
use pcb_datasets::{
    image_dimensions, parse_coco, parse_voc, parse_yolo, read_class_list, read_deeppcb,
    read_label_file, ClassMap, CocoIndex, LabelError,
};
use pcb_schemas::topology::ReadMode;
use pcb_schemas::{
    decode, image_id, DeadLetter, RawImage, CLASS_NAMES, STREAM_IMAGES, SUBJECT_RAW,
};
use serde::{Deserialize, Serialize};

use pairing::{LabelSource, SplitLists, Unit};

pcb_common::declare_stage!(
    /// The ingester stage.
    IngesterStage = Ingester
);

/// The ingester's own flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IngesterArgs {
    /// Import every board under DIR once, print a summary and exit (files stay in place).
    #[arg(long, value_name = "DIR")]
    pub once: Option<PathBuf>,
    /// With --once: move files to processed/ and rejected/ as the watcher does.
    #[arg(long, requires = "once")]
    pub move_files: bool,
}

/// Settings of the ingester.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngesterSettings {
    /// The directory tree operators drop images into.
    pub watch_dir: PathBuf,
    /// Where published files go (default: `<watch_dir>/processed`).
    pub processed_dir: Option<PathBuf>,
    /// Where refused files go, each with a `.reason.txt` (default: `<watch_dir>/rejected`).
    pub rejected_dir: Option<PathBuf>,
    /// A file is complete once its size and mtime stayed unchanged this long, in ms.
    pub settle_ms: u64,
    /// Full rescan of the tree every this many seconds, in case a watch event was missed.
    pub rescan_secs: u64,
    /// Largest image file accepted, in bytes.
    pub max_image_bytes: u64,
    /// Line id given to every image (unless `line_from_dir`).
    pub line_id: String,
    /// Take the line id from the first directory under `watch_dir` (`line3/board.jpg`).
    pub line_from_dir: bool,
    /// Class names, id = position + 1 (defaults to DeepPCB's six classes).
    pub classes: Vec<String>,
    /// Files read and published at once.
    pub concurrency: usize,
    /// Move files that a later stage (the encoder) refused from `processed/` to
    /// `rejected/`, so operators find every refused file in one place.
    pub follow_rejections: bool,
}

impl Default for IngesterSettings {
    fn default() -> Self {
        IngesterSettings {
            watch_dir: PathBuf::from("inbox"),
            processed_dir: None,
            rejected_dir: None,
            settle_ms: 1000,
            rescan_secs: 30,
            max_image_bytes: 16 << 20,
            line_id: "line-1".into(),
            line_from_dir: false,
            classes: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
            concurrency: 8,
            follow_rejections: true,
        }
    }
}

/// The validated settings: the section as written (checked) and what was resolved from it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `[ingester]` section.
    pub file: IngesterSettings,
    /// Published files' destination.
    pub processed_dir: PathBuf,
    /// Refused files' destination.
    pub rejected_dir: PathBuf,
    /// How long a file must stay unchanged before it is read.
    pub settle: Duration,
    /// Period of the full rescan.
    pub rescan: Duration,
}

impl Stage for IngesterStage {
    type Settings = IngesterSettings;
    type Error = IngesterError;
    type Args = IngesterArgs;

    fn apply_args(args: &IngesterArgs, file: &mut FileConfig, _p: &mut Problems) {
        if let Some(dir) = &args.once {
            let s = &mut file.stage.settings;
            s.watch_dir = dir.clone();
            // The pipeline's inbox folders do not apply to a one-off import of another
            // folder: its own processed/ and rejected/ do.
            if s.processed_dir
                .as_ref()
                .is_none_or(|p| p.starts_with("inbox"))
            {
                s.processed_dir = None;
                s.rejected_dir = None;
            }
        }
    }

    async fn run(config: Config, ctx: Context) -> Result<(), IngesterError> {
        run(config, ctx).await
    }

    async fn launch(args: IngesterArgs, config: Config, ctx: Context) -> Result<(), IngesterError> {
        match args.once {
            None => run(config, ctx).await,
            Some(dir) => import_once(&dir, args.move_files, config, ctx).await,
        }
    }
}

impl Validate for IngesterSettings {
    type Config = Settings;

    fn validate(self, p: &mut Problems) -> Option<Settings> {
        let s = self;
        p.check(
            s.watch_dir.as_os_str().is_empty(),
            "ingester.watch_dir",
            "is empty",
        );
        p.check(
            s.settle_ms > 600_000,
            "ingester.settle_ms",
            "must be at most 600000",
        );
        p.at_least("ingester.rescan_secs", s.rescan_secs, 1);
        p.at_least("ingester.max_image_bytes", s.max_image_bytes, 1);
        p.not_blank("ingester.line_id", &s.line_id);
        p.check(
            s.classes.is_empty(),
            "ingester.classes",
            "needs at least one class",
        );
        p.at_least("ingester.concurrency", s.concurrency, 1);
        let processed = s
            .processed_dir
            .clone()
            .unwrap_or_else(|| s.watch_dir.join("processed"));
        let rejected = s
            .rejected_dir
            .clone()
            .unwrap_or_else(|| s.watch_dir.join("rejected"));
        p.check(
            processed == rejected,
            "ingester.rejected_dir",
            "must differ from processed_dir",
        );
        p.check(
            processed == s.watch_dir || rejected == s.watch_dir,
            "ingester.processed_dir",
            "processed_dir and rejected_dir must differ from watch_dir",
        );
        Some(Settings {
            processed_dir: processed,
            rejected_dir: rejected,
            settle: Duration::from_millis(s.settle_ms),
            rescan: Duration::from_secs(s.rescan_secs),
            file: s,
        })
    }
}

/// `--once`: imports `dir` with a progress bar and prints the summary.
async fn import_once(
    dir: &Path,
    move_files: bool,
    config: Config,
    ctx: Context,
) -> Result<(), IngesterError> {
    use std::io::IsTerminal;
    if !dir.is_dir() {
        return Err(IngesterError::NotADirectory(dir.to_path_buf()));
    }
    let js = jetstream::new(ctx.client.clone());
    pcb_common::require(&js, STAGE)
        .await
        .map_err(|e| IngesterError::Start(e.into()))?;
    let bar = indicatif::ProgressBar::new(0);
    if std::io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} importing [{bar:40}] {pos}/{len} files {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let max_payload = ctx.client.server_info().max_payload;
    let started = Instant::now();
    let summary = tokio::select! {
        s = import(js, config.config, max_payload, move_files, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }) => s,
        _ = ctx.shutdown.cancelled() => return Err(IngesterError::Interrupted),
    };
    bar.finish_and_clear();
    println!(
        "imported {} in {:.1}s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    print!("{summary}");
    let _ = ctx.client.flush().await;
    Ok(())
}

/// The durable consumer through which the ingester follows the other stages' dead
/// letters (moving their files to `rejected/`): never gives up on a letter.
pub fn follow_spec() -> Option<ConsumerSpec> {
    STAGE.decl().inputs.iter().find_map(|i| match i.mode {
        ReadMode::Durable(d) => Some(pcb_common::ConsumerSettings::from(&d).spec_for(STAGE, i)),
        ReadMode::View => None,
    })
}

/// Why the ingester stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngesterError {
    /// Start-up failed.
    #[error("starting the ingester: {0}")]
    Start(#[from] pcb_common::stage::StartError),
    /// A directory could not be created.
    #[error("creating directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The directory watch could not be set up.
    #[error("watching {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// Underlying error.
        source: notify::Error,
    },
    /// `--once` was given something other than a directory.
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// `--once` was stopped by a signal.
    #[error("import interrupted; run it again: duplicates are skipped")]
    Interrupted,
    /// The rejection follower stopped.
    #[error("following rejections: {0}")]
    Follow(#[from] pcb_common::ack::ConsumeError),
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOutcome {
    /// Stored in JetStream for the first time.
    Published,
    /// JetStream already had this image (same sha256) with the same labels.
    Duplicate,
    /// Published again with other labels than when it was filed in `processed/` (a
    /// relabel, a correction, labels that came late): a new record, not a duplicate.
    Relabelled,
    /// Refused with this reason code; a dead letter was stored.
    Rejected(String),
    /// Left in place to try again later (NATS unavailable, file vanished, ...).
    Deferred(String),
}

/// Counts of an import or a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Newly stored images.
    pub published: usize,
    /// Images JetStream already had.
    pub duplicates: usize,
    /// Images published again with new labels.
    pub relabelled: usize,
    /// Refused files by reason code.
    pub rejected: BTreeMap<String, usize>,
    /// Files left for later, by reason.
    pub deferred: BTreeMap<String, usize>,
}

impl Summary {
    /// Adds one outcome.
    pub fn add(&mut self, o: &FileOutcome) {
        match o {
            FileOutcome::Published => self.published += 1,
            FileOutcome::Duplicate => self.duplicates += 1,
            FileOutcome::Relabelled => self.relabelled += 1,
            FileOutcome::Rejected(r) => *self.rejected.entry(r.clone()).or_default() += 1,
            FileOutcome::Deferred(r) => *self.deferred.entry(r.clone()).or_default() += 1,
        }
    }

    /// Total rejected files.
    pub fn rejected_total(&self) -> usize {
        self.rejected.values().sum()
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "published:  {}", self.published)?;
        writeln!(f, "duplicates: {}", self.duplicates)?;
        if self.relabelled > 0 {
            writeln!(f, "relabelled: {}", self.relabelled)?;
        }
        writeln!(f, "rejected:   {}", self.rejected_total())?;
        for (reason, n) in &self.rejected {
            writeln!(f, "  {reason}: {n}")?;
        }
        let deferred: usize = self.deferred.values().sum();
        if deferred > 0 {
            writeln!(f, "not done (left in place): {deferred}")?;
            for (reason, n) in &self.deferred {
                writeln!(f, "  {reason}: {n}")?;
            }
        }
        Ok(())
    }
}

/// Each data root's split lists, as last read.
type ListsByRoot = Vec<(PathBuf, SplitLists)>;

/// Reads, pairs, publishes and files away board images.
pub struct Ingester {
    js: jetstream::Context,
    settings: Settings,
    classes: ClassMap,
    metrics: Metrics,
    max_payload: usize,
    move_files: bool,
    lists: Mutex<(Instant, Arc<ListsByRoot>)>,
    coco: Mutex<HashMap<PathBuf, (SystemTime, Arc<CocoIndex>)>>,
    /// When `PCB_IMAGES` was last looked at, and whether it admitted new boards.
    admit: tokio::sync::Mutex<Option<(Instant, bool)>>,
    /// The image files' bucket, opened by the first board too large for one message.
    files: tokio::sync::OnceCell<pcb_common::ImageFiles>,
}

fn lossy_rel(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

fn mtime_ms(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or_else(pcb_common::now_ms)
}

impl Ingester {
    /// An ingester publishing with `js`; `move_files` false leaves files in place (imports).
    pub fn new(
        js: jetstream::Context,
        settings: Settings,
        metrics: Metrics,
        max_payload: usize,
        move_files: bool,
    ) -> Self {
        let classes = ClassMap::new(settings.file.classes.clone());
        Ingester {
            js,
            settings,
            classes,
            metrics,
            max_payload,
            move_files,
            lists: Mutex::new((
                Instant::now() - Duration::from_secs(3600),
                Arc::new(Vec::new()),
            )),
            coco: Mutex::new(HashMap::new()),
            admit: tokio::sync::Mutex::new(None),
            files: tokio::sync::OnceCell::new(),
        }
    }

    /// Whether `PCB_IMAGES` takes new boards: below [`pcb_common::room::ADMIT_FILL`] of its
    /// limits (looked up at most every 500 ms while it is less than half that full). The rest of the stream is the encoder's,
    /// which must store its records of the boards already in before they can be freed.
    async fn admits(&self) -> bool {
        let mut last = self.admit.lock().await;
        if let Some((at, ok)) = *last {
            if at.elapsed() < Duration::from_millis(500) {
                return ok;
            }
        }
        // A server that does not answer is found out by the publish.
        let fill = match self.js.get_stream(STREAM_IMAGES).await {
            Ok(s) => pcb_common::room::fill(s.cached_info()),
            Err(_) => 0.0,
        };
        let ok = fill < pcb_common::room::ADMIT_FILL;
        // Far from the mark the answer is kept a while; near it every board asks.
        *last = (fill < pcb_common::room::ADMIT_FILL / 2.0).then(|| (Instant::now(), ok));
        ok
    }

    /// Whether `processed/` holds, at this image's place, a file with these bytes.
    async fn filed_same(&self, image: &Path, id: &str) -> bool {
        let filed = self.settings.processed_dir.join(self.rel_path(image));
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            std::fs::read(&filed).is_ok_and(|b| pcb_schemas::image_id(&b) == id)
        })
        .await
        .unwrap_or(false)
    }

    /// A board held back because `PCB_IMAGES` is full: it stays in the inbox.
    fn held_back(&self, why: &dyn std::fmt::Display) -> FileOutcome {
        self.metrics.set_backpressure(true);
        if pcb_common::ack::backpressure_log_due() {
            tracing::warn!(reason = %why, "PCB_IMAGES is full: files stay in the inbox until it has room (the stages are behind, or its limit is too small: raise it with `pcb init`)");
        }
        FileOutcome::Deferred("stream-full".into())
    }

    /// The watched root.
    pub fn root(&self) -> &Path {
        &self.settings.file.watch_dir
    }

    /// Directories never scanned: where files are filed away.
    pub fn excluded(&self) -> Vec<PathBuf> {
        vec![
            self.settings.processed_dir.clone(),
            self.settings.rejected_dir.clone(),
        ]
    }

    fn split_lists(&self) -> Arc<ListsByRoot> {
        let mut guard = match self.lists.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        // Re-read now and then: a dataset's lists may be dropped in after its images.
        if guard.0.elapsed() > Duration::from_secs(5) {
            let mut found = Vec::new();
            for dir in pairing::list_roots(self.root()) {
                match SplitLists::load(&dir) {
                    Ok(l) => found.push((dir, l)),
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "split lists unreadable")
                    }
                }
            }
            *guard = (Instant::now(), Arc::new(found));
        }
        guard.1.clone()
    }

    fn coco_index(&self, path: &Path) -> Result<Arc<CocoIndex>, Rejection> {
        let mtime = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if let Ok(cache) = self.coco.lock() {
            if let Some((t, idx)) = cache.get(path) {
                if *t == mtime {
                    return Ok(idx.clone());
                }
            }
        }
        let text = read_label_file(path).map_err(label_rejection)?;
        let idx = Arc::new(parse_coco(&text, path, &self.classes).map_err(label_rejection)?);
        if let Ok(mut cache) = self.coco.lock() {
            cache.insert(path.to_path_buf(), (mtime, idx.clone()));
        }
        Ok(idx)
    }

    /// Builds the raw record of `unit` (with its files inline) and whether they must go by
    /// reference, or the reason it is refused.
    fn build_record(&self, unit: &Unit) -> Result<(RawImage, bool), Rejection> {
        let meta = std::fs::metadata(&unit.image)
            .map_err(|e| Rejection::new("unreadable", format!("cannot read {}: {e}", unit.rel)))?;
        if meta.len() > self.settings.file.max_image_bytes {
            return Err(Rejection::new(
                "too-large",
                format!(
                    "the file is {} bytes, over max_image_bytes = {}",
                    meta.len(),
                    self.settings.file.max_image_bytes
                ),
            ));
        }
        let image = std::fs::read(&unit.image)
            .map_err(|e| Rejection::new("unreadable", format!("cannot read {}: {e}", unit.rel)))?;
        let id = image_id(&image);
        let with_id = |r: Rejection| r.about(Some(id.clone()), unit.rel.clone());
        check_magic(&image, "image").map_err(with_id)?;
        let template = match &unit.template {
            Some(t) => {
                let bytes = std::fs::read(t).map_err(|e| {
                    with_id(Rejection::new(
                        "unreadable",
                        format!("cannot read the template {}: {e}", t.display()),
                    ))
                })?;
                check_magic(&bytes, "template").map_err(with_id)?;
                Some(bytes)
            }
            None => None,
        };
        let (labels, label_format) = self.read_labels(unit, &image).map_err(with_id)?;
        let size = image.len() + template.as_ref().map_or(0, |t| t.len());
        // The encoded record carries both files in base64 (4/3 larger): a board that would
        // not fit in one message goes through the image files' bucket, by reference.
        let by_reference = size * 4 / 3 + 64 * 1024 > self.max_payload;
        let line_id = match (self.settings.file.line_from_dir, unit.rel.split_once('/')) {
            (true, Some((first, _))) => first.to_string(),
            _ => self.settings.file.line_id.clone(),
        };
        let split_hint = self.split_lists().iter().find_map(|(dir, lists)| {
            let rel = unit.image.strip_prefix(dir).ok()?;
            lists.split_of(&rel.to_string_lossy())
        });
        let record = RawImage {
            image_id: id,
            image,
            template,
            labels,
            label_format,
            board_id: unit.board_id.clone(),
            line_id,
            source: unit.rel.clone(),
            captured_at_ms: mtime_ms(&meta),
            split_hint,
            revision: None,
            image_ref: None,
            template_ref: None,
        };
        Ok((record, by_reference))
    }

    /// Moves the record's files into the image files' bucket (each stored once, by
    /// sha256) and leaves their references in their place; a full bucket or a server that
    /// failed leaves the board in the inbox for later.
    async fn store_files(&self, record: &mut RawImage) -> Result<(), FileOutcome> {
        let stored = async {
            let files = self
                .files
                .get_or_try_init(|| pcb_common::ImageFiles::open(&self.js))
                .await?;
            let image = files.put(&record.image).await?;
            let template = match &record.template {
                Some(t) => Some(files.put(t).await?),
                None => None,
            };
            Ok::<_, pcb_common::FilesError>((image, template))
        }
        .await;
        match stored {
            Ok((image, template)) => {
                record.image = Vec::new();
                record.image_ref = Some(image);
                if template.is_some() {
                    record.template = None;
                    record.template_ref = template;
                }
                Ok(())
            }
            Err(e @ pcb_common::FilesError::Full(_)) => {
                self.metrics.set_backpressure(true);
                if pcb_common::ack::backpressure_log_due() {
                    tracing::warn!(file = %record.source, error = %e, "the image files' bucket is full: large boards stay in the inbox until it has room");
                }
                Err(FileOutcome::Deferred("bucket-full".into()))
            }
            Err(e) => {
                tracing::warn!(file = %record.source, error = %e, "files not stored, will retry");
                Err(FileOutcome::Deferred("store-failed".into()))
            }
        }
    }

    fn read_labels(
        &self,
        unit: &Unit,
        image: &[u8],
    ) -> Result<(Option<Vec<pcb_schemas::BoxLabel>>, Option<String>), Rejection> {
        let parsed = match &unit.labels {
            LabelSource::None => return Ok((None, None)),
            LabelSource::DeepPcb(p) => (read_deeppcb(p, &self.classes), "deeppcb"),
            LabelSource::Voc(p) => {
                let text = read_label_file(p).map_err(label_rejection)?;
                (parse_voc(&text, p, &self.classes), "voc")
            }
            LabelSource::Yolo { file, classes_file } => {
                let text = read_label_file(file).map_err(label_rejection)?;
                let names = match classes_file {
                    Some(c) => read_class_list(&read_label_file(c).map_err(label_rejection)?),
                    None => Vec::new(),
                };
                let (w, h) = image_dimensions(image).ok_or_else(|| {
                    Rejection::new(
                        "unreadable",
                        "the image header is unreadable, so YOLO's normalised boxes cannot be placed",
                    )
                })?;
                (parse_yolo(&text, file, &names, w, h, &self.classes), "yolo")
            }
            LabelSource::Coco(p) => {
                let idx = self.coco_index(p)?;
                let name = unit.rel.rsplit('/').next().unwrap_or(&unit.rel);
                return Ok(match idx.get(&unit.rel).or_else(|| idx.get(name)) {
                    Some(l) => (Some(l.clone()), Some("coco".into())),
                    None => (None, None),
                });
            }
        };
        match parsed {
            (Ok(l), fmt) => Ok((Some(l), Some(fmt.into()))),
            (Err(e), _) => Err(label_rejection(e)),
        }
    }

    /// Publishes one board (image, template, labels) and files it away.
    pub async fn ingest(self: &Arc<Self>, image: PathBuf) -> FileOutcome {
        let started = Instant::now();
        let outcome = self.ingest_inner(image).await;
        self.metrics.observe_processing(started.elapsed());
        match &outcome {
            FileOutcome::Published => self.metrics.count("published"),
            FileOutcome::Duplicate => self.metrics.count("duplicate"),
            FileOutcome::Relabelled => self.metrics.count("relabelled"),
            FileOutcome::Rejected(code) => {
                self.metrics.count("rejected");
                self.metrics.count_rejection(code);
            }
            FileOutcome::Deferred(_) => self.metrics.count("deferred"),
        }
        outcome
    }

    async fn ingest_inner(self: &Arc<Self>, image: PathBuf) -> FileOutcome {
        let root = self.root().to_path_buf();
        let unit = match pairing::pair(&image, &root) {
            Ok(u) => u,
            Err(e) => {
                let rel = lossy_rel(&image, &root);
                let r = Rejection::new("bad-file-name", e.to_string()).about(None, rel);
                let files = vec![image.clone()];
                return self.reject(r, &image, files).await;
            }
        };
        if !unit.image.exists() {
            return FileOutcome::Deferred("vanished".into());
        }
        let me = self.clone();
        let u2 = unit.clone();
        let built = tokio::task::spawn_blocking(move || me.build_record(&u2)).await;
        let (mut record, by_reference) = match built {
            Ok(Ok(r)) => r,
            Ok(Err(r)) => {
                let r = if r.source.is_empty() {
                    let id = r.image_id.clone();
                    r.about(id, unit.rel.clone())
                } else {
                    r
                };
                let mut files = vec![unit.image.clone()];
                files.extend(unit.companions());
                return self.reject(r, &unit.image, files).await;
            }
            Err(e) => return FileOutcome::Deferred(format!("read task failed: {e}")),
        };
        // The same image filed before, dropped again without labels (a batch copied again,
        // its images before its labels): nothing new to store; labels that come later bring
        // it back (`late_labels`).
        let filed_before = self.move_files && self.filed_same(&unit.image, &record.image_id).await;
        if filed_before && record.labels.is_none() {
            let mut files = vec![unit.image.clone()];
            files.extend(unit.companions());
            self.file_away(&files, &self.settings.processed_dir).await;
            return FileOutcome::Duplicate;
        }
        if !self.admits().await {
            return self.held_back(&"above the share kept for the encoder");
        }
        if by_reference {
            if let Err(outcome) = self.store_files(&mut record).await {
                return outcome;
            }
        }
        let ack = match pcb_common::publish(&self.js, SUBJECT_RAW.into(), &record).await {
            Ok(a) => a,
            // Back-pressure: the file stays in the inbox until the stream has room.
            Err(e) if e.is_stream_full() => return self.held_back(&e),
            Err(e) => {
                tracing::warn!(file = %unit.rel, error = %e, "not published, will retry");
                return FileOutcome::Deferred("publish-failed".into());
            }
        };
        self.metrics.set_backpressure(false);
        // The same image filed before, and now stored as a new record: its labels changed.
        let relabelled = !ack.duplicate && record.labels.is_some() && filed_before;
        if self.move_files {
            let mut files = vec![unit.image.clone()];
            files.extend(unit.companions());
            self.file_away(&files, &self.settings.processed_dir).await;
        }
        if ack.duplicate {
            FileOutcome::Duplicate
        } else if relabelled {
            FileOutcome::Relabelled
        } else {
            FileOutcome::Published
        }
    }

    async fn reject(&self, r: Rejection, image: &Path, files: Vec<PathBuf>) -> FileOutcome {
        let mut letter = r.dead_letter(STAGE.name(), None, None);
        if self.move_files {
            let dest = self.settings.rejected_dir.join(self.rel_path(image));
            letter.moved_to = Some(dest.to_string_lossy().into_owned());
        }
        if let Err(e) = pcb_common::ack::publish_dead_letter(&self.js, &letter).await {
            // Without its dead letter the file stays where it is, so nothing is lost.
            tracing::warn!(file = %letter.source, error = %e, "dead letter not stored, will retry");
            return FileOutcome::Deferred("publish-failed".into());
        }
        tracing::debug!(file = %letter.source, reason = %letter.reason, "rejected");
        if self.move_files {
            let moved = self.file_away(&files, &self.settings.rejected_dir).await;
            if let Some(dest) = moved.first() {
                write_reason(dest, &letter);
            }
        }
        FileOutcome::Rejected(r.reason_code)
    }

    fn rel_path(&self, path: &Path) -> PathBuf {
        path.strip_prefix(self.root()).unwrap_or(path).to_path_buf()
    }

    /// Moves `files` under `dest_root`, keeping their paths relative to the watched root;
    /// returns where they went.
    async fn file_away(&self, files: &[PathBuf], dest_root: &Path) -> Vec<PathBuf> {
        let mut moved = Vec::new();
        for f in files {
            let dest = dest_root.join(self.rel_path(f));
            match move_file(f, &dest) {
                Ok(()) => moved.push(dest),
                Err(e) => tracing::warn!(file = %f.display(), dest = %dest.display(), error = %e,
                    "file not moved; it will be seen again and deduplicated"),
            }
        }
        moved
    }

    /// Moves a file a later stage refused from `processed/` to `rejected/`.
    fn follow(&self, letter: &DeadLetter, delivered: i64) -> Outcome {
        // A letter without a source (an undecodable message) names no file.
        if letter.stage == STAGE.name() || letter.source.is_empty() {
            return Outcome::Skipped;
        }
        let Some(rel) = plain_relative(&letter.source) else {
            tracing::warn!(stage = %letter.stage, source = %letter.source,
                "dead letter names a path outside the watched folder; ignored");
            return Outcome::Skipped;
        };
        let processed = self.settings.processed_dir.join(rel);
        if !processed.exists() {
            // The ingester may still be moving it there; look again shortly, then let go
            // (the file may have come from an import that leaves files in place).
            if self.root().join(rel).exists() && delivered < 5 {
                return Outcome::Retry(format!("{} not yet in processed/", letter.source));
            }
            return Outcome::Skipped;
        }
        if !resolves_inside(&self.settings.processed_dir, &processed) {
            tracing::warn!(stage = %letter.stage, source = %letter.source,
                "dead letter names a file that resolves outside processed/ (a link); ignored");
            return Outcome::Skipped;
        }
        let dest = self.settings.rejected_dir.join(rel);
        match move_file(&processed, &dest) {
            Ok(()) => {
                let mut files = Vec::new();
                if let Ok(unit) = pairing::pair(&processed, &self.settings.processed_dir) {
                    files = unit.companions();
                }
                for c in files {
                    let rel_c = c
                        .strip_prefix(&self.settings.processed_dir)
                        .unwrap_or(&c)
                        .to_path_buf();
                    let _ = move_file(&c, &self.settings.rejected_dir.join(rel_c));
                }
                write_reason(&dest, letter);
                Outcome::Done
            }
            Err(e) => Outcome::Retry(format!("moving {} to rejected/: {e}", processed.display())),
        }
    }
}

/// `source` as a path relative to a folder of ours, when it is one: plain names only (no
/// root, drive, `.` or `..`). A dead letter's `source` comes from the network, so anything
/// else could make the follower move or write files outside the folders it owns.
fn plain_relative(source: &str) -> Option<&Path> {
    let rel = Path::new(source);
    let plain = rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    (plain && !source.is_empty()).then_some(rel)
}

/// Whether `path` (which exists) resolves, links followed, inside `root`.
fn resolves_inside(root: &Path, path: &Path) -> bool {
    match (root.canonicalize(), path.canonicalize()) {
        (Ok(root), Ok(path)) => path.starts_with(root),
        _ => false,
    }
}

fn write_reason(dest: &Path, letter: &DeadLetter) {
    let mut name = dest.as_os_str().to_os_string();
    name.push(".reason.txt");
    let text = format!(
        "stage: {}\nreason_code: {}\nreason: {}\nimage_id: {}\nsource: {}\n",
        letter.stage,
        letter.reason_code,
        letter.reason,
        letter.image_id.as_deref().unwrap_or("-"),
        letter.source
    );
    if let Err(e) = std::fs::write(&name, text) {
        tracing::warn!(file = %dest.display(), error = %e, "reason file not written");
    }
}

fn label_rejection(e: LabelError) -> Rejection {
    Rejection::new("label-parse", e.to_string())
}

/// Refuses bytes that are not an image by their magic bytes (cheap, before publishing).
fn check_magic(bytes: &[u8], what: &str) -> Result<(), Rejection> {
    if bytes.is_empty() {
        return Err(Rejection::new(
            "empty-file",
            format!("the {what} file is empty (0 bytes)"),
        ));
    }
    image::guess_format(bytes).map(|_| ()).map_err(|_| {
        Rejection::new(
            "not-an-image",
            format!(
                "the {what} is not an image: its first bytes ({}) match no image format",
                pcb_common::first_bytes_hex(bytes)
            ),
        )
    })
}

fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        // Across file systems rename fails: copy, sync, then remove.
        Err(e) if e.raw_os_error() == Some(18) => {
            std::fs::copy(from, to)?;
            std::fs::File::open(to)?.sync_all()?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    len: u64,
    modified: Option<SystemTime>,
    since: Instant,
}

fn observe(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()))
}

fn recently_modified(path: &Path, settle: Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < settle)
}

/// Runs the watching ingester until `shutdown`.
pub async fn run(config: Config, ctx: Context) -> Result<(), IngesterError> {
    let Context { client, shutdown } = ctx;
    let metrics = Metrics::new(STAGE.name());
    let js =
        pcb_common::stage::prepare(STAGE, &client, &metrics, &config.metrics, &shutdown).await?;
    let s = config.config.clone();
    for dir in [&s.file.watch_dir, &s.processed_dir, &s.rejected_dir] {
        std::fs::create_dir_all(dir).map_err(|source| IngesterError::CreateDir {
            path: dir.clone(),
            source,
        })?;
    }
    let max_payload = client.server_info().max_payload;
    let ing = Arc::new(Ingester::new(
        js.clone(),
        s.clone(),
        metrics.clone(),
        max_payload,
        true,
    ));

    let follower = match follow_spec() {
        Some(spec) if s.file.follow_rejections => {
            let ing2 = ing.clone();
            let (js2, m2, sd2) = (
                js.clone(),
                Metrics::new("ingester-follow"),
                shutdown.clone(),
            );
            Some(tokio::spawn(async move {
                pcb_common::run_consumer(js2, spec, m2, sd2, move |d: Delivery| {
                    let ing = ing2.clone();
                    async move {
                        match decode::<DeadLetter>(&d.payload, d.schema()) {
                            Ok(letter) => ing.follow(&letter, d.delivered),
                            Err(_) => Outcome::Skipped,
                        }
                    }
                })
                .await
            }))
        }
        _ => None,
    };

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.send(());
        }
    })
    .map_err(|source| IngesterError::Watch {
        path: s.file.watch_dir.clone(),
        source,
    })?;
    use notify::Watcher;
    watcher
        .watch(&s.file.watch_dir, notify::RecursiveMode::Recursive)
        .map_err(|source| IngesterError::Watch {
            path: s.file.watch_dir.clone(),
            source,
        })?;
    tracing::info!(watch = %s.file.watch_dir.display(), processed = %s.processed_dir.display(),
        rejected = %s.rejected_dir.display(), "watching for board images");

    let mut seen: HashMap<PathBuf, Seen> = HashMap::new();
    let deferred = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Label files looked at for a filed board (by modification time).
    let mut label_files: HashMap<PathBuf, std::time::SystemTime> = HashMap::new();
    let in_flight: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
    let permits = Arc::new(tokio::sync::Semaphore::new(s.file.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let tick = (s.settle / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
    let mut ticker = tokio::time::interval(tick);
    let mut last_scan: Option<Instant> = None;
    let mut dirty = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = rx.recv() => { if ev.is_some() { dirty = true; } while rx.try_recv().is_ok() {} }
            _ = ticker.tick() => {}
        }
        while tasks.try_join_next().is_some() {}
        // A file left for later (server away, stream full) is looked at again soon, not
        // only at the next full rescan.
        let retry = last_scan.is_none_or(|t| t.elapsed() >= RETRY_DEFERRED)
            && deferred.swap(false, std::sync::atomic::Ordering::Relaxed);
        let due = retry || last_scan.is_none_or(|t| t.elapsed() >= s.rescan);
        if dirty || due {
            dirty = false;
            last_scan = Some(Instant::now());
            let (root, excluded) = (s.file.watch_dir.clone(), ing.excluded());
            let found = tokio::task::spawn_blocking(move || pairing::scan(&root, &excluded))
                .await
                .unwrap_or_default();
            let found: HashSet<PathBuf> = found.into_iter().collect();
            // Labels that came after their board was filed: the board comes back.
            let (root, processed, excluded) = (
                s.file.watch_dir.clone(),
                s.processed_dir.clone(),
                ing.excluded(),
            );
            let (mut checked, settle) = (std::mem::take(&mut label_files), s.settle);
            let (late, checked) = tokio::task::spawn_blocking(move || {
                let late = pairing::late_labels(&root, &processed, &excluded, &mut checked, settle);
                (late, checked)
            })
            .await
            .unwrap_or_default();
            label_files = checked;
            for l in late {
                tracing::debug!(labels = %l.labels.display(), "labels came after their board; publishing it again");
                for (from, to) in &l.copies {
                    if let Err(e) = pairing::copy_in(from, to) {
                        tracing::warn!(from = %from.display(), to = %to.display(), error = %e,
                            "could not bring a board back for its late labels");
                    }
                }
                dirty = true;
            }
            seen.retain(|p, _| found.contains(p));
            for p in found {
                seen.entry(p).or_insert(Seen {
                    len: u64::MAX,
                    modified: None,
                    since: Instant::now(),
                });
            }
        }
        let mut ready = Vec::new();
        for (path, obs) in seen.iter_mut() {
            let Some((len, modified)) = observe(path) else {
                continue;
            };
            if (len, modified) != (obs.len, obs.modified) {
                *obs = Seen {
                    len,
                    modified,
                    since: Instant::now(),
                };
                continue;
            }
            if obs.since.elapsed() < s.settle {
                continue;
            }
            let busy = in_flight.lock().map(|f| f.contains(path)).unwrap_or(true);
            if busy {
                continue;
            }
            if let Ok(unit) = pairing::pair(path, &s.file.watch_dir) {
                if unit
                    .companions()
                    .iter()
                    .any(|c| recently_modified(c, s.settle))
                {
                    continue;
                }
            }
            ready.push(path.clone());
        }
        for path in ready {
            seen.remove(&path);
            if let Ok(mut f) = in_flight.lock() {
                f.insert(path.clone());
            }
            let (ing, in_flight, permits) = (ing.clone(), in_flight.clone(), permits.clone());
            let deferred = deferred.clone();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let outcome = ing.ingest(path.clone()).await;
                if let FileOutcome::Deferred(why) = &outcome {
                    tracing::debug!(file = %path.display(), %why, "deferred");
                    deferred.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if let Ok(mut f) = in_flight.lock() {
                    f.remove(&path);
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    drop(watcher);
    if let Some(f) = follower {
        // A follower that panicked or was cancelled has nothing more to report.
        if let Ok(Err(e)) = f.await {
            return Err(e.into());
        }
    }
    Ok(())
}

/// How soon files left for later are looked at again.
const RETRY_DEFERRED: Duration = Duration::from_secs(2);

/// Imports every board under `dir` once and returns the counts; files stay where they are
/// unless `move_files`. `progress` is called with (done, total).
pub async fn import(
    js: jetstream::Context,
    settings: Settings,
    max_payload: usize,
    move_files: bool,
    progress: impl Fn(usize, usize),
) -> Summary {
    let metrics = Metrics::new(STAGE.name());
    let concurrency = settings.file.concurrency;
    let ing = Arc::new(Ingester::new(
        js,
        settings,
        metrics,
        max_payload,
        move_files,
    ));
    let (root, excluded) = (ing.root().to_path_buf(), ing.excluded());
    let files = tokio::task::spawn_blocking(move || pairing::scan(&root, &excluded))
        .await
        .unwrap_or_default();
    let total = files.len();
    progress(0, total);
    let mut summary = Summary::default();
    use futures::StreamExt;
    let mut outcomes = futures::stream::iter(files)
        .map(|f| {
            let ing = ing.clone();
            async move { ing.ingest(f).await }
        })
        .buffer_unordered(concurrency);
    let mut done = 0;
    while let Some(o) = outcomes.next().await {
        summary.add(&o);
        done += 1;
        progress(done, total);
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_source_must_stay_inside_our_folders() {
        for ok in ["b1.jpg", "line3/b1.jpg", "a b/c.png"] {
            assert_eq!(plain_relative(ok), Some(Path::new(ok)), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x.jpg", "a/../../x.jpg", "./x.jpg"] {
            assert_eq!(plain_relative(bad), None, "{bad}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let processed = dir.path().join("processed");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&processed).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(processed.join("in.jpg"), b"x").expect("write");
        std::fs::write(outside.join("secret.jpg"), b"x").expect("write");
        std::os::unix::fs::symlink(&outside, processed.join("link")).expect("symlink");
        assert!(resolves_inside(&processed, &processed.join("in.jpg")));
        assert!(!resolves_inside(
            &processed,
            &processed.join("link/secret.jpg")
        ));
    }

    #[test]
    fn summary_counts_and_prints_reasons() {
        let mut s = Summary::default();
        s.add(&FileOutcome::Published);
        s.add(&FileOutcome::Duplicate);
        s.add(&FileOutcome::Rejected("not-an-image".into()));
        s.add(&FileOutcome::Rejected("not-an-image".into()));
        s.add(&FileOutcome::Rejected("too-large".into()));
        assert_eq!((s.published, s.duplicates, s.rejected_total()), (1, 1, 3));
        let text = s.to_string();
        assert!(
            text.contains("not-an-image: 2") && text.contains("too-large: 1"),
            "{text}"
        );
    }

    #[test]
    fn magic_bytes_decide_what_is_an_image() {
        assert!(check_magic(b"\xff\xd8\xff\xe0rest", "image").is_ok());
        assert!(check_magic(b"\x89PNG\r\n\x1a\nrest", "image").is_ok());
        let r = check_magic(b"hello world", "image").unwrap_err();
        assert_eq!(r.reason_code, "not-an-image");
        assert!(r.reason.contains("68 65 6c 6c 6f"), "{}", r.reason);
        assert_eq!(
            check_magic(b"", "template").unwrap_err().reason_code,
            "empty-file"
        );
    }

    #[test]
    fn moving_creates_parents_and_keeps_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let from = dir.path().join("a.jpg");
        std::fs::write(&from, b"x").expect("write");
        let to = dir.path().join("processed/line/a.jpg");
        move_file(&from, &to).expect("move");
        assert!(!from.exists());
        assert_eq!(std::fs::read(&to).expect("read"), b"x");
    }

    #[test]
    fn config_defaults_and_problems() {
        let c = FileConfig::default().validate().expect("defaults valid");
        assert_eq!(c.config.processed_dir, PathBuf::from("inbox/processed"));
        let mut f = FileConfig::default();
        f.stage.settings.processed_dir = Some("x".into());
        f.stage.settings.rejected_dir = Some("x".into());
        f.stage.settings.concurrency = 0;
        assert_eq!(
            f.validate().unwrap_err().keys(),
            ["ingester.concurrency", "ingester.rejected_dir"]
        );
    }
}
