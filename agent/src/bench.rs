//! `blockship-agent bench`: iperf3 for block replication. Synthetic data (generated on the fly,
//! see `source::synthetic`) is replicated to a sink like any disk — chunked, hashed, compressed,
//! sent over the chosen transport, verified by the sink — into a `null:` target (verified and
//! discarded) or a real one. Reports throughput, the path's RTT and loss, each side's CPU by
//! stage, and names the bottleneck: a side whose CPU is saturated, else the network.

use std::time::Duration;

use serde::Serialize;

use crate::changes::Changes;
use crate::config::Resolved;
use crate::source::synthetic::Profile;
use crate::source::SourceOptions;
use crate::stages;
use crate::sync::{sync, SyncRequest};
use crate::AgentError;
use blockship_proto::pb::SinkUsage;
use blockship_proto::BENCH_DISK_ID;
use blockship_transport::cpu::{Load, Sample};

pub struct BenchRequest {
    pub profile: Profile,
    pub profile_name: String,
    /// Bytes of the synthetic disk (one epoch sends all of it).
    pub size: u64,
    /// Repeat epochs until this much time has passed (else one epoch).
    pub duration: Option<Duration>,
    pub target: String,
    pub progress: bool,
}

/// One side's CPU over the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Side {
    pub cpu_s: f64,
    /// Cores' worth of CPU used on average.
    pub cores_used: f64,
    /// Cores the process may use.
    pub cores: u32,
    /// CPU seconds per stage, largest first (the last, "transport and other", is the rest:
    /// reading, framing, TLS or QUIC, the runtime).
    pub stages: Vec<(String, f64)>,
    /// Why this side was CPU-bound, if it was.
    pub saturated: Option<String>,
}

impl Side {
    fn new(load: &Load, mut stages: Vec<(&str, u64)>) -> Side {
        let counted: u64 = stages.iter().map(|(_, ns)| ns).sum();
        stages.push(("transport and other", load.cpu_ns.saturating_sub(counted)));
        let mut stages: Vec<(String, f64)> =
            stages.into_iter().map(|(name, ns)| (name.to_string(), ns as f64 / 1e9)).collect();
        stages.sort_by(|a, b| b.1.total_cmp(&a.1));
        Side {
            cpu_s: load.cpu_ns as f64 / 1e9,
            cores_used: load.cores_used(),
            cores: load.cores,
            stages,
            saturated: load.saturated(),
        }
    }

    /// The stage with the largest share of this side's CPU, e.g. "hash 41 %".
    fn top_stage(&self) -> String {
        match self.stages.first() {
            Some((name, s)) if self.cpu_s > 0.0 => format!("{name} {:.0} %", s / self.cpu_s * 100.0),
            _ => "no CPU counted".into(),
        }
    }
}

/// What limited the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bottleneck {
    /// "agent-cpu", "sink-cpu", "cpu" (both sides), "network", or "unknown" (the sink sent
    /// no CPU figures, so the network cannot be told from the sink's CPU).
    pub kind: String,
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub sink: String,
    pub transport: String,
    /// Connections the data crossed on (`--connections`).
    pub connections: usize,
    pub target: String,
    pub profile: String,
    pub epochs: u32,
    pub seconds: f64,
    /// Disk bytes replicated (all of the synthetic disk, once per epoch).
    pub bytes: u64,
    /// Payload bytes put on the wire (after zero detection and compression).
    pub wire_bytes: u64,
    /// Disk bytes per second, MB/s (10^6).
    pub mb_per_s: f64,
    /// Wire payload bytes per second, MB/s.
    pub wire_mb_per_s: f64,
    /// Smoothed RTT of the last epoch's connection and packets lost over all epochs, as QUIC
    /// saw them (None over gRPC).
    pub rtt_ms: Option<f64>,
    pub loss_percent: Option<f64>,
    pub agent: Side,
    /// The sink's CPU (its whole process) while the epochs ran.
    pub sink_side: Option<Side>,
    pub bottleneck: Bottleneck,
}

/// Name the bottleneck: a saturated side's CPU (with its largest stage), else the network.
pub fn verdict(
    agent: &Side,
    sink: Option<&Side>,
    wire_mb_per_s: f64,
    rtt_ms: Option<f64>,
    loss: Option<f64>,
) -> Bottleneck {
    let cpu = |side: &str, s: &Side| {
        format!("{side} CPU: {} ({})", s.top_stage(), s.saturated.as_deref().unwrap_or(""))
    };
    match (&agent.saturated, sink.and_then(|s| s.saturated.as_ref().map(|_| s))) {
        (Some(_), Some(s)) => {
            Bottleneck { kind: "cpu".into(), text: format!("{}; {}", cpu("agent", agent), cpu("sink", s)) }
        }
        (Some(_), None) => Bottleneck { kind: "agent-cpu".into(), text: cpu("agent", agent) },
        (None, Some(s)) => Bottleneck { kind: "sink-cpu".into(), text: cpu("sink", s) },
        (None, None) if sink.is_none() => Bottleneck {
            kind: "unknown".into(),
            text: format!(
                "not the agent's CPU ({:.2} cores used); the sink sent no CPU figures (an older sink), so the network cannot be told from the sink's CPU",
                agent.cores_used
            ),
        },
        (None, None) => {
            let mut path = Vec::new();
            if let Some(r) = rtt_ms {
                path.push(format!("RTT {r:.1} ms"));
            }
            if let Some(l) = loss {
                path.push(format!("loss {l:.2} %"));
            }
            Bottleneck {
                kind: "network".into(),
                text: format!(
                    "network: {wire_mb_per_s:.1} MB/s on the wire{}; no side's CPU saturated (cores used: agent {:.2}, sink {:.2})",
                    if path.is_empty() { String::new() } else { format!(" ({})", path.join(", ")) },
                    agent.cores_used,
                    sink.map_or(0.0, |s| s.cores_used),
                ),
            }
        }
    }
}

/// Add an epoch's sink figures (from the network: saturating). The busiest thread's time is
/// summed too, so over several epochs it is the wall-time weighted mean of each epoch's share.
fn add(total: &mut SinkUsage, u: &SinkUsage) {
    total.wall_ns = total.wall_ns.saturating_add(u.wall_ns);
    total.cpu_ns = total.cpu_ns.saturating_add(u.cpu_ns);
    total.verify_ns = total.verify_ns.saturating_add(u.verify_ns);
    total.write_ns = total.write_ns.saturating_add(u.write_ns);
    total.busiest_ns = total.busiest_ns.saturating_add(u.busiest_ns);
    total.wait_ns = total.wait_ns.saturating_add(u.wait_ns);
    total.cores = u.cores;
}

pub async fn bench(cfg: &Resolved, req: &BenchRequest) -> Result<BenchReport, AgentError> {
    let sync_req = SyncRequest {
        source: format!("synthetic:{}:{}", req.profile_name, req.size),
        target: req.target.clone(),
        changes: Changes::Full,
        change_point: None,
        disk_id: Some(format!("{BENCH_DISK_ID}{}", req.profile_name)),
        progress: req.progress,
        source_opts: SourceOptions::default(),
        force_resume: false,
        bench: true,
    };
    let stage_ns = || [stages::GENERATE.ns(), stages::HASH.ns(), stages::COMPRESS.ns()];
    let (before, stages0) = (Sample::now(), stage_ns());
    let (mut epochs, mut bytes, mut wire) = (0u32, 0u64, 0u64);
    let mut sink = SinkUsage::default();
    let mut sink_seen = false;
    let (mut rtt_ms, mut sent_packets, mut lost_packets) = (None, 0u64, 0u64);
    let mut connections;
    loop {
        let s = sync(cfg, &sync_req).await?;
        epochs += 1;
        connections = s.connections;
        bytes += s.epoch.bytes_scanned;
        wire += s.epoch.bytes_sent;
        if let Some(u) = &s.epoch.sink_usage {
            add(&mut sink, u);
            sink_seen = true;
        }
        if let Some(p) = s.path {
            rtt_ms = Some(p.rtt_ms);
            sent_packets += p.sent_packets;
            lost_packets += p.lost_packets;
        }
        if req.duration.is_none_or(|d| before.at.elapsed() >= d) {
            break;
        }
    }
    let load = Sample::now().since(&before);
    let stages1 = stage_ns();
    let names = ["generate", "hash", "compress"];
    let agent = Side::new(
        &load,
        names.iter().zip(stages0.iter().zip(stages1)).map(|(n, (a, b))| (*n, b.saturating_sub(*a))).collect(),
    );
    let sink_side = sink_seen.then(|| {
        let load = Load {
            wall_ns: sink.wall_ns,
            cpu_ns: sink.cpu_ns,
            busiest_ns: sink.busiest_ns,
            wait_ns: sink.wait_ns,
            cores: sink.cores,
        };
        Side::new(&load, vec![("verify", sink.verify_ns), ("write", sink.write_ns)])
    });
    let seconds = load.wall_ns as f64 / 1e9;
    let wire_mb_per_s = wire as f64 / seconds.max(1e-9) / 1e6;
    let loss_percent = rtt_ms.map(|_| lost_packets as f64 * 100.0 / sent_packets.max(1) as f64);
    let bottleneck = verdict(&agent, sink_side.as_ref(), wire_mb_per_s, rtt_ms, loss_percent);
    Ok(BenchReport {
        sink: cfg.link().sink.clone(),
        transport: cfg.link().transport.to_string(),
        connections,
        target: req.target.clone(),
        profile: req.profile_name.clone(),
        epochs,
        seconds,
        bytes,
        wire_bytes: wire,
        mb_per_s: bytes as f64 / seconds.max(1e-9) / 1e6,
        wire_mb_per_s,
        rtt_ms,
        loss_percent,
        agent,
        sink_side,
        bottleneck,
    })
}

impl BenchReport {
    /// The report as a few lines for a terminal.
    pub fn human(&self) -> String {
        let side = |name: &str, s: &Side| {
            let stages: Vec<String> =
                s.stages.iter().map(|(n, c)| format!("{n} {:.0} %", c / s.cpu_s.max(1e-9) * 100.0)).collect();
            format!(
                "{name:<6} CPU {:.2} s ({:.2} of {} cores; {:.2} CPU-s per GiB): {}\n",
                s.cpu_s,
                s.cores_used,
                s.cores,
                s.cpu_s / (self.bytes as f64 / (1u64 << 30) as f64).max(1e-9),
                stages.join(", ")
            )
        };
        let mut out = format!(
            "{} → {} over {} × {} ({} data, {} epoch(s)): {:.1} MB/s, {:.1} MB/s on the wire, {:.1} s\n",
            self.profile,
            self.target,
            self.connections,
            self.transport,
            indicatif::BinaryBytes(self.bytes),
            self.epochs,
            self.mb_per_s,
            self.wire_mb_per_s,
            self.seconds
        );
        match (self.rtt_ms, self.loss_percent) {
            (Some(r), Some(l)) => out.push_str(&format!("path   RTT {r:.2} ms, loss {l:.2} %\n")),
            _ => out.push_str("path   RTT and loss not known over gRPC (the kernel's TCP keeps them)\n"),
        }
        out.push_str(&side("agent", &self.agent));
        match &self.sink_side {
            Some(s) => out.push_str(&side("sink", s)),
            None => out.push_str("sink   reported no CPU figures (an older sink)\n"),
        }
        out.push_str(&format!("bottleneck: {}\n", self.bottleneck.text));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(cpu_ns: u64, busiest_ns: u64, wait_ns: u64, cores: u32) -> Side {
        let load = Load { wall_ns: 1_000_000_000, cpu_ns, busiest_ns, wait_ns, cores };
        Side::new(&load, vec![("hash", cpu_ns / 2), ("compress", cpu_ns / 10)])
    }

    #[test]
    fn a_saturated_side_is_named_with_its_largest_stage() {
        let busy = side(1_900_000_000, 600_000_000, 200_000_000, 2);
        let idle = side(200_000_000, 150_000_000, 0, 2);
        let v = verdict(&busy, Some(&idle), 900.0, Some(0.1), Some(0.0));
        assert_eq!(v.kind, "agent-cpu");
        assert!(v.text.starts_with("agent CPU: hash 50 %"), "{}", v.text);
        assert_eq!(verdict(&idle, Some(&busy), 900.0, None, None).kind, "sink-cpu");
        assert_eq!(verdict(&busy, Some(&busy), 900.0, None, None).kind, "cpu");
    }

    #[test]
    fn with_no_side_saturated_the_network_is_named_with_its_path() {
        let idle = side(250_000_000, 200_000_000, 1_000_000, 2);
        let v = verdict(&idle, Some(&idle), 59.4, Some(20.3), Some(0.1));
        assert_eq!(v.kind, "network");
        assert!(v.text.contains("59.4 MB/s") && v.text.contains("RTT 20.3 ms"), "{}", v.text);
    }

    #[test]
    fn stages_are_sorted_and_the_rest_never_goes_negative() {
        let s = side(1_000_000_000, 0, 0, 4);
        let names: Vec<&str> = s.stages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["hash", "transport and other", "compress"]);
        // Stage clocks read a little after the process clock can exceed it: the rest is 0.
        let load = Load { wall_ns: 1_000, cpu_ns: 100, busiest_ns: 0, wait_ns: 0, cores: 1 };
        let s = Side::new(&load, vec![("hash", 120)]);
        assert_eq!(s.stages[1], ("transport and other".to_string(), 0.0));
    }

    #[test]
    fn without_the_sink_figures_the_verdict_does_not_guess() {
        let idle = side(250_000_000, 200_000_000, 1_000_000, 2);
        assert_eq!(verdict(&idle, None, 59.4, None, None).kind, "unknown");
        let busy = side(1_900_000_000, 600_000_000, 200_000_000, 2);
        assert_eq!(verdict(&busy, None, 900.0, None, None).kind, "agent-cpu");
    }

    #[test]
    fn epochs_add_up_without_overflow() {
        let mut total = SinkUsage::default();
        let big =
            SinkUsage { wall_ns: u64::MAX, cpu_ns: u64::MAX, busiest_ns: 7, cores: 2, ..Default::default() };
        add(&mut total, &big);
        add(&mut total, &big);
        assert_eq!((total.wall_ns, total.busiest_ns, total.cores), (u64::MAX, 14, 2));
    }
}
