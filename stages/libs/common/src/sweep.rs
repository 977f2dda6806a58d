//! The image files' housekeeping: deletes the files in `pcb_image_files` that no record
//! names any more, so the bucket does not fill with the files of boards whose records were
//! removed (by `make_room`, by age, by hand). `pcb up` runs [`sweep_image_files`] every
//! `[streams.image_files] cleanup_every_secs`, as the `keeper` identity.
//!
//! A file is deleted only when all of these hold:
//! - it has gone unchanged for the grace period: the ingester stores a board's files
//!   before it publishes the record naming them, and refreshes a file it finds already
//!   there ([`crate::ImageFiles::put`]), so a file about to be named is never old;
//! - no record in the streams that can name files (`KEEPER.file_refs`: `PCB_IMAGES`,
//!   `PCB_SHARDS`) names it, read to the end (a read that stalls deletes nothing). The
//!   streams are read once: a [`SweepMemory`] keeps, from one sweep to the next, where each
//!   stream was read to and which records named which file, so a sweep reads only the
//!   records stored since the last (a whole stream of labelled boards' shard records would
//!   otherwise be read every few minutes). A remembered record counts while it is still in
//!   its stream (below the first sequence it is gone; inside, it is looked up);
//! - its metadata is still the one listed (a conditional publish): a file refreshed or
//!   stored again while the streams were read is left alone.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use pcb_schemas::topology::KEEPER;
use pcb_schemas::FileRefs;

use crate::objects::{FileMeta, FilesError, ImageFiles};

/// What one sweep found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Files in the bucket (not deleted).
    pub files: usize,
    /// Those unchanged for the grace period.
    pub old: usize,
    /// Records read to find the files still named.
    pub records_read: u64,
    /// Files deleted: old and named by no record.
    pub deleted: usize,
    /// Their bytes.
    pub deleted_bytes: u64,
}

/// Why a sweep stopped without deleting (the next one tries again).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The bucket could not be listed or a file deleted.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// A stream that can name files could not be read to its end.
    #[error(transparent)]
    Scan(#[from] crate::scan::ScanError),
    /// A stream that can name files could not be opened.
    #[error("opening stream {stream}: {message}")]
    Stream {
        /// The stream.
        stream: &'static str,
        /// What the server said.
        message: String,
    },
}

/// What the sweeps have read so far: per stream, the last sequence read and the records
/// (by sequence) naming each file. Start with `default()`; a sweep that fails leaves it as
/// it was.
#[derive(Debug, Clone, Default)]
pub struct SweepMemory {
    streams: HashMap<&'static str, StreamMemory>,
}

#[derive(Debug, Clone, Default)]
struct StreamMemory {
    /// The last sequence read (0: none).
    read_to: u64,
    /// File name → the sequences of the records naming it, ascending.
    named: HashMap<String, Vec<u64>>,
}

impl StreamMemory {
    /// Forgets the records below `first_seq` (removed from the front: by age, by
    /// `make_room`, by a purge).
    fn forget_before(&mut self, first_seq: u64) {
        self.named.retain(|_, seqs| {
            seqs.retain(|s| *s >= first_seq);
            !seqs.is_empty()
        });
    }
}

/// Deletes every file of the image files' bucket that has gone unchanged for `grace` and
/// that no record in `KEEPER.file_refs` names, reading only the records stored since the
/// sweep that left `memory`.
pub async fn sweep_image_files(
    js: &jetstream::Context,
    grace: Duration,
    memory: &mut SweepMemory,
) -> Result<Swept, SweepError> {
    let files = ImageFiles::open(js).await?;
    let listed = files.list().await?;
    let now = time::OffsetDateTime::now_utc();
    let live: Vec<FileMeta> = listed.into_iter().filter(|m| !m.info.deleted).collect();
    let mut report = Swept {
        files: live.len(),
        ..Swept::default()
    };
    let mut old: HashMap<String, FileMeta> = live
        .into_iter()
        .filter(|m| now - m.stored_at >= grace)
        .map(|m| (m.info.name.clone(), m))
        .collect();
    report.old = old.len();
    // Read on a copy: a sweep that fails leaves the memory as it was.
    let mut next = memory.clone();
    for kind in KEEPER.file_refs {
        let name = kind.name();
        let opened = |e: &dyn std::fmt::Display| SweepError::Stream {
            stream: name,
            message: e.to_string(),
        };
        let mut stream = js.get_stream(name).await.map_err(|e| opened(&e))?;
        let state = stream.info().await.map_err(|e| opened(&e))?.state.clone();
        let mem = next.streams.entry(name).or_default();
        if state.last_sequence < mem.read_to {
            // The stream was made anew: what was remembered of it is void.
            *mem = StreamMemory::default();
        }
        mem.forget_before(state.first_sequence);
        let start = (mem.read_to + 1).max(state.first_sequence);
        if start <= state.last_sequence {
            let policy = DeliverPolicy::ByStartSequence {
                start_sequence: start,
            };
            let mut last = mem.read_to;
            report.records_read += crate::scan::read_stream(&stream, ">", policy, |msg, seq, _| {
                last = seq;
                match FileRefs::decode(&msg.payload) {
                    Ok(refs) => {
                        for r in refs {
                            let seqs = mem.named.entry(r.name.clone()).or_default();
                            if seqs.last() != Some(&seq) {
                                seqs.push(seq);
                            }
                        }
                    }
                    // Not a record that names files (no reader could take it either).
                    Err(e) => {
                        tracing::debug!(stream = name, seq, error = %e, "not a record")
                    }
                }
                true
            })
            .await?;
            mem.read_to = last;
        }
        // An old file stays while one of the records naming it is still in the stream
        // (one removed from inside it, by hand, is looked up).
        let candidates: Vec<String> = old.keys().cloned().collect();
        for file in candidates {
            let Some(seqs) = mem.named.get(&file) else {
                continue;
            };
            let mut still = Vec::new();
            for &seq in seqs {
                match stream.get_raw_message(seq).await {
                    Ok(_) => {
                        still.push(seq);
                        break;
                    }
                    Err(e)
                        if e.kind()
                            == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                    {
                        continue
                    }
                    Err(e) => return Err(opened(&e)),
                }
            }
            if still.is_empty() {
                mem.named.remove(&file);
            } else {
                old.remove(&file);
            }
        }
    }
    *memory = next;
    for (name, m) in old {
        if files.delete_unchanged(&name, m.seq).await? {
            report.deleted += 1;
            report.deleted_bytes += m.info.size as u64;
            tracing::debug!(object = %name, bytes = m.info.size, "deleted an image file no record names");
        }
    }
    Ok(report)
}
