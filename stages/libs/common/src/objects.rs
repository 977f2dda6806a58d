//! Image and template files too large for one message, kept in the image files' object
//! bucket ([`OBJECTS_IMAGE_FILES`]) under their sha256 and named in records by an
//! [`ObjectRef`]. Storing skips a file already there (the same file dropped twice is stored
//! once); reading checks the size and the digest of what comes back, so a record never
//! goes on with other bytes than the ones it names. The bucket is chunked by JetStream
//! itself (128 KiB a chunk), so no chunk comes near the server's payload limit.

use async_nats::jetstream::{self, object_store::ObjectStore};
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
    /// One put at a time from this process: two boards sharing a template, read at once,
    /// would otherwise both find it missing and both store it (the first copy's chunks left
    /// behind for good); and the room check before a put holds until the put is done.
    puts: std::sync::Arc<tokio::sync::Mutex<()>>,
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

    /// Stores `bytes` under their sha256 unless a file of that name and size is already
    /// there, and returns their reference.
    pub async fn put(&self, bytes: &[u8]) -> Result<ObjectRef, FilesError> {
        let r = ObjectRef::of(bytes);
        let _one_at_a_time = self.puts.lock().await;
        match self.store.info(&r.name).await {
            Ok(info) if !info.deleted && info.size as u64 == r.size => return Ok(r),
            Ok(_) => {}
            Err(e) if e.kind() == async_nats::jetstream::object_store::InfoErrorKind::NotFound => {}
            Err(e) => {
                return Err(FilesError::Transient {
                    what: "looking up",
                    name: r.name,
                    message: e.to_string(),
                })
            }
        }
        self.check_room(&r).await?;
        let mut reader = bytes;
        match self.store.put(r.name.as_str(), &mut reader).await {
            Ok(_) => Ok(r),
            Err(e) if crate::ack::is_full_message(&e.to_string()) => {
                Err(FilesError::Full(e.to_string()))
            }
            Err(e) => Err(FilesError::Transient {
                what: "storing",
                name: r.name,
                message: e.to_string(),
            }),
        }
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
