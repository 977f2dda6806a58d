//! Prometheus metrics of a stage and the `/metrics` endpoint that serves them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::shutdown::Shutdown;

/// Where `/metrics` is served.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Listen address of `/metrics` (`127.0.0.1:9101`; port 0 picks a free one; empty
    /// disables the endpoint).
    pub addr: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            addr: "127.0.0.1:0".into(),
        }
    }
}

impl MetricsConfig {
    /// Adds this section's problems to `p`.
    pub fn validate(&self, section: &str, p: &mut crate::Problems) {
        p.check(
            !self.addr.is_empty() && self.addr.parse::<SocketAddr>().is_err(),
            &format!("{section}.addr"),
            format!(
                "{:?} is not a socket address like 127.0.0.1:9101",
                self.addr
            ),
        );
    }
}

type Labels = Vec<(String, String)>;

/// A stage's metrics; clones share the same counters.
#[derive(Clone)]
pub struct Metrics {
    stage: String,
    registry: Arc<Mutex<Registry>>,
    messages: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    processing: Family<Labels, Histogram>,
    backpressure: Family<Labels, prometheus_client::metrics::gauge::Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("stage", &self.stage)
            .finish()
    }
}

impl Metrics {
    /// Fresh metrics for `stage`.
    pub fn new(stage: &str) -> Self {
        let mut registry = Registry::with_prefix("pcb");
        let messages = Family::<Labels, Counter>::default();
        let rejected = Family::<Labels, Counter>::default();
        let processing = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(
                [
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]
                .into_iter(),
            )
        });
        registry.register(
            "messages",
            "Messages or files handled, by stage and outcome",
            messages.clone(),
        );
        registry.register(
            "rejected",
            "Inputs dead-lettered, by stage and reason",
            rejected.clone(),
        );
        registry.register(
            "processing_seconds",
            "Time to handle one message or file",
            processing.clone(),
        );
        let backpressure = Family::<Labels, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "backpressure",
            "1 while the stage's output stream is full and it holds its input back",
            backpressure.clone(),
        );
        Metrics {
            stage: stage.to_string(),
            registry: Arc::new(Mutex::new(registry)),
            messages,
            rejected,
            processing,
            backpressure,
        }
    }

    fn labels(&self, key: &str, value: &str) -> Labels {
        vec![
            ("stage".into(), self.stage.clone()),
            (key.into(), value.into()),
        ]
    }

    /// Counts one input with `outcome` (`done`, `duplicate`, `rejected`, ...).
    pub fn count(&self, outcome: &str) {
        self.messages
            .get_or_create(&self.labels("outcome", outcome))
            .inc();
    }

    /// Counts one dead letter with `reason_code`.
    pub fn count_rejection(&self, reason_code: &str) {
        self.rejected
            .get_or_create(&self.labels("reason", reason_code))
            .inc();
    }

    /// Sets the back-pressure gauge: `true` while the output stream refuses records for
    /// being full, `false` once one is stored again.
    pub fn set_backpressure(&self, on: bool) {
        self.backpressure
            .get_or_create(&vec![("stage".into(), self.stage.clone())])
            .set(i64::from(on));
    }

    /// The back-pressure gauge (1 while held back).
    pub fn backpressure(&self) -> i64 {
        self.backpressure
            .get_or_create(&vec![("stage".into(), self.stage.clone())])
            .get()
    }

    /// Records how long one input took.
    pub fn observe_processing(&self, took: Duration) {
        self.processing
            .get_or_create(&vec![("stage".into(), self.stage.clone())])
            .observe(took.as_secs_f64());
    }

    /// The current value of the `outcome` counter.
    pub fn get(&self, outcome: &str) -> u64 {
        self.messages
            .get_or_create(&self.labels("outcome", outcome))
            .get()
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = match self.registry.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }

    /// Serves `/metrics` on `cfg.addr` until `shutdown`; returns the bound address
    /// (`None` when disabled).
    pub async fn serve(
        &self,
        cfg: &MetricsConfig,
        shutdown: Shutdown,
    ) -> std::io::Result<Option<SocketAddr>> {
        if cfg.addr.is_empty() {
            return Ok(None);
        }
        let listener = tokio::net::TcpListener::bind(&cfg.addr).await?;
        let addr = listener.local_addr()?;
        let me = self.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let me = me.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        me.render(),
                    )
                }
            }),
        );
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "metrics endpoint stopped");
            }
        });
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        Ok(Some(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_as_prometheus_text() {
        let m = Metrics::new("encoder");
        m.count("done");
        m.count("done");
        m.count_rejection("not-an-image");
        m.observe_processing(Duration::from_millis(3));
        let text = m.render();
        assert!(
            text.contains(r#"pcb_messages_total{stage="encoder",outcome="done"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pcb_rejected_total{stage="encoder",reason="not-an-image"} 1"#),
            "{text}"
        );
        assert!(text.contains("pcb_processing_seconds_count"), "{text}");
        assert_eq!(m.get("done"), 2);
    }

    #[tokio::test]
    async fn endpoint_serves_metrics() {
        let m = Metrics::new("router");
        m.count("skipped");
        let shutdown = Shutdown::new();
        let addr = m
            .serve(&MetricsConfig::default(), shutdown.clone())
            .await
            .expect("bind")
            .expect("enabled");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut body = String::new();
        stream.read_to_string(&mut body).await.expect("read");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains(r#"outcome="skipped"} 1"#), "{body}");
        shutdown.trigger();
    }
}
