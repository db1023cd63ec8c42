//! File targets below the sink's `--file-root`. Every path is resolved with `openat2`,
//! `RESOLVE_BENEATH` and `RESOLVE_NO_SYMLINKS` relative to the root directory, so `..` and every
//! symlink are refused by the kernel, race-free, and a file with hard links is refused after
//! opening: a target has exactly one name, so authorisation, leases, state and hash index (all
//! keyed by name) can never be bypassed through a second name for the same file. Block-aligned writes go through
//! a second, `O_DIRECT` descriptor of the same file (see `direct`); zero extents punch holes (or
//! write zeros where the filesystem cannot punch); durability is `fdatasync`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustix::fs::{FallocateFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::direct;
use super::{Access, Opened, TargetError, TargetName};
use crate::usage::WRITE;

/// The O_DIRECT descriptor and what it needs.
struct Direct {
    file: Arc<File>,
    /// Cleared if the kernel refuses a direct write after all; buffered writes take over.
    usable: Arc<AtomicBool>,
}

pub struct FileTarget {
    file: Arc<File>,
    direct: Option<Direct>,
    size: u64,
    name: TargetName,
    /// Cleared when the filesystem refuses FALLOC_FL_PUNCH_HOLE; zeros are written instead.
    can_punch: Arc<AtomicBool>,
}

const RESOLVE: ResolveFlags =
    ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS).union(ResolveFlags::NO_SYMLINKS);

fn escape(name: &TargetName, e: Errno) -> TargetError {
    match e {
        Errno::XDEV => TargetError::OutsideRoot {
            name: name.to_string(),
            reason: "the path leaves the file root".into(),
        },
        Errno::LOOP => TargetError::OutsideRoot {
            name: name.to_string(),
            reason: "the path goes through a symlink; symlinks are refused in target paths (a second name \
                     for a file would bypass --allow rules, leases and the hash index): name the real path"
                .into(),
        },
        other => TargetError::io(name, "resolve path", other.into()),
    }
}

impl FileTarget {
    pub fn open(
        root: &Path,
        rel: &Path,
        name: &TargetName,
        size: u64,
        access: Access,
    ) -> Result<(Self, Opened), TargetError> {
        let create = access == Access::Create;
        let root_fd =
            rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| TargetError::Io {
                    name: name.to_string(),
                    what: "open the file root (--file-root)",
                    source: e.into(),
                })?;
        let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
        let parent_fd = match parent {
            Some(dir) => Some(open_dir(&root_fd, dir, name, create)?),
            None => None,
        };
        let rw = if access == Access::ReadOnly { OFlags::RDONLY } else { OFlags::RDWR };
        let open = |flags: OFlags| {
            // openat2 refuses a mode without O_CREAT.
            let mode = if flags.contains(OFlags::CREATE) { Mode::from(0o644) } else { Mode::empty() };
            rustix::fs::openat2(&root_fd, rel, flags | rw | OFlags::CLOEXEC, mode, RESOLVE)
        };
        let (fd, created) = match open(OFlags::empty()) {
            Ok(fd) => (fd, false),
            Err(Errno::NOENT) if create => match open(OFlags::CREATE | OFlags::EXCL) {
                Ok(fd) => (fd, true),
                Err(e) => return Err(escape(name, e)),
            },
            Err(Errno::NOENT) => return Err(TargetError::NotFound { name: name.to_string() }),
            Err(e) => return Err(escape(name, e)),
        };
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| TargetError::io(name, "stat", e))?;
        if !meta.file_type().is_file() {
            return Err(TargetError::BadName { name: name.to_string(), reason: "not a regular file".into() });
        }
        let links = std::os::unix::fs::MetadataExt::nlink(&meta);
        if links > 1 {
            return Err(TargetError::BadName {
                name: name.to_string(),
                reason: format!(
                    "the file has {links} names (hard links); a target must have exactly one, or another \
                     name could bypass --allow rules, leases and the hash index: remove the other links"
                ),
            });
        }
        let opened = if access == Access::ReadOnly || access == Access::Repair {
            return Ok((
                FileTarget {
                    file: Arc::new(file),
                    direct: None,
                    size: meta.len(),
                    name: name.clone(),
                    can_punch: Arc::new(AtomicBool::new(access == Access::Repair)),
                },
                Opened::Existing,
            ));
        } else if created {
            file.set_len(size).map_err(|e| TargetError::io(name, "set size", e))?;
            Opened::Created
        } else if meta.len() < size {
            file.set_len(size).map_err(|e| TargetError::io(name, "grow", e))?;
            Opened::Grown { from: meta.len() }
        } else if meta.len() > size {
            return Err(TargetError::WouldShrink {
                name: name.to_string(),
                target: meta.len(),
                source_size: size,
            });
        } else {
            Opened::Existing
        };
        if opened != Opened::Existing {
            // The new size (and for a new file, its directory entry) must survive a crash before
            // anything is acknowledged.
            file.sync_all().map_err(|e| TargetError::io(name, "sync", e))?;
            // The directory fds are O_PATH, which cannot be fsynced: reopen the directory itself.
            let dir = rustix::fs::openat(
                parent_fd.as_ref().unwrap_or(&root_fd),
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .and_then(rustix::fs::fsync);
            dir.map_err(|e| TargetError::io(name, "sync directory", e.into()))?;
        }
        let direct = open_direct(&root_fd, rel, &meta)
            .map(|file| Direct { file: Arc::new(file), usable: Arc::new(AtomicBool::new(true)) });
        let target = FileTarget {
            file: Arc::new(file),
            direct,
            size,
            name: name.clone(),
            can_punch: Arc::new(AtomicBool::new(true)),
        };
        Ok((target, opened))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, TargetError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(|e| TargetError::io(&self.name, what, e.into()))?
            .map_err(|e| TargetError::io(&self.name, what, e))
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), TargetError> {
        let direct = self
            .direct
            .as_ref()
            .filter(|d| direct::aligned(offset, data.len()) && d.usable.load(Ordering::Relaxed));
        let Some(d) = direct else {
            return self.blocking("write", move |f| WRITE.time(|| f.write_all_at(&data, offset))).await;
        };
        let (dfile, usable) = (d.file.clone(), d.usable.clone());
        self.blocking("write", move |f| match WRITE.time(|| direct::write_at(&dfile, &data, offset)) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Stricter alignment than ours (or no direct I/O after all): stay buffered.
                tracing::info!("direct I/O refused ({e}); writing through the page cache");
                usable.store(false, Ordering::Relaxed);
                f.write_all_at(&data, offset)
            }
            r => r,
        })
        .await
    }

    /// The file itself, for the undo journal's reads of committed data and for rollback.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Whether aligned writes bypass the page cache.
    pub fn direct_io(&self) -> bool {
        self.direct.as_ref().is_some_and(|d| d.usable.load(Ordering::Relaxed))
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        let can_punch = self.can_punch.clone();
        self.blocking("write zeroes", move |f| {
            if can_punch.load(Ordering::Relaxed) {
                match rustix::fs::fallocate(
                    f,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    offset,
                    len,
                ) {
                    Ok(()) => return Ok(()),
                    Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => can_punch.store(false, Ordering::Relaxed),
                    Err(e) => return Err(e.into()),
                }
            }
            static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(ZEROS.len() as u64) as usize;
                f.write_all_at(&ZEROS[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        })
        .await
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, TargetError> {
        self.blocking("read", move |f| {
            let mut buf = BytesMut::zeroed(len);
            f.read_exact_at(&mut buf, offset)?;
            Ok(buf.freeze())
        })
        .await
    }

    pub async fn flush(&self) -> Result<(), TargetError> {
        self.blocking("fdatasync", |f| f.sync_data()).await
    }

    /// Data extents (SEEK_DATA / SEEK_HOLE); the whole file where holes cannot be found.
    pub async fn allocated(&self) -> Result<Vec<(u64, u64)>, TargetError> {
        let size = self.size;
        self.blocking("map holes", move |f| {
            use rustix::fs::{seek, SeekFrom};
            let mut out = Vec::new();
            let mut pos = 0;
            while pos < size {
                let start = match seek(f, SeekFrom::Data(pos)) {
                    Ok(p) => p,
                    Err(Errno::NXIO) => break,
                    Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => return Ok(vec![(0, size)]),
                    Err(e) => return Err(e.into()),
                };
                let end = match seek(f, SeekFrom::Hole(start)) {
                    Ok(p) => p.min(size),
                    Err(Errno::NXIO) => size,
                    Err(e) => return Err(e.into()),
                };
                if start >= end {
                    break;
                }
                out.push((start, end - start));
                pos = end;
            }
            Ok(out)
        })
        .await
    }
}

/// A second descriptor of the file just opened, with O_DIRECT, resolved the same confined way
/// and checked to be the same inode. None where the filesystem has no direct I/O.
fn open_direct(root_fd: &rustix::fd::OwnedFd, rel: &Path, meta: &std::fs::Metadata) -> Option<File> {
    use std::os::unix::fs::MetadataExt;
    let flags = OFlags::RDWR | OFlags::DIRECT | OFlags::CLOEXEC;
    match rustix::fs::openat2(root_fd, rel, flags, Mode::empty(), RESOLVE) {
        Ok(fd) => {
            let f = File::from(fd);
            let same = f.metadata().is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
            same.then_some(f)
        }
        Err(e) => {
            tracing::info!("no direct I/O for {} ({e}); writing through the page cache", rel.display());
            None
        }
    }
}

/// Open (creating if allowed) the directory `dir` below the root, one component at a time, each
/// resolved beneath the root.
fn open_dir(
    root_fd: &rustix::fd::OwnedFd,
    dir: &Path,
    name: &TargetName,
    create: bool,
) -> Result<rustix::fd::OwnedFd, TargetError> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut prefix = PathBuf::new();
    let mut parent: Option<rustix::fd::OwnedFd> = None;
    for comp in dir.components() {
        let Component::Normal(part) = comp else { continue };
        prefix.push(part);
        let fd = match rustix::fs::openat2(root_fd, &prefix, flags, Mode::empty(), RESOLVE) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create => {
                let at = parent.as_ref().unwrap_or(root_fd);
                match rustix::fs::mkdirat(at, part, Mode::from(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(TargetError::io(name, "create directory", e.into())),
                }
                rustix::fs::openat2(root_fd, &prefix, flags, Mode::empty(), RESOLVE)
                    .map_err(|e| escape(name, e))?
            }
            Err(Errno::NOENT) => return Err(TargetError::NotFound { name: name.to_string() }),
            Err(e) => return Err(escape(name, e)),
        };
        parent = Some(fd);
    }
    parent.ok_or_else(|| TargetError::BadName { name: name.to_string(), reason: "empty directory".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TargetName {
        TargetName::parse(s).unwrap()
    }

    fn open(root: &Path, s: &str, size: u64, create: bool) -> Result<(FileTarget, Opened), TargetError> {
        let n = name(s);
        let TargetName::File(rel) = &n else { panic!("{s} is not a file target") };
        FileTarget::open(root, rel, &n, size, if create { Access::Create } else { Access::Existing })
    }

    #[tokio::test]
    async fn creates_writes_punches_and_reads() {
        let root = tempfile::tempdir().unwrap();
        let (t, opened) = open(root.path(), "file:vm1/disk0", 1 << 20, true).unwrap();
        assert_eq!(opened, Opened::Created);
        // Aligned: the direct descriptor (where the filesystem has one); then an unaligned write.
        t.write(4096, Bytes::from(vec![7u8; 8192])).await.unwrap();
        t.write(20_000, Bytes::from(vec![9u8; 100])).await.unwrap();
        t.write_zeroes(8192, 4096).await.unwrap();
        t.flush().await.unwrap();
        let back = t.read(4096, 8192).await.unwrap();
        assert!(back[..4096].iter().all(|&b| b == 7));
        assert!(back[4096..].iter().all(|&b| b == 0));
        assert_eq!(t.read(20_000, 100).await.unwrap(), vec![9u8; 100]);
        assert_eq!(std::fs::metadata(root.path().join("vm1/disk0")).unwrap().len(), 1 << 20);
    }

    #[test]
    fn grows_but_never_shrinks() {
        let root = tempfile::tempdir().unwrap();
        open(root.path(), "file:d", 1000, true).unwrap();
        assert_eq!(open(root.path(), "file:d", 2000, false).unwrap().1, Opened::Grown { from: 1000 });
        assert!(matches!(open(root.path(), "file:d", 500, false), Err(TargetError::WouldShrink { .. })));
        assert!(matches!(open(root.path(), "file:missing", 500, false), Err(TargetError::NotFound { .. })));
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), root.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../", root.path().join("up")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("dir")).unwrap();
        for t in ["file:abs", "file:up/victim", "file:dir/new"] {
            let err = open(root.path(), t, 1, true).err().unwrap_or_else(|| panic!("{t} opened"));
            assert!(matches!(err, TargetError::OutsideRoot { .. }), "{t}: {err}");
        }
        assert!(!outside.path().join("new").exists());
        assert_eq!(std::fs::read(outside.path().join("victim")).unwrap(), b"x");
        // A symlink that stays inside the root gives a second name: refused too, for files and
        // directories; so is a hard link.
        std::fs::create_dir(root.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", root.path().join("alias")).unwrap();
        open(root.path(), "file:real/disk", 10, true).unwrap();
        std::os::unix::fs::symlink("disk", root.path().join("real/link")).unwrap();
        for t in ["file:alias/disk", "file:alias/new", "file:real/link"] {
            let err = open(root.path(), t, 10, true).err().unwrap_or_else(|| panic!("{t} opened"));
            assert!(err.to_string().contains("symlink"), "{t}: {err}");
        }
        assert!(!root.path().join("real/new").exists());
        std::fs::hard_link(root.path().join("real/disk"), root.path().join("hard")).unwrap();
        let err = open(root.path(), "file:hard", 10, false).err().expect("a hard link opened");
        assert!(err.to_string().contains("hard links"), "{err}");
    }

    #[test]
    fn names_are_checked() {
        for bad in ["file:/etc/passwd", "file:../x", "file:a/../../x", "file:", "nfs:x", "disk0"] {
            assert!(TargetName::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(name("file:./a//b").to_string(), "file:a/b");
    }
}
