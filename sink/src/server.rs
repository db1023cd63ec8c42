//! The sink server: a QUIC endpoint and a gRPC (TCP) listener, both with mutual TLS, that hand
//! each agent connection to a session, sharing the authorisation rules, target roots, state directory, target leases and
//! resource limits. QUIC buffers up to a connection's receive window of data the sink has not
//! read yet, so the windows are sized from the in-flight budget and the number of connections:
//! many connections get smaller windows, and memory stays bounded however many agents connect.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use blockship_transport::conn::Incoming;
use blockship_transport::grpc::{GrpcListener, GrpcTuning};
use blockship_transport::handshakes::Handshakes;
use blockship_transport::quic_conn::QuicListener;
use blockship_transport::{quic, tls, Connection, QuicTuning, TlsFiles, TransportError};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::auth::Authorizer;
use crate::lease::Leases;
use crate::limits::Admission;
use crate::targets::TargetRoots;
use crate::writer::CheckpointPolicy;

/// Data streams shared by all connections (see `Windows`).
pub const TOTAL_STREAMS: u64 = 64;

/// Everything sessions share.
pub struct SinkContext {
    pub roots: TargetRoots,
    pub state_root: PathBuf,
    pub auth: Authorizer,
    pub leases: Arc<Leases>,
    pub checkpoint: CheckpointPolicy,
    /// Connection limits and in-flight budgets.
    pub admission: Arc<Admission>,
    /// Keep an undo journal per file target so a failed epoch can be rolled back.
    pub file_rollback: bool,
    /// The sessions served now (the control API lists them).
    pub roster: crate::roster::Roster,
    /// Sessions that further connections of their agent may join (`--connections`).
    pub joins: crate::joins::Joins,
}

pub struct Server {
    quic: QuicListener,
    grpc: GrpcListener,
    ctx: Arc<SinkContext>,
    windows: Arc<Windows>,
}

/// The QUIC receive budget of the open connections. A connection may open `n` data streams and
/// has a receive window of `(n + 1)` stream windows: then the data a stream's agent sent and the
/// sink has not read yet (a stream waiting for in-flight budget) can never use up the credit
/// another stream needs to finish its chunk, so gating reads on the budget cannot deadlock. `n`
/// is the connection's share of `total_streams` (at least 1, at most `max_streams`), so QUIC's
/// buffered data stays within `(total_streams + connections)` stream windows.
pub struct Windows {
    stream_window: u64,
    max_streams: u64,
    total_streams: u64,
    conns: Mutex<Vec<(Connection, Arc<AtomicUsize>)>>,
}

/// A connection's place among the windows; leaving widens the others'.
pub struct Window {
    windows: Arc<Windows>,
    id: u64,
    /// Data streams the connection has open (kept up to date by the session).
    pub open: Arc<AtomicUsize>,
}

impl Drop for Window {
    fn drop(&mut self) {
        let mut c = self.windows.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|(conn, _)| conn.id() != self.id);
        self.windows.resize(&c);
    }
}

impl Windows {
    pub fn new(tuning: &QuicTuning, total_streams: u64) -> Self {
        Windows {
            stream_window: tuning.stream_window,
            max_streams: u64::from(tuning.max_uni_streams),
            total_streams,
            conns: Mutex::default(),
        }
    }

    pub fn join(self: &Arc<Self>, conn: &Connection) -> Window {
        let open = Arc::new(AtomicUsize::new(0));
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.push((conn.clone(), open.clone()));
        self.resize(&c);
        Window { windows: self.clone(), id: conn.id(), open }
    }

    fn resize(&self, conns: &[(Connection, Arc<AtomicUsize>)]) {
        let n = (self.total_streams / conns.len().max(1) as u64).clamp(1, self.max_streams.max(1));
        for (c, open) in conns {
            // Streams opened under an earlier, larger share keep their credit until they end.
            let streams = n.max(open.load(Ordering::Relaxed) as u64);
            let window = (streams + 1) * self.stream_window;
            c.set_data_limits(n, window);
        }
    }
}

impl Server {
    /// Serve QUIC on UDP `listen` and gRPC on TCP `grpc_listen` (default: the same address, so
    /// an agent switches transport without a new address; with port 0 both get the same port).
    /// `extra` are further gRPC services on the TCP side (the control API).
    pub fn bind(
        listen: SocketAddr,
        grpc_listen: Option<SocketAddr>,
        tls_files: &TlsFiles,
        tuning: &QuicTuning,
        ctx: Arc<SinkContext>,
        extra: tonic::service::Routes,
    ) -> Result<Self, TransportError> {
        let tls = tls::server_config(tls_files)?;
        // The private key is secret and stays the same across restarts: a restarted sink resets
        // the connections of the one before it at their next packet.
        let seed = std::fs::read(&tls_files.key).map_err(|e| {
            TransportError::from(tls::TlsError::Config(format!("{}: {e}", tls_files.key.display())))
        })?;
        let bind_tcp = |addr: SocketAddr| {
            std::net::TcpListener::bind(addr).map_err(|source| TransportError::Bind { addr, source })
        };
        // A port chosen by the kernel for UDP may be taken on TCP: try a few.
        let mut attempts = if listen.port() == 0 && grpc_listen.is_none() { 20 } else { 1 };
        let (endpoint, tcp) = loop {
            attempts -= 1;
            let endpoint = quic::server_endpoint(listen, tls.clone(), tuning, &seed)?;
            let udp = endpoint.local_addr()?;
            match bind_tcp(grpc_listen.unwrap_or(udp)) {
                Ok(tcp) => break (endpoint, tcp),
                Err(e) if attempts == 0 => return Err(e),
                Err(_) => continue,
            }
        };
        // One admission of handshakes for both transports (a slow client may use either).
        let limits = &ctx.admission.limits;
        let handshakes = Arc::new(Handshakes::new(limits.max_handshakes_per_address, limits.max_handshakes));
        let grpc = GrpcListener::serve(tcp, tls, &GrpcTuning::from_quic(tuning), extra, handshakes.clone())?;
        let windows = Arc::new(Windows::new(tuning, TOTAL_STREAMS));
        Ok(Server { quic: QuicListener::new(endpoint, handshakes), grpc, ctx, windows })
    }

    /// The QUIC (UDP) address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.quic.local_addr()
    }

    /// The gRPC (TCP) address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr()
    }

    /// Accept connections of both transports until the QUIC endpoint is closed.
    pub async fn run(self) {
        loop {
            let incoming: Incoming = tokio::select! {
                i = self.quic.accept() => match i { Some(i) => i, None => return },
                Some(i) = self.grpc.accept() => i,
            };
            tokio::spawn(crate::session::handle(self.ctx.clone(), self.windows.clone(), incoming));
        }
    }
}
