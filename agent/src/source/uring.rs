//! io_uring reads for file and block-device sources: one ring per source, driven by its own
//! thread, keeps many positioned reads in flight without a blocking-pool thread per read. Where
//! io_uring is missing or forbidden (old kernels, `kernel.io_uring_disabled`, seccomp) `Ring::new`
//! fails and the source falls back to `pread` on the blocking pool.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};
use tokio::sync::oneshot;

struct Request {
    offset: u64,
    len: usize,
    reply: oneshot::Sender<io::Result<Bytes>>,
}

struct InFlight {
    buf: Vec<u8>,
    offset: u64,
    done: usize,
    reply: oneshot::Sender<io::Result<Bytes>>,
}

/// A ring reading one file.
pub struct Ring {
    tx: mpsc::Sender<Request>,
}

impl Ring {
    /// Set up a ring with `depth` entries for `file`; an error means "use pread instead".
    pub fn new(file: Arc<File>, depth: u32) -> io::Result<Ring> {
        let ring = IoUring::new(depth)?;
        // Setup can succeed where reads are not offered (kernels before 5.6 lack IORING_OP_READ,
        // seccomp profiles may filter it): ask the kernel which operations it supports.
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Read::CODE) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring offers no IORING_OP_READ"));
        }
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("blockship-uring".into())
            .spawn(move || run(ring, file, rx, depth as usize))?;
        Ok(Ring { tx })
    }

    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request { offset, len, reply }).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// The ring's thread is gone (its ring failed); the caller reads with pread instead.
fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "io_uring thread stopped")
}

/// Whether a `Ring::read` error says io_uring cannot do the read at all (the kernel refused the
/// operation, or the ring's thread is gone), as opposed to an I/O error of the file.
pub fn refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | libc::EPERM))
        || matches!(e.kind(), io::ErrorKind::Unsupported | io::ErrorKind::BrokenPipe)
}

fn submit(ring: &mut IoUring, fd: types::Fd, slot: usize, r: &mut InFlight) -> io::Result<()> {
    let remaining = r.buf.capacity() - r.done;
    // SAFETY: the buffer's capacity is reserved and not touched until this read completes.
    let ptr = unsafe { r.buf.as_mut_ptr().add(r.done) };
    let entry = opcode::Read::new(fd, ptr, remaining as u32)
        .offset(r.offset + r.done as u64)
        .build()
        .user_data(slot as u64);
    // SAFETY: the buffer outlives the operation: it is only freed after its completion is reaped.
    unsafe { ring.submission().push(&entry) }.map_err(|_| io::Error::other("io_uring submission queue full"))
}

fn run(mut ring: IoUring, file: Arc<File>, rx: mpsc::Receiver<Request>, depth: usize) {
    let fd = types::Fd(file.as_raw_fd());
    let mut slots: Vec<Option<InFlight>> = (0..depth).map(|_| None).collect();
    let mut busy = 0usize;
    let mut open = true;
    loop {
        // Take new requests: block only when nothing is in flight.
        while open && busy < depth {
            let req = if busy == 0 {
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            let slot = slots.iter().position(Option::is_none).expect("busy < depth");
            let mut f =
                InFlight { buf: Vec::with_capacity(req.len), offset: req.offset, done: 0, reply: req.reply };
            if req.len == 0 {
                let _ = f.reply.send(Ok(Bytes::new()));
                continue;
            }
            if let Err(e) = submit(&mut ring, fd, slot, &mut f) {
                let _ = f.reply.send(Err(e));
                continue;
            }
            slots[slot] = Some(f);
            busy += 1;
        }
        if busy == 0 {
            if open {
                continue;
            }
            return;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            for f in slots.iter_mut().filter_map(Option::take) {
                let _ = f.reply.send(Err(io::Error::new(e.kind(), e.to_string())));
            }
            return;
        }
        let done: Vec<(usize, i32)> =
            ring.completion().map(|c| (c.user_data() as usize, c.result())).collect();
        for (slot, res) in done {
            let Some(mut f) = slots[slot].take() else { continue };
            if res < 0 {
                let _ = f.reply.send(Err(io::Error::from_raw_os_error(-res)));
                busy -= 1;
                continue;
            }
            if res == 0 {
                let at = f.offset + f.done as u64;
                let _ = f
                    .reply
                    .send(Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("short read at {at}"))));
                busy -= 1;
                continue;
            }
            f.done += res as usize;
            // SAFETY: the kernel initialised `done` bytes of the reserved capacity.
            unsafe { f.buf.set_len(f.done) };
            if f.done < f.buf.capacity() {
                // A short read (e.g. at a page-cache boundary): ask for the rest.
                match submit(&mut ring, fd, slot, &mut f) {
                    Ok(()) => slots[slot] = Some(f),
                    Err(e) => {
                        let _ = f.reply.send(Err(e));
                        busy -= 1;
                    }
                }
            } else {
                let _ = f.reply.send(Ok(Bytes::from(f.buf)));
                busy -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[tokio::test]
    async fn reads_match_pread_or_ring_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..(3 << 20) + 123).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = Arc::new(File::open(&p).unwrap());
        let ring = match Ring::new(f.clone(), 8) {
            Ok(r) => r,
            Err(e) => {
                // Only a machine that has no io_uring may skip this; CI requires it.
                assert!(
                    std::env::var("BLOCKSHIP_REQUIRE_IO_URING").is_err(),
                    "BLOCKSHIP_REQUIRE_IO_URING is set but io_uring is unavailable: {e}"
                );
                eprintln!("skipped: io_uring unavailable here ({e}); the pread fallback is what runs");
                return;
            }
        };
        let reads: Vec<(u64, usize)> = (0..40).map(|i| ((i * 77_777) as u64, 65_536 + i * 1000)).collect();
        let results = futures::future::join_all(reads.iter().map(|&(o, l)| ring.read(o, l))).await;
        for ((o, l), r) in reads.iter().zip(results) {
            let mut want = vec![0u8; *l];
            f.read_exact_at(&mut want, *o).unwrap();
            assert_eq!(r.unwrap(), want);
        }
        let end = data.len() as u64 - 10;
        assert!(ring.read(end, 20).await.is_err(), "a read past the end succeeded");
        assert_eq!(ring.read(end, 10).await.unwrap(), &data[end as usize..]);
    }
}
