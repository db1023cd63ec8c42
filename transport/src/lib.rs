//! Blockship's network layer shared by agent and sink: one connection interface (`conn`) with two
//! adapters — QUIC endpoints tuned for bulk transfer, and gRPC over TCP — mutual TLS with
//! identities taken from certificates, and frame readers/writers over streams.
//! The protocol itself (messages, limits, codec) lives in `blockship-proto`; this crate only
//! moves its frames.

pub mod congestion;
pub mod conn;
pub mod cpu;
pub mod failpoints;
pub mod framed;
pub mod grpc;
pub mod handshakes;
pub mod heap;
pub mod logs;
pub mod metrics;
pub mod moderation;
pub mod quic;
pub mod quic_conn;
pub mod shutdown;
pub mod tcp_tls;
#[cfg(test)]
mod testkit;
pub mod tls;

pub use congestion::Congestion;
pub use conn::{ClientOptions, Closed, Connection, Transport};
pub use framed::{FrameReader, FrameWriter};
pub use quic::QuicTuning;
pub use tls::TlsFiles;

use blockship_proto::pb;

/// ALPN protocol identifier: a peer speaking anything else is refused during the handshake.
pub const ALPN: &[u8] = b"blockship/1";

/// Everything that can go wrong moving frames.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("network I/O: {0}")]
    Io(std::io::Error),
    #[error(
        "cannot listen on {addr} (UDP): {source}; is another sink running there? Choose another --listen"
    )]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("protocol violation from peer: {0}")]
    Frame(#[from] blockship_proto::FrameError),
    #[error("{}", closed_text(.0))]
    Closed(conn::Closed),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("stream already closed")]
    ClosedStream,
    #[error("peer refused: {message} ({code:?})")]
    Remote { code: pb::ErrorCode, message: String },
    #[error("unexpected message from peer: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("peer closed the stream before {0}")]
    Eof(&'static str),
    #[error("cannot resolve {0}")]
    Resolve(String),
}

impl TransportError {
    /// Turn a received `Error` message into a `TransportError::Remote`.
    pub fn remote(e: &pb::Error) -> Self {
        TransportError::Remote {
            code: pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified),
            message: e.message.clone(),
        }
    }
}

/// A read error of a stream keeps why its connection ended (the adapters put a `Closed` inside
/// the `io::Error`), so a peer's close reason reaches the operator instead of "connection lost".
impl From<std::io::Error> for TransportError {
    fn from(e: std::io::Error) -> Self {
        if let Some(c) = e.get_ref().and_then(|i| i.downcast_ref::<conn::Closed>()) {
            return TransportError::Closed(c.clone());
        }
        TransportError::Io(e)
    }
}

fn closed_text(c: &conn::Closed) -> String {
    match c {
        conn::Closed::Application { code, reason } => format!("closed by peer: {reason} (code {code})"),
        conn::Closed::TimedOut => "timed out: the peer stopped answering".into(),
        conn::Closed::Reset => "reset by peer (it restarted)".into(),
        conn::Closed::Lost(why) => format!("connection lost: {why}"),
    }
}

/// An error and its causes on one line, each cause once: wrappers that quote their source
/// (`"network I/O: {0}"`) would otherwise print it twice in `anyhow`'s `{:#}`.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
}

/// Short name of a message kind, for "unexpected message" errors and logs.
pub fn body_name(body: &blockship_proto::Body) -> &'static str {
    use blockship_proto::Body::*;
    match body {
        Hello(_) => "Hello",
        HelloReply(_) => "HelloReply",
        OpenDisk(_) => "OpenDisk",
        DiskOpened(_) => "DiskOpened",
        EpochBegin(_) => "EpochBegin",
        EpochStarted(_) => "EpochStarted",
        Chunk(_) => "ChunkHeader",
        Zero(_) => "ZeroExtent",
        EpochCommit(_) => "EpochCommit",
        Ack(_) => "Ack",
        IndexRequest(_) => "IndexRequest",
        VerifyRequest(_) => "VerifyRequest",
        HashList(_) => "HashList",
        Error(_) => "Error",
        Progress(_) => "Progress",
        CloseDisk(_) => "CloseDisk",
        GroupOpen(_) => "GroupOpen",
        GroupOpened(_) => "GroupOpened",
        GroupCommit(_) => "GroupCommit",
        GroupCommitted(_) => "GroupCommitted",
        GroupCutover(_) => "GroupCutover",
    }
}
