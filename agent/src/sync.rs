//! One sync run = one epoch: open the source, work out what to send (everything allocated for a
//! new target, the changed extents of a change list, or whatever differs from the target's hash
//! index), stream it, commit, and succeed only on the sink's durable commit acknowledgement.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockship_proto::pb::{self, EpochBegin, EpochCommit, OpenDisk, SyncMode};
use blockship_proto::Body;
use blockship_transport::framed::unexpected;
use blockship_transport::QuicTuning;

use crate::changes::{cbt_file, plan_digest};
use crate::chunker::{self, Work};
use crate::config::Resolved;
use crate::pipeline::{self, Mode, Stats};
use crate::progress::Progress;
use crate::report::SyncSummary;
use crate::session::{transport, Session};
use crate::source::Source;
use crate::streams::{Limiter, Streams};
use crate::AgentError;

const DISK: u32 = 1;

pub struct SyncRequest {
    pub source: String,
    pub target: String,
    pub changed_areas: Option<PathBuf>,
    pub disk_id: Option<String>,
    pub progress: bool,
}

pub async fn sync(cfg: &Resolved, req: &SyncRequest, tuning: &QuicTuning) -> Result<SyncSummary, AgentError> {
    let started = Instant::now();
    let source = Arc::new(Source::open(&req.source)?);
    let size = source.size();
    // A bad change list is refused before anything is sent.
    let changed = match &req.changed_areas {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| AgentError::ChangeList {
                path: path.display().to_string(),
                err: cbt_file::ChangeListError::Shape(e.to_string()),
            })?;
            Some(
                cbt_file::parse(&text, size)
                    .map_err(|err| AgentError::ChangeList { path: path.display().to_string(), err })?,
            )
        }
        None => None,
    };

    let mut session = Session::connect(&cfg.sink, &cfg.tls, cfg.server_name.as_deref(), tuning).await?;
    let requested = if changed.is_some() { SyncMode::Incremental } else { SyncMode::Compare };
    let opened = session
        .open_disk(OpenDisk {
            disk: DISK,
            disk_id: req.disk_id.clone().unwrap_or_else(|| source.disk_id()),
            size,
            target: req.target.clone(),
            mode: requested as i32,
            chunk_size: cfg.chunk_size,
        })
        .await?;
    let cs = opened.chunk_size;
    if !blockship_proto::valid_chunk_size(cs) {
        return Err(AgentError::Protocol(format!("sink reported chunk size {cs}")));
    }
    if opened.target_size < size {
        return Err(AgentError::Protocol(format!("target has {} bytes, source {size}", opened.target_size)));
    }
    if !opened.created && cs != cfg.chunk_size {
        tracing::info!(target_chunk_size = cs, "using the existing target's chunk size");
    }
    let epoch = opened.committed_epoch + 1;

    let mut resumed_from = 0;
    let (mode, sync_mode, digest, planned, works): (
        Mode,
        SyncMode,
        Vec<u8>,
        u64,
        Box<dyn Iterator<Item = Work> + Send>,
    ) = match changed {
        Some(extents) => {
            let digest = plan_digest(SyncMode::Incremental as i32, cs, size, &extents);
            if let Some(ip) = &opened.in_progress {
                if ip.epoch == epoch && ip.plan_digest[..] == digest[..] {
                    resumed_from = ip.durable_offset;
                }
            }
            let (planned, works) = chunker::incremental(extents, cs, resumed_from);
            (Mode::Incremental, SyncMode::Incremental, digest.to_vec(), planned, Box::new(works))
        }
        None if opened.created && opened.zero_filled => {
            let allocated = source.allocated().await?;
            let (planned, works) = chunker::fresh(&allocated, cs, size);
            (Mode::Fresh, SyncMode::Full, Vec::new(), planned, Box::new(works))
        }
        None if opened.created => {
            // A new target that may not read as zeros (RBD): every chunk is written, zero ones
            // as zero extents.
            let allocated = source.allocated().await?;
            let (planned, works) = chunker::compare(allocated, cs, size);
            (Mode::Incremental, SyncMode::Full, Vec::new(), planned, Box::new(works))
        }
        None => {
            let chunks = blockship_proto::chunk_count(size, cs);
            let index = session.fetch_index(DISK, chunks).await?;
            let allocated = source.allocated().await?;
            let (planned, works) = chunker::compare(allocated, cs, size);
            (Mode::Compare(Arc::new(index)), SyncMode::Compare, Vec::new(), planned, Box::new(works))
        }
    };
    session
        .begin_epoch(EpochBegin {
            disk: DISK,
            epoch,
            mode: sync_mode as i32,
            plan_digest: digest.into(),
            resume_offset: resumed_from,
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
    let streams = Streams::start(&session.conn, cfg.streams, rx, limiter).await?;

    let ack = {
        let Session { writer, reader, .. } = &mut session;
        let data = async {
            let items = pipeline::run(
                source.clone(),
                works,
                pipeline::Plan { mode, compression: cfg.compression, depth: cfg.depth, disk: DISK },
                stats.clone(),
                tx,
            )
            .await?;
            streams.finish().await?;
            let commit = EpochCommit { disk: DISK, epoch, items, change_point: String::new() };
            writer.send(&Body::EpochCommit(commit)).await.map_err(transport)?;
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
        let ack = loop {
            tokio::select! {
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
        };
        ack
    };
    progress.finish();
    if ack.epoch != epoch {
        return Err(AgentError::Protocol(format!("sink committed epoch {}, we sent {epoch}", ack.epoch)));
    }
    session.close().await;

    let seconds = started.elapsed().as_secs_f64();
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
