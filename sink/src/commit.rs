//! Committing an epoch, of one disk or of a group of disks that share a point in time. Every
//! member is prepared first (all its data durable, its change point noted in its state); then
//! every member gets its point in time marked (an RBD snapshot), then every member's state
//! records the commit, and only then is the previous point in time released (older snapshots,
//! a file's undo journal). A crash before the first state is recorded leaves the previous epoch
//! committed everywhere, with everything a rollback needs; a crash between two states leaves a
//! group that `group::open` completes (rolls forward: every point in time already exists).

use std::sync::Arc;

use crate::disk::Disk;
use crate::failpoint::crash_point;
use crate::refusal::Refusal;
use crate::state::{CutOver, GroupRecord, ReplicationState};
use crate::targets::Target;

/// The change point a member prepared for `epoch`, or a refusal naming what is missing.
fn prepared(disk: &Disk, epoch: u64) -> Result<String, Refusal> {
    let state = disk.state();
    match &state.in_progress {
        Some(p) if p.epoch == epoch => p.prepared.clone().ok_or_else(|| {
            Refusal::bad_request(format!(
                "{}: epoch {epoch} is not prepared (its data is not all durable yet)",
                disk.name
            ))
        }),
        _ => Err(Refusal::bad_request(format!(
            "{}: no epoch {epoch} in progress (committed: {})",
            disk.name, state.committed_epoch
        ))),
    }
}

/// Commit `epoch` of `members` (all prepared for it). The caller acknowledges it, then calls
/// `release` for every member.
pub async fn commit(members: &[Arc<Disk>], epoch: u64, group: Option<&GroupRecord>) -> Result<(), Refusal> {
    let points = members.iter().map(|m| prepared(m, epoch)).collect::<Result<Vec<_>, _>>()?;
    // The points in time exist before any state says they do.
    for (i, m) in members.iter().enumerate() {
        m.target.mark_epoch(epoch).await?;
        if i + 1 < members.len() {
            crash_point("sink::group-between-snapshots");
        }
    }
    crash_point("sink::after-snapshot");
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for (i, (m, point)) in members.iter().zip(points).enumerate() {
        let token = m.index()?.token().to_string();
        let size = m.size;
        m.update_state(|s| record(s, epoch, point, now, size, token, group)).await?;
        if i + 1 < members.len() {
            crash_point("sink::group-between-states");
        }
    }
    crash_point("sink::after-commit-state");
    for m in members {
        tracing::info!(target = %m.name, epoch, group = group.map(|g| g.name.as_str()), "epoch committed");
        metrics::counter!("blockship_sink_epochs_committed_total", "target" => m.name.clone()).increment(1);
        metrics::gauge!("blockship_sink_last_commit_timestamp_seconds", "target" => m.name.clone())
            .set(now as f64);
    }
    Ok(())
}

/// The state of a member once `epoch` is committed.
pub fn record(
    s: &mut ReplicationState,
    epoch: u64,
    change_point: String,
    now: u64,
    size: u64,
    token: String,
    group: Option<&GroupRecord>,
) {
    s.committed_epoch = epoch;
    s.change_point = change_point;
    s.committed_at = now;
    s.committed_size = size;
    s.in_progress = None;
    s.index_token = token;
    if let Some(g) = group {
        s.group = Some(g.clone());
    }
}

/// Cut `members` over at their committed `epoch` (a cutover's final epoch): every member gets
/// its final point in time (RBD: snapshot `blockship-final`), then every member's state is
/// marked cut over, after which replication into it is refused. Members already cut over at
/// `epoch` are left as they are, so repeating this completes a cutover a crash interrupted.
pub async fn cut_over(members: &[Arc<Disk>], epoch: u64) -> Result<(), Refusal> {
    let mut todo = Vec::new();
    for m in members {
        let s = m.state();
        if s.committed_epoch != epoch {
            return Err(Refusal::bad_request(format!(
                "{}: cutover at epoch {epoch}, but the target's committed epoch is {}",
                m.name, s.committed_epoch
            )));
        }
        if s.in_progress.is_some() || m.writer().is_ok() {
            return Err(Refusal::bad_request(format!(
                "{}: an epoch after {epoch} is in progress; a cutover follows a committed epoch",
                m.name
            )));
        }
        if s.cut_over.as_ref().map(|c| c.epoch) != Some(epoch) {
            todo.push(m);
        }
    }
    // The final points in time are taken together (they are part of the downtime); none is
    // recorded before all exist.
    futures::future::try_join_all(todo.iter().map(|m| m.target.mark_final())).await?;
    crash_point("sink::cutover-after-snapshots");
    let at =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for (i, m) in todo.iter().enumerate() {
        m.update_state(|s| s.cut_over = Some(CutOver { epoch, at })).await?;
        tracing::warn!(target = %m.name, epoch, "target cut over: replication into it is refused from now on");
        if i + 1 < todo.len() {
            crash_point("sink::cutover-between-states");
        }
    }
    Ok(())
}

/// Drop what only the previous point in time needed. Failing never fails the commit (a snapshot
/// with clones, say): the next commit tries again.
pub async fn release(m: &Disk, epoch: u64) {
    if matches!(m.target, Target::File(_)) {
        if let Err(e) = crate::undo::discard(&m.state_dir.undo_path()) {
            tracing::warn!(target = %m.name, "cannot remove the undo journal: {e}");
        }
    }
    if let Err(e) = m.target.release_older(epoch).await {
        tracing::warn!(target = %m.name, epoch, "older points in time kept: {e}");
    }
}
