//! The sessions a sink serves now, for its control API: who (agent, transport, address), since
//! when, bytes received, throughput, in-flight bytes and open targets. A session enters when it
//! is seated and leaves when its entry is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::datastream::Disks;
use crate::joins::Members;
use crate::limits::Budget;

/// One live session.
pub struct Entry {
    pub id: u64,
    pub agent: String,
    pub transport: String,
    pub remote: String,
    pub since: Instant,
    /// Chunk payload bytes received.
    pub received: Arc<AtomicU64>,
    /// The connections that joined the session (`joins`), besides its own.
    pub joined: Members,
    pub budget: Arc<Budget>,
    pub disks: Disks,
    /// The last throughput sample: when, bytes then, and the rate measured up to it.
    sample: Mutex<(Instant, u64, f64)>,
}

impl Entry {
    pub fn new(
        id: u64,
        agent: &str,
        transport: &str,
        remote: &str,
        budget: Arc<Budget>,
        disks: Disks,
    ) -> Self {
        Entry {
            id,
            agent: agent.to_string(),
            transport: transport.to_string(),
            remote: remote.to_string(),
            since: Instant::now(),
            received: Arc::default(),
            joined: Members::default(),
            budget,
            disks,
            sample: Mutex::new((Instant::now(), 0, 0.0)),
        }
    }

    /// Bytes per second since the previous sample (samples at most once a second, so callers
    /// polling often see the last full second's rate).
    pub fn throughput(&self) -> f64 {
        let mut s = self.sample.lock().unwrap_or_else(|p| p.into_inner());
        let (now, bytes) = (Instant::now(), self.received.load(Ordering::Relaxed));
        let dt = now.duration_since(s.0).as_secs_f64();
        if dt >= 1.0 {
            *s = (now, bytes, bytes.saturating_sub(s.1) as f64 / dt);
        }
        s.2
    }

    /// Connections carrying the session: its own and those that joined it.
    pub fn connections(&self) -> u32 {
        1 + self.joined.lock().unwrap_or_else(|p| p.into_inner()).len() as u32
    }

    /// Names of the targets the session has open.
    pub fn targets(&self) -> Vec<String> {
        let mut t: Vec<String> =
            self.disks.lock().unwrap_or_else(|p| p.into_inner()).values().map(|d| d.name.clone()).collect();
        t.sort();
        t
    }
}

#[derive(Default)]
pub struct Roster {
    map: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// A session's place in the roster; dropping it removes the session.
pub struct Listed<'a>(&'a Roster, pub Arc<Entry>);

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.0.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1.id);
    }
}

impl Roster {
    pub fn add(&self, entry: Entry) -> Listed<'_> {
        let entry = Arc::new(entry);
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(entry.id, entry.clone());
        Listed(self, entry)
    }

    pub fn all(&self) -> Vec<Arc<Entry>> {
        let mut v: Vec<_> = self.map.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort_by_key(|e| e.id);
        v
    }
}
