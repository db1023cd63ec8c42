//! One agent connection, of either transport. The agent's identity comes from its verified certificate; the first
//! bidirectional stream carries control messages (hello, open, index, verify, epoch begin and
//! commit, progress; acks and errors back), every unidirectional stream carries chunks and zero
//! extents (see `datastream`). The session is seated within the sink's connection limits after
//! Hello, must say Hello within the hello timeout and show progress within the idle timeout;
//! any refusal is sent as an `Error` frame and as the connection's close reason. Every control
//! message first passes `blockship_proto::session::SinkSession` (the ordering rules, without
//! I/O); this module carries out the step it names against targets, leases and writers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockship_proto::pb::{self, ErrorCode};
use blockship_proto::{version, Body};
use blockship_transport::conn::{Closed, Incoming, RecvStream, SendStream};
use blockship_transport::{Connection, FrameReader, FrameWriter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::datastream::{data_stream, lookup, Disks, StreamCtx};
use crate::disk::{self, Disk};
use crate::epoch::DiskErrors;
use crate::lease::Holder;
use crate::limits::Seat;
use crate::liveness::Liveness;
use crate::refusal::Refusal;
use crate::roster::Entry;
use crate::server::{SinkContext, Windows};
use crate::state::GroupRecord;
use crate::writer::WriterMsg;
use blockship_proto::session::{Scope, SinkSession, Step};

fn software() -> String {
    format!("blockship-sink {}", env!("CARGO_PKG_VERSION"))
}

/// Serve one incoming connection until it ends.
pub async fn handle(ctx: Arc<SinkContext>, windows: Arc<Windows>, incoming: Incoming) {
    let (remote, transport) = (incoming.remote, incoming.transport);
    let conn = match incoming.accept().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, "handshake failed (wrong CA; a missing, expired or wrong-use client certificate; or not a Blockship agent): {e}");
            return;
        }
    };
    let identity = match conn.peer_identity() {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(%remote, "refusing connection: {e}");
            conn.close(ErrorCode::Unauthorized as i32 as u32, e.to_string().as_bytes());
            return;
        }
    };
    tracing::info!(%remote, agent = %identity, %transport, "agent connected");
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
            metrics::counter!("blockship_sink_refusals_total", "code" => r.code.as_str_name()).increment(1);
            let mut reason = r.message.into_bytes();
            reason.truncate(1000);
            conn.close(r.code as i32 as u32, &reason);
        }
    }
}

struct Control {
    out: mpsc::Sender<Body>,
    /// Ends the writer after what is queued (epoch writers may still hold senders).
    end: tokio::sync::oneshot::Sender<()>,
    writer: JoinHandle<()>,
}

impl Control {
    /// The control writer: frames go out in order; when the session ends, what is queued is
    /// sent, the stream is finished and the task waits (briefly) until the agent has read it, so
    /// a last `Error` arrives before the connection closes.
    fn start(send: Box<dyn SendStream>) -> Self {
        let (out, mut rx) = mpsc::channel::<Body>(256);
        let (end, mut ended) = tokio::sync::oneshot::channel::<()>();
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(send);
            // `ended` may be polled only until it fires (a finished oneshot panics when polled
            // again); after that, closing `rx` lets the loop drain what is queued and stop.
            let mut ending = false;
            loop {
                let body = tokio::select! {
                    b = rx.recv() => b,
                    _ = &mut ended, if !ending => {
                        ending = true;
                        rx.close();
                        continue;
                    }
                };
                let Some(body) = body else { break };
                if w.send(&body).await.is_err() {
                    return;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), w.finish()).await;
        });
        Control { out, end, writer }
    }

    async fn send(&self, body: Body) {
        let _ = self.out.send(body).await;
    }

    async fn fail(self, r: &Refusal) {
        let body =
            pb::Error { code: r.code as i32, message: r.message.clone(), disk: 0, group: String::new() };
        self.send(Body::Error(body)).await;
        let _ = self.end.send(());
        let _ = tokio::time::timeout(Duration::from_secs(3), self.writer).await;
    }
}

async fn session(
    ctx: &Arc<SinkContext>,
    conn: &Connection,
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
        let first =
            tokio::time::timeout_at(deadline, reader.next_body("Hello")).await.map_err(|_| no_hello())??;
        let mut machine = SinkSession::new();
        let hello = match machine.on_message(first) {
            Ok(Step::Hello(h)) => h,
            Ok(other) => return Err(Refusal::internal(format!("session state: {other:?} before Hello"))),
            Err(v) => return Err(Refusal::new(v.code, v.message)),
        };
        let idle_ms = u32::try_from(limits.idle_timeout.as_millis()).unwrap_or(u32::MAX);
        let reply = version::negotiate(&hello, &software(), identity, idle_ms)
            .map_err(|e| Refusal::new(ErrorCode::Version, e.to_string()))?;
        ctx.auth.knows(identity)?;
        if !hello.join.is_empty() {
            return joined(ctx, conn, identity, &hello.join, reply, &mut reader, &control, open_streams)
                .await;
        }
        let seat = ctx.admission.seat(identity)?;
        let entry = Entry::new(
            conn.id(),
            identity,
            conn.transport().name(),
            &conn.remote().to_string(),
            seat.budget.clone(),
            disks.clone(),
        );
        let listed = ctx.roster.add(entry);
        let entry = listed.1.clone();
        run(ctx, conn, identity, disks, &mut reader, &control, seat, open_streams, &entry, machine, reply)
            .await
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

/// What the control loop keeps for a session.
struct Session<'a> {
    ctx: &'a Arc<SinkContext>,
    disks: &'a Disks,
    control: &'a Control,
    liveness: Arc<Liveness>,
    holder: Holder,
    errors: DiskErrors,
    /// The control stream's ordering rules (Hello, handles, epochs, groups).
    machine: SinkSession,
    /// Registry records of the groups opened on this session.
    records: HashMap<String, GroupRecord>,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    ctx: &Arc<SinkContext>,
    conn: &Connection,
    identity: &str,
    disks: &Disks,
    reader: &mut FrameReader<RecvStream>,
    control: &Control,
    seat: Seat,
    open_streams: &Arc<AtomicUsize>,
    entry: &Arc<Entry>,
    machine: SinkSession,
    mut reply: pb::HelloReply,
) -> Result<(), Refusal> {
    let _counted = Counted::session();
    let limits = &ctx.admission.limits;
    let liveness = Liveness::new();
    liveness.touch();
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<Refusal>(4);
    let (errors_tx, mut errors_rx) = mpsc::channel::<(u32, Refusal)>(64);
    let streams = StreamCtx {
        disks: disks.clone(),
        budget: seat.budget.clone(),
        liveness: liveness.clone(),
        errors: errors_tx.clone(),
        fatal: fatal_tx.clone(),
        received: entry.received.clone(),
        received_metric: metrics::counter!("blockship_sink_received_bytes_total", "agent" => identity.to_string()),
    };
    // Registered before the reply that names the token, so a joining connection finds it.
    let _joinable = reply.capabilities.iter().any(|c| c == version::CAP_JOIN).then(|| {
        let open = ctx.joins.open(identity, streams.clone(), entry.joined.clone());
        reply.session_token = bytes::Bytes::copy_from_slice(&open.token);
        open
    });
    control.send(Body::HelloReply(reply)).await;
    let acceptor = tokio::spawn(accept_data_streams(conn.clone(), streams, open_streams.clone()));
    let _abort = AbortOnDrop(acceptor);
    let holder = Holder {
        agent: identity.to_string(),
        session: conn.id(),
        close: Some({
            let conn = conn.clone();
            Arc::new(move |why: &str| conn.close(0, why.as_bytes()))
        }),
    };
    let idle = limits.idle_timeout;
    let mut s = Session {
        ctx,
        disks,
        control,
        liveness: liveness.clone(),
        holder,
        errors: errors_tx,
        machine,
        records: HashMap::new(),
    };
    loop {
        let frame = tokio::select! {
            f = reader.next() => match f {
                Ok(f) => f,
                // The agent closed the connection on purpose (code 0) after its last reply.
                Err(_) if closed_cleanly(conn) => return Ok(()),
                Err(e) => return Err(e.into()),
            },
            Some(r) = fatal_rx.recv() => return Err(r),
            Some((handle, r)) = errors_rx.recv() => {
                // A disk fails once: later errors of a closed handle (its other items) are echoes.
                if s.disks.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&handle) {
                    s.fail(Scope::Disk(handle), r).await;
                }
                continue;
            }
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
        if let Err((scope, r)) = s.dispatch(frame.body).await {
            if let Scope::Connection = scope {
                return Err(r);
            }
            s.fail(scope, r).await;
        }
    }
}

impl Session<'_> {
    /// End a disk (close its handle: its epoch ends uncommitted, its target is released) or a
    /// group's epoch, and tell the agent why; the rest of the session goes on.
    async fn fail(&mut self, scope: Scope, r: Refusal) {
        let (disk, group) = match scope {
            Scope::Disk(h) => {
                self.machine.disk_failed(h);
                let closed = self.disks.lock().unwrap_or_else(|p| p.into_inner()).remove(&h);
                if let Some(d) = &closed {
                    d.epoch.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
                let name = closed.map(|d| d.name.clone()).unwrap_or_default();
                tracing::warn!(target = %name, disk = h, code = ?r.code, "disk refused: {}", r.message);
                metrics::counter!("blockship_sink_refusals_total", "code" => r.code.as_str_name())
                    .increment(1);
                (h, String::new())
            }
            Scope::Group(g) => {
                tracing::warn!(group = %g, code = ?r.code, "group refused: {}", r.message);
                (0, g)
            }
            Scope::Connection => unreachable!("connection refusals end the session"),
        };
        self.control
            .send(Body::Error(pb::Error { code: r.code as i32, message: r.message, disk, group }))
            .await;
    }

    fn disk(&self, handle: u32) -> Result<Arc<Disk>, (Scope, Refusal)> {
        lookup(self.disks, handle).map_err(|r| (Scope::Disk(handle), r))
    }

    /// Check `body` against the session's state machine, then carry out its step.
    async fn dispatch(&mut self, body: Body) -> Result<(), (Scope, Refusal)> {
        let step = self.machine.on_message(body).map_err(|v| (v.scope, Refusal::new(v.code, v.message)))?;
        let limits = &self.ctx.admission.limits;
        match step {
            Step::OpenDisk(req) => {
                let scope = || Scope::Disk(req.disk);
                let open = self.disks.lock().unwrap_or_else(|p| p.into_inner()).len();
                if open >= limits.max_disks_per_connection {
                    return Err((
                        scope(),
                        Refusal::new(
                            ErrorCode::Busy,
                            format!(
                                "this connection already has {open} disks open (--max-disks-per-connection {}); open more connections or close disks",
                                limits.max_disks_per_connection
                            ),
                        ),
                    ));
                }
                let (disk, opened) =
                    disk::open(self.ctx, self.holder.clone(), &req).await.map_err(|r| (scope(), r))?;
                self.disks.lock().unwrap_or_else(|p| p.into_inner()).insert(req.disk, disk);
                self.control.send(Body::DiskOpened(opened)).await;
            }
            Step::CloseDisk(handle) => {
                if let Some(d) = self.disks.lock().unwrap_or_else(|p| p.into_inner()).remove(&handle) {
                    d.epoch.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
            }
            Step::Index(handle) => {
                let disk = self.disk(handle)?;
                if disk.writer().is_ok() {
                    // The previous epoch's writer is still finishing its commit.
                    return Err((
                        Scope::Disk(handle),
                        Refusal::bad_request("index requested during an epoch"),
                    ));
                }
                crate::hashes::send_index(&disk, &self.control.out)
                    .await
                    .map_err(|r| (Scope::Disk(handle), r))?;
            }
            Step::Verify(handle) => {
                let disk = self.disk(handle)?;
                crate::hashes::send_verify_hashes(&disk, &self.control.out)
                    .await
                    .map_err(|r| (Scope::Disk(handle), r))?;
            }
            Step::Begin { mut req, group_committed } => {
                let disk = self.disk(req.disk)?;
                let handle = req.disk;
                let scope = || Scope::Disk(handle);
                if let Some(c) = disk.state().cut_over {
                    return Err((scope(), disk::cut_over_refusal(&disk.name, &c)));
                }
                if let Some(record) = self.records.get(&req.group) {
                    // The state names the group as the registry does (AGENT/GROUP), so that a
                    // later GroupOpen recognizes a member prepared for it.
                    req.group = record.name.clone();
                }
                crate::epoch::begin(
                    self.ctx,
                    &disk,
                    &req,
                    group_committed,
                    self.control.out.clone(),
                    self.errors.clone(),
                    &self.liveness,
                )
                .await
                .map_err(|r| (scope(), r))?;
                self.machine.epoch_begun(handle, req.epoch);
                self.control
                    .send(Body::EpochStarted(pb::EpochStarted { disk: req.disk, epoch: req.epoch }))
                    .await;
            }
            Step::Commit(req) => {
                let disk = self.disk(req.disk)?;
                let scope = || Scope::Disk(req.disk);
                let (epoch, tx) = disk.writer().map_err(|r| (scope(), r))?;
                if epoch != req.epoch {
                    return Err((
                        scope(),
                        Refusal::internal(format!("the writer is at epoch {epoch}, not {}", req.epoch)),
                    ));
                }
                let group = disk.state().in_progress.is_some_and(|p| !p.group.is_empty());
                tx.send(WriterMsg::Commit { items: req.items, change_point: req.change_point, group })
                    .await
                    // The writer failed meanwhile: report its cause (CI once saw only "stopped").
                    .map_err(|_| (scope(), disk.writer_stopped()))?;
            }
            Step::GroupOpen(req) => {
                let scope = || Scope::Group(req.group.clone());
                let members = self.members(&req.disks).map_err(|r| (scope(), r))?;
                let (record, committed) =
                    crate::group::open(&self.ctx.state_root, &self.holder.agent, &req.group, &members)
                        .await
                        .map_err(|r| (scope(), r))?;
                self.records.insert(req.group.clone(), record);
                self.machine.group_opened(&req.group, req.disks, committed);
                self.control
                    .send(Body::GroupOpened(pb::GroupOpened { group: req.group, committed_epoch: committed }))
                    .await;
            }
            Step::GroupCommit { group, epoch, members } => {
                let scope = || Scope::Group(group.clone());
                let record = self.records.get(&group).cloned();
                let members = self.members(&members).map_err(|r| (scope(), r))?;
                crate::commit::commit(&members, epoch, record.as_ref()).await.map_err(|r| (scope(), r))?;
                self.machine.group_committed(&group, epoch);
                self.control
                    .send(Body::GroupCommitted(pb::GroupCommitted { group, epoch, cut_over: false }))
                    .await;
                for m in &members {
                    crate::commit::release(m, epoch).await;
                }
            }
            Step::GroupCutover { group, epoch, members } => {
                let scope = || Scope::Group(group.clone());
                let members = self.members(&members).map_err(|r| (scope(), r))?;
                crate::commit::cut_over(&members, epoch).await.map_err(|r| (scope(), r))?;
                self.control
                    .send(Body::GroupCommitted(pb::GroupCommitted { group, epoch, cut_over: true }))
                    .await;
            }
            // Progress only: it reset the idle deadline. Hello was taken before `run`.
            Step::Progress | Step::Hello(_) => {}
        }
        Ok(())
    }

    fn members(&self, handles: &[u32]) -> Result<Vec<Arc<Disk>>, Refusal> {
        handles.iter().map(|&h| lookup(self.disks, h)).collect()
    }
}

fn closed_cleanly(conn: &Connection) -> bool {
    matches!(conn.close_reason(), Some(Closed::Application { code: 0, .. }))
}

/// A connection that joined a session (`Hello.join`, see `joins`): its data streams feed that
/// session's disks; its control stream must stay silent until the connection ends.
#[allow(clippy::too_many_arguments)]
async fn joined(
    ctx: &Arc<SinkContext>,
    conn: &Connection,
    identity: &str,
    token: &[u8],
    reply: pb::HelloReply,
    reader: &mut FrameReader<RecvStream>,
    control: &Control,
    open_streams: &Arc<AtomicUsize>,
) -> Result<(), Refusal> {
    let _seat = ctx.admission.joining_seat(identity)?;
    let (streams, _joined) = ctx.joins.join(token, identity, conn)?;
    control.send(Body::HelloReply(reply)).await;
    tracing::info!(remote = %conn.remote(), agent = %identity, "connection joined a session");
    metrics::counter!("blockship_sink_joined_connections_total", "agent" => identity.to_string())
        .increment(1);
    let (fatal, disks) = (streams.fatal.clone(), streams.disks.clone());
    let acceptor = tokio::spawn(accept_data_streams(conn.clone(), streams, open_streams.clone()));
    let _abort = AbortOnDrop(acceptor);
    let (result, lost) = match reader.next().await {
        Ok(Some(frame)) => {
            let r = Refusal::bad_request(format!(
                "{} on a joined connection: it carries only data streams; send control messages \
                 on the session's first connection",
                blockship_proto::session::name(&frame.body)
            ));
            (Err(r), None)
        }
        Ok(None) => (Ok(()), None),
        Err(_) if closed_cleanly(conn) => (Ok(()), None),
        Err(e) => {
            let why = e.to_string();
            (Err(Refusal::from(e)), Some(why))
        }
    };
    // Its data streams may have held items of a running epoch, which can then never commit:
    // the session ends (the agent retries) rather than wait for them. An agent ends its joined
    // connections only after its epochs, so one ending while an epoch runs counts as lost.
    let running = || disks.lock().unwrap_or_else(|p| p.into_inner()).values().any(|d| d.epoch_running());
    if let Some(why) = lost.or_else(|| running().then(|| "it ended while an epoch ran".to_string())) {
        let message = format!("a connection that joined this session was lost ({why}): ending the session");
        let _ = fatal.try_send(Refusal::new(ErrorCode::Unspecified, message));
    }
    // Every way out closes the connection: none outlives its seat and window.
    if result.is_ok() {
        conn.close(0, b"joined connection done");
    }
    result
}

/// A session counted in `blockship_sink_sessions` while it runs (joined connections are not
/// sessions).
struct Counted;

impl Counted {
    fn session() -> Self {
        metrics::gauge!("blockship_sink_sessions").increment(1.0);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::gauge!("blockship_sink_sessions").decrement(1.0);
    }
}

struct AbortOnDrop(JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept_data_streams(conn: Connection, ctx: StreamCtx, open: Arc<AtomicUsize>) {
    while let Ok(recv) = conn.accept_uni().await {
        let (ctx, open, conn) = (ctx.clone(), open.clone(), conn.clone());
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let fatal = ctx.fatal.clone();
            let result = data_stream(recv, ctx).await;
            open.fetch_sub(1, Ordering::Relaxed);
            // A stream cut because its connection ended is reported by the connection's own
            // handler (the session's reader, or `joined`), which knows whether that was
            // deliberate (the agent's "done", the session's end) or a loss.
            match result {
                Err(r) if conn.close_reason().is_none() => {
                    let _ = fatal.send(r).await;
                }
                _ => {}
            }
        });
    }
}
