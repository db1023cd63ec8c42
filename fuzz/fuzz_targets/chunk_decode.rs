//! A decoded frame's chunk header and payload through the chunk decoder: only data whose BLAKE3
//! matches may come out.
#![no_main]

use blockship_proto::codec::Decoder;
use blockship_proto::{Body, FrameDecoder};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let Ok(Some(frame)) = FrameDecoder::new().decode(&mut buf) else { return };
    let Body::Chunk(header) = frame.body else { return };
    let mut dec = Decoder::new().expect("zstd context");
    if let Ok(raw) = dec.decode(&header, frame.payload) {
        assert_eq!(blake3::hash(&raw).as_bytes()[..], header.blake3[..]);
        assert_eq!(raw.len(), header.length as usize);
    }
});
