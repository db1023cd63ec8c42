//! Whether a session makes progress. Every frame from the agent, and every step of the sink's
//! own work for it (items written, acknowledgements, long requests), counts; QUIC keep-alives do
//! not, so a client that is connected but silent — or stuck — loses its session and the targets
//! it holds after the idle timeout, instead of keeping them forever.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub struct Liveness {
    started: Instant,
    /// Milliseconds since `started` of the last progress.
    last: AtomicU64,
    /// Sink-side operations running for this session (the agent waits for them meanwhile).
    busy: AtomicUsize,
}

/// Marks the session busy while held.
pub struct Busy(Arc<Liveness>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Liveness {
    pub fn new() -> Arc<Self> {
        Arc::new(Liveness { started: Instant::now(), last: AtomicU64::new(0), busy: AtomicUsize::new(0) })
    }

    /// Something happened.
    pub fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// The sink is working for the session until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// How long nothing has happened (zero while the sink is busy).
    pub fn idle(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }

    /// Resolves once the session has been idle for `limit`.
    pub async fn expired(&self, limit: Duration) {
        let step = (limit / 4).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(step).await;
            if self.idle() >= limit {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn progress_and_busy_keep_a_session_alive() {
        let l = Liveness::new();
        let limit = Duration::from_secs(4);
        tokio::time::sleep(Duration::from_secs(3)).await;
        l.touch();
        let b = l.busy();
        // Busy for longer than the limit: not expired.
        assert!(tokio::time::timeout(Duration::from_secs(10), l.expired(limit)).await.is_err());
        drop(b);
        let t = tokio::time::Instant::now();
        l.expired(limit).await;
        assert!(t.elapsed() >= limit);
    }
}
