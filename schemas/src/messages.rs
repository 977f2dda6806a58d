//! Message types on the pipeline's subjects. Every type is a MessagePack map with named
//! fields so that clients in any language can decode it; field names are part of the contract.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::Envelope;

/// Names of the six DeepPCB defect classes; class id `i` is `CLASS_NAMES[i - 1]`
/// (0 is background and never labels a box).
pub const CLASS_NAMES: [&str; 6] = ["open", "short", "mousebite", "spur", "copper", "pin-hole"];

/// The image id used across the pipeline: lowercase hex sha256 of the image file's bytes.
pub fn image_id(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A record's identity (its `Nats-Msg-Id`): the image id when unlabelled; with labels, the
/// image id and a digest of the boxes (`<image_id>.l<16 hex>`), so that the same image
/// dropped again with other labels (a relabel, a correction, labels that came late) is a
/// new record and not a duplicate. The digest ignores the boxes' order and the class name
/// spelling (the class id is what trains).
pub fn record_id(image_id: &str, labels: Option<&[BoxLabel]>) -> String {
    match labels {
        None => image_id.to_string(),
        Some(boxes) => {
            let mut lines: Vec<String> = boxes
                .iter()
                .map(|b| {
                    format!(
                        "{} {} {} {} {}",
                        b.class_id,
                        b.x1.to_bits(),
                        b.y1.to_bits(),
                        b.x2.to_bits(),
                        b.y2.to_bits()
                    )
                })
                .collect();
            lines.sort();
            let digest = Sha256::digest(format!("labels\n{}", lines.join("\n")).as_bytes());
            format!("{image_id}.l{}", &hex::encode(digest)[..16])
        }
    }
}

/// One labelled defect, in pixels of the image it belongs to (top-left, bottom-right).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxLabel {
    /// Left edge in pixels.
    pub x1: f32,
    /// Top edge in pixels.
    pub y1: f32,
    /// Right edge in pixels (exclusive of nothing: `x2 > x1`).
    pub x2: f32,
    /// Bottom edge in pixels (`y2 > y1`).
    pub y2: f32,
    /// Class id, 1-based (0 is background).
    pub class_id: u16,
    /// Class name as the label source gave it, or the name of `class_id`.
    pub class: String,
}

impl BoxLabel {
    /// A box from its `[x1, y1, x2, y2]` corners in pixels, with its class.
    pub fn new([x1, y1, x2, y2]: [f32; 4], class_id: u16, class: impl Into<String>) -> BoxLabel {
        BoxLabel {
            x1,
            y1,
            x2,
            y2,
            class_id,
            class: class.into(),
        }
    }
}

/// Dataset split of a labelled image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Used for training.
    Train,
    /// Held out for evaluation.
    Val,
}

impl Split {
    /// The wire name (`train` or `val`).
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// Names a fixed set of wire strings once: the enum, its spelling, its parsing, and a
/// comparison with a plain string (so a line-side client's `"fail"` reads the same).
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The wire spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!(
                        "{s:?} is not one of {}",
                        $name::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
                    ))
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

wire_enum! {
    /// A board's verdict on `pcb.detections`.
    Verdict {
        /// No defect at or above the fail threshold.
        Pass = "pass",
        /// At least one defect at or above the fail threshold.
        Fail = "fail",
    }
}

wire_enum! {
    /// What happened to a model version, on `pcb.models.events`.
    ModelEventKind {
        /// Stored as a new version.
        Registered = "registered",
        /// Made live.
        Promoted = "promoted",
        /// Registered but left below the live version by the policy.
        NotPromoted = "not-promoted",
        /// The live alias went back to the previous version.
        RolledBack = "rolled-back",
        /// A detector serves it.
        Loaded = "loaded",
        /// A detector refused it (the reason says why); the old version keeps serving.
        LoadFailed = "load-failed",
        /// Marked as the shadow version: detectors run it beside the live one.
        Shadowed = "shadowed",
        /// No longer the shadow version.
        Unshadowed = "unshadowed",
        /// Marked as the canary version: detectors answer the boards its rule selects with
        /// it, for real.
        Canaried = "canaried",
        /// No longer the canary version: its boards go back to the live one.
        Uncanaried = "uncanaried",
    }
}

/// Who corrected a board's labels, and when: the mark of a label revision, a record the
/// viewer publishes (on the ingester's subject) with the board's image and the labels an
/// operator saved. It flows like any labelled board into the shards, so the next training
/// snapshot has it; the detector does not answer it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRevision {
    /// Who saved it (the name the operator gave the viewer).
    pub by: String,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The labels' digest it replaces (the `l<16 hex>` of [`record_id`]); None: the board
    /// had no labels, only the model's answer.
    pub replaces: Option<String>,
    /// The model version whose answer the operator reviewed, when there was one.
    pub reviewed: Option<ModelRef>,
    /// The operator's note, if any.
    pub note: Option<String>,
    /// The reviewed answer's boxes the operator deleted (none of the saved labels of its
    /// class covers one at IoU 0.5): places known to hold no defect, which training uses
    /// as hard negatives. Absent in older records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<BoxLabel>,
}

/// A file kept in the image files' object bucket ([`crate::OBJECTS_IMAGE_FILES`]) instead of
/// inline in a record: a board whose image and template would not fit in one message once
/// base64-encoded. Content-addressed: the object's name is the file's sha256, so the same
/// file is stored once however often it is dropped, and a reader checks both size and
/// digest of what it gets back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Name of the object in the bucket: the lowercase hex sha256 of the file.
    pub name: String,
    /// sha256 (lowercase hex) of the file's bytes.
    pub sha256: String,
    /// Size of the file in bytes.
    pub size: u64,
}

impl ObjectRef {
    /// The reference of `bytes`: named by their sha256.
    pub fn of(bytes: &[u8]) -> ObjectRef {
        let sha256 = image_id(bytes);
        ObjectRef {
            name: sha256.clone(),
            sha256,
            size: bytes.len() as u64,
        }
    }
}

/// The file references of a raw, encoded or shard record ([`crate::topology::FILE_REF_SCHEMAS`]),
/// read without the rest: every other field is skipped, so the housekeeping's scan of the
/// streams allocates nothing for the inline images' bytes.
#[derive(Debug, Default, Deserialize)]
pub struct FileRefs {
    /// The record's `image_ref`, when set.
    #[serde(default)]
    pub image_ref: Option<ObjectRef>,
    /// The record's `template_ref`, when set.
    #[serde(default)]
    pub template_ref: Option<ObjectRef>,
    /// A shard record's encoded record, which carries the references.
    #[serde(default)]
    record: Option<Box<FileRefs>>,
}

impl FileRefs {
    /// The references in a MessagePack record of one of the [`crate::topology::FILE_REF_SCHEMAS`].
    pub fn decode(payload: &[u8]) -> Result<Vec<ObjectRef>, rmp_serde::decode::Error> {
        let mut refs: FileRefs = rmp_serde::from_slice(payload)?;
        let mut out = Vec::new();
        if let Some(inner) = refs.record.take() {
            out.extend(inner.image_ref);
            out.extend(inner.template_ref);
        }
        out.extend(refs.image_ref);
        out.extend(refs.template_ref);
        Ok(out)
    }
}

/// `pcb.images.raw`: a file as the ingester found it, before any decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawImage {
    /// sha256 (hex) of `image`; with the labels, the `Nats-Msg-Id` ([`record_id`]).
    pub image_id: String,
    /// The image file's bytes, untouched.
    #[serde(with = "serde_bytes")]
    pub image: Vec<u8>,
    /// The defect-free template's bytes, when the source pairs one with the image.
    #[serde(default, with = "serde_bytes")]
    pub template: Option<Vec<u8>>,
    /// Defect boxes when the image is labelled (`Some(vec![])`: labelled, no defect);
    /// `None`: unlabelled.
    pub labels: Option<Vec<BoxLabel>>,
    /// Format the labels came in (`deeppcb`, `voc`, `yolo`, `coco`).
    pub label_format: Option<String>,
    /// Board identifier (the file stem unless the source names one).
    pub board_id: String,
    /// Production line identifier (first directory under the watched root, or the default).
    pub line_id: String,
    /// Path of the file relative to the watched directory.
    pub source: String,
    /// Capture time, milliseconds since the Unix epoch (the file's modification time).
    pub captured_at_ms: i64,
    /// Split the dataset itself assigns (e.g. DeepPCB's `trainval.txt`/`test.txt`).
    pub split_hint: Option<Split>,
    /// Set on a label revision from the viewer (absent on the wire otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<LabelRevision>,
    /// Set when the image file is in the image files' bucket instead of inline (a board too
    /// large for one message); `image` is then empty. Absent on the wire otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<ObjectRef>,
    /// Set when the template file is in the image files' bucket; `template` is then None.
    /// Absent on the wire otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<ObjectRef>,
}

impl RawImage {
    /// Whether the board has a template, inline or in the bucket.
    pub fn has_template(&self) -> bool {
        self.template.is_some() || self.template_ref.is_some()
    }
}

/// `pcb.images.encoded`: a fully decoded and validated image, base64-encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncodedImage {
    /// sha256 (hex) of the original image bytes.
    pub image_id: String,
    /// Board identifier, from the raw record.
    pub board_id: String,
    /// Production line identifier, from the raw record.
    pub line_id: String,
    /// Source path relative to the watched directory.
    pub source: String,
    /// Capture time, milliseconds since the Unix epoch.
    pub captured_at_ms: i64,
    /// When the encoder validated the image, milliseconds since the Unix epoch.
    pub encoded_at_ms: i64,
    /// The original image file, standard base64 with padding.
    pub image_b64: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Colour channels of the decoded image (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).
    pub channels: u8,
    /// Container format (`jpeg`, `png`, `bmp`, `tiff`).
    pub format: String,
    /// sha256 (hex) of the original bytes; equal to `image_id`, kept under its own name for
    /// consumers that verify the payload.
    pub sha256: String,
    /// Validated defect boxes, as in [`RawImage::labels`].
    pub labels: Option<Vec<BoxLabel>>,
    /// Format the labels came in.
    pub label_format: Option<String>,
    /// The template file, base64, when present (same size as the image).
    pub template_b64: Option<String>,
    /// Split the dataset itself assigns, if any.
    pub split_hint: Option<Split>,
    /// The raw record's label revision, carried through (absent on the wire otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<LabelRevision>,
    /// The raw record's image reference, carried through: the image file is in the image
    /// files' bucket and `image_b64` is empty. Absent on the wire otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<ObjectRef>,
    /// The raw record's template reference, carried through: `template_b64` is then None.
    /// Absent on the wire otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<ObjectRef>,
}

impl EncodedImage {
    /// Whether the board has a template, inline or in the bucket.
    pub fn has_template(&self) -> bool {
        self.template_b64.is_some() || self.template_ref.is_some()
    }
}

/// `pcb.shards.<k>`: a labelled image assigned to a split and a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// `train` or `val`.
    pub split: Split,
    /// Shard index `k` (the record is on `pcb.shards.<k>`).
    pub shard: u32,
    /// Number of shards when the record was routed.
    pub shard_count: u32,
    /// When the router assigned it, milliseconds since the Unix epoch.
    pub routed_at_ms: i64,
    /// The encoded image with its labels.
    pub record: EncodedImage,
}

/// `pcb.rejected.<stage>`: a dead letter saying what was refused, where and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The stage that refused the input (`ingester`, `encoder`, `router`, ...).
    pub stage: String,
    /// Machine-readable reason (`not-an-image`, `too-large`, `label-parse`, ...).
    pub reason_code: String,
    /// Human-readable reason naming the problem.
    pub reason: String,
    /// Image id when it is known (sha256 of the image bytes).
    pub image_id: Option<String>,
    /// Source file path relative to the watched directory (lossy UTF-8 when the name is not).
    pub source: String,
    /// Where the file was moved to, when the stage moved it (the ingester's `rejected/`).
    pub moved_to: Option<String>,
    /// Subject of the refused message, when a message was refused.
    pub subject: Option<String>,
    /// Stream sequence of the refused message, when a message was refused.
    pub stream_seq: Option<u64>,
    /// When it was refused, milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// `pcb.train.progress`: one training step of one rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainProgress {
    /// The job's name (its checkpoint folder and store prefix).
    pub job: String,
    /// Rank that reports.
    pub rank: u32,
    /// Ranks in the job.
    pub world: u32,
    /// Epoch, 0-based.
    pub epoch: u32,
    /// Epochs of the job.
    pub epochs: u32,
    /// Step within the epoch, 1-based.
    pub step: u32,
    /// Steps per epoch (agreed by every rank).
    pub steps_per_epoch: u32,
    /// Optimiser steps since the job began.
    pub global_step: u64,
    /// Job-wide images in this step.
    pub images: u32,
    /// This rank's loss for the step (NaN when its batch was empty).
    pub loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Job-wide images per second over the epoch so far.
    pub images_per_sec: f64,
    /// Estimated seconds until the job ends.
    pub eta_secs: f64,
    /// sha256 of the parameters after the step, when the job is asked for it (so replicas
    /// can be checked for being bitwise identical).
    pub param_digest: Option<String>,
    /// Validation mAP (DeepPCB protocol) after the epoch's last step, on rank 0.
    pub val_map: Option<f64>,
    /// When it was sent, milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// The dataset snapshot a job trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Stream the records came from.
    pub stream: String,
    /// First stream sequence included.
    pub first_seq: u64,
    /// Last stream sequence included.
    pub last_seq: u64,
    /// Training images in the snapshot.
    pub train_images: u64,
    /// Validation images in the snapshot.
    pub val_images: u64,
    /// Defect boxes per class name in the training images.
    pub boxes_per_class: std::collections::BTreeMap<String, u64>,
}

/// `pcb.train.candidates`: a trained model offered to the registry. The weights are a
/// safetensors object (torchvision key names) named `artifact` in the candidates' object
/// store, with digest `sha256`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainCandidate {
    /// The job that produced it.
    pub job: String,
    /// Model name.
    pub model: String,
    /// The weights' object in the candidates' object store (`pcb_candidates`), never a file.
    pub artifact: String,
    /// sha256 (hex) of the weights file.
    pub sha256: String,
    /// The model's architecture and input (`pcb_vision::ModelConfig` as JSON).
    pub model_config: serde_json::Value,
    /// Hyperparameters of the job.
    pub hyperparameters: serde_json::Value,
    /// Validation metrics (`pcb_evaluation` report as JSON), when a val split existed.
    pub metrics: Option<serde_json::Value>,
    /// The data it was trained on.
    pub snapshot: Snapshot,
    /// Mean training loss of each epoch.
    pub epoch_losses: Vec<f64>,
    /// Git revision of the code that trained it, when known.
    pub git_revision: Option<String>,
    /// When training finished, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// A model version by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Model name.
    pub name: String,
    /// Version, from 1, monotonic per name.
    pub version: u64,
}

/// One detected defect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Defect {
    /// Left edge in pixels of the image.
    pub x1: f32,
    /// Top edge in pixels.
    pub y1: f32,
    /// Right edge in pixels.
    pub x2: f32,
    /// Bottom edge in pixels.
    pub y2: f32,
    /// Class id, 1-based.
    pub class_id: u16,
    /// Class name.
    pub class: String,
    /// Confidence in 0..1.
    pub score: f32,
}

/// `pcb.detections`: what the online detector found on one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// sha256 (hex) of the image file.
    pub image_id: String,
    /// Board identifier.
    pub board_id: String,
    /// Production line.
    pub line_id: String,
    /// Source path relative to the watched directory.
    pub source: String,
    /// Capture time, milliseconds since the Unix epoch.
    pub captured_at: i64,
    /// When the detection was made, milliseconds since the Unix epoch.
    pub detected_at: i64,
    /// The model version that answered.
    pub model: ModelRef,
    /// Defects at or above the detector's report threshold, best first.
    pub defects: Vec<Defect>,
    /// `pass`, or `fail` when a defect scores at or above the verdict threshold.
    pub verdict: Verdict,
    /// Model time for the image's batch, divided by the batch size, in milliseconds.
    pub inference_ms: f64,
}

/// `pcb.models.events`: something happened to a model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEvent {
    /// `registered`, `promoted`, `rolled-back`, `not-promoted`, `loaded`, `load-failed`,
    /// `shadowed`, `unshadowed`.
    pub kind: ModelEventKind,
    /// The version concerned.
    pub model: ModelRef,
    /// Who reports it (`registry`, `cli`, `detector-<host>-<pid>`).
    pub by: String,
    /// Why (a refusal's reason, the policy's decision).
    pub reason: Option<String>,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: i64,
}

impl Envelope for Detection {
    const SCHEMA: &'static str = "pcb.detections/v1";
    // One answer per image and model version: a redelivered image answered again by the
    // same version is stored once; a new version answers anew.
    fn msg_id(&self) -> String {
        format!("{}.v{}", self.image_id, self.model.version)
    }
}

/// `pcb.verdicts.<line>`: one board's verdict for line-side systems (PLCs, SCADA) reading
/// over MQTT, which carries no headers: so a small JSON object, not MessagePack. It repeats
/// what its [`Detection`] says; a redelivered image may repeat it, with the same `image_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineVerdict {
    /// The schema and version, in the payload since MQTT has no headers: `pcb.verdicts/v1`.
    pub schema: String,
    /// Board identifier.
    pub board_id: String,
    /// sha256 (hex) of the image file.
    pub image_id: String,
    /// Production line, as the detection names it (the subject holds its token).
    pub line_id: String,
    /// `pass` or `fail`.
    pub verdict: Verdict,
    /// How many defects were reported.
    pub defects: usize,
    /// Their classes, best first, each once.
    pub classes: Vec<String>,
    /// The best defect's score (None: no defect).
    pub top_score: Option<f32>,
    /// The model version that answered, `name@version`.
    pub model: String,
    /// Capture time, milliseconds since the Unix epoch.
    pub captured_at: i64,
    /// When the detection was made, milliseconds since the Unix epoch.
    pub detected_at: i64,
}

impl LineVerdict {
    /// Its schema name and version.
    pub const SCHEMA: &'static str = "pcb.verdicts/v1";

    /// The verdict of `d`.
    pub fn of(d: &Detection) -> LineVerdict {
        let mut classes: Vec<String> = Vec::new();
        for defect in &d.defects {
            if !classes.contains(&defect.class) {
                classes.push(defect.class.clone());
            }
        }
        LineVerdict {
            schema: Self::SCHEMA.into(),
            board_id: d.board_id.clone(),
            image_id: d.image_id.clone(),
            line_id: d.line_id.clone(),
            verdict: d.verdict,
            defects: d.defects.len(),
            classes,
            top_score: d.defects.iter().map(|x| x.score).reduce(f32::max),
            model: format!("{}@{}", d.model.name, d.model.version),
            captured_at: d.captured_at,
            detected_at: d.detected_at,
        }
    }

    /// Its payload: compact JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a payload, refusing another schema.
    pub fn from_json(payload: &[u8]) -> Result<LineVerdict, String> {
        let v: LineVerdict = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        if v.schema != Self::SCHEMA {
            return Err(format!(
                "expected schema {}, payload says {}",
                Self::SCHEMA,
                v.schema
            ));
        }
        Ok(v)
    }
}

impl Envelope for ModelEvent {
    const SCHEMA: &'static str = "pcb.models.events/v1";
    fn msg_id(&self) -> String {
        format!(
            "{}.{}.{}.{}.{}",
            self.kind, self.model.name, self.model.version, self.by, self.at_ms
        )
    }
}

impl Envelope for TrainProgress {
    const SCHEMA: &'static str = "pcb.train.progress/v1";
    fn msg_id(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.job, self.rank, self.epoch, self.global_step
        )
    }
}

impl Envelope for TrainCandidate {
    const SCHEMA: &'static str = "pcb.train.candidates/v1";
    fn msg_id(&self) -> String {
        format!("{}.{}", self.job, self.sha256)
    }
}

impl Envelope for RawImage {
    const SCHEMA: &'static str = "pcb.images.raw/v1";
    fn msg_id(&self) -> String {
        record_id(&self.image_id, self.labels.as_deref())
    }
    fn extra_headers(&self) -> Vec<(&'static str, String)> {
        revision_headers(self.revision.as_ref(), self.labels.as_deref())
    }
}

/// The revision's author and box count as header values: printable ASCII only (a header cannot hold
/// line breaks; the record itself has the name as given).
fn revision_headers(
    r: Option<&LabelRevision>,
    labels: Option<&[BoxLabel]>,
) -> Vec<(&'static str, String)> {
    r.map(|r| {
        let by: String =
            r.by.chars()
                .map(|c| {
                    if c.is_ascii_graphic() || c == ' ' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
        vec![
            (crate::codec::REVISION_HEADER, by),
            (
                crate::codec::REVISION_BOXES_HEADER,
                labels.map_or(0, <[BoxLabel]>::len).to_string(),
            ),
        ]
    })
    .unwrap_or_default()
}

impl Envelope for EncodedImage {
    const SCHEMA: &'static str = "pcb.images.encoded/v1";
    // Raw and encoded records share a stream, whose dedup is per stream: the suffix keeps
    // an encoded record from being taken for a duplicate of its raw record.
    fn msg_id(&self) -> String {
        format!(
            "{}.encoded",
            record_id(&self.image_id, self.labels.as_deref())
        )
    }
    fn extra_headers(&self) -> Vec<(&'static str, String)> {
        revision_headers(self.revision.as_ref(), self.labels.as_deref())
    }
}

impl Envelope for ShardRecord {
    const SCHEMA: &'static str = "pcb.shards/v1";
    fn msg_id(&self) -> String {
        record_id(&self.record.image_id, self.record.labels.as_deref())
    }
}

impl Envelope for DeadLetter {
    const SCHEMA: &'static str = "pcb.rejected/v1";
    // One dead letter per stage, input and reason: a redelivered poison message or a
    // rescanned bad file is not reported twice.
    fn msg_id(&self) -> String {
        let what = self
            .image_id
            .clone()
            .unwrap_or_else(|| image_id(self.source.as_bytes()));
        format!("{}.{}.{}", self.stage, self.reason_code, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_part_of_a_records_identity() {
        let id = image_id(b"board");
        let a = BoxLabel::new([1.0, 2.0, 3.0, 4.0], 1, "open");
        let b = BoxLabel::new([5.0, 6.0, 7.0, 8.0], 2, "short");
        assert_eq!(record_id(&id, None), id);
        let ab = record_id(&id, Some(&[a.clone(), b.clone()]));
        assert!(
            ab.starts_with(&format!("{id}.l")) && ab.len() == id.len() + 18,
            "{ab}"
        );
        // Order and class spelling do not matter; a box, a coordinate or a class does.
        let mut a_renamed = a.clone();
        a_renamed.class = "OPEN".into();
        assert_eq!(ab, record_id(&id, Some(&[b.clone(), a_renamed])));
        assert_ne!(ab, record_id(&id, Some(std::slice::from_ref(&a))));
        let mut moved = a.clone();
        moved.x2 = 3.5;
        assert_ne!(ab, record_id(&id, Some(&[moved, b.clone()])));
        let mut reclassed = a.clone();
        reclassed.class_id = 3;
        assert_ne!(ab, record_id(&id, Some(&[reclassed, b])));
        // Labelled with no defect is not unlabelled.
        assert_ne!(record_id(&id, Some(&[])), id);
    }

    #[test]
    fn a_line_verdict_says_what_its_detection_says_in_json() {
        let defect = |class: &str, score: f32| Defect {
            x1: 0.0,
            y1: 0.0,
            x2: 1.0,
            y2: 1.0,
            class_id: 1,
            class: class.into(),
            score,
        };
        let d = Detection {
            image_id: "ab".into(),
            board_id: "b7".into(),
            line_id: "line-2".into(),
            source: "line-2/b7.jpg".into(),
            captured_at: 1,
            detected_at: 2,
            model: ModelRef {
                name: "pcb".into(),
                version: 3,
            },
            defects: vec![
                defect("short", 0.9),
                defect("open", 0.8),
                defect("short", 0.5),
            ],
            verdict: Verdict::Fail,
            inference_ms: 4.0,
        };
        let v = LineVerdict::of(&d);
        assert_eq!(v.classes, ["short", "open"]);
        assert_eq!((v.defects, v.top_score), (3, Some(0.9)));
        assert_eq!(v.model, "pcb@3");
        let json = String::from_utf8(v.to_json()).expect("utf-8");
        assert!(json.contains(r#""verdict":"fail""#), "{json}");
        assert!(json.starts_with(r#"{"schema":"pcb.verdicts/v1""#), "{json}");
        assert_eq!(LineVerdict::from_json(json.as_bytes()), Ok(v));
        let other = json.replace("pcb.verdicts/v1", "pcb.verdicts/v2");
        let e = LineVerdict::from_json(other.as_bytes()).expect_err("another schema");
        assert!(e.contains("expected schema pcb.verdicts/v1"), "{e}");
        let none = LineVerdict::of(&Detection {
            defects: vec![],
            verdict: Verdict::Pass,
            ..d
        });
        assert_eq!((none.defects, none.top_score), (0, None));
    }

    #[test]
    fn image_id_is_sha256_hex() {
        assert_eq!(
            image_id(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn split_wire_names() {
        assert_eq!(Split::Train.as_str(), "train");
        assert_eq!(Split::Val.as_str(), "val");
    }
}
