//! Subject and stream names: users' tools and other languages depend on these exact strings.

/// Records published by the ingester: raw image bytes plus labels and metadata.
pub const SUBJECT_RAW: &str = "pcb.images.raw";
/// Records published by the encoder: validated, base64-encoded images.
pub const SUBJECT_ENCODED: &str = "pcb.images.encoded";
/// Prefix of the training shards; shard `k` lives on `pcb.shards.<k>`.
pub const SUBJECT_SHARDS_PREFIX: &str = "pcb.shards";
/// Prefix of dead letters; stage `s` writes to `pcb.rejected.<s>`.
pub const SUBJECT_REJECTED_PREFIX: &str = "pcb.rejected";
/// Detections of the online detector (reserved for the detector stage).
pub const SUBJECT_DETECTIONS: &str = "pcb.detections";
/// Answers of a model's shadow version, run beside the live one on the same images: the
/// same schema as `pcb.detections`, never read by line-side consumers.
pub const SUBJECT_SHADOW_DETECTIONS: &str = "pcb.shadow.detections";

/// Prefix of the line-side verdicts: line `l`'s on `pcb.verdicts.<l>`, which the NATS
/// server's MQTT listener serves as topic `pcb/verdicts/<l>`.
pub const SUBJECT_VERDICTS_PREFIX: &str = "pcb.verdicts";

/// Stream holding `pcb.images.raw` and `pcb.images.encoded`.
pub const STREAM_IMAGES: &str = "PCB_IMAGES";
/// Stream holding every `pcb.shards.<k>`.
pub const STREAM_SHARDS: &str = "PCB_SHARDS";
/// Stream holding `pcb.detections`.
pub const STREAM_DETECTIONS: &str = "PCB_DETECTIONS";
/// Stream holding every `pcb.rejected.<stage>`.
pub const STREAM_REJECTED: &str = "PCB_REJECTED";
/// Stream holding `pcb.shadow.detections` (a stream of its own: what counts or replays
/// `PCB_DETECTIONS` sees the live answers only).
pub const STREAM_SHADOW: &str = "PCB_SHADOW";

/// Default number of training shards.
pub const DEFAULT_SHARD_COUNT: u32 = 8;

/// Subject of training shard `k`.
pub fn shard_subject(k: u32) -> String {
    format!("{SUBJECT_SHARDS_PREFIX}.{k}")
}

/// Subject of the dead letters of `stage`.
pub fn rejected_subject(stage: &str) -> String {
    format!("{SUBJECT_REJECTED_PREFIX}.{stage}")
}

/// The subject token of a line: its id with every character other than an ASCII letter,
/// digit, `-` or `_` replaced by `_` (`_` for an empty id). Such a token reads the same as a
/// NATS subject token and as an MQTT topic level, with no wildcard, separator or `.` (which
/// the server's MQTT bridge would rewrite).
pub fn line_token(line_id: &str) -> String {
    if line_id.is_empty() {
        return "_".into();
    }
    line_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Subject of the verdicts of line `line_id`: `pcb.verdicts.<token>` ([`line_token`]).
pub fn verdict_subject(line_id: &str) -> String {
    format!("{SUBJECT_VERDICTS_PREFIX}.{}", line_token(line_id))
}

/// Per-step progress of training jobs (one message per rank and step).
pub const SUBJECT_TRAIN_PROGRESS: &str = "pcb.train.progress";
/// A trained model offered to the registry, with its metadata.
pub const SUBJECT_TRAIN_CANDIDATES: &str = "pcb.train.candidates";
/// Registry events: versions registered, promoted, rolled back; detectors loading a
/// version or refusing it.
pub const SUBJECT_MODEL_EVENTS: &str = "pcb.models.events";
/// Key-value bucket of the model registry (JSON values): `model.<name>.latest`,
/// `model.<name>.v.<version>`, `model.<name>.live`, `model.<name>.shadow`.
pub const KV_MODELS: &str = "pcb_models";
/// Object store bucket of the registry's weights: `<name>/v<version>.safetensors`.
pub const OBJECTS_MODELS: &str = "pcb_model_artifacts";
/// Object store bucket of training candidates' weights, `<model>/<job>/<sha256>.safetensors`:
/// the trainer writes them, the registry takes them (and removes them once registered). A
/// candidate names its object here, never a file: no stage reads a path from a message.
pub const OBJECTS_CANDIDATES: &str = "pcb_candidates";

/// Object store bucket of image and template files too large to travel inline in a record
/// (over the server's payload limit once base64-encoded), each named by its sha256
/// ([`crate::ObjectRef`]): the ingester writes them, the encoder, detector, trainer and
/// viewer read them.
pub const OBJECTS_IMAGE_FILES: &str = "pcb_image_files";

/// Stream of `pcb.train.>` (progress, candidates) and `pcb.models.>` (registry events).
pub const STREAM_TRAINING: &str = "PCB_TRAINING";

/// Which stream a logical stream key of the pipeline file maps to, with its subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Raw and encoded images.
    Images,
    /// Labelled training shards.
    Shards,
    /// Detector output.
    Detections,
    /// Dead letters of every stage.
    Rejected,
    /// Training progress, candidates and registry events.
    Training,
    /// Answers of shadow versions.
    Shadow,
}

impl StreamKind {
    /// Every stream the pipeline needs.
    pub const ALL: [StreamKind; 6] = [
        StreamKind::Images,
        StreamKind::Shards,
        StreamKind::Detections,
        StreamKind::Rejected,
        StreamKind::Training,
        StreamKind::Shadow,
    ];

    /// The JetStream stream name.
    pub fn name(self) -> &'static str {
        match self {
            StreamKind::Images => STREAM_IMAGES,
            StreamKind::Shards => STREAM_SHARDS,
            StreamKind::Detections => STREAM_DETECTIONS,
            StreamKind::Rejected => STREAM_REJECTED,
            StreamKind::Training => STREAM_TRAINING,
            StreamKind::Shadow => STREAM_SHADOW,
        }
    }

    /// The key of this stream in the pipeline file's `[streams]` table.
    pub fn key(self) -> &'static str {
        match self {
            StreamKind::Images => "images",
            StreamKind::Shards => "shards",
            StreamKind::Detections => "detections",
            StreamKind::Rejected => "rejected",
            StreamKind::Training => "training",
            StreamKind::Shadow => "shadow",
        }
    }

    /// The subjects the stream captures. Wildcards keep the shard count changeable
    /// without editing the stream.
    pub fn subjects(self) -> Vec<String> {
        match self {
            StreamKind::Images => vec![SUBJECT_RAW.into(), SUBJECT_ENCODED.into()],
            StreamKind::Shards => vec![format!("{SUBJECT_SHARDS_PREFIX}.*")],
            StreamKind::Detections => vec![SUBJECT_DETECTIONS.into()],
            StreamKind::Rejected => vec![format!("{SUBJECT_REJECTED_PREFIX}.*")],
            StreamKind::Training => vec!["pcb.train.>".into(), "pcb.models.>".into()],
            StreamKind::Shadow => vec![SUBJECT_SHADOW_DETECTIONS.into()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_the_documented_ones() {
        assert_eq!(shard_subject(3), "pcb.shards.3");
        assert_eq!(rejected_subject("encoder"), "pcb.rejected.encoder");
        assert_eq!(
            StreamKind::Images.subjects(),
            ["pcb.images.raw", "pcb.images.encoded"]
        );
        assert_eq!(StreamKind::Shards.subjects(), ["pcb.shards.*"]);
    }

    #[test]
    fn a_line_is_one_token_in_nats_and_in_mqtt() {
        assert_eq!(verdict_subject("line-1"), "pcb.verdicts.line-1");
        assert_eq!(
            verdict_subject("hall 2/east.a"),
            "pcb.verdicts.hall_2_east_a"
        );
        assert_eq!(verdict_subject("*"), "pcb.verdicts._");
        assert_eq!(verdict_subject(">#+"), "pcb.verdicts.___");
        assert_eq!(verdict_subject(""), "pcb.verdicts._");
        assert_eq!(line_token("Ünit_3"), "_nit_3");
    }

    #[test]
    fn stream_subjects_do_not_overlap() {
        let all: Vec<String> = StreamKind::ALL.iter().flat_map(|k| k.subjects()).collect();
        let mut dedup = all.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(all.len(), dedup.len());
    }
}
