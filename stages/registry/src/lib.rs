//! The registry writer stage: takes the trainers' candidates from `pcb.train.candidates`,
//! stores them as model versions, and promotes them to `live` by the pipeline's policy.

pub mod store;

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use pcb_common::ack::{ConsumerSpec, Delivery};
use pcb_common::{
    load_config, validate_common, ConfigError, LogConfig, Metrics, MetricsConfig, NatsConfig,
    Outcome, Problems, Rejection, Shutdown, Topology,
};
use pcb_schemas::{
    decode, ModelEvent, ModelRef, TrainCandidate, STREAM_TRAINING, SUBJECT_MODEL_EVENTS,
    SUBJECT_TRAIN_CANDIDATES,
};
use serde::{Deserialize, Serialize};

pub use store::{
    check_name, key_live, parse_ref, LiveAlias, ModelVersion, NewVersion, Registry, RegistryError,
};

/// The stage's name: its durable, its dead-letter subject and its metrics label.
pub const STAGE: &str = "registry";

/// When a registered candidate becomes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Promotion {
    /// Only by hand (`pcb models promote`).
    Never,
    /// Every candidate.
    Always,
    /// When its val mAP is at least the live model's minus `tolerance` (the first model of
    /// a name always).
    IfNotWorse,
}

/// The registry's config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// NATS connection.
    pub nats: NatsConfig,
    /// Streams to provision before consuming.
    pub streams: Topology,
    /// `/metrics` endpoint.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
    /// The registry's own settings.
    pub registry: RegistrySettings,
}

/// Settings of the registry writer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// Durable consumer name.
    pub durable: String,
    /// Promotion policy: `never`, `always` or `if_not_worse`.
    pub promote: Promotion,
    /// For `if_not_worse`: how much lower (absolute, 0..1) a candidate's mAP may be.
    pub tolerance_map: f64,
    /// Redeliver a candidate not acked within this many seconds.
    pub ack_wait_secs: u64,
    /// Deliveries of a failing candidate before it becomes a dead letter.
    pub max_deliver: i64,
    /// Delay before a transient failure is retried, in milliseconds.
    pub retry_delay_ms: u64,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            durable: STAGE.into(),
            promote: Promotion::IfNotWorse,
            tolerance_map: 0.01,
            ack_wait_secs: 60,
            max_deliver: 5,
            retry_delay_ms: 2000,
        }
    }
}

/// The validated configuration the stage runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS connection.
    pub nats: NatsConfig,
    /// Streams.
    pub streams: Topology,
    /// `/metrics`.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Policy.
    pub promote: Promotion,
    /// Its tolerance.
    pub tolerance_map: f64,
    /// The consumer.
    pub consumer: ConsumerSpec,
}

impl Config {
    /// Loads the file under `PCB_*` variables and validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file: FileConfig = load_config(path)?;
        file.validate().map_err(|p| ConfigError::invalid(path, p))
    }
}

impl FileConfig {
    /// Checks every value and reports all problems at once.
    pub fn validate(self) -> Result<Config, Problems> {
        let mut p = Problems::default();
        validate_common(&self.nats, &self.streams, &self.metrics, &self.log, &mut p);
        let r = &self.registry;
        p.check(r.durable.trim().is_empty(), "registry.durable", "is empty");
        p.check(
            !(0.0..=1.0).contains(&r.tolerance_map),
            "registry.tolerance_map",
            "must be between 0 and 1 (mAP is a fraction)",
        );
        p.check(
            r.ack_wait_secs == 0,
            "registry.ack_wait_secs",
            "must be at least 1",
        );
        p.check(
            r.max_deliver < 1,
            "registry.max_deliver",
            "must be at least 1",
        );
        p.into_result()?;
        Ok(Config {
            promote: r.promote,
            tolerance_map: r.tolerance_map,
            consumer: ConsumerSpec {
                stage: STAGE.into(),
                stream: STREAM_TRAINING.into(),
                durable: r.durable.clone(),
                filter_subject: SUBJECT_TRAIN_CANDIDATES.into(),
                ack_wait: Duration::from_secs(r.ack_wait_secs),
                max_deliver: r.max_deliver,
                retry_delay: Duration::from_millis(r.retry_delay_ms),
                concurrency: 1,
            },
            nats: self.nats,
            streams: self.streams,
            metrics: self.metrics,
            log: self.log,
        })
    }
}

/// Publishes a registry event on `pcb.models.events` (logged, not fatal, when it fails).
pub async fn publish_event(
    js: &jetstream::Context,
    kind: &str,
    name: &str,
    version: u64,
    by: &str,
    reason: Option<String>,
) {
    let event = ModelEvent {
        kind: kind.into(),
        model: ModelRef {
            name: name.into(),
            version,
        },
        by: by.into(),
        reason,
        at_ms: pcb_common::now_ms(),
    };
    if let Err(e) = pcb_common::publish(js, SUBJECT_MODEL_EVENTS.into(), &event).await {
        tracing::warn!(error = %e, kind, name, version, "could not publish a model event");
    }
}

/// Whether the policy promotes `candidate` over `live`.
pub fn should_promote(
    policy: Promotion,
    tolerance: f64,
    candidate: &ModelVersion,
    live: Option<&ModelVersion>,
) -> (bool, String) {
    match (policy, live) {
        (Promotion::Never, _) => (false, "policy: promote by hand".into()),
        (Promotion::Always, _) => (true, "policy: always".into()),
        (Promotion::IfNotWorse, None) => (true, "the first live version of this model".into()),
        (Promotion::IfNotWorse, Some(live)) => match (candidate.map_deeppcb, live.map_deeppcb) {
            (Some(c), Some(l)) if c + tolerance >= l => (
                true,
                format!(
                    "val mAP {c:.4} ≥ live v{} {l:.4} - {tolerance}",
                    live.version
                ),
            ),
            (Some(c), Some(l)) => (
                false,
                format!(
                    "val mAP {c:.4} < live v{} {l:.4} - {tolerance}",
                    live.version
                ),
            ),
            (None, _) => (
                false,
                "the candidate was not evaluated (no val split)".into(),
            ),
            (Some(c), None) => (
                true,
                format!("val mAP {c:.4}; live v{} has none", live.version),
            ),
        },
    }
}

/// Registers one candidate and applies the policy.
pub async fn take_candidate(
    registry: &Registry,
    js: &jetstream::Context,
    c: &TrainCandidate,
    policy: Promotion,
    tolerance: f64,
) -> Result<ModelVersion, Rejection> {
    check_name(&c.model).map_err(|e| Rejection::new("bad-name", e.to_string()))?;
    let weights = tokio::fs::read(&c.artifact).await.map_err(|e| {
        Rejection::new(
            "artifact-unreadable",
            format!("reading {}: {e}", c.artifact),
        )
    })?;
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&weights));
    if sha != c.sha256 {
        return Err(Rejection::new(
            "artifact-digest",
            format!(
                "{}: sha256 {sha} is not the candidate's {}",
                c.artifact, c.sha256
            ),
        ));
    }
    let v = registry
        .register(
            &c.model,
            &weights,
            NewVersion {
                model_config: c.model_config.clone(),
                metrics: c.metrics.clone(),
                hyperparameters: c.hyperparameters.clone(),
                snapshot: Some(c.snapshot.clone()),
                job: Some(c.job.clone()),
                origin: "trainer".into(),
                git_revision: c.git_revision.clone(),
            },
        )
        .await
        .map_err(|e| Rejection::new("register", e.to_string()))?;
    publish_event(
        js,
        "registered",
        &v.name,
        v.version,
        STAGE,
        Some(format!("from job {}", c.job)),
    )
    .await;
    let live = match registry.live(&v.name).await {
        Ok(Some(l)) => registry.version(&v.name, l.version).await.ok(),
        _ => None,
    };
    let (promote, why) = should_promote(policy, tolerance, &v, live.as_ref());
    if promote {
        registry
            .promote(&v.name, v.version, "policy")
            .await
            .map_err(|e| Rejection::new("promote", e.to_string()))?;
        publish_event(js, "promoted", &v.name, v.version, STAGE, Some(why.clone())).await;
    } else {
        publish_event(
            js,
            "not-promoted",
            &v.name,
            v.version,
            STAGE,
            Some(why.clone()),
        )
        .await;
    }
    tracing::info!(name = %v.name, version = v.version, promote, why = %why, "candidate registered");
    Ok(v)
}

/// Why the stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum RegistryStageError {
    /// Start-up failed.
    #[error("starting the registry: {0}")]
    Start(#[from] pcb_common::stage::StartError),
    /// The buckets could not be opened.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The consumer stopped.
    #[error("registry consumer: {0}")]
    Consume(#[from] pcb_common::ack::ConsumeError),
}

async fn handle(
    registry: Registry,
    js: jetstream::Context,
    policy: Promotion,
    tolerance: f64,
    d: Delivery,
) -> Outcome {
    let c: TrainCandidate = match decode(&d.payload, d.schema()) {
        Ok(c) => c,
        Err(e) => return Outcome::Reject(Rejection::new("undecodable", e.to_string())),
    };
    match take_candidate(&registry, &js, &c, policy, tolerance).await {
        Ok(_) => Outcome::Done,
        // The buckets may be briefly unavailable: try again later.
        Err(r) if r.reason_code == "register" || r.reason_code == "promote" => {
            Outcome::Retry(r.reason)
        }
        Err(r) => Outcome::Reject(r.about(None, c.artifact.clone())),
    }
}

/// Runs the stage until `shutdown`.
pub async fn run(
    config: Config,
    client: async_nats::Client,
    shutdown: Shutdown,
) -> Result<(), RegistryStageError> {
    let metrics = Metrics::new(STAGE);
    let js = pcb_common::stage::prepare(
        &client,
        &config.streams,
        &metrics,
        &config.metrics,
        &shutdown,
    )
    .await?;
    let registry = Registry::open(&js).await?;
    let (policy, tolerance) = (config.promote, config.tolerance_map);
    let js2 = js.clone();
    pcb_common::run_consumer(js, config.consumer, metrics, shutdown, move |d| {
        handle(registry.clone(), js2.clone(), policy, tolerance, d)
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: u64, map: Option<f64>) -> ModelVersion {
        ModelVersion {
            name: "m".into(),
            version: v,
            created_at_ms: 0,
            object: String::new(),
            sha256: String::new(),
            size_bytes: 0,
            model_config: serde_json::Value::Null,
            map_deeppcb: map,
            map50: None,
            ap_per_class: Default::default(),
            metrics: None,
            hyperparameters: serde_json::Value::Null,
            snapshot: None,
            parent_version: None,
            job: None,
            origin: "trainer".into(),
            git_revision: None,
        }
    }

    #[test]
    fn the_policy_compares_with_the_live_model() {
        let live = version(1, Some(0.90));
        let p = Promotion::IfNotWorse;
        assert!(should_promote(p, 0.01, &version(2, Some(0.895)), Some(&live)).0);
        assert!(!should_promote(p, 0.01, &version(2, Some(0.85)), Some(&live)).0);
        assert!(
            should_promote(p, 0.01, &version(1, None), None).0,
            "first model"
        );
        assert!(!should_promote(p, 0.01, &version(2, None), Some(&live)).0);
        assert!(!should_promote(Promotion::Never, 0.0, &version(2, Some(1.0)), Some(&live)).0);
        assert!(should_promote(Promotion::Always, 0.0, &version(2, Some(0.0)), Some(&live)).0);
    }

    #[test]
    fn config_problems_are_reported_together() {
        let mut f = FileConfig::default();
        f.registry.tolerance_map = 2.0;
        f.registry.max_deliver = 0;
        let text = f.validate().unwrap_err().to_string();
        assert!(text.contains("registry.tolerance_map"), "{text}");
        assert!(text.contains("registry.max_deliver"), "{text}");
    }
}
