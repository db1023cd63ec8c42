//! The real sink process driven by a fake agent that speaks the real protocol over QUIC with
//! mutual TLS, to exercise what a well-behaved agent never sends: missing certificates,
//! corrupted chunks, out-of-bounds extents, wrong versions and out-of-order messages. Also
//! checks that acknowledgements come only after the state on disk says the same.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use blockship_proto::codec::{Compression, Encoder};
use blockship_proto::pb::{self, ErrorCode, SyncMode};
use blockship_proto::{version, Body};
use blockship_transport::{quic, tls, FrameReader, FrameWriter, QuicTuning, TlsFiles, TransportError};
use bytes::Bytes;

struct Lab {
    dir: tempfile::TempDir,
    sink: Child,
    addr: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.sink.kill();
        let _ = self.sink.wait();
    }
}

impl Lab {
    fn start() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let bin = env!("CARGO_BIN_EXE_blockship-sink");
        let pki = dir.path().join("pki");
        let st =
            Command::new(bin).args(["pki", "init", "--agent", "esx01", "--dir"]).arg(&pki).output().unwrap();
        assert!(st.status.success());
        std::fs::create_dir(dir.path().join("root")).unwrap();
        let mut sink = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--allow", "esx01=file:*", "--pki"])
            .arg(&pki)
            .arg("--file-root")
            .arg(dir.path().join("root"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("sink.log")).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(sink.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on ").expect("sink started").to_string();
        Lab { dir, sink, addr }
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sink.log")).unwrap()
    }

    fn state(&self) -> serde_json::Value {
        let dir = self.dir.path().join("state/targets");
        let entry = std::fs::read_dir(dir).unwrap().next().unwrap().unwrap();
        serde_json::from_slice(&std::fs::read(entry.path().join("state.json")).unwrap()).unwrap()
    }

    async fn agent(&self) -> Fake {
        let files = TlsFiles::agent_in_pki(&self.pki(), "esx01");
        let (endpoint, conn) =
            quic::connect(tls::client_config(&files).unwrap(), &QuicTuning::default(), &self.addr, None)
                .await
                .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Fake { _endpoint: endpoint, conn, w: FrameWriter::new(send), r: FrameReader::new(recv) }
    }
}

struct Fake {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    w: FrameWriter,
    r: FrameReader<quinn::RecvStream>,
}

impl Fake {
    async fn hello(&mut self) {
        self.w.send(&Body::Hello(version::hello("fake"))).await.unwrap();
        assert!(
            matches!(self.r.next_body("HelloReply").await.unwrap(), Body::HelloReply(r) if r.identity == "esx01")
        );
    }

    async fn open(&mut self, size: u64) -> pb::DiskOpened {
        let req = pb::OpenDisk {
            disk: 1,
            disk_id: "fake-disk".into(),
            size,
            target: "file:disk".into(),
            mode: SyncMode::Compare as i32,
            chunk_size: 1 << 20,
        };
        self.w.send(&Body::OpenDisk(req)).await.unwrap();
        match self.r.next_body("DiskOpened").await.unwrap() {
            Body::DiskOpened(d) => d,
            other => panic!("{other:?}"),
        }
    }

    async fn begin(&mut self, epoch: u64) {
        let req = pb::EpochBegin {
            disk: 1,
            epoch,
            mode: SyncMode::Full as i32,
            plan_digest: Bytes::new(),
            resume_offset: 0,
            view: String::new(),
        };
        self.w.send(&Body::EpochBegin(req)).await.unwrap();
        assert!(matches!(self.r.next_body("EpochStarted").await.unwrap(), Body::EpochStarted(_)));
    }

    /// Expect the sink to refuse with `code`; returns its message.
    async fn refused(&mut self, code: ErrorCode) -> String {
        match self.r.next_body("Error").await {
            Err(TransportError::Remote { code: c, message }) => {
                assert_eq!(c, code, "{message}");
                message
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

fn chunk(seq: u64, offset: u64, data: &[u8]) -> (pb::ChunkHeader, Bytes) {
    let e =
        Encoder::new(Compression::Auto { level: 1 }).unwrap().encode(Bytes::copy_from_slice(data)).unwrap();
    let h = pb::ChunkHeader {
        disk: 1,
        seq,
        offset,
        length: data.len() as u32,
        blake3: Bytes::copy_from_slice(&e.hash),
        codec: e.codec as i32,
        encoded_length: e.payload.len() as u32,
    };
    (h, e.payload)
}

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
