//! NBD sources: a small async client for the Network Block Device protocol, so the agent can read
//! disks exported by qemu-nbd, qemu-storage-daemon or nbdkit and ask which ranges hold data
//! (`base:allocation`) or changed since a QEMU dirty bitmap started (`qemu:dirty-bitmap:NAME`).
//! The client is split along the protocol: `uri` (where an export lives), `wire` (numbers and
//! names of the protocol), `handshake` (fixed newstyle negotiation), `client` (the transmission
//! phase: many requests in flight on one connection, queued for a writer task) and `reply` (the
//! reader task that checks each reply chunk and routes it to its request by cookie). This module
//! holds the errors and [`NbdSource`], the disk as the agent reads it.

mod client;
mod handshake;
mod reply;
#[cfg(test)]
mod tests;
mod uri;
mod wire;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::extents::{normalize, Extent};
pub use client::{ExportInfo, NbdClient};
pub use uri::{NbdAddr, NbdUri};
use wire::errno_name;

/// `base:allocation` flags: the range reads as zeros (whether or not it is a hole).
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` flag: the range was written since the bitmap was enabled.
pub const STATE_DIRTY: u32 = 1 << 0;
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Block status is asked for in pieces so that huge disks never need one giant reply.
const STATUS_STEP: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD URI {uri:?}: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("cannot connect to NBD server {addr}: {err}")]
    Connect { addr: String, err: std::io::Error },
    #[error("NBD handshake with {addr}: {err}")]
    Handshake { addr: String, err: std::io::Error },
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(String),
    #[error("NBD server refused {option} with {reply}{}", colon(.message))]
    Refused { option: &'static str, reply: String, message: String },
    #[error("NBD server has no export {export:?}{}", colon(.message))]
    UnknownExport { export: String, message: String },
    #[error(
        "NBD server does not offer metadata context {name:?} (for qemu:dirty-bitmap:NAME: the bitmap does \
         not exist, is not exported (qemu-nbd -B NAME), or is inconsistent after a crash); a full or \
         compare resync is needed"
    )]
    ContextUnavailable { name: String },
    #[error("NBD server failed {command} of {len} bytes at offset {offset}: {}{}", errno_name(*.errno), colon(.message))]
    Server { command: &'static str, offset: u64, len: u32, errno: u32, message: String },
    #[error("range of {len} bytes at offset {offset} lies beyond the end of the {size}-byte NBD export")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("NBD export {0} has size 0")]
    Empty(String),
    #[error("NBD connection lost: {0}")]
    Disconnected(String),
    #[error("NBD client is disconnecting; no new requests are accepted")]
    Closed,
}

fn colon(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn protocol(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> Self {
        NbdError::Disconnected(e.to_string())
    }
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A disk exported over NBD, as the agent reads it.
pub struct NbdSource {
    client: NbdClient,
    uri: NbdUri,
}

pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

impl NbdSource {
    /// Connect to `uri`; with `bitmap`, its `qemu:dirty-bitmap:` context must be offered or
    /// this fails with [`NbdError::ContextUnavailable`] (the caller falls back to a full resync).
    pub async fn connect(uri: &str, bitmap: Option<&str>) -> Result<NbdSource, NbdError> {
        let uri = NbdUri::parse(uri)?;
        let dirty = bitmap.map(dirty_bitmap_context);
        let mut contexts = vec![BASE_ALLOCATION];
        contexts.extend(dirty.as_deref());
        let client = NbdClient::connect(&uri, &contexts).await?;
        let failure = match &dirty {
            Some(name) if !client.has_context(name) => {
                Some(NbdError::ContextUnavailable { name: name.clone() })
            }
            _ if client.size() == 0 => Some(NbdError::Empty(uri.to_string())),
            _ => None,
        };
        if let Some(e) = failure {
            let _ = client.disconnect().await;
            return Err(e);
        }
        Ok(NbdSource { client, uri })
    }

    pub fn size(&self) -> u64 {
        self.client.size()
    }

    pub fn disk_id(&self) -> String {
        self.uri.disk_id()
    }

    pub fn client(&self) -> &NbdClient {
        &self.client
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, NbdError> {
        self.client.read(offset, len).await
    }

    /// Ranges that may hold non-zero data: everything `base:allocation` does not report as
    /// reading zeros (a hole without `NBD_STATE_ZERO` is not known to be zero, so it counts).
    pub async fn allocated(&self) -> Result<Vec<Extent>, NbdError> {
        if !self.client.has_context(BASE_ALLOCATION) {
            return Ok(vec![Extent::new(0, self.size())]);
        }
        self.extents(BASE_ALLOCATION, |flags| flags & STATE_ZERO == 0).await
    }

    /// Ranges written since the dirty bitmap `bitmap` (the one given to `connect`) was enabled.
    pub async fn dirty(&self, bitmap: &str) -> Result<Vec<Extent>, NbdError> {
        self.extents(&dirty_bitmap_context(bitmap), |flags| flags & STATE_DIRTY != 0).await
    }

    async fn extents(&self, context: &str, wanted: impl Fn(u32) -> bool) -> Result<Vec<Extent>, NbdError> {
        if !self.client.has_context(context) {
            return Err(NbdError::ContextUnavailable { name: context.to_string() });
        }
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < self.size() {
            let n = (self.size() - pos).min(STATUS_STEP);
            for (len, flags) in self.client.block_status(context, pos, n).await? {
                if wanted(flags) {
                    out.push(Extent::new(pos, len));
                }
                pos += len;
            }
        }
        Ok(normalize(out))
    }

    pub async fn disconnect(&self) -> Result<(), NbdError> {
        self.client.disconnect().await
    }
}
