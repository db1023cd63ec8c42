//! One group's life in the daemon: wait for its next cycle (its interval after the last start,
//! at once when a cycle overran it, or now on `SyncNow`), run the cycle on the shared link, and
//! report. The group's disks stay open on the sink between cycles, so an idle cycle costs one
//! change query per disk and one small commit. A failing cycle backs off (exponentially, capped)
//! without holding up the other groups; its sources are opened afresh. Pause and Resume stop and
//! restart the schedule; on shutdown a running cycle may finish, then the group's disks close.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use blockship_proto::pb::ErrorCode;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::config::{Group, Kind};
use super::links::Links;
use super::pb;
use super::status::{unix_ms, Board};
use crate::config::Resolved;
use crate::engine::cycle::{self, CycleReport, Member, OpenMember, Opening};
use crate::engine::{Quiet, Transfer};
use crate::source::group::GroupOrigin;
use crate::source::Origin;
use crate::AgentError;

/// What the control service can ask of a group.
#[derive(Debug)]
pub enum Command {
    SyncNow,
    Pause,
    Resume,
    /// A cutover (or, with `abort`, the end of one), answered when done.
    Cutover(pb::CutoverRequest, oneshot::Sender<Result<pb::CutoverReply, String>>),
}

/// What every group task shares.
pub struct Shared {
    pub agent: Resolved,
    pub links: Links,
    pub board: Arc<Board>,
    pub transfer: Transfer,
    pub parallel: Arc<Semaphore>,
    pub max_backoff: Duration,
}

/// First wait after a failure; it doubles with every failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// Wait before retrying a cycle the sink refused for a checksum failure.
const CORRUPTION_RETRY: Duration = Duration::from_millis(500);

/// The initial status of group `g`.
pub fn initial(g: &Group) -> pb::Group {
    pb::Group {
        name: g.name.clone(),
        kind: serde_json::to_value(g.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        state: if g.paused { "paused" } else { "idle" }.into(),
        consistency: if g.section.disks.len() <= 1 || matches!(g.kind, Kind::Vmware | Kind::Qemu) {
            "atomic"
        } else {
            "per-disk"
        }
        .into(),
        interval_ms: g.interval.as_millis() as u64,
        disks: g
            .section
            .disks
            .iter()
            .map(|d| pb::Disk {
                target: d.target.clone(),
                source: d.source.clone().or_else(|| d.disk.clone()).unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The group's sources, opened.
async fn open_origin(g: &Group, agent: &Resolved) -> Result<GroupOrigin, AgentError> {
    match g.kind {
        Kind::File | Kind::Rbd => {
            let mut members = Vec::new();
            for d in &g.section.disks {
                let source = d.source.as_deref().unwrap_or_default();
                let opts = agent.source_options(source).map_err(|e| AgentError::Usage(format!("{e:#}")))?;
                members.push(Origin::open(source, &opts).await?);
            }
            Ok(GroupOrigin::of(members))
        }
        Kind::Qemu => {
            let disks: Vec<(String, String)> = g
                .section
                .disks
                .iter()
                .map(|d| (d.disk.clone().unwrap_or_default(), d.target.clone()))
                .collect();
            let qmp = g.section.qmp.clone().unwrap_or_default();
            let dir = std::env::temp_dir().join(format!("blockship-qemu-{}", g.name));
            let vm = crate::source::qemu::QemuVm::open(&qmp, &disks, g.section.nbd_socket.as_deref(), &dir)
                .await
                .map_err(crate::source::SourceError::from)?;
            Ok(GroupOrigin::of((0..disks.len()).map(|i| Origin::Qemu(vm.clone(), i)).collect()))
        }
        Kind::Vmware => {
            let disks: Vec<String> =
                g.section.disks.iter().map(|d| d.disk.clone().unwrap_or_default()).collect();
            let opts = agent
                .vmware_options(
                    g.section.vcenter.as_deref().unwrap_or_default(),
                    g.section.vm.clone().unwrap_or_default(),
                    disks.clone(),
                    g.section.nbd_command.clone(),
                )
                .map_err(|e| AgentError::Usage(format!("group {:?}: {e:#}", g.name)))?;
            let vm = crate::source::vmware::VmwareOrigin::open(opts)
                .await
                .map_err(crate::source::SourceError::from)?;
            let vm = Arc::new(vm);
            Ok(GroupOrigin::of((0..disks.len()).map(|i| Origin::Vmware(vm.clone(), i)).collect()))
        }
    }
}

/// A group's sources and its disks open on the sink, kept from one cycle to the next.
pub struct Replica {
    origin: Option<GroupOrigin>,
    open: Vec<Option<OpenMember>>,
    /// The link the disks are open on.
    on_link: Option<u64>,
}

impl Replica {
    fn new(members: usize) -> Self {
        Replica { origin: None, open: (0..members).map(|_| None).collect(), on_link: None }
    }

    /// The group's sources, opened if they are not.
    pub async fn origin(&mut self, g: &Group, shared: &Shared) -> Result<&GroupOrigin, AgentError> {
        if self.origin.is_none() {
            self.origin = Some(open_origin(g, &shared.agent).await?);
        }
        Ok(self.origin.as_ref().expect("opened above"))
    }

    /// Run a cycle; on failure, whether the link (not the group) failed.
    pub async fn cycle(
        &mut self,
        g: &Group,
        shared: &Shared,
        members: &[Member],
        name: Option<&str>,
        how: Opening,
    ) -> Result<CycleReport, (AgentError, bool)> {
        self.origin(g, shared).await.map_err(|e| (e, false))?;
        let (id, link) = shared.links.get().await.map_err(|e| (e, true))?;
        if self.on_link != Some(id) {
            // A new connection: the disks are opened on it afresh.
            for slot in self.open.iter_mut() {
                *slot = None;
            }
            self.on_link = Some(id);
        }
        let origin = self.origin.as_ref().expect("opened above");
        let t = &shared.transfer;
        let report =
            cycle::run(&link, name, origin, members, &mut self.open, t, &shared.parallel, &Quiet, how).await;
        match report {
            Err(e) if link.is_broken() => {
                shared.links.drop_broken(id).await;
                Err((e, true))
            }
            other => other.map_err(|e| (e, false)),
        }
    }

    /// The link the last cycle ran on, if it is still up (group state lives with the session).
    pub async fn link_of_cycle(&self, shared: &Shared) -> Result<crate::link::Link, AgentError> {
        let (id, link) = shared.links.get().await?;
        if self.on_link != Some(id) {
            return Err(AgentError::Closed("the connection to the sink was lost".into()));
        }
        Ok(link)
    }

    /// Close the disks on the sink (their epochs end) and, with `sources`, the sources too: the
    /// next cycle opens them afresh.
    pub async fn reset(&mut self, sources: bool) {
        for m in self.open.iter_mut().filter_map(Option::take) {
            m.disk.close().await;
        }
        if sources {
            if let Some(o) = self.origin.take() {
                o.close().await;
            }
        }
    }
}

/// Run group `g` until `stop` turns true.
pub async fn run(
    g: Group,
    shared: Arc<Shared>,
    mut commands: mpsc::Receiver<Command>,
    mut stop: watch::Receiver<bool>,
    first_cycle_in: Duration,
) {
    let members: Vec<Member> = g
        .section
        .disks
        .iter()
        .map(|d| Member {
            target: d.target.clone(),
            disk_id: d.disk_id.clone(),
            changes: g.changes.clone(),
            change_point: None,
            file_extents: None,
        })
        .collect();
    let mut replica = Replica::new(members.len());
    let (mut paused, mut failures, mut source_failures, mut cycles) = (g.paused, 0u32, 0u32, 0u64);
    // Set once the group is cut over (by us, or found so on the sink): no more cycles.
    let mut cut_over = false;
    let mut next = tokio::time::Instant::now() + first_cycle_in;
    loop {
        let state = if cut_over {
            "cut over"
        } else if paused {
            "paused"
        } else if failures > 0 {
            "backoff"
        } else {
            "idle"
        };
        let next_at = SystemTime::now() + next.saturating_duration_since(tokio::time::Instant::now());
        shared.board.update(&g.name, |s| {
            s.state = state.into();
            s.next_cycle_unix_ms = if paused || cut_over { 0 } else { unix_ms(next_at) };
        });
        tokio::select! {
            _ = tokio::time::sleep_until(next), if !paused && !cut_over => {}
            cmd = commands.recv() => {
                match cmd {
                    Some(Command::SyncNow) => next = tokio::time::Instant::now(),
                    Some(Command::Pause) => paused = true,
                    Some(Command::Resume) => paused = false,
                    Some(Command::Cutover(req, reply)) => {
                        let r = super::cutover::serve(&g, &shared, &members, &mut replica, req, &mut commands, cut_over).await;
                        if let Ok(done) = &r {
                            if !done.aborted {
                                cut_over = true;
                                replica.reset(true).await;
                                shared.board.update(&g.name, |s| {
                                    s.cut_over_epoch = done.epoch;
                                    s.cutover_downtime_seconds = done.downtime_seconds;
                                    s.committed_epoch = done.epoch;
                                });
                            }
                        }
                        let _ = reply.send(r);
                        next = tokio::time::Instant::now() + g.interval;
                    }
                    None => {}
                }
                continue;
            }
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        shared.board.update(&g.name, |s| s.state = "syncing".into());
        let started = tokio::time::Instant::now();
        let name =
            (members.len() > 1 || matches!(g.kind, Kind::Vmware | Kind::Qemu)).then_some(g.name.as_str());
        let how = Opening { failback: g.section.failback, ..Opening::default() };
        let result = replica.cycle(&g, &shared, &members, name, how).await;
        cycles += 1;
        match result {
            Ok(report) => {
                (failures, source_failures) = (0, 0);
                record(&shared.board, &g.name, &report, cycles);
                // An overrunning cycle is followed at once by the next.
                next = (started + g.interval).max(tokio::time::Instant::now());
            }
            Err((AgentError::Refused { code: ErrorCode::CutOver, message }, _)) => {
                // Cut over earlier (this daemon restarted since): nothing more to replicate.
                tracing::warn!(group = %g.name, "the sink says the group is cut over: {message}");
                cut_over = true;
                shared.board.update(&g.name, |s| {
                    s.last_error = message;
                    s.cycles = cycles;
                });
                replica.reset(true).await;
            }
            Err((e, link_failed)) => {
                failures += 1;
                // Data damaged between hashing and sending: the sink wrote none of it, and the
                // retry resumes on the same frozen view, at once.
                let corrupted = matches!(e, AgentError::Refused { code: ErrorCode::Checksum, .. });
                // The sink unreachable is everyone's problem, retried on the link's short
                // schedule; anything else is this group's, backed off exponentially.
                let wait = if link_failed {
                    shared.links.retry_in()
                } else if corrupted {
                    CORRUPTION_RETRY
                } else {
                    source_failures += 1;
                    FIRST_BACKOFF.saturating_mul(1 << (source_failures - 1).min(16)).min(shared.max_backoff)
                };
                tracing::warn!(group = %g.name, failures, retry_in = ?wait, "cycle failed: {e}");
                let kind = match (link_failed, corrupted) {
                    (true, _) => "link",
                    (false, true) => "checksum",
                    (false, false) => "group",
                };
                metrics::counter!("blockship_group_cycle_failures_total", "group" => g.name.clone(), "kind" => kind)
                    .increment(1);
                shared.board.update(&g.name, |s| {
                    s.last_error = e.to_string();
                    s.failures = failures;
                    s.cycles = cycles;
                });
                // Sources may be what broke: open them afresh.
                if !link_failed && !corrupted {
                    if let Some(o) = replica.origin.take() {
                        o.close().await;
                    }
                }
                next = tokio::time::Instant::now() + wait;
            }
        }
    }
    shared.board.update(&g.name, |s| s.state = "stopping".into());
    replica.reset(true).await;
}

/// Put a committed cycle into the status (and the log).
pub(super) fn record(board: &Board, name: &str, r: &CycleReport, cycles: u64) {
    let point = unix_ms(r.frozen_at);
    let read: u64 = r.members.iter().map(|m| m.bytes_read).sum();
    let sent: u64 = r.members.iter().map(|m| m.bytes_sent).sum();
    let scanned: u64 = r.members.iter().map(|m| m.bytes_scanned).sum();
    let rpo = (unix_ms(SystemTime::now()) - point) as f64 / 1000.0;
    tracing::info!(
        group = name,
        epoch = r.epoch,
        seconds = r.seconds,
        bytes_read = read,
        rpo,
        "group epoch committed"
    );
    let group = name.to_string();
    metrics::counter!("blockship_group_epochs_committed_total", "group" => group.clone()).increment(1);
    metrics::gauge!("blockship_group_last_commit_timestamp_seconds", "group" => group.clone())
        .set(point as f64 / 1000.0);
    metrics::histogram!("blockship_group_cycle_duration_seconds", "group" => group.clone()).record(r.seconds);
    let targets: Vec<String> =
        board.get(name).map(|g| g.disks.iter().map(|d| d.target.clone()).collect()).unwrap_or_default();
    for (m, target) in r.members.iter().zip(targets) {
        let labels = [("group", group.clone()), ("target", target)];
        metrics::counter!("blockship_disk_read_bytes_total", &labels).increment(m.bytes_read);
        metrics::counter!("blockship_disk_sent_bytes_total", &labels).increment(m.bytes_sent);
        metrics::counter!("blockship_disk_zero_bytes_total", &labels).increment(m.bytes_zero);
        metrics::counter!("blockship_disk_unchanged_bytes_total", &labels).increment(m.bytes_equal);
    }
    board.update(name, |s| {
        s.committed_epoch = r.epoch;
        s.committed_point_unix_ms = point;
        s.last_cycle_seconds = r.seconds;
        s.last_cycle_bytes_read = read;
        s.last_cycle_bytes_sent = sent;
        s.last_cycle_mb_per_s = scanned as f64 / r.seconds.max(1e-9) / 1e6;
        s.last_error.clear();
        s.failures = 0;
        s.cycles = cycles;
        for (d, m) in s.disks.iter_mut().zip(&r.members) {
            d.committed_epoch = m.epoch;
            d.mode = m.mode.clone();
            d.note = m.note.clone();
            d.bytes_read = m.bytes_read;
            d.bytes_sent = m.bytes_sent;
            d.seconds = m.seconds;
        }
    });
}
