//! `blockship-sink`: serve agents (`serve`), roll targets back, clone a group for a test
//! failover, show what the state dir knows (`status`), and create a lab PKI (`pki init`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use blockship_sink::auth::Authorizer;
use blockship_sink::config::{CephSettings, ServeSettings};
use blockship_sink::limits::Admission;
use blockship_sink::server::{Server, SinkContext};
use blockship_sink::target::rbd::Ceph;
use blockship_sink::target::TargetRoots;

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
        /// The sink's state dir.
        #[arg(long)]
        state_dir: PathBuf,
        #[command(flatten)]
        ceph: CephSettings,
    },
    /// The groups this sink's state dir knows, their members and test-failover clones.
    Status {
        /// The sink's state dir.
        #[arg(long)]
        state_dir: PathBuf,
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
        Cmd::Rollback { target, group, state_dir, file_root, ceph } => {
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
        Cmd::TestFailover { group, prefix, cleanup, state_dir, ceph } => {
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
        Cmd::Status { state_dir, json } => {
            let groups = blockship_sink::group::all_registered(&state_dir);
            let clones = blockship_sink::failover::all(&state_dir);
            if json {
                let v: Vec<serde_json::Value> = groups
                    .iter()
                    .map(|g| {
                        let c = clones.iter().find(|c| c.group == g.name);
                        serde_json::json!({ "group": g.name, "members": g.members, "test_failover": c })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&v)?);
            } else {
                for g in &groups {
                    println!("{}: {}", g.name, g.members.join(" "));
                    if let Some(c) = clones.iter().find(|c| c.group == g.name) {
                        let list: Vec<&str> = c.clones.iter().map(|(_, c)| c.as_str()).collect();
                        println!("  test failover of epoch {}: {}", c.epoch, list.join(" "));
                    }
                }
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
            let ctx = SinkContext {
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
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(32)
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async move {
                if let Some(addr) = r.metrics_listen {
                    blockship_transport::metrics::serve(addr).map_err(anyhow::Error::msg)?;
                }
                let server = Server::bind(r.listen, &r.tls, &r.tuning, ctx)?;
                let addr = server.local_addr()?;
                // Scripts and tests read this line to learn the port when listening on :0.
                println!("listening on {addr}");
                tracing::info!(%addr, "sink ready");
                tokio::select! {
                    _ = server.run() => {}
                    _ = shutdown_signal() => tracing::info!("shutting down"),
                }
                Ok(())
            })
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
