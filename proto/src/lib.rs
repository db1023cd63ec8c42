//! Blockship's wire protocol, free of I/O in the spirit of `quinn-proto`: the protobuf messages
//! (prost), the length-prefixed framing with hard size limits, the per-chunk codec (BLAKE3 +
//! optional zstd), protocol version negotiation and the session's control-stream state machine.
//! Agents, sinks, fuzzers and tests all drive the same code with plain byte buffers.

pub mod buffer;
pub mod codec;
pub mod frame;
pub mod session;
pub mod version;

/// Generated protobuf types (`proto/blockship.proto`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/blockship.v1.rs"));
}

pub use frame::{Frame, FrameDecoder, FrameError};
pub use pb::frame::Body;

/// Length of a BLAKE3 digest on the wire.
pub const HASH_LEN: usize = 32;

/// Disk id prefix of the generated disks `blockship-agent bench` replicates (see `OpenDisk.bench`).
pub const BENCH_DISK_ID: &str = "blockship-bench:";
/// In a target's hash index, this value marks a chunk known to be all zeros.
pub const ZERO_HASH: [u8; HASH_LEN] = [0; HASH_LEN];

/// Smallest chunk size a target may be created with.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk size; also bounds every payload on the wire.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Chunk size of a new target unless the agent asks for another.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;

/// Whether `size` is an acceptable chunk size (a power of two within the limits).
pub fn valid_chunk_size(size: u32) -> bool {
    size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size)
}

/// Number of chunks of `chunk_size` needed to cover `disk_size` bytes.
pub fn chunk_count(disk_size: u64, chunk_size: u32) -> u64 {
    disk_size.div_ceil(u64::from(chunk_size))
}
