//! Replication state of a target: which epoch it holds, the source change point that epoch
//! corresponds to, and how far an unfinished epoch got. It is written atomically (temp file,
//! fsync, rename, fsync of the directory) and only after the data it describes is durable, so
//! whatever a crash leaves behind is a state the target really is in.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Format version of the state document.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationState {
    pub version: u32,
    pub target: String,
    pub source_disk_id: String,
    /// Identity (certificate) of the agent that last wrote this target.
    pub agent: String,
    pub size: u64,
    pub chunk_size: u32,
    /// Last committed epoch; 0 before the first commit.
    pub committed_epoch: u64,
    /// Source change point of the committed epoch (VMware changeId, bitmap, snapshot).
    pub change_point: String,
    /// Unix seconds of the last commit.
    pub committed_at: u64,
    /// Size of the disk at the last commit (0: unknown, states written before it was recorded).
    #[serde(default)]
    pub committed_size: u64,
    pub in_progress: Option<InProgress>,
    /// Identifies the hash index that matches this state; any other index is rebuilt.
    pub index_token: String,
    /// The group this target belongs to (its members share every committed epoch).
    #[serde(default)]
    pub group: Option<GroupRecord>,
    /// The target was cut over: the replica became the machine that runs, so the sink refuses
    /// replication into it (unless an agent forces it to resume).
    #[serde(default)]
    pub cut_over: Option<CutOver>,
}

/// When a target was cut over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutOver {
    /// The final epoch: the target holds it (RBD: also as snapshot `blockship-final`).
    pub epoch: u64,
    /// Unix seconds.
    pub at: u64,
}

/// Membership of a target in a group: disks committed together, at one point in time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    /// Canonical target names of every member (this one included), sorted.
    pub members: Vec<String>,
}

/// An epoch that began and has not committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    pub epoch: u64,
    pub mode: i32,
    /// Hex digest of the agent's plan (for resume of incremental epochs).
    pub plan_digest: String,
    /// Every item of this epoch below this offset is durable.
    pub durable_offset: u64,
    /// The frozen view of the source the epoch reads; it resumes only from the same view.
    #[serde(default)]
    pub view: String,
    /// Everything this epoch overwrote (in every attempt) is in the undo journal (file targets).
    #[serde(default)]
    pub undo: bool,
    /// All the epoch's data is durable and it waits for its group's commit; the change point
    /// it will record.
    #[serde(default)]
    pub prepared: Option<String>,
    /// The group whose epoch this is ("" for a disk on its own).
    #[serde(default)]
    pub group: String,
}

impl ReplicationState {
    pub fn new(target: &str, source_disk_id: &str, agent: &str, size: u64, chunk_size: u32) -> Self {
        ReplicationState {
            version: STATE_VERSION,
            target: target.to_string(),
            source_disk_id: source_disk_id.to_string(),
            agent: agent.to_string(),
            size,
            chunk_size,
            committed_epoch: 0,
            change_point: String::new(),
            committed_at: 0,
            committed_size: 0,
            in_progress: None,
            index_token: String::new(),
            group: None,
            cut_over: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state {path} is corrupt ({source}); move it away to start this target's replication over")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("state {path} has format version {found}; this sink understands {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{target} is in use by another process on this state dir (a running sink, or a rollback); stop it first")]
    Locked { target: String },
}

/// Exclusive use of a target's state dir by one process (an advisory lock on `lock`), held by
/// the session writing the target and by `rollback`; released when dropped or when the process
/// dies.
pub struct StateLock {
    _file: File,
}

/// Per-target directory in the sink's `--state-dir` (state document and hash index).
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The directory for `target` below `state_root`: a readable name plus a digest, so distinct
    /// targets never collide.
    pub fn for_target(state_root: &Path, target: &str) -> Result<Self, StateError> {
        let readable: String = target
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
            .take(80)
            .collect();
        let digest = blake3::hash(target.as_bytes()).to_hex();
        let dir = state_root.join("targets").join(format!("{readable}-{}", &digest[..12]));
        fs::create_dir_all(&dir).map_err(|source| StateError::Io { path: dir.clone(), source })?;
        Ok(StateDir { dir })
    }

    pub fn index_path(&self) -> PathBuf {
        self.dir.join("index.bin")
    }

    /// The undo journal of a file target (see `undo`).
    pub fn undo_path(&self) -> PathBuf {
        crate::undo::path_in(&self.dir)
    }

    /// Take the state dir for this process, or fail at once if another process has it.
    pub fn lock(&self, target: &str) -> Result<StateLock, StateError> {
        let path = self.dir.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StateError::Io { path: path.clone(), source })?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(StateLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(StateError::Locked { target: target.to_string() }),
            Err(e) => Err(StateError::Io { path, source: e.into() }),
        }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn load(&self) -> Result<Option<ReplicationState>, StateError> {
        let path = self.state_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let state: ReplicationState = serde_json::from_slice(&bytes)
            .map_err(|source| StateError::Corrupt { path: path.clone(), source })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Version { path, found: state.version });
        }
        Ok(Some(state))
    }

    /// Replace the state atomically and durably.
    pub fn store(&self, state: &ReplicationState) -> Result<(), StateError> {
        let path = self.state_path();
        let tmp = self.dir.join("state.json.tmp");
        let io = |source| StateError::Io { path: path.clone(), source };
        let body = serde_json::to_vec_pretty(state).expect("state serializes");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// Record a copy of the state of a target that keeps its state elsewhere (an RBD image's
    /// metadata), so `status` lists it without opening the image. Only for listings: it is
    /// written after the real record and never read back to resume.
    pub fn store_copy(&self, state: &ReplicationState) -> Result<(), StateError> {
        let path = self.dir.join("copy.json");
        let tmp = self.dir.join("copy.json.tmp");
        let io = |source| StateError::Io { path: path.clone(), source };
        fs::write(&tmp, serde_json::to_vec_pretty(state).expect("state serializes")).map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)
    }

    /// The state for a listing: the record itself (file targets) or the copy (RBD targets).
    fn load_listing(&self) -> Option<ReplicationState> {
        if let Ok(Some(s)) = self.load() {
            return Some(s);
        }
        let bytes = fs::read(self.dir.join("copy.json")).ok()?;
        serde_json::from_slice::<ReplicationState>(&bytes).ok().filter(|s| s.version == STATE_VERSION)
    }

    /// Forget a target's state (used when the target itself is gone).
    pub fn remove(&self) -> Result<(), StateError> {
        fs::remove_dir_all(&self.dir).map_err(|source| StateError::Io { path: self.dir.clone(), source })
    }
}

/// Every target state below `state_root` (unlocked reads, for status listings).
pub fn all(state_root: &Path) -> Vec<ReplicationState> {
    let Ok(dir) = fs::read_dir(state_root.join("targets")) else { return Vec::new() };
    let mut v: Vec<ReplicationState> =
        dir.filter_map(|e| e.ok()).filter_map(|e| StateDir { dir: e.path() }.load_listing()).collect();
    v.sort_by(|a, b| a.target.cmp(&b.target));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_load_round_trip() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::for_target(root.path(), "file:vm1/disk0").unwrap();
        assert_eq!(dir.load().unwrap(), None);
        let mut s = ReplicationState::new("file:vm1/disk0", "vm1", "esx01", 1 << 30, 1 << 20);
        s.in_progress = Some(InProgress {
            epoch: 1,
            mode: 2,
            plan_digest: "ab".into(),
            durable_offset: 64 << 20,
            view: "file:1:2:3:4".into(),
            undo: true,
            prepared: Some("cp-1".into()),
            group: "vm1".into(),
        });
        dir.store(&s).unwrap();
        assert_eq!(dir.load().unwrap(), Some(s.clone()));
        s.committed_epoch = 1;
        s.in_progress = None;
        dir.store(&s).unwrap();
        assert_eq!(dir.load().unwrap(), Some(s));
        assert!(!dir.dir.join("state.json.tmp").exists());
    }

    #[test]
    fn one_process_at_a_time() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::for_target(root.path(), "file:x").unwrap();
        let held = dir.lock("file:x").unwrap();
        // flock locks belong to open file descriptions: a second open conflicts like a second
        // process would.
        assert!(matches!(dir.lock("file:x"), Err(StateError::Locked { .. })));
        drop(held);
        dir.lock("file:x").unwrap();
    }

    #[test]
    fn distinct_targets_get_distinct_dirs() {
        let root = tempfile::tempdir().unwrap();
        let a = StateDir::for_target(root.path(), "file:a/b").unwrap();
        let b = StateDir::for_target(root.path(), "file:a_b").unwrap();
        assert_ne!(a.dir, b.dir);
    }

    #[test]
    fn corrupt_state_is_reported_with_advice() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::for_target(root.path(), "file:x").unwrap();
        fs::write(dir.state_path(), b"{not json").unwrap();
        let err = dir.load().unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("start this target's replication over"), "{err}");
    }
}
