//! `blockship-sink`: serve agents (`serve`), roll targets back, clone a group for a test
//! failover, show what the state dir knows (`status`), and create a lab PKI (`pki init`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use blockship_sink::auth::Authorizer;
use blockship_sink::config::{CephSettings, ServeSettings};
use blockship_sink::limits::Admission;
use blockship_sink::server::{Server, SinkContext};
use blockship_sink::targets::rbd::Ceph;
use blockship_sink::targets::TargetRoots;

#[derive(Parser)]
#[command(
    name = "blockship-sink",
    version,
    about = "Blockship sink: receives verified chunks and writes them durably"
)]
struct Cli {
    /// Log lines as human text or as JSON objects (one per line, for log pipelines).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept agents and write their disks into targets.
    Serve {
        /// TOML file with the same settings as the flags (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<ServeSettings>,
    },
    /// Roll a target back to its last committed epoch, dropping an unfinished epoch: an RBD
    /// image to its blockship-<epoch> snapshot, a file through its undo journal. Stop any sink
    /// writing the target first.
    Rollback {
        /// The target, e.g. rbd:volumes/volume-1234 or file:esx01/vm1-disk0.
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        target: Option<String>,
        /// Every member of group AGENT/GROUP (as the agent's config names it), to the group's
        /// committed epoch; needs --state-dir.
        #[arg(long)]
        group: Option<String>,
        /// The sink's state dir (file targets: required; rbd: its hash index is dropped too).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
        /// The sink's file root (file targets).
        #[arg(long)]
        file_root: Option<PathBuf>,
        #[command(flatten)]
        ceph: CephSettings,
    },
    /// Clone a group's latest committed epoch into new RBD images (PREFIX<image>) for an
    /// isolated boot test while replication goes on; --cleanup removes them.
    TestFailover {
        /// The group, AGENT/GROUP (as `status` lists it).
        #[arg(long)]
        group: String,
        /// Prefix of the clones' image names (same pool as each member).
        #[arg(long, required_unless_present = "cleanup")]
        prefix: Option<String>,
        /// Remove the group's test-failover clones.
        #[arg(long)]
        cleanup: bool,
        /// The sink's state dir (or ask a running sink: --sink).
        #[arg(long, required_unless_present = "sink")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        ceph: CephSettings,
    },
    /// Targets, groups (committed epoch, RPO, cut over, test-failover clones) and, from a
    /// running sink (--sink), its sessions (agent, transport, throughput, in-flight bytes).
    Status {
        /// Read this state dir directly instead of asking a running sink.
        #[arg(long, required_unless_present = "sink", conflicts_with = "sink")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Lab certificate authority helpers.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
}

/// A running sink's control API (gRPC, mutual TLS, an identity the sink names with --admin).
#[derive(clap::Args)]
struct Remote {
    /// The sink's gRPC address (HOST:PORT; by default the same as its --listen).
    #[arg(long)]
    sink: Option<String>,
    /// PKI directory: use its ca.pem and agents/NAME.pem/key (NAME from --as).
    #[arg(long)]
    pki: Option<PathBuf>,
    /// The admin identity whose certificate to use from --pki.
    #[arg(long = "as", value_name = "NAME", default_value = "admin")]
    as_name: String,
    /// CA certificate, certificate and key (instead of --pki).
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    /// Check the sink's certificate against this name (default: the host of --sink).
    #[arg(long)]
    server_name: Option<String>,
}

impl Remote {
    fn files(&self) -> Result<blockship_transport::TlsFiles> {
        match (&self.pki, &self.ca, &self.cert, &self.key) {
            (Some(pki), None, None, None) => {
                Ok(blockship_transport::TlsFiles::agent_in_pki(pki, &self.as_name))
            }
            (None, Some(ca), Some(cert), Some(key)) => {
                Ok(blockship_transport::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() })
            }
            _ => bail!(
                "the control API needs mutual TLS: give --pki DIR [--as NAME], or --ca, --cert and --key"
            ),
        }
    }

    /// A client of the sink's control API, or None without --sink.
    async fn client(
        &self,
    ) -> Result<Option<blockship_sink::control::SinkControlClient<tonic::transport::Channel>>> {
        let Some(sink) = &self.sink else { return Ok(None) };
        let tls = blockship_transport::tls::client_config(&self.files()?)?;
        let tuning = blockship_transport::grpc::GrpcTuning::from_quic(&Default::default());
        let tls = blockship_transport::tcp_tls::channel(tls, sink, self.server_name.as_deref(), &tuning)
            .await
            .with_context(|| format!("cannot reach the sink's control API at {sink}"))?;
        Ok(Some(blockship_sink::control::SinkControlClient::new(tls.channel)))
    }
}

/// A control API refusal, said plainly.
fn api(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("the sink refused: {} ({:?})", s.message(), s.code())
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create (or extend) a PKI: ca.pem/key, sink.pem/key, agents/NAME.pem/key.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Agent certificate to create (its CN is the agent identity). Repeatable.
        #[arg(long = "agent", value_name = "NAME")]
        agents: Vec<String>,
        /// Extra DNS name or IP for the sink certificate (localhost, 127.0.0.1, ::1 and the
        /// host name are always included). Repeatable.
        #[arg(long = "sink-name", value_name = "NAME")]
        sink_names: Vec<String>,
        /// Replace existing certificates (and the CA).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = blockship_transport::logs::init(&cli.log_format, "info") {
        eprintln!("blockship-sink: error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    blockship_transport::heap::keep_chunk_buffers();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockship-sink: error: {}", blockship_transport::error_text(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    blockship_sink::failpoint::setup().map_err(anyhow::Error::msg)?;
    match cli.cmd {
        Cmd::Pki { cmd: PkiCmd::Init { dir, agents, sink_names, force } } => {
            let report = blockship_sink::pki::init(&dir, &agents, &sink_names, force)?;
            if report.reused_ca {
                println!("reused CA {}", dir.join("ca.pem").display());
            }
            for p in report.written {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        Cmd::Rollback { target, group, state_dir, file_root, ceph, remote } if remote.sink.is_some() => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let _ = (state_dir, file_root, ceph);
            runtime.block_on(async {
                let mut c = remote.client().await?.context("--sink is required")?;
                let req = blockship_sink::control::pb::RollbackRequest {
                    target: target.unwrap_or_default(),
                    group: group.unwrap_or_default(),
                };
                println!("{}", c.rollback(req).await.map_err(api)?.into_inner().message);
                Ok(())
            })
        }
        Cmd::Rollback { target, group, state_dir, file_root, ceph, .. } => {
            // Ceph is needed for rbd targets (and may be for a group's members).
            let ceph = match (&target, ceph.resolve()) {
                (Some(t), r) if t.starts_with("rbd:") => {
                    Some(r?.context("rolling back an rbd target needs rbd support (drop --no-rbd)")?)
                }
                (Some(_), _) => None,
                (None, r) => r?,
            };
            let roots = TargetRoots { file_root, ceph: ceph.map(|c| std::sync::Arc::new(Ceph::new(c))) };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let msg = runtime.block_on(async {
                match (&target, &group) {
                    (Some(t), _) => blockship_sink::rollback::rollback(&roots, state_dir.as_deref(), t).await,
                    (None, Some(g)) => {
                        let dir = state_dir.as_deref().context("--group needs the sink's --state-dir")?;
                        blockship_sink::rollback::rollback_group(&roots, dir, g).await
                    }
                    (None, None) => unreachable!("clap requires --target or --group"),
                }
            })?;
            println!("{msg}");
            Ok(())
        }
        Cmd::TestFailover { group, prefix, cleanup, state_dir: None, remote, .. } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut c = remote.client().await?.context("give --sink or --state-dir")?;
                let req = blockship_sink::control::pb::TestFailoverRequest {
                    group,
                    prefix: prefix.unwrap_or_default(),
                    cleanup,
                };
                println!("{}", c.test_failover(req).await.map_err(api)?.into_inner().message);
                Ok(())
            })
        }
        Cmd::TestFailover { group, prefix, cleanup, state_dir: Some(state_dir), ceph, .. } => {
            let ceph = ceph.resolve()?.context("test failover needs rbd support (drop --no-rbd)")?;
            let roots = TargetRoots { file_root: None, ceph: Some(std::sync::Arc::new(Ceph::new(ceph))) };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let msg = runtime.block_on(async {
                match (cleanup, prefix) {
                    (true, _) => blockship_sink::failover::cleanup(&roots, &state_dir, &group).await,
                    (false, Some(p)) => {
                        blockship_sink::failover::create(&roots, &state_dir, &group, &p).await
                    }
                    (false, None) => unreachable!("clap requires --prefix without --cleanup"),
                }
            })?;
            println!("{msg}");
            Ok(())
        }
        Cmd::Status { state_dir, json, remote } => {
            let reply = match state_dir {
                Some(dir) => blockship_sink::control::status(&dir, None),
                None => {
                    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
                    runtime.block_on(async {
                        let mut c = remote.client().await?.context("give --sink or --state-dir")?;
                        let r = c.status(blockship_sink::control::pb::StatusRequest {}).await.map_err(api)?;
                        Ok::<_, anyhow::Error>(r.into_inner())
                    })?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                print!("{}", blockship_sink::control::table(&reply));
            }
            Ok(())
        }
        Cmd::Serve { config, settings } => {
            let file = match &config {
                Some(path) => ServeSettings::from_file(path)?,
                None => ServeSettings::default(),
            };
            let r = (*settings).over(file).resolve()?;
            if let Some(root) = &r.file_root {
                if !root.is_dir() {
                    bail!("file root {} is not a directory (create it, or fix --file-root)", root.display());
                }
            }
            std::fs::create_dir_all(&r.state_dir)
                .with_context(|| format!("creating state dir {}", r.state_dir.display()))?;
            let ctx = std::sync::Arc::new(SinkContext {
                roots: TargetRoots {
                    file_root: r.file_root.clone(),
                    ceph: r.ceph.clone().map(|o| std::sync::Arc::new(Ceph::new(o))),
                },
                state_root: r.state_dir.clone(),
                auth: Authorizer::parse(&r.allow)?,
                leases: Default::default(),
                checkpoint: r.checkpoint,
                admission: Admission::new(r.limits.clone()),
                file_rollback: r.file_rollback,
                roster: Default::default(),
                joins: Default::default(),
            });
            // Every connection, target and Ceph socket costs a descriptor; the usual soft limit
            // (1024) is below what the sink's own caps allow together.
            if let Err(e) = blockship_sink::limits::raise_fd_limit() {
                tracing::warn!("{e}; many agents may exhaust it");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(32)
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async move {
                if let Some(addr) = r.metrics_listen {
                    blockship_transport::metrics::serve(addr).map_err(anyhow::Error::msg)?;
                    // Series without labels exist from the start (a rate over a missing series is
                    // no rate): touched at zero.
                    metrics::counter!("blockship_sink_checksum_failures_total").increment(0);
                    metrics::gauge!("blockship_sink_sessions").increment(0.0);
                    metrics::gauge!("blockship_sink_in_flight_bytes").increment(0.0);
                    for transport in ["quic", "grpc"] {
                        metrics::counter!("blockship_sink_handshakes_refused_total", "transport" => transport)
                            .increment(0);
                    }
                }
                let routes = blockship_sink::control::routes(ctx.clone(), r.admins.clone());
                let server = Server::bind(r.listen, r.grpc_listen, &r.tls, &r.tuning, ctx, routes)?;
                let addr = server.local_addr()?;
                let grpc = server.grpc_addr();
                // Scripts and tests read this one line to learn the port when listening on :0
                // (gRPC takes the same TCP port unless --grpc-listen moves it: see the log).
                // Exactly one line, and nothing later: readers may close the pipe after it.
                println!("listening on {addr}");
                tracing::info!(%addr, %grpc, "sink ready (QUIC on UDP, gRPC on TCP)");
                tokio::select! {
                    _ = server.run() => {}
                    _ = blockship_transport::shutdown::signal() => tracing::info!("shutting down"),
                }
                Ok(())
            })
        }
    }
}
