//! Start-up shared by every stage: provision the streams and open `/metrics`.

use async_nats::jetstream;

use crate::{apply_topology, Metrics, MetricsConfig, Shutdown, Topology};

/// Why a stage could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Streams could not be provisioned.
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
    /// The metrics endpoint could not bind.
    #[error("binding /metrics on {addr}: {source}")]
    Metrics {
        /// Configured address.
        addr: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// Provisions the streams (idempotently) and serves `/metrics`; returns the JetStream
/// context the stage works with.
pub async fn prepare(
    client: &async_nats::Client,
    streams: &Topology,
    metrics: &Metrics,
    metrics_cfg: &MetricsConfig,
    shutdown: &Shutdown,
) -> Result<jetstream::Context, StartError> {
    let js = jetstream::new(client.clone());
    apply_topology(&js, streams).await?;
    metrics
        .serve(metrics_cfg, shutdown.clone())
        .await
        .map_err(|source| StartError::Metrics {
            addr: metrics_cfg.addr.clone(),
            source,
        })?;
    Ok(js)
}
