//! Joined connections (`--connections N`), driven by a fake agent that speaks the real protocol
//! over both transports: data sent on a joined connection lands in the session's epoch and is
//! committed with it; a joined connection may not send control messages, needs the session's
//! token and the same agent identity, and ends with its session.

mod common;

use std::time::Duration;

use blockship_proto::pb::{self, ErrorCode};
use blockship_proto::{version, Body};
use blockship_transport::{FrameWriter, Transport};
use bytes::Bytes;
use common::*;

/// A connection of `name` that joins the session of `token`; its Hello is answered or refused.
async fn joining(lab: &Lab, name: &str, transport: Transport, token: &[u8]) -> Fake {
    let mut f = lab.agent_over(name, transport).await;
    let hello = pb::Hello { join: Bytes::copy_from_slice(token), ..version::hello("fake") };
    f.w.send(&Body::Hello(hello)).await.unwrap();
    f
}

async fn joined(lab: &Lab, transport: Transport, token: &[u8]) -> Fake {
    let mut f = joining(lab, "esx01", transport, token).await;
    match f.r.next_body("HelloReply").await.unwrap() {
        Body::HelloReply(r) => assert!(r.session_token.is_empty(), "a joined connection got a token: {r:?}"),
        other => panic!("{other:?}"),
    }
    f
}

async fn data_on_joined_connections(transport: Transport) {
    let lab = Lab::start();
    let mut a = lab.agent_over("esx01", transport).await;
    let reply = a.try_hello().await.unwrap();
    assert!(reply.capabilities.iter().any(|c| c == version::CAP_JOIN), "{reply:?}");
    assert_eq!(reply.session_token.len(), 16);
    let b = joined(&lab, transport, &reply.session_token).await;
    let c = joined(&lab, transport, &reply.session_token).await;
    a.open(6 << 20).await;
    a.begin(1).await;

    // Six chunks over the three connections, each its own stream.
    let data: Vec<Vec<u8>> = (0..6u64).map(|i| pattern(i + 1, 1 << 20)).collect();
    for (k, conn) in [&a.conn, &b.conn, &c.conn].into_iter().enumerate() {
        let mut s = FrameWriter::new(conn.open_uni().await.unwrap());
        for i in [k as u64, k as u64 + 3] {
            let (mut h, p) = chunk(i, i << 20, &data[i as usize]);
            h.disk = a.disk;
            s.send_with_payload(&Body::Chunk(h), p).await.unwrap();
        }
        s.close();
    }
    let commit = pb::EpochCommit { disk: a.disk, epoch: 1, items: 6, change_point: "cp-1".into() };
    a.w.send(&Body::EpochCommit(commit)).await.unwrap();
    loop {
        match a.r.next_body("Ack").await.unwrap() {
            Body::Ack(ack) if ack.committed => break,
            Body::Ack(_) => continue,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(std::fs::read(lab.dir.path().join("root/disk")).unwrap(), data.concat());
    assert_eq!(lab.state()["committed_epoch"], 1);

    // A control message on a joined connection ends that connection, not the session.
    let mut b = b;
    b.w.send(&Body::EpochBegin(pb::EpochBegin { disk: 1, epoch: 2, ..Default::default() })).await.unwrap();
    let msg = b.refused(ErrorCode::BadRequest).await;
    assert!(msg.contains("joined connection") && msg.contains("first connection"), "{msg}");
    a.begin(2).await;

    // When the session ends, what joined it is closed.
    a.w.close();
    a.conn.close(0, b"done");
    let mut c = c;
    let ended = tokio::time::timeout(Duration::from_secs(10), c.r.next()).await;
    assert!(
        matches!(ended, Ok(Err(_)) | Ok(Ok(None))),
        "the joined connection outlived its session: {ended:?}"
    );
}

/// Joining needs the session's token and agent, at most `MAX_JOINED` times, while it lasts.
async fn joining_needs_the_sessions_token_and_agent(transport: Transport) {
    let args = ["--allow", "esx01=file:*", "--allow", "esx02=file:*", "--max-agent-connections", "32"];
    let lab = Lab::with(&args, &[]);
    let mut a = lab.agent_over("esx01", transport).await;
    let token = a.try_hello().await.unwrap().session_token;

    for wrong in [vec![0u8; 16], vec![1, 2, 3], token[..15].to_vec()] {
        let mut x = joining(&lab, "esx01", transport, &wrong).await;
        let msg = x.refused(ErrorCode::Unauthorized).await;
        assert!(msg.contains("no session to join"), "{msg}");
    }
    // Another agent's token is refused with the same words as a wrong one.
    let mut other = joining(&lab, "esx02", transport, &token).await;
    let msg = other.refused(ErrorCode::Unauthorized).await;
    assert!(msg.contains("no session to join"), "{msg}");

    // At most 15 joined connections per session (16 with its own); the 16th is refused.
    let mut kept = Vec::new();
    for _ in 0..15 {
        kept.push(joined(&lab, transport, &token).await);
    }
    let mut over = joining(&lab, "esx01", transport, &token).await;
    let msg = over.refused(ErrorCode::Busy).await;
    assert!(msg.contains("joined connections"), "{msg}");
    drop(kept);

    // Their seats come back as the sink sees them go (until then a join is refused as busy).
    let seated = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut x = joining(&lab, "esx01", transport, &token).await;
            match x.r.next_body("HelloReply").await {
                Ok(Body::HelloReply(_)) => break x,
                Err(blockship_transport::TransportError::Remote { code: ErrorCode::Busy, .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => panic!("a join after the others left: {other:?}"),
            }
        }
    })
    .await
    .expect("the seats of closed joined connections were never released");

    // A session that ended cannot be joined (and what joined it is closed).
    a.w.close();
    a.conn.close(0, b"done");
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut x = joining(&lab, "esx01", transport, &token).await;
            match x.r.next_body("HelloReply").await {
                // Busy while the connections of earlier tries still hold their seats.
                Err(blockship_transport::TransportError::Remote { code, message })
                    if code != ErrorCode::Busy =>
                {
                    break (code, message)
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(gone.0, ErrorCode::Unauthorized, "{}", gone.1);
    assert!(gone.1.contains("no session to join"), "{}", gone.1);
    let mut seated = seated;
    let ended = tokio::time::timeout(Duration::from_secs(10), seated.r.next()).await;
    assert!(
        matches!(ended, Ok(Err(_)) | Ok(Ok(None))),
        "a joined connection outlived its session: {ended:?}"
    );
}

/// A joined connection lost mid-epoch ends the session at once (its items can never arrive, so
/// the agent must not wait for the commit); one that ends its control stream is closed, not
/// left holding a window without a seat.
async fn lost_joined_connection(transport: Transport) {
    let lab = Lab::start();
    let mut a = lab.agent_over("esx01", transport).await;
    let token = a.try_hello().await.unwrap().session_token;
    let mut quiet = joined(&lab, transport, &token).await;
    quiet.w.close();
    let ended = tokio::time::timeout(Duration::from_secs(10), quiet.r.next()).await;
    assert!(
        matches!(ended, Ok(Err(_)) | Ok(Ok(None))),
        "a joined connection without control stream stayed: {ended:?}"
    );

    let b = joined(&lab, transport, &token).await;
    a.open(4 << 20).await;
    a.begin(1).await;
    let mut s = FrameWriter::new(b.conn.open_uni().await.unwrap());
    let (mut h, p) = chunk(0, 0, &pattern(3, 1 << 20));
    h.disk = a.disk;
    s.send_with_payload(&Body::Chunk(h), p).await.unwrap();
    match transport {
        // An error close; over gRPC, a TCP connection that goes away without a gRPC status.
        Transport::Quic => b.conn.close(9, b"the host crashed"),
        Transport::Grpc => drop((s, b)),
    }
    let commit = pb::EpochCommit { disk: a.disk, epoch: 1, items: 2, change_point: "cp-1".into() };
    let _ = a.w.send(&Body::EpochCommit(commit)).await;
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match a.r.next_body("Ack").await {
                Ok(Body::Ack(ack)) => assert!(!ack.committed, "committed without the lost data"),
                other => break other,
            }
        }
    })
    .await
    .expect("the session waited for data of a lost joined connection");
    let msg = format!("{end:?}");
    assert!(msg.contains("joined this session was lost"), "{msg}");
    assert_eq!(lab.state()["committed_epoch"], 0);
}

both_transports!(
    data_on_joined_connections,
    joining_needs_the_sessions_token_and_agent,
    lost_joined_connection
);
