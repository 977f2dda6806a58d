//! `tracing` set-up shared by every binary: `RUST_LOG`-style filters, text or JSON lines.

use serde::{Deserialize, Serialize};

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Filter in `RUST_LOG` syntax (`info`, `pcb_encoder=debug`); `RUST_LOG` wins when set.
    pub filter: String,
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl LogConfig {
    /// Adds this section's problems to `p`.
    pub fn validate(&self, section: &str, p: &mut crate::Problems) {
        p.check(
            tracing_subscriber::EnvFilter::try_new(&self.filter).is_err(),
            &format!("{section}.filter"),
            format!("{:?} is not a valid filter", self.filter),
        );
    }
}

/// Installs the global subscriber, writing to stderr. Calling it twice is harmless.
pub fn init_tracing(cfg: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if cfg.format == LogFormat::Json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
