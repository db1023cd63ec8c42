//! Scenarios: each measures Blockship and its peers in the same run, on the same data.

pub mod compression;
pub mod continuous;
pub mod cutover;
pub mod daemon;
pub mod estate;
pub mod incremental;
pub mod lan;
pub mod memory;
pub mod rbd;
pub mod wan;

use anyhow::Result;

use crate::lab::{AgentRun, Lab};
use crate::proc::Usage;
use crate::report::{Sample, ScenarioResult, Side};

pub struct Ctx<'a> {
    pub lab: &'a Lab,
    pub quick: bool,
    pub runs: usize,
}

impl Ctx<'_> {
    /// Runs per tool: one untimed warm-up (first touches of page cache and guest memory are
    /// much slower on VMs) followed by `runs` measured ones; --quick measures once, no warm-up.
    pub fn repeat(&self, mut f: impl FnMut(bool) -> Result<()>) -> Result<()> {
        if !self.quick {
            f(false)?;
        }
        for _ in 0..self.runs {
            f(true)?;
        }
        Ok(())
    }
}

pub const ALL: &[&str] =
    &["lan", "wan", "rbd", "incremental", "memory", "compression", "continuous", "cutover", "estate"];

pub fn run(name: &str, ctx: &Ctx) -> Result<ScenarioResult> {
    match name {
        "lan" => lan::run(ctx),
        "wan" => wan::run(ctx),
        "rbd" => rbd::run(ctx),
        "incremental" => incremental::run(ctx),
        "memory" => memory::run(ctx),
        "compression" => compression::run(ctx),
        "continuous" => continuous::run(ctx),
        "cutover" => cutover::run(ctx),
        "estate" => estate::run(ctx),
        other => anyhow::bail!("unknown scenario {other:?} (known: {})", ALL.join(", ")),
    }
}

pub fn side(name: &str, u: &Usage) -> Side {
    Side { name: name.into(), cpu_s: u.cpu_s, max_rss_kib: u.max_rss_kib }
}

/// A sample from an agent run and the sink that served it.
pub fn blockship_sample(run: &AgentRun, sink: &Usage, disk_bytes: u64) -> Sample {
    Sample {
        wall_s: run.usage.wall_s,
        disk_bytes,
        wire_bytes: run.summary["bytes_sent"].as_u64(),
        sides: vec![side("agent", &run.usage), side("sink", sink)],
    }
}

/// One fresh-target Blockship sync of `source` into `target` with a fresh sink.
pub fn fresh_sync(
    ctx: &Ctx,
    source: &str,
    target: &str,
    disk_bytes: u64,
    extra: &[&str],
) -> Result<(Sample, AgentRun)> {
    fresh_sync_on(ctx, None, source, target, disk_bytes, extra)
}

/// `fresh_sync`, with `cpus` = (agent's CPU, sink's CPU) pinning each side to its own core.
pub fn fresh_sync_on(
    ctx: &Ctx,
    cpus: Option<(usize, usize)>,
    source: &str,
    target: &str,
    disk_bytes: u64,
    extra: &[&str],
) -> Result<(Sample, AgentRun)> {
    let sink = match cpus {
        Some((_, cpu)) => ctx.lab.sink_on_cpu(cpu, &[])?,
        None => ctx.lab.sink(&[])?,
    };
    let mut cmd = ctx.lab.sync_command("bench", &sink.addr, source, target, extra);
    if let Some((cpu, _)) = cpus {
        crate::proc::pin(&mut cmd, cpu);
    }
    let run = ctx.lab.run_agent(&mut cmd)?;
    let usage = sink.server.stop()?;
    if let Some(rel) = target.strip_prefix("file:") {
        if std::path::Path::new(source).is_file() {
            crate::lab::check_copy(&ctx.lab.target_path(rel), std::path::Path::new(source))?;
        }
    }
    Ok((blockship_sample(&run, &usage, disk_bytes), run))
}

/// Ratios between scenarios of one run, added once both are there (`wan` against `lan`).
pub fn cross_ratios(results: &mut [ScenarioResult]) {
    let Some(lan) = results.iter().find(|r| r.name == "lan" && r.skipped.is_none()).cloned() else { return };
    if let Some(w) = results.iter_mut().find(|r| r.name == "wan" && r.skipped.is_none()) {
        if !w.ratios.iter().any(|r| r.name.contains("/ lan's")) {
            wan::against_lan(w, &lan);
        }
    }
}
