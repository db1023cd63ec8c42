//! `blockship-bench`: run scenarios (`lan`, `wan`, `rbd`, `incremental`, `memory`, `compression`,
//! `continuous`, `cutover`, `estate`, several, or `all`), generate test images, serve as the bare
//! QUIC, gRPC and TLS peers and the impairment relay, and run the crash loop (`chaos`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use blockship_bench::image::{self, Profile};
use blockship_bench::lab::{Bins, Lab};
use blockship_bench::machine::Machine;
use blockship_bench::report::Report;
use blockship_bench::scenario::{self, Ctx};

#[derive(Parser)]
#[command(
    name = "blockship-bench",
    about = "Blockship benchmark harness: real binaries, peers in the same run"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Scenario to run (lan, wan, rbd, incremental, memory, compression, continuous, cutover, estate),
    /// several separated by commas (e.g. `lan,wan`), or `all`.
    scenario: Option<String>,
    /// Small sizes and one run per tool (a smoke test, < 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Output directory for results.md, results.json and charts.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Measured runs per tool (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where images and scratch files go (default: OUT/work).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Do not build the agent and sink first.
    #[arg(long)]
    no_build: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a deterministic test image.
    GenImage {
        /// mixed, random or sparse.
        #[arg(long, default_value = "mixed")]
        profile: Profile,
        /// Size, e.g. 1GiB.
        #[arg(long)]
        size: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        out: PathBuf,
    },
    /// Bare QUIC bulk transfer with Blockship's transport settings (the lan scenario's ceiling).
    QuicPeer {
        #[command(subcommand)]
        side: PeerSide,
    },
    /// Bare gRPC (tonic) bulk transfer with Blockship's gRPC settings (the grpc rows' ceiling).
    GrpcPeer {
        #[command(subcommand)]
        side: PeerSide,
    },
    /// Bare TLS 1.3 over one TCP connection with Blockship's TLS settings (the floor of any
    /// secure TCP transport; `--streams` is ignored).
    TlsPeer {
        #[command(subcommand)]
        side: PeerSide,
    },
    /// Render results.md and the charts again from a results.json (same directory).
    Report {
        /// The results.json of an earlier run.
        json: PathBuf,
    },
    /// Crash loop: a live writer on a 3-disk VM, its group replicated continuously into file
    /// targets, the sink and the agent SIGKILLed at seeded random moments; every committed group
    /// epoch must be one consistent cut of the writer's log and the end an exact copy.
    Chaos {
        /// Kills (sink or agent, drawn from the seed).
        #[arg(long, default_value_t = 100)]
        kills: usize,
        /// Seed of the kill moments and victims (the same seed replays the same schedule).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// quic or grpc.
        #[arg(long, default_value = "quic")]
        transport: String,
        /// Replicate into RBD images of the cluster scripts/ceph-up.sh started (its environment
        /// exported), and restart its OSD as a third kind of kill (needs root).
        #[arg(long)]
        rbd: bool,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Impairment relay: delay with jitter (and for UDP, drop and reorder) traffic between clients
    /// and an upstream.
    Relay {
        /// udp or tcp.
        kind: String,
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        upstream: std::net::SocketAddr,
        #[arg(long, default_value_t = 10)]
        delay_ms: u64,
        /// Probability of dropping a UDP datagram.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Random extra delay up to this, per datagram (UDP: they overtake one another) or per
        /// read (TCP: in order).
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
    },
}

#[derive(Subcommand)]
enum PeerSide {
    Serve {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        pki: PathBuf,
    },
    Send {
        #[arg(long)]
        sink: String,
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 4)]
        streams: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The bare peers run as subcommands of this binary: they get the daemons' heap thresholds so
    // that the comparison measures protocol overhead, not allocator settings.
    blockship_transport::heap::keep_chunk_buffers();
    match cli.cmd {
        Some(Cmd::GenImage { profile, size, seed, out }) => {
            let size = parse_size::Config::new()
                .with_binary()
                .parse_size(&size)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            image::generate(&out, size, profile, seed)?;
            let (z, t, r) = image::composition(profile, size);
            println!("wrote {} ({size} bytes: {z} zero, {t} text, {r} random)", out.display());
            Ok(())
        }
        Some(Cmd::QuicPeer { side }) => {
            let rt = tokio::runtime::Runtime::new()?;
            match side {
                PeerSide::Serve { listen, pki } => {
                    rt.block_on(blockship_bench::quic_peer::serve(listen, &pki))
                }
                PeerSide::Send { sink, pki, bytes, streams } => {
                    rt.block_on(blockship_bench::quic_peer::send(&sink, &pki, bytes, streams))
                }
            }
        }
        Some(Cmd::GrpcPeer { side }) => {
            let rt = tokio::runtime::Runtime::new()?;
            match side {
                PeerSide::Serve { listen, pki } => {
                    rt.block_on(blockship_bench::grpc_peer::serve(listen, &pki))
                }
                PeerSide::Send { sink, pki, bytes, streams } => {
                    rt.block_on(blockship_bench::grpc_peer::send(&sink, &pki, bytes, streams))
                }
            }
        }
        Some(Cmd::TlsPeer { side }) => {
            let rt = tokio::runtime::Runtime::new()?;
            match side {
                PeerSide::Serve { listen, pki } => {
                    rt.block_on(blockship_bench::tls_peer::serve(listen, &pki))
                }
                PeerSide::Send { sink, pki, bytes, .. } => {
                    rt.block_on(blockship_bench::tls_peer::send(&sink, &pki, bytes))
                }
            }
        }
        Some(Cmd::Report { json }) => {
            let report = blockship_bench::report::Report::load(&json)?;
            let out = json.parent().map(PathBuf::from).unwrap_or_default();
            report.write(&out)?;
            println!("wrote {}", out.join("results.md").display());
            Ok(())
        }
        Some(Cmd::Relay { kind, listen, upstream, delay_ms, loss, jitter_ms }) => {
            let imp = blockship_bench::relay::Impairment {
                delay: std::time::Duration::from_millis(delay_ms),
                loss,
                jitter: std::time::Duration::from_millis(jitter_ms),
            };
            let rt = tokio::runtime::Runtime::new()?;
            match kind.as_str() {
                "udp" => rt.block_on(blockship_bench::relay::udp(listen, upstream, imp)),
                "tcp" => rt.block_on(blockship_bench::relay::tcp(listen, upstream, imp)),
                other => anyhow::bail!("relay kind {other:?}: udp or tcp"),
            }
        }
        Some(Cmd::Chaos { kills, seed, transport, rbd, json }) => {
            let bins = Bins::prepare(!cli.no_build)?;
            let dir = cli.work.clone().unwrap_or_else(|| cli.out.join("chaos"));
            let opts = blockship_bench::chaos::Options { kills, seed, transport, dir, rbd };
            let out = blockship_bench::chaos::run(&bins, &opts)?;
            if json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!(
                    "chaos seed {}: {} sink and {} agent kills, {} OSD restarts, {} committed cuts checked, all consistent; final epoch {} equals the source after {} writes; {:.0} s",
                    out.seed, out.sink_kills, out.agent_kills, out.osd_restarts, out.cuts_checked, out.final_epoch, out.writes, out.seconds
                );
            }
            Ok(())
        }
        None => {
            let which = cli.scenario.context(
                "name a scenario (lan, wan, rbd, incremental, memory, compression, continuous, cutover, estate) or `all`",
            )?;
            let names: Vec<&str> = if which == "all" {
                scenario::ALL.to_vec()
            } else {
                which.split(',').map(str::trim).collect()
            };
            let bins = Bins::prepare(!cli.no_build)?;
            let work = cli.work.clone().unwrap_or_else(|| cli.out.join("work"));
            let lab = Lab::new(&work, bins)?;
            let runs = if cli.quick { 1 } else { cli.runs.max(1) };
            let ctx = Ctx { lab: &lab, quick: cli.quick, runs };
            let mut report = Report {
                date: date(),
                machine: Machine::detect(),
                quick: cli.quick,
                runs,
                scenarios: Vec::new(),
            };
            for name in names {
                eprintln!("== {name}");
                let started = std::time::Instant::now();
                let r = scenario::run(name, &ctx).with_context(|| format!("scenario {name}"))?;
                eprintln!("   {} in {:.0} s", name, started.elapsed().as_secs_f64());
                report.scenarios.push(r);
                scenario::cross_ratios(&mut report.scenarios);
                // Partial results survive a later failure.
                report.write(&cli.out)?;
            }
            print!("{}", report.markdown());
            eprintln!("wrote {}", cli.out.join("results.md").display());
            Ok(())
        }
    }
}

fn date() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}
