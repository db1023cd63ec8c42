//! The Blockship agent: reads a disk (or only its changed extents), sends checksummed, compressed
//! chunks over QUIC with mutual TLS to a sink, and reports success only once the sink has made
//! the epoch durable.

pub mod adaptive;
pub mod bench;
pub mod changes;
pub mod chunker;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod extents;
pub mod failpoint;
pub mod link;
pub mod pace;
pub mod pipeline;
pub mod progress;
pub mod report;
pub mod source;
pub mod stages;
pub mod streams;
pub mod sync;
pub mod verify;
pub mod vsphere;

use blockship_proto::pb::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error("{path}: {err}")]
    ChangeList { path: String, err: changes::cbt_file::ChangeListError },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot connect to sink {sink}: {reason}")]
    Connect { sink: String, reason: String },
    #[error("sink refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("sink closed the connection: {0}")]
    Closed(String),
    #[error("transport: {0}")]
    Transport(blockship_transport::TransportError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("codec: {0}")]
    Codec(String),
    #[error("{0}")]
    Usage(String),
    #[error("internal: {0}")]
    Internal(String),
}

macro_rules! via_source {
    ($($t:ty),*) => {$(
        impl From<$t> for AgentError {
            fn from(e: $t) -> Self {
                AgentError::Source(e.into())
            }
        }
    )*};
}

via_source!(source::nbd::NbdError, source::rbd::RbdSourceError, source::vmware::VmwareError);
