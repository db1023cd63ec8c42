//! The C side of the bindings: the types and struct layouts from `rbd/librbd.h` and
//! `rados/librados.h`, and the table of function pointers resolved from `librbd.so.1` (and the
//! librados it links) on first use. Everything else in the crate reaches librbd only through
//! [`api()`], so a host without Ceph fails with one clear error instead of at link time.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use crate::RbdError;

pub(crate) type RadosT = *mut c_void;
pub(crate) type IoCtxT = *mut c_void;
pub(crate) type ImageT = *mut c_void;
pub(crate) type CompletionT = *mut c_void;
pub(crate) type OptionsT = *mut c_void;
pub(crate) type Callback = unsafe extern "C" fn(CompletionT, *mut c_void);
pub(crate) type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `rbd_image_info_t` (only `size` is read; the layout must still match).
#[repr(C)]
pub(crate) struct ImageInfo {
    pub(crate) size: u64,
    pub(crate) obj_size: u64,
    pub(crate) num_objs: u64,
    pub(crate) order: c_int,
    pub(crate) block_name_prefix: [c_char; 24],
    pub(crate) parent_pool: i64,
    pub(crate) parent_name: [c_char; 96],
}

/// `rbd_snap_info_t`.
#[repr(C)]
pub(crate) struct SnapInfo {
    pub(crate) id: u64,
    pub(crate) size: u64,
    pub(crate) name: *const c_char,
}

pub const FEATURE_LAYERING: u64 = 1;
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 4;
pub const FEATURE_OBJECT_MAP: u64 = 8;
pub const FEATURE_FAST_DIFF: u64 = 16;
pub const FEATURE_DEEP_FLATTEN: u64 = 32;
pub(crate) const IMAGE_OPTION_FEATURES: c_int = 1;

macro_rules! api {
    ($($name:ident: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// Function pointers resolved from librbd (and the librados it links).
        pub(crate) struct Api {
            $(pub(crate) $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
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

pub(crate) fn api() -> Result<&'static Api, RbdError> {
    API.get_or_init(Api::load).as_ref().map_err(|e| RbdError::Library(e.clone()))
}
