//! The replication engine, shared by the one-shot `sync` and the daemon: cycles of groups of
//! disks (`cycle`), each member's epoch (`epoch`), and what an epoch reads (`delta`). It knows
//! nothing of the command line: it takes its settings as plain values and reports through an
//! `Observer`.

pub mod cycle;
pub mod delta;
pub mod epoch;

use std::sync::Arc;

use blockship_proto::codec::Compression;

use crate::pipeline::Stats;

/// How data is cut and encoded.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// Chunk size of a new target.
    pub chunk_size: u32,
    pub compression: Compression,
    /// Chunks read and encoded concurrently per disk.
    pub depth: usize,
}

/// Watches epochs (progress bars, the daemon's status).
pub trait Observer: Send + Sync {
    /// Epoch `epoch` of `target` began, with `planned` bytes to look at, counted in `stats`.
    fn begun(&self, _target: &str, _epoch: u64, _planned: u64, _stats: &Arc<Stats>) {}
    /// Everything is sent; the sink makes it durable.
    fn waiting(&self, _target: &str) {}
    fn ended(&self, _target: &str) {}
}

/// An observer that watches nothing.
pub struct Quiet;

impl Observer for Quiet {}
