//! The epoch writer: one task per disk and epoch that applies verified items to the target and
//! makes them durable in checkpoints (every N bytes or T seconds): flush the target, then record
//! the chunks' hashes in the index, then persist the durable watermark, and only then
//! acknowledge. Before an item is written, the committed data it overwrites is saved in the
//! undo journal (file targets) and the index entries it touches are durably marked stale, so a
//! crash between write and checkpoint can never leave the index vouching for torn data, nor
//! the previous point in time lost. On commit the state moves to the new epoch atomically.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockship_proto::pb::{Ack, ErrorCode};
use blockship_proto::{Body, HASH_LEN, ZERO_HASH};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::disk::{index_err, Disk};
use crate::failpoint::crash_point;
use crate::index::STALE;
use crate::limits::Grant;
use crate::liveness::Liveness;
use crate::refusal::{join, Refusal};
use crate::targets::Target;
use crate::undo::Undo;
use crate::watermark::Watermark;

/// Items written (and their stale marks synced) together; with the queue in front of the writer
/// this bounds the sink's buffered chunk data to about 2 x BATCH chunks.
pub const BATCH: usize = 16;

/// When to make written data durable and acknowledge it.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    pub bytes: u64,
    pub interval: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy { bytes: 64 << 20, interval: Duration::from_secs(1) }
    }
}

/// A verified, bounds-checked item.
#[derive(Debug)]
pub struct Item {
    pub seq: u64,
    pub offset: u64,
    pub kind: ItemKind,
    /// The in-flight budget its data holds until it is written.
    pub grant: Option<Grant>,
}

#[derive(Debug)]
pub enum ItemKind {
    Data { data: Bytes, hash: [u8; HASH_LEN] },
    Zero { len: u64 },
}

impl Item {
    pub fn length(&self) -> u64 {
        match &self.kind {
            ItemKind::Data { data, .. } => data.len() as u64,
            ItemKind::Zero { len } => *len,
        }
    }

    pub fn end(&self) -> u64 {
        self.offset + self.length()
    }
}

pub enum WriterMsg {
    Item(Item),
    /// The epoch has `items` items; once all are durable, prepare it, and commit it unless it
    /// belongs to a group (the group commits all its members together).
    Commit {
        items: u64,
        change_point: String,
        group: bool,
    },
}

/// How an epoch writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The session ended first (what was written is durable: a retry resumes after it).
    Interrupted,
    /// All data durable; waits for its group's commit.
    Prepared,
    Committed,
}

/// Chunks touched by `[offset, offset+len)`.
pub fn touched(offset: u64, len: u64, chunk_size: u32) -> Range<u64> {
    let cs = u64::from(chunk_size);
    offset / cs..(offset + len).div_ceil(cs)
}

/// Chunks entirely covered by `[offset, offset+len)`; the disk's last chunk may be short.
pub fn covered(offset: u64, len: u64, chunk_size: u32, disk_size: u64) -> Range<u64> {
    let cs = u64::from(chunk_size);
    let end = offset + len;
    let first = offset.div_ceil(cs);
    let last = if end == disk_size { end.div_ceil(cs) } else { end / cs };
    first..last.max(first)
}

/// What a durable item tells the index.
enum Known {
    Hash(u64, [u8; HASH_LEN]),
    Zero(Range<u64>),
}

pub struct EpochWriter {
    disk: Arc<Disk>,
    epoch: u64,
    acks: mpsc::Sender<Body>,
    policy: CheckpointPolicy,
    wm: Watermark,
    known: Vec<Known>,
    since_checkpoint: u64,
    durable_bytes: u64,
    last_checkpoint: Instant,
    /// File targets: the previous point in time, saved before it is overwritten.
    undo: Option<Undo>,
    /// The session's progress: every write and acknowledgement counts.
    liveness: Arc<Liveness>,
    /// The epoch's in-progress record is durable (done before the first write, see `apply`).
    recorded: bool,
    /// The sink's CPU clocks at the epoch's begin, for the usage sent with its end (only when
    /// the agent asked: `bench`).
    started: Option<crate::usage::Start>,
}

impl EpochWriter {
    pub fn new(
        disk: Arc<Disk>,
        epoch: u64,
        resume_offset: u64,
        acks: mpsc::Sender<Body>,
        policy: CheckpointPolicy,
        undo: Option<Undo>,
        liveness: Arc<Liveness>,
    ) -> Self {
        EpochWriter {
            disk,
            epoch,
            acks,
            policy,
            wm: Watermark::new(resume_offset),
            known: Vec::new(),
            since_checkpoint: 0,
            durable_bytes: 0,
            last_checkpoint: Instant::now(),
            undo,
            liveness,
            recorded: false,
            started: None,
        }
    }

    /// Whether the epoch's in-progress record is durable already (else the first write makes it).
    pub fn recorded(mut self, durable: bool) -> Self {
        self.recorded = durable;
        self
    }

    /// Measure the sink's CPU from now to the epoch's end (`EpochBegin.measure`).
    pub fn measured(mut self, measure: bool) -> Self {
        self.started = measure.then(crate::usage::Start::now);
        self
    }

    /// Apply items until the epoch is prepared (and committed, if on its own) or the session
    /// ends (after a last checkpoint, so a resumed epoch skips what was written).
    pub async fn run(mut self, rx: &mut mpsc::Receiver<WriterMsg>) -> Result<Ended, Refusal> {
        let mut batch = Vec::with_capacity(BATCH);
        let mut commit: Option<(u64, String, bool)> = None;
        let mut tick = tokio::time::interval(self.policy.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some((items, _, _)) = &commit {
                if self.wm.all_of(*items) {
                    break;
                }
            }
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        self.checkpoint().await?;
                        return Ok(Ended::Interrupted);
                    }
                    let mut items = Vec::with_capacity(n);
                    for msg in batch.drain(..) {
                        match msg {
                            WriterMsg::Item(item) => {
                                if let Some((limit, _, _)) = &commit {
                                    if item.seq >= *limit {
                                        return Err(Refusal::bad_request(format!(
                                            "item {} arrived after a commit of {limit} items", item.seq)));
                                    }
                                }
                                items.push(item);
                            }
                            WriterMsg::Commit { items, change_point, group } => {
                                if commit.is_some() {
                                    return Err(Refusal::bad_request("epoch committed twice"));
                                }
                                commit = Some((items, change_point, group));
                            }
                        }
                    }
                    if !items.is_empty() {
                        self.apply(items).await?;
                    }
                    if self.since_checkpoint >= self.policy.bytes
                        || (self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= self.policy.interval)
                    {
                        self.checkpoint().await?;
                    }
                }
                _ = tick.tick() => {
                    if self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= self.policy.interval {
                        self.checkpoint().await?;
                    }
                }
            }
        }
        let (_, change_point, group) = commit.expect("loop exits only with a commit");
        // The agent waits for the commit meanwhile: the session is busy, not idle.
        let _busy = self.liveness.busy();
        self.prepare(change_point).await?;
        if group {
            self.ack(Some(Ended::Prepared)).await;
            return Ok(Ended::Prepared);
        }
        crate::commit::commit(std::slice::from_ref(&self.disk), self.epoch, None).await?;
        self.ack(Some(Ended::Committed)).await;
        crate::commit::release(&self.disk, self.epoch).await;
        Ok(Ended::Committed)
    }

    async fn apply(&mut self, items: Vec<Item>) -> Result<(), Refusal> {
        let disk = &self.disk;
        let cs = disk.chunk_size;
        // 0. The epoch is durably in progress before anything of it reaches the target: after a
        //    crash the state then tells that the target may hold a partial delta.
        if !self.recorded {
            disk.persist_state().await?;
            self.recorded = true;
        }
        // 0b. Save the committed data these items overwrite (file targets), durably.
        if let (Some(mut undo), Target::File(t)) = (self.undo.take(), &disk.target) {
            let ranges: Vec<(u64, u64)> = items.iter().map(|i| (i.offset, i.length())).collect();
            let file = t.file();
            let (undo, saved) = tokio::task::spawn_blocking(move || {
                let r = undo.journal().and_then(|j| j.save(&file, &ranges));
                (undo, r)
            })
            .await
            .map_err(|e| join("undo journal", e))?;
            saved.map_err(|e| Refusal::internal(format!("{}: undo journal: {e}", disk.name)))?;
            self.undo = Some(undo);
            crash_point("sink::after-journal");
        }
        // 1. Durably mark every touched index entry stale before the data can change.
        {
            let ranges: Vec<Range<u64>> = items.iter().map(|i| touched(i.offset, i.length(), cs)).collect();
            let d = disk.clone();
            tokio::task::spawn_blocking(move || -> Result<(), Refusal> {
                let index = d.index()?;
                for r in ranges {
                    index.fill(r, &STALE).map_err(index_err)?;
                }
                index.sync().map_err(index_err)
            })
            .await
            .map_err(|e| join("mark index", e))??;
        }
        // 2. Write everything in the batch concurrently.
        let writes = items.iter().map(|item| async move {
            match &item.kind {
                ItemKind::Data { data, .. } => disk.target.write(item.offset, data.clone()).await,
                ItemKind::Zero { len } => disk.target.write_zeroes(item.offset, *len).await,
            }
        });
        futures::future::try_join_all(writes).await?;
        crash_point("sink::after-write");
        let (data, zero) = items.iter().fold((0u64, 0u64), |(d, z), i| match i.kind {
            ItemKind::Data { .. } => (d + i.length(), z),
            ItemKind::Zero { .. } => (d, z + i.length()),
        });
        let target = disk.name.clone();
        metrics::counter!("blockship_sink_written_bytes_total", "target" => target.clone()).increment(data);
        metrics::counter!("blockship_sink_zero_bytes_total", "target" => target.clone()).increment(zero);
        metrics::counter!("blockship_sink_items_total", "target" => target).increment(items.len() as u64);
        self.liveness.touch();
        // 3. Account; the index learns the new hashes at the next checkpoint.
        for item in items {
            self.wm.complete(item.seq, item.end()).map_err(|e| Refusal::bad_request(e.to_string()))?;
            self.since_checkpoint += item.length();
            match item.kind {
                ItemKind::Data { hash, .. } => {
                    let r = covered(item.offset, item.length(), cs, disk.size);
                    if r.end - r.start == 1 && touched(item.offset, item.length(), cs) == r {
                        self.known.push(Known::Hash(r.start, hash));
                    }
                }
                ItemKind::Zero { len } => {
                    let r = covered(item.offset, len, cs, disk.size);
                    if !r.is_empty() {
                        self.known.push(Known::Zero(r));
                    }
                }
            }
        }
        Ok(())
    }

    /// Make everything written so far durable, then record it, then acknowledge it.
    async fn checkpoint(&mut self) -> Result<(), Refusal> {
        if self.since_checkpoint == 0 && self.known.is_empty() {
            return Ok(());
        }
        self.disk.target.flush().await?;
        crash_point("sink::after-flush");
        let known = std::mem::take(&mut self.known);
        let d = self.disk.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Refusal> {
            let index = d.index()?;
            for k in known {
                match k {
                    Known::Hash(chunk, hash) => index.set(chunk, &hash),
                    Known::Zero(r) => index.fill(r, &ZERO_HASH),
                }
                .map_err(index_err)?;
            }
            index.sync().map_err(index_err)
        })
        .await
        .map_err(|e| join("update index", e))??;
        crash_point("sink::after-index");
        let offset = self.wm.offset();
        self.disk
            .update_state(|s| {
                if let Some(p) = s.in_progress.as_mut() {
                    p.durable_offset = p.durable_offset.max(offset);
                }
            })
            .await?;
        crash_point("sink::after-state");
        self.durable_bytes += self.since_checkpoint;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.ack(None).await;
        Ok(())
    }

    /// All items are written: make them durable and note in the state that the epoch is
    /// prepared, with the change point it will record.
    async fn prepare(&mut self, change_point: String) -> Result<(), Refusal> {
        self.checkpoint().await?;
        let epoch = self.epoch;
        self.disk
            .update_state(|s| {
                if let Some(p) = s.in_progress.as_mut().filter(|p| p.epoch == epoch) {
                    p.prepared = Some(change_point);
                }
            })
            .await?;
        tracing::info!(target = %self.disk.name, epoch, bytes = self.durable_bytes, "epoch prepared");
        Ok(())
    }

    /// Acknowledge what is durable (`ended`: and that the epoch is prepared or committed).
    async fn ack(&self, ended: Option<Ended>) {
        let ack = Ack {
            disk: self.disk.handle,
            epoch: self.epoch,
            durable_items: self.wm.next(),
            durable_offset: self.wm.offset(),
            durable_bytes: self.durable_bytes,
            committed: ended == Some(Ended::Committed),
            prepared: ended == Some(Ended::Prepared),
            usage: self.started.as_ref().filter(|_| ended.is_some()).map(|s| s.usage()),
        };
        crash_point("sink::before-ack");
        self.liveness.touch();
        // The agent may be gone; the state on disk is what counts.
        let _ = self.acks.send(Body::Ack(ack)).await;
    }
}

/// Refusal for an epoch number that does not follow the target's state.
pub fn epoch_mismatch(name: &str, asked: u64, committed: u64) -> Refusal {
    Refusal::new(
        ErrorCode::BadRequest,
        format!("{name}: agent began epoch {asked}, but the target's last committed epoch is {committed}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ranges() {
        let mb = 1 << 20;
        assert_eq!(touched(0, mb, 1 << 20), 0..1);
        assert_eq!(touched(4096, 4096, 1 << 20), 0..1);
        assert_eq!(touched(mb - 1, 2, 1 << 20), 0..2);
        assert_eq!(covered(0, mb, 1 << 20, 10 * mb), 0..1);
        assert_eq!(covered(4096, mb, 1 << 20, 10 * mb), 1..1);
        assert_eq!(covered(0, 3 * mb + 5, 1 << 20, 10 * mb), 0..3);
        // The short last chunk counts as covered when the extent reaches the disk's end.
        assert_eq!(covered(9 * mb, mb / 2, 1 << 20, 9 * mb + mb / 2), 9..10);
    }
}
