//! Beginning an epoch on a disk: check that it follows the target's committed epoch (a group's
//! new member may join at the group's next epoch), that a resume keeps only data of the same
//! plan read from the same frozen view, open the undo journal (file targets), record the epoch
//! as in progress (durably before its first write), and start its writer. Problems of the disk
//! are reported with its handle, so the other disks of the connection go on.

use std::sync::Arc;

use blockship_proto::pb::{self, SyncMode};
use blockship_proto::Body;
use tokio::sync::mpsc;

use crate::disk::{self, Disk};
use crate::liveness::Liveness;
use crate::refusal::{join, Refusal};
use crate::server::SinkContext;
use crate::state::InProgress;
use crate::writer::{epoch_mismatch, EpochWriter};

/// Where a session's disk-scoped problems are reported: (disk handle, refusal).
pub type DiskErrors = mpsc::Sender<(u32, Refusal)>;

/// Begin epoch `req.epoch` on `disk`; `group_committed` is the committed epoch of the group the
/// epoch belongs to (None: the disk is on its own).
pub async fn begin(
    ctx: &Arc<SinkContext>,
    disk: &Arc<Disk>,
    req: &pb::EpochBegin,
    group_committed: Option<u64>,
    acks: mpsc::Sender<Body>,
    errors: DiskErrors,
    liveness: &Arc<Liveness>,
) -> Result<(), Refusal> {
    if disk.index.is_none() {
        return Err(Refusal::bad_request("disk was opened for verification only"));
    }
    if disk.writer().is_ok() {
        return Err(Refusal::bad_request("an epoch is already open on this disk"));
    }
    // A disk fails once: an epoch begun before its failed writer's report arrived is refused
    // with that cause.
    if let Some(r) = disk.failure() {
        return Err(r);
    }
    let state = disk.state();
    let joins_group = state.committed_epoch == 0 && group_committed.is_some_and(|g| req.epoch == g + 1);
    if req.epoch != state.committed_epoch + 1 && !joins_group {
        return Err(epoch_mismatch(&disk.name, req.epoch, state.committed_epoch));
    }
    let mode = SyncMode::try_from(req.mode).unwrap_or(SyncMode::Unspecified);
    if !matches!(mode, SyncMode::Full | SyncMode::Compare | SyncMode::Incremental) {
        return Err(Refusal::bad_request(format!("epoch mode {mode:?} cannot write")));
    }
    let digest = hex::encode(&req.plan_digest);
    if req.resume_offset > 0 {
        // Resuming keeps the data below the offset: only sound if it came from the same frozen
        // view of the source, under the same plan.
        let ok = state.in_progress.as_ref().is_some_and(|p| {
            p.epoch == req.epoch
                && p.plan_digest == digest
                && !req.view.is_empty()
                && p.view == req.view
                && req.resume_offset <= p.durable_offset
        });
        if !ok {
            return Err(Refusal::bad_request(format!(
                "cannot resume epoch {} at offset {}: the target has no durable progress of this plan from this view of the source",
                req.epoch, req.resume_offset
            )));
        }
    }
    let undo = {
        let (d, enabled) = (disk.clone(), ctx.file_rollback);
        tokio::task::spawn_blocking(move || d.undo_journal(enabled))
            .await
            .map_err(|e| join("undo journal", e))??
    };
    // Rollback is possible only if every attempt at this epoch journaled what it overwrote.
    let journaled_before = match &state.in_progress {
        Some(p) if p.epoch == req.epoch => p.undo,
        _ => true,
    };
    let in_progress = InProgress {
        epoch: req.epoch,
        mode: req.mode,
        plan_digest: digest,
        durable_offset: req.resume_offset,
        view: req.view.clone(),
        undo: undo.is_some() && journaled_before,
        prepared: None,
        group: req.group.clone(),
    };
    // An epoch read from a frozen view records it durably now: after a crash the agent finds the
    // view in every member's record and retries from that same view, keeping what was written.
    // Without a view (an idle cycle of a continuous group, which freezes nothing; a source that
    // cannot name one) there is nothing a retry could take up, so the record stays in memory
    // until the writer's first write to the target (the only moment a crash could leave a
    // partial delta behind); an epoch without data then writes only its prepare and commit.
    // A target grown at open also records now, so that `rollback` after a crash before the
    // commit truncates it back to the committed size, as before.
    let durable_now = !req.view.is_empty() || disk.target.size() != state.committed_size;
    if durable_now {
        disk.update_state(|s| s.in_progress = Some(in_progress)).await?;
    } else {
        disk.set_state(|s| s.in_progress = Some(in_progress));
    }

    let (tx, rx) = mpsc::channel(crate::writer::BATCH);
    *disk.epoch.lock().unwrap_or_else(|p| p.into_inner()) = Some(disk::ActiveEpoch { epoch: req.epoch, tx });
    let writer = EpochWriter::new(
        disk.clone(),
        req.epoch,
        req.resume_offset,
        acks,
        ctx.checkpoint,
        undo,
        liveness.clone(),
    )
    .recorded(durable_now)
    .measured(req.measure);
    let d = disk.clone();
    tokio::spawn(async move {
        let mut rx = rx;
        let result = writer.run(&mut rx).await;
        if let Err(r) = &result {
            // Before anyone can find the writer gone (the commit step, data streams).
            *d.writer_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.clone());
        }
        d.epoch.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Err(r) = result {
            crate::failpoint::delay_point("sink::writer-failure-report").await;
            let _ = errors.send((d.handle, r)).await;
        }
        // Only now may senders see the writer gone (and report "epoch writer stopped"): the
        // disk fails once, so the writer's own error — the cause — must reach the session first.
        drop(rx);
    });
    tracing::info!(target = %disk.name, epoch = req.epoch, ?mode, resume_offset = req.resume_offset, group = %req.group, "epoch begun");
    Ok(())
}
