//! Page-aligned buffers for chunk data. A sink writes file targets with O_DIRECT, which needs
//! page-aligned memory; received payloads and decompressed chunks are placed in such buffers
//! from the start, so the data is copied once (out of the transport) and not again to align it.

use bytes::{Bytes, BytesMut};

/// Alignment of chunk buffers: 4 KiB, the largest logical block size Linux filesystems use.
pub const ALIGN: usize = 4096;

/// An empty buffer with room for `len` bytes whose first byte will be `ALIGN`-aligned.
pub fn aligned(len: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(len + ALIGN);
    let skip = b.as_ptr().align_offset(ALIGN);
    b.resize(skip, 0);
    let _ = b.split_to(skip);
    b
}

/// A vector whose length is the padding before its first aligned byte, for APIs that append to a
/// `Vec` (zstd's `decompress_to_buffer`); `finish` drops the padding.
pub fn aligned_vec(len: usize) -> (Vec<u8>, usize) {
    let mut v: Vec<u8> = Vec::with_capacity(len + ALIGN);
    let skip = v.as_ptr().align_offset(ALIGN);
    v.resize(skip, 0);
    (v, skip)
}

/// The bytes after the padding of a vector from `aligned_vec`.
pub fn finish(v: Vec<u8>, skip: usize) -> Bytes {
    Bytes::from(v).slice(skip..)
}

/// Whether `data` starts at an `ALIGN` boundary.
pub fn is_aligned(data: &[u8]) -> bool {
    data.as_ptr().align_offset(ALIGN) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn buffers_start_aligned_and_hold_their_length() {
        for len in [1, 4096, 1 << 20, (1 << 20) + 7] {
            let mut b = aligned(len);
            assert!(b.capacity() >= len);
            b.put_bytes(7, len);
            assert!(is_aligned(&b), "{len}");
            let frozen = b.freeze();
            assert!(is_aligned(&frozen) && frozen.len() == len);

            let (mut v, skip) = aligned_vec(len);
            assert!(v.capacity() - v.len() >= len);
            v.extend(std::iter::repeat_n(9u8, len));
            let data = finish(v, skip);
            assert!(is_aligned(&data) && data.len() == len && data.iter().all(|&x| x == 9));
        }
    }
}
