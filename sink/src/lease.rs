//! Use of a target by sessions: one session writes a target at a time, and it is not written
//! while it is being verified (a verification reads it, several may run). A second session of
//! the same agent that wants to write (it restarted and reconnected before the old connection
//! timed out) replaces the old writer, which is told why; anyone else is told who holds the
//! target. Transport-neutral: a session is known by an id and a way to close it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockship_proto::pb::ErrorCode;
use tokio::sync::watch;

use crate::refusal::Refusal;

/// How long a reconnecting agent waits for its old session to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(30);

/// Closes a session's connection with a reason the agent prints.
pub type Closer = Arc<dyn Fn(&str) + Send + Sync>;

/// The session asking for a target.
#[derive(Clone)]
pub struct Holder {
    pub agent: String,
    /// Identity of the session's connection (a new connection of the same agent differs).
    pub session: u64,
    pub close: Option<Closer>,
}

struct Writer {
    id: u64,
    holder: Holder,
    released: watch::Receiver<()>,
}

#[derive(Default)]
struct Uses {
    writer: Option<Writer>,
    /// Agents verifying the target, with a count each.
    readers: Vec<(u64, String)>,
}

#[derive(Default)]
pub struct Leases {
    map: Mutex<HashMap<String, Uses>>,
    next_id: AtomicU64,
}

/// Held while a session uses a target; dropping it releases that use.
pub struct Lease {
    leases: Arc<Leases>,
    key: String,
    id: u64,
    _released: Option<watch::Sender<()>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.leases.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = map.get_mut(&self.key) {
            if u.writer.as_ref().is_some_and(|w| w.id == self.id) {
                u.writer = None;
            }
            u.readers.retain(|(id, _)| *id != self.id);
            if u.writer.is_none() && u.readers.is_empty() {
                map.remove(&self.key);
            }
        }
    }
}

impl Leases {
    /// Write `key`: exclusive, and not while it is verified.
    pub async fn write(self: &Arc<Self>, key: &str, who: Holder) -> Result<Lease, Refusal> {
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        loop {
            let mut wait = {
                let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
                let uses = map.entry(key.to_string()).or_default();
                if let Some((_, agent)) = uses.readers.first() {
                    return Err(Refusal::new(
                        ErrorCode::Busy,
                        format!("{key} is being verified by agent {agent:?}; sync again when that is done"),
                    ));
                }
                match &uses.writer {
                    None => {
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        let (tx, rx) = watch::channel(());
                        uses.writer = Some(Writer { id, holder: who, released: rx });
                        return Ok(Lease {
                            leases: self.clone(),
                            key: key.to_string(),
                            id,
                            _released: Some(tx),
                        });
                    }
                    Some(w) if w.holder.agent == who.agent => {
                        if w.holder.session != who.session {
                            if let Some(close) = &w.holder.close {
                                tracing::info!(target = key, agent = %who.agent, "replacing the agent's previous session");
                                close("replaced by a new session of the same agent (another run for the same target started)");
                            }
                        }
                        w.released.clone()
                    }
                    Some(w) => {
                        return Err(Refusal::new(
                            ErrorCode::Busy,
                            format!(
                                "{key} is being written by agent {:?}; try again when it is done",
                                w.holder.agent
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
                        "{key}: the previous session of agent {:?} did not end within {TAKEOVER_WAIT:?}",
                        who.agent
                    ),
                ));
            }
        }
    }

    /// Verify `key`: shared with other verifications, never while it is written (the result
    /// would compare against data in flux, and taking it over would break the running sync).
    pub fn read(self: &Arc<Self>, key: &str, agent: &str) -> Result<Lease, Refusal> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let uses = map.entry(key.to_string()).or_default();
        if let Some(w) = &uses.writer {
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!(
                    "{key} is being written by agent {:?}; verify it when its epoch is done",
                    w.holder.agent
                ),
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        uses.readers.push((id, agent.to_string()));
        Ok(Lease { leases: self.clone(), key: key.to_string(), id, _released: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(agent: &str, session: u64) -> Holder {
        Holder { agent: agent.into(), session, close: None }
    }

    #[tokio::test]
    async fn other_agents_are_refused_and_release_frees() {
        let leases = Arc::new(Leases::default());
        let a = leases.write("file:x", who("esx01", 1)).await.unwrap();
        let err = leases.write("file:x", who("esx02", 2)).await.err().unwrap();
        assert_eq!(err.code, ErrorCode::Busy);
        assert!(err.message.contains("esx01"));
        drop(a);
        leases.write("file:x", who("esx02", 2)).await.unwrap();
    }

    #[tokio::test]
    async fn same_agent_waits_for_the_old_session_which_is_told_why() {
        let leases = Arc::new(Leases::default());
        let told = Arc::new(Mutex::new(String::new()));
        let t = told.clone();
        let close: Closer = Arc::new(move |why: &str| *t.lock().unwrap() = why.to_string());
        let a = leases
            .write("file:x", Holder { agent: "esx01".into(), session: 1, close: Some(close) })
            .await
            .unwrap();
        let l2 = leases.clone();
        let waiter = tokio::spawn(async move { l2.write("file:x", who("esx01", 2)).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        assert!(told.lock().unwrap().contains("replaced by a new session"));
        drop(a);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn verification_and_writing_exclude_each_other() {
        let leases = Arc::new(Leases::default());
        let w = leases.write("file:x", who("esx01", 1)).await.unwrap();
        let e = leases.read("file:x", "esx01").err().unwrap();
        assert!(e.code == ErrorCode::Busy && e.message.contains("being written"), "{}", e.message);
        drop(w);
        let r1 = leases.read("file:x", "esx01").unwrap();
        let r2 = leases.read("file:x", "esx02").unwrap();
        let e = leases.write("file:x", who("esx01", 1)).await.err().unwrap();
        assert!(e.message.contains("being verified"), "{}", e.message);
        drop((r1, r2));
        leases.write("file:x", who("esx01", 1)).await.unwrap();
    }
}
