//! The daemon's connection to its sink: one long-lived link shared by every group, connected
//! when a cycle first needs it and connected again (by the next cycle that needs it) after it
//! broke. Each link gets a new id, so groups know to open their disks on it afresh.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::link::{Link, LinkConfig};
use crate::AgentError;

pub struct Links {
    cfg: LinkConfig,
    current: tokio::sync::Mutex<Option<(u64, Link)>>,
    next_id: AtomicU64,
}

impl Links {
    pub fn new(cfg: LinkConfig) -> Self {
        Links { cfg, current: tokio::sync::Mutex::new(None), next_id: AtomicU64::new(1) }
    }

    /// The working link (and its id), connecting if there is none.
    pub async fn get(&self) -> Result<(u64, Link), AgentError> {
        let mut cur = self.current.lock().await;
        if let Some((id, link)) = cur.as_ref() {
            if !link.is_broken() {
                return Ok((*id, link.clone()));
            }
        }
        let link = Link::connect(&self.cfg).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!(sink = %self.cfg.sink, link = id, "connected to the sink");
        *cur = Some((id, link.clone()));
        Ok((id, link))
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
