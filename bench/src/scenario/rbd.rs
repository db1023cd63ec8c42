//! `rbd`: a disk image into a Ceph RBD image on the test cluster — Blockship (agent → sink →
//! librbd) against `qemu-img convert -O raw SRC rbd:POOL/IMG` and `rbd import`, same image, same
//! cluster, same client credentials.

use std::process::Command;

use anyhow::Result;

use super::{fresh_sync, side, Ctx};
use crate::image::Profile;
use crate::proc;
use crate::report::{Ratio, Row, Sample, ScenarioResult};

const TITLE: &str = "disk image into Ceph RBD";

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    let Some(ceph) = ctx.lab.ceph.clone() else {
        return Ok(ScenarioResult::skipped(
            "rbd",
            TITLE,
            "no Ceph cluster (source the env printed by scripts/ceph-up.sh)",
        ));
    };
    let size = if ctx.quick { 256 << 20 } else { 1 << 30 };
    let src = ctx.lab.image(Profile::Mixed, size, 21)?;
    let src_s = src.to_string_lossy().to_string();
    let qemu = ctx.lab.bins.peer("qemu-img-rbd")?;
    let mut result = ScenarioResult::new(
        "rbd",
        TITLE,
        format!("{} MiB `mixed` image (zeros, text, random) from the page cache into pool `rbd` of the one-OSD test cluster on this machine; every run writes a new image.", size >> 20),
    );
    let (id, keyring) =
        (std::env::var("BLOCKSHIP_CEPH_ID").ok(), std::env::var("BLOCKSHIP_CEPH_KEYRING").ok());
    let mut qemu_spec = format!("rbd:rbd/bench-qemu:conf={}", ceph.conf);
    let mut rbd_auth: Vec<String> = Vec::new();
    if let (Some(id), Some(k)) = (&id, &keyring) {
        qemu_spec.push_str(&format!(":id={id}:keyring={k}"));
        rbd_auth = vec!["--id".into(), id.clone(), "--keyring".into(), k.clone()];
    }

    let mut ours = Row::new("blockship");
    ctx.repeat(|measured| {
        ceph.remove("rbd/bench-bs");
        let (sample, _) = fresh_sync(ctx, &src_s, "rbd:rbd/bench-bs", size, &[])?;
        if measured {
            ours.samples.push(sample);
        }
        Ok(())
    })?;
    // The image must hold the source: a broken fast path must not look fast.
    let check = ctx.lab.dir.join("rbd-check.img");
    proc::run_ok(&mut ceph.rbd(&["export", "--no-progress", "rbd/bench-bs", &check.to_string_lossy()]))?;
    let same = crate::image::same_contents(&check, &src)?;
    std::fs::remove_file(&check)?;
    anyhow::ensure!(same, "rbd export of Blockship's image differs from the source");
    ceph.remove("rbd/bench-bs");

    let mut q = Row::new("qemu-img convert");
    ctx.repeat(|measured| {
        ceph.remove("rbd/bench-qemu");
        let f = proc::run_ok(
            Command::new(&qemu).args(["convert", "-f", "raw", "-O", "raw", &src_s, &qemu_spec]),
        )?;
        if measured {
            q.samples.push(Sample {
                wall_s: f.usage.wall_s,
                disk_bytes: size,
                wire_bytes: None,
                sides: vec![side("qemu-img", &f.usage)],
            });
        }
        Ok(())
    })?;
    ceph.remove("rbd/bench-qemu");

    let mut imp = Row::new("rbd import");
    ctx.repeat(|measured| {
        ceph.remove("rbd/bench-import");
        let mut args: Vec<&str> = rbd_auth.iter().map(String::as_str).collect();
        args.extend(["import", "--no-progress", &src_s, "rbd/bench-import"]);
        let f = proc::run_ok(&mut ceph.rbd(&args))?;
        if measured {
            imp.samples.push(Sample {
                wall_s: f.usage.wall_s,
                disk_bytes: size,
                wire_bytes: None,
                sides: vec![side("rbd", &f.usage)],
            });
        }
        Ok(())
    })?;
    ceph.remove("rbd/bench-import");

    result.rows = vec![ours, q, imp];
    if let Some(r) = result.speed_ratio("blockship", "qemu-img convert") {
        result.ratios.push(Ratio::at_least("blockship / qemu-img convert", r, 1.2));
    }
    if let Some(r) = result.speed_ratio("blockship", "rbd import") {
        result.ratios.push(Ratio::at_least("blockship / rbd import", r, 0.9));
    }
    result.notes.push("Blockship's time covers the whole agent run: connect, mTLS, BLAKE3 + zstd per chunk, QUIC, librbd writes, flush, snapshot and the durable commit.".into());
    Ok(result)
}
