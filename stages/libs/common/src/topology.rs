//! The streams' limits from the pipeline file, and the one admin step that creates what the
//! topology declares (`pcb init`, `pcb up`): streams, buckets and durable consumers. Stages
//! never create or resize any of them; at start they check that what they need exists
//! ([`require`]) and name what is missing.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use pcb_schemas::topology::{BucketKind, StageName, BUCKETS};
use pcb_schemas::{StreamKind, OBJECTS_IMAGE_FILES};
use serde::{Deserialize, Serialize};

use crate::settings::Problems;

/// Retention, limits and replicas of one stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Drop messages older than this many seconds (0: keep forever).
    pub max_age_secs: u64,
    /// Cap on the stream's size in bytes; the oldest messages go first (-1: no cap).
    pub max_bytes: i64,
    /// Cap on the number of messages (-1: no cap).
    pub max_msgs: i64,
    /// Replicas in a clustered JetStream (1 on a single server).
    pub replicas: usize,
    /// Window in seconds within which a repeated `Nats-Msg-Id` is stored once.
    pub duplicate_window_secs: u64,
    /// `file` or `memory`.
    pub storage: Storage,
    /// When full: `new` refuses new messages (back-pressure: the stages hold their input,
    /// the ingester keeps files in the inbox, until it has room), `old` deletes its oldest.
    pub discard: Discard,
    /// Past 80% of a limit, `pcb up` removes the oldest messages that every durable
    /// consumer reading them has acknowledged, down to 70% (never one not yet processed).
    pub make_room: bool,
}

/// What a full stream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discard {
    /// Refuses new messages: nothing stored is ever deleted for room.
    New,
    /// Deletes its oldest messages to make room.
    Old,
}

/// Where a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk: survives a restart.
    File,
    /// In memory: fast, lost on restart.
    Memory,
}

impl StreamSettings {
    fn with(max_age_days: u64, max_bytes_gib: i64, dup_secs: u64, discard: Discard) -> Self {
        StreamSettings {
            max_age_secs: max_age_days * 86_400,
            max_bytes: max_bytes_gib << 30,
            max_msgs: -1,
            replicas: 1,
            duplicate_window_secs: dup_secs,
            storage: Storage::File,
            discard,
            make_room: false,
        }
    }
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings::with(7, 4, 120, Discard::New)
    }
}

/// The six streams of the pipeline and the shard count.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    /// `PCB_IMAGES`: `pcb.images.raw` and `pcb.images.encoded`.
    pub images: StreamSettings,
    /// `PCB_SHARDS`: `pcb.shards.<k>`, the training data.
    pub shards: StreamSettings,
    /// `PCB_DETECTIONS`: `pcb.detections`.
    pub detections: StreamSettings,
    /// `PCB_REJECTED`: `pcb.rejected.<stage>`.
    pub rejected: StreamSettings,
    /// `PCB_TRAINING`: `pcb.train.progress` and `pcb.train.candidates`.
    pub training: StreamSettings,
    /// `PCB_SHADOW`: `pcb.shadow.detections`, the answers of shadow versions.
    pub shadow: StreamSettings,
    /// The model registry's key-value and object buckets.
    pub buckets: BucketSettings,
    /// `pcb_image_files`: the files of boards too large for one message.
    pub image_files: ImageFilesSettings,
}

/// The image files' object bucket (`pcb_image_files`): its size, and the housekeeping
/// that deletes the files no record names any more.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImageFilesSettings {
    /// Cap on the bucket's size in bytes (-1: no cap). The server reserves it on disk like
    /// a stream's `max_bytes`; full, the bucket takes no new file and the ingester leaves
    /// large boards in the inbox until there is room. `pcb init` resizes an existing
    /// bucket, never below what it holds.
    pub max_bytes: i64,
    /// Whether `pcb up` deletes the files no record in `PCB_IMAGES` or `PCB_SHARDS` names
    /// any more.
    pub cleanup: bool,
    /// A file is deleted only once it has gone unchanged this many seconds (at least 60):
    /// the ingester stores a board's files before it publishes the record naming them.
    pub cleanup_grace_secs: u64,
    /// Seconds between two looks for such files; each look reads both streams when the
    /// bucket holds a file older than the grace.
    pub cleanup_every_secs: u64,
}

impl Default for ImageFilesSettings {
    fn default() -> Self {
        ImageFilesSettings {
            max_bytes: BUCKETS
                .iter()
                .find(|b| b.name == OBJECTS_IMAGE_FILES)
                .map_or(-1, |b| b.max_bytes),
            cleanup: true,
            cleanup_grace_secs: 600,
            cleanup_every_secs: 300,
        }
    }
}

/// The least `cleanup_grace_secs`: far longer than the ingester takes between storing a
/// board's files and publishing its record.
pub const MIN_CLEANUP_GRACE_SECS: u64 = 60;

/// Settings of the pipeline's buckets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BucketSettings {
    /// Replicas in a clustered JetStream (1 on a single server); set when a bucket is
    /// created.
    pub replicas: usize,
}

impl Default for BucketSettings {
    fn default() -> Self {
        BucketSettings { replicas: 1 }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            // A day of dedup: the same board dropped again the same day is stored once.
            // Full, it pushes back: a board not yet encoded, routed and detected is never
            // deleted for room.
            // Boards every stage has processed make room for new ones (`pcb up`).
            images: StreamSettings {
                make_room: true,
                ..StreamSettings::with(7, 4, 86_400, Discard::New)
            },
            // Training data is kept until removed by hand: no age limit, and full, it
            // pushes back.
            shards: StreamSettings::with(0, 8, 86_400, Discard::New),
            // Outputs read as they come (line-side systems, the viewer): the oldest go.
            detections: StreamSettings::with(7, 2, 3_600, Discard::Old),
            // Dead letters are records of what was refused: full, it pushes back.
            rejected: StreamSettings::with(30, 1, 86_400, Discard::New),
            // Progress, candidates and model events: the oldest go.
            training: StreamSettings::with(30, 1, 3_600, Discard::Old),
            // A shadow period's answers, read by the Models page: the oldest go.
            shadow: StreamSettings::with(7, 1, 3_600, Discard::Old),
            buckets: BucketSettings::default(),
            image_files: ImageFilesSettings::default(),
        }
    }
}

impl Topology {
    /// The settings of `kind`.
    pub fn settings(&self, kind: StreamKind) -> &StreamSettings {
        match kind {
            StreamKind::Images => &self.images,
            StreamKind::Shards => &self.shards,
            StreamKind::Detections => &self.detections,
            StreamKind::Rejected => &self.rejected,
            StreamKind::Training => &self.training,
            StreamKind::Shadow => &self.shadow,
        }
    }

    /// Every stream and bucket left at one replica gets `nodes` (a cluster of that many
    /// nodes); settings above one are kept.
    pub fn replicated(mut self, nodes: usize) -> Topology {
        for kind in StreamKind::ALL {
            let s = match kind {
                StreamKind::Images => &mut self.images,
                StreamKind::Shards => &mut self.shards,
                StreamKind::Detections => &mut self.detections,
                StreamKind::Rejected => &mut self.rejected,
                StreamKind::Training => &mut self.training,
                StreamKind::Shadow => &mut self.shadow,
            };
            if s.replicas == 1 {
                s.replicas = nodes;
            }
        }
        if self.buckets.replicas == 1 {
            self.buckets.replicas = nodes;
        }
        self
    }

    /// The most replicas any stream or bucket asks for.
    pub fn max_replicas(&self) -> usize {
        StreamKind::ALL
            .into_iter()
            .map(|k| self.settings(k).replicas)
            .chain([self.buckets.replicas])
            .max()
            .unwrap_or(1)
    }

    /// The cap of bucket `name`: the pipeline file's for the image files, else the
    /// topology's.
    pub fn bucket_max_bytes(&self, name: &str) -> i64 {
        if name == OBJECTS_IMAGE_FILES {
            return self.image_files.max_bytes;
        }
        BUCKETS
            .iter()
            .find(|b| b.name == name)
            .map_or(-1, |b| b.max_bytes)
    }

    /// Adds every problem (keys prefixed with `section`) to `p`.
    pub fn validate(&self, section: &str, p: &mut Problems) {
        p.check(
            self.buckets.replicas == 0 || self.buckets.replicas > 5,
            &format!("{section}.buckets.replicas"),
            "must be between 1 and 5",
        );
        let f = &self.image_files;
        p.check(
            f.max_bytes == 0 || f.max_bytes < -1,
            &format!("{section}.image_files.max_bytes"),
            "must be positive or -1",
        );
        p.check(
            f.cleanup_grace_secs < MIN_CLEANUP_GRACE_SECS,
            &format!("{section}.image_files.cleanup_grace_secs"),
            format!("must be at least {MIN_CLEANUP_GRACE_SECS} (a board's files are stored before its record is published)"),
        );
        p.check(
            f.cleanup_every_secs == 0 || f.cleanup_every_secs > 86_400,
            &format!("{section}.image_files.cleanup_every_secs"),
            "must be between 1 and 86400",
        );
        for kind in StreamKind::ALL {
            let s = self.settings(kind);
            let key = |k: &str| format!("{section}.{}.{k}", kind.key());
            p.check(
                s.replicas == 0 || s.replicas > 5,
                &key("replicas"),
                "must be between 1 and 5",
            );
            p.check(
                s.max_bytes == 0 || s.max_bytes < -1,
                &key("max_bytes"),
                "must be positive or -1",
            );
            p.check(
                s.max_msgs == 0 || s.max_msgs < -1,
                &key("max_msgs"),
                "must be positive or -1",
            );
            p.check(
                s.make_room && s.discard == Discard::Old,
                &key("make_room"),
                "only for discard = \"new\" (a stream that discards its oldest makes its own room)",
            );
            p.check(
                s.make_room && !pcb_schemas::topology::KEEPER.trims.contains(&kind),
                &key("make_room"),
                "only for the streams the housekeeping may trim (PCB_IMAGES, PCB_SHARDS, PCB_REJECTED)",
            );
            p.check(
                s.max_age_secs != 0 && s.duplicate_window_secs > s.max_age_secs,
                &key("duplicate_window_secs"),
                "cannot exceed max_age_secs",
            );
        }
    }

    /// Bytes of disk the server reserves for these streams and the capped buckets: the sum
    /// of the `max_bytes` of the file-stored ones. A server whose JetStream may use less
    /// (`max_file_store`, by default three quarters of the disk's free space at start)
    /// refuses to create them.
    pub fn reserved_file_bytes(&self) -> u64 {
        StreamKind::ALL
            .into_iter()
            .map(|k| self.settings(k))
            .filter(|s| s.storage == Storage::File && s.max_bytes > 0)
            .map(|s| s.max_bytes as u64)
            // A capped bucket (file-stored) reserves its cap as a stream does.
            .chain(
                BUCKETS
                    .iter()
                    .map(|b| self.bucket_max_bytes(b.name))
                    .filter(|&m| m > 0)
                    .map(|m| m as u64),
            )
            .sum()
    }

    /// The JetStream config of `kind`.
    pub fn stream_config(&self, kind: StreamKind) -> stream::Config {
        let s = self.settings(kind);
        stream::Config {
            name: kind.name().to_string(),
            subjects: kind.subjects(),
            max_age: Duration::from_secs(s.max_age_secs),
            max_bytes: s.max_bytes,
            max_messages: s.max_msgs,
            num_replicas: s.replicas,
            duplicate_window: Duration::from_secs(s.duplicate_window_secs),
            storage: if s.storage == Storage::Memory {
                stream::StorageType::Memory
            } else {
                stream::StorageType::File
            },
            retention: stream::RetentionPolicy::Limits,
            discard: match s.discard {
                Discard::New => stream::DiscardPolicy::New,
                Discard::Old => stream::DiscardPolicy::Old,
            },
            ..Default::default()
        }
    }
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Creating a stream failed.
    #[error("creating stream {stream}: {source}")]
    Create {
        /// Stream name.
        stream: String,
        /// Underlying error.
        source: async_nats::jetstream::context::CreateStreamError,
    },
    /// Updating a stream to the pipeline file's settings failed.
    #[error("updating stream {stream} to the configured settings: {source}")]
    Update {
        /// Stream name.
        stream: String,
        /// Underlying error.
        source: async_nats::jetstream::context::UpdateStreamError,
    },
    /// Something a stage needs does not exist.
    #[error("{what} {name} does not exist, and the {stage} stage does not create it: run `pcb init --nats-url URL` (or `pcb up`) first")]
    Missing {
        /// `stream`, `key-value bucket`, `object bucket` or `consumer`.
        what: &'static str,
        /// Its name.
        name: String,
        /// The stage that needs it.
        stage: &'static str,
    },
    /// Creating a bucket failed.
    #[error("creating bucket {bucket}: {message}")]
    Bucket {
        /// Bucket name.
        bucket: &'static str,
        /// What the server said.
        message: String,
    },
    /// Creating or updating a durable consumer failed.
    #[error("creating consumer {durable} on {stream}: {message}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// Durable name.
        durable: String,
        /// What the server said.
        message: String,
    },
    /// The pipeline file's limit is below what the stream holds.
    #[error("stream {stream} holds {holds} ({what}), more than the pipeline file's {what} = {want}: lowering it would delete stored messages, so it is left as it is; raise the setting, or remove messages by hand (`nats stream purge`) first")]
    Shrink {
        /// Stream name.
        stream: String,
        /// `max_bytes` or `max_msgs`.
        what: &'static str,
        /// What it holds now.
        holds: u64,
        /// The setting.
        want: i64,
    },
    /// The server cannot reserve the stream's `max_bytes`.
    #[error("the server has no room for stream {stream}: the streams' max_bytes add up to {:.1} GiB of file storage, more than its JetStream may use (max_file_store; by default three quarters of the disk's free space when it started); lower [streams.<name>] max_bytes in the pipeline file, or give the server more storage", *reserved as f64 / (1u64 << 30) as f64)]
    NoRoom {
        /// Stream name.
        stream: String,
        /// What all the streams reserve, in bytes.
        reserved: u64,
    },
    /// Reading a stream's state failed.
    #[error("reading stream {stream}: {message}")]
    Info {
        /// Stream name.
        stream: String,
        /// What the server said.
        message: String,
    },
}

impl TopologyError {
    fn missing(what: &'static str, name: &str, stage: StageName) -> TopologyError {
        TopologyError::Missing {
            what,
            name: name.to_string(),
            stage: stage.name(),
        }
    }
}

/// What provisioning did to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioned {
    /// It did not exist and was created.
    Created,
    /// It existed with other settings and was updated.
    Updated,
    /// It already matched.
    Unchanged,
}

/// [`provision`] with the topology's defaults: every stream with its default limits,
/// every bucket, every durable consumer (what `pcb init` does with no pipeline file).
pub async fn provision_defaults(js: &jetstream::Context) -> Result<Provisioning, TopologyError> {
    provision(js, &Topology::default(), &default_consumers()).await
}

/// The one admin step: creates every stream that is missing and updates those whose
/// settings differ from the pipeline file's, creates the buckets, and creates (or updates)
/// the durable consumer of each spec in `consumers`. Running it twice changes nothing.
pub async fn provision(
    js: &jetstream::Context,
    topo: &Topology,
    consumers: &[crate::ConsumerSpec],
) -> Result<Provisioning, TopologyError> {
    let streams = apply_streams(js, topo).await?;
    let mut buckets = Vec::new();
    for b in BUCKETS {
        buckets.push((b.name, create_bucket(js, b, topo).await?));
    }
    let mut made = Vec::new();
    for spec in consumers {
        made.push((spec.durable.clone(), put_consumer(js, spec).await?));
    }
    Ok(Provisioning {
        streams,
        buckets,
        consumers: made,
    })
}

/// What [`provision`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioning {
    /// Each stream and what happened to it.
    pub streams: Vec<(&'static str, Provisioned)>,
    /// Each bucket and what happened to it.
    pub buckets: Vec<(&'static str, Provisioned)>,
    /// Each durable consumer and what happened to it.
    pub consumers: Vec<(String, Provisioned)>,
}

async fn create_bucket(
    js: &jetstream::Context,
    b: pcb_schemas::topology::BucketDecl,
    topo: &Topology,
) -> Result<Provisioned, TopologyError> {
    use async_nats::jetstream::{kv, object_store};
    let replicas = topo.buckets.replicas;
    let max_bytes = topo.bucket_max_bytes(b.name);
    let fail = |e: &dyn std::fmt::Display| TopologyError::Bucket {
        bucket: b.name,
        message: e.to_string(),
    };
    match b.kind {
        BucketKind::KeyValue => {
            if js.get_key_value(b.name).await.is_ok() {
                return Ok(Provisioned::Unchanged);
            }
            js.create_key_value(kv::Config {
                bucket: b.name.into(),
                description: b.description.into(),
                history: b.history,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&e))?;
        }
        BucketKind::Object => {
            if js.get_object_store(b.name).await.is_ok() {
                return resize_bucket(js, b.name, max_bytes, topo).await;
            }
            js.create_object_store(object_store::Config {
                bucket: b.name.into(),
                description: Some(b.description.into()),
                max_bytes,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&e))?;
        }
    }
    Ok(Provisioned::Created)
}

/// Brings an existing object bucket's cap to `max_bytes`: its stream (`OBJ_<bucket>`) is
/// updated like a stream of the pipeline, and never below what it holds (that would make
/// the server delete stored chunks, breaking files).
async fn resize_bucket(
    js: &jetstream::Context,
    bucket: &'static str,
    max_bytes: i64,
    topo: &Topology,
) -> Result<Provisioned, TopologyError> {
    let name = format!("OBJ_{bucket}");
    let info_err = |e: &dyn std::fmt::Display| TopologyError::Info {
        stream: name.clone(),
        message: e.to_string(),
    };
    let mut stream = js.get_stream(&name).await.map_err(|e| info_err(&e))?;
    let info = stream.info().await.map_err(|e| info_err(&e))?.clone();
    // The server keeps "no cap" as -1 whatever was asked.
    let cap = |n: i64| if n > 0 { n } else { -1 };
    if cap(info.config.max_bytes) == cap(max_bytes) {
        return Ok(Provisioned::Unchanged);
    }
    if max_bytes > 0 && (max_bytes as u64) < info.state.bytes {
        return Err(TopologyError::Shrink {
            stream: name,
            what: "max_bytes",
            holds: info.state.bytes,
            want: max_bytes,
        });
    }
    let mut want = info.config;
    want.max_bytes = cap(max_bytes);
    js.update_stream(want).await.map_err(|source| {
        no_room(&source, &name, topo).unwrap_or(TopologyError::Update {
            stream: name.clone(),
            source,
        })
    })?;
    Ok(Provisioned::Updated)
}

/// The server-side config of a durable consumer.
pub fn consumer_config(spec: &crate::ConsumerSpec) -> pull::Config {
    pull::Config {
        durable_name: Some(spec.durable.clone()),
        filter_subject: spec.filter_subject.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        // The stage enforces its `max_deliver` itself (a `retries-exhausted` dead letter at
        // the last delivery). The server's own limit would drop a message for good when
        // that dead letter could not be stored: unlimited here, it comes back instead.
        max_deliver: -1,
        max_ack_pending: (spec.concurrency as i64 * 4).max(256),
        ..Default::default()
    }
}

/// Every durable consumer the topology declares, with the settings common to all stages
/// (tests and benchmarks; `pcb init` and `pcb up` use the pipeline file's settings, and
/// each stage applies its own when it starts).
pub fn default_consumers() -> Vec<crate::ConsumerSpec> {
    use pcb_schemas::topology::{ReadMode, STAGES};
    STAGES
        .iter()
        .flat_map(|s| s.inputs.iter().map(move |i| (s.stage, i)))
        .filter_map(|(stage, input)| match input.mode {
            ReadMode::Durable(d) => Some(
                crate::ConsumerSettings {
                    concurrency: 1,
                    ..crate::ConsumerSettings::from(&d)
                }
                .spec_for(stage, input),
            ),
            ReadMode::View => None,
        })
        .collect()
}

/// Creates the durable consumer of `spec`, or updates it when its settings differ.
pub async fn put_consumer(
    js: &jetstream::Context,
    spec: &crate::ConsumerSpec,
) -> Result<Provisioned, TopologyError> {
    let fail = |e: &dyn std::fmt::Display| TopologyError::Consumer {
        stream: spec.stream.clone(),
        durable: spec.durable.clone(),
        message: e.to_string(),
    };
    let stream = js.get_stream(&spec.stream).await.map_err(|e| fail(&e))?;
    let want = consumer_config(spec);
    let outcome = match stream.consumer_info(&spec.durable).await {
        Ok(info) => {
            let have = &info.config;
            // The server keeps "no limit" as -1 whatever was asked.
            let limit = |n: i64| if n > 0 { n } else { -1 };
            if have.ack_wait == want.ack_wait
                && limit(have.max_deliver) == limit(want.max_deliver)
                && have.filter_subject == want.filter_subject
                && have.max_ack_pending == want.max_ack_pending
            {
                return Ok(Provisioned::Unchanged);
            }
            Provisioned::Updated
        }
        Err(_) => Provisioned::Created,
    };
    stream.create_consumer(want).await.map_err(|e| fail(&e))?;
    Ok(outcome)
}

/// Checks that every stream and bucket `stage` reads or writes exists; the error names
/// the first one missing and how to create it.
pub async fn require(js: &jetstream::Context, stage: StageName) -> Result<(), TopologyError> {
    let decl = stage.decl();
    let mut streams: Vec<StreamKind> = decl.inputs.iter().map(|i| i.stream).collect();
    for o in decl.outputs {
        streams.extend(StreamKind::ALL.into_iter().filter(|k| {
            k.subjects()
                .iter()
                .any(|p| pcb_schemas::topology::subject_matches(p, &o.replace(['*', '>'], "x")))
        }));
    }
    streams.sort_by_key(|k| k.name());
    streams.dedup();
    for kind in streams {
        if js.get_stream(kind.name()).await.is_err() {
            return Err(TopologyError::missing("stream", kind.name(), stage));
        }
    }
    for (bucket, _) in decl.buckets {
        let kv = BUCKETS
            .iter()
            .any(|b| b.name == *bucket && b.kind == BucketKind::KeyValue);
        let found = if kv {
            js.get_key_value(*bucket).await.is_ok()
        } else {
            js.get_object_store(*bucket).await.is_ok()
        };
        if !found {
            let what = if kv {
                "key-value bucket"
            } else {
                "object bucket"
            };
            return Err(TopologyError::missing(what, bucket, stage));
        }
    }
    Ok(())
}

/// Opens the durable consumer of `spec`: it must exist (made by the admin step); when its
/// ack settings differ from the stage's configured ones, the stage's win, so a stage's
/// config stays the one place to tune its own consumer.
pub async fn open_consumer(
    js: &jetstream::Context,
    stage: StageName,
    spec: &crate::ConsumerSpec,
) -> Result<jetstream::consumer::Consumer<pull::Config>, TopologyError> {
    let stream = js
        .get_stream(&spec.stream)
        .await
        .map_err(|_| TopologyError::missing("stream", &spec.stream, stage))?;
    if stream.consumer_info(&spec.durable).await.is_err() {
        return Err(TopologyError::missing(
            "consumer",
            &format!("{} on {}", spec.durable, spec.stream),
            stage,
        ));
    }
    if put_consumer(js, spec).await? == Provisioned::Updated {
        tracing::info!(durable = %spec.durable, "consumer settings updated to this stage's config");
    }
    stream
        .get_consumer(&spec.durable)
        .await
        .map_err(|e| TopologyError::Consumer {
            stream: spec.stream.clone(),
            durable: spec.durable.clone(),
            message: e.to_string(),
        })
}

/// Creates every stream that is missing and updates those whose settings differ;
/// running it twice changes nothing.
pub async fn apply_streams(
    js: &jetstream::Context,
    topo: &Topology,
) -> Result<Vec<(&'static str, Provisioned)>, TopologyError> {
    let mut done = Vec::new();
    for kind in StreamKind::ALL {
        let want = topo.stream_config(kind);
        let name = kind.name();
        let outcome = match js.get_stream(name).await {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|e| TopologyError::Info {
                        stream: name.into(),
                        message: e.to_string(),
                    })?
                    .clone();
                // A limit below what the stream holds would make the server delete stored
                // messages to fit: refused, never done on the way.
                for (what, limit, holds) in [
                    ("max_bytes", want.max_bytes, info.state.bytes),
                    ("max_msgs", want.max_messages, info.state.messages),
                ] {
                    if limit > 0 && (limit as u64) < holds {
                        return Err(TopologyError::Shrink {
                            stream: name.into(),
                            what,
                            holds,
                            want: limit,
                        });
                    }
                }
                let have = info.config;
                if same_settings(&have, &want) {
                    Provisioned::Unchanged
                } else {
                    js.update_stream(want).await.map_err(|source| {
                        no_room(&source, name, topo).unwrap_or(TopologyError::Update {
                            stream: name.into(),
                            source,
                        })
                    })?;
                    Provisioned::Updated
                }
            }
            // "Not found" is worded differently across server versions: try to create and
            // let the server's answer decide.
            Err(e) => {
                tracing::debug!(stream = name, error = %e, "stream lookup failed, creating");
                create(js, name, want).await.map_err(|e| match e {
                    TopologyError::Create { source, .. } => {
                        no_room(&source, name, topo).unwrap_or(TopologyError::Create {
                            stream: name.into(),
                            source,
                        })
                    }
                    e => e,
                })?
            }
        };
        tracing::debug!(stream = name, ?outcome, "stream provisioned");
        done.push((name, outcome));
    }
    Ok(done)
}

/// The server's "insufficient storage resources" as the limits that caused it.
fn no_room(
    e: &async_nats::jetstream::context::CreateStreamError,
    stream: &str,
    topo: &Topology,
) -> Option<TopologyError> {
    use async_nats::jetstream::{context::CreateStreamErrorKind, ErrorCode};
    match e.kind() {
        CreateStreamErrorKind::JetStream(j)
            if j.error_code() == ErrorCode::STORAGE_RESOURCES_EXCEEDED =>
        {
            Some(TopologyError::NoRoom {
                stream: stream.into(),
                reserved: topo.reserved_file_bytes(),
            })
        }
        _ => None,
    }
}

async fn create(
    js: &jetstream::Context,
    name: &str,
    want: stream::Config,
) -> Result<Provisioned, TopologyError> {
    js.create_stream(want)
        .await
        .map_err(|source| TopologyError::Create {
            stream: name.into(),
            source,
        })?;
    Ok(Provisioned::Created)
}

fn same_settings(have: &stream::Config, want: &stream::Config) -> bool {
    let mut a = have.subjects.clone();
    let mut b = want.subjects.clone();
    a.sort();
    b.sort();
    a == b
        && have.max_age == want.max_age
        && have.max_bytes == want.max_bytes
        && have.max_messages == want.max_messages
        && have.num_replicas == want.num_replicas
        && have.duplicate_window == want.duplicate_window
        && have.storage == want.storage
        && have.discard == want.discard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let mut p = Problems::default();
        Topology::default().validate("streams", &mut p);
        assert!(p.0.is_empty(), "{p}");
    }

    #[test]
    fn the_reservation_counts_capped_file_streams_and_buckets_only() {
        let mut t = Topology::default();
        // 4 + 8 + 2 + 1 + 1 + 1 GiB of streams, 8 GiB of image files.
        assert_eq!(t.reserved_file_bytes(), 25 << 30);
        t.shards.max_bytes = -1;
        t.detections.storage = Storage::Memory;
        assert_eq!(t.reserved_file_bytes(), 15 << 30);
    }

    #[test]
    fn the_image_files_cap_is_a_setting_counted_in_the_reservation() {
        let mut t = Topology::default();
        assert_eq!(t.bucket_max_bytes(OBJECTS_IMAGE_FILES), 8 << 30);
        t.image_files.max_bytes = 2 << 30;
        assert_eq!(t.bucket_max_bytes(OBJECTS_IMAGE_FILES), 2 << 30);
        assert_eq!(t.reserved_file_bytes(), 19 << 30);
        t.image_files.max_bytes = -1;
        assert_eq!(t.reserved_file_bytes(), 17 << 30);
        let parsed: Topology =
            toml::from_str("[image_files]\nmax_bytes = 1073741824\ncleanup_grace_secs = 900\n")
                .expect("parses");
        assert_eq!(parsed.image_files.max_bytes, 1 << 30);
        assert_eq!(parsed.image_files.cleanup_grace_secs, 900);
        assert!(parsed.image_files.cleanup);
        let e = toml::from_str::<Topology>("[image_files]\nmax_byte = 1\n").unwrap_err();
        assert!(e.to_string().contains("max_byte"), "{e}");
    }

    #[test]
    fn bad_image_file_settings_are_all_reported() {
        let mut t = Topology::default();
        t.image_files.max_bytes = 0;
        t.image_files.cleanup_grace_secs = 5;
        t.image_files.cleanup_every_secs = 0;
        t.detections.discard = Discard::New;
        t.detections.make_room = true;
        let mut p = Problems::default();
        t.validate("streams", &mut p);
        let text = p.to_string();
        for key in [
            "streams.image_files.max_bytes",
            "streams.image_files.cleanup_grace_secs",
            "streams.image_files.cleanup_every_secs",
            "streams.detections.make_room",
        ] {
            assert!(text.contains(key), "{key}: {text}");
        }
    }

    #[test]
    fn bad_settings_are_all_reported() {
        let mut t = Topology::default();
        t.images.duplicate_window_secs = t.images.max_age_secs + 1;
        t.shards.replicas = 0;
        t.rejected.max_bytes = 0;
        let mut p = Problems::default();
        t.validate("streams", &mut p);
        let text = p.to_string();
        assert!(
            text.contains("streams.images.duplicate_window_secs"),
            "{text}"
        );
        // A storage other than file or memory does not even parse.
        let e = toml::from_str::<StreamSettings>("storage = \"tape\"").unwrap_err();
        assert!(e.to_string().contains("tape"), "{e}");
        assert!(text.contains("streams.shards.replicas"), "{text}");
        assert!(text.contains("streams.rejected.max_bytes"), "{text}");
    }

    #[test]
    fn stream_config_carries_settings() {
        let t = Topology::default();
        let c = t.stream_config(StreamKind::Shards);
        assert_eq!(c.name, "PCB_SHARDS");
        assert_eq!(c.subjects, vec!["pcb.shards.*".to_string()]);
        assert_eq!(c.max_age, Duration::ZERO);
        assert_eq!(c.duplicate_window, Duration::from_secs(86_400));
        assert!(same_settings(&c, &t.stream_config(StreamKind::Shards)));
        assert!(!same_settings(&c, &t.stream_config(StreamKind::Images)));
    }
}
