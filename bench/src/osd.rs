//! The only OSD of the one-host cluster `scripts/ceph-up.sh` starts, as a thing to kill: the
//! chaos loop restarts it as its third kind of fault, and the OSD-outage tests stop it mid-sync.
//! A handle left with the OSD stopped starts it again when dropped, so a failing test does not
//! leave the cluster down for the next one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Osd {
    /// The cluster's directory (`BLOCKSHIP_CEPH_DIR`, default /tmp/blockship-ceph).
    dir: PathBuf,
    conf: String,
    stopped: bool,
}

impl Osd {
    /// OSD 0 of the cluster whose configuration is `conf`.
    pub fn of(conf: &str) -> Osd {
        let dir = std::env::var("BLOCKSHIP_CEPH_DIR").unwrap_or_else(|_| "/tmp/blockship-ceph".into());
        Osd { dir: PathBuf::from(dir), conf: conf.to_string(), stopped: false }
    }

    fn pid(&self) -> Result<i32> {
        let f = self.dir.join("run/ceph-osd.0.pid");
        std::fs::read_to_string(&f)
            .with_context(|| format!("{}: is the cluster of scripts/ceph-up.sh running?", f.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{}: not a pid", f.display()))
    }

    /// SIGKILL the OSD and wait (up to 10 s) until its process is gone.
    pub fn kill(&mut self) -> Result<()> {
        let pid = self.pid()?;
        // SAFETY: signalling the test cluster's OSD process.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            bail!("cannot kill the OSD (pid {pid}): {}", std::io::Error::last_os_error());
        }
        self.stopped = true;
        let gone = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > gone {
                bail!("the OSD (pid {pid}) is still there 10 s after SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Start the OSD again (`ceph-osd` daemonizes once it is up).
    pub fn start(&mut self) -> Result<()> {
        let status = Command::new("ceph-osd")
            .args(["-c", &self.conf, "-i", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("ceph-osd")?;
        if !status.success() {
            bail!("ceph-osd did not start again ({status})");
        }
        self.stopped = false;
        Ok(())
    }
}

impl Drop for Osd {
    fn drop(&mut self) {
        if self.stopped {
            if let Err(e) = self.start() {
                eprintln!("the OSD stays down: {e:#}");
            }
        }
    }
}
