//! One disk's epoch, on a disk handle of a link, from a frozen point in time: decide what to send
//! (everything allocated for a new target, the platform's changed extents since the change
//! point, or whatever differs from the target's hash index), resume after the durable offset
//! when the same plan is read from the same frozen view, stream the items through the link's
//! shared data queue, and end with the sink's acknowledgement: committed for a disk on its own,
//! prepared (all data durable) for a member of a group, which then commits with the group.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockship_proto::codec::Compression;
use blockship_proto::pb::{self, DiskOpened, EpochBegin, EpochCommit, SyncMode};
use blockship_proto::Body;

use super::delta::{allocation, delta, Delta};
use super::{Observer, Transfer};
use crate::changes::{plan_digest, Changes};
use crate::chunker::{self, Work};
use crate::extents::Extent;
use crate::link::DiskHandle;
use crate::pipeline::{self, Mode, Stats};
use crate::source::{Origin, PointInTime};
use crate::AgentError;

/// What the epoch of one disk is asked to do.
pub struct EpochRequest<'a> {
    pub target: &'a str,
    pub changes: &'a Changes,
    /// The change point declared for this epoch where the platform defines none.
    pub declared_point: Option<&'a str>,
    /// The extents of a change list file (`--changes cbt-file:`), already checked.
    pub file_extents: Option<&'a [Extent]>,
    /// The group the epoch belongs to: then it ends prepared, not committed.
    pub group: Option<&'a str>,
    /// Ask the sink for its CPU over the epoch (`bench`).
    pub measure: bool,
}

/// What an epoch did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EpochReport {
    pub epoch: u64,
    /// "full", "compare", "incremental", or "unchanged" (nothing changed: nothing read or sent).
    pub mode: String,
    /// Why a full or compare sync ran instead of the platform's change tracking ("" otherwise).
    pub note: String,
    pub change_point: String,
    pub reader: String,
    pub resumed_from: u64,
    pub disk_size: u64,
    pub bytes_scanned: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub bytes_data: u64,
    pub bytes_zero: u64,
    pub bytes_equal: u64,
    pub chunks_sent: u64,
    pub zero_extents: u64,
    pub seconds: f64,
    /// Identity of the frozen view that was read.
    pub view: String,
    /// The sink's CPU over the epoch, as it reported with its acknowledgement.
    #[serde(skip)]
    pub sink_usage: Option<pb::SinkUsage>,
}

/// What this epoch sends.
enum Plan {
    /// New target known to read as zeros: allocated data only.
    Fresh(Vec<Extent>),
    /// Every chunk, zero ones as zero extents (new RBD image, or `--changes full`).
    Everything(Vec<Extent>),
    /// Chunks whose digest differs from the target's hash index.
    Compare(Vec<Extent>),
    /// Exactly these changed extents.
    Incremental(Vec<Extent>),
}

impl Plan {
    fn mode(&self) -> SyncMode {
        match self {
            Plan::Fresh(_) | Plan::Everything(_) => SyncMode::Full,
            Plan::Compare(_) => SyncMode::Compare,
            Plan::Incremental(_) => SyncMode::Incremental,
        }
    }
}

fn usage(msg: impl Into<String>) -> AgentError {
    AgentError::Usage(msg.into())
}

/// Decide the plan of epoch `opened.committed_epoch + 1`; returns it with a note for the
/// operator when change tracking could not be used.
async fn plan(
    req: &EpochRequest<'_>,
    origin: &Origin,
    point: &PointInTime,
    opened: &DiskOpened,
) -> Result<(Plan, String), AgentError> {
    let stored = opened.change_point.as_str();
    if point.is_unchanged() {
        // Nothing changed since the stored change point, which the point in time keeps.
        if opened.created || point.change_point.as_deref() != Some(stored) {
            return Err(AgentError::Internal("an unchanged point in time for a new or moved target".into()));
        }
        return Ok((Plan::Incremental(Vec::new()), String::new()));
    }
    if opened.created {
        let alloc = allocation(origin, point).await?;
        return Ok((
            if opened.zero_filled { Plan::Fresh(alloc) } else { Plan::Everything(alloc) },
            String::new(),
        ));
    }
    Ok(match req.changes {
        Changes::Full => (Plan::Everything(allocation(origin, point).await?), String::new()),
        Changes::Compare => (Plan::Compare(allocation(origin, point).await?), String::new()),
        Changes::CbtFile(_) => {
            (Plan::Incremental(req.file_extents.unwrap_or_default().to_vec()), String::new())
        }
        Changes::NbdBitmap(name) => {
            if stored != name {
                return Err(usage(format!(
                    "the target's change point is {stored:?}, not bitmap {name:?}: that bitmap does not cover the time since the last epoch (use --changes auto or compare)"
                )));
            }
            match delta(req.changes, origin, point, stored).await? {
                Delta::Changed(extents) => (Plan::Incremental(extents), String::new()),
                Delta::Unusable(why) => return Err(usage(why)),
                Delta::Untracked => return Err(usage("this source has no dirty bitmaps")),
            }
        }
        Changes::Auto | Changes::Vmware | Changes::RbdSnap => {
            match delta(req.changes, origin, point, stored).await? {
                Delta::Changed(extents) => (Plan::Incremental(extents), String::new()),
                Delta::Unusable(why) => {
                    let note = format!("full resync (compare): {why}");
                    tracing::warn!(target = req.target, "{note}");
                    (Plan::Compare(allocation(origin, point).await?), note)
                }
                Delta::Untracked => (Plan::Compare(allocation(origin, point).await?), String::new()),
            }
        }
    })
}

/// Run the epoch; returns once the sink acknowledged it as committed (prepared, in a group).
pub async fn run(
    disk: &DiskHandle,
    opened: &DiskOpened,
    origin: &Origin,
    point: &PointInTime,
    req: EpochRequest<'_>,
    transfer: &Transfer,
    observer: &dyn Observer,
) -> Result<EpochReport, AgentError> {
    let started = Instant::now();
    let link = disk.link();
    let size = origin.size();
    let cs = opened.chunk_size;
    let epoch = opened.committed_epoch + 1;
    let (plan, note) = plan(&req, origin, point, opened).await?;
    let sync_mode = plan.mode();
    let change_point = match (&point.change_point, req.declared_point) {
        (Some(p), Some(flag)) if p != flag => {
            tracing::warn!(platform = %p, flag = %flag, "the platform defines the change point; --change-point ignored");
            p.clone()
        }
        (Some(p), _) => p.clone(),
        (None, Some(flag)) => flag.to_string(),
        (None, None) => String::new(),
    };

    let mut resumed_from = 0;
    let (mode, digest, planned, works): (Mode, Vec<u8>, u64, Box<dyn Iterator<Item = Work> + Send>) =
        match plan {
            Plan::Fresh(alloc) => {
                let (planned, works) = chunker::fresh(&alloc, cs, size);
                (Mode::Fresh, Vec::new(), planned, Box::new(works))
            }
            Plan::Everything(alloc) => {
                let (planned, works) = chunker::compare(alloc, cs, size);
                (Mode::Incremental, Vec::new(), planned, Box::new(works))
            }
            Plan::Compare(alloc) => {
                let index = disk.fetch_index(blockship_proto::chunk_count(size, cs)).await?;
                let (planned, works) = chunker::compare(alloc, cs, size);
                (Mode::Compare(Arc::new(index)), Vec::new(), planned, Box::new(works))
            }
            Plan::Incremental(extents) => {
                let digest = plan_digest(SyncMode::Incremental as i32, cs, size, &point.view, &extents);
                // Only the same plan read from the same frozen view may keep what is durable.
                if let Some(ip) = &opened.in_progress {
                    if ip.epoch == epoch
                        && ip.plan_digest[..] == digest[..]
                        && !point.view.is_empty()
                        && ip.view == point.view
                    {
                        resumed_from = ip.durable_offset;
                    }
                }
                let (planned, works) = chunker::incremental(extents, cs, resumed_from);
                (Mode::Incremental, digest.to_vec(), planned, Box::new(works))
            }
        };
    disk.begin_epoch(EpochBegin {
        disk: disk.handle,
        epoch,
        mode: sync_mode as i32,
        plan_digest: digest.into(),
        resume_offset: resumed_from,
        view: point.view.clone(),
        group: req.group.unwrap_or_default().to_string(),
        measure: req.measure,
    })
    .await?;
    tracing::info!(target = req.target, epoch, mode = ?sync_mode, planned, resumed_from, "epoch begun");

    let stats = Arc::new(Stats::default());
    if matches!(mode, Mode::Fresh) {
        // Source holes are zeros the new (all-zero) target already has: nothing to read or send.
        stats.bytes_zero.fetch_add(size - planned, std::sync::atomic::Ordering::Relaxed);
    }
    observer.begun(req.target, epoch, planned, &stats);
    let sending = link.sending(stats.clone());
    let adaptive = match transfer.compression {
        Compression::Auto { .. } => link.adaptive(),
        _ => None,
    };
    let data = async {
        let plan = pipeline::Plan {
            mode,
            compression: transfer.compression,
            adaptive,
            depth: transfer.depth,
            disk: disk.handle,
        };
        let items = pipeline::run(point.source.clone(), works, plan, stats.clone(), link.data()).await?;
        let commit = EpochCommit { disk: disk.handle, epoch, items, change_point: change_point.clone() };
        disk.send(&Body::EpochCommit(commit)).await?;
        observer.waiting(req.target);
        Ok::<(), AgentError>(())
    };
    let acks = async {
        loop {
            let a: pb::Ack = disk.ack().await?;
            if a.committed || a.prepared {
                return Ok::<pb::Ack, AgentError>(a);
            }
        }
    };
    tokio::pin!(data, acks);
    let mut sent = false;
    let ack = loop {
        tokio::select! {
            r = &mut data, if !sent => match r {
                Ok(()) => sent = true,
                // The sink usually says why it broke the epoch: prefer its words.
                Err(e) => match tokio::time::timeout(Duration::from_secs(2), &mut acks).await {
                    Ok(Err(sink_said)) => return Err(sink_said),
                    _ => return Err(e),
                },
            },
            r = &mut acks => {
                let a = r?;
                if !sent {
                    return Err(AgentError::Protocol("sink acknowledged an epoch we had not finished".into()));
                }
                break a;
            }
        }
    };
    drop(sending);
    observer.ended(req.target);
    if ack.epoch != epoch {
        return Err(AgentError::Protocol(format!("sink acknowledged epoch {}, we sent {epoch}", ack.epoch)));
    }
    if ack.committed == req.group.is_some() {
        return Err(AgentError::Protocol(format!(
            "sink {} epoch {epoch}, which {} a group",
            if ack.committed { "committed" } else { "prepared" },
            if req.group.is_some() { "belongs to" } else { "is not in" }
        )));
    }
    let g = |c: &std::sync::atomic::AtomicU64| Stats::get(c);
    Ok(EpochReport {
        epoch,
        mode: match sync_mode {
            _ if point.is_unchanged() => "unchanged",
            SyncMode::Full => "full",
            SyncMode::Incremental => "incremental",
            _ => "compare",
        }
        .to_string(),
        note,
        change_point: change_point.clone(),
        reader: point.source.reader().to_string(),
        resumed_from,
        disk_size: size,
        bytes_scanned: g(&stats.bytes_done),
        bytes_read: g(&stats.bytes_read),
        bytes_sent: g(&stats.bytes_sent),
        bytes_data: g(&stats.bytes_data),
        bytes_zero: g(&stats.bytes_zero),
        bytes_equal: g(&stats.bytes_equal),
        chunks_sent: g(&stats.chunks_sent),
        zero_extents: g(&stats.zero_extents),
        seconds: started.elapsed().as_secs_f64(),
        view: point.view.clone(),
        sink_usage: ack.usage,
    })
}
