//! The online detector stage: serves the registry's `live` model on `pcb.images.encoded`
//! through one durable consumer shared by every replica, batches dynamically, publishes one
//! `pcb.detections` message per image, and swaps in a newly promoted model between batches.
//! When the registry marks a `shadow` version, each batch also goes through it, after the
//! live answers are handed over, and its answers go to `pcb.shadow.detections` only. When it
//! marks a `canary` version, the boards its rule selects (a hash of the board id, or one
//! line) are answered by the canary instead, for real; a canary that is not loaded, or
//! fails on an image, leaves that image to the live version.

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use base64::Engine;
use futures::StreamExt;
use pcb_common::ack::Delivery;
use pcb_common::{
    Batching, Context, Metrics, NoArgs, Outcome, Problems, Rejection, Shutdown, Stage, Validate,
};
use pcb_model_store::{
    key_canary, key_live, key_shadow, publish_event, CanaryAlias, CanaryRule, LiveAlias,
    ModelVersion, Registry, ShadowAlias,
};
use pcb_schemas::{
    decode, verdict_subject, Defect, Detection, EncodedImage, LineVerdict, ModelRef, CLASS_NAMES,
    SUBJECT_DETECTIONS, SUBJECT_SHADOW_DETECTIONS,
};
use pcb_vision::{compose, Bf16, Detector, InferenceOptions, ModelConfig, Sampling};
use serde::{Deserialize, Serialize};
use tch::Tensor;

pcb_common::declare_stage!(
    /// The online detector stage.
    DetectorStage = Detector
);

/// Settings of the online detector (the `[detector]` section, beside its consumer keys;
/// its `concurrency` is the number of batches in flight).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorSettings {
    /// The registry model whose `live` version is served.
    pub model_name: String,
    /// Images per forward pass at most.
    pub max_batch: usize,
    /// Wait at most this many milliseconds after an image for others to batch with it.
    pub max_wait_ms: u64,
    /// Defects scoring at least this are reported.
    pub report_threshold: f32,
    /// A board fails when a defect scores at least this.
    pub fail_threshold: f32,
    /// libtorch intra-op threads (0: its default).
    pub threads: usize,
    /// Inference in bf16: `auto` (where the CPU computes bf16 natively, such as AVX-512
    /// BF16), `on` or `off`.
    pub bf16: Bf16,
}

impl Default for DetectorSettings {
    fn default() -> Self {
        DetectorSettings {
            model_name: "pcb-defects".into(),
            max_batch: 4,
            max_wait_ms: 20,
            report_threshold: 0.3,
            fail_threshold: 0.5,
            threads: 0,
            bf16: Bf16::Auto,
        }
    }
}

impl Stage for DetectorStage {
    type Settings = DetectorSettings;
    type Error = DetectorError;
    type Args = NoArgs;

    async fn run(config: Config, ctx: Context) -> Result<(), DetectorError> {
        run(config, ctx).await
    }
}

impl Validate for DetectorSettings {
    type Config = DetectorSettings;

    fn validate(self, p: &mut Problems) -> Option<DetectorSettings> {
        if let Err(e) = pcb_model_store::check_name(&self.model_name) {
            p.push("detector.model_name", e);
        }
        p.between("detector.max_batch", self.max_batch, 1, 256);
        p.between("detector.report_threshold", self.report_threshold, 0.0, 1.0);
        p.between("detector.fail_threshold", self.fail_threshold, 0.0, 1.0);
        Some(self)
    }
}

/// Why the stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    /// Start-up failed.
    #[error("starting the detector: {0}")]
    Start(#[from] pcb_common::stage::StartError),
    /// The registry could not be opened or watched.
    #[error("registry: {0}")]
    Registry(String),
    /// The consumer could not be opened or read.
    #[error("detector consumer: {0}")]
    Consume(#[from] pcb_common::ack::ConsumeError),
    /// The inference thread stopped.
    #[error("the inference thread stopped")]
    Inference,
}

/// A model ready to serve.
pub struct Loaded {
    /// Its registry entry.
    pub version: ModelVersion,
    /// The network with its weights.
    pub detector: Detector,
}

/// Fetches a version's weights (checked against their sha256) and builds the network.
pub async fn load_version(
    registry: &Registry,
    name: &str,
    version: u64,
    bf16: Bf16,
) -> Result<Loaded, String> {
    let v = registry
        .version(name, version)
        .await
        .map_err(|e| e.to_string())?;
    let weights = registry.weights(&v).await.map_err(|e| e.to_string())?;
    let config: ModelConfig = serde_json::from_value(v.model_config.clone())
        .map_err(|e| format!("{name}@{version}: model_config: {e}"))?;
    let origin = format!("{name}@{version}");
    tokio::task::spawn_blocking(move || {
        // tch reads safetensors from a file; a private temporary one is removed on drop.
        let mut file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        std::io::Write::write_all(&mut file, &weights).map_err(|e| e.to_string())?;
        let tensors = Tensor::read_safetensors(file.path())
            .map_err(|e| format!("{origin}: not a safetensors file: {e}"))?;
        let mut detector = Detector::new(config, tch::Device::Cpu, Sampling::Random);
        detector
            .load_tensors(tensors, &origin)
            .map_err(|e| e.to_string())?;
        detector
            .model
            .prepare_inference(InferenceOptions::fast(bf16));
        Ok(Loaded {
            version: v,
            detector,
        })
    })
    .await
    .map_err(|_| "the loading task ended abnormally".to_string())?
}

/// What the inference thread is asked.
enum Job {
    Swap(Box<Loaded>),
    /// A new shadow version, or none (the shadow period ended).
    Shadow(Option<Box<Loaded>>),
    /// A new canary version, or none (the canary ended, or its version did not load).
    Canary(Option<Box<Loaded>>),
    Detect {
        /// Every image of the batch, composed for the live version.
        images: Vec<Tensor>,
        reply: tokio::sync::oneshot::Sender<Result<Served, String>>,
        /// The batch for the shadow version, composed for the input it takes.
        shadow: Option<ShadowJob>,
        /// The images the canary answers, composed for the input it takes.
        canary: Option<CanaryJob>,
    },
}

/// The canary's part of a batch: answered by the canary version in place of the live one.
struct CanaryJob {
    /// The version the images were composed for: another one loaded since is not run on
    /// them (the live version answers them).
    version: u64,
    /// Positions in the batch.
    positions: Vec<usize>,
    images: Vec<Tensor>,
}

/// One image's defects (or why the model failed on it), and the version answering.
type ImageAnswer = (ModelRef, Result<Vec<Defect>, String>);

/// The answers to a batch: each image's, by the version that gave it.
struct Served {
    /// Each image's answer.
    per_image: Vec<ImageAnswer>,
    /// Images the canary was to answer that the live version answered, and why.
    fallbacks: Vec<(usize, String)>,
    seconds: f64,
}

/// The shadow half of a batch: answered after the live half, so the live answers never
/// wait for it.
struct ShadowJob {
    /// The version the images were composed for: another one loaded since is not run on
    /// them.
    version: u64,
    images: Vec<Tensor>,
    reply: tokio::sync::oneshot::Sender<Result<Answer, String>>,
}

/// Detections for a batch and the version that made them.
struct Answer {
    model: ModelRef,
    /// Each image's defects, or why the model failed on it.
    per_image: Vec<Result<Vec<Defect>, String>>,
    seconds: f64,
}

/// One forward pass: the defects of each image, or why it failed.
type Pass = Result<Vec<Vec<Defect>>, String>;

/// Runs `pass` over the batch; when it fails (an error, or a panic inside it) on more
/// than one image, runs each image alone, so that one image the model cannot take fails
/// alone and the others get their answers.
fn isolating(
    images: &[Tensor],
    pass: impl Fn(&[Tensor]) -> Pass,
) -> Vec<Result<Vec<Defect>, String>> {
    let guarded = |batch: &[Tensor]| -> Pass {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pass(batch)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(format!("the model panicked: {what}"))
            })?;
        if out.len() == batch.len() {
            Ok(out)
        } else {
            Err(format!("{} answers for {} images", out.len(), batch.len()))
        }
    };
    match guarded(images) {
        Ok(per_image) => per_image.into_iter().map(Ok).collect(),
        Err(reason) if images.len() == 1 => vec![Err(reason)],
        Err(reason) => {
            tracing::warn!(images = images.len(), %reason, "a batch failed; detecting its images one by one");
            images
                .iter()
                .map(|image| {
                    guarded(std::slice::from_ref(image))
                        .and_then(|mut one| one.pop().ok_or_else(|| "no answer".to_string()))
                })
                .collect()
        }
    }
}

fn defects_of(d: &pcb_vision::Detections, threshold: f32) -> Result<Vec<Defect>, tch::TchError> {
    Ok(d.rows()?
        .into_iter()
        .filter(|(_, _, score)| *score >= threshold)
        .map(|([x1, y1, x2, y2], l, score)| Defect {
            x1,
            y1,
            x2,
            y2,
            class_id: l as u16,
            class: CLASS_NAMES
                .get((l as usize).wrapping_sub(1))
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("class-{l}")),
            score,
        })
        .collect())
}

/// A version that answers images: the loaded network, or a stand-in in the unit tests (so
/// the canary's fallbacks are tested without weights).
trait Answering {
    /// The version, as answers name it.
    fn model(&self) -> ModelRef;
    /// One forward pass over a batch, boxes from `threshold` up.
    fn pass(&self, batch: &[Tensor], threshold: f32) -> Pass;
}

impl Answering for Loaded {
    fn model(&self) -> ModelRef {
        ModelRef {
            name: self.version.name.clone(),
            version: self.version.version,
        }
    }

    fn pass(&self, batch: &[Tensor], threshold: f32) -> Pass {
        tch::no_grad(|| self.detector.model.detect(batch))
            .map_err(|e| e.to_string())
            .and_then(|out| {
                out.detections
                    .iter()
                    .map(|d| defects_of(d, threshold).map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()
            })
    }
}

/// Runs `m` over `images`, each image's failure apart.
fn answer_with(m: &impl Answering, images: &[Tensor], threshold: f32) -> Answer {
    let started = Instant::now();
    let per_image = isolating(images, |batch| m.pass(batch, threshold));
    Answer {
        model: m.model(),
        per_image,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Answers a batch with the live version, and the canary's images with the canary (any it
/// fails on, or all of them when it is not the version they were composed for, with the
/// live version after all).
fn serve<M: Answering>(
    live: &M,
    canary: Option<&M>,
    images: &[Tensor],
    job: Option<CanaryJob>,
    threshold: f32,
) -> Served {
    let Some(job) = job else {
        // No canary: one pass, as before canaries existed.
        let a = answer_with(live, images, threshold);
        return Served {
            per_image: a
                .per_image
                .into_iter()
                .map(|r| (a.model.clone(), r))
                .collect(),
            fallbacks: Vec::new(),
            seconds: a.seconds,
        };
    };
    let started = Instant::now();
    let mut out: Vec<Option<ImageAnswer>> = (0..images.len()).map(|_| None).collect();
    let mut fallbacks = Vec::new();
    match canary.filter(|c| c.model().version == job.version) {
        Some(c) => {
            let a = answer_with(c, &job.images, threshold);
            for (k, r) in job.positions.into_iter().zip(a.per_image) {
                match r {
                    Ok(defects) => out[k] = Some((a.model.clone(), Ok(defects))),
                    Err(reason) => fallbacks.push((k, reason)),
                }
            }
        }
        None => {
            let why = format!("canary v{} is not loaded", job.version);
            fallbacks.extend(job.positions.into_iter().map(|k| (k, why.clone())));
        }
    }
    let rest: Vec<usize> = (0..images.len()).filter(|k| out[*k].is_none()).collect();
    if !rest.is_empty() {
        let batch: Vec<Tensor> = rest.iter().map(|k| images[*k].shallow_clone()).collect();
        let a = answer_with(live, &batch, threshold);
        for (k, r) in rest.into_iter().zip(a.per_image) {
            out[k] = Some((a.model.clone(), r));
        }
    }
    let live_ref = live.model();
    Served {
        per_image: out
            .into_iter()
            .map(|o| o.unwrap_or_else(|| (live_ref.clone(), Err("no answer".into()))))
            .collect(),
        fallbacks,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// The thread that owns the serving model, the shadow one and the canary (tch tensors are
/// not shareable across threads).
fn inference_thread(jobs: std_mpsc::Receiver<Job>, threshold: f32, threads: usize) {
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let heap = pcb_vision::heap::keep_freed_buffers();
    tracing::info!(%heap, "allocator");
    let mut current: Option<Box<Loaded>> = None;
    let mut shadow: Option<Box<Loaded>> = None;
    let mut canary: Option<Box<Loaded>> = None;
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Swap(next) => current = Some(next),
            Job::Shadow(next) => shadow = next,
            Job::Canary(next) => canary = next,
            Job::Detect {
                images,
                reply,
                shadow: shadow_job,
                canary: canary_job,
            } => {
                let result = match &current {
                    None => Err("no model loaded".to_string()),
                    Some(m) => Ok(serve(
                        &**m,
                        canary.as_deref(),
                        &images,
                        canary_job,
                        threshold,
                    )),
                };
                // The live answers go out before the shadow pass starts.
                let _ = reply.send(result);
                if let Some(job) = shadow_job {
                    let result = match &shadow {
                        Some(m) if m.version.version == job.version => {
                            Ok(answer_with(&**m, &job.images, threshold))
                        }
                        _ => Err(format!("shadow v{} is no longer loaded", job.version)),
                    };
                    let _ = job.reply.send(result);
                }
            }
        }
    }
}

/// Decodes one delivery's record; a poison message gives its rejection, a label revision
/// None.
fn record_of(payload: &[u8], schema: Option<&str>) -> Result<Option<EncodedImage>, Rejection> {
    let record: EncodedImage =
        decode(payload, schema).map_err(|e| Rejection::new("undecodable", e.to_string()))?;
    // A label revision brings an answered image back with corrected labels, for training:
    // its board already has its detection, and a second would tell the line twice.
    if record.revision.is_some() {
        return Ok(None);
    }
    Ok(Some(record))
}

/// An image file and its template's, if any.
type ImageFiles = (Vec<u8>, Option<Vec<u8>>);

/// The image and template files a record carries inline (base64); None when they are in
/// the image files' bucket ([`files_of`] reads them).
fn inline_files(record: &EncodedImage) -> Result<Option<ImageFiles>, Rejection> {
    if record.image_ref.is_some() || record.template_ref.is_some() {
        return Ok(None);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let about = |r: Rejection| r.about(Some(record.image_id.clone()), record.source.clone());
    let image = b64
        .decode(&record.image_b64)
        .map_err(|e| about(Rejection::new("bad-base64", format!("image_b64: {e}"))))?;
    let template = match &record.template_b64 {
        Some(t) => Some(
            b64.decode(t)
                .map_err(|e| about(Rejection::new("bad-base64", format!("template_b64: {e}"))))?,
        ),
        None => None,
    };
    Ok(Some((image, template)))
}

/// A record's image and template files: inline, or read from the image files' bucket (size
/// and digest checked). A file that is gone is a dead letter (`image-gone`); a server that
/// failed, a retry.
async fn files_of(
    files: &pcb_common::LazyFiles,
    record: &EncodedImage,
) -> Result<(Vec<u8>, Option<Vec<u8>>), Outcome> {
    let about = |o: Outcome| match o {
        Outcome::Reject(r) => {
            Outcome::Reject(r.about(Some(record.image_id.clone()), record.source.clone()))
        }
        other => other,
    };
    if let Some(inline) = inline_files(record).map_err(Outcome::Reject)? {
        return Ok(inline);
    }
    // Each file on its own: inline, or from the bucket (the ingester stores both of a board
    // that does not fit, but a record may name one and carry the other).
    let b64 = base64::engine::general_purpose::STANDARD;
    let inline = |what: &str, text: &str| {
        b64.decode(text).map_err(|e| {
            about(Outcome::Reject(Rejection::new(
                "bad-base64",
                format!("{what}: {e}"),
            )))
        })
    };
    let image = match &record.image_ref {
        Some(r) => files
            .get(r)
            .await
            .map_err(|e| about(e.outcome("reading the image")))?,
        None => inline("image_b64", &record.image_b64)?,
    };
    let template = match (&record.template_ref, &record.template_b64) {
        (Some(r), _) => Some(
            files
                .get(r)
                .await
                .map_err(|e| about(e.outcome("reading the template")))?,
        ),
        (None, Some(t)) => Some(inline("template_b64", t)?),
        (None, None) => None,
    };
    Ok((image, template))
}

/// Decodes a record's files into the model's input; a poison image gives its rejection.
fn prepare(
    record: EncodedImage,
    image: &[u8],
    template: Option<&[u8]>,
    input: pcb_vision::InputMode,
) -> Result<(EncodedImage, Tensor), Rejection> {
    let composed = compose_files(&record, image, template, input)?;
    Ok((record, composed))
}

/// The network input of a record's files, for a model taking `input`.
fn compose_files(
    record: &EncodedImage,
    image: &[u8],
    template: Option<&[u8]>,
    input: pcb_vision::InputMode,
) -> Result<Tensor, Rejection> {
    let about = |r: Rejection| r.about(Some(record.image_id.clone()), record.source.clone());
    let image = pcb_vision::data::decode_grey(image, &record.source)
        .map_err(|e| about(Rejection::new("not-an-image", e.to_string())))?;
    let template = match template {
        Some(bytes) => Some(
            pcb_vision::data::decode_grey(bytes, &record.source)
                .map_err(|e| about(Rejection::new("not-an-image", format!("template: {e}"))))?,
        ),
        None => None,
    };
    compose(input, &image, template.as_ref())
        .map_err(|e| about(Rejection::new("unusable-input", e.to_string())))
}

/// The detection message for one image.
pub fn detection_of(
    record: &EncodedImage,
    model: ModelRef,
    defects: Vec<Defect>,
    fail_threshold: f32,
    inference_ms: f64,
) -> Detection {
    let mut defects = defects;
    defects.sort_by(|a, b| b.score.total_cmp(&a.score));
    let fail = defects.iter().any(|d| d.score >= fail_threshold);
    Detection {
        image_id: record.image_id.clone(),
        board_id: record.board_id.clone(),
        line_id: record.line_id.clone(),
        source: record.source.clone(),
        captured_at: record.captured_at_ms,
        detected_at: pcb_common::now_ms(),
        model,
        defects,
        verdict: if fail {
            pcb_schemas::Verdict::Fail
        } else {
            pcb_schemas::Verdict::Pass
        },
        inference_ms,
    }
}

/// A watch of an alias key of the registry, from its current value on.
async fn watch_alias(
    registry: &Registry,
    key: String,
) -> Result<async_nats::jetstream::kv::Watch, DetectorError> {
    registry
        .kv()
        .watch_with_history(key)
        .await
        .map_err(|e| DetectorError::Registry(e.to_string()))
}

/// The next change of the `what` alias: None once the stage stops; a watch error is
/// logged and the watch read on.
async fn next_change(
    watch: &mut async_nats::jetstream::kv::Watch,
    shutdown: &Shutdown,
    what: &str,
) -> Result<Option<async_nats::jetstream::kv::Entry>, DetectorError> {
    loop {
        let entry = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            e = watch.next() => e,
        };
        match entry {
            None => return Err(DetectorError::Registry(format!("the {what} watch ended"))),
            Some(Ok(e)) => return Ok(Some(e)),
            Some(Err(e)) => tracing::warn!(error = %e, what, "alias watch error"),
        }
    }
}

/// What the three alias watchers (live, shadow, canary) share: where versions come from,
/// whom they are loaded for, and where loaded ones go.
#[derive(Clone)]
struct Watching {
    registry: Registry,
    js: jetstream::Context,
    /// The model's name.
    name: String,
    /// This detector, as its events name it.
    by: String,
    /// The inference thread's queue.
    jobs: std_mpsc::Sender<Job>,
    bf16: Bf16,
    shutdown: Shutdown,
}

impl Watching {
    /// Publishes a model event about `version` of this model, as this detector.
    async fn tell(&self, kind: pcb_schemas::ModelEventKind, version: u64, reason: Option<String>) {
        publish_event(&self.js, kind, &self.name, version, &self.by, reason).await;
    }
}

/// Watches the live alias and hands every version that loads to the inference thread;
/// one that does not load leaves the serving model in place and says why.
async fn watch_live(
    w: Watching,
    serving: tokio::sync::watch::Sender<Option<(u64, pcb_vision::InputMode)>>,
) -> Result<(), DetectorError> {
    let mut watch = watch_alias(&w.registry, key_live(&w.name)).await?;
    loop {
        let Some(entry) = next_change(&mut watch, &w.shutdown, "live-alias").await? else {
            return Ok(());
        };
        let alias: LiveAlias = match serde_json::from_slice(&entry.value) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "live alias is not valid JSON; ignored");
                continue;
            }
        };
        if serving.borrow().map(|(v, _)| v) == Some(alias.version) {
            continue;
        }
        match load_version(&w.registry, &w.name, alias.version, w.bf16).await {
            Ok(loaded) => {
                let input = loaded.detector.model.config.input;
                if w.jobs.send(Job::Swap(Box::new(loaded))).is_err() {
                    return Err(DetectorError::Inference);
                }
                let _ = serving.send(Some((alias.version, input)));
                tracing::info!(model = %w.name, version = alias.version, "serving");
                w.tell(pcb_schemas::ModelEventKind::Loaded, alias.version, None)
                    .await;
            }
            Err(reason) => {
                let old = serving.borrow().map(|(v, _)| v);
                tracing::warn!(model = %w.name, version = alias.version, serving = ?old, %reason, "refused a live version");
                w.tell(
                    pcb_schemas::ModelEventKind::LoadFailed,
                    alias.version,
                    Some(match old {
                        Some(v) => format!("{reason}; v{v} keeps serving"),
                        None => format!("{reason}; nothing serving yet"),
                    }),
                )
                .await;
            }
        }
    }
}

/// The version loaded and the input it takes (None: nothing loaded).
type LoadedAt = Option<(u64, pcb_vision::InputMode)>;

/// What a change of an alias key says: `Some(Some(alias))` set, `Some(None)` removed, and
/// None for a value that is not valid JSON (logged and ignored: the alias stays as it was).
fn alias_change<T: serde::de::DeserializeOwned>(
    entry: &async_nats::jetstream::kv::Entry,
    what: &str,
) -> Option<Option<T>> {
    match entry.operation {
        async_nats::jetstream::kv::Operation::Put => match serde_json::from_slice(&entry.value) {
            Ok(a) => Some(Some(a)),
            Err(e) => {
                tracing::warn!(error = %e, alias = what, "alias is not valid JSON; ignored");
                None
            }
        },
        _ => Some(None),
    }
}

/// Watches the shadow alias and hands its version to the inference thread (None when the
/// key is removed: the shadow period ended). A version that does not load is reported
/// and no shadow runs; the live answers never depend on it.
async fn watch_shadow(
    w: Watching,
    shadowing: tokio::sync::watch::Sender<LoadedAt>,
) -> Result<(), DetectorError> {
    let mut watch = watch_alias(&w.registry, key_shadow(&w.name)).await?;
    loop {
        let Some(entry) = next_change(&mut watch, &w.shutdown, "shadow-alias").await? else {
            return Ok(());
        };
        let Some(alias) = alias_change::<ShadowAlias>(&entry, "shadow") else {
            continue;
        };
        let Some(alias) = alias else {
            if shadowing.borrow().is_some() {
                // Nothing composed for it runs any more: the thread answers such a batch
                // with an error, which only skips its shadow half.
                let _ = shadowing.send(None);
                if w.jobs.send(Job::Shadow(None)).is_err() {
                    return Err(DetectorError::Inference);
                }
                tracing::info!(model = %w.name, "shadow period ended");
            }
            continue;
        };
        if shadowing.borrow().map(|(v, _)| v) == Some(alias.version) {
            continue;
        }
        match load_version(&w.registry, &w.name, alias.version, w.bf16).await {
            Ok(loaded) => {
                let input = loaded.detector.model.config.input;
                if w.jobs.send(Job::Shadow(Some(Box::new(loaded)))).is_err() {
                    return Err(DetectorError::Inference);
                }
                let _ = shadowing.send(Some((alias.version, input)));
                tracing::info!(model = %w.name, version = alias.version, "shadowing");
                w.tell(
                    pcb_schemas::ModelEventKind::Loaded,
                    alias.version,
                    Some("as the shadow version".into()),
                )
                .await;
            }
            Err(reason) => {
                // A version that cannot load runs nowhere: comparing against an older
                // shadow under the new one's name would mislead.
                let _ = shadowing.send(None);
                let _ = w.jobs.send(Job::Shadow(None));
                tracing::warn!(model = %w.name, version = alias.version, %reason, "refused a shadow version");
                w.tell(
                    pcb_schemas::ModelEventKind::LoadFailed,
                    alias.version,
                    Some(format!("as the shadow version: {reason}; no shadow runs")),
                )
                .await;
            }
        }
    }
}

/// The canary as the batch handler sees it: which boards go to it, and the input it takes
/// (None: its version did not load, and its boards go to the live one).
#[derive(Debug, Clone, PartialEq)]
struct CanaryAt {
    version: u64,
    rule: CanaryRule,
    input: Option<pcb_vision::InputMode>,
}

/// Watches the canary alias and hands its version to the inference thread (None when the
/// key is removed: the canary ended). A version that does not load is reported, and the
/// boards its rule selects go to the live version (each counted as `canary-fallback`).
async fn watch_canary(
    w: Watching,
    canarying: tokio::sync::watch::Sender<Option<CanaryAt>>,
) -> Result<(), DetectorError> {
    let mut watch = watch_alias(&w.registry, key_canary(&w.name)).await?;
    loop {
        let Some(entry) = next_change(&mut watch, &w.shutdown, "canary-alias").await? else {
            return Ok(());
        };
        let Some(alias) = alias_change::<CanaryAlias>(&entry, "canary") else {
            continue;
        };
        let Some(alias) = alias else {
            if canarying.borrow().is_some() {
                let _ = canarying.send(None);
                if w.jobs.send(Job::Canary(None)).is_err() {
                    return Err(DetectorError::Inference);
                }
                tracing::info!(model = %w.name, "canary ended");
            }
            continue;
        };
        // The same version with another rule: no reload.
        let loaded = canarying
            .borrow()
            .as_ref()
            .filter(|c| c.version == alias.version)
            .and_then(|c| c.input);
        if let Some(input) = loaded {
            tracing::info!(model = %w.name, version = alias.version, rule = %alias.rule, "canary rule changed");
            let _ = canarying.send(Some(CanaryAt {
                version: alias.version,
                rule: alias.rule,
                input: Some(input),
            }));
            continue;
        }
        match load_version(&w.registry, &w.name, alias.version, w.bf16).await {
            Ok(loaded) => {
                let input = loaded.detector.model.config.input;
                if w.jobs.send(Job::Canary(Some(Box::new(loaded)))).is_err() {
                    return Err(DetectorError::Inference);
                }
                tracing::info!(model = %w.name, version = alias.version, rule = %alias.rule, "canary serving");
                let rule = alias.rule.to_string();
                let _ = canarying.send(Some(CanaryAt {
                    version: alias.version,
                    rule: alias.rule,
                    input: Some(input),
                }));
                w.tell(
                    pcb_schemas::ModelEventKind::Loaded,
                    alias.version,
                    Some(format!("as the canary version, for {rule}")),
                )
                .await;
            }
            Err(reason) => {
                let _ = w.jobs.send(Job::Canary(None));
                tracing::warn!(model = %w.name, version = alias.version, %reason, "refused a canary version; its boards go to the live one");
                let _ = canarying.send(Some(CanaryAt {
                    version: alias.version,
                    rule: alias.rule,
                    input: None,
                }));
                w.tell(
                    pcb_schemas::ModelEventKind::LoadFailed,
                    alias.version,
                    Some(format!(
                        "as the canary version: {reason}; the live version answers its boards"
                    )),
                )
                .await;
            }
        }
    }
}

/// What a batch handler needs: where to send images and which input the models take.
#[derive(Clone)]
struct Serving {
    js: jetstream::Context,
    jobs: std_mpsc::Sender<Job>,
    input: tokio::sync::watch::Receiver<LoadedAt>,
    /// The shadow version, when one is loaded.
    shadow: tokio::sync::watch::Receiver<LoadedAt>,
    /// The canary, when one is set.
    canary: tokio::sync::watch::Receiver<Option<CanaryAt>>,
    fail_threshold: f32,
    metrics: Metrics,
    /// Where the files of boards too large for one message are.
    files: pcb_common::LazyFiles,
}

/// The shadow half of a batch before it is sent: which of the ready images it holds.
struct ShadowPlan {
    job: ShadowJob,
    /// Positions in the ready list of the images it holds.
    positions: Vec<usize>,
    answer: tokio::sync::oneshot::Receiver<Result<Answer, String>>,
}

/// Composes the shadow half of a batch for the input the shadow version takes: the live
/// tensors when it takes the same; an image it cannot take is left out of it alone.
fn plan_shadow(
    s: &Serving,
    live_input: pcb_vision::InputMode,
    ready: &[(usize, EncodedImage, Tensor)],
    composed: Vec<Option<Result<Tensor, Rejection>>>,
) -> Option<ShadowPlan> {
    let (version, input) = (*s.shadow.borrow())?;
    let mut images = Vec::with_capacity(ready.len());
    let mut positions = Vec::with_capacity(ready.len());
    for ((k, (_, record, tensor)), own) in ready.iter().enumerate().zip(composed) {
        if input == live_input {
            images.push(tensor.shallow_clone());
            positions.push(k);
            continue;
        }
        // Composed when the batch was decoded, for the shadow version loaded then.
        let Some(own) = own else {
            continue;
        };
        match own {
            Ok(t) => {
                images.push(t);
                positions.push(k);
            }
            Err(r) => {
                s.metrics.count("shadow-failed");
                tracing::debug!(image = %record.image_id, reason = %r.reason, version, "the shadow version cannot take this image");
            }
        }
    }
    if images.is_empty() {
        return None;
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    Some(ShadowPlan {
        job: ShadowJob {
            version,
            images,
            reply,
        },
        positions,
        answer,
    })
}

/// Publishes the shadow answers of the images whose live answer is stored, on
/// `pcb.shadow.detections` only. Nothing here changes an image's outcome: a shadow that
/// fails is counted and logged, and the live answer stands.
async fn publish_shadow(
    s: &Serving,
    ready: &[(usize, EncodedImage)],
    outcomes: &[Option<Outcome>],
    positions: Vec<usize>,
    answer: tokio::sync::oneshot::Receiver<Result<Answer, String>>,
) {
    let answer = match answer.await {
        Ok(Ok(a)) => a,
        Ok(Err(reason)) => {
            s.metrics.count("shadow-failed");
            tracing::warn!(%reason, images = positions.len(), "no shadow answers for a batch");
            return;
        }
        Err(_) => {
            s.metrics.count("shadow-failed");
            return;
        }
    };
    let per_image_ms = answer.seconds * 1000.0 / positions.len().max(1) as f64;
    let mut pending = Vec::new();
    for (k, defects) in positions.into_iter().zip(answer.per_image) {
        let (i, record) = &ready[k];
        if !matches!(outcomes[*i], Some(Outcome::Done)) {
            continue;
        }
        match defects {
            Ok(defects) => pending.push(detection_of(
                record,
                answer.model.clone(),
                defects,
                s.fail_threshold,
                per_image_ms,
            )),
            Err(reason) => {
                s.metrics.count("shadow-failed");
                tracing::warn!(image = %record.image_id, version = answer.model.version, %reason, "the shadow version failed on an image");
            }
        }
    }
    let results = futures::future::join_all(
        pending
            .iter()
            .map(|d| pcb_common::publish(&s.js, SUBJECT_SHADOW_DETECTIONS.into(), d)),
    )
    .await;
    for (d, r) in pending.iter().zip(results) {
        match r {
            Ok(_) => s.metrics.count("shadow-answered"),
            Err(e) => {
                s.metrics.count("shadow-failed");
                tracing::warn!(image = %d.image_id, error = %e, "could not store a shadow answer");
            }
        }
    }
}

/// Answers one batch: each image that does not decode is rejected alone; the rest go
/// through the model together and each gets its own outcome.
async fn handle_batch(s: Serving, batch: Vec<Delivery>) -> Vec<Outcome> {
    let input = s
        .input
        .borrow()
        .map(|(_, i)| i)
        .unwrap_or(pcb_vision::InputMode::Image);
    let shadow_input = s.shadow.borrow().map(|(_, i)| i);
    let canary = s.canary.borrow().clone();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
    let mut ready = Vec::new();
    let mut shadow_inputs = Vec::new();
    // Per ready image: the canary's own composition when it takes another input than the
    // live version (None: the live tensor serves both).
    let mut canary_plan: Vec<(usize, Option<Tensor>)> = Vec::new();
    for (i, d) in batch.iter().enumerate() {
        let record = match record_of(&d.payload, d.schema()) {
            Ok(Some(record)) => record,
            Ok(None) => {
                outcomes[i] = Some(Outcome::Done);
                continue;
            }
            Err(rejection) => {
                outcomes[i] = Some(Outcome::Reject(rejection));
                continue;
            }
        };
        let (image, template) = match files_of(&s.files, &record).await {
            Ok(f) => f,
            Err(outcome) => {
                outcomes[i] = Some(outcome);
                continue;
            }
        };
        // A shadow version that takes another input gets its own composition of the files.
        let for_shadow = shadow_input
            .filter(|si| *si != input)
            .map(|si| compose_files(&record, &image, template.as_deref(), si));
        // The canary's boards: a hash of the board id (or its line), never a call.
        let mut for_canary = None;
        if let Some(c) = canary
            .as_ref()
            .filter(|c| c.rule.selects(&record.board_id, &record.line_id))
        {
            match c.input {
                None => {
                    s.metrics.count("canary-fallback");
                    tracing::debug!(image = %record.image_id, version = c.version, "the canary is not loaded; the live version answers");
                }
                Some(ci) if ci == input => for_canary = Some(None),
                Some(ci) => match compose_files(&record, &image, template.as_deref(), ci) {
                    Ok(t) => for_canary = Some(Some(t)),
                    Err(r) => {
                        s.metrics.count("canary-fallback");
                        tracing::warn!(image = %record.image_id, version = c.version, reason = %r.reason, "the canary cannot take this image; the live version answers");
                    }
                },
            }
        }
        match prepare(record, &image, template.as_deref(), input) {
            Ok((record, tensor)) => {
                if let Some(own) = for_canary {
                    canary_plan.push((ready.len(), own));
                }
                ready.push((i, record, tensor));
                shadow_inputs.push(for_shadow);
            }
            Err(rejection) => outcomes[i] = Some(Outcome::Reject(rejection)),
        }
    }
    let mut shadow_pending = None;
    if !ready.is_empty() {
        let images: Vec<Tensor> = ready.iter().map(|(_, _, t)| t.shallow_clone()).collect();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let (shadow, plan) = match plan_shadow(&s, input, &ready, shadow_inputs) {
            Some(p) => (Some(p.job), Some((p.positions, p.answer))),
            None => (None, None),
        };
        shadow_pending = plan;
        let canary_job = match (&canary, canary_plan.is_empty()) {
            (Some(c), false) => {
                let (positions, own): (Vec<usize>, Vec<Option<Tensor>>) =
                    canary_plan.into_iter().unzip();
                let images = positions
                    .iter()
                    .zip(own)
                    .map(|(k, t)| t.unwrap_or_else(|| ready[*k].2.shallow_clone()))
                    .collect();
                Some(CanaryJob {
                    version: c.version,
                    positions,
                    images,
                })
            }
            _ => None,
        };
        let job = Job::Detect {
            images,
            reply,
            shadow,
            canary: canary_job,
        };
        let answer = if s.jobs.send(job).is_err() {
            Err("the inference thread stopped".to_string())
        } else {
            answer
                .await
                .unwrap_or_else(|_| Err("the inference thread stopped".to_string()))
        };
        match answer {
            // A model failure on this batch: the images are retried (and dead-lettered as
            // `retries-exhausted` at the delivery limit).
            Err(reason) => {
                for (i, _, _) in &ready {
                    outcomes[*i] = Some(Outcome::Retry(format!("inference failed: {reason}")));
                }
            }
            Ok(answer) => {
                let per_image_ms = answer.seconds * 1000.0 / ready.len() as f64;
                for (k, reason) in &answer.fallbacks {
                    s.metrics.count("canary-fallback");
                    if let Some((_, record, _)) = ready.get(*k) {
                        tracing::warn!(image = %record.image_id, %reason, "the canary did not answer; the live version did");
                    }
                }
                let canary_version = canary.as_ref().map(|c| c.version);
                let mut detected = Vec::new();
                for ((i, record, _), (model, defects)) in ready.iter().zip(answer.per_image) {
                    match defects {
                        Ok(defects) => detected.push((*i, record, model, defects)),
                        // The model failed on this image alone: retried, and dead-lettered
                        // as `retries-exhausted` with this reason at the delivery limit.
                        Err(reason) => {
                            outcomes[*i] =
                                Some(Outcome::Retry(format!("inference failed: {reason}")))
                        }
                    }
                }
                let published = futures::future::join_all(detected.iter().map(
                    |(_, record, model, defects)| {
                        let d = detection_of(
                            record,
                            model.clone(),
                            defects.clone(),
                            s.fail_threshold,
                            per_image_ms,
                        );
                        let js = s.js.clone();
                        // An image leaves the consumer only with its answer stored, and its
                        // verdict handed to the line-side subscribers.
                        async move {
                            let stored =
                                pcb_common::publish(&js, SUBJECT_DETECTIONS.into(), &d).await?;
                            publish_verdict(&js.client(), &d).await?;
                            Ok::<_, pcb_common::ack::PublishError>(stored)
                        }
                    },
                ))
                .await;
                for ((i, _, model, _), result) in detected.iter().zip(published) {
                    outcomes[*i] = Some(match result {
                        Ok(_) => {
                            if Some(model.version) == canary_version {
                                s.metrics.count("canary-answered");
                            }
                            Outcome::Done
                        }
                        Err(e) => e.outcome("publishing the detection"),
                    });
                }
            }
        }
    }
    // The images are acked once their shadow answers are stored too (or known failed).
    if let Some((positions, answer)) = shadow_pending {
        // Tensors are not `Sync`: only the records are held across the wait.
        let records: Vec<(usize, EncodedImage)> =
            ready.into_iter().map(|(i, r, _)| (i, r)).collect();
        publish_shadow(&s, &records, &outcomes, positions, answer).await;
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Outcome::Retry("no answer for this image".into())))
        .collect()
}

/// Publishes the verdict of `d` on its line's subject, on core NATS: line-side systems (PLCs
/// over the server's MQTT listener) get it live, at most once. It is not stored: the stored
/// record is the detection. A retried image (the client could not send) sends it again,
/// with the same image id.
async fn publish_verdict(
    client: &async_nats::Client,
    d: &Detection,
) -> Result<(), pcb_common::ack::PublishError> {
    let subject = verdict_subject(&d.line_id);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers.insert(pcb_schemas::SCHEMA_HEADER, LineVerdict::SCHEMA);
    client
        .publish_with_headers(
            subject.clone(),
            headers,
            LineVerdict::of(d).to_json().into(),
        )
        .await
        .map_err(|e| pcb_common::ack::PublishError::Send {
            subject,
            message: e.to_string(),
        })
}

/// Runs the stage until `ctx.shutdown`.
pub async fn run(config: Config, ctx: Context) -> Result<(), DetectorError> {
    let shutdown = ctx.shutdown.clone();
    let metrics = Metrics::new(STAGE.name());
    let js = pcb_common::stage::prepare(STAGE, &ctx.client, &metrics, &config.metrics, &shutdown)
        .await?;
    let registry = Registry::open(&js)
        .await
        .map_err(|e| DetectorError::Registry(e.to_string()))?;
    let consumer = config.consumer()?.clone();
    let s = config.config;
    let by = format!(
        "detector-{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
        std::process::id()
    );
    let (jobs, jobs_rx) = std_mpsc::channel::<Job>();
    let (threshold, threads) = (s.report_threshold, s.threads);
    std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || inference_thread(jobs_rx, threshold, threads))
        .map_err(|_| DetectorError::Inference)?;
    let (serving_tx, mut serving) = tokio::sync::watch::channel(None);
    let (shadow_tx, shadow) = tokio::sync::watch::channel(None);
    let (canary_tx, canary) = tokio::sync::watch::channel(None);
    let watching = Watching {
        registry: registry.clone(),
        js: js.clone(),
        name: s.model_name.clone(),
        by,
        jobs: jobs.clone(),
        bf16: s.bf16,
        shutdown: shutdown.clone(),
    };
    // Likewise a canary watch that fails: its boards go back to the live version.
    let canary_watcher = tokio::spawn({
        let watching = watch_canary(watching.clone(), canary_tx);
        async move {
            if let Err(e) = watching.await {
                tracing::warn!(error = %e, "canary versions are not watched any more");
            }
        }
    });
    // A shadow watch that fails stops the shadow only: the live answers never wait on it.
    let shadow_watcher = tokio::spawn({
        let watching = watch_shadow(watching.clone(), shadow_tx);
        async move {
            if let Err(e) = watching.await {
                tracing::warn!(error = %e, "shadow versions are not watched any more");
            }
        }
    });
    let watcher = tokio::spawn(watch_live(watching, serving_tx));
    tracing::info!(bf16 = s.bf16.enabled(), setting = ?s.bf16, "inference precision");
    // Nothing is taken from the stream before a model can answer it.
    tracing::info!(model = %s.model_name, "waiting for a live version");
    loop {
        if serving.borrow().is_some() {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            changed = serving.changed() => if changed.is_err() {
                return match watcher.await {
                    Ok(Err(e)) => Err(e),
                    _ => Err(DetectorError::Registry("the live-alias watcher stopped".into())),
                };
            },
        }
    }
    let state = Serving {
        js: js.clone(),
        jobs,
        input: serving,
        shadow,
        canary,
        fail_threshold: s.fail_threshold,
        metrics: metrics.clone(),
        files: pcb_common::LazyFiles::new(js.clone()),
    };
    let batching = Batching {
        max_batch: s.max_batch,
        max_wait: Duration::from_millis(s.max_wait_ms),
    };
    let consumed =
        pcb_common::run_batched_consumer(js, consumer, metrics, shutdown, batching, move |batch| {
            handle_batch(state.clone(), batch)
        })
        .await;
    shadow_watcher.abort();
    canary_watcher.abort();
    consumed?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in model: each image's one defect scores its width; an image 13 wide makes
    /// the pass fail and one 17 wide makes it panic, whatever else is in the batch.
    fn pass(batch: &[Tensor]) -> Pass {
        let widths: Vec<i64> = batch.iter().map(|t| t.size()[2]).collect();
        if widths.contains(&17) {
            panic!("index out of range in a kernel");
        }
        if widths.contains(&13) {
            return Err("shape mismatch".into());
        }
        Ok(widths
            .iter()
            .map(|&w| {
                vec![Defect {
                    x1: 0.0,
                    y1: 0.0,
                    x2: 1.0,
                    y2: 1.0,
                    class_id: 1,
                    class: "open".into(),
                    score: w as f32,
                }]
            })
            .collect())
    }

    fn images(widths: &[i64]) -> Vec<Tensor> {
        widths
            .iter()
            .map(|&w| Tensor::zeros([1, 8, w], (tch::Kind::Float, tch::Device::Cpu)))
            .collect()
    }

    fn scores(out: &[Result<Vec<Defect>, String>]) -> Vec<Result<f32, String>> {
        out.iter()
            .map(|r| r.as_ref().map(|d| d[0].score).map_err(|e| e.clone()))
            .collect()
    }

    #[test]
    fn a_poison_image_fails_alone_and_its_batch_is_answered() {
        // A healthy batch is one pass.
        assert_eq!(
            scores(&isolating(&images(&[8, 9]), pass)),
            vec![Ok(8.0), Ok(9.0)]
        );
        // An error and a panic in one batch: each image alone, the two fail with why.
        let out = scores(&isolating(&images(&[8, 13, 9, 17]), pass));
        assert_eq!(out[0], Ok(8.0));
        assert_eq!(out[1], Err("shape mismatch".into()));
        assert_eq!(out[2], Ok(9.0));
        let panicked = out[3].clone().unwrap_err();
        assert!(
            panicked.contains("the model panicked") && panicked.contains("index out of range"),
            "{panicked}"
        );
        // A pass that answers for the wrong number of images is a failure, never a shift.
        let short = |b: &[Tensor]| {
            pass(b).map(|mut v| {
                v.truncate(1);
                v
            })
        };
        let out = scores(&isolating(&images(&[8, 9]), short));
        assert_eq!(out, vec![Ok(8.0), Ok(9.0)]);
    }

    /// A stand-in version: answers as [`pass`] does, and fails on images `refuses` wide.
    struct Stub {
        version: u64,
        refuses: i64,
    }

    impl Answering for Stub {
        fn model(&self) -> ModelRef {
            ModelRef {
                name: "m".into(),
                version: self.version,
            }
        }

        fn pass(&self, batch: &[Tensor], _threshold: f32) -> Pass {
            if batch.iter().any(|t| t.size()[2] == self.refuses) {
                return Err(format!(
                    "v{} cannot take width {}",
                    self.version, self.refuses
                ));
            }
            pass(batch)
        }
    }

    /// Each image's (answering version, score or error).
    fn answered(s: &Served) -> Vec<(u64, Result<f32, String>)> {
        s.per_image
            .iter()
            .map(|(m, r)| {
                let r = r.as_ref().map(|d| d[0].score).map_err(|e| e.clone());
                (m.version, r)
            })
            .collect()
    }

    #[test]
    fn the_canary_answers_its_boards_and_the_live_version_any_it_fails_on() {
        let live = Stub {
            version: 1,
            refuses: 0,
        };
        let canary = Stub {
            version: 2,
            refuses: 11,
        };
        let batch = images(&[8, 9, 11, 10, 13]);
        // Boards 1 and 2 are the canary's; it cannot take board 2, so live answers it.
        let job = |version| CanaryJob {
            version,
            positions: vec![1, 2],
            images: vec![batch[1].shallow_clone(), batch[2].shallow_clone()],
        };
        let s = serve(&live, Some(&canary), &batch, Some(job(2)), 0.5);
        assert_eq!(
            answered(&s),
            vec![
                (1, Ok(8.0)),
                (2, Ok(9.0)),
                (1, Ok(11.0)),
                (1, Ok(10.0)),
                // Live's own failure stays a failure, named by live.
                (1, Err("shape mismatch".into())),
            ]
        );
        assert_eq!(
            s.fallbacks,
            vec![(2, "v2 cannot take width 11".to_string())]
        );
        // Composed for v2 while v3 is loaded (or none is): live answers both, with why.
        let v3 = Stub {
            version: 3,
            refuses: 0,
        };
        for loaded in [Some(&v3), None] {
            let s = serve(&live, loaded, &batch, Some(job(2)), 0.5);
            assert!(
                answered(&s).iter().all(|(v, _)| *v == 1),
                "{:?}",
                answered(&s)
            );
            let why = "canary v2 is not loaded".to_string();
            assert_eq!(s.fallbacks, vec![(1, why.clone()), (2, why)]);
        }
        // No canary job: live answers all in one pass.
        let s = serve(&live, Some(&canary), &batch[..2], None, 0.5);
        assert_eq!(answered(&s), vec![(1, Ok(8.0)), (1, Ok(9.0))]);
        assert!(s.fallbacks.is_empty());
    }

    #[test]
    fn config_problems_are_reported_together() {
        let mut f = FileConfig::default();
        f.stage.settings.model_name = "bad name".into();
        f.stage.settings.max_batch = 0;
        f.stage.settings.fail_threshold = 1.5;
        assert_eq!(
            f.validate().unwrap_err().keys(),
            [
                "detector.model_name",
                "detector.max_batch",
                "detector.fail_threshold"
            ]
        );
    }

    #[test]
    fn verdict_follows_the_strongest_defect() {
        let record = EncodedImage {
            image_id: "i".into(),
            board_id: "b".into(),
            line_id: "l".into(),
            source: "s".into(),
            captured_at_ms: 5,
            encoded_at_ms: 6,
            image_b64: String::new(),
            width: 1,
            height: 1,
            channels: 1,
            format: "png".into(),
            sha256: "i".into(),
            labels: None,
            label_format: None,
            template_b64: None,
            split_hint: None,
            revision: None,
            image_ref: None,
            template_ref: None,
        };
        let defect = |score| Defect {
            x1: 0.,
            y1: 0.,
            x2: 1.,
            y2: 1.,
            class_id: 1,
            class: "open".into(),
            score,
        };
        let m = ModelRef {
            name: "m".into(),
            version: 2,
        };
        let pass = detection_of(&record, m.clone(), vec![defect(0.4)], 0.5, 1.0);
        assert_eq!(pass.verdict, "pass");
        let fail = detection_of(&record, m, vec![defect(0.4), defect(0.9)], 0.5, 1.0);
        assert_eq!(fail.verdict, "fail");
        assert_eq!(fail.defects[0].score, 0.9, "best first");
        assert_eq!(fail.captured_at, 5);
    }

    #[test]
    fn an_image_that_does_not_decode_is_a_rejection_with_its_reason() {
        let record = EncodedImage {
            image_id: "i".into(),
            board_id: "b".into(),
            line_id: "l".into(),
            source: "x.jpg".into(),
            captured_at_ms: 0,
            encoded_at_ms: 0,
            image_b64: base64::engine::general_purpose::STANDARD.encode(b"not a jpeg"),
            width: 1,
            height: 1,
            channels: 1,
            format: "jpeg".into(),
            sha256: "i".into(),
            labels: None,
            label_format: None,
            template_b64: None,
            split_hint: None,
            revision: None,
            image_ref: None,
            template_ref: None,
        };
        let payload = pcb_schemas::encode(&record).unwrap();
        let decoded = record_of(&payload, None).unwrap().expect("not a revision");
        let (image, template) = inline_files(&decoded).unwrap().expect("inline");
        let err = prepare(
            decoded,
            &image,
            template.as_deref(),
            pcb_vision::InputMode::Image,
        )
        .unwrap_err();
        assert_eq!(err.reason_code, "not-an-image");
        assert!(err.reason.contains("x.jpg"), "{}", err.reason);
        // A label revision is not answered again (its image is not even decoded).
        let revision = EncodedImage {
            revision: Some(pcb_schemas::LabelRevision {
                by: "ana".into(),
                at_ms: 1,
                replaces: None,
                reviewed: None,
                note: None,
                deleted: Vec::new(),
            }),
            ..record
        };
        let payload = pcb_schemas::encode(&revision).unwrap();
        assert!(matches!(record_of(&payload, None), Ok(None)));
    }
}
