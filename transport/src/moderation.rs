//! Receive moderation for QUIC's UDP sockets: adaptive interrupt moderation in user space, as
//! NICs do it in hardware. On a paced link (500 Mbit/s) datagrams arrive one GSO batch at a
//! time, and each batch woke quinn's endpoint driver, then the connection's driver, then the
//! stream reader — ~4k wake-ups per second per side, each costing more than the packets it
//! carried (profiles in docs/performance.md). When a read empties the socket while data comes
//! in at a moderate rate (`HOLD_BAND`), this wrapper waits `hold` before reading again, so what
//! arrived meanwhile is taken in one wake-up. A read that fills the whole batch (more is
//! waiting), a fast stream and sparse control traffic are never held, so neither loopback
//! throughput nor a commit's round trips pay for it, and the band ends where a hold's worth of
//! data would no longer fit easily in the socket's receive buffer. The rate is the socket's,
//! not a connection's: while one agent's bulk stream is in the band, the sink's other traffic on
//! the same endpoint waits up to a hold too. The cost is up to `hold` (with tokio's 1 ms timer,
//! 1–2 ms) of added latency per read while held.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::time::{Instant, Sleep};

/// A socket whose reads are moderated (see the module note).
pub struct Moderated {
    inner: Arc<dyn AsyncUdpSocket>,
    /// Only quinn's endpoint driver reads, so the lock is never contended.
    state: Mutex<(Moderator, Option<Pin<Box<Sleep>>>)>,
}

/// Holds are taken only at receive rates in this band (bytes per second). Below it a hold would
/// delay request/response exchanges (a commit's round trips) for few saved wake-ups; above it
/// the receiver is busy enough that a pause only stalls its pipeline (measured on loopback: a
/// 1 ms hold at ~900 MB/s lost ~12 % throughput) and its wake-ups are amortised over large reads.
/// A small socket buffer lowers the top further (`Moderator::new`).
pub const HOLD_BAND: std::ops::Range<u64> = 8_000_000..200_000_000;

/// Rate window: long enough to span many holds, short enough to follow a transfer's start.
const WINDOW: Duration = Duration::from_millis(20);

/// When to read again: the rate a socket receives at, and the hold it calls for.
#[derive(Debug)]
pub struct Moderator {
    hold: Duration,
    /// The top of the band for this socket.
    ceiling: u64,
    /// Bytes received in the current rate window, and when it began.
    bytes: u64,
    since: Option<Instant>,
    /// When the last read returned.
    last: Option<Instant>,
    /// Receive rate of the last complete window (bytes per second).
    rate: u64,
}

impl Moderator {
    /// Moderation by `hold` of a socket whose receive buffer holds `buffer` bytes. What arrives
    /// during a hold (up to twice `hold` with tokio's timer) must fit in a quarter of the buffer,
    /// or a hold would drop datagrams: with the 16 MiB buffer a root daemon gets that allows
    /// any rate in the band; with the kernel's default (~416 KiB) holds stop at ~52 MB/s.
    pub fn new(hold: Duration, buffer: usize) -> Self {
        let fits = (buffer as f64 / 4.0 / (2.0 * hold.as_secs_f64()).max(1e-9)) as u64;
        Moderator { hold, ceiling: fits.min(HOLD_BAND.end), bytes: 0, since: None, last: None, rate: 0 }
    }

    /// A read at `now` returned `n` datagrams (of a batch of `batch`) carrying `bytes`: until
    /// when the next read should wait, if at all.
    pub fn after_read(&mut self, now: Instant, n: usize, batch: usize, bytes: u64) -> Option<Instant> {
        // A window of silence ends the stream: what came before it says nothing of this read
        // (without this, the tail of a transfer kept the old rate, and holds, for a window).
        if self.last.is_some_and(|last| now - last >= WINDOW) {
            (self.rate, self.bytes, self.since) = (0, 0, None);
        }
        self.last = Some(now);
        let since = *self.since.get_or_insert(now);
        self.bytes += bytes;
        let span = now - since;
        if span >= WINDOW {
            self.rate = (self.bytes as f64 / span.as_secs_f64()) as u64;
            (self.bytes, self.since) = (0, Some(now));
        }
        // A full batch means more is waiting: read on.
        let in_band = self.rate >= HOLD_BAND.start && self.rate < self.ceiling;
        (n < batch && in_band && !self.hold.is_zero()).then(|| now + self.hold)
    }
}

impl Moderated {
    /// Moderate reads of `inner`, whose receive buffer holds `buffer` bytes, by `hold`.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, hold: Duration, buffer: usize) -> Self {
        Moderated { inner, state: Mutex::new((Moderator::new(hold, buffer), None)) }
    }
}

impl fmt::Debug for Moderated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Moderated").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for Moderated {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (moderator, held) = &mut *state;
        if let Some(sleep) = held.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            *held = None;
        }
        let got = ready!(self.inner.poll_recv(cx, bufs, meta));
        if let Ok(n) = got {
            let bytes = meta.iter().take(n).map(|m| m.len as u64).sum();
            if let Some(until) = moderator.after_read(Instant::now(), n, bufs.len(), bytes) {
                *held = Some(Box::pin(tokio::time::sleep_until(until)));
            }
        }
        Poll::Ready(got)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    /// The buffer a root daemon sets (`QuicTuning::socket_buffer`; Linux reports twice it).
    const BIG: usize = 32 << 20;

    /// Reads of `bytes` every `every`, for 100 ms: whether the last one asked for a hold.
    fn steady(m: &mut Moderator, t0: Instant, every: Duration, n: usize, bytes: u64) -> Option<Instant> {
        let reads = (100 * MS).as_micros() / every.as_micros();
        let mut last = None;
        for k in 0..reads as u32 {
            last = m.after_read(t0 + every * k, n, 32, bytes);
        }
        last
    }

    #[test]
    fn holds_only_a_drained_socket_in_the_rate_band() {
        let t0 = Instant::now();
        // A paced 500 Mbit/s link: one 14.5 KB GSO batch every 0.23 ms (~62 MB/s).
        let mut m = Moderator::new(MS, BIG);
        let until = steady(&mut m, t0, Duration::from_micros(232), 1, 14_520);
        assert!(HOLD_BAND.contains(&m.rate), "rate {}", m.rate);
        assert_eq!(until, Some(t0 + Duration::from_micros(232) * 430 + MS));
        // The same link, but the read filled the batch: more is waiting, no hold.
        assert_eq!(m.after_read(t0 + 30 * MS, 32, 32, 14_520 * 32), None);
        // Loopback at ~1 GB/s: never held.
        let mut fast = Moderator::new(MS, BIG);
        assert_eq!(steady(&mut fast, t0, Duration::from_micros(32), 1, 32_768), None);
        assert!(fast.rate >= HOLD_BAND.end, "rate {}", fast.rate);
        // Control traffic (a commit's round trips): never held, so no added latency.
        let mut idle = Moderator::new(MS, BIG);
        assert_eq!(steady(&mut idle, t0, MS, 1, 200), None);
        // A zero hold turns moderation off.
        let mut off = Moderator::new(Duration::ZERO, BIG);
        assert_eq!(steady(&mut off, t0, Duration::from_micros(232), 1, 14_520), None);
    }

    #[test]
    fn a_small_socket_buffer_lowers_the_ceiling() {
        let t0 = Instant::now();
        // The kernel's default buffer (rmem_max 212992, reported doubled): a 1 ms hold at
        // 62 MB/s could pile up ~124 KB, more than a quarter of it, so the link is not held.
        let mut small = Moderator::new(MS, 425_984);
        assert_eq!(steady(&mut small, t0, Duration::from_micros(232), 1, 14_520), None);
        // ... but a 20 MB/s stream still is.
        let mut slow = Moderator::new(MS, 425_984);
        assert!(steady(&mut slow, t0, Duration::from_micros(726), 1, 14_520).is_some());
    }

    #[test]
    fn the_rate_follows_a_change_within_a_window() {
        let t0 = Instant::now();
        let mut m = Moderator::new(MS, BIG);
        steady(&mut m, t0, Duration::from_micros(232), 1, 14_520);
        assert!(HOLD_BAND.contains(&m.rate));
        // The link goes quiet: after one window of sparse reads the rate is below the band.
        let t1 = t0 + 100 * MS;
        steady(&mut m, t1, 5 * MS, 1, 100);
        assert!(m.rate < HOLD_BAND.start, "rate {}", m.rate);
        // A transfer, a pause, then a commit's round trips: the first of them is not held for
        // the transfer's sake (its rate belongs to before the pause).
        let mut m = Moderator::new(MS, BIG);
        steady(&mut m, t0, Duration::from_micros(232), 1, 14_520);
        assert_eq!(m.after_read(t0 + 150 * MS, 1, 32, 200), None);
        assert_eq!(m.after_read(t0 + 150 * MS + Duration::from_micros(300), 1, 32, 200), None);
    }
}
