//! Least-privilege NATS identities, derived from the topology table: one per stage, an
//! `admin` (the launcher, `pcb init`, `pcb models`, replays with the `nats` CLI), a
//! `keeper` (the launcher's housekeeping, from the topology's `KEEPER` declaration) and a
//! read-only `reader` (line-side subscribers, `pcb status`). Each identity's publish and
//! subscribe allow-lists hold exactly the pipeline subjects, JetStream API calls and bucket
//! subjects its declaration names, so changing a stage's wiring in
//! `pcb_schemas::topology` changes its permissions too. Every identity replies on an inbox
//! prefix of its own (`_INBOX_<identity>`): a pull consumer's messages and every API answer
//! arrive on the puller's inbox, so a shared `_INBOX.>` would let any identity read them.
//!
//! The keys are nkeys: the server's config holds only public keys, and each identity's
//! seed is a file of mode 0600 in a folder of mode 0700 ([`IdentityStore`]). MQTT clients
//! cannot sign with an nkey, so `line-side` (PLCs and SCADA on the server's MQTT listener)
//! has a password instead: in a file of mode 0600 beside the seeds, and only as a bcrypt
//! hash in the server's config, which admits it over MQTT only.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use pcb_schemas::topology::{patterns_overlap, Access, BucketKind, ReadMode, BUCKETS, STAGES};
use pcb_schemas::{StageName, StreamKind};

/// Who connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A stage of the pipeline, with what its declaration names.
    Stage(StageName),
    /// Everything: provisioning, the registry commands, replays.
    Admin,
    /// The launcher's housekeeping: room in the streams that push back, and the image
    /// files no record names (what the topology's `KEEPER` declares).
    Keeper,
    /// Reads detections, model events and training progress; publishes nothing.
    Reader,
    /// PLCs and SCADA over MQTT: reads the line verdicts, nothing else (a password user).
    LineSide,
}

/// The streams the `reader` identity may read, and the pipeline subjects it may subscribe
/// to: what a line-side system and `pcb status` need, and nothing that carries images.
const READER_STREAMS: [StreamKind; 2] = [StreamKind::Detections, StreamKind::Training];
const READER_SUBJECTS: [&str; 4] = [
    pcb_schemas::SUBJECT_DETECTIONS,
    "pcb.verdicts.*",
    pcb_schemas::SUBJECT_MODEL_EVENTS,
    pcb_schemas::SUBJECT_TRAIN_PROGRESS,
];

impl Identity {
    /// Every identity: the stages in the topology's order, then admin, keeper, reader,
    /// line-side.
    pub fn all() -> Vec<Identity> {
        StageName::ALL
            .into_iter()
            .map(Identity::Stage)
            .chain([
                Identity::Admin,
                Identity::Keeper,
                Identity::Reader,
                Identity::LineSide,
            ])
            .collect()
    }

    /// Whether it signs in with an nkey (all but `line-side`, an MQTT password user).
    pub fn uses_nkey(self) -> bool {
        self != Identity::LineSide
    }

    /// Its spelling: the stage's name, `admin` or `reader`.
    pub fn name(self) -> &'static str {
        match self {
            Identity::Stage(s) => s.name(),
            Identity::Admin => "admin",
            Identity::Keeper => "keeper",
            Identity::Reader => "reader",
            Identity::LineSide => "line-side",
        }
    }

    /// The prefix of its reply subjects.
    pub fn inbox_prefix(self) -> String {
        format!("_INBOX_{}", self.name())
    }

    /// One line on what it is for.
    pub fn summary(self) -> &'static str {
        match self {
            Identity::Stage(s) => s.decl().summary,
            Identity::Admin => {
                "the launcher, `pcb init`, `pcb models`, `pcb train`'s own client, replays with the `nats` CLI"
            }
            Identity::Keeper => {
                "`pcb up`'s housekeeping: room in the streams that push back, image files no record names"
            }
            Identity::Reader => "line-side subscribers, `pcb status`, dashboards",
            Identity::LineSide => {
                "PLCs and SCADA on the MQTT listener (verdicts on `pcb/verdicts/<line>`), MQTT only"
            }
        }
    }

    /// Its publish and subscribe allow- and deny-lists.
    pub fn permissions(self) -> Permissions {
        let mut g = Grants::new(self);
        match self {
            // An MQTT client needs no inbox: it subscribes to its topics, and the server
            // keeps its session on the account's behalf.
            Identity::LineSide => {
                g.subscribe.clear();
                g.subscribe.insert("pcb.verdicts.*".into());
            }
            Identity::Admin => {
                g.publish.insert(">".into());
                g.subscribe.insert(">".into());
            }
            Identity::Keeper => {
                let decl = pcb_schemas::topology::KEEPER;
                // make_room: each stream's state, its durables' ack floors, and purges.
                for kind in decl.trims {
                    let stream = kind.name();
                    g.api(&format!("STREAM.INFO.{stream}"));
                    g.api(&format!("CONSUMER.INFO.{stream}.*"));
                    g.api(&format!("STREAM.PURGE.{stream}"));
                }
                for kind in decl.file_refs {
                    g.view(kind.name());
                }
                for (bucket, access) in decl.buckets {
                    g.bucket(bucket, *access);
                }
            }
            Identity::Reader => {
                for api in [
                    "INFO",
                    "STREAM.NAMES",
                    "STREAM.LIST",
                    "STREAM.INFO.*",
                    "CONSUMER.NAMES.*",
                    "CONSUMER.LIST.*",
                    "CONSUMER.INFO.*.*",
                ] {
                    g.api(api);
                }
                for kind in READER_STREAMS {
                    g.view(kind.name());
                }
                g.view(&kv_stream(pcb_schemas::KV_MODELS));
                for s in READER_SUBJECTS {
                    g.subscribe.insert(s.to_string());
                }
            }
            Identity::Stage(stage) => {
                let decl = stage.decl();
                for input in decl.inputs {
                    match input.mode {
                        ReadMode::Durable(d) => g.durable(input.stream.name(), d.name),
                        ReadMode::View => g.view(input.stream.name()),
                    }
                }
                for out in decl.outputs {
                    g.publish.insert(out.to_string());
                    for kind in StreamKind::ALL {
                        if kind.subjects().iter().any(|p| patterns_overlap(p, out)) {
                            g.api(&format!("STREAM.INFO.{}", kind.name()));
                        }
                    }
                }
                for (bucket, access) in decl.buckets {
                    g.bucket(bucket, *access);
                }
            }
        }
        g.finish()
    }
}

fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// One direction's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Subjects (with wildcards) allowed.
    pub allow: Vec<String>,
    /// Subjects denied even when an allow matches.
    pub deny: Vec<String>,
}

/// An identity's permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// What it may publish (JetStream API requests and acks are publishes).
    pub publish: Rules,
    /// What it may subscribe to.
    pub subscribe: Rules,
}

impl Permissions {
    /// The `permissions` block of a nats-server user.
    pub fn to_conf(&self) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rules = |r: &Rules| {
            let mut s = format!("allow: [{}]", list(&r.allow));
            if !r.deny.is_empty() {
                let _ = write!(s, ", deny: [{}]", list(&r.deny));
            }
            s
        };
        format!(
            "{{ publish: {{ {} }}, subscribe: {{ {} }} }}",
            rules(&self.publish),
            rules(&self.subscribe)
        )
    }
}

/// Collects an identity's grants.
struct Grants {
    me: Identity,
    publish: BTreeSet<String>,
    publish_deny: BTreeSet<String>,
    subscribe: BTreeSet<String>,
}

impl Grants {
    fn new(me: Identity) -> Grants {
        let mut g = Grants {
            me,
            publish: BTreeSet::new(),
            publish_deny: BTreeSet::new(),
            subscribe: BTreeSet::new(),
        };
        g.subscribe.insert(format!("{}.>", me.inbox_prefix()));
        g
    }

    fn api(&mut self, call: &str) {
        self.publish.insert(format!("$JS.API.{call}"));
    }

    /// Its own durable consumer `durable` on `stream`: open it (bringing its ack settings
    /// to the stage's config), pull, ack.
    fn durable(&mut self, stream: &str, durable: &str) {
        self.api(&format!("STREAM.INFO.{stream}"));
        self.api(&format!("CONSUMER.INFO.{stream}.{durable}"));
        self.api(&format!("CONSUMER.CREATE.{stream}.{durable}"));
        self.api(&format!("CONSUMER.CREATE.{stream}.{durable}.>"));
        self.api(&format!("CONSUMER.MSG.NEXT.{stream}.{durable}"));
        self.publish.insert(format!("$JS.ACK.{stream}.{durable}.>"));
    }

    /// A private view of `stream`: ephemeral and ordered consumers, direct and by-sequence
    /// gets. The other identities' durables on it stay out of reach: neither pulled from
    /// (which would take their messages) nor redefined.
    fn view(&mut self, stream: &str) {
        for call in [
            format!("STREAM.INFO.{stream}"),
            format!("STREAM.MSG.GET.{stream}"),
            format!("DIRECT.GET.{stream}"),
            format!("DIRECT.GET.{stream}.>"),
            format!("CONSUMER.CREATE.{stream}"),
            format!("CONSUMER.CREATE.{stream}.>"),
            format!("CONSUMER.INFO.{stream}.*"),
            format!("CONSUMER.MSG.NEXT.{stream}.*"),
        ] {
            self.api(&call);
        }
        // Ordered push consumers (key-value watches, object reads) ask for flow control.
        self.publish.insert(format!("$JS.FC.{stream}.>"));
        for decl in STAGES {
            for input in decl.inputs {
                if let ReadMode::Durable(d) = input.mode {
                    if input.stream.name() == stream && Identity::Stage(decl.stage) != self.me {
                        for call in [
                            format!("CONSUMER.CREATE.{stream}.{}", d.name),
                            format!("CONSUMER.CREATE.{stream}.{}.>", d.name),
                            format!("CONSUMER.DURABLE.CREATE.{stream}.{}", d.name),
                            format!("CONSUMER.MSG.NEXT.{stream}.{}", d.name),
                        ] {
                            self.publish_deny.insert(format!("$JS.API.{call}"));
                        }
                    }
                }
            }
        }
    }

    /// `access` to `bucket`: a view of its stream, and for a writer its subjects; a
    /// deleter (of objects) publishes their metadata only, never their chunks.
    fn bucket(&mut self, bucket: &str, access: Access) {
        let object = BUCKETS
            .iter()
            .any(|b| b.name == bucket && b.kind == BucketKind::Object);
        let stream = if object {
            format!("OBJ_{bucket}")
        } else {
            kv_stream(bucket)
        };
        self.view(&stream);
        match (access, object) {
            (Access::Read, _) => {}
            // A put replaces the object's earlier chunks with a purge.
            (Access::Write, true) => {
                self.publish.insert(format!("$O.{bucket}.>"));
                self.api(&format!("STREAM.PURGE.{stream}"));
            }
            // A deletion marks the metadata deleted, then purges the chunks.
            (Access::Delete, true) => {
                self.publish.insert(format!("$O.{bucket}.M.>"));
                self.api(&format!("STREAM.PURGE.{stream}"));
            }
            (Access::Write | Access::Delete, false) => {
                self.publish.insert(format!("$KV.{bucket}.>"));
            }
        }
    }

    fn finish(mut self) -> Permissions {
        // A durable of one's own is never denied (a stage that also views its stream).
        let own: Vec<String> = self.publish.iter().cloned().collect();
        self.publish_deny.retain(|d| !own.contains(d));
        Permissions {
            publish: Rules {
                allow: self.publish.into_iter().collect(),
                deny: self.publish_deny.into_iter().collect(),
            },
            subscribe: Rules {
                allow: self.subscribe.into_iter().collect(),
                deny: Vec::new(),
            },
        }
    }
}

/// Why identities could not be created or read.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file or folder could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A seed file holds no valid nkey seed.
    #[error("{path} holds no nkey user seed ({message}); remove it to issue a new one")]
    BadSeed {
        /// The file.
        path: PathBuf,
        /// What nkeys said.
        message: String,
    },
    /// The MQTT password file is empty, or could not be hashed.
    #[error("{path}: {message}; remove it to issue a new password")]
    BadPassword {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A seed file is readable by others.
    #[error("{path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// A folder of identity seeds: `<identity>.nk`, mode 0600, in a folder of mode 0700.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    dir: PathBuf,
    keys: Vec<(Identity, String)>,
    /// The bcrypt hash of `line-side`'s password.
    line_side_hash: String,
}

impl IdentityStore {
    /// Opens `dir`, issuing a seed for every identity that has none; refuses seeds that
    /// others can read.
    pub fn ensure(dir: &Path) -> Result<IdentityStore, IdentityError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        set_mode(dir, 0o700).map_err(io(dir))?;
        let mut keys = Vec::new();
        for id in Identity::all().into_iter().filter(|id| id.uses_nkey()) {
            let path = seed_path(dir, id);
            if !path.exists() {
                issue_seed(&path)?;
            }
            keys.push((id, public_key(&path)?));
        }
        let password = password_path(dir);
        if !password.exists() {
            // 32 random hex digits: 128 bits, typed into a PLC's configuration as they are.
            let secret: [u8; 16] = rand::random();
            let text: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            write_secret(&password, format!("{text}\n").as_bytes()).map_err(io(&password))?;
        }
        let line_side_hash = password_hash(&password)?;
        Ok(IdentityStore {
            dir: dir.to_path_buf(),
            keys,
            line_side_hash,
        })
    }

    /// The file holding `line-side`'s MQTT password (mode 0600): its user name is
    /// `line-side`.
    pub fn password_file(&self) -> PathBuf {
        password_path(&self.dir)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `id`'s secret: its seed, or for `line-side` its password.
    pub fn secret_file(&self, id: Identity) -> PathBuf {
        if id.uses_nkey() {
            self.seed_file(id)
        } else {
            self.password_file()
        }
    }

    /// The seed file of `id` (none for `line-side`: see [`IdentityStore::password_file`]).
    pub fn seed_file(&self, id: Identity) -> PathBuf {
        seed_path(&self.dir, id)
    }

    /// The public key of `id`.
    pub fn public_key(&self, id: Identity) -> &str {
        self.keys
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, k)| k.as_str())
            .unwrap_or_default()
    }

    /// The NATS connection settings of `id` on `base` (its URL and TLS): its seed file
    /// and its inbox prefix, no other credential.
    pub fn connection(&self, id: Identity, base: &crate::NatsConfig) -> crate::NatsConfig {
        crate::NatsConfig {
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_seed_file: Some(self.seed_file(id)),
            inbox_prefix: Some(id.inbox_prefix()),
            ..base.clone()
        }
    }

    /// [`IdentityStore::connection`] of `id` when there are identities, else `base`
    /// itself (a server without them, reached with the pipeline file's credentials).
    pub fn connection_of(
        ids: Option<&IdentityStore>,
        id: Identity,
        base: &crate::NatsConfig,
    ) -> crate::NatsConfig {
        match ids {
            Some(ids) => ids.connection(id, base),
            None => base.clone(),
        }
    }

    /// The nats-server config that defines `PCB_USERS`: one user per identity with its
    /// public key and permissions. The private server puts them in its `authorization`
    /// block; `deploy/nats/nats-server.conf` in an account of its own.
    pub fn users_conf(&self) -> String {
        let mut out = String::from(
            "# Written by pcb from the topology table (schemas/src/topology.rs): one NATS\n\
             # identity per stage, plus admin and reader. Public keys only: each seed is\n\
             # its identity's own <identity>.nk file (mode 0600), wherever it runs. The\n\
             # MQTT user line-side has a password, here as its bcrypt hash only.\n\
             PCB_USERS = [\n",
        );
        for (id, key) in &self.keys {
            let _ = writeln!(
                out,
                "  # {}: {}\n  {{ nkey: {key:?}, permissions: {} }}",
                id.name(),
                id.summary(),
                id.permissions().to_conf()
            );
        }
        let id = Identity::LineSide;
        let _ = writeln!(
            out,
            "  # {}: {}\n  {{ user: {:?}, password: {:?}, allowed_connection_types: [\"MQTT\"], permissions: {} }}",
            id.name(),
            id.summary(),
            id.name(),
            self.line_side_hash,
            id.permissions().to_conf()
        );
        out.push_str("]\n");
        out
    }
}

impl IdentityStore {
    /// [`IdentityStore::users_conf`] and `SYS_USERS`, one user of the server's system
    /// account (`system.nk` beside the others): the include of a production server
    /// (deploy/nats/nats-server.conf).
    pub fn server_conf(&self) -> Result<String, IdentityError> {
        let path = self.dir.join("system.nk");
        if !path.exists() {
            issue_seed(&path)?;
        }
        let key = public_key(&path)?;
        Ok(format!(
            "{}# system: the server's system account (monitoring, `nats server` commands)\n\
             SYS_USERS = [\n  {{ nkey: {key:?} }}\n]\n",
            self.users_conf()
        ))
    }
}

fn issue_seed(path: &Path) -> Result<(), IdentityError> {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().map_err(|e| IdentityError::BadSeed {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_secret(path, format!("{seed}\n").as_bytes()).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn password_path(dir: &Path) -> PathBuf {
    dir.join(format!("{}.password", Identity::LineSide.name()))
}

/// The bcrypt hash (`$2a$`, which every nats-server reads) of the password in `path`,
/// refusing a file others can read.
fn password_hash(path: &Path) -> Result<String, IdentityError> {
    let password = read_secret(path)?;
    let bad = |message: String| IdentityError::BadPassword {
        path: path.to_path_buf(),
        message,
    };
    if password.is_empty() {
        return Err(bad("the password is empty".into()));
    }
    // Cost 10: checked once per MQTT connection, ~0.1 s on one core.
    bcrypt::hash_with_result(&password, 10)
        .map(|h| h.format_for_version(bcrypt::Version::TwoA))
        .map_err(|e| bad(e.to_string()))
}

/// The trimmed text of a secret file, which must not be readable by group or others.
fn read_secret(path: &Path) -> Result<String, IdentityError> {
    let meta = std::fs::metadata(path).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = file_mode(&meta);
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text.trim().to_string())
}

fn seed_path(dir: &Path, id: Identity) -> PathBuf {
    dir.join(format!("{}.nk", id.name()))
}

fn public_key(path: &Path) -> Result<String, IdentityError> {
    let text = read_secret(path)?;
    let bad = |message: String| IdentityError::BadSeed {
        path: path.to_path_buf(),
        message,
    };
    let pair = nkeys::KeyPair::from_seed(text.trim()).map_err(|e| bad(e.to_string()))?;
    if pair.key_pair_type() != nkeys::KeyPairType::User {
        return Err(bad("not a user seed (SU...)".into()));
    }
    Ok(pair.public_key())
}

/// Writes `bytes` to `path`, created with mode 0600 (a secret never exists with a wider
/// mode, not even between create and chmod).
pub fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    // An existing file keeps its mode on open: narrow it too.
    set_mode(path, 0o600)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn file_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    meta.permissions().mode() & 0o777
}

#[cfg(not(unix))]
fn file_mode(_meta: &std::fs::Metadata) -> u32 {
    0o600
}

/// The README's identity table (markdown): who may publish what, read which streams and
/// use which buckets, derived from the permissions.
pub fn identities_markdown() -> String {
    let mut out = String::from(
        "| identity | publishes | subscribes | reads (streams) | buckets |\n|---|---|---|---|---|\n",
    );
    for id in Identity::all() {
        let p = id.permissions();
        let publishes: Vec<String> = p
            .publish
            .allow
            .iter()
            .filter(|s| !s.starts_with('$'))
            .map(|s| format!("`{s}`"))
            .collect();
        let mut streams: Vec<String> = Vec::new();
        let mut buckets: Vec<String> = Vec::new();
        for s in &p.publish.allow {
            if let Some(rest) = s.strip_prefix("$JS.API.CONSUMER.CREATE.") {
                if rest.contains('.') {
                    continue;
                }
                if let Some(b) = rest.strip_prefix("KV_").or(rest.strip_prefix("OBJ_")) {
                    let has = |s: String| p.publish.allow.contains(&s);
                    let access = if has(format!("$KV.{b}.>")) || has(format!("$O.{b}.>")) {
                        "write"
                    } else if has(format!("$O.{b}.M.>")) {
                        "delete"
                    } else {
                        "read"
                    };
                    buckets.push(format!("`{b}` ({access})"));
                } else {
                    streams.push(format!("`{rest}` (view)"));
                }
            }
            if let Some(rest) = s.strip_prefix("$JS.API.CONSUMER.MSG.NEXT.") {
                if !rest.ends_with(".*") {
                    streams.push(format!(
                        "`{}` (durable `{}`)",
                        stream_of(rest),
                        durable_of(rest)
                    ));
                }
            }
        }
        let subscribes: Vec<String> = p.subscribe.allow.iter().map(|s| format!("`{s}`")).collect();
        let cell = |v: Vec<String>| {
            if v.is_empty() {
                "—".to_string()
            } else {
                v.join(", ")
            }
        };
        let row = match id {
            Identity::Admin => [
                "everything".to_string(),
                "everything".to_string(),
                "everything".to_string(),
                "everything".to_string(),
            ],
            _ => [
                cell(publishes),
                cell(subscribes),
                cell(streams),
                cell(buckets),
            ],
        };
        let _ = writeln!(out, "| `{}` | {} |", id.name(), row.join(" | "));
    }
    out
}

fn stream_of(stream_dot_durable: &str) -> &str {
    stream_dot_durable.split('.').next().unwrap_or_default()
}

fn durable_of(stream_dot_durable: &str) -> &str {
    stream_dot_durable.split('.').nth(1).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(rules: &Rules, subject: &str) -> bool {
        rules
            .allow
            .iter()
            .any(|p| pcb_schemas::topology::subject_matches(p, subject))
            && !rules
                .deny
                .iter()
                .any(|p| pcb_schemas::topology::subject_matches(p, subject))
    }

    /// Asserts what `id` may publish and what it may not.
    fn publishes(id: Identity, allowed: &[&str], denied: &[&str]) {
        let p = id.permissions();
        for s in allowed {
            assert!(allows(&p.publish, s), "{} may not publish {s}", id.name());
        }
        for s in denied {
            assert!(!allows(&p.publish, s), "{} may publish {s}", id.name());
        }
    }

    #[test]
    fn stages_publish_only_their_declared_outputs() {
        publishes(
            Identity::Stage(StageName::Detector),
            &["pcb.detections", "pcb.rejected.detector"],
            &[
                "pcb.train.candidates",
                "pcb.rejected.registry",
                // It reads the registry only.
                "$KV.pcb_models.live.x",
            ],
        );
        publishes(
            Identity::Stage(StageName::Router),
            &["pcb.shards.3"],
            &["pcb.images.raw"],
        );
    }

    #[test]
    fn the_keeper_trims_reads_and_deletes_files_and_nothing_more() {
        publishes(
            Identity::Keeper,
            &[
                // make_room on PCB_IMAGES: state, the durables' floors, the purge.
                "$JS.API.STREAM.INFO.PCB_IMAGES",
                "$JS.API.CONSUMER.INFO.PCB_IMAGES.encoder",
                "$JS.API.STREAM.PURGE.PCB_IMAGES",
                // The sweep: a private view of the streams naming files.
                "$JS.API.CONSUMER.CREATE.PCB_SHARDS.abc.pcb.shards.>",
                "$JS.API.CONSUMER.MSG.NEXT.PCB_IMAGES.abc",
                // A deletion: the metadata, then a purge of the chunks.
                "$O.pcb_image_files.M.YWJj",
                "$JS.API.STREAM.PURGE.OBJ_pcb_image_files",
            ],
            &[
                // It writes no file and no record, and takes no stage's messages.
                "$O.pcb_image_files.C.abc",
                "pcb.images.raw",
                "pcb.rejected.keeper",
                "$JS.API.CONSUMER.MSG.NEXT.PCB_IMAGES.encoder",
                "$JS.ACK.PCB_IMAGES.encoder.1.2.3.4.5",
                "$JS.API.STREAM.DELETE.PCB_IMAGES",
                "$JS.API.STREAM.PURGE.PCB_DETECTIONS",
                "$O.pcb_model_artifacts.M.YWJj",
                "$KV.pcb_models.live.x",
            ],
        );
        let t = identities_markdown();
        assert!(
            t.contains("| `keeper` | — | `_INBOX_keeper.>` | `PCB_IMAGES` (view), `PCB_SHARDS` (view) | `pcb_image_files` (delete) |"),
            "{t}"
        );
    }

    #[test]
    fn a_durable_is_pulled_and_acked_by_its_own_stage_only() {
        publishes(
            Identity::Stage(StageName::Encoder),
            &[
                "$JS.API.CONSUMER.MSG.NEXT.PCB_IMAGES.encoder",
                "$JS.ACK.PCB_IMAGES.encoder.1.2.3.4.5",
            ],
            &[
                "$JS.API.CONSUMER.MSG.NEXT.PCB_IMAGES.detector",
                "$JS.ACK.PCB_IMAGES.detector.1.2.3.4.5",
            ],
        );
        // The viewer views PCB_IMAGES but may neither pull from nor redefine a durable.
        let mut denied = vec![
            "$JS.API.CONSUMER.DELETE.PCB_IMAGES.encoder".to_string(),
            "$JS.API.STREAM.PURGE.PCB_IMAGES".to_string(),
        ];
        for durable in ["encoder", "router", "detector"] {
            denied.push(format!("$JS.API.CONSUMER.MSG.NEXT.PCB_IMAGES.{durable}"));
            denied.push(format!(
                "$JS.API.CONSUMER.CREATE.PCB_IMAGES.{durable}.pcb.images.raw"
            ));
        }
        let denied: Vec<&str> = denied.iter().map(String::as_str).collect();
        publishes(
            Identity::Stage(StageName::Viewer),
            &[
                "$JS.API.CONSUMER.MSG.NEXT.PCB_IMAGES.ephemeral123",
                "$JS.API.CONSUMER.CREATE.PCB_IMAGES",
            ],
            &denied,
        );
    }

    #[test]
    fn everyone_but_admin_subscribes_to_its_own_inbox_only() {
        for id in Identity::all().into_iter().filter(|id| id.uses_nkey()) {
            let p = id.permissions();
            let mine = format!("{}.abc.1", id.inbox_prefix());
            assert!(allows(&p.subscribe, &mine), "{}", id.name());
            if id != Identity::Admin {
                for other in ["_INBOX.abc.1", "_INBOX_admin.abc.1", "pcb.images.raw"] {
                    assert!(!allows(&p.subscribe, other), "{}: {other}", id.name());
                }
            }
        }
    }

    #[test]
    fn the_reader_publishes_nothing_of_the_pipeline() {
        let subjects: Vec<String> = pcb_schemas::topology::SUBJECTS
            .iter()
            .map(|s| s.pattern.replace('*', "x"))
            .chain([
                "$KV.pcb_models.live.pcb".to_string(),
                "$JS.API.STREAM.DELETE.PCB_DETECTIONS".to_string(),
                "$JS.API.CONSUMER.MSG.NEXT.PCB_TRAINING.registry".to_string(),
                // No images.
                "$JS.API.DIRECT.GET.PCB_IMAGES".to_string(),
            ])
            .collect();
        let denied: Vec<&str> = subjects.iter().map(String::as_str).collect();
        publishes(
            Identity::Reader,
            &["$JS.API.STREAM.INFO.PCB_IMAGES"],
            &denied,
        );
        let r = Identity::Reader.permissions();
        assert!(allows(&r.subscribe, "pcb.detections"));
        assert!(!allows(&r.subscribe, "pcb.images.encoded"));
    }

    #[test]
    fn buckets_follow_their_declared_access() {
        publishes(
            Identity::Stage(StageName::Registry),
            &[
                "$KV.pcb_models.live.pcb",
                "$O.pcb_model_artifacts.C.abc",
                "$JS.API.STREAM.PURGE.OBJ_pcb_candidates",
            ],
            &[],
        );
        publishes(
            Identity::Stage(StageName::Detector),
            &[
                "$JS.API.DIRECT.GET.KV_pcb_models.$KV.pcb_models.live.pcb",
                "$JS.FC.OBJ_pcb_model_artifacts.x.y",
            ],
            &[
                "$O.pcb_model_artifacts.C.abc",
                "$JS.API.STREAM.INFO.OBJ_pcb_candidates",
            ],
        );
        // Only the registry registers.
        publishes(
            Identity::Stage(StageName::Trainer),
            &["$O.pcb_candidates.M.abc"],
            &["$O.pcb_model_artifacts.M.abc"],
        );
        // Only the ingester and the viewer (uploads) store image files; the stages after
        // them read them.
        for writer in [StageName::Ingester, StageName::Viewer] {
            publishes(
                Identity::Stage(writer),
                &[
                    "$O.pcb_image_files.C.abc",
                    "$O.pcb_image_files.M.abc",
                    "$JS.API.DIRECT.GET.OBJ_pcb_image_files.$O.pcb_image_files.M.abc",
                ],
                &[],
            );
        }
        for reader in [StageName::Encoder, StageName::Detector, StageName::Trainer] {
            publishes(
                Identity::Stage(reader),
                &[
                    "$JS.API.DIRECT.GET.OBJ_pcb_image_files.$O.pcb_image_files.M.abc",
                    "$JS.API.CONSUMER.CREATE.OBJ_pcb_image_files",
                    "$JS.FC.OBJ_pcb_image_files.x.y",
                ],
                &["$O.pcb_image_files.C.abc", "$O.pcb_image_files.M.abc"],
            );
        }
        publishes(
            Identity::Stage(StageName::Router),
            &[],
            &["$JS.API.DIRECT.GET.OBJ_pcb_image_files.$O.pcb_image_files.M.abc"],
        );
    }

    #[test]
    fn seeds_are_issued_once_with_mode_0600_and_exposed_ones_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = dir.path().join("identities");
        let a = IdentityStore::ensure(&ids).expect("issued");
        let b = IdentityStore::ensure(&ids).expect("reopened");
        for id in Identity::all().into_iter().filter(|id| id.uses_nkey()) {
            assert!(a.public_key(id).starts_with('U'), "{}", id.name());
            assert_eq!(a.public_key(id), b.public_key(id), "kept across starts");
            let meta = std::fs::metadata(a.seed_file(id)).expect("seed");
            assert_eq!(file_mode(&meta), 0o600, "{}", id.name());
        }
        assert_eq!(file_mode(&std::fs::metadata(&ids).expect("dir")), 0o700);
        let conf = a.users_conf();
        assert!(conf.contains(a.public_key(Identity::Stage(StageName::Encoder))));
        for id in Identity::all().into_iter().filter(|id| id.uses_nkey()) {
            let seed = std::fs::read_to_string(a.seed_file(id)).expect("seed");
            assert!(seed.starts_with("SU"), "{}", id.name());
            assert!(!conf.contains(seed.trim()), "no seed in the server config");
        }
        let seed = a.seed_file(Identity::Reader);
        set_mode(&seed, 0o644).expect("chmod");
        let e = IdentityStore::ensure(&ids).expect_err("exposed");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::write(&seed, "not a seed").expect("write");
        set_mode(&seed, 0o600).expect("chmod");
        let e = IdentityStore::ensure(&ids).expect_err("bad seed");
        assert!(e.to_string().contains("remove it"), "{e}");
    }

    #[test]
    fn line_side_reads_verdicts_over_mqtt_only_with_a_hashed_password() {
        let p = Identity::LineSide.permissions();
        assert!(allows(&p.subscribe, "pcb.verdicts.line-1"));
        for other in [
            "pcb.detections",
            "pcb.images.raw",
            "_INBOX.x",
            "$JS.API.INFO",
        ] {
            assert!(!allows(&p.subscribe, other), "{other}");
        }
        assert!(p.publish.allow.is_empty(), "{:?}", p.publish);
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = dir.path().join("identities");
        let a = IdentityStore::ensure(&ids).expect("issued");
        let file = a.password_file();
        assert_eq!(file_mode(&std::fs::metadata(&file).expect("file")), 0o600);
        let password = std::fs::read_to_string(&file).expect("password");
        let password = password.trim();
        assert_eq!(password.len(), 32);
        let b = IdentityStore::ensure(&ids).expect("reopened");
        assert_eq!(
            std::fs::read_to_string(b.password_file())
                .expect("kept")
                .trim(),
            password
        );
        let conf = a.users_conf();
        assert!(!conf.contains(password), "no password in the server config");
        let line = conf
            .lines()
            .find(|l| l.contains("user: \"line-side\""))
            .expect("the line-side user");
        assert!(
            line.contains("allowed_connection_types: [\"MQTT\"]"),
            "{line}"
        );
        let hash = line
            .split("password: \"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("a hash");
        assert!(hash.starts_with("$2a$10$"), "{hash}");
        assert!(bcrypt::verify(password, hash).expect("verify"));
        set_mode(&file, 0o640).expect("chmod");
        let e = IdentityStore::ensure(&ids).expect_err("exposed");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        write_secret(&file, b"\n").expect("write");
        let e = IdentityStore::ensure(&ids).expect_err("empty");
        assert!(e.to_string().contains("remove it"), "{e}");
    }

    #[test]
    fn the_table_names_each_identitys_reach() {
        let t = identities_markdown();
        assert!(
            t.contains("| `encoder` | `pcb.images.encoded`, `pcb.rejected.encoder` | `_INBOX_encoder.>` | `PCB_IMAGES` (durable `encoder`) | `pcb_image_files` (read) |"),
            "{t}"
        );
        assert!(t.contains("| `reader` | — |"), "{t}");
    }
}
