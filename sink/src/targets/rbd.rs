//! RBD targets (`rbd:POOL/IMAGE`, `rbd:POOL/NAMESPACE/IMAGE`), written straight into Ceph through
//! librbd with many asynchronous requests in flight. The image is created when missing (layering,
//! exclusive-lock, object-map, fast-diff, deep-flatten), grown when smaller than the source,
//! never shrunk. Replication state lives in the image's metadata (`blockship.state`), so a sink on
//! another host can resume; every committed epoch becomes a snapshot `blockship-<epoch>`, of
//! which the newest N are kept.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::librbd::{self, ConnectOptions, Image, IoCtx, Rados, RbdError};
use super::ownership::{self, Verdict};
use super::{Access, Opened, TargetError, TargetName};
use crate::state::ReplicationState;

/// Image metadata key holding the replication state (JSON).
pub const STATE_KEY: &str = "blockship.state";
/// Prefix of the per-epoch snapshots.
pub const SNAP_PREFIX: &str = "blockship-";
/// The final point in time of a cutover.
pub const FINAL_SNAP: &str = "blockship-final";

/// Features of images Blockship creates.
pub const FEATURES: u64 = librbd::FEATURE_LAYERING
    | librbd::FEATURE_EXCLUSIVE_LOCK
    | librbd::FEATURE_OBJECT_MAP
    | librbd::FEATURE_FAST_DIFF
    | librbd::FEATURE_DEEP_FLATTEN;

pub use blockship_ceph::RbdSpec;

/// How the sink reaches Ceph (Ceph's usual client settings).
#[derive(Debug, Clone)]
pub struct CephOptions {
    pub conf: Option<PathBuf>,
    pub id: String,
    pub keyring: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
    /// Per-epoch snapshots kept on each image.
    pub keep_snapshots: u32,
}

impl Default for CephOptions {
    fn default() -> Self {
        CephOptions {
            conf: None,
            id: "admin".into(),
            keyring: None,
            connect_timeout: Duration::from_secs(15),
            op_timeout: Duration::from_secs(300),
            keep_snapshots: 2,
        }
    }
}

/// The cluster connection, made on first use and shared by all sessions.
pub struct Ceph {
    pub opts: CephOptions,
    cluster: tokio::sync::Mutex<Option<Arc<Rados>>>,
}

impl Ceph {
    pub fn new(opts: CephOptions) -> Self {
        Ceph { opts, cluster: tokio::sync::Mutex::new(None) }
    }

    async fn cluster(&self, name: &TargetName) -> Result<Arc<Rados>, TargetError> {
        let mut guard = self.cluster.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let opts = self.opts.clone();
        let rados = tokio::task::spawn_blocking(move || {
            Rados::connect(&ConnectOptions {
                conf: opts.conf.as_deref(),
                id: &opts.id,
                keyring: opts.keyring.as_deref(),
                connect_timeout: opts.connect_timeout,
                op_timeout: opts.op_timeout,
            })
        })
        .await
        .map_err(|e| TargetError::io(name, "connect to Ceph", e.into()))?
        .map_err(|source| TargetError::Ceph { name: name.to_string(), source })?;
        let rados = Arc::new(rados);
        *guard = Some(rados.clone());
        Ok(rados)
    }

    pub(crate) async fn ioctx(&self, name: &TargetName, spec: &RbdSpec) -> Result<Arc<IoCtx>, TargetError> {
        let rados = self.cluster(name).await?;
        let (pool, ns) = (spec.pool.clone(), spec.namespace.clone());
        let io = blocking(name, move || rados.ioctx(&pool, ns.as_deref())).await;
        match io {
            Err(TargetError::Ceph { source, .. }) if source.errno() == Some(libc::ENOENT) => {
                Err(TargetError::BadName {
                    name: name.to_string(),
                    reason: format!("pool {:?} does not exist", spec.pool),
                })
            }
            other => other.map(Arc::new),
        }
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    name: &TargetName,
    f: impl FnOnce() -> Result<T, RbdError> + Send + 'static,
) -> Result<T, TargetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TargetError::io(name, "librbd call", e.into()))?
        .map_err(|source| TargetError::Ceph { name: name.to_string(), source })
}

pub struct RbdTarget {
    image: Image,
    size: u64,
    name: TargetName,
    keep: u32,
    /// Refreshes the ownership record while a writer has the image open.
    _heartbeat: Option<Heartbeat>,
}

struct Heartbeat(tokio::task::JoinHandle<()>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Take `image`'s exclusive lock for writing (see `ownership`): free, or held by a sink that is
/// gone (its lock is broken), or refused with who holds it. Starts the heartbeat.
async fn take_ownership(image: &Image, name: &TargetName) -> Result<Heartbeat, TargetError> {
    let (img, n) = (image.clone(), name.to_string());
    let taken = blocking(name, move || {
        if img.is_lock_owner()? {
            return Ok(Ok(img.lock_owners()?.into_iter().next().unwrap_or_default()));
        }
        // A lock of this very process may be an earlier handle still closing (its release on
        // its way): give it OWN_RELEASE_WAIT to go before judging it stale.
        let patience = std::time::Instant::now() + ownership::OWN_RELEASE_WAIT;
        loop {
            let owners = img.lock_owners()?;
            let record = img.metadata_get(ownership::OWNER_KEY)?.and_then(|t| serde_json::from_str(&t).ok());
            match ownership::judge(&n, &owners, record.as_ref(), unix_now()) {
                Verdict::Free => {}
                Verdict::Dead(why) => {
                    tracing::warn!(target = %n, "breaking the image's exclusive lock: {why}");
                    for o in &owners {
                        img.lock_break(o)?;
                    }
                }
                Verdict::Held(why) => return Ok(Err(why)),
                Verdict::Ours(_) if std::time::Instant::now() < patience => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Verdict::Ours(why) => {
                    // Safe: the lease registry (lease.rs) admits one writer per target, and a
                    // lease is released only after its Disk, and with it the Target, is dropped;
                    // a clone of the old handle still blocked in the cluster (an outage) had
                    // OWN_RELEASE_WAIT to finish first.
                    tracing::warn!(target = %n, "removing a stale exclusive lock: {why}");
                    img.break_own_stale_lock()?;
                }
            }
            break;
        }
        img.lock_acquire()?;
        let addr = img.lock_owners()?.into_iter().next().unwrap_or_default();
        let record = serde_json::to_string(&ownership::me(&addr, unix_now())).expect("owner serializes");
        img.metadata_set(ownership::OWNER_KEY, &record)?;
        Ok(Ok(addr))
    })
    .await?;
    let addr = taken.map_err(|reason| TargetError::Busy { name: name.to_string(), reason })?;
    let img = image.clone();
    Ok(Heartbeat(tokio::spawn(async move {
        loop {
            tokio::time::sleep(ownership::HEARTBEAT).await;
            let (img, addr) = (img.clone(), addr.clone());
            let beat = tokio::task::spawn_blocking(move || {
                let record =
                    serde_json::to_string(&ownership::me(&addr, unix_now())).expect("owner serializes");
                img.metadata_set(ownership::OWNER_KEY, &record)
            })
            .await;
            if let Ok(Err(e)) = beat {
                tracing::warn!("cannot refresh the image ownership heartbeat: {e}");
            }
        }
    })))
}

impl RbdTarget {
    pub async fn open(
        ceph: &Ceph,
        spec: &RbdSpec,
        name: &TargetName,
        size: u64,
        access: Access,
    ) -> Result<(Self, Opened), TargetError> {
        let io = ceph.ioctx(name, spec).await?;
        let image_name = spec.image.clone();
        let (io2, n2) = (io.clone(), image_name.clone());
        let (image, created) = match blocking(name, move || io2.open(&n2)).await {
            Ok(img) => (img, false),
            Err(TargetError::Ceph { source, .. }) if source.errno() == Some(libc::ENOENT) => {
                if access != Access::Create {
                    return Err(TargetError::NotFound { name: name.to_string() });
                }
                let (io3, n3) = (io.clone(), image_name.clone());
                blocking(name, move || {
                    match io3.create(&n3, size, FEATURES) {
                        // Another session created it first: fine, open it.
                        Err(e) if e.errno() == Some(libc::EEXIST) => {}
                        other => other?,
                    }
                    io3.open(&n3)
                })
                .await
                .map(|img| (img, true))?
            }
            Err(e) => return Err(e),
        };
        let img = image.clone();
        let current = blocking(name, move || img.size()).await?;
        if !created && access != Access::ReadOnly && access != Access::Repair && current > size {
            // Refused before anything (the ownership record included) is written to it.
            return Err(TargetError::WouldShrink {
                name: name.to_string(),
                target: current,
                source_size: size,
            });
        }
        let heartbeat = match access {
            Access::ReadOnly => None,
            _ => Some(take_ownership(&image, name).await?),
        };
        let opened = if created {
            Opened::Created
        } else if matches!(access, Access::ReadOnly | Access::Repair) || current == size {
            Opened::Existing
        } else if current < size {
            let img = image.clone();
            blocking(name, move || img.resize(size)).await?;
            Opened::Grown { from: current }
        } else {
            return Err(TargetError::WouldShrink {
                name: name.to_string(),
                target: current,
                source_size: size,
            });
        };
        let size = if matches!(access, Access::ReadOnly | Access::Repair) { current } else { size };
        Ok((
            RbdTarget {
                image,
                size,
                name: name.clone(),
                keep: ceph.opts.keep_snapshots,
                _heartbeat: heartbeat,
            },
            opened,
        ))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn err(&self, source: RbdError) -> TargetError {
        TargetError::Ceph { name: self.name.to_string(), source }
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), TargetError> {
        self.image.write(offset, data).await.map_err(|e| self.err(e))
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        // librbd takes a size_t per request; split very large extents to keep requests moderate.
        const MAX: u64 = 1 << 30;
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(MAX);
            self.image.write_zeroes(pos, n).await.map_err(|e| self.err(e))?;
            pos += n;
        }
        Ok(())
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, TargetError> {
        self.image.read(offset, len).await.map(Bytes::from).map_err(|e| self.err(e))
    }

    pub async fn flush(&self) -> Result<(), TargetError> {
        self.image.flush().await.map_err(|e| self.err(e))
    }

    /// Allocated extents of the image head.
    pub async fn allocated(&self) -> Result<Vec<(u64, u64)>, TargetError> {
        let (img, size) = (self.image.clone(), self.size);
        let d = blocking(&self.name, move || img.diff(None, 0, size, false)).await?;
        Ok(d.into_iter().filter(|e| e.exists).map(|e| (e.offset, e.len)).collect())
    }

    pub async fn load_state(&self) -> Result<Option<ReplicationState>, TargetError> {
        let img = self.image.clone();
        let text = blocking(&self.name, move || img.metadata_get(STATE_KEY)).await?;
        match text {
            None => Ok(None),
            Some(t) => serde_json::from_str(&t).map(Some).map_err(|e| TargetError::BadState {
                name: self.name.to_string(),
                reason: format!(
                    "image metadata {STATE_KEY} is not valid JSON ({e}); remove it to start over"
                ),
            }),
        }
    }

    /// Persist the state in image metadata (a synchronous, durable OSD operation).
    pub async fn store_state(&self, state: &ReplicationState) -> Result<(), TargetError> {
        let img = self.image.clone();
        let text = serde_json::to_string(state).expect("state serializes");
        blocking(&self.name, move || img.metadata_set(STATE_KEY, &text)).await
    }

    /// Snapshot the (flushed) image as `blockship-<epoch>`. A snapshot of that name is left over
    /// from an attempt at this epoch that crashed before its commit was recorded: replaced.
    pub async fn snapshot_epoch(&self, epoch: u64) -> Result<(), TargetError> {
        self.replace_snapshot(format!("{SNAP_PREFIX}{epoch}")).await
    }

    /// Snapshot the image as `blockship-final` (a cutover's final point in time), replacing an
    /// older one (of a cutover later abandoned with `--force-resume`).
    pub async fn snapshot_final(&self) -> Result<(), TargetError> {
        self.replace_snapshot(FINAL_SNAP.to_string()).await
    }

    async fn replace_snapshot(&self, name: String) -> Result<(), TargetError> {
        let img = self.image.clone();
        blocking(&self.name, move || {
            if img.snap_list()?.iter().any(|(_, n)| *n == name) {
                img.snap_remove(&name)?;
            }
            img.snap_create(&name)
        })
        .await
    }

    /// Keep the newest N epoch snapshots up to `committed` and remove older ones (snapshots of
    /// later, uncommitted epochs are left to the commit that replaces them). Every removal is
    /// tried; the first error is returned after the others.
    pub async fn prune(&self, committed: u64) -> Result<(), TargetError> {
        let (img, keep) = (self.image.clone(), self.keep.max(1) as usize);
        blocking(&self.name, move || {
            let mut ours: Vec<(u64, String)> = img
                .snap_list()?
                .into_iter()
                .filter_map(|(_, n)| {
                    n.strip_prefix(SNAP_PREFIX).and_then(|e| e.parse().ok()).map(|e: u64| (e, n))
                })
                .filter(|(e, _)| *e <= committed)
                .collect();
            ours.sort();
            let excess = ours.len().saturating_sub(keep);
            let mut first_error = None;
            for (_, n) in ours.into_iter().take(excess) {
                if let Err(e) = img.snap_remove(&n) {
                    tracing::warn!(snapshot = %n, "cannot remove an old epoch snapshot (clones or protection?): {e}");
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
        .await
    }

    /// Epochs that have a `blockship-<epoch>` snapshot, oldest first.
    pub async fn epoch_snapshots(&self) -> Result<Vec<u64>, TargetError> {
        let img = self.image.clone();
        let list = blocking(&self.name, move || img.snap_list()).await?;
        let mut v: Vec<u64> = list
            .into_iter()
            .filter_map(|(_, n)| n.strip_prefix(SNAP_PREFIX).and_then(|e| e.parse().ok()))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Failback: this image was the source of a replication whose epoch `epoch` is the last the
    /// replica shares: return it to its source snapshot `blockship-src-<epoch>` (discarding
    /// what was written after it) and mark that point in time as this target's epoch.
    pub async fn adopt(&self, epoch: u64) -> Result<(), TargetError> {
        let (img, name) = (self.image.clone(), self.name.clone());
        let src = format!("blockship-src-{epoch}");
        let has = blocking(&self.name, move || Ok(img.snap_list()?.iter().any(|(_, n)| *n == src))).await?;
        if !has {
            return Err(TargetError::BadName {
                name: name.to_string(),
                reason: format!(
                    "it has no snapshot blockship-src-{epoch}, so it is not the original image whose epoch {epoch} the failback source holds"
                ),
            });
        }
        let img = self.image.clone();
        blocking(&self.name, move || img.snap_rollback(&format!("blockship-src-{epoch}"))).await?;
        self.snapshot_epoch(epoch).await
    }

    /// Roll the image back to snapshot `blockship-<epoch>`.
    pub async fn rollback_to(&self, epoch: u64) -> Result<(), TargetError> {
        let img = self.image.clone();
        blocking(&self.name, move || img.snap_rollback(&format!("{SNAP_PREFIX}{epoch}"))).await
    }
}
