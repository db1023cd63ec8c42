//! RBD sources (`rbd:POOL/IMAGE`, `rbd:POOL/NAMESPACE/IMAGE`) for DR between Ceph clusters. Each
//! epoch reads from a snapshot `blockship-src-<epoch>` of the source image; the changed extents
//! come from `rbd_diff_iterate2` against the snapshot of the last replicated epoch (the change
//! point the sink stored). A snapshot is kept until its epoch commits: a retry of an interrupted
//! epoch reads the same snapshot (identified by name and id) instead of a later point in time,
//! and older snapshots are removed only after the sink acknowledged the new epoch as durable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blockship_ceph::{ConnectOptions, Image, IoCtx, Rados, RbdError};
use bytes::Bytes;

use crate::extents::{normalize, Extent};

/// Prefix of the source snapshots Blockship creates.
pub const SNAP_PREFIX: &str = "blockship-src-";

#[derive(Debug, thiserror::Error)]
pub enum RbdSourceError {
    #[error("rbd source {image}: {source}")]
    Ceph { image: String, source: RbdError },
    #[error("rbd source: {0}")]
    BadName(#[from] blockship_ceph::SpecError),
    #[error("rbd source {0}: {1}")]
    Other(String, String),
}

/// How the agent reaches the source cluster.
#[derive(Debug, Clone, Default)]
pub struct CephClient {
    pub conf: Option<PathBuf>,
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
}

pub use blockship_ceph::RbdSpec;

/// The source image (head), before a point in time is frozen.
pub struct RbdOrigin {
    spec: RbdSpec,
    io: Arc<IoCtx>,
    head: Image,
    size: u64,
}

/// A frozen point in time: the image opened at snapshot `blockship-src-<epoch>`.
#[derive(Clone)]
pub struct RbdView {
    pub name: String,
    /// Name and snapshot id: the identity the sink records for a resume.
    pub id: String,
    image: Image,
    size: u64,
    spec: RbdSpec,
}

async fn blocking<T: Send + 'static>(
    spec: &RbdSpec,
    f: impl FnOnce() -> Result<T, RbdError> + Send + 'static,
) -> Result<T, RbdSourceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RbdSourceError::Other(spec.uri(), e.to_string()))?
        .map_err(|source| RbdSourceError::Ceph { image: spec.uri(), source })
}

impl RbdOrigin {
    pub async fn open(spec: RbdSpec, client: &CephClient) -> Result<RbdOrigin, RbdSourceError> {
        let (c, s) = (client.clone(), spec.clone());
        let (io, head) = blocking(&spec, move || {
            let rados = Arc::new(Rados::connect(&ConnectOptions {
                conf: c.conf.as_deref(),
                id: c.id.as_deref().unwrap_or("admin"),
                keyring: c.keyring.as_deref(),
                connect_timeout: Duration::from_secs(15),
                op_timeout: Duration::from_secs(300),
            })?);
            let io = Arc::new(rados.ioctx(&s.pool, s.namespace.as_deref())?);
            let head = io.open(&s.image)?;
            Ok((io, head))
        })
        .await?;
        let h = head.clone();
        let size = blocking(&spec, move || h.size()).await?;
        Ok(RbdOrigin { spec, io, head, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn disk_id(&self) -> String {
        self.spec.uri()
    }

    /// The point in time of epoch `epoch`: snapshot `blockship-src-<epoch>` of the head, opened
    /// for reading. An existing one is reused when it is the view `prior` (the view an
    /// interrupted attempt at this epoch was reading, as the sink recorded it); any other
    /// leftover of that name is replaced by a fresh snapshot.
    pub async fn freeze(&self, epoch: u64, prior: Option<&str>) -> Result<RbdView, RbdSourceError> {
        let name = format!("{SNAP_PREFIX}{epoch}");
        let (head, io, image, n) =
            (self.head.clone(), self.io.clone(), self.spec.image.clone(), name.clone());
        let (spec, prior) = (self.spec.clone(), prior.map(str::to_string));
        let (view, id, reused) = blocking(&self.spec, move || {
            let find = |head: &Image| -> Result<Option<u64>, RbdError> {
                Ok(head.snap_list()?.into_iter().find(|(_, s)| *s == n).map(|(id, _)| id))
            };
            let existing = find(&head)?;
            let reuse = existing.filter(|id| prior.as_deref() == Some(view_id(&spec, &n, *id).as_str()));
            let (id, reused) = match reuse {
                Some(id) => (id, true),
                None => {
                    if existing.is_some() {
                        head.snap_remove(&n)?;
                    }
                    head.snap_create(&n)?;
                    let id = find(&head)?.ok_or_else(|| {
                        RbdError::Invalid(format!("snapshot {n} missing right after it was created"))
                    })?;
                    (id, false)
                }
            };
            Ok((io.open_at(&image, Some(&n))?, id, reused))
        })
        .await?;
        if reused {
            tracing::info!(snapshot = %name, "retrying the interrupted epoch from its own snapshot");
        }
        let v = view.clone();
        let size = blocking(&self.spec, move || v.size()).await?;
        let id = view_id(&self.spec, &name, id);
        Ok(RbdView { name, id, image: view, size, spec: self.spec.clone() })
    }

    /// Open existing snapshot `name` for reading (verification of a replicated epoch).
    pub async fn view(&self, name: &str) -> Result<RbdView, RbdSourceError> {
        let (io, image, n) = (self.io.clone(), self.spec.image.clone(), name.to_string());
        let img = blocking(&self.spec, move || io.open_at(&image, Some(&n))).await?;
        let i = img.clone();
        let size = blocking(&self.spec, move || i.size()).await?;
        let id = format!("rbd:{}@{name}", self.spec);
        Ok(RbdView { name: name.to_string(), id, image: img, size, spec: self.spec.clone() })
    }

    /// Whether snapshot `name` still exists on the source.
    pub async fn has_snapshot(&self, name: &str) -> Result<bool, RbdSourceError> {
        let (head, n) = (self.head.clone(), name.to_string());
        blocking(&self.spec, move || Ok(head.snap_list()?.iter().any(|(_, s)| *s == n))).await
    }

    /// The newest epoch a Blockship sink snapshotted on this image when it was a replica
    /// target (`blockship-<N>`), 0 if none: the last epoch a failback starts from.
    pub async fn last_replica_epoch(&self) -> Result<u64, RbdSourceError> {
        let head = self.head.clone();
        let snaps = blocking(&self.spec, move || head.snap_list()).await?;
        Ok(snaps
            .iter()
            .filter_map(|(_, s)| s.strip_prefix("blockship-").and_then(|n| n.parse::<u64>().ok()))
            .max()
            .unwrap_or(0))
    }

    /// After the sink made `keep`'s epoch durable: remove every other Blockship source snapshot.
    pub async fn prune(&self, keep: &str) -> Result<Vec<String>, RbdSourceError> {
        let (head, keep) = (self.head.clone(), keep.to_string());
        blocking(&self.spec, move || {
            let mut removed = Vec::new();
            for (_, s) in head.snap_list()? {
                if s.starts_with(SNAP_PREFIX) && s != keep {
                    head.snap_remove(&s)?;
                    removed.push(s);
                }
            }
            Ok(removed)
        })
        .await
    }
}

/// The identity of snapshot `name` (with id `id`) of `spec`: a snapshot removed and created again
/// under the same name is another point in time and gets another id.
fn view_id(spec: &RbdSpec, name: &str, id: u64) -> String {
    format!("rbd:{spec}@{name}#{id}")
}

impl RbdView {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, RbdSourceError> {
        self.image
            .read(offset, len)
            .await
            .map(Bytes::from)
            .map_err(|source| RbdSourceError::Ceph { image: self.spec.uri(), source })
    }

    /// Allocated extents of the snapshot.
    pub async fn allocated(&self) -> Result<Vec<Extent>, RbdSourceError> {
        let (img, size) = (self.image.clone(), self.size);
        let d = blocking(&self.spec, move || img.diff(None, 0, size, false)).await?;
        Ok(normalize(d.into_iter().filter(|e| e.exists).map(|e| Extent::new(e.offset, e.len)).collect()))
    }

    /// Extents that differ between snapshot `from` and this one (discards included: they read
    /// as zeros now and are sent as zero extents).
    pub async fn changed_since(&self, from: &str) -> Result<Vec<Extent>, RbdSourceError> {
        let (img, size, from) = (self.image.clone(), self.size, from.to_string());
        let d = blocking(&self.spec, move || img.diff(Some(&from), 0, size, false)).await?;
        Ok(normalize(d.into_iter().map(|e| Extent::new(e.offset, e.len)).collect()))
    }
}
