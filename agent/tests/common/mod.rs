//! Test harness: a lab directory with a PKI, a real `blockship-sink` process on loopback, and
//! helpers that run the real `blockship-agent` binary and compare files.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod ceph;
pub mod daemon;
pub mod qemu;
pub mod scrape;
pub mod vcenter;

pub const MIB: u64 = 1 << 20;

/// A binary of this workspace, found next to the agent binary cargo built for these tests.
pub fn bin(name: &str) -> PathBuf {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_blockship-agent"));
    let p = agent.with_file_name(name);
    assert!(p.exists(), "{} not built: run the suite with `cargo test --workspace`", p.display());
    p
}

/// Declares each listed test once per transport, as `quic::NAME` and `grpc::NAME`; the test
/// itself is a function taking the transport's name (`Lab::over` passes it to every agent).
#[macro_export]
macro_rules! each_transport {
    ($($name:ident),+ $(,)?) => {
        mod quic {
            $( #[test] fn $name() { super::$name("quic") } )+
        }
        mod grpc {
            $( #[test] fn $name() { super::$name("grpc") } )+
        }
    };
}

pub struct Lab {
    pub dir: tempfile::TempDir,
    /// `--transport` of every agent command (the sink serves both).
    pub transport: String,
}

impl Lab {
    pub fn new(agents: &[&str]) -> Lab {
        Lab::over(agents, "quic")
    }

    /// A lab whose agents connect over `transport` (quic or grpc).
    pub fn over(agents: &[&str], transport: &str) -> Lab {
        let dir = tempfile::Builder::new().prefix("blockship-test-").tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let mut cmd = Command::new(bin("blockship-sink"));
        cmd.args(["pki", "init", "--dir"]).arg(dir.path().join("pki"));
        for a in agents {
            cmd.args(["--agent", a]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "pki init: {}", String::from_utf8_lossy(&out.stderr));
        Lab { dir, transport: transport.to_string() }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    /// The file behind target `file:REL`.
    pub fn target(&self, rel: &str) -> PathBuf {
        self.path("root").join(rel)
    }

    /// Start a sink with these `--allow` rules (and extra flags).
    pub fn sink(&self, allow: &[&str], extra: &[&str]) -> Sink {
        self.sink_on("127.0.0.1:0", allow, extra)
    }

    pub fn sink_on(&self, listen: &str, allow: &[&str], extra: &[&str]) -> Sink {
        self.sink_with(listen, allow, extra, &[])
    }

    /// `sink_on` with extra environment (e.g. `FAILPOINTS`).
    pub fn sink_with(&self, listen: &str, allow: &[&str], extra: &[&str], env: &[(&str, &str)]) -> Sink {
        self.start_sink(Command::new(bin("blockship-sink")), listen, allow, extra, env)
    }

    /// A sink run inside network namespace `ns` (root), listening on `listen` there.
    pub fn sink_inside(&self, ns: &str, listen: &str, allow: &[&str]) -> Sink {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(bin("blockship-sink"));
        self.start_sink(cmd, listen, allow, &[], &[])
    }

    fn start_sink(
        &self,
        mut cmd: Command,
        listen: &str,
        allow: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Sink {
        cmd.envs(env.iter().copied());
        cmd.args(["serve", "--listen", listen, "--pki"])
            .arg(self.pki())
            .arg("--file-root")
            .arg(self.path("root"))
            .arg("--state-dir")
            .arg(self.path("state"))
            .args(["--idle-timeout", "5s"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new().create(true).append(true).open(self.path("sink.log")).unwrap(),
            );
        for a in allow {
            cmd.arg("--allow").arg(a);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("sink did not start: {line:?}; log: {}", self.sink_log()))
            .to_string();
        Sink { child: Some(child), addr }
    }

    pub fn sink_log(&self) -> String {
        std::fs::read_to_string(self.path("sink.log")).unwrap_or_default()
    }

    /// Agent command with connection flags for `name` against `sink`.
    pub fn agent_cmd(&self, sink: &Sink, name: &str, sub: &str) -> Command {
        let mut cmd = Command::new(bin("blockship-agent"));
        cmd.arg(sub)
            .args(["--sink", &sink.addr, "--name", name, "--idle-timeout", "5s"])
            .args(["--transport", &self.transport])
            .arg("--pki")
            .arg(self.pki());
        if sub == "sync" {
            cmd.arg("--no-progress");
        }
        cmd
    }

    /// Run `sync` and return its JSON summary; panics with stderr on failure.
    pub fn sync(
        &self,
        sink: &Sink,
        name: &str,
        source: impl AsRef<OsStr>,
        target: &str,
        extra: &[&str],
    ) -> serde_json::Value {
        let out = self.try_sync(sink, name, source, target, extra);
        assert!(
            out.status.success(),
            "sync failed: {}\nsink log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.sink_log()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn try_sync(
        &self,
        sink: &Sink,
        name: &str,
        source: impl AsRef<OsStr>,
        target: &str,
        extra: &[&str],
    ) -> Output {
        self.sync_cmd(sink, name, source, target, extra).output().unwrap()
    }

    /// Start `sync` in the background (stdout and stderr piped), e.g. paced with `--bwlimit`
    /// so that a test can crash something half-way.
    pub fn spawn_sync(
        &self,
        sink: &Sink,
        name: &str,
        source: impl AsRef<OsStr>,
        target: &str,
        extra: &[&str],
    ) -> Child {
        let mut cmd = self.sync_cmd(sink, name, source, target, extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    fn sync_cmd(
        &self,
        sink: &Sink,
        name: &str,
        source: impl AsRef<OsStr>,
        target: &str,
        extra: &[&str],
    ) -> Command {
        let mut cmd = self.agent_cmd(sink, name, "sync");
        cmd.arg("--source").arg(source).args(["--target", target, "--json"]).args(extra);
        cmd
    }

    pub fn verify(&self, sink: &Sink, name: &str, source: impl AsRef<OsStr>, target: &str) -> Output {
        self.agent_cmd(sink, name, "verify")
            .arg("--source")
            .arg(source)
            .args(["--target", target])
            .output()
            .unwrap()
    }
}

pub struct Sink {
    child: Option<Child>,
    pub addr: String,
}

impl Sink {
    /// A handle that reaches this sink through `addr` (a relay in front of it); it owns nothing.
    pub fn via(&self, addr: &str) -> Sink {
        Sink { child: None, addr: addr.to_string() }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Wait up to `limit` for the sink to exit by itself (a crash point); true if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let exited =
            wait_until(limit, || self.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some()));
        if exited {
            self.child = None;
        }
        exited
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Whether two files have the same contents (and size).
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ra, mut rb) = (BufReader::with_capacity(1 << 20, fa), BufReader::with_capacity(1 << 20, fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut ra, &mut ba);
        let m = read_full(&mut rb, &mut bb);
        if n != m || ba[..n] != bb[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

pub fn sha(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).unwrap()).unwrap();
    h.finalize().to_hex().to_string()
}

/// Poll `f` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The replication state document of `target` in the lab's state dir.
/// Bytes of the epoch in progress on file target `target` that the sink has made durable.
pub fn durable_offset(lab: &Lab, target: &str) -> u64 {
    state_of(lab, target).and_then(|s| s["in_progress"]["durable_offset"].as_u64()).unwrap_or(0)
}

pub fn state_of(lab: &Lab, target: &str) -> Option<serde_json::Value> {
    let dir = lab.path("state").join("targets");
    for e in std::fs::read_dir(dir).ok()? {
        let p = e.ok()?.path().join("state.json");
        if let Ok(text) = std::fs::read_to_string(&p) {
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            if v["target"] == target {
                return Some(v);
            }
        }
    }
    None
}

/// Overwrite `len` bytes at `offset` of `path` with pseudo-random data.
pub fn scribble(path: &Path, offset: u64, len: usize, seed: u64) {
    use std::os::unix::fs::FileExt;
    let mut rng = blockship_bench::image::Rng::new(seed);
    let mut buf = vec![0u8; len];
    rng.fill(&mut buf);
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(&buf, offset).unwrap();
}

/// Whether the tests run as root (`why`: what needs it). Without root the test is skipped with a
/// message, unless BLOCKSHIP_REQUIRE_ROOT is set (CI): then it fails.
/// Whether `binary` was built with failpoints: it is run as `args` with `FAILPOINTS=arm` and must
/// not answer that it was built without them. A build without them fails the caller under
/// `BLOCKSHIP_REQUIRE_FAILPOINTS` (CI builds the tests with the features and sets the switch),
/// so the answer `false` is never a silent skip there.
pub fn failpoints_built(binary: &str, args: &[&str], arm: &str) -> bool {
    let probe = Command::new(bin(binary)).args(args).env("FAILPOINTS", arm).output().unwrap();
    let stderr = String::from_utf8_lossy(&probe.stderr);
    if !stderr.contains("built without failpoints") {
        return true;
    }
    assert!(
        std::env::var_os("BLOCKSHIP_REQUIRE_FAILPOINTS").is_none(),
        "BLOCKSHIP_REQUIRE_FAILPOINTS is set but {binary} was built without failpoints: {stderr}"
    );
    eprintln!("{binary} has no failpoints: build with --features blockship-agent/failpoints,blockship-sink/failpoints");
    false
}

pub fn root_or_skip(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("BLOCKSHIP_REQUIRE_ROOT").is_none(),
        "BLOCKSHIP_REQUIRE_ROOT is set but the tests do not run as root ({why} needs it)"
    );
    eprintln!("skipping: {why} needs root");
    false
}
