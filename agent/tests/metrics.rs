//! Prometheus metrics of both daemons (`--metrics-listen` / `[daemon] metrics_listen`): a
//! two-disk group replicates, then both scrape endpoints are read over HTTP and must report what
//! happened — epochs committed, bytes read, sent and written, the last commit's time and the
//! RPO — with the documented names and labels.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::daemon::*;
use common::*;

const DISK: u64 = 8 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET /metrics` at `addr`: the exposition text.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the sample `name{labels}` (labels as they are printed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn both_daemons_serve_prometheus_metrics() {
    let lab = Lab::new(&["esx01"]);
    let sources: Vec<_> = (0..2).map(|i| lab.path(&format!("m{i}.img"))).collect();
    for (i, s) in sources.iter().enumerate() {
        std::fs::File::create(s).unwrap().set_len(DISK).unwrap();
        scribble(s, 0, DISK as usize / 2, 90 + i as u64);
    }
    let sink_metrics = format!("127.0.0.1:{}", free_port());
    let sink = lab.sink(&["esx01=file:*"], &["--metrics-listen", &sink_metrics, "--log-format", "json"]);
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let group = format!(
        "[[group]]\nname = \"vm\"\nkind = \"file\"\ninterval = \"5s\"\ndisks = [{{ source = \"{}\", target = \"file:m0\" }}, {{ source = \"{}\", target = \"file:m1\" }}]\n",
        sources[0].display(),
        sources[1].display()
    );
    let daemon =
        Daemon::start(&lab, &sink, "esx01", &format!("metrics_listen = \"{agent_metrics}\""), &group, &[]);
    daemon.wait_epoch("vm", 2, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));

    let a = scrape(&agent_metrics);
    let epochs = sample(&a, "blockship_group_epochs_committed_total{group=\"vm\"}").unwrap_or(0.0);
    assert!(epochs >= 2.0, "agent: {a}");
    let read = sample(&a, "blockship_disk_read_bytes_total{group=\"vm\",target=\"file:m0\"}").unwrap_or(0.0);
    let sent = sample(&a, "blockship_disk_sent_bytes_total{group=\"vm\",target=\"file:m0\"}").unwrap_or(0.0);
    assert!(read >= (DISK / 2) as f64 && sent > 0.0, "agent: read {read}, sent {sent}\n{a}");
    let last = sample(&a, "blockship_group_last_commit_timestamp_seconds{group=\"vm\"}").unwrap_or(0.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(now - last < 30.0, "last commit {last}, now {now}");
    let rpo = sample(&a, "blockship_group_rpo_seconds{group=\"vm\"}").expect("no RPO gauge");
    assert!((0.0..30.0).contains(&rpo), "RPO {rpo}");
    assert!(a.contains("blockship_group_cycle_duration_seconds_bucket{group=\"vm\""), "{a}");

    let s = scrape(&sink_metrics);
    let written = sample(&s, "blockship_sink_written_bytes_total{target=\"file:m1\"}").unwrap_or(0.0);
    assert!(written > 0.0, "sink: {s}");
    let committed = sample(&s, "blockship_sink_epochs_committed_total{target=\"file:m1\"}").unwrap_or(0.0);
    assert!(committed >= 2.0, "sink: {s}");
    assert_eq!(sample(&s, "blockship_sink_sessions"), Some(1.0), "sink: {s}");
    println!("agent: {epochs} epochs, {read} bytes read, {sent} sent, RPO {rpo:.2} s; sink: {written} bytes written");

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
