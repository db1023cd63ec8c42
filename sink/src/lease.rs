//! Exclusive use of a target: one session writes a target at a time. A second session of the
//! same agent (it restarted and reconnected before the old connection timed out) replaces the
//! old one; any other agent is told who holds the target.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockship_proto::pb::ErrorCode;
use tokio::sync::watch;

use crate::refusal::Refusal;

/// How long a reconnecting agent waits for its old session to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(30);

struct Holder {
    id: u64,
    agent: String,
    conn: Option<quinn::Connection>,
    released: watch::Receiver<()>,
}

#[derive(Default)]
pub struct Leases {
    map: Mutex<HashMap<String, Holder>>,
    next_id: AtomicU64,
}

/// Held while a session uses a target; dropping it releases the target.
pub struct Lease {
    leases: Arc<Leases>,
    key: String,
    id: u64,
    _released: watch::Sender<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.leases.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&self.key).is_some_and(|h| h.id == self.id) {
            map.remove(&self.key);
        }
    }
}

impl Leases {
    pub async fn acquire(
        self: &Arc<Self>,
        key: &str,
        agent: &str,
        conn: Option<quinn::Connection>,
    ) -> Result<Lease, Refusal> {
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        loop {
            let mut wait = {
                let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
                match map.get(key) {
                    None => {
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        let (tx, rx) = watch::channel(());
                        map.insert(
                            key.to_string(),
                            Holder { id, agent: agent.to_string(), conn, released: rx },
                        );
                        return Ok(Lease { leases: self.clone(), key: key.to_string(), id, _released: tx });
                    }
                    Some(h) if h.agent == agent => {
                        if let Some(old) = &h.conn {
                            if conn.as_ref().map(|c| c.stable_id()) != Some(old.stable_id()) {
                                tracing::info!(target = key, agent, "replacing the agent's previous session");
                                old.close(0u32.into(), b"replaced by a new session of the same agent");
                            }
                        }
                        h.released.clone()
                    }
                    Some(h) => {
                        return Err(Refusal::new(
                            ErrorCode::Busy,
                            format!(
                                "{key} is being written by agent {:?}; try again when it is done",
                                h.agent
                            ),
                        ))
                    }
                }
            };
            // The sender is dropped when the lease is released.
            if tokio::time::timeout_at(deadline, wait.changed()).await.is_err() {
                return Err(Refusal::new(
                    ErrorCode::Busy,
                    format!(
                        "{key}: the previous session of agent {agent:?} did not end within {TAKEOVER_WAIT:?}"
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn other_agents_are_refused_and_release_frees() {
        let leases = Arc::new(Leases::default());
        let a = leases.acquire("file:x", "esx01", None).await.unwrap();
        let err = leases.acquire("file:x", "esx02", None).await.err().unwrap();
        assert_eq!(err.code, ErrorCode::Busy);
        assert!(err.message.contains("esx01"));
        drop(a);
        leases.acquire("file:x", "esx02", None).await.unwrap();
    }

    #[tokio::test]
    async fn same_agent_waits_for_the_old_session() {
        let leases = Arc::new(Leases::default());
        let a = leases.acquire("file:x", "esx01", None).await.unwrap();
        let l2 = leases.clone();
        let waiter = tokio::spawn(async move { l2.acquire("file:x", "esx01", None).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap().unwrap();
    }
}
