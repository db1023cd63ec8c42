//! The C side of the bindings: the types and struct layouts from `rbd/librbd.h` and
//! `rados/librados.h`, and the table of function pointers resolved from `librbd.so.1` (and the
//! librados it links) on first use, after checking that the library is recent enough to have
//! them all. Everything else in the crate reaches librbd only through [`api()`], so a host
//! without a suitable librbd fails with one clear error instead of at link time.

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
pub(crate) const IMAGE_OPTION_CLONE_FORMAT: c_int = 12;

/// A librbd version as `rbd_version` reports it: (LIBRBD_VER_MAJOR, _MINOR, _EXTRA).
pub(crate) type Version = (c_int, c_int, c_int);

/// The oldest librbd accepted, and the Ceph release that ships it.
///
/// Every function in the table below is in Luminous (librbd 1.12.0) except
/// rbd_aio_write_zeroes, which came with Pacific (16.2.0, librbd 1.16.0) and was backported to
/// Octopus 15.2.5 (ceph/ceph#36247) and Nautilus 14.2.11 (ceph/ceph#36250). rbd_version does not
/// tell point releases apart (every Octopus reports 1.15.0, every Pacific 1.16.0; Luminous reports
/// 1.12.0), so the version check refuses everything before Octopus, and an Octopus before
/// 15.2.5 is refused when rbd_aio_write_zeroes does not resolve (`RbdError::Incomplete` names
/// it). A late Nautilus would work but cannot be told from an early one, and is end-of-life.
pub(crate) const MIN_LIBRBD: Version = (1, 15, 0);
pub(crate) const MIN_CEPH: &str = "15.2.5 (Octopus)";

pub(crate) fn version_string((major, minor, extra): Version) -> String {
    format!("{major}.{minor}.{extra}")
}

/// Refuse a librbd older than [`MIN_LIBRBD`].
pub(crate) fn check_version(found: Version) -> Result<(), RbdError> {
    if found >= MIN_LIBRBD {
        Ok(())
    } else {
        Err(RbdError::TooOld { found: version_string(found) })
    }
}

/// libloading's errors say only "dlopen failed"; the reason (file not found, a missing
/// dependency, an undefined symbol) is in their source.
fn dl_error(e: libloading::Error) -> String {
    match std::error::Error::source(&e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

macro_rules! api {
    ($($name:ident: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// Function pointers resolved from librbd (and the librados it links).
        pub(crate) struct Api {
            $(pub(crate) $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
            /// What rbd_version reported (the tests show it).
            #[cfg(test)]
            pub(crate) version: Version,
            _lib: libloading::Library,
        }

        /// The names of every function the bindings resolve.
        #[cfg(test)]
        pub(crate) const SYMBOLS: &[&str] = &[$(stringify!($name)),*];

        impl Api {
            fn load() -> Result<Api, RbdError> {
                Api::load_from("librbd.so.1".as_ref())
            }

            /// Load librbd from `path`, check its version, then resolve the table. The version
            /// comes first so that an old library is refused with the minimum it needs rather
            /// than with whichever newer function it happens to lack.
            fn load_from(path: &std::ffi::OsStr) -> Result<Api, RbdError> {
                // SAFETY: loading librbd runs its initialisers, which have no preconditions; each
                // symbol is cast to the prototype declared in the librbd/librados headers
                // (rbd_version: `void rbd_version(int *major, int *minor, int *extra)`, in every
                // librbd).
                unsafe {
                    let lib = libloading::Library::new(path).map_err(|e| RbdError::Library(dl_error(e)))?;
                    let rbd_version = *lib
                        .get::<unsafe extern "C" fn(*mut c_int, *mut c_int, *mut c_int)>(b"rbd_version\0")
                        .map_err(|e| RbdError::Library(dl_error(e)))?;
                    let mut version: Version = (0, 0, 0);
                    rbd_version(&mut version.0, &mut version.1, &mut version.2);
                    check_version(version)?;
                    let incomplete = |symbol| RbdError::Incomplete { found: version_string(version), symbol };
                    Ok(Api {
                        $($name: *lib
                            .get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(concat!(stringify!($name), "\0").as_bytes())
                            .map_err(|_| incomplete(stringify!($name)))?,)*
                        #[cfg(test)]
                        version,
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
    rbd_is_exclusive_lock_owner: fn(ImageT, *mut c_int) -> c_int;
    rbd_lock_acquire: fn(ImageT, c_int) -> c_int;
    rbd_lock_release: fn(ImageT) -> c_int;
    rbd_lock_get_owners: fn(ImageT, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
    rbd_lock_get_owners_cleanup: fn(*mut *mut c_char, usize);
    rbd_lock_break: fn(ImageT, c_int, *const c_char) -> c_int;
    rbd_get_id: fn(ImageT, *mut c_char, usize) -> c_int;
    rados_list_lockers: fn(IoCtxT, *const c_char, *const c_char, *mut c_int, *mut c_char, *mut usize, *mut c_char, *mut usize, *mut c_char, *mut usize, *mut c_char, *mut usize) -> isize;
    rados_break_lock: fn(IoCtxT, *const c_char, *const c_char, *const c_char, *const c_char) -> c_int;
    rbd_clone3: fn(IoCtxT, *const c_char, *const c_char, IoCtxT, *const c_char, OptionsT) -> c_int;
    rbd_snap_protect: fn(ImageT, *const c_char) -> c_int;
    rbd_snap_unprotect: fn(ImageT, *const c_char) -> c_int;
}

/// `RBD_LOCK_MODE_EXCLUSIVE` of `rbd_lock_mode_t`.
pub(crate) const LOCK_MODE_EXCLUSIVE: c_int = 0;

static API: OnceLock<Result<Api, RbdError>> = OnceLock::new();

pub(crate) fn api() -> Result<&'static Api, RbdError> {
    API.get_or_init(Api::load).as_ref().map_err(RbdError::clone)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{api, check_version, version_string, Api, MIN_LIBRBD, SYMBOLS};
    use crate::testing::{cc, unavailable, Scratch};
    use crate::RbdError;

    #[test]
    fn version_check_refuses_anything_before_octopus() {
        for old in [(0, 1, 8), (1, 12, 0), (1, 14, 99)] {
            let err = check_version(old).unwrap_err();
            assert!(matches!(&err, RbdError::TooOld { found } if *found == version_string(old)), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("needs librbd 1.15.0 or newer, from Ceph 15.2.5 (Octopus)"), "{msg}");
        }
        for new in [MIN_LIBRBD, (1, 15, 1), (1, 16, 0), (1, 19, 0), (2, 0, 0)] {
            assert!(check_version(new).is_ok(), "{new:?} refused");
        }
    }

    /// The librbd this host has (Debian 12: Pacific, 1.16.0) loads and passes the check.
    #[test]
    fn installed_librbd_is_supported() {
        match api() {
            Ok(api) => eprintln!("librbd {} loaded", version_string(api.version)),
            Err(RbdError::Library(e)) => unavailable(&format!("no librbd to load ({e})")),
            Err(e) => panic!("the installed librbd is refused: {e}"),
        }
    }

    /// Build a stand-in librbd in `scratch` that reports `version` from rbd_version and exports
    /// every function the bindings use except `missing` (never called: only resolved). None when
    /// there is no C compiler.
    fn fake_librbd(scratch: &Scratch, version: (i32, i32, i32), missing: &[&str]) -> Option<PathBuf> {
        let (major, minor, extra) = version;
        let mut src = format!(
            "void rbd_version(int *major, int *minor, int *extra) {{ *major = {major}; *minor = {minor}; \\
             *extra = {extra}; }}\n"
        );
        for name in SYMBOLS.iter().filter(|n| !missing.contains(n)) {
            src += &format!("void {name}(void) {{}}\n");
        }
        let name = format!("libfakerbd-{major}.{minor}.{extra}.so");
        std::fs::write(scratch.path().join("fake.c"), src).unwrap();
        match cc(scratch.path(), &["-shared", "-fPIC", "-o", &name, "fake.c"]) {
            Err(e) => {
                unavailable(&format!("cannot run the C compiler `cc` ({e})"));
                None
            }
            Ok(Some(stderr)) => panic!("the fake librbd does not compile:\n{stderr}"),
            Ok(None) => Some(scratch.path().join(name)),
        }
    }

    /// Luminous to Nautilus report librbd 1.12.0 and (before Nautilus 14.2.11) lack
    /// rbd_aio_write_zeroes; Octopus before 15.2.5 reports 1.15.0 and lacks it too. Both must be
    /// refused with a message naming what is needed, not a bare dlsym error.
    #[test]
    fn old_librbd_is_refused_with_the_minimum_version() {
        let scratch = Scratch::new("old-librbd");
        let Some(luminous) = fake_librbd(&scratch, (1, 12, 0), &["rbd_aio_write_zeroes"]) else { return };
        let err = Api::load_from(luminous.as_os_str()).err().expect("librbd 1.12.0 was accepted").to_string();
        for needed in ["librbd 1.12.0", "1.15.0", "Octopus", "15.2.5"] {
            assert!(err.contains(needed), "librbd 1.12.0: the error does not mention {needed:?}: {err}");
        }

        let Some(octopus) = fake_librbd(&scratch, (1, 15, 0), &["rbd_aio_write_zeroes"]) else { return };
        let err = Api::load_from(octopus.as_os_str())
            .err()
            .expect("an Octopus librbd without write_zeroes was accepted");
        let err = err.to_string();
        for needed in ["librbd 1.15.0", "rbd_aio_write_zeroes", "15.2.5"] {
            assert!(err.contains(needed), "librbd 1.15.0: the error does not mention {needed:?}: {err}");
        }

        let Some(pacific) = fake_librbd(&scratch, (1, 16, 0), &[]) else { return };
        if let Err(e) = Api::load_from(pacific.as_os_str()) {
            panic!("librbd 1.16.0 with every function was refused: {e}");
        }
    }
}
