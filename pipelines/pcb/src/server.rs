//! A private nats-server with JetStream on a free port and its own store: the embedded
//! default of `pcb up`/`pcb demo`, and the server every cross-stage test starts.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No nats-server binary was found.
    #[error(
        "nats-server not found (looked at $NATS_SERVER, {} and PATH); run deploy/setup.sh \
         (it installs nats-server v{PINNED_VERSION} there)",
        tools_bin().join("nats-server").display()
    )]
    NotFound,
    /// The binary found is older than [`MIN_VERSION`].
    #[error(
        "{bin} is nats-server {version}, older than {}.{}: the pipeline needs a current \
         release; run deploy/setup.sh (it installs nats-server v{PINNED_VERSION} into {}, \
         which is looked at before PATH) or point $NATS_SERVER at a newer one",
        MIN_VERSION.0,
        MIN_VERSION.1,
        tools_bin().display()
    )]
    TooOld {
        /// The binary.
        bin: PathBuf,
        /// The version it reported.
        version: String,
    },
    /// `nats-server --version` failed or named no version.
    #[error(
        "{bin} --version named no version ({output}); run deploy/setup.sh (it installs \
         nats-server v{PINNED_VERSION} into {}) or point $NATS_SERVER at a working one",
        tools_bin().display()
    )]
    Version {
        /// The binary.
        bin: PathBuf,
        /// What it printed, or why it did not run.
        output: String,
    },
    /// No free port.
    #[error("finding a free port: {0}")]
    Port(std::io::Error),
    /// Writing its config or store failed.
    #[error("preparing {path}: {source}")]
    Prepare {
        /// The path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Spawning failed.
    #[error("starting {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// It did not listen in time.
    #[error("nats-server did not accept connections on port {port} within {secs}s; see {log}")]
    NotReady {
        /// The port.
        port: u16,
        /// Seconds waited.
        secs: u64,
        /// Its log file.
        log: PathBuf,
    },
}

/// Largest message the embedded server accepts: an image, its template, both in base64.
pub const MAX_PAYLOAD_BYTES: usize = 8 << 20;

/// A running private nats-server, stopped on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    room: Option<StoreRoom>,
    bin: PathBuf,
    conf: PathBuf,
    log: PathBuf,
}

/// Starts the binary on its config, its output appended to `log`; tied to this process,
/// so the private server goes when its pipeline goes, even on SIGKILL.
fn spawn(bin: &Path, conf: &Path, log: &Path) -> Result<Child, ServerError> {
    let log_file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .map_err(|source| ServerError::Prepare {
            path: log.to_path_buf(),
            source,
        })?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    crate::process::spawn_tied(cmd).map_err(|source| ServerError::Spawn {
        bin: bin.to_path_buf(),
        source,
    })
}

/// The disk under a server's store against what the streams reserve on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreRoom {
    /// Free bytes on the store's file system when the server started.
    pub free_bytes: u64,
    /// What the streams' `max_bytes` add up to.
    pub reserved_bytes: u64,
}

impl StoreRoom {
    /// The `max_file_store` to write: None when nats-server's own default (three quarters
    /// of the free space) already holds the streams. Otherwise the server would refuse to
    /// create them ("insufficient storage resources") although they hold nothing yet; it is
    /// allowed what they reserve, and [`StoreRoom::warning`] says what that risks.
    pub fn max_file_store(&self) -> Option<u64> {
        let wanted = self.reserved_bytes + BUCKET_HEADROOM_BYTES;
        (wanted > self.free_bytes / 4 * 3).then_some(wanted)
    }

    /// What to tell the operator when the streams may hold more than the disk can take.
    pub fn warning(&self, store: &Path) -> Option<String> {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        self.max_file_store().map(|_| {
            format!(
                "the streams may hold up to {:.1} GiB (the pipeline file's [streams.*] \
                 max_bytes) but {} has {:.1} GiB free: if the disk fills first, JetStream \
                 stops taking messages before any stream is full and pushes back; lower \
                 max_bytes in the pipeline file or free space there",
                gib(self.reserved_bytes),
                store.display(),
                gib(self.free_bytes)
            )
        })
    }
}

/// Room beyond the streams' reservations for what has no cap: the buckets (models, the
/// retrain policy's state), which the server still checks against `max_file_store`.
const BUCKET_HEADROOM_BYTES: u64 = 1 << 30;

/// Free bytes on the file system holding `path` (what an unprivileged writer may use).
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain old data; all zeros is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The nats-server release `deploy/setup.sh` installs (`go install
/// github.com/nats-io/nats-server/v2@v2.15.3`).
pub const PINNED_VERSION: &str = "2.15.3";

/// The oldest nats-server (major, minor) the pipeline starts.
pub const MIN_VERSION: (u32, u32) = (2, 10);

/// The project-local bin folder `deploy/setup.sh` installs nats-server and the `nats`
/// CLI into: `<root>/.tools/bin`.
pub fn tools_bin() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    // pipelines/pcb -> the workspace root.
    let root = manifest.ancestors().nth(2).unwrap_or(manifest);
    root.join(".tools").join("bin")
}

/// The nats-server binary to run: `$NATS_SERVER`, else `<root>/.tools/bin/nats-server`,
/// else the first on `PATH`.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let local = tools_bin().join("nats-server");
    if local.is_file() {
        return Some(local);
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join("nats-server"))
        .find(|c| c.is_file())
}

/// The first `major.minor.patch` in `text` (`nats-server: v2.15.3` -> (2, 15, 3)).
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find_map(|word| {
            let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
            match (parts.next(), parts.next(), parts.next()) {
                (Some(Some(a)), Some(Some(b)), Some(Some(c))) => Some((a, b, c)),
                _ => None,
            }
        })
}

/// Runs `bin --version` and refuses a server older than [`MIN_VERSION`]; returns the
/// version it reported (`2.15.3`).
pub fn check_version(bin: &Path) -> Result<String, ServerError> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ServerError::Version {
            bin: bin.to_path_buf(),
            output: e.to_string(),
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(ServerError::Version {
            bin: bin.to_path_buf(),
            output: format!("{}: {}", out.status, text.trim()),
        });
    }
    judge_version(bin, &text)
}

/// The version in `printed` (what `bin --version` printed) when it is at least
/// [`MIN_VERSION`].
fn judge_version(bin: &Path, printed: &str) -> Result<String, ServerError> {
    let Some((major, minor, patch)) = parse_version(printed) else {
        return Err(ServerError::Version {
            bin: bin.to_path_buf(),
            output: printed.trim().to_string(),
        });
    };
    let version = format!("{major}.{minor}.{patch}");
    if (major, minor) < MIN_VERSION {
        return Err(ServerError::TooOld {
            bin: bin.to_path_buf(),
            version,
        });
    }
    Ok(version)
}

/// A port nobody listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How a private server runs, beyond its folder and port.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions<'a> {
    /// Admit only these identities, each with its permissions (None: no authentication).
    pub identities: Option<&'a pcb_common::IdentityStore>,
    /// JetStream's `sync_interval` (`always`, or a duration such as `2m`); None: the
    /// server's default (2 minutes).
    pub sync_interval: Option<String>,
    /// More lines of server config (accounts, an `authorization` block, ...).
    pub extra_conf: String,
    /// Bytes the streams will reserve on the store (None: what the default topology's
    /// do): the server is allowed at least that much, whatever the disk has free.
    pub reserve_bytes: Option<u64>,
    /// This server as a node of a cluster ([`NatsCluster`]); None: a single server.
    pub cluster: Option<ClusterNode>,
    /// The port of its MQTT listener on 127.0.0.1, for line-side systems (None: no MQTT).
    pub mqtt_port: Option<u16>,
}

/// The URLs of `servers`, comma-separated: what a client is given to reach any of them.
pub fn urls(servers: &[NatsServer]) -> String {
    servers
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",")
}

/// One node of a private cluster on loopback.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// Its server name, unique in the cluster (JetStream's peer name).
    pub name: String,
    /// The port its cluster routes listen on.
    pub route_port: u16,
    /// The route ports of the other nodes.
    pub peers: Vec<u16>,
    /// The secret the nodes' routes authenticate with (the config holding it is 0600).
    pub secret: String,
}

impl ClusterNode {
    fn conf(&self) -> String {
        let routes: Vec<String> = self
            .peers
            .iter()
            .map(|p| format!("    \"nats-route://route:{}@127.0.0.1:{p}\"", self.secret))
            .collect();
        format!(
            "server_name: {}\ncluster {{\n  name: pcb\n  listen: 127.0.0.1:{}\n  \
             authorization {{\n    user: route\n    password: \"{}\"\n  }}\n  \
             routes: [\n{}\n  ]\n}}\n",
            self.name,
            self.route_port,
            self.secret,
            routes.join("\n")
        )
    }
}

/// Private servers on loopback forming one JetStream cluster: each node with its own
/// folder (`<dir>/n<i>`: config, log, store), client port and route port; streams and
/// buckets replicated up to the node count. Clients take [`NatsCluster::url`], the list of
/// every node's URL, and move to another node when theirs goes.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes under `dir` with `opts` (its `cluster` is set per node).
    pub fn start(dir: &Path, n: usize, opts: &ServerOptions) -> Result<NatsCluster, ServerError> {
        let ports = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<std::io::Result<Vec<(u16, u16)>>>()
            .map_err(ServerError::Port)?;
        let secret = {
            use rand::RngCore as _;
            let mut bytes = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            hex::encode(bytes)
        };
        let mut nodes = Vec::new();
        for (i, (port, route_port)) in ports.iter().enumerate() {
            let node = ClusterNode {
                name: format!("pcb-n{}", i + 1),
                route_port: *route_port,
                peers: ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, (_, r))| *r)
                    .collect(),
                secret: secret.clone(),
            };
            // Each node has an MQTT listener of its own: a PLC may use any of them.
            let o = ServerOptions {
                cluster: Some(node),
                mqtt_port: opts.mqtt_port.map(|p| p + i as u16),
                ..opts.clone()
            };
            nodes.push(NatsServer::spawn_opts(
                &dir.join(format!("n{}", i + 1)),
                *port,
                &o,
            )?);
        }
        for node in &mut nodes {
            node.wait_ready()?;
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's URL, comma-separated.
    pub fn url(&self) -> String {
        urls(&self.nodes)
    }

    /// Its nodes.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Takes the nodes (each stops when dropped).
    pub fn into_nodes(self) -> Vec<NatsServer> {
        self.nodes
    }
}

impl NatsServer {
    /// Starts a server storing under `dir` (created if missing) on `port` (0: a free one).
    pub fn start(dir: &Path, port: u16) -> Result<NatsServer, ServerError> {
        NatsServer::start_opts(dir, port, &ServerOptions::default())
    }

    /// [`NatsServer::start`] with authentication on: only the identities of `ids` connect,
    /// each with the permissions the topology table gives it (`pcb-users.conf` beside the
    /// server's config holds their public keys and permissions).
    pub fn start_secured(
        dir: &Path,
        port: u16,
        ids: &pcb_common::IdentityStore,
    ) -> Result<NatsServer, ServerError> {
        NatsServer::start_opts(
            dir,
            port,
            &ServerOptions {
                identities: Some(ids),
                ..ServerOptions::default()
            },
        )
    }

    /// [`NatsServer::start`] with more lines of server config (an `authorization` block,
    /// accounts, ...).
    pub fn start_with(dir: &Path, port: u16, extra_conf: &str) -> Result<NatsServer, ServerError> {
        NatsServer::start_opts(
            dir,
            port,
            &ServerOptions {
                extra_conf: extra_conf.to_string(),
                ..ServerOptions::default()
            },
        )
    }

    /// Starts a server with `opts`.
    pub fn start_opts(
        dir: &Path,
        port: u16,
        opts: &ServerOptions,
    ) -> Result<NatsServer, ServerError> {
        let mut server = NatsServer::spawn_opts(dir, port, opts)?;
        server.wait_ready()?;
        Ok(server)
    }

    /// Writes the config and starts the process, without waiting for it to listen.
    fn spawn_opts(dir: &Path, port: u16, opts: &ServerOptions) -> Result<NatsServer, ServerError> {
        let prep = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ServerError::Prepare { path, source }
        };
        std::fs::create_dir_all(dir).map_err(prep(dir))?;
        let mut extra = opts.extra_conf.clone();
        if let Some(ids) = opts.identities {
            let users = dir.join("pcb-users.conf");
            // Public keys and one bcrypt hash: still nobody else's to read.
            pcb_common::identity::write_secret(&users, ids.users_conf().as_bytes())
                .map_err(prep(&users))?;
            // An include is resolved beside the config that names it.
            extra.push_str(
                "\ninclude \"pcb-users.conf\"\nauthorization {\n  users: $PCB_USERS\n}\n",
            );
        }
        let sync = match &opts.sync_interval {
            Some(s) => format!("  sync_interval: {s}\n"),
            None => String::new(),
        };
        let bin = find_binary().ok_or(ServerError::NotFound)?;
        check_version(&bin)?;
        let port = if port == 0 {
            free_port().map_err(ServerError::Port)?
        } else {
            port
        };
        let store = dir.join("jetstream");
        std::fs::create_dir_all(&store).map_err(prep(&store))?;
        let reserved_bytes = opts
            .reserve_bytes
            .unwrap_or_else(|| pcb_common::Topology::default().reserved_file_bytes());
        let room = match free_bytes(&store) {
            Ok(free_bytes) => Some(StoreRoom {
                free_bytes,
                reserved_bytes,
            }),
            Err(e) => {
                tracing::debug!(store = %store.display(), error = %e, "free space unknown");
                None
            }
        };
        let max_store = match room.and_then(|r| r.max_file_store()) {
            Some(b) => format!("  max_file_store: {b}\n"),
            None => String::new(),
        };
        let conf = dir.join("nats-server.conf");
        let mut cluster = opts
            .cluster
            .as_ref()
            .map(ClusterNode::conf)
            .unwrap_or_default();
        if let Some(mqtt) = opts.mqtt_port {
            // MQTT keeps its sessions in JetStream, which wants the server named.
            if opts.cluster.is_none() {
                cluster.push_str("server_name: pcb\n");
            }
            cluster.push_str(&format!("mqtt {{\n  listen: 127.0.0.1:{mqtt}\n}}\n"));
        }
        let text = format!(
            "# Written by pcb: a private JetStream server for one pipeline.\n\
             listen: 127.0.0.1:{port}\n\
             max_payload: {MAX_PAYLOAD_BYTES}\n\
             jetstream {{\n  store_dir: {:?}\n{sync}{max_store}}}\n{cluster}{extra}\n",
            store.display().to_string()
        );
        // Readable by its owner only: a cluster's config holds the routes' secret.
        pcb_common::identity::write_secret(&conf, text.as_bytes()).map_err(prep(&conf))?;
        let log = dir.join("nats-server.log");
        // A fresh log per start; a restart appends to it.
        std::fs::File::create(&log).map_err(prep(&log))?;
        Ok(NatsServer {
            child: spawn(&bin, &conf, &log)?,
            port,
            dir: dir.to_path_buf(),
            room,
            bin,
            conf,
            log,
        })
    }

    /// Waits until it accepts connections (15 s at most).
    fn wait_ready(&mut self) -> Result<(), ServerError> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(ServerError::NotReady {
            port: self.port,
            secs: 15,
            log: self.log.clone(),
        })
    }

    /// When the server has exited (killed, crashed), starts it again on the same port,
    /// config and store, so that clients reconnect to what they left, and returns how it
    /// had exited; None while it runs.
    pub fn restart_if_exited(&mut self) -> Result<Option<std::process::ExitStatus>, ServerError> {
        let Ok(Some(status)) = self.child.try_wait() else {
            return Ok(None);
        };
        self.child = spawn(&self.bin, &self.conf, &self.log)?;
        self.wait_ready()?;
        Ok(Some(status))
    }

    /// Its config file.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its directory (config, log, store).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The warning when its streams may hold more than its disk has free.
    pub fn room_warning(&self) -> Option<String> {
        self.room
            .and_then(|r| r.warning(&self.dir.join("jetstream")))
    }

    /// Stops it gracefully (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        crate::process::terminate(&mut self.child, Duration::from_secs(5));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_what_the_server_prints() {
        assert_eq!(parse_version("nats-server: v2.15.3\n"), Some((2, 15, 3)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("nats-server: v2.11.0-RC.1"), Some((2, 11, 0)));
        assert_eq!(parse_version("nats-server: development"), None);
    }

    #[test]
    fn an_old_server_is_refused_with_its_version_and_the_fix() {
        let bin = Path::new("/usr/sbin/nats-server");
        let err = judge_version(bin, "nats-server: v2.9.10\n")
            .expect_err("2.9 is refused")
            .to_string();
        for needle in [
            "/usr/sbin/nats-server is nats-server 2.9.10",
            "older than 2.10",
            "deploy/setup.sh",
            ".tools/bin",
            "v2.15.3",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in {err}");
        }
        assert_eq!(
            judge_version(bin, "nats-server: v2.15.3\n").expect("2.15 runs"),
            "2.15.3"
        );
        let err = judge_version(bin, "nats-server: development").expect_err("no version");
        assert!(err.to_string().contains("named no version"), "{err}");
    }

    #[test]
    fn the_server_is_allowed_what_the_streams_reserve_when_the_disk_is_short() {
        const GIB: u64 = 1 << 30;
        // Plenty of room: nats-server's own default (3/4 of the free space) holds 16 GiB.
        let roomy = StoreRoom {
            free_bytes: 100 * GIB,
            reserved_bytes: 16 * GIB,
        };
        assert_eq!(roomy.max_file_store(), None);
        assert_eq!(roomy.warning(Path::new("/s")), None);
        // 20 GiB free allows 15: the streams would be refused; they get their 16 and 1 for
        // the buckets, with a warning.
        let short = StoreRoom {
            free_bytes: 20 * GIB,
            reserved_bytes: 16 * GIB,
        };
        assert_eq!(short.max_file_store(), Some(17 * GIB));
        let w = short
            .warning(Path::new("/data/nats/jetstream"))
            .expect("warned");
        for needle in [
            "16.0 GiB",
            "/data/nats/jetstream has 20.0 GiB free",
            "max_bytes",
        ] {
            assert!(w.contains(needle), "missing {needle:?} in {w}");
        }
    }

    #[test]
    fn free_space_is_read_from_the_file_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(free_bytes(dir.path()).expect("statvfs") > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn not_found_names_every_place_looked_at() {
        let text = ServerError::NotFound.to_string();
        for needle in [
            "$NATS_SERVER",
            ".tools/bin/nats-server",
            "PATH",
            "deploy/setup.sh",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
    }
}
