//! `synthetic:PROFILE:SIZE` sources, for `blockship-agent bench`: a disk of SIZE bytes whose
//! data is generated on the fly from the offset alone (so a retried or resumed epoch reads the
//! same bytes), with no disk in the way of measuring a link. Profiles: `zero` (all zeros, sent
//! as zero extents), `text` (words, compresses about 3:1), `random` (incompressible), `mixed`
//! (per MiB: a quarter zeros, a quarter text, half random).

use bytes::Bytes;

use super::SourceError;
use crate::extents::Extent;

/// Generated data, block by block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Zero,
    Text,
    Random,
    Mixed,
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zero" => Ok(Profile::Zero),
            "text" => Ok(Profile::Text),
            "random" => Ok(Profile::Random),
            "mixed" => Ok(Profile::Mixed),
            other => Err(format!("profile {other:?}: use zero, text, random or mixed")),
        }
    }
}

/// Mixed data switches kind every MiB.
const BLOCK: u64 = 1 << 20;

const WORDS: [&[u8]; 16] = [
    b"block ",
    b"replica ",
    b"epoch ",
    b"the ",
    b"sink ",
    b"agent ",
    b"chunk ",
    b"of ",
    b"disk ",
    b"commit ",
    b"and ",
    b"snapshot ",
    b"a ",
    b"durable ",
    b"to ",
    b"change\n",
];

fn mix(mut z: u64) -> u64 {
    // splitmix64: one multiply-xorshift round per word is plenty for incompressible test data.
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `out` with random bytes for absolute position `pos` (8-byte aligned pattern).
fn random(pos: u64, out: &mut [u8]) {
    let first = pos & !7;
    let skip = (pos - first) as usize;
    let mut word = first / 8;
    let mut i = 0;
    while i < out.len() {
        let bytes = mix(word).to_le_bytes();
        let from = if i == 0 { skip } else { 0 };
        let n = (8 - from).min(out.len() - i);
        out[i..i + n].copy_from_slice(&bytes[from..from + n]);
        i += n;
        word += 1;
    }
}

/// Fill `out` with words; each 4 KiB of text starts afresh at its own seed, so any position
/// is generated from its 4 KiB block alone.
fn text(pos: u64, out: &mut [u8]) {
    const PAGE: u64 = 4096;
    let mut page = [0u8; PAGE as usize];
    let (mut at, end) = (pos, pos + out.len() as u64);
    while at < end {
        let start = at / PAGE * PAGE;
        let mut filled = 0;
        let mut r = mix(start ^ 0x7465_7874);
        let mut bits = 16;
        while filled < page.len() {
            if bits == 0 {
                r = mix(r);
                bits = 16;
            }
            let w = WORDS[(r & 15) as usize];
            r >>= 4;
            bits -= 1;
            let n = w.len().min(page.len() - filled);
            page[filled..filled + n].copy_from_slice(&w[..n]);
            filled += n;
        }
        let stop = end.min(start + PAGE);
        let dst = (at - pos) as usize..(stop - pos) as usize;
        out[dst].copy_from_slice(&page[(at - start) as usize..(stop - start) as usize]);
        at = stop;
    }
}

fn kind_at(profile: Profile, pos: u64) -> Profile {
    match profile {
        Profile::Mixed => match (pos / BLOCK) % 4 {
            0 => Profile::Zero,
            1 => Profile::Text,
            _ => Profile::Random,
        },
        p => p,
    }
}

/// The bytes of `profile` at `[pos, pos + out.len())`.
pub fn generate(profile: Profile, pos: u64, out: &mut [u8]) {
    let (mut at, end) = (pos, pos.saturating_add(out.len() as u64));
    while at < end {
        let stop = end.min((at | (BLOCK - 1)).saturating_add(1));
        let dst = &mut out[(at - pos) as usize..(stop - pos) as usize];
        dst.copy_from_slice(block_slice(profile, at, dst.len()));
        at = stop;
    }
}

/// Pools the data is cut from: generating every byte afresh would cost the agent more CPU than
/// the replication it measures. Each MiB block is a slice of a pool at an offset drawn from the
/// block's number, so blocks differ (no chunk repeats nearby) and cost nothing to produce.
const POOL: usize = 32 << 20;

fn pool(profile: Profile) -> &'static [u8] {
    static RANDOM: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    static TEXT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    static ZEROS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let fill = |f: fn(u64, &mut [u8]), size: usize| {
        let mut v = vec![0u8; size];
        f(0, &mut v);
        v
    };
    match profile {
        Profile::Zero => ZEROS.get_or_init(|| vec![0u8; BLOCK as usize]),
        Profile::Text => TEXT.get_or_init(|| fill(text, POOL)),
        _ => RANDOM.get_or_init(|| fill(random, POOL)),
    }
}

/// `len` bytes of `profile` at `pos`, all within one MiB block.
fn block_slice(profile: Profile, pos: u64, len: usize) -> &'static [u8] {
    let kind = kind_at(profile, pos);
    let within = (pos % BLOCK) as usize;
    let start = match kind {
        Profile::Zero => 0,
        // 4 KiB aligned, so text pages stay whole.
        _ => (mix(pos / BLOCK) as usize % ((POOL - BLOCK as usize) >> 12)) << 12,
    };
    &pool(kind)[start + within..start + within + len]
}

/// The bytes at `[pos, pos + len)`: a slice of a pool (no copy) when they lie in one block.
fn bytes_at(profile: Profile, pos: u64, len: usize) -> Bytes {
    if pos / BLOCK == (pos + len as u64).saturating_sub(1) / BLOCK {
        return Bytes::from_static(block_slice(profile, pos, len));
    }
    let mut buf = vec![0u8; len];
    generate(profile, pos, &mut buf);
    Bytes::from(buf)
}

pub struct SyntheticSource {
    pub profile: Profile,
    size: u64,
}

impl SyntheticSource {
    /// `PROFILE:SIZE`, e.g. `mixed:4GiB`.
    pub fn parse(spec: &str) -> Result<SyntheticSource, SourceError> {
        let bad = |reason: String| SourceError::Io {
            source_name: format!("synthetic:{spec}"),
            what: "parse",
            err: std::io::Error::new(std::io::ErrorKind::InvalidInput, reason),
        };
        let (profile, size) = spec
            .split_once(':')
            .ok_or_else(|| bad("expected synthetic:PROFILE:SIZE, e.g. synthetic:mixed:4GiB".into()))?;
        let profile = profile.parse().map_err(bad)?;
        let size = parse_size::Config::new()
            .with_binary()
            .parse_size(size)
            .map_err(|e| bad(format!("size {size:?}: {e}")))?;
        if size == 0 {
            return Err(SourceError::Empty(format!("synthetic:{spec}")));
        }
        Ok(SyntheticSource { profile, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The data never changes: one view for every epoch.
    pub fn view_id(&self) -> String {
        format!("synthetic:{:?}:{}", self.profile, self.size).to_lowercase()
    }

    /// The data at `[offset, offset + len)` (counted as the agent's `generate` stage; the
    /// pools are made once, on the blocking pool, by the first read).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, SourceError> {
        let len = len.min(self.size.saturating_sub(offset) as usize);
        let profile = self.profile;
        tokio::task::spawn_blocking(move || crate::stages::GENERATE.time(|| bytes_at(profile, offset, len)))
            .await
            .map_err(|e| SourceError::Io {
                source_name: "synthetic".into(),
                what: "generate",
                err: std::io::Error::other(e.to_string()),
            })
    }

    pub fn allocated(&self) -> Vec<Extent> {
        vec![Extent { offset: 0, len: self.size }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockship_proto::codec::{Compression, Encoder};

    #[test]
    fn data_depends_on_the_position_only() {
        for profile in [Profile::Text, Profile::Random, Profile::Mixed] {
            let mut whole = vec![0u8; 3 << 20];
            generate(profile, 0, &mut whole);
            // Any piece, at any alignment, is the same bytes as in the whole.
            for (pos, len) in
                [(0usize, 100usize), (5, 4096), (4093, 9000), ((1 << 20) - 3, 10), (2 << 20, 1 << 20)]
            {
                let mut piece = vec![0u8; len];
                generate(profile, pos as u64, &mut piece);
                assert_eq!(piece, whole[pos..pos + len], "{profile:?} at {pos}+{len}");
            }
        }
    }

    #[test]
    fn pieces_are_the_generated_bytes_and_blocks_differ() {
        let mut whole = vec![0u8; 4 << 20];
        generate(Profile::Random, 0, &mut whole);
        assert_eq!(bytes_at(Profile::Random, 1 << 20, 1 << 20)[..], whole[1 << 20..2 << 20]);
        assert_eq!(bytes_at(Profile::Random, (1 << 20) - 8, 64)[..], whole[(1 << 20) - 8..(1 << 20) + 56]);
        assert_ne!(whole[..1 << 20], whole[1 << 20..2 << 20]);
    }

    #[test]
    fn profiles_have_their_shape() {
        let mut buf = vec![0u8; 4 << 20];
        let ratio = |profile, buf: &mut Vec<u8>| {
            generate(profile, 0, buf);
            let mut enc = Encoder::new(Compression::Zstd { level: 1 }).unwrap();
            let out = enc.encode(Bytes::copy_from_slice(buf)).unwrap();
            buf.len() as f64 / out.payload.len() as f64
        };
        assert!(ratio(Profile::Random, &mut buf) < 1.01);
        assert!(ratio(Profile::Text, &mut buf) > 2.0, "text compresses {}", ratio(Profile::Text, &mut buf));
        generate(Profile::Zero, 0, &mut buf);
        assert!(buf.iter().all(|&b| b == 0));
        generate(Profile::Mixed, 0, &mut buf);
        assert!(buf[..1 << 20].iter().all(|&b| b == 0));
        assert!(buf[1 << 20..2 << 20].is_ascii());
        assert!(!buf[2 << 20..].iter().all(|&b| b == 0));
    }

    #[test]
    fn specs_are_checked() {
        assert_eq!(SyntheticSource::parse("random:1GiB").unwrap().size(), 1 << 30);
        assert!(SyntheticSource::parse("random").is_err());
        assert!(SyntheticSource::parse("noise:1G").is_err());
        assert!(SyntheticSource::parse("zero:0").is_err());
    }
}
