//! A client must not be able to hog the sink: memory stays within the in-flight budget however
//! many chunk headers a slow client announces, other agents keep syncing at full speed, a silent
//! client loses its session and its target after the idle timeout, and connection, disk and
//! size limits answer with clear refusals.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use blockship_proto::pb::{self, SyncMode};
use blockship_proto::{frame, Body};
use bytes::{Bytes, BytesMut};
use common::*;

/// A real agent sync of `src` into `target` as esx02; returns (success, stderr, seconds).
fn agent_sync(lab: &Lab, src: &std::path::Path, target: &str) -> (bool, String, f64) {
    let started = Instant::now();
    let out = std::process::Command::new(agent_bin())
        .args(["sync", "--sink", &lab.addr, "--name", "esx02", "--no-progress", "--json", "--pki"])
        .arg(lab.pki())
        .arg("--source")
        .arg(src)
        .args(["--target", target])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned(), started.elapsed().as_secs_f64())
}

fn source(lab: &Lab, size: usize) -> std::path::PathBuf {
    let p = lab.path("src.img");
    let mut f = std::fs::File::create(&p).unwrap();
    for i in 0..size / (4 << 20) {
        f.write_all(&pattern(i as u64, 4 << 20)).unwrap();
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_exhaust_memory_or_starve_others() {
    let lab = Lab::with(&["--allow", "esx01=file:*", "--allow", "esx02=file:*"], &[]);
    let src = source(&lab, 512 << 20);
    let (ok, err, baseline) = agent_sync(&lab, &src, "file:baseline");
    assert!(ok, "{err}");

    // The attacker announces 64 chunks of 16 MiB and sends all but the last 4 KiB of each.
    let mut a = lab.agent().await;
    a.hello().await;
    a.open_target("file:attack", 1 << 40, SyncMode::Compare).await.unwrap();
    a.begin(1).await;
    let payload = Bytes::from(vec![0x5au8; 16 << 20]);
    let mut streams = Vec::new();
    for seq in 0..64u64 {
        let (conn, payload) = (a.conn.clone(), payload.clone());
        streams.push(tokio::spawn(async move {
            // The sink decides how many streams may be open: the rest wait.
            let mut send = conn.open_uni().await?;
            let h = pb::ChunkHeader {
                disk: 1,
                seq,
                offset: seq << 24,
                length: 16 << 20,
                blake3: Bytes::from(vec![0u8; 32]),
                codec: pb::Codec::None as i32,
                encoded_length: 16 << 20,
            };
            let mut head = BytesMut::new();
            frame::encode_header(&Body::Chunk(h), &mut head);
            send.write(head.freeze(), payload.slice(..(16 << 20) - 4096)).await?;
            // Hold the stream open, never finishing the chunk.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, blockship_transport::TransportError>(send)
        }));
    }
    // Let the attacker push what flow control lets through.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (ok, err, attacked) = agent_sync(&lab, &src, "file:victim");
    assert!(ok, "the second agent failed during the attack: {err}\n{}", lab.log());
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(lab.path("root/victim")).unwrap());
    let rss = peak_rss(lab.pid());
    println!(
        "sink peak RSS {} MiB; second agent {attacked:.2} s under attack, {baseline:.2} s without",
        rss >> 20
    );
    assert!(rss <= 256 << 20, "sink peak RSS {} MiB exceeds its 256 MiB budget", rss >> 20);
    assert!(
        attacked <= 2.0 * baseline + 1.0,
        "the attack slowed the second agent: {attacked:.2} s vs {baseline:.2} s"
    );
    for s in streams {
        s.abort();
    }
}

#[tokio::test]
async fn a_silent_client_loses_its_session_and_target() {
    let lab = Lab::with(
        &[
            "--allow",
            "esx01=file:*",
            "--allow",
            "esx02=file:*",
            "--idle-timeout",
            "3s",
            "--hello-timeout",
            "2s",
        ],
        &[],
    );
    // Connected, authenticated, holding file:t in an epoch, then silent (QUIC keep-alives flow).
    let mut a = lab.agent().await;
    a.hello().await;
    a.open_target("file:t", 4 << 20, SyncMode::Compare).await.unwrap();
    a.begin(1).await;
    let mut b = lab.agent_as("esx02").await;
    b.hello().await;
    let busy = b.open_target("file:t", 4 << 20, SyncMode::Compare).await.unwrap_err().to_string();
    assert!(busy.contains("being written by agent \"esx01\""), "{busy}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut b = lab.agent_as("esx02").await;
    b.hello().await;
    b.open_target("file:t", 4 << 20, SyncMode::Compare).await.expect("the silent session still holds file:t");
    let why = a.r.next_body("anything").await.unwrap_err().to_string();
    assert!(
        why.contains("no progress"),
        "the silent agent was not told why: {why}\nsink log:\n{}",
        lab.log()
    );

    // A client that never says Hello is dropped after --hello-timeout.
    let c = lab.agent().await;
    let started = Instant::now();
    let mut c = c;
    let reason = c.r.next_body("anything").await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(10), "a client without Hello kept its connection");
    assert!(reason.contains("Hello"), "{reason}");
}

#[tokio::test]
async fn connection_disk_and_size_limits_are_clear_refusals() {
    let lab = Lab::with(
        &[
            "--allow",
            "esx01=file:*",
            "--max-connections",
            "2",
            "--max-disks-per-connection",
            "1",
            "--max-disk-size",
            "1TiB",
        ],
        &[],
    );
    let mut a = lab.agent().await;
    a.hello().await;
    let mut b = lab.agent().await;
    b.hello().await;
    let mut c = lab.agent().await;
    let busy = c.try_hello().await.unwrap_err().to_string();
    assert!(busy.contains("2 connections") && busy.contains("Busy"), "{busy}");
    drop(c);

    let big = a.open_target("file:big", 2 << 40, SyncMode::Compare).await.unwrap_err().to_string();
    assert!(big.contains("--max-disk-size"), "{big}");
    assert!(!lab.path("root/big").exists());
    // A refused disk ends that disk only: the connection goes on.
    a.open_target("file:one", 1 << 20, SyncMode::Compare).await.unwrap();
    let msg = a.open_target("file:two", 1 << 20, SyncMode::Compare).await.unwrap_err().to_string();
    assert!(msg.contains("--max-disks-per-connection") && msg.contains("Busy"), "{msg}");
    drop(b);
}
