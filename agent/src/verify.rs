//! `verify`: the sink hashes the target's data (not its index) chunk by chunk while the agent
//! hashes the source; the two streams of digests are compared as they arrive.

use std::sync::Arc;
use std::time::Instant;

use blockship_proto::codec::chunk_digest;
use blockship_proto::pb::{OpenDisk, SyncMode, VerifyRequest};
use blockship_proto::{Body, HASH_LEN, ZERO_HASH};
use futures::StreamExt;

use crate::chunker::{self, Work};
use crate::config::Resolved;
use crate::link::{Connections, Link, LinkConfig};
use crate::report::VerifySummary;
use crate::source::{Origin, Source, SourceOptions};
use crate::AgentError;

/// Differing ranges listed in the report (`--json`; the human line shows the first ten).
pub const MAX_RANGES: usize = 1000;

pub async fn verify(
    cfg: &Resolved,
    source_spec: &str,
    target: &str,
    opts: &SourceOptions,
) -> Result<VerifySummary, AgentError> {
    let started = Instant::now();
    let origin = Origin::open(source_spec, opts).await?;
    let result = compare(cfg, &origin, target, started).await;
    origin.close().await;
    result
}

async fn compare(
    cfg: &Resolved,
    origin: &Origin,
    target: &str,
    started: Instant,
) -> Result<VerifySummary, AgentError> {
    let size = origin.size();
    // Verification moves digests on the control stream only: one connection.
    let link = Link::connect(&LinkConfig { connections: Connections::Fixed(1), ..cfg.link() }).await?;
    let (disk, opened) = link
        .open_disk(OpenDisk {
            disk: 0,
            disk_id: origin.disk_id(),
            size,
            target: target.to_string(),
            mode: SyncMode::Verify as i32,
            chunk_size: cfg.chunk_size,
            ..Default::default()
        })
        .await?;
    // An RBD source is compared at the snapshot of the target's last committed epoch.
    let source: Arc<Source> = match origin {
        Origin::Plain { source, .. } => source.clone(),
        Origin::Rbd(r) if !opened.change_point.is_empty() => {
            Arc::new(Source::Rbd(r.view(&opened.change_point).await?))
        }
        Origin::Rbd(_) => return Err(AgentError::Usage(
            "the target names no source snapshot to compare with (no committed epoch from an rbd: source)"
                .into(),
        )),
        Origin::Vmware(..) => {
            return Err(AgentError::Usage(
                "verify reads a VMware disk through an NBD export of a snapshot: use --source nbd+unix://..."
                    .into(),
            ))
        }
        Origin::Qemu(..) => {
            return Err(AgentError::Usage(
                "verify reads a running VM's disk through an NBD export of a frozen view: use --source nbd+unix://..."
                    .into(),
            ))
        }
    };
    let cs = opened.chunk_size;
    let compared = size.min(opened.target_size);
    disk.send(&Body::VerifyRequest(VerifyRequest { disk: disk.handle })).await?;

    let allocated = source.allocated().await?;
    let (_, works) = chunker::compare(allocated, cs, compared);
    let mut ours = futures::stream::iter(works)
        .map(|work| {
            let source = source.clone();
            async move {
                match work {
                    Work::Hole(_) => Ok::<_, AgentError>(ZERO_HASH),
                    Work::Read(p) => {
                        let data = source.read(p.offset, p.len as usize).await?;
                        tokio::task::spawn_blocking(move || chunk_digest(&data))
                            .await
                            .map_err(|e| AgentError::Internal(e.to_string()))
                    }
                }
            }
        })
        .buffered(cfg.depth);

    let mut chunk = 0u64;
    let mut differing = 0u64;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let chunks = blockship_proto::chunk_count(compared, cs);
    while chunk < chunks {
        let list = disk.hash_list().await?;
        if list.first_chunk != chunk || list.hashes.len() % HASH_LEN != 0 {
            return Err(AgentError::Protocol(format!(
                "verify hashes for chunk {}, expected {chunk}",
                list.first_chunk
            )));
        }
        for theirs in list.hashes.chunks_exact(HASH_LEN) {
            let mine = ours
                .next()
                .await
                .ok_or_else(|| AgentError::Protocol("sink sent more hashes than chunks".into()))??;
            if mine[..] != theirs[..] {
                differing += 1;
                let (start, end) = (chunk * u64::from(cs), ((chunk + 1) * u64::from(cs)).min(compared));
                let extends = ranges.last().is_some_and(|last| last.1 == start);
                if extends {
                    if let Some(last) = ranges.last_mut() {
                        last.1 = end;
                    }
                } else if ranges.len() < MAX_RANGES {
                    ranges.push((start, end));
                }
            }
            chunk += 1;
        }
        if list.last {
            break;
        }
    }
    if chunk != chunks {
        return Err(AgentError::Protocol(format!("sink verified {chunk} chunks, expected {chunks}")));
    }
    drop(ours);
    drop(source);
    drop(disk);
    link.close().await;
    Ok(VerifySummary {
        target: target.to_string(),
        equal: differing == 0 && size == opened.target_size,
        source_size: size,
        target_size: opened.target_size,
        chunk_size: cs,
        chunks_compared: chunks,
        chunks_differing: differing,
        first_differences: ranges,
        seconds: started.elapsed().as_secs_f64(),
    })
}
