//! Minimal safe bindings to librados/librbd, Blockship's only FFI. The library is
//! loaded with `dlopen` on first use (`librbd.so.1`), so the sink builds without Ceph headers
//! and runs without Ceph unless an `rbd:` target is used. No crate fits: `librbd-sys` lacks
//! `rbd_diff_iterate2`/`rbd_write2`, the bindgen crates need libclang at build time. The C API
//! used here needs librbd from Ceph 15.2.5 (Octopus) or later, checked when the library is
//! loaded; prototypes follow `rbd/librbd.h` and `rados/librados.h`.
//!
//! Modules: `api` (the dlopen'd function table and C layouts), `rados` (cluster and pool
//! handles), `image` (an open image and its blocking operations), `aio` (asynchronous data I/O
//! through librbd completions), `error` (`RbdError`), `spec` (image names, `RbdSpec`); the test-only `layout` checks the C
//! struct layouts against the librbd headers.

mod aio;
mod api;
mod error;
mod image;
#[cfg(test)]
mod layout;
mod rados;
mod spec;

pub use api::{
    FEATURE_DEEP_FLATTEN, FEATURE_EXCLUSIVE_LOCK, FEATURE_FAST_DIFF, FEATURE_LAYERING, FEATURE_OBJECT_MAP,
};
pub use error::RbdError;
pub use image::{DiffExtent, Image};
pub use rados::{ConnectOptions, IoCtx, Rados};
pub use spec::{RbdSpec, SpecError};

#[cfg(test)]
mod testing;
