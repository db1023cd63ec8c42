//! `memory`: peak RSS of agent and sink replicating a 1 GiB image and a 1 TiB sparse image
//! (fresh target, then a compare-mode epoch over the whole disk): memory must not grow with the
//! disk. Then 64 agents syncing at once into one sink: its memory must stay within its
//! in-flight budget, not grow with the number of agents.

use anyhow::Result;

use super::{blockship_sample, Ctx};
use crate::image::Profile;
use crate::report::{Ratio, Row, ScenarioResult};

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    let small: u64 = 1 << 30;
    let big: u64 = if ctx.quick { 64 << 30 } else { 1 << 40 };
    let mut result = ScenarioResult::new(
        "memory",
        "peak RSS, 1 GiB vs 1 TiB sparse, 64 agents at once",
        format!(
            "A 1 GiB `mixed` image and a {} GiB `sparse` image (one 4 MiB text region every 4 GiB); each run is a full sync into a new file target followed by a compare-mode epoch over the whole disk, with one sink serving both. Then {} agents (distinct identities) sync a {} MiB `mixed` image each into one sink at the same time.",
            big >> 30,
            crate::lab::FLEET,
            if ctx.quick { 64 } else { 256 }
        ),
    );
    for (label, profile, size) in [
        ("1 GiB mixed", Profile::Mixed, small),
        (if ctx.quick { "64 GiB sparse" } else { "1 TiB sparse" }, Profile::Sparse, big),
    ] {
        let src = ctx.lab.image(profile, size, 51)?;
        let src_s = src.to_string_lossy().to_string();
        let mut row = Row::new(label);
        ctx.repeat(|measured| {
            let sink = ctx.lab.sink(&[])?;
            let first = ctx.lab.sync(&sink.addr, &src_s, "file:mem.img", &[])?;
            let second = ctx.lab.sync(&sink.addr, &src_s, "file:mem.img", &[])?;
            let usage = sink.server.stop()?;
            if measured {
                // Agent: the larger of its two runs; sink: its whole life.
                let worst =
                    if first.usage.max_rss_kib >= second.usage.max_rss_kib { &first } else { &second };
                let mut s = blockship_sample(worst, &usage, size);
                s.wall_s = first.usage.wall_s + second.usage.wall_s;
                row.samples.push(s);
            }
            Ok(())
        })?;
        result.rows.push(row);
    }
    // 64 agents at once, each with its own target, all reading one source image.
    let agents = crate::lab::FLEET;
    let each: u64 = if ctx.quick { 64 << 20 } else { 256 << 20 };
    let src = ctx.lab.image(Profile::Mixed, each, 52)?;
    let src_s = src.to_string_lossy().to_string();
    let mut row = Row::new(format!("{agents} agents at once, {} MiB each", each >> 20));
    ctx.repeat(|measured| {
        let sink = ctx.lab.sink(&[])?;
        let started = std::time::Instant::now();
        let runs: Vec<Result<crate::lab::AgentRun>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..agents)
                .map(|i| {
                    let (addr, src) = (&sink.addr, &src_s);
                    let name = crate::lab::fleet_agent(i);
                    s.spawn(move || ctx.lab.sync_as(&name, addr, src, &format!("file:many/{i}.img"), &[]))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| anyhow::bail!("agent thread panicked")))
                .collect()
        });
        let wall = started.elapsed().as_secs_f64();
        let usage = sink.server.stop()?;
        let runs = runs.into_iter().collect::<Result<Vec<_>>>()?;
        for i in [0, agents - 1] {
            crate::lab::check_copy(&ctx.lab.target_path(&format!("many/{i}.img")), &src)?;
        }
        if measured {
            let worst = runs.iter().max_by_key(|r| r.usage.max_rss_kib).expect("64 runs");
            let mut s = blockship_sample(worst, &usage, each * agents as u64);
            s.wall_s = wall;
            row.samples.push(s);
        }
        Ok(())
    })?;
    result.rows.push(row);
    let rows = result.rows.clone();
    let (a, b) = (&rows[0], &rows[1]);
    result.ratios.push(Ratio::at_most(
        format!("agent peak RSS MiB, {}", b.tool),
        b.peak_rss_mib("agent"),
        128.0,
    ));
    result.ratios.push(Ratio::at_most(
        format!("sink peak RSS MiB, {}", b.tool),
        b.peak_rss_mib("sink"),
        256.0,
    ));
    let many = &rows[2];
    result.ratios.push(Ratio::at_most(
        format!("sink peak RSS MiB, {}", many.tool),
        many.peak_rss_mib("sink"),
        256.0,
    ));
    result
        .ratios
        .push(Ratio::info("agent RSS big / small disk", b.peak_rss_mib("agent") / a.peak_rss_mib("agent")));
    result
        .ratios
        .push(Ratio::info("sink RSS big / small disk", b.peak_rss_mib("sink") / a.peak_rss_mib("sink")));
    result
        .notes
        .push("MB/s in this table is meaningless (two epochs per run); the scenario is about memory.".into());
    Ok(result)
}
