//! Graceful shutdown: one token cancelled by Ctrl-C or SIGTERM (or by a test).

use tokio_util::sync::CancellationToken;

/// A cloneable shutdown signal.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// A signal nothing has triggered yet.
    pub fn new() -> Self {
        Shutdown(CancellationToken::new())
    }

    /// A signal triggered by Ctrl-C or SIGTERM.
    pub fn on_signals() -> Self {
        let s = Shutdown::new();
        let trigger = s.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested, finishing in-flight work");
            trigger.trigger();
        });
        s
    }

    /// Triggers the shutdown.
    pub fn trigger(&self) {
        self.0.cancel();
    }

    /// Whether shutdown was triggered.
    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once shutdown is triggered.
    pub async fn cancelled(&self) {
        self.0.cancelled().await
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clones_see_the_trigger() {
        let a = Shutdown::new();
        let b = a.clone();
        assert!(!b.is_triggered());
        a.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(1), b.cancelled())
            .await
            .expect("clone was not cancelled");
        assert!(b.is_triggered());
    }
}
