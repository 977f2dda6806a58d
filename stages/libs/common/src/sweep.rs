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
//!   `PCB_SHARDS`) names it, read to the end (a read that stalls deletes nothing);
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

/// Deletes every file of the image files' bucket that has gone unchanged for `grace` and
/// that no record in `KEEPER.file_refs` names.
pub async fn sweep_image_files(
    js: &jetstream::Context,
    grace: Duration,
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
    if old.is_empty() {
        return Ok(report);
    }
    for kind in KEEPER.file_refs {
        let stream = js
            .get_stream(kind.name())
            .await
            .map_err(|e| SweepError::Stream {
                stream: kind.name(),
                message: e.to_string(),
            })?;
        report.records_read +=
            crate::scan::read_stream(&stream, ">", DeliverPolicy::All, |msg, seq, _| {
                match FileRefs::decode(&msg.payload) {
                    Ok(refs) => {
                        for r in refs {
                            old.remove(&r.name);
                        }
                    }
                    // Not a record that names files (no reader could take it either).
                    Err(e) => {
                        tracing::debug!(stream = kind.name(), seq, error = %e, "not a record")
                    }
                }
                !old.is_empty()
            })
            .await?;
        if old.is_empty() {
            return Ok(report);
        }
    }
    for (name, m) in old {
        if files.delete_unchanged(&name, m.seq).await? {
            report.deleted += 1;
            report.deleted_bytes += m.info.size as u64;
            tracing::debug!(object = %name, bytes = m.info.size, "deleted an image file no record names");
        }
    }
    Ok(report)
}
