//! Data streams: up to N one-way streams (QUIC streams or gRPC calls) that take items from one shared queue, so
//! a slow stream never holds up the others, paced by the bandwidth schedule (`pace`). The sink
//! decides how many streams a connection may have (fewer when many agents share it): the first
//! is opened at once, the others as the sink allows, and those still waiting when the queue
//! closes are given up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blockship_proto::Body;
use blockship_transport::{Connection, FrameWriter};
use tokio::task::JoinHandle;

use crate::link::transport;
use crate::pace::Pacer;
use crate::pipeline::Out;
use crate::AgentError;

pub struct Streams {
    tasks: Vec<JoinHandle<Result<(), AgentError>>>,
    done: tokio::sync::watch::Sender<bool>,
}

impl Streams {
    /// Start the streams; `queued` counts the payload bytes handed to QUIC.
    /// Stream `i` runs on connection `i % conns.len()` (the first is the session's own).
    pub async fn start(
        conns: &[Connection],
        n: usize,
        rx: async_channel::Receiver<Out>,
        pacer: Option<Arc<Pacer>>,
        queued: Arc<AtomicU64>,
    ) -> Result<Self, AgentError> {
        let (done, _) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::with_capacity(n);
        let conn_of = |i: usize| conns[i % conns.len()].clone();
        let mut first = Some(conn_of(0).open_uni().await.map_err(transport)?);
        for i in 0..n.max(1) {
            let (rx, pacer, conn, queued) = (rx.clone(), pacer.clone(), conn_of(i), queued.clone());
            let mut finished = done.subscribe();
            let first = first.take();
            tasks.push(tokio::spawn(async move {
                let send = match first {
                    Some(s) => s,
                    None => tokio::select! {
                        s = conn.open_uni() => s.map_err(transport)?,
                        // Everything was sent before the sink allowed this stream.
                        _ = finished.wait_for(|d| *d) => return Ok(()),
                    },
                };
                let mut w = FrameWriter::new(send);
                while let Ok(item) = rx.recv().await {
                    match item {
                        Out::Chunk(header, payload) => {
                            if let Some(p) = &pacer {
                                p.take(payload.len()).await;
                            }
                            queued.fetch_add(payload.len() as u64, Ordering::Relaxed);
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

    /// Wait until every stream has handed all its frames to QUIC (call once the queue is closed).
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
