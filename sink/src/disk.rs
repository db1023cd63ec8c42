//! A disk opened by a session: the target, its replication state and hash index, and the epoch
//! being written. Opening reconciles the three — a new target gets a fresh all-zero index, an
//! index that does not match the state is rebuilt, a grown target gets stale index entries —
//! and checks that the requested mode makes sense for what the target holds.

use std::sync::{Arc, Mutex};

use blockship_proto::codec::chunk_digest;
use blockship_proto::pb::{self, DiskOpened, ErrorCode, OpenDisk, ResumePoint, SyncMode};
use blockship_proto::ZERO_HASH;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::index::{HashIndex, IndexOrigin};
use crate::lease::{Holder, Lease};
use crate::refusal::{join, Refusal};
use crate::server::SinkContext;
use crate::state::{ReplicationState, StateDir, StateLock};
use crate::targets::{Access, Opened, Target, TargetError, TargetName};
use crate::undo::Undo;
use crate::writer::WriterMsg;

pub struct Disk {
    pub handle: u32,
    pub name: String,
    pub target: Target,
    /// Absent for verification sessions, which never write.
    pub index: Option<HashIndex>,
    pub state_dir: StateDir,
    pub state: Mutex<ReplicationState>,
    /// The source size the agent declared; every item is bounds-checked against it.
    pub size: u64,
    pub chunk_size: u32,
    pub epoch: Mutex<Option<ActiveEpoch>>,
    /// Why the last epoch writer failed: whoever finds the writer gone reports this cause
    /// (e.g. the cluster's timeout), not just that it stopped.
    pub writer_failure: Mutex<Option<Refusal>>,
    _lease: Lease,
    /// This process's hold on the state dir (writers only).
    _lock: Option<StateLock>,
}

/// The epoch a disk is receiving.
pub struct ActiveEpoch {
    pub epoch: u64,
    pub tx: mpsc::Sender<WriterMsg>,
}

impl Disk {
    pub fn state(&self) -> ReplicationState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Update the in-memory state with `f` and persist it durably.
    pub async fn update_state(&self, f: impl FnOnce(&mut ReplicationState)) -> Result<(), Refusal> {
        self.set_state(f);
        self.persist_state().await
    }

    /// Update the in-memory state only; the next `persist_state` (or `update_state`) makes it
    /// durable.
    pub fn set_state(&self, f: impl FnOnce(&mut ReplicationState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Persist the in-memory state durably.
    pub async fn persist_state(&self) -> Result<(), Refusal> {
        let snapshot = self.state();
        self.target.store_state(&self.state_dir, &snapshot).await?;
        Ok(())
    }

    pub fn index(&self) -> Result<&HashIndex, Refusal> {
        self.index.as_ref().ok_or_else(|| Refusal::bad_request("disk was opened for verification only"))
    }

    /// An undo journal for the epoch about to begin: file targets with a committed epoch to
    /// return to (and rollback not turned off) keep one; RBD targets have their snapshots.
    pub fn undo_journal(&self, enabled: bool) -> Result<Option<Undo>, Refusal> {
        let state = self.state();
        if !enabled || state.committed_epoch == 0 || !matches!(self.target, Target::File(_)) {
            return Ok(None);
        }
        // States written before the committed size was recorded: the file's size now.
        let base = if state.committed_size > 0 { state.committed_size } else { self.target.size() };
        Undo::prepare(&self.state_dir.undo_path(), state.committed_epoch, base, self.target.size())
            .map(Some)
            .map_err(|e| Refusal::internal(format!("{}: undo journal: {e}", self.name)))
    }

    /// Sender of the active epoch's writer. With none: the failed writer's own error if the epoch
    /// ended that way (data still in flight when a write failed must report the cause, e.g. a full
    /// filesystem, not that the epoch is gone), else a protocol error.
    pub fn writer(&self) -> Result<(u64, mpsc::Sender<WriterMsg>), Refusal> {
        let epoch = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = epoch.as_ref() {
            return Ok((e.epoch, e.tx.clone()));
        }
        drop(epoch);
        Err(self.failure().unwrap_or_else(|| {
            Refusal::bad_request(format!("disk {}: data received outside an epoch", self.handle))
        }))
    }

    /// The refusal for finding this disk's epoch writer gone: its own error when it failed.
    /// Whether an epoch is open on this disk (begun, its writer not finished).
    pub fn epoch_running(&self) -> bool {
        self.epoch.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    pub fn writer_stopped(&self) -> Refusal {
        self.failure().unwrap_or_else(|| Refusal::internal("epoch writer stopped"))
    }

    /// Why this disk's last epoch writer failed, if it did (a disk fails once).
    pub fn failure(&self) -> Option<Refusal> {
        self.writer_failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Recompute stale index entries from the target (after making the target durable, so the
    /// index never vouches for data a crash could still lose). Chunks the target has not
    /// allocated are zeros without being read.
    pub async fn refresh_index(self: &Arc<Self>) -> Result<u64, Refusal> {
        self.index()?;
        self.target.flush().await?;
        let stale = {
            let disk = self.clone();
            tokio::task::spawn_blocking(move || {
                disk.index().and_then(|i| i.stale_chunks().map_err(index_err))
            })
            .await
            .map_err(|e| join("scan index", e))??
        };
        if stale.is_empty() {
            return Ok(0);
        }
        tracing::info!(target = %self.name, chunks = stale.len(), "rebuilding stale hash index entries from the target");
        let allocated = self.target.allocated().await?;
        let cs = u64::from(self.chunk_size);
        let size = self.size;
        let holds = crate::index::holding_data(&stale, &allocated, self.chunk_size, size);
        let mut digests = futures::stream::iter(stale.iter().copied().zip(holds))
            .map(|(chunk, holds_data)| {
                let disk = self.clone();
                let (offset, len) = (chunk * cs, cs.min(size - chunk * cs));
                async move {
                    if !holds_data {
                        return Ok::<_, Refusal>((chunk, ZERO_HASH));
                    }
                    let data: Bytes = disk.target.read(offset, len as usize).await?;
                    let d = tokio::task::spawn_blocking(move || chunk_digest(&data))
                        .await
                        .map_err(|e| join("hash", e))?;
                    Ok((chunk, d))
                }
            })
            .buffered(8);
        let index = self.index()?;
        while let Some(r) = digests.next().await {
            let (chunk, digest) = r?;
            index.set(chunk, &digest).map_err(index_err)?;
        }
        index.sync().map_err(index_err)?;
        Ok(stale.len() as u64)
    }
}

pub fn index_err(e: std::io::Error) -> Refusal {
    Refusal::internal(format!("hash index: {e}"))
}

/// Open the disk an agent asked for, with all checks.
pub async fn open(
    ctx: &Arc<SinkContext>,
    who: Holder,
    req: &OpenDisk,
) -> Result<(Arc<Disk>, DiskOpened), Refusal> {
    let agent = who.agent.clone();
    let agent = agent.as_str();
    let name = TargetName::parse(&req.target)?;
    let canonical = name.to_string();
    ctx.auth.check(agent, &canonical)?;
    let mode = SyncMode::try_from(req.mode).unwrap_or(SyncMode::Unspecified);
    if mode == SyncMode::Unspecified {
        return Err(Refusal::bad_request(format!("unknown sync mode {}", req.mode)));
    }
    if req.size == 0 {
        return Err(Refusal::bad_request("source size is 0"));
    }
    let max = ctx.admission.limits.max_disk_size;
    if req.size > max {
        return Err(Refusal::new(
            ErrorCode::Size,
            format!(
                "{canonical}: the source is {} bytes, more than this sink's --max-disk-size of {max} bytes",
                req.size
            ),
        ));
    }
    // Verification reads: it needs no write lease (and must not take one over), but no writer.
    let lease = if mode == SyncMode::Verify {
        ctx.leases.read(&canonical, agent)?
    } else {
        ctx.leases.write(&canonical, who).await?
    };
    let state_dir = StateDir::for_target(&ctx.state_root, &canonical)?;
    // Another sink process on the same state dir, or a rollback running, must not interleave.
    let lock = if mode == SyncMode::Verify { None } else { Some(state_dir.lock(&canonical)?) };

    let access = match mode {
        SyncMode::Verify => Access::ReadOnly,
        SyncMode::Incremental => Access::Existing,
        // A failback writes into the original image: it must exist.
        _ if req.failback_epoch > 0 => Access::Existing,
        _ => Access::Create,
    };
    if req.bench {
        bench_may_write(&name, &ctx.roots, &state_dir, req.size).await?;
    }
    let (target, opened) = match Target::open(&name, &ctx.roots, req.size, access).await {
        Err(TargetError::NotFound { name }) if mode == SyncMode::Incremental => {
            return Err(Refusal::new(
                ErrorCode::BadTarget,
                format!(
                    "target {name} does not exist, so a change list has nothing to apply to: run a full sync first (without a change list)"
                ),
            ))
        }
        r => r?,
    };
    let loaded = target.load_state(&state_dir).await?;

    let (index, state, chunk_size, reply) = if mode == SyncMode::Verify {
        let chunk_size = checked_chunk_size(loaded.as_ref().map_or(req.chunk_size, |s| s.chunk_size))?;
        let reply = DiskOpened {
            disk: req.disk,
            created: false,
            target_size: target.size(),
            chunk_size,
            committed_epoch: loaded.as_ref().map_or(0, |s| s.committed_epoch),
            change_point: loaded.as_ref().map(|s| s.change_point.clone()).unwrap_or_default(),
            in_progress: None,
            source_disk_id: loaded.as_ref().map(|s| s.source_disk_id.clone()).unwrap_or_default(),
            zero_filled: false,
            cut_over: loaded.as_ref().is_some_and(|s| s.cut_over.is_some()),
        };
        let state = loaded
            .unwrap_or_else(|| ReplicationState::new(&canonical, &req.disk_id, agent, req.size, chunk_size));
        (None, state, chunk_size, reply)
    } else {
        let (index, state, mut reply) = reconcile(
            Request { canonical: &canonical, agent, req, mode },
            opened,
            loaded,
            &target,
            &state_dir,
        )
        .await?;
        reply.target_size = target.size();
        (Some(index), state, reply.chunk_size, reply)
    };
    let disk = Disk {
        handle: req.disk,
        name: canonical,
        target,
        index,
        state_dir,
        state: Mutex::new(state),
        size: req.size,
        chunk_size,
        epoch: Mutex::new(None),
        writer_failure: Mutex::new(None),
        _lease: lease,
        _lock: lock,
    };
    Ok((Arc::new(disk), reply))
}

/// A bench writes generated data only where no replica lives: a null target, a new one, or one
/// an earlier bench wrote. Checked before the target is opened for writing (which may grow it).
async fn bench_may_write(
    name: &TargetName,
    roots: &crate::targets::TargetRoots,
    state_dir: &StateDir,
    size: u64,
) -> Result<(), Refusal> {
    if matches!(name, TargetName::Null(_)) {
        return Ok(());
    }
    let target = match Target::open(name, roots, size, Access::ReadOnly).await {
        Err(TargetError::NotFound { .. }) => return Ok(()),
        r => r?.0,
    };
    let state = target.load_state(state_dir).await?;
    match state {
        Some(s) if s.source_disk_id.starts_with(blockship_proto::BENCH_DISK_ID) => Ok(()),
        other => Err(Refusal::new(
            ErrorCode::BadTarget,
            format!(
                "{name} {}: a bench writes only into null: targets, new targets or earlier benches' targets; name another --target",
                match other {
                    Some(s) => format!("holds the replica of {:?} (epoch {})", s.source_disk_id, s.committed_epoch),
                    None => "exists and holds data Blockship did not write".to_string(),
                }
            ),
        )),
    }
}

/// What an agent asked to open, and by whom.
struct Request<'a> {
    canonical: &'a str,
    agent: &'a str,
    req: &'a OpenDisk,
    mode: SyncMode,
}

/// Bring state and hash index in line with the target just opened for writing.
async fn reconcile(
    r: Request<'_>,
    opened: Opened,
    loaded: Option<ReplicationState>,
    target: &Target,
    state_dir: &StateDir,
) -> Result<(HashIndex, ReplicationState, DiskOpened), Refusal> {
    let Request { canonical, agent, req, mode } = r;
    let created = opened == Opened::Created;
    // Only a new file is known to read as zeros; anything else gets its zeros written.
    let zero_filled = created && target.zero_filled_when_created();
    // A state whose target was deleted (or never finished creating) describes nothing.
    let mut state = match loaded {
        Some(s) if !created => s,
        _ => ReplicationState::new(
            canonical,
            &req.disk_id,
            agent,
            req.size,
            checked_chunk_size(req.chunk_size)?,
        ),
    };
    if req.failback_epoch > 0 && state.committed_epoch == 0 && !created {
        let n = req.failback_epoch;
        target.adopt(canonical, n).await?;
        tracing::warn!(target = %canonical, agent, epoch = n, "failback: the original image is back at its snapshot of epoch {n} (later writes discarded); replication continues from there");
        state.committed_epoch = n;
        // The source's point in time of epoch N: the agent reads only what changed since it.
        state.change_point = format!("blockship-{n}");
        state.committed_size = req.size;
        state.committed_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        state.source_disk_id = req.disk_id.clone();
    }
    if let Some(c) = state.cut_over.clone() {
        if req.force_resume {
            tracing::warn!(target = %canonical, agent, epoch = c.epoch, "replicating into a cut-over target again (--force-resume): its cut-over mark is cleared");
            state.cut_over = None;
        } else if !req.cutover {
            return Err(cut_over_refusal(canonical, &c));
        }
    }
    if mode == SyncMode::Incremental {
        if state.committed_epoch == 0 {
            return Err(Refusal::bad_request(format!(
                "{canonical} has no committed epoch yet, so a change list has nothing to apply to; run a full sync first (without a change list)"
            )));
        }
        if !state.source_disk_id.is_empty() && state.source_disk_id != req.disk_id {
            return Err(Refusal::new(
                ErrorCode::BadTarget,
                format!(
                    "{canonical} replicates source disk {:?}, not {:?}; a change list of another disk would corrupt it",
                    state.source_disk_id, req.disk_id
                ),
            ));
        }
    } else if state.source_disk_id != req.disk_id {
        if state.committed_epoch > 0 {
            tracing::warn!(target = %canonical, was = %state.source_disk_id, now = %req.disk_id,
                "target now replicates another source disk id; compare mode rewrites whatever differs");
        }
        state.source_disk_id = req.disk_id.clone();
    }
    if let Opened::Grown { from } = opened {
        tracing::info!(target = %canonical, from, to = req.size, "target grown to the source size");
    }
    state.size = req.size;
    state.agent = agent.to_string();
    let chunk_size = checked_chunk_size(state.chunk_size)?;

    let (index, origin) = {
        let (path, token, size) = (state_dir.index_path(), state.index_token.clone(), req.size);
        tokio::task::spawn_blocking(move || HashIndex::open(&path, chunk_size, size, &token, zero_filled))
            .await
            .map_err(|e| join("open index", e))?
            .map_err(index_err)?
    };
    if origin == IndexOrigin::Rebuilt {
        tracing::info!(target = %canonical, "hash index missing or out of date: it will be rebuilt from the target when needed");
    }
    state.index_token = index.token().to_string();
    target.store_state(state_dir, &state).await?;
    let reply = DiskOpened {
        disk: req.disk,
        created,
        target_size: 0, // filled in by the caller, which holds the target
        chunk_size,
        committed_epoch: state.committed_epoch,
        change_point: state.change_point.clone(),
        in_progress: state.in_progress.as_ref().and_then(resume_point),
        source_disk_id: state.source_disk_id.clone(),
        zero_filled,
        cut_over: state.cut_over.is_some(),
    };
    tracing::info!(target = %canonical, agent, ?mode, created, epoch = state.committed_epoch, "disk opened");
    Ok((index, state, reply))
}

/// Why replication into cut-over target `name` is refused, and the way out.
pub fn cut_over_refusal(name: &str, c: &crate::state::CutOver) -> Refusal {
    Refusal::new(
        pb::ErrorCode::CutOver,
        format!(
            "{name} was cut over at epoch {} (unix time {}): it is the machine that runs now and accepts no replication; to replicate into it again anyway (the cutover abandoned, its data overwritten from the source), sync with --force-resume",
            c.epoch, c.at
        ),
    )
}

fn checked_chunk_size(cs: u32) -> Result<u32, Refusal> {
    let cs = if cs == 0 { blockship_proto::DEFAULT_CHUNK_SIZE } else { cs };
    if !blockship_proto::valid_chunk_size(cs) {
        return Err(Refusal::bad_request(format!(
            "chunk size {cs} is not a power of two between {} and {}",
            blockship_proto::MIN_CHUNK_SIZE,
            blockship_proto::MAX_CHUNK_SIZE
        )));
    }
    Ok(cs)
}

/// Where an unfinished epoch may resume, as the agent is told. A digest that does not decode
/// (a damaged state) offers no resume point: the epoch then starts over, which is always safe.
fn resume_point(p: &crate::state::InProgress) -> Option<ResumePoint> {
    let digest = match hex::decode(&p.plan_digest) {
        Ok(d) if d.is_empty() || d.len() == blockship_proto::HASH_LEN => d,
        _ => {
            tracing::warn!(epoch = p.epoch, digest = %p.plan_digest, "unreadable plan digest in the state: the epoch will start over");
            return None;
        }
    };
    Some(ResumePoint {
        epoch: p.epoch,
        mode: p.mode,
        plan_digest: digest.into(),
        durable_offset: p.durable_offset,
        view: p.view.clone(),
    })
}

/// Refusal for an item outside the disk.
pub fn check_bounds(disk: &Disk, offset: u64, len: u64) -> Result<(), Refusal> {
    match offset.checked_add(len) {
        Some(end) if len > 0 && end <= disk.size => Ok(()),
        _ => Err(Refusal::new(
            pb::ErrorCode::OutOfBounds,
            format!(
                "{}: extent {offset}+{len} is outside the disk (size {}); nothing was written",
                disk.name, disk.size
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::InProgress;

    #[test]
    fn a_damaged_plan_digest_offers_no_resume_point() {
        let good = "ab".repeat(32);
        let p = |digest: &str| InProgress {
            epoch: 2,
            mode: SyncMode::Incremental as i32,
            plan_digest: digest.to_string(),
            durable_offset: 64 << 20,
            view: "rbd:rbd/vm@blockship-src-2#7".into(),
            undo: false,
            prepared: None,
            group: String::new(),
        };
        let r = resume_point(&p(&good)).expect("a valid digest resumes");
        assert_eq!(r.plan_digest.as_ref(), &[0xab; 32][..]);
        // One bad digit must not silently yield a different (shorter) digest.
        for bad in [format!("zz{}", &good[2..]), good[..63].to_string(), good[..62].to_string()] {
            assert!(resume_point(&p(&bad)).is_none(), "{bad:?} gave {:?}", resume_point(&p(&bad)));
        }
    }
}
