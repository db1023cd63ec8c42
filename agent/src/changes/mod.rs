//! Changed extents: where the data that must be sent this epoch is. Today: a VMware
//! DiskChangeInfo file (`--changed-areas`); platform change tracking (NBD dirty bitmaps, vSphere
//! CBT, RBD snapshot diffs) plugs in beside it.

pub mod cbt_file;

use crate::extents::Extent;

/// Digest of a plan: the same digest on a re-run means the same items, so an interrupted
/// incremental epoch may resume after its durable offset.
pub fn plan_digest(mode: i32, chunk_size: u32, size: u64, extents: &[Extent]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"blockship-plan-v1");
    h.update(&mode.to_le_bytes()).update(&chunk_size.to_le_bytes()).update(&size.to_le_bytes());
    for e in extents {
        h.update(&e.offset.to_le_bytes()).update(&e.len.to_le_bytes());
    }
    *h.finalize().as_bytes()
}
