//! Targets: where replicated disks land. A target name (`file:REL/NAME`, `rbd:POOL/IMAGE`,
//! `null:NAME` for link benchmarks) is
//! parsed and checked here; the `Target` enum dispatches positioned writes, zeroing, reads,
//! flushes, replication state and per-epoch snapshots to the backend.

pub mod direct;
pub mod file;
pub mod null;
pub mod ownership;
pub mod rbd;

pub use blockship_ceph as librbd;

use std::fmt;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;

use crate::state::{ReplicationState, StateDir, StateError};

/// Why a target could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("bad target name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("target {name} does not exist")]
    NotFound { name: String },
    #[error("target {name} escapes the file root: {reason}")]
    OutsideRoot { name: String, reason: String },
    #[error("target {name}: {what}: {source}")]
    Io { name: String, what: &'static str, source: std::io::Error },
    #[error("target {name} is {target} bytes but the source is {source_size}: Blockship grows targets but never shrinks them")]
    WouldShrink { name: String, target: u64, source_size: u64 },
    #[error("{0} targets are not enabled on this sink")]
    Disabled(&'static str),
    #[error("target {name}: {source}")]
    Ceph { name: String, source: librbd::RbdError },
    #[error("target {name}: {reason}")]
    BadState { name: String, reason: String },
    #[error("{reason}")]
    Busy { name: String, reason: String },
}

impl From<StateError> for TargetError {
    fn from(e: StateError) -> Self {
        TargetError::BadState { name: String::new(), reason: e.to_string() }
    }
}

impl TargetError {
    pub fn io(name: &TargetName, what: &'static str, source: std::io::Error) -> Self {
        TargetError::Io { name: name.to_string(), what, source }
    }
}

/// A parsed target name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetName {
    /// A regular file below the sink's file root.
    File(PathBuf),
    /// A Ceph RBD image.
    Rbd(rbd::RbdSpec),
    /// Verified and discarded (`blockship-agent bench`).
    Null(String),
}

impl TargetName {
    pub fn parse(name: &str) -> Result<Self, TargetError> {
        let bad = |reason: &str| TargetError::BadName { name: name.to_string(), reason: reason.to_string() };
        let (scheme, rest) =
            name.split_once(':').ok_or_else(|| bad("expected SCHEME:PATH, e.g. file:vm1/disk0"))?;
        match scheme {
            "file" => {
                if rest.is_empty() {
                    return Err(bad("empty path"));
                }
                if rest.contains('\0') {
                    return Err(bad("NUL byte in path"));
                }
                let path = Path::new(rest);
                if path.is_absolute() {
                    return Err(TargetError::OutsideRoot {
                        name: name.to_string(),
                        reason: "absolute paths are refused; name a path relative to the sink's --file-root"
                            .into(),
                    });
                }
                let mut clean = PathBuf::new();
                for c in path.components() {
                    match c {
                        Component::Normal(p) => clean.push(p),
                        Component::CurDir => {}
                        Component::ParentDir => {
                            return Err(TargetError::OutsideRoot {
                                name: name.to_string(),
                                reason: "'..' is refused in target paths".into(),
                            })
                        }
                        Component::RootDir | Component::Prefix(_) => {
                            return Err(TargetError::OutsideRoot {
                                name: name.to_string(),
                                reason: "absolute paths are refused".into(),
                            })
                        }
                    }
                }
                if clean.as_os_str().is_empty() {
                    return Err(bad("path names no file"));
                }
                Ok(TargetName::File(clean))
            }
            "rbd" => Ok(TargetName::Rbd(rbd::RbdSpec::parse(rest).map_err(|r| bad(&r.to_string()))?)),
            "null" => {
                // `null:` alone is fine; a name lets several benches run at once.
                if !rest.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                    return Err(bad("a null target's name is letters, digits, '-', '_' and '.'"));
                }
                Ok(TargetName::Null(rest.to_string()))
            }
            other => Err(bad(&format!("unknown target type {other:?} (supported: file, rbd, null)"))),
        }
    }

    /// Kind of backend, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            TargetName::File(_) => "file",
            TargetName::Rbd(_) => "rbd",
            TargetName::Null(_) => "null",
        }
    }
}

impl fmt::Display for TargetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetName::File(p) => write!(f, "file:{}", p.display()),
            TargetName::Rbd(spec) => write!(f, "rbd:{spec}"),
            TargetName::Null(n) => write!(f, "null:{n}"),
        }
    }
}

/// Where the sink may put targets.
#[derive(Clone, Default)]
pub struct TargetRoots {
    pub file_root: Option<PathBuf>,
    pub ceph: Option<std::sync::Arc<rbd::Ceph>>,
}

/// An open target.
pub enum Target {
    File(file::FileTarget),
    Rbd(rbd::RbdTarget),
    Null(null::NullTarget),
}

/// How a target is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Create it with the source size if missing; grow it if smaller.
    Create,
    /// It must exist; grow it if smaller.
    Existing,
    /// It must exist; never modified (verification).
    ReadOnly,
    /// It must exist; opened for writing with its size untouched (rollback).
    Repair,
}

/// How an open target came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Created,
    Existing,
    Grown { from: u64 },
}

impl Target {
    /// Open `name` for a source of `size` bytes: create it if missing (with `Access::Create`),
    /// grow it if smaller, refuse if larger (a shrink would be needed).
    pub async fn open(
        name: &TargetName,
        roots: &TargetRoots,
        size: u64,
        access: Access,
    ) -> Result<(Target, Opened), TargetError> {
        match name {
            TargetName::File(rel) => {
                let root = roots.file_root.clone().ok_or(TargetError::Disabled("file (no --file-root)"))?;
                let (rel, n) = (rel.clone(), name.clone());
                let (t, opened) = tokio::task::spawn_blocking(move || {
                    file::FileTarget::open(&root, &rel, &n, size, access)
                })
                .await
                .map_err(|e| TargetError::Io {
                    name: String::new(),
                    what: "open",
                    source: e.into(),
                })??;
                tracing::debug!(target = %name, direct_io = t.direct_io(), "file target opened");
                Ok((Target::File(t), opened))
            }
            TargetName::Rbd(spec) => {
                let ceph = roots.ceph.as_ref().ok_or(TargetError::Disabled("rbd (started with --no-rbd)"))?;
                let (t, opened) = rbd::RbdTarget::open(ceph, spec, name, size, access).await?;
                Ok((Target::Rbd(t), opened))
            }
            TargetName::Null(_) => {
                let (t, opened) = null::NullTarget::open(name, size, access)?;
                Ok((Target::Null(t), opened))
            }
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Target::File(t) => t.size(),
            Target::Rbd(t) => t.size(),
            Target::Null(t) => t.size(),
        }
    }

    /// Write `data` at `offset` (already verified and bounds-checked by the caller).
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), TargetError> {
        match self {
            Target::File(t) => t.write(offset, data).await,
            Target::Rbd(t) => t.write(offset, data).await,
            Target::Null(_) => Ok(()),
        }
    }

    /// Make `[offset, offset+len)` read as zeros.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        match self {
            Target::File(t) => t.write_zeroes(offset, len).await,
            Target::Rbd(t) => t.write_zeroes(offset, len).await,
            Target::Null(_) => Ok(()),
        }
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, TargetError> {
        match self {
            Target::File(t) => t.read(offset, len).await,
            Target::Rbd(t) => t.read(offset, len).await,
            Target::Null(t) => Ok(t.read(len)),
        }
    }

    /// Make every completed write durable.
    pub async fn flush(&self) -> Result<(), TargetError> {
        match self {
            Target::File(t) => t.flush().await,
            Target::Rbd(t) => t.flush().await,
            Target::Null(_) => Ok(()),
        }
    }

    /// Whether a target this open created reads as zeros everywhere. Only file targets vouch for
    /// it; an RBD image may sit under an encryption layer, so zeros are always written there.
    pub fn zero_filled_when_created(&self) -> bool {
        matches!(self, Target::File(_))
    }

    /// Ranges that may hold data; everything else reads as zeros.
    pub async fn allocated(&self) -> Result<Vec<(u64, u64)>, TargetError> {
        match self {
            Target::File(t) => t.allocated().await,
            Target::Rbd(t) => t.allocated().await,
            Target::Null(_) => Ok(Vec::new()),
        }
    }

    /// The replication state kept with the data (RBD: image metadata; files: the state dir).
    pub async fn load_state(&self, dir: &StateDir) -> Result<Option<ReplicationState>, TargetError> {
        match self {
            Target::File(_) | Target::Null(_) => {
                let d = dir.clone();
                tokio::task::spawn_blocking(move || d.load())
                    .await
                    .map_err(|e| TargetError::Io {
                        name: String::new(),
                        what: "load state",
                        source: e.into(),
                    })?
                    .map_err(TargetError::from)
            }
            Target::Rbd(t) => t.load_state().await,
        }
    }

    /// Persist the replication state durably.
    pub async fn store_state(&self, dir: &StateDir, state: &ReplicationState) -> Result<(), TargetError> {
        match self {
            Target::File(_) | Target::Null(_) => {
                let (d, s) = (dir.clone(), state.clone());
                tokio::task::spawn_blocking(move || d.store(&s))
                    .await
                    .map_err(|e| TargetError::Io {
                        name: String::new(),
                        what: "store state",
                        source: e.into(),
                    })?
                    .map_err(TargetError::from)
            }
            Target::Rbd(t) => {
                t.store_state(state).await?;
                // The listing copy is best effort: the image metadata is the record.
                let (d, s) = (dir.clone(), state.clone());
                match tokio::task::spawn_blocking(move || d.store_copy(&s)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "status copy of an RBD target's state not written")
                    }
                    Err(e) => tracing::warn!(error = %e, "status copy of an RBD target's state not written"),
                }
                Ok(())
            }
        }
    }

    /// Mark the point in time of an epoch about to be committed (RBD: snapshot
    /// `blockship-<epoch>`, replacing a leftover of an attempt that crashed before its commit
    /// was recorded). Files: nothing (their undo journal holds the previous point in time).
    pub async fn mark_epoch(&self, epoch: u64) -> Result<(), TargetError> {
        match self {
            Target::File(_) | Target::Null(_) => Ok(()),
            Target::Rbd(t) => t.snapshot_epoch(epoch).await,
        }
    }

    /// Mark the final point in time of a cutover (RBD: snapshot `blockship-final` of the
    /// committed head, replacing an older one). Files: nothing (the state records the epoch).
    pub async fn mark_final(&self) -> Result<(), TargetError> {
        match self {
            Target::File(_) | Target::Null(_) => Ok(()),
            Target::Rbd(t) => t.snapshot_final().await,
        }
    }

    /// Failback: take this original image back to the last epoch its replica shares (see
    /// `RbdTarget::adopt`). Files cannot: they keep no source snapshots.
    pub async fn adopt(&self, name: &str, epoch: u64) -> Result<(), TargetError> {
        match self {
            Target::File(_) | Target::Null(_) => Err(TargetError::BadName {
                name: name.to_string(),
                reason: "failback needs an RBD image with its blockship-src-<N> snapshot".into(),
            }),
            Target::Rbd(t) => t.adopt(epoch).await,
        }
    }

    /// After the commit of `committed` is recorded: drop the points in time no longer kept (RBD:
    /// all but the newest N epoch snapshots up to `committed`).
    pub async fn release_older(&self, committed: u64) -> Result<(), TargetError> {
        match self {
            Target::File(_) | Target::Null(_) => Ok(()),
            Target::Rbd(t) => t.prune(committed).await,
        }
    }
}
