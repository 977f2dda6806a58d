//! The pipeline file (`pipelines/local.toml`): which stages run, how many replicas, their
//! settings, the streams and their limits; and the per-stage config files made from it.

use std::path::{Path, PathBuf};

use pcb_common::{ConfigError, LogConfig, MetricsConfig, NatsConfig, Problems, Topology};
use serde::{Deserialize, Serialize};

/// The whole pipeline file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineFile {
    /// Where the pipeline keeps its state.
    pub pipeline: PipelineMeta,
    /// NATS connection; an empty `url` starts a private nats-server under `data_dir`.
    pub nats: NatsConfig,
    /// The four streams and their limits.
    pub streams: Topology,
    /// Logging of every stage.
    pub log: LogConfig,
    /// The stages.
    pub stages: Stages,
}

/// Pipeline-wide settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineMeta {
    /// Directory for the private server's store, stage configs, logs and the default
    /// watched folder (relative paths are relative to the current directory).
    pub data_dir: PathBuf,
}

impl Default for PipelineMeta {
    fn default() -> Self {
        PipelineMeta {
            data_dir: PathBuf::from(".pcb-data"),
        }
    }
}

/// One stage: replicas, metrics port and its own settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StageEntry<S> {
    /// Processes to run (consumers share one durable, so each message goes to one).
    pub replicas: usize,
    /// First `/metrics` port; replica i listens on `metrics_port + i` (0: any free port).
    pub metrics_port: u16,
    /// The stage's own settings (its config file's `[<stage>]` section).
    pub settings: S,
}

impl<S: Default> Default for StageEntry<S> {
    fn default() -> Self {
        StageEntry {
            replicas: 1,
            metrics_port: 0,
            settings: S::default(),
        }
    }
}

/// The stages of the pipeline.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Stages {
    /// Watched directory → `pcb.images.raw`.
    pub ingester: StageEntry<pcb_ingester::IngesterSettings>,
    /// `pcb.images.raw` → `pcb.images.encoded`.
    pub encoder: StageEntry<pcb_encoder::EncoderSettings>,
    /// `pcb.images.encoded` → `pcb.shards.<k>`.
    pub router: StageEntry<pcb_router::RouterSettings>,
    /// `pcb.train.candidates` → the model registry (versions, `live` alias).
    pub registry: StageEntry<pcb_registry::RegistrySettings>,
    /// `pcb.images.encoded` → `pcb.detections` with the live model.
    pub detector: StageEntry<pcb_detector::DetectorSettings>,
    /// Training jobs (`pcb train`): `replicas` is the number of local ranks.
    pub trainer: StageEntry<pcb_trainer::TrainerSettings>,
    /// The web viewer over the detections, images, training and registry streams.
    pub viewer: StageEntry<pcb_viewer::ViewerSettings>,
}

/// The stage binaries, in start order.
pub const STAGES: [&str; 6] = [
    "ingester", "encoder", "router", "registry", "detector", "viewer",
];

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
        let mut probe = self.clone();
        probe.nats.url = "nats://127.0.0.1:4222".into();
        for stage in STAGES.into_iter().chain(["trainer"]) {
            if let Err(problems) = probe.check_stage(stage) {
                for problem in problems.0 {
                    p.0.push(format!("stages.{stage}.settings: {problem}"));
                }
            }
        }
        for (stage, n) in [
            ("encoder", self.stages.encoder.replicas),
            ("router", self.stages.router.replicas),
            ("trainer", self.stages.trainer.replicas),
            ("detector", self.stages.detector.replicas),
        ] {
            p.check(n > 64, &format!("stages.{stage}.replicas"), "at most 64");
        }
    }

    fn check_stage(&self, stage: &str) -> Result<(), Problems> {
        let text = self.stage_config(stage, 0, &self.nats.url);
        let bad = |e: toml::de::Error| Problems(vec![e.to_string()]);
        match stage {
            "ingester" => toml::from_str::<pcb_ingester::FileConfig>(&text)
                .map_err(bad)?
                .validate()
                .map(|_| ()),
            "encoder" => toml::from_str::<pcb_encoder::FileConfig>(&text)
                .map_err(bad)?
                .validate()
                .map(|_| ()),
            "registry" => toml::from_str::<pcb_registry::FileConfig>(&text)
                .map_err(bad)?
                .validate()
                .map(|_| ()),
            "detector" => toml::from_str::<pcb_detector::FileConfig>(&text)
                .map_err(bad)?
                .validate()
                .map(|_| ()),
            "viewer" => toml::from_str::<pcb_viewer::FileConfig>(&text)
                .map_err(bad)?
                .validate()
                .map(|_| ()),
            "trainer" => toml::from_str::<pcb_trainer::FileConfig>(&text)
                .map_err(bad)?
                .validate()
                .map(|_| ()),
            _ => toml::from_str::<pcb_router::FileConfig>(&text)
                .map_err(bad)?
                .validate()
                .map(|_| ()),
        }
    }

    /// Replicas of `stage`.
    pub fn replicas(&self, stage: &str) -> usize {
        match stage {
            "ingester" => self.stages.ingester.replicas,
            "encoder" => self.stages.encoder.replicas,
            "trainer" => self.stages.trainer.replicas,
            "registry" => self.stages.registry.replicas,
            "detector" => self.stages.detector.replicas,
            "viewer" => self.stages.viewer.replicas,
            _ => self.stages.router.replicas,
        }
    }

    /// The TOML config file of replica `replica` of `stage`, connecting to `nats_url`.
    pub fn stage_config(&self, stage: &str, replica: usize, nats_url: &str) -> String {
        let port = match stage {
            "ingester" => self.stages.ingester.metrics_port,
            "encoder" => self.stages.encoder.metrics_port,
            "trainer" => self.stages.trainer.metrics_port,
            "registry" => self.stages.registry.metrics_port,
            "detector" => self.stages.detector.metrics_port,
            "viewer" => self.stages.viewer.metrics_port,
            _ => self.stages.router.metrics_port,
        };
        let port = if port == 0 {
            0
        } else {
            port as usize + replica
        };
        let nats = NatsConfig {
            url: nats_url.to_string(),
            ..self.nats.clone()
        };
        let metrics = MetricsConfig {
            addr: format!("127.0.0.1:{port}"),
        };
        let value = |v: Result<toml::Value, toml::ser::Error>| {
            v.unwrap_or(toml::Value::Table(toml::Table::new()))
        };
        let mut t = toml::Table::new();
        t.insert("nats".into(), value(toml::Value::try_from(&nats)));
        t.insert(
            "streams".into(),
            value(toml::Value::try_from(&self.streams)),
        );
        t.insert("metrics".into(), value(toml::Value::try_from(&metrics)));
        t.insert("log".into(), value(toml::Value::try_from(&self.log)));
        let settings = match stage {
            "ingester" => toml::Value::try_from(&self.stages.ingester.settings),
            "encoder" => toml::Value::try_from(&self.stages.encoder.settings),
            "trainer" => {
                // The trainer reads the shards the router writes.
                let mut t = self.stages.trainer.settings.clone();
                t.shard_count = self.stages.router.settings.shard_count;
                toml::Value::try_from(&t)
            }
            "registry" => toml::Value::try_from(&self.stages.registry.settings),
            "detector" => toml::Value::try_from(&self.stages.detector.settings),
            "viewer" => toml::Value::try_from(&self.stages.viewer.settings),
            _ => toml::Value::try_from(&self.stages.router.settings),
        };
        t.insert(stage.into(), value(settings));
        format!(
            "# Written by `pcb` from the pipeline file; edit the pipeline file instead.\n{}",
            toml::to_string_pretty(&t).unwrap_or_default()
        )
    }

    /// Writes every stage's config under `dir`; returns (stage, replica, path).
    pub fn write_stage_configs(
        &self,
        dir: &Path,
        nats_url: &str,
    ) -> std::io::Result<Vec<(&'static str, usize, PathBuf)>> {
        std::fs::create_dir_all(dir)?;
        let mut out = Vec::new();
        for stage in STAGES {
            for r in 0..self.replicas(stage) {
                let path = dir.join(format!("{stage}-{r}.toml"));
                std::fs::write(&path, self.stage_config(stage, r, nats_url))?;
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

    #[test]
    fn stage_configs_load_in_the_stages() {
        let p = PipelineFile::default();
        let dir = tempfile::tempdir().expect("tempdir");
        let files = p
            .write_stage_configs(dir.path(), "nats://127.0.0.1:1")
            .expect("write");
        assert_eq!(
            files.len(),
            STAGES.len(),
            "one file per stage (one replica each)"
        );
        let trainer = dir.path().join("trainer.toml");
        std::fs::write(&trainer, p.stage_config("trainer", 0, "nats://127.0.0.1:1"))
            .expect("write");
        let t = pcb_trainer::Config::load(Some(&trainer)).expect("trainer config");
        assert_eq!(t.shard_count, p.stages.router.settings.shard_count);
        for (stage, _, path) in files {
            match stage {
                "ingester" => {
                    pcb_ingester::Config::load(Some(&path)).expect("ingester config");
                }
                "encoder" => {
                    pcb_encoder::Config::load(Some(&path)).expect("encoder config");
                }
                "registry" => {
                    pcb_registry::Config::load(Some(&path)).expect("registry config");
                }
                "detector" => {
                    pcb_detector::Config::load(Some(&path)).expect("detector config");
                }
                "viewer" => {
                    let v = pcb_viewer::Config::load(Some(&path)).expect("viewer config");
                    assert!(v.addr.ip().is_loopback(), "the viewer binds to loopback");
                }
                _ => {
                    pcb_router::Config::load(Some(&path)).expect("router config");
                }
            }
        }
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
