//! Injected corruption (test builds only: `--features blockship-agent/failpoints,
//! blockship-sink/failpoints`). The agent flips one bit of a chunk after hashing it
//! (`agent::corrupt-after-hash`): the sink must refuse that chunk for its checksum, write none of
//! it, and count it; the agent retries from what is durable and the copy ends exact. The sink
//! flips bits in data read back while verifying (`sink::corrupt-verify-read`): `verify` must
//! name every damaged chunk. Counts come from both daemons' metrics and the processes' logs, so
//! "every injected corruption was detected" is checked as an equality, not assumed.

mod common;

use std::time::Duration;

use blockship_bench::image::{self, Profile};
use common::daemon::*;
use common::scrape::*;
use common::*;

const DISK: u64 = 32 * MIB;

/// The agent's FAILPOINTS when the build has them; a build without them cannot run these tests.
fn armed() -> bool {
    failpoints_built("blockship-agent", &["--version"], "agent::corrupt-after-hash=off")
}

/// Chunks of the target (1 MiB each) that are neither the source's nor still unwritten zeros.
fn foreign_chunks(src: &std::path::Path, target: &std::path::Path) -> Vec<u64> {
    let (s, t) = (std::fs::read(src).unwrap(), std::fs::read(target).unwrap_or_default());
    let mut t = t;
    t.resize(s.len(), 0);
    s.chunks(MIB as usize)
        .zip(t.chunks(MIB as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b && b.iter().any(|&x| x != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

fn injections(log: &str) -> usize {
    log.matches("failpoint agent::corrupt-after-hash: flipped").count()
}

fn corrupted_chunks_are_refused_never_written_and_retried(transport: &str) {
    if !armed() {
        return;
    }
    let lab = Lab::over(&["esx01"], transport);
    let src = lab.path("src.img");
    // Random data: every chunk travels (no zeros skipped), none compresses.
    image::generate(&src, DISK, Profile::Random, 31).unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let sink = lab.sink_with(
        "127.0.0.1:0",
        &["esx01=file:*"],
        &["--metrics-listen", &metrics],
        &[("FAILPOINTS", "sink::corrupt-verify-read=return(3,17,18,30)")],
    );
    let sync = |fp: &str, extra: &[&str]| {
        let mut cmd = lab.agent_cmd(&sink, "esx01", "sync");
        cmd.arg("--source").arg(&src).args(["--target", "file:vm", "--json"]).args(extra);
        cmd.env("FAILPOINTS", fp).env("RUST_LOG", "warn").output().unwrap()
    };

    // Without retries: the sync fails naming the checksum, and nothing damaged reached the target.
    let out = sync("agent::corrupt-after-hash=5*off->return", &["--checksum-retries", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a corrupted chunk was accepted: {err}");
    assert_eq!(injections(&err), 1, "one corruption per attempt: {err}");
    assert!(err.contains("BLAKE3 mismatch") && err.contains("nothing was written"), "{err}");
    assert_eq!(foreign_chunks(&src, &lab.target("vm")), Vec::<u64>::new(), "a corrupted chunk was written");
    assert_eq!(state_of(&lab, "file:vm").unwrap()["committed_epoch"], 0);

    // With retries (default 3): the first attempt is damaged once more, the retry resumes and
    // completes; the copy is exact.
    let out = sync("agent::corrupt-after-hash=2*off->1*return->off", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the retry did not complete: {err}\n{}", lab.sink_log());
    assert_eq!(injections(&err), 1, "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&report, "checksum_retries"), 1, "{report}");
    assert!(same_file(&src, &lab.target("vm")), "the target differs from the source");
    let m = scrape(&metrics);
    assert_eq!(sample(&m, "blockship_sink_checksum_failures_total"), Some(2.0), "2 injected:\n{m}");

    // Read-back damage while verifying: every damaged chunk is named (17 and 18 as one range).
    let out = lab
        .agent_cmd(&sink, "esx01", "verify")
        .arg("--source")
        .arg(&src)
        .args(["--target", "file:vm", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "verify missed read-back damage");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(u(&v, "chunks_differing"), 4, "{v}");
    let ranges: Vec<(u64, u64)> = serde_json::from_value(v["first_differences"].clone()).unwrap();
    assert_eq!(ranges, [(3 * MIB, 4 * MIB), (17 * MIB, 19 * MIB), (30 * MIB, 31 * MIB)], "{v}");
    let m = scrape(&metrics);
    assert_eq!(sample(&m, "blockship_sink_injected_corruptions_total"), Some(4.0), "{m}");
    // The damage was in the reading, not in the target.
    assert!(same_file(&src, &lab.target("vm")));
}

fn a_daemon_group_with_damaged_chunks_retries_until_exact(transport: &str) {
    if !armed() {
        return;
    }
    let lab = Lab::over(&["esx01"], transport);
    let sources: Vec<_> = (0..2).map(|i| lab.path(&format!("d{i}.img"))).collect();
    for (i, s) in sources.iter().enumerate() {
        image::generate(s, DISK / 2, Profile::Random, 40 + i as u64).unwrap();
    }
    let (sink_metrics, agent_metrics) =
        (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let sink = lab.sink(&["esx01=file:*"], &["--metrics-listen", &sink_metrics]);
    let group = format!(
        "[[group]]\nname = \"vm\"\nkind = \"file\"\ninterval = \"5s\"\ndisks = [{{ source = \"{}\", target = \"file:d0\" }}, {{ source = \"{}\", target = \"file:d1\" }}]\n",
        sources[0].display(),
        sources[1].display()
    );
    // Three attempts are damaged for sure, then 2 % of the chunks at random.
    let daemon = Daemon::start(
        &lab,
        &sink,
        "esx01",
        &format!("metrics_listen = \"{agent_metrics}\""),
        &group,
        &[("FAILPOINTS", "agent::corrupt-after-hash=4*off->3*return->2%return")],
    );
    daemon.wait_epoch("vm", 1, Duration::from_secs(90));
    // New data in both disks: later epochs are damaged and retried as well, at times.
    for (i, s) in sources.iter().enumerate() {
        for k in 0..6u64 {
            scribble(s, k * 2 * MIB, MIB as usize, 500 + 10 * i as u64 + k);
        }
    }
    // Two more commits: the second began after the new data was in place.
    let now = daemon.group("vm")["committed_epoch"].as_u64().unwrap();
    let g = daemon.wait_epoch("vm", now + 2, Duration::from_secs(90));
    daemon.control("pause", "vm");
    // Counts settle once the running cycle ended (a refusal travels after its injection).
    let (mut a, mut injected, mut detected) = (String::new(), 0.0, -1.0);
    let settled = wait_until(Duration::from_secs(20), || {
        a = scrape(&agent_metrics);
        injected = sample(&a, "blockship_agent_injected_corruptions_total").unwrap_or(0.0);
        detected = sample(&scrape(&sink_metrics), "blockship_sink_checksum_failures_total").unwrap_or(-1.0);
        injected == detected && daemon.group("vm")["state"] == "paused"
    });
    let retried =
        sample(&a, "blockship_group_cycle_failures_total{group=\"vm\",kind=\"checksum\"}").unwrap_or(0.0);
    println!("injected {injected}, detected {detected}, cycles retried {retried}; {g}");
    assert!(injected >= 3.0, "the failpoint did not fire: {a}");
    assert!(settled, "every injected corruption is detected, once: {injected} injected, {detected} detected");
    // Each damaged cycle failed and was retried (a cycle may carry one per disk).
    assert!(retried >= (injected / 2.0).ceil() && retried <= injected, "{retried} retries for {injected}");
    assert_eq!(injections(&daemon.log_text()) as f64, injected, "log and metric disagree");
    let mut daemon = daemon;
    assert!(daemon.stop().success());
    // Nothing damaged was ever written: the committed copies equal the sources.
    for (i, s) in sources.iter().enumerate() {
        assert!(same_file(s, &lab.target(&format!("d{i}"))), "disk {i} differs");
    }
}

each_transport!(
    corrupted_chunks_are_refused_never_written_and_retried,
    a_daemon_group_with_damaged_chunks_retries_until_exact
);
