//! Sink test harness: a lab directory with a PKI, the real `blockship-sink` process (restartable,
//! with extra flags and environment, e.g. `FAILPOINTS`), an optional Ceph cluster from
//! `scripts/ceph-up.sh`, and a fake agent that speaks the real protocol over QUIC with mutual
//! TLS, so tests can send what a well-behaved agent never sends and watch every ack.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use blockship_proto::codec::{Compression, Encoder};
use blockship_proto::pb::{self, ErrorCode, SyncMode};
use blockship_proto::{version, Body};
use blockship_transport::conn::RecvStream;
use blockship_transport::{
    tls, ClientOptions, Connection, FrameReader, FrameWriter, QuicTuning, TlsFiles, Transport, TransportError,
};
use bytes::Bytes;

pub const MIB: u64 = 1 << 20;

/// One test per transport for each `async fn NAME(Transport)` named: `quic::NAME`, `grpc::NAME`.
#[allow(unused_macros)]
macro_rules! both_transports {
    ($($name:ident),* $(,)?) => {
        mod quic { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(blockship_transport::Transport::Quic).await })* }
        mod grpc { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(blockship_transport::Transport::Grpc).await })* }
    };
}
#[allow(unused_imports)]
pub(crate) use both_transports;

pub struct Lab {
    pub dir: tempfile::TempDir,
    sink: Option<Child>,
    pub addr: String,
    args: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blockship-sink")
}

impl Lab {
    /// A sink allowing agent esx01 to write `file:*`.
    pub fn start() -> Lab {
        Lab::with(&["--allow", "esx01=file:*"], &[])
    }

    /// A sink with these flags (and `env` for its process).
    pub fn with(args: &[&str], env: &[(&str, &str)]) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let st = Command::new(bin())
            .args(["pki", "init", "--agent", "esx01", "--agent", "esx02", "--dir"])
            .arg(&pki)
            .output()
            .unwrap();
        assert!(st.status.success());
        std::fs::create_dir(dir.path().join("root")).unwrap();
        let mut lab = Lab {
            dir,
            sink: None,
            addr: "127.0.0.1:0".into(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        lab.restart(env);
        lab
    }

    /// (Re)start the sink on the same address, state dir and flags.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        self.kill();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.path("sink.log")).unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--listen", &self.addr, "--pki"])
            .arg(self.pki())
            .arg("--file-root")
            .arg(self.path("root"))
            .arg("--state-dir")
            .arg(self.path("state"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env_remove("FAILPOINTS")
            .stdout(Stdio::piped())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut sink = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(sink.stdout.take().unwrap()).read_line(&mut line).unwrap();
        self.addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("sink did not start: {line:?}\n{}", self.log()))
            .to_string();
        self.sink = Some(sink);
    }

    /// Stop the sink cleanly (SIGTERM: it closes its targets and releases their locks).
    pub fn stop(&mut self) {
        if let Some(mut s) = self.sink.take() {
            // SAFETY: signalling a child process we started.
            unsafe { libc::kill(s.id() as libc::pid_t, libc::SIGTERM) };
            let _ = s.wait();
        }
    }

    /// SIGKILL the sink (if running).
    pub fn kill(&mut self) {
        if let Some(mut s) = self.sink.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }

    /// Wait for the sink to exit by itself (a failpoint crash); its exit status.
    pub fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let mut s = self.sink.take()?;
        for _ in 0..500 {
            if let Ok(Some(st)) = s.try_wait() {
                return Some(st);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.sink = Some(s);
        None
    }

    pub fn pid(&self) -> u32 {
        self.sink.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("sink.log")).unwrap_or_default()
    }

    /// The state document of the only target in the state dir.
    pub fn state(&self) -> serde_json::Value {
        let dir = self.path("state/targets");
        let entry = std::fs::read_dir(dir).unwrap().next().unwrap().unwrap();
        serde_json::from_slice(&std::fs::read(entry.path().join("state.json")).unwrap()).unwrap()
    }

    pub async fn agent(&self) -> Fake {
        self.agent_as("esx01").await
    }

    /// A fake agent with the certificate of `name` (esx01 or esx02).
    pub async fn agent_as(&self, name: &str) -> Fake {
        self.agent_over(name, Transport::Quic).await
    }

    /// A fake agent of `name` over `transport` (the sink serves both on its address).
    pub async fn agent_over(&self, name: &str, transport: Transport) -> Fake {
        let files = TlsFiles::agent_in_pki(&self.pki(), name);
        // A sink killed by a failpoint is noticed by the idle timeout (no packet says it died).
        let mut tuning = QuicTuning::default();
        tuning.set_idle_timeout("2s").unwrap();
        let opts = ClientOptions { transport, tuning, server_name: None };
        let conn = blockship_transport::conn::connect(tls::client_config(&files).unwrap(), &self.addr, &opts)
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Fake { disk: 0, conn, w: FrameWriter::new(send), r: FrameReader::new(recv) }
    }
}

/// A fake agent on one connection.
pub struct Fake {
    /// Handle of the disk opened last (handles only grow on a connection).
    pub disk: u32,
    pub conn: Connection,
    pub w: FrameWriter,
    pub r: FrameReader<RecvStream>,
}

impl Fake {
    pub async fn hello(&mut self) {
        self.try_hello().await.unwrap();
    }

    pub async fn try_hello(&mut self) -> Result<pb::HelloReply, TransportError> {
        self.w.send(&Body::Hello(version::hello("fake"))).await?;
        match self.r.next_body("HelloReply").await? {
            Body::HelloReply(r) => Ok(r),
            other => panic!("{other:?}"),
        }
    }

    pub async fn open(&mut self, size: u64) -> pb::DiskOpened {
        self.open_target("file:disk", size, SyncMode::Compare).await.unwrap()
    }

    pub async fn open_target(
        &mut self,
        target: &str,
        size: u64,
        mode: SyncMode,
    ) -> Result<pb::DiskOpened, TransportError> {
        self.disk += 1;
        let req = pb::OpenDisk {
            disk: self.disk,
            disk_id: "fake-disk".into(),
            size,
            target: target.into(),
            mode: mode as i32,
            chunk_size: 1 << 20,
            ..Default::default()
        };
        self.w.send(&Body::OpenDisk(req)).await?;
        match self.r.next_body("DiskOpened").await? {
            Body::DiskOpened(d) => Ok(d),
            other => panic!("{other:?}"),
        }
    }

    pub async fn begin(&mut self, epoch: u64) {
        self.begin_with(epoch, SyncMode::Full, 0, "").await.unwrap();
    }

    pub async fn begin_with(
        &mut self,
        epoch: u64,
        mode: SyncMode,
        resume_offset: u64,
        view: &str,
    ) -> Result<(), TransportError> {
        let req = pb::EpochBegin {
            disk: self.disk,
            epoch,
            mode: mode as i32,
            plan_digest: Bytes::new(),
            resume_offset,
            view: view.into(),
            group: String::new(),
            measure: false,
        };
        self.w.send(&Body::EpochBegin(req)).await?;
        match self.r.next_body("EpochStarted").await? {
            Body::EpochStarted(_) => Ok(()),
            other => panic!("{other:?}"),
        }
    }

    /// Expect the sink to refuse with `code`; returns its message.
    pub async fn refused(&mut self, code: ErrorCode) -> String {
        match self.r.next_body("Error").await {
            Err(TransportError::Remote { code: c, message }) => {
                assert_eq!(c, code, "{message}");
                message
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Send `chunks` (seq, offset, data) on one data stream, then commit `epoch`, while reading
    /// every ack; returns them once the commit is acknowledged or the connection breaks.
    pub async fn send_and_commit(&mut self, epoch: u64, chunks: &[(u64, u64, Vec<u8>)]) -> Vec<pb::Ack> {
        let Fake { conn, w, r, disk, .. } = self;
        let disk = *disk;
        let send = async {
            let mut s = FrameWriter::new(conn.open_uni().await?);
            for (seq, offset, data) in chunks {
                let (mut h, p) = chunk(*seq, *offset, data);
                h.disk = disk;
                s.send_with_payload(&Body::Chunk(h), p).await?;
            }
            s.close();
            let commit = pb::EpochCommit {
                disk,
                epoch,
                items: chunks.len() as u64,
                change_point: format!("cp-{epoch}"),
            };
            w.send(&Body::EpochCommit(commit)).await
        };
        let read = async {
            let mut acks = Vec::new();
            while let Ok(body) = r.next_body("Ack").await {
                if let Body::Ack(a) = body {
                    let done = a.committed;
                    acks.push(a);
                    if done {
                        break;
                    }
                }
            }
            acks
        };
        let (_, acks) = tokio::join!(send, read);
        acks
    }
}

/// A chunk frame for `data` at `offset`.
pub fn chunk(seq: u64, offset: u64, data: &[u8]) -> (pb::ChunkHeader, Bytes) {
    let e =
        Encoder::new(Compression::Auto { level: 1 }).unwrap().encode(Bytes::copy_from_slice(data)).unwrap();
    (e.header(1, seq, offset, data.len() as u32), e.payload)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The test Ceph cluster (`scripts/ceph-up.sh`), or None (a failure with BLOCKSHIP_REQUIRE_CEPH).
pub struct Ceph {
    pub conf: String,
    /// Sink flags: the restricted client (cephx when the cluster runs with it).
    pub sink_args: Vec<String>,
}

pub fn ceph() -> Option<Ceph> {
    blockship_bench::lab::CephEnv::for_test().map(|e| Ceph { conf: e.conf, sink_args: e.sink_args })
}

impl Ceph {
    pub fn rbd(&self, args: &[&str]) -> std::process::Output {
        Command::new("timeout").arg("120").arg("rbd").arg("-c").arg(&self.conf).args(args).output().unwrap()
    }

    pub fn rbd_ok(&self, args: &[&str]) -> String {
        let out = self.rbd(args);
        assert!(out.status.success(), "rbd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The bytes of `rbd export SPEC` (an image or IMAGE@SNAP).
    pub fn export(&self, spec: &str, dir: &std::path::Path) -> Vec<u8> {
        let file = dir.join("export.img");
        let _ = std::fs::remove_file(&file);
        self.rbd_ok(&["export", "--no-progress", spec, file.to_str().unwrap()]);
        let data = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        data
    }

    pub fn remove_image(&self, spec: &str) {
        let _ = self.rbd(&["snap", "unprotect", spec]);
        let _ = self.rbd(&["snap", "purge", spec]);
        let _ = self.rbd(&["rm", "--no-progress", spec]);
    }
}

/// The real agent binary (built next to the sink by `cargo test --workspace`).
pub fn agent_bin() -> PathBuf {
    let p = std::path::Path::new(bin()).with_file_name("blockship-agent");
    assert!(p.exists(), "{} not built: run the tests with `cargo test --workspace`", p.display());
    p
}

/// Peak resident set size of process `pid` (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}
