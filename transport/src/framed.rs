//! Frames over byte streams: a reader that turns any `AsyncRead` into frames (with the proto
//! crate's limits) and a writer for any transport's send stream that hands chunk payloads on as
//! `Bytes`, so bulk data is not copied on the way out.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use blockship_proto::{frame, Body, Frame, FrameDecoder};

use crate::conn::SendStream;
use crate::{body_name, TransportError};

/// Payloads at least this big are read into a buffer of their own (chunks are 64 KiB or more).
const OWN_BUFFER_FROM: usize = 16 * 1024;

/// Reads frames from a stream.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
    /// A large payload being read into its own buffer.
    payload: Option<BytesMut>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
            decoder: FrameDecoder::new(),
            payload: None,
        }
    }

    /// The next frame, or `None` at a clean end of stream (between frames). Cancel-safe: bytes
    /// of a frame read before the future was dropped stay in the reader.
    pub async fn next(&mut self) -> Result<Option<Frame>, TransportError> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if let Some(len) = self.decoder.awaiting_payload().filter(|&n| n >= OWN_BUFFER_FROM) {
                return self.read_payload(len).await.map(Some);
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                self.decoder.finish(&self.buf)?;
                return Ok(None);
            }
        }
    }

    /// Read until the next frame's header is decoded and return it with the length of the
    /// payload that follows (`None` at a clean end of stream), without reading that payload:
    /// the caller may admit it first (a memory budget), then take the frame with `next`.
    /// Cancel-safe like `next`.
    pub async fn next_header(&mut self) -> Result<Option<(&Body, usize)>, TransportError> {
        loop {
            if self.decoder.header(&mut self.buf)?.is_some() {
                return Ok(self.decoder.header(&mut self.buf)?);
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                self.decoder.finish(&self.buf)?;
                return Ok(None);
            }
        }
    }

    /// Read a large payload into an aligned buffer of exactly its size: one copy out of the
    /// transport, no regrowth of the frame buffer, and ready for O_DIRECT writes.
    /// The partial payload lives in `self`, so `next` stays cancel-safe.
    async fn read_payload(&mut self, len: usize) -> Result<Frame, TransportError> {
        let payload = match &mut self.payload {
            Some(p) => p,
            None => {
                let mut p = blockship_proto::buffer::aligned(len);
                p.extend_from_slice(&self.buf.split());
                self.payload.insert(p)
            }
        };
        while payload.len() < len {
            let want = len - payload.len();
            if self.inner.read_buf(&mut payload.limit(want)).await? == 0 {
                return Err(blockship_proto::FrameError::Truncated(payload.len()).into());
            }
        }
        let payload = self.payload.take().map(BytesMut::freeze).unwrap_or_default();
        Ok(self.decoder.complete(payload)?)
    }

    /// The next frame's body; a received `Error` becomes `TransportError::Remote`, end of stream
    /// becomes `TransportError::Eof`.
    pub async fn next_body(&mut self, waiting_for: &'static str) -> Result<Body, TransportError> {
        match self.next().await? {
            Some(Frame { body: Body::Error(e), .. }) => Err(TransportError::remote(&e)),
            Some(frame) => Ok(frame.body),
            None => Err(TransportError::Eof(waiting_for)),
        }
    }
}

/// Writes frames to a send stream.
pub struct FrameWriter {
    stream: Box<dyn SendStream>,
    header: BytesMut,
}

impl FrameWriter {
    pub fn new(stream: Box<dyn SendStream>) -> Self {
        FrameWriter { stream, header: BytesMut::with_capacity(256) }
    }

    /// Send a frame without payload.
    pub async fn send(&mut self, body: &Body) -> Result<(), TransportError> {
        self.send_with_payload(body, Bytes::new()).await
    }

    /// Send a frame followed by its payload (a chunk's encoded bytes).
    pub async fn send_with_payload(&mut self, body: &Body, payload: Bytes) -> Result<(), TransportError> {
        debug_assert_eq!(
            frame::payload_len(body).unwrap_or(usize::MAX),
            payload.len(),
            "{}",
            body_name(body)
        );
        frame::encode_header(body, &mut self.header);
        let header = self.header.split().freeze();
        self.stream.write(header, payload).await
    }

    /// Finish the stream and wait until the peer has received everything.
    pub async fn finish(mut self) -> Result<(), TransportError> {
        self.stream.finish();
        self.stream.stopped().await;
        Ok(())
    }

    /// Finish the stream without waiting.
    pub fn close(&mut self) {
        self.stream.finish();
    }
}

/// `Unexpected` error for a body that does not fit the protocol state.
pub fn unexpected(expected: &'static str, got: &Body) -> TransportError {
    TransportError::Unexpected { expected, got: body_name(got).to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockship_proto::pb;

    #[tokio::test]
    async fn reader_yields_frames_and_detects_truncation() {
        let body = Body::Zero(pb::ZeroExtent { disk: 1, seq: 2, offset: 3, length: 4 });
        let bytes = frame::encode(&body, &[]);
        let mut whole = Vec::new();
        whole.extend_from_slice(&bytes);
        whole.extend_from_slice(&bytes);
        let mut r = FrameReader::new(&whole[..]);
        assert_eq!(r.next().await.unwrap().unwrap().body, body);
        assert_eq!(r.next_body("second").await.unwrap(), body);
        assert!(r.next().await.unwrap().is_none());

        let cut = &bytes[..bytes.len() - 1];
        let mut r = FrameReader::new(cut);
        assert!(matches!(r.next().await, Err(TransportError::Frame(_))));
    }

    #[tokio::test]
    async fn large_payloads_arrive_whole_and_aligned() {
        let data: Vec<u8> = (0..(1 << 20) + 4096).map(|i| (i % 253) as u8).collect();
        let body = |offset| {
            Body::Chunk(pb::ChunkHeader {
                disk: 1,
                seq: offset,
                offset,
                length: data.len() as u32,
                blake3: Bytes::from(vec![0u8; 32]),
                codec: pb::Codec::None as i32,
                encoded_length: data.len() as u32,
            })
        };
        let mut wire = Vec::new();
        for off in [0, 1 << 20] {
            wire.extend_from_slice(&frame::encode(&body(off), &data));
        }
        // Delivered in odd-sized pieces, as a network would.
        let (mut tx, rx) = tokio::io::duplex(7919);
        let feed = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&wire).await.unwrap();
        });
        let mut r = FrameReader::new(rx);
        for off in [0, 1 << 20] {
            let f = r.next().await.unwrap().unwrap();
            assert_eq!(f.body, body(off));
            assert_eq!(&f.payload[..], &data[..]);
            assert!(blockship_proto::buffer::is_aligned(&f.payload));
        }
        feed.await.unwrap();
        assert!(r.next().await.unwrap().is_none());

        // Dropping `next` mid-payload (as `select!` does) loses nothing.
        let (mut tx, rx) = tokio::io::duplex(4096);
        let wire2 = [frame::encode(&body(0), &data), frame::encode(&body(1 << 20), &data)].concat();
        let feed = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in wire2.chunks(100_003) {
                tx.write_all(piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        });
        let mut r = FrameReader::new(rx);
        let (mut got, mut cancelled) = (Vec::new(), 0);
        while got.len() < 2 {
            match tokio::time::timeout(std::time::Duration::from_millis(1), r.next()).await {
                Ok(f) => got.push(f.unwrap().unwrap()),
                Err(_) => cancelled += 1,
            }
        }
        feed.await.unwrap();
        assert!(cancelled > 0, "the test never cancelled a read");
        for (f, off) in got.iter().zip([0, 1 << 20]) {
            assert_eq!((&f.body, &f.payload[..]), (&body(off), &data[..]));
        }

        // A stream cut inside a large payload is an error, not a short frame.
        let mut cut = frame::encode(&body(0), &data).to_vec();
        cut.truncate(cut.len() - 10);
        let mut r = FrameReader::new(&cut[..]);
        assert!(matches!(r.next().await, Err(TransportError::Frame(_))));
    }

    #[tokio::test]
    async fn headers_come_before_their_payloads() {
        let data = vec![7u8; 100_000];
        let chunk = Body::Chunk(pb::ChunkHeader {
            disk: 1,
            seq: 0,
            offset: 0,
            length: data.len() as u32,
            blake3: Bytes::from(vec![0u8; 32]),
            codec: pb::Codec::None as i32,
            encoded_length: data.len() as u32,
        });
        let zero = Body::Zero(pb::ZeroExtent { disk: 1, seq: 1, offset: 0, length: 4 });
        // Only the header of the chunk has arrived so far: the header is available anyway.
        let head = frame::encode(&chunk, &data);
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        use tokio::io::AsyncWriteExt;
        tx.write_all(&head[..head.len() - data.len() + 10]).await.unwrap();
        let mut r = FrameReader::new(rx);
        let (b, n) = r.next_header().await.unwrap().unwrap();
        assert_eq!((b, n), (&chunk, data.len()));
        // Asking again gives the same pending header; then the payload completes the frame.
        assert_eq!(r.next_header().await.unwrap().unwrap().1, data.len());
        tx.write_all(&head[head.len() - data.len() + 10..]).await.unwrap();
        tx.write_all(&frame::encode(&zero, &[])).await.unwrap();
        drop(tx);
        let f = r.next().await.unwrap().unwrap();
        assert_eq!((f.body, f.payload.len()), (chunk, data.len()));
        assert_eq!(r.next_header().await.unwrap().unwrap(), (&zero, 0));
        assert_eq!(r.next().await.unwrap().unwrap().body, zero);
        assert!(r.next_header().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn remote_errors_surface_as_errors() {
        let body = Body::Error(pb::Error {
            code: pb::ErrorCode::Unauthorized as i32,
            message: "no".into(),
            disk: 0,
            group: String::new(),
        });
        let bytes = frame::encode(&body, &[]);
        let mut r = FrameReader::new(&bytes[..]);
        let err = r.next_body("reply").await.unwrap_err();
        assert!(matches!(err, TransportError::Remote { code: pb::ErrorCode::Unauthorized, .. }), "{err}");
        let mut r = FrameReader::new(&[][..]);
        assert!(matches!(r.next_body("reply").await, Err(TransportError::Eof("reply"))));
    }
}
