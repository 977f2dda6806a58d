//! Stream definitions from the pipeline file and their idempotent provisioning on JetStream.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use pcb_schemas::StreamKind;
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
    pub storage: String,
}

impl StreamSettings {
    fn with(max_age_days: u64, max_bytes_gib: i64, dup_secs: u64) -> Self {
        StreamSettings {
            max_age_secs: max_age_days * 86_400,
            max_bytes: max_bytes_gib << 30,
            max_msgs: -1,
            replicas: 1,
            duplicate_window_secs: dup_secs,
            storage: "file".into(),
        }
    }
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings::with(7, 4, 120)
    }
}

/// The five streams of the pipeline and the shard count.
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
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            // A day of dedup: the same board dropped again the same day is stored once.
            images: StreamSettings::with(7, 4, 86_400),
            // Training data is kept until removed by hand.
            shards: StreamSettings::with(0, 8, 86_400),
            detections: StreamSettings::with(7, 2, 3_600),
            rejected: StreamSettings::with(30, 1, 86_400),
            training: StreamSettings::with(30, 1, 3_600),
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
        }
    }

    /// Adds every problem (keys prefixed with `section`) to `p`.
    pub fn validate(&self, section: &str, p: &mut Problems) {
        for kind in StreamKind::ALL {
            let s = self.settings(kind);
            let key = |k: &str| format!("{section}.{}.{k}", kind.key());
            p.check(
                !matches!(s.storage.as_str(), "file" | "memory"),
                &key("storage"),
                format!("must be \"file\" or \"memory\", not {:?}", s.storage),
            );
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
                s.max_age_secs != 0 && s.duplicate_window_secs > s.max_age_secs,
                &key("duplicate_window_secs"),
                "cannot exceed max_age_secs",
            );
        }
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
            storage: if s.storage == "memory" {
                stream::StorageType::Memory
            } else {
                stream::StorageType::File
            },
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
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
    /// Reading a stream's state failed.
    #[error("reading stream {stream}: {message}")]
    Info {
        /// Stream name.
        stream: String,
        /// What the server said.
        message: String,
    },
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

/// Creates every stream that is missing and updates those whose settings differ;
/// running it twice changes nothing.
pub async fn apply_topology(
    js: &jetstream::Context,
    topo: &Topology,
) -> Result<Vec<(&'static str, Provisioned)>, TopologyError> {
    let mut done = Vec::new();
    for kind in StreamKind::ALL {
        let want = topo.stream_config(kind);
        let name = kind.name();
        let outcome = match js.get_stream(name).await {
            Ok(mut existing) => {
                let have = existing
                    .info()
                    .await
                    .map_err(|e| TopologyError::Info {
                        stream: name.into(),
                        message: e.to_string(),
                    })?
                    .config
                    .clone();
                if same_settings(&have, &want) {
                    Provisioned::Unchanged
                } else {
                    js.update_stream(want)
                        .await
                        .map_err(|source| TopologyError::Update {
                            stream: name.into(),
                            source,
                        })?;
                    Provisioned::Updated
                }
            }
            // "Not found" is worded differently across server versions: try to create and
            // let the server's answer decide.
            Err(e) => {
                tracing::debug!(stream = name, error = %e, "stream lookup failed, creating");
                create(js, name, want).await?
            }
        };
        tracing::debug!(stream = name, ?outcome, "stream provisioned");
        done.push((name, outcome));
    }
    Ok(done)
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
    fn bad_settings_are_all_reported() {
        let mut t = Topology::default();
        t.images.storage = "tape".into();
        t.shards.replicas = 0;
        t.rejected.max_bytes = 0;
        let mut p = Problems::default();
        t.validate("streams", &mut p);
        let text = p.to_string();
        assert!(text.contains("streams.images.storage"), "{text}");
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
