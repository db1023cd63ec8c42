//! Daemon helpers for tests: a running `blockship-agent run` with a config written by the test
//! (killed on drop), its status through `blockship-agent status --json`, a qemu-storage-daemon
//! "VM" with several disks, and the sequence-numbered writer with a log of what it wrote, which
//! checks that every point in time is one consistent cut of that log (crucible's verifier idea).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{bin, wait_until, Lab, Sink};

pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Daemon {
    /// Start the daemon for agent `name` of `lab` against `sink`, with `groups` (TOML) and extra
    /// `[daemon]` lines; waits until its control socket answers.
    pub fn start(
        lab: &Lab,
        sink: &Sink,
        name: &str,
        daemon: &str,
        groups: &str,
        env: &[(&str, &str)],
    ) -> Daemon {
        Self::start_with(lab, sink, name, "", daemon, groups, env)
    }

    /// `start`, with extra `[agent]` lines (e.g. vCenter credentials).
    pub fn start_with(
        lab: &Lab,
        sink: &Sink,
        name: &str,
        agent: &str,
        daemon: &str,
        groups: &str,
        env: &[(&str, &str)],
    ) -> Daemon {
        let tag = format!("{name}-{}", lab.dir.path().file_name().unwrap().to_string_lossy());
        let socket = lab.path(&format!("{tag}.sock"));
        let log = lab.path(&format!("{tag}.log"));
        let config = lab.path(&format!("{tag}.toml"));
        let text = format!(
            "[agent]\nsink = \"{}\"\ntransport = \"{}\"\npki = \"{}\"\nname = \"{name}\"\nidle_timeout = \"5s\"\n{}\n{agent}\n[daemon]\ncontrol_socket = \"{}\"\n{daemon}\n{groups}\n",
            sink.addr,
            lab.transport,
            lab.pki().display(),
            ceph_agent_keys(),
            socket.display()
        );
        std::fs::write(&config, text).unwrap();
        let mut cmd = Command::new(bin("blockship-agent"));
        cmd.args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let d = Daemon { child: Some(child), socket, log };
        assert!(
            wait_until(Duration::from_secs(20), || d.try_status().is_some()),
            "the daemon did not start: {}",
            d.log_text()
        );
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn try_status(&self) -> Option<serde_json::Value> {
        let out = Command::new(bin("blockship-agent"))
            .args(["status", "--json", "--control-socket"])
            .arg(&self.socket)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Every group's status.
    pub fn status(&self) -> serde_json::Value {
        self.try_status().unwrap_or_else(|| panic!("no status from the daemon: {}", self.log_text()))
    }

    /// Group `name`'s status.
    pub fn group(&self, name: &str) -> serde_json::Value {
        let all = self.status();
        all.as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no group {name}: {all}"))
    }

    /// Run `blockship-agent COMMAND GROUP` against the daemon.
    pub fn control(&self, command: &str, group: &str) {
        let out = Command::new(bin("blockship-agent"))
            .args([command, "--control-socket"])
            .arg(&self.socket)
            .arg(group)
            .output()
            .unwrap();
        assert!(out.status.success(), "{command} {group}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Wait until group `name` committed at least epoch `epoch`.
    pub fn wait_epoch(&self, name: &str, epoch: u64, limit: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let ok = wait_until(limit, || {
            last = self.group(name);
            last["committed_epoch"].as_u64().unwrap_or(0) >= epoch
        });
        assert!(ok, "group {name} did not reach epoch {epoch}: {last}\n{}", self.log_text());
        last
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: signalling a child process we started.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `[agent]` keys for rbd: sources of the test cluster (the restricted client).
fn ceph_agent_keys() -> String {
    match (
        std::env::var("CEPH_CONF"),
        std::env::var("BLOCKSHIP_CEPH_ID"),
        std::env::var("BLOCKSHIP_CEPH_KEYRING"),
    ) {
        (Ok(conf), Ok(id), Ok(keyring)) => {
            format!("ceph_conf = \"{conf}\"\nceph_id = \"{id}\"\nkeyring = \"{keyring}\"")
        }
        (Ok(conf), _, _) => format!("ceph_conf = \"{conf}\""),
        _ => String::new(),
    }
}

/// The qemu-storage-daemon "VM" (disks `disk0..N`, writable NBD exports, QMP), shared with the
/// bench's `continuous` scenario.
#[allow(unused_imports)]
pub use blockship_bench::vm::Vm;

/// The live writer and its verifier, shared with `blockship-bench chaos`.
#[allow(unused_imports)]
pub use blockship_bench::workload::{block, consistent_cut, read_block, Logged, SeqWriter, BLOCK};
