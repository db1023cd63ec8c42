//! Frames over byte streams: a reader that turns any `AsyncRead` into frames (with the proto
//! crate's limits) and a writer for QUIC send streams that hands chunk payloads to quinn as
//! `Bytes`, so bulk data is not copied on the way out.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use blockship_proto::{frame, Body, Frame, FrameDecoder};

use crate::{body_name, TransportError};

/// Reads frames from a stream.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner, buf: BytesMut::with_capacity(64 * 1024), decoder: FrameDecoder::new() }
    }

    /// The next frame, or `None` at a clean end of stream (between frames).
    pub async fn next(&mut self) -> Result<Option<Frame>, TransportError> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(frame));
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

/// Writes frames to a QUIC send stream.
pub struct FrameWriter {
    stream: quinn::SendStream,
    header: BytesMut,
}

impl FrameWriter {
    pub fn new(stream: quinn::SendStream) -> Self {
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
        if payload.is_empty() {
            self.stream.write_chunk(header).await?;
        } else {
            self.stream.write_all_chunks(&mut [header, payload]).await?;
        }
        Ok(())
    }

    /// Finish the stream and wait until the peer has received everything.
    pub async fn finish(mut self) -> Result<(), TransportError> {
        self.stream.finish()?;
        // Peer may close the connection right after reading; that is a successful delivery too.
        let _ = self.stream.stopped().await;
        Ok(())
    }

    /// Finish the stream without waiting.
    pub fn close(&mut self) {
        let _ = self.stream.finish();
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
    async fn remote_errors_surface_as_errors() {
        let body = Body::Error(pb::Error {
            code: pb::ErrorCode::Unauthorized as i32,
            message: "no".into(),
            disk: 0,
        });
        let bytes = frame::encode(&body, &[]);
        let mut r = FrameReader::new(&bytes[..]);
        let err = r.next_body("reply").await.unwrap_err();
        assert!(matches!(err, TransportError::Remote { code: pb::ErrorCode::Unauthorized, .. }), "{err}");
        let mut r = FrameReader::new(&[][..]);
        assert!(matches!(r.next_body("reply").await, Err(TransportError::Eof("reply"))));
    }
}
