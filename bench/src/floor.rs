//! The floor: what the work every replicated byte needs costs on this machine, measured in the
//! same run as the tools it judges. Each stage runs alone on one thread over the same amount of
//! data and is charged that thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, so other processes do
//! not count): reading the source from the page cache, BLAKE3 over 1 MiB chunks (the agent's
//! default chunk), AES-256-GCM over 16 KiB TLS records (the suite rustls negotiates), the socket
//! copy on each end of a loopback TCP stream, and an `O_DIRECT` write as file targets do. An
//! agent must at least read, hash, encrypt and send; a sink at least receive, decrypt, hash and
//! write — their sums are each side's floor in CPU seconds per GiB, which a real run's CPU per
//! wire GiB is compared against. Compression, protocol framing and scheduling are what a tool
//! adds above it.

use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

const GIB: f64 = (1u64 << 30) as f64;
const CHUNK: usize = 1 << 20;
const RECORD: usize = 16 << 10;

/// CPU seconds per GiB of each stage.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Floor {
    pub read: f64,
    pub blake3: f64,
    pub seal: f64,
    pub open: f64,
    pub send: f64,
    pub recv: f64,
    pub write: f64,
}

impl Floor {
    /// The sending side: read, hash, encrypt, send.
    pub fn agent(&self) -> f64 {
        self.read + self.blake3 + self.seal + self.send
    }

    /// The receiving side: receive, decrypt, verify the hash, write.
    pub fn sink(&self) -> f64 {
        self.recv + self.open + self.blake3 + self.write
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "floor, CPU-s per GiB: read {:.3}, BLAKE3 {:.3}, AES-256-GCM seal {:.3} / open {:.3}, socket send {:.3} / receive {:.3}, target write {:.3}; agent {:.2}, sink {:.2}",
            self.read,
            self.blake3,
            self.seal,
            self.open,
            self.send,
            self.recv,
            self.write,
            self.agent(),
            self.sink()
        )
    }
}

/// CPU time of the calling thread, seconds.
fn thread_cpu() -> f64 {
    // SAFETY: timespec is plain data; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// CPU seconds per GiB `f` spends on this thread processing `bytes`.
fn per_gib(bytes: u64, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = thread_cpu();
    f()?;
    Ok((thread_cpu() - t) / (bytes as f64 / GIB))
}

/// Measure every stage over `bytes` (rounded down to whole 1 MiB chunks), reading `source` (a
/// file at least that long, warmed into the page cache first) and writing a scratch file in
/// `scratch_dir`.
pub fn measure(source: &Path, scratch_dir: &Path, bytes: u64) -> Result<Floor> {
    let chunks = (bytes / CHUNK as u64).max(1);
    let bytes = chunks * CHUNK as u64;
    let mut data = vec![0u8; CHUNK];
    crate::image::Rng::new(99).fill(&mut data);

    let src = std::fs::File::open(source).with_context(|| format!("opening {}", source.display()))?;
    let have = src.metadata()?.len() / CHUNK as u64;
    anyhow::ensure!(have > 0, "{} is shorter than one chunk", source.display());
    let read_all = |buf: &mut [u8]| -> Result<()> {
        for i in 0..chunks {
            src.read_exact_at(buf, (i % have) * CHUNK as u64)?;
        }
        Ok(())
    };
    let mut buf = vec![0u8; CHUNK];
    read_all(&mut buf)?;
    let read = per_gib(bytes, || read_all(&mut buf))?;

    let blake3 = per_gib(bytes, || {
        for _ in 0..chunks {
            std::hint::black_box(blake3::hash(std::hint::black_box(&data)));
        }
        Ok(())
    })?;

    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).map_err(|_| anyhow::anyhow!("AES key"))?);
    let mut record = data[..RECORD].to_vec();
    let records = bytes / RECORD as u64;
    let seal = per_gib(bytes, || {
        for i in 0..records {
            let tag = key
                .seal_in_place_separate_tag(nonce(i), Aad::empty(), &mut record)
                .map_err(|_| anyhow::anyhow!("AES-GCM seal failed"))?;
            let _ = std::hint::black_box(tag);
        }
        Ok(())
    })?;
    // 64 genuine records to open in turn: record i is the ciphertext of record i-1 under nonce i.
    let mut sealed: Vec<(Vec<u8>, u64)> = Vec::with_capacity(64);
    let mut plain = data[..RECORD].to_vec();
    for i in 0..64u64 {
        let tag = key
            .seal_in_place_separate_tag(nonce(i), Aad::empty(), &mut plain)
            .map_err(|_| anyhow::anyhow!("AES-GCM seal failed"))?;
        let mut rec = plain.clone();
        rec.extend_from_slice(tag.as_ref());
        sealed.push((rec, i));
    }
    let open = per_gib(bytes, || {
        let mut scratch = vec![0u8; RECORD + 16];
        for i in 0..records {
            let (rec, n) = &sealed[(i % 64) as usize];
            scratch.copy_from_slice(rec);
            key.open_in_place(nonce(*n), Aad::empty(), &mut scratch)
                .map_err(|_| anyhow::anyhow!("AES-GCM open failed"))?;
        }
        Ok(())
    })?;
    // `open` is charged one copy of each record besides the decryption (fresh ciphertext for
    // every call); a TLS receiver pays that copy too, moving records out of its socket buffer.

    let (send, recv) = socket(&data, chunks)?;
    let write = direct_write(&scratch_dir.join("floor-write.tmp"), &data, chunks)?;
    Ok(Floor { read, blake3, seal, open, send, recv, write })
}

fn nonce(i: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Each end's CPU per GiB of a loopback TCP stream carrying `chunks` × 1 MiB. On loopback
/// whichever thread is running also does much of the other end's work (the receive path runs in
/// the sender's softirq, or the reader's wake-up does), so the split swings from run to run while
/// the sum holds; each end is charged half of it, as two hosts would each pay their own.
fn socket(data: &[u8], chunks: u64) -> Result<(f64, f64)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let bytes = chunks * CHUNK as u64;
    let reader = std::thread::spawn(move || -> Result<f64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; CHUNK];
        let mut left = bytes;
        per_gib(bytes, || {
            while left > 0 {
                let n = s.read(&mut buf)?;
                anyhow::ensure!(n > 0, "the floor's socket closed early");
                left -= n as u64;
            }
            Ok(())
        })
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    let send = per_gib(bytes, || {
        for _ in 0..chunks {
            s.write_all(data)?;
        }
        Ok(())
    })?;
    let recv = reader.join().map_err(|_| anyhow::anyhow!("the floor's reader thread panicked"))??;
    let each = (send + recv) / 2.0;
    Ok((each, each))
}

/// CPU per GiB of writing `chunks` × 1 MiB with `O_DIRECT` (page-aligned buffer) and one
/// fdatasync, as the sink's file targets do.
fn direct_write(path: &Path, data: &[u8], chunks: u64) -> Result<f64> {
    let (mut buf, skip) = blockship_proto::buffer::aligned_vec(CHUNK);
    buf.extend_from_slice(data);
    let buf = &buf[skip..];
    let open = |flags| {
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(flags).open(path)
    };
    // Filesystems without O_DIRECT (tmpfs) get buffered writes, as the sink's file targets do.
    let f = match open(libc::O_DIRECT) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0),
        other => other,
    }
    .with_context(|| format!("opening {}", path.display()))?;
    let cost = per_gib(chunks * CHUNK as u64, || {
        for i in 0..chunks {
            f.write_all_at(buf, i * CHUNK as u64)?;
        }
        f.sync_data()?;
        Ok(())
    });
    let _ = std::fs::remove_file(path);
    cost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_costs_something_and_the_sides_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, vec![1u8; 8 << 20]).unwrap();
        let f = measure(&src, dir.path(), 32 << 20).unwrap();
        for (name, v) in [("read", f.read), ("blake3", f.blake3), ("seal", f.seal), ("open", f.open)] {
            assert!(v > 0.0 && v.is_finite(), "{name} cost {v}");
        }
        assert!((f.agent() - (f.read + f.blake3 + f.seal + f.send)).abs() < 1e-12);
        assert!(f.sink() >= f.blake3 + f.open);
    }
}
