//! The QUIC adapter: a `quinn` connection behind the transport-neutral `Conn`, its streams
//! behind `SendStream`/`RecvStream`, and quinn's errors turned into `TransportError`s that say
//! why the connection ended (an application close keeps the peer's code and reason).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use rustls_pki_types::CertificateDer;

use crate::conn::{BiStream, BoxFuture, Closed, Conn, RecvStream, SendStream, Transport};
use crate::handshakes::Handshakes;
use crate::tls::{cert_identity, TlsError};
use crate::TransportError;

pub struct QuicConn {
    conn: quinn::Connection,
    /// The agent's own endpoint (a sink's endpoint outlives its connections).
    endpoint: Option<quinn::Endpoint>,
}

impl QuicConn {
    pub fn new(conn: quinn::Connection, endpoint: Option<quinn::Endpoint>) -> Self {
        QuicConn { conn, endpoint }
    }
}

struct QuicSend(quinn::SendStream);

impl SendStream for QuicSend {
    fn write(&mut self, header: Bytes, payload: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            // Handing quinn `Bytes` means bulk data is never copied on the way out.
            if payload.is_empty() {
                self.0.write_chunk(header).await?;
            } else {
                self.0.write_all_chunks(&mut [header, payload]).await?;
            }
            Ok(())
        })
    }

    fn finish(&mut self) {
        let _ = self.0.finish();
    }

    fn stopped(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // The peer may close the connection right after reading: a delivery too.
            let _ = self.0.stopped().await;
        })
    }
}

/// quinn's receive stream, its read errors carrying why the connection ended.
struct QuicRecv(quinn::RecvStream);

impl tokio::io::AsyncRead for QuicRecv {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf).map_err(|e| {
            match e.get_ref().and_then(|i| i.downcast_ref::<quinn::ReadError>()) {
                Some(quinn::ReadError::ConnectionLost(c)) => std::io::Error::new(e.kind(), closed(c)),
                _ => e,
            }
        })
    }
}

fn split(
    pair: Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>,
) -> Result<BiStream, TransportError> {
    let (send, recv) = pair?;
    Ok((Box::new(QuicSend(send)), Box::new(QuicRecv(recv))))
}

impl Conn for QuicConn {
    fn transport(&self) -> Transport {
        Transport::Quic
    }

    fn id(&self) -> u64 {
        self.conn.stable_id() as u64
    }

    fn remote(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    fn peer_identity(&self) -> Result<String, TlsError> {
        let certs = self
            .conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or(TlsError::NoPeerCert)?;
        cert_identity(certs.first().ok_or(TlsError::NoPeerCert)?)
    }

    fn open_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>> {
        Box::pin(async move { split(self.conn.open_bi().await) })
    }

    fn accept_bi(&self) -> BoxFuture<'_, Result<BiStream, TransportError>> {
        Box::pin(async move { split(self.conn.accept_bi().await) })
    }

    fn open_uni(&self) -> BoxFuture<'_, Result<Box<dyn SendStream>, TransportError>> {
        Box::pin(async move { Ok(Box::new(QuicSend(self.conn.open_uni().await?)) as Box<dyn SendStream>) })
    }

    fn accept_uni(&self) -> BoxFuture<'_, Result<RecvStream, TransportError>> {
        Box::pin(async move { Ok(Box::new(QuicRecv(self.conn.accept_uni().await?)) as RecvStream) })
    }

    fn close(&self, code: u32, reason: &[u8]) {
        self.conn.close(code.into(), reason);
    }

    fn close_reason(&self) -> Option<Closed> {
        self.conn.close_reason().map(|e| closed(&e))
    }

    fn set_data_limits(&self, streams: u64, window: u64) {
        self.conn
            .set_max_concurrent_uni_streams(quinn::VarInt::from_u64(streams).unwrap_or(quinn::VarInt::MAX));
        self.conn.set_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
    }

    fn sent_bytes(&self) -> u64 {
        self.conn.stats().udp_tx.bytes
    }

    fn path(&self) -> Option<crate::conn::PathStats> {
        let s = self.conn.stats();
        Some(crate::conn::PathStats {
            rtt_ms: s.path.rtt.as_secs_f64() * 1e3,
            sent_packets: s.path.sent_packets,
            lost_packets: s.path.lost_packets,
        })
    }

    fn wait_idle(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(e) = &self.endpoint {
                e.wait_idle().await;
            }
        })
    }
}

/// Why a QUIC connection ended.
pub fn closed(e: &quinn::ConnectionError) -> Closed {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Closed::Application {
            code: u32::try_from(c.error_code.into_inner()).unwrap_or(u32::MAX),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        quinn::ConnectionError::LocallyClosed => {
            Closed::Application { code: 0, reason: "closed by this side".into() }
        }
        quinn::ConnectionError::TimedOut => Closed::TimedOut,
        quinn::ConnectionError::Reset => Closed::Reset,
        other => Closed::Lost(other.to_string()),
    }
}

impl From<quinn::ConnectionError> for TransportError {
    fn from(e: quinn::ConnectionError) -> Self {
        TransportError::Closed(closed(&e))
    }
}

impl From<quinn::ConnectError> for TransportError {
    fn from(e: quinn::ConnectError) -> Self {
        TransportError::Connect(e.to_string())
    }
}

impl From<quinn::WriteError> for TransportError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => c.into(),
            quinn::WriteError::ClosedStream => TransportError::ClosedStream,
            other => TransportError::Closed(Closed::Lost(format!("stream write: {other}"))),
        }
    }
}

impl From<quinn::ClosedStream> for TransportError {
    fn from(_: quinn::ClosedStream) -> Self {
        TransportError::ClosedStream
    }
}

/// The sink's QUIC endpoint as a source of `Incoming` connections.
pub struct QuicListener {
    endpoint: quinn::Endpoint,
    handshakes: Arc<Handshakes>,
}

impl QuicListener {
    /// Serve `endpoint`, admitting handshakes through `handshakes` (shared with the gRPC side).
    pub fn new(endpoint: quinn::Endpoint, handshakes: Arc<Handshakes>) -> Self {
        QuicListener { endpoint, handshakes }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next connection attempt, or None once the endpoint is closed. An address with too
    /// many handshakes in progress is refused at once (CONNECTION_REFUSED, no state kept).
    pub async fn accept(&self) -> Option<crate::conn::Incoming> {
        loop {
            let incoming = self.endpoint.accept().await?;
            let remote = incoming.remote_address();
            let Ok(ticket) = self.handshakes.enter(remote.ip(), "quic") else {
                incoming.refuse();
                continue;
            };
            return Some(crate::conn::Incoming::new(remote, Transport::Quic, async move {
                // Held until the handshake is done or failed (quinn bounds it by the idle timeout).
                let _ticket = ticket;
                let conn = incoming.await?;
                Ok(crate::conn::Connection::new(QuicConn::new(conn, None)))
            }));
        }
    }
}
