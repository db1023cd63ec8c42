//! The daemon's connection to its sink: one long-lived link shared by every group, connected
//! when a cycle first needs it and connected again (by the next cycle that needs it) after it
//! broke. Each link gets a new id, so groups know to open their disks on it afresh. While the
//! sink is unreachable, connection attempts are spaced by a short backoff (capped at
//! `MAX_RETRY`) that all groups share: a restarted sink is reached within seconds, and a fleet
//! of groups does not hammer it with one attempt each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::link::{Link, LinkConfig};
use crate::AgentError;

/// First wait after a failed connection attempt; it doubles up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(1);

pub struct Links {
    cfg: LinkConfig,
    current: tokio::sync::Mutex<Option<(u64, Link)>>,
    next_id: AtomicU64,
    retry: Mutex<Retry>,
}

/// Failed connection attempts in a row, when the next may be made, and why the last failed.
#[derive(Default)]
struct Retry {
    failures: u32,
    not_before: Option<Instant>,
    last: String,
}

impl Links {
    pub fn new(cfg: LinkConfig) -> Self {
        Links {
            cfg,
            current: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            retry: Mutex::new(Retry::default()),
        }
    }

    /// The working link (and its id), connecting if there is none.
    pub async fn get(&self) -> Result<(u64, Link), AgentError> {
        let mut cur = self.current.lock().await;
        if let Some((id, link)) = cur.as_ref() {
            if !link.is_broken() {
                return Ok((*id, link.clone()));
            }
        }
        {
            let r = self.retry.lock().unwrap_or_else(|p| p.into_inner());
            if r.not_before.is_some_and(|t| Instant::now() < t) {
                return Err(AgentError::Connect { sink: self.cfg.sink.clone(), reason: r.last.clone() });
            }
        }
        let link = match Link::connect(&self.cfg).await {
            Ok(link) => link,
            Err(e) => {
                let mut r = self.retry.lock().unwrap_or_else(|p| p.into_inner());
                r.failures += 1;
                let wait = FIRST_RETRY.saturating_mul(1 << (r.failures - 1).min(8)).min(MAX_RETRY);
                r.not_before = Some(Instant::now() + wait);
                r.last = e.to_string();
                return Err(e);
            }
        };
        *self.retry.lock().unwrap_or_else(|p| p.into_inner()) = Retry::default();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!(sink = %self.cfg.sink, link = id, "connected to the sink");
        *cur = Some((id, link.clone()));
        Ok((id, link))
    }

    /// How long a group whose cycle failed with the link should wait before trying again: until
    /// the next connection attempt is due (at least `FIRST_RETRY`).
    pub fn retry_in(&self) -> Duration {
        let r = self.retry.lock().unwrap_or_else(|p| p.into_inner());
        r.not_before.map(|t| t.saturating_duration_since(Instant::now())).unwrap_or_default().max(FIRST_RETRY)
    }

    /// Forget link `id` (it broke): the next `get` connects again.
    pub async fn drop_broken(&self, id: u64) {
        let mut cur = self.current.lock().await;
        if cur.as_ref().is_some_and(|(i, _)| *i == id) {
            *cur = None;
        }
    }

    pub async fn close(&self) {
        if let Some((_, link)) = self.current.lock().await.take() {
            link.close().await;
        }
    }
}
