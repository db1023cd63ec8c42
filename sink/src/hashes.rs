//! The hash lists a sink sends: the target's chunk hash index (compare mode: stale entries are
//! recomputed from the target first) and, for `verify`, hashes of the target's data itself,
//! streamed in small frames so the agent compares as they arrive.

use std::sync::Arc;

use blockship_proto::codec::chunk_digest;
use blockship_proto::frame::MAX_HASHES_PER_FRAME;
use blockship_proto::pb;
use blockship_proto::{Body, HASH_LEN};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::disk::{self, Disk};
use crate::refusal::{join, Refusal};

/// Hashes per `HashList` frame while verifying (small, so the agent compares as it goes).
const VERIFY_HASHES_PER_FRAME: usize = 256;

pub async fn send_index(disk: &Arc<Disk>, out: &mpsc::Sender<Body>) -> Result<(), Refusal> {
    disk.refresh_index().await?;
    let index = disk.index()?;
    let chunks = index.chunks();
    let mut first = 0;
    loop {
        let count = (chunks - first).min(MAX_HASHES_PER_FRAME as u64) as usize;
        let hashes = index.get(first, count).map_err(disk::index_err)?;
        let last = first + count as u64 >= chunks;
        send(
            out,
            Body::HashList(pb::HashList {
                disk: disk.handle,
                first_chunk: first,
                hashes: hashes.into(),
                last,
            }),
        )
        .await;
        if last {
            return Ok(());
        }
        first += count as u64;
    }
}

pub async fn send_verify_hashes(disk: &Arc<Disk>, out: &mpsc::Sender<Body>) -> Result<(), Refusal> {
    let cs = u64::from(disk.chunk_size);
    let size = disk.size.min(disk.target.size());
    let chunks = blockship_proto::chunk_count(size, disk.chunk_size);
    let mut digests = futures::stream::iter(0..chunks)
        .map(|chunk| {
            let disk = disk.clone();
            async move {
                let offset = chunk * cs;
                let data = disk.target.read(offset, cs.min(size - offset) as usize).await?;
                let data = crate::failpoint::corrupt_verify_read(chunk, data);
                tokio::task::spawn_blocking(move || chunk_digest(&data)).await.map_err(|e| join("hash", e))
            }
        })
        .buffered(4);
    let mut first = 0u64;
    let mut buf = Vec::with_capacity(VERIFY_HASHES_PER_FRAME * HASH_LEN);
    let mut n = 0u64;
    while let Some(d) = digests.next().await {
        buf.extend_from_slice(&d?);
        n += 1;
        if buf.len() == VERIFY_HASHES_PER_FRAME * HASH_LEN || n == chunks {
            let hashes = Bytes::from(std::mem::take(&mut buf));
            let count = (hashes.len() / HASH_LEN) as u64;
            let last = n == chunks;
            send(out, Body::HashList(pb::HashList { disk: disk.handle, first_chunk: first, hashes, last }))
                .await;
            first += count;
        }
    }
    if chunks == 0 {
        send(
            out,
            Body::HashList(pb::HashList {
                disk: disk.handle,
                first_chunk: 0,
                hashes: Bytes::new(),
                last: true,
            }),
        )
        .await;
    }
    Ok(())
}

async fn send(out: &mpsc::Sender<Body>, body: Body) {
    // A gone agent ends the session elsewhere; nothing to do here.
    let _ = out.send(body).await;
}
