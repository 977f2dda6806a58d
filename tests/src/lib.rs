//! Test harness for cross-stage tests: a private nats-server per test, the stages run
//! in-process or as real processes, and readers of what landed in the streams.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use pcb::server::NatsServer;
use pcb_common::{Identity, IdentityStore, Shutdown};

pub mod models;
pub mod soak;
pub mod up;

/// A private server, a temp dir and a client, per test.
pub struct Env {
    /// The server (stopped on drop).
    pub server: NatsServer,
    /// Scratch space (removed on drop).
    pub dir: tempfile::TempDir,
    /// A client.
    pub client: async_nats::Client,
    /// Its JetStream context.
    pub js: jetstream::Context,
    /// The identities of a secured server ([`Env::start_secured`]).
    pub identities: Option<IdentityStore>,
}

/// A viewer started by [`Env::start_viewer`].
pub struct Viewer {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    stop: Shutdown,
    handle: tokio::task::JoinHandle<Result<(), pcb_viewer::ViewerError>>,
}

impl Viewer {
    /// Shuts it down and waits for it.
    pub async fn stop(self) {
        self.stop.trigger();
        let _ = self.handle.await;
    }
}

impl Env {
    /// Starts a server and provisions the pipeline's streams.
    pub async fn start() -> Env {
        Env::start_with(false).await
    }

    /// [`Env::start`] with authentication on, as `pcb up` runs its server: identities in
    /// `<dir>/.pcb-data/identities` (where the README's commands look, from `dir`); the
    /// harness's client and config files are the admin's.
    pub async fn start_secured() -> Env {
        Env::start_with(true).await
    }

    async fn start_with(secured: bool) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats_dir = dir.path().join("nats");
        let identities = secured.then(|| {
            IdentityStore::ensure(&dir.path().join(".pcb-data").join("identities"))
                .expect("identities")
        });
        let ids = identities.clone();
        let server = tokio::task::spawn_blocking(move || match &ids {
            Some(ids) => NatsServer::start_secured(&nats_dir, 0, ids),
            None => NatsServer::start(&nats_dir, 0),
        })
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("nats-server does not start: {e}"));
        let base = pcb_common::NatsConfig {
            url: server.url(),
            ..Default::default()
        };
        let nats = IdentityStore::connection_of(identities.as_ref(), Identity::Admin, &base);
        let client = pcb_common::nats::connect_now(&nats, "pcb-tests")
            .await
            .expect("connect");
        let js = jetstream::new(client.clone());
        // What `pcb init` does: streams, buckets and every durable consumer.
        pcb_common::topology::provision_defaults(&js)
            .await
            .expect("streams, buckets and consumers");
        Env {
            server,
            dir,
            client,
            js,
            identities,
        }
    }

    /// The stage config text shared by every stage of this test.
    pub fn base_config(&self, extra: &str) -> String {
        self.base_config_as(Identity::Admin, extra)
    }

    /// [`Env::base_config`] connecting as `id` when the server is secured.
    pub fn base_config_as(&self, id: Identity, extra: &str) -> String {
        self.base_config_serving(id, "", extra)
    }

    /// [`Env::base_config_as`] serving `/metrics` on `metrics_addr` (empty: not served).
    pub fn base_config_serving(&self, id: Identity, metrics_addr: &str, extra: &str) -> String {
        let login = match &self.identities {
            Some(ids) => format!(
                "nkey_seed_file = {:?}\ninbox_prefix = {:?}\n",
                ids.seed_file(id).display().to_string(),
                id.inbox_prefix()
            ),
            None => String::new(),
        };
        format!(
            "[nats]\nurl = {:?}\n{login}[metrics]\naddr = {metrics_addr:?}\n{extra}",
            self.server.url()
        )
    }

    /// Writes a stage config file and returns its path.
    pub fn config_file(&self, name: &str, extra: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, self.base_config(extra)).expect("write config");
        p
    }

    /// The watched folder of this test.
    pub fn watch_dir(&self) -> PathBuf {
        self.dir.path().join("inbox")
    }

    /// Starts stage `T` in-process with this test's base config and `extra` TOML lines.
    pub fn spawn_stage<T: pcb_common::Stage>(
        &self,
        extra: &str,
        shutdown: &Shutdown,
    ) -> tokio::task::JoinHandle<Result<(), String>> {
        let file: pcb_common::StageFile<T> =
            toml::from_str(&self.base_config(extra)).expect("stage config");
        let (c, s) = (self.client.clone(), shutdown.clone());
        tokio::spawn(async move {
            pcb_common::stage::run(file, c, s)
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// Starts a viewer in-process as the viewer's identity, on a free loopback port, with
    /// these extra `[viewer]` lines; returns once it listens.
    pub async fn start_viewer(&self, extra: &str) -> Viewer {
        let cfg: pcb_viewer::FileConfig = toml::from_str(&self.base_config_as(
            Identity::Stage(pcb_schemas::StageName::Viewer),
            &format!("[viewer]\naddr = \"127.0.0.1:0\"\n{extra}"),
        ))
        .expect("viewer config");
        let cfg = cfg.validate().expect("valid viewer config");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stop = Shutdown::new();
        let (c, s) = (self.client.clone(), stop.clone());
        let handle = tokio::spawn(async move { pcb_viewer::run_with(cfg, c, s, Some(tx)).await });
        let addr = rx.await.expect("the viewer listens");
        Viewer { addr, stop, handle }
    }

    /// Starts encoder and router in-process; returns their shutdown and handles.
    pub fn start_encoder_router(
        &self,
    ) -> (Shutdown, Vec<tokio::task::JoinHandle<Result<(), String>>>) {
        let shutdown = Shutdown::new();
        let handles = vec![
            self.spawn_stage::<pcb_encoder::Encoder>("", &shutdown),
            self.spawn_stage::<pcb_router::Router>("", &shutdown),
        ];
        (shutdown, handles)
    }

    /// Starts the watching ingester in-process on [`Env::watch_dir`].
    pub fn start_ingester(
        &self,
        shutdown: &Shutdown,
    ) -> tokio::task::JoinHandle<Result<(), String>> {
        let extra = format!(
            "[ingester]\nwatch_dir = {:?}\nsettle_ms = 200\nrescan_secs = 2\n",
            self.watch_dir().display().to_string()
        );
        self.spawn_stage::<pcb_ingester::IngesterStage>(&extra, shutdown)
    }

    /// Imports `dir` once (files stay in place) with the in-process ingester.
    pub async fn import(&self, dir: &Path) -> pcb_ingester::Summary {
        let cfg: pcb_ingester::FileConfig = toml::from_str(&self.base_config("")).expect("toml");
        let mut s = cfg.validate().expect("valid").config;
        s.file.watch_dir = dir.to_path_buf();
        pcb_ingester::import(
            self.js.clone(),
            s,
            self.client.server_info().max_payload,
            false,
            |_, _| {},
        )
        .await
    }

    /// Every detection on `pcb.detections`, in stream order.
    pub async fn detections(&self) -> Vec<pcb_schemas::Detection> {
        self.read_all(pcb_schemas::STREAM_DETECTIONS, "pcb.detections")
            .await
            .into_iter()
            .map(|(_, p)| pcb_schemas::decode(&p, None).expect("detection"))
            .collect()
    }

    /// Messages per subject in `stream`.
    pub async fn subject_counts(&self, stream: &str) -> BTreeMap<String, u64> {
        subject_counts(&self.js, stream).await
    }

    /// Messages on subjects starting with `prefix` in `stream`.
    pub async fn count(&self, stream: &str, prefix: &str) -> u64 {
        count(&self.js, stream, prefix).await
    }

    /// Waits up to `timeout` until `stream` holds at least `at_least` messages on subjects
    /// starting with `prefix`; returns whether it did.
    pub async fn wait_count(
        &self,
        stream: &str,
        prefix: &str,
        at_least: u64,
        timeout: Duration,
    ) -> bool {
        wait_until(timeout, || async {
            self.count(stream, prefix).await >= at_least
        })
        .await
    }

    /// Every message on `subject` (from the start), as (subject, payload).
    pub async fn read_all(&self, stream: &str, subject: &str) -> Vec<(String, Vec<u8>)> {
        read_all(&self.js, stream, subject).await
    }
}

/// Messages per subject in `stream`.
pub async fn subject_counts(js: &jetstream::Context, stream: &str) -> BTreeMap<String, u64> {
    try_subject_counts(js, stream)
        .await
        .expect("subject counts")
}

/// [`subject_counts`], failing instead of panicking (a cluster electing a leader).
pub async fn try_subject_counts(
    js: &jetstream::Context,
    stream: &str,
) -> Result<BTreeMap<String, u64>, String> {
    let s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    let mut subjects = s
        .info_with_subjects("pcb.>")
        .await
        .map_err(|e| e.to_string())?;
    while let Some(item) = subjects.next().await {
        let (k, v) = item.map_err(|e| e.to_string())?;
        out.insert(k, v as u64);
    }
    Ok(out)
}

/// Messages on subjects starting with `prefix` in `stream`.
pub async fn count(js: &jetstream::Context, stream: &str, prefix: &str) -> u64 {
    subject_counts(js, stream)
        .await
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// Every message on `subject` in `stream` (from the start), as (subject, payload).
pub async fn read_all(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Vec<(String, Vec<u8>)> {
    try_read_all(js, stream, subject)
        .await
        .expect("read stream")
}

/// [`read_all`], failing instead of panicking.
pub async fn try_read_all(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let prefix = subject.trim_end_matches(">").trim_end_matches('*');
    let want: u64 = try_subject_counts(js, stream)
        .await?
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum();
    let mut out = Vec::new();
    if want == 0 {
        return Ok(out);
    }
    let mut msgs = consumer.messages().await.map_err(|e| e.to_string())?;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), msgs.next()).await {
        let m = m.map_err(|e| e.to_string())?;
        out.push((m.subject.to_string(), m.payload.to_vec()));
        if out.len() as u64 >= want {
            break;
        }
    }
    Ok(out)
}

/// Boards in against what came out of the pipeline: every board must end with exactly one
/// detection per model version that answered for it, or with a dead letter.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Boards dropped (their image files' paths in the inbox).
    pub boards: usize,
    /// Boards with a detection.
    pub detected: usize,
    /// Boards with a dead letter and no detection.
    pub dead_lettered: usize,
    /// Boards with neither.
    pub lost: Vec<String>,
    /// (board, model version) answered more than once.
    pub duplicated: Vec<String>,
    /// Detections and dead letters about no board that was dropped.
    pub strays: Vec<String>,
}

impl Ledger {
    /// Reads `pcb.detections` and `pcb.rejected.>` and settles the account of `boards`
    /// (paths relative to the watched folder, as the records' `source`).
    pub async fn read(
        js: &jetstream::Context,
        boards: &std::collections::BTreeSet<String>,
    ) -> Ledger {
        // A fault may leave the server briefly unable to answer: ask again.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Ledger::try_read(js, boards).await {
                Ok(l) => return l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("ledger: {e}; reading again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("reading the ledger: {e}"),
            }
        }
    }

    /// [`Ledger::read`], once.
    pub async fn try_read(
        js: &jetstream::Context,
        boards: &std::collections::BTreeSet<String>,
    ) -> Result<Ledger, String> {
        let mut answers: BTreeMap<(String, u64), usize> = BTreeMap::new();
        let mut dead = std::collections::BTreeSet::new();
        let mut strays = Vec::new();
        for (_, p) in try_read_all(js, pcb_schemas::STREAM_DETECTIONS, "pcb.detections").await? {
            let d: pcb_schemas::Detection = pcb_schemas::decode(&p, None).expect("detection");
            if !boards.contains(&d.source) {
                strays.push(format!("detection of {}", d.source));
            }
            *answers.entry((d.source, d.model.version)).or_default() += 1;
        }
        for (subject, p) in try_read_all(js, pcb_schemas::STREAM_REJECTED, "pcb.rejected.>").await?
        {
            let l: pcb_schemas::DeadLetter = pcb_schemas::decode(&p, None).expect("dead letter");
            if !boards.contains(&l.source) {
                strays.push(format!("{subject} {} ({})", l.source, l.reason_code));
            }
            dead.insert(l.source);
        }
        let detected: std::collections::BTreeSet<&String> =
            answers.keys().map(|(s, _)| s).collect();
        Ok(Ledger {
            boards: boards.len(),
            detected: boards.iter().filter(|b| detected.contains(b)).count(),
            dead_lettered: boards
                .iter()
                .filter(|b| !detected.contains(b) && dead.contains(*b))
                .count(),
            lost: boards
                .iter()
                .filter(|b| !detected.contains(b) && !dead.contains(*b))
                .cloned()
                .collect(),
            duplicated: answers
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|((s, v), n)| format!("{s} v{v} x{n}"))
                .collect(),
            strays,
        })
    }

    /// Every board accounted for, none twice, nothing about boards never dropped.
    pub fn balanced(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.strays.is_empty()
    }
}

impl std::fmt::Display for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "boards {}: detected {}, dead-lettered {}, lost {}, duplicated {}",
            self.boards,
            self.detected,
            self.dead_lettered,
            self.lost.len(),
            self.duplicated.len()
        )?;
        for (what, list) in [
            ("lost", &self.lost),
            ("duplicated", &self.duplicated),
            ("stray", &self.strays),
        ] {
            for item in list.iter().take(5) {
                write!(f, "\n  {what}: {item}")?;
            }
        }
        Ok(())
    }
}

/// The image files (`*_test.jpg`) under `dir`, as paths relative to `root`: the boards a
/// drop of `dir` into the watched folder `root` brings.
pub fn board_sources(dir: &Path, root: &Path) -> std::collections::BTreeSet<String> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with("_test.jpg"))
        .map(|p| {
            let rel = p.strip_prefix(root).expect("under root");
            rel.to_string_lossy().into_owned()
        })
        .collect()
}

/// Every file below `dir`, at any depth.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Processes whose command line contains `needle` (read from /proc; no procps needed).
pub fn pids_with_arg(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Polls `check` every 100 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check().await
}

/// Triggers `shutdown` and checks that every stage in `handles` stops within 30 s without
/// an error.
pub async fn stop_stages(
    shutdown: &Shutdown,
    handles: Vec<tokio::task::JoinHandle<Result<(), String>>>,
) {
    shutdown.trigger();
    for h in handles {
        let r = tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("stage stops")
            .expect("join");
        assert!(r.is_ok(), "stage failed: {r:?}");
    }
}

/// The Python of the project's venv, which deploy/setup.sh creates with nats-py, msgpack
/// and onnxruntime; panics when it is missing.
pub fn venv_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run deploy/setup.sh (it creates the venv with nats-py and msgpack)",
        python.display()
    );
    python
}

/// Runs `script` (a path under tests/) with `python` and `args`; panics with its stderr
/// when it fails, and returns its stdout.
pub fn run_python(python: &Path, script: &str, args: &[&str]) -> String {
    run_python_in(python, Path::new(env!("CARGO_MANIFEST_DIR")), script, args)
}

/// [`run_python`] from the folder `cwd` (a relative `script` is in it too).
pub fn run_python_in(python: &Path, cwd: &Path, script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(python)
        .arg(cwd.join(script))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the headless-browser driver `tests/browser/viewer.mjs` in `mode` on the viewer at
/// `url` with `opts`; panics with its output when it fails, returns what it printed.
pub fn browser(mode: &str, url: &str, opts: &serde_json::Value) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/viewer.mjs");
    let modules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/node_modules/playwright-core");
    assert!(
        modules.is_dir() && Path::new("/usr/bin/chromium").is_file(),
        "headless Chromium and playwright-core are missing: run deploy/setup.sh"
    );
    let out = std::process::Command::new("node")
        .arg(&script)
        .arg(mode)
        .arg(url)
        .arg(opts.to_string())
        .output()
        .expect("node runs (deploy/setup.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "viewer.mjs failed:\n{}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("viewer.mjs prints JSON")
}

/// The `nats` CLI that deploy/setup.sh installs: `$NATS_CLI`, else
/// `<root>/.tools/bin/nats`, else the first on `PATH`; panics naming where it looked.
pub fn nats_cli() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_CLI") {
        return PathBuf::from(p);
    }
    let local = pcb::server::tools_bin().join("nats");
    if local.is_file() {
        return local;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats"))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "the nats CLI is missing (looked at $NATS_CLI, {} and PATH): run \
                 deploy/setup.sh (it builds natscli v0.5.0 with go install)",
                local.display()
            )
        })
}

/// A binary of the workspace, built by `cargo build --workspace` next to the test binary.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the stage binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// Generates `count` synthetic boards into `dir`, of the generator's default size and split.
pub fn synth(dir: &Path, count: usize, seed: u64) -> pcb_synth::SynthSummary {
    let defaults = pcb_synth::SynthOptions::default();
    synth_sized(dir, count, seed, defaults.size, defaults.val_fraction)
}

/// Generates `count` synthetic boards of `size` px into `dir`, `val_fraction` of them
/// listed for validation.
pub fn synth_sized(
    dir: &Path,
    count: usize,
    seed: u64,
    size: u32,
    val_fraction: f64,
) -> pcb_synth::SynthSummary {
    let options = pcb_synth::SynthOptions {
        count,
        seed,
        size,
        val_fraction,
    };
    pcb_synth::generate(&options, dir, &mut |_, _| {}).expect("synth")
}

/// Copies a tree into the watched folder the way an uploader would (temp name, rename).
pub fn drop_into(from: &Path, to: &Path) -> usize {
    pcb::demo::copy_tree(from, to).expect("copy")
}

/// A small network (ResNet-18 FPN-16, image + template + difference) with deterministic
/// random weights, registered as the next version of `model`.
pub async fn register_random_model(
    registry: &pcb_registry::Registry,
    model: &str,
    dir: &Path,
    seed: i64,
) -> u64 {
    use pcb_vision::{Depth, Detector, InputMode, ModelConfig, Norm, Sampling, Transform};
    let config = ModelConfig {
        num_classes: 7,
        backbone: Depth::R18,
        norm: Norm::Frozen,
        input: InputMode::ImageTemplateDiff,
        transform: Transform {
            min_size: 0,
            ..Transform::default()
        },
        fpn_channels: 16,
        box_batch_size_per_image: 32,
        backbone_width: 64,
        representation_size: 1024,
        test_proposals: 1000,
    };
    let path = dir.join(format!("weights-{seed}.safetensors"));
    let c = config.clone();
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        tch::manual_seed(seed);
        let det = Detector::new(c, tch::Device::Cpu, Sampling::Random);
        det.save(&p).expect("save weights");
    })
    .await
    .expect("join");
    let weights = std::fs::read(&path).expect("read weights");
    registry
        .register(
            model,
            &weights,
            pcb_registry::NewVersion {
                model_config: serde_json::to_value(&config).expect("json"),
                origin: "import".into(),
                ..Default::default()
            },
        )
        .await
        .expect("register")
        .version
}

/// Starts a `detector` process serving `model` (every defect reported, one thread);
/// returns it with its log file.
pub fn spawn_detector(env: &Env, name: &str, model: &str) -> (std::process::Child, PathBuf) {
    spawn_detector_with(env, name, model, "")
}

/// [`spawn_detector`] with more `[detector]` settings (TOML lines).
pub fn spawn_detector_with(
    env: &Env,
    name: &str,
    model: &str,
    extra: &str,
) -> (std::process::Child, PathBuf) {
    spawn_detector_lines(
        env,
        name,
        &format!(
            "model_name = {model:?}\nmax_batch = 8\nmax_wait_ms = 20\nthreads = 1\n\
             ack_wait_secs = 10\nreport_threshold = 0.0\n{extra}"
        ),
    )
}

/// A `detector` process with exactly these `[detector]` lines; returns it with its log.
pub fn spawn_detector_lines(env: &Env, name: &str, lines: &str) -> (std::process::Child, PathBuf) {
    spawn_detector_serving(env, name, lines, "")
}

/// [`spawn_detector_lines`] serving `/metrics` on `metrics_addr`.
pub fn spawn_detector_serving(
    env: &Env,
    name: &str,
    lines: &str,
    metrics_addr: &str,
) -> (std::process::Child, PathBuf) {
    let config = env.dir.path().join(format!("{name}.toml"));
    let text = env.base_config_serving(
        Identity::Stage(pcb_schemas::StageName::Detector),
        metrics_addr,
        &format!("[detector]\n{lines}"),
    );
    std::fs::write(&config, text).expect("write config");
    let log = env.dir.path().join(format!("{name}.log"));
    let out = std::fs::File::create(&log).expect("log");
    let child = std::process::Command::new(bin("detector"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(out)
        .spawn()
        .expect("spawn detector");
    (child, log)
}
