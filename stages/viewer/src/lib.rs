//! The inspection viewer stage: an HTTP server (axum) for operators and quality engineers,
//! fed live from the detections, images, training and registry streams.

pub mod feeds;
mod guard;
pub mod http;
pub mod index;
pub mod review;
pub mod shadow;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use async_nats::jetstream;
use pcb_common::{Context, NoArgs, Problems, Shutdown, Stage, Validate};
use serde::{Deserialize, Serialize};

pcb_common::declare_stage!(
    /// The viewer stage.
    Viewer = Viewer
);

/// Settings of the viewer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ViewerSettings {
    /// Address the web server binds to (`127.0.0.1:8080`; port 0 picks a free one).
    pub addr: String,
    /// Token that promote and rollback must carry; required when `addr` is not a loopback
    /// address, so the registry cannot be changed from the network without it.
    pub token: String,
    /// Largest page of the board list a request may ask for.
    pub max_page_size: usize,
    /// Largest uploaded image, in bytes.
    pub max_upload_bytes: usize,
    /// Loss points kept per training job for the loss curve (older ones are thinned).
    pub loss_points: usize,
    /// File the viewer writes its URL to once it listens (empty: none); `pcb up` reads it
    /// to print where the viewer is, port 0 included.
    pub url_file: String,
}

impl Default for ViewerSettings {
    fn default() -> Self {
        ViewerSettings {
            addr: "127.0.0.1:8080".into(),
            token: String::new(),
            max_page_size: 500,
            max_upload_bytes: 32 << 20,
            loss_points: 2000,
            url_file: String::new(),
        }
    }
}

/// The viewer's settings, validated.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Required for promote and rollback, when set.
    pub token: Option<String>,
    /// Page size limit.
    pub max_page_size: usize,
    /// Upload size limit.
    pub max_upload_bytes: usize,
    /// Loss points per job.
    pub loss_points: usize,
    /// Where to write the URL once listening.
    pub url_file: Option<std::path::PathBuf>,
}

impl Stage for Viewer {
    type Settings = ViewerSettings;
    type Error = ViewerError;
    type Args = NoArgs;

    async fn run(config: Config, ctx: Context) -> Result<(), ViewerError> {
        run_with(config, ctx.client, ctx.shutdown, None).await
    }
}

impl Validate for ViewerSettings {
    type Config = Options;

    fn validate(self, p: &mut Problems) -> Option<Options> {
        let v = self;
        let addr = match v.addr.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(e) => {
                p.push(
                    "viewer.addr",
                    format!(
                        "{:?} is not an address such as 127.0.0.1:8080 ({e})",
                        v.addr
                    ),
                );
                None
            }
        };
        if let Some(a) = addr {
            p.check(
                !a.ip().is_loopback() && v.token.trim().is_empty(),
                "viewer.token",
                format!(
                    "must be set when the viewer listens on {a}, beyond loopback: promote and \
                     rollback would be open to the network"
                ),
            );
        }
        p.between("viewer.max_page_size", v.max_page_size, 1, 10_000);
        p.at_least("viewer.max_upload_bytes", v.max_upload_bytes, 1024);
        p.at_least("viewer.loss_points", v.loss_points, 10);
        Some(Options {
            addr: addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            token: (!v.token.trim().is_empty()).then(|| v.token.trim().to_string()),
            max_page_size: v.max_page_size,
            max_upload_bytes: v.max_upload_bytes,
            loss_points: v.loss_points,
            url_file: (!v.url_file.is_empty()).then(|| std::path::PathBuf::from(&v.url_file)),
        })
    }
}

/// Why the viewer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ViewerError {
    /// Streams could not be provisioned or `/metrics` not served.
    #[error(transparent)]
    Start(#[from] pcb_common::stage::StartError),
    /// The registry's bucket and object store could not be opened.
    #[error("opening the model registry: {0}")]
    Registry(#[from] pcb_model_store::RegistryError),
    /// The web server could not bind or failed.
    #[error("web server on {addr}: {message}")]
    Serve {
        /// The address.
        addr: String,
        /// What failed.
        message: String,
    },
}

/// A message for the pages' event stream.
#[derive(Debug, Clone)]
pub struct Event {
    /// `detection`, `model` or `progress`.
    pub kind: &'static str,
    /// JSON.
    pub data: String,
}

/// The latest state of one training job.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// Job name.
    pub job: String,
    /// Epoch, 1-based.
    pub epoch: u32,
    /// Epochs.
    pub epochs: u32,
    /// Step in the epoch.
    pub step: u32,
    /// Steps per epoch.
    pub steps: u32,
    /// Loss of the last step.
    pub loss: f64,
    /// Images per second.
    pub images_per_sec: f64,
    /// Last validation mAP.
    pub val_map: Option<f64>,
    /// When last heard of, ms.
    pub updated_at: i64,
    /// Last step of the last epoch reached.
    pub done: bool,
    /// `[global_step, loss]`, thinned to the configured number of points.
    pub losses: Vec<(u64, f64)>,
}

/// What the handlers share.
pub struct State {
    /// The detections index.
    pub index: RwLock<index::Index>,
    /// Shadow versions' answers, compared with the live ones on the Models page.
    pub shadow: RwLock<shadow::ShadowIndex>,
    /// Stream sequences of each image's encoded records, oldest first: the board as it
    /// came, then each label revision; the last is the board's labels now.
    pub images: RwLock<std::collections::HashMap<String, Vec<u64>>>,
    /// Boards corrected in the viewer: image id → the sequence of its latest label revision
    /// and the boxes it saved (0: clean).
    pub corrected: RwLock<std::collections::HashMap<String, (u64, usize)>>,
    /// Training jobs by name.
    pub jobs: RwLock<BTreeMap<String, Job>>,
    /// Live events for the pages.
    pub events: tokio::sync::broadcast::Sender<Event>,
    /// JetStream.
    pub js: jetstream::Context,
    /// The registry.
    pub registry: pcb_model_store::Registry,
    /// Settings.
    pub config: Options,
    /// Prometheus counters.
    pub metrics: pcb_common::Metrics,
    /// Ends the event streams, so a graceful stop does not wait on open pages.
    pub shutdown: Shutdown,
}

/// Serves until `shutdown`; `bound` receives the address actually bound (port 0 picks one).
pub async fn run_with(
    config: Config,
    client: async_nats::Client,
    shutdown: Shutdown,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ViewerError> {
    let metrics = pcb_common::Metrics::new(STAGE.name());
    let js =
        pcb_common::stage::prepare(STAGE, &client, &metrics, &config.metrics, &shutdown).await?;
    let config = config.config;
    let registry = pcb_model_store::Registry::open(&js).await?;
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let state = Arc::new(State {
        index: RwLock::new(index::Index::default()),
        shadow: RwLock::new(Default::default()),
        images: RwLock::new(Default::default()),
        corrected: RwLock::new(Default::default()),
        jobs: RwLock::new(BTreeMap::new()),
        events,
        js,
        registry,
        config: config.clone(),
        metrics,
        shutdown: shutdown.clone(),
    });
    let feeds = feeds::spawn_all(state.clone(), shutdown.clone());
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| ViewerError::Serve {
            addr: config.addr.to_string(),
            message: e.to_string(),
        })?;
    let local = listener.local_addr().map_err(|e| ViewerError::Serve {
        addr: config.addr.to_string(),
        message: e.to_string(),
    })?;
    let url = format!("http://{local}/");
    tracing::info!(url = %url, "viewer listening");
    if let Some(path) = &config.url_file {
        if let Err(e) = std::fs::write(path, &url) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the viewer's URL");
        }
    }
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let app = http::router(state);
    let stop = shutdown.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    for f in feeds {
        f.abort();
    }
    served.map_err(|e| ViewerError::Serve {
        addr: local.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str) -> Result<Config, Problems> {
        let f: FileConfig = toml_of(text);
        f.validate()
    }

    fn toml_of(text: &str) -> FileConfig {
        pcb_common::settings::load_config_from_env(
            Some(&write(text)),
            Vec::<(String, String)>::new(),
        )
        .expect("parses")
    }

    fn write(text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pcb-viewer-test-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("viewer.toml");
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn defaults_bind_loopback_without_a_token() {
        let c = validate("").expect("valid");
        assert_eq!(c.config.addr.to_string(), "127.0.0.1:8080");
        assert!(c.config.token.is_none());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err =
            validate("[viewer]\naddr = \"0.0.0.0:80\"\nmax_page_size = 0\nmax_upload_bytes = 1\n")
                .expect_err("invalid");
        assert_eq!(
            err.keys(),
            [
                "viewer.token",
                "viewer.max_page_size",
                "viewer.max_upload_bytes",
            ]
        );
        let err = validate("[viewer]\naddr = \"nowhere\"\n").expect_err("invalid");
        assert!(err.to_string().contains("viewer.addr"), "{err}");
    }

    #[test]
    fn beyond_loopback_with_a_token_is_fine() {
        let c = validate("[viewer]\naddr = \"0.0.0.0:8080\"\ntoken = \"s3cret\"\n").expect("valid");
        assert_eq!(c.config.token.as_deref(), Some("s3cret"));
    }
}
