//! The shard router stage: `pcb.images.encoded` → labelled images get a stable split and
//! shard and go to `pcb.shards.<k>`; unlabelled images are not routed.

use std::path::Path;
use std::time::Duration;

use pcb_common::ack::{ConsumerSpec, Delivery};
use pcb_common::{
    load_config, validate_common, ConfigError, LogConfig, Metrics, MetricsConfig, NatsConfig,
    Outcome, Problems, Rejection, Shutdown, Topology,
};
use pcb_schemas::{
    decode, shard_subject, EncodedImage, ShardRecord, Split, DEFAULT_SHARD_COUNT, STREAM_IMAGES,
    SUBJECT_ENCODED,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The stage's name: its durable, its dead-letter subject and its metrics label.
pub const STAGE: &str = "router";

/// The router's config file.
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
    /// The router's own settings.
    pub router: RouterSettings,
}

/// Settings of the router.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSettings {
    /// Durable consumer name, shared by every replica.
    pub durable: String,
    /// Number of training shards N (`pcb.shards.0` .. `pcb.shards.<N-1>`).
    pub shard_count: u32,
    /// Share of labelled images held out for validation when the dataset gives no split.
    pub val_fraction: f64,
    /// Use the split the dataset's own lists give (DeepPCB `trainval.txt`/`test.txt`).
    pub use_dataset_split: bool,
    /// Messages handled at once.
    pub concurrency: usize,
    /// Redeliver a message not acked within this many seconds.
    pub ack_wait_secs: u64,
    /// Deliveries of a failing message before it becomes a dead letter.
    pub max_deliver: i64,
    /// Delay before a transient failure is retried, in milliseconds.
    pub retry_delay_ms: u64,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            durable: STAGE.into(),
            shard_count: DEFAULT_SHARD_COUNT,
            val_fraction: 0.2,
            use_dataset_split: true,
            concurrency: 32,
            ack_wait_secs: 30,
            max_deliver: 5,
            retry_delay_ms: 2000,
        }
    }
}

/// How labelled images are assigned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assigner {
    /// Number of shards.
    pub shard_count: u32,
    /// Share held out for validation.
    pub val_fraction: f64,
    /// Whether the dataset's own split wins.
    pub use_dataset_split: bool,
}

impl Assigner {
    /// The split and shard of an image: a pure function of its id (and the dataset's split
    /// when it gives one), so every run and every replica agrees.
    pub fn assign(&self, image_id: &str, split_hint: Option<Split>) -> (Split, u32) {
        let shard = (hash64("pcb-shard", image_id) % u64::from(self.shard_count)) as u32;
        let split = match split_hint {
            Some(s) if self.use_dataset_split => s,
            _ => {
                // Top 53 bits as a uniform number in [0, 1).
                let u = (hash64("pcb-split", image_id) >> 11) as f64 / (1u64 << 53) as f64;
                if u < self.val_fraction {
                    Split::Val
                } else {
                    Split::Train
                }
            }
        };
        (split, shard)
    }
}

/// A stable 64-bit hash; independent keys keep split and shard uncorrelated.
fn hash64(domain: &str, id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(domain.as_bytes())
        .chain_update(b":")
        .chain_update(id.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
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
    /// Split and shard assignment.
    pub assigner: Assigner,
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
        let r = &self.router;
        p.check(r.durable.trim().is_empty(), "router.durable", "is empty");
        p.check(
            r.shard_count == 0 || r.shard_count > 1024,
            "router.shard_count",
            "must be between 1 and 1024",
        );
        p.check(
            !(0.0..1.0).contains(&r.val_fraction),
            "router.val_fraction",
            "must be at least 0 and below 1",
        );
        p.check(
            r.concurrency == 0,
            "router.concurrency",
            "must be at least 1",
        );
        p.check(
            r.ack_wait_secs == 0,
            "router.ack_wait_secs",
            "must be at least 1",
        );
        p.check(
            r.max_deliver < 1,
            "router.max_deliver",
            "must be at least 1",
        );
        p.into_result()?;
        Ok(Config {
            assigner: Assigner {
                shard_count: r.shard_count,
                val_fraction: r.val_fraction,
                use_dataset_split: r.use_dataset_split,
            },
            consumer: ConsumerSpec {
                stage: STAGE.into(),
                stream: STREAM_IMAGES.into(),
                durable: r.durable.clone(),
                filter_subject: SUBJECT_ENCODED.into(),
                ack_wait: Duration::from_secs(r.ack_wait_secs),
                max_deliver: r.max_deliver,
                retry_delay: Duration::from_millis(r.retry_delay_ms),
                concurrency: r.concurrency,
            },
            nats: self.nats,
            streams: self.streams,
            metrics: self.metrics,
            log: self.log,
        })
    }
}

/// The shard record of an encoded image, or `None` when it carries no labels.
pub fn route(rec: EncodedImage, a: &Assigner, now_ms: i64) -> Option<ShardRecord> {
    rec.labels.as_ref()?;
    let (split, shard) = a.assign(&rec.image_id, rec.split_hint);
    Some(ShardRecord {
        split,
        shard,
        shard_count: a.shard_count,
        routed_at_ms: now_ms,
        record: rec,
    })
}

/// Why the stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Start-up failed.
    #[error("starting the router: {0}")]
    Start(#[from] pcb_common::stage::StartError),
    /// The consumer stopped.
    #[error("router consumer: {0}")]
    Consume(#[from] pcb_common::ack::ConsumeError),
}

async fn handle(js: async_nats::jetstream::Context, a: Assigner, d: Delivery) -> Outcome {
    let rec: EncodedImage = match decode(&d.payload, d.schema()) {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Reject(Rejection::new(
                "bad-record",
                format!(
                    "message #{} on {} is not an encoded image record: {e}",
                    d.stream_seq, d.subject
                ),
            ))
        }
    };
    let Some(shard) = route(rec, &a, pcb_common::now_ms()) else {
        return Outcome::Skipped;
    };
    match pcb_common::publish(&js, shard_subject(shard.shard), &shard).await {
        Ok(_) => Outcome::Done,
        Err(e) => Outcome::Retry(e.to_string()),
    }
}

/// Runs the router until `shutdown`.
pub async fn run(
    config: Config,
    client: async_nats::Client,
    shutdown: Shutdown,
) -> Result<(), RouterError> {
    let metrics = Metrics::new(STAGE);
    let js = pcb_common::stage::prepare(
        &client,
        &config.streams,
        &metrics,
        &config.metrics,
        &shutdown,
    )
    .await?;
    let a = config.assigner;
    let js2 = js.clone();
    pcb_common::run_consumer(js, config.consumer, metrics, shutdown, move |d| {
        handle(js2.clone(), a, d)
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcb_schemas::image_id;

    fn assigner() -> Assigner {
        Assigner {
            shard_count: 8,
            val_fraction: 0.2,
            use_dataset_split: true,
        }
    }

    fn encoded(id: &str, labels: bool, hint: Option<Split>) -> EncodedImage {
        EncodedImage {
            image_id: id.into(),
            board_id: "b".into(),
            line_id: "l".into(),
            source: "s".into(),
            captured_at_ms: 0,
            encoded_at_ms: 0,
            image_b64: String::new(),
            width: 1,
            height: 1,
            channels: 1,
            format: "png".into(),
            sha256: id.into(),
            labels: labels.then(Vec::new),
            label_format: None,
            template_b64: None,
            split_hint: hint,
        }
    }

    #[test]
    fn assignment_is_stable_and_spread() {
        let a = assigner();
        let ids: Vec<String> = (0..4000)
            .map(|i| image_id(format!("board{i}").as_bytes()))
            .collect();
        let mut per_shard = [0usize; 8];
        let mut val = 0;
        for id in &ids {
            let (s, k) = a.assign(id, None);
            assert_eq!(a.assign(id, None), (s, k), "not stable");
            per_shard[k as usize] += 1;
            val += usize::from(s == Split::Val);
        }
        for n in per_shard {
            assert!((400..600).contains(&n), "uneven shards {per_shard:?}");
        }
        assert!((700..900).contains(&val), "val share {val} of 4000");
        // A fixed id keeps its place across releases: a changed hash would reshuffle
        // every user's shards.
        assert_eq!(
            a.assign(&image_id(b"board0"), None),
            a.assign(&ids[0], None)
        );
        // sha256("abc"): domain-separated sha256 → shard 2, val (pinned on first release).
        let golden = a.assign(
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            None,
        );
        assert_eq!(golden, (Split::Val, 2));
    }

    #[test]
    fn dataset_split_wins_when_enabled() {
        let a = assigner();
        let id = image_id(b"x");
        assert_eq!(a.assign(&id, Some(Split::Val)).0, Split::Val);
        assert_eq!(a.assign(&id, Some(Split::Train)).0, Split::Train);
        let b = Assigner {
            use_dataset_split: false,
            val_fraction: 0.0,
            ..a
        };
        assert_eq!(b.assign(&id, Some(Split::Val)).0, Split::Train);
    }

    #[test]
    fn unlabelled_images_are_not_routed() {
        assert!(route(encoded("a", false, None), &assigner(), 0).is_none());
        let r = route(encoded("a", true, None), &assigner(), 5).expect("routed");
        assert_eq!(r.shard_count, 8);
        assert!(r.shard < 8);
        assert_eq!(r.routed_at_ms, 5);
    }

    #[test]
    fn config_problems_are_reported_together() {
        let mut f = FileConfig::default();
        f.router.shard_count = 0;
        f.router.val_fraction = 1.5;
        let text = f.validate().unwrap_err().to_string();
        assert!(
            text.contains("router.shard_count") && text.contains("router.val_fraction"),
            "{text}"
        );
    }
}
