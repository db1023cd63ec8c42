//! Who writes an RBD image. A sink takes the image's exclusive lock and keeps it (librbd no
//! longer hands it over on request) and records in the image's metadata who it is: the lock
//! owner's address, host, process id and start time, and a heartbeat it refreshes every few
//! seconds while it has the image open. When a sink dies, its lock stays until its watch times
//! out (~30 s); a sink that finds the lock held decides from that record whether the owner is
//! gone — the same host and a process that no longer runs, or a heartbeat older than
//! `STALE_AFTER` — and then breaks the lock, which blocklists the dead owner's client first (as
//! rbd-mirror and Ceph CSI do), so the first write follows in well under a second. A lock held
//! by anyone else (a VM using the volume, a live sink) is refused with who holds it. A lock of
//! this very process that no writer of ours holds was left by a handle closed while the cluster
//! did not answer (an OSD outage past `--ceph-op-timeout`): it is broken without blocklisting.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Image metadata key of the ownership record.
pub const OWNER_KEY: &str = "blockship.owner";
/// How often the owner refreshes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A heartbeat older than this means the owner is gone (three missed refreshes).
pub const STALE_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The lock owner's client address as librbd reports it.
    pub addr: String,
    pub host: String,
    pub pid: u32,
    /// Start time of the process (clock ticks since boot), so a reused pid is not mistaken.
    pub start: u64,
    /// Unix seconds of the last heartbeat.
    pub heartbeat: u64,
}

/// How long a lock of this very process is given to be released by its own (closing) handle
/// before it is judged stale and broken (`Verdict::Ours`).
pub const OWN_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// What to do about the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nobody holds it.
    Free,
    /// The holder is gone: break its lock (the reason is logged).
    Dead(String),
    /// Someone alive holds it: refuse with this message.
    Held(String),
    /// This very process holds it through a handle it closed while the cluster did not answer
    /// (its release never arrived): the lock is stale, break it without blocklisting.
    Ours(String),
}

/// This process, as an ownership record names it.
pub fn me(addr: &str, now: u64) -> Owner {
    let pid = std::process::id();
    Owner {
        addr: addr.to_string(),
        host: hostname(),
        pid,
        start: start_time(pid).unwrap_or(0),
        heartbeat: now,
    }
}

pub fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

/// Start time of process `pid` (field 22 of /proc/PID/stat), or None if it does not run.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Judge the lock `owners` of `image` given the ownership `record` it carries.
pub fn judge(image: &str, owners: &[String], record: Option<&Owner>, now: u64) -> Verdict {
    let Some(holder) = owners.first() else { return Verdict::Free };
    let Some(r) = record.filter(|r| &r.addr == holder) else {
        return Verdict::Held(format!(
            "{image} is in use by another client ({holder}) that is not a Blockship sink: is a VM attached to it? Blockship writes only images nobody else uses"
        ));
    };
    if r.host == hostname() {
        return match start_time(r.pid) {
            Some(start) if start == r.start && r.pid == std::process::id() => Verdict::Ours(format!(
                "an earlier handle of this sink (pid {}) left it locked: its release did not reach the cluster",
                r.pid
            )),
            Some(start) if start == r.start => Verdict::Held(format!(
                "{image} is being written by another sink on this host (pid {}); stop it first",
                r.pid
            )),
            _ => Verdict::Dead(format!("the sink that held it (pid {} on this host) is gone", r.pid)),
        };
    }
    let age = now.saturating_sub(r.heartbeat);
    if age > STALE_AFTER.as_secs() {
        Verdict::Dead(format!("the sink on {} that held it stopped its heartbeat {age} s ago", r.host))
    } else {
        Verdict::Held(format!(
            "{image} is being written by the sink on {} (pid {}, heartbeat {age} s ago); it is released when that sink stops or within {} s of its death",
            r.host,
            r.pid,
            STALE_AFTER.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_judged_from_their_records() {
        let now = 1_000_000;
        let alive = me("10.0.0.1:0/1", now);
        assert_eq!(judge("rbd:p/i", &[], Some(&alive), now), Verdict::Free);
        // Ourselves: a lock of this very process that the caller does not hold (a stale one).
        assert!(matches!(judge("rbd:p/i", &["10.0.0.1:0/1".into()], Some(&alive), now), Verdict::Ours(_)));
        // Another live process of this host: alive. (pid 1 runs; its start time is its own.)
        let init = Owner { pid: 1, start: start_time(1).unwrap_or(0), ..alive.clone() };
        assert!(matches!(judge("rbd:p/i", &["10.0.0.1:0/1".into()], Some(&init), now), Verdict::Held(_)));
        // A record of another address: not a Blockship sink's lock.
        let v = judge("rbd:p/i", &["10.0.0.9:0/7".into()], Some(&alive), now);
        assert!(matches!(&v, Verdict::Held(m) if m.contains("not a Blockship sink")), "{v:?}");
        assert!(matches!(judge("rbd:p/i", &["x".into()], None, now), Verdict::Held(_)));
        // A process of this host that no longer runs, or runs with another start time.
        let dead = Owner { pid: u32::MAX - 1, ..alive.clone() };
        assert!(matches!(judge("rbd:p/i", &["10.0.0.1:0/1".into()], Some(&dead), now), Verdict::Dead(_)));
        let reused = Owner { start: alive.start + 1, ..alive.clone() };
        assert!(matches!(judge("rbd:p/i", &["10.0.0.1:0/1".into()], Some(&reused), now), Verdict::Dead(_)));
        // Another host: by its heartbeat.
        let remote = Owner { host: "elsewhere".into(), ..alive.clone() };
        assert!(matches!(
            judge("rbd:p/i", &["10.0.0.1:0/1".into()], Some(&remote), now + 5),
            Verdict::Held(_)
        ));
        let v = judge("rbd:p/i", &["10.0.0.1:0/1".into()], Some(&remote), now + 31);
        assert!(matches!(&v, Verdict::Dead(m) if m.contains("31 s ago")), "{v:?}");
        assert!(start_time(std::process::id()).is_some());
    }
}
