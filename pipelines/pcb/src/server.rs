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
    #[error("nats-server not found (looked at $NATS_SERVER, PATH and /usr/sbin/nats-server); run deploy/setup.sh")]
    NotFound,
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
}

/// The nats-server binary to run.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let c = dir.join("nats-server");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    let debian = PathBuf::from("/usr/sbin/nats-server");
    debian.is_file().then_some(debian)
}

/// A port nobody listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl NatsServer {
    /// Starts a server storing under `dir` (created if missing) on `port` (0: a free one).
    pub fn start(dir: &Path, port: u16) -> Result<NatsServer, ServerError> {
        NatsServer::start_with(dir, port, "")
    }

    /// [`NatsServer::start`] with more lines of server config (an `authorization` block,
    /// accounts, ...).
    pub fn start_with(dir: &Path, port: u16, extra_conf: &str) -> Result<NatsServer, ServerError> {
        let bin = find_binary().ok_or(ServerError::NotFound)?;
        let port = if port == 0 {
            free_port().map_err(ServerError::Port)?
        } else {
            port
        };
        let prep = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ServerError::Prepare { path, source }
        };
        let store = dir.join("jetstream");
        std::fs::create_dir_all(&store).map_err(prep(&store))?;
        let conf = dir.join("nats-server.conf");
        let text = format!(
            "# Written by pcb: a private JetStream server for one pipeline.\n\
             listen: 127.0.0.1:{port}\n\
             max_payload: {MAX_PAYLOAD_BYTES}\n\
             jetstream {{\n  store_dir: {:?}\n}}\n{extra_conf}\n",
            store.display().to_string()
        );
        std::fs::write(&conf, text).map_err(prep(&conf))?;
        let log = dir.join("nats-server.log");
        let log_file = std::fs::File::create(&log).map_err(prep(&log))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // The private server goes when its pipeline goes, even on SIGKILL.
        let child = crate::process::spawn_tied(cmd).map_err(|source| ServerError::Spawn {
            bin: bin.clone(),
            source,
        })?;
        let mut server = NatsServer {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            if let Ok(Some(_)) = server.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(ServerError::NotReady {
            port,
            secs: 15,
            log,
        })
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
