//! One sync run = one epoch: open the source, learn from the sink what the target holds (its
//! committed epoch and change point), freeze a point in time, decide what to send (everything
//! allocated for a new target, the platform's changed extents since the change point, or
//! whatever differs from the target's hash index), stream it, commit with the new change point,
//! and succeed only on the sink's durable commit acknowledgement. Snapshots are released after.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockship_proto::codec::Compression;
use blockship_proto::pb::{self, DiskOpened, EpochBegin, EpochCommit, OpenDisk, SyncMode};
use blockship_proto::Body;
use blockship_transport::framed::unexpected;
use blockship_transport::QuicTuning;

use crate::adaptive::{Adaptive, CpuMeter};
use crate::changes::{cbt_file, plan_digest, Changes};
use crate::chunker::{self, Work};
use crate::config::Resolved;
use crate::extents::Extent;
use crate::pipeline::{self, Mode, Stats};
use crate::progress::Progress;
use crate::report::SyncSummary;
use crate::session::{transport, Session};
use crate::source::nbd::{NbdError, NbdSource};
use crate::source::{Freeze, Hold, Origin, PointInTime, Source, SourceOptions};
use crate::streams::{Limiter, Streams};
use crate::AgentError;

const DISK: u32 = 1;

pub struct SyncRequest {
    pub source: String,
    pub target: String,
    pub changes: Changes,
    /// Change point to record with this epoch where the platform does not define one (e.g. the
    /// dirty bitmap that started tracking when the source was frozen).
    pub change_point: Option<String>,
    pub disk_id: Option<String>,
    pub progress: bool,
    pub source_opts: SourceOptions,
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

pub async fn sync(cfg: &Resolved, req: &SyncRequest, tuning: &QuicTuning) -> Result<SyncSummary, AgentError> {
    let started = Instant::now();
    let origin = Origin::open(&req.source, &req.source_opts).await?;
    let result = sync_origin(cfg, req, tuning, &origin, started).await;
    origin.close().await;
    result
}

async fn sync_origin(
    cfg: &Resolved,
    req: &SyncRequest,
    tuning: &QuicTuning,
    origin: &Origin,
    started: Instant,
) -> Result<SyncSummary, AgentError> {
    let size = origin.size();
    let is_nbd = matches!(origin, Origin::Plain { source, .. } if matches!(source.as_ref(), Source::Nbd(_)));
    match (&req.changes, origin) {
        (Changes::NbdBitmap(_), _) if !is_nbd => {
            return Err(usage("--changes nbd-bitmap needs an nbd:// or nbd+unix:// source"))
        }
        (Changes::Vmware, o) if !matches!(o, Origin::Vmware(_)) => {
            return Err(usage("--changes vmware needs a vmware source"))
        }
        (Changes::RbdSnap, o) if !matches!(o, Origin::Rbd(_)) => {
            return Err(usage("--changes rbd-snap needs an rbd: source"))
        }
        _ => {}
    }
    // A bad change list is refused before anything is sent.
    let file_extents = match &req.changes {
        Changes::CbtFile(path) => {
            let err = |err| AgentError::ChangeList { path: path.display().to_string(), err };
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(cbt_file::ChangeListError::Shape(e.to_string())))?;
            Some(cbt_file::parse(&text, size).map_err(err)?)
        }
        _ => None,
    };

    let mut session = Session::connect(&cfg.sink, &cfg.tls, cfg.server_name.as_deref(), tuning).await?;
    let requested =
        if req.changes.needs_existing_target() { SyncMode::Incremental } else { SyncMode::Compare };
    let opened = session
        .open_disk(OpenDisk {
            disk: DISK,
            disk_id: req.disk_id.clone().unwrap_or_else(|| origin.disk_id()),
            size,
            target: req.target.clone(),
            mode: requested as i32,
            chunk_size: cfg.chunk_size,
        })
        .await?;
    if !blockship_proto::valid_chunk_size(opened.chunk_size) {
        return Err(AgentError::Protocol(format!("sink reported chunk size {}", opened.chunk_size)));
    }
    if opened.target_size < size {
        return Err(AgentError::Protocol(format!("target has {} bytes, source {size}", opened.target_size)));
    }
    if !opened.created && opened.chunk_size != cfg.chunk_size {
        tracing::info!(target_chunk_size = opened.chunk_size, "using the existing target's chunk size");
    }
    let epoch = opened.committed_epoch + 1;
    let prior_view = opened.in_progress.as_ref().filter(|p| p.epoch == epoch).map(|p| p.view.as_str());
    let point = origin
        .freeze(&Freeze {
            epoch,
            prior_view,
            declared_point: req.change_point.as_deref(),
            target: &req.target,
        })
        .await?;
    let outcome = run_epoch(cfg, req, origin, &point, &mut session, &opened, file_extents, started)
        .await
        .map_err(|e| session.reason(e));
    let committed = outcome.is_ok();
    if let Err(e) = origin.finish(point, committed).await {
        if committed {
            // The epoch is durable; a snapshot that could not be dropped is the operator's to clean.
            tracing::warn!("epoch {epoch} committed, but releasing the source point in time failed: {e}");
        } else {
            tracing::warn!("releasing the source point in time failed: {e}");
        }
    }
    let summary = outcome?;
    session.close().await;
    Ok(summary)
}

/// Where the source holds data: VMware asks CBT for the allocated areas ("*"), other sources
/// report their holes themselves.
async fn allocation(origin: &Origin, point: &PointInTime) -> Result<Vec<Extent>, AgentError> {
    if let (Origin::Vmware(v), Hold::Vmware(view)) = (origin, &point.hold) {
        if v.cbt_enabled() && view.change_id.is_some() {
            return Ok(v.allocated(view).await?);
        }
    }
    Ok(point.source.allocated().await?)
}

/// What the platform's change tracking says about the time since the last epoch.
enum Delta {
    Changed(Vec<Extent>),
    /// The source tracks changes, but not usably now (the reason is shown to the operator).
    Unusable(String),
    /// A plain file or device: no change tracking, so compare is its normal mode.
    Untracked,
}

/// The platform's changed extents since `stored`, or why there are none to use.
async fn delta(
    req: &SyncRequest,
    origin: &Origin,
    point: &PointInTime,
    stored: &str,
) -> Result<Delta, AgentError> {
    let explicit = req.changes != Changes::Auto;
    match (origin, &point.hold) {
        (Origin::Plain { spec, source }, _) if matches!(source.as_ref(), Source::Nbd(_)) => {
            if stored.is_empty() {
                return Ok(Delta::Unusable(
                    "the target has no change point (no dirty bitmap to read)".into(),
                ));
            }
            match NbdSource::connect(spec, Some(stored)).await {
                Ok(n) => {
                    let dirty = n.dirty(stored).await;
                    let _ = n.disconnect().await;
                    Ok(Delta::Changed(dirty?))
                }
                Err(NbdError::ContextUnavailable { .. }) => Ok(Delta::Unusable(format!(
                    "the export does not offer dirty bitmap {stored:?} (missing, or left in-use by a crash)"
                ))),
                Err(e) => Err(e.into()),
            }
        }
        (Origin::Rbd(r), Hold::Rbd(view)) => {
            if stored.is_empty() {
                return Ok(Delta::Unusable(
                    "the target has no change point (no source snapshot to diff against)".into(),
                ));
            }
            if !r.has_snapshot(stored).await? {
                return Ok(Delta::Unusable(format!(
                    "source snapshot {stored:?} of the last replicated epoch is gone"
                )));
            }
            Ok(Delta::Changed(view.changed_since(stored).await?))
        }
        (Origin::Vmware(v), Hold::Vmware(view)) => {
            if let Some(why) = v.unusable(view, stored) {
                return Ok(Delta::Unusable(why));
            }
            match v.changes(view, stored).await {
                Ok((extents, pages)) => {
                    tracing::info!(pages, extents = extents.len(), "changed areas from vCenter");
                    Ok(Delta::Changed(extents))
                }
                Err(e) if explicit => Err(e.into()),
                Err(e) => Ok(Delta::Unusable(format!("vCenter could not list the changed areas: {e}"))),
            }
        }
        _ => Ok(Delta::Untracked),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_epoch(
    cfg: &Resolved,
    req: &SyncRequest,
    origin: &Origin,
    point: &PointInTime,
    session: &mut Session,
    opened: &DiskOpened,
    file_extents: Option<Vec<Extent>>,
    started: Instant,
) -> Result<SyncSummary, AgentError> {
    let size = origin.size();
    let cs = opened.chunk_size;
    let epoch = opened.committed_epoch + 1;
    let stored = opened.change_point.as_str();
    let mut note = String::new();
    let plan = if opened.created {
        let alloc = allocation(origin, point).await?;
        if opened.zero_filled {
            Plan::Fresh(alloc)
        } else {
            Plan::Everything(alloc)
        }
    } else {
        match &req.changes {
            Changes::Full => Plan::Everything(allocation(origin, point).await?),
            Changes::Compare => Plan::Compare(allocation(origin, point).await?),
            Changes::CbtFile(_) => Plan::Incremental(file_extents.unwrap_or_default()),
            Changes::NbdBitmap(name) => {
                if stored != name {
                    return Err(usage(format!(
                        "the target's change point is {stored:?}, not bitmap {name:?}: that bitmap does not cover the time since the last epoch (use --changes auto or compare)"
                    )));
                }
                match delta(req, origin, point, stored).await? {
                    Delta::Changed(extents) => Plan::Incremental(extents),
                    Delta::Unusable(why) => return Err(usage(why)),
                    Delta::Untracked => return Err(usage("this source has no dirty bitmaps")),
                }
            }
            Changes::Auto | Changes::Vmware | Changes::RbdSnap => {
                match delta(req, origin, point, stored).await? {
                    Delta::Changed(extents) => Plan::Incremental(extents),
                    Delta::Unusable(why) => {
                        note = format!("full resync (compare): {why}");
                        eprintln!("blockship-agent: {note}");
                        Plan::Compare(allocation(origin, point).await?)
                    }
                    Delta::Untracked => Plan::Compare(allocation(origin, point).await?),
                }
            }
        }
    };
    let sync_mode = plan.mode();
    let change_point = match (&point.change_point, &req.change_point) {
        (Some(p), Some(flag)) if p != flag => {
            tracing::warn!(platform = %p, flag = %flag, "the platform defines the change point; --change-point ignored");
            p.clone()
        }
        (Some(p), _) => p.clone(),
        (None, Some(flag)) => flag.clone(),
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
                let index = session.fetch_index(DISK, blockship_proto::chunk_count(size, cs)).await?;
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
    session
        .begin_epoch(EpochBegin {
            disk: DISK,
            epoch,
            mode: sync_mode as i32,
            plan_digest: digest.into(),
            resume_offset: resumed_from,
            view: point.view.clone(),
            group: String::new(),
        })
        .await?;
    tracing::info!(target = %req.target, epoch, mode = ?sync_mode, planned, resumed_from, "epoch begun");

    let stats = Arc::new(Stats::default());
    if matches!(mode, Mode::Fresh) {
        // Source holes are zeros the new (all-zero) target already has: nothing to read or send.
        stats.bytes_zero.fetch_add(size - planned, std::sync::atomic::Ordering::Relaxed);
    }
    let progress = Progress::start(req.progress, &format!("epoch {epoch}"), planned, stats.clone());
    let limiter = cfg.bwlimit.map(Limiter::new).transpose()?.map(Arc::new);
    let (tx, rx) = async_channel::bounded(cfg.streams * 2);
    let adaptive = matches!(cfg.compression, Compression::Auto { .. })
        .then(|| Arc::new(Adaptive::new(cfg.bwlimit.is_some())));
    let _monitor = adaptive.as_ref().map(|a| {
        // A receiver, not a sender: the streams must still see the queue close at the end.
        let queue = rx.clone();
        let (conn, st) = (session.conn.clone(), stats.clone());
        let mut cpu = CpuMeter::default();
        let capacity = queue.capacity().unwrap_or(1).max(1) as f64;
        // Data waits either in our queue or, once written, in QUIC's send buffer (sized for the
        // bandwidth-delay product, so it holds seconds of a slow link): payload produced minus
        // UDP bytes transmitted.
        let backlog = move || {
            let buffered = Stats::get(&st.bytes_sent).saturating_sub(conn.stats().udp_tx.bytes);
            (queue.len() as f64 / capacity).max(buffered as f64 / SEND_BACKLOG)
        };
        a.monitor(backlog, move || cpu.sample())
    });
    let streams = Streams::start(&session.conn, cfg.streams, rx, limiter).await?;

    let heartbeat = session.heartbeat();
    let ack = {
        let Session { writer, reader, .. } = &mut *session;
        let control = writer.clone();
        let data = async {
            let plan = pipeline::Plan {
                mode,
                compression: cfg.compression,
                adaptive: adaptive.clone(),
                depth: cfg.depth,
                disk: DISK,
            };
            let items = pipeline::run(point.source.clone(), works, plan, stats.clone(), tx).await?;
            streams.finish().await?;
            let commit = EpochCommit { disk: DISK, epoch, items, change_point: change_point.clone() };
            writer.lock().await.send(&Body::EpochCommit(commit)).await.map_err(transport)?;
            Ok::<u64, AgentError>(items)
        };
        let acks = async {
            loop {
                match reader.next_body("Ack").await.map_err(transport)? {
                    Body::Ack(a) if a.committed => return Ok::<pb::Ack, AgentError>(a),
                    Body::Ack(_) => {}
                    other => return Err(transport(unexpected("Ack", &other))),
                }
            }
        };
        tokio::pin!(data, acks);
        let mut items = None;
        // Tell the sink the epoch progresses when no data flows (equal chunks in compare mode,
        // holes, the wait for the commit), and only then: a stuck agent must lose its session.
        let mut beat = tokio::time::interval(heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_done = 0;
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    let done = Stats::get(&stats.bytes_done);
                    if done > last_done || items.is_some() {
                        last_done = done;
                        let p = pb::Progress { disk: DISK, bytes_done: done };
                        // A broken stream shows up in the data and ack futures as well.
                        let _ = control.lock().await.send(&Body::Progress(p)).await;
                    }
                }
                r = &mut data, if items.is_none() => match r {
                    Ok(n) => {
                        items = Some(n);
                        progress.message("waiting for the sink to make the epoch durable");
                    }
                    // The sink usually says why it broke the connection: prefer its words.
                    Err(e) => match tokio::time::timeout(Duration::from_secs(2), &mut acks).await {
                        Ok(Err(sink_said)) => return Err(sink_said),
                        _ => return Err(e),
                    },
                },
                r = &mut acks => {
                    let a = r?;
                    if items.is_none() {
                        return Err(AgentError::Protocol("sink committed an epoch we had not finished".into()));
                    }
                    break a;
                }
            }
        }
    };
    progress.finish();
    if ack.epoch != epoch {
        return Err(AgentError::Protocol(format!("sink committed epoch {}, we sent {epoch}", ack.epoch)));
    }

    let seconds = started.elapsed().as_secs_f64();
    if let Some(a) = &adaptive {
        tracing::info!(
            share_on = a.share_on(),
            "adaptive compression (on while the link was the bottleneck)"
        );
    }
    let g = |c: &std::sync::atomic::AtomicU64| Stats::get(c);
    Ok(SyncSummary {
        target: req.target.clone(),
        epoch,
        mode: match sync_mode {
            SyncMode::Full => "full",
            SyncMode::Incremental => "incremental",
            _ => "compare",
        }
        .to_string(),
        note,
        change_point,
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
        seconds,
        mb_per_s: g(&stats.bytes_done) as f64 / seconds.max(1e-9) / 1e6,
    })
}

/// Bytes waiting in QUIC's send buffer that count as a full backlog for adaptive compression.
const SEND_BACKLOG: f64 = (8 << 20) as f64;

/// `--changed-areas FILE` is `--changes cbt-file:FILE`.
pub fn changes_from_flags(
    changes: Option<&str>,
    changed_areas: Option<PathBuf>,
) -> Result<Changes, AgentError> {
    match (changes, changed_areas) {
        (Some(_), Some(_)) => Err(usage("give --changes or --changed-areas, not both")),
        (None, Some(f)) => Ok(Changes::CbtFile(f)),
        (Some(c), None) => c.parse().map_err(usage),
        (None, None) => Ok(Changes::Auto),
    }
}
