//! What every group of the daemon does, as the control service reports it: state, last
//! committed epoch and when its point in time was frozen (its age is the RPO), the last cycle's
//! bytes, time and throughput, the next cycle, the last error. Group tasks write it; the control
//! service and the logs read it.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::pb;

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The status of every group, in configuration order.
#[derive(Default)]
pub struct Board {
    groups: Mutex<Vec<pb::Group>>,
}

impl Board {
    pub fn new(groups: Vec<pb::Group>) -> Arc<Self> {
        Arc::new(Board { groups: Mutex::new(groups) })
    }

    /// Change group `name`'s status.
    pub fn update(&self, name: &str, f: impl FnOnce(&mut pb::Group)) {
        let mut g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(group) = g.iter_mut().find(|g| g.name == name) {
            f(group);
        }
    }

    /// Every group, with its RPO as of now.
    pub fn all(&self) -> Vec<pb::Group> {
        let now = unix_ms(SystemTime::now());
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for g in &mut groups {
            g.rpo_seconds = rpo(g, now);
        }
        groups
    }

    pub fn get(&self, name: &str) -> Option<pb::Group> {
        self.all().into_iter().find(|g| g.name == name)
    }
}

/// Age of the newest committed point in time at `now` (0 before the first commit, and once the
/// group is cut over: its replicas are what runs, nothing is at risk).
pub fn rpo(g: &pb::Group, now_ms: i64) -> f64 {
    if g.committed_point_unix_ms == 0 || g.cut_over_epoch > 0 {
        return 0.0;
    }
    (now_ms - g.committed_point_unix_ms).max(0) as f64 / 1000.0
}

fn age(ms: i64, now_ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let s = (now_ms - ms) / 1000;
    if s >= 0 {
        format!("{}s ago", s)
    } else {
        format!("in {}s", -s)
    }
}

/// The table `blockship-agent status` prints.
pub fn table(groups: &[pb::Group]) -> String {
    let now = unix_ms(SystemTime::now());
    let mut out = String::new();
    out.push_str(&format!(
        "{:<20} {:<7} {:<9} {:>6} {:>9} {:>10} {:>12} {:>9} {:<12} {}\n",
        "GROUP", "KIND", "STATE", "EPOCH", "RPO", "LAST SENT", "THROUGHPUT", "CYCLE", "NEXT", "LAST ERROR"
    ));
    for g in groups {
        out.push_str(&format!(
            "{:<20} {:<7} {:<9} {:>6} {:>8.1}s {:>10} {:>7.0} MB/s {:>8.2}s {:<12} {}\n",
            g.name,
            g.kind,
            g.state,
            g.committed_epoch,
            g.rpo_seconds,
            indicatif::BinaryBytes(g.last_cycle_bytes_sent).to_string(),
            g.last_cycle_mb_per_s,
            g.last_cycle_seconds,
            age(g.next_cycle_unix_ms, now),
            g.last_error
        ));
        for d in &g.disks {
            out.push_str(&format!(
                "  {:<30} <- {:<30} epoch {:>4} {:<11} read {:>10} sent {:>10} {}\n",
                d.target,
                d.source,
                d.committed_epoch,
                d.mode,
                indicatif::BinaryBytes(d.bytes_read).to_string(),
                indicatif::BinaryBytes(d.bytes_sent).to_string(),
                d.note
            ));
        }
        if g.cut_over_epoch > 0 {
            out.push_str(&format!(
                "  cut over at epoch {} (downtime {:.2} s): no more replication into its targets\n",
                g.cut_over_epoch, g.cutover_downtime_seconds
            ));
        }
        if g.consistency == "per-disk" {
            out.push_str("  (disks are frozen one after another: each is crash-consistent, not the group)\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpo_is_the_age_of_the_committed_point() {
        let board = Board::new(vec![pb::Group { name: "vm".into(), ..Default::default() }]);
        assert_eq!(board.get("vm").unwrap().rpo_seconds, 0.0);
        let frozen = unix_ms(SystemTime::now()) - 7_500;
        board.update("vm", |g| g.committed_point_unix_ms = frozen);
        let r = board.get("vm").unwrap().rpo_seconds;
        assert!((7.4..8.5).contains(&r), "{r}");
        let t = table(&board.all());
        assert!(t.contains("GROUP") && t.contains("vm"), "{t}");
    }
}
