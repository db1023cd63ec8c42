//! `incremental`: an 8 GiB `mixed` image synced in full, then 1 % and then 10 % of it changed
//! (scattered extents of 64 KiB to 1 MiB) and replicated from a DiskChangeInfo change list: time
//! and bytes of each incremental epoch against the full sync. The same again with a sink that
//! keeps no undo journal (`--no-file-rollback`), to show what the file targets' rollback costs.

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Result;

use super::{blockship_sample, Ctx};
use crate::image::{Profile, Rng};
use crate::report::{Ratio, Row, ScenarioResult};

/// Change about `fraction` of `size` bytes of `path` in scattered extents; write the matching
/// DiskChangeInfo to `list`. Returns the bytes changed.
pub fn change(path: &Path, list: &Path, size: u64, fraction: f64, seed: u64) -> Result<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut rng = Rng::new(seed);
    let goal = (size as f64 * fraction) as u64;
    let mut areas = Vec::new();
    let mut changed = 0;
    let mut buf = vec![0u8; 1 << 20];
    while changed < goal {
        let len = (1 + rng.next_u64() % 16) * 65536;
        let off = (rng.next_u64() % ((size - len) / 65536)) * 65536;
        rng.fill(&mut buf[..len as usize]);
        f.write_all_at(&buf[..len as usize], off)?;
        areas.push(serde_json::json!({"start": off, "length": len}));
        changed += len;
    }
    f.sync_all()?;
    let doc = serde_json::json!({"startOffset": 0, "length": size, "changedArea": areas});
    std::fs::write(list, doc.to_string())?;
    Ok(changed)
}

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    let size: u64 = if ctx.quick { 1 << 30 } else { 8 << 30 };
    let base = ctx.lab.image(Profile::Mixed, size, 61)?;
    let src = ctx.lab.dir.join("incremental-src.img");
    let list = ctx.lab.dir.join("changes.json");
    let src_s = src.to_string_lossy().to_string();
    let mut result = ScenarioResult::new(
        "incremental",
        "1 % and 10 % changed vs full sync",
        format!("{} GiB `mixed` image: a full sync into a new file target, then 1 % changed and replicated from a DiskChangeInfo list, then another 10 %.", size >> 30),
    );
    let mut full = Row::new("full sync");
    let mut one = Row::new("incremental 1 %");
    let mut ten = Row::new("incremental 10 %");
    let mut one_bare = Row::new("incremental 1 %, no undo journal");
    let mut ten_bare = Row::new("incremental 10 %, no undo journal");
    let list_s = list.to_string_lossy().to_string();
    ctx.repeat(|measured| {
        for (journal, rows) in [(true, [&mut one, &mut ten]), (false, [&mut one_bare, &mut ten_bare])] {
            std::fs::copy(&base, &src)?;
            let sink = ctx.lab.sink(if journal { &[] } else { &["--no-file-rollback"] })?;
            let f = ctx.lab.sync(&sink.addr, &src_s, "file:inc.img", &[])?;
            change(&src, &list, size, 0.01, 7)?;
            let a = ctx.lab.sync(&sink.addr, &src_s, "file:inc.img", &["--changed-areas", &list_s])?;
            change(&src, &list, size, 0.10, 8)?;
            let b = ctx.lab.sync(&sink.addr, &src_s, "file:inc.img", &["--changed-areas", &list_s])?;
            let usage = sink.server.stop()?;
            crate::lab::check_copy(&ctx.lab.target_path("inc.img"), &src)?;
            if measured {
                // The sink served all three epochs; its CPU is attributed to the full sync.
                if journal {
                    full.samples.push(blockship_sample(&f, &usage, size));
                }
                let [r1, r10] = rows;
                for (row, run) in [(r1, &a), (r10, &b)] {
                    let mut s = blockship_sample(run, &usage, size);
                    s.sides.truncate(1);
                    row.samples.push(s);
                }
            }
        }
        Ok(())
    })?;
    let _ = std::fs::remove_file(&src);
    result.ratios.push(Ratio::at_most(
        "incremental 1 % time / full time",
        one.median_wall() / full.median_wall(),
        0.03,
    ));
    result
        .ratios
        .push(Ratio::info("incremental 10 % time / full time", ten.median_wall() / full.median_wall()));
    if let (Some(w1), Some(wf)) = (one.median_wire(), full.median_wire()) {
        result.ratios.push(Ratio::info("incremental 1 % wire bytes / full wire bytes", w1 / wf));
    }
    result.ratios.push(Ratio::info(
        "incremental 10 % time with / without the undo journal",
        ten.median_wall() / ten_bare.median_wall(),
    ));
    result.rows = vec![full, one, ten, one_bare, ten_bare];
    result
        .notes
        .push("MB/s counts the whole disk for every row (disk covered per second of replication).".into());
    Ok(result)
}
