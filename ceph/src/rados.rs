//! The cluster connection (`rados_t`) and pool I/O contexts (`rados_ioctx_t`), with the image
//! operations that need only a pool: create, open, remove. Handles form a chain of `Arc`s
//! (image → ioctx → cluster) so librados objects are torn down children first, whoever drops
//! the last reference.

use std::ffi::c_int;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{api, ImageT, IoCtxT, OptionsT, RadosT, IMAGE_OPTION_CLONE_FORMAT, IMAGE_OPTION_FEATURES};
use crate::error::{check, cstr};
use crate::image::Image;
use crate::RbdError;

/// A connected cluster handle (`rados_t`). librados handles are thread-safe.
pub struct Rados {
    ptr: RadosT,
}

// SAFETY: librados cluster handles may be used from any thread concurrently.
unsafe impl Send for Rados {}
unsafe impl Sync for Rados {}

impl Drop for Rados {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: ptr came from rados_create2; every ioctx holds an Arc<Rados>, so none is alive.
            unsafe { (api.rados_shutdown)(self.ptr) }
        }
    }
}

/// How to reach a cluster.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions<'a> {
    /// ceph.conf; None: librados' default search (CEPH_CONF, /etc/ceph/ceph.conf).
    pub conf: Option<&'a Path>,
    /// Client id without "client." (e.g. "admin").
    pub id: &'a str,
    pub keyring: Option<&'a Path>,
    /// Give up connecting after this long (client_mount_timeout, rados_mon_op_timeout).
    pub connect_timeout: Duration,
    /// Fail an OSD operation after this long (rados_osd_op_timeout); zero waits forever.
    pub op_timeout: Duration,
}

impl Rados {
    /// Connect (blocking: call from a blocking thread).
    pub fn connect(opts: &ConnectOptions<'_>) -> Result<Rados, RbdError> {
        let api = api()?;
        let name = cstr(&format!("client.{}", opts.id))?;
        let cluster = cstr("ceph")?;
        let mut ptr: RadosT = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; strings outlive the call.
        check("rados_create2", unsafe { (api.rados_create2)(&mut ptr, cluster.as_ptr(), name.as_ptr(), 0) })?;
        let rados = Rados { ptr };
        let conf = match opts.conf {
            Some(p) => Some(cstr(&p.to_string_lossy())?),
            None => None,
        };
        let op = match opts.conf {
            Some(p) => format!("reading Ceph config {}", p.display()),
            None => "reading the default Ceph config (CEPH_CONF or /etc/ceph/ceph.conf)".to_string(),
        };
        // SAFETY: valid handle; conf is NULL or a C string.
        check(op, unsafe {
            (api.rados_conf_read_file)(rados.ptr, conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
        })?;
        if let Some(k) = opts.keyring {
            rados.set("keyring", &k.to_string_lossy())?;
        }
        let secs = opts.connect_timeout.as_secs().max(1).to_string();
        rados.set("client_mount_timeout", &secs)?;
        rados.set("rados_mon_op_timeout", &secs)?;
        rados.set("rados_osd_op_timeout", &opts.op_timeout.as_secs().to_string())?;
        // SAFETY: configured handle.
        check(format!("connecting to the Ceph cluster as client.{}", opts.id), unsafe {
            (api.rados_connect)(rados.ptr)
        })?;
        Ok(rados)
    }

    fn set(&self, key: &str, value: &str) -> Result<(), RbdError> {
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: valid handle and C strings.
        check(format!("setting Ceph option {key}"), unsafe {
            (api()?.rados_conf_set)(self.ptr, k.as_ptr(), v.as_ptr())
        })?;
        Ok(())
    }

    /// An I/O context on `pool` (and `namespace`).
    pub fn ioctx(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> Result<IoCtx, RbdError> {
        let api = api()?;
        let p = cstr(pool)?;
        let mut ptr: IoCtxT = std::ptr::null_mut();
        // SAFETY: valid cluster handle, C string, out-pointer to a local.
        check(format!("opening pool {pool:?}"), unsafe {
            (api.rados_ioctx_create)(self.ptr, p.as_ptr(), &mut ptr)
        })?;
        let ioctx = IoCtx { ptr, _rados: self.clone() };
        if let Some(ns) = namespace {
            let n = cstr(ns)?;
            // SAFETY: valid ioctx and C string (copied by librados).
            unsafe { (api.rados_ioctx_set_namespace)(ioctx.ptr, n.as_ptr()) };
        }
        Ok(ioctx)
    }
}

/// A pool (and namespace) I/O context.
pub struct IoCtx {
    pub(crate) ptr: IoCtxT,
    _rados: Arc<Rados>,
}

// SAFETY: ioctx handles are thread-safe for the calls used here.
unsafe impl Send for IoCtx {}
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: every image holds an Arc<IoCtx>, so none is open.
            unsafe { (api.rados_ioctx_destroy)(self.ptr) }
        }
    }
}

impl IoCtx {
    /// Create an image of `size` bytes with `features` (blocking).
    pub fn create(&self, name: &str, size: u64, features: u64) -> Result<(), RbdError> {
        let api = api()?;
        let n = cstr(name)?;
        let mut opts: OptionsT = std::ptr::null_mut();
        // SAFETY: librbd crashes on NULL options, so always pass a created handle.
        unsafe {
            (api.rbd_image_options_create)(&mut opts);
            let r = (api.rbd_image_options_set_uint64)(opts, IMAGE_OPTION_FEATURES, features);
            let r = if r < 0 { r } else { (api.rbd_create4)(self.ptr, n.as_ptr(), size, opts) };
            (api.rbd_image_options_destroy)(opts);
            check(format!("creating image {name:?}"), r)?;
        }
        Ok(())
    }

    /// Open an image for I/O (blocking).
    pub fn open(self: &Arc<Self>, name: &str) -> Result<Image, RbdError> {
        self.open_at(name, None)
    }

    /// Open an image's head, or (read-only) one of its snapshots (blocking).
    pub fn open_at(self: &Arc<Self>, name: &str, snapshot: Option<&str>) -> Result<Image, RbdError> {
        let api = api()?;
        let n = cstr(name)?;
        let snap = snapshot.map(cstr).transpose()?;
        let mut ptr: ImageT = std::ptr::null_mut();
        let what = match snapshot {
            Some(s) => format!("opening image {name:?} at snapshot {s:?}"),
            None => format!("opening image {name:?}"),
        };
        // SAFETY: valid ioctx, C strings, out-pointer; NULL snapshot = the head.
        check(what, unsafe {
            (api.rbd_open)(
                self.ptr,
                n.as_ptr(),
                &mut ptr,
                snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            )
        })?;
        Ok(Image::from_handle(ptr, self.clone()))
    }

    /// Clone snapshot `snap` of image `parent` (in this pool) into a new image `child` in `into`:
    /// a layered copy-on-write image, no data copied. A format 2 clone needs no protected
    /// snapshot (and lets the parent snapshot be removed, into the trash, while clones exist);
    /// where the cluster refuses format 2 (clients older than Mimic allowed), the snapshot is
    /// protected and a format 1 clone made. Returns the clone format (blocking).
    pub fn clone_snapshot(
        self: &Arc<Self>,
        parent: &str,
        snap: &str,
        into: &IoCtx,
        child: &str,
    ) -> Result<u64, RbdError> {
        let api = api()?;
        let (p, s, c) = (cstr(parent)?, cstr(snap)?, cstr(child)?);
        let clone = |format: u64| -> c_int {
            let mut opts: OptionsT = std::ptr::null_mut();
            // SAFETY: valid ioctxs and C strings; librbd wants a created options handle.
            unsafe {
                (api.rbd_image_options_create)(&mut opts);
                let r = (api.rbd_image_options_set_uint64)(opts, IMAGE_OPTION_CLONE_FORMAT, format);
                let r = if r < 0 {
                    r
                } else {
                    (api.rbd_clone3)(self.ptr, p.as_ptr(), s.as_ptr(), into.ptr, c.as_ptr(), opts)
                };
                (api.rbd_image_options_destroy)(opts);
                r
            }
        };
        let what = || format!("cloning {parent}@{snap} into {child:?}");
        let r = clone(2);
        if r >= 0 {
            return Ok(2);
        }
        if r != -libc::EINVAL && r != -libc::EOPNOTSUPP && r != -libc::ENOSYS {
            check(what(), r)?;
        }
        self.open_at(parent, None)?.snap_protect(snap)?;
        check(what(), clone(1))?;
        Ok(1)
    }

    /// Remove an image (blocking; fails while it has snapshots).
    pub fn remove(&self, name: &str) -> Result<(), RbdError> {
        let n = cstr(name)?;
        // SAFETY: valid ioctx and C string.
        check(format!("removing image {name:?}"), unsafe { (api()?.rbd_remove)(self.ptr, n.as_ptr()) })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::cluster;

    #[test]
    fn missing_pool_is_reported() {
        let Some(rados) = cluster() else { return };
        let err = rados.ioctx("no-such-pool", None).err().unwrap();
        assert_eq!(err.errno(), Some(libc::ENOENT));
        assert!(err.to_string().contains("no-such-pool"), "{err}");
    }
}
