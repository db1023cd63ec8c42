//! Data streams: up to N unidirectional QUIC streams that take pipeline output from one shared
//! queue, so a slow stream never holds up the others, optionally paced by a token bucket
//! (`--bwlimit`). The sink decides how many streams a connection may have (fewer when many
//! agents share it): the first is opened at once, the others as the sink allows, and those
//! still waiting when the queue runs dry are given up.

use std::num::NonZeroU32;
use std::sync::Arc;

use blockship_proto::Body;
use blockship_transport::FrameWriter;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::task::JoinHandle;

use crate::pipeline::Out;
use crate::session::transport;
use crate::AgentError;

/// Bandwidth pacing in 1 KiB cells (governor counts cells in u32).
pub struct Limiter {
    inner: DefaultDirectRateLimiter,
}

impl Limiter {
    pub fn new(bytes_per_second: u64) -> Result<Self, AgentError> {
        let kib = (bytes_per_second / 1024).clamp(1, u64::from(u32::MAX)) as u32;
        let max_frame = (blockship_proto::frame::MAX_PAYLOAD_LEN / 1024 + 1) as u32;
        let burst = kib.max(max_frame);
        let quota = Quota::per_second(NonZeroU32::new(kib).expect("clamped to >= 1"))
            .allow_burst(NonZeroU32::new(burst).expect("burst >= 1"));
        Ok(Limiter { inner: RateLimiter::direct(quota) })
    }

    async fn take(&self, bytes: usize) {
        let cells = NonZeroU32::new((bytes.div_ceil(1024)).max(1) as u32).expect(">= 1");
        // Cannot fail: the burst admits the largest payload.
        let _ = self.inner.until_n_ready(cells).await;
    }
}

pub struct Streams {
    tasks: Vec<JoinHandle<Result<(), AgentError>>>,
    done: tokio::sync::watch::Sender<bool>,
}

impl Streams {
    pub async fn start(
        conn: &quinn::Connection,
        n: usize,
        rx: async_channel::Receiver<Out>,
        limiter: Option<Arc<Limiter>>,
    ) -> Result<Self, AgentError> {
        let (done, _) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::with_capacity(n);
        let mut first = Some(conn.open_uni().await.map_err(|e| transport(e.into()))?);
        for _ in 0..n.max(1) {
            let (rx, limiter, conn) = (rx.clone(), limiter.clone(), conn.clone());
            let mut finished = done.subscribe();
            let first = first.take();
            tasks.push(tokio::spawn(async move {
                let send = match first {
                    Some(s) => s,
                    None => tokio::select! {
                        s = conn.open_uni() => s.map_err(|e| transport(e.into()))?,
                        // Everything was sent before the sink allowed this stream.
                        _ = finished.wait_for(|d| *d) => return Ok(()),
                    },
                };
                let mut w = FrameWriter::new(send);
                while let Ok(item) = rx.recv().await {
                    match item {
                        Out::Chunk(header, payload) => {
                            if let Some(l) = &limiter {
                                l.take(payload.len()).await;
                            }
                            w.send_with_payload(&Body::Chunk(header), payload).await.map_err(transport)?;
                        }
                        Out::Zero(z) => w.send(&Body::Zero(z)).await.map_err(transport)?,
                    }
                }
                w.close();
                Ok(())
            }));
        }
        Ok(Streams { tasks, done })
    }

    /// Wait until every stream has handed all its frames to QUIC (call once the queue's sender
    /// is dropped).
    pub async fn finish(self) -> Result<(), AgentError> {
        let Streams { tasks, done } = self;
        let mut tasks = tasks.into_iter();
        // The first stream ends when the queue is empty and closed; then no stream still
        // waiting for the sink's permission will ever get an item.
        if let Some(first) = tasks.next() {
            first.await.map_err(|e| AgentError::Internal(format!("data stream task: {e}")))??;
        }
        let _ = done.send(true);
        for t in tasks {
            t.await.map_err(|e| AgentError::Internal(format!("data stream task: {e}")))??;
        }
        Ok(())
    }
}
