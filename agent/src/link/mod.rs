//! A long-lived connection to a sink that carries many disks at once. One control stream: a
//! reader task routes every reply to the disk or group it names (`DiskHandle`, group requests),
//! and requests of many disks interleave on the shared writer. Data streams are shared by all
//! disks and fed from one queue (items name their disk handle); the sink decides how many there
//! may be. Disk handles only grow, so nothing of a failed disk can reach another epoch. A
//! heartbeat tells the sink the agent progresses while no data flows (scanning, waiting for a
//! commit), and only then. When the connection fails, every waiter learns the sink's reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockship_proto::pb::{self, DiskOpened, HelloReply, OpenDisk};
use blockship_proto::{version, Body};
use blockship_transport::conn::RecvStream;
use blockship_transport::framed::unexpected;
use blockship_transport::{
    tls, Closed, Connection, FrameReader, FrameWriter, QuicTuning, TlsFiles, Transport, TransportError,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::adaptive::{Adaptive, CpuMeter, MonitorGuard};
use crate::pace::Pacer;
use crate::pipeline::{Out, Stats};
use crate::streams::Streams;
use crate::AgentError;

mod disk;
mod join;

pub use disk::DiskHandle;
pub use join::{Connections, MAX_CONNECTIONS};
/// Replies buffered per disk or group before the reader waits for its consumer.
const ROUTE_DEPTH: usize = 64;

/// Explain a connection failure in terms of what the operator can fix.
pub fn explain(sink: &str, e: TransportError) -> AgentError {
    let text = e.to_string();
    let lower = text.to_lowercase();
    let by_peer = text.contains("by peer");
    // The sink's TLS alert: by name over TCP, by number over QUIC ("handshake failed: error N").
    let alert = |name: &str, number: u8| {
        text.contains(name) || (by_peer && text.contains(&format!("handshake failed: error {number}")))
    };
    let hint = if alert("CertificateExpired", 45) {
        Some(
            "the sink refused our certificate as expired or not yet valid: check its dates and this \
             host's clock, and reissue it if needed",
        )
    } else if alert("UnsupportedCertificate", 43) {
        Some(
            "the sink refused our certificate as not meant for client authentication: an agent's \
             certificate needs the extended key usage clientAuth",
        )
    } else if alert("CertificateRequired", 116) {
        Some("the sink requires a client certificate")
    } else if lower.contains("invalid peer certificate")
        && (lower.contains("expired") || lower.contains("not valid yet") || lower.contains("notvalidyet"))
    {
        Some("the sink's certificate is expired or not yet valid: check its dates and this host's clock")
    } else if by_peer && text.contains("cryptographic handshake failed") {
        Some("the sink rejected our certificate: is it signed by the CA the sink trusts, and still valid?")
    } else if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        Some(
            "the sink's certificate is not signed by our --ca (or does not name the host; see --server-name)",
        )
    } else if text.contains("certificate required") || text.contains("CertificateRequired") {
        Some("the sink requires a client certificate")
    } else if text.contains("unknown ca")
        || text.contains("UnknownCa")
        || text.contains("bad certificate")
        || text.contains("BadCertificate")
        || text.contains("fatal alert")
    {
        Some("the sink rejected our certificate: is it signed by the CA the sink trusts?")
    } else if text.contains("Broken pipe") || text.contains("Connection reset") {
        // Over TCP, TLS 1.3 lets the client finish its handshake before the sink has judged the
        // certificate; the sink's alert may then lose the race against our first write.
        Some(
            "the sink closed the connection right after the TLS handshake: it most likely refused \
             our certificate (missing, expired, from another CA or not for client use); its log says why",
        )
    } else if text.contains("timed out") || text.contains("Connection refused") {
        Some("no answer: is the sink running and is its port reachable (UDP for quic, TCP for grpc)?")
    } else {
        None
    };
    match (e, hint) {
        (TransportError::Closed(Closed::Application { reason, .. }), _) => AgentError::Closed(reason),
        (TransportError::Remote { code, message }, _) => AgentError::Refused { code, message },
        (e, Some(h)) => AgentError::Connect { sink: sink.to_string(), reason: format!("{e} ({h})") },
        (e, None) => AgentError::Connect { sink: sink.to_string(), reason: e.to_string() },
    }
}

/// Map a transport error during a session: the sink's stated reason wins over a broken pipe.
pub fn transport(e: TransportError) -> AgentError {
    match e {
        TransportError::Remote { code, message } => AgentError::Refused { code, message },
        TransportError::Closed(Closed::Application { reason, .. }) => AgentError::Closed(reason),
        other => AgentError::Transport(other),
    }
}

/// How to reach a sink and move data to it.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub sink: String,
    pub tls: TlsFiles,
    pub server_name: Option<String>,
    pub tuning: QuicTuning,
    /// QUIC (UDP) or gRPC (TCP).
    pub transport: Transport,
    /// Data streams wanted (the sink may allow fewer); at least one per connection.
    pub streams: usize,
    /// Connections to spread the data streams over (the first one carries the control stream;
    /// the others join its session). One when the sink cannot take joined connections.
    pub connections: Connections,
    /// Bandwidth limit of the payload, if any.
    pub pacer: Option<Arc<Pacer>>,
    /// Decide compression from the link's backlog (`--compression auto`).
    pub adaptive: bool,
    /// A long-lived link (the daemon's): heartbeats also between cycles, so the sink keeps the
    /// connection and the disks open on it however long the interval is. A one-shot run's link
    /// is silent when it has nothing to do, so the sink can tell a stuck client.
    pub hold: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Route {
    Disk(u32),
    Group(String),
}

struct Inner {
    sink: String,
    conn: Connection,
    /// Connections that joined `conn`'s session (data streams only).
    joined: Vec<Connection>,
    writer: tokio::sync::Mutex<FrameWriter>,
    hello: HelloReply,
    routes: Mutex<HashMap<Route, mpsc::Sender<Body>>>,
    /// Why the connection failed, once it has.
    failed: Mutex<Option<AgentError>>,
    next_handle: AtomicU32,
    data: async_channel::Sender<Out>,
    streams: tokio::sync::Mutex<Option<Streams>>,
    adaptive: Option<Arc<Adaptive>>,
    /// Progress seen by the heartbeat: bytes examined by all epochs, and requests waiting.
    progress: AtomicU64,
    waiting: AtomicUsize,
    /// Payload bytes handed to QUIC, for adaptive compression.
    queued: Arc<AtomicU64>,
    /// The data queue, watched by the adaptive compression monitor.
    queue: async_channel::Receiver<Out>,
    /// Epochs sending now (their counters: the heartbeat reports progress while they grow);
    /// the compression monitor runs only while there is one, so an idle daemon costs nothing.
    active: Mutex<Active>,
    next_sending: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The epochs sending on a link (id, counters) and the compression monitor running for them.
type Active = (Vec<(u64, Arc<Stats>)>, Option<MonitorGuard>);

/// A connection to a sink (cheap to clone).
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
    }
}

/// Marks a request as waiting for the sink (the heartbeat then reports progress).
struct Waiting<'a>(&'a Inner);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Link {
    /// Connect, authenticate (mutual TLS), negotiate the version, and start the reader, the
    /// data streams and the heartbeat.
    pub async fn connect(cfg: &LinkConfig) -> Result<Link, AgentError> {
        let sink = cfg.sink.as_str();
        let tls = tls::client_config(&cfg.tls).map_err(|e| AgentError::Tls(e.to_string()))?;
        let conn = join::dial(cfg, tls.clone(), None).await?;
        let (writer, reader, hello) = join::hello(sink, &conn, bytes::Bytes::new()).await?;
        tracing::info!(sink, transport = %cfg.transport, version = hello.version, identity = %hello.identity, peer = %hello.software, "connected");
        let can_join =
            hello.capabilities.iter().any(|c| c == version::CAP_JOIN) && !hello.session_token.is_empty();
        let cores = blockship_transport::cpu::usable_cores() as usize;
        let best_effort = cfg.connections == Connections::Auto;
        let (joined, join_tasks) = match cfg.connections.count(cores, cfg.transport) {
            n if n > 1 && can_join => join::join(cfg, &tls, &conn, &hello.session_token, n - 1, best_effort)
                .await
                .map_err(|e| Link::reason_of(&conn, e))?,
            n if n > 1 && !best_effort => {
                tracing::warn!(sink, "the sink cannot take joined connections (an older version): using one connection instead of {n}");
                (Vec::new(), Vec::new())
            }
            _ => (Vec::new(), Vec::new()),
        };
        let streams = cfg.streams.max(1 + joined.len());
        let (data, queue) = async_channel::bounded(streams * 2);
        let adaptive = cfg.adaptive.then(|| Arc::new(Adaptive::new(cfg.pacer.is_some())));
        let inner = Arc::new(Inner {
            sink: sink.to_string(),
            conn: conn.clone(),
            joined: joined.clone(),
            writer: tokio::sync::Mutex::new(writer),
            hello,
            routes: Mutex::default(),
            failed: Mutex::new(None),
            next_handle: AtomicU32::new(1),
            data,
            streams: tokio::sync::Mutex::new(None),
            adaptive,
            progress: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            queued: Arc::new(AtomicU64::new(0)),
            queue: queue.clone(),
            active: Mutex::new((Vec::new(), None)),
            next_sending: AtomicU64::new(0),
            tasks: Mutex::default(),
        });
        let conns: Vec<Connection> = std::iter::once(conn.clone()).chain(joined).collect();
        let streams = Streams::start(&conns, streams, queue.clone(), cfg.pacer.clone(), inner.queued.clone())
            .await
            .map_err(|e| Link::reason_of(&conn, e))?;
        *inner.streams.lock().await = Some(streams);
        let mut tasks = vec![
            tokio::spawn(read_replies(Arc::downgrade(&inner), reader)),
            tokio::spawn(heartbeat(Arc::downgrade(&inner), cfg.hold)),
        ];
        tasks.extend(join_tasks);
        *inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        Ok(Link { inner })
    }

    pub fn sink(&self) -> &str {
        &self.inner.sink
    }

    /// Round-trip time and loss as the transport sees them (QUIC only): the first connection's
    /// round-trip time, packets over all connections.
    pub fn path(&self) -> Option<blockship_transport::conn::PathStats> {
        let mut p = self.inner.conn.path()?;
        for c in &self.inner.joined {
            if let Some(j) = c.path() {
                p.sent_packets += j.sent_packets;
                p.lost_packets += j.lost_packets;
            }
        }
        Some(p)
    }

    /// Connections carrying this link's data (1 + those that joined the session).
    pub fn connections(&self) -> usize {
        1 + self.inner.joined.len()
    }

    pub fn hello(&self) -> &HelloReply {
        &self.inner.hello
    }

    /// The shared compression decision, with `--compression auto`.
    pub fn adaptive(&self) -> Option<Arc<Adaptive>> {
        self.inner.adaptive.clone()
    }

    /// The queue the data streams take items from.
    pub fn data(&self) -> async_channel::Sender<Out> {
        self.inner.data.clone()
    }

    /// An epoch starts sending, counting into `stats`: adaptive compression watches the link
    /// while any does, and the heartbeat reports progress while their counters grow.
    pub fn sending(&self, stats: Arc<Stats>) -> Sending {
        let id = self.inner.next_sending.fetch_add(1, Ordering::Relaxed);
        let mut a = self.inner.active.lock().unwrap_or_else(|p| p.into_inner());
        a.0.push((id, stats));
        if a.1.is_none() {
            if let Some(adaptive) = &self.inner.adaptive {
                let conns = std::iter::once(&self.inner.conn).chain(&self.inner.joined).cloned().collect();
                a.1 = Some(monitor(adaptive, self.inner.queue.clone(), self.inner.queued.clone(), conns));
            }
        }
        Sending(self.clone(), id)
    }

    /// Whether the connection has failed (a new one is needed).
    pub fn is_broken(&self) -> bool {
        self.inner.failed.lock().unwrap_or_else(|p| p.into_inner()).is_some()
            || self.inner.conn.close_reason().is_some()
            || self.inner.joined.iter().any(|c| c.close_reason().is_some())
    }

    /// The sink's reason when it closed the connection: it says more than the broken stream
    /// (`connection lost`) that surfaced `e`.
    pub fn reason(&self, e: AgentError) -> AgentError {
        Link::reason_of(&self.inner.conn, e)
    }

    fn reason_of(conn: &Connection, e: AgentError) -> AgentError {
        match (conn.close_reason(), e) {
            (_, e @ (AgentError::Refused { .. } | AgentError::Closed(_))) => e,
            (Some(Closed::Application { reason, .. }), _) => AgentError::Closed(reason),
            (Some(Closed::TimedOut), _) => AgentError::Closed(
                "the sink stopped answering (no packet within --idle-timeout): is it still running?".into(),
            ),
            (Some(Closed::Reset), _) => {
                AgentError::Closed("the sink restarted and no longer knows this connection".into())
            }
            (_, e) => e,
        }
    }

    fn failure(&self) -> AgentError {
        let stored = self.inner.failed.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(clone_error);
        stored.unwrap_or_else(|| self.reason(AgentError::Closed("the connection to the sink ended".into())))
    }

    async fn send(&self, body: &Body) -> Result<(), AgentError> {
        let r = self.inner.writer.lock().await.send(body).await;
        r.map_err(|e| self.reason(transport(e)))
    }

    fn route(&self, route: Route) -> mpsc::Receiver<Body> {
        let (tx, rx) = mpsc::channel(ROUTE_DEPTH);
        self.inner.routes.lock().unwrap_or_else(|p| p.into_inner()).insert(route, tx);
        rx
    }

    fn unroute(&self, route: &Route) {
        self.inner.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(route);
    }

    fn waiting(&self) -> Waiting<'_> {
        self.inner.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(&self.inner)
    }

    /// Open a disk (a new handle) and wait for the sink's answer.
    pub async fn open_disk(&self, mut req: OpenDisk) -> Result<(DiskHandle, DiskOpened), AgentError> {
        // The sink takes a handle only above every one it has seen on this connection, so the
        // handle is drawn under the writer's lock: groups opening disks at once (the daemon's
        // first cycle) must send their OpenDisks in handle order. Drawn before the lock, a task
        // preempted between the two sent 9 after another's 10 and the sink refused it.
        let mut writer = self.inner.writer.lock().await;
        let handle = self.inner.next_handle.fetch_add(1, Ordering::Relaxed);
        req.disk = handle;
        let rx = self.route(Route::Disk(handle));
        let disk = DiskHandle { link: self.clone(), handle, rx: tokio::sync::Mutex::new(rx) };
        let sent = writer.send(&Body::OpenDisk(req)).await;
        drop(writer);
        sent.map_err(|e| self.reason(transport(e)))?;
        match disk.next("DiskOpened").await? {
            Body::DiskOpened(d) => Ok((disk, d)),
            other => Err(transport(unexpected("DiskOpened", &other))),
        }
    }

    /// Open group `name` over these disks; returns its committed epoch.
    pub async fn open_group(&self, name: &str, disks: &[u32]) -> Result<u64, AgentError> {
        let route = Route::Group(name.to_string());
        let mut rx = self.route(route.clone());
        let result = async {
            self.send(&Body::GroupOpen(pb::GroupOpen { group: name.to_string(), disks: disks.to_vec() }))
                .await?;
            match self.group_reply(&mut rx).await? {
                Body::GroupOpened(g) => Ok(g.committed_epoch),
                other => Err(transport(unexpected("GroupOpened", &other))),
            }
        }
        .await;
        self.unroute(&route);
        result
    }

    /// Commit epoch `epoch` of group `name` (every member prepared).
    pub async fn commit_group(&self, name: &str, epoch: u64) -> Result<(), AgentError> {
        let body = Body::GroupCommit(pb::GroupCommit { group: name.to_string(), epoch });
        self.group_commit(name, body, epoch, false).await
    }

    /// Cut group `name` over at its committed epoch `epoch` (see `GroupCutover`).
    pub async fn cut_over_group(&self, name: &str, epoch: u64) -> Result<(), AgentError> {
        if self.hello().version < version::CUTOVER_VERSION {
            return Err(AgentError::Protocol(format!(
                "the sink speaks protocol {} and cannot cut over (needs {}); upgrade the sink",
                self.hello().version,
                version::CUTOVER_VERSION
            )));
        }
        let body = Body::GroupCutover(pb::GroupCutover { group: name.to_string(), epoch });
        self.group_commit(name, body, epoch, true).await
    }

    async fn group_commit(
        &self,
        name: &str,
        body: Body,
        epoch: u64,
        cut_over: bool,
    ) -> Result<(), AgentError> {
        let route = Route::Group(name.to_string());
        let mut rx = self.route(route.clone());
        let result = async {
            self.send(&body).await?;
            match self.group_reply(&mut rx).await? {
                Body::GroupCommitted(g) if g.epoch == epoch && g.cut_over == cut_over => Ok(()),
                other => Err(transport(unexpected("GroupCommitted", &other))),
            }
        }
        .await;
        self.unroute(&route);
        result
    }

    async fn group_reply(&self, rx: &mut mpsc::Receiver<Body>) -> Result<Body, AgentError> {
        let _w = self.waiting();
        match rx.recv().await {
            Some(Body::Error(e)) => Err(refused(&e)),
            Some(b) => Ok(b),
            None => Err(self.failure()),
        }
    }

    /// Close the connection: data streams finish what is queued, then the connection closes
    /// (giving the close a moment to leave, not the whole draining period).
    pub async fn close(&self) {
        self.inner.data.close();
        if let Some(s) = self.inner.streams.lock().await.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), s.finish()).await;
        }
        self.inner.writer.lock().await.close();
        // The session's own connection first: the sink then ends the session cleanly and
        // closes what joined it, instead of seeing joined streams cut while it still runs.
        self.inner.conn.close(0, b"done");
        for c in &self.inner.joined {
            c.close(0, b"done");
        }
        let _ = tokio::time::timeout(Duration::from_millis(20), self.inner.conn.wait_idle()).await;
    }
}

/// An epoch sending on a link (see `Link::sending`).
pub struct Sending(Link, u64);

impl Drop for Sending {
    fn drop(&mut self) {
        let inner = &self.0.inner;
        let mut a = inner.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = a.0.iter().position(|(id, _)| *id == self.1) {
            let (_, stats) = a.0.swap_remove(i);
            // What it examined stays counted.
            inner.progress.fetch_add(Stats::get(&stats.bytes_done), Ordering::Relaxed);
        }
        if a.0.is_empty() {
            a.1 = None;
        }
    }
}

pub(crate) fn refused(e: &pb::Error) -> AgentError {
    AgentError::Refused {
        code: pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified),
        message: e.message.clone(),
    }
}

/// A copy of a stored failure for each waiter (the error types are not Clone).
fn clone_error(e: &AgentError) -> AgentError {
    match e {
        AgentError::Refused { code, message } => {
            AgentError::Refused { code: *code, message: message.clone() }
        }
        AgentError::Closed(m) => AgentError::Closed(m.clone()),
        other => AgentError::Closed(other.to_string()),
    }
}

/// Route every control frame to the disk or group it names; a connection-level error (or the
/// end of the stream) fails every waiter.
async fn read_replies(link: std::sync::Weak<Inner>, mut reader: FrameReader<RecvStream>) {
    let failure = loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break AgentError::Closed("the sink ended the control stream".into()),
            Err(e) => break transport(e),
        };
        let Some(inner) = link.upgrade() else { return };
        let route = match &frame.body {
            Body::DiskOpened(d) => Route::Disk(d.disk),
            Body::EpochStarted(e) => Route::Disk(e.disk),
            Body::Ack(a) => Route::Disk(a.disk),
            Body::HashList(h) => Route::Disk(h.disk),
            Body::Error(e) if e.disk != 0 => Route::Disk(e.disk),
            Body::Error(e) if !e.group.is_empty() => Route::Group(e.group.clone()),
            Body::GroupOpened(g) => Route::Group(g.group.clone()),
            Body::GroupCommitted(g) => Route::Group(g.group.clone()),
            Body::Error(e) => break refused(e),
            other => break transport(unexpected("a reply", other)),
        };
        let tx = inner.routes.lock().unwrap_or_else(|p| p.into_inner()).get(&route).cloned();
        match tx {
            Some(tx) => {
                let _ = tx.send(frame.body).await;
            }
            None => tracing::debug!(?route, "reply for a disk or group nobody waits for"),
        }
    };
    if let Some(inner) = link.upgrade() {
        let failure = Link::reason_of(&inner.conn, failure);
        if inner.data.is_closed() {
            tracing::debug!(sink = %inner.sink, "connection closed: {failure}");
        } else {
            tracing::warn!(sink = %inner.sink, "connection to the sink failed: {failure}");
        }
        *inner.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(failure);
        // Every waiter learns of it (its channel closes).
        inner.routes.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Tell the sink the agent progresses while no frame would (a third of its idle timeout).
async fn heartbeat(link: std::sync::Weak<Inner>, hold: bool) {
    let every = match link.upgrade() {
        Some(i) => {
            let ms = if i.hello.idle_timeout_ms == 0 { 30_000 } else { i.hello.idle_timeout_ms };
            (Duration::from_millis(u64::from(ms)) / 3)
                .clamp(Duration::from_millis(200), Duration::from_secs(10))
        }
        None => return,
    };
    let mut last = 0;
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = link.upgrade() else { return };
        let done = inner.progress.load(Ordering::Relaxed)
            + inner
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .iter()
                .map(|(_, s)| Stats::get(&s.bytes_done))
                .sum::<u64>();
        if hold || done > last || inner.waiting.load(Ordering::Relaxed) > 0 {
            last = done;
            let p = Body::Progress(pb::Progress { disk: 0, bytes_done: done });
            // A broken stream shows up in the waiters as well.
            let _ = inner.writer.lock().await.send(&p).await;
        }
    }
}

/// Bytes waiting in QUIC's send buffer that count as a full backlog for adaptive compression.
const SEND_BACKLOG: f64 = (8 << 20) as f64;

/// Sample the link's backlog (our queue, or payload handed to QUIC and not yet sent) and the
/// CPU for adaptive compression, until the guard is dropped.
fn monitor(
    a: &Arc<Adaptive>,
    queue: async_channel::Receiver<Out>,
    queued: Arc<AtomicU64>,
    conns: Vec<Connection>,
) -> MonitorGuard {
    let mut cpu = CpuMeter::default();
    let capacity = queue.capacity().unwrap_or(1).max(1) as f64;
    let backlog = move || {
        let sent: u64 = conns.iter().map(|c| c.sent_bytes()).sum();
        let buffered = queued.load(Ordering::Relaxed).saturating_sub(sent);
        (queue.len() as f64 / capacity).max(buffered as f64 / SEND_BACKLOG)
    };
    a.monitor(backlog, move || cpu.sample())
}
