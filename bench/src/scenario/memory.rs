//! `memory`: peak RSS of agent and sink replicating a 1 GiB image and a 1 TiB sparse image
//! (fresh target, then a compare-mode epoch over the whole disk): memory must not grow with the
//! disk.

use anyhow::Result;

use super::{blockship_sample, Ctx};
use crate::image::Profile;
use crate::report::{Ratio, Row, ScenarioResult};

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    let small: u64 = 1 << 30;
    let big: u64 = if ctx.quick { 64 << 30 } else { 1 << 40 };
    let mut result = ScenarioResult::new(
        "memory",
        "peak RSS, 1 GiB vs 1 TiB sparse",
        format!(
            "A 1 GiB `mixed` image and a {} GiB `sparse` image (one 4 MiB text region every 4 GiB); each run is a full sync into a new file target followed by a compare-mode epoch over the whole disk, with one sink serving both.",
            big >> 30
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
