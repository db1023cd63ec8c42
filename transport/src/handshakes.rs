//! Admission of TLS handshakes in progress, so that clients that start handshakes and never finish
//! them (a slowloris on the gRPC port, half-open QUIC connections) cannot use up the sink's file
//! descriptors, memory or handshake tasks and lock well-behaved agents out. Before any identity
//! is known, the only thing to count by is the peer's address: each address may have a few
//! handshakes in progress (an agent needs one per connection, and a NAT may hide several agents),
//! and the sink a bounded number in all (`--max-handshakes-per-address`, `--max-handshakes`). A connection over either cap is closed at once, counted
//! in `blockship_sink_handshakes_refused_total{transport}`, and logged at most once every few
//! seconds (an attack must not flood the log either). Both transports share one `Handshakes`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Handshakes one address may have in progress by default: above a burst of legitimate
/// connections (64 agents of one host starting at once, the bench's fleet, stay well under).
pub const PER_ADDRESS: usize = 128;
/// Handshakes in progress in all by default (the sink raises its open-file limit past it).
pub const TOTAL: usize = 1024;
/// Refusals are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// The counts of handshakes in progress (see the module note).
#[derive(Debug)]
pub struct Handshakes {
    per_address: usize,
    total: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    by_address: HashMap<IpAddr, usize>,
    total: usize,
    refused_since_log: u64,
    last_log: Option<Instant>,
}

/// Why a handshake was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crowded {
    Address,
    Total,
}

/// A handshake in progress; dropping it (done, failed or timed out) frees its place.
#[derive(Debug)]
pub struct Ticket {
    owner: Arc<Handshakes>,
    ip: IpAddr,
}

impl Default for Handshakes {
    fn default() -> Self {
        Handshakes::new(PER_ADDRESS, TOTAL)
    }
}

impl Handshakes {
    pub fn new(per_address: usize, total: usize) -> Self {
        Handshakes { per_address, total, state: Mutex::default() }
    }

    /// Admit a handshake from `ip`, or say which cap it would exceed. A refusal is counted (metric
    /// and an occasional warning naming `transport`).
    pub fn enter(self: &Arc<Self>, ip: IpAddr, transport: &'static str) -> Result<Ticket, Crowded> {
        // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d: one address either way.
        let ip = ip.to_canonical();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mine = s.by_address.get(&ip).copied().unwrap_or(0);
        let crowded = if mine >= self.per_address {
            Some(Crowded::Address)
        } else if s.total >= self.total {
            Some(Crowded::Total)
        } else {
            None
        };
        if let Some(why) = crowded {
            metrics::counter!("blockship_sink_handshakes_refused_total", "transport" => transport)
                .increment(1);
            s.refused_since_log += 1;
            if s.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                let what = match why {
                    Crowded::Address => {
                        format!("{ip} already has {} TLS handshakes in progress", self.per_address)
                    }
                    Crowded::Total => format!("{} TLS handshakes are in progress", self.total),
                };
                tracing::warn!(
                    %ip, transport,
                    "refusing new connections: {what} (a client that opens connections and never finishes \
                     its handshake?); {} refused since the last such message",
                    s.refused_since_log
                );
                s.refused_since_log = 0;
                s.last_log = Some(Instant::now());
            }
            return Err(why);
        }
        *s.by_address.entry(ip).or_default() += 1;
        s.total += 1;
        Ok(Ticket { owner: self.clone(), ip })
    }

    /// Handshakes in progress from `ip`.
    pub fn in_progress(&self, ip: IpAddr) -> usize {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.by_address.get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.owner.state.lock().unwrap_or_else(|p| p.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                s.by_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_and_the_total_are_capped_and_places_come_back() {
        let h = Arc::new(Handshakes::new(2, 3));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = h.enter(a, "tcp").unwrap();
        let _a2 = h.enter(a, "tcp").unwrap();
        assert_eq!(h.enter(a, "tcp").unwrap_err(), Crowded::Address);
        // The same address seen through a dual-stack socket counts as the same peer.
        assert_eq!(h.enter("::ffff:10.0.0.1".parse().unwrap(), "quic").unwrap_err(), Crowded::Address);
        let _b1 = h.enter(b, "tcp").unwrap();
        assert_eq!(h.enter(b, "tcp").unwrap_err(), Crowded::Total);
        drop(a1);
        assert_eq!(h.in_progress(a), 1);
        let _b2 = h.enter(b, "tcp").unwrap();
        assert_eq!(h.in_progress(b), 2);
    }
}
