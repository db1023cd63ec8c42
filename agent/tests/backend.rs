//! Backend failures: a file target on a small fixed-size filesystem (a tmpfs with `size=`) that
//! fills up mid-sync. The agent gets a clear error naming the cause, nothing is reported
//! committed, and once there is room again the same command completes and the target equals
//! the source. (Mounting needs root, which CI has: BLOCKSHIP_REQUIRE_ROOT makes a missing root a
//! failure instead of a skip.)

mod common;

use std::path::Path;
use std::process::Command;

use blockship_bench::image::{self, Profile};
use common::*;

/// A tmpfs mounted at a path for the test's lifetime.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "blockship-test"])
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "remount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The sink's offline view of its targets (`status --state-dir --json`).
fn committed_epoch(lab: &Lab, rel: &str) -> u64 {
    let out = Command::new(bin("blockship-sink"))
        .args(["status", "--json", "--state-dir"])
        .arg(lab.path("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let targets = v["targets"].as_array().cloned().unwrap_or_default();
    targets
        .iter()
        .find(|t| t["target"].as_str().is_some_and(|n| n.ends_with(rel)))
        .map_or(0, |t| t["committed_epoch"].as_u64().unwrap_or(0))
}

/// The sink's delay point that holds a failed epoch writer's own report back, so that data still
/// arriving finds the epoch gone first (the race CI once lost over gRPC: the agent was told "data
/// received outside an epoch" instead of the cause). Without failpoints (never under CI) the
/// race is left to timing.
fn writer_failure_race(lab: &Lab) -> Vec<(&'static str, &'static str)> {
    const ARM: &str = "sink::writer-failure-report=return(500)";
    let state = lab.path("state");
    let probe = ["status", "--json", "--state-dir", state.to_str().unwrap()];
    if failpoints_built("blockship-sink", &probe, ARM) {
        vec![("FAILPOINTS", ARM)]
    } else {
        vec![]
    }
}

fn a_full_filesystem_is_a_clear_error_and_the_sync_resumes_once_there_is_room(transport: &str) {
    if !root_or_skip("mounting a small tmpfs") {
        return;
    }
    let lab = Lab::over(&["esx01"], transport);
    let fs = Tmpfs::mount(&lab.path("root"), "24m");
    let src = lab.path("src.img");
    // Random data: nothing is a hole or compressible, so 64 MiB need 64 MiB of room.
    image::generate(&src, 64 << 20, Profile::Random, 7).unwrap();
    let sink = lab.sink_with("127.0.0.1:0", &["esx01=file:*"], &[], &writer_failure_race(&lab));

    let out = lab.try_sync(&sink, "esx01", &src, "file:vm", &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a sync into a full filesystem succeeded");
    assert!(err.contains("No space left on device"), "the error does not name the cause: {err}");
    assert_eq!(committed_epoch(&lab, "vm"), 0, "an epoch was committed although its data is not all there");

    // Room again: the same command completes, and the copy is exact.
    fs.resize("96m");
    let v = lab.sync(&sink, "esx01", &src, "file:vm", &[]);
    assert!(same_file(&src, &lab.target("vm")), "the target differs after the resumed sync: {v}");
    assert_eq!(committed_epoch(&lab, "vm"), 1);
    drop(sink);
}

each_transport!(a_full_filesystem_is_a_clear_error_and_the_sync_resumes_once_there_is_room);
