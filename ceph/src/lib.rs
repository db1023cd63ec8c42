//! Minimal safe bindings to librados/librbd, Blockship's only FFI. The library is
//! loaded with `dlopen` on first use (`librbd.so.1`), so the sink builds without Ceph headers
//! and runs without Ceph unless an `rbd:` target is used. No crate fits: `librbd-sys` lacks
//! `rbd_diff_iterate2`/`rbd_write2`, the bindgen crates need libclang at build time. The C API
//! used here is stable since Octopus; prototypes follow `rbd/librbd.h` and `rados/librados.h`.
//!
//! Modules: `api` (the dlopen'd function table and C layouts), `rados` (cluster and pool
//! handles), `image` (an open image and its blocking operations), `aio` (asynchronous data I/O
//! through librbd completions), `error` (`RbdError`); the test-only `layout` checks the C
//! struct layouts against the librbd headers.

mod aio;
mod api;
mod error;
mod image;
#[cfg(test)]
mod layout;
mod rados;

pub use api::{
    FEATURE_DEEP_FLATTEN, FEATURE_EXCLUSIVE_LOCK, FEATURE_FAST_DIFF, FEATURE_LAYERING, FEATURE_OBJECT_MAP,
};
pub use error::RbdError;
pub use image::{DiffExtent, Image};
pub use rados::{ConnectOptions, IoCtx, Rados};

#[cfg(test)]
mod testing {
    //! Tests run against the real test cluster (`scripts/ceph-up.sh`); they are skipped without
    //! CEPH_CONF unless BLOCKSHIP_REQUIRE_CEPH=1 makes a missing cluster a failure.

    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::{ConnectOptions, Rados};

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
}
