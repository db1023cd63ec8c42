//! `blockship-sink test-failover`: clone a group's latest committed point in time into new RBD
//! images for an isolated boot test, while replication goes on. Every member's snapshot
//! `blockship-<N>` of the group's committed epoch N is cloned (layered copy-on-write: no data
//! copied) into `PREFIX<image>` beside it; the snapshots are made before any member records N,
//! so they all exist. The clones are recorded in the state dir (`failover/`), which `status`
//! lists and `--cleanup` removes. A snapshot with clones does not fail the sink's commits: a
//! format 2 clone lets the sink remove it (into Ceph's trash), and pruning a protected (format 1)
//! one is retried at every commit until the clones are gone. File targets are not cloned: a file
//! being replicated into holds its last committed epoch only between epochs.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::group::{all_records, record_path, registered, store_record};
use crate::state::ReplicationState;
use crate::targets::rbd::{blocking, RbdSpec, SNAP_PREFIX, STATE_KEY};
use crate::targets::{TargetName, TargetRoots};

/// The clones of one test failover of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clones {
    pub group: String,
    pub epoch: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// (member target, its clone's target)
    pub clones: Vec<(String, String)>,
}

const KIND: &str = "failover";
/// Tries when the sink prunes the epoch's snapshot between reading the states and cloning.
const TRIES: usize = 5;

fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        bail!("bad --prefix {prefix:?}: 1 to 64 letters, digits, '.', '_' or '-'");
    }
    Ok(())
}

/// The recorded test failover of group `name`, if any.
pub fn recorded(state_root: &Path, name: &str) -> Result<Option<Clones>> {
    let path = record_path(state_root, KIND, name);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}", path.display())),
    }
}

/// Every recorded test failover (for `status`).
pub fn all(state_root: &Path) -> Vec<Clones> {
    let mut v: Vec<Clones> = all_records(state_root, KIND);
    v.sort_by(|a, b| a.group.cmp(&b.group));
    v
}

/// The RBD members of group `name`, each with its spec and its clone's spec.
fn members(state_root: &Path, name: &str, prefix: &str) -> Result<Vec<(TargetName, RbdSpec, RbdSpec)>> {
    let group = registered(state_root, name).map_err(anyhow::Error::msg)?;
    group
        .members
        .iter()
        .map(|m| {
            let target = TargetName::parse(m)?;
            let TargetName::Rbd(spec) = &target else {
                bail!("{m}: test failover clones RBD targets only (a file target being replicated into holds its committed epoch only between epochs)");
            };
            let clone = RbdSpec { image: format!("{prefix}{}", spec.image), ..spec.clone() };
            Ok((target.clone(), spec.clone(), clone))
        })
        .collect()
}

/// Clone group `name`'s latest committed epoch into `PREFIX<image>` images.
pub async fn create(roots: &TargetRoots, state_root: &Path, name: &str, prefix: &str) -> Result<String> {
    check_prefix(prefix)?;
    if let Some(c) = recorded(state_root, name)? {
        bail!(
            "group {name} has test-failover clones of epoch {} already ({}); remove them first with --cleanup",
            c.epoch,
            c.clones.iter().map(|(_, c)| c.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    let ceph = roots.ceph.as_ref().context("test failover needs rbd support (drop --no-rbd)")?;
    let members = members(state_root, name, prefix)?;
    let mut last_error = None;
    for _ in 0..TRIES {
        // The group's committed epoch: its snapshot exists on every member (see above).
        let mut epoch = 0;
        for (target, spec, _) in &members {
            let io = ceph.ioctx(target, spec).await?;
            let image = spec.image.clone();
            let text = blocking(target, move || io.open(&image)?.metadata_get(STATE_KEY)).await?;
            let state: ReplicationState = serde_json::from_str(text.as_deref().unwrap_or("null"))
                .with_context(|| {
                    format!("{target} has no replication state: it is not a Blockship replica")
                })?;
            epoch = epoch.max(state.committed_epoch);
        }
        if epoch == 0 {
            bail!("group {name} has no committed epoch yet");
        }
        let snap = format!("{SNAP_PREFIX}{epoch}");
        let mut made: Vec<(String, String)> = Vec::new();
        let mut formats = std::collections::BTreeSet::new();
        let mut failed = None;
        for (target, spec, clone) in &members {
            let io = ceph.ioctx(target, spec).await?;
            let (parent, child, snap) = (spec.image.clone(), clone.image.clone(), snap.clone());
            let io2 = io.clone();
            match blocking(target, move || io.clone_snapshot(&parent, &snap, &io2, &child)).await {
                Ok(format) => {
                    tracing::info!(%target, clone = %clone, epoch, format, "test-failover clone made");
                    made.push((target.to_string(), format!("rbd:{clone}")));
                    formats.insert(format);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let Some(e) = failed else {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let c = Clones { group: name.to_string(), epoch, created_at: now, clones: made };
            store_record(state_root, KIND, name, &c)?;
            let list: Vec<&str> = c.clones.iter().map(|(_, c)| c.as_str()).collect();
            let formats: Vec<String> = formats.iter().map(u64::to_string).collect();
            return Ok(format!(
                "group {name}: epoch {epoch} cloned into {} (RBD clone format {})",
                list.join(" "),
                formats.join(", ")
            ));
        };
        // Undo a partial set, then try again if the snapshot was pruned meanwhile.
        remove_clones(roots, &made).await;
        let pruned = matches!(&e, crate::targets::TargetError::Ceph { source, .. } if source.errno() == Some(libc::ENOENT));
        if !pruned {
            return Err(e.into());
        }
        last_error = Some(e);
    }
    Err(anyhow::anyhow!(
        "group {name}: its epochs were pruned faster than they could be cloned ({TRIES} tries): {}",
        last_error.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Remove clones (and unprotect their parent snapshots where nothing else uses them); returns
/// what could not be removed.
async fn remove_clones(roots: &TargetRoots, clones: &[(String, String)]) -> Vec<String> {
    let mut left = Vec::new();
    let Some(ceph) = roots.ceph.as_ref() else { return clones.iter().map(|(_, c)| c.clone()).collect() };
    for (_, clone) in clones {
        let r: Result<()> = async {
            let target = TargetName::parse(clone)?;
            let TargetName::Rbd(spec) = &target else { bail!("{clone} is not an RBD image") };
            let io = ceph.ioctx(&target, spec).await?;
            let image = spec.image.clone();
            blocking(&target, move || match io.remove(&image) {
                Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
                other => other,
            })
            .await?;
            Ok(())
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(%clone, "cannot remove the test-failover clone: {e:#}");
            left.push(format!("{clone} ({e:#})"));
        }
    }
    left
}

/// Remove group `name`'s test-failover clones.
pub async fn cleanup(roots: &TargetRoots, state_root: &Path, name: &str) -> Result<String> {
    let Some(c) = recorded(state_root, name)? else {
        return Ok(format!("group {name} has no test-failover clones"));
    };
    let left = remove_clones(roots, &c.clones).await;
    if !left.is_empty() {
        bail!(
            "group {name}: could not remove {} (close whatever uses them and run --cleanup again)",
            left.join(", ")
        );
    }
    // A protected parent snapshot (format 1 clone) can be pruned again once unprotected.
    if let Some(ceph) = roots.ceph.as_ref() {
        for (member, _) in &c.clones {
            let Ok(target) = TargetName::parse(member) else { continue };
            let TargetName::Rbd(spec) = &target else { continue };
            let Ok(io) = ceph.ioctx(&target, spec).await else { continue };
            let (image, snap) = (spec.image.clone(), format!("{SNAP_PREFIX}{}", c.epoch));
            let r = blocking(&target, move || match io.open(&image)?.snap_unprotect(&snap) {
                Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
                other => other,
            })
            .await;
            if let Err(e) = r {
                tracing::warn!(%target, "cannot unprotect the cloned snapshot (other clones?): {e}");
            }
        }
    }
    std::fs::remove_file(record_path(state_root, KIND, name))?;
    Ok(format!(
        "group {name}: removed {}",
        c.clones.iter().map(|(_, c)| c.as_str()).collect::<Vec<_>>().join(" ")
    ))
}
