//! The supervisor of `pcb up` and `pcb demo`: starts the private nats-server (unless one is
//! given), provisions the topology, starts one process per service replica, restarts the
//! ones that exit, and stops everything in order. Every child is tied to this process
//! (`process::spawn_tied`), so even a SIGKILL of `pcb` leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pcb_schemas::StageName;

use crate::pipeline::{services, PipelineFile};
use crate::server::{NatsCluster, NatsServer};

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
    /// Nodes of the private server (overrides `nats_server.cluster_nodes`).
    pub cluster: Option<usize>,
}

struct StageProcess {
    stage: StageName,
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
    /// The private server's nodes (none on a server of one's own).
    servers: Vec<NatsServer>,
    /// Restarts of the private server that came soon after its previous start.
    server_restarts: u32,
    server_started: Instant,
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
    /// The identities of the private server (None on a server of one's own, which the
    /// pipeline file's `[nats]` credentials reach).
    pub identities: Option<IdentityStore>,
}

pub(crate) fn absolute(p: &Path) -> PathBuf {
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

use crate::reach::url_file;
use pcb_common::{Identity, IdentityStore};

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
        for stage in services() {
            if !bin_dir.join(stage.name()).is_file() {
                bail!(
                    "stage binary {} not found; build every stage first: cargo build --release --workspace",
                    bin_dir.join(stage.name()).display()
                );
            }
        }
        let url = opts
            .nats_url
            .clone()
            .or_else(|| (!pipeline.nats.url.is_empty()).then(|| pipeline.nats.url.clone()));
        let ids_dir = absolute(&crate::reach::identities_dir(&pipeline, &data_dir));
        let (servers, nats_url, identities) = match url {
            // A server of one's own: the identities named in the pipeline file, if any.
            Some(u) if pipeline.pipeline.identities_dir.as_os_str().is_empty() => {
                (Vec::new(), u, None)
            }
            Some(u) => (Vec::new(), u, Some(IdentityStore::ensure(&ids_dir)?)),
            None => {
                // The private server admits only the identities issued in the folder,
                // each with the permissions the topology gives it.
                let nodes = opts.cluster.unwrap_or(pipeline.nats_server.cluster_nodes);
                if ![1, 3, 5].contains(&nodes) {
                    bail!("--cluster {nodes}: a cluster has 1, 3 or 5 nodes (a majority elects its leaders)");
                }
                if nodes > 1 {
                    pipeline.streams = pipeline.streams.clone().replicated(nodes);
                }
                if pipeline.streams.max_replicas() > nodes {
                    bail!(
                        "the pipeline file asks for {} replicas but the private server has {nodes} node(s): \
                         run `pcb up --cluster 3` (or 5), or lower [streams.*] replicas",
                        pipeline.streams.max_replicas()
                    );
                }
                let ids = IdentityStore::ensure(&ids_dir)?;
                let dir = data_dir.join("nats");
                let for_server = ids.clone();
                let sync = pipeline.nats_server.sync_interval.clone();
                let reserve = pipeline.streams.reserved_file_bytes();
                let mqtt =
                    (pipeline.nats_server.mqtt_port != 0).then_some(pipeline.nats_server.mqtt_port);
                let servers = tokio::task::spawn_blocking(move || {
                    let opts = crate::server::ServerOptions {
                        identities: Some(&for_server),
                        sync_interval: Some(sync),
                        reserve_bytes: Some(reserve),
                        mqtt_port: mqtt,
                        ..Default::default()
                    };
                    if nodes == 1 {
                        NatsServer::start_opts(&dir, 0, &opts).map(|s| vec![s])
                    } else {
                        NatsCluster::start(&dir, nodes, &opts).map(NatsCluster::into_nodes)
                    }
                })
                .await??;
                let u = crate::server::urls(&servers);
                if let Some(w) = servers[0].room_warning() {
                    eprintln!("pcb: warning: {w}");
                }
                if nodes == 1 {
                    eprintln!(
                        "pcb: private nats-server at {u} (store {}; one identity per stage in {})",
                        servers[0].dir().display(),
                        ids.dir().display()
                    );
                } else {
                    eprintln!(
                        "pcb: private nats-server cluster of {nodes} nodes at {u} (stores under {}; \
                         streams and buckets R{nodes}; one identity per stage in {})",
                        data_dir.join("nats").display(),
                        ids.dir().display()
                    );
                }
                if let Some(port) = mqtt {
                    eprintln!(
                        "pcb: MQTT for line-side systems at 127.0.0.1:{port}{}: topics pcb/verdicts/<line>, \
                         user line-side, password in {}",
                        if nodes > 1 { " (and the next ports, one per node)" } else { "" },
                        ids.password_file().display()
                    );
                }
                (servers, u, Some(ids))
            }
        };
        let base = pcb_common::NatsConfig {
            url: nats_url.clone(),
            ..pipeline.nats.clone()
        };
        let nats_as = |id: Identity| IdentityStore::connection_of(identities.as_ref(), id, &base);
        let nats = nats_as(Identity::Admin);
        let client = pcb_common::connect(&nats, "pcb")
            .await
            .with_context(|| format!("connecting to {nats_url}"))?;
        let js = async_nats::jetstream::new(client.clone());
        // A new cluster takes a moment to elect the leader JetStream's API needs.
        let deadline = Instant::now() + Duration::from_secs(if servers.len() > 1 { 30 } else { 0 });
        let made = loop {
            match pcb_common::provision(&js, &pipeline.streams, &pipeline.consumers()).await {
                Ok(made) => break made,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "JetStream not ready yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        tracing::info!(?made, "streams, buckets and consumers provisioned");
        let run_dir = data_dir.join("run");
        let configs =
            pipeline.write_stage_configs(&run_dir, |stage| nats_as(Identity::Stage(stage)))?;
        std::fs::write(url_file(&data_dir), &nats_url)?;
        let logs = data_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut running = Running {
            servers,
            server_restarts: 0,
            server_started: Instant::now(),
            stages: Vec::new(),
            bin_dir,
            nats_url,
            watch_dir,
            data_dir,
            pipeline,
            identities,
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

    /// A JetStream context on the pipeline's server as `name`, with the pipeline file's
    /// credentials and TLS.
    pub async fn jetstream(&self, name: &str) -> anyhow::Result<async_nats::jetstream::Context> {
        self.jetstream_as(Identity::Admin, name).await
    }

    /// [`Running::jetstream`] as identity `id` (on a server of one's own without
    /// identities: the pipeline file's credentials).
    pub async fn jetstream_as(
        &self,
        id: Identity,
        name: &str,
    ) -> anyhow::Result<async_nats::jetstream::Context> {
        let base = pcb_common::NatsConfig {
            url: self.nats_url.clone(),
            ..self.pipeline.nats.clone()
        };
        let nats = IdentityStore::connection_of(self.identities.as_ref(), id, &base);
        let client = pcb_common::connect(&nats, name)
            .await
            .with_context(|| format!("connecting to {}", self.nats_url))?;
        Ok(async_nats::jetstream::new(client))
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

    /// The process id of each running stage process, by stage name.
    pub fn stage_pids(&self) -> Vec<(StageName, u32)> {
        self.stages
            .iter()
            .map(|s| (s.stage, s.child.id()))
            .collect()
    }

    /// Log files of the stages.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        self.stages
            .iter()
            .map(|s| (format!("{}-{}", s.stage, s.replica), s.log.clone()))
            .collect()
    }

    /// Restarts the private server if it exited, and any stage that exited, with a growing
    /// delay; one that keeps failing right after start is reported as an error.
    pub fn check_children(&mut self) -> anyhow::Result<()> {
        for server in &mut self.servers {
            let quick = self.server_started.elapsed() < Duration::from_secs(5);
            // Same port, config and store: the stages' clients reconnect on their own and
            // find their streams and consumers as they were (acknowledged writes are on
            // disk: `sync_interval`); a cluster's node catches up from its peers.
            if let Some(status) = server
                .restart_if_exited()
                .context("restarting the private nats-server")?
            {
                eprintln!(
                    "pcb: nats-server {} exited ({status}); restarted on the same port and store (log {})",
                    server.url(),
                    server.log().display()
                );
                if quick && self.server_restarts >= 3 {
                    bail!(
                        "nats-server keeps exiting ({status}); see {}",
                        server.log().display()
                    );
                }
                self.server_restarts = if quick { self.server_restarts + 1 } else { 0 };
                self.server_started = Instant::now();
            }
        }
        for s in &mut self.stages {
            if s.given_up {
                continue;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                let quick = s.last_start.elapsed() < Duration::from_secs(5);
                if quick && s.restarts >= 3 && s.stage == StageName::Viewer {
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
        for server in &mut self.servers {
            server.stop();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_stage(
    bin_dir: &Path,
    stage: StageName,
    config: &Path,
    log: &Path,
) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(bin_dir.join(stage.name()));
    crate::process::scrub_pcb_env(&mut cmd)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    crate::process::spawn_tied(cmd).with_context(|| format!("starting {stage}"))
}

/// Where the viewer writes its URL under the data dir.
pub(crate) fn viewer_url_file(data_dir: &Path) -> PathBuf {
    data_dir.join("viewer.url")
}
