//! The `blockship-bench relay` command as the fault tests run it: it prints where it listens,
//! then a `stats` line every second. (Being an integration test of this package also makes
//! `cargo test --workspace` build the `blockship-bench` binary the agent's fault tests drive.)

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn relay_announces_its_address_and_reports_stats() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_blockship-bench"))
        .args(["relay", "udp", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--jitter-ms", "5"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr: std::net::SocketAddr = first.strip_prefix("listening on ").unwrap().parse().unwrap();
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    probe.send_to(b"hello", addr).unwrap();
    let stats = lines.next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(stats.starts_with("stats forwarded="), "{stats}");
    assert!(stats.contains("forwarded=1 "), "the probe datagram was not counted: {stats}");
}
