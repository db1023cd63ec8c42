//! A stand-in for a running VM: a `qemu-storage-daemon` with qcow2 disks `disk0..N` (block nodes
//! of those names), writable NBD exports `vm0..N` on a Unix socket (the guest's writes go
//! through them, so QEMU's dirty bitmaps see them) and a QMP monitor. It can be shut down
//! cleanly and restarted, or crashed and restarted. Used by the `continuous` scenario and by the
//! agent's daemon tests; killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::proc;

pub struct Vm {
    child: Child,
    pub qmp: PathBuf,
    pub nbd: PathBuf,
    pub images: Vec<PathBuf>,
    args: Vec<String>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    /// Create `disks` qcow2 images of `size` bytes in `dir` and start the daemon on them.
    pub fn start(dir: &Path, disks: usize, size: u64) -> Result<Vm> {
        std::fs::create_dir_all(dir)?;
        let (qmp, nbd) = (dir.join("qmp.sock"), dir.join("nbd.sock"));
        // The NBD server must exist before the exports.
        let mut args =
            vec!["--nbd-server".to_string(), format!("addr.type=unix,addr.path={}", nbd.display())];
        let mut images = Vec::new();
        for i in 0..disks {
            let img = dir.join(format!("disk{i}.qcow2"));
            proc::run_ok(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&img)
                    .arg(size.to_string()),
            )?;
            args.extend([
                "--blockdev".into(),
                format!("driver=file,node-name=file{i},filename={}", img.display()),
                "--blockdev".into(),
                format!("driver=qcow2,node-name=disk{i},file=file{i}"),
                "--export".into(),
                format!("type=nbd,id=vm{i},node-name=disk{i},name=vm{i},writable=on"),
            ]);
            images.push(img);
        }
        args.extend([
            "--chardev".into(),
            format!("socket,path={},server=on,wait=off,id=qmp0", qmp.display()),
            "--monitor".into(),
            "chardev=qmp0".into(),
        ]);
        let child = spawn(&args, &qmp, &nbd)?;
        Ok(Vm { child, qmp, nbd, images, args })
    }

    /// The writable NBD export of disk `i`.
    pub fn export_uri(&self, i: usize) -> String {
        format!("nbd+unix:///vm{i}?socket={}", self.nbd.display())
    }

    /// Shut the VM down cleanly (SIGTERM: persistent bitmaps are stored) and start it again.
    pub fn restart(&mut self) -> Result<()> {
        // SAFETY: signalling a child process we started.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
        self.child = spawn(&self.args, &self.qmp, &self.nbd)?;
        Ok(())
    }

    /// Crash the VM (SIGKILL: bitmaps it had loaded stay marked in use) and start it again.
    pub fn crash_and_restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.args, &self.qmp, &self.nbd)?;
        Ok(())
    }
}

fn spawn(args: &[String], qmp: &Path, nbd: &Path) -> Result<Child> {
    let _ = std::fs::remove_file(qmp);
    let _ = std::fs::remove_file(nbd);
    let mut child = Command::new("qemu-storage-daemon")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-storage-daemon (apt install qemu-system-common)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(qmp.exists() && nbd.exists()) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("qemu-storage-daemon did not start ({})", qmp.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}
