//! `cutover`: the downtime of `blockship-agent cutover` against the size of the final delta. One
//! agent daemon replicates three groups (qemu-storage-daemon "VMs" of three qcow2 disks each)
//! into file targets; after each group's first epoch, its disks get 0, 64 MiB or 512 MiB of
//! incompressible writes in all (a third per disk, written as a guest would, through QEMU's NBD
//! export) and the group is cut over. Reported: the downtime (end of the pre-freeze step to the
//! targets cut over) and every phase; at the end every target is compared with its source. No
//! peer cuts over here (their published cutovers take 40 s to minutes), so the figures are set
//! against the target (≤ 5 s with ≤ 64 MiB of changes; goal ≤ 2 s).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::daemon::Daemon;
use super::Ctx;
use crate::proc;
use crate::report::{Ratio, ScenarioResult};
use crate::vm::Vm;

const TITLE: &str = "cutover: downtime against the final delta";
const DISKS: usize = 3;
/// Final deltas, MiB (over the group's three disks).
const DELTAS: [u64; 3] = [0, 64, 512];

/// Write `bytes` of random data at the start of export `uri`, as a guest would.
fn write_random(uri: &str, bytes: u64, seed: u64, dir: &Path) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let data = dir.join("random.bin");
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let buf: Vec<u8> = (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&data, buf)?;
    proc::run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -s {} 0 {bytes}", data.display()))
            .arg(uri),
    )?;
    Ok(())
}

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    if proc::run(Command::new("qemu-storage-daemon").arg("--version")).is_err() {
        bail!("qemu-storage-daemon is not installed (apt install qemu-system-common qemu-utils)");
    }
    let size: u64 = if ctx.quick { 256 << 20 } else { 1 << 30 };
    let dir = ctx.lab.dir.join("cutover");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let vms: Vec<Vm> = (0..DELTAS.len())
        .map(|g| Vm::start(&dir.join(format!("vm{g}")), DISKS, size))
        .collect::<Result<_>>()?;
    let sink = ctx.lab.sink(&[])?;
    let mut config = String::new();
    for (g, vm) in vms.iter().enumerate() {
        let disks: Vec<String> = (0..DISKS)
            .map(|d| format!("{{ disk = \"disk{d}\", target = \"file:cut-{g}-{d}.img\" }}"))
            .collect();
        // A long interval: the measured cutover's final cycle carries the whole delta.
        config += &format!(
            "[[group]]\nname = \"vm{g}\"\nkind = \"qemu\"\ninterval = \"1h\"\nqmp = \"{}\"\nnbd_socket = \"{}\"\ndisks = [{}]\n",
            vm.qmp.display(),
            vm.nbd.display(),
            disks.join(", ")
        );
    }
    let daemon = Daemon::start(ctx, &sink.addr, &dir, "", &config)?;
    for g in 0..DELTAS.len() {
        proc::run_ok(daemon.control("sync-now").arg(format!("vm{g}")))?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let groups = daemon.status()?;
        if groups.len() == DELTAS.len()
            && groups.iter().all(|g| g["committed_epoch"].as_u64().unwrap_or(0) >= 1)
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the groups did not commit their first epochs: {groups:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    let mut result = ScenarioResult::new(
        "cutover",
        TITLE,
        format!(
            "One `blockship-agent run` daemon, {} qemu-storage-daemon VMs of {DISKS} qcow2 disks of {} MiB each, file targets on one sink, loopback. After each group's first epoch its disks get the final delta (random data, a third per disk, through QEMU's NBD export), then `blockship-agent cutover --pre-freeze true` (a qemu-storage-daemon runs no guest to stop; the built-in is QMP `stop`). Downtime = end of the pre-freeze step to every target cut over (final cycle, group commit, finalisation).",
            DELTAS.len(),
            size >> 20
        ),
    );
    for (g, &mib) in DELTAS.iter().enumerate() {
        for d in 0..DISKS {
            write_random(
                &vms[g].export_uri(d),
                (mib << 20) / DISKS as u64,
                (g * DISKS + d) as u64 + 1,
                &dir,
            )?;
        }
        let out = proc::run_ok(daemon.control("cutover").args([
            "--json",
            "--pre-freeze",
            "true",
            "--group",
            &format!("vm{g}"),
        ]))?;
        let reply: serde_json::Value = serde_json::from_str(out.stdout.trim()).context("cutover --json")?;
        let downtime = reply["downtime_seconds"].as_f64().unwrap_or(f64::NAN);
        let name = format!("downtime, {mib} MiB final delta (s)");
        result.ratios.push(if mib <= 64 {
            Ratio::at_most(name, downtime, 5.0)
        } else {
            Ratio::info(name, downtime)
        });
        let phases: Vec<String> = reply["phases"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        let detail = p["detail"].as_str().unwrap_or("");
                        let detail = if detail.is_empty() { String::new() } else { format!(" ({detail})") };
                        format!(
                            "{} {:.3} s{detail}",
                            p["name"].as_str().unwrap_or(""),
                            p["seconds"].as_f64().unwrap_or(0.0)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        result.notes.push(format!("{mib} MiB: downtime {downtime:.2} s; {}", phases.join(", ")));
        for d in 0..DISKS {
            let target = ctx.lab.target_path(&format!("cut-{g}-{d}.img"));
            let cmp = proc::run(
                Command::new("qemu-img")
                    .args(["compare", "-f", "raw", "-F", "raw", &vms[g].export_uri(d)])
                    .arg(&target),
            )?;
            if cmp.status != 0 {
                bail!(
                    "vm{g} disk {d}: the cut-over target differs from the source: {}{}",
                    cmp.stdout,
                    cmp.stderr
                );
            }
        }
    }
    daemon.stop()?;
    sink.server.stop()?;
    drop(vms);
    Ok(result)
}
