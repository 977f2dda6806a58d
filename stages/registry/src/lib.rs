//! The registry writer stage: takes the trainers' candidates from `pcb.train.candidates`,
//! stores them as model versions, and promotes them to `live` by the pipeline's policy.

use std::collections::BTreeMap;

use async_nats::jetstream;
use pcb_common::ack::Delivery;
use pcb_common::{Context, NoArgs, Outcome, Problems, Rejection, Stage, Validate};
use pcb_schemas::{StageName, TrainCandidate};
use serde::{Deserialize, Serialize};

pub use pcb_model_store::{
    board_unit, check_name, key_canary, key_live, key_shadow, parse_ref, publish_event,
    CanaryAlias, CanaryRule, LiveAlias, ModelVersion, NewVersion, Registry, RegistryError,
    ShadowAlias,
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
    /// As `IfNotWorse`, but through a shadow period: a candidate that passes runs as the
    /// shadow version, and is promoted once its verdicts agreed with the live ones on
    /// enough boards (`shadow_min_boards`, `shadow_min_agreement`).
    AfterShadow,
}

/// Settings of the registry writer (the `[registry]` section, beside its consumer keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// Promotion policy: `never`, `always`, `if_not_worse` or `after_shadow`.
    pub promote: Promotion,
    /// For `if_not_worse` and `after_shadow`: how much lower (absolute, 0..1) a
    /// candidate's mAP may be.
    pub tolerance_map: f64,
    /// Largest candidate weights object taken, in MiB (a ResNet-50 FPN is about 160).
    pub max_artifact_mib: u64,
    /// For `after_shadow`: boards both versions must have answered before promotion.
    pub shadow_min_boards: u64,
    /// For `after_shadow`: the share of those boards (0..1) on which the verdicts agree.
    pub shadow_min_agreement: f64,
    /// For `after_shadow`: how often the shadow period is judged, in seconds.
    pub shadow_check_secs: u64,
    /// For `after_shadow`: corrected boards (label revisions saved in the viewer) both
    /// versions must have answered in the shadow period before promotion, judged by
    /// `shadow_corrected_rule`; 0: corrections are not required.
    pub shadow_min_corrected: u64,
    /// For `after_shadow` with `shadow_min_corrected` above 0: `not_worse_than_live` (the
    /// shadow version's verdict is confirmed by the correction on at least as many of those
    /// boards as the live one's) or `min_accuracy` (on at least
    /// `shadow_min_corrected_accuracy` of them).
    pub shadow_corrected_rule: CorrectedRule,
    /// For `shadow_corrected_rule = "min_accuracy"`: the share of the corrected boards
    /// (0..1) on which the shadow version's verdict must be the corrected one.
    pub shadow_min_corrected_accuracy: f64,
}

/// What the shadow version must show on the boards an operator corrected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrectedRule {
    /// Right at least as often as the live version.
    NotWorseThanLive,
    /// Right on at least `shadow_min_corrected_accuracy` of them.
    MinAccuracy,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            promote: Promotion::IfNotWorse,
            tolerance_map: 0.01,
            max_artifact_mib: 1024,
            shadow_min_boards: 200,
            shadow_min_agreement: 0.95,
            shadow_check_secs: 30,
            shadow_min_corrected: 0,
            shadow_corrected_rule: CorrectedRule::NotWorseThanLive,
            shadow_min_corrected_accuracy: 0.9,
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
        let policy = config.config;
        if policy.promote == Promotion::AfterShadow {
            let (registry, js) = (
                registry.clone(),
                async_nats::jetstream::new(ctx.client.clone()),
            );
            let shutdown = ctx.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = judge_shadows_forever(&registry, &js, policy) => {}
                }
            });
        }
        pcb_common::stage::consume(&config, ctx, |js| {
            move |d| handle(registry.clone(), js.clone(), policy, d)
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
        p.at_least("registry.max_artifact_mib", self.max_artifact_mib, 1);
        p.at_least("registry.shadow_min_boards", self.shadow_min_boards, 1);
        p.check(
            !(0.0..=1.0).contains(&self.shadow_min_agreement),
            "registry.shadow_min_agreement",
            "must be between 0 and 1 (a share of boards)",
        );
        p.at_least("registry.shadow_check_secs", self.shadow_check_secs, 1);
        p.check(
            !(0.0..=1.0).contains(&self.shadow_min_corrected_accuracy),
            "registry.shadow_min_corrected_accuracy",
            "must be between 0 and 1 (a share of boards)",
        );
        Some(Policy {
            promote: self.promote,
            tolerance_map: self.tolerance_map,
            max_artifact_bytes: self.max_artifact_mib << 20,
            shadow: ShadowGate {
                min_boards: self.shadow_min_boards,
                min_agreement: self.shadow_min_agreement,
                every: std::time::Duration::from_secs(self.shadow_check_secs),
                min_corrected: self.shadow_min_corrected,
                corrected_rule: self.shadow_corrected_rule,
                min_corrected_accuracy: self.shadow_min_corrected_accuracy,
            },
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
    /// Largest weights object taken.
    pub max_artifact_bytes: u64,
    /// For `after_shadow`: when a shadow period ends in a promotion.
    pub shadow: ShadowGate,
}

/// What a shadow period must show before the policy promotes its version.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShadowGate {
    /// Boards both versions answered.
    pub min_boards: u64,
    /// Share of them with the same verdict.
    pub min_agreement: f64,
    /// How often it is judged.
    pub every: std::time::Duration,
    /// Corrected boards both versions answered (0: corrections are not required).
    pub min_corrected: u64,
    /// What the shadow version must show on them.
    pub corrected_rule: CorrectedRule,
    /// For [`CorrectedRule::MinAccuracy`]: its share of right verdicts on them.
    pub min_corrected_accuracy: f64,
}

impl Default for ShadowGate {
    /// The gate of the default settings.
    fn default() -> Self {
        let d = RegistrySettings::default();
        ShadowGate {
            min_boards: d.shadow_min_boards,
            min_agreement: d.shadow_min_agreement,
            every: std::time::Duration::from_secs(d.shadow_check_secs),
            min_corrected: d.shadow_min_corrected,
            corrected_rule: d.shadow_corrected_rule,
            min_corrected_accuracy: d.shadow_min_corrected_accuracy,
        }
    }
}

/// Both versions' verdicts on the corrected boards they both answered, against the
/// corrected labels (a box: `fail`; none: `pass`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OnCorrected {
    /// Corrected boards both versions answered.
    pub boards: u64,
    /// Of them, those on which the shadow version's verdict was the corrected one.
    pub shadow_right: u64,
    /// Of them, those on which the live version's verdict was the corrected one.
    pub live_right: u64,
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

impl ShadowGate {
    /// Whether `agree` of `boards`, and the verdicts on the corrected boards, pass, and why.
    pub fn judge(
        &self,
        version: u64,
        live: u64,
        boards: u64,
        agree: u64,
        corrected: OnCorrected,
    ) -> (bool, String) {
        let what = format!(
            "shadow v{version} agreed with live v{live} on {agree} of {boards} boards ({:.1}%)",
            percent(agree, boards)
        );
        // Without the corrections' gate the reasons read as they always did.
        let gated = self.min_corrected > 0;
        let on = corrected;
        let cwhat = format!(
            "on {} corrected boards shadow right on {} ({:.1}%), live on {} ({:.1}%)",
            on.boards,
            on.shadow_right,
            percent(on.shadow_right, on.boards),
            on.live_right,
            percent(on.live_right, on.boards)
        );
        let also = if gated {
            format!("; {cwhat}")
        } else {
            String::new()
        };
        if boards < self.min_boards {
            return (
                false,
                format!("{what}; waiting for {} boards{also}", self.min_boards),
            );
        }
        if boards == 0 || (agree as f64 / boards as f64) < self.min_agreement {
            return (
                false,
                format!("{what} < {:.1}%{also}", self.min_agreement * 100.0),
            );
        }
        let agreed = format!(
            "{what} ≥ {:.1}% on ≥ {} boards",
            self.min_agreement * 100.0,
            self.min_boards
        );
        if !gated {
            return (true, format!("policy: {agreed}"));
        }
        if on.boards < self.min_corrected {
            return (
                false,
                format!(
                    "{agreed}; {cwhat}; waiting for {} corrected boards",
                    self.min_corrected
                ),
            );
        }
        match self.corrected_rule {
            CorrectedRule::NotWorseThanLive if on.shadow_right < on.live_right => (
                false,
                format!("{agreed}; {cwhat}: the shadow version is right less often"),
            ),
            CorrectedRule::NotWorseThanLive => (
                true,
                format!(
                    "policy: {agreed}; {cwhat}: not worse than live on ≥ {} corrected boards",
                    self.min_corrected
                ),
            ),
            CorrectedRule::MinAccuracy
                if (on.shadow_right as f64) < self.min_corrected_accuracy * on.boards as f64 =>
            {
                (
                    false,
                    format!(
                        "{agreed}; {cwhat} < {:.1}%",
                        self.min_corrected_accuracy * 100.0
                    ),
                )
            }
            CorrectedRule::MinAccuracy => (
                true,
                format!(
                    "policy: {agreed}; {cwhat} ≥ {:.1}% on ≥ {} corrected boards",
                    self.min_corrected_accuracy * 100.0,
                    self.min_corrected
                ),
            ),
        }
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
        // The same bar as `if_not_worse`, to enter the shadow period.
        (Promotion::AfterShadow, _) => {
            should_promote(Promotion::IfNotWorse, tolerance, candidate, live)
        }
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

/// The weights a candidate names, from the candidates' object store (never from a file):
/// refused when missing, over `max_bytes`, not what its sha256 says, or not a safetensors
/// file whose tensors fit the network the candidate declares. A digest is never echoed for
/// what was refused.
pub async fn candidate_weights(
    js: &jetstream::Context,
    c: &TrainCandidate,
    max_bytes: u64,
) -> Result<Vec<u8>, Rejection> {
    use tokio::io::AsyncReadExt;
    let store = js
        .get_object_store(pcb_schemas::OBJECTS_CANDIDATES)
        .await
        .map_err(|e| Rejection::new("artifact-store", e.to_string()))?;
    let info = store.info(&c.artifact).await.map_err(|e| {
        Rejection::new(
            "artifact-missing",
            format!(
                "no object {:?} in {}: {e}",
                truncate(&c.artifact, 120),
                pcb_schemas::OBJECTS_CANDIDATES
            ),
        )
    })?;
    if info.size as u64 > max_bytes {
        return Err(Rejection::new(
            "artifact-too-large",
            format!(
                "the weights object is {} bytes, over max_artifact_mib ({} bytes)",
                info.size, max_bytes
            ),
        ));
    }
    let mut object = store
        .get(&c.artifact)
        .await
        .map_err(|e| Rejection::new("artifact-store", e.to_string()))?;
    let mut weights = Vec::with_capacity(info.size);
    // Read one byte past the cap, so an object that grew after `info` is still refused.
    (&mut object)
        .take(max_bytes + 1)
        .read_to_end(&mut weights)
        .await
        .map_err(|e| Rejection::new("artifact-store", e.to_string()))?;
    if weights.len() as u64 > max_bytes {
        return Err(Rejection::new(
            "artifact-too-large",
            format!("the weights object is over max_artifact_mib ({max_bytes} bytes)"),
        ));
    }
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&weights));
    if sha != c.sha256 {
        return Err(Rejection::new(
            "artifact-digest",
            "the weights object is not what the candidate's sha256 says",
        ));
    }
    // Building the declared network takes CPU time (an R50 is 40M parameters): off the
    // runtime's threads.
    let config = c.model_config.clone();
    tokio::task::spawn_blocking(move || check_weights(&weights, &config).map(|()| weights))
        .await
        .map_err(|e| Rejection::new("artifact-shapes", format!("the check failed: {e}")))?
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Checks that `weights` is a safetensors file holding exactly the tensors of the network
/// `model_config` declares, each with its shape: the network is built (on the CPU, with
/// fresh weights) and its variables compared name by name, so a file that would not load
/// into the declared model, or would load with tensors left over, is refused here and
/// never reaches a detector.
pub fn check_weights(weights: &[u8], model_config: &serde_json::Value) -> Result<(), Rejection> {
    let tensors = safetensors::SafeTensors::deserialize(weights).map_err(|e| {
        Rejection::new(
            "artifact-format",
            format!("the weights object is not a safetensors file: {e}"),
        )
    })?;
    let config: pcb_vision::ModelConfig =
        serde_json::from_value(model_config.clone()).map_err(|e| {
            Rejection::new(
                "bad-config",
                format!("the candidate's model_config is not a network this pipeline builds: {e}"),
            )
        })?;
    let want = expected_shapes(config)?;
    let got: BTreeMap<String, Vec<i64>> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().iter().map(|&d| d as i64).collect()))
        .collect();
    let mut problems = Vec::new();
    for (name, shape) in &want {
        match got.get(name) {
            None => problems.push(format!("no tensor {name}")),
            Some(s) if s != shape => problems.push(format!(
                "{name} is {s:?}, the declared network needs {shape:?}"
            )),
            Some(_) => {}
        }
    }
    for name in got.keys().filter(|n| !want.contains_key(*n)) {
        problems.push(format!("{name} is not a tensor of the declared network"));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(5);
    Err(Rejection::new(
        "artifact-shapes",
        format!(
            "{n} tensor(s) do not fit the declared network ({} tensors): {}{}",
            want.len(),
            problems.join("; "),
            if n > 5 { "; ..." } else { "" }
        ),
    ))
}

/// The name and shape of every variable of the network `config` declares.
fn expected_shapes(
    config: pcb_vision::ModelConfig,
) -> Result<BTreeMap<String, Vec<i64>>, Rejection> {
    // A config that libtorch cannot build (a zero width, say) panics inside tch: caught,
    // it is a refusal of this candidate, not the end of the registry.
    std::panic::catch_unwind(|| {
        pcb_vision::Detector::new(config, tch::Device::Cpu, pcb_vision::Sampling::First).shapes()
    })
    .map_err(|_| {
        Rejection::new(
            "bad-config",
            "the candidate's model_config does not build a network".to_string(),
        )
    })
}

/// Registers one candidate and applies the policy; a candidate already registered (the
/// same job and weights, e.g. a redelivery) is that version again, not a new one.
pub async fn take_candidate(
    registry: &Registry,
    js: &jetstream::Context,
    c: &TrainCandidate,
    policy: Policy,
) -> Result<ModelVersion, Rejection> {
    check_name(&c.model).map_err(|e| Rejection::new("bad-name", e.to_string()))?;
    let known = registry
        .list(Some(&c.model))
        .await
        .map_err(|e| Rejection::new("register", e.to_string()))?;
    if let Some(v) = known
        .into_iter()
        .find(|v| v.sha256 == c.sha256 && v.job.as_deref() == Some(c.job.as_str()))
    {
        tracing::info!(name = %v.name, version = v.version, "candidate already registered");
        return Ok(v);
    }
    let weights = candidate_weights(js, c, policy.max_artifact_bytes).await?;
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
    let (promote, why) = should_promote(policy.promote, policy.tolerance_map, &v, live.as_ref());
    // After a shadow period: a candidate that passes the bar runs as the shadow version
    // first (the first version of a name has nothing to be compared with: it goes live).
    if promote && policy.promote == Promotion::AfterShadow {
        if let Some(live) = &live {
            registry
                .set_shadow(&v.name, v.version, "policy")
                .await
                .map_err(|e| Rejection::new("promote", e.to_string()))?;
            let why = format!(
                "{why}; shadow period beside live v{} before promotion",
                live.version
            );
            publish_event(
                js,
                pcb_schemas::ModelEventKind::Shadowed,
                &v.name,
                v.version,
                STAGE.name(),
                Some(why.clone()),
            )
            .await;
            tracing::info!(name = %v.name, version = v.version, why = %why, "candidate registered as the shadow version");
            remove_candidate_object(js, c).await;
            return Ok(v);
        }
    }
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
    remove_candidate_object(js, c).await;
    Ok(v)
}

/// Registered under its version: the candidate's copy is no longer needed.
async fn remove_candidate_object(js: &jetstream::Context, c: &TrainCandidate) {
    if let Ok(store) = js.get_object_store(pcb_schemas::OBJECTS_CANDIDATES).await {
        if let Err(e) = store.delete(&c.artifact).await {
            tracing::warn!(object = %c.artifact, error = %e, "candidate object not removed");
        }
    }
}

/// Judges every policy-set shadow period every `policy.shadow.every`, until cancelled.
async fn judge_shadows_forever(registry: &Registry, js: &jetstream::Context, policy: Policy) {
    // Kept across rounds: each round reads only the label revisions stored since the last.
    let mut corrections = Corrections::default();
    loop {
        tokio::time::sleep(policy.shadow.every).await;
        if let Err(e) = judge_shadows(registry, js, policy.shadow, &mut corrections).await {
            tracing::warn!(error = %e, "shadow periods not judged this round");
        }
    }
}

/// Judges the shadow periods the policy started (a shadow set by a person is theirs to
/// end): a version whose verdicts agreed with the live ones on enough of the boards both
/// answered since it was set (and, when the gate asks, was right often enough on the
/// corrected ones among them) is promoted. `corrections` is brought up to date first, only
/// when the gate asks for them. Returns what was decided, per model.
pub async fn judge_shadows(
    registry: &Registry,
    js: &jetstream::Context,
    gate: ShadowGate,
    corrections: &mut Corrections,
) -> Result<Vec<(String, bool, String)>, String> {
    if gate.min_corrected > 0 {
        corrections.update(js).await?;
    }
    let mut names: Vec<String> = registry
        .list(None)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|v| v.name)
        .collect();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let Some(shadow) = registry.shadow(&name).await.map_err(|e| e.to_string())? else {
            continue;
        };
        let Some(live) = registry.live(&name).await.map_err(|e| e.to_string())? else {
            continue;
        };
        if shadow.by != "policy" {
            continue;
        }
        let since = shadow.since_ms;
        let shadow_answers = verdicts_since(
            js,
            pcb_schemas::STREAM_SHADOW,
            pcb_schemas::SUBJECT_SHADOW_DETECTIONS,
            since,
            &name,
            shadow.version,
        )
        .await?;
        let live_answers = verdicts_since(
            js,
            pcb_schemas::STREAM_DETECTIONS,
            pcb_schemas::SUBJECT_DETECTIONS,
            since,
            &name,
            live.version,
        )
        .await?;
        let (mut boards, mut agree) = (0u64, 0u64);
        for (image, v) in &shadow_answers {
            if let Some(l) = live_answers.get(image) {
                boards += 1;
                agree += u64::from(l == v);
            }
        }
        let on = if gate.min_corrected > 0 {
            corrections.tally(&shadow_answers, &live_answers)
        } else {
            OnCorrected::default()
        };
        let (promote, why) = gate.judge(shadow.version, live.version, boards, agree, on);
        if promote {
            registry
                .promote(&name, shadow.version, "policy")
                .await
                .map_err(|e| e.to_string())?;
            publish_event(
                js,
                pcb_schemas::ModelEventKind::Promoted,
                &name,
                shadow.version,
                STAGE.name(),
                Some(why.clone()),
            )
            .await;
            tracing::info!(%name, version = shadow.version, why = %why, "shadow version promoted");
        } else {
            tracing::debug!(%name, version = shadow.version, why = %why, "shadow period goes on");
        }
        out.push((name, promote, why));
    }
    Ok(out)
}

/// The boards an operator corrected in the viewer: each image's latest label revision on
/// `pcb.images.raw`, read from its headers only (who saved it, how many boxes), never its
/// image. Kept between rounds and read on from the last sequence seen.
#[derive(Debug, Clone, Default)]
pub struct Corrections {
    /// The next stream sequence to read.
    next_seq: u64,
    /// Image id → boxes of its latest revision (0: the board is clean).
    boxes: std::collections::HashMap<String, u64>,
}

impl Corrections {
    /// Corrected boards known.
    pub fn len(&self) -> usize {
        self.boxes.len()
    }

    /// Whether no board is known corrected.
    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }

    /// The truth of a corrected board: `fail` when its corrected labels have a box.
    pub fn truth(&self, image_id: &str) -> Option<pcb_schemas::Verdict> {
        self.boxes.get(image_id).map(|&b| {
            if b > 0 {
                pcb_schemas::Verdict::Fail
            } else {
                pcb_schemas::Verdict::Pass
            }
        })
    }

    /// Both versions' verdicts against the corrections, on the corrected boards both
    /// answered.
    pub fn tally(
        &self,
        shadow: &std::collections::HashMap<String, pcb_schemas::Verdict>,
        live: &std::collections::HashMap<String, pcb_schemas::Verdict>,
    ) -> OnCorrected {
        let mut on = OnCorrected::default();
        for image in self.boxes.keys() {
            let (Some(s), Some(l), Some(truth)) =
                (shadow.get(image), live.get(image), self.truth(image))
            else {
                continue;
            };
            on.boards += 1;
            on.shadow_right += u64::from(*s == truth);
            on.live_right += u64::from(*l == truth);
        }
        on
    }

    /// Reads the label revisions stored since the last call (headers only).
    pub async fn update(&mut self, js: &jetstream::Context) -> Result<(), String> {
        use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
        use futures::StreamExt;
        let subject = pcb_schemas::SUBJECT_RAW;
        let err = |e: &dyn std::fmt::Display| format!("reading {subject}: {e}");
        let mut s = js
            .get_stream(pcb_schemas::STREAM_IMAGES)
            .await
            .map_err(|e| err(&e))?;
        let state = s.info().await.map_err(|e| err(&e))?.state.clone();
        if state.last_sequence < self.next_seq.max(1) {
            return Ok(());
        }
        let consumer = s
            .create_consumer(OrderedConfig {
                filter_subject: subject.to_string(),
                headers_only: true,
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: self.next_seq.max(state.first_sequence).max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| err(&e))?;
        // No raw record since the last round: nothing to wait for.
        if consumer.cached_info().num_pending == 0 {
            self.next_seq = state.last_sequence + 1;
            return Ok(());
        }
        let mut messages = consumer.messages().await.map_err(|e| err(&e))?;
        loop {
            let next =
                tokio::time::timeout(std::time::Duration::from_secs(2), messages.next()).await;
            let Ok(Some(Ok(m))) = next else {
                break;
            };
            let info = m.info().map_err(|e| err(&e))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            // `<image_id>[.l<labels digest>]`: the image id is what detections name.
            let id = header(async_nats::header::NATS_MESSAGE_ID.as_ref())
                .and_then(|v| v.split('.').next().map(str::to_string));
            if let (Some(id), Some(_)) = (id, header(pcb_schemas::REVISION_HEADER)) {
                let boxes = header(pcb_schemas::REVISION_BOXES_HEADER)
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(0);
                self.boxes.insert(id, boxes);
            }
            self.next_seq = seq + 1;
            if pending == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// The verdicts `name`@`version` gave on `subject` since `since_ms`, by image id (a
/// replay from that time; the shadow period bounds it).
async fn verdicts_since(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    since_ms: i64,
    name: &str,
    version: u64,
) -> Result<std::collections::HashMap<String, pcb_schemas::Verdict>, String> {
    use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    use futures::StreamExt;
    let err = |e: &dyn std::fmt::Display| format!("reading {subject}: {e}");
    let mut s = js.get_stream(stream).await.map_err(|e| err(&e))?;
    let last = s.info().await.map_err(|e| err(&e))?.state.last_sequence;
    let mut out = std::collections::HashMap::new();
    if last == 0 {
        return Ok(out);
    }
    let start = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(since_ms) * 1_000_000)
        .map_err(|e| err(&e))?;
    let consumer = s
        .create_consumer(OrderedConfig {
            filter_subject: subject.to_string(),
            deliver_policy: DeliverPolicy::ByStartTime { start_time: start },
            ..Default::default()
        })
        .await
        .map_err(|e| err(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| err(&e))?;
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(2), messages.next()).await;
        let Ok(Some(Ok(m))) = next else {
            break;
        };
        let info = m.info().map_err(|e| err(&e))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        if let Ok(d) = pcb_schemas::decode::<pcb_schemas::Detection>(&m.payload, None) {
            if d.model.name == name && d.model.version == version {
                out.insert(d.image_id, d.verdict);
            }
        }
        if pending == 0 || seq >= last {
            break;
        }
    }
    Ok(out)
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
    policy: Policy,
    d: Delivery,
) -> Outcome {
    let c: TrainCandidate = match d.decode() {
        Ok(c) => c,
        Err(r) => return Outcome::Reject(r),
    };
    match take_candidate(&registry, &js, &c, policy).await {
        Ok(_) => Outcome::Done,
        // The buckets may be briefly unavailable: try again later.
        Err(r)
            if r.reason_code == "register"
                || r.reason_code == "promote"
                || r.reason_code == "artifact-store" =>
        {
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
    fn a_shadow_period_passes_on_enough_boards_with_enough_agreement() {
        let gate = ShadowGate {
            min_boards: 100,
            min_agreement: 0.95,
            ..ShadowGate::default()
        };
        let none = OnCorrected::default();
        let (ok, why) = gate.judge(3, 2, 99, 99, none);
        assert!(!ok && why.ends_with("waiting for 100 boards"), "{why}");
        let (ok, why) = gate.judge(3, 2, 100, 94, none);
        assert!(
            !ok && why.contains("94 of 100 boards (94.0%) < 95.0%"),
            "{why}"
        );
        let (ok, why) = gate.judge(3, 2, 100, 95, none);
        assert!(
            ok && why.starts_with("policy: shadow v3 agreed with live v2"),
            "{why}"
        );
        // Entering the shadow period takes the same bar as `if_not_worse`.
        let live = version(1, Some(0.9));
        assert_eq!(
            should_promote(
                Promotion::AfterShadow,
                0.01,
                &version(2, Some(0.85)),
                Some(&live)
            ),
            should_promote(
                Promotion::IfNotWorse,
                0.01,
                &version(2, Some(0.85)),
                Some(&live)
            )
        );
        assert!(
            should_promote(
                Promotion::AfterShadow,
                0.01,
                &version(2, Some(0.9)),
                Some(&live)
            )
            .0
        );
    }

    #[test]
    fn the_corrected_boards_gate_waits_then_compares_with_live_or_a_share() {
        let gate = ShadowGate {
            min_boards: 10,
            min_agreement: 0.5,
            min_corrected: 4,
            ..ShadowGate::default()
        };
        let on = |boards, shadow_right, live_right| OnCorrected {
            boards,
            shadow_right,
            live_right,
        };
        let (ok, why) = gate.judge(3, 2, 10, 10, on(3, 3, 0));
        assert!(
            !ok && why.ends_with("waiting for 4 corrected boards"),
            "{why}"
        );
        let (ok, why) = gate.judge(3, 2, 10, 10, on(4, 2, 3));
        assert!(
            !ok && why
                .contains("on 4 corrected boards shadow right on 2 (50.0%), live on 3 (75.0%)")
                && why.ends_with("right less often"),
            "{why}"
        );
        let (ok, why) = gate.judge(3, 2, 10, 10, on(4, 3, 3));
        assert!(ok && why.starts_with("policy: "), "{why}");
        // Agreement comes first: the corrections do not make up for it.
        let (ok, why) = gate.judge(3, 2, 10, 4, on(4, 4, 0));
        assert!(!ok && why.contains("< 50.0%"), "{why}");
        let share = ShadowGate {
            corrected_rule: CorrectedRule::MinAccuracy,
            min_corrected_accuracy: 0.75,
            ..gate
        };
        let (ok, why) = share.judge(3, 2, 10, 10, on(4, 2, 0));
        assert!(!ok && why.ends_with("< 75.0%"), "{why}");
        let (ok, why) = share.judge(3, 2, 10, 10, on(4, 3, 4));
        assert!(
            ok && why.ends_with("≥ 75.0% on ≥ 4 corrected boards"),
            "{why}"
        );
        // The truth of a corrected board: a box fails it.
        let mut c = Corrections::default();
        c.boxes.insert("a".into(), 2);
        c.boxes.insert("b".into(), 0);
        c.boxes.insert("c".into(), 1);
        use pcb_schemas::Verdict::{Fail, Pass};
        let shadow = [("a", Fail), ("b", Pass), ("c", Pass)]
            .map(|(k, v)| (k.to_string(), v))
            .into_iter()
            .collect();
        let live = [("a", Pass), ("b", Pass)]
            .map(|(k, v)| (k.to_string(), v))
            .into_iter()
            .collect();
        assert_eq!(c.tally(&shadow, &live), on(2, 2, 1));
    }

    #[test]
    fn config_problems_are_reported_together() {
        let mut f = FileConfig::default();
        f.stage.settings.tolerance_map = 2.0;
        f.stage.settings.shadow_min_corrected_accuracy = -0.5;
        if let Some(c) = f.stage.consumer.as_mut() {
            c.max_deliver = 0;
        }
        assert_eq!(
            f.validate().unwrap_err().keys(),
            [
                "registry.max_deliver",
                "registry.tolerance_map",
                "registry.shadow_min_corrected_accuracy"
            ]
        );
    }
}
