//! One replication cycle of a group of disks (or of a single disk): open the members on the
//! link (kept open across cycles), open the group on the sink (which completes a group commit a
//! crash interrupted), freeze every member's point in time together, run the members' epochs
//! concurrently, and commit them as one group epoch; then release the points in time (or keep
//! them for the retry when the cycle failed). `blockship-agent sync` is one cycle of a group of
//! one disk; the daemon runs cycles on a schedule.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use blockship_proto::pb::{DiskOpened, OpenDisk, SyncMode};
use tokio::sync::Semaphore;

use super::epoch::{self, EpochReport, EpochRequest};
use super::{Observer, Transfer};
use crate::changes::Changes;
use crate::extents::Extent;
use crate::link::{DiskHandle, Link};
use crate::source::group::GroupOrigin;
use crate::source::Freeze;
use crate::AgentError;

/// One member of a group: where it goes and how its changes are found.
#[derive(Debug, Clone)]
pub struct Member {
    pub target: String,
    /// Identity of the source disk recorded with the replica (default: from the source).
    pub disk_id: Option<String>,
    pub changes: Changes,
    /// Change point to record where the platform defines none.
    pub change_point: Option<String>,
    /// A checked change list (`--changes cbt-file:`).
    pub file_extents: Option<Vec<Extent>>,
}

/// A member open on the link, with what the sink said of its target (kept up to date).
pub struct OpenMember {
    pub disk: DiskHandle,
    pub opened: DiskOpened,
}

/// How the sink is to treat the members' targets.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opening {
    /// Replicate into targets that were cut over (their mark is cleared).
    pub force_resume: bool,
    /// A cutover's final cycle: cut-over targets are opened (to complete an interrupted
    /// cutover), and a group with any member cut over runs no epoch.
    pub cutover: bool,
    /// Failback: the targets are the original images of a failover, replicated into again
    /// from the last epoch both sides share (RBD sources: their newest `blockship-<N>`).
    pub failback: bool,
    /// `bench`: the sink measures its CPU per epoch, and refuses a target holding a replica
    /// (see `OpenDisk.bench`).
    pub bench: bool,
}

/// What a cycle did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CycleReport {
    pub epoch: u64,
    /// When the point in time was frozen (the age of this is the RPO once it commits).
    #[serde(skip)]
    pub frozen_at: SystemTime,
    pub seconds: f64,
    /// Taking the members' points in time (the source freeze), their reading and sending, and
    /// the group commit, in seconds.
    pub freeze_seconds: f64,
    pub data_seconds: f64,
    pub commit_seconds: f64,
    /// (Cutover) a member was already cut over at `epoch`: no epoch ran.
    pub already_cut_over: bool,
    pub members: Vec<EpochReport>,
}

/// Open member `m` of `origin` on `link`.
async fn open_member(
    link: &Link,
    origin: &GroupOrigin,
    i: usize,
    m: &Member,
    transfer: &Transfer,
    how: Opening,
) -> Result<OpenMember, AgentError> {
    if how.bench && !link.hello().capabilities.iter().any(|c| c == blockship_proto::version::CAP_BENCH) {
        // An older sink would ignore OpenDisk.bench and overwrite whatever the target holds.
        return Err(AgentError::Usage(format!(
            "sink {} ({}) does not support bench: upgrade it to this version",
            link.sink(),
            link.hello().software
        )));
    }
    let source = &origin.members()[i];
    let size = source.size();
    let mode = if m.changes.needs_existing_target() { SyncMode::Incremental } else { SyncMode::Compare };
    let failback_epoch = match (how.failback, source) {
        (false, _) => 0,
        (true, crate::source::Origin::Rbd(r)) => match r.last_replica_epoch().await? {
            0 => {
                return Err(AgentError::Usage(format!(
                    "failback: source {} has no blockship-<N> snapshot, so it was never the replica of {}; nothing to fail back from",
                    source.disk_id(),
                    m.target
                )))
            }
            n => n,
        },
        (true, _) => {
            return Err(AgentError::Usage("failback replicates RBD replicas back to their original RBD images: the group's sources must be rbd:".into()))
        }
    };
    let (disk, opened) = link
        .open_disk(OpenDisk {
            disk: 0,
            disk_id: m.disk_id.clone().unwrap_or_else(|| source.disk_id()),
            size,
            target: m.target.clone(),
            mode: mode as i32,
            chunk_size: transfer.chunk_size,
            force_resume: how.force_resume,
            cutover: how.cutover,
            failback_epoch,
            bench: how.bench,
        })
        .await?;
    if !blockship_proto::valid_chunk_size(opened.chunk_size) {
        return Err(AgentError::Protocol(format!("sink reported chunk size {}", opened.chunk_size)));
    }
    if opened.target_size < size {
        return Err(AgentError::Protocol(format!("target has {} bytes, source {size}", opened.target_size)));
    }
    if !opened.created && opened.chunk_size != transfer.chunk_size {
        tracing::info!(target = %m.target, target_chunk_size = opened.chunk_size, "using the existing target's chunk size");
    }
    Ok(OpenMember { disk, opened })
}

/// Run one cycle. `open[i]` keeps member i open between cycles (None: open it now); after a
/// failure the members are closed (their epochs end) and opened afresh next time.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    link: &Link,
    group: Option<&str>,
    origin: &GroupOrigin,
    members: &[Member],
    open: &mut [Option<OpenMember>],
    transfer: &Transfer,
    parallel: &Arc<Semaphore>,
    observer: &dyn Observer,
    how: Opening,
) -> Result<CycleReport, AgentError> {
    let started = Instant::now();
    let result = cycle(link, group, origin, members, open, transfer, parallel, observer, how, started).await;
    if result.is_err() {
        for slot in open.iter_mut() {
            if let Some(m) = slot.take() {
                m.disk.close().await;
            }
        }
    }
    result.map_err(|e| link.reason(e))
}

#[allow(clippy::too_many_arguments)]
async fn cycle(
    link: &Link,
    group: Option<&str>,
    origin: &GroupOrigin,
    members: &[Member],
    open: &mut [Option<OpenMember>],
    transfer: &Transfer,
    parallel: &Arc<Semaphore>,
    observer: &dyn Observer,
    how: Opening,
    started: Instant,
) -> Result<CycleReport, AgentError> {
    for (i, m) in members.iter().enumerate() {
        if open[i].is_none() {
            open[i] = Some(open_member(link, origin, i, m, transfer, how).await?);
        }
    }
    let mut opened: Vec<&mut OpenMember> =
        open.iter_mut().map(|o| o.as_mut().expect("opened above")).collect();
    let epoch = match group {
        Some(name) => {
            let handles: Vec<u32> = opened.iter().map(|m| m.disk.handle).collect();
            let committed = link.open_group(name, &handles).await?;
            for (m, spec) in opened.iter_mut().zip(members) {
                let c = m.opened.committed_epoch;
                if c == 0 {
                    // A new member joins at the group's next epoch.
                    m.opened.committed_epoch = committed;
                } else if c != committed {
                    return Err(AgentError::Protocol(format!(
                        "{} is at epoch {c} but its group {name:?} at {committed}; it is opened afresh next cycle",
                        spec.target
                    )));
                }
            }
            committed + 1
        }
        None => opened[0].opened.committed_epoch + 1,
    };
    if how.cutover && opened.iter().any(|m| m.opened.cut_over) {
        // An interrupted cutover already passed its final epoch: it is only to be completed.
        return Ok(CycleReport {
            epoch: epoch - 1,
            frozen_at: SystemTime::now(),
            seconds: started.elapsed().as_secs_f64(),
            freeze_seconds: 0.0,
            data_seconds: 0.0,
            commit_seconds: 0.0,
            already_cut_over: true,
            members: Vec::new(),
        });
    }
    let freezes: Vec<Freeze<'_>> = opened
        .iter()
        .zip(members)
        .map(|(m, spec)| Freeze {
            epoch,
            prior_view: m.opened.in_progress.as_ref().filter(|p| p.epoch == epoch).map(|p| p.view.as_str()),
            declared_point: spec.change_point.as_deref(),
            stored_point: Some(m.opened.change_point.as_str()),
            target: &spec.target,
        })
        .collect();
    // An idle cycle costs one change query and a commit with no data, not a freeze.
    let tracked = members.iter().all(|m| matches!(m.changes, Changes::Auto))
        && opened.iter().all(|m| !m.opened.created && m.opened.committed_epoch > 0);
    let frozen_at = SystemTime::now();
    let freezing = Instant::now();
    let quiet = if tracked { origin.unchanged(&freezes).await? } else { None };
    let points = match quiet {
        Some(points) => {
            tracing::debug!(
                group = group.unwrap_or(""),
                epoch,
                "nothing changed: an epoch with no data, no freeze"
            );
            points
        }
        None => origin.freeze(&freezes).await?,
    };
    let freeze_seconds = freezing.elapsed().as_secs_f64();
    let data = Instant::now();
    let epochs = opened.iter().zip(members).zip(&points).enumerate().map(|(i, ((m, spec), point))| {
        let source = &origin.members()[i];
        async move {
            let _slot =
                parallel.acquire().await.map_err(|_| AgentError::Internal("parallel disks".into()))?;
            let req = EpochRequest {
                target: &spec.target,
                changes: &spec.changes,
                declared_point: spec.change_point.as_deref(),
                file_extents: spec.file_extents.as_deref(),
                group,
                measure: how.bench,
            };
            epoch::run(&m.disk, &m.opened, source, point, req, transfer, observer).await
        }
    });
    let results = futures::future::join_all(epochs).await;
    let reports = match results.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(r) => r,
        Err(e) => {
            origin.finish(points, false).await;
            return Err(e);
        }
    };
    let data_seconds = data.elapsed().as_secs_f64();
    let committing = Instant::now();
    if let Some(name) = group {
        if let Err(e) = link.commit_group(name, epoch).await {
            origin.finish(points, false).await;
            return Err(e);
        }
    }
    for (m, r) in opened.iter_mut().zip(&reports) {
        let o = &mut m.opened;
        o.committed_epoch = epoch;
        o.change_point = r.change_point.clone();
        o.created = false;
        o.zero_filled = false;
        o.in_progress = None;
    }
    let commit_seconds = committing.elapsed().as_secs_f64();
    origin.finish(points, true).await;
    Ok(CycleReport {
        epoch,
        frozen_at,
        seconds: started.elapsed().as_secs_f64(),
        freeze_seconds,
        data_seconds,
        commit_seconds,
        already_cut_over: false,
        members: reports,
    })
}
