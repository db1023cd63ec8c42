//! How a failed librados/librbd call is reported: the operation in words plus the errno, with a
//! hint for the errnos an operator can act on (an unreachable cluster, missing caps), and the
//! small helpers every call site uses to turn C return codes and Rust strings into that form.

use std::ffi::{c_int, CString};

use crate::api::{version_string, MIN_CEPH, MIN_LIBRBD};

/// A failed librados/librbd call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RbdError {
    #[error("cannot load librbd ({0}); install Ceph's client libraries (Debian: apt install librbd1)")]
    Library(String),
    #[error(
        "librbd {found} is too old: Blockship needs librbd {min} or newer, from Ceph {MIN_CEPH} or \
         later; upgrade this host's Ceph client libraries (librbd1: Debian 12 ships Pacific; on older \
         systems use Ceph's own packages from download.ceph.com)",
        min = version_string(MIN_LIBRBD)
    )]
    TooOld { found: String },
    #[error(
        "librbd {found} lacks {symbol}, which Blockship needs: upgrade this host's Ceph client \
         libraries (librbd1) to Ceph {MIN_CEPH} or later"
    )]
    Incomplete { found: String, symbol: &'static str },
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
        libc::ETIMEDOUT => format!("{base} (the cluster did not answer in time: is it reachable (mon host in the Ceph config), are its OSDs up (ceph -s)?)"),
        libc::EACCES | libc::EPERM => format!("{base} (check --ceph-id / --keyring and the client's caps)"),
        _ => base,
    }
}

pub(crate) fn check(op: impl Into<String>, ret: c_int) -> Result<c_int, RbdError> {
    if ret < 0 {
        Err(RbdError::Call { op: op.into(), errno: -ret })
    } else {
        Ok(ret)
    }
}

pub(crate) fn cstr(s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Invalid(format!("{s:?} contains a NUL byte")))
}
