//! The pipeline's topology, declared once: every stage with the subjects it consumes (and
//! through which durable consumer), the subjects it publishes and the buckets it reads or
//! writes; every subject with its stream and message schema. Provisioning (`pcb init`), the
//! launcher's process list, the README's subjects table and the per-stage NATS permissions
//! are all derived from these tables, so a stage's wiring is changed here and nowhere else.

use std::fmt;
use std::str::FromStr;

use crate::subjects::*;

/// A stage of the pipeline. Its spelling (`name`) is the binary's name, the durable's
/// default name, the dead-letter subject's last token and the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StageName {
    /// Watched directory → `pcb.images.raw`.
    Ingester,
    /// `pcb.images.raw` → `pcb.images.encoded`.
    Encoder,
    /// `pcb.images.encoded` → `pcb.shards.<k>`.
    Router,
    /// `pcb.train.candidates` → the model registry.
    Registry,
    /// `pcb.images.encoded` → `pcb.detections`, with the live model.
    Detector,
    /// The web viewer.
    Viewer,
    /// A rank of a training job (`pcb train`).
    Trainer,
}

impl StageName {
    /// Every stage, in the launcher's start order (the trainer last: it runs as a job).
    pub const ALL: [StageName; 7] = [
        StageName::Ingester,
        StageName::Encoder,
        StageName::Router,
        StageName::Registry,
        StageName::Detector,
        StageName::Viewer,
        StageName::Trainer,
    ];

    /// The stage's spelling.
    pub fn name(self) -> &'static str {
        self.decl().name
    }

    /// The stage's declaration.
    pub fn decl(self) -> &'static StageDecl {
        // STAGES is indexed in the enum's order (checked by a test).
        &STAGES[self as usize]
    }
}

impl fmt::Display for StageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a stage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown stage {0:?} (stages: ingester, encoder, router, registry, detector, viewer, trainer)"
)]
pub struct UnknownStage(pub String);

impl FromStr for StageName {
    type Err = UnknownStage;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StageName::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| UnknownStage(s.to_string()))
    }
}

/// How a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessKind {
    /// A long-running service the launcher starts and restarts (`pcb up`).
    Service,
    /// The ranks of a training job, started by `pcb train` or the retrain policy.
    Job,
}

/// How a stage reads a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// A durable pull consumer with explicit acks, shared by every replica: each message is
    /// processed once and settled by the ack policy.
    Durable(Durable),
    /// A private, unacknowledged view (ordered or ephemeral consumer, direct get): reading
    /// changes nothing on the server.
    View,
}

/// A durable consumer: its name and the defaults of its ack settings (a stage's config
/// may change the settings; the name is the topology's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    /// The durable consumer's name.
    pub name: &'static str,
    /// Messages in flight at once in one process (0: four per CPU core).
    pub concurrency: usize,
    /// Redeliver a message not acked within this many seconds.
    pub ack_wait_secs: u64,
    /// Deliveries of a failing message before it becomes a `retries-exhausted` dead letter
    /// (-1: no limit).
    pub max_deliver: i64,
    /// Delay before a transient failure is retried, in milliseconds.
    pub retry_delay_ms: u64,
}

impl Durable {
    /// The settings most consumers share; a declaration changes what its stage needs.
    pub const COMMON: Durable = Durable {
        name: "",
        concurrency: 0,
        ack_wait_secs: 60,
        max_deliver: 5,
        retry_delay_ms: 2000,
    };
}

/// One subject a stage consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// The stream holding it.
    pub stream: StreamKind,
    /// The subject filter (may hold wildcards).
    pub filter: &'static str,
    /// Durable consumer or private view.
    pub mode: ReadMode,
    /// Only under a setting (e.g. the ingester's `follow_rejections`), not always.
    pub optional: bool,
}

/// Read or read-write access to a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads (and watches) only.
    Read,
    /// Reads and writes.
    Write,
    /// Reads, and deletes objects (publishes their metadata, never their bytes): the
    /// housekeeping's access to the files no record names any more.
    Delete,
}

/// A key-value or object bucket of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketKind {
    /// Key-value bucket.
    KeyValue,
    /// Object store.
    Object,
}

/// A bucket's declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketDecl {
    /// Bucket name.
    pub name: &'static str,
    /// Key-value or object store.
    pub kind: BucketKind,
    /// What it holds.
    pub description: &'static str,
    /// Values kept per key (key-value buckets).
    pub history: i64,
    /// Cap on the bucket's size in bytes (-1: none); a full bucket refuses new objects. For
    /// the image files' bucket this is the default of the pipeline file's
    /// `[streams.image_files] max_bytes`, which sets it.
    pub max_bytes: i64,
}

/// The pipeline's buckets.
pub const BUCKETS: [BucketDecl; 4] = [
    BucketDecl {
        name: KV_MODELS,
        kind: BucketKind::KeyValue,
        description: "PCB model registry: versions and live aliases",
        history: 16,
        max_bytes: -1,
    },
    BucketDecl {
        name: OBJECTS_MODELS,
        kind: BucketKind::Object,
        description: "PCB model registry: weights",
        history: 1,
        max_bytes: -1,
    },
    BucketDecl {
        name: OBJECTS_CANDIDATES,
        kind: BucketKind::Object,
        description: "training candidates' weights, until the registry takes them",
        history: 1,
        max_bytes: -1,
    },
    // Records in the streams of [`KEEPER`]'s `file_refs` refer to these files, so no age
    // limit: an object must outlive every record naming it, and the housekeeping deletes
    // only those no record names any more. The default cap is the shards' default size;
    // full, the bucket refuses new files and the ingester keeps the boards in the inbox
    // until there is room (nothing still named is ever deleted for room).
    BucketDecl {
        name: OBJECTS_IMAGE_FILES,
        kind: BucketKind::Object,
        description: "image and template files too large for one message, by sha256",
        history: 1,
        max_bytes: 8 << 30,
    },
];

/// One stage's declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageDecl {
    /// The stage.
    pub stage: StageName,
    /// Its spelling.
    pub name: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// Service or job.
    pub process: ProcessKind,
    /// What it consumes.
    pub inputs: &'static [Input],
    /// The subjects it publishes (patterns use `*` for a token, `>` for the rest).
    pub outputs: &'static [&'static str],
    /// The buckets it uses.
    pub buckets: &'static [(&'static str, Access)],
}

impl StageDecl {
    /// Its durable consumer, when it has one.
    pub fn durable_input(&self) -> Option<(&'static Input, &'static Durable)> {
        self.inputs.iter().find_map(|i| match &i.mode {
            ReadMode::Durable(d) if !i.optional => Some((i, d)),
            _ => None,
        })
    }

    /// Whether it publishes on `subject` (a concrete subject, no wildcards).
    pub fn publishes(&self, subject: &str) -> bool {
        self.outputs.iter().any(|p| subject_matches(p, subject))
    }
}

/// Whether `subject` matches the NATS pattern `pattern` (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

const fn durable(stream: StreamKind, filter: &'static str, durable: Durable) -> Input {
    Input {
        stream,
        filter,
        mode: ReadMode::Durable(durable),
        optional: false,
    }
}

/// The durable `name` with the common settings.
const fn common(name: &'static str) -> Durable {
    Durable {
        name,
        ..Durable::COMMON
    }
}

const fn view(stream: StreamKind, filter: &'static str) -> Input {
    Input {
        stream,
        filter,
        mode: ReadMode::View,
        optional: false,
    }
}

/// Every stage, indexed by [`StageName`].
pub const STAGES: [StageDecl; 7] = [
    StageDecl {
        stage: StageName::Ingester,
        name: "ingester",
        summary: "watches a folder and publishes each new board with its template and labels",
        process: ProcessKind::Service,
        inputs: &[Input {
            stream: StreamKind::Rejected,
            filter: "pcb.rejected.*",
            // Never gives up on a letter: a file left behind in processed/ would be lost.
            mode: ReadMode::Durable(Durable {
                name: "ingester-follow-rejections",
                concurrency: 4,
                ack_wait_secs: 30,
                max_deliver: -1,
                retry_delay_ms: 1000,
            }),
            optional: true,
        }],
        outputs: &[SUBJECT_RAW, "pcb.rejected.ingester"],
        buckets: &[(OBJECTS_IMAGE_FILES, Access::Write)],
    },
    StageDecl {
        stage: StageName::Encoder,
        name: "encoder",
        summary: "decodes and checks each raw image and publishes it base64-encoded",
        process: ProcessKind::Service,
        inputs: &[durable(StreamKind::Images, SUBJECT_RAW, common("encoder"))],
        outputs: &[SUBJECT_ENCODED, "pcb.rejected.encoder"],
        buckets: &[(OBJECTS_IMAGE_FILES, Access::Read)],
    },
    StageDecl {
        stage: StageName::Router,
        name: "router",
        summary: "routes each labelled board to its training shard",
        process: ProcessKind::Service,
        // Routing is a hash and a publish: many in flight, and a short ack wait.
        inputs: &[durable(
            StreamKind::Images,
            SUBJECT_ENCODED,
            Durable {
                name: "router",
                concurrency: 32,
                ack_wait_secs: 30,
                ..Durable::COMMON
            },
        )],
        outputs: &["pcb.shards.*", "pcb.rejected.router"],
        buckets: &[],
    },
    StageDecl {
        stage: StageName::Registry,
        name: "registry",
        summary: "registers trained candidates and promotes the better ones",
        process: ProcessKind::Service,
        // One candidate at a time: versions are numbered in the order they are taken. With
        // `promote = "after_shadow"` it also replays both versions' answers to judge a
        // shadow period, and, with `shadow_min_corrected`, the label revisions' headers
        // (who was right on the corrected boards).
        inputs: &[
            durable(
                StreamKind::Training,
                SUBJECT_TRAIN_CANDIDATES,
                Durable {
                    name: "registry",
                    concurrency: 1,
                    ..Durable::COMMON
                },
            ),
            Input {
                optional: true,
                ..view(StreamKind::Shadow, SUBJECT_SHADOW_DETECTIONS)
            },
            Input {
                optional: true,
                ..view(StreamKind::Detections, SUBJECT_DETECTIONS)
            },
            Input {
                optional: true,
                ..view(StreamKind::Images, SUBJECT_RAW)
            },
        ],
        outputs: &[SUBJECT_MODEL_EVENTS, "pcb.rejected.registry"],
        buckets: &[
            (KV_MODELS, Access::Write),
            (OBJECTS_MODELS, Access::Write),
            (OBJECTS_CANDIDATES, Access::Write),
        ],
    },
    StageDecl {
        stage: StageName::Detector,
        name: "detector",
        summary: "runs the live model (and a shadow version beside it) on every encoded image",
        process: ProcessKind::Service,
        // Two batches in flight: one decoding while the other is in the model.
        inputs: &[durable(
            StreamKind::Images,
            SUBJECT_ENCODED,
            Durable {
                name: "detector",
                concurrency: 2,
                ..Durable::COMMON
            },
        )],
        outputs: &[
            SUBJECT_DETECTIONS,
            SUBJECT_MODEL_EVENTS,
            "pcb.rejected.detector",
            "pcb.verdicts.*",
            SUBJECT_SHADOW_DETECTIONS,
        ],
        buckets: &[
            (KV_MODELS, Access::Read),
            (OBJECTS_MODELS, Access::Read),
            (OBJECTS_IMAGE_FILES, Access::Read),
        ],
    },
    StageDecl {
        stage: StageName::Viewer,
        name: "viewer",
        summary: "serves boards, detections, training and models on the web; takes uploads",
        process: ProcessKind::Service,
        inputs: &[
            view(StreamKind::Images, "pcb.images.*"),
            view(StreamKind::Detections, SUBJECT_DETECTIONS),
            view(StreamKind::Rejected, "pcb.rejected.>"),
            view(StreamKind::Training, "pcb.train.progress"),
            view(StreamKind::Training, SUBJECT_MODEL_EVENTS),
            view(StreamKind::Shadow, SUBJECT_SHADOW_DETECTIONS),
        ],
        outputs: &[SUBJECT_RAW, SUBJECT_MODEL_EVENTS],
        // An upload too large for one message stores its files, as the ingester does; a
        // label revision names the board's files by reference, never storing them again.
        buckets: &[
            (KV_MODELS, Access::Write),
            (OBJECTS_MODELS, Access::Read),
            (OBJECTS_IMAGE_FILES, Access::Write),
        ],
    },
    StageDecl {
        stage: StageName::Trainer,
        name: "trainer",
        summary: "one rank of a training job over a snapshot of the shards",
        process: ProcessKind::Job,
        inputs: &[view(StreamKind::Shards, "pcb.shards.*")],
        outputs: &[
            SUBJECT_TRAIN_PROGRESS,
            SUBJECT_TRAIN_CANDIDATES,
            "pcb.rejected.trainer",
        ],
        buckets: &[
            (OBJECTS_CANDIDATES, Access::Write),
            (OBJECTS_IMAGE_FILES, Access::Read),
        ],
    },
];

/// The launcher's housekeeping (`pcb up`, as the `keeper` identity): what it may trim and
/// read, and the bucket it cleans. Not a stage: it runs inside the launcher, but with an
/// identity of its own, derived from this declaration like a stage's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeeperDecl {
    /// Streams whose `make_room` setting it may apply: it purges their oldest messages that
    /// every durable reading them has acknowledged (and reads those durables' floors).
    pub trims: &'static [StreamKind],
    /// Streams whose records may name a file in a bucket ([`crate::ObjectRef`]): read to
    /// find the files still named.
    pub file_refs: &'static [StreamKind],
    /// The buckets whose files no record names any more it deletes.
    pub buckets: &'static [(&'static str, Access)],
}

/// The housekeeping's declaration. `file_refs` holds every stream with a subject whose
/// message can carry `image_ref`/`template_ref` (raw, encoded and shard records; dead
/// letters name a record by sequence, never a file): checked by a test.
pub const KEEPER: KeeperDecl = KeeperDecl {
    trims: &[StreamKind::Images, StreamKind::Shards, StreamKind::Rejected],
    file_refs: &[StreamKind::Images, StreamKind::Shards],
    buckets: &[(OBJECTS_IMAGE_FILES, Access::Delete)],
};

/// The schemas whose messages can name a file in the image files' bucket.
pub const FILE_REF_SCHEMAS: [&str; 3] = [
    "pcb.images.raw/v1",
    "pcb.images.encoded/v1",
    "pcb.shards/v1",
];

/// One subject of the pipeline: its stream and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectDecl {
    /// The subject as the README writes it (`<k>` and `<stage>` stand for a token).
    pub display: &'static str,
    /// Its pattern (with `*` for those tokens).
    pub pattern: &'static str,
    /// The stream holding it (None: delivered live on core NATS, stored nowhere; what it
    /// says is in a stored subject too).
    pub stream: Option<StreamKind>,
    /// Its message's schema header.
    pub schema: &'static str,
}

/// Every subject, in the README's order.
pub const SUBJECTS: [SubjectDecl; 10] = [
    SubjectDecl {
        display: "pcb.images.raw",
        pattern: SUBJECT_RAW,
        stream: Some(StreamKind::Images),
        schema: "pcb.images.raw/v1",
    },
    SubjectDecl {
        display: "pcb.images.encoded",
        pattern: SUBJECT_ENCODED,
        stream: Some(StreamKind::Images),
        schema: "pcb.images.encoded/v1",
    },
    SubjectDecl {
        display: "pcb.shards.<k>",
        pattern: "pcb.shards.*",
        stream: Some(StreamKind::Shards),
        schema: "pcb.shards/v1",
    },
    SubjectDecl {
        display: "pcb.rejected.<stage>",
        pattern: "pcb.rejected.*",
        stream: Some(StreamKind::Rejected),
        schema: "pcb.rejected/v1",
    },
    SubjectDecl {
        display: "pcb.train.progress",
        pattern: SUBJECT_TRAIN_PROGRESS,
        stream: Some(StreamKind::Training),
        schema: "pcb.train.progress/v1",
    },
    SubjectDecl {
        display: "pcb.train.candidates",
        pattern: SUBJECT_TRAIN_CANDIDATES,
        stream: Some(StreamKind::Training),
        schema: "pcb.train.candidates/v1",
    },
    SubjectDecl {
        display: "pcb.detections",
        pattern: SUBJECT_DETECTIONS,
        stream: Some(StreamKind::Detections),
        schema: "pcb.detections/v1",
    },
    SubjectDecl {
        display: "pcb.models.events",
        pattern: SUBJECT_MODEL_EVENTS,
        stream: Some(StreamKind::Training),
        schema: "pcb.models.events/v1",
    },
    // A shadow version's answers: stored apart from pcb.detections, so line-side readers
    // and whatever counts the live answers never see them.
    SubjectDecl {
        display: "pcb.shadow.detections",
        pattern: SUBJECT_SHADOW_DETECTIONS,
        stream: Some(StreamKind::Shadow),
        schema: "pcb.detections/v1",
    },
    // For PLCs over MQTT: at most once, live. The record of each answer is pcb.detections.
    SubjectDecl {
        display: "pcb.verdicts.<line>",
        pattern: "pcb.verdicts.*",
        stream: None,
        schema: "pcb.verdicts/v1",
    },
];

/// Whether two NATS patterns can match a common subject.
pub fn patterns_overlap(a: &str, b: &str) -> bool {
    let (pa, pb): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    let mut i = 0;
    loop {
        match (pa.get(i), pb.get(i)) {
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (Some(&"*"), Some(_)) | (Some(_), Some(&"*")) => {}
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
        i += 1;
    }
}

/// The stages that publish on `pattern`, and those that read it.
pub fn writers_and_readers(pattern: &str) -> (Vec<StageName>, Vec<StageName>) {
    let writers = STAGES
        .iter()
        .filter(|s| s.outputs.iter().any(|o| patterns_overlap(o, pattern)))
        .map(|s| s.stage)
        .collect();
    let readers = STAGES
        .iter()
        .filter(|s| s.inputs.iter().any(|i| patterns_overlap(i.filter, pattern)))
        .map(|s| s.stage)
        .collect();
    (writers, readers)
}

/// The README's subjects table (markdown), derived from [`SUBJECTS`] and [`STAGES`].
pub fn subjects_markdown() -> String {
    let list = |v: Vec<StageName>| v.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ");
    let mut out = String::from(
        "| subject | stream | schema | published by | read by |\n|---|---|---|---|---|\n",
    );
    for s in SUBJECTS {
        let (w, r) = writers_and_readers(s.pattern);
        out.push_str(&format!(
            "| `{}` | {} | `{}` | {} | {} |\n",
            s.display,
            s.stream
                .map_or("— (live only)".to_string(), |k| format!("`{}`", k.name())),
            s.schema,
            list(w),
            list(r)
        ));
    }
    out
}

/// The README's stages table (markdown): each stage's durable consumer and buckets.
pub fn stages_markdown() -> String {
    let mut out = String::from(
        "| stage | runs as | consumes (durable) | publishes | buckets |\n|---|---|---|---|---|\n",
    );
    for s in STAGES {
        let inputs = s
            .inputs
            .iter()
            .map(|i| {
                let how = match i.mode {
                    ReadMode::Durable(d) => format!("durable `{}`", d.name),
                    ReadMode::View => "view".to_string(),
                };
                let opt = if i.optional { ", optional" } else { "" };
                format!("`{}` ({how}{opt})", i.filter)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let outputs = s
            .outputs
            .iter()
            .map(|o| format!("`{o}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let buckets = s
            .buckets
            .iter()
            .map(|(b, a)| {
                let a = match a {
                    Access::Read => "read",
                    Access::Write => "write",
                    Access::Delete => "delete",
                };
                format!("`{b}` ({a})")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let runs = match s.process {
            ProcessKind::Service => "service",
            ProcessKind::Job => "job rank",
        };
        out.push_str(&format!(
            "| `{}` | {runs} | {} | {} | {} |\n",
            s.name,
            if inputs.is_empty() {
                "—".into()
            } else {
                inputs
            },
            outputs,
            if buckets.is_empty() {
                "—".into()
            } else {
                buckets
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_indexed_by_their_enum_and_spelled_once() {
        for (i, s) in STAGES.iter().enumerate() {
            assert_eq!(s.stage as usize, i, "{}", s.name);
            assert_eq!(s.name.parse::<StageName>(), Ok(s.stage));
            assert_eq!(s.stage.to_string(), s.name);
        }
        let err = "routr".parse::<StageName>().unwrap_err();
        assert!(err.to_string().contains("routr"), "{err}");
    }

    #[test]
    fn every_stage_dead_letters_on_its_own_subject_only() {
        for s in STAGES {
            let rejected: Vec<_> = s
                .outputs
                .iter()
                .filter(|o| o.starts_with("pcb.rejected."))
                .collect();
            // The viewer refuses uploads over HTTP, so it has no dead letters of its own.
            if s.stage != StageName::Viewer {
                assert_eq!(rejected, [&rejected_subject(s.name).as_str()], "{}", s.name);
            }
        }
    }

    #[test]
    fn every_input_and_output_is_held_by_its_declared_stream() {
        for s in STAGES {
            for i in s.inputs {
                assert!(
                    i.stream
                        .subjects()
                        .iter()
                        .any(|p| patterns_overlap(p, i.filter)),
                    "{}: {} not in {}",
                    s.name,
                    i.filter,
                    i.stream.name()
                );
            }
            for o in s.outputs {
                let decl = SUBJECTS.iter().find(|d| patterns_overlap(d.pattern, o));
                let stored = StreamKind::ALL
                    .iter()
                    .any(|k| k.subjects().iter().any(|p| patterns_overlap(p, o)));
                // Declared live-only, or else stored by a stream.
                match decl.and_then(|d| d.stream) {
                    None if decl.is_some() => assert!(!stored, "{}: {o} is stored", s.name),
                    _ => assert!(stored, "{}: {o} is in no stream", s.name),
                }
            }
        }
        for sub in SUBJECTS {
            if let Some(stream) = sub.stream {
                assert!(stream
                    .subjects()
                    .iter()
                    .any(|p| patterns_overlap(p, sub.pattern)));
            }
        }
    }

    #[test]
    fn durables_are_unique() {
        let mut names: Vec<&str> = STAGES
            .iter()
            .flat_map(|s| s.inputs.iter())
            .filter_map(|i| match i.mode {
                ReadMode::Durable(d) => Some(d.name),
                ReadMode::View => None,
            })
            .collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    #[test]
    fn every_stream_holding_file_references_is_read_by_the_keeper() {
        for sub in SUBJECTS {
            if let Some(stream) = sub.stream {
                let refs = FILE_REF_SCHEMAS.contains(&sub.schema);
                assert!(
                    !refs || KEEPER.file_refs.contains(&stream),
                    "{} carries file references but the keeper does not read {}",
                    sub.display,
                    stream.name()
                );
            }
        }
        // And every schema named there is one the pipeline has.
        for schema in FILE_REF_SCHEMAS {
            assert!(SUBJECTS.iter().any(|s| s.schema == schema), "{schema}");
        }
    }

    #[test]
    fn matching_follows_nats_wildcards() {
        assert!(subject_matches("pcb.shards.*", "pcb.shards.3"));
        assert!(!subject_matches("pcb.shards.*", "pcb.shards.3.x"));
        assert!(subject_matches("pcb.train.>", "pcb.train.progress"));
        assert!(!subject_matches("pcb.detections", "pcb.detections.x"));
        assert!(StageName::Router.decl().publishes("pcb.shards.7"));
        assert!(!StageName::Router.decl().publishes("pcb.detections"));
        assert!(patterns_overlap("pcb.images.*", "pcb.images.raw"));
        assert!(!patterns_overlap("pcb.images.raw", "pcb.images.encoded"));
    }

    #[test]
    fn the_tables_name_every_subject_with_its_writers() {
        let t = subjects_markdown();
        assert!(
            t.contains("| `pcb.images.encoded` | `PCB_IMAGES` | `pcb.images.encoded/v1` | encoder | router, detector, viewer |"),
            "{t}"
        );
        assert!(
            t.contains("| `pcb.shards.<k>` | `PCB_SHARDS` | `pcb.shards/v1` | router | trainer |"),
            "{t}"
        );
        let s = stages_markdown();
        assert!(s.contains("durable `encoder`"), "{s}");
    }
}
