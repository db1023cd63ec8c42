//! The sink's control API (`SinkControl`, gRPC on the sink's TCP listener, mutual TLS): status of
//! targets, groups and live sessions, and the admin actions (rollback, test failover and its
//! cleanup). Only identities named by `--admin` may call it; agents are not admins unless named.
//! `status` is also computed offline from a state dir, so both views print the same table.

use std::path::Path;
use std::sync::Arc;

use blockship_transport::tcp_tls::PeerInfo;
use tonic::{Request, Response, Status};

use crate::roster::Roster;
use crate::server::SinkContext;

pub mod pb {
    tonic::include_proto!("blockship.sink.v1");
}
pub use pb::sink_control_client::SinkControlClient;
use pb::sink_control_server::{SinkControl, SinkControlServer};

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Targets, groups and (when serving) sessions known to the sink with state dir `state_root`.
pub fn status(state_root: &Path, roster: Option<&Roster>) -> pb::StatusReply {
    let states = crate::state::all(state_root);
    let targets: Vec<pb::TargetStatus> = states
        .iter()
        .map(|s| pb::TargetStatus {
            target: s.target.clone(),
            agent: s.agent.clone(),
            group: s.group.as_ref().map(|g| g.name.clone()).unwrap_or_default(),
            size: s.size,
            committed_epoch: s.committed_epoch,
            committed_at: s.committed_at,
            in_progress_epoch: s.in_progress.as_ref().map(|p| p.epoch).unwrap_or(0),
            cut_over_epoch: s.cut_over.as_ref().map(|c| c.epoch).unwrap_or(0),
        })
        .collect();
    let clones = crate::failover::all(state_root);
    let groups = crate::group::all_registered(state_root)
        .into_iter()
        .map(|g| {
            // A group's committed epoch is its members' least (a crash between two members'
            // records is rolled forward at the next open).
            let members: Vec<&pb::TargetStatus> =
                targets.iter().filter(|t| g.members.contains(&t.target)).collect();
            let c = clones.iter().find(|c| c.group == g.name);
            pb::GroupStatus {
                committed_epoch: members.iter().map(|t| t.committed_epoch).min().unwrap_or(0),
                committed_at: members.iter().map(|t| t.committed_at).min().unwrap_or(0),
                cut_over_epoch: members.iter().map(|t| t.cut_over_epoch).min().unwrap_or(0),
                test_failover_epoch: c.map(|c| c.epoch).unwrap_or(0),
                test_failover_clones: c
                    .map(|c| c.clones.iter().map(|(_, n)| n.clone()).collect())
                    .unwrap_or_default(),
                group: g.name,
                members: g.members,
            }
        })
        .collect();
    let sessions = roster
        .map(|r| {
            r.all()
                .iter()
                .map(|e| pb::SessionStatus {
                    id: e.id,
                    agent: e.agent.clone(),
                    transport: e.transport.clone(),
                    remote: e.remote.clone(),
                    connected_seconds: e.since.elapsed().as_secs_f64(),
                    bytes_received: e.received.load(std::sync::atomic::Ordering::Relaxed),
                    throughput: e.throughput(),
                    in_flight_bytes: e.budget.in_flight(),
                    targets: e.targets(),
                    connections: e.connections(),
                })
                .collect()
        })
        .unwrap_or_default();
    pb::StatusReply {
        software: format!("blockship-sink {}", env!("CARGO_PKG_VERSION")),
        targets,
        groups,
        sessions,
        now: unix_now(),
    }
}

fn ago(now: u64, at: u64) -> String {
    if at == 0 {
        "never".into()
    } else {
        format!("{}s ago", now.saturating_sub(at))
    }
}

/// The status as tables (what `blockship-sink status` prints).
pub fn table(s: &pb::StatusReply) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "TARGET                                    AGENT        EPOCH  COMMITTED     WRITING  CUT-OVER"
    );
    for t in &s.targets {
        let writing = if t.in_progress_epoch > 0 { t.in_progress_epoch.to_string() } else { "-".into() };
        let cut = if t.cut_over_epoch > 0 { t.cut_over_epoch.to_string() } else { "-".into() };
        let _ = writeln!(
            out,
            "{:<41} {:<12} {:>5}  {:<12}  {:>7}  {:>8}",
            t.target,
            t.agent,
            t.committed_epoch,
            ago(s.now, t.committed_at),
            writing,
            cut
        );
    }
    if !s.groups.is_empty() {
        let _ = writeln!(out, "\nGROUP                          EPOCH  RPO      CUT-OVER  MEMBERS");
        for g in &s.groups {
            let rpo = if g.committed_at == 0 {
                "-".into()
            } else {
                format!("{}s", s.now.saturating_sub(g.committed_at))
            };
            let cut = if g.cut_over_epoch > 0 { g.cut_over_epoch.to_string() } else { "-".into() };
            let _ = writeln!(
                out,
                "{:<30} {:>5}  {:<7}  {:>8}  {}",
                g.group,
                g.committed_epoch,
                rpo,
                cut,
                g.members.join(" ")
            );
            if !g.test_failover_clones.is_empty() {
                let _ = writeln!(
                    out,
                    "  test failover of epoch {}: {}",
                    g.test_failover_epoch,
                    g.test_failover_clones.join(" ")
                );
            }
        }
    }
    if !s.sessions.is_empty() {
        let _ = writeln!(out, "\nSESSION  AGENT        TRANSPORT  CONNS  REMOTE                 UP      RECEIVED    RATE/s      IN-FLIGHT  TARGETS");
        for x in &s.sessions {
            let _ = writeln!(
                out,
                "{:<8} {:<12} {:<10} {:>5}  {:<22} {:>5.0}s  {:>10}  {:>10}  {:>9}  {}",
                x.id % 100_000_000,
                x.agent,
                x.transport,
                x.connections,
                x.remote,
                x.connected_seconds,
                bytes(x.bytes_received as f64),
                bytes(x.throughput),
                bytes(x.in_flight_bytes as f64),
                x.targets.join(" ")
            );
        }
    }
    out
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (n, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

struct Service {
    ctx: Arc<SinkContext>,
    admins: Vec<String>,
}

impl Service {
    /// The caller's identity if it is an admin; everyone else is refused.
    fn admin<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let identity = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.clone().ok())
            .ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
        if !self.admins.iter().any(|a| a == &identity) {
            tracing::warn!(%identity, "control API call refused: not an admin");
            metrics::counter!("blockship_sink_refusals_total", "code" => "PERMISSION_DENIED").increment(1);
            return Err(Status::permission_denied(format!(
                "{identity:?} is not an admin of this sink (the sink's --admin names who may use its control API)"
            )));
        }
        Ok(identity)
    }
}

fn failed(e: anyhow::Error) -> Status {
    Status::failed_precondition(format!("{e:#}"))
}

#[tonic::async_trait]
impl SinkControl for Service {
    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        self.admin(&req)?;
        let ctx = self.ctx.clone();
        let reply = tokio::task::spawn_blocking(move || status(&ctx.state_root, Some(&ctx.roster)))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(reply))
    }

    async fn rollback(&self, req: Request<pb::RollbackRequest>) -> Result<Response<pb::ActionReply>, Status> {
        let who = self.admin(&req)?;
        let r = req.into_inner();
        let open: Vec<String> = self.ctx.roster.all().iter().flat_map(|e| e.targets()).collect();
        let ctx = &self.ctx;
        let message = match (r.target.is_empty(), r.group.is_empty()) {
            (false, true) => {
                if open.contains(&r.target) {
                    return Err(Status::failed_precondition(format!(
                        "{} is open in a session: stop its agent (or wait for the session to end) first",
                        r.target
                    )));
                }
                crate::rollback::rollback(&ctx.roots, Some(&ctx.state_root), &r.target)
                    .await
                    .map_err(failed)?
            }
            (true, false) => {
                let g = crate::group::registered(&ctx.state_root, &r.group).map_err(Status::not_found)?;
                if let Some(t) = g.members.iter().find(|m| open.contains(m)) {
                    return Err(Status::failed_precondition(format!(
                        "member {t} of {} is open in a session: stop its agent first",
                        r.group
                    )));
                }
                crate::rollback::rollback_group(&ctx.roots, &ctx.state_root, &r.group)
                    .await
                    .map_err(failed)?
            }
            _ => return Err(Status::invalid_argument("name either a target or a group")),
        };
        tracing::info!(admin = %who, "rollback: {message}");
        Ok(Response::new(pb::ActionReply { message }))
    }

    async fn test_failover(
        &self,
        req: Request<pb::TestFailoverRequest>,
    ) -> Result<Response<pb::ActionReply>, Status> {
        let who = self.admin(&req)?;
        let r = req.into_inner();
        let ctx = &self.ctx;
        let message = if r.cleanup {
            crate::failover::cleanup(&ctx.roots, &ctx.state_root, &r.group).await.map_err(failed)?
        } else {
            if r.prefix.is_empty() {
                return Err(Status::invalid_argument("a test failover needs a prefix for the clones"));
            }
            crate::failover::create(&ctx.roots, &ctx.state_root, &r.group, &r.prefix).await.map_err(failed)?
        };
        tracing::info!(admin = %who, "test failover: {message}");
        Ok(Response::new(pb::ActionReply { message }))
    }
}

/// The control API as routes for the sink's gRPC listener.
pub fn routes(ctx: Arc<SinkContext>, admins: Vec<String>) -> tonic::service::Routes {
    tonic::service::Routes::new(SinkControlServer::new(Service { ctx, admins }))
}
