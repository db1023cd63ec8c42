//! The bench lab: the real release binaries (built if needed), a PKI, a sink started fresh per
//! measured run (so its CPU and peak RSS belong to that run), agent runs parsed from `--json`,
//! deterministic images cached between scenarios, and the peer tools from `scripts/peers.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::image::{self, Profile};
use crate::proc::{self, Server, Usage};

/// Agents of the fleet (the `memory` scenario's many agents at once), besides `bench`.
pub const FLEET: usize = 64;

/// Name of the fleet's agent `i`.
pub fn fleet_agent(i: usize) -> String {
    format!("host-{i}")
}

/// The workspace's binaries.
#[derive(Debug, Clone)]
pub struct Bins {
    pub agent: PathBuf,
    pub sink: PathBuf,
    pub bench: PathBuf,
    pub repo: PathBuf,
}

impl Bins {
    /// Build the release binaries (unless `build` is false) and find them next to this program.
    pub fn prepare(build: bool) -> Result<Bins> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().context("repo root")?.to_path_buf();
        if build {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = Command::new(cargo)
                .current_dir(&repo)
                .args(["build", "--release", "--quiet", "-p", "blockship-agent", "-p", "blockship-sink"])
                .status()
                .context("running cargo build")?;
            if !st.success() {
                bail!("cargo build of the agent and sink failed");
            }
        }
        let me = std::env::current_exe()?;
        let dir = me.parent().context("bench binary directory")?;
        let bins = Bins {
            agent: dir.join("blockship-agent"),
            sink: dir.join("blockship-sink"),
            bench: me.clone(),
            repo,
        };
        for b in [&bins.agent, &bins.sink] {
            if !b.exists() {
                bail!("{} not found: run through `cargo run -p blockship-bench --release`", b.display());
            }
        }
        Ok(bins)
    }

    /// Path of a peer tool, installing it through scripts/peers.sh if needed.
    pub fn peer(&self, name: &str) -> Result<PathBuf> {
        let f = proc::run_ok(
            Command::new("bash").arg(self.repo.join("scripts/peers.sh")).args(["install", name]),
        )?;
        let path = f.stdout.lines().last().unwrap_or_default().trim().to_string();
        if path.is_empty() {
            bail!("peers.sh printed no path for {name}");
        }
        Ok(PathBuf::from(path))
    }
}

/// Ceph connection for rbd scenarios, from the environment scripts/ceph-up.sh prints.
#[derive(Debug, Clone)]
pub struct CephEnv {
    pub conf: String,
    pub sink_args: Vec<String>,
}

impl CephEnv {
    pub fn from_env() -> Option<CephEnv> {
        let conf = std::env::var("CEPH_CONF").ok()?;
        let mut sink_args = vec!["--ceph-conf".to_string(), conf.clone()];
        if let (Ok(id), Ok(keyring)) =
            (std::env::var("BLOCKSHIP_CEPH_ID"), std::env::var("BLOCKSHIP_CEPH_KEYRING"))
        {
            sink_args.extend(["--ceph-id".into(), id, "--keyring".into(), keyring]);
        }
        Some(CephEnv { conf, sink_args })
    }

    /// For a test: the cluster, or None with a note on stderr; with `BLOCKSHIP_REQUIRE_CEPH` set
    /// (as CI sets it) a missing cluster fails the test instead of skipping it.
    pub fn for_test() -> Option<CephEnv> {
        let env = CephEnv::from_env();
        if env.is_none() {
            assert!(
                std::env::var("BLOCKSHIP_REQUIRE_CEPH").is_err(),
                "BLOCKSHIP_REQUIRE_CEPH is set but CEPH_CONF is not"
            );
            eprintln!("skipped: no Ceph cluster (source the env printed by scripts/ceph-up.sh)");
        }
        env
    }

    pub fn rbd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["300", "rbd", "-c", &self.conf]).args(args);
        c
    }

    /// The committed epoch an RBD target records in its `blockship.state` metadata (0 without).
    pub fn committed_epoch(&self, spec: &str) -> Result<u64> {
        let meta = proc::run(&mut self.rbd(&["image-meta", "get", spec, "blockship.state"]))?;
        let state: Option<serde_json::Value> = serde_json::from_str(meta.stdout.trim()).ok();
        Ok(state.and_then(|v| v["committed_epoch"].as_u64()).unwrap_or(0))
    }

    /// Remove an image and its snapshots (no error if it does not exist).
    pub fn remove(&self, spec: &str) {
        let _ = proc::run(&mut self.rbd(&["snap", "purge", spec]));
        let _ = proc::run(&mut self.rbd(&["rm", "--no-progress", spec]));
    }
}

pub struct Lab {
    pub dir: PathBuf,
    pub bins: Bins,
    pub images: PathBuf,
    pub ceph: Option<CephEnv>,
}

/// A running sink.
pub struct Sink {
    pub server: Server,
    pub addr: String,
}

/// One agent run.
pub struct AgentRun {
    pub usage: Usage,
    pub summary: serde_json::Value,
}

impl Lab {
    pub fn new(work: &Path, bins: Bins) -> Result<Lab> {
        let dir = work.join("lab");
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(dir.join("root"))?;
        let images = work.join("images");
        std::fs::create_dir_all(&images)?;
        let mut pki = Command::new(&bins.sink);
        pki.args(["pki", "init", "--agent", "bench", "--dir"]).arg(dir.join("pki"));
        for i in 0..FLEET {
            pki.arg("--agent").arg(fleet_agent(i));
        }
        proc::run_ok(&mut pki)?;
        Ok(Lab { dir, bins, images, ceph: CephEnv::from_env() })
    }

    /// A deterministic image, generated once and reused.
    pub fn image(&self, profile: Profile, size: u64, seed: u64) -> Result<PathBuf> {
        let p = self.images.join(format!("{profile:?}-{size}-{seed}.img").to_lowercase());
        if !p.exists() {
            let tmp = p.with_extension("tmp");
            image::generate(&tmp, size, profile, seed)?;
            std::fs::rename(&tmp, &p)?;
        }
        Ok(p)
    }

    /// Start a fresh sink with an empty file root and state dir, on loopback.
    pub fn sink(&self, extra: &[&str]) -> Result<Sink> {
        self.sink_with(None, "127.0.0.1:0", extra)
    }

    /// Start a fresh sink listening on `listen`, optionally inside a network namespace.
    pub fn sink_with(&self, ns: Option<&crate::netns::Link>, listen: &str, extra: &[&str]) -> Result<Sink> {
        let mut cmd = self.sink_command(ns, listen, extra)?;
        Self::start_sink(&mut cmd)
    }

    /// A fresh sink on loopback that runs on CPU `cpu` only.
    pub fn sink_on_cpu(&self, cpu: usize, extra: &[&str]) -> Result<Sink> {
        let mut cmd = self.sink_command(None, "127.0.0.1:0", extra)?;
        Self::start_sink(proc::pin(&mut cmd, cpu))
    }

    fn start_sink(cmd: &mut Command) -> Result<Sink> {
        let server = Server::start(cmd, |l| l.starts_with("listening on "), Duration::from_secs(20))?;
        let addr = server.ready_line.trim_start_matches("listening on ").to_string();
        Ok(Sink { server, addr })
    }

    /// The command of a fresh sink: its file root and state dir emptied first.
    fn sink_command(&self, ns: Option<&crate::netns::Link>, listen: &str, extra: &[&str]) -> Result<Command> {
        for d in ["root", "state"] {
            let p = self.dir.join(d);
            if p.exists() {
                std::fs::remove_dir_all(&p)?;
            }
        }
        std::fs::create_dir_all(self.dir.join("root"))?;
        let mut cmd = match ns {
            Some(link) => link.inside(&self.bins.sink),
            None => Command::new(&self.bins.sink),
        };
        cmd.args([
            "serve",
            "--listen",
            listen,
            "--allow",
            "bench=file:**",
            "--allow",
            "bench=rbd:**",
            "--pki",
        ])
        .arg(self.dir.join("pki"))
        .arg("--file-root")
        .arg(self.dir.join("root"))
        .arg("--state-dir")
        .arg(self.dir.join("state"))
        .args(extra)
        .env("RUST_LOG", "warn");
        for i in 0..FLEET {
            cmd.arg("--allow").arg(format!("{}=file:**", fleet_agent(i)));
        }
        if let Some(c) = &self.ceph {
            cmd.args(&c.sink_args);
        }
        Ok(cmd)
    }

    pub fn agent(&self, sink: &str, sub: &str) -> Command {
        self.agent_as("bench", sink, sub)
    }

    /// The agent with the identity `name` (bench, or one of the fleet).
    pub fn agent_as(&self, name: &str, sink: &str, sub: &str) -> Command {
        let mut cmd = Command::new(&self.bins.agent);
        cmd.args([sub, "--sink", sink, "--name", name, "--pki"]).arg(self.dir.join("pki"));
        cmd
    }

    /// `blockship-agent sync ... --json`.
    pub fn sync(&self, sink: &str, source: &str, target: &str, extra: &[&str]) -> Result<AgentRun> {
        self.sync_as("bench", sink, source, target, extra)
    }

    /// `sync` as agent `name`.
    pub fn sync_as(
        &self,
        name: &str,
        sink: &str,
        source: &str,
        target: &str,
        extra: &[&str],
    ) -> Result<AgentRun> {
        self.run_agent(&mut self.sync_command(name, sink, source, target, extra))
    }

    /// The command of `sync ... --json` as agent `name`.
    pub fn sync_command(
        &self,
        name: &str,
        sink: &str,
        source: &str,
        target: &str,
        extra: &[&str],
    ) -> Command {
        let mut cmd = self.agent_as(name, sink, "sync");
        cmd.args(["--source", source, "--target", target, "--json", "--no-progress"]).args(extra);
        cmd
    }

    /// Run an agent command that prints its `--json` summary.
    pub fn run_agent(&self, cmd: &mut Command) -> Result<AgentRun> {
        let f = proc::run_ok(cmd)?;
        let summary =
            serde_json::from_str(f.stdout.trim()).with_context(|| format!("agent output {:?}", f.stdout))?;
        Ok(AgentRun { usage: f.usage, summary })
    }

    pub fn target_path(&self, rel: &str) -> PathBuf {
        self.dir.join("root").join(rel)
    }
}

/// Fail unless `copy` holds exactly the bytes of `source`: a benchmark figure of a wrong copy is
/// worthless, whoever made it.
pub fn check_copy(copy: &Path, source: &Path) -> Result<()> {
    use std::io::Read;
    let (mut a, mut b) = (std::fs::File::open(copy)?, std::fs::File::open(source)?);
    let (la, lb) = (a.metadata()?.len(), b.metadata()?.len());
    if la != lb {
        bail!("{} has {la} bytes, its source {} has {lb}", copy.display(), source.display());
    }
    let (mut x, mut y) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut at = 0u64;
    while at < la {
        let n = (la - at).min(x.len() as u64) as usize;
        a.read_exact(&mut x[..n])?;
        b.read_exact(&mut y[..n])?;
        if x[..n] != y[..n] {
            let i = x[..n].iter().zip(&y[..n]).position(|(p, q)| p != q).unwrap_or(0);
            bail!("{} differs from {} at byte {}", copy.display(), source.display(), at + i as u64);
        }
        at += n as u64;
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (for peers that need one up front).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Wait until something accepts TCP connections on 127.0.0.1:port.
pub fn wait_tcp(port: u16, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on 127.0.0.1:{port}")
}
