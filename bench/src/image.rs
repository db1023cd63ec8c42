//! Deterministic test images. Profiles: `mixed` (a repeating pattern of zero holes, text-like
//! data that zstd shrinks ~3x, and incompressible random data), `random`, and `sparse` (one 4 MiB
//! text region every 4 GiB, holes elsewhere: a 1 TiB disk holds 1 GiB of data). The same profile,
//! size and seed always give the same bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes per region; the mixed profile cycles region kinds at this granularity.
pub const REGION: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Mixed,
    Random,
    Sparse,
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mixed" => Ok(Profile::Mixed),
            "random" => Ok(Profile::Random),
            "sparse" => Ok(Profile::Sparse),
            other => Err(format!("unknown profile {other:?} (mixed, random, sparse)")),
        }
    }
}

/// What a region of an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Zero,
    Text,
    Random,
}

impl Profile {
    /// Kind of region `i`.
    pub fn kind(self, i: u64) -> Kind {
        match self {
            // 3 zero, 4 text, 3 random out of every 10 regions.
            Profile::Mixed => match i % 10 {
                0 | 4 | 7 => Kind::Zero,
                1 | 3 | 6 | 9 => Kind::Text,
                _ => Kind::Random,
            },
            Profile::Random => Kind::Random,
            // 1 region in 1024 holds data.
            Profile::Sparse => {
                if i % 1024 == 1 {
                    Kind::Text
                } else {
                    Kind::Zero
                }
            }
        }
    }
}

/// xorshift64*: fast and good enough to defeat compression.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "block",
    "replication",
    "disk",
    "epoch",
    "chunk",
    "sink",
    "agent",
    "quic",
    "blake3",
    "zstd",
    "ceph",
    "rbd",
    "image",
    "snapshot",
    "change",
    "tracking",
    "vmware",
    "openstack",
    "cutover",
    "volume",
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "with",
    "on",
    "data",
    "log",
    "INFO",
    "WARN",
    "2026-11-22T12:00:00Z",
    "request",
    "id=",
    "status=200",
    "bytes=4096",
    "user",
    "kernel:",
    "systemd[1]:",
    "Started",
    "Session",
    "eth0",
    "GET",
    "/var/lib",
    "{\"key\":",
    "\"value\"}",
    "0x7f3a",
    "\n",
];

/// Fill `buf` with text-like bytes (words from a small vocabulary in random order).
pub fn fill_text(rng: &mut Rng, buf: &mut [u8]) {
    let mut pos = 0;
    while pos < buf.len() {
        let w = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize].as_bytes();
        let n = w.len().min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&w[..n]);
        pos += n;
        if pos < buf.len() {
            buf[pos] = b' ';
            pos += 1;
        }
    }
}

/// Contents of region `i` (None: zeros).
pub fn region(profile: Profile, seed: u64, i: u64, len: usize) -> Option<Vec<u8>> {
    let mut rng = Rng::new(seed ^ i.wrapping_mul(0xA24B_AED4_963E_E407));
    match profile.kind(i) {
        Kind::Zero => None,
        Kind::Text => {
            let mut b = vec![0; len];
            fill_text(&mut rng, &mut b);
            Some(b)
        }
        Kind::Random => {
            let mut b = vec![0; len];
            rng.fill(&mut b);
            Some(b)
        }
    }
}

/// Byte counts of an image by kind: (zero, text, random).
pub fn composition(profile: Profile, size: u64) -> (u64, u64, u64) {
    let mut c = (0, 0, 0);
    let mut off = 0;
    let mut i = 0;
    while off < size {
        let len = REGION.min(size - off);
        match profile.kind(i) {
            Kind::Zero => c.0 += len,
            Kind::Text => c.1 += len,
            Kind::Random => c.2 += len,
        }
        off += len;
        i += 1;
    }
    c
}

/// Write an image of `size` bytes (zero regions are left as holes).
pub fn generate(path: &Path, size: u64, profile: Profile, seed: u64) -> io::Result<()> {
    let f = File::create(path)?;
    f.set_len(size)?;
    let mut off = 0;
    let mut i = 0;
    while off < size {
        let len = REGION.min(size - off) as usize;
        if let Some(data) = region(profile, seed, i, len) {
            f.write_all_at(&data, off)?;
        }
        off += len as u64;
        i += 1;
    }
    f.sync_all()
}

/// Whether two files hold the same bytes, compared in 4 MiB pieces (memory stays small).
pub fn same_contents(a: &Path, b: &Path) -> io::Result<bool> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let len = fa.metadata()?.len();
    if len != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; REGION as usize], vec![0u8; REGION as usize]);
    let mut off = 0;
    while off < len {
        let n = REGION.min(len - off) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_as_described() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        generate(&a, 41 << 20, Profile::Mixed, 7).unwrap();
        generate(&b, 41 << 20, Profile::Mixed, 7).unwrap();
        let (da, db) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(da, db);
        assert_eq!(da.len(), 41 << 20);
        assert!(da[..REGION as usize].iter().all(|&x| x == 0));
        assert!(da[REGION as usize..2 * REGION as usize].iter().all(|&x| x.is_ascii()));
        let (z, t, r) = composition(Profile::Mixed, 41 << 20);
        assert_eq!(z + t + r, 41 << 20);
        assert!(z > 0 && t > 0 && r > 0);
    }
}
