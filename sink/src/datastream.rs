//! Data streams: every unidirectional stream of a session carries chunk headers with their
//! payloads and zero extents. A chunk's payload is read only once the connection's in-flight
//! budget grants its bytes (the grant travels with the chunk until it is written), so a client
//! announcing many large chunks and sending them slowly holds its own share and nothing more.
//! Each chunk is bounds-checked, decoded and BLAKE3-verified on the blocking pool before it
//! reaches its epoch writer; a bad chunk ends the session at once with an error naming it.

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
    pub fatal: mpsc::Sender<Refusal>,
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
                let disk = lookup(&ctx.disks, h.disk)?;
                check_bounds(&disk, h.offset, u64::from(h.length))?;
                let bytes = u64::from(h.length.max(h.encoded_length));
                Some(ctx.budget.grant(bytes, || ctx.liveness.busy()).await)
            }
            Some(_) => None,
        };
        let Some(frame) = reader.next().await? else { break };
        ctx.liveness.touch();
        match frame.body {
            Body::Chunk(h) => {
                let disk = lookup(&ctx.disks, h.disk)?;
                let (_, tx) = disk.writer()?;
                let slot =
                    slots.clone().acquire_owned().await.map_err(|_| Refusal::internal("decode slots"))?;
                let (payload, fatal) = (frame.payload, ctx.fatal.clone());
                tokio::spawn(async move {
                    let verified = tokio::task::spawn_blocking(move || {
                        let data = decode(&h, payload)?;
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
                        Ok(item) => tx
                            .send(WriterMsg::Item(item))
                            .await
                            .map_err(|_| Refusal::internal("epoch writer stopped")),
                        Err(r) => Err(r),
                    };
                    drop(slot);
                    if let Err(r) = result {
                        let _ = fatal.send(r).await;
                    }
                });
            }
            Body::Zero(z) => {
                let disk = lookup(&ctx.disks, z.disk)?;
                let (_, tx) = disk.writer()?;
                check_bounds(&disk, z.offset, z.length)?;
                let item = Item {
                    seq: z.seq,
                    offset: z.offset,
                    kind: ItemKind::Zero { len: z.length },
                    grant: None,
                };
                tx.send(WriterMsg::Item(item))
                    .await
                    .map_err(|_| Refusal::internal("epoch writer stopped"))?;
            }
            other => return Err(unexpected("ChunkHeader or ZeroExtent", &other).into()),
        }
    }
    // Wait for the chunks still being verified.
    let _all =
        slots.acquire_many(DECODE_DEPTH as u32).await.map_err(|_| Refusal::internal("decode slots"))?;
    Ok(())
}
