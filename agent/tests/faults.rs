//! Network faults between a replicating daemon and its sink, on both transports: 5 % packet
//! loss, 50 ms of jitter with reordering, 1 % duplicated packets, and the path cut for 10 s.
//! Loss, duplication and the cut act on real packets in the kernel (iptables on the loopback
//! interface, matched on the sink's port: `statistic` DROP, TEE, DROP) — the kernel here has no
//! netem; jitter comes from the userspace relay (`blockship-bench relay`), which delays every UDP
//! datagram on its own, so they overtake one another (TCP delivers in order whatever the
//! network does, so over gRPC jitter delays the stream in order). Each fault must have hit
//! (its packet counters), replication must go on through it, the RPO must come back to
//! interval + cycle time, and the targets must equal the sources. Needs root for iptables
//! (CI has it: BLOCKSHIP_REQUIRE_ROOT).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockship_bench::image::{self, Profile};
use common::daemon::*;
use common::*;

const DISK: u64 = 16 * MIB;
const INTERVAL: f64 = 5.0;

/// iptables rules matching the sink's port in both directions, removed on drop.
struct Firewall {
    rules: Vec<(&'static str, &'static str, String)>,
    port: u16,
}

fn iptables(table: &str, args: &[&str]) -> String {
    let out = Command::new("iptables")
        .args(["-w", "-t", table])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("iptables: {e} (scripts/deps.sh test installs it)"));
    assert!(out.status.success(), "iptables -t {table} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Firewall {
    /// `action` (after the match on protocol and port) in `table`/`chain`, for packets to and
    /// from the sink's `port`.
    fn new(table: &'static str, chain: &'static str, proto: &str, port: u16, action: &str) -> Firewall {
        let iface = if chain == "INPUT" { "-i lo" } else { "-o lo" };
        let rules: Vec<_> = ["--dport", "--sport"]
            .iter()
            .map(|dir| (table, chain, format!("{iface} -p {proto} {dir} {port} {action}")))
            .collect();
        for (t, c, spec) in &rules {
            let mut args = vec!["-A", c];
            args.extend(spec.split_whitespace());
            iptables(t, &args);
        }
        Firewall { rules, port }
    }

    /// Packets the rules matched so far.
    fn packets(&self) -> u64 {
        let (table, chain, _) = &self.rules[0];
        let listing = iptables(table, &["-L", chain, "-v", "-x", "-n"]);
        let ours = [format!("dpt:{}", self.port), format!("spt:{}", self.port)];
        listing
            .lines()
            .filter(|l| l.split_whitespace().any(|w| ours.iter().any(|o| o == w)))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        for (t, c, spec) in &self.rules {
            let mut args = vec!["-D", c];
            args.extend(spec.split_whitespace());
            let _ = Command::new("iptables").args(["-w", "-t", t]).args(&args).status();
        }
    }
}

/// `blockship-bench relay` in front of the sink; keeps its latest `stats` line.
struct Relay {
    child: Child,
    addr: String,
    stats: Arc<Mutex<String>>,
}

impl Relay {
    fn start(kind: &str, upstream: &str, delay_ms: u64, jitter_ms: u64) -> Relay {
        let mut child = Command::new(bin("blockship-bench"))
            .args(["relay", kind, "--listen", "127.0.0.1:0", "--upstream", upstream])
            .args(["--delay-ms", &delay_ms.to_string(), "--jitter-ms", &jitter_ms.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let addr =
            first.strip_prefix("listening on ").unwrap_or_else(|| panic!("relay: {first:?}")).to_string();
        let stats = Arc::new(Mutex::new(String::new()));
        let keep = stats.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                *keep.lock().unwrap() = line;
            }
        });
        Relay { child, addr, stats }
    }

    /// A counter of the latest `stats` line.
    fn stat(&self, name: &str) -> u64 {
        let line = self.stats.lock().unwrap().clone();
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Loss,
    Jitter,
    Duplication,
    Cut,
}

fn replicate_through(transport: &str, fault: Fault) {
    if !root_or_skip("putting packet faults on loopback with iptables") {
        return;
    }
    let lab = Lab::over(&["esx01"], transport);
    let sources: Vec<_> = (0..2).map(|i| lab.path(&format!("d{i}.img"))).collect();
    for (i, s) in sources.iter().enumerate() {
        image::generate(s, DISK, Profile::Random, 70 + i as u64).unwrap();
    }
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let port: u16 = sink.addr.rsplit(':').next().unwrap().parse().unwrap();
    let proto = if transport == "grpc" { "tcp" } else { "udp" };
    let relay = (fault == Fault::Jitter).then(|| Relay::start(proto, &sink.addr, 5, 50));
    let firewall = match fault {
        Fault::Loss => Some(Firewall::new(
            "filter",
            "INPUT",
            proto,
            port,
            "-m statistic --mode random --probability 0.05 -j DROP",
        )),
        Fault::Duplication => Some(Firewall::new(
            "mangle",
            "OUTPUT",
            proto,
            port,
            "-m statistic --mode random --probability 0.01 -j TEE --gateway 127.0.0.1",
        )),
        Fault::Jitter | Fault::Cut => None,
    };
    let reach = sink.via(relay.as_ref().map_or(sink.addr.as_str(), |r| r.addr.as_str()));
    let group = format!(
        "[[group]]\nname = \"vm\"\nkind = \"file\"\ninterval = \"{INTERVAL}s\"\ndisks = [{{ source = \"{}\", target = \"file:d0\" }}, {{ source = \"{}\", target = \"file:d1\" }}]\n",
        sources[0].display(),
        sources[1].display()
    );
    // The cut comes in the middle of the first (full) epoch: paced to 4 MiB/s, it takes ~8 s.
    let agent = if fault == Fault::Cut { "bwlimit = \"4MiB\"" } else { "" };
    let mut daemon = Daemon::start_with(&lab, &reach, "esx01", agent, "", &group, &[]);
    let mut cut_packets = 0;
    if fault == Fault::Cut {
        assert!(wait_until(Duration::from_secs(20), || daemon.group("vm")["state"] == "syncing"));
        std::thread::sleep(Duration::from_secs(2));
        let cut = Firewall::new("filter", "INPUT", proto, port, "-j DROP");
        std::thread::sleep(Duration::from_secs(10));
        cut_packets = cut.packets();
        let g = daemon.group("vm");
        assert_eq!(g["committed_epoch"], 0, "the first epoch committed across the cut: {g}");
        drop(cut);
        // Both sides give up on a silent peer after 5 s: the cycle failed and is retried.
        assert!(daemon.log_text().contains("cycle failed"), "the cut went unnoticed: {}", daemon.log_text());
    }
    let healed = std::time::Instant::now();
    daemon.wait_epoch("vm", 1, Duration::from_secs(120));
    if fault == Fault::Cut {
        println!(
            "{transport}: first epoch committed {:.1} s after the cut ended",
            healed.elapsed().as_secs_f64()
        );
    }
    for (i, s) in sources.iter().enumerate() {
        for k in 0..4u64 {
            scribble(s, k * 3 * MIB, MIB as usize, 700 + 10 * i as u64 + k);
        }
    }
    // Two more commits: the second began after the new data was in place.
    let now = daemon.group("vm")["committed_epoch"].as_u64().unwrap();
    let g = daemon.wait_epoch("vm", now + 2, Duration::from_secs(120));
    // The RPO is back to what a clean link gives: the interval plus one cycle (plus sampling).
    let (rpo, cycle) = (g["rpo_seconds"].as_f64().unwrap(), g["last_cycle_seconds"].as_f64().unwrap());
    assert!(rpo <= INTERVAL + cycle + 1.0, "RPO {rpo:.1} s did not recover (cycle {cycle:.1} s): {g}");

    let hit = match (fault, &firewall, &relay) {
        (Fault::Cut, _, _) => cut_packets,
        (_, Some(f), _) => f.packets(),
        (_, _, Some(r)) if proto == "udp" => r.stat("reordered"),
        (_, _, Some(r)) => r.stat("forwarded"),
        _ => 0,
    };
    println!(
        "{transport} {fault:?}: {hit} packets hit; RPO {rpo:.2} s, cycle {cycle:.2} s; failures {}",
        g["failures"]
    );
    assert!(hit > 0, "the fault {fault:?} never hit a packet");
    drop(firewall);
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    for (i, s) in sources.iter().enumerate() {
        assert!(same_file(s, &lab.target(&format!("d{i}"))), "disk {i} differs after {fault:?}");
    }
}

fn five_percent_loss(transport: &str) {
    replicate_through(transport, Fault::Loss);
}

fn fifty_ms_jitter_with_reordering(transport: &str) {
    replicate_through(transport, Fault::Jitter);
}

fn one_percent_duplication(transport: &str) {
    replicate_through(transport, Fault::Duplication);
}

fn a_ten_second_cut(transport: &str) {
    replicate_through(transport, Fault::Cut);
}

each_transport!(
    five_percent_loss,
    fifty_ms_jitter_with_reordering,
    one_percent_duplication,
    a_ten_second_cut
);
