//! One agent connection. The agent's identity comes from its verified certificate; the first
//! bidirectional stream carries control messages (hello, open, index, verify, epoch begin and
//! commit; acks and errors back), every unidirectional stream carries chunks and zero extents.
//! Chunks are decoded and BLAKE3-verified on the blocking pool before they reach the epoch
//! writer; any refusal is sent as an `Error` frame and as the connection's close reason.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockship_proto::codec::{chunk_digest, Decoder};
use blockship_proto::frame::MAX_HASHES_PER_FRAME;
use blockship_proto::pb::{self, ErrorCode, SyncMode};
use blockship_proto::{version, Body, HASH_LEN};
use blockship_transport::framed::unexpected;
use blockship_transport::{tls, FrameReader, FrameWriter};
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::disk::{self, check_bounds, Disk};
use crate::refusal::{join, Refusal};
use crate::server::SinkContext;
use crate::state::InProgress;
use crate::writer::{epoch_mismatch, EpochWriter, Item, ItemKind, WriterMsg};

/// Chunks decoded concurrently per data stream.
const DECODE_DEPTH: usize = 2;
/// Hashes per `HashList` frame while verifying (small, so the agent compares as it goes).
const VERIFY_HASHES_PER_FRAME: usize = 256;

type Disks = Arc<Mutex<HashMap<u32, Arc<Disk>>>>;

fn software() -> String {
    format!("blockship-sink {}", env!("CARGO_PKG_VERSION"))
}

/// Serve one incoming connection until it ends.
pub async fn handle(ctx: Arc<SinkContext>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, "handshake failed (wrong CA, no client certificate, or not a Blockship agent): {e}");
            return;
        }
    };
    let identity = match tls::peer_identity(&conn) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(%remote, "refusing connection: {e}");
            conn.close((ErrorCode::Unauthorized as i32 as u32).into(), e.to_string().as_bytes());
            return;
        }
    };
    tracing::info!(%remote, agent = %identity, "agent connected");
    let disks: Disks = Arc::default();
    let result = session(&ctx, &conn, &identity, &disks).await;
    // Ending the epochs lets each writer make what it has durable and release its target.
    for disk in disks.lock().unwrap_or_else(|p| p.into_inner()).values() {
        disk.epoch.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
    match result {
        Ok(()) => tracing::info!(%remote, agent = %identity, "session ended"),
        Err(r) => {
            tracing::warn!(%remote, agent = %identity, code = ?r.code, "session refused: {}", r.message);
            let mut reason = r.message.into_bytes();
            reason.truncate(1000);
            conn.close((r.code as i32 as u32).into(), &reason);
        }
    }
}

struct Control {
    out: mpsc::Sender<Body>,
    writer: JoinHandle<()>,
}

impl Control {
    /// The control writer: frames go out in order; after an `Error` the stream is finished and
    /// the task waits (briefly) until the agent has read it.
    fn start(send: quinn::SendStream) -> Self {
        let (out, mut rx) = mpsc::channel::<Body>(256);
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(send);
            while let Some(body) = rx.recv().await {
                let is_error = matches!(body, Body::Error(_));
                if w.send(&body).await.is_err() {
                    return;
                }
                if is_error {
                    let _ = tokio::time::timeout(Duration::from_secs(2), w.finish()).await;
                    return;
                }
            }
            w.close();
        });
        Control { out, writer }
    }

    async fn send(&self, body: Body) {
        let _ = self.out.send(body).await;
    }

    async fn fail(self, r: &Refusal) {
        self.send(Body::Error(pb::Error { code: r.code as i32, message: r.message.clone(), disk: 0 })).await;
        drop(self.out);
        let _ = tokio::time::timeout(Duration::from_secs(3), self.writer).await;
    }
}

async fn session(
    ctx: &Arc<SinkContext>,
    conn: &quinn::Connection,
    identity: &str,
    disks: &Disks,
) -> Result<(), Refusal> {
    let (send, recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .map_err(|_| Refusal::bad_request("no control stream within 10 s"))?
        .map_err(|e| Refusal::bad_request(format!("control stream: {e}")))?;
    let mut reader = FrameReader::new(recv);
    let control = Control::start(send);
    let result = run(ctx, conn, identity, disks, &mut reader, &control).await;
    match result {
        Ok(()) => Ok(()),
        Err(r) => {
            control.fail(&r).await;
            Err(r)
        }
    }
}

async fn run(
    ctx: &Arc<SinkContext>,
    conn: &quinn::Connection,
    identity: &str,
    disks: &Disks,
    reader: &mut FrameReader<quinn::RecvStream>,
    control: &Control,
) -> Result<(), Refusal> {
    let hello = match reader.next_body("Hello").await? {
        Body::Hello(h) => h,
        other => return Err(unexpected("Hello", &other).into()),
    };
    let idle_ms = u32::try_from(ctx.idle_timeout.as_millis()).unwrap_or(u32::MAX);
    let reply = version::negotiate(&hello, &software(), identity, idle_ms)
        .map_err(|e| Refusal::new(ErrorCode::Version, e.to_string()))?;
    ctx.auth.knows(identity)?;
    control.send(Body::HelloReply(reply)).await;

    let (fatal_tx, mut fatal_rx) = mpsc::channel::<Refusal>(4);
    let acceptor = tokio::spawn(accept_data_streams(conn.clone(), disks.clone(), fatal_tx.clone()));
    let _abort = AbortOnDrop(acceptor);

    loop {
        let frame = tokio::select! {
            f = reader.next() => match f {
                Ok(f) => f,
                // The agent closed the connection on purpose (code 0) after its last reply.
                Err(_) if closed_cleanly(conn) => return Ok(()),
                Err(e) => return Err(e.into()),
            },
            Some(r) = fatal_rx.recv() => return Err(r),
        };
        let Some(frame) = frame else { return Ok(()) };
        match frame.body {
            Body::OpenDisk(req) => {
                if disks.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&req.disk) {
                    return Err(Refusal::bad_request(format!("disk handle {} opened twice", req.disk)));
                }
                let (disk, opened) = disk::open(ctx, identity, Some(conn.clone()), &req).await?;
                disks.lock().unwrap_or_else(|p| p.into_inner()).insert(req.disk, disk);
                control.send(Body::DiskOpened(opened)).await;
            }
            Body::IndexRequest(req) => {
                let disk = lookup(disks, req.disk)?;
                if disk.writer().is_ok() {
                    return Err(Refusal::bad_request("index requested during an epoch"));
                }
                send_index(&disk, control).await?;
            }
            Body::VerifyRequest(req) => {
                let disk = lookup(disks, req.disk)?;
                send_verify_hashes(&disk, control).await?;
            }
            Body::EpochBegin(req) => {
                let disk = lookup(disks, req.disk)?;
                begin_epoch(ctx, &disk, &req, control, &fatal_tx).await?;
                control.send(Body::EpochStarted(pb::EpochStarted { disk: req.disk, epoch: req.epoch })).await;
            }
            Body::EpochCommit(req) => {
                let disk = lookup(disks, req.disk)?;
                let (epoch, tx) = disk.writer()?;
                if epoch != req.epoch {
                    return Err(Refusal::bad_request(format!(
                        "commit of epoch {} while epoch {epoch} is open",
                        req.epoch
                    )));
                }
                tx.send(WriterMsg::Commit { items: req.items, change_point: req.change_point })
                    .await
                    .map_err(|_| Refusal::internal("epoch writer stopped"))?;
            }
            // Liveness only (the session's idle deadline); nothing to answer.
            Body::Progress(_) => {}
            other => return Err(unexpected("a control message", &other).into()),
        }
    }
}

fn closed_cleanly(conn: &quinn::Connection) -> bool {
    matches!(conn.close_reason(), Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == 0u32.into())
}

struct AbortOnDrop(JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lookup(disks: &Disks, handle: u32) -> Result<Arc<Disk>, Refusal> {
    disks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&handle)
        .cloned()
        .ok_or_else(|| Refusal::bad_request(format!("disk handle {handle} is not open")))
}

async fn begin_epoch(
    ctx: &Arc<SinkContext>,
    disk: &Arc<Disk>,
    req: &pb::EpochBegin,
    control: &Control,
    fatal: &mpsc::Sender<Refusal>,
) -> Result<(), Refusal> {
    if disk.index.is_none() {
        return Err(Refusal::bad_request("disk was opened for verification only"));
    }
    if disk.writer().is_ok() {
        return Err(Refusal::bad_request("an epoch is already open on this disk"));
    }
    let state = disk.state();
    if req.epoch != state.committed_epoch + 1 {
        return Err(epoch_mismatch(&disk.name, req.epoch, state.committed_epoch));
    }
    let mode = SyncMode::try_from(req.mode).unwrap_or(SyncMode::Unspecified);
    if !matches!(mode, SyncMode::Full | SyncMode::Compare | SyncMode::Incremental) {
        return Err(Refusal::bad_request(format!("epoch mode {mode:?} cannot write")));
    }
    let digest = hex::encode(&req.plan_digest);
    if req.resume_offset > 0 {
        // Resuming keeps the data below the offset: only sound if it came from the same frozen
        // view of the source, under the same plan.
        let ok = state.in_progress.as_ref().is_some_and(|p| {
            p.epoch == req.epoch
                && p.plan_digest == digest
                && !req.view.is_empty()
                && p.view == req.view
                && req.resume_offset <= p.durable_offset
        });
        if !ok {
            return Err(Refusal::bad_request(format!(
                "cannot resume epoch {} at offset {}: the target has no durable progress of this plan from this view of the source",
                req.epoch, req.resume_offset
            )));
        }
    }
    let undo = {
        let (d, enabled) = (disk.clone(), ctx.file_rollback);
        tokio::task::spawn_blocking(move || d.undo_journal(enabled))
            .await
            .map_err(|e| join("undo journal", e))??
    };
    // Rollback is possible only if every attempt at this epoch journaled what it overwrote.
    let journaled_before = match &state.in_progress {
        Some(p) if p.epoch == req.epoch => p.undo,
        _ => true,
    };
    let in_progress = InProgress {
        epoch: req.epoch,
        mode: req.mode,
        plan_digest: digest,
        durable_offset: req.resume_offset,
        view: req.view.clone(),
        undo: undo.is_some() && journaled_before,
    };
    disk.update_state(|s| s.in_progress = Some(in_progress)).await?;

    let (tx, rx) = mpsc::channel(crate::writer::BATCH);
    *disk.epoch.lock().unwrap_or_else(|p| p.into_inner()) = Some(disk::ActiveEpoch { epoch: req.epoch, tx });
    let writer = EpochWriter::new(
        disk.clone(),
        req.epoch,
        req.resume_offset,
        control.out.clone(),
        ctx.checkpoint,
        undo,
    );
    let (d, fatal) = (disk.clone(), fatal.clone());
    tokio::spawn(async move {
        let result = writer.run(rx).await;
        d.epoch.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Err(r) = result {
            let _ = fatal.send(r).await;
        }
    });
    tracing::info!(target = %disk.name, epoch = req.epoch, ?mode, resume_offset = req.resume_offset, "epoch begun");
    Ok(())
}

async fn send_index(disk: &Arc<Disk>, control: &Control) -> Result<(), Refusal> {
    disk.refresh_index().await?;
    let index = disk.index()?;
    let chunks = index.chunks();
    let mut first = 0;
    loop {
        let count = (chunks - first).min(MAX_HASHES_PER_FRAME as u64) as usize;
        let hashes = index.get(first, count).map_err(disk::index_err)?;
        let last = first + count as u64 >= chunks;
        control
            .send(Body::HashList(pb::HashList {
                disk: disk.handle,
                first_chunk: first,
                hashes: hashes.into(),
                last,
            }))
            .await;
        if last {
            return Ok(());
        }
        first += count as u64;
    }
}

async fn send_verify_hashes(disk: &Arc<Disk>, control: &Control) -> Result<(), Refusal> {
    let cs = u64::from(disk.chunk_size);
    let size = disk.size.min(disk.target.size());
    let chunks = blockship_proto::chunk_count(size, disk.chunk_size);
    let mut digests = futures::stream::iter(0..chunks)
        .map(|chunk| {
            let disk = disk.clone();
            async move {
                let offset = chunk * cs;
                let data = disk.target.read(offset, cs.min(size - offset) as usize).await?;
                tokio::task::spawn_blocking(move || chunk_digest(&data)).await.map_err(|e| join("hash", e))
            }
        })
        .buffered(4);
    let mut first = 0u64;
    let mut buf = Vec::with_capacity(VERIFY_HASHES_PER_FRAME * HASH_LEN);
    let mut n = 0u64;
    while let Some(d) = digests.next().await {
        buf.extend_from_slice(&d?);
        n += 1;
        if buf.len() == VERIFY_HASHES_PER_FRAME * HASH_LEN || n == chunks {
            let hashes = Bytes::from(std::mem::take(&mut buf));
            let count = (hashes.len() / HASH_LEN) as u64;
            let last = n == chunks;
            control
                .send(Body::HashList(pb::HashList { disk: disk.handle, first_chunk: first, hashes, last }))
                .await;
            first += count;
        }
    }
    if chunks == 0 {
        control
            .send(Body::HashList(pb::HashList {
                disk: disk.handle,
                first_chunk: 0,
                hashes: Bytes::new(),
                last: true,
            }))
            .await;
    }
    Ok(())
}

async fn accept_data_streams(conn: quinn::Connection, disks: Disks, fatal: mpsc::Sender<Refusal>) {
    while let Ok(recv) = conn.accept_uni().await {
        let (disks, fatal) = (disks.clone(), fatal.clone());
        tokio::spawn(async move {
            if let Err(r) = data_stream(recv, &disks).await {
                let _ = fatal.send(r).await;
            }
        });
    }
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

type Verified = Result<(mpsc::Sender<WriterMsg>, Item), Refusal>;

async fn forward(done: Result<Verified, tokio::task::JoinError>) -> Result<(), Refusal> {
    let (tx, item) = done.map_err(|e| join("verify chunk", e))??;
    tx.send(WriterMsg::Item(item)).await.map_err(|_| Refusal::internal("epoch writer stopped"))
}

/// Read one data stream: bounds-check, decode and verify each chunk, hand it to its epoch writer.
/// Verification results are taken as soon as they are ready, so a bad chunk is refused at once
/// even if the agent sends nothing more.
async fn data_stream(recv: quinn::RecvStream, disks: &Disks) -> Result<(), Refusal> {
    let mut reader = FrameReader::new(recv);
    let mut pending: FuturesOrdered<JoinHandle<Verified>> = FuturesOrdered::new();
    loop {
        let frame = tokio::select! {
            biased;
            Some(done) = pending.next(), if !pending.is_empty() => {
                forward(done).await?;
                continue;
            }
            // Cancel-safe: a partly read frame stays in the reader's buffer.
            f = reader.next(), if pending.len() < DECODE_DEPTH => f?,
        };
        let Some(frame) = frame else { break };
        match frame.body {
            Body::Chunk(h) => {
                let disk = lookup(disks, h.disk)?;
                let (_, tx) = disk.writer()?;
                check_bounds(&disk, h.offset, u64::from(h.length))?;
                let payload = frame.payload;
                pending.push_back(tokio::task::spawn_blocking(move || {
                    let data = decode(&h, payload)?;
                    let mut hash = [0u8; HASH_LEN];
                    hash.copy_from_slice(&h.blake3);
                    Ok((tx, Item { seq: h.seq, offset: h.offset, kind: ItemKind::Data { data, hash } }))
                }));
            }
            Body::Zero(z) => {
                let disk = lookup(disks, z.disk)?;
                let (_, tx) = disk.writer()?;
                check_bounds(&disk, z.offset, z.length)?;
                tx.send(WriterMsg::Item(Item {
                    seq: z.seq,
                    offset: z.offset,
                    kind: ItemKind::Zero { len: z.length },
                }))
                .await
                .map_err(|_| Refusal::internal("epoch writer stopped"))?;
            }
            other => return Err(unexpected("ChunkHeader or ZeroExtent", &other).into()),
        }
    }
    while let Some(done) = pending.next().await {
        forward(done).await?;
    }
    Ok(())
}
