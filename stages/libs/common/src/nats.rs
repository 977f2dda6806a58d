//! NATS connection from config: plain, user/password, token, nkey seed, creds file, TLS.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::Problems;

/// How to reach and authenticate to NATS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (`nats://host:4222`, `tls://host:4222`).
    pub url: String,
    /// User name for user/password authentication.
    pub user: Option<String>,
    /// Password for user/password authentication.
    pub password: Option<String>,
    /// Token for token authentication.
    pub token: Option<String>,
    /// File holding an nkey seed (`SU...`) for nkey authentication.
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT and seed) for decentralised authentication.
    pub creds_file: Option<PathBuf>,
    /// Prefix of this client's reply subjects (`_INBOX` when unset). The identities `pcb`
    /// issues may subscribe only to their own (`_INBOX_<identity>`).
    pub inbox_prefix: Option<String>,
    /// Require TLS even for `nats://` URLs.
    pub tls_required: bool,
    /// PEM file of the CA(s) that signed the server certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub tls_key_file: Option<PathBuf>,
    /// Give up connecting after this many seconds.
    pub connect_timeout_secs: u64,
    /// Timeout of JetStream API requests and publish acks, in seconds.
    pub request_timeout_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            token: None,
            nkey_seed_file: None,
            creds_file: None,
            inbox_prefix: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            connect_timeout_secs: 10,
            request_timeout_secs: 10,
        }
    }
}

impl NatsConfig {
    /// Whether it names a credential (user/password, token, nkey seed or creds file).
    pub fn has_credentials(&self) -> bool {
        self.user.is_some()
            || self.token.is_some()
            || self.nkey_seed_file.is_some()
            || self.creds_file.is_some()
    }

    /// Adds this section's problems (prefixed with `section`) to `p`.
    pub fn validate(&self, section: &str, p: &mut Problems) {
        p.check(
            self.url.trim().is_empty(),
            &format!("{section}.url"),
            "is empty",
        );
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.nkey_seed_file.is_some(),
            self.creds_file.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        p.check(
            methods > 1,
            section,
            "set only one of user/password, token, nkey_seed_file, creds_file",
        );
        p.check(
            self.user.is_some() != self.password.is_some(),
            &format!("{section}.password"),
            "user and password go together",
        );
        p.check(
            self.tls_cert_file.is_some() != self.tls_key_file.is_some(),
            &format!("{section}.tls_key_file"),
            "tls_cert_file and tls_key_file go together",
        );
        for (key, file) in [
            ("nkey_seed_file", &self.nkey_seed_file),
            ("creds_file", &self.creds_file),
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if let Some(f) = file {
                p.check(
                    !f.exists(),
                    &format!("{section}.{key}"),
                    format!("{} does not exist", f.display()),
                );
            }
        }
        if let Some(prefix) = &self.inbox_prefix {
            p.check(
                prefix.is_empty()
                    || prefix
                        .chars()
                        .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>')),
                &format!("{section}.inbox_prefix"),
                "must be one subject token (no spaces, dots or wildcards)",
            );
        }
        p.check(
            self.connect_timeout_secs == 0,
            &format!("{section}.connect_timeout_secs"),
            "must be at least 1",
        );
        p.check(
            self.request_timeout_secs == 0,
            &format!("{section}.request_timeout_secs"),
            "must be at least 1",
        );
    }
}

/// Why connecting to NATS failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// A credential file could not be read.
    #[error("reading {what} {path}: {source}")]
    ReadCredential {
        /// Which credential.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The server could not be reached or refused the credentials.
    #[error("connecting to NATS at {url}: {source}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Underlying error.
        source: async_nats::ConnectError,
    },
}

/// Connects to NATS as `name` (shown in the server's connection list). A stage keeps
/// trying in the background when the server is not up yet (it may start after the stage).
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, NatsError> {
    connect_with(cfg, name, true).await
}

/// [`connect`] for a command: one attempt, so a refusal (a wrong password, an unknown
/// user) is reported at once instead of as timeouts later.
pub async fn connect_now(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, NatsError> {
    connect_with(cfg, name, false).await
}

async fn connect_with(
    cfg: &NatsConfig,
    name: &str,
    retry: bool,
) -> Result<async_nats::Client, NatsError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(cfg.connect_timeout_secs.max(1)))
        .request_timeout(Some(Duration::from_secs(cfg.request_timeout_secs.max(1))));
    if retry {
        opts = opts.retry_on_initial_connect();
    }
    let mut opts = opts.event_callback(|event| async move {
        match event {
            async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
            async_nats::Event::Connected => tracing::info!("connected to NATS"),
            other => tracing::debug!(event = %other, "NATS event"),
        }
    });
    if let (Some(user), Some(password)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &cfg.token {
        opts = opts.token(token.clone());
    }
    if let Some(path) = &cfg.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|source| NatsError::ReadCredential {
            what: "nkey seed",
            path: path.clone(),
            source,
        })?;
        opts = opts.nkey(seed.trim().to_string());
    }
    if let Some(path) = &cfg.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|source| NatsError::ReadCredential {
                what: "creds file",
                path: path.clone(),
                source,
            })?;
    }
    if let Some(prefix) = &cfg.inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix);
    }
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let urls: Vec<String> = cfg
        .url
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    // A list, not one string: each URL is tried (a cluster's nodes).
    let connect = opts.connect(urls);
    // retry_on_initial_connect would wait forever for a wrong URL; bound it.
    match tokio::time::timeout(
        Duration::from_secs(cfg.connect_timeout_secs.max(1)),
        connect,
    )
    .await
    {
        Ok(res) => res.map_err(|source| NatsError::Connect {
            url: cfg.url.clone(),
            source,
        }),
        Err(_) => Err(NatsError::Connect {
            url: cfg.url.clone(),
            source: async_nats::ConnectError::from(async_nats::ConnectErrorKind::TimedOut),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_reports_every_problem() {
        let cfg = NatsConfig {
            url: " ".into(),
            user: Some("u".into()),
            token: Some("t".into()),
            tls_cert_file: Some("/nonexistent.pem".into()),
            connect_timeout_secs: 0,
            ..NatsConfig::default()
        };
        let mut p = Problems::default();
        cfg.validate("nats", &mut p);
        let text = p.to_string();
        for needle in [
            "nats.url: is empty",
            "set only one of",
            "nats.password: user and password go together",
            "nats.tls_key_file",
            "nats.tls_cert_file: /nonexistent.pem does not exist",
            "nats.connect_timeout_secs",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
    }

    #[test]
    fn default_is_valid() {
        let mut p = Problems::default();
        NatsConfig::default().validate("nats", &mut p);
        assert!(p.0.is_empty(), "{p}");
    }
}
