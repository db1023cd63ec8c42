//! Minimal safe bindings to librados/librbd, Blockship's only FFI. The library is
//! loaded with `dlopen` on first use (`librbd.so.1`), so the sink builds without Ceph headers
//! and runs without Ceph unless an `rbd:` target is used. No crate fits: `librbd-sys` lacks
//! `rbd_diff_iterate2`/`rbd_write2`, the bindgen crates need libclang at build time. The C API
//! used here is stable since Octopus; prototypes follow `rbd/librbd.h` and `rados/librados.h`.
//!
//! Asynchronous I/O: each request gets a completion whose callback (run on a librbd thread)
//! sends the result through a oneshot channel; the request's buffer and a handle on the image
//! live in the callback's context, so a cancelled future never frees memory librbd still uses.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

type RadosT = *mut c_void;
type IoCtxT = *mut c_void;
type ImageT = *mut c_void;
type CompletionT = *mut c_void;
type OptionsT = *mut c_void;
type Callback = unsafe extern "C" fn(CompletionT, *mut c_void);
type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `rbd_image_info_t` (only `size` is read; the layout must still match).
#[repr(C)]
struct ImageInfo {
    size: u64,
    obj_size: u64,
    num_objs: u64,
    order: c_int,
    block_name_prefix: [c_char; 24],
    parent_pool: i64,
    parent_name: [c_char; 96],
}

/// `rbd_snap_info_t`.
#[repr(C)]
struct SnapInfo {
    id: u64,
    size: u64,
    name: *const c_char,
}

pub const FEATURE_LAYERING: u64 = 1;
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 4;
pub const FEATURE_OBJECT_MAP: u64 = 8;
pub const FEATURE_FAST_DIFF: u64 = 16;
pub const FEATURE_DEEP_FLATTEN: u64 = 32;
const IMAGE_OPTION_FEATURES: c_int = 1;

macro_rules! api {
    ($($name:ident: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// Function pointers resolved from librbd (and the librados it links).
        struct Api {
            $($name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
            _lib: libloading::Library,
        }

        impl Api {
            fn load() -> Result<Api, String> {
                // SAFETY: loading librbd runs its initialisers, which have no preconditions; each
                // symbol is cast to the prototype declared in the librbd/librados headers.
                unsafe {
                    let lib = libloading::Library::new("librbd.so.1").map_err(|e| e.to_string())?;
                    Ok(Api {
                        $($name: *lib
                            .get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(concat!(stringify!($name), "\0").as_bytes())
                            .map_err(|e| e.to_string())?,)*
                        _lib: lib,
                    })
                }
            }
        }
    };
}

api! {
    rados_create2: fn(*mut RadosT, *const c_char, *const c_char, u64) -> c_int;
    rados_conf_read_file: fn(RadosT, *const c_char) -> c_int;
    rados_conf_set: fn(RadosT, *const c_char, *const c_char) -> c_int;
    rados_connect: fn(RadosT) -> c_int;
    rados_shutdown: fn(RadosT);
    rados_ioctx_create: fn(RadosT, *const c_char, *mut IoCtxT) -> c_int;
    rados_ioctx_destroy: fn(IoCtxT);
    rados_ioctx_set_namespace: fn(IoCtxT, *const c_char);
    rbd_create4: fn(IoCtxT, *const c_char, u64, OptionsT) -> c_int;
    rbd_image_options_create: fn(*mut OptionsT);
    rbd_image_options_set_uint64: fn(OptionsT, c_int, u64) -> c_int;
    rbd_image_options_destroy: fn(OptionsT);
    rbd_open: fn(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    rbd_close: fn(ImageT) -> c_int;
    rbd_remove: fn(IoCtxT, *const c_char) -> c_int;
    rbd_stat: fn(ImageT, *mut ImageInfo, usize) -> c_int;
    rbd_resize: fn(ImageT, u64) -> c_int;
    rbd_get_features: fn(ImageT, *mut u64) -> c_int;
    rbd_aio_create_completion: fn(*mut c_void, Callback, *mut CompletionT) -> c_int;
    rbd_aio_get_return_value: fn(CompletionT) -> isize;
    rbd_aio_release: fn(CompletionT);
    rbd_aio_write2: fn(ImageT, u64, usize, *const c_char, CompletionT, c_int) -> c_int;
    rbd_aio_write_zeroes: fn(ImageT, u64, usize, CompletionT, c_int, c_int) -> c_int;
    rbd_aio_read: fn(ImageT, u64, usize, *mut c_char, CompletionT) -> c_int;
    rbd_aio_flush: fn(ImageT, CompletionT) -> c_int;
    rbd_snap_create: fn(ImageT, *const c_char) -> c_int;
    rbd_snap_list: fn(ImageT, *mut SnapInfo, *mut c_int) -> c_int;
    rbd_snap_list_end: fn(*mut SnapInfo);
    rbd_snap_remove: fn(ImageT, *const c_char) -> c_int;
    rbd_snap_rollback: fn(ImageT, *const c_char) -> c_int;
    rbd_metadata_set: fn(ImageT, *const c_char, *const c_char) -> c_int;
    rbd_metadata_get: fn(ImageT, *const c_char, *mut c_char, *mut usize) -> c_int;
    rbd_metadata_remove: fn(ImageT, *const c_char) -> c_int;
    rbd_diff_iterate2: fn(ImageT, *const c_char, u64, u64, u8, u8, DiffCallback, *mut c_void) -> c_int;
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn api() -> Result<&'static Api, RbdError> {
    API.get_or_init(Api::load).as_ref().map_err(|e| RbdError::Library(e.clone()))
}

/// A failed librados/librbd call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RbdError {
    #[error("cannot load librbd ({0}); install Ceph's client libraries (Debian: apt install librbd1)")]
    Library(String),
    #[error("{op}: {}", describe(*.errno))]
    Call { op: String, errno: i32 },
    #[error("{0}")]
    Invalid(String),
}

impl RbdError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            RbdError::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn describe(errno: i32) -> String {
    let base = std::io::Error::from_raw_os_error(errno).to_string();
    match errno {
        libc::ETIMEDOUT => format!("{base} (is the cluster reachable? check mon host in the Ceph config)"),
        libc::EACCES | libc::EPERM => format!("{base} (check --ceph-id / --keyring and the client's caps)"),
        _ => base,
    }
}

fn check(op: impl Into<String>, ret: c_int) -> Result<c_int, RbdError> {
    if ret < 0 {
        Err(RbdError::Call { op: op.into(), errno: -ret })
    } else {
        Ok(ret)
    }
}

fn cstr(s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Invalid(format!("{s:?} contains a NUL byte")))
}

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
    ptr: IoCtxT,
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
        Ok(Image { inner: Arc::new(ImageInner { ptr, _ioctx: self.clone() }) })
    }

    /// Remove an image (blocking; fails while it has snapshots).
    pub fn remove(&self, name: &str) -> Result<(), RbdError> {
        let n = cstr(name)?;
        // SAFETY: valid ioctx and C string.
        check(format!("removing image {name:?}"), unsafe { (api()?.rbd_remove)(self.ptr, n.as_ptr()) })?;
        Ok(())
    }
}

struct ImageInner {
    ptr: ImageT,
    _ioctx: Arc<IoCtx>,
}

// SAFETY: librbd image handles support concurrent aio from several threads.
unsafe impl Send for ImageInner {}
unsafe impl Sync for ImageInner {}

impl Drop for ImageInner {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: in-flight requests hold an Arc<ImageInner>, so none is pending.
            unsafe { (api.rbd_close)(self.ptr) };
        }
    }
}

/// An open image. Cheap to clone.
#[derive(Clone)]
pub struct Image {
    inner: Arc<ImageInner>,
}

/// A changed (or, without a base snapshot, allocated) extent from `rbd_diff_iterate2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
    /// False: the range was discarded / reads as zeros.
    pub exists: bool,
}

/// What an aio callback hands back.
type AioResult = (isize, Option<Vec<u8>>);

/// Owned by the completion until its callback runs.
struct AioCtx {
    tx: Option<oneshot::Sender<AioResult>>,
    /// Write payload, kept alive until librbd is done with it.
    _write: Option<Bytes>,
    /// Read buffer, handed back with the result.
    read: Option<Vec<u8>>,
    _image: Arc<ImageInner>,
}

unsafe extern "C" fn aio_done(c: CompletionT, arg: *mut c_void) {
    // SAFETY: arg is the Box<AioCtx> leaked in `submit`, reclaimed exactly once here; the API
    // was loaded before any completion could exist.
    unsafe {
        let mut ctx = Box::from_raw(arg as *mut AioCtx);
        let ret = match api() {
            Ok(api) => {
                let r = (api.rbd_aio_get_return_value)(c);
                (api.rbd_aio_release)(c);
                r
            }
            Err(_) => -(libc::EIO as isize),
        };
        if let Some(tx) = ctx.tx.take() {
            let _ = tx.send((ret, ctx.read.take()));
        }
    }
}

impl Image {
    fn ptr(&self) -> ImageT {
        self.inner.ptr
    }

    /// Submit an aio request: `start` gets the completion and the request's context (whose
    /// buffers librbd may use until the callback). Synchronous, so no raw pointer lives across
    /// an await.
    fn submit(
        &self,
        op: &str,
        write: Option<Bytes>,
        read: Option<Vec<u8>>,
        start: impl FnOnce(&Api, ImageT, CompletionT, &mut AioCtx) -> c_int,
    ) -> Result<oneshot::Receiver<AioResult>, RbdError> {
        let api = api()?;
        let (tx, rx) = oneshot::channel();
        let ctx =
            Box::into_raw(Box::new(AioCtx { tx: Some(tx), _write: write, read, _image: self.inner.clone() }));
        let mut c: CompletionT = std::ptr::null_mut();
        // SAFETY: ctx stays valid until aio_done reclaims it.
        let r = unsafe { (api.rbd_aio_create_completion)(ctx as *mut c_void, aio_done, &mut c) };
        if r < 0 {
            // SAFETY: the completion was not created, so the callback will never run.
            drop(unsafe { Box::from_raw(ctx) });
            return Err(RbdError::Call { op: op.to_string(), errno: -r });
        }
        // SAFETY: ctx is exclusively ours until the request is submitted.
        let r = start(api, self.ptr(), c, unsafe { &mut *ctx });
        if r < 0 {
            // SAFETY: submission failed, so the callback will not run: release both here.
            unsafe {
                (api.rbd_aio_release)(c);
                drop(Box::from_raw(ctx));
            }
            return Err(RbdError::Call { op: op.to_string(), errno: -r });
        }
        Ok(rx)
    }

    async fn wait(op: String, rx: oneshot::Receiver<AioResult>) -> Result<AioResult, RbdError> {
        let (ret, buf) = rx.await.map_err(|_| RbdError::Invalid(format!("{op}: completion lost")))?;
        if ret < 0 {
            return Err(RbdError::Call { op, errno: (-ret) as i32 });
        }
        Ok((ret, buf))
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), RbdError> {
        let op = format!("write {} bytes at {offset}", data.len());
        let rx = self.submit(&op, Some(data), None, |api, image, c, ctx| {
            let buf = ctx._write.as_ref().expect("write buffer");
            // SAFETY: the buffer lives in the completion's context until the callback.
            unsafe { (api.rbd_aio_write2)(image, offset, buf.len(), buf.as_ptr() as *const c_char, c, 0) }
        })?;
        Self::wait(op, rx).await.map(|_| ())
    }

    /// Make the range read as zeros (deallocating whole objects where possible).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), RbdError> {
        let n = usize::try_from(len).map_err(|_| RbdError::Invalid("zero extent too large".into()))?;
        let op = format!("zero {len} bytes at {offset}");
        let rx = self.submit(&op, None, None, |api, image, c, _| {
            // SAFETY: valid image and completion.
            unsafe { (api.rbd_aio_write_zeroes)(image, offset, n, c, 0, 0) }
        })?;
        Self::wait(op, rx).await.map(|_| ())
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, RbdError> {
        let op = format!("read {len} bytes at {offset}");
        let rx = self.submit(&op, None, Some(vec![0u8; len]), |api, image, c, ctx| {
            let dst = ctx.read.as_mut().expect("read buffer").as_mut_ptr() as *mut c_char;
            // SAFETY: dst points into the buffer owned by the completion's context.
            unsafe { (api.rbd_aio_read)(image, offset, len, dst, c) }
        })?;
        let (n, buf) = Self::wait(op, rx).await?;
        let buf = buf.ok_or_else(|| RbdError::Invalid("read buffer lost".into()))?;
        if n as usize != len {
            return Err(RbdError::Invalid(format!("short read at {offset}: {n} of {len} bytes")));
        }
        Ok(buf)
    }

    /// Flush every completed write to the OSDs.
    pub async fn flush(&self) -> Result<(), RbdError> {
        let rx = self.submit("flush", None, None, |api, image, c, _| {
            // SAFETY: valid image and completion.
            unsafe { (api.rbd_aio_flush)(image, c) }
        })?;
        Self::wait("flush".into(), rx).await.map(|_| ())
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
    //! Against the real test cluster (`scripts/ceph-up.sh`); skipped without CEPH_CONF unless
    //! BLOCKSHIP_REQUIRE_CEPH=1 makes a missing cluster a failure.
    use super::*;

    pub(crate) fn cluster() -> Option<Arc<Rados>> {
        let conf = match std::env::var("CEPH_CONF") {
            Ok(c) => c,
            Err(_) => {
                assert!(
                    std::env::var("BLOCKSHIP_REQUIRE_CEPH").is_err(),
                    "BLOCKSHIP_REQUIRE_CEPH set but CEPH_CONF is not"
                );
                eprintln!("skipped: no CEPH_CONF (start one with scripts/ceph-up.sh)");
                return None;
            }
        };
        let opts = ConnectOptions {
            conf: Some(Path::new(&conf)),
            id: "admin",
            keyring: None,
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(60),
        };
        Some(Arc::new(Rados::connect(&opts).expect("connect to the test cluster")))
    }

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

    #[test]
    fn missing_pool_is_reported() {
        let Some(rados) = cluster() else { return };
        let err = rados.ioctx("no-such-pool", None).err().unwrap();
        assert_eq!(err.errno(), Some(libc::ENOENT));
        assert!(err.to_string().contains("no-such-pool"), "{err}");
    }
}
