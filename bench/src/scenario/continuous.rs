//! `continuous`: what it costs to stay continuous. One agent daemon replicates 64 change-tracked
//! disks (16 qemu-storage-daemon "VMs" of 4 qcow2 disks each, QEMU dirty bitmaps through QMP)
//! in 16 groups at a 5 s interval into file targets on one sink. First every disk is idle, then
//! 1 % of one disk changes every cycle. Reported: the agent's and the sink's CPU (% of one core,
//! from /proc over the phase), their RSS, and the distribution of cycle times (from `status`).
//! No peer keeps disks replicated at a 5 s interval here (rbd-mirror's finest schedule is one
//! minute, the others sync hourly), so the figures are set against the targets.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::daemon::Daemon;
use super::Ctx;
use crate::proc;
use crate::report::{Ratio, ScenarioResult};
use crate::vm::Vm;

const TITLE: &str = "continuous replication: the cost of 64 disks at a 5 s interval";
const GROUPS: usize = 16;
const DISKS: usize = 4;
const INTERVAL_S: u64 = 5;

/// CPU seconds (user + system) a process has used so far, from /proc.
fn cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').context("/proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Current RSS of a process, MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// One phase's measurements.
struct Phase {
    seconds: f64,
    agent_cpu_s: f64,
    sink_cpu_s: f64,
    agent_rss_mib: f64,
    sink_rss_mib: f64,
    /// Cycle times (s) of idle groups, and of the group whose disk changes.
    idle_cycles: Vec<f64>,
    busy_cycles: Vec<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    if proc::run(Command::new("qemu-storage-daemon").arg("--version")).is_err() {
        bail!("qemu-storage-daemon is not installed (apt install qemu-system-common qemu-utils)");
    }
    let size: u64 = if ctx.quick { 64 << 20 } else { 1 << 30 };
    let phase_s = if ctx.quick { 15 } else { 90 };
    let dir = ctx.lab.dir.join("continuous");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let vms: Vec<Vm> =
        (0..GROUPS).map(|g| Vm::start(&dir.join(format!("vm{g}")), DISKS, size)).collect::<Result<_>>()?;
    let sink = ctx.lab.sink(&[])?;

    let mut config = String::new();
    for (g, vm) in vms.iter().enumerate() {
        let disks: Vec<String> = (0..DISKS)
            .map(|d| format!("{{ disk = \"disk{d}\", target = \"file:cont-{g}-{d}.img\" }}"))
            .collect();
        config += &format!(
            "[[group]]\nname = \"vm{g}\"\nkind = \"qemu\"\ninterval = \"{INTERVAL_S}s\"\nqmp = \"{}\"\nnbd_socket = \"{}\"\ndisks = [{}]\n",
            vm.qmp.display(),
            vm.nbd.display(),
            disks.join(", ")
        );
    }
    let daemon = Daemon::start(ctx, &sink.addr, &dir, "", &config)?;

    // Every group's first (full) epoch, then the measured phases.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let groups = daemon.status().unwrap_or_default();
        if groups.len() == GROUPS && groups.iter().all(|g| g["committed_epoch"].as_u64().unwrap_or(0) >= 2) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the daemon's groups did not commit their first epochs: {groups:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let measure = |change: bool| -> Result<Phase> {
        let (a0, s0) = (cpu_s(daemon.pid())?, cpu_s(sink.server.pid())?);
        let started = Instant::now();
        let mut seen = std::collections::HashSet::new();
        let (mut idle, mut busy) = (Vec::new(), Vec::new());
        let mut next_change = Instant::now();
        let mut round = 0u64;
        while started.elapsed() < Duration::from_secs(phase_s) {
            if change && Instant::now() >= next_change {
                // 1 % of vm0's first disk, somewhere else each cycle, written as a guest would.
                let len = size / 100 / 65536 * 65536;
                let at = (round * 7 * len) % (size - len);
                round += 1;
                proc::run_ok(Command::new("qemu-io").args([
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P {} {at} {len}", round % 250 + 1),
                    &vms[0].export_uri(0),
                ]))?;
                next_change += Duration::from_secs(INTERVAL_S);
            }
            for g in daemon.status()? {
                let key = (g["name"].as_str().unwrap_or("").to_string(), g["cycles"].as_u64().unwrap_or(0));
                let secs = g["last_cycle_seconds"].as_f64().unwrap_or(f64::NAN);
                if g["failures"].as_u64().unwrap_or(0) > 0 {
                    bail!("group {} failed: {}", key.0, g["last_error"]);
                }
                if seen.insert(key.clone()) {
                    if change && key.0 == "vm0" {
                        busy.push(secs);
                    } else {
                        idle.push(secs);
                    }
                }
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        let seconds = started.elapsed().as_secs_f64();
        idle.sort_by(f64::total_cmp);
        busy.sort_by(f64::total_cmp);
        Ok(Phase {
            seconds,
            agent_cpu_s: cpu_s(daemon.pid())? - a0,
            sink_cpu_s: cpu_s(sink.server.pid())? - s0,
            agent_rss_mib: rss_mib(daemon.pid()),
            sink_rss_mib: rss_mib(sink.server.pid()),
            idle_cycles: idle,
            busy_cycles: busy,
        })
    };
    let idle = measure(false)?;
    let changing = measure(true)?;

    // The changed disk must have arrived: wait for an epoch that began after the last write,
    // then compare the target with the source through QEMU's own export.
    let epoch = |groups: &[serde_json::Value]| {
        groups.iter().find(|g| g["name"] == "vm0").and_then(|g| g["committed_epoch"].as_u64()).unwrap_or(0)
    };
    let want = epoch(&daemon.status()?) + 2;
    let deadline = Instant::now() + Duration::from_secs(60);
    while epoch(&daemon.status()?) < want {
        if Instant::now() > deadline {
            bail!("vm0 did not commit again after its last change");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let target = ctx.lab.target_path("cont-0-0.img");
    let cmp = proc::run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &vms[0].export_uri(0)])
            .arg(&target),
    )?;
    if cmp.status != 0 {
        bail!("the replicated disk differs from the source: {}{}", cmp.stdout, cmp.stderr);
    }
    let agent_usage = daemon.stop()?;
    let sink_usage = sink.server.stop()?;
    drop(vms);

    let mut result = ScenarioResult::new(
        "continuous",
        TITLE,
        format!(
            "One `blockship-agent run` daemon: {GROUPS} groups (qemu-storage-daemon VMs) of {DISKS} qcow2 disks of {} MiB, QEMU dirty bitmaps through QMP, {INTERVAL_S} s interval, file targets on one sink, loopback. {phase_s} s with every disk idle, then {phase_s} s with 1 % of one disk written (qemu-io through the VM's NBD export) every cycle; at the end the changed disk's target is compared with the source.",
            size >> 20
        ),
    );
    let pct = |cpu: f64, p: &Phase| 100.0 * cpu / p.seconds;
    result.ratios.push(Ratio::at_most(
        "agent CPU, 64 idle disks (% of one core)",
        pct(idle.agent_cpu_s, &idle),
        2.0,
    ));
    result.ratios.push(Ratio::at_most(
        "sink CPU, 64 idle disks (% of one core)",
        pct(idle.sink_cpu_s, &idle),
        2.0,
    ));
    result.ratios.push(Ratio::at_most(
        "idle group cycle p50 (ms)",
        1000.0 * percentile(&idle.idle_cycles, 0.5),
        50.0,
    ));
    result
        .ratios
        .push(Ratio::info("idle group cycle p99 (ms)", 1000.0 * percentile(&idle.idle_cycles, 0.99)));
    result.ratios.push(Ratio::info("idle group cycle max (ms)", 1000.0 * percentile(&idle.idle_cycles, 1.0)));
    result.ratios.push(Ratio::info(
        "agent CPU, 1 % of one disk per cycle (% of one core)",
        pct(changing.agent_cpu_s, &changing),
    ));
    result.ratios.push(Ratio::info(
        "sink CPU, 1 % of one disk per cycle (% of one core)",
        pct(changing.sink_cpu_s, &changing),
    ));
    result
        .ratios
        .push(Ratio::info("changing group cycle p50 (ms)", 1000.0 * percentile(&changing.busy_cycles, 0.5)));
    result
        .ratios
        .push(Ratio::info("changing group cycle max (ms)", 1000.0 * percentile(&changing.busy_cycles, 1.0)));
    result.ratios.push(Ratio::info("agent RSS after the idle phase (MiB)", idle.agent_rss_mib));
    result.ratios.push(Ratio::info("sink RSS after the idle phase (MiB)", idle.sink_rss_mib));
    result.ratios.push(Ratio::info("agent RSS after the changing phase (MiB)", changing.agent_rss_mib));
    result.ratios.push(Ratio::info("sink RSS after the changing phase (MiB)", changing.sink_rss_mib));
    result.ratios.push(Ratio::info("agent peak RSS (MiB)", agent_usage.max_rss_kib as f64 / 1024.0));
    result.ratios.push(Ratio::info("sink peak RSS (MiB)", sink_usage.max_rss_kib as f64 / 1024.0));
    result.notes.push(format!(
        "{} idle cycles and {} cycles of the changing group observed through `status`; CPU is the processes' own (qemu-storage-daemon, the \"VMs\", is not counted). Peak RSS includes the first (full) epoch of every disk.",
        idle.idle_cycles.len() + changing.idle_cycles.len(),
        changing.busy_cycles.len()
    ));
    Ok(result)
}
