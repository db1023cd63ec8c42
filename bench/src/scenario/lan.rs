//! `lan`: a 4 GiB `mixed` image agent → sink on loopback into a file target over QUIC and over
//! gRPC (and a 1 GiB `random` one over each, the reference of `wan`'s CPU per GiB), against
//! each transport's ceiling (bare quinn and bare tonic with the same settings),
//! against `nbdcopy` and `qemu-img convert` copying the same image from a `qemu-nbd` TCP export
//! into a local file, against `nbdcopy` over NBD with TLS (the same security as ours), and
//! against the floor (see `floor`): what reading, hashing, encrypting, moving and writing each
//! byte costs here. Blockship and plain `nbdcopy` are also run with their two processes pinned
//! to separate cores, as they would run on two hosts.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use super::{fresh_sync, fresh_sync_on, side, Ctx};
use crate::floor;
use crate::image::Profile;
use crate::nbd_export::{self, export, ExportOptions};
use crate::proc::{self, Server};
use crate::report::{Ratio, Row, Sample, ScenarioResult};

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

    // gRPC on one connection, as the bare tonic peer sends: the default (`--connections auto`)
    // opens at least two over gRPC, so this row shows what the second one adds.
    let mut grpc_one = Row::new(GRPC_ONE);
    ctx.repeat(|measured| {
        let extra = ["--transport", "grpc", "--connections", "1"];
        let (sample, _) = fresh_sync(ctx, &src_s, "file:lan-grpc.img", size, &extra)?;
        if measured {
            grpc_one.samples.push(sample);
        }
        Ok(())
    })?;

    // Incompressible data over each transport: the reference `wan` sets its `random` rows'
    // CPU against (a byte waiting for the link should cost little more than a fast one).
    let random_size = size.min(1 << 30);
    let random = ctx.lab.image(Profile::Random, random_size, 71)?.to_string_lossy().to_string();
    let mut randoms = Vec::new();
    for (name, extra) in [(RANDOM_QUIC, &[][..]), (RANDOM_GRPC, &["--transport", "grpc"][..])] {
        let mut row = Row::new(name);
        ctx.repeat(|measured| {
            let (sample, _) = fresh_sync(ctx, &random, "file:lan-random.img", random_size, extra)?;
            if measured {
                row.samples.push(sample);
            }
            Ok(())
        })?;
        randoms.push(row);
    }

    // Each transport's ceiling, moving as many bytes as Blockship put on the wire over it.
    let bare = bare_peer(ctx, "bare quinn", "quic-peer", ours.median_wire().unwrap_or(size as f64) as u64)?;
    let grpc_wire = grpc.median_wire().unwrap_or(size as f64) as u64;
    let bare_tonic = bare_peer(ctx, "bare tonic", "grpc-peer", grpc_wire)?;
    let bare_tls = bare_peer(ctx, "bare TLS over TCP", "tls-peer", grpc_wire)?;

    // The same agent reading the same qemu-nbd export the NBD peers read.
    let mut via_nbd = Row::new("blockship (nbd source)");
    ctx.repeat(|measured| {
        let nbd = export(&ctx.lab.bins, &src_s, ExportOptions::default())?;
        let (mut sample, _) = fresh_sync(ctx, &nbd.uri, "file:lan-nbd.img", size, &[])?;
        let srv = nbd.server.stop()?;
        crate::lab::check_copy(&ctx.lab.target_path("lan-nbd.img"), &src)?;
        if measured {
            sample.sides.push(side("qemu-nbd", &srv));
            via_nbd.samples.push(sample);
        }
        Ok(())
    })?;

    // Agent and sink pinned to separate cores, as on two hosts (each side's work in parallel).
    let cpus = proc::two_cpus();
    let mut pinned = Row::new("blockship pinned");
    if cpus.is_some() {
        ctx.repeat(|measured| {
            let (sample, _) = fresh_sync_on(ctx, cpus, &src_s, "file:lan-pinned.img", size, &[])?;
            if measured {
                pinned.samples.push(sample);
            }
            Ok(())
        })?;
    }

    let tls = nbd_export::tls_dir(&ctx.lab.dir.join("nbd-tls"))?;
    let plain = ExportOptions::default();
    let nc = nbd_peer(ctx, &src, "nbdcopy", Peer::Nbdcopy, plain, None)?;
    let nc_tls = nbd_peer(
        ctx,
        &src,
        "nbdcopy (NBD-TLS)",
        Peer::Nbdcopy,
        ExportOptions { tls: Some(&tls), cpu: None },
        None,
    )?;
    let nc_pinned = match cpus {
        Some((a, b)) => Some(nbd_peer(
            ctx,
            &src,
            "nbdcopy pinned",
            Peer::Nbdcopy,
            ExportOptions { tls: None, cpu: Some(b) },
            Some(a),
        )?),
        None => None,
    };
    let qi = nbd_peer(ctx, &src, "qemu-img convert", Peer::QemuImg, plain, None)?;

    // Measured after the runs, so the image is in the page cache as it was for them.
    let floor = floor::measure(&src, &ctx.lab.dir, size.min(1 << 30))?;

    result.rows = vec![ours, grpc, grpc_one, via_nbd, bare, bare_tonic, bare_tls, nc, nc_tls, qi];
    result.rows.extend(randoms);
    match nc_pinned {
        Some(nc_pinned) => result.rows.extend([pinned, nc_pinned]),
        None => {
            result.notes.push("Fewer than two CPUs may be used here: the pinned rows were not run.".into())
        }
    }
    // Same bytes on the wire: the share of each transport's ceiling Blockship reaches.
    for (ours, bare, min) in [("blockship", "bare quinn", 0.8), ("blockship grpc", "bare tonic", 0.9)] {
        if let (Some(o), Some(b)) = (result.row(ours), result.row(bare)) {
            let r = b.median_wall() / o.median_wall();
            result.ratios.push(Ratio::at_least(format!("{ours} / {bare} (same wire bytes, time)"), r, min));
        }
    }
    if let (Some(o), Some(b)) = (result.row(GRPC_ONE), result.row("bare tonic")) {
        let r = b.median_wall() / o.median_wall();
        result.ratios.push(Ratio::info(format!("{GRPC_ONE} / bare tonic (one connection each)"), r));
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
    if let Some(r) = result.speed_ratio("blockship", "nbdcopy (NBD-TLS)") {
        result.ratios.push(Ratio::at_least("blockship / nbdcopy over NBD-TLS (same security)", r, 1.5));
    }
    if let Some(r) = result.speed_ratio("blockship pinned", "nbdcopy pinned") {
        result.ratios.push(Ratio::at_least("blockship / nbdcopy, each side pinned to its own core", r, 0.8));
    }
    let per_wire: Vec<(&str, f64, f64)> = match result.row("blockship") {
        Some(row) => [("agent", floor.agent()), ("sink", floor.sink())]
            .into_iter()
            .map(|(side, floor)| (side, row.cpu_per_wire_gib(side), floor))
            .collect(),
        None => Vec::new(),
    };
    for (side, cpu, floor) in per_wire {
        result.ratios.push(Ratio::at_most(
            format!("{side} CPU-s per wire GiB / its floor"),
            cpu / floor,
            1.3,
        ));
    }
    result.notes.push(format!("{}.", floor.describe()));
    if let Some(r) = result.speed_ratio("blockship (nbd source)", "nbdcopy") {
        result.ratios.push(Ratio::info("blockship reading the qemu-nbd export / nbdcopy", r));
    }
    result.notes.push("`bare quinn` and `bare tonic` move as many bytes as Blockship put on the wire over QUIC and over gRPC (after zero skipping and compression) with the same transport settings (TLS, windows, message limits; `bare tonic` sends the same `WireFrame` messages through tonic's `Data` call); their ratios compare times for the same wire bytes. `bare TLS over TCP` moves gRPC's wire bytes through one rustls TLS 1.3 connection with the same certificates: the floor of any secure TCP tool. Blockship's rows use its default `--connections auto` (one per two cores; over gRPC at least 2) while the bare peers use one connection; `blockship grpc, 1 connection` is the like-for-like gRPC row.".into());
    result.notes.push("`nbdcopy (NBD-TLS)` reads a `qemu-nbd` export with x509 TLS that requires a client certificate (`nbds://`): the same security as Blockship's mutual TLS, without end-to-end checksums. The `pinned` rows run the two processes on separate cores (agent / `nbdcopy` on the first CPU this process may use, sink / `qemu-nbd` on the second), as two hosts would. The floor ratios divide each side's CPU per wire GiB by the floor's sum for that side (agent: read + BLAKE3 + seal + send; sink: receive + open + BLAKE3 + write).".into());
    Ok(result)
}

/// The rows of `random` data over each transport (what `wan::against_lan` pairs with).
pub const RANDOM_QUIC: &str = "blockship random";
pub const RANDOM_GRPC: &str = "blockship grpc random";
/// gRPC with `--connections 1` (the bare tonic peer's one connection).
pub const GRPC_ONE: &str = "blockship grpc, 1 connection";

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Nbdcopy,
    QemuImg,
}

/// `nbdcopy` or `qemu-img convert` copying `src` from a fresh `qemu-nbd` export into a local
/// file, checked, measured on both sides (the tool on `tool_cpu` if given).
fn nbd_peer(
    ctx: &Ctx,
    src: &Path,
    name: &str,
    peer: Peer,
    opts: ExportOptions,
    tool_cpu: Option<usize>,
) -> Result<Row> {
    let out = ctx.lab.dir.join("peer-copy.img");
    let tool = ctx.lab.bins.peer(if peer == Peer::Nbdcopy { "nbdcopy" } else { "qemu-img" })?;
    let size = std::fs::metadata(src)?.len();
    let mut row = Row::new(name);
    ctx.repeat(|measured| {
        let _ = std::fs::remove_file(&out);
        let nbd = export(&ctx.lab.bins, &src.to_string_lossy(), opts)?;
        let mut cmd = Command::new(&tool);
        match peer {
            Peer::Nbdcopy => cmd.arg(&nbd.uri).arg(&out),
            Peer::QemuImg => cmd.args(["convert", "-f", "raw", "-O", "raw", &nbd.uri]).arg(&out),
        };
        if let Some(cpu) = tool_cpu {
            proc::pin(&mut cmd, cpu);
        }
        let f = proc::run_ok(&mut cmd)?;
        let srv = nbd.server.stop()?;
        crate::lab::check_copy(&out, src)?;
        if measured {
            row.samples.push(Sample {
                wall_s: f.usage.wall_s,
                disk_bytes: size,
                wire_bytes: None,
                sides: vec![
                    side(if peer == Peer::Nbdcopy { "nbdcopy" } else { "qemu-img" }, &f.usage),
                    side("qemu-nbd", &srv),
                ],
            });
        }
        Ok(())
    })?;
    let _ = std::fs::remove_file(&out);
    Ok(row)
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
