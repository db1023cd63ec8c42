//! Sources: where the agent reads disks from. A source knows its size, reads byte ranges, and
//! reports which ranges hold data at all (holes need not be read). Today: raw image files and
//! block devices; NBD and RBD sources plug in beside them.

pub mod file;
pub mod nbd;

use bytes::Bytes;

use crate::extents::Extent;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {source_name}: {what}: {err}")]
    Io { source_name: String, what: &'static str, err: std::io::Error },
    #[error("source {0}: size is 0")]
    Empty(String),
}

pub enum Source {
    File(file::FileSource),
}

impl Source {
    /// Open a source by its command-line name (a path).
    pub fn open(spec: &str) -> Result<Source, SourceError> {
        Ok(Source::File(file::FileSource::open(std::path::Path::new(spec))?))
    }

    pub fn size(&self) -> u64 {
        match self {
            Source::File(f) => f.size(),
        }
    }

    /// A stable identity of the disk, recorded by the sink with the replica.
    pub fn disk_id(&self) -> String {
        match self {
            Source::File(f) => f.disk_id(),
        }
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, SourceError> {
        match self {
            Source::File(f) => f.read(offset, len).await,
        }
    }

    /// Ranges that may hold non-zero data (sorted, merged); everything else reads as zeros.
    pub async fn allocated(&self) -> Result<Vec<Extent>, SourceError> {
        match self {
            Source::File(f) => f.allocated().await,
        }
    }
}
