//! How both daemons learn they should stop: SIGTERM (systemd, Kubernetes) or SIGINT (Ctrl-C),
//! whichever comes first.

/// Resolves on SIGTERM or SIGINT. Where SIGTERM cannot be watched, on SIGINT alone.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); only Ctrl-C stops this process cleanly");
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await
            }
        }
    }
}
