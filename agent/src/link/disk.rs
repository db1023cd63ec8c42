//! A disk open on a link: the replies the link's reader routes to it (a refusal becomes an
//! error), and the requests of one disk's epoch — begin, acknowledgements, the target's hash
//! index — over the link's shared control stream. Dropping the handle unroutes it; closing it
//! tells the sink to end an open epoch uncommitted and release the target.

use blockship_proto::pb;
use blockship_proto::{Body, HASH_LEN};
use blockship_transport::framed::unexpected;
use tokio::sync::mpsc;

use super::{refused, transport, Link, Route};
use crate::AgentError;

/// A disk open on a link: its replies arrive here.
pub struct DiskHandle {
    pub(super) link: Link,
    pub handle: u32,
    pub(super) rx: tokio::sync::Mutex<mpsc::Receiver<Body>>,
}

impl Drop for DiskHandle {
    fn drop(&mut self) {
        self.link.unroute(&Route::Disk(self.handle));
    }
}

impl DiskHandle {
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// The disk's next reply (a refusal as an error; `what` is expected, for messages).
    pub async fn next(&self, _what: &'static str) -> Result<Body, AgentError> {
        let _w = self.link.waiting();
        match self.rx.lock().await.recv().await {
            Some(Body::Error(e)) => Err(refused(&e)),
            Some(b) => Ok(b),
            None => Err(self.link.failure()),
        }
    }

    pub async fn send(&self, body: &Body) -> Result<(), AgentError> {
        self.link.send(body).await
    }

    pub async fn begin_epoch(&self, req: pb::EpochBegin) -> Result<(), AgentError> {
        self.send(&Body::EpochBegin(req)).await?;
        match self.next("EpochStarted").await? {
            Body::EpochStarted(_) => Ok(()),
            other => Err(transport(unexpected("EpochStarted", &other))),
        }
    }

    /// The next acknowledgement of this disk's epoch.
    pub async fn ack(&self) -> Result<pb::Ack, AgentError> {
        match self.next("Ack").await? {
            Body::Ack(a) => Ok(a),
            other => Err(transport(unexpected("Ack", &other))),
        }
    }

    /// The target's hash index, one entry per chunk.
    pub async fn fetch_index(&self, chunks: u64) -> Result<Vec<[u8; HASH_LEN]>, AgentError> {
        self.send(&Body::IndexRequest(pb::IndexRequest { disk: self.handle })).await?;
        let mut index = Vec::with_capacity(chunks.min(1 << 24) as usize);
        loop {
            let list = self.hash_list().await?;
            if list.first_chunk != index.len() as u64 || list.hashes.len() % HASH_LEN != 0 {
                return Err(AgentError::Protocol(format!(
                    "index frame for chunk {} with {} bytes, expected chunk {}",
                    list.first_chunk,
                    list.hashes.len(),
                    index.len()
                )));
            }
            index.extend(
                list.hashes
                    .chunks_exact(HASH_LEN)
                    .map(|h| <[u8; HASH_LEN]>::try_from(h).expect("exact chunk")),
            );
            if list.last {
                break;
            }
        }
        if index.len() as u64 != chunks {
            return Err(AgentError::Protocol(format!(
                "index has {} entries, expected {chunks}",
                index.len()
            )));
        }
        Ok(index)
    }

    pub async fn hash_list(&self) -> Result<pb::HashList, AgentError> {
        match self.next("HashList").await? {
            Body::HashList(l) => Ok(l),
            other => Err(transport(unexpected("HashList", &other))),
        }
    }

    /// Close the handle on the sink (an open epoch ends uncommitted; the target is released).
    pub async fn close(self) {
        let _ = self.send(&Body::CloseDisk(pb::CloseDisk { disk: self.handle })).await;
    }
}
