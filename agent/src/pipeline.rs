//! The send pipeline: read each piece of work from the source, decide what it needs (skip it,
//! send it as a zero extent, or hash and compress it), and hand the results, in offset order and
//! numbered densely, to the data streams. Reads and CPU work run `depth` at a time on the
//! blocking pool; everything downstream is bounded, so memory does not grow with disk size.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blockship_proto::codec::{chunk_digest, is_zero, Compression, Encoded, Encoder};
use blockship_proto::pb::{ChunkHeader, ZeroExtent};
use blockship_proto::{HASH_LEN, ZERO_HASH};
use bytes::Bytes;
use futures::StreamExt;

use crate::adaptive::Adaptive;
use crate::chunker::Work;
use crate::failpoint::{self, Once};
use crate::source::Source;
use crate::stages;
use crate::AgentError;

/// Longest zero extent sent as one item (adjacent zero pieces are merged up to this).
const MAX_ZERO_EXTENT: u64 = 1 << 30;

/// How pieces are judged.
#[derive(Clone)]
pub enum Mode {
    /// The target is new and all zeros: zero pieces are skipped.
    Fresh,
    /// Skip pieces whose digest equals the target's index entry.
    Compare(Arc<Vec<[u8; HASH_LEN]>>),
    /// Send every piece (zeros as zero extents).
    Incremental,
}

/// Counters shared with progress reporting and the summary.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes looked at (read, holes and skipped).
    pub bytes_done: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Payload bytes put on the wire (after compression).
    pub bytes_sent: AtomicU64,
    /// Raw bytes carried by chunks.
    pub bytes_data: AtomicU64,
    /// Bytes found to be zero (sent as zero extents, or skipped on a fresh target).
    pub bytes_zero: AtomicU64,
    /// Bytes equal on both sides (compare mode).
    pub bytes_equal: AtomicU64,
    pub chunks_sent: AtomicU64,
    pub zero_extents: AtomicU64,
}

impl Stats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What goes onto a data stream.
pub enum Out {
    Chunk(ChunkHeader, Bytes),
    Zero(ZeroExtent),
}

enum Decision {
    Skip,
    Zero { offset: u64, len: u64 },
    Data { offset: u64, len: u64, encoded: Encoded },
}

thread_local! {
    static ENCODER: RefCell<Option<(Compression, Encoder)>> = const { RefCell::new(None) };
}

fn encode(compression: Compression, raw: Bytes, hash: Option<[u8; HASH_LEN]>) -> Result<Encoded, AgentError> {
    // Hash first, on its own clock, so `bench` can tell hashing from compression.
    let hash = hash.unwrap_or_else(|| stages::HASH.time(|| *blake3::hash(&raw).as_bytes()));
    if compression == Compression::None {
        // No zstd context needed (auto mode switches per chunk; keep the thread's encoder).
        return Ok(Encoded { hash, codec: blockship_proto::pb::Codec::None, payload: raw });
    }
    ENCODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(c, _)| *c != compression) {
            *cell =
                Some((compression, Encoder::new(compression).map_err(|e| AgentError::Codec(e.to_string()))?));
        }
        let (_, enc) = cell.as_mut().expect("encoder initialised above");
        stages::COMPRESS.time(|| enc.encode_hashed(raw, hash)).map_err(|e| AgentError::Codec(e.to_string()))
    })
}

fn decide(
    mode: &Mode,
    work: Work,
    data: Option<Bytes>,
    compression: Compression,
    stats: &Stats,
    once: &Once,
) -> Result<Decision, AgentError> {
    let p = work.piece();
    let zero = Decision::Zero { offset: p.offset, len: p.len };
    let entry = |chunk: u64| match mode {
        Mode::Compare(index) => index.get(chunk as usize).copied(),
        _ => None,
    };
    let Some(data) = data else {
        // A hole of the source.
        Stats::add(&stats.bytes_zero, p.len);
        return Ok(match mode {
            Mode::Fresh => Decision::Skip,
            Mode::Compare(_) if entry(p.chunk) == Some(ZERO_HASH) => {
                Stats::add(&stats.bytes_equal, p.len);
                Decision::Skip
            }
            _ => zero,
        });
    };
    match mode {
        Mode::Compare(_) => {
            let digest = stages::HASH.time(|| chunk_digest(&data));
            if entry(p.chunk) == Some(digest) {
                Stats::add(&stats.bytes_equal, p.len);
                return Ok(Decision::Skip);
            }
            if digest == ZERO_HASH {
                Stats::add(&stats.bytes_zero, p.len);
                return Ok(zero);
            }
            let (data, hash) = failpoint::corrupt_after_hash(once, p.offset, data, Some(digest));
            let encoded = encode(compression, data, hash)?;
            Ok(Decision::Data { offset: p.offset, len: p.len, encoded })
        }
        Mode::Fresh | Mode::Incremental => {
            if is_zero(&data) {
                Stats::add(&stats.bytes_zero, p.len);
                return Ok(if matches!(mode, Mode::Fresh) { Decision::Skip } else { zero });
            }
            let (data, hash) = failpoint::corrupt_after_hash(once, p.offset, data, None);
            let encoded = encode(compression, data, hash)?;
            Ok(Decision::Data { offset: p.offset, len: p.len, encoded })
        }
    }
}

/// How the pipeline treats one epoch's work.
#[derive(Clone)]
pub struct Plan {
    pub mode: Mode,
    pub compression: Compression,
    /// With `Compression::Auto`: whether to compress right now (see `adaptive`).
    pub adaptive: Option<Arc<Adaptive>>,
    /// Pieces read and encoded concurrently.
    pub depth: usize,
    /// Disk handle the items are for.
    pub disk: u32,
}

/// Run the pipeline over `works`, sending results to `out`. Returns the number of items sent.
pub async fn run(
    source: Arc<Source>,
    works: impl Iterator<Item = Work> + Send + 'static,
    plan: Plan,
    stats: Arc<Stats>,
    out: async_channel::Sender<Out>,
) -> Result<u64, AgentError> {
    let Plan { mode, compression, adaptive, depth, disk } = plan;
    // This epoch attempt's allowance of injected corruption (test builds only).
    let once = Arc::new(Once::default());
    let mut decisions = futures::stream::iter(works)
        .map(|work| {
            let (source, mode, stats, once) = (source.clone(), mode.clone(), stats.clone(), once.clone());
            let compression = match (&adaptive, compression) {
                (Some(a), Compression::Auto { .. }) if !a.compress() => Compression::None,
                (_, c) => c,
            };
            async move {
                let p = work.piece();
                let data = match work {
                    Work::Read(_) => {
                        let d = source.read(p.offset, p.len as usize).await?;
                        Stats::add(&stats.bytes_read, p.len);
                        Some(d)
                    }
                    Work::Hole(_) => None,
                };
                let s = stats.clone();
                let decision =
                    tokio::task::spawn_blocking(move || decide(&mode, work, data, compression, &s, &once))
                        .await
                        .map_err(|e| AgentError::Internal(format!("chunk worker: {e}")))??;
                Stats::add(&stats.bytes_done, p.len);
                Ok::<_, AgentError>(decision)
            }
        })
        .buffered(depth.max(1));

    let mut seq = 0u64;
    let mut pending_zero: Option<(u64, u64)> = None;
    let send = |item: Out| {
        let out = out.clone();
        async move { out.send(item).await.map_err(|_| AgentError::Internal("data streams stopped".into())) }
    };
    let zero_item = |seq: u64, (offset, length): (u64, u64)| {
        Stats::add(&stats.zero_extents, 1);
        Out::Zero(ZeroExtent { disk, seq, offset, length })
    };
    while let Some(decision) = decisions.next().await {
        match decision? {
            Decision::Skip => {}
            Decision::Zero { offset, len } => match &mut pending_zero {
                Some((o, l)) if *o + *l == offset && *l + len <= MAX_ZERO_EXTENT => *l += len,
                _ => {
                    if let Some(z) = pending_zero.replace((offset, len)) {
                        send(zero_item(seq, z)).await?;
                        seq += 1;
                    }
                }
            },
            Decision::Data { offset, len, encoded } => {
                if let Some(z) = pending_zero.take() {
                    send(zero_item(seq, z)).await?;
                    seq += 1;
                }
                Stats::add(&stats.bytes_sent, encoded.payload.len() as u64);
                Stats::add(&stats.bytes_data, len);
                Stats::add(&stats.chunks_sent, 1);
                send(Out::Chunk(encoded.header(disk, seq, offset, len as u32), encoded.payload)).await?;
                seq += 1;
            }
        }
    }
    if let Some(z) = pending_zero.take() {
        send(zero_item(seq, z)).await?;
        seq += 1;
    }
    Ok(seq)
}
