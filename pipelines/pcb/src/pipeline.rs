//! The pipeline file (`pipelines/local.toml`): which stages run, how many replicas, their
//! settings, the streams and their limits; and the per-stage config files made from it.

use std::path::{Path, PathBuf};

use derive_where::derive_where;
use pcb_common::stage::Section;
use pcb_common::{
    ConfigError, ConsumerSettings, LogConfig, MetricsConfig, NatsConfig, Problems, Stage,
    StageFile, Topology,
};
use pcb_schemas::{ProcessKind, StageName};
use serde::{Deserialize, Serialize};

/// The whole pipeline file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineFile {
    /// Where the pipeline keeps its state.
    pub pipeline: PipelineMeta,
    /// NATS connection; an empty `url` starts a private nats-server under `data_dir`.
    pub nats: NatsConfig,
    /// The private nats-server (not used with a `url` of one's own).
    pub nats_server: ServerSettings,
    /// The streams' limits (what `pcb init` and `pcb up` apply; stages never change them).
    pub streams: Topology,
    /// Logging of every stage.
    pub log: LogConfig,
    /// The stages.
    pub stages: Stages,
}

/// The private nats-server that `pcb up` starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// How often its JetStream store is synced to disk: `always` (every write, before it
    /// is acked: an acked message survives a power cut) or a duration such as `2m`
    /// (nats-server's own default: a machine crash can lose the last interval's acked
    /// writes).
    pub sync_interval: String,
    /// Nodes of the private server: 1, or 3 or 5 for a cluster on this machine whose
    /// streams and buckets are replicated on every node (`pcb up --cluster N`).
    pub cluster_nodes: usize,
    /// The port of its MQTT listener on 127.0.0.1, from which PLCs and SCADA read each
    /// board's verdict on topic `pcb/verdicts/<line>` as user `line-side` (0: no MQTT; in a
    /// cluster node N listens on this port + N - 1).
    pub mqtt_port: u16,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            sync_interval: DEFAULT_SYNC_INTERVAL.into(),
            cluster_nodes: 1,
            mqtt_port: 0,
        }
    }
}

/// The private server's default `sync_interval` (README, "When a stream is full").
pub const DEFAULT_SYNC_INTERVAL: &str = "always";

/// Whether `s` is `always` or a duration nats-server reads (`500ms`, `30s`, `2m`, `1h`).
pub fn valid_sync_interval(s: &str) -> bool {
    if s == "always" {
        return true;
    }
    let digits = s.chars().take_while(|c| c.is_ascii_digit()).count();
    digits > 0 && matches!(&s[digits..], "ms" | "s" | "m" | "h")
}

/// Pipeline-wide settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineMeta {
    /// Directory for the private server's store, stage configs, logs and the default
    /// watched folder (relative paths are relative to the current directory).
    pub data_dir: PathBuf,
    /// Folder of the NATS identities (`pcb identities --out DIR`): `pcb up` gives each
    /// stage its own and the commands connect as `admin` or `reader`, on a server of your
    /// own too. Empty: `<data_dir>/identities`, used with the private server only.
    pub identities_dir: PathBuf,
}

impl Default for PipelineMeta {
    fn default() -> Self {
        PipelineMeta {
            data_dir: PathBuf::from(".pcb-data"),
            identities_dir: PathBuf::new(),
        }
    }
}

/// One stage: replicas, metrics port and its own settings.
// derive_where: a derive would ask the stage type itself to be Clone, Debug and PartialEq.
#[derive_where(Clone, Debug, PartialEq)]
#[derive(Serialize, Deserialize)]
#[serde(from = "RawEntry<T>", into = "RawEntry<T>", bound = "")]
pub struct StageEntry<T: Stage> {
    /// Processes to run (consumers share one durable, so each message goes to one).
    pub replicas: usize,
    /// First `/metrics` port; replica i listens on `metrics_port + i` (0: any free port).
    pub metrics_port: u16,
    /// The stage's own settings (its config file's `[<stage>]` section).
    pub settings: T::Settings,
    /// Its durable consumer's settings, side by side with its own in `settings`.
    pub consumer: Option<ConsumerSettings>,
}

/// A stage entry as the file spells it: the consumer keys sit in `settings`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, bound = "")]
struct RawEntry<T: Stage> {
    replicas: usize,
    metrics_port: u16,
    settings: Section<T>,
}

impl<T: Stage> Default for RawEntry<T> {
    fn default() -> Self {
        StageEntry::<T>::default().into()
    }
}

impl<T: Stage> From<RawEntry<T>> for StageEntry<T> {
    fn from(r: RawEntry<T>) -> Self {
        StageEntry {
            replicas: r.replicas,
            metrics_port: r.metrics_port,
            settings: r.settings.settings,
            consumer: r.settings.consumer,
        }
    }
}

impl<T: Stage> From<StageEntry<T>> for RawEntry<T> {
    fn from(e: StageEntry<T>) -> Self {
        RawEntry {
            replicas: e.replicas,
            metrics_port: e.metrics_port,
            settings: Section {
                consumer: e.consumer,
                settings: e.settings,
            },
        }
    }
}

impl<T: Stage> Default for StageEntry<T> {
    fn default() -> Self {
        StageEntry {
            replicas: 1,
            metrics_port: 0,
            settings: T::Settings::default(),
            consumer: ConsumerSettings::defaults(T::NAME),
        }
    }
}

/// What the launcher needs of any stage entry, whatever its settings type.
pub trait AnyStage {
    /// Processes to run.
    fn replicas(&self) -> usize;
    /// First `/metrics` port.
    fn metrics_port(&self) -> u16;
    /// The `[<stage>]` section as TOML.
    fn section(&self) -> toml::Value;
    /// Its durable consumer, as configured.
    fn consumer_spec(&self) -> Option<pcb_common::ConsumerSpec>;
    /// Validates the section as the stage would at start-up.
    fn check(&self, nats: &NatsConfig, log: &LogConfig) -> Result<(), Problems>;
}

impl<T: Stage> AnyStage for StageEntry<T> {
    fn replicas(&self) -> usize {
        self.replicas
    }

    fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    fn section(&self) -> toml::Value {
        let section = Section::<T> {
            consumer: self.consumer.clone(),
            settings: self.settings.clone(),
        };
        // Every settings type is plain data (Option fields are left out when unset): it
        // always serialises, and a failure must not silently become an empty section.
        toml::Value::try_from(&section)
            .unwrap_or_else(|e| panic!("the [{}] section does not serialise: {e}", T::NAME))
    }

    fn consumer_spec(&self) -> Option<pcb_common::ConsumerSpec> {
        self.consumer.as_ref().and_then(|c| c.spec(T::NAME))
    }

    fn check(&self, nats: &NatsConfig, log: &LogConfig) -> Result<(), Problems> {
        let file = StageFile::<T> {
            nats: nats.clone(),
            metrics: MetricsConfig::default(),
            log: log.clone(),
            stage: Section {
                consumer: self.consumer.clone(),
                settings: self.settings.clone(),
            },
        };
        file.validate().map(|_| ())
    }
}

/// The stages of the pipeline.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Stages {
    /// Watched directory → `pcb.images.raw`.
    pub ingester: StageEntry<pcb_ingester::IngesterStage>,
    /// `pcb.images.raw` → `pcb.images.encoded`.
    pub encoder: StageEntry<pcb_encoder::Encoder>,
    /// `pcb.images.encoded` → `pcb.shards.<k>`.
    pub router: StageEntry<pcb_router::Router>,
    /// `pcb.train.candidates` → the model registry (versions, `live` alias).
    pub registry: StageEntry<pcb_registry::RegistryStage>,
    /// `pcb.images.encoded` → `pcb.detections` with the live model.
    pub detector: StageEntry<pcb_detector::DetectorStage>,
    /// Training jobs (`pcb train`): `replicas` is the number of local ranks.
    pub trainer: StageEntry<pcb_trainer::Trainer>,
    /// The web viewer over the detections, images, training and registry streams.
    pub viewer: StageEntry<pcb_viewer::Viewer>,
}

impl Stages {
    /// The entry of `stage`.
    pub fn get(&self, stage: StageName) -> &dyn AnyStage {
        match stage {
            StageName::Ingester => &self.ingester,
            StageName::Encoder => &self.encoder,
            StageName::Router => &self.router,
            StageName::Registry => &self.registry,
            StageName::Detector => &self.detector,
            StageName::Viewer => &self.viewer,
            StageName::Trainer => &self.trainer,
        }
    }
}

/// The services `pcb up` runs, in start order: every stage the topology declares as one.
pub fn services() -> impl Iterator<Item = StageName> {
    StageName::ALL
        .into_iter()
        .filter(|s| s.decl().process == ProcessKind::Service)
}

impl PipelineFile {
    /// Loads and checks a pipeline file (with `PCB_*` overrides), reporting every problem.
    pub fn load(path: &Path) -> Result<PipelineFile, ConfigError> {
        let file: PipelineFile = pcb_common::load_config(Some(path))?;
        let mut p = Problems::default();
        file.validate(&mut p);
        p.into_result()
            .map_err(|p| ConfigError::invalid(Some(path), p))?;
        Ok(file)
    }

    fn validate(&self, p: &mut Problems) {
        if !self.nats.url.is_empty() {
            self.nats.validate("nats", p);
        }
        p.check(
            !valid_sync_interval(&self.nats_server.sync_interval),
            "nats_server.sync_interval",
            "must be \"always\" or a duration such as 30s, 2m, 500ms",
        );
        p.check(
            !self.pipeline.identities_dir.as_os_str().is_empty() && self.nats.has_credentials(),
            "pipeline.identities_dir",
            "set either this or a credential in [nats] (user, token, nkey_seed_file, creds_file)",
        );
        p.check(
            ![1, 3, 5].contains(&self.nats_server.cluster_nodes),
            "nats_server.cluster_nodes",
            "must be 1, 3 or 5 (a cluster needs a majority to elect leaders)",
        );
        p.check(
            self.nats_server.mqtt_port != 0
                && u32::from(self.nats_server.mqtt_port) + 4 > u32::from(u16::MAX),
            "nats_server.mqtt_port",
            "must leave room for a port per cluster node (at most 65531)",
        );
        self.streams.validate("streams", p);
        self.log.validate("log", p);
        p.check(
            self.stages.ingester.replicas > 1,
            "stages.ingester.replicas",
            "one ingester per watched directory (run another pipeline for another folder)",
        );
        p.check(
            self.stages.viewer.replicas > 1,
            "stages.viewer.replicas",
            "one viewer per address (0 turns it off)",
        );
        // Each stage validates its own section as it would at start-up.
        let probe = NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            ..self.nats.clone()
        };
        for stage in StageName::ALL {
            if let Err(problems) = self.stages.get(stage).check(&probe, &self.log) {
                for problem in problems.0 {
                    p.0.push(format!("stages.{stage}.settings: {problem}"));
                }
            }
            p.check(
                self.stages.get(stage).replicas() > 64,
                &format!("stages.{stage}.replicas"),
                "at most 64",
            );
        }
    }

    /// Every durable consumer the pipeline's running stages use (a stage with 0 replicas
    /// gets none: nothing would read it), with their configured settings: what `pcb init`
    /// creates.
    pub fn consumers(&self) -> Vec<pcb_common::ConsumerSpec> {
        let mut out: Vec<_> = StageName::ALL
            .into_iter()
            .filter(|s| self.stages.get(*s).replicas() > 0)
            .filter_map(|s| self.stages.get(s).consumer_spec())
            .collect();
        if self.stages.ingester.replicas > 0 && self.stages.ingester.settings.follow_rejections {
            out.extend(pcb_ingester::follow_spec());
        }
        out
    }

    /// The TOML config file of replica `replica` of `stage`, connecting with `nats` (the
    /// pipeline file's `[nats]` with the server's URL, or the stage's own identity).
    pub fn stage_config(&self, stage: StageName, replica: usize, nats: &NatsConfig) -> String {
        let entry = self.stages.get(stage);
        let port = match entry.metrics_port() {
            0 => 0,
            p => p as usize + replica,
        };
        let metrics = MetricsConfig {
            addr: format!("127.0.0.1:{port}"),
        };
        let value = |v: Result<toml::Value, toml::ser::Error>| {
            v.unwrap_or(toml::Value::Table(toml::Table::new()))
        };
        let mut t = toml::Table::new();
        t.insert("nats".into(), value(toml::Value::try_from(nats)));
        t.insert("metrics".into(), value(toml::Value::try_from(&metrics)));
        t.insert("log".into(), value(toml::Value::try_from(&self.log)));
        let mut section = entry.section();
        if stage == StageName::Trainer {
            // The trainer reads the shards the router writes.
            if let Some(table) = section.as_table_mut() {
                table.insert(
                    "shard_count".into(),
                    toml::Value::Integer(i64::from(self.stages.router.settings.shard_count)),
                );
            }
        }
        t.insert(stage.name().into(), section);
        format!(
            "# Written by `pcb` from the pipeline file; edit the pipeline file instead.\n{}",
            toml::to_string_pretty(&t).unwrap_or_default()
        )
    }

    /// Writes the config of every replica of every service under `dir`, each connecting
    /// with `nats(stage)`, mode 0600 (a config may hold a password or token); returns
    /// (stage, replica, path).
    pub fn write_stage_configs(
        &self,
        dir: &Path,
        nats: impl Fn(StageName) -> NatsConfig,
    ) -> std::io::Result<Vec<(StageName, usize, PathBuf)>> {
        std::fs::create_dir_all(dir)?;
        let mut out = Vec::new();
        for stage in services() {
            for r in 0..self.stages.get(stage).replicas() {
                let path = dir.join(format!("{stage}-{r}.toml"));
                let text = self.stage_config(stage, r, &nats(stage));
                pcb_common::identity::write_secret(&path, text.as_bytes())?;
                out.push((stage, r, path));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_pipeline_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../local.toml");
        let p = PipelineFile::load(&path).expect("pipelines/local.toml is valid");
        assert_eq!(p.stages.router.settings.shard_count, 8);
    }

    fn loads<T: Stage>(path: &Path) -> pcb_common::Validated<T> {
        StageFile::<T>::load(Some(path))
            .expect("parses")
            .validate()
            .expect("valid")
    }

    #[test]
    fn stage_configs_load_in_the_stages() {
        let p = PipelineFile::default();
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = NatsConfig {
            url: "nats://127.0.0.1:1".into(),
            ..NatsConfig::default()
        };
        let files = p
            .write_stage_configs(dir.path(), |_| nats.clone())
            .expect("write");
        assert_eq!(files.len(), services().count(), "one file per service");
        let trainer = dir.path().join("trainer.toml");
        std::fs::write(&trainer, p.stage_config(StageName::Trainer, 0, &nats)).expect("write");
        let t = loads::<pcb_trainer::Trainer>(&trainer);
        assert_eq!(t.config.shard_count, p.stages.router.settings.shard_count);
        for (stage, _, path) in files {
            match stage {
                StageName::Ingester => _ = loads::<pcb_ingester::IngesterStage>(&path),
                StageName::Encoder => _ = loads::<pcb_encoder::Encoder>(&path),
                StageName::Router => {
                    let r = loads::<pcb_router::Router>(&path);
                    let c = r.consumer.expect("the router consumes");
                    assert_eq!(c.concurrency, 32, "the router's own consumer defaults");
                }
                StageName::Registry => _ = loads::<pcb_registry::RegistryStage>(&path),
                StageName::Detector => _ = loads::<pcb_detector::DetectorStage>(&path),
                StageName::Viewer => {
                    let v = loads::<pcb_viewer::Viewer>(&path);
                    assert!(
                        v.config.addr.ip().is_loopback(),
                        "the viewer binds to loopback"
                    );
                }
                StageName::Trainer => panic!("the trainer runs as a job, not a service"),
            }
        }
        let consumers = p.consumers();
        let durables: Vec<&str> = consumers.iter().map(|c| c.durable.as_str()).collect();
        assert_eq!(
            durables,
            [
                "encoder",
                "router",
                "registry",
                "detector",
                "ingester-follow-rejections"
            ]
        );
    }

    fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    keys(&path, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }

    /// The pipeline file's keys are part of its contract: `tests/golden/pipeline-keys.txt`
    /// pins them (regenerate with `PCB_WRITE_GOLDEN=1 cargo test -p pcb --lib
    /// the_pipeline_files_keys_are_pinned`, for a deliberate change only).
    #[test]
    fn the_pipeline_files_keys_are_pinned() {
        let value = toml::Value::try_from(PipelineFile::default()).expect("serialises");
        let mut all = Vec::new();
        keys("", &value, &mut all);
        all.sort();
        let text = all.join("\n") + "\n";
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/pipeline-keys.txt");
        if std::env::var_os("PCB_WRITE_GOLDEN").is_some() {
            std::fs::write(&path, &text).expect("write golden");
        }
        let want = std::fs::read_to_string(&path).expect("golden pipeline keys");
        assert_eq!(text, want, "the pipeline file's keys changed");
    }

    #[test]
    fn sync_intervals_are_always_or_a_duration() {
        for ok in ["always", "2m", "30s", "500ms", "1h"] {
            assert!(valid_sync_interval(ok), "{ok}");
        }
        for bad in ["", "never", "2", "m", "2 m", "-1s", "2d"] {
            assert!(!valid_sync_interval(bad), "{bad}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "[nats_server]\nsync_interval = \"sometimes\"\n").expect("write");
        let text = PipelineFile::load(&path).unwrap_err().to_string();
        assert!(text.contains("nats_server.sync_interval"), "{text}");
    }

    #[test]
    fn problems_in_stage_sections_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[stages.router.settings]\nshard_count = 0\n[stages.ingester]\nreplicas = 2\n",
        )
        .expect("write");
        let text = PipelineFile::load(&path).unwrap_err().to_string();
        assert!(
            text.contains("stages.router.settings: router.shard_count"),
            "{text}"
        );
        assert!(text.contains("stages.ingester.replicas"), "{text}");
        assert!(text.contains("p.toml"), "{text}");
    }
}
