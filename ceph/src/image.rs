//! An open RBD image (`rbd_image_t`): the shared handle that closes the image when its last
//! reference goes, and the blocking metadata operations (size, features, snapshots, image
//! metadata, diffs). Data I/O is asynchronous and lives in `aio`.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex};

use crate::api::{api, ImageInfo, ImageT, SnapInfo};
use crate::error::{check, cstr};
use crate::rados::IoCtx;
use crate::RbdError;

pub(crate) struct ImageInner {
    pub(crate) ptr: ImageT,
    ioctx: Arc<IoCtx>,
    /// Lets tests hold this image's completions and see on which thread it was closed.
    #[cfg(test)]
    pub(crate) probe: Arc<crate::aio::CloseProbe>,
}

// SAFETY: librbd image handles support concurrent aio from several threads.
unsafe impl Send for ImageInner {}
unsafe impl Sync for ImageInner {}

impl Drop for ImageInner {
    fn drop(&mut self) {
        #[cfg(test)]
        self.probe.closing();
        if let Ok(api) = api() {
            // SAFETY: in-flight requests hold an Arc<ImageInner>, so none is pending. Never
            // runs on a librbd callback thread, where rbd_close deadlocks (see `aio`).
            unsafe { (api.rbd_close)(self.ptr) };
        }
        #[cfg(test)]
        self.probe.closed();
    }
}

/// An open image. Cheap to clone.
#[derive(Clone)]
pub struct Image {
    pub(crate) inner: Arc<ImageInner>,
}

/// A changed (or, without a base snapshot, allocated) extent from `rbd_diff_iterate2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
    /// False: the range was discarded / reads as zeros.
    pub exists: bool,
}

impl Image {
    /// Wrap a handle `rbd_open` returned; the image is closed when the last clone is dropped.
    pub(crate) fn from_handle(ptr: ImageT, ioctx: Arc<IoCtx>) -> Image {
        Image {
            inner: Arc::new(ImageInner {
                ptr,
                ioctx,
                #[cfg(test)]
                probe: Default::default(),
            }),
        }
    }

    pub(crate) fn ptr(&self) -> ImageT {
        self.inner.ptr
    }

    pub fn size(&self) -> Result<u64, RbdError> {
        let mut info = std::mem::MaybeUninit::<ImageInfo>::zeroed();
        // SAFETY: info is a properly sized, zero-initialised rbd_image_info_t.
        check("stat", unsafe {
            (api()?.rbd_stat)(self.ptr(), info.as_mut_ptr(), std::mem::size_of::<ImageInfo>())
        })?;
        // SAFETY: rbd_stat filled it in.
        Ok(unsafe { info.assume_init() }.size)
    }

    pub fn resize(&self, size: u64) -> Result<(), RbdError> {
        // SAFETY: valid image.
        check(format!("resize to {size}"), unsafe { (api()?.rbd_resize)(self.ptr(), size) })?;
        Ok(())
    }

    pub fn features(&self) -> Result<u64, RbdError> {
        let mut f = 0u64;
        // SAFETY: out-pointer to a local.
        check("get features", unsafe { (api()?.rbd_get_features)(self.ptr(), &mut f) })?;
        Ok(f)
    }

    pub fn snap_create(&self, name: &str) -> Result<(), RbdError> {
        let n = cstr(name)?;
        // SAFETY: valid image and C string.
        check(format!("create snapshot {name}"), unsafe {
            (api()?.rbd_snap_create)(self.ptr(), n.as_ptr())
        })?;
        Ok(())
    }

    pub fn snap_remove(&self, name: &str) -> Result<(), RbdError> {
        let n = cstr(name)?;
        // SAFETY: valid image and C string.
        check(format!("remove snapshot {name}"), unsafe {
            (api()?.rbd_snap_remove)(self.ptr(), n.as_ptr())
        })?;
        Ok(())
    }

    /// Protect snapshot `name` from removal (what format 1 clones need); already protected is
    /// fine.
    pub fn snap_protect(&self, name: &str) -> Result<(), RbdError> {
        let n = cstr(name)?;
        // SAFETY: valid image and C string.
        let r = unsafe { (api()?.rbd_snap_protect)(self.ptr(), n.as_ptr()) };
        if r == -libc::EBUSY {
            return Ok(());
        }
        check(format!("protect snapshot {name}"), r)?;
        Ok(())
    }

    /// Unprotect snapshot `name` (fails with EBUSY while clones of it exist; not protected is
    /// fine).
    pub fn snap_unprotect(&self, name: &str) -> Result<(), RbdError> {
        let n = cstr(name)?;
        // SAFETY: valid image and C string.
        let r = unsafe { (api()?.rbd_snap_unprotect)(self.ptr(), n.as_ptr()) };
        if r == -libc::EINVAL {
            return Ok(());
        }
        check(format!("unprotect snapshot {name}"), r)?;
        Ok(())
    }

    pub fn snap_rollback(&self, name: &str) -> Result<(), RbdError> {
        let n = cstr(name)?;
        // SAFETY: valid image and C string.
        check(format!("roll back to snapshot {name}"), unsafe {
            (api()?.rbd_snap_rollback)(self.ptr(), n.as_ptr())
        })?;
        Ok(())
    }

    /// Snapshot names (with ids), oldest first.
    pub fn snap_list(&self) -> Result<Vec<(u64, String)>, RbdError> {
        let api = api()?;
        let mut max: c_int = 16;
        loop {
            // librbd writes count + 1 entries (a terminator).
            let mut buf: Vec<SnapInfo> = Vec::with_capacity(max as usize + 1);
            let mut n = max;
            // SAFETY: buf has room for max + 1 entries.
            let r = unsafe { (api.rbd_snap_list)(self.ptr(), buf.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            let count = check("list snapshots", r)? as usize;
            // SAFETY: librbd initialised `count` entries (+ terminator).
            unsafe { buf.set_len(count) };
            let mut out: Vec<(u64, String)> = buf
                .iter()
                // SAFETY: names are NUL-terminated strings owned by the list until snap_list_end.
                .map(|s| (s.id, unsafe { CStr::from_ptr(s.name) }.to_string_lossy().into_owned()))
                .collect();
            // SAFETY: releases the names of the entries librbd filled in.
            unsafe { (api.rbd_snap_list_end)(buf.as_mut_ptr()) };
            out.sort_by_key(|(id, _)| *id);
            return Ok(out);
        }
    }

    pub fn metadata_set(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: valid image and C strings.
        check(format!("set image metadata {key}"), unsafe {
            (api()?.rbd_metadata_set)(self.ptr(), k.as_ptr(), v.as_ptr())
        })?;
        Ok(())
    }

    /// A metadata value, or None when the key is absent.
    pub fn metadata_get(&self, key: &str) -> Result<Option<String>, RbdError> {
        let api = api()?;
        let k = cstr(key)?;
        let mut len: usize = 4096;
        loop {
            let mut buf = vec![0u8; len];
            let mut n = len;
            // SAFETY: buf has n bytes.
            let r = unsafe {
                (api.rbd_metadata_get)(self.ptr(), k.as_ptr(), buf.as_mut_ptr() as *mut c_char, &mut n)
            };
            match r {
                r if r == -libc::ENOENT => return Ok(None),
                r if r == -libc::ERANGE => len = n.max(len * 2),
                r => {
                    check(format!("get image metadata {key}"), r)?;
                    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                    buf.truncate(end);
                    return String::from_utf8(buf)
                        .map(Some)
                        .map_err(|_| RbdError::Invalid(format!("metadata {key} is not UTF-8")));
                }
            }
        }
    }

    pub fn metadata_remove(&self, key: &str) -> Result<(), RbdError> {
        let k = cstr(key)?;
        // SAFETY: valid image and C string.
        let r = unsafe { (api()?.rbd_metadata_remove)(self.ptr(), k.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(format!("remove image metadata {key}"), r)?;
        Ok(())
    }

    /// Whether this handle holds the image's exclusive lock (blocking).
    pub fn is_lock_owner(&self) -> Result<bool, RbdError> {
        let mut owner: c_int = 0;
        // SAFETY: valid image, out-pointer to a local.
        check("query the exclusive lock", unsafe {
            (api()?.rbd_is_exclusive_lock_owner)(self.ptr(), &mut owner)
        })?;
        Ok(owner != 0)
    }

    /// Take the image's exclusive lock and keep it: librbd no longer hands it over when another
    /// client asks (blocking). Fails (EROFS, EBUSY) while a live client holds it.
    pub fn lock_acquire(&self) -> Result<(), RbdError> {
        // SAFETY: valid image.
        check("acquire the exclusive lock", unsafe {
            (api()?.rbd_lock_acquire)(self.ptr(), crate::api::LOCK_MODE_EXCLUSIVE)
        })?;
        Ok(())
    }

    /// Release a lock taken with `lock_acquire` (blocking).
    pub fn lock_release(&self) -> Result<(), RbdError> {
        // SAFETY: valid image.
        check("release the exclusive lock", unsafe { (api()?.rbd_lock_release)(self.ptr()) })?;
        Ok(())
    }

    /// The clients that hold the image's exclusive lock (blocking): none, or one.
    pub fn lock_owners(&self) -> Result<Vec<String>, RbdError> {
        let api = api()?;
        let mut mode: c_int = 0;
        let mut owners: [*mut c_char; 8] = [std::ptr::null_mut(); 8];
        let mut n: usize = owners.len();
        // SAFETY: room for `n` owner pointers; librbd allocates the strings, freed below.
        let r = unsafe { (api.rbd_lock_get_owners)(self.ptr(), &mut mode, owners.as_mut_ptr(), &mut n) };
        if r == -libc::ENOENT {
            return Ok(Vec::new());
        }
        check("list the exclusive lock's owners", r)?;
        let n = n.min(owners.len());
        // SAFETY: librbd filled `n` NUL-terminated strings.
        let out = owners[..n]
            .iter()
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: releases exactly the strings librbd returned.
        unsafe { (api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
        Ok(out)
    }

    /// Break `owner`'s exclusive lock (blocking). librbd blocklists the owner's client first
    /// (`rbd_blocklist_on_break_lock`), so a writer that is only slow, not dead, can never write
    /// again: call it only for an owner known to be gone.
    pub fn lock_break(&self, owner: &str) -> Result<(), RbdError> {
        let o = cstr(owner)?;
        // SAFETY: valid image and C string.
        check(format!("break the exclusive lock of {owner}"), unsafe {
            (api()?.rbd_lock_break)(self.ptr(), crate::api::LOCK_MODE_EXCLUSIVE, o.as_ptr())
        })?;
        Ok(())
    }

    /// Break an exclusive lock that a closed handle of this very client left behind (blocking):
    /// a handle closed while the cluster did not answer cannot release its lock, and librbd will
    /// not break a lock of its own client (that would blocklist itself). This removes the lock
    /// record on the image header (`cls_lock`) without blocklisting anyone, so the caller must
    /// know that no handle of this process still writes the image. Returns the locks removed.
    pub fn break_own_stale_lock(&self) -> Result<usize, RbdError> {
        let api = api()?;
        let mut id = [0 as c_char; 64];
        // SAFETY: valid image, a buffer of the given length.
        check("read the image id", unsafe { (api.rbd_get_id)(self.ptr(), id.as_mut_ptr(), id.len()) })?;
        // SAFETY: librbd NUL-terminated the id within the buffer.
        let id = unsafe { CStr::from_ptr(id.as_ptr()) }.to_string_lossy().into_owned();
        let header = cstr(&format!("rbd_header.{id}"))?;
        let name = cstr("rbd_lock")?;
        let io = self.inner.ioctx.ptr;
        let (mut tag, mut clients, mut cookies, mut addrs) =
            ([0 as c_char; 256], [0 as c_char; 1024], [0 as c_char; 1024], [0 as c_char; 1024]);
        let (mut tag_len, mut clients_len, mut cookies_len, mut addrs_len) =
            (tag.len(), clients.len(), cookies.len(), addrs.len());
        let mut exclusive: c_int = 0;
        // SAFETY: valid ioctx, C strings and buffers with their lengths.
        let n = unsafe {
            (api.rados_list_lockers)(
                io,
                header.as_ptr(),
                name.as_ptr(),
                &mut exclusive,
                tag.as_mut_ptr(),
                &mut tag_len,
                clients.as_mut_ptr(),
                &mut clients_len,
                cookies.as_mut_ptr(),
                &mut cookies_len,
                addrs.as_mut_ptr(),
                &mut addrs_len,
            )
        };
        check("list the image header's lockers", n as c_int)?;
        let split = |buf: &[c_char], len: usize| -> Vec<String> {
            // SAFETY: reinterpreting c_char as u8 of the same size.
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, len.min(buf.len())) };
            bytes
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        };
        let (clients, cookies) = (split(&clients, clients_len), split(&cookies, cookies_len));
        let mut broken = 0;
        for (client, cookie) in clients.iter().zip(&cookies).take(n.max(0) as usize) {
            let (c, k) = (cstr(client)?, cstr(cookie)?);
            // SAFETY: valid ioctx and C strings.
            let r =
                unsafe { (api.rados_break_lock)(io, header.as_ptr(), name.as_ptr(), c.as_ptr(), k.as_ptr()) };
            if r != -libc::ENOENT {
                check(format!("break the stale lock of {client}"), r)?;
                broken += 1;
            }
        }
        Ok(broken)
    }

    /// Extents changed since snapshot `from` (None: allocated extents) in `[offset, offset+len)`.
    /// Blocking.
    pub fn diff(
        &self,
        from: Option<&str>,
        offset: u64,
        len: u64,
        whole_object: bool,
    ) -> Result<Vec<DiffExtent>, RbdError> {
        unsafe extern "C" fn collect(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: arg is the Mutex<Vec> below, alive for the whole rbd_diff_iterate2 call.
            let out = unsafe { &*(arg as *const Mutex<Vec<DiffExtent>>) };
            out.lock().unwrap_or_else(|p| p.into_inner()).push(DiffExtent {
                offset: off,
                len: len as u64,
                exists: exists != 0,
            });
            0
        }
        let from_c = match from {
            Some(s) => Some(cstr(s)?),
            None => None,
        };
        let out: Mutex<Vec<DiffExtent>> = Mutex::new(Vec::new());
        // SAFETY: the callback only touches `out`, which outlives the call.
        check("diff", unsafe {
            (api()?.rbd_diff_iterate2)(
                self.ptr(),
                from_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                offset,
                len,
                1,
                u8::from(whole_object),
                collect,
                &out as *const _ as *mut c_void,
            )
        })?;
        let mut v = out.into_inner().unwrap_or_else(|p| p.into_inner());
        v.sort_by_key(|e| e.offset);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::testing::cluster;
    use crate::{FEATURE_EXCLUSIVE_LOCK, FEATURE_FAST_DIFF, FEATURE_LAYERING, FEATURE_OBJECT_MAP};

    #[tokio::test]
    async fn image_round_trip() {
        let Some(rados) = cluster() else { return };
        let io = Arc::new(rados.ioctx("rbd", None).unwrap());
        let name = format!("librbd-test-{}", std::process::id());
        let _ = io.remove(&name);
        io.create(
            &name,
            8 << 20,
            FEATURE_LAYERING | FEATURE_EXCLUSIVE_LOCK | FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF,
        )
        .unwrap();
        assert_eq!(io.create(&name, 8 << 20, FEATURE_LAYERING).unwrap_err().errno(), Some(libc::EEXIST));
        let img = io.open(&name).unwrap();
        assert_eq!(img.size().unwrap(), 8 << 20);
        assert_ne!(img.features().unwrap() & FEATURE_FAST_DIFF, 0);

        let data = Bytes::from(vec![0x42u8; 1 << 20]);
        img.write(4096, data.clone()).await.unwrap();
        img.flush().await.unwrap();
        assert_eq!(img.read(4096, 1 << 20).await.unwrap(), data.to_vec());
        img.snap_create("s1").unwrap();
        img.write_zeroes(0, 8 << 20).await.unwrap();
        img.flush().await.unwrap();
        assert!(img.read(4096, 4096).await.unwrap().iter().all(|&b| b == 0));
        let changed = img.diff(Some("s1"), 0, 8 << 20, false).unwrap();
        assert!(changed.iter().any(|e| !e.exists), "{changed:?}");
        let at_s1 = io.open_at(&name, Some("s1")).unwrap();
        assert_eq!(
            at_s1.read(4096, 16).await.unwrap(),
            vec![0x42; 16],
            "snapshot does not hold the old data"
        );
        assert!(at_s1.write(0, Bytes::from_static(b"x")).await.is_err(), "a snapshot accepted a write");
        drop(at_s1);
        img.snap_rollback("s1").unwrap();
        assert_eq!(img.read(4096, 16).await.unwrap(), vec![0x42; 16]);
        let allocated = img.diff(None, 0, 8 << 20, false).unwrap();
        assert!(allocated.iter().all(|e| e.offset < (2 << 20)), "{allocated:?}");

        img.metadata_set("blockship.test", "v1").unwrap();
        assert_eq!(img.metadata_get("blockship.test").unwrap().as_deref(), Some("v1"));
        let long = "x".repeat(10_000);
        img.metadata_set("blockship.long", &long).unwrap();
        assert_eq!(img.metadata_get("blockship.long").unwrap(), Some(long));
        img.metadata_remove("blockship.test").unwrap();
        assert_eq!(img.metadata_get("blockship.test").unwrap(), None);

        img.resize(16 << 20).unwrap();
        assert_eq!(img.size().unwrap(), 16 << 20);
        assert!(img.read(20 << 20, 10).await.is_err(), "read past the end succeeded");
        assert_eq!(img.snap_list().unwrap().iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(), vec!["s1"]);
        img.snap_remove("s1").unwrap();
        drop(img);
        io.remove(&name).unwrap();
        assert_eq!(io.open(&name).err().and_then(|e| e.errno()), Some(libc::ENOENT));
    }

    /// A clone holds its parent snapshot's data, not the parent's later writes; its own writes
    /// do not reach the parent; the parent snapshot is removable (format 2) or unprotectable
    /// (format 1) once the clone is gone.
    #[tokio::test]
    async fn a_snapshot_clone_is_layered_and_independent() {
        let Some(rados) = cluster() else { return };
        let io = Arc::new(rados.ioctx("rbd", None).unwrap());
        let (name, child) =
            (format!("clone-parent-{}", std::process::id()), format!("clone-child-{}", std::process::id()));
        let _ = io.remove(&child);
        let _ = io.remove(&name);
        io.create(&name, 4 << 20, FEATURE_LAYERING | FEATURE_EXCLUSIVE_LOCK).unwrap();
        let img = io.open(&name).unwrap();
        img.write(0, Bytes::from(vec![1u8; 1 << 20])).await.unwrap();
        img.flush().await.unwrap();
        img.snap_create("s1").unwrap();
        img.write(0, Bytes::from(vec![2u8; 4096])).await.unwrap();
        img.flush().await.unwrap();
        let format = io.clone_snapshot(&name, "s1", &io, &child).unwrap();
        assert!(format == 1 || format == 2, "{format}");
        let c = io.open(&child).unwrap();
        assert_eq!(c.read(0, 8).await.unwrap(), vec![1u8; 8], "the clone does not hold the snapshot");
        c.write(0, Bytes::from(vec![3u8; 4096])).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(img.read(0, 8).await.unwrap(), vec![2u8; 8], "a clone write reached its parent");
        assert_eq!(io.clone_snapshot(&name, "s1", &io, &child).unwrap_err().errno(), Some(libc::EEXIST));
        drop(c);
        io.remove(&child).unwrap();
        img.snap_unprotect("s1").unwrap();
        img.snap_remove("s1").unwrap();
        drop(img);
        io.remove(&name).unwrap();
    }
}
