//! `compression`: the same `mixed` image with `--compression none`, `zstd` and `auto`, on
//! loopback where the CPU is the bottleneck, and across the `wan` scenario's rate-limited link
//! (a veth pair into a network namespace, `tc tbf`) where the link is.

use anyhow::Result;

use super::{fresh_sync, wan, Ctx};
use crate::image::Profile;
use crate::netns::Link;
use crate::report::{Ratio, Row, ScenarioResult};

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    let size: u64 = if ctx.quick { 256 << 20 } else { 2 << 30 };
    let src = ctx.lab.image(Profile::Mixed, size, 41)?;
    let src_s = src.to_string_lossy().to_string();
    let mut result = ScenarioResult::new(
        "compression",
        "none vs zstd vs auto, CPU-bound (loopback) and link-bound",
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

    let link = match Link::new(wan::RATE_MBIT) {
        Ok(l) => l,
        Err(e) => {
            result.notes.push(format!("link-bound rows skipped: no network namespace ({e})"));
            return Ok(result);
        }
    };
    // A smaller image: the link moves ~60 MB/s.
    let wan_size: u64 = if ctx.quick { 64 << 20 } else { 512 << 20 };
    let wan_src = ctx.lab.image(Profile::Mixed, wan_size, 42)?.to_string_lossy().to_string();
    let path = wan::Path { link: &link, impaired: false };
    for mode in ["none", "zstd", "auto"] {
        let mut row = Row::new(format!("blockship --compression {mode}, {} Mbit/s link", wan::RATE_MBIT));
        ctx.repeat(|measured| {
            let s = path.sync(ctx, "quic", &wan_src, wan_size, &["--compression", mode])?;
            if measured {
                row.samples.push(s);
            }
            Ok(())
        })?;
        result.rows.push(row);
    }
    let l = |m: &str| format!("blockship --compression {m}, {} Mbit/s link", wan::RATE_MBIT);
    if let Some(r) = result.speed_ratio(&l("auto"), &l("none")) {
        result.ratios.push(Ratio::at_least("auto / none, link-bound (wan)", r, 1.8));
    }
    if let Some(r) = result.speed_ratio(&l("zstd"), &l("none")) {
        result.ratios.push(Ratio::info("zstd / none, link-bound (wan)", r));
    }
    result.notes.push(format!(
        "Link-bound rows: a {} MiB `mixed` image across the `wan` scenario's {} Mbit/s link.",
        wan_size >> 20,
        wan::RATE_MBIT
    ));
    Ok(result)
}
