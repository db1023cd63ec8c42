//! The real sink process driven by a fake agent that speaks the real protocol over QUIC with
//! mutual TLS, to exercise what a well-behaved agent never sends: missing certificates,
//! corrupted chunks, out-of-bounds extents, wrong versions, out-of-order messages and malformed
//! group requests. Also checks that acknowledgements come only after the state on disk says the
//! same.

mod common;

use std::sync::Arc;

use blockship_proto::pb::{self, ErrorCode, SyncMode};
use blockship_proto::{version, Body};
use blockship_transport::{quic, FrameWriter, QuicTuning, TlsFiles, TransportError};
use bytes::Bytes;
use common::*;

fn target_bytes(lab: &Lab) -> Vec<u8> {
    std::fs::read(lab.dir.path().join("root/disk")).unwrap()
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let lab = Lab::start();
    let files = TlsFiles::agent_in_pki(&lab.pki(), "esx01");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&files.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![blockship_transport::ALPN.to_vec()];
    let result = async {
        let (_e, conn) = quic::connect(config, &QuicTuning::default(), &lab.addr, None).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"hello").await?;
        let mut buf = [0u8; 1];
        recv.read_exact(&mut buf)
            .await
            .map_err(|e| TransportError::Io(std::io::Error::other(e.to_string())))?;
        Ok::<_, TransportError>(())
    }
    .await;
    result.expect_err("a client without certificate got a session");
    // The client may learn of the failure before the sink has logged it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !lab.log().contains("handshake failed") && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(lab.log().contains("handshake failed"), "{}", lab.log());
    assert!(!lab.dir.path().join("state/targets").exists());
}

#[tokio::test]
async fn corrupted_chunk_is_refused_and_not_written() {
    let lab = Lab::start();
    let mut a = lab.agent().await;
    a.hello().await;
    a.open(4 << 20).await;
    a.begin(1).await;
    let mut s = FrameWriter::new(a.conn.open_uni().await.unwrap());
    let good = vec![0x5a; 1 << 20];
    let (h, p) = chunk(0, 0, &good);
    s.send_with_payload(&Body::Chunk(h), p).await.unwrap();
    let (mut h, p) = chunk(1, 1 << 20, &good);
    let mut bad = p.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    h.encoded_length = bad.len() as u32;
    s.send_with_payload(&Body::Chunk(h), Bytes::from(bad)).await.unwrap();
    let msg = a.refused(ErrorCode::Checksum).await;
    assert!(msg.contains("offset 1048576") && msg.contains("nothing was written"), "{msg}");
    let data = target_bytes(&lab);
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0), "the corrupted chunk reached the target");
    assert_eq!(lab.state()["committed_epoch"], 0);
}

#[tokio::test]
async fn extents_outside_the_disk_are_refused() {
    let lab = Lab::start();
    let mut a = lab.agent().await;
    a.hello().await;
    a.open(4 << 20).await;
    a.begin(1).await;
    let mut s = FrameWriter::new(a.conn.open_uni().await.unwrap());
    let z = pb::ZeroExtent { disk: 1, seq: 0, offset: (4 << 20) - 4096, length: 8192 };
    s.send(&Body::Zero(z)).await.unwrap();
    let msg = a.refused(ErrorCode::OutOfBounds).await;
    assert!(msg.contains("outside the disk"), "{msg}");
    let mut a = lab.agent().await;
    a.hello().await;
    a.open(4 << 20).await;
    a.begin(1).await;
    let mut s = FrameWriter::new(a.conn.open_uni().await.unwrap());
    let (h, p) = chunk(0, u64::MAX - 10, &[1; 4096]);
    s.send_with_payload(&Body::Chunk(h), p).await.unwrap();
    a.refused(ErrorCode::OutOfBounds).await;
    assert_eq!(std::fs::metadata(lab.dir.path().join("root/disk")).unwrap().len(), 4 << 20);
}

#[tokio::test]
async fn version_and_ordering_errors_are_refused() {
    let lab = Lab::start();
    let mut a = lab.agent().await;
    let mut h = version::hello("from the future");
    h.min_version = 99;
    h.max_version = 100;
    a.w.send(&Body::Hello(h)).await.unwrap();
    assert!(a.refused(ErrorCode::Version).await.contains("no common protocol version"));

    let mut a = lab.agent().await;
    a.w.send(&Body::EpochBegin(pb::EpochBegin::default())).await.unwrap();
    a.refused(ErrorCode::BadRequest).await;

    let mut a = lab.agent().await;
    a.hello().await;
    a.open(1 << 20).await;
    let req = pb::EpochBegin { disk: 1, epoch: 7, mode: SyncMode::Full as i32, ..Default::default() };
    a.w.send(&Body::EpochBegin(req)).await.unwrap();
    assert!(a.refused(ErrorCode::BadRequest).await.contains("last committed epoch is 0"));

    let mut a = lab.agent().await;
    a.hello().await;
    a.open(1 << 20).await;
    let mut s = FrameWriter::new(a.conn.open_uni().await.unwrap());
    let (h, p) = chunk(0, 0, &[3; 4096]);
    s.send_with_payload(&Body::Chunk(h), p).await.unwrap();
    assert!(a.refused(ErrorCode::BadRequest).await.contains("outside an epoch"));
}

#[tokio::test]
async fn acks_follow_durable_state() {
    let lab = Lab::start();
    let mut a = lab.agent().await;
    a.hello().await;
    let opened = a.open(64 << 20).await;
    assert!(opened.created);
    a.begin(1).await;
    let mut s = FrameWriter::new(a.conn.open_uni().await.unwrap());
    let mut expected = vec![0u8; 64 << 20];
    for i in 0..64u64 {
        let data: Vec<u8> = (0..1 << 20).map(|j| ((i * 7 + j) % 251) as u8).collect();
        expected[(i << 20) as usize..((i + 1) << 20) as usize].copy_from_slice(&data);
        let (h, p) = chunk(i, i << 20, &data);
        s.send_with_payload(&Body::Chunk(h), p).await.unwrap();
    }
    s.close();
    a.w.send(&Body::EpochCommit(pb::EpochCommit {
        disk: 1,
        epoch: 1,
        items: 64,
        change_point: "cp-1".into(),
    }))
    .await
    .unwrap();
    loop {
        match a.r.next_body("Ack").await.unwrap() {
            Body::Ack(ack) if ack.committed => {
                // The state on disk must already say what the ack says.
                let st = lab.state();
                assert_eq!(st["committed_epoch"], 1);
                assert_eq!(st["change_point"], "cp-1");
                assert!(st["in_progress"].is_null());
                break;
            }
            Body::Ack(ack) => {
                let st = lab.state();
                let durable = st["in_progress"]["durable_offset"].as_u64().unwrap_or(u64::MAX);
                assert!(durable >= ack.durable_offset, "ack {ack:?} ahead of state {st}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(target_bytes(&lab), expected);
}

/// Every target state in the sink's state dir.
fn states(lab: &Lab) -> Vec<serde_json::Value> {
    std::fs::read_dir(lab.path("state/targets"))
        .unwrap()
        .map(|e| {
            serde_json::from_slice(&std::fs::read(e.unwrap().path().join("state.json")).unwrap()).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn malformed_group_requests_are_refused_and_change_nothing() {
    let lab = Lab::start();
    let mut a = lab.agent().await;
    a.hello().await;
    a.open_target("file:g0", 1 << 20, SyncMode::Compare).await.unwrap();
    a.open_target("file:g1", 1 << 20, SyncMode::Compare).await.unwrap();
    let open = |group: &str, disks: Vec<u32>| Body::GroupOpen(pb::GroupOpen { group: group.into(), disks });
    let commit = |group: &str, epoch: u64| Body::GroupCommit(pb::GroupCommit { group: group.into(), epoch });

    // Group-scoped refusals: the session and its disks go on.
    a.w.send(&open("a/b", vec![1, 2])).await.unwrap();
    assert!(a.refused(ErrorCode::BadTarget).await.contains("bad group name"));
    a.w.send(&open("vm", vec![1, 9])).await.unwrap();
    assert!(a.refused(ErrorCode::BadRequest).await.contains("disk handle 9 is not open"));
    a.w.send(&open("vm", vec![1, 1])).await.unwrap();
    assert!(a.refused(ErrorCode::BadTarget).await.contains("names a target twice"));
    a.w.send(&open("vm", vec![])).await.unwrap();
    // The session machine refuses a group of none before the registry sees it.
    assert!(a.refused(ErrorCode::BadRequest).await.contains("names no member disks"));
    a.w.send(&commit("vm", 1)).await.unwrap();
    assert!(a.refused(ErrorCode::BadRequest).await.contains("is not open"));
    let cutover =
        |group: &str, epoch: u64| Body::GroupCutover(pb::GroupCutover { group: group.into(), epoch });
    a.w.send(&cutover("vm", 1)).await.unwrap();
    assert!(a.refused(ErrorCode::BadRequest).await.contains("is not open"));
    assert!(!lab.path("state/groups").exists(), "a refused group was registered");

    // Opened, but committed out of order or before its members are prepared.
    a.w.send(&open("vm", vec![1, 2])).await.unwrap();
    match a.r.next_body("GroupOpened").await.unwrap() {
        Body::GroupOpened(g) => assert_eq!((g.group.as_str(), g.committed_epoch), ("vm", 0)),
        other => panic!("{other:?}"),
    }
    a.w.send(&commit("vm", 3)).await.unwrap();
    assert!(a.refused(ErrorCode::BadRequest).await.contains("its committed epoch is 0"));
    a.w.send(&commit("vm", 1)).await.unwrap();
    assert!(a.refused(ErrorCode::BadRequest).await.contains("before member disk 1 committed it"));
    // A cutover needs a committed epoch, and exactly the group's.
    for epoch in [0, 2] {
        a.w.send(&cutover("vm", epoch)).await.unwrap();
        assert!(a.refused(ErrorCode::BadRequest).await.contains("its committed epoch is 0"));
    }

    // An epoch of a group this session did not open: that disk is closed, nothing written.
    a.disk = 1;
    let req = pb::EpochBegin {
        disk: 1,
        epoch: 1,
        mode: SyncMode::Full as i32,
        group: "other".into(),
        ..Default::default()
    };
    a.w.send(&Body::EpochBegin(req)).await.unwrap();
    assert!(a.refused(ErrorCode::BadRequest).await.contains("send GroupOpen first"));
    for st in states(&lab) {
        assert_eq!(st["committed_epoch"], 0, "{st}");
        assert!(st["in_progress"].is_null(), "{st}");
        assert!(st["cut_over"].is_null(), "{st}");
    }
    // The session still serves the other disk.
    a.w.send(&Body::IndexRequest(pb::IndexRequest { disk: 2 })).await.unwrap();
    assert!(matches!(a.r.next_body("HashList").await.unwrap(), Body::HashList(_)));
}
