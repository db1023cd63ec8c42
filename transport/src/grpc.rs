//! The gRPC adapter: Blockship's frames over HTTP/2 on TCP with mutual TLS (tonic), for networks
//! that block or police UDP. A session is one `Control` call (the bidirectional control stream);
//! each data stream is one `Data` call naming the session by the `blockship-session` token the
//! sink returned with `Control`'s response headers, from the same certificate identity. Frames
//! travel one per `WireFrame` message, header and payload as `bytes` fields, and are read back
//! through the same `FrameReader` (limits, cancel-safety) as QUIC's. HTTP/2 windows and message
//! limits are sized for bulk transfer: tonic's defaults (4 MiB messages, 64 KiB windows) stall.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use blockship_proto::pb::{DataEnd, WireFrame};
use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::conn::{
    BiStream, BoxFuture, ClientOptions, Closed, Conn, Connection, Incoming, RecvStream, SendStream, Transport,
};
use crate::handshakes::Handshakes;
use crate::tcp_tls::{channel, tls_incoming, PeerInfo, H2};
use crate::tls::TlsError;
use crate::TransportError;

/// The `Replication` service's generated client and server (the bench's bare tonic peer serves
/// it too, to measure tonic's ceiling with these exact settings).
pub mod service {
    tonic::include_proto!("blockship.v1");
}
use service::replication_client::ReplicationClient;
use service::replication_server::{Replication, ReplicationServer};

/// Metadata naming the session a `Data` call belongs to.
const SESSION: &str = "blockship-session";
/// Metadata telling the agent how many data streams the session may have.
const STREAMS: &str = "blockship-data-streams";
/// Trailer metadata carrying the application close code with a closing status.
const CODE: &str = "blockship-code";
/// Largest message: a chunk's header plus its largest payload.
pub const MAX_MESSAGE: usize =
    blockship_proto::frame::MAX_HEADER_LEN + blockship_proto::frame::MAX_PAYLOAD_LEN + 1024;
/// gRPC connections share no memory budget with QUIC's windows; bound each one's data streams.
pub const DATA_STREAMS: u64 = 8;

/// Concurrent calls (HTTP/2 streams) on one connection; the peer waits for a free one beyond.
pub const MAX_CALLS: u32 = 64;

/// HTTP/2 sizing of a gRPC side (see the module comment).
#[derive(Debug, Clone)]
pub struct GrpcTuning {
    pub stream_window: u32,
    pub connection_window: u32,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
}

impl GrpcTuning {
    /// Windows from the QUIC tuning (the same bulk-transfer sizing), capped by HTTP/2's 2^31-1.
    pub fn from_quic(t: &crate::QuicTuning) -> Self {
        let cap = |v: u64| u32::try_from(v).unwrap_or(i32::MAX as u32).min(i32::MAX as u32);
        GrpcTuning {
            stream_window: cap(t.stream_window),
            connection_window: cap(t.connection_window.max(t.stream_window * 2)),
            keep_alive: t.keep_alive,
            idle_timeout: t.idle_timeout,
        }
    }
}

/// The sink's gRPC side: serves `Replication` (and any extra services, e.g. the sink's control
/// API) on `listener` and yields each session as an `Incoming`.
pub struct GrpcListener {
    rx: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    local: SocketAddr,
}

impl GrpcListener {
    pub fn serve(
        listener: std::net::TcpListener,
        tls: rustls::ServerConfig,
        tuning: &GrpcTuning,
        extra: tonic::service::Routes,
        handshakes: Arc<Handshakes>,
    ) -> Result<Self, TransportError> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut tls = tls;
        tls.alpn_protocols = vec![H2.to_vec()];
        let (tx, rx) = mpsc::channel(64);
        let service = Service { sessions: Arc::default(), incoming: tx, next: AtomicU64::new(1) };
        let replication = ReplicationServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let routes = extra.add_service(replication);
        let server = tonic::transport::Server::builder()
            .initial_stream_window_size(tuning.stream_window)
            .initial_connection_window_size(tuning.connection_window)
            .max_frame_size(Some(1 << 20))
            // tonic's default is no limit: one authenticated connection could open thousands of
            // calls. A session needs one control call and DATA_STREAMS data calls; the rest of
            // the allowance serves the control API and several sessions on one connection.
            .max_concurrent_streams(Some(MAX_CALLS))
            .http2_keepalive_interval(Some(tuning.keep_alive))
            .http2_keepalive_timeout(Some(tuning.idle_timeout))
            .tcp_nodelay(true)
            .add_routes(routes);
        let incoming = tls_incoming(listener, tls, handshakes);
        tokio::spawn(async move {
            if let Err(e) = server.serve_with_incoming(incoming).await {
                tracing::error!("gRPC server stopped: {e}");
            }
        });
        Ok(GrpcListener { rx: tokio::sync::Mutex::new(rx), local })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next session, or None once the server has stopped.
    pub async fn accept(&self) -> Option<Incoming> {
        self.rx.lock().await.recv().await
    }
}

/// A session's entry for its `Data` calls.
struct Entry {
    identity: String,
    data: mpsc::Sender<RecvStream>,
    open: Arc<AtomicU64>,
    closed: watch::Receiver<Option<Closed>>,
}

type Sessions = Arc<Mutex<HashMap<u64, Entry>>>;

struct Service {
    sessions: Sessions,
    incoming: mpsc::Sender<Incoming>,
    next: AtomicU64,
}

fn peer(req: &Request<Streaming<WireFrame>>) -> Result<PeerInfo, Status> {
    let info = req.extensions().get::<PeerInfo>().cloned().ok_or_else(|| Status::internal("no peer info"))?;
    if let Err(e) = &info.identity {
        return Err(Status::unauthenticated(e.clone()));
    }
    Ok(info)
}

/// A `Streaming<WireFrame>` as bytes: each message's header, then its payload.
struct FrameBytes {
    inner: Streaming<WireFrame>,
    pending: Option<Bytes>,
    /// Where a closing status is recorded (the client side learns the sink's reason).
    closed: Option<Arc<Mutex<Option<Closed>>>>,
    /// Dropped when the reader is done with the stream (a `Data` call then returns).
    _done: Option<oneshot::Sender<()>>,
}

impl Stream for FrameBytes {
    type Item = std::io::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(p) = self.pending.take() {
            return Poll::Ready(Some(Ok(p)));
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if !f.payload.is_empty() {
                    self.pending = Some(f.payload);
                }
                Poll::Ready(Some(Ok(f.header)))
            }
            Poll::Ready(Some(Err(status))) => {
                let closed = closed_by(&status);
                if let Some(slot) = &self.closed {
                    slot.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(closed.clone());
                }
                Poll::Ready(Some(Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, closed))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn recv_stream(
    inner: Streaming<WireFrame>,
    closed: Option<Arc<Mutex<Option<Closed>>>>,
    done: Option<oneshot::Sender<()>>,
) -> RecvStream {
    Box::new(tokio_util::io::StreamReader::new(FrameBytes { inner, pending: None, closed, _done: done }))
}

/// Why a call ended with `status`: the sink's close code and reason, or a transport failure.
fn closed_by(status: &Status) -> Closed {
    match status.metadata().get(CODE).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
        Some(code) => Closed::Application { code, reason: status.message().to_string() },
        None if status.code() == tonic::Code::Cancelled => {
            Closed::Application { code: 0, reason: "the peer cancelled the call".into() }
        }
        None => Closed::Lost(format!("{}: {}", status.code(), status.message())),
    }
}

fn closing_status(code: u32, reason: &str) -> Status {
    let mut s = Status::aborted(reason.to_string());
    s.metadata_mut().insert(CODE, MetadataValue::from(code));
    s
}

/// Frames into a call's request or response stream.
struct ChannelSend<T> {
    tx: Option<mpsc::Sender<T>>,
    wrap: fn(WireFrame) -> T,
    /// Why the peer went away, when a send fails.
    closed: Arc<Mutex<Option<Closed>>>,
    /// Resolves when the call has ended (data streams: the sink's answer).
    ended: Option<BoxFuture<'static, ()>>,
}

impl<T: Send + 'static> SendStream for ChannelSend<T> {
    fn write(&mut self, header: Bytes, payload: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let tx = self.tx.as_ref().ok_or(TransportError::ClosedStream)?;
            if tx.send((self.wrap)(WireFrame { header, payload })).await.is_err() {
                let closed = self.closed.lock().unwrap_or_else(|p| p.into_inner()).clone();
                return Err(TransportError::Closed(
                    closed.unwrap_or_else(|| Closed::Lost("the call ended".into())),
                ));
            }
            Ok(())
        })
    }

    fn finish(&mut self) {
        self.tx = None;
    }

    fn stopped(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(ended) = self.ended.take() {
                let _ = tokio::time::timeout(Duration::from_secs(5), ended).await;
            }
        })
    }
}

#[tonic::async_trait]
impl Replication for Service {
    type ControlStream = ReceiverStream<Result<WireFrame, Status>>;

    async fn control(
        &self,
        req: Request<Streaming<WireFrame>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let info = peer(&req)?;
        let identity = info.identity.clone().unwrap_or_default();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (out_tx, out_rx) = mpsc::channel(256);
        let (data_tx, data_rx) = mpsc::channel(DATA_STREAMS as usize);
        let (closed_tx, closed_rx) = watch::channel(None);
        let open = Arc::new(AtomicU64::new(0));
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Entry { identity: identity.clone(), data: data_tx, open, closed: closed_rx });
        let conn = ServerConn {
            id,
            remote: info.remote,
            identity,
            control: Mutex::new(Some((out_tx.clone(), req.into_inner()))),
            out: Mutex::new(Some(out_tx)),
            data: tokio::sync::Mutex::new(data_rx),
            closed: closed_tx,
            sessions: self.sessions.clone(),
        };
        let incoming = Incoming::new(info.remote, Transport::Grpc, async move { Ok(Connection::new(conn)) });
        self.incoming.send(incoming).await.map_err(|_| Status::unavailable("the sink is shutting down"))?;
        let mut resp = Response::new(ReceiverStream::new(out_rx));
        resp.metadata_mut().insert(SESSION, MetadataValue::from(id));
        resp.metadata_mut().insert(STREAMS, MetadataValue::from(DATA_STREAMS));
        Ok(resp)
    }

    async fn data(&self, req: Request<Streaming<WireFrame>>) -> Result<Response<DataEnd>, Status> {
        let info = peer(&req)?;
        let id: u64 = req
            .metadata()
            .get(SESSION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Status::invalid_argument(format!("a data stream needs the {SESSION} metadata")))?;
        let (tx, open, mut closed) = {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let entry = sessions
                .get(&id)
                .filter(|e| Ok(&e.identity) == info.identity.as_ref())
                .ok_or_else(|| Status::not_found(format!("no session {id} of this identity")))?;
            (entry.data.clone(), entry.open.clone(), entry.closed.clone())
        };
        if open.fetch_add(1, Ordering::Relaxed) >= DATA_STREAMS {
            open.fetch_sub(1, Ordering::Relaxed);
            return Err(Status::resource_exhausted(format!(
                "a session may have {DATA_STREAMS} data streams open"
            )));
        }
        let (done_tx, done_rx) = oneshot::channel();
        let sent = tx.send(recv_stream(req.into_inner(), None, Some(done_tx))).await;
        let result = match sent {
            Err(_) => Err(Status::aborted("the session has ended")),
            Ok(()) => tokio::select! {
                _ = done_rx => Ok(Response::new(DataEnd {})),
                c = closed.wait_for(|c| c.is_some()) => Err(match c.ok().and_then(|c| c.clone()) {
                    Some(Closed::Application { code, reason }) => closing_status(code, &reason),
                    _ => Status::aborted("the session has ended"),
                }),
            },
        };
        open.fetch_sub(1, Ordering::Relaxed);
        result
    }
}

/// The control call's halves until the session's first `accept_bi` takes them.
type ServerControl = (mpsc::Sender<Result<WireFrame, Status>>, Streaming<WireFrame>);

/// The sink's side of one gRPC session.
struct ServerConn {
    id: u64,
    remote: SocketAddr,
    identity: String,
    control: Mutex<Option<ServerControl>>,
    /// The response stream, held until the session closes (a close ends it with a status).
    out: Mutex<Option<mpsc::Sender<Result<WireFrame, Status>>>>,
    data: tokio::sync::Mutex<mpsc::Receiver<RecvStream>>,
    closed: watch::Sender<Option<Closed>>,
    sessions: Sessions,
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// Session ids of gRPC connections are kept apart from QUIC's (leases compare them).
const ID_BASE: u64 = 1 << 62;

impl Conn for ServerConn {
    fn transport(&self) -> Transport {
        Transport::Grpc
    }
    fn id(&self) -> u64 {
        ID_BASE + self.id
    }
    fn remote(&self) -> SocketAddr {
        self.remote
    }
    fn peer_identity(&self) -> Result<String, TlsError> {
        Ok(self.identity.clone())
    }
    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>> {
        Box::pin(async { Err(TransportError::Connect("the sink does not open streams".into())) })
    }
    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>> {
        Box::pin(async move {
            let (tx, rx) = self
                .control
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .ok_or(TransportError::ClosedStream)?;
            let closed = Arc::new(Mutex::new(None));
            let send = ChannelSend { tx: Some(tx), wrap: Ok, closed, ended: None };
            Ok((Box::new(send) as Box<dyn SendStream>, recv_stream(rx, None, None)))
        })
    }
    fn open_uni(&self) -> BoxFuture<'_, Result<Box<dyn SendStream>, TransportError>> {
        Box::pin(async { Err(TransportError::Connect("the sink does not open streams".into())) })
    }
    fn accept_uni(&self) -> BoxFuture<'_, Result<RecvStream, TransportError>> {
        Box::pin(async move {
            let mut closed = self.closed.subscribe();
            let mut data = self.data.lock().await;
            tokio::select! {
                s = data.recv() => s.ok_or(TransportError::ClosedStream),
                _ = closed.wait_for(|c| c.is_some()) => Err(TransportError::ClosedStream),
            }
        })
    }
    fn close(&self, code: u32, reason: &[u8]) {
        let reason = String::from_utf8_lossy(reason).into_owned();
        if let Some(out) = self.out.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = out.try_send(Err(closing_status(code, &reason)));
        }
        self.closed.send_if_modified(|c| {
            c.get_or_insert(Closed::Application { code, reason });
            true
        });
    }
    fn close_reason(&self) -> Option<Closed> {
        self.closed.borrow().clone()
    }
    fn set_data_limits(&self, _streams: u64, _window: u64) {
        // HTTP/2 windows are fixed per connection by the server's settings; DATA_STREAMS bounds
        // the calls (see `Data`).
    }
    fn sent_bytes(&self) -> u64 {
        0
    }
    fn wait_idle(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The agent's side of one gRPC session.
struct ClientConn {
    id: u64,
    remote: SocketAddr,
    client: ReplicationClient<tonic::transport::Channel>,
    session: u64,
    streams: u64,
    opened: AtomicU64,
    control: Mutex<Option<(mpsc::Sender<WireFrame>, Streaming<WireFrame>)>>,
    closed: Arc<Mutex<Option<Closed>>>,
    /// Payload bytes tonic has taken from the data streams.
    sent: Arc<AtomicU64>,
}

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// Connect to the sink's gRPC side at `target` ("HOST:PORT").
pub async fn connect(
    tls: rustls::ClientConfig,
    target: &str,
    opts: &ClientOptions,
) -> Result<Connection, TransportError> {
    let tuning = GrpcTuning::from_quic(&opts.tuning);
    let tls = channel(tls, target, opts.server_name.as_deref(), &tuning).await?;
    let remote = tls.remote;
    let client = ReplicationClient::new(tls.channel.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::channel(256);
    let resp = client
        .clone()
        .control(ReceiverStream::new(rx))
        .await
        .map_err(|s| tls.failure(&s).unwrap_or_else(|| status_error(&s)))?;
    let number = |key: &str| -> Result<u64, TransportError> {
        resp.metadata().get(key).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).ok_or_else(|| {
            TransportError::Connect(format!("the sink's answer lacks {key} (not a Blockship sink?)"))
        })
    };
    let (session, streams) = (number(SESSION)?, number(STREAMS)?);
    Ok(Connection::new(ClientConn {
        id: NEXT_CLIENT.fetch_add(1, Ordering::Relaxed),
        remote,
        client,
        session,
        streams,
        opened: AtomicU64::new(0),
        control: Mutex::new(Some((tx, resp.into_inner()))),
        closed: Arc::default(),
        sent: Arc::default(),
    }))
}

/// A failed call as a transport error, with the sink's close reason when it gave one.
fn status_error(s: &Status) -> TransportError {
    match closed_by(s) {
        Closed::Lost(_) => TransportError::Connect(crate::error_text(s)),
        c => TransportError::Closed(c),
    }
}

impl Conn for ClientConn {
    fn transport(&self) -> Transport {
        Transport::Grpc
    }
    fn id(&self) -> u64 {
        self.id
    }
    fn remote(&self) -> SocketAddr {
        self.remote
    }
    fn peer_identity(&self) -> Result<String, TlsError> {
        Err(TlsError::NoPeerCert)
    }
    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>> {
        Box::pin(async move {
            let (tx, rx) = self
                .control
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .ok_or(TransportError::ClosedStream)?;
            let send = ChannelSend { tx: Some(tx), wrap: |f| f, closed: self.closed.clone(), ended: None };
            Ok((Box::new(send) as Box<dyn SendStream>, recv_stream(rx, Some(self.closed.clone()), None)))
        })
    }
    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>> {
        Box::pin(async { Err(TransportError::Connect("the agent does not accept streams".into())) })
    }
    fn open_uni(&self) -> BoxFuture<'_, Result<Box<dyn SendStream>, TransportError>> {
        Box::pin(async move {
            if self.opened.fetch_add(1, Ordering::Relaxed) >= self.streams {
                // Like a QUIC peer out of stream credit: wait (the caller gives up when done).
                std::future::pending::<()>().await;
            }
            let (tx, rx) = mpsc::channel::<WireFrame>(2);
            let sent = self.sent.clone();
            let frames = tokio_stream::StreamExt::map(ReceiverStream::new(rx), move |f: WireFrame| {
                sent.fetch_add(f.payload.len() as u64, Ordering::Relaxed);
                f
            });
            let mut req = Request::new(frames);
            req.metadata_mut().insert(SESSION, MetadataValue::from(self.session));
            let mut client = self.client.clone();
            let closed = self.closed.clone();
            let slot = closed.clone();
            let call = tokio::spawn(async move {
                if let Err(s) = client.data(req).await {
                    let c = closed_by(&s);
                    tracing::debug!("data stream ended: {s}");
                    slot.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(c);
                }
            });
            let ended: BoxFuture<'static, ()> = Box::pin(async move {
                let _ = call.await;
            });
            Ok(Box::new(ChannelSend { tx: Some(tx), wrap: |f| f, closed, ended: Some(ended) })
                as Box<dyn SendStream>)
        })
    }
    fn accept_uni(&self) -> BoxFuture<'_, Result<RecvStream, TransportError>> {
        Box::pin(async { Err(TransportError::Connect("the agent does not accept streams".into())) })
    }
    fn close(&self, code: u32, reason: &[u8]) {
        // Ending the control call ends the session; data calls end with their senders.
        self.control.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.closed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(Closed::Application {
            code,
            reason: String::from_utf8_lossy(reason).into_owned(),
        });
    }
    fn close_reason(&self) -> Option<Closed> {
        self.closed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set_data_limits(&self, _streams: u64, _window: u64) {}
    fn sent_bytes(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    fn wait_idle(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
