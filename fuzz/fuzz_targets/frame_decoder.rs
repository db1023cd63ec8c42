//! Arbitrary bytes through the frame decoder: frames or errors, never a panic, never unbounded
//! buffering.
#![no_main]

use blockship_proto::FrameDecoder;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Feed in two pieces to exercise partial frames.
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    for part in [&data[..split], &data[split..]] {
        buf.extend_from_slice(part);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = dec.finish(&buf);
});
