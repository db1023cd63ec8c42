//! `blockship-bench chaos`: the crash loop. A qemu-storage-daemon "VM" with three disks takes
//! sequence-numbered writes from the live writer while an agent daemon replicates the disks as
//! one group (one QMP transaction freezes them together) into file targets on a sink. At
//! seeded random moments the sink or the agent is killed with SIGKILL and started again. After
//! every sink kill, a copy of its targets and state is rolled back to the committed group epoch
//! (`rollback --group`, what an operator would do before a failover) and checked with the
//! writer's log: the three disks must be one consistent cut, never earlier than the last one
//! seen. At the end the writer stops, the group commits once more, and every target must equal
//! its source disk. Any violation stops the loop with an error naming the kill and the seed.
//! With `--rbd` the targets are RBD images of the cluster `scripts/ceph-up.sh` started, a third
//! victim joins (its only OSD, SIGKILLed and started again 1 to 8 s later), and the committed
//! cut is read after every kill from the members' snapshots of the group's committed epoch
//! (`blockship-N`, immutable, so the sink need not be dead to read them).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::Rng;
use crate::lab::{Bins, CephEnv};
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
    /// Replicate into RBD (and restart the OSD too) instead of file targets.
    pub rbd: bool,
}

/// What a loop did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub seed: u64,
    pub sink_kills: usize,
    pub agent_kills: usize,
    pub osd_restarts: usize,
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
    /// The cluster and pool with `--rbd`.
    ceph: Option<(CephEnv, String)>,
}

impl Chaos<'_> {
    fn target(&self, d: usize) -> String {
        match &self.ceph {
            Some((_, pool)) => format!("rbd:{pool}/chaos-d{d}"),
            None => format!("file:vm/d{d}"),
        }
    }

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
        if let Some((ceph, _)) = &self.ceph {
            cmd.args(["--allow", &format!("{AGENT}=rbd:**")]).args(&ceph.sink_args);
        }
        Server::start(&mut cmd, |l| l.starts_with("listening on "), Duration::from_secs(30))
    }

    fn daemon(&self, vm: &Vm) -> Result<Server> {
        let disks: Vec<String> = (0..DISKS)
            .map(|d| format!("{{ disk = \"disk{d}\", target = \"{}\" }}", self.target(d)))
            .collect();
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

/// RBD mode: the members' committed cut, read from their snapshots of the group's committed
/// epoch. A member that recorded epoch N commits the group's N (the others are rolled forward
/// to it when the group opens, see the sink's `group`), so N is the largest recorded epoch, and
/// every member must hold its snapshot.
impl Chaos<'_> {
    fn committed_snapshots(&self) -> Result<(u64, Vec<Vec<u8>>)> {
        let (ceph, pool) = self.ceph.as_ref().context("RBD mode")?;
        let mut epochs = Vec::new();
        for d in 0..DISKS {
            epochs.push(ceph.committed_epoch(&format!("{pool}/chaos-d{d}"))?);
        }
        let epoch = epochs.iter().copied().max().unwrap_or(0);
        if epoch == 0 {
            return Ok((0, vec![vec![0; SIZE as usize]; DISKS]));
        }
        let check = self.dir.join("check");
        std::fs::create_dir_all(&check)?;
        let mut images = Vec::new();
        for d in 0..DISKS {
            let file = check.join(format!("d{d}"));
            let _ = std::fs::remove_file(&file);
            let snap = format!("{pool}/chaos-d{d}@blockship-{epoch}");
            let out = proc::run(ceph.rbd(&["export", "--no-progress", &snap]).arg(&file))?;
            if out.status != 0 {
                bail!(
                    "the group committed epoch {epoch} (members recorded {epochs:?}) but {snap} cannot be read: {}",
                    out.stderr.trim()
                );
            }
            let mut img = std::fs::read(&file)?;
            img.resize(SIZE as usize, 0);
            images.push(img);
        }
        Ok((epoch, images))
    }

    /// SIGKILL the cluster's only OSD, wait `down`, start it again.
    fn restart_osd(&self, down: Duration) -> Result<()> {
        let (ceph, _) = self.ceph.as_ref().context("RBD mode")?;
        let mut osd = crate::osd::Osd::of(&ceph.conf);
        osd.kill()?;
        std::thread::sleep(down);
        osd.start()
    }

    /// The committed cut as the mode reads it (file mode: the sink must be dead).
    fn committed_cut(&self) -> Result<(u64, Vec<Vec<u8>>)> {
        if self.ceph.is_some() {
            self.committed_snapshots()
        } else {
            self.committed_copy()
        }
    }

    /// Target `d`'s contents as a file (RBD mode: exported).
    fn final_copy(&self, d: usize) -> Result<PathBuf> {
        let Some((ceph, pool)) = &self.ceph else { return Ok(self.dir.join(format!("root/vm/d{d}"))) };
        let file = self.dir.join(format!("final-d{d}"));
        let _ = std::fs::remove_file(&file);
        proc::run_ok(ceph.rbd(&["export", "--no-progress", &format!("{pool}/chaos-d{d}")]).arg(&file))?;
        Ok(file)
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
    let ceph = if opts.rbd {
        let env = CephEnv::from_env()
            .context("--rbd needs the Ceph environment scripts/ceph-up.sh prints (CEPH_CONF, ...)")?;
        let pool = std::env::var("BLOCKSHIP_CEPH_POOL").unwrap_or_else(|_| "rbd".into());
        for d in 0..DISKS {
            env.remove(&format!("{pool}/chaos-d{d}"));
        }
        Some((env, pool))
    } else {
        None
    };
    let chaos = Chaos {
        bins,
        dir: dir.clone(),
        listen: format!("127.0.0.1:{}", free_port()?),
        transport: opts.transport.clone(),
        ceph,
    };
    let mut sink = Some(chaos.sink()?);
    let mut daemon = Some(chaos.daemon(&vm)?);
    let mut rng = Rng::new(opts.seed);
    let mut out = Outcome { seed: opts.seed, ..Outcome::default() };
    let (mut last_epoch, mut last_prefix) = (0u64, 0usize);

    for kill in 1..=opts.kills {
        std::thread::sleep(Duration::from_millis(500 + rng.next_u64() % 7500));
        let victims = if opts.rbd { 3 } else { 2 };
        let victim = rng.next_u64() % victims;
        let what = match victim {
            0 => {
                out.sink_kills += 1;
                if let Some(s) = sink.take() {
                    s.kill9();
                }
                "sink"
            }
            1 => {
                out.agent_kills += 1;
                if let Some(d) = daemon.take() {
                    d.kill9();
                }
                "agent"
            }
            _ => {
                out.osd_restarts += 1;
                chaos.restart_osd(Duration::from_millis(1000 + rng.next_u64() % 7000))?;
                "osd"
            }
        };
        // File targets are read (rolled back) only while the sink is dead; snapshots any time.
        if victim == 0 || opts.rbd {
            // The cut first, then the log: with a live sink (RBD) the cut may be newer than a log
            // copied before it; every write a frozen view holds had completed when it froze.
            let (epoch, images) = chaos.committed_cut()?;
            let log = writer.log.lock().map(|l| l.clone()).unwrap_or_default();
            let prefix = consistent_cut(&log, &images).map_err(|e| {
                anyhow::anyhow!(
                    "kill {kill} ({what}, seed {}): epoch {epoch} is not one consistent cut: {e}",
                    opts.seed
                )
            })?;
            if epoch < last_epoch || prefix < last_prefix || (epoch == last_epoch && prefix != last_prefix) {
                bail!(
                    "kill {kill} ({what}, seed {}): went back in time: epoch {epoch} holds {prefix} writes, before it epoch {last_epoch} held {last_prefix}",
                    opts.seed
                );
            }
            (last_epoch, last_prefix) = (epoch, prefix);
            out.cuts_checked += 1;
            println!(
                "kill {kill}: {what}; committed epoch {epoch} = the first {prefix} of {} writes",
                log.len()
            );
        } else {
            println!("kill {kill}: {what}");
        }
        if sink.is_none() {
            sink = Some(chaos.sink()?);
        }
        if daemon.is_none() {
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
        let target = chaos.final_copy(d)?;
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
