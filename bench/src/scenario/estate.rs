//! `estate`: many slow disks at once, as on an ESXi proxy. 16 disks, each served by its own
//! `nbdkit` behind a rate cap and a per-request delay (the `rate` and `delay` filters standing
//! in for VMware NFC: a per-disk bandwidth and a round trip per request), replicated by one
//! agent daemon (one group per disk, all 16 at once) into one sink on loopback. Reported:
//! the aggregate against the sum of the caps, and against the peers run as migration tools
//! run them — one `nbdcopy` per disk, N at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::daemon::Daemon;
use super::{side, Ctx};
use crate::image::Profile;
use crate::proc::{self, Server, Usage};
use crate::report::{Ratio, Row, Sample, ScenarioResult, Side};

const TITLE: &str = "16 rate-capped disks at once, one agent";
const DISKS: usize = 16;
/// Per-disk cap. VMware NFC gives ~100 MB/s per disk; a quarter of that keeps the sum of the
/// 16 caps (400 MB/s) under what this bench's smallest hosts (2 cores, TLS and checksums on
/// every byte) can carry, so the figure measures how well one agent keeps many slow disks
/// busy rather than the host's ceiling, which `lan` measures.
const CAP_MB_S: u64 = 25;
/// Per-request latency added by the `delay` filter (NFC's round trip per read).
const DELAY_MS: u64 = 1;
/// nbdkit's token bucket holds this many seconds of the rate after a pause; its default (2 s)
/// would let a short disk finish inside the burst, above its cap.
const BURST_S: f64 = 0.2;
/// The peers' concurrency: how many disks a migration tool copies at a time.
const PEER_PARALLEL: [usize; 2] = [4, DISKS];

/// One nbdkit per disk, serving `image` read-only on a Unix socket behind the cap and delay.
struct Disks {
    servers: Vec<Server>,
    sockets: Vec<PathBuf>,
}

impl Disks {
    fn start(dir: &Path, image: &Path) -> Result<Disks> {
        let (mut servers, mut sockets) = (Vec::new(), Vec::new());
        for i in 0..DISKS {
            let sock = dir.join(format!("disk{i}.sock"));
            let _ = std::fs::remove_file(&sock);
            let mut cmd = Command::new("nbdkit");
            cmd.args(["-f", "-r", "-U"])
                .arg(&sock)
                .args(["--filter=rate", "--filter=delay", "file"])
                .arg(format!("file={}", image.display()))
                // In bits per second, spelled out: nbdkit reads a suffix M as 2^20.
                .arg(format!("rate={}", CAP_MB_S * 8_000_000))
                .arg(format!("burstiness={BURST_S}"))
                .arg(format!("delay-read={DELAY_MS}ms"));
            servers.push(Server::start_detached(&mut cmd)?);
            sockets.push(sock);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sockets.iter().all(|s| s.exists()) {
            if Instant::now() > deadline {
                bail!("nbdkit did not create its sockets in 10 s (is nbdkit with its rate and delay filters installed?)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Disks { servers, sockets })
    }

    fn uri(&self, i: usize) -> String {
        format!("nbd+unix:///?socket={}", self.sockets[i].display())
    }

    /// Stop every nbdkit; their CPU summed as one side.
    fn stop(self) -> Result<Side> {
        let total = Usage::together(self.servers.into_iter().map(Server::stop).collect::<Result<Vec<_>>>()?);
        Ok(side(&format!("nbdkit ×{DISKS}"), &total))
    }
}

/// One agent daemon replicating every disk (a group each, all at once) until every group has
/// committed its first epoch; the targets are then compared with the image.
fn blockship(ctx: &Ctx, dir: &Path, image: &Path, size: u64) -> Result<Sample> {
    let disks = Disks::start(dir, image)?;
    let sink = ctx.lab.sink(&[])?;
    let mut groups = String::new();
    for i in 0..DISKS {
        groups += &format!(
            "[[group]]\nname = \"vm{i}\"\nkind = \"file\"\ninterval = \"1h\"\ndisks = [{{ source = \"{}\", target = \"file:estate-{i}.img\" }}]\n",
            disks.uri(i)
        );
    }
    let started = Instant::now();
    let daemon = Daemon::start(ctx, &sink.addr, dir, &format!("max_parallel_disks = {DISKS}\n"), &groups)?;
    // The daemon spreads first cycles over one interval; ask for every group's now, all at once.
    std::thread::scope(|s| -> Result<()> {
        let asks: Vec<_> = (1..DISKS)
            .map(|i| {
                let daemon = &daemon;
                s.spawn(move || proc::run_ok(daemon.control("sync-now").arg(format!("vm{i}"))))
            })
            .collect();
        for a in asks {
            a.join().map_err(|_| anyhow::anyhow!("a sync-now thread panicked"))??;
        }
        Ok(())
    })?;
    let deadline = started + Duration::from_secs(600);
    let mut errors = 0;
    loop {
        let groups = match daemon.status() {
            Ok(g) => {
                errors = 0;
                g
            }
            // A daemon that died does not answer: stop after ~5 s of silence, not the deadline.
            Err(e) if errors >= 50 => {
                return Err(daemon.failed(&format!("the agent daemon stopped answering: {e}")))
            }
            Err(_) => {
                errors += 1;
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Some(g) = groups.iter().find(|g| g["failures"].as_u64().unwrap_or(0) > 0) {
            return Err(daemon.failed(&format!("group {} failed: {}", g["name"], g["last_error"])));
        }
        if groups.len() == DISKS && groups.iter().all(|g| g["committed_epoch"].as_u64().unwrap_or(0) >= 1) {
            break;
        }
        if Instant::now() > deadline {
            return Err(daemon
                .failed(&format!("the groups did not commit their first epochs in 10 minutes: {groups:?}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let wall_s = started.elapsed().as_secs_f64();
    let agent_usage = daemon.stop()?;
    let sink_usage = sink.server.stop()?;
    let nbdkit = disks.stop()?;
    for i in 0..DISKS {
        crate::lab::check_copy(&ctx.lab.target_path(&format!("estate-{i}.img")), image)?;
    }
    Ok(Sample {
        wall_s,
        disk_bytes: size * DISKS as u64,
        wire_bytes: None,
        sides: vec![side("agent", &agent_usage), side("sink", &sink_usage), nbdkit],
    })
}

/// One `nbdcopy` per disk into a local file, `parallel` at a time.
fn peers(ctx: &Ctx, dir: &Path, image: &Path, size: u64, parallel: usize) -> Result<Sample> {
    let disks = Disks::start(dir, image)?;
    let nbdcopy = ctx.lab.bins.peer("nbdcopy")?;
    let outs: Vec<PathBuf> = (0..DISKS).map(|i| dir.join(format!("peer-{i}.img"))).collect();
    for o in &outs {
        let _ = std::fs::remove_file(o);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let usages: Vec<Result<Vec<Usage>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                s.spawn(|| -> Result<Vec<Usage>> {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= DISKS {
                            return Ok(mine);
                        }
                        let f = proc::run_ok(Command::new(&nbdcopy).arg(disks.uri(i)).arg(&outs[i]))?;
                        mine.push(f.usage);
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|_| bail!("a peer thread panicked"))).collect()
    });
    let wall_s = started.elapsed().as_secs_f64();
    let copies = Usage::together(usages.into_iter().collect::<Result<Vec<_>>>()?.into_iter().flatten());
    let nbdkit = disks.stop()?;
    for o in &outs {
        crate::lab::check_copy(o, image)?;
        std::fs::remove_file(o)?;
    }
    Ok(Sample {
        wall_s,
        disk_bytes: size * DISKS as u64,
        wire_bytes: None,
        sides: vec![side(&format!("nbdcopy ×{DISKS}"), &copies), nbdkit],
    })
}

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    if proc::run(Command::new("nbdkit").args(["--filter=rate", "--filter=delay", "null", "--dump-plugin"]))
        .map_or(true, |f| f.status != 0)
    {
        bail!("nbdkit with its rate and delay filters is needed (apt install nbdkit)");
    }
    let size: u64 = if ctx.quick { 32 << 20 } else { 512 << 20 };
    // Incompressible, like most of what crosses NFC once zeros are skipped; one image shared
    // read-only by the 16 servers (the page cache holds it once).
    let image = ctx.lab.image(Profile::Random, size, 81)?;
    let dir = ctx.lab.dir.join("estate");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let caps = (CAP_MB_S * DISKS as u64) as f64;
    let mut result = ScenarioResult::new(
        "estate",
        TITLE,
        format!(
            "{DISKS} disks of {} MiB (`random`), each its own `nbdkit` (file plugin, read-only, Unix socket) with `--filter=rate` at {CAP_MB_S} MB/s and `--filter=delay` of {DELAY_MS} ms per read: NFC's per-disk rate and round trip, scaled so the sum of the caps ({caps:.0} MB/s) fits this host. Blockship: one `blockship-agent run` daemon, one group per disk, `max_parallel_disks = {DISKS}`, into one sink on loopback (file targets), timed until every group has committed its first epoch. Peers: one `nbdcopy` per disk into a local file, {} at a time (how migration tools run them: a disk per copy, a few VMs in flight) and all {DISKS} at once. Every copy is compared with the image.",
            size >> 20,
            PEER_PARALLEL[0]
        ),
    );
    let mut row = Row::new(format!("blockship, one agent, {DISKS} disks at once"));
    ctx.repeat(|measured| {
        let s = blockship(ctx, &dir, &image, size)?;
        if measured {
            row.samples.push(s);
        }
        Ok(())
    })?;
    let ours = row.mb_per_s();
    result.rows.push(row);
    let mut best_peer = 0.0f64;
    for parallel in PEER_PARALLEL {
        let mut row = Row::new(format!("nbdcopy per disk, {parallel} at a time"));
        ctx.repeat(|measured| {
            let s = peers(ctx, &dir, &image, size, parallel)?;
            if measured {
                row.samples.push(s);
            }
            Ok(())
        })?;
        let theirs = row.mb_per_s();
        best_peer = best_peer.max(theirs);
        result.ratios.push(Ratio::at_least(
            format!("blockship / nbdcopy {parallel} at a time, aggregate"),
            ours / theirs,
            1.5,
        ));
        result.rows.push(row);
    }
    result.ratios.push(Ratio::at_least("blockship aggregate / sum of the caps", ours / caps, 0.9));
    result.ratios.push(Ratio::info("best peer aggregate / sum of the caps", best_peer / caps));
    result.notes.push(format!(
        "Aggregate = {DISKS} × disk size / wall time until the last disk is done. The caps are nbdkit's token buckets (burst {BURST_S} s), so a tool that keeps every disk busy reaches the sum of the caps and no more, and a tool copying {} disks at a time at most {} MB/s. `nbdkit ×{DISKS}` and `nbdcopy ×{DISKS}`: CPU summed over the processes, peak RSS of the largest one.",
        PEER_PARALLEL[0],
        PEER_PARALLEL[0] as u64 * CAP_MB_S
    ));
    Ok(result)
}
