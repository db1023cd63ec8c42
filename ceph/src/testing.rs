//! Shared test helpers. Tests run against the real test cluster (`scripts/ceph-up.sh`) and, for
//! the checks against the C side, the system's C compiler and librbd headers. Without them a
//! test says why it is skipped; BLOCKSHIP_REQUIRE_CEPH=1 (set by CI) turns that into a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
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

/// Something a test needs from the system is missing: a failure when CI demands the Ceph tests
/// (BLOCKSHIP_REQUIRE_CEPH), otherwise a visible skip.
pub(crate) fn unavailable(why: &str) {
    let hint = "install the test dependencies with `bash scripts/deps.sh test` \
                (Debian packages build-essential, librbd-dev)";
    assert!(
        std::env::var_os("BLOCKSHIP_REQUIRE_CEPH").is_none(),
        "{why}; {hint} (BLOCKSHIP_REQUIRE_CEPH is set)"
    );
    eprintln!("skipped: {why}; {hint}");
}

/// Run `cc` with `args` in `dir`: Ok(None) when it succeeded, Ok(Some(stderr)) when it failed,
/// Err when there is no `cc` to run.
pub(crate) fn cc(dir: &Path, args: &[&str]) -> Result<Option<String>, std::io::Error> {
    let out = Command::new("cc").current_dir(dir).args(args).output()?;
    Ok((!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// A scratch directory, removed however the test ends.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("blockship-ceph-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
