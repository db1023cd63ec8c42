//! Groups: disks that share every point in time (the disks of one VM). Each member's state
//! names its group and members; a group epoch commits on every member together (`commit`). When
//! a group is opened, its members' states must agree: all at the same committed epoch, except
//! after a crash in the middle of a group commit, when some members recorded epoch N and the
//! others are still prepared for it — every point in time of N already exists then, so the
//! commit is completed (rolled forward). Groups are named per agent (`AGENT/GROUP`): agents
//! never share or see each other's groups. The membership is also kept in the sink's state dir
//! (`groups/`), so `rollback --group AGENT/GROUP` can find the members.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockship_proto::pb::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::disk::Disk;
use crate::refusal::Refusal;
use crate::state::{GroupRecord, ReplicationState};

/// What a group's member states say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The group's committed epoch.
    pub committed: u64,
    /// Members (indexes) whose commit of `committed` must be completed.
    pub roll_forward: Vec<usize>,
}

/// Check that `name` is a usable group name.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 128
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!("bad group name {name:?}: 1 to 128 letters, digits, '.', '_' or '-'"));
    }
    Ok(())
}

/// Read the states of group `name`'s members (target, state): its committed epoch, and which
/// members a crash left behind in the middle of a group commit.
pub fn read(name: &str, states: &[(String, ReplicationState)]) -> Result<Reading, String> {
    for (target, s) in states {
        if let Some(g) = &s.group {
            if g.name != name {
                return Err(format!(
                    "{target} belongs to group {:?}; a target is in one group at most",
                    g.name
                ));
            }
        }
    }
    // Members that never committed and were never in the group join at its next epoch.
    let joined: Vec<usize> = (0..states.len())
        .filter(|&i| states[i].1.committed_epoch > 0 || states[i].1.group.is_some())
        .collect();
    let committed = joined.iter().map(|&i| states[i].1.committed_epoch).max().unwrap_or(0);
    let mut roll_forward = Vec::new();
    for &i in &joined {
        let (target, s) = &states[i];
        if s.committed_epoch == committed {
            continue;
        }
        let prepared = s.in_progress.as_ref().is_some_and(|p| {
            p.epoch == committed
                && p.prepared.is_some()
                && p.group == name
                && s.committed_epoch + 1 == committed
        });
        if !prepared {
            let all: Vec<String> =
                states.iter().map(|(t, s)| format!("{t} at {}", s.committed_epoch)).collect();
            return Err(format!(
                "members of group {name:?} disagree ({}) and {target} has no prepared epoch {committed} to complete; return the group to one epoch with `blockship-sink rollback --group {name}`",
                all.join(", ")
            ));
        }
        roll_forward.push(i);
    }
    Ok(Reading { committed, roll_forward })
}

/// Open group `name` over `members` (disks open for writing on one session): read their
/// states, complete an interrupted group commit, record the membership. Returns the group's
/// record and committed epoch.
pub async fn open(
    state_root: &Path,
    agent: &str,
    group: &str,
    members: &[Arc<Disk>],
) -> Result<(GroupRecord, u64), Refusal> {
    let refuse = |m: String| Refusal::new(ErrorCode::BadTarget, m);
    check_name(group).map_err(refuse)?;
    let name = &format!("{agent}/{group}");
    if members.is_empty() {
        return Err(refuse(format!("group {name:?} has no members")));
    }
    let mut targets: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    targets.sort();
    if targets.windows(2).any(|w| w[0] == w[1]) {
        return Err(refuse(format!("group {name:?} names a target twice")));
    }
    if let Some(m) = members.iter().find(|m| m.index.is_none()) {
        return Err(refuse(format!("{} was opened for verification; a group's members are written", m.name)));
    }
    let states: Vec<(String, ReplicationState)> =
        members.iter().map(|m| (m.name.clone(), m.state())).collect();
    let reading = read(name, &states).map_err(refuse)?;
    let record = GroupRecord { name: name.to_string(), members: targets };
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for &i in &reading.roll_forward {
        let m = &members[i];
        let point = states[i].1.in_progress.as_ref().and_then(|p| p.prepared.clone()).unwrap_or_default();
        let (token, size) = (m.index()?.token().to_string(), m.size);
        tracing::warn!(target = %m.name, group = name, epoch = reading.committed, "completing a group commit a crash interrupted");
        m.update_state(|s| {
            crate::commit::record(s, reading.committed, point, now, size, token, Some(&record))
        })
        .await?;
        crate::commit::release(m, reading.committed).await;
    }
    for m in members {
        if m.state().group.as_ref() != Some(&record) {
            m.update_state(|s| s.group = Some(record.clone())).await?;
        }
    }
    let r = record.clone();
    let root = state_root.to_path_buf();
    tokio::task::spawn_blocking(move || register(&root, &r))
        .await
        .map_err(|e| crate::refusal::join("group registry", e))?
        .map_err(|e| Refusal::internal(format!("group registry: {e}")))?;
    Ok((record, reading.committed))
}

/// The registry entry of a group in the sink's state dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub name: String,
    pub members: Vec<String>,
}

/// `groups/READABLE-DIGEST.json`: agent names may hold any character.
fn registry_path(state_root: &Path, name: &str) -> PathBuf {
    record_path(state_root, "groups", name)
}

/// `KIND/READABLE-DIGEST.json` in the state dir: a per-group record of some kind.
pub fn record_path(state_root: &Path, kind: &str, name: &str) -> PathBuf {
    let readable: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') { c } else { '_' })
        .take(80)
        .collect();
    let digest = blake3::hash(name.as_bytes()).to_hex();
    state_root.join(kind).join(format!("{readable}-{}.json", &digest[..12]))
}

/// Record (atomically) that group `record.name` has these members.
pub fn register(state_root: &Path, record: &GroupRecord) -> std::io::Result<()> {
    let entry = Registered { name: record.name.clone(), members: record.members.clone() };
    let path = registry_path(state_root, &record.name);
    if std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Registered>(&b).ok())
        == Some(entry.clone())
    {
        return Ok(());
    }
    store_record(state_root, "groups", &record.name, &entry)
}

/// Write group `name`'s record of `kind` atomically and durably (temp file, fsync, rename,
/// fsync of the directory).
pub fn store_record(
    state_root: &Path,
    kind: &str,
    name: &str,
    value: &impl Serialize,
) -> std::io::Result<()> {
    let path = record_path(state_root, kind, name);
    let dir = path.parent().expect("record path has a parent");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value).expect("records serialize"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Every readable record of `kind` in the state dir.
pub fn all_records<T: serde::de::DeserializeOwned>(state_root: &Path, kind: &str) -> Vec<T> {
    let Ok(dir) = std::fs::read_dir(state_root.join(kind)) else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// Every group this state dir knows, by name.
pub fn all_registered(state_root: &Path) -> Vec<Registered> {
    let mut v: Vec<Registered> = all_records(state_root, "groups");
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The members of group `name` (`AGENT/GROUP`) as this sink recorded them.
pub fn registered(state_root: &Path, name: &str) -> Result<Registered, String> {
    let path = registry_path(state_root, name);
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "group {name:?} is not known to this state dir ({}: {e}); groups are named AGENT/GROUP",
            path.display()
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::InProgress;

    fn member(epoch: u64, group: Option<&str>, prepared_for: Option<u64>) -> ReplicationState {
        let mut s = ReplicationState::new("t", "d", "a", 1 << 20, 1 << 20);
        s.committed_epoch = epoch;
        s.group = group.map(|g| GroupRecord { name: g.into(), members: vec![] });
        s.in_progress = prepared_for.map(|e| InProgress {
            epoch: e,
            mode: 3,
            plan_digest: String::new(),
            durable_offset: 0,
            view: String::new(),
            undo: true,
            prepared: Some(format!("cp-{e}")),
            group: "vm".into(),
        });
        s
    }

    #[test]
    fn states_agree_or_complete_or_refuse() {
        let named = |v: Vec<ReplicationState>| -> Vec<(String, ReplicationState)> {
            v.into_iter().enumerate().map(|(i, s)| (format!("file:d{i}"), s)).collect()
        };
        let r = read("vm", &named(vec![member(4, Some("vm"), None), member(4, Some("vm"), None)])).unwrap();
        assert_eq!(r, Reading { committed: 4, roll_forward: vec![] });
        // A crash between the members' commit records: the lagging one is completed.
        let r =
            read("vm", &named(vec![member(5, Some("vm"), None), member(4, Some("vm"), Some(5))])).unwrap();
        assert_eq!(r, Reading { committed: 5, roll_forward: vec![1] });
        // A new member joins at the next epoch.
        let r = read("vm", &named(vec![member(5, Some("vm"), None), member(0, None, None)])).unwrap();
        assert_eq!(r.committed, 5);
        // Behind without a prepared epoch, or two epochs behind: refused with the way out.
        for bad in [
            vec![member(5, Some("vm"), None), member(4, Some("vm"), None)],
            vec![member(6, Some("vm"), None), member(4, Some("vm"), Some(6))],
        ] {
            let e = read("vm", &named(bad)).unwrap_err();
            assert!(e.contains("rollback --group vm"), "{e}");
        }
        let e = read("vm", &named(vec![member(1, Some("other"), None)])).unwrap_err();
        assert!(e.contains("belongs to group \"other\""), "{e}");
        assert!(check_name("vm-42.disks_1").is_ok());
        for bad in ["", "a/b", "x y", &"n".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_registry_remembers_members() {
        let dir = tempfile::tempdir().unwrap();
        let rec = GroupRecord { name: "esx01/vm42".into(), members: vec!["file:a".into(), "file:b".into()] };
        register(dir.path(), &rec).unwrap();
        register(dir.path(), &rec).unwrap();
        assert_eq!(registered(dir.path(), "esx01/vm42").unwrap().members, rec.members);
        assert!(registered(dir.path(), "nope").unwrap_err().contains("not known"));
    }
}
