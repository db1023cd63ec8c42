//! `blockship-sink rollback`: return a target to its last committed epoch, dropping an epoch that
//! was applied only in part (the way rbd-mirror drops a partial delta): an RBD image to its
//! `blockship-<epoch>` snapshot, a file through its undo journal. The replication state is reset
//! to that epoch and the hash index entries of what changed are invalidated (rebuilt from the
//! data when next needed). `--group AGENT/GROUP` does it for every member of a group, after
//! completing a group commit a crash interrupted, so all members end at the same epoch.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::index::{HashIndex, IndexOrigin, STALE};
use crate::state::{ReplicationState, StateDir};
use crate::targets::file::FileTarget;
use crate::targets::rbd::RbdTarget;
use crate::targets::{Access, TargetError, TargetName, TargetRoots};
use crate::writer::touched;

/// How long rollback waits for a dead writer's exclusive lock.
const LOCK_WAIT: Duration = Duration::from_secs(120);

pub async fn rollback(roots: &TargetRoots, state_root: Option<&Path>, target: &str) -> Result<String> {
    let name = TargetName::parse(target)?;
    match &name {
        TargetName::Rbd(_) => rollback_rbd(roots, state_root, &name).await,
        // Nothing to return to: a group with a null member still rolls back its other members.
        TargetName::Null(_) => Ok(format!("{name}: keeps no data (a bench target); nothing to roll back")),
        TargetName::File(rel) => {
            let root = roots.file_root.clone().context("a file target needs the sink's --file-root")?;
            let state_root = state_root
                .context("a file target keeps its state and undo journal in the sink's --state-dir: give it")?
                .to_path_buf();
            let (rel, name) = (rel.clone(), name.clone());
            tokio::task::spawn_blocking(move || rollback_file(&root, &state_root, &name, &rel)).await?
        }
    }
}

fn rollback_file(root: &Path, state_root: &Path, name: &TargetName, rel: &Path) -> Result<String> {
    let canonical = name.to_string();
    let dir = StateDir::for_target(state_root, &canonical)?;
    // No sink may write the file meanwhile (it holds this lock while it has the target open).
    let _lock = dir.lock(&canonical)?;
    let mut state = dir.load()?.with_context(|| {
        format!("{name} has no replication state in this --state-dir; nothing to roll back")
    })?;
    let epoch = state.committed_epoch;
    if epoch == 0 {
        bail!("{name} has no committed epoch yet; there is nothing to roll back to");
    }
    let Some(unfinished) = state.in_progress.clone() else {
        return Ok(format!(
            "{name}: epoch {epoch} is committed and no epoch is in progress; nothing to roll back"
        ));
    };
    if !unfinished.undo {
        bail!(
            "{name}: epoch {} was written without an undo journal (sink started with --no-file-rollback), so the file cannot be returned to epoch {epoch}; a compare-mode sync brings it up to date",
            unfinished.epoch
        );
    }
    let (target, _) = FileTarget::open(root, rel, name, 0, Access::Repair)?;
    let journal = dir.undo_path();
    let restored = match crate::undo::roll_back(&journal, &target.file(), epoch)
        .with_context(|| format!("{name}: applying the undo journal {}", journal.display()))?
    {
        Some(r) => r,
        // The journal is created before the epoch's first write: none, nothing was written.
        None if !journal.exists() => Default::default(),
        None => bail!("{name}: the undo journal {} belongs to another epoch", journal.display()),
    };
    // The index must not vouch for what was restored.
    if !state.index_token.is_empty() {
        let size = std::fs::metadata(root.join(rel)).map(|m| m.len()).unwrap_or(state.size);
        if let Ok((index, IndexOrigin::Reused)) =
            HashIndex::open(&dir.index_path(), state.chunk_size, size, &state.index_token, false)
        {
            for &(o, l) in &restored.ranges {
                index.fill(touched(o, l, state.chunk_size), &STALE)?;
            }
            index.sync()?;
        } else {
            state.index_token.clear();
        }
    }
    state.in_progress = None;
    if let Some(size) = restored.truncated_to {
        state.size = size;
    }
    dir.store(&state)?;
    crate::undo::discard(&journal)?;
    Ok(format!(
        "{name}: rolled back to epoch {epoch}; the unfinished epoch {} was dropped ({} ranges restored{})",
        unfinished.epoch,
        restored.ranges.len(),
        restored.truncated_to.map(|s| format!(", truncated to {s} bytes")).unwrap_or_default()
    ))
}

async fn rollback_rbd(roots: &TargetRoots, state_root: Option<&Path>, name: &TargetName) -> Result<String> {
    let TargetName::Rbd(spec) = name else { unreachable!("called for rbd targets") };
    let ceph = roots.ceph.as_ref().context("rbd targets are disabled (--no-rbd)")?;
    // Writing needs the image's exclusive lock: a dead sink's is broken at once; a live holder's
    // (or one whose death is not certain yet) is waited for.
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    let image = loop {
        match RbdTarget::open(ceph, spec, name, 0, Access::Repair).await {
            Err(TargetError::Busy { reason, .. }) if tokio::time::Instant::now() < deadline => {
                eprintln!("{reason}; waiting");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            other => break other?.0,
        }
    };
    let mut state = image
        .load_state()
        .await?
        .with_context(|| format!("{name} carries no Blockship replication state; nothing to roll back to"))?;
    let epoch = state.committed_epoch;
    if epoch == 0 {
        bail!("{name} has no committed epoch yet; there is no snapshot to roll back to");
    }
    let snaps = image.epoch_snapshots().await?;
    if !snaps.contains(&epoch) {
        bail!("{name}: the snapshot blockship-{epoch} of the committed epoch is missing (blockship snapshots: {snaps:?})");
    }
    let dropped = state.in_progress.as_ref().map(|p| p.epoch);
    image.rollback_to(epoch).await?;
    state.in_progress = None;
    // The image changed under the index: force a rebuild from the data.
    state.index_token.clear();
    image.store_state(&state).await?;
    if let Some(root) = state_root {
        let dir = StateDir::for_target(root, &name.to_string())?;
        let _ = std::fs::remove_file(dir.index_path());
        // The listing copy must not go on showing the dropped epoch as in progress.
        if let Err(e) = dir.store_copy(&state) {
            tracing::warn!(error = %e, "status copy of {name}'s state not written");
        }
    }
    Ok(match dropped {
        Some(e) => format!("{name}: rolled back to blockship-{epoch}; the unfinished epoch {e} was dropped"),
        None => format!("{name}: rolled back to blockship-{epoch} (no epoch was in progress)"),
    })
}

/// A member's state, read where it lives.
async fn member_state(roots: &TargetRoots, state_root: &Path, target: &str) -> Result<ReplicationState> {
    let name = TargetName::parse(target)?;
    match &name {
        TargetName::File(_) | TargetName::Null(_) => StateDir::for_target(state_root, target)?
            .load()?
            .with_context(|| format!("{name} has no replication state in this --state-dir")),
        TargetName::Rbd(spec) => {
            let ceph = roots.ceph.as_ref().context("rbd targets are disabled (--no-rbd)")?;
            let (image, _) = RbdTarget::open(ceph, spec, &name, 0, Access::ReadOnly).await?;
            image
                .load_state()
                .await?
                .with_context(|| format!("{name} carries no Blockship replication state"))
        }
    }
}

/// Write a member's state where it lives (the image's lock is taken for an RBD member).
async fn store_member_state(
    roots: &TargetRoots,
    state_root: &Path,
    target: &str,
    state: &ReplicationState,
) -> Result<()> {
    let name = TargetName::parse(target)?;
    match &name {
        TargetName::File(_) | TargetName::Null(_) => {
            let dir = StateDir::for_target(state_root, target)?;
            let _lock = dir.lock(target)?;
            dir.store(state)?;
            crate::undo::discard(&dir.undo_path())?;
        }
        TargetName::Rbd(spec) => {
            let ceph = roots.ceph.as_ref().context("rbd targets are disabled (--no-rbd)")?;
            let (image, _) = RbdTarget::open(ceph, spec, &name, 0, Access::Repair).await?;
            image.store_state(state).await?;
            if let Err(e) = StateDir::for_target(state_root, target).and_then(|d| d.store_copy(state)) {
                tracing::warn!(error = %e, "status copy of {name}'s state not written");
            }
        }
    }
    Ok(())
}

/// Return every member of group `name` (`AGENT/GROUP`) to the group's committed epoch.
pub async fn rollback_group(roots: &TargetRoots, state_root: &Path, name: &str) -> Result<String> {
    let reg = crate::group::registered(state_root, name).map_err(anyhow::Error::msg)?;
    let mut states = Vec::new();
    for t in &reg.members {
        states.push((t.clone(), member_state(roots, state_root, t).await?));
    }
    let reading = crate::group::read(name, &states).map_err(anyhow::Error::msg)?;
    let mut lines = Vec::new();
    for &i in &reading.roll_forward {
        let (target, mut state) = states[i].clone();
        let point = state.in_progress.as_ref().and_then(|p| p.prepared.clone()).unwrap_or_default();
        let (token, size, committed_at) = (state.index_token.clone(), state.size, state.committed_at);
        let record = state.group.clone();
        crate::commit::record(
            &mut state,
            reading.committed,
            point,
            committed_at,
            size,
            token,
            record.as_ref(),
        );
        store_member_state(roots, state_root, &target, &state).await?;
        lines.push(format!("{target}: completed the group commit of epoch {}", reading.committed));
    }
    for target in &reg.members {
        lines.push(rollback(roots, Some(state_root), target).await?);
    }
    lines.push(format!("group {name}: every member is at epoch {}", reading.committed));
    Ok(lines.join("\n"))
}
