//! One agent connection. The agent's identity comes from its verified certificate; the first
//! bidirectional stream carries control messages (hello, open, index, verify, epoch begin and
//! commit, progress; acks and errors back), every unidirectional stream carries chunks and zero
//! extents (see `datastream`). The session is seated within the sink's connection limits after
//! Hello, must say Hello within the hello timeout and show progress within the idle timeout;
//! any refusal is sent as an `Error` frame and as the connection's close reason.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockship_proto::pb::{self, ErrorCode, SyncMode};
use blockship_proto::{version, Body};
use blockship_transport::framed::unexpected;
use blockship_transport::{tls, FrameReader, FrameWriter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::datastream::{data_stream, lookup, Disks, StreamCtx};
use crate::disk::{self, Disk};
use crate::lease::Holder;
use crate::limits::Seat;
use crate::liveness::Liveness;
use crate::refusal::{join, Refusal};
use crate::server::{SinkContext, Windows};
use crate::state::InProgress;
use crate::writer::{epoch_mismatch, EpochWriter, WriterMsg};

fn software() -> String {
    format!("blockship-sink {}", env!("CARGO_PKG_VERSION"))
}

/// Serve one incoming connection until it ends.
pub async fn handle(ctx: Arc<SinkContext>, windows: Arc<Windows>, incoming: quinn::Incoming) {
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
    let window = windows.join(&conn);
    let disks: Disks = Arc::default();
    let result = session(&ctx, &conn, &identity, &disks, &window.open).await;
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
    open_streams: &Arc<AtomicUsize>,
) -> Result<(), Refusal> {
    let limits = &ctx.admission.limits;
    let hello_timeout = limits.hello_timeout;
    let no_hello =
        || Refusal::bad_request(format!("no Hello within {hello_timeout:?}: closing the connection"));
    let deadline = tokio::time::Instant::now() + hello_timeout;
    let (send, recv) = tokio::time::timeout_at(deadline, conn.accept_bi())
        .await
        .map_err(|_| no_hello())?
        .map_err(|e| Refusal::bad_request(format!("control stream: {e}")))?;
    let mut reader = FrameReader::new(recv);
    let control = Control::start(send);
    let result = async {
        let hello = match tokio::time::timeout_at(deadline, reader.next_body("Hello"))
            .await
            .map_err(|_| no_hello())??
        {
            Body::Hello(h) => h,
            other => return Err(unexpected("Hello", &other).into()),
        };
        let idle_ms = u32::try_from(limits.idle_timeout.as_millis()).unwrap_or(u32::MAX);
        let reply = version::negotiate(&hello, &software(), identity, idle_ms)
            .map_err(|e| Refusal::new(ErrorCode::Version, e.to_string()))?;
        ctx.auth.knows(identity)?;
        let seat = ctx.admission.seat(identity)?;
        control.send(Body::HelloReply(reply)).await;
        run(ctx, conn, identity, disks, &mut reader, &control, seat, open_streams).await
    }
    .await;
    match result {
        Ok(()) => Ok(()),
        Err(r) => {
            control.fail(&r).await;
            Err(r)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    ctx: &Arc<SinkContext>,
    conn: &quinn::Connection,
    identity: &str,
    disks: &Disks,
    reader: &mut FrameReader<quinn::RecvStream>,
    control: &Control,
    seat: Seat,
    open_streams: &Arc<AtomicUsize>,
) -> Result<(), Refusal> {
    let limits = &ctx.admission.limits;
    let liveness = Liveness::new();
    liveness.touch();
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<Refusal>(4);
    let streams = StreamCtx {
        disks: disks.clone(),
        budget: seat.budget.clone(),
        liveness: liveness.clone(),
        fatal: fatal_tx.clone(),
    };
    let acceptor = tokio::spawn(accept_data_streams(conn.clone(), streams, open_streams.clone()));
    let _abort = AbortOnDrop(acceptor);
    let holder = Holder {
        agent: identity.to_string(),
        session: conn.stable_id() as u64,
        close: Some({
            let conn = conn.clone();
            Arc::new(move |why: &str| conn.close(0u32.into(), why.as_bytes()))
        }),
    };
    let idle = limits.idle_timeout;

    loop {
        let frame = tokio::select! {
            f = reader.next() => match f {
                Ok(f) => f,
                // The agent closed the connection on purpose (code 0) after its last reply.
                Err(_) if closed_cleanly(conn) => return Ok(()),
                Err(e) => return Err(e.into()),
            },
            Some(r) = fatal_rx.recv() => return Err(r),
            _ = liveness.expired(idle) => {
                return Err(Refusal::new(
                    ErrorCode::Idle,
                    format!("no progress from the agent for {idle:?}: closing the session and releasing its targets"),
                ))
            }
        };
        let Some(frame) = frame else { return Ok(()) };
        liveness.touch();
        let _busy = liveness.busy();
        match frame.body {
            Body::OpenDisk(req) => {
                let open = disks.lock().unwrap_or_else(|p| p.into_inner()).len();
                if disks.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&req.disk) {
                    return Err(Refusal::bad_request(format!("disk handle {} opened twice", req.disk)));
                }
                if open >= limits.max_disks_per_connection {
                    return Err(Refusal::new(
                        ErrorCode::Busy,
                        format!(
                            "this connection already has {open} disks open (--max-disks-per-connection {}); open more connections or close disks",
                            limits.max_disks_per_connection
                        ),
                    ));
                }
                let (disk, opened) = disk::open(ctx, holder.clone(), &req).await?;
                disks.lock().unwrap_or_else(|p| p.into_inner()).insert(req.disk, disk);
                control.send(Body::DiskOpened(opened)).await;
            }
            Body::IndexRequest(req) => {
                let disk = lookup(disks, req.disk)?;
                if disk.writer().is_ok() {
                    return Err(Refusal::bad_request("index requested during an epoch"));
                }
                crate::hashes::send_index(&disk, &control.out).await?;
            }
            Body::VerifyRequest(req) => {
                let disk = lookup(disks, req.disk)?;
                crate::hashes::send_verify_hashes(&disk, &control.out).await?;
            }
            Body::EpochBegin(req) => {
                let disk = lookup(disks, req.disk)?;
                begin_epoch(ctx, &disk, &req, control, &fatal_tx, &liveness).await?;
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
            // Progress only: it reset the idle deadline above.
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

async fn begin_epoch(
    ctx: &Arc<SinkContext>,
    disk: &Arc<Disk>,
    req: &pb::EpochBegin,
    control: &Control,
    fatal: &mpsc::Sender<Refusal>,
    liveness: &Arc<Liveness>,
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
        liveness.clone(),
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

async fn accept_data_streams(conn: quinn::Connection, ctx: StreamCtx, open: Arc<AtomicUsize>) {
    while let Ok(recv) = conn.accept_uni().await {
        let (ctx, open) = (ctx.clone(), open.clone());
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let fatal = ctx.fatal.clone();
            let result = data_stream(recv, ctx).await;
            open.fetch_sub(1, Ordering::Relaxed);
            if let Err(r) = result {
                let _ = fatal.send(r).await;
            }
        });
    }
}
