//! The registry writer stage: takes the trainers' candidates from `pcb.train.candidates`,
//! stores them as model versions, and promotes them to `live` by the pipeline's policy.

pub mod store;

use async_nats::jetstream;
use pcb_common::ack::Delivery;
use pcb_common::{Context, NoArgs, Outcome, Problems, Rejection, Stage, Validate};
use pcb_schemas::{
    ModelEvent, ModelEventKind, ModelRef, StageName, TrainCandidate, SUBJECT_MODEL_EVENTS,
};
use serde::{Deserialize, Serialize};

pub use store::{
    check_name, key_live, parse_ref, LiveAlias, ModelVersion, NewVersion, Registry, RegistryError,
};

pcb_common::declare_stage!(
    /// The registry writer stage.
    RegistryStage = Registry
);

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

/// Settings of the registry writer (the `[registry]` section, beside its consumer keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// Promotion policy: `never`, `always` or `if_not_worse`.
    pub promote: Promotion,
    /// For `if_not_worse`: how much lower (absolute, 0..1) a candidate's mAP may be.
    pub tolerance_map: f64,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            promote: Promotion::IfNotWorse,
            tolerance_map: 0.01,
        }
    }
}

impl Stage for RegistryStage {
    type Settings = RegistrySettings;
    type Error = RegistryStageError;
    type Args = NoArgs;

    async fn run(config: Config, ctx: Context) -> Result<(), RegistryStageError> {
        // The buckets first: without them no candidate could be taken.
        let registry = Registry::open(&async_nats::jetstream::new(ctx.client.clone())).await?;
        let Policy {
            promote: policy,
            tolerance_map: tolerance,
        } = config.config;
        pcb_common::stage::consume(&config, ctx, |js| {
            move |d| handle(registry.clone(), js.clone(), policy, tolerance, d)
        })
        .await?;
        Ok(())
    }
}

impl Validate for RegistrySettings {
    type Config = Policy;

    fn validate(self, p: &mut Problems) -> Option<Policy> {
        p.check(
            !(0.0..=1.0).contains(&self.tolerance_map),
            "registry.tolerance_map",
            "must be between 0 and 1 (mAP is a fraction)",
        );
        Some(Policy {
            promote: self.promote,
            tolerance_map: self.tolerance_map,
        })
    }
}

/// The promotion policy, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// When a candidate becomes live.
    pub promote: Promotion,
    /// Its tolerance.
    pub tolerance_map: f64,
}

/// Publishes a registry event on `pcb.models.events` (logged, not fatal, when it fails).
pub async fn publish_event(
    js: &jetstream::Context,
    kind: ModelEventKind,
    name: &str,
    version: u64,
    by: &str,
    reason: Option<String>,
) {
    let event = ModelEvent {
        kind,
        model: ModelRef {
            name: name.into(),
            version,
        },
        by: by.into(),
        reason,
        at_ms: pcb_common::now_ms(),
    };
    if let Err(e) = pcb_common::publish(js, SUBJECT_MODEL_EVENTS.into(), &event).await {
        tracing::warn!(error = %e, %kind, name, version, "could not publish a model event");
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
                origin: StageName::Trainer.name().into(),
                git_revision: c.git_revision.clone(),
            },
        )
        .await
        .map_err(|e| Rejection::new("register", e.to_string()))?;
    publish_event(
        js,
        pcb_schemas::ModelEventKind::Registered,
        &v.name,
        v.version,
        STAGE.name(),
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
    }
    let kind = if promote {
        pcb_schemas::ModelEventKind::Promoted
    } else {
        pcb_schemas::ModelEventKind::NotPromoted
    };
    publish_event(
        js,
        kind,
        &v.name,
        v.version,
        STAGE.name(),
        Some(why.clone()),
    )
    .await;
    tracing::info!(name = %v.name, version = v.version, promote, why = %why, "candidate registered");
    Ok(v)
}

/// Why the stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum RegistryStageError {
    /// The buckets could not be opened.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// It could not start, or its consumer stopped.
    #[error("registry: {0}")]
    Serve(#[from] pcb_common::stage::ServeError),
}

async fn handle(
    registry: Registry,
    js: jetstream::Context,
    policy: Promotion,
    tolerance: f64,
    d: Delivery,
) -> Outcome {
    let c: TrainCandidate = match d.decode() {
        Ok(c) => c,
        Err(r) => return Outcome::Reject(r),
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
        f.stage.settings.tolerance_map = 2.0;
        if let Some(c) = f.stage.consumer.as_mut() {
            c.max_deliver = 0;
        }
        assert_eq!(
            f.validate().unwrap_err().keys(),
            ["registry.max_deliver", "registry.tolerance_map"]
        );
    }
}
