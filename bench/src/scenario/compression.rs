//! `compression`: the same `mixed` image with `--compression none`, `zstd` and `auto`, on
//! loopback where the CPU is the bottleneck.

use anyhow::Result;

use super::{fresh_sync, Ctx};
use crate::image::Profile;
use crate::report::{Ratio, Row, ScenarioResult};

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    let size: u64 = if ctx.quick { 256 << 20 } else { 2 << 30 };
    let src = ctx.lab.image(Profile::Mixed, size, 41)?;
    let src_s = src.to_string_lossy().to_string();
    let mut result = ScenarioResult::new(
        "compression",
        "none vs zstd vs auto, CPU-bound (loopback)",
        format!("{} MiB `mixed` image, agent → sink on loopback, file target.", size >> 20),
    );
    for mode in ["none", "zstd", "auto"] {
        let mut row = Row::new(format!("blockship --compression {mode}"));
        ctx.repeat(|measured| {
            let (sample, _) = fresh_sync(ctx, &src_s, "file:comp.img", size, &["--compression", mode])?;
            if measured {
                row.samples.push(sample);
            }
            Ok(())
        })?;
        result.rows.push(row);
    }
    if let Some(r) = result.speed_ratio("blockship --compression auto", "blockship --compression none") {
        result.ratios.push(Ratio::at_least("auto / none, CPU-bound (lan)", r, 0.95));
    }
    if let Some(r) = result.speed_ratio("blockship --compression zstd", "blockship --compression none") {
        result.ratios.push(Ratio::info("zstd / none, CPU-bound (lan)", r));
    }
    Ok(result)
}
