//! The chunk codec: BLAKE3 of the raw data, optional zstd compression, and the receiving side's
//! decode-and-verify that must succeed before a single byte reaches a target.

use bytes::Bytes;

use crate::pb::{ChunkHeader, Codec};
use crate::{HASH_LEN, MAX_CHUNK_SIZE};

/// How the sender compresses chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Send raw bytes.
    None,
    /// Always send zstd frames, even when they are larger.
    Zstd { level: i32 },
    /// zstd, but send raw bytes when zstd does not save at least 1/8.
    Auto { level: i32 },
}

/// Worst-case size of an encoded chunk of `raw_len` bytes (zstd's compress bound).
pub const fn max_encoded_len(raw_len: usize) -> usize {
    let small = if raw_len < (128 << 10) { ((128 << 10) - raw_len) >> 11 } else { 0 };
    raw_len + (raw_len >> 8) + small
}

/// Why a chunk was refused.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("chunk at offset {offset}: BLAKE3 mismatch (expected {expected}, data hashes to {actual}); nothing was written")]
    Checksum { offset: u64, expected: String, actual: String },
    #[error("chunk at offset {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
}

/// A chunk ready to be framed.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub hash: [u8; HASH_LEN],
    pub codec: Codec,
    pub payload: Bytes,
}

impl Encoded {
    /// The header announcing this chunk: `length` raw bytes at `offset`, item `seq` of `disk`.
    pub fn header(&self, disk: u32, seq: u64, offset: u64, length: u32) -> ChunkHeader {
        ChunkHeader {
            disk,
            seq,
            offset,
            length,
            blake3: Bytes::copy_from_slice(&self.hash),
            codec: self.codec as i32,
            encoded_length: self.payload.len() as u32,
        }
    }
}

/// Compresses and hashes chunks; keep one per worker thread (it owns a zstd context).
pub struct Encoder {
    mode: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl Encoder {
    pub fn new(mode: Compression) -> Result<Self, CodecError> {
        let zstd = match mode {
            Compression::None => None,
            Compression::Zstd { level } | Compression::Auto { level } => {
                Some(zstd::bulk::Compressor::new(level)?)
            }
        };
        Ok(Self { mode, zstd, scratch: Vec::new() })
    }

    /// Hash `raw` and encode it according to the mode. Raw chunks are passed through without a copy.
    pub fn encode(&mut self, raw: Bytes) -> Result<Encoded, CodecError> {
        let hash = *blake3::hash(&raw).as_bytes();
        self.encode_hashed(raw, hash)
    }

    /// Encode `raw` whose BLAKE3 the caller already computed (compare mode hashes first).
    pub fn encode_hashed(&mut self, raw: Bytes, hash: [u8; HASH_LEN]) -> Result<Encoded, CodecError> {
        debug_assert_eq!(blake3::hash(&raw).as_bytes(), &hash);
        let (Some(zstd), Compression::Zstd { .. } | Compression::Auto { .. }) = (&mut self.zstd, self.mode)
        else {
            return Ok(Encoded { hash, codec: Codec::None, payload: raw });
        };
        let limit = match self.mode {
            // Require a saving of 1/8: below that, decompression costs more than the bytes saved.
            Compression::Auto { .. } => raw.len() - raw.len() / 8,
            _ => max_encoded_len(raw.len()),
        };
        self.scratch.clear();
        self.scratch.reserve(limit);
        match zstd.compress_to_buffer(&raw, &mut self.scratch) {
            Ok(n) if n <= limit => {
                Ok(Encoded { hash, codec: Codec::Zstd, payload: Bytes::copy_from_slice(&self.scratch[..n]) })
            }
            // "Destination buffer is too small": the data does not compress well enough.
            Ok(_) | Err(_) if matches!(self.mode, Compression::Auto { .. }) => {
                Ok(Encoded { hash, codec: Codec::None, payload: raw })
            }
            Ok(_) => unreachable!("zstd wrote more than its compress bound"),
            Err(e) => Err(e.into()),
        }
    }
}

/// Decodes and verifies received chunks; keep one per worker thread.
pub struct Decoder {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl Decoder {
    pub fn new() -> Result<Self, CodecError> {
        Ok(Self { zstd: zstd::bulk::Decompressor::new()? })
    }

    /// Decode `payload` as described by `header` and check its BLAKE3. Only data returned from
    /// here may be written to a target.
    pub fn decode(&mut self, header: &ChunkHeader, payload: Bytes) -> Result<Bytes, CodecError> {
        let offset = header.offset;
        let bad = |reason: String| CodecError::Malformed { offset, reason };
        if header.blake3.len() != HASH_LEN {
            return Err(bad(format!("BLAKE3 field has {} bytes, expected {HASH_LEN}", header.blake3.len())));
        }
        if header.length == 0 || header.length > MAX_CHUNK_SIZE {
            return Err(bad(format!("length {} outside 1..={MAX_CHUNK_SIZE}", header.length)));
        }
        if payload.len() != header.encoded_length as usize {
            return Err(bad(format!(
                "payload has {} bytes but the header announced {}",
                payload.len(),
                header.encoded_length
            )));
        }
        let raw = match Codec::try_from(header.codec) {
            Ok(Codec::None) => {
                if payload.len() != header.length as usize {
                    return Err(bad(format!(
                        "uncompressed payload of {} bytes for a {}-byte chunk",
                        payload.len(),
                        header.length
                    )));
                }
                payload
            }
            Ok(Codec::Zstd) => {
                // Straight into an aligned buffer: the sink can write it with O_DIRECT as is.
                // (A Cursor, because zstd writes a plain Vec from its start, padding included.)
                let (out, skip) = crate::buffer::aligned_vec(header.length as usize);
                let mut out = std::io::Cursor::new(out);
                out.set_position(skip as u64);
                let n = self
                    .zstd
                    .decompress_to_buffer(&payload, &mut out)
                    .map_err(|e| bad(format!("zstd data does not decode to {} bytes: {e}", header.length)))?;
                let out = out.into_inner();
                if n != header.length as usize {
                    return Err(bad(format!(
                        "zstd data decodes to {n} bytes, header says {}",
                        header.length
                    )));
                }
                crate::buffer::finish(out, skip)
            }
            Err(_) => return Err(bad(format!("unknown codec {}", header.codec))),
        };
        let actual = blake3::hash(&raw);
        if actual.as_bytes()[..] != header.blake3[..] {
            return Err(CodecError::Checksum {
                offset,
                expected: hex::encode(&header.blake3),
                actual: actual.to_hex().to_string(),
            });
        }
        Ok(raw)
    }
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    buf.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// The digest of a chunk in hash indexes and verification: [`ZERO_HASH`](crate::ZERO_HASH) for
/// all-zero data (cheap to recognise, and holes need not be read), else its BLAKE3.
pub fn chunk_digest(data: &[u8]) -> [u8; HASH_LEN] {
    if is_zero(data) {
        crate::ZERO_HASH
    } else {
        *blake3::hash(data).as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header_for(offset: u64, raw_len: usize, enc: &Encoded) -> ChunkHeader {
        enc.header(0, 0, offset, raw_len as u32)
    }

    fn text(len: usize) -> Bytes {
        let words = b"block replication over quic with blake3 and zstd ";
        Bytes::from(words.iter().cycle().take(len).copied().collect::<Vec<u8>>())
    }

    fn random(len: usize, seed: u64) -> Bytes {
        let mut out = vec![0u8; len];
        let mut x = seed | 1;
        for b in out.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        Bytes::from(out)
    }

    #[test]
    fn auto_compresses_text_and_passes_random_through() {
        let mut enc = Encoder::new(Compression::Auto { level: 1 }).unwrap();
        let t = enc.encode(text(1 << 20)).unwrap();
        assert_eq!(t.codec, Codec::Zstd);
        assert!(t.payload.len() < 1 << 16);
        let r = enc.encode(random(1 << 20, 7)).unwrap();
        assert_eq!(r.codec, Codec::None);
        assert_eq!(r.payload.len(), 1 << 20);
    }

    #[test]
    fn forced_zstd_always_compresses() {
        let mut enc = Encoder::new(Compression::Zstd { level: 3 }).unwrap();
        let raw = random(100_000, 3);
        let e = enc.encode(raw.clone()).unwrap();
        assert_eq!(e.codec, Codec::Zstd);
        assert!(e.payload.len() <= max_encoded_len(raw.len()));
        let out = Decoder::new().unwrap().decode(&header_for(0, raw.len(), &e), e.payload.clone()).unwrap();
        assert_eq!(out, raw);
        assert!(crate::buffer::is_aligned(&out), "decompressed chunks land in aligned buffers");
    }

    #[test]
    fn corrupted_payload_is_refused() {
        let mut enc = Encoder::new(Compression::None).unwrap();
        let raw = text(8192);
        let e = enc.encode(raw).unwrap();
        let h = header_for(4096, 8192, &e);
        let mut bad = e.payload.to_vec();
        bad[100] ^= 1;
        let err = Decoder::new().unwrap().decode(&h, Bytes::from(bad)).unwrap_err();
        assert!(matches!(err, CodecError::Checksum { offset: 4096, .. }), "{err}");
        assert!(err.to_string().contains("nothing was written"));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let mut enc = Encoder::new(Compression::Auto { level: 1 }).unwrap();
        let raw = text(8192);
        let e = enc.encode(raw).unwrap();
        let good = header_for(0, 8192, &e);
        let mut dec = Decoder::new().unwrap();
        let cases: [fn(&mut ChunkHeader); 7] = [
            |h| h.blake3 = Bytes::from_static(&[0; 5]),
            |h| h.length = 0,
            |h| h.length = MAX_CHUNK_SIZE + 1,
            |h| h.length = 8191,
            |h| h.codec = 9,
            |h| h.encoded_length += 1,
            |h| h.codec = Codec::None as i32,
        ];
        for (i, mutate) in cases.iter().enumerate() {
            let mut h = good.clone();
            mutate(&mut h);
            assert!(dec.decode(&h, e.payload.clone()).is_err(), "case {i} accepted");
        }
        assert!(dec.decode(&good, e.payload.clone()).is_ok());
    }

    #[test]
    fn chunk_digest_marks_zero_chunks() {
        assert_eq!(chunk_digest(&[0; 4096]), crate::ZERO_HASH);
        assert_eq!(chunk_digest(b"abc"), *blake3::hash(b"abc").as_bytes());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0; 10_000]));
        let mut v = vec![0; 10_000];
        v[9_999] = 1;
        assert!(!is_zero(&v));
    }

    proptest! {
        #[test]
        fn codec_round_trips(data in proptest::collection::vec(any::<u8>(), 1..65536),
                             repeat in 1usize..8, mode in 0u8..3, offset in any::<u64>()) {
            // Repeating the data makes some inputs compressible, so both codecs get exercised.
            let raw = Bytes::from(data.repeat(repeat));
            let mode = match mode { 0 => Compression::None, 1 => Compression::Zstd { level: 1 }, _ => Compression::Auto { level: 1 } };
            let e = Encoder::new(mode).unwrap().encode(raw.clone()).unwrap();
            let out = Decoder::new().unwrap().decode(&header_for(offset, raw.len(), &e), e.payload).unwrap();
            prop_assert_eq!(out, raw);
        }

        #[test]
        fn decoding_garbage_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..4096),
                                         length in any::<u32>(), codec in 0i32..3) {
            let h = ChunkHeader { disk: 0, seq: 0, offset: 0, length: length % (1 << 20),
                blake3: Bytes::from_static(&[1; 32]), codec, encoded_length: payload.len() as u32 };
            prop_assert!(Decoder::new().unwrap().decode(&h, Bytes::from(payload)).is_err());
        }
    }
}
