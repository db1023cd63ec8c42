//! TLS over TCP for the gRPC side: the sink's acceptor (each handshake in its own task with a
//! timeout, the client certificate's identity handed to tonic with every request) and the
//! agent's HTTP/2 channel, whose connection remembers its last I/O error. That error matters:
//! with TLS 1.3 the client finishes its handshake before the server checks the client's
//! certificate, so a refusal arrives as an alert on the first read, which HTTP/2 then reports
//! only as "the peer cancelled the call"; the note keeps the alert for the operator.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::grpc::GrpcTuning;
use crate::handshakes::Handshakes;
use crate::tls::{cert_identity, TlsError};
use crate::TransportError;

/// The ALPN protocol of HTTP/2 over TLS.
pub const H2: &[u8] = b"h2";

/// Who is on the other end of an accepted TLS connection (a request extension).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The identity in the client's verified certificate, or why there is none.
    pub identity: Result<String, String>,
}

/// A server-side TLS connection that tells tonic who the peer is.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accept TCP connections and run their TLS handshakes (each in its own task, with a timeout,
/// so a silent client cannot hold up the others; `handshakes` caps how many may be in progress
/// per address and in all, so many slow ones cannot either).
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    handshakes: Arc<Handshakes>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("gRPC accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Over a cap the connection is closed at once (dropped): it costs no task and no
            // file descriptor beyond this moment.
            let Ok(ticket) = handshakes.enter(remote.ip(), "grpc") else { continue };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let accept = acceptor.accept(tcp).into_fallible();
                let stream = match tokio::time::timeout(Duration::from_secs(10), accept).await {
                    Ok(Ok(s)) => s,
                    Ok(Err((e, tcp))) => {
                        tracing::warn!(%remote, "gRPC TLS handshake failed (wrong CA; a missing, expired or wrong-use client certificate; or not a Blockship agent): {e}");
                        linger(tcp).await;
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "gRPC TLS handshake timed out");
                        return;
                    }
                };
                drop(ticket);
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .ok_or(TlsError::NoPeerCert)
                    .and_then(|c| cert_identity(c))
                    .map_err(|e| e.to_string());
                let _ = tx.send(Ok(TlsConn { stream, info: PeerInfo { remote, identity } })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// After a refused handshake (the alert is sent): half-close, then read and discard what the
/// client still sends for a moment before closing. A TLS 1.3 client finishes its side of the
/// handshake first and may already be writing; closing at once would answer its data with a
/// reset that destroys the alert before the client has read it, and the agent could then only
/// report a broken pipe instead of why its certificate was refused.
async fn linger(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let drain = async { while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// The last I/O error of a channel's connections (see the module comment).
#[derive(Clone, Default, Debug)]
pub struct LastError(Arc<Mutex<Option<String>>>);

impl LastError {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn note<T>(&self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
        r
    }
}

/// A client TLS stream whose errors are noted in its channel's `LastError`.
struct Noted {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    last: LastError,
}

impl AsyncRead for Noted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.last.note(r)
    }
}

impl AsyncWrite for Noted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.last.note(r)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_flush(cx);
        self.last.note(r)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.last.note(r)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// An HTTP/2 channel with mutual TLS to the sink.
pub struct TlsChannel {
    pub channel: tonic::transport::Channel,
    pub remote: SocketAddr,
    pub last_error: LastError,
}

impl TlsChannel {
    /// A failed call's status as an error, with the connection's TLS error when there was one
    /// (a refused client certificate shows only there).
    pub fn failure(&self, status: &tonic::Status) -> Option<TransportError> {
        self.last_error.get().map(|io| TransportError::Connect(format!("{io} ({})", status.message())))
    }
}

/// An HTTP/2 channel with mutual TLS to `target` ("HOST:PORT"), checking the server certificate
/// against `server_name` (default: HOST); for the replication service and the sink's control API.
pub async fn channel(
    tls: rustls::ClientConfig,
    target: &str,
    server_name: Option<&str>,
    tuning: &GrpcTuning,
) -> Result<TlsChannel, TransportError> {
    let (host, port) = crate::quic::split_host_port(target)?;
    let remote = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| TransportError::Resolve(format!("{target}: {e}")))?
        .next()
        .ok_or_else(|| TransportError::Resolve(format!("{target}: no address")))?;
    let name = server_name.map(str::to_string).unwrap_or(host);
    let server_name = rustls_pki_types::ServerName::try_from(name.clone())
        .map_err(|e| TransportError::Resolve(format!("{name}: {e}")))?;
    let mut tls = tls;
    tls.alpn_protocols = vec![H2.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{remote}"))
        .map_err(|e| TransportError::Connect(e.to_string()))?
        .initial_stream_window_size(tuning.stream_window)
        .initial_connection_window_size(tuning.connection_window)
        .http2_keep_alive_interval(tuning.keep_alive)
        .keep_alive_timeout(tuning.idle_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let last_error = LastError::default();
    let last = last_error.clone();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let (connector, server_name, last) = (connector.clone(), server_name.clone(), last.clone());
            async move {
                let tcp = TcpStream::connect(remote).await?;
                tcp.set_nodelay(true)?;
                let stream = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(Noted { stream, last }))
            }
        }))
        .await
        .map_err(|e| TransportError::Connect(crate::error_text(&e)))?;
    Ok(TlsChannel { channel, remote, last_error })
}
