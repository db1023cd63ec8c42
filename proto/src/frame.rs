//! Length-prefixed framing. A frame is a big-endian `u32` header length, the protobuf-encoded
//! [`pb::Frame`](crate::pb::Frame), and — for chunk headers only — `encoded_length` payload bytes
//! that travel after the header, so bulk data is never copied through protobuf. Header and
//! payload sizes have hard limits; anything malformed is an error, never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::pb;
use crate::Body;

/// Largest encoded frame header accepted (a `HashList` of 16 Ki hashes fits comfortably).
pub const MAX_HEADER_LEN: usize = 1024 * 1024;
/// Largest payload accepted after a chunk header: a maximal chunk that zstd failed to shrink.
pub const MAX_PAYLOAD_LEN: usize = crate::codec::max_encoded_len(crate::MAX_CHUNK_SIZE as usize);
/// Most hashes carried by one `HashList` frame.
pub const MAX_HASHES_PER_FRAME: usize = 16 * 1024;

const LEN_PREFIX: usize = 4;

/// A decoded frame: its message and the payload that followed it (empty unless a chunk).
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub body: Body,
    pub payload: Bytes,
}

/// Why bytes could not be decoded as a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame header of {0} bytes exceeds the {MAX_HEADER_LEN}-byte limit (corrupt stream or incompatible peer)")]
    HeaderTooLarge(usize),
    #[error("frame header has length 0")]
    EmptyHeader,
    #[error("malformed frame header: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("frame carries no message")]
    NoBody,
    #[error("chunk payload of {0} bytes exceeds the {MAX_PAYLOAD_LEN}-byte limit")]
    PayloadTooLarge(u64),
    #[error("stream ended inside a frame ({0} bytes of a partial frame left)")]
    Truncated(usize),
}

/// Number of payload bytes that follow a frame carrying `body`.
pub fn payload_len(body: &Body) -> Result<usize, FrameError> {
    match body {
        Body::Chunk(c) => {
            let len = u64::from(c.encoded_length);
            if len > MAX_PAYLOAD_LEN as u64 {
                return Err(FrameError::PayloadTooLarge(len));
            }
            Ok(len as usize)
        }
        _ => Ok(0),
    }
}

/// Append the length prefix and encoded header for `body` to `dst`. The caller sends the payload
/// (if `body` is a chunk header) right after it.
pub fn encode_header(body: &Body, dst: &mut BytesMut) {
    let frame = pb::Frame { body: Some(body.clone()) };
    let len = frame.encoded_len();
    dst.reserve(LEN_PREFIX + len);
    dst.put_u32(len as u32);
    // Encoding into a BytesMut with reserved capacity cannot fail.
    frame.encode(dst).expect("reserved capacity for the frame header");
}

/// Encode a whole frame (header and payload) into one buffer; handy for small frames and tests.
pub fn encode(body: &Body, payload: &[u8]) -> Bytes {
    let mut dst = BytesMut::new();
    encode_header(body, &mut dst);
    dst.extend_from_slice(payload);
    dst.freeze()
}

/// Decode a frame header (without its length prefix).
pub fn decode_header(header: &[u8]) -> Result<Body, FrameError> {
    if header.is_empty() {
        return Err(FrameError::EmptyHeader);
    }
    if header.len() > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLarge(header.len()));
    }
    pb::Frame::decode(header)?.body.ok_or(FrameError::NoBody)
}

/// Read a header length prefix, checking it against the limit.
pub fn header_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(FrameError::EmptyHeader);
    }
    if len > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLarge(len));
    }
    Ok(len)
}

/// Incremental decoder over a growing buffer: feed bytes in, take whole frames out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Header already decoded, waiting for this many payload bytes.
    pending: Option<(Body, usize)>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decode the next frame's header out of `buf` (once; it stays pending until its payload is
    /// taken): the message and the payload length it announces, or `None` if more bytes are
    /// needed. A reader can admit the payload (e.g. against a memory budget) before reading it.
    pub fn header(&mut self, buf: &mut BytesMut) -> Result<Option<(&Body, usize)>, FrameError> {
        if self.pending.is_none() {
            if buf.len() < LEN_PREFIX {
                return Ok(None);
            }
            let len = header_len([buf[0], buf[1], buf[2], buf[3]])?;
            if buf.len() < LEN_PREFIX + len {
                buf.reserve(LEN_PREFIX + len - buf.len());
                return Ok(None);
            }
            buf.advance(LEN_PREFIX);
            let header = buf.split_to(len);
            let body = decode_header(&header)?;
            let plen = payload_len(&body)?;
            self.pending = Some((body, plen));
        }
        Ok(self.pending.as_ref().map(|(b, n)| (b, *n)))
    }

    /// Take the next whole frame out of `buf`, or `None` if more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if self.header(buf)?.is_none() {
            return Ok(None);
        }
        let plen = self.pending.as_ref().map_or(0, |(_, n)| *n);
        if buf.len() < plen {
            // No reserve here: a reader that knows the payload length can read it into a buffer
            // of its own (`awaiting_payload` / `complete`) instead of growing this one.
            return Ok(None);
        }
        let (body, _) = self.pending.take().expect("pending header checked above");
        let payload = buf.split_to(plen).freeze();
        Ok(Some(Frame { body, payload }))
    }

    /// Length of the payload the decoded header announced, while it has not been taken.
    pub fn awaiting_payload(&self) -> Option<usize> {
        self.pending.as_ref().map(|(_, n)| *n)
    }

    /// Finish the pending frame with a payload the caller read itself.
    pub fn complete(&mut self, payload: Bytes) -> Result<Frame, FrameError> {
        match self.pending.take() {
            Some((body, n)) if n == payload.len() => Ok(Frame { body, payload }),
            Some((_, n)) => Err(FrameError::Truncated(n.saturating_sub(payload.len()))),
            None => Err(FrameError::Truncated(0)),
        }
    }

    /// Call at end of stream: an error if a frame was left incomplete.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), FrameError> {
        if self.pending.is_some() || !buf.is_empty() {
            return Err(FrameError::Truncated(buf.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::*;
    use proptest::prelude::*;

    fn chunk(encoded_length: u32) -> Body {
        Body::Chunk(ChunkHeader {
            disk: 3,
            seq: 9,
            offset: 1 << 40,
            length: encoded_length,
            blake3: Bytes::from_static(&[7; 32]),
            codec: Codec::None as i32,
            encoded_length,
        })
    }

    /// One instance of every message, with non-default field values.
    fn every_message() -> Vec<Body> {
        let digest = Bytes::from_static(&[1, 2, 3]);
        vec![
            Body::Hello(Hello { join: Bytes::from_static(&[9; 16]), ..crate::version::hello("agent 1") }),
            Body::HelloReply(HelloReply {
                version: 1,
                capabilities: vec!["zstd".into()],
                software: "sink".into(),
                identity: "esx01".into(),
                idle_timeout_ms: 30_000,
                session_token: Bytes::from_static(&[8; 16]),
            }),
            Body::OpenDisk(OpenDisk {
                disk: 1,
                disk_id: "vm-1/2000".into(),
                size: 10 << 30,
                target: "file:vm1/disk0".into(),
                mode: SyncMode::Compare as i32,
                chunk_size: 1 << 20,
                force_resume: true,
                cutover: true,
                failback_epoch: 41,
                bench: true,
            }),
            Body::DiskOpened(DiskOpened {
                disk: 1,
                created: true,
                target_size: 10 << 30,
                chunk_size: 1 << 20,
                committed_epoch: 4,
                change_point: "52 aa/17".into(),
                in_progress: Some(ResumePoint {
                    epoch: 5,
                    mode: SyncMode::Incremental as i32,
                    plan_digest: digest.clone(),
                    durable_offset: 77,
                    view: "rbd:p/i@blockship-src-5#12".into(),
                }),
                source_disk_id: "vm-1/2000".into(),
                zero_filled: true,
                cut_over: true,
            }),
            Body::EpochBegin(EpochBegin {
                disk: 1,
                epoch: 5,
                mode: SyncMode::Incremental as i32,
                plan_digest: digest,
                resume_offset: 4096,
                view: "rbd:p/i@blockship-src-5#12".into(),
                group: "vm42".into(),
                measure: true,
            }),
            Body::Progress(Progress { disk: 1, bytes_done: 5 << 30 }),
            Body::CloseDisk(CloseDisk { disk: 3 }),
            Body::GroupOpen(GroupOpen { group: "vm42".into(), disks: vec![1, 2] }),
            Body::GroupOpened(GroupOpened { group: "vm42".into(), committed_epoch: 7 }),
            Body::GroupCommit(GroupCommit { group: "vm42".into(), epoch: 8 }),
            Body::GroupCommitted(GroupCommitted { group: "vm42".into(), epoch: 8, cut_over: false }),
            Body::GroupCutover(GroupCutover { group: "vm42".into(), epoch: 9 }),
            Body::EpochStarted(EpochStarted { disk: 1, epoch: 5 }),
            chunk(100),
            Body::Zero(ZeroExtent { disk: 1, seq: 10, offset: 1 << 20, length: 1 << 21 }),
            Body::EpochCommit(EpochCommit { disk: 1, epoch: 5, items: 11, change_point: "cp".into() }),
            Body::Ack(Ack {
                disk: 1,
                epoch: 5,
                durable_items: 11,
                durable_offset: 3 << 20,
                durable_bytes: 123,
                committed: true,
                prepared: false,
                usage: Some(SinkUsage { wall_ns: 9, cpu_ns: 8, cores: 2, ..Default::default() }),
            }),
            Body::IndexRequest(IndexRequest { disk: 1 }),
            Body::VerifyRequest(VerifyRequest { disk: 1 }),
            Body::HashList(HashList {
                disk: 1,
                first_chunk: 8,
                hashes: Bytes::from(vec![5u8; 64]),
                last: true,
            }),
            Body::Error(Error {
                code: ErrorCode::Unauthorized as i32,
                message: "agent x may not write file:y".into(),
                disk: 1,
                group: "vm42".into(),
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for body in every_message() {
            let payload = vec![0xab; payload_len(&body).unwrap()];
            let bytes = encode(&body, &payload);
            let mut buf = BytesMut::from(&bytes[..]);
            let mut dec = FrameDecoder::new();
            let frame = dec.decode(&mut buf).unwrap().expect("whole frame");
            assert_eq!(frame.body, body);
            assert_eq!(&frame.payload[..], &payload[..]);
            assert!(buf.is_empty());
            dec.finish(&buf).unwrap();
        }
    }

    #[test]
    fn decodes_byte_by_byte() {
        let mut stream = BytesMut::new();
        let bodies = every_message();
        for b in &bodies {
            stream.extend_from_slice(&encode(b, &vec![1; payload_len(b).unwrap()]));
        }
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in stream {
            buf.extend_from_slice(&[byte]);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                out.push(f.body);
            }
        }
        assert_eq!(out, bodies);
    }

    #[test]
    fn truncated_stream_is_an_error_at_finish() {
        let bytes = encode(&chunk(10), &[0; 10]);
        for cut in 1..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            let mut dec = FrameDecoder::new();
            assert!(dec.decode(&mut buf).unwrap().is_none(), "cut at {cut}");
            assert!(matches!(dec.finish(&buf), Err(FrameError::Truncated(_))));
        }
    }

    #[test]
    fn oversized_header_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_HEADER_LEN + 1) as u32);
        let err = FrameDecoder::new().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::HeaderTooLarge(_)));
        let mut zero = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(FrameDecoder::new().decode(&mut zero), Err(FrameError::EmptyHeader)));
    }

    #[test]
    fn oversized_payload_is_refused() {
        let body = chunk(u32::MAX);
        let bytes = encode(&body, &[]);
        let mut buf = BytesMut::from(&bytes[..]);
        let err = FrameDecoder::new().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::PayloadTooLarge(_)), "{err}");
    }

    #[test]
    fn frame_without_body_is_refused() {
        let mut buf = BytesMut::new();
        encode_empty(&mut buf);
        assert!(matches!(FrameDecoder::new().decode(&mut buf), Err(FrameError::NoBody)));
    }

    fn encode_empty(buf: &mut BytesMut) {
        // A Frame with an unknown field only: valid protobuf, no body.
        let header = [0x98u8, 0x06, 0x01]; // field 99, varint 1
        buf.put_u32(header.len() as u32);
        buf.extend_from_slice(&header);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = BytesMut::from(&data[..]);
            let mut dec = FrameDecoder::new();
            // Either frames, a clean "need more", or an error: all fine, as long as nothing panics.
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
        }

        #[test]
        fn chunk_frames_round_trip(seq in any::<u64>(), offset in any::<u64>(),
                                   payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let body = Body::Chunk(ChunkHeader {
                disk: 0, seq, offset, length: payload.len() as u32,
                blake3: Bytes::copy_from_slice(blake3::hash(&payload).as_bytes()),
                codec: Codec::None as i32, encoded_length: payload.len() as u32,
            });
            let mut buf = BytesMut::from(&encode(&body, &payload)[..]);
            let frame = FrameDecoder::new().decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(frame.body, body);
            prop_assert_eq!(&frame.payload[..], &payload[..]);
        }
    }
}
