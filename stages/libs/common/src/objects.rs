//! Image and template files too large for one message, kept in the image files' object
//! bucket ([`OBJECTS_IMAGE_FILES`]) under their sha256 and named in records by an
//! [`ObjectRef`]. Storing skips a file already there (the same file dropped twice is stored
//! once); reading checks the size and the digest of what comes back, so a record never
//! goes on with other bytes than the ones it names. The bucket is chunked by JetStream
//! itself (128 KiB a chunk), so no chunk comes near the server's payload limit.

use async_nats::jetstream::{
    self,
    object_store::{ObjectInfo, ObjectStore},
};
use pcb_schemas::{image_id, ObjectRef, OBJECTS_IMAGE_FILES};
use tokio::io::AsyncReadExt;

use crate::{Outcome, Rejection};

/// Why a file could not be stored or read back.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The bucket could not be opened (missing: `pcb init` creates it).
    #[error("opening the object bucket {OBJECTS_IMAGE_FILES}: {0}")]
    Open(String),
    /// The bucket is at its `max_bytes`: it takes no new file until there is room.
    #[error("the object bucket {OBJECTS_IMAGE_FILES} is full: {0}")]
    Full(String),
    /// The server did not take or give the file (unavailable, timed out): try again.
    #[error("{what} {name} in {OBJECTS_IMAGE_FILES}: {message}")]
    Transient {
        /// `storing` or `reading`.
        what: &'static str,
        /// The object's name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// A record names an object the bucket does not have (removed, or never stored).
    #[error("the file {name} is not in the object bucket {OBJECTS_IMAGE_FILES}")]
    Gone {
        /// The object's name.
        name: String,
    },
    /// The reference itself is malformed: its name is not the sha256 it carries.
    #[error("bad file reference: {0}")]
    BadRef(String),
    /// What came back is not what the record names.
    #[error("the file {name} read back is {size} bytes with sha256 {sha256}, but the record names {want_size} bytes with sha256 {want_sha256}")]
    Mismatch {
        /// The object's name.
        name: String,
        /// Bytes read.
        size: u64,
        /// Their sha256.
        sha256: String,
        /// The size the reference names.
        want_size: u64,
        /// The digest the reference names.
        want_sha256: String,
    },
}

impl FilesError {
    /// What a consuming stage does about it: back-pressure when the bucket is full, a
    /// retry when the server failed, a dead letter (`image-gone`, `bad-file-ref`,
    /// `file-digest-mismatch`) when the record names a file that is not there or not right.
    pub fn outcome(self, what: &str) -> Outcome {
        match &self {
            FilesError::Full(_) => Outcome::Backpressure(format!("{what}: {self}")),
            FilesError::Open(_) | FilesError::Transient { .. } => {
                Outcome::Retry(format!("{what}: {self}"))
            }
            FilesError::Gone { .. } => {
                Outcome::Reject(Rejection::new("image-gone", format!("{what}: {self}")))
            }
            FilesError::BadRef(_) => {
                Outcome::Reject(Rejection::new("bad-file-ref", format!("{what}: {self}")))
            }
            FilesError::Mismatch { .. } => Outcome::Reject(Rejection::new(
                "file-digest-mismatch",
                format!("{what}: {self}"),
            )),
        }
    }
}

/// The image files' bucket.
#[derive(Clone)]
pub struct ImageFiles {
    js: jetstream::Context,
    store: ObjectStore,
    /// One put at a time from this process: the room check before a put holds until the
    /// put is done. Other processes (another ingester replica) are kept apart by the
    /// conditional publish of the object's metadata instead ([`ImageFiles::put`]).
    puts: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// The object's metadata message, as the stream holds it now.
#[derive(Debug, Clone)]
pub struct FileMeta {
    /// What it says (name, chunks' id, size, digest, deleted).
    pub info: ObjectInfo,
    /// Its sequence in the bucket's stream: a conditional publish on the metadata subject
    /// succeeds only while this is still the last one.
    pub seq: u64,
    /// When the server stored it (the object's put, or its last refresh).
    pub stored_at: time::OffsetDateTime,
}

/// Chunks of a put, as JetStream's own object store writes them.
const CHUNK_BYTES: usize = 128 * 1024;
/// Tries of a put that another writer keeps overtaking.
const PUT_TRIES: usize = 5;

/// The metadata subject of object `name` (as async-nats names it: URL-safe base64).
fn meta_subject(name: &str) -> String {
    use base64::Engine;
    format!(
        "$O.{OBJECTS_IMAGE_FILES}.M.{}",
        base64::engine::general_purpose::URL_SAFE.encode(name)
    )
}

/// The subject of the chunks of the object version `nuid`.
fn chunk_subject(nuid: &str) -> String {
    format!("$O.{OBJECTS_IMAGE_FILES}.C.{nuid}")
}

/// The digest an object's metadata carries for `bytes` (`SHA-256=<url-safe base64>`).
fn object_digest(bytes: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode(d)
    )
}

/// Whether a conditional publish lost to another writer.
enum Publish {
    Done,
    Overtaken,
}

impl ImageFiles {
    /// Opens the bucket (it must exist: `pcb init` and `pcb up` create it).
    pub async fn open(js: &jetstream::Context) -> Result<ImageFiles, FilesError> {
        js.get_object_store(OBJECTS_IMAGE_FILES)
            .await
            .map(|store| ImageFiles {
                js: js.clone(),
                store,
                puts: Default::default(),
            })
            .map_err(|e| FilesError::Open(e.to_string()))
    }

    fn transient(what: &'static str, name: &str, e: impl std::fmt::Display) -> FilesError {
        FilesError::Transient {
            what,
            name: name.to_string(),
            message: e.to_string(),
        }
    }

    async fn stream(&self, name: &str) -> Result<jetstream::stream::Stream, FilesError> {
        self.js
            .get_stream(format!("OBJ_{OBJECTS_IMAGE_FILES}"))
            .await
            .map_err(|e| Self::transient("opening the bucket's stream for", name, e))
    }

    /// The object's current metadata message (None: never stored). Read from the stream's
    /// leader, not a replica, so what a conditional publish compares with is current.
    pub async fn meta(&self, name: &str) -> Result<Option<FileMeta>, FilesError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self.stream(name).await?;
        let msg = match stream
            .get_last_raw_message_by_subject(&meta_subject(name))
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(Self::transient("looking up", name, e)),
        };
        let info: ObjectInfo = serde_json::from_slice(&msg.payload)
            .map_err(|e| Self::transient("decoding the metadata of", name, e))?;
        Ok(Some(FileMeta {
            info,
            seq: msg.sequence,
            stored_at: msg.time,
        }))
    }

    /// Publishes `info` as the object's metadata, replacing the earlier one (a rollup),
    /// only if the last metadata message is still `expect` (0: none yet).
    async fn publish_meta(&self, info: &ObjectInfo, expect: u64) -> Result<Publish, FilesError> {
        use async_nats::jetstream::context::PublishErrorKind;
        let body = serde_json::to_vec(info)
            .map_err(|e| Self::transient("encoding the metadata of", &info.name, e))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expect.to_string().as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(meta_subject(&info.name), headers, body.into())
            .await
            .map_err(|e| Self::transient("storing the metadata of", &info.name, e))?;
        match ack.await {
            Ok(_) => Ok(Publish::Done),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Publish::Overtaken),
            Err(e) if crate::ack::is_full_message(&e.to_string()) => {
                Err(FilesError::Full(e.to_string()))
            }
            Err(e) => Err(Self::transient("storing the metadata of", &info.name, e)),
        }
    }

    /// Removes the chunks of the object version `nuid` (best effort when `quiet`).
    async fn purge_chunks(&self, name: &str, nuid: &str) -> Result<(), FilesError> {
        self.stream(name)
            .await?
            .purge()
            .filter(chunk_subject(nuid))
            .await
            .map(|_| ())
            .map_err(|e| Self::transient("removing the chunks of", name, e))
    }

    /// Stores `bytes` under their sha256 unless a file of that name, size and digest is
    /// already there, and returns their reference.
    ///
    /// Safe with several writers at once (two ingester replicas dropping the same file):
    /// the metadata is published only if its subject still holds what this writer saw
    /// (`Nats-Expected-Last-Subject-Sequence`), so of two concurrent puts one wins, and
    /// the other removes the chunks it wrote and finds the winner's file. A file already
    /// there gets its metadata published again (the same chunks): the housekeeping deletes
    /// only files unchanged for its grace period, so a file about to be named by a new
    /// record is never deleted under it, and a deletion that came first is seen and the
    /// file stored again.
    pub async fn put(&self, bytes: &[u8]) -> Result<ObjectRef, FilesError> {
        let r = ObjectRef::of(bytes);
        let digest = object_digest(bytes);
        let _one_at_a_time = self.puts.lock().await;
        for _ in 0..PUT_TRIES {
            let seen = self.meta(&r.name).await?;
            if let Some(m) = &seen {
                let same = !m.info.deleted
                    && m.info.size as u64 == r.size
                    && m.info.digest.as_deref().is_none_or(|d| d == digest);
                if same {
                    let mut info = m.info.clone();
                    info.modified = Some(time::OffsetDateTime::now_utc());
                    match self.publish_meta(&info, m.seq).await? {
                        Publish::Done => return Ok(r),
                        // Refreshed by another writer, or deleted: look again.
                        Publish::Overtaken => continue,
                    }
                }
            }
            self.check_room(&r).await?;
            let nuid = format!("{:032x}", rand::random::<u128>());
            if let Err(e) = self.put_chunks(&r, &nuid, bytes).await {
                // A put that failed halfway leaves nothing behind to take room for good.
                if let Err(p) = self.purge_chunks(&r.name, &nuid).await {
                    tracing::warn!(object = %r.name, error = %p, "chunks of a failed put left behind");
                }
                return Err(e);
            }
            let info = ObjectInfo {
                name: r.name.clone(),
                description: None,
                metadata: Default::default(),
                headers: None,
                options: Some(async_nats::jetstream::object_store::ObjectOptions {
                    link: None,
                    max_chunk_size: Some(CHUNK_BYTES),
                }),
                bucket: OBJECTS_IMAGE_FILES.to_string(),
                nuid: nuid.clone(),
                size: bytes.len(),
                chunks: bytes.len().div_ceil(CHUNK_BYTES),
                modified: Some(time::OffsetDateTime::now_utc()),
                digest: Some(digest.clone()),
                deleted: false,
            };
            let outcome = self
                .publish_meta(&info, seen.as_ref().map_or(0, |m| m.seq))
                .await;
            match outcome {
                Ok(Publish::Done) => {
                    // The version replaced (a deleted one whose deleter stopped short, or
                    // one of other bytes) has chunks no metadata names any more.
                    if let Some(old) = seen.filter(|m| m.info.nuid != nuid) {
                        self.purge_chunks(&r.name, &old.info.nuid).await?;
                    }
                    return Ok(r);
                }
                Ok(Publish::Overtaken) | Err(_) => {
                    // Another writer's metadata came first (or ours was refused): ours is
                    // named by nothing, so its chunks go.
                    if let Err(p) = self.purge_chunks(&r.name, &nuid).await {
                        tracing::warn!(object = %r.name, error = %p, "chunks of a lost put left behind");
                    }
                    outcome?;
                }
            }
        }
        Err(FilesError::Transient {
            what: "storing",
            name: r.name,
            message: format!("other writers changed it {PUT_TRIES} times in a row"),
        })
    }

    /// Publishes `bytes` as the chunks of version `nuid`.
    async fn put_chunks(&self, r: &ObjectRef, nuid: &str, bytes: &[u8]) -> Result<(), FilesError> {
        let subject = chunk_subject(nuid);
        for chunk in bytes.chunks(CHUNK_BYTES) {
            let failed = |e: &dyn std::fmt::Display| {
                if crate::ack::is_full_message(&e.to_string()) {
                    FilesError::Full(e.to_string())
                } else {
                    Self::transient("storing", &r.name, e)
                }
            };
            self.js
                .publish(subject.clone(), bytes::Bytes::copy_from_slice(chunk))
                .await
                .map_err(|e| failed(&e))?
                .await
                .map_err(|e| failed(&e))?;
        }
        Ok(())
    }

    /// Deletes object `name` if its metadata is still the message `seq` (nothing stored
    /// or refreshed it since): its metadata is marked deleted, conditionally, then its
    /// chunks are removed. Returns whether it was deleted.
    pub async fn delete_unchanged(&self, name: &str, seq: u64) -> Result<bool, FilesError> {
        let Some(m) = self.meta(name).await? else {
            return Ok(false);
        };
        if m.seq != seq || m.info.deleted {
            return Ok(false);
        }
        let mut info = m.info.clone();
        info.deleted = true;
        info.size = 0;
        info.chunks = 0;
        info.modified = Some(time::OffsetDateTime::now_utc());
        match self.publish_meta(&info, seq).await? {
            Publish::Overtaken => Ok(false),
            Publish::Done => {
                self.purge_chunks(name, &m.info.nuid).await?;
                Ok(true)
            }
        }
    }

    /// Every object's current metadata (deleted ones included), from the bucket's stream.
    pub async fn list(&self) -> Result<Vec<FileMeta>, FilesError> {
        let stream = self.stream("(all)").await?;
        let mut out = Vec::new();
        crate::scan::read_stream(
            &stream,
            &format!("$O.{OBJECTS_IMAGE_FILES}.M.>"),
            jetstream::consumer::DeliverPolicy::LastPerSubject,
            |msg, seq, at| {
                match serde_json::from_slice::<ObjectInfo>(&msg.payload) {
                    Ok(info) => out.push(FileMeta {
                        info,
                        seq,
                        stored_at: at,
                    }),
                    Err(e) => {
                        tracing::debug!(subject = %msg.subject, error = %e, "not object metadata")
                    }
                }
                true
            },
        )
        .await
        .map_err(|e| Self::transient("listing", "(all)", e))?;
        Ok(out)
    }

    /// Refuses a file the bucket has no room for before any of it is written: a put that
    /// fails at the limit halfway leaves its chunks behind, taking room for good.
    async fn check_room(&self, r: &ObjectRef) -> Result<(), FilesError> {
        let stream = format!("OBJ_{OBJECTS_IMAGE_FILES}");
        let info = match self.js.get_stream(&stream).await {
            Ok(mut s) => s.info().await.map(|i| (i.config.max_bytes, i.state.bytes)),
            Err(e) => {
                return Err(FilesError::Transient {
                    what: "looking up room for",
                    name: r.name.clone(),
                    message: e.to_string(),
                })
            }
        };
        let (max_bytes, used) = info.map_err(|e| FilesError::Transient {
            what: "looking up room for",
            name: r.name.clone(),
            message: e.to_string(),
        })?;
        // Each 128 KiB chunk is stored with its subject and headers: a little over its size.
        let needs = r.size + r.size / 64 + 4096;
        if max_bytes > 0 && used + needs > max_bytes as u64 {
            return Err(FilesError::Full(format!(
                "{needs} bytes needed, {} of {max_bytes} free",
                (max_bytes as u64).saturating_sub(used)
            )));
        }
        Ok(())
    }

    /// Reads the file `r` names, checking its size and sha256.
    pub async fn get(&self, r: &ObjectRef) -> Result<Vec<u8>, FilesError> {
        check_ref(r)?;
        use async_nats::jetstream::object_store::GetErrorKind;
        let transient = |message: String| FilesError::Transient {
            what: "reading",
            name: r.name.clone(),
            message,
        };
        let mut object = match self.store.get(&r.name).await {
            Ok(o) => o,
            Err(e) if e.kind() == GetErrorKind::NotFound => {
                return Err(FilesError::Gone {
                    name: r.name.clone(),
                })
            }
            Err(e) => return Err(transient(e.to_string())),
        };
        let mismatch = |size: u64, sha256: String| FilesError::Mismatch {
            name: r.name.clone(),
            size,
            sha256,
            want_size: r.size,
            want_sha256: r.sha256.clone(),
        };
        let stored = object.info().size as u64;
        if stored != r.size {
            return Err(mismatch(stored, "(not read)".into()));
        }
        let mut bytes = Vec::with_capacity(r.size as usize);
        // Never more than the reference says, plus one byte to tell a longer file.
        let mut limited = (&mut object).take(r.size + 1);
        limited
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| transient(e.to_string()))?;
        verify(r, &bytes)?;
        Ok(bytes)
    }
}

/// A reference's name must be its own sha256 (64 lowercase hex digits): a record cannot
/// point a reader at any other object.
fn check_ref(r: &ObjectRef) -> Result<(), FilesError> {
    let hex = r.sha256.len() == 64
        && r.sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex || r.name != r.sha256 {
        return Err(FilesError::BadRef(format!(
            "name {:?} is not the sha256 {:?} (64 lowercase hex digits)",
            r.name, r.sha256
        )));
    }
    Ok(())
}

/// Checks that `bytes` are the file `r` names.
pub fn verify(r: &ObjectRef, bytes: &[u8]) -> Result<(), FilesError> {
    check_ref(r)?;
    let sha256 = image_id(bytes);
    if bytes.len() as u64 != r.size || sha256 != r.sha256 {
        return Err(FilesError::Mismatch {
            name: r.name.clone(),
            size: bytes.len() as u64,
            sha256,
            want_size: r.size,
            want_sha256: r.sha256.clone(),
        });
    }
    Ok(())
}

/// The image files' bucket, opened on first use and shared by a stage's handlers: a stage
/// that never meets a board too large for one message never opens it.
#[derive(Clone)]
pub struct LazyFiles {
    js: jetstream::Context,
    cell: std::sync::Arc<tokio::sync::OnceCell<ImageFiles>>,
}

impl LazyFiles {
    /// The bucket of the server behind `js`, not yet opened.
    pub fn new(js: jetstream::Context) -> LazyFiles {
        LazyFiles {
            js,
            cell: Default::default(),
        }
    }

    /// The bucket, opened now if it was not.
    pub async fn files(&self) -> Result<&ImageFiles, FilesError> {
        self.cell
            .get_or_try_init(|| ImageFiles::open(&self.js))
            .await
    }

    /// Reads the file `r` names, checking its size and sha256.
    pub async fn get(&self, r: &ObjectRef) -> Result<Vec<u8>, FilesError> {
        self.files().await?.get(r).await
    }

    /// Reads the file `r` names when it is set.
    pub async fn get_opt(&self, r: Option<&ObjectRef>) -> Result<Option<Vec<u8>>, FilesError> {
        match r {
            Some(r) => self.get(r).await.map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_another_digest_or_size_is_refused() {
        let r = ObjectRef::of(b"the board's bytes");
        assert_eq!(r.name, r.sha256);
        assert_eq!(r.size, 17);
        verify(&r, b"the board's bytes").expect("the same bytes pass");
        let err = verify(&r, b"the board's bytez").unwrap_err();
        assert!(
            matches!(err, FilesError::Mismatch { size: 17, .. }),
            "{err}"
        );
        let err = verify(&r, b"the board's bytes!").unwrap_err();
        assert!(
            matches!(err, FilesError::Mismatch { size: 18, .. }),
            "{err}"
        );
        let Outcome::Reject(rej) = err.outcome("reading the image") else {
            panic!("a digest mismatch is a dead letter");
        };
        assert_eq!(rej.reason_code, "file-digest-mismatch");
    }

    #[test]
    fn a_reference_not_named_by_its_digest_is_refused() {
        let mut r = ObjectRef::of(b"x");
        r.name = "../models/weights".into();
        assert!(matches!(verify(&r, b"x"), Err(FilesError::BadRef(_))));
        let mut r = ObjectRef::of(b"x");
        r.sha256 = r.sha256.to_uppercase();
        r.name = r.sha256.clone();
        assert!(matches!(verify(&r, b"x"), Err(FilesError::BadRef(_))));
    }

    #[test]
    fn each_failure_has_its_consumer_outcome() {
        let gone = FilesError::Gone { name: "ab".into() };
        match gone.outcome("reading") {
            Outcome::Reject(r) => assert_eq!(r.reason_code, "image-gone"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            FilesError::Full("maximum bytes exceeded".into()).outcome("storing"),
            Outcome::Backpressure(_)
        ));
        assert!(matches!(
            FilesError::Open("no bucket".into()).outcome("reading"),
            Outcome::Retry(_)
        ));
    }
}
