//! `lan`: a 4 GiB `mixed` image agent → sink on loopback into a file target over QUIC and over
//! gRPC, against each transport's ceiling (bare quinn and bare tonic with the same settings) and
//! against `nbdcopy` and `qemu-img convert` copying the same image from a `qemu-nbd` TCP export
//! into a local file.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use super::{fresh_sync, side, Ctx};
use crate::image::Profile;
use crate::lab::{free_port, wait_tcp};
use crate::proc::{self, Server};
use crate::report::{Ratio, Row, Sample, ScenarioResult};

/// A read-only `qemu-nbd` TCP export of `image` on 127.0.0.1 (like a hypervisor's NBD server).
pub struct NbdExport {
    pub server: Server,
    pub uri: String,
}

pub fn export(ctx: &Ctx, image: &str) -> Result<NbdExport> {
    let qemu_nbd = ctx.lab.bins.peer("qemu-nbd")?;
    let port = free_port()?;
    let server = Server::start_detached(
        Command::new(qemu_nbd)
            .args(["-t", "-r", "-f", "raw", "-x", "img", "--shared", "32", "--bind", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg(image),
    )?;
    wait_tcp(port, Duration::from_secs(10))?;
    Ok(NbdExport { server, uri: format!("nbd://127.0.0.1:{port}/img") })
}

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    let size: u64 = if ctx.quick { 512 << 20 } else { 4 << 30 };
    let src = ctx.lab.image(Profile::Mixed, size, 31)?;
    let src_s = src.to_string_lossy().to_string();
    let mut result = ScenarioResult::new(
        "lan",
        "agent → sink on loopback, file target",
        format!(
            "{} MiB `mixed` image (30 % zero holes, 40 % text, 30 % random) in the page cache; agent and sink share the machine's cores. Peers copy the same image from a `qemu-nbd` TCP export on 127.0.0.1 into a local file.",
            size >> 20
        ),
    );

    let mut ours = Row::new("blockship");
    ctx.repeat(|measured| {
        let (sample, _) = fresh_sync(ctx, &src_s, "file:lan.img", size, &[])?;
        if measured {
            ours.samples.push(sample);
        }
        Ok(())
    })?;

    // The same over gRPC (TCP): the sink serves both at one address.
    let mut grpc = Row::new("blockship grpc");
    ctx.repeat(|measured| {
        let (sample, _) = fresh_sync(ctx, &src_s, "file:lan-grpc.img", size, &["--transport", "grpc"])?;
        if measured {
            grpc.samples.push(sample);
        }
        Ok(())
    })?;

    // Each transport's ceiling, moving as many bytes as Blockship put on the wire over it.
    let bare = bare_peer(ctx, "bare quinn", "quic-peer", ours.median_wire().unwrap_or(size as f64) as u64)?;
    let bare_tonic =
        bare_peer(ctx, "bare tonic", "grpc-peer", grpc.median_wire().unwrap_or(size as f64) as u64)?;

    // The same agent reading the same qemu-nbd export the NBD peers read.
    let mut via_nbd = Row::new("blockship (nbd source)");
    ctx.repeat(|measured| {
        let nbd = export(ctx, &src_s)?;
        let (mut sample, _) = fresh_sync(ctx, &nbd.uri, "file:lan-nbd.img", size, &[])?;
        let srv = nbd.server.stop()?;
        crate::lab::check_copy(&ctx.lab.target_path("lan-nbd.img"), &src)?;
        if measured {
            sample.sides.push(side("qemu-nbd", &srv));
            via_nbd.samples.push(sample);
        }
        Ok(())
    })?;

    let out = ctx.lab.dir.join("peer-copy.img");
    let nbdcopy = ctx.lab.bins.peer("nbdcopy")?;
    let qemu_img = ctx.lab.bins.peer("qemu-img")?;
    let mut nc = Row::new("nbdcopy");
    let mut qi = Row::new("qemu-img convert");
    for (row, is_nbdcopy) in [(&mut nc, true), (&mut qi, false)] {
        ctx.repeat(|measured| {
            let _ = std::fs::remove_file(&out);
            let nbd = export(ctx, &src_s)?;
            let mut cmd = if is_nbdcopy {
                let mut c = Command::new(&nbdcopy);
                c.arg(&nbd.uri).arg(&out);
                c
            } else {
                let mut c = Command::new(&qemu_img);
                c.args(["convert", "-f", "raw", "-O", "raw", &nbd.uri]).arg(&out);
                c
            };
            let f = proc::run_ok(&mut cmd)?;
            let srv = nbd.server.stop()?;
            crate::lab::check_copy(&out, &src)?;
            if measured {
                row.samples.push(Sample {
                    wall_s: f.usage.wall_s,
                    disk_bytes: size,
                    wire_bytes: None,
                    sides: vec![
                        side(if is_nbdcopy { "nbdcopy" } else { "qemu-img" }, &f.usage),
                        side("qemu-nbd", &srv),
                    ],
                });
            }
            Ok(())
        })?;
    }
    let _ = std::fs::remove_file(&out);

    result.rows = vec![ours, grpc, via_nbd, bare, bare_tonic, nc, qi];
    // Same bytes on the wire: the share of each transport's ceiling Blockship reaches.
    for (ours, bare, min) in [("blockship", "bare quinn", 0.8), ("blockship grpc", "bare tonic", 0.9)] {
        if let (Some(o), Some(b)) = (result.row(ours), result.row(bare)) {
            let r = b.median_wall() / o.median_wall();
            result.ratios.push(Ratio::at_least(format!("{ours} / {bare} (same wire bytes, time)"), r, min));
        }
    }
    if let Some(r) = result.speed_ratio("blockship grpc", "blockship") {
        result.ratios.push(Ratio::info("blockship grpc / blockship quic", r));
    }
    if let Some(r) = result.speed_ratio("blockship", "nbdcopy") {
        result.ratios.push(Ratio::at_least("blockship / nbdcopy", r, 1.0));
    }
    if let Some(r) = result.speed_ratio("blockship", "qemu-img convert") {
        result.ratios.push(Ratio::at_least("blockship / qemu-img convert", r, 2.0));
    }
    if let Some(r) = result.speed_ratio("blockship (nbd source)", "nbdcopy") {
        result.ratios.push(Ratio::info("blockship reading the qemu-nbd export / nbdcopy", r));
    }
    result.notes.push("`bare quinn` and `bare tonic` move as many bytes as Blockship put on the wire over QUIC and over gRPC (after zero skipping and compression) with the same transport settings (TLS, windows, message limits; `bare tonic` sends the same `WireFrame` messages through tonic's `Data` call); their ratios compare times for the same wire bytes.".into());
    Ok(result)
}

/// A bare bulk transfer of `wire` bytes through `peer` (`quic-peer` or `grpc-peer` of this
/// binary), measured on both sides.
fn bare_peer(ctx: &Ctx, name: &str, peer: &str, wire: u64) -> Result<Row> {
    let mut row = Row::new(name);
    ctx.repeat(|measured| {
        let pki = ctx.lab.dir.join("pki");
        let server = Server::start(
            Command::new(&ctx.lab.bins.bench)
                .args([peer, "serve", "--listen", "127.0.0.1:0", "--pki"])
                .arg(&pki),
            |l| l.starts_with("listening on "),
            Duration::from_secs(10),
        )?;
        let addr = server.ready_line.trim_start_matches("listening on ").to_string();
        let f = proc::run_ok(
            Command::new(&ctx.lab.bins.bench)
                .args([peer, "send", "--sink", &addr, "--bytes", &wire.to_string(), "--pki"])
                .arg(&pki),
        )?;
        let srv = server.stop()?;
        if measured {
            row.samples.push(Sample {
                wall_s: f.usage.wall_s,
                disk_bytes: wire,
                wire_bytes: Some(wire),
                sides: vec![side("sender", &f.usage), side("receiver", &srv)],
            });
        }
        Ok(())
    })?;
    Ok(row)
}
