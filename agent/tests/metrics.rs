//! Prometheus metrics of both daemons (`--metrics-listen` / `[daemon] metrics_listen`) and the
//! sink's control API: a two-disk group replicates over gRPC, a request is refused, a non-admin
//! and an admin ask the control API for the status; then both scrape endpoints are read over HTTP
//! and every metric docs/metrics.md documents must be there, with its type and labels and a value
//! that fits what happened.

mod common;

use std::time::Duration;

use common::daemon::*;
use common::scrape::*;
use common::*;

const DISK: u64 = 8 << 20;
const ZEROED: u64 = 1 << 20;

/// The metrics docs/metrics.md documents under `section` (a `## ` heading): name, type, labels.
fn documented(section: &str) -> Vec<(String, String, Vec<String>)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docs = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let body = docs.split(&format!("## {section}\n")).nth(1).expect("section in docs/metrics.md");
    let body = body.split("\n## ").next().unwrap();
    let rows: Vec<_> = body
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?.to_string();
            let labels =
                cells[3].split(',').map(|c| c.trim().trim_matches('`').to_string()).filter(|c| !c.is_empty());
            Some((name, cells[2].to_string(), labels.collect()))
        })
        .collect();
    assert!(rows.len() >= 8, "too few metrics documented under {section}: {rows:?}");
    rows
}

/// Every documented metric is served, as its type, with every documented label.
fn check_documented(section: &str, text: &str) {
    for (name, kind, labels) in documented(section) {
        let series = if kind == "histogram" { format!("{name}_bucket") } else { name.clone() };
        assert!(text.contains(&format!("# TYPE {name} {kind}")), "{section}: no {kind} {name}:\n{text}");
        let line = text
            .lines()
            .find(|l| l.strip_prefix(&series).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
            .unwrap_or_else(|| panic!("{section}: no sample of {series}:\n{text}"));
        for l in &labels {
            assert!(line.contains(&format!("{l}=\"")), "{section}: {name} lacks label {l}: {line}");
        }
    }
}

fn control_status(lab: &Lab, sink: &common::Sink, who: &str) -> std::process::Output {
    std::process::Command::new(bin("blockship-sink"))
        .args(["status", "--json", "--sink", &sink.addr, "--as", who, "--pki"])
        .arg(lab.pki())
        .output()
        .unwrap()
}

#[test]
fn both_daemons_serve_every_documented_metric_and_only_admins_reach_the_control_api() {
    // gRPC carries the group here; the QUIC path records the same metrics (one session code).
    let lab = Lab::over(&["esx01", "ops"], "grpc");
    let sources: Vec<_> = (0..2).map(|i| lab.path(&format!("m{i}.img"))).collect();
    for (i, s) in sources.iter().enumerate() {
        std::fs::File::create(s).unwrap().set_len(DISK).unwrap();
        scribble(s, 0, DISK as usize / 2, 90 + i as u64);
    }
    let sink_metrics = format!("127.0.0.1:{}", free_port());
    let sink = lab.sink(
        &["esx01=file:m*"],
        &["--metrics-listen", &sink_metrics, "--log-format", "json", "--admin", "ops"],
    );
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let group = format!(
        "[[group]]\nname = \"vm\"\nkind = \"file\"\ninterval = \"5s\"\ndisks = [{{ source = \"{}\", target = \"file:m0\" }}, {{ source = \"{}\", target = \"file:m1\" }}]\n",
        sources[0].display(),
        sources[1].display()
    );
    // Two connections (the config key of `--connections`): the group's data also crosses on a
    // connection that joined the session.
    let metrics_listen = format!("metrics_listen = \"{agent_metrics}\"");
    let daemon = Daemon::start_with(&lab, &sink, "esx01", "connections = 2", &metrics_listen, &group, &[]);
    daemon.wait_epoch("vm", 2, Duration::from_secs(60));
    // Data turned to zeroes travels as zero extents (a new target's zeroes are never sent).
    for s in &sources {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(s).unwrap();
        f.write_all_at(&[0u8; ZEROED as usize], 0).unwrap();
    }
    daemon.wait_epoch("vm", 4, Duration::from_secs(60));
    // A refused request (a target outside esx01's rules) is counted by its code.
    let refused = lab.try_sync(&sink, "esx01", &sources[0], "file:other", &[]);
    assert!(!refused.status.success(), "a target outside the rules was accepted");

    // A non-admin (the agent's own identity) is refused by the control API; an admin is not.
    let o = control_status(&lab, &sink, "esx01");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("admin"), "a non-admin read the status: {err}");
    let o = control_status(&lab, &sink, "ops");
    assert!(o.status.success(), "admin status: {}", String::from_utf8_lossy(&o.stderr));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let targets = st["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2, "{st}");
    assert!(targets.iter().all(|t| t["committed_epoch"].as_u64() >= Some(2)), "{st}");
    assert_eq!(st["groups"][0]["group"], "esx01/vm", "{st}");
    let sessions = st["sessions"].as_array().unwrap();
    assert!(sessions.iter().any(|s| s["agent"] == "esx01" && s["transport"] == "grpc"), "{st}");
    assert!(sessions.iter().any(|s| s["agent"] == "esx01" && s["connections"] == 2), "{st}");
    std::thread::sleep(Duration::from_millis(1500));

    let a = scrape(&agent_metrics);
    check_documented("Agent daemon", &a);
    let epochs = sample(&a, "blockship_group_epochs_committed_total{group=\"vm\"}").unwrap_or(0.0);
    assert!(epochs >= 4.0, "agent: {a}");
    let disk = |m: &str, t: &str| sample(&a, &format!("{m}{{group=\"vm\",target=\"{t}\"}}")).unwrap_or(-1.0);
    let (read, sent) = (
        disk("blockship_disk_read_bytes_total", "file:m0"),
        disk("blockship_disk_sent_bytes_total", "file:m0"),
    );
    assert!(read >= (DISK / 2) as f64 && sent > 0.0, "agent: read {read}, sent {sent}\n{a}");
    // The second half of each disk is a hole, later the first MiB turned to zeroes.
    assert!(disk("blockship_disk_zero_bytes_total", "file:m1") >= (DISK / 2 + ZEROED) as f64, "{a}");
    assert!(disk("blockship_disk_unchanged_bytes_total", "file:m1") >= 0.0, "{a}");
    let last = sample(&a, "blockship_group_last_commit_timestamp_seconds{group=\"vm\"}").unwrap_or(0.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(now - last < 30.0, "last commit {last}, now {now}");
    let rpo = sample(&a, "blockship_group_rpo_seconds{group=\"vm\"}").expect("no RPO gauge");
    assert!((0.0..30.0).contains(&rpo), "RPO {rpo}");
    let cycles = sample(&a, "blockship_group_cycle_duration_seconds_count{group=\"vm\"}").unwrap_or(0.0);
    assert!(cycles >= 2.0, "{a}");
    for kind in ["link", "group"] {
        let series = format!("blockship_group_cycle_failures_total{{group=\"vm\",kind=\"{kind}\"}}");
        assert_eq!(sample(&a, &series), Some(0.0), "{a}");
    }

    let s = scrape(&sink_metrics);
    check_documented("Sink", &s);
    let written = sample(&s, "blockship_sink_written_bytes_total{target=\"file:m1\"}").unwrap_or(0.0);
    assert!(written >= (DISK / 2) as f64, "sink: {s}");
    let zero = sample(&s, "blockship_sink_zero_bytes_total{target=\"file:m1\"}").unwrap_or(0.0);
    assert!(zero >= ZEROED as f64, "sink: {s}");
    assert!(sample(&s, "blockship_sink_items_total{target=\"file:m1\"}").unwrap_or(0.0) >= 2.0, "{s}");
    let committed = sample(&s, "blockship_sink_epochs_committed_total{target=\"file:m1\"}").unwrap_or(0.0);
    assert!(committed >= 2.0, "sink: {s}");
    let at = sample(&s, "blockship_sink_last_commit_timestamp_seconds{target=\"file:m1\"}").unwrap_or(0.0);
    assert!(now - at < 30.0, "sink last commit {at}, now {now}");
    assert_eq!(sample(&s, "blockship_sink_checksum_failures_total"), Some(0.0), "{s}");
    assert_eq!(sample(&s, "blockship_sink_sessions"), Some(1.0), "sink: {s}");
    let received = sample(&s, "blockship_sink_received_bytes_total{agent=\"esx01\"}").unwrap_or(0.0);
    assert!(received >= sent, "sink received {received} < agent sent {sent} for one disk\n{s}");
    // Between cycles nothing is admitted and not yet durable.
    assert_eq!(sample(&s, "blockship_sink_in_flight_bytes"), Some(0.0), "{s}");
    let refusals =
        |code: &str| sample(&s, &format!("blockship_sink_refusals_total{{code=\"{code}\"}}")).unwrap_or(0.0);
    assert!(refusals("PERMISSION_DENIED") >= 1.0, "{s}");
    assert!(refusals("ERROR_CODE_UNAUTHORIZED") >= 1.0, "{s}");
    println!(
        "agent: {epochs} epochs, {read} bytes read, {sent} sent, RPO {rpo:.2} s; sink: {received} received, {written} written"
    );

    // `--log-format json`: every line the sink logged is one JSON event.
    let log = lab.sink_log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["fields"]["message"] == "epoch committed" && e["level"] == "INFO"),
        "{log}"
    );
}

/// Every metric the example dashboard and alert rules use is one the daemons document (and so
/// serve: the names in docs/metrics.md are the ones the test above scrapes and the code records).
#[test]
fn the_example_dashboard_and_alerts_use_documented_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docs = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let dashboard = std::fs::read_to_string(root.join("examples/grafana-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(d["panels"].as_array().is_some_and(|p| p.len() >= 6), "{d}");
    let alerts = std::fs::read_to_string(root.join("examples/prometheus-alerts.yml")).unwrap();
    for text in [&dashboard, &alerts] {
        let mut rest = text.as_str();
        let mut seen = 0;
        while let Some(i) = rest.find("blockship_") {
            let name: String =
                rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let base = name.strip_suffix("_bucket").unwrap_or(&name);
            assert!(docs.contains(&format!("`{base}`")), "{base} is used but not in docs/metrics.md");
            seen += 1;
            rest = &rest[i + name.len()..];
        }
        assert!(seen >= 3, "no metrics found in an example");
    }
}
