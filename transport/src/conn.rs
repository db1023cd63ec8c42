//! What sessions see of a transport: a connection to one peer with a verified identity, one
//! bidirectional control stream and many one-way data streams, closed with a code and a reason.
//! The QUIC adapter (`quic_conn`) and the gRPC adapter (`grpc`) implement it, so the agent's link
//! and the sink's session run unchanged over either; no `quinn` or `tonic` type crosses this line.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncRead;

use crate::TransportError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The receiving side of a stream: frames are read from it with `FrameReader`.
pub type RecvStream = Box<dyn AsyncRead + Send + Unpin>;

/// The sending side of a stream (written through `FrameWriter`).
pub trait SendStream: Send {
    /// Send a frame's encoded header and its payload (empty for frames without one).
    fn write(&mut self, header: Bytes, payload: Bytes) -> BoxFuture<'_, Result<(), TransportError>>;
    /// End the stream after what was written, without waiting.
    fn finish(&mut self);
    /// Wait until the peer has received everything (or the connection is gone).
    fn stopped(&mut self) -> BoxFuture<'_, ()>;
}

/// Which transport carries a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// QUIC over UDP (the default).
    #[default]
    Quic,
    /// gRPC over TCP (HTTP/2 + TLS), for networks that block or police UDP.
    Grpc,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Grpc => "grpc",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quic" => Ok(Transport::Quic),
            "grpc" => Ok(Transport::Grpc),
            other => Err(format!("transport {other:?}: use quic or grpc")),
        }
    }
}

/// Why a connection ended, as far as the transport knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// Closed by either side on purpose, with the application's code and reason (0 = done).
    Application { code: u32, reason: String },
    /// The peer stopped answering.
    TimedOut,
    /// The peer no longer knows the connection (it restarted).
    Reset,
    /// Anything else (network error, protocol error of the transport).
    Lost(String),
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::closed_text(self))
    }
}

impl std::error::Error for Closed {}

/// A bidirectional stream: its sending and its receiving half.
pub type BiStream = (Box<dyn SendStream>, RecvStream);

/// One connection's transport, implemented by each adapter.
pub trait Conn: Send + Sync {
    fn transport(&self) -> Transport;
    /// Distinguishes this connection from every other one of the process.
    fn id(&self) -> u64;
    fn remote(&self) -> SocketAddr;
    /// The identity in the peer's verified certificate.
    fn peer_identity(&self) -> Result<String, crate::tls::TlsError>;
    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>>;
    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>>;
    fn open_uni(&self) -> BoxFuture<'_, Result<Box<dyn SendStream>, TransportError>>;
    fn accept_uni(&self) -> BoxFuture<'_, Result<RecvStream, TransportError>>;
    fn close(&self, code: u32, reason: &[u8]);
    fn close_reason(&self) -> Option<Closed>;
    /// Data streams the peer may have open and the receive window they share (bytes): the
    /// sink narrows them as more connections share its memory. Adapters that cannot change
    /// them on a live connection keep their fixed limits.
    fn set_data_limits(&self, streams: u64, window: u64);
    /// Payload bytes the transport has put on the wire so far (for backlog estimates).
    fn sent_bytes(&self) -> u64;
    /// Give a close a moment to reach the peer.
    fn wait_idle(&self) -> BoxFuture<'_, ()>;
    /// Round-trip time and packet loss as the transport sees them (None where it cannot tell:
    /// gRPC's TCP keeps them in the kernel, out of tonic's reach).
    fn path(&self) -> Option<PathStats> {
        None
    }
}

/// What the transport knows of the network path.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PathStats {
    /// Smoothed round-trip time, in milliseconds.
    pub rtt_ms: f64,
    pub sent_packets: u64,
    pub lost_packets: u64,
}

/// A connection of either transport (cheap to clone).
#[derive(Clone)]
pub struct Connection(Arc<dyn Conn>);

impl Connection {
    pub fn new(conn: impl Conn + 'static) -> Self {
        Connection(Arc::new(conn))
    }
}

impl std::ops::Deref for Connection {
    type Target = dyn Conn;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// How an agent reaches a sink.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub transport: Transport,
    pub tuning: crate::QuicTuning,
    /// Check the sink's certificate against this name (default: the host of the address).
    pub server_name: Option<String>,
}

/// Connect to the sink at `target` ("HOST:PORT") with mutual TLS.
pub async fn connect(
    tls: rustls::ClientConfig,
    target: &str,
    opts: &ClientOptions,
) -> Result<Connection, TransportError> {
    match opts.transport {
        Transport::Quic => {
            let (endpoint, conn) =
                crate::quic::connect(tls, &opts.tuning, target, opts.server_name.as_deref()).await?;
            Ok(Connection::new(crate::quic_conn::QuicConn::new(conn, Some(endpoint))))
        }
        Transport::Grpc => crate::grpc::connect(tls, target, opts).await,
    }
}

/// A connection being accepted: its handshake runs in the session's task, not the accept loop.
pub struct Incoming {
    pub remote: SocketAddr,
    pub transport: Transport,
    handshake: BoxFuture<'static, Result<Connection, TransportError>>,
}

impl Incoming {
    pub fn new(
        remote: SocketAddr,
        transport: Transport,
        handshake: impl Future<Output = Result<Connection, TransportError>> + Send + 'static,
    ) -> Self {
        Incoming { remote, transport, handshake: Box::pin(handshake) }
    }

    /// Finish the handshake (mutual TLS).
    pub async fn accept(self) -> Result<Connection, TransportError> {
        self.handshake.await
    }
}
