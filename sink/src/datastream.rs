//! Data streams: every unidirectional stream of a session carries chunk headers with their
//! payloads and zero extents. A chunk's payload is read only once the connection's in-flight
//! budget grants its bytes (the grant travels with the chunk until it is written), so a client
//! announcing many large chunks and sending them slowly holds its own share and nothing more.
//! Each chunk is bounds-checked, decoded and BLAKE3-verified on the blocking pool before it
//! reaches its epoch writer; a bad chunk ends its disk's epoch at once with an error naming it
//! (the other disks of the connection go on), a malformed stream ends the connection. Items of
//! a disk handle that is closed (after such an error) are dropped unread: handles are never
//! reused on a connection, so they cannot reach another epoch.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blockship_proto::codec::Decoder;
use blockship_proto::pb;
use blockship_proto::{Body, HASH_LEN};
use blockship_transport::framed::unexpected;
use blockship_transport::FrameReader;
use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, Semaphore};

use crate::disk::{check_bounds, Disk};
use crate::epoch::DiskErrors;
use crate::limits::Budget;
use crate::liveness::Liveness;
use crate::refusal::{join, Refusal};
use crate::writer::{Item, ItemKind, WriterMsg};

/// Chunks decoded concurrently per data stream.
const DECODE_DEPTH: usize = 2;

pub type Disks = Arc<Mutex<HashMap<u32, Arc<Disk>>>>;

pub fn lookup(disks: &Disks, handle: u32) -> Result<Arc<Disk>, Refusal> {
    disks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&handle)
        .cloned()
        .ok_or_else(|| Refusal::bad_request(format!("disk handle {handle} is not open")))
}

thread_local! {
    static DECODER: RefCell<Option<Decoder>> = const { RefCell::new(None) };
}

fn decode(header: &pb::ChunkHeader, payload: Bytes) -> Result<Bytes, Refusal> {
    DECODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(Decoder::new()?);
        }
        Ok(cell.as_mut().expect("decoder initialised above").decode(header, payload)?)
    })
}

/// What a data stream needs from its session.
#[derive(Clone)]
pub struct StreamCtx {
    pub disks: Disks,
    pub budget: Arc<Budget>,
    pub liveness: Arc<Liveness>,
    /// Problems of one disk (its epoch ends).
    pub errors: DiskErrors,
    /// Problems of the connection (it ends).
    pub fatal: mpsc::Sender<Refusal>,
    /// Chunk payload bytes received (the control API's throughput).
    pub received: Arc<std::sync::atomic::AtomicU64>,
    /// The same bytes as `blockship_sink_received_bytes_total{agent}`.
    pub received_metric: metrics::Counter,
}

/// The open disk `handle`, or None when it was closed (its items are dropped).
fn open_disk(disks: &Disks, handle: u32) -> Option<Arc<Disk>> {
    disks.lock().unwrap_or_else(|p| p.into_inner()).get(&handle).cloned()
}

/// Read one data stream to its end.
pub async fn data_stream<R: AsyncRead + Unpin>(recv: R, ctx: StreamCtx) -> Result<(), Refusal> {
    let mut reader = FrameReader::new(recv);
    let slots = Arc::new(Semaphore::new(DECODE_DEPTH));
    loop {
        // Admit a chunk's bytes before reading them.
        let grant = match reader.next_header().await? {
            None => break,
            Some((Body::Chunk(h), _)) => {
                let bytes = u64::from(h.length.max(h.encoded_length));
                Some(ctx.budget.grant(bytes, || ctx.liveness.busy()).await)
            }
            Some(_) => None,
        };
        let Some(frame) = reader.next().await? else { break };
        ctx.liveness.touch();
        ctx.received.fetch_add(frame.payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
        ctx.received_metric.increment(frame.payload.len() as u64);
        let (handle, offset, len) = match &frame.body {
            Body::Chunk(h) => (h.disk, h.offset, u64::from(h.length)),
            Body::Zero(z) => (z.disk, z.offset, z.length),
            other => return Err(unexpected("ChunkHeader or ZeroExtent", other).into()),
        };
        let Some(disk) = open_disk(&ctx.disks, handle) else {
            tracing::debug!(disk = handle, "item of a closed disk dropped");
            continue;
        };
        let tx = match check_bounds(&disk, offset, len).and_then(|()| disk.writer()) {
            Ok((_, tx)) => tx,
            Err(r) => {
                let _ = ctx.errors.send((handle, r)).await;
                continue;
            }
        };
        match frame.body {
            Body::Chunk(h) => {
                let slot =
                    slots.clone().acquire_owned().await.map_err(|_| Refusal::internal("decode slots"))?;
                let (payload, errors, disk) = (frame.payload, ctx.errors.clone(), disk.clone());
                tokio::spawn(async move {
                    let verified = tokio::task::spawn_blocking(move || {
                        let data = crate::usage::VERIFY.time(|| decode(&h, payload))?;
                        let mut hash = [0u8; HASH_LEN];
                        hash.copy_from_slice(&h.blake3);
                        Ok::<_, Refusal>(Item {
                            seq: h.seq,
                            offset: h.offset,
                            kind: ItemKind::Data { data, hash },
                            grant,
                        })
                    })
                    .await
                    .map_err(|e| join("verify chunk", e))
                    .and_then(|r| r);
                    let result = match verified {
                        Ok(item) => tx.send(WriterMsg::Item(item)).await.map_err(|_| disk.writer_stopped()),
                        Err(r) => Err(r),
                    };
                    drop(slot);
                    if let Err(r) = result {
                        if r.code == pb::ErrorCode::Checksum {
                            metrics::counter!("blockship_sink_checksum_failures_total").increment(1);
                        }
                        let _ = errors.send((handle, r)).await;
                    }
                });
            }
            Body::Zero(z) => {
                let item = Item {
                    seq: z.seq,
                    offset: z.offset,
                    kind: ItemKind::Zero { len: z.length },
                    grant: None,
                };
                if tx.send(WriterMsg::Item(item)).await.is_err() {
                    let _ = ctx.errors.send((handle, disk.writer_stopped())).await;
                }
            }
            _ => unreachable!("only items get here"),
        }
    }
    // Wait for the chunks still being verified.
    let _all =
        slots.acquire_many(DECODE_DEPTH as u32).await.map_err(|_| Refusal::internal("decode slots"))?;
    Ok(())
}
