//! `blockship-bench chaos`: the crash loop. A qemu-storage-daemon "VM" with three disks takes
//! sequence-numbered writes from the live writer while an agent daemon replicates the disks as
//! one group (one QMP transaction freezes them together) into file targets on a sink. At
//! seeded random moments the sink or the agent is killed with SIGKILL and started again. After
//! every sink kill, a copy of its targets and state is rolled back to the committed group epoch
//! (`rollback --group`, what an operator would do before a failover) and checked with the
//! writer's log: the three disks must be one consistent cut, never earlier than the last one
//! seen. At the end the writer stops, the group commits once more, and every target must equal
//! its source disk. Any violation stops the loop with an error naming the kill and the seed.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::Rng;
use crate::lab::Bins;
use crate::proc::{self, Server};
use crate::vm::Vm;
use crate::workload::{consistent_cut, SeqWriter, BLOCK};

const DISKS: usize = 3;
const SIZE: u64 = 16 << 20;
const AGENT: &str = "chaos";

pub struct Options {
    pub kills: usize,
    pub seed: u64,
    pub transport: String,
    pub dir: PathBuf,
}

/// What a loop did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub seed: u64,
    pub sink_kills: usize,
    pub agent_kills: usize,
    /// Committed group epochs checked against the writer's log (all consistent, or we failed).
    pub cuts_checked: usize,
    pub final_epoch: u64,
    pub writes: usize,
    pub seconds: f64,
}

struct Chaos<'a> {
    bins: &'a Bins,
    dir: PathBuf,
    listen: String,
    transport: String,
}

impl Chaos<'_> {
    fn sink(&self) -> Result<Server> {
        let mut cmd = Command::new(&self.bins.sink);
        cmd.args(["serve", "--listen", &self.listen, "--allow", &format!("{AGENT}=file:**"), "--pki"])
            .arg(self.dir.join("pki"))
            .arg("--file-root")
            .arg(self.dir.join("root"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--idle-timeout", "5s"])
            .env("RUST_LOG", "warn");
        Server::start(&mut cmd, |l| l.starts_with("listening on "), Duration::from_secs(30))
    }

    fn daemon(&self, vm: &Vm) -> Result<Server> {
        let disks: Vec<String> =
            (0..DISKS).map(|d| format!("{{ disk = \"disk{d}\", target = \"file:vm/d{d}\" }}")).collect();
        let config = format!(
            "[agent]\nsink = \"{}\"\ntransport = \"{}\"\npki = \"{}\"\nname = \"{AGENT}\"\nidle_timeout = \"5s\"\n\
             [daemon]\ncontrol_socket = \"{}\"\n\
             [[group]]\nname = \"vm\"\nkind = \"qemu\"\ninterval = \"5s\"\nqmp = \"{}\"\nnbd_socket = \"{}\"\ndisks = [{}]\n",
            self.listen,
            self.transport,
            self.dir.join("pki").display(),
            self.socket().display(),
            vm.qmp.display(),
            vm.nbd.display(),
            disks.join(", ")
        );
        let path = self.dir.join("agent.toml");
        std::fs::write(&path, config)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log"))?;
        Server::start_logging(
            Command::new(&self.bins.agent).args(["run", "--config"]).arg(&path).env("RUST_LOG", "warn"),
            log,
        )
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// The group's committed epoch as the daemon reports it (None while it does not answer).
    fn committed(&self) -> Option<u64> {
        let out = proc::run(
            Command::new(&self.bins.agent).args(["status", "--json", "--control-socket"]).arg(self.socket()),
        )
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).ok()?;
        v.as_array()?.iter().find(|g| g["name"] == "vm")?["committed_epoch"].as_u64()
    }

    /// Copy the (dead) sink's targets and state, roll the copy back to the committed group
    /// epoch, and return that epoch and the members' contents.
    fn committed_copy(&self) -> Result<(u64, Vec<Vec<u8>>)> {
        let check = self.dir.join("check");
        if check.exists() {
            std::fs::remove_dir_all(&check)?;
        }
        std::fs::create_dir_all(&check)?;
        proc::run_ok(Command::new("cp").arg("-a").arg(self.dir.join("root")).arg(check.join("root")))?;
        proc::run_ok(Command::new("cp").arg("-a").arg(self.dir.join("state")).arg(check.join("state")))?;
        let rolled = proc::run(
            Command::new(&self.bins.sink)
                .args(["rollback", "--group", &format!("{AGENT}/vm"), "--file-root"])
                .arg(check.join("root"))
                .arg("--state-dir")
                .arg(check.join("state")),
        )?;
        if rolled.status != 0 && !rolled.stderr.contains("nothing to roll back") {
            bail!("rollback --group on the copy failed: {}{}", rolled.stdout, rolled.stderr);
        }
        let status = proc::run_ok(
            Command::new(&self.bins.sink).args(["status", "--json", "--state-dir"]).arg(check.join("state")),
        )?;
        let v: serde_json::Value = serde_json::from_str(status.stdout.trim()).context("status --json")?;
        let epochs: Vec<u64> = (0..DISKS)
            .map(|d| {
                v["targets"]
                    .as_array()
                    .and_then(|t| t.iter().find(|t| t["target"] == format!("file:vm/d{d}")))
                    .and_then(|t| t["committed_epoch"].as_u64())
                    .unwrap_or(0)
            })
            .collect();
        if epochs.iter().any(|&e| e != epochs[0]) {
            bail!("after rollback --group the members are at different epochs: {epochs:?}");
        }
        let images = (0..DISKS)
            .map(|d| {
                let mut img = std::fs::read(check.join(format!("root/vm/d{d}"))).unwrap_or_default();
                img.resize(SIZE as usize, 0);
                img
            })
            .collect();
        Ok((epochs[0], images))
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn run(bins: &Bins, opts: &Options) -> Result<Outcome> {
    let started = Instant::now();
    let dir = opts.dir.clone();
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(dir.join("root"))?;
    proc::run_ok(
        Command::new(&bins.sink).args(["pki", "init", "--dir"]).arg(dir.join("pki")).args(["--agent", AGENT]),
    )?;
    let vm = Vm::start(&dir.join("vm"), DISKS, SIZE)?;
    let uris = (0..DISKS).map(|i| vm.export_uri(i)).collect();
    let writer = SeqWriter::start(uris, SIZE / BLOCK, &dir);
    let chaos = Chaos {
        bins,
        dir: dir.clone(),
        listen: format!("127.0.0.1:{}", free_port()?),
        transport: opts.transport.clone(),
    };
    let mut sink = Some(chaos.sink()?);
    let mut daemon = Some(chaos.daemon(&vm)?);
    let mut rng = Rng::new(opts.seed);
    let mut out = Outcome { seed: opts.seed, ..Outcome::default() };
    let (mut last_epoch, mut last_prefix) = (0u64, 0usize);

    for kill in 1..=opts.kills {
        std::thread::sleep(Duration::from_millis(500 + rng.next_u64() % 7500));
        if rng.next_u64().is_multiple_of(2) {
            out.sink_kills += 1;
            if let Some(s) = sink.take() {
                s.kill9();
            }
            let log = writer.log.lock().map(|l| l.clone()).unwrap_or_default();
            let (epoch, images) = chaos.committed_copy()?;
            let prefix = consistent_cut(&log, &images).map_err(|e| {
                anyhow::anyhow!(
                    "kill {kill} (seed {}): epoch {epoch} is not one consistent cut: {e}",
                    opts.seed
                )
            })?;
            if epoch < last_epoch || prefix < last_prefix || (epoch == last_epoch && prefix != last_prefix) {
                bail!(
                    "kill {kill} (seed {}): went back in time: epoch {epoch} holds {prefix} writes, before it epoch {last_epoch} held {last_prefix}",
                    opts.seed
                );
            }
            (last_epoch, last_prefix) = (epoch, prefix);
            out.cuts_checked += 1;
            println!(
                "kill {kill}: sink; committed epoch {epoch} = the first {prefix} of {} writes",
                log.len()
            );
            sink = Some(chaos.sink()?);
        } else {
            out.agent_kills += 1;
            if let Some(d) = daemon.take() {
                d.kill9();
            }
            println!("kill {kill}: agent");
            daemon = Some(chaos.daemon(&vm)?);
        }
    }

    // The end: a quiet source, one more group epoch frozen after the last write, exact copies.
    let log = writer.finish();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut start = None;
    loop {
        match (chaos.committed(), start) {
            (Some(e), None) => start = Some(e),
            (Some(e), Some(s)) if e >= s + 2 => {
                out.final_epoch = e;
                break;
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bail!(
                "the group did not commit after the writer stopped (seed {}); agent log in {}",
                opts.seed,
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if let Some(d) = daemon.take() {
        d.stop()?;
    }
    if let Some(s) = sink.take() {
        s.stop()?;
    }
    for d in 0..DISKS {
        let target = dir.join(format!("root/vm/d{d}"));
        let cmp = proc::run(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw", &vm.export_uri(d)])
                .arg(&target),
        )?;
        if cmp.status != 0 {
            bail!(
                "disk {d} differs from its source at the end (seed {}): {}{}",
                opts.seed,
                cmp.stdout,
                cmp.stderr
            );
        }
    }
    out.writes = log.len();
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}
