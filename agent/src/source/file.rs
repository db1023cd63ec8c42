//! Raw image files and block devices, read with positioned reads on the blocking pool. Holes of
//! sparse files are found with SEEK_DATA/SEEK_HOLE, so a mostly empty multi-terabyte image costs
//! only its allocated bytes.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use rustix::io::Errno;

use super::SourceError;
use crate::extents::{normalize, Extent};

pub struct FileSource {
    file: Arc<File>,
    size: u64,
    path: PathBuf,
    /// Regular files support SEEK_DATA/SEEK_HOLE; devices are read in full.
    sparse_aware: bool,
    /// io_uring reader where the kernel allows it; pread on the blocking pool otherwise.
    ring: Option<super::uring::Ring>,
}

impl FileSource {
    /// Open `path`; with `io_uring`, reads go through a ring when the kernel offers one.
    pub fn open(path: &Path, io_uring: bool) -> Result<Self, SourceError> {
        let io = |what, err| SourceError::Io { source_name: path.display().to_string(), what, err };
        let mut file = File::open(path).map_err(|e| io("open", e))?;
        let meta = file.metadata().map_err(|e| io("stat", e))?;
        let (size, sparse_aware) = if meta.file_type().is_block_device() {
            (file.seek(SeekFrom::End(0)).map_err(|e| io("size of block device", e))?, false)
        } else if meta.is_file() {
            (meta.len(), true)
        } else {
            return Err(io("open", std::io::Error::other("not a regular file or block device")));
        };
        if size == 0 {
            return Err(SourceError::Empty(path.display().to_string()));
        }
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let file = Arc::new(file);
        let ring = if io_uring {
            match super::uring::Ring::new(file.clone(), 64) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::info!("io_uring unavailable ({e}); reading with pread");
                    None
                }
            }
        } else {
            None
        };
        Ok(FileSource { file, size, path, sparse_aware, ring })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn disk_id(&self) -> String {
        format!("file:{}", self.path.display())
    }

    /// Identity of the file's current contents as far as the kernel tells: device, inode, size,
    /// and the modification and change times (ns). A plain file is only a frozen view while it
    /// does not change, so an interrupted epoch resumes only if this is unchanged. A block
    /// device's times do not move on writes: it must be frozen by its owner (a stopped machine,
    /// an LVM or ZFS snapshot).
    pub fn view_id(&self) -> Result<String, SourceError> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata().map_err(|e| self.err("stat", e))?;
        Ok(format!(
            "file:{}:{}:{}:{}.{}:{}.{}",
            m.dev(),
            m.ino(),
            self.size,
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ))
    }

    fn err(&self, what: &'static str, err: std::io::Error) -> SourceError {
        SourceError::Io { source_name: self.path.display().to_string(), what, err }
    }

    pub fn reader(&self) -> &'static str {
        if self.ring.is_some() {
            "io_uring"
        } else {
            "pread"
        }
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, SourceError> {
        if let Some(ring) = &self.ring {
            match ring.read(offset, len).await {
                Ok(b) => return Ok(b),
                // The kernel refused the operation itself (not the file's data): pread instead.
                Err(e) if super::uring::refused(&e) => {
                    tracing::debug!(offset, "io_uring read refused ({e}); reading with pread");
                }
                Err(e) => return Err(self.err("read", e)),
            }
        }
        let file = self.file.clone();
        let r = tokio::task::spawn_blocking(move || read_at(&file, offset, len)).await;
        match r {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => Err(self.err("read", e)),
            Err(e) => Err(self.err("read", e.into())),
        }
    }

    pub async fn allocated(&self) -> Result<Vec<Extent>, SourceError> {
        if !self.sparse_aware {
            return Ok(vec![Extent::new(0, self.size)]);
        }
        let (file, size) = (self.file.clone(), self.size);
        tokio::task::spawn_blocking(move || data_extents(&file, size))
            .await
            .map_err(|e| self.err("map holes", e.into()))?
            .map_err(|e| self.err("map holes", e))
    }
}

/// Read exactly `len` bytes at `offset` into a fresh buffer (without zero-filling it first).
fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Bytes> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let pos = offset + buf.len() as u64;
        // Reads into the vector's spare capacity and extends its length by what was read.
        if rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), pos)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("short read at {pos}"),
            ));
        }
    }
    Ok(Bytes::from(buf))
}

/// Data extents via SEEK_DATA / SEEK_HOLE; filesystems without support report one extent.
fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<Extent>> {
    use rustix::fs::{seek, SeekFrom as S};
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match seek(file, S::Data(pos)) {
            Ok(p) => p,
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => return Ok(vec![Extent::new(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match seek(file, S::Hole(start)) {
            Ok(p) => p.min(size),
            Err(Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        out.push(Extent::new(start, end - start));
        pos = end;
    }
    Ok(normalize(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[tokio::test]
    async fn reads_and_maps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], 40 << 20).unwrap();
        f.sync_all().unwrap();
        let s = FileSource::open(&p, false).unwrap();
        assert_eq!(s.size(), 64 << 20);
        let ext = s.allocated().await.unwrap();
        let total: u64 = ext.iter().map(|e| e.len).sum();
        assert!(total < 4 << 20, "holes were not skipped: {ext:?}");
        assert!(ext.iter().any(|e| e.offset <= 8 << 20 && e.end() >= (8 << 20) + 4096));
        assert!(ext.iter().any(|e| e.offset <= 40 << 20 && e.end() >= (40 << 20) + 4096));
        let b = s.read((8 << 20) - 10, 20).await.unwrap();
        assert_eq!(&b[..10], &[0; 10]);
        assert_eq!(&b[10..], &[1; 10]);
        assert!(s.read((64 << 20) - 10, 20).await.is_err());
        // The view changes with the contents.
        let v1 = s.view_id().unwrap();
        assert_eq!(v1, s.view_id().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        f.write_all_at(&[3u8; 10], 0).unwrap();
        assert_ne!(v1, s.view_id().unwrap());
    }

    #[test]
    fn empty_and_missing_sources_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty");
        File::create(&p).unwrap();
        assert!(matches!(FileSource::open(&p, true), Err(SourceError::Empty(_))));
        let err = FileSource::open(&dir.path().join("nope"), true).err().unwrap().to_string();
        assert!(err.contains("nope") && err.contains("open"), "{err}");
    }
}
