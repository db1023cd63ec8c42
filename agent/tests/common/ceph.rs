//! The test Ceph cluster (`scripts/ceph-up.sh`; CEPH_CONF etc. in the environment): `rbd`
//! commands, exports, a sink with the restricted client, and images unique to a test run that
//! are removed (with their snapshots) at the end.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::{sha, Lab, Sink};

pub struct Ceph {
    pub conf: String,
    /// Sink flags: the restricted client (cephx when the cluster runs with it).
    pub sink_args: Vec<String>,
}

pub fn ceph() -> Option<Ceph> {
    blockship_bench::lab::CephEnv::for_test().map(|e| Ceph { conf: e.conf, sink_args: e.sink_args })
}

impl Ceph {
    /// The committed epoch an RBD target records (its `blockship.state` metadata; 0 without).
    pub fn committed_epoch(&self, spec: &str) -> u64 {
        self.state(spec).and_then(|v| v["committed_epoch"].as_u64()).unwrap_or(0)
    }

    /// Bytes of the epoch in progress on an RBD target that the sink has made durable.
    pub fn durable_offset(&self, spec: &str) -> u64 {
        self.state(spec).and_then(|v| v["in_progress"]["durable_offset"].as_u64()).unwrap_or(0)
    }

    /// The replication state an RBD target records (its `blockship.state` metadata).
    fn state(&self, spec: &str) -> Option<serde_json::Value> {
        let out = self.rbd(&["image-meta", "get", spec, "blockship.state"]);
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn rbd(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new("timeout")
            .arg("120")
            .arg("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap();
        out
    }

    pub fn rbd_ok(&self, args: &[&str]) -> String {
        let out = self.rbd(args);
        assert!(out.status.success(), "rbd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// BLAKE3 of `rbd export SPEC` (an image or IMAGE@SNAP).
    pub fn export_hash(&self, spec: &str, dir: &Path) -> String {
        let file = dir.join("export.img");
        let _ = std::fs::remove_file(&file);
        self.rbd_ok(&["export", "--no-progress", spec, file.to_str().unwrap()]);
        let h = sha(&file);
        std::fs::remove_file(&file).unwrap();
        h
    }

    pub fn sink(&self, lab: &Lab, allow: &[&str], extra: &[&str]) -> Sink {
        let mut args: Vec<&str> = self.sink_args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        lab.sink(allow, &args)
    }
}

/// An image name unique to this test run; removed (with its snapshots) at the end.
pub struct TestImage<'a> {
    pub ceph: &'a Ceph,
    pub name: String,
}

impl<'a> TestImage<'a> {
    pub fn new(ceph: &'a Ceph, tag: &str) -> Self {
        let name = format!("test-{tag}-{}", std::process::id());
        let img = TestImage { ceph, name };
        img.remove();
        img
    }

    pub fn spec(&self) -> String {
        format!("rbd/{}", self.name)
    }

    pub fn target(&self) -> String {
        format!("rbd:rbd/{}", self.name)
    }

    pub fn remove(&self) {
        // Protected snapshots (test-failover clones) would block the purge.
        let out = self.ceph.rbd(&["snap", "ls", "--format", "json", &self.spec()]);
        for snap in String::from_utf8_lossy(&out.stdout).split('"').filter(|s| s.starts_with("blockship-")) {
            let _ = self.ceph.rbd(&["snap", "unprotect", &format!("{}@{snap}", self.spec())]);
        }
        let _ = self.ceph.rbd(&["snap", "purge", &self.spec()]);
        let _ = self.ceph.rbd(&["rm", "--no-progress", &self.spec()]);
    }
}

impl Drop for TestImage<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Overwrite `len` bytes at `offset` of image `rbd/NAME` with pseudo-random data (librbd, as the
/// admin client), as a guest of the source cluster would.
pub fn write_random(ceph: &Ceph, name: &str, offset: u64, len: u64, seed: u64) {
    use blockship_ceph::{ConnectOptions, Rados};
    let rados = std::sync::Arc::new(
        Rados::connect(&ConnectOptions {
            conf: Some(Path::new(&ceph.conf)),
            id: "admin",
            keyring: None,
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(60),
        })
        .unwrap(),
    );
    let io = std::sync::Arc::new(rados.ioctx("rbd", None).unwrap());
    let img = io.open(name).unwrap();
    let mut rng = blockship_bench::image::Rng::new(seed);
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(4 << 20) as usize;
            let mut buf = vec![0u8; n];
            rng.fill(&mut buf);
            img.write(pos, bytes::Bytes::from(buf)).await.unwrap();
            pos += n as u64;
        }
        img.flush().await.unwrap();
    });
}
