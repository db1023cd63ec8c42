//! QEMU helpers for tests: `qemu-img`/`qemu-io` commands, a `qemu-nbd` export that is killed on
//! drop, and a tiny QMP client for `qemu-storage-daemon` (the "running VM" of the live tests).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// Whether the QEMU/NBD tools are here; without them the tests skip unless
/// BLOCKSHIP_REQUIRE_NBD=1 makes that a failure.
pub fn available() -> bool {
    let ok =
        ["qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdcopy", "nbdkit"].iter().all(|t| {
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if !ok {
        assert!(
            std::env::var("BLOCKSHIP_REQUIRE_NBD").is_err(),
            "BLOCKSHIP_REQUIRE_NBD is set but QEMU/NBD tools are missing"
        );
        eprintln!("skipped: qemu-utils / libnbd-bin not installed");
    }
    ok
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_io(image: &str, fmt: &str, cmds: &[String]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    run("qemu-io", &args);
}

/// A qemu-nbd export on a Unix socket, killed on drop.
pub struct Export {
    child: Child,
    pub uri: String,
}

impl Export {
    /// Read-only export of `image` (`fmt` raw or qcow2), optionally with dirty bitmap `bitmap`.
    pub fn start(dir: &Path, image: &Path, fmt: &str, bitmap: Option<&str>) -> Export {
        let sock = dir.join(format!(
            "nbd-{}.sock",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-r", "-t", "--shared", "8", "-f", fmt, "--socket"]).arg(&sock);
        if let Some(b) = bitmap {
            cmd.args(["-B", b]);
        }
        cmd.arg(image);
        Export::spawn(cmd, sock, "")
    }

    /// Read-only export of a raw `image` by nbdkit's file plugin, under export name `name`.
    pub fn nbdkit(dir: &Path, image: &Path, name: &str) -> Export {
        let sock = dir.join(format!(
            "nbdkit-{}.sock",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--readonly", "-U"]).arg(&sock).arg("--exportname").arg(name).arg("file").arg(image);
        Export::spawn(cmd, sock, name)
    }

    fn spawn(mut cmd: Command, sock: PathBuf, name: &str) -> Export {
        let image = format!("{cmd:?}");
        let child = cmd.spawn().unwrap();
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        let mut e = Export { child, uri };
        for _ in 0..200 {
            if sock.exists() {
                return e;
            }
            if let Ok(Some(st)) = e.child.try_wait() {
                panic!("{image} exited {st} before serving");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("qemu-nbd did not create {}", sock.display());
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copy an NBD export into a raw file (to compare a frozen view with a target).
pub fn nbd_to_file(uri: &str, out: &Path) {
    let _ = std::fs::remove_file(out);
    run("nbdcopy", &[uri, out.to_str().unwrap()]);
}

/// A QMP connection to qemu-storage-daemon.
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    pub fn connect(sock: &Path) -> Qmp {
        let mut s = None;
        for _ in 0..200 {
            if let Ok(c) = UnixStream::connect(sock) {
                s = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let s = s.expect("QMP socket");
        let mut q = Qmp { r: BufReader::new(s.try_clone().unwrap()), w: s };
        q.read(); // greeting
        q.cmd(serde_json::json!({"execute": "qmp_capabilities"}));
        q
    }

    fn read(&mut self) -> serde_json::Value {
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Run a command; panics on a QMP error.
    pub fn cmd(&mut self, c: serde_json::Value) -> serde_json::Value {
        let r = self.try_cmd(c.clone());
        r.unwrap_or_else(|e| panic!("QMP {c}: {e}"))
    }

    /// Run a command; a QMP error comes back as Err.
    pub fn try_cmd(&mut self, c: serde_json::Value) -> Result<serde_json::Value, serde_json::Value> {
        writeln!(self.w, "{c}").unwrap();
        let r = self.read();
        match r.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(r),
        }
    }
}

/// qemu-storage-daemon running `image` (qcow2) as node `disk0`, exported writable as `vm` and
/// with a QMP monitor; killed on drop.
pub struct StorageDaemon {
    child: Child,
    pub qmp: Qmp,
    pub nbd_sock: PathBuf,
    pub dir: PathBuf,
}

impl StorageDaemon {
    pub fn start(dir: &Path, image: &Path) -> StorageDaemon {
        let nbd_sock = dir.join("qsd.sock");
        let qmp_sock = dir.join("qmp.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
            .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd_sock.display()))
            .args(["--export", "type=nbd,id=vm,node-name=disk0,name=vm,writable=on"])
            .arg("--chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=qmp0", qmp_sock.display()))
            .args(["--monitor", "chardev=qmp0"])
            .spawn()
            .unwrap();
        let qmp = Qmp::connect(&qmp_sock);
        StorageDaemon { child, qmp, nbd_sock, dir: dir.to_path_buf() }
    }

    pub fn export_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.nbd_sock.display())
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
