//! One rank's share of a dataset snapshot, read from the `pcb.shards.<k>` streams: the
//! encoded records up to the snapshot's last sequence, kept compressed until a batch
//! needs them.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use base64::Engine;
use futures::StreamExt;
use pcb_datasets::ClassMap;
use pcb_schemas::{decode, shard_subject, DeadLetter, ShardRecord, Split, SCHEMA_HEADER};
use pcb_vision::data::{box_rows, decode_grey, Board};

/// Why the snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The stream is not there or cannot be queried.
    #[error("reading stream {stream}: {message}")]
    Stream {
        /// The stream.
        stream: String,
        /// What JetStream said.
        message: String,
    },
    /// A consumer over one shard could not be created or read.
    #[error("reading {subject}: {message}")]
    Consumer {
        /// The shard subject.
        subject: String,
        /// What JetStream said.
        message: String,
    },
    /// Records were routed with another shard count than the job reads.
    #[error("{subject} holds a record routed for {found} shards, but the job reads {configured} (set trainer.shard_count to the router's shard_count)")]
    ShardCount {
        /// Where it was found.
        subject: String,
        /// The record's shard count.
        found: u32,
        /// The job's.
        configured: u32,
    },
    /// A board's files could not be read from the image files' bucket (the server failed).
    #[error("reading the files of {subject} sequence {seq}: {message}")]
    Files {
        /// The shard subject.
        subject: String,
        /// The record's stream sequence.
        seq: u64,
        /// What went wrong.
        message: String,
    },
}

/// One labelled board, still encoded.
#[derive(Debug, Clone)]
pub struct Item {
    /// The image id (sha256 of its bytes).
    pub image_id: String,
    /// Stream sequence of its shard record.
    pub seq: u64,
    /// Image file bytes.
    pub image: Vec<u8>,
    /// Template file bytes, when the board has one.
    pub template: Option<Vec<u8>>,
    /// Boxes with their class ids.
    pub boxes: Vec<([f32; 4], i64)>,
}

impl Item {
    /// Decodes the image (and template) into a board the model takes.
    pub fn board(&self) -> Result<Board, pcb_vision::VisionError> {
        let image = decode_grey(&self.image, &self.image_id)?;
        let template = self
            .template
            .as_deref()
            .map(|t| decode_grey(t, &format!("template of {}", self.image_id)))
            .transpose()?;
        Ok(Board::new(image, template, &self.boxes))
    }
}

/// What one rank read.
#[derive(Debug, Default)]
pub struct RankData {
    /// Training boards of this rank's shards.
    pub train: Vec<Item>,
    /// Validation boards of every shard (read by rank 0 only).
    pub val: Vec<Item>,
    /// Records skipped as unreadable, as dead letters to publish.
    pub rejected: Vec<DeadLetter>,
    /// Records left out because a later record of the same image (a relabel) replaces them.
    pub superseded: usize,
}

/// Keeps one record per image, the latest (highest sequence: a relabel, a correction, labels
/// that came late), in stream order; returns how many were left out.
pub fn keep_latest(items: &mut Vec<Item>) -> usize {
    let mut latest: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for it in items.iter() {
        let seq = latest.entry(it.image_id.clone()).or_insert(it.seq);
        *seq = (*seq).max(it.seq);
    }
    let before = items.len();
    items.retain(|it| latest.get(&it.image_id) == Some(&it.seq));
    before - items.len()
}

/// The shards rank `rank` of `world` trains on: k with k mod world == rank.
pub fn shards_of(rank: usize, world: usize, shard_count: u32) -> Vec<u32> {
    (0..shard_count)
        .filter(|k| *k as usize % world.max(1) == rank)
        .collect()
}

/// The stream's last sequence now: the snapshot rank 0 fixes at job start.
pub async fn last_sequence(js: &jetstream::Context, stream: &str) -> Result<u64, DataError> {
    let err = |e: &dyn std::fmt::Display| DataError::Stream {
        stream: stream.into(),
        message: e.to_string(),
    };
    let mut s = js.get_stream(stream).await.map_err(|e| err(&e))?;
    let info = s.info().await.map_err(|e| err(&e))?;
    Ok(info.state.last_sequence)
}

/// Reads the records of `shards` with a sequence up to `last_seq`; training records of
/// those shards, and validation records when `with_val` (from `val_shards`).
pub async fn read_snapshot(
    js: &jetstream::Context,
    stream: &str,
    train_shards: &[u32],
    val_shards: &[u32],
    shard_count: u32,
    last_seq: u64,
) -> Result<RankData, DataError> {
    let mut out = RankData::default();
    // Boards too large for one message name their files in the image files' bucket.
    let files = pcb_common::LazyFiles::new(js.clone());
    let stream_handle = js.get_stream(stream).await.map_err(|e| DataError::Stream {
        stream: stream.into(),
        message: e.to_string(),
    })?;
    let mut wanted: BTreeMap<u32, (bool, bool)> = BTreeMap::new();
    for k in train_shards {
        wanted.entry(*k).or_default().0 = true;
    }
    for k in val_shards {
        wanted.entry(*k).or_default().1 = true;
    }
    for (k, (train, val)) in wanted {
        let subject = shard_subject(k);
        read_subject(
            &stream_handle,
            &subject,
            shard_count,
            last_seq,
            &files,
            |split| match split {
                Split::Train => train,
                Split::Val => val,
            },
            &mut out,
        )
        .await?;
    }
    out.superseded = keep_latest(&mut out.train) + keep_latest(&mut out.val);
    Ok(out)
}

async fn read_subject(
    stream: &jetstream::stream::Stream,
    subject: &str,
    shard_count: u32,
    last_seq: u64,
    files: &pcb_common::LazyFiles,
    want: impl Fn(Split) -> bool,
    out: &mut RankData,
) -> Result<(), DataError> {
    if last_seq == 0 {
        return Ok(());
    }
    let err = |e: &dyn std::fmt::Display| DataError::Consumer {
        subject: subject.into(),
        message: e.to_string(),
    };
    // An ephemeral consumer without acks: reading the snapshot changes nothing on the
    // server, so any number of jobs can read the same shards.
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: subject.into(),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| err(&e))?;
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(256)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .map_err(|e| err(&e))?;
        let mut got = 0usize;
        let mut done = false;
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| err(&e))?;
            got += 1;
            let info = msg.info().map_err(|e| err(&e))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > last_seq {
                done = true;
                break;
            }
            if pending == 0 || seq == last_seq {
                done = true;
            }
            let header = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(SCHEMA_HEADER))
                .map(|v| v.as_str().to_string());
            match decode::<ShardRecord>(&msg.payload, header.as_deref()) {
                Ok(rec) => {
                    if rec.shard_count != shard_count {
                        return Err(DataError::ShardCount {
                            subject: subject.into(),
                            found: rec.shard_count,
                            configured: shard_count,
                        });
                    }
                    if !want(rec.split) {
                        continue;
                    }
                    let r = &rec.record;
                    let fetched = async {
                        Ok::<_, pcb_common::FilesError>((
                            files.get_opt(r.image_ref.as_ref()).await?,
                            files.get_opt(r.template_ref.as_ref()).await?,
                        ))
                    }
                    .await;
                    let fetched = match fetched {
                        Ok(f) => f,
                        // A file gone or not the one named: the record is left out with its
                        // dead letter, as an unreadable one; a server that failed stops the
                        // read (the job is run again).
                        Err(e) => match (e.to_string(), e.outcome("reading the board's files")) {
                            (_, pcb_common::Outcome::Reject(rej)) => {
                                out.rejected.push(dead_letter(
                                    subject,
                                    seq,
                                    Some(r.image_id.clone()),
                                    r.source.clone(),
                                    &rej.reason_code,
                                    rej.reason,
                                ));
                                continue;
                            }
                            (message, _) => {
                                return Err(DataError::Files {
                                    subject: subject.into(),
                                    seq,
                                    message,
                                })
                            }
                        },
                    };
                    match item_of(&rec, seq, fetched) {
                        Ok(item) => match rec.split {
                            Split::Train => out.train.push(item),
                            Split::Val => out.val.push(item),
                        },
                        Err(reason) => out.rejected.push(dead_letter(
                            subject,
                            seq,
                            Some(rec.record.image_id.clone()),
                            rec.record.source.clone(),
                            "bad-record",
                            reason,
                        )),
                    }
                }
                Err(e) => out.rejected.push(dead_letter(
                    subject,
                    seq,
                    None,
                    String::new(),
                    "undecodable",
                    e.to_string(),
                )),
            }
            if done {
                break;
            }
        }
        if done || got == 0 {
            return Ok(());
        }
    }
}

/// The item of a shard record; `fetched` holds the files it names by reference (read from
/// the image files' bucket), the others are inline.
fn item_of(
    rec: &ShardRecord,
    seq: u64,
    fetched: (Option<Vec<u8>>, Option<Vec<u8>>),
) -> Result<Item, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let r = &rec.record;
    let image = match fetched.0 {
        Some(bytes) => bytes,
        None => b64
            .decode(&r.image_b64)
            .map_err(|e| format!("image_b64 is not base64: {e}"))?,
    };
    let template = match fetched.1 {
        Some(bytes) => Some(bytes),
        None => r
            .template_b64
            .as_deref()
            .map(|t| b64.decode(t))
            .transpose()
            .map_err(|e| format!("template_b64 is not base64: {e}"))?,
    };
    let mut boxes = box_rows(
        r.labels
            .as_ref()
            .ok_or_else(|| "a shard record without labels".to_string())?,
    );
    // The boxes an operator deleted from the model's answer train as hard negatives.
    if let Some(rev) = &r.revision {
        boxes.extend(
            rev.deleted
                .iter()
                .map(|b| ([b.x1, b.y1, b.x2, b.y2], pcb_vision::model::HARD_NEGATIVE)),
        );
    }
    Ok(Item {
        image_id: r.image_id.clone(),
        seq,
        image,
        template,
        boxes,
    })
}

fn dead_letter(
    subject: &str,
    seq: u64,
    image_id: Option<String>,
    source: String,
    code: &str,
    reason: String,
) -> DeadLetter {
    DeadLetter {
        stage: crate::STAGE.name().into(),
        reason_code: code.into(),
        reason,
        image_id,
        source,
        moved_to: None,
        subject: Some(subject.into()),
        stream_seq: Some(seq),
        at_ms: pcb_common::now_ms(),
    }
}

/// Boxes per class name among `items`; the hard negatives (boxes operators deleted) as
/// `hard-negative`.
pub fn boxes_per_class(items: &[Item]) -> BTreeMap<String, u64> {
    let classes = ClassMap::default();
    let mut out = BTreeMap::new();
    for it in items {
        for (_, c) in &it.boxes {
            if *c == pcb_vision::model::HARD_NEGATIVE {
                *out.entry("hard-negative".to_string()).or_insert(0) += 1;
                continue;
            }
            let name = u16::try_from(*c)
                .ok()
                .and_then(|id| classes.name_of(id))
                .map_or_else(|| format!("class-{c}"), str::to_string);
            *out.entry(name).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_dealt_round_robin() {
        assert_eq!(shards_of(0, 2, 8), [0, 2, 4, 6]);
        assert_eq!(shards_of(1, 2, 8), [1, 3, 5, 7]);
        assert_eq!(shards_of(2, 3, 8), [2, 5]);
        // More ranks than shards: the extra ranks hold nothing and still take part.
        assert!(shards_of(3, 4, 2).is_empty());
        let all: Vec<u32> = (0..3).flat_map(|r| shards_of(r, 3, 8)).collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn a_relabelled_image_trains_with_its_latest_labels_only() {
        let item = |id: &str, seq: u64, class: i64| Item {
            image_id: id.into(),
            seq,
            image: vec![],
            template: None,
            boxes: vec![([0., 0., 1., 1.], class)],
        };
        let mut items = vec![
            item("a", 1, 1),
            item("b", 2, 1),
            item("a", 5, 3),
            item("c", 7, 2),
        ];
        assert_eq!(keep_latest(&mut items), 1);
        let kept: Vec<(&str, u64, i64)> = items
            .iter()
            .map(|i| (i.image_id.as_str(), i.seq, i.boxes[0].1))
            .collect();
        assert_eq!(kept, [("b", 2, 1), ("a", 5, 3), ("c", 7, 2)]);
    }

    #[test]
    fn boxes_are_counted_by_class_name() {
        let item = |classes: &[i64]| Item {
            image_id: "x".into(),
            seq: 1,
            image: vec![],
            template: None,
            boxes: classes.iter().map(|c| ([0., 0., 1., 1.], *c)).collect(),
        };
        let counts = boxes_per_class(&[item(&[1, 2, 2]), item(&[6, 9, 0])]);
        assert_eq!(counts["hard-negative"], 1);
        assert_eq!(counts["open"], 1);
        assert_eq!(counts["short"], 2);
        assert_eq!(counts["pin-hole"], 1);
        assert_eq!(counts["class-9"], 1);
    }
}
