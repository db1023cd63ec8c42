//! Resource limits, so that no client can exhaust the sink or starve other agents: how many
//! connections (in all and per agent), disks per connection, how large a declared disk may be,
//! how long a client may take to say Hello and how long a session may go without progress, and
//! how many chunk bytes may be held in memory between a chunk's header and its write — per
//! connection, per agent and in all. A chunk's payload is read only once its bytes are granted
//! (in KiB), and the grant travels with the chunk until it is written, so the sink's buffered
//! data never exceeds the budget however many headers a slow client announces.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockship_proto::pb::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::refusal::Refusal;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_agent_connections: usize,
    /// TLS handshakes in progress per peer address and in all (see transport::handshakes).
    pub max_handshakes_per_address: usize,
    pub max_handshakes: usize,
    pub max_disks_per_connection: usize,
    pub max_disk_size: u64,
    pub hello_timeout: Duration,
    /// A session with no frame from its agent (and no work of the sink's own) for this long is
    /// closed, and its targets released.
    pub idle_timeout: Duration,
    /// Chunk bytes in memory at once, in all; one agent gets at most half.
    pub max_inflight: u64,
    pub max_inflight_per_connection: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_agent_connections: 16,
            max_handshakes_per_address: blockship_transport::handshakes::PER_ADDRESS,
            max_handshakes: blockship_transport::handshakes::TOTAL,
            max_disks_per_connection: 256,
            max_disk_size: 64 << 40,
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_inflight: 64 << 20,
            max_inflight_per_connection: 32 << 20,
        }
    }
}

/// The largest single grant: a maximal chunk (its decoded size).
pub const MAX_GRANT: u64 = blockship_proto::MAX_CHUNK_SIZE as u64;

impl Limits {
    /// Budgets too small for one maximal chunk would deadlock a connection.
    pub fn check(&self) -> Result<(), String> {
        if self.max_inflight_per_connection < MAX_GRANT || self.max_inflight / 2 < MAX_GRANT {
            return Err(format!(
                "--max-inflight-per-connection and half of --max-inflight must hold one maximal chunk ({} MiB)",
                MAX_GRANT >> 20
            ));
        }
        if self.max_connections == 0
            || self.max_agent_connections == 0
            || self.max_disks_per_connection == 0
            || self.max_handshakes_per_address == 0
            || self.max_handshakes == 0
        {
            return Err("connection and disk limits must be at least 1".into());
        }
        Ok(())
    }
}

/// Raise this process's soft limit of open files to its hard limit (the sink at start; tests that
/// hold many sockets).
pub fn raise_fd_limit() -> Result<(), String> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(format!("cannot read the open-file limit: {}", std::io::Error::last_os_error()));
        }
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                return Err(format!(
                    "cannot raise the open-file limit from {}: {}",
                    lim.rlim_cur,
                    std::io::Error::last_os_error()
                ));
            }
        }
    }
    Ok(())
}

fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

#[derive(Default)]
struct Counts {
    total: usize,
    /// Connections and in-flight budget per agent.
    agents: HashMap<String, (usize, Arc<Semaphore>)>,
}

/// Admission of connections and their in-flight budgets, shared by all sessions.
pub struct Admission {
    pub limits: Limits,
    counts: Mutex<Counts>,
    global: Arc<Semaphore>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        let global = Arc::new(Semaphore::new(kib(limits.max_inflight) as usize));
        Arc::new(Admission { limits, counts: Mutex::default(), global })
    }

    /// Seat a new session of `agent`, or refuse with BUSY when a connection limit is reached.
    pub fn seat(self: &Arc<Self>, agent: &str) -> Result<Seat, Refusal> {
        self.seat_within(agent, self.limits.max_connections)
    }

    /// A seat for a connection joining a session: only while a quarter of `--max-connections`
    /// stays free, so that joins never lock another agent's first connection out.
    pub fn joining_seat(self: &Arc<Self>, agent: &str) -> Result<Seat, Refusal> {
        let l = &self.limits;
        let room = l.max_connections - l.max_connections / 4;
        self.seat_within(agent, room).map_err(|r| {
            if r.message.contains("--max-agent-connections") {
                r
            } else {
                Refusal::new(
                    ErrorCode::Busy,
                    format!(
                        "the sink keeps a quarter of its {} connections (--max-connections) for new sessions: no room for a joined connection now; use fewer --connections",
                        l.max_connections
                    ),
                )
            }
        })
    }

    fn seat_within(self: &Arc<Self>, agent: &str, max_connections: usize) -> Result<Seat, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let l = &self.limits;
        if c.total >= max_connections {
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!(
                    "the sink serves its maximum of {} connections (--max-connections); retry later",
                    l.max_connections
                ),
            ));
        }
        let per_agent = kib(l.max_inflight / 2) as usize;
        let entry =
            c.agents.entry(agent.to_string()).or_insert_with(|| (0, Arc::new(Semaphore::new(per_agent))));
        if entry.0 >= l.max_agent_connections {
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!(
                    "agent {agent:?} already has {} connections to this sink (--max-agent-connections); close some or retry later",
                    entry.0
                ),
            ));
        }
        entry.0 += 1;
        let budget = Budget {
            share: kib(l.max_inflight_per_connection) as usize,
            conn: Arc::new(Semaphore::new(kib(l.max_inflight_per_connection) as usize)),
            agent: entry.1.clone(),
            global: self.global.clone(),
        };
        c.total += 1;
        Ok(Seat { admission: self.clone(), agent: agent.to_string(), budget: Arc::new(budget) })
    }

    /// Sessions seated now.
    pub fn connections(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// A seated session; leaving frees its place.
pub struct Seat {
    admission: Arc<Admission>,
    agent: String,
    pub budget: Arc<Budget>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut c = self.admission.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(e) = c.agents.get_mut(&self.agent) {
            e.0 = e.0.saturating_sub(1);
            if e.0 == 0 {
                c.agents.remove(&self.agent);
            }
        }
    }
}

/// A connection's share of the in-flight budget.
pub struct Budget {
    /// The connection's share (KiB).
    share: usize,
    conn: Arc<Semaphore>,
    agent: Arc<Semaphore>,
    global: Arc<Semaphore>,
}

/// Bytes granted to one chunk until it is written (or dropped).
#[derive(Debug)]
pub struct Grant {
    _permits: [OwnedSemaphorePermit; 3],
    bytes: u64,
}

impl Drop for Grant {
    fn drop(&mut self) {
        metrics::gauge!("blockship_sink_in_flight_bytes").decrement(self.bytes as f64);
    }
}

impl Budget {
    /// Bytes granted to this connection's chunks and not yet written.
    pub fn in_flight(&self) -> u64 {
        (self.share.saturating_sub(self.conn.available_permits()) as u64) * 1024
    }

    /// Wait until `bytes` may be held: first from this connection's share (a slow connection
    /// waits here, holding nothing of the others'), then the agent's, then the sink's. While it
    /// waits for the shared part (others are using it: not this connection's doing), it holds
    /// what `waiting_for_others` returns (the session's busy mark).
    pub async fn grant<G>(&self, bytes: u64, waiting_for_others: impl FnOnce() -> G) -> Grant {
        let n = kib(bytes.clamp(1, MAX_GRANT));
        // The semaphores are never closed, so acquiring cannot fail.
        let take = |s: &Arc<Semaphore>| s.clone().acquire_many_owned(n);
        let c = take(&self.conn).await.expect("budget semaphores are never closed");
        let _mark = waiting_for_others();
        let a = take(&self.agent).await.expect("budget semaphores are never closed");
        let g = take(&self.global).await.expect("budget semaphores are never closed");
        metrics::gauge!("blockship_sink_in_flight_bytes").increment(bytes as f64);
        Grant { _permits: [c, a, g], bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Limits {
        Limits {
            max_connections: 3,
            max_agent_connections: 2,
            max_inflight: 64 << 20,
            max_inflight_per_connection: 16 << 20,
            ..Limits::default()
        }
    }

    #[test]
    fn connections_are_counted_per_agent_and_in_all() {
        let a = Admission::new(small());
        let s1 = a.seat("esx01").unwrap();
        let _s2 = a.seat("esx01").unwrap();
        let e = a.seat("esx01").err().unwrap();
        assert!(e.code == ErrorCode::Busy && e.message.contains("--max-agent-connections"), "{}", e.message);
        let _s3 = a.seat("esx02").unwrap();
        let e = a.seat("esx03").err().unwrap();
        assert!(e.message.contains("maximum of 3 connections"), "{}", e.message);
        drop(s1);
        a.seat("esx03").unwrap();
        assert!(small().check().is_ok());
        assert!(Limits { max_inflight_per_connection: 1 << 20, ..small() }.check().is_err());
    }

    #[tokio::test]
    async fn a_connection_cannot_take_more_than_its_share() {
        let a = Admission::new(small());
        let hog = a.seat("esx01").unwrap();
        let held = hog.budget.grant(16 << 20, || ()).await;
        // The hog's next grant waits for its own share; another agent is served meanwhile.
        let waiting = tokio::time::timeout(Duration::from_millis(50), hog.budget.grant(4096, || ())).await;
        assert!(waiting.is_err(), "a connection got more than its share");
        let other = a.seat("esx02").unwrap();
        let g = tokio::time::timeout(Duration::from_millis(50), other.budget.grant(16 << 20, || ())).await;
        assert!(g.is_ok(), "another agent was starved");
        drop(held);
        tokio::time::timeout(Duration::from_millis(50), hog.budget.grant(4096, || ())).await.unwrap();
    }
}
