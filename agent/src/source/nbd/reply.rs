//! The reply reader: reads simple and structured replies, checks every chunk against its request
//! (type, length, offsets inside the read, no overlaps, one status chunk per context) and hands
//! the finished result to the waiting caller. A reply that breaks the protocol makes the
//! connection unusable: every waiter learns why.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::{oneshot, Notify};

use super::wire::*;
use super::{protocol, BoxRead, NbdError};

const MAX_ERROR_CHUNK: u32 = 64 << 10;
/// qemu sends at most 128 Ki descriptors per reply; this leaves a wide margin.
const MAX_STATUS_CHUNK: u32 = 32 << 20;

#[derive(Default)]
pub(super) struct State {
    pub(super) next_cookie: u64,
    pub(super) waiters: HashMap<u64, Waiter>,
    /// Requests sent and not yet answered; a waiter being filled by the reader is out of the map.
    pub(super) in_flight: usize,
    pub(super) closing: bool,
    pub(super) dead: Option<String>,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) idle: Notify,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, cookie: u64) -> Result<Waiter, NbdError> {
        self.lock()
            .waiters
            .remove(&cookie)
            .ok_or_else(|| protocol(format!("reply for unknown cookie {cookie}")))
    }

    fn put_back(&self, cookie: u64, w: Waiter) {
        self.lock().waiters.insert(cookie, w);
    }

    fn complete(&self, w: Waiter, result: Result<Done, NbdError>) {
        let tx = {
            let mut st = self.lock();
            st.in_flight -= 1;
            if st.in_flight == 0 {
                self.idle.notify_waiters();
            }
            w.tx
        };
        let _ = tx.send(result);
    }

    /// The connection is unusable: fail everything waiting and refuse what comes.
    pub(super) fn fail_all(&self, reason: String) {
        let drained: Vec<Waiter> = {
            let mut st = self.lock();
            st.dead.get_or_insert(reason.clone());
            let drained: Vec<Waiter> = st.waiters.drain().map(|(_, w)| w).collect();
            st.in_flight -= drained.len();
            if st.in_flight == 0 {
                self.idle.notify_waiters();
            }
            drained
        };
        for w in drained {
            let _ = w.tx.send(Err(NbdError::Disconnected(reason.clone())));
        }
    }
}

pub(super) enum Done {
    Read(BytesMut),
    Status(Vec<(u32, u32)>),
    Empty,
}

/// A request in flight and what its reply chunks have delivered so far.
pub(super) struct Waiter {
    tx: oneshot::Sender<Result<Done, NbdError>>,
    cmd: u16,
    offset: u64,
    len: u32,
    buf: BytesMut,
    /// Content chunks received, as request-relative `start -> end`, to refuse overlaps.
    chunks: BTreeMap<u64, u64>,
    covered: u64,
    context: u32,
    status: Option<Vec<(u32, u32)>>,
    error: Option<NbdError>,
}

impl Waiter {
    pub(super) fn new(
        tx: oneshot::Sender<Result<Done, NbdError>>,
        cmd: u16,
        offset: u64,
        len: u32,
        buf: BytesMut,
        context: u32,
    ) -> Self {
        Waiter {
            tx,
            cmd,
            offset,
            len,
            buf,
            chunks: BTreeMap::new(),
            covered: 0,
            context,
            status: None,
            error: None,
        }
    }

    /// Account for a content chunk; returns where it starts in the buffer.
    fn claim(&mut self, offset: u64, n: u64) -> Result<usize, NbdError> {
        let start = offset.checked_sub(self.offset).filter(|s| s.saturating_add(n) <= u64::from(self.len));
        let Some(start) = start else {
            return Err(protocol(format!(
                "reply chunk of {n} bytes at {offset} outside the read of {} bytes at {}",
                self.len, self.offset
            )));
        };
        let end = start + n;
        if self.chunks.range(..end).next_back().is_some_and(|(_, &e)| e > start) {
            return Err(protocol(format!("overlapping reply chunks at offset {offset}")));
        }
        self.chunks.insert(start, end);
        self.covered += n;
        Ok(start as usize)
    }

    fn server_error(&mut self, errno: u32, offset: Option<u64>, message: String) {
        let (command, len) = (command_name(self.cmd), self.len);
        let offset = offset.unwrap_or(self.offset);
        self.error.get_or_insert(NbdError::Server { command, offset, len, errno, message });
    }

    fn result(&mut self) -> Result<Done, NbdError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        match self.cmd {
            CMD_READ if self.covered != u64::from(self.len) => Err(protocol(format!(
                "read of {} bytes at {} reported success after {} bytes",
                self.len, self.offset, self.covered
            ))),
            CMD_READ => Ok(Done::Read(std::mem::take(&mut self.buf))),
            CMD_BLOCK_STATUS => self
                .status
                .take()
                .map(Done::Status)
                .ok_or_else(|| protocol("block status reply without extents")),
            _ => Ok(Done::Empty),
        }
    }
}

pub(super) async fn read_replies(mut rd: BufReader<BoxRead>, shared: Arc<Shared>, structured: bool) {
    let reason = loop {
        match rd.fill_buf().await {
            Ok([]) => break "the server closed the connection".to_string(),
            Ok(_) => {}
            Err(e) => break format!("receiving replies: {e}"),
        }
        if let Err(e) = read_reply(&mut rd, &shared, structured).await {
            tracing::warn!("NBD connection unusable: {e}");
            break e.to_string();
        }
    };
    shared.fail_all(reason);
}

async fn read_reply(rd: &mut BufReader<BoxRead>, shared: &Shared, structured: bool) -> Result<(), NbdError> {
    let magic = rd.read_u32().await?;
    let (cookie, mut w, r, done) = match magic {
        SIMPLE_REPLY_MAGIC => {
            let errno = rd.read_u32().await?;
            let cookie = rd.read_u64().await?;
            let mut w = shared.take(cookie)?;
            let r = read_simple(rd, &mut w, errno, structured).await;
            (cookie, w, r, true)
        }
        STRUCTURED_REPLY_MAGIC => {
            let flags = rd.read_u16().await?;
            let kind = rd.read_u16().await?;
            let cookie = rd.read_u64().await?;
            let length = rd.read_u32().await?;
            let mut w = shared.take(cookie)?;
            let r = read_chunk(rd, &mut w, kind, length).await;
            (cookie, w, r, flags & REPLY_FLAG_DONE != 0)
        }
        other => {
            return Err(protocol(format!("reply with bad magic {other:#010x}; the stream is out of step")))
        }
    };
    match r {
        Err(e) => {
            shared.complete(w, Err(NbdError::Disconnected(e.to_string())));
            Err(e)
        }
        Ok(()) if done => {
            let result = w.result();
            shared.complete(w, result);
            Ok(())
        }
        Ok(()) => {
            shared.put_back(cookie, w);
            Ok(())
        }
    }
}

async fn read_simple(
    rd: &mut BufReader<BoxRead>,
    w: &mut Waiter,
    errno: u32,
    structured: bool,
) -> Result<(), NbdError> {
    if errno != 0 {
        w.server_error(errno, None, String::new());
    } else if w.cmd == CMD_READ {
        if structured {
            return Err(protocol("simple reply with data to a read although structured replies were agreed"));
        }
        rd.read_exact(&mut w.buf).await?;
        w.covered = u64::from(w.len);
    }
    Ok(())
}

async fn read_chunk(
    rd: &mut BufReader<BoxRead>,
    w: &mut Waiter,
    kind: u16,
    length: u32,
) -> Result<(), NbdError> {
    let bad_length = || protocol(format!("reply chunk type {kind} with payload length {length}"));
    match kind {
        REPLY_NONE if length == 0 => {}
        REPLY_OFFSET_DATA if w.cmd == CMD_READ => {
            if length < 9 {
                return Err(bad_length());
            }
            let offset = rd.read_u64().await?;
            let n = u64::from(length - 8);
            let at = w.claim(offset, n)?;
            rd.read_exact(&mut w.buf[at..at + n as usize]).await?;
        }
        REPLY_OFFSET_HOLE if w.cmd == CMD_READ => {
            if length != 12 {
                return Err(bad_length());
            }
            let offset = rd.read_u64().await?;
            let n = rd.read_u32().await?;
            if n == 0 {
                return Err(protocol("empty hole in a read reply"));
            }
            // The buffer starts zeroed, so a hole needs no writing.
            w.claim(offset, u64::from(n))?;
        }
        REPLY_BLOCK_STATUS if w.cmd == CMD_BLOCK_STATUS => {
            if length < 12 || length % 8 != 4 || length > MAX_STATUS_CHUNK {
                return Err(bad_length());
            }
            let id = rd.read_u32().await?;
            let count = ((length - 4) / 8) as usize;
            if id != w.context {
                // Every negotiated context is answered; keep only the one asked for.
                tokio::io::copy(&mut (&mut *rd).take(u64::from(length - 4)), &mut tokio::io::sink()).await?;
                return Ok(());
            }
            if w.status.is_some() {
                return Err(protocol("two block status chunks for one context"));
            }
            let mut payload = vec![0u8; count * 8];
            rd.read_exact(&mut payload).await?;
            let mut d = &payload[..];
            let mut descriptors = Vec::with_capacity(count);
            while d.has_remaining() {
                let (len, flags) = (d.get_u32(), d.get_u32());
                if len == 0 {
                    return Err(protocol("block status descriptor of length 0"));
                }
                descriptors.push((len, flags));
            }
            w.status = Some(descriptors);
        }
        // Any type with bit 15 set is an error chunk, known or not.
        k if k & 0x8000 != 0 => {
            if !(6..=MAX_ERROR_CHUNK).contains(&length) {
                return Err(bad_length());
            }
            let mut payload = vec![0u8; length as usize];
            rd.read_exact(&mut payload).await?;
            let mut d = &payload[..];
            let errno = d.get_u32();
            let mlen = usize::from(d.get_u16());
            if mlen > d.len() {
                return Err(protocol("error message longer than its chunk"));
            }
            let message = String::from_utf8_lossy(&d[..mlen]).into_owned();
            d.advance(mlen);
            let offset = (k == REPLY_ERROR_OFFSET && d.len() >= 8).then(|| d.get_u64());
            w.server_error(errno, offset, message);
        }
        _ => {
            return Err(protocol(format!(
                "unexpected reply chunk type {kind} (length {length}) to a {}",
                command_name(w.cmd)
            )))
        }
    }
    Ok(())
}
