//! Sources: where the agent reads disks from. `Source` reads byte ranges and reports which
//! ranges hold data at all (holes need not be read): raw files and block devices, NBD exports,
//! RBD snapshots. `Origin` is the disk being replicated and its life cycle per epoch: probe it
//! (size, identity), freeze a point in time (a VMware or RBD snapshot; files and NBD exports are
//! read as they are), then finish (drop the snapshot once the sink made the epoch durable, keep
//! it when the epoch failed). Every point in time has a view identity: an interrupted epoch is
//! retried from the view it was reading when that view still exists, and resumes only from it.

pub mod file;
pub mod group;
pub mod nbd;
pub mod qemu;
pub mod rbd;
pub mod synthetic;
pub mod uring;
pub mod vmware;

use std::sync::Arc;

use bytes::Bytes;

use crate::extents::Extent;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {source_name}: {what}: {err}")]
    Io { source_name: String, what: &'static str, err: std::io::Error },
    #[error("source {0}: size is 0")]
    Empty(String),
    #[error(transparent)]
    Nbd(#[from] nbd::NbdError),
    #[error(transparent)]
    Rbd(#[from] rbd::RbdSourceError),
    #[error(transparent)]
    Vmware(#[from] vmware::VmwareError),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error("internal error: a point in time where nothing changed has nothing to read")]
    NothingToRead,
}

/// Something the agent can read a disk from.
pub enum Source {
    File(file::FileSource),
    Nbd(Arc<nbd::NbdSource>),
    Rbd(rbd::RbdView),
    /// Generated data (`synthetic:PROFILE:SIZE`, for `bench`).
    Synthetic(synthetic::SyntheticSource),
    /// A point in time at which nothing changed since the last committed one (of this size):
    /// its epoch sends nothing, so it is never read.
    Unchanged(u64),
}

impl Source {
    pub fn size(&self) -> u64 {
        match self {
            Source::File(f) => f.size(),
            Source::Nbd(n) => n.size(),
            Source::Rbd(r) => r.size(),
            Source::Synthetic(s) => s.size(),
            Source::Unchanged(size) => *size,
        }
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, SourceError> {
        Ok(match self {
            Source::File(f) => f.read(offset, len).await?,
            Source::Nbd(n) => n.read(offset, len).await?,
            Source::Rbd(r) => r.read(offset, len).await?,
            Source::Synthetic(s) => s.read(offset, len).await?,
            Source::Unchanged(_) => return Err(SourceError::NothingToRead),
        })
    }

    /// Ranges that may hold non-zero data (sorted, merged); everything else reads as zeros.
    pub async fn allocated(&self) -> Result<Vec<Extent>, SourceError> {
        Ok(match self {
            Source::File(f) => f.allocated().await?,
            Source::Nbd(n) => n.allocated().await?,
            Source::Rbd(r) => r.allocated().await?,
            Source::Synthetic(s) => s.allocated(),
            Source::Unchanged(_) => return Err(SourceError::NothingToRead),
        })
    }

    /// How reads are done, for the summary ("io_uring", "pread", "nbd", "librbd").
    pub fn reader(&self) -> &'static str {
        match self {
            Source::File(f) => f.reader(),
            Source::Nbd(_) => "nbd",
            Source::Rbd(_) => "librbd",
            Source::Synthetic(_) => "generated",
            Source::Unchanged(_) => "none",
        }
    }
}

/// Settings for the source kinds that need them.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    pub ceph: rbd::CephClient,
    pub vmware: Option<vmware::VmwareOptions>,
    /// Use io_uring for file reads where the kernel allows it.
    pub io_uring: bool,
}

/// The disk being replicated.
pub enum Origin {
    /// A file, block device or NBD export, read as it is (the caller froze it if needed).
    Plain {
        spec: String,
        source: Arc<Source>,
    },
    Rbd(rbd::RbdOrigin),
    /// Disk `.1` of a VMware VM (frozen with the VM's other replicated disks; see `group`).
    Vmware(Arc<vmware::VmwareOrigin>, usize),
    /// Disk `.1` of a running QEMU (frozen with the VM's other disks; see `group`).
    Qemu(Arc<qemu::QemuVm>, usize),
}

/// What a frozen point in time needs undone or kept when the epoch ends.
pub enum Hold {
    Nothing,
    Rbd(rbd::RbdView),
    Vmware(vmware::VmwareView),
    Qemu(qemu::QemuView),
}

/// A point in time to replicate.
pub struct PointInTime {
    pub source: Arc<Source>,
    /// The change point this epoch establishes, when the platform defines it.
    pub change_point: Option<String>,
    pub hold: Hold,
    /// Identity of this frozen view ("" = unknown: an epoch reading it never resumes).
    pub view: String,
}

impl PointInTime {
    /// The point in time of a disk of `size` bytes that has not changed since the last committed
    /// epoch, whose change point `point` still records: nothing to read, nothing to hold.
    pub fn unchanged(size: u64, point: &str) -> PointInTime {
        PointInTime {
            source: Arc::new(Source::Unchanged(size)),
            change_point: Some(point.to_string()),
            hold: Hold::Nothing,
            view: String::new(),
        }
    }

    pub fn is_unchanged(&self) -> bool {
        matches!(self.source.as_ref(), Source::Unchanged(_))
    }
}

/// What the agent knows when it freezes the point in time of an epoch.
#[derive(Debug, Clone, Copy)]
pub struct Freeze<'a> {
    pub epoch: u64,
    /// The view an interrupted attempt at this epoch was reading, as the sink recorded it.
    pub prior_view: Option<&'a str>,
    /// The change point declared for this epoch (`--change-point`): it names the frozen view
    /// of an NBD export (the dirty bitmap that started when the view was frozen).
    pub declared_point: Option<&'a str>,
    /// The change point the target holds (of its last committed epoch).
    pub stored_point: Option<&'a str>,
    /// The target written: VM snapshots are tagged with it, so a run only ever cleans up its own.
    pub target: &'a str,
}

impl Origin {
    /// Open a source by its command-line name: a path, `nbd://...`, `nbd+unix://...`,
    /// `rbd:POOL/IMAGE`, or `vmware` (with `SourceOptions::vmware`).
    pub async fn open(spec: &str, opts: &SourceOptions) -> Result<Origin, SourceError> {
        if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
            let n = nbd::NbdSource::connect(spec, None).await?;
            return Ok(Origin::Plain { spec: spec.into(), source: Arc::new(Source::Nbd(Arc::new(n))) });
        }
        if spec.starts_with("rbd:") {
            return Ok(Origin::Rbd(
                rbd::RbdOrigin::open(
                    rbd::RbdSpec::parse_uri(spec).map_err(rbd::RbdSourceError::from)?,
                    &opts.ceph,
                )
                .await?,
            ));
        }
        if let Some(rest) = spec.strip_prefix("synthetic:") {
            let s = synthetic::SyntheticSource::parse(rest)?;
            return Ok(Origin::Plain { spec: spec.into(), source: Arc::new(Source::Synthetic(s)) });
        }
        if spec == "vmware" || spec.starts_with("vmware://") {
            let v = opts.vmware.clone().ok_or_else(|| {
                vmware::VmwareError::Config("a vmware source needs --vcenter, --vm and credentials".into())
            })?;
            return Ok(Origin::Vmware(Arc::new(vmware::VmwareOrigin::open(v).await?), 0));
        }
        let path = spec.strip_prefix("file:").unwrap_or(spec);
        let f = file::FileSource::open(std::path::Path::new(path), opts.io_uring)?;
        Ok(Origin::Plain { spec: spec.into(), source: Arc::new(Source::File(f)) })
    }

    pub fn size(&self) -> u64 {
        match self {
            Origin::Plain { source, .. } => source.size(),
            Origin::Rbd(r) => r.size(),
            Origin::Vmware(v, i) => v.size(*i),
            Origin::Qemu(vm, i) => vm.disks[*i].size,
        }
    }

    /// A stable identity of the disk, recorded by the sink with the replica.
    pub fn disk_id(&self) -> String {
        match self {
            Origin::Plain { source, spec } => match source.as_ref() {
                Source::File(f) => f.disk_id(),
                Source::Nbd(n) => n.disk_id(),
                Source::Rbd(_) | Source::Synthetic(_) | Source::Unchanged(_) => spec.clone(),
            },
            Origin::Rbd(r) => r.disk_id(),
            Origin::Vmware(v, i) => v.disk_id(*i),
            Origin::Qemu(vm, i) => vm.disk_id(*i),
        }
    }

    /// Freeze the point in time of an epoch (or take up again the one an interrupted attempt
    /// was reading).
    pub async fn freeze(&self, f: &Freeze<'_>) -> Result<PointInTime, SourceError> {
        Ok(match self {
            Origin::Plain { source, spec } => {
                let view = match source.as_ref() {
                    Source::File(file) => file.view_id()?,
                    // An export is a frozen view only if its owner says which: the change point
                    // that started at the freeze names it.
                    Source::Nbd(_) => f.declared_point.map(|p| format!("{spec}@{p}")).unwrap_or_default(),
                    Source::Rbd(r) => r.id.clone(),
                    Source::Synthetic(s) => s.view_id(),
                    Source::Unchanged(_) => String::new(),
                };
                PointInTime { source: source.clone(), change_point: None, hold: Hold::Nothing, view }
            }
            Origin::Rbd(r) => {
                let view = r.freeze(f.epoch, f.prior_view).await?;
                PointInTime {
                    source: Arc::new(Source::Rbd(view.clone())),
                    change_point: Some(view.name.clone()),
                    view: view.id.clone(),
                    hold: Hold::Rbd(view),
                }
            }
            Origin::Qemu(vm, _) => {
                // A QEMU disk alone is a group of one: its freeze is the VM's.
                let mut points = vm.freeze(std::slice::from_ref(f)).await?;
                points.pop().ok_or_else(|| qemu::QemuError::Other("no point in time".into()))?
            }
            Origin::Vmware(v, _) => {
                let view = v.freeze(f.epoch, &[f.prior_view], &[f.target]).await?.pop().ok_or_else(|| {
                    vmware::VmwareError::Config("the VM snapshot gave no view of the disk".into())
                })?;
                PointInTime {
                    source: Arc::new(Source::Nbd(view.reader.clone())),
                    change_point: view.change_id.clone(),
                    view: view.id.clone(),
                    hold: Hold::Vmware(view),
                }
            }
        })
    }

    /// End of an epoch: on success keep the new point and drop older ones; on failure keep the
    /// new point, so a retry reads the same view (it is dropped once an epoch commits).
    pub async fn finish(&self, point: PointInTime, committed: bool) -> Result<(), SourceError> {
        if let (Origin::Qemu(vm, _), Hold::Qemu(_)) = (self, &point.hold) {
            return Ok(vm.finish(vec![point], committed).await?);
        }
        let PointInTime { source, hold, .. } = point;
        drop(source);
        match (self, hold) {
            (Origin::Rbd(r), Hold::Rbd(view)) => {
                if committed {
                    let removed = r.prune(&view.name).await?;
                    if !removed.is_empty() {
                        tracing::info!(?removed, "older source snapshots removed");
                    }
                } else {
                    tracing::info!(snapshot = %view.name, "epoch not committed: the source snapshot is kept for the retry");
                }
            }
            (Origin::Vmware(v, _), Hold::Vmware(view)) => v.finish(vec![view], committed).await?,
            _ => {}
        }
        Ok(())
    }

    pub async fn close(&self) {
        match self {
            Origin::Plain { source, .. } => {
                if let Source::Nbd(n) = source.as_ref() {
                    let _ = n.disconnect().await;
                }
            }
            Origin::Vmware(v, _) => v.logout().await,
            Origin::Rbd(_) | Origin::Qemu(..) => {}
        }
    }
}
