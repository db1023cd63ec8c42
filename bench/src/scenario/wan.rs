//! `wan`: agent → sink across a rate-limited link (veth between two network namespaces, `tc tbf`
//! on both ends), first as it is, then through a userspace relay adding 20 ms of round-trip time
//! and 0.1 % datagram loss. Blockship with incompressible (`random`) and `mixed` images against
//! `nbdcopy` and `qemu-img convert` reading a `qemu-nbd` export over the same link. Run together
//! with `lan`, each side's CPU per GiB is also set against `lan`'s on the same data.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use super::{blockship_sample, side, Ctx};
use crate::image::Profile;
use crate::lab::{free_port, Sink};
use crate::netns::Link;
use crate::proc::{self, Server};
use crate::report::{Ratio, Row, Sample, ScenarioResult};

pub const RATE_MBIT: u64 = 500;
const RTT_MS: u64 = 20;
const LOSS: f64 = 0.001;

/// Where the agent reaches the sink (and the NBD peers reach qemu-nbd).
pub struct Path<'a> {
    pub link: &'a Link,
    pub impaired: bool,
}

impl Path<'_> {
    fn label(&self) -> String {
        if self.impaired {
            format!("{} Mbit/s + {RTT_MS} ms RTT, {} % loss", self.link.rate_mbit, LOSS * 100.0)
        } else {
            format!("{} Mbit/s", self.link.rate_mbit)
        }
    }

    fn relay(&self, ctx: &Ctx, kind: &str, upstream: &str) -> Result<Server> {
        let mut cmd = self.link.inside(&ctx.lab.bins.bench);
        cmd.args(["relay", kind, "--listen", &format!("{}:0", self.link.ns_ip), "--upstream", upstream])
            .args([
                "--delay-ms",
                &(RTT_MS / 2).to_string(),
                "--loss",
                if kind == "udp" { "0.001" } else { "0" },
            ]);
        Server::start(&mut cmd, |l| l.starts_with("listening on "), Duration::from_secs(10))
    }

    /// Start a sink in the namespace; returns it, an optional relay (UDP for QUIC, TCP for
    /// gRPC), and the agent's address.
    pub fn sink(&self, ctx: &Ctx, transport: &str) -> Result<(Sink, Option<Server>, String)> {
        let listen = if self.impaired { "127.0.0.1:0".to_string() } else { format!("{}:0", self.link.ns_ip) };
        let sink = ctx.lab.sink_with(Some(self.link), &listen, &[])?;
        if !self.impaired {
            let addr = sink.addr.clone();
            return Ok((sink, None, addr));
        }
        let relay = self.relay(ctx, if transport == "grpc" { "tcp" } else { "udp" }, &sink.addr)?;
        let addr = relay.ready_line.trim_start_matches("listening on ").to_string();
        Ok((sink, Some(relay), addr))
    }

    /// One Blockship sync across the link over `transport`.
    pub fn sync(
        &self,
        ctx: &Ctx,
        transport: &str,
        source: &str,
        size: u64,
        extra: &[&str],
    ) -> Result<Sample> {
        let (sink, relay, addr) = self.sink(ctx, transport)?;
        let mut args = vec!["--server-name", "localhost", "--transport", transport];
        args.extend_from_slice(extra);
        let run = ctx.lab.sync(&addr, source, "file:wan.img", &args)?;
        let usage = sink.server.stop()?;
        drop(relay);
        crate::lab::check_copy(&ctx.lab.target_path("wan.img"), std::path::Path::new(source))?;
        Ok(blockship_sample(&run, &usage, size))
    }

    /// An NBD peer copying `image` over the link into a local file.
    fn peer(&self, ctx: &Ctx, image: &str, tool: &str, size: u64) -> Result<Sample> {
        let port = free_port()?;
        let qemu_nbd = ctx.lab.bins.peer("qemu-nbd")?;
        let bind = if self.impaired { "127.0.0.1".to_string() } else { self.link.ns_ip.clone() };
        let mut cmd = self.link.inside(&qemu_nbd);
        cmd.args([
            "-t",
            "-r",
            "-f",
            "raw",
            "-x",
            "img",
            "--shared",
            "32",
            "--bind",
            &bind,
            "--port",
            &port.to_string(),
            image,
        ]);
        let nbd = Server::start_detached(&mut cmd)?;
        std::thread::sleep(Duration::from_millis(300));
        let relay =
            if self.impaired { Some(self.relay(ctx, "tcp", &format!("127.0.0.1:{port}"))?) } else { None };
        let addr = match &relay {
            Some(r) => r.ready_line.trim_start_matches("listening on ").to_string(),
            None => format!("{bind}:{port}"),
        };
        let uri = format!("nbd://{addr}/img");
        let out = ctx.lab.dir.join("wan-peer.img");
        let _ = std::fs::remove_file(&out);
        let f = if tool == "nbdcopy" {
            proc::run_ok(Command::new(ctx.lab.bins.peer("nbdcopy")?).arg(&uri).arg(&out))?
        } else {
            proc::run_ok(
                Command::new(ctx.lab.bins.peer("qemu-img")?)
                    .args(["convert", "-f", "raw", "-O", "raw", &uri])
                    .arg(&out),
            )?
        };
        drop(relay);
        let srv = nbd.stop()?;
        crate::lab::check_copy(&out, std::path::Path::new(image))?;
        let _ = std::fs::remove_file(&out);
        Ok(Sample {
            wall_s: f.usage.wall_s,
            disk_bytes: size,
            wire_bytes: None,
            sides: vec![side(tool, &f.usage), side("qemu-nbd", &srv)],
        })
    }
}

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    let title = "agent → sink across a rate-limited link";
    let link = match Link::new(RATE_MBIT) {
        Ok(l) => l,
        Err(e) => return Ok(ScenarioResult::skipped("wan", title, format!("no network namespace: {e}"))),
    };
    let size: u64 = if ctx.quick { 64 << 20 } else { 512 << 20 };
    let random = ctx.lab.image(Profile::Random, size, 71)?.to_string_lossy().to_string();
    let mixed = ctx.lab.image(Profile::Mixed, size, 72)?.to_string_lossy().to_string();
    let mut result = ScenarioResult::new(
        "wan",
        title,
        format!(
            "{} MiB images; a veth pair into a network namespace shaped with `tc tbf` to {RATE_MBIT} Mbit/s each way; the impaired path adds a userspace relay ({RTT_MS} ms RTT, {} % UDP datagram loss; the TCP relay of the NBD peers adds the delay only).",
            size >> 20,
            LOSS * 100.0
        ),
    );
    for impaired in [false, true] {
        let path = Path { link: &link, impaired };
        let label = path.label();
        for (transport, profile, image) in
            [("quic", "random", &random), ("quic", "mixed", &mixed), ("grpc", "random", &random)]
        {
            let name = match transport {
                "quic" => format!("blockship {profile}, {label}"),
                _ => format!("blockship grpc {profile}, {label}"),
            };
            let mut row = Row::new(name.clone());
            ctx.repeat(|measured| {
                let s = path.sync(ctx, transport, image, size, &[])?;
                if measured {
                    row.samples.push(s);
                }
                Ok(())
            })?;
            if profile == "random" {
                if let Some(w) = row.median_wire() {
                    let util = w / row.median_wall() / link.bytes_per_s();
                    result.ratios.push(Ratio::at_least(format!("link utilisation, {name}"), util, 0.9));
                }
            }
            result.rows.push(row);
        }
        for tool in ["nbdcopy", "qemu-img convert"] {
            let mut row = Row::new(format!("{tool} mixed, {label}"));
            ctx.repeat(|measured| {
                let s =
                    path.peer(ctx, &mixed, if tool == "nbdcopy" { "nbdcopy" } else { "qemu-img" }, size)?;
                if measured {
                    row.samples.push(s);
                }
                Ok(())
            })?;
            result.rows.push(row);
        }
        for tool in ["nbdcopy", "qemu-img convert"] {
            if let Some(r) =
                result.speed_ratio(&format!("blockship mixed, {label}"), &format!("{tool} mixed, {label}"))
            {
                result.ratios.push(Ratio::at_least(format!("blockship / {tool}, mixed, {label}"), r, 2.0));
            }
        }
    }
    result.notes.push("Run with `lan` (e.g. `all`, or `lan,wan`), each side's CPU per GiB of the `random` rows is also set against the same side's figure for `random` data over the same transport on loopback in `lan` (target ≤ 1.5 ×: a byte waiting for the link should not cost much more than a fast one).".into());
    result.notes.push("Link utilisation = payload bytes on the wire / (link rate × time); QUIC (or HTTP/2), TLS and UDP (TCP) headers come on top.".into());
    result.notes.push("`grpc` rows run the same agent with `--transport grpc` (TCP); on the impaired path their relay is the TCP relay, which adds the delay but drops nothing (loss of TCP segments would need the kernel's netem, which a userspace relay cannot apply to one TCP connection).".into());
    Ok(result)
}

/// Issue target: a byte waiting for the link costs at most 1.5 × a fast one. With the same
/// run's `lan` result at hand, each side's CPU per GiB of every `random` row here (both paths,
/// both transports) against that side's figure for the same `random` data over the same
/// transport on loopback (`lan::RANDOM_QUIC`, `lan::RANDOM_GRPC`).
pub fn against_lan(wan: &mut ScenarioResult, lan: &ScenarioResult) {
    let mut ratios = Vec::new();
    for row in &wan.rows {
        let Some(rest) = row.tool.strip_prefix("blockship ") else { continue };
        let (lan_row, rest) = match rest.strip_prefix("grpc ") {
            Some(r) => (super::lan::RANDOM_GRPC, r),
            None => (super::lan::RANDOM_QUIC, rest),
        };
        if !rest.starts_with("random") {
            continue;
        }
        let Some(reference) = lan.row(lan_row) else { continue };
        for side in ["agent", "sink"] {
            let (here, there) = (row.cpu_per_wire_gib(side), reference.cpu_per_wire_gib(side));
            if here.is_finite() && there.is_finite() && there > 0.0 {
                ratios.push(Ratio::at_most(
                    format!("{side} CPU per GiB / lan's ({lan_row}), {}", row.tool),
                    here / there,
                    1.5,
                ));
            }
        }
    }
    wan.ratios.extend(ratios);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Side;

    fn row(tool: &str, agent_cpu: f64, sink_cpu: f64) -> Row {
        let mut r = Row::new(tool);
        r.samples.push(Sample {
            wall_s: 1.0,
            disk_bytes: 2 << 30,
            wire_bytes: Some(1 << 30),
            sides: vec![
                Side { name: "agent".into(), cpu_s: agent_cpu, max_rss_kib: 0 },
                Side { name: "sink".into(), cpu_s: sink_cpu, max_rss_kib: 0 },
            ],
        });
        r
    }

    #[test]
    fn wan_cpu_is_set_against_the_same_transports_lan_figure() {
        let mut lan = ScenarioResult::new("lan", "", "");
        lan.rows = vec![
            row("blockship", 9.0, 9.0),
            row("blockship random", 1.0, 2.0),
            row("blockship grpc random", 2.0, 2.0),
        ];
        let mut wan = ScenarioResult::new("wan", "", "");
        wan.rows = vec![
            row("blockship random, 500 Mbit/s", 3.0, 3.0),
            row("blockship mixed, 500 Mbit/s", 9.0, 9.0),
            row("blockship grpc random, 500 Mbit/s", 2.0, 5.0),
            row("nbdcopy mixed, 500 Mbit/s", 1.0, 1.0),
        ];
        against_lan(&mut wan, &lan);
        let got: Vec<(String, f64, Option<bool>)> =
            wan.ratios.iter().map(|r| (r.name.clone(), r.value, r.met())).collect();
        assert_eq!(
            got,
            vec![
                (
                    "agent CPU per GiB / lan's (blockship random), blockship random, 500 Mbit/s".into(),
                    3.0,
                    Some(false)
                ),
                (
                    "sink CPU per GiB / lan's (blockship random), blockship random, 500 Mbit/s".into(),
                    1.5,
                    Some(true)
                ),
                (
                    "agent CPU per GiB / lan's (blockship grpc random), blockship grpc random, 500 Mbit/s"
                        .into(),
                    1.0,
                    Some(true)
                ),
                (
                    "sink CPU per GiB / lan's (blockship grpc random), blockship grpc random, 500 Mbit/s"
                        .into(),
                    2.5,
                    Some(false)
                ),
            ]
        );
    }
}
