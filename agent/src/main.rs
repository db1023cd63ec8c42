//! `blockship-agent`: `sync` a disk to a sink (one epoch per run), `verify` a replica, `run` the
//! daemon that keeps groups of disks replicated, and talk to a running daemon (`status`,
//! `pause`, `resume`, `sync-now`, `cutover`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use blockship_agent::config::AgentSettings;
use blockship_agent::daemon::pb::{CutoverRequest, GroupRequest, ListGroupsRequest};
use blockship_agent::sync::{changes_from_flags, sync, SyncRequest};
use blockship_agent::verify::verify;

#[derive(Parser)]
#[command(name = "blockship-agent", version, about = "Blockship agent: replicate disks to a Blockship sink")]
struct Cli {
    /// Log lines as human text or as JSON objects (one per line, for log pipelines).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Common {
    /// TOML file with the same settings as the flags (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: AgentSettings,
    /// Source disk: an image file or block device, nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH, rbd:POOL[/NAMESPACE]/IMAGE, or vmware://VCENTER.
    #[arg(long)]
    source: String,
    /// Target on the sink, e.g. file:vm1/disk0.
    #[arg(long)]
    target: String,
    /// Print one JSON object instead of a human line.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replicate the source into the target: one epoch, durable when this exits 0.
    Sync {
        #[command(flatten)]
        common: Common,
        /// How changed extents are found: auto, full, compare, cbt-file:FILE, nbd-bitmap:NAME,
        /// vmware or rbd-snap (default auto).
        #[arg(long)]
        changes: Option<String>,
        /// VMware DiskChangeInfo JSON: send only these changed areas (= --changes cbt-file:FILE).
        #[arg(long, value_name = "FILE")]
        changed_areas: Option<PathBuf>,
        /// Change point to record with this epoch where the source does not define one (e.g. the
        /// dirty bitmap that started when the source was frozen).
        #[arg(long)]
        change_point: Option<String>,
        /// Identity of the source disk recorded with the replica (default: file:CANONICAL_PATH).
        #[arg(long)]
        disk_id: Option<String>,
        /// Never show a progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Replicate into a target that was cut over (the sink refuses otherwise): the cutover
        /// is abandoned and the target overwritten from the source.
        #[arg(long)]
        force_resume: bool,
    },
    /// Measure a link and both sides' CPU with generated data (like iperf3): the sink verifies
    /// every chunk and discards it (`null:` targets, where an --allow rule names them) or writes
    /// it into the --target given; reports throughput, RTT, loss, CPU per stage and the bottleneck.
    Bench {
        /// TOML file with the same settings as the flags (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: AgentSettings,
        /// Size of the generated disk; one epoch sends all of it (default 2GiB, or 1GiB per
        /// epoch with --duration).
        #[arg(long)]
        size: Option<String>,
        /// Repeat epochs until this long has passed (e.g. 30s).
        #[arg(long)]
        duration: Option<String>,
        /// Generated data: zero, text (compresses ~3:1), random or mixed.
        #[arg(long, default_value = "mixed")]
        profile: String,
        /// Target on the sink: null:NAME (verified, discarded) or a real one, e.g. rbd:POOL/IMAGE.
        #[arg(long, default_value = "null:bench")]
        target: String,
        /// Print one JSON object instead of the report.
        #[arg(long)]
        json: bool,
        /// Never show a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Compare source and target chunk by chunk (the sink hashes the target's data). Exit 0 iff equal.
    Verify {
        #[command(flatten)]
        common: Common,
    },
    /// Run the daemon: keep the groups of the config replicated, each at one point in time.
    Run {
        /// The daemon's TOML config ([agent], [daemon], [bandwidth], [[group]]; see README).
        #[arg(long)]
        config: PathBuf,
        /// Unix socket of the control service (default: [daemon] control_socket, else
        /// /run/blockship/agent.sock).
        #[arg(long)]
        control_socket: Option<PathBuf>,
        /// Serve Prometheus metrics at this address (default: [daemon] metrics_listen; none).
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Override [agent] settings.
        #[command(flatten)]
        settings: AgentSettings,
    },
    /// Show what every group of the running daemon does (RPO, last cycle, next cycle, errors).
    Status {
        #[command(flatten)]
        control: ControlArgs,
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Stop starting cycles of a group (a running cycle finishes).
    Pause {
        #[command(flatten)]
        control: ControlArgs,
        group: String,
    },
    /// Start cycles of a paused group again.
    Resume {
        #[command(flatten)]
        control: ControlArgs,
        group: String,
    },
    /// Start a cycle of a group now.
    SyncNow {
        #[command(flatten)]
        control: ControlArgs,
        group: String,
    },
    /// Cut a group over to its replicas: stop the source, one final cycle, the sink finalises
    /// the targets (no more replication into them); prints the downtime, phase by phase.
    Cutover {
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        group: String,
        /// Command that stops the source (default: QMP `stop` for qemu groups, guest shutdown
        /// then power off for vmware groups; file groups need none).
        #[arg(long, value_name = "CMD")]
        pre_freeze: Option<String>,
        /// Command run once the targets are cut over (e.g. create the VM on the replicas).
        #[arg(long, value_name = "CMD")]
        post_cutover: Option<String>,
        /// Command that restarts the source when the cutover is aborted (default: QMP `cont`,
        /// vCenter power on).
        #[arg(long, value_name = "CMD")]
        on_abort: Option<String>,
        /// Longest a hook or a VMware guest shutdown may take.
        #[arg(long, default_value = "5m")]
        hook_timeout: String,
        /// Stop a cutover that has not reached its final commit (or finish one that crashed):
        /// the source is restarted and replication goes on.
        #[arg(long)]
        abort: bool,
        /// Print JSON instead of the phase table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ControlArgs {
    /// The daemon's control socket.
    #[arg(long, default_value = "/run/blockship/agent.sock")]
    control_socket: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = blockship_transport::logs::init(&cli.log_format, "warn") {
        eprintln!("blockship-agent: error: {e}");
        return ExitCode::FAILURE;
    }
    blockship_transport::heap::keep_chunk_buffers();
    if let Err(e) = blockship_agent::failpoint::setup() {
        eprintln!("blockship-agent: error: {e}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("blockship-agent: error: {}", blockship_transport::error_text(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn settings(common: &Common) -> Result<blockship_agent::config::Resolved> {
    let file = match &common.config {
        Some(p) => AgentSettings::from_file(p)?,
        None => AgentSettings::default(),
    };
    common.settings.clone().over(file).resolve()
}

/// A control service refusal, in the operator's terms.
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

fn run(cli: Cli) -> Result<ExitCode> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(32).build()?;
    let command = match &cli.cmd {
        Cmd::Pause { .. } => "pause",
        Cmd::Resume { .. } => "resume",
        _ => "sync-now",
    };
    match cli.cmd {
        Cmd::Sync { common, changes, changed_areas, change_point, disk_id, no_progress, force_resume } => {
            let cfg = settings(&common)?;
            let req = SyncRequest {
                source: common.source.clone(),
                target: common.target.clone(),
                changes: changes_from_flags(changes.as_deref(), changed_areas)?,
                change_point,
                disk_id,
                progress: !no_progress && !common.json,
                source_opts: cfg.source_options(&common.source)?,
                force_resume,
                bench: false,
            };
            let summary = runtime.block_on(sync(&cfg, &req))?;
            if common.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!("{}", summary.human());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { config, control_socket, metrics_listen, settings } => {
            let mut d = blockship_agent::daemon::config::DaemonFile::from_file(&config)?
                .resolve(settings, control_socket)?;
            d.metrics_listen = metrics_listen.or(d.metrics_listen);
            runtime.block_on(blockship_agent::daemon::run(d))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { control, group, json } => {
            runtime.block_on(async {
                let mut c = blockship_agent::daemon::control::connect(&control.control_socket).await?;
                let groups = match group {
                    Some(name) => {
                        let r = c.group_status(GroupRequest { name }).await.map_err(status_error)?;
                        r.into_inner().group.into_iter().collect()
                    }
                    None => {
                        c.list_groups(ListGroupsRequest {}).await.map_err(status_error)?.into_inner().groups
                    }
                };
                if json {
                    println!("{}", serde_json::to_string(&groups)?);
                } else {
                    print!("{}", blockship_agent::daemon::status::table(&groups));
                }
                Ok::<_, anyhow::Error>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pause { control, group } | Cmd::Resume { control, group } | Cmd::SyncNow { control, group } => {
            runtime.block_on(async {
                let mut c = blockship_agent::daemon::control::connect(&control.control_socket).await?;
                let req = GroupRequest { name: group };
                let r = match command {
                    "pause" => c.pause(req).await,
                    "resume" => c.resume(req).await,
                    _ => c.sync_now(req).await,
                }
                .map_err(status_error)?;
                if let Some(g) = r.into_inner().group {
                    print!("{}", blockship_agent::daemon::status::table(&[g]));
                }
                Ok::<_, anyhow::Error>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cutover { control, group, pre_freeze, post_cutover, on_abort, hook_timeout, abort, json } => {
            let timeout = humantime::parse_duration(&hook_timeout)
                .map_err(|e| anyhow::anyhow!("--hook-timeout {hook_timeout:?}: {e}"))?;
            let req = CutoverRequest {
                name: group,
                pre_freeze: pre_freeze.unwrap_or_default(),
                post_cutover: post_cutover.unwrap_or_default(),
                on_abort: on_abort.unwrap_or_default(),
                hook_timeout_ms: timeout.as_millis() as u64,
                abort,
            };
            let reply = runtime.block_on(async {
                let mut c = blockship_agent::daemon::control::connect(&control.control_socket).await?;
                Ok::<_, anyhow::Error>(c.cutover(req).await.map_err(status_error)?.into_inner())
            })?;
            if json {
                println!("{}", serde_json::to_string(&reply)?);
            } else {
                print!("{}", blockship_agent::daemon::cutover::table(&reply));
            }
            Ok(if reply.post_cutover_failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Cmd::Bench { config, settings, size, duration, profile, target, json, no_progress } => {
            let file = match &config {
                Some(p) => AgentSettings::from_file(p)?,
                None => AgentSettings::default(),
            };
            let cfg = settings.over(file).resolve()?;
            let duration = duration
                .map(|d| humantime::parse_duration(&d).map_err(|e| anyhow::anyhow!("--duration {d:?}: {e}")))
                .transpose()?;
            let default_size = if duration.is_some() { "1GiB" } else { "2GiB" };
            let size = blockship_agent::config::parse_bytes(size.as_deref().unwrap_or(default_size))
                .map_err(|e| anyhow::anyhow!("--size {e}"))?;
            let req = blockship_agent::bench::BenchRequest {
                profile: profile.parse().map_err(|e: String| anyhow::anyhow!("--profile: {e}"))?,
                profile_name: profile,
                size,
                duration,
                target,
                progress: !no_progress && !json,
            };
            let report = runtime.block_on(blockship_agent::bench::bench(&cfg, &req))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.human());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify { common } => {
            let cfg = settings(&common)?;
            let opts = cfg.source_options(&common.source)?;
            let summary = runtime.block_on(verify(&cfg, &common.source, &common.target, &opts))?;
            if common.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!("{}", summary.human());
            }
            Ok(if summary.equal { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
