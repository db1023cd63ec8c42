//! `blockship-sink rollback`: return an RBD target to the snapshot of its last committed epoch,
//! dropping a partially applied epoch the way rbd-mirror drops a partial delta. The replication
//! state is reset to that epoch and the hash index is invalidated (it is rebuilt from the image).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::state::StateDir;
use crate::target::rbd::RbdTarget;
use crate::target::{Access, TargetError, TargetName, TargetRoots};

/// How long rollback waits for a dead writer's exclusive lock.
const LOCK_WAIT: Duration = Duration::from_secs(120);

pub async fn rollback(roots: &TargetRoots, state_root: Option<&Path>, target: &str) -> Result<String> {
    let name = TargetName::parse(target)?;
    let TargetName::Rbd(spec) = &name else {
        bail!("{name}: rollback needs an rbd: target (file targets keep no snapshots)");
    };
    let ceph = roots.ceph.as_ref().context("rbd targets are disabled (--no-rbd)")?;
    let (image, _) = RbdTarget::open(ceph, spec, &name, 0, Access::ReadOnly).await?;
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
    // A sink that died still owns the image's exclusive lock until its watch expires (about
    // 30 s); librbd answers EROFS meanwhile.
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        match image.rollback_to(epoch).await {
            Err(TargetError::Ceph { source, .. })
                if source.errno() == Some(libc::EROFS) && tokio::time::Instant::now() < deadline =>
            {
                eprintln!("{name}: waiting for the previous writer's exclusive lock to expire");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            other => break other?,
        }
    }
    state.in_progress = None;
    // The image changed under the index: force a rebuild from the data.
    state.index_token.clear();
    image.store_state(&state).await?;
    if let Some(root) = state_root {
        let dir = StateDir::for_target(root, &name.to_string())?;
        let _ = std::fs::remove_file(dir.index_path());
    }
    Ok(match dropped {
        Some(e) => format!("{name}: rolled back to blockship-{epoch}; the unfinished epoch {e} was dropped"),
        None => format!("{name}: rolled back to blockship-{epoch} (no epoch was in progress)"),
    })
}
