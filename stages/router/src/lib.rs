//! The shard router stage: `pcb.images.encoded` → labelled images get a stable split and
//! shard and go to `pcb.shards.<k>`; unlabelled images are not routed.

use pcb_common::ack::Delivery;
use pcb_common::{Context, NoArgs, Outcome, Problems, Stage, Validate};
use pcb_schemas::{shard_subject, EncodedImage, ShardRecord, Split, DEFAULT_SHARD_COUNT};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pcb_common::declare_stage!(
    /// The router stage.
    Router = Router
);

/// Settings of the router (the `[router]` section, beside its consumer keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSettings {
    /// Number of training shards N (`pcb.shards.0` .. `pcb.shards.<N-1>`).
    pub shard_count: u32,
    /// Share of labelled images held out for validation when the dataset gives no split.
    pub val_fraction: f64,
    /// Use the split the dataset's own lists give (DeepPCB `trainval.txt`/`test.txt`).
    pub use_dataset_split: bool,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            shard_count: DEFAULT_SHARD_COUNT,
            val_fraction: 0.2,
            use_dataset_split: true,
        }
    }
}

impl Stage for Router {
    type Settings = RouterSettings;
    type Error = RouterError;
    type Args = NoArgs;

    async fn run(config: Config, ctx: Context) -> Result<(), RouterError> {
        let a = config.config;
        pcb_common::stage::consume(&config, ctx, |js| move |d| handle(js.clone(), a, d)).await?;
        Ok(())
    }
}

impl Validate for RouterSettings {
    type Config = Assigner;

    fn validate(self, p: &mut Problems) -> Option<Assigner> {
        p.between("router.shard_count", self.shard_count, 1, 1024);
        p.check(
            !(0.0..1.0).contains(&self.val_fraction),
            "router.val_fraction",
            "must be at least 0 and below 1",
        );
        Some(Assigner {
            shard_count: self.shard_count,
            val_fraction: self.val_fraction,
            use_dataset_split: self.use_dataset_split,
        })
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
    /// It could not start, or its consumer stopped.
    #[error("router: {0}")]
    Serve(#[from] pcb_common::stage::ServeError),
}

async fn handle(js: async_nats::jetstream::Context, a: Assigner, d: Delivery) -> Outcome {
    let rec: EncodedImage = match d.decode() {
        Ok(r) => r,
        Err(r) => return Outcome::Reject(r),
    };
    let Some(shard) = route(rec, &a, pcb_common::now_ms()) else {
        return Outcome::Skipped;
    };
    match pcb_common::publish(&js, shard_subject(shard.shard), &shard).await {
        Ok(_) => Outcome::Done,
        Err(e) => e.outcome("publishing the shard record"),
    }
}

#[cfg(test)]
mod props {
    //! Property tests of the routing: a pure function of the image id (the same id gets
    //! the same split and shard, whatever else happens), inside the shard range, and
    //! uniform over shards and splits.

    use super::*;
    use proptest::prelude::*;

    fn assigner(shard_count: u32) -> Assigner {
        Assigner {
            shard_count,
            val_fraction: 0.2,
            use_dataset_split: true,
        }
    }

    proptest! {
        #[test]
        fn an_image_id_always_gets_the_same_split_and_shard(id in "[0-9a-f]{64}", shards in 1u32..64) {
            let a = assigner(shards);
            let first = a.assign(&id, None);
            prop_assert_eq!(first, a.assign(&id, None));
            prop_assert!(first.1 < shards);
            // The dataset's split wins when asked, and never moves the shard.
            let (split, shard) = a.assign(&id, Some(Split::Val));
            prop_assert_eq!((split, shard), (Split::Val, first.1));
        }
    }

    #[test]
    fn shards_and_splits_are_uniform() {
        let a = assigner(8);
        let mut per_shard = [0u32; 8];
        let mut val = 0u32;
        let n = 16_000u32;
        for i in 0..n {
            let id = hex::encode(Sha256::digest(i.to_le_bytes()));
            let (split, shard) = a.assign(&id, None);
            per_shard[shard as usize] += 1;
            val += u32::from(split == Split::Val);
        }
        // 2000 expected per shard; 10% is over 4 standard deviations.
        for (k, c) in per_shard.iter().enumerate() {
            assert!((1800..=2200).contains(c), "shard {k}: {c} of {n}");
        }
        // 3200 expected in val (0.2); 10% again.
        assert!((2880..=3520).contains(&val), "val: {val} of {n}");
    }
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
            revision: None,
            image_ref: None,
            template_ref: None,
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
        f.stage.settings.shard_count = 0;
        f.stage.settings.val_fraction = 1.5;
        assert_eq!(
            f.validate().unwrap_err().keys(),
            ["router.shard_count", "router.val_fraction"]
        );
    }
}
