//! The per-target chunk hash index: one BLAKE3 per chunk (32 zero bytes for a chunk known to be
//! all zeros), kept in the state dir so compare-mode syncs can skip equal chunks without reading
//! the target. An entry is set to STALE (durably) before its chunk is rewritten and gets its new
//! hash only after the chunk is durable, so the index never vouches for data that a crash may
//! have torn. Stale entries are recomputed from the target when the index is requested.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blockship_proto::HASH_LEN;

/// Entry value meaning "unknown: recompute from the target".
pub const STALE: [u8; HASH_LEN] = [0xFF; HASH_LEN];

const MAGIC: &[u8; 8] = b"BSHIDX01";
const HEADER_LEN: u64 = 4096;
const MAX_TOKEN: usize = 128;

/// Why an index was (re)initialised instead of reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexOrigin {
    /// The existing index matches the target's state.
    Reused,
    /// New target: every chunk is known to be zero.
    FreshZero,
    /// Missing or mismatching index: every entry is stale and will be rebuilt from the target.
    Rebuilt,
}

pub struct HashIndex {
    file: File,
    path: PathBuf,
    chunk_size: u32,
    chunks: u64,
    token: String,
}

/// A token naming one incarnation of an index (random, so no two incarnations share one).
pub fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl HashIndex {
    /// Open the index at `path` if it was written for `token` with this chunk size; otherwise
    /// create a new one under a new token: all-zero entries for a target created just now
    /// (`fresh`), all-stale entries otherwise.
    pub fn open(
        path: &Path,
        chunk_size: u32,
        disk_size: u64,
        token: &str,
        fresh: bool,
    ) -> io::Result<(Self, IndexOrigin)> {
        let chunks = blockship_proto::chunk_count(disk_size, chunk_size);
        if !fresh && !token.is_empty() {
            if let Ok(file) = OpenOptions::new().read(true).write(true).open(path) {
                if let Some((cs, n, t)) = read_header(&file) {
                    if cs == chunk_size && t == token && n <= chunks {
                        let mut index =
                            HashIndex { file, path: path.to_path_buf(), chunk_size, chunks: n, token: t };
                        index.grow(disk_size)?;
                        return Ok((index, IndexOrigin::Reused));
                    }
                }
            }
        }
        let tmp = path.with_extension("tmp");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
        let index = HashIndex { file, path: path.to_path_buf(), chunk_size, chunks: 0, token: new_token() };
        // A sparse file reads as zeros, which is exactly "all chunks are zero".
        index.file.set_len(HEADER_LEN + chunks * HASH_LEN as u64)?;
        let mut index = HashIndex { chunks, ..index };
        if !fresh {
            index.fill(0..chunks, &STALE)?;
        }
        index.write_header()?;
        index.file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        index.path = path.to_path_buf();
        let origin = if fresh { IndexOrigin::FreshZero } else { IndexOrigin::Rebuilt };
        Ok((index, origin))
    }

    fn write_header(&self) -> io::Result<()> {
        let mut h = Vec::with_capacity(64);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&self.chunk_size.to_le_bytes());
        h.extend_from_slice(&self.chunks.to_le_bytes());
        h.extend_from_slice(&(self.token.len() as u16).to_le_bytes());
        h.extend_from_slice(self.token.as_bytes());
        self.file.write_all_at(&h, 0)
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Extend the index to cover `disk_size`; new entries are stale.
    pub fn grow(&mut self, disk_size: u64) -> io::Result<()> {
        let chunks = blockship_proto::chunk_count(disk_size, self.chunk_size);
        if chunks > self.chunks {
            let old = self.chunks;
            self.file.set_len(HEADER_LEN + chunks * HASH_LEN as u64)?;
            self.chunks = chunks;
            self.fill(old..chunks, &STALE)?;
            self.write_header()?;
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Raw entries `first..first+count` (32 bytes each).
    pub fn get(&self, first: u64, count: usize) -> io::Result<Vec<u8>> {
        let count = count.min(self.chunks.saturating_sub(first) as usize);
        let mut buf = vec![0u8; count * HASH_LEN];
        self.file.read_exact_at(&mut buf, HEADER_LEN + first * HASH_LEN as u64)?;
        Ok(buf)
    }

    pub fn set(&self, chunk: u64, hash: &[u8; HASH_LEN]) -> io::Result<()> {
        debug_assert!(chunk < self.chunks);
        self.file.write_all_at(hash, HEADER_LEN + chunk * HASH_LEN as u64)
    }

    /// Set every entry in `range` to `value`.
    pub fn fill(&self, range: Range<u64>, value: &[u8; HASH_LEN]) -> io::Result<()> {
        const BATCH: u64 = 4096;
        let mut pos = range.start;
        while pos < range.end {
            let n = (range.end - pos).min(BATCH);
            let buf: Vec<u8> = value.iter().copied().cycle().take(n as usize * HASH_LEN).collect();
            self.file.write_all_at(&buf, HEADER_LEN + pos * HASH_LEN as u64)?;
            pos += n;
        }
        Ok(())
    }

    /// Chunks whose entries are stale, in order.
    pub fn stale_chunks(&self) -> io::Result<Vec<u64>> {
        const BATCH: u64 = 16 * 1024;
        let mut out = Vec::new();
        let mut first = 0;
        while first < self.chunks {
            let raw = self.get(first, BATCH as usize)?;
            for (i, e) in raw.chunks_exact(HASH_LEN).enumerate() {
                if e == STALE {
                    out.push(first + i as u64);
                }
            }
            first += BATCH;
        }
        Ok(out)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// For each of `chunks` (sorted ascending), whether it overlaps one of the `allocated` extents
/// (offset, length; any order) of a disk of `disk_size` bytes. One merge pass over both sorted
/// lists, so a multi-TiB target with millions of stale chunks is mapped in milliseconds.
pub fn holding_data(chunks: &[u64], allocated: &[(u64, u64)], chunk_size: u32, disk_size: u64) -> Vec<bool> {
    let cs = u64::from(chunk_size);
    let mut extents: Vec<(u64, u64)> =
        allocated.iter().filter(|e| e.1 > 0).map(|&(o, l)| (o, o + l)).collect();
    extents.sort_unstable();
    let mut next = 0;
    // The furthest end among extents starting before the current chunk's end (they may overlap).
    let mut reach = 0u64;
    chunks
        .iter()
        .map(|&chunk| {
            let start = chunk * cs;
            let end = start + cs.min(disk_size.saturating_sub(start));
            while next < extents.len() && extents[next].0 < end {
                reach = reach.max(extents[next].1);
                next += 1;
            }
            reach > start
        })
        .collect()
}

fn read_header(file: &File) -> Option<(u32, u64, String)> {
    let mut h = [0u8; 8 + 4 + 8 + 2 + MAX_TOKEN];
    file.read_exact_at(&mut h, 0).ok()?;
    if &h[..8] != MAGIC {
        return None;
    }
    let cs = u32::from_le_bytes(h[8..12].try_into().ok()?);
    let n = u64::from_le_bytes(h[12..20].try_into().ok()?);
    let tl = u16::from_le_bytes(h[20..22].try_into().ok()?) as usize;
    if tl > MAX_TOKEN {
        return None;
    }
    let token = String::from_utf8(h[22..22 + tl].to_vec()).ok()?;
    let len = file.metadata().ok()?.len();
    (len >= HEADER_LEN + n * HASH_LEN as u64).then_some((cs, n, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_index_is_all_zero_and_reopens_with_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index.bin");
        let (idx, origin) = HashIndex::open(&p, 1 << 20, (5 << 20) + 1, "", true).unwrap();
        assert_eq!(origin, IndexOrigin::FreshZero);
        assert_eq!(idx.chunks(), 6);
        assert!(idx.get(0, 6).unwrap().iter().all(|&b| b == 0));
        idx.set(2, &[9; 32]).unwrap();
        idx.sync().unwrap();
        let token = idx.token().to_string();
        drop(idx);

        let (idx, origin) = HashIndex::open(&p, 1 << 20, (5 << 20) + 1, &token, false).unwrap();
        assert_eq!(origin, IndexOrigin::Reused);
        assert_eq!(idx.get(2, 1).unwrap(), vec![9; 32]);
        assert!(idx.stale_chunks().unwrap().is_empty());
    }

    #[test]
    fn mismatching_token_or_chunk_size_rebuilds_as_stale() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index.bin");
        let (idx, _) = HashIndex::open(&p, 1 << 20, 4 << 20, "", true).unwrap();
        let token = idx.token().to_string();
        drop(idx);
        let (idx, origin) = HashIndex::open(&p, 1 << 20, 4 << 20, "someone-else", false).unwrap();
        assert_eq!(origin, IndexOrigin::Rebuilt);
        assert_eq!(idx.stale_chunks().unwrap(), vec![0, 1, 2, 3]);
        assert_ne!(idx.token(), token);
        let t2 = idx.token().to_string();
        drop(idx);
        let (_, origin) = HashIndex::open(&p, 2 << 20, 4 << 20, &t2, false).unwrap();
        assert_eq!(origin, IndexOrigin::Rebuilt);
    }

    #[test]
    fn holding_data_is_linear_in_stale_chunks_and_extents() {
        // A multi-TiB target opened with an empty state dir: 1 M stale chunks of 64 KiB against
        // 300 k allocated extents. A scan of every extent per chunk (3e11 steps, minutes even
        // vectorised) is a hang; the merge of two sorted lists takes milliseconds. The deadline
        // only catches the hang.
        let cs: u32 = 64 << 10;
        let chunks: Vec<u64> = (0..1_000_000u64).map(|i| i * 3).collect();
        let size = 9_000_000 * u64::from(cs);
        // Extents of 20 KiB every 30 chunks, from chunk 5 on, plus one spanning chunks 2..4.
        let mut allocated: Vec<(u64, u64)> = vec![(2 * u64::from(cs) + 100, 2 * u64::from(cs))];
        allocated.extend((0..300_000u64).map(|i| ((5 + 30 * i) * u64::from(cs) + 4096, 20 << 10)));
        let (tx, rx) = std::sync::mpsc::channel();
        let (c, a) = (chunks.clone(), allocated.clone());
        std::thread::spawn(move || tx.send(holding_data(&c, &a, cs, size)));
        let holds = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("holding_data did not finish within 60 s: it is not linear");
        assert_eq!(holds.len(), chunks.len());
        // Stale chunks are the multiples of 3; the spanning extent touches chunks 2..=4 and the
        // others sit inside chunks 5 + 30 i, never a multiple of 3: only chunk 3 holds data.
        let expected: Vec<u64> = vec![3];
        let got: Vec<u64> = chunks.iter().zip(&holds).filter(|(_, h)| **h).map(|(c, _)| *c).collect();
        assert_eq!(got, expected);
        // And a brute-force check on a small random case.
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let size = 1000 * u64::from(cs) - 5;
        let chunks: Vec<u64> = (0..1000u64).filter(|_| next() % 2 == 0).collect();
        let mut allocated = Vec::new();
        let mut pos = 0;
        while pos < size {
            let gap = next() % (3 * u64::from(cs));
            let len = 1 + next() % (2 * u64::from(cs));
            if pos + gap >= size {
                break;
            }
            let len = len.min(size - pos - gap);
            allocated.push((pos + gap, len));
            pos += gap + len;
        }
        let holds = holding_data(&chunks, &allocated, cs, size);
        for (chunk, h) in chunks.iter().zip(holds) {
            let (o, l) = (chunk * u64::from(cs), u64::from(cs).min(size - chunk * u64::from(cs)));
            let brute = allocated.iter().any(|&(ao, al)| ao < o + l && o < ao + al);
            assert_eq!(h, brute, "chunk {chunk}");
        }
    }

    #[test]
    fn growing_adds_stale_entries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index.bin");
        let (idx, _) = HashIndex::open(&p, 1 << 20, 2 << 20, "", true).unwrap();
        let token = idx.token().to_string();
        drop(idx);
        let (idx, origin) = HashIndex::open(&p, 1 << 20, 4 << 20, &token, false).unwrap();
        assert_eq!(origin, IndexOrigin::Reused);
        assert_eq!(idx.stale_chunks().unwrap(), vec![2, 3]);
    }
}
