//! The resource rows of the security matrix, on both transports, each while a real agent (esx02)
//! syncs 256 MiB through the same sink: handshakes started and never finished (a slowloris on the
//! gRPC port; half-open QUIC connections), thousands of streams on one authenticated connection,
//! and oversized frames. Each attacker is refused with a clear message, and the other agent's
//! sync completes exact at a speed close to its own baseline measured in the same test (printed,
//! and bounded loosely so that only starvation fails: this is not a speed test).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockship_proto::pb::{self, SyncMode};
use blockship_proto::Body;
use blockship_transport::grpc::service::replication_client::ReplicationClient;
use blockship_transport::grpc::{GrpcTuning, MAX_MESSAGE};
use blockship_transport::{tls, QuicTuning, TlsFiles, Transport, TransportError};
use bytes::{BufMut, Bytes, BytesMut};
use common::*;

const SIZE: usize = 256 << 20;
/// Where the attackers come from: another loopback address, so the victim's (127.0.0.1) stays
/// apart, as a different host's would.
const ATTACKER: &str = "127.0.0.2";

fn lab() -> Lab {
    Lab::with(&["--allow", "esx01=file:*", "--allow", "esx02=file:*"], &[])
}

fn source(lab: &Lab) -> std::path::PathBuf {
    let p = lab.path("src.img");
    let mut data = Vec::with_capacity(SIZE);
    for i in 0..SIZE / (4 << 20) {
        data.extend_from_slice(&pattern(i as u64, 4 << 20));
    }
    std::fs::write(&p, data).unwrap();
    p
}

/// A real agent sync of `src` into `target` as esx02 over `transport`; returns its seconds.
async fn victim(lab: &Lab, src: &std::path::Path, target: &str, transport: Transport) -> f64 {
    let mut cmd = tokio::process::Command::new(agent_bin());
    cmd.args(["sync", "--sink", &lab.addr, "--name", "esx02", "--no-progress", "--json", "--transport"])
        .arg(transport.name())
        .arg("--pki")
        .arg(lab.pki())
        .arg("--source")
        .arg(src)
        .args(["--target", &format!("file:{target}")]);
    let started = Instant::now();
    let out = cmd.output().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "the other agent failed during the attack: {}\nsink log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.log()
    );
    assert!(std::fs::read(src).unwrap() == std::fs::read(lab.path(&format!("root/{target}"))).unwrap());
    secs
}

/// The victim's sync during `attack` against its baseline: both printed, starvation fails.
fn unaffected(what: &str, transport: Transport, baseline: f64, attacked: f64) {
    println!(
        "{what} ({transport}): the other agent took {attacked:.2} s under attack, {baseline:.2} s without"
    );
    assert!(
        attacked <= 3.0 * baseline + 2.0,
        "{what} ({transport}) slowed the other agent: {attacked:.2} s vs {baseline:.2} s"
    );
}

/// Wait up to 10 s for the sink's log to contain `what`.
async fn logged(lab: &Lab, what: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.log().contains(what) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lab.log().contains(what)
}

/// A slowloris on the gRPC port: `n` TCP connections from ATTACKER, each trickling a TLS
/// ClientHello one byte a second, reopened as soon as the sink closes one. Returns how many the
/// sink closed, and keeps going until `stop`.
async fn trickle_tcp(sink: SocketAddr, n: usize, stop: Arc<tokio::sync::Notify>) -> usize {
    let closed = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let closed = closed.clone();
        tasks.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(format!("{ATTACKER}:0").parse().unwrap()).unwrap();
                let Ok(mut tcp) = socket.connect(sink).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                // A TLS handshake record header, then the ClientHello's bytes one at a time.
                let mut gone = tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.is_err();
                let mut buf = [0u8; 64];
                while !gone {
                    tokio::select! {
                        r = tcp.read(&mut buf) => gone = !matches!(r, Ok(n) if n > 0),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => gone = tcp.write_all(&[1]).await.is_err(),
                    }
                }
                closed.fetch_add(1, Ordering::Relaxed);
                // Back again after a second: pressure enough, without churning ephemeral ports.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    stop.notified().await;
    tasks.shutdown().await;
    closed.load(Ordering::Relaxed)
}

/// Half-open QUIC connections: `n` handshakes started from ATTACKER whose answers are never
/// read (a relay forwards the client's datagrams to the sink and drops everything back).
async fn half_open_quic(lab: &Lab, sink: SocketAddr, n: usize) -> (quinn::Endpoint, Vec<quinn::Connecting>) {
    let relay = tokio::net::UdpSocket::bind(format!("{ATTACKER}:0")).await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let files = TlsFiles::agent_in_pki(&lab.pki(), "esx01");
    let client = blockship_transport::quic::client_endpoint(
        tls::client_config(&files).unwrap(),
        &QuicTuning::default(),
        false,
    )
    .unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((len, from)) = relay.recv_from(&mut buf).await {
            if from != sink {
                let _ = relay.send_to(&buf[..len], sink).await;
            }
        }
    });
    // Each attempt is its own connection (its own connection id) at the sink. They are kept:
    // dropping one would send the sink a close and end its handshake.
    let attempts = (0..n).map(|_| client.connect(relay_addr, "localhost").unwrap()).collect();
    (client, attempts)
}

async fn slow_handshakes(transport: Transport) {
    // Let this test process hold the attacker's many sockets (the sink raises its own limit).
    blockship_sink::limits::raise_fd_limit().unwrap();
    let lab = lab();
    let src = source(&lab);
    let baseline = victim(&lab, &src, "baseline", transport).await;
    let sink: SocketAddr = lab.addr.parse().unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let (attack, _client) = match transport {
        // 1,500 slow connections: more than a default limit of 1,024 open files.
        Transport::Grpc => (Some(tokio::spawn(trickle_tcp(sink, 1500, stop.clone()))), None),
        Transport::Quic => (None, Some(half_open_quic(&lab, sink, 1000).await)),
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attacked = victim(&lab, &src, "victim", transport).await;
    unaffected("slow handshakes", transport, baseline, attacked);
    assert!(
        logged(
            &lab,
            &format!("refusing new connections: {ATTACKER} already has 128 TLS handshakes in progress")
        )
        .await,
        "the sink did not say why it refused the attacker:\n{}",
        lab.log()
    );
    if let Some(attack) = attack {
        stop.notify_one();
        let closed = attack.await.unwrap();
        // All but the 128 admitted were closed at once, the admitted ones after the 10 s timeout.
        println!("slow handshakes (grpc): the sink closed {closed} of the attacker's connections");
        assert!(closed >= 1500 - 128, "the sink kept slow handshakes open: {closed} closed");
    }
    // The attacker's own certificate would do it no good either: its address is still full.
    drop(lab);
}

/// Thousands of streams on one authenticated connection: QUIC's stream credit lets a few be
/// open at a time; over gRPC, data calls past a session's allowance are refused.
async fn stream_flood(transport: Transport) {
    let lab = lab();
    let src = source(&lab);
    let baseline = victim(&lab, &src, "baseline", transport).await;
    const STREAMS: usize = 3000;
    let (opened, refused, other) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // gRPC: calls HTTP/2 refused past the connection's concurrent-stream cap (grpc::MAX_CALLS).
    let capped = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut keep = Vec::new();
    let mut keep_raw = None;
    match transport {
        Transport::Quic => {
            let mut a = lab.agent_over("esx01", transport).await;
            a.hello().await;
            a.open_target("file:flood", 1 << 30, SyncMode::Full).await.unwrap();
            a.begin(1).await;
            for _ in 0..STREAMS {
                let (conn, opened) = (a.conn.clone(), opened.clone());
                tasks.spawn(async move {
                    // Open, send a frame's first bytes, and hold the stream.
                    let mut s = conn.open_uni().await?;
                    opened.fetch_add(1, Ordering::Relaxed);
                    s.write(Bytes::from_static(&[0, 0]), Bytes::new()).await?;
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok::<_, TransportError>(())
                });
            }
            keep.push(a);
        }
        Transport::Grpc => {
            // Raw calls, past what the transport's client would ever open.
            let raw = RawGrpc::open(&lab).await;
            for _ in 0..STREAMS {
                let (mut client, refused, capped, other, session) =
                    (raw.client.clone(), refused.clone(), capped.clone(), other.clone(), raw.session.clone());
                tasks.spawn(async move {
                    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::WireFrame>(1);
                    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                    req.metadata_mut().insert("blockship-session", session);
                    // A call the sink takes stays open (it waits for frames) until the end.
                    match client.data(req).await {
                        Err(status)
                            if status.code() == tonic::Code::ResourceExhausted
                                && status.message().contains("data streams open") =>
                        {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        // A stream opened while the cap was full (the client's view of it lags
                        // as calls end): HTTP/2 refuses it, which is a refusal as well.
                        Err(status)
                            if status.code() == tonic::Code::Unavailable
                                && format!("{status:?}").contains("REFUSED_STREAM") =>
                        {
                            capped.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => {
                            println!("data call refused otherwise: {status:?}");
                            other.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => println!("data call served and ended: {r:?}"),
                    }
                    Ok::<_, TransportError>(())
                });
            }
            keep_raw = Some(raw);
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attacked = victim(&lab, &src, "victim", transport).await;
    unaffected("a stream flood", transport, baseline, attacked);
    match transport {
        // The sink grants a connection at most its share of 64 streams.
        Transport::Quic => {
            let o = opened.load(Ordering::Relaxed);
            println!("stream flood (quic): {o} of {STREAMS} streams opened (the rest wait for credit)");
            assert!(o <= 64, "{o} streams opened on one connection");
        }
        // A session may have 8 data streams; every other call is refused (none left waiting).
        Transport::Grpc => {
            let ended = || {
                refused.load(Ordering::Relaxed)
                    + capped.load(Ordering::Relaxed)
                    + other.load(Ordering::Relaxed)
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while ended() < STREAMS - 8 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(ended(), STREAMS - 8, "data calls past the allowance were served or left waiting");
            assert_eq!(other.load(Ordering::Relaxed), 0, "data calls refused without saying why");
            println!(
                "stream flood (grpc): {} of {STREAMS} data calls refused ({} by the session's allowance, {} by HTTP/2's stream cap), 8 served",
                ended(),
                refused.load(Ordering::Relaxed),
                capped.load(Ordering::Relaxed)
            );
        }
    }
    tasks.abort_all();
    drop((keep, keep_raw));
}

/// A session over raw gRPC calls (Control, then Hello on it), for sending what the transport's
/// own client never would.
struct RawGrpc {
    client: ReplicationClient<tonic::transport::Channel>,
    session: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    _control: tokio::sync::mpsc::Sender<pb::WireFrame>,
    replies: tonic::Streaming<pb::WireFrame>,
}

impl RawGrpc {
    async fn open(lab: &Lab) -> RawGrpc {
        let files = TlsFiles::agent_in_pki(&lab.pki(), "esx01");
        let ch = blockship_transport::tcp_tls::channel(
            tls::client_config(&files).unwrap(),
            &lab.addr,
            None,
            &GrpcTuning::from_quic(&QuicTuning::default()),
        )
        .await
        .unwrap();
        // No message limit of our own: the sink's is the one under test.
        let client = ReplicationClient::new(ch.channel)
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(usize::MAX);
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::WireFrame>(4);
        let resp = client.clone().control(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap();
        let session = resp.metadata().get("blockship-session").unwrap().clone();
        let mut header = BytesMut::new();
        blockship_proto::frame::encode_header(
            &Body::Hello(blockship_proto::version::hello("fake")),
            &mut header,
        );
        tx.send(pb::WireFrame { header: header.freeze(), payload: Bytes::new() }).await.unwrap();
        let mut raw = RawGrpc { client, session, _control: tx, replies: resp.into_inner() };
        raw.replies.message().await.expect("HelloReply").expect("HelloReply");
        raw
    }
}

/// Frames past the limits: a header longer than MAX_HEADER_LEN, and (over gRPC) one message
/// larger than the largest frame. Each ends the session with the reason; nothing is written.
async fn oversized_frames(transport: Transport) {
    let lab = lab();
    let mut a = lab.agent_over("esx01", transport).await;
    a.hello().await;
    a.open_target("file:big", 64 << 20, SyncMode::Full).await.unwrap();
    a.begin(1).await;
    let mut s = a.conn.open_uni().await.unwrap();
    let mut prefix = BytesMut::new();
    prefix.put_u32(8 << 20);
    s.write(prefix.freeze(), Bytes::from(vec![0u8; 4096])).await.unwrap();
    let why = a.r.next_body("anything").await.unwrap_err().to_string();
    assert!(why.contains("exceeds the 1048576-byte limit"), "{why}");

    let mut a = lab.agent_over("esx01", transport).await;
    a.hello().await;
    a.open_target("file:big2", 64 << 20, SyncMode::Full).await.unwrap();
    a.begin(1).await;
    let mut s = a.conn.open_uni().await.unwrap();
    // A chunk header announcing a payload past the largest a chunk may encode to.
    let h = pb::ChunkHeader {
        disk: a.disk,
        seq: 0,
        offset: 0,
        length: 1 << 20,
        blake3: Bytes::from(vec![0u8; 32]),
        codec: pb::Codec::None as i32,
        encoded_length: (MAX_MESSAGE * 2) as u32,
    };
    let mut head = BytesMut::new();
    blockship_proto::frame::encode_header(&Body::Chunk(h), &mut head);
    let _ = s.write(head.freeze(), Bytes::new()).await;
    let why = a.r.next_body("anything").await.unwrap_err().to_string();
    assert!(why.contains("exceeds the") && why.contains("-byte limit"), "{why}");
    assert!(std::fs::read(lab.path("root/big")).unwrap().iter().all(|&b| b == 0));
    assert!(std::fs::read(lab.path("root/big2")).unwrap().iter().all(|&b| b == 0));
    if transport == Transport::Grpc {
        // Over gRPC a frame travels as one message: one past the message limit is refused by
        // the HTTP/2 side before any frame is parsed, and the session ends saying so.
        let mut raw = RawGrpc::open(&lab).await;
        let frame = pb::WireFrame {
            header: Bytes::from_static(&[0, 0, 0, 1]),
            payload: Bytes::from(vec![7u8; 2 * MAX_MESSAGE]),
        };
        let mut req = tonic::Request::new(futures::stream::iter([frame]));
        req.metadata_mut().insert("blockship-session", raw.session.clone());
        let data = raw.client.data(req).await;
        let ended = raw.replies.message().await;
        println!(
            "a {} MiB message over gRPC: the call {data:?}; the session {ended:?}",
            (2 * MAX_MESSAGE) >> 20
        );
        // The sink's Error frame on the control stream names the limit.
        let frame = ended.expect("the control stream").expect("an Error frame");
        match blockship_proto::frame::decode_header(&frame.header[4..]).unwrap() {
            Body::Error(e) => assert!(e.message.contains("message length too large"), "{e:?}"),
            other => panic!("the session went on after an oversized message: {other:?}"),
        }
    }
    // The sink goes on serving.
    let mut b = lab.agent_over("esx02", transport).await;
    b.hello().await;
}

both_transports!(slow_handshakes, stream_flood, oversized_frames);
