//! The Ceph OSD stopped (SIGKILL) in the middle of a sync into RBD, then started again. While
//! it is gone, librbd writes wait; within the sink's `--ceph-op-timeout` the sync rides the
//! outage out and completes, past it the sink fails the epoch with a clear error, acknowledges
//! nothing it could not make durable, and the same command resumes once the OSD is back. Each
//! ends with the image equal to the source. Kept in its own test binary: no other test may use
//! the cluster while its only OSD is down. Needs the cluster from `scripts/ceph-up.sh` and root
//! (the OSD runs as root there).

mod common;

use std::time::Duration;

use blockship_bench::image::{self, Profile};
use blockship_bench::osd::Osd;
use common::ceph::*;
use common::*;

const DISK: u64 = 128 * MIB;

/// The tests of this binary take turns: there is one OSD (CI runs tests two at a time).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sync `src` paced (so the outage lands in the middle), kill the OSD once some of it is
/// durable, keep it down for `outage`, start it again; the agent's output.
fn sync_across_an_outage(
    lab: &Lab,
    sink: &Sink,
    ceph: &Ceph,
    img: &TestImage,
    src: &std::path::Path,
    outage: Duration,
) -> std::process::Output {
    let agent = lab.spawn_sync(sink, "esx01", src, &img.target(), &["--bwlimit", "32MiB"]);
    assert!(
        wait_until(Duration::from_secs(60), || ceph.durable_offset(&img.spec()) >= 32 * MIB),
        "no durable progress; sink log:\n{}",
        lab.sink_log()
    );
    let mut osd = Osd::of(&ceph.conf);
    osd.kill().unwrap();
    std::thread::sleep(outage);
    osd.start().unwrap();
    agent.wait_with_output().unwrap()
}

#[test]
fn an_osd_outage_shorter_than_the_op_timeout_is_ridden_out() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(ceph) = ceph() else { return };
    if !root_or_skip("restarting the test cluster's OSD") {
        return;
    }
    let lab = Lab::new(&["esx01"]);
    let img = TestImage::new(&ceph, "osd-short");
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Random, 61).unwrap();
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    let out = sync_across_an_outage(&lab, &sink, &ceph, &img, &src, Duration::from_secs(8));
    assert!(
        out.status.success(),
        "the sync did not survive an 8 s OSD outage: {}\nsink log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.sink_log()
    );
    assert_eq!(ceph.export_hash(&img.spec(), lab.dir.path()), sha(&src));
    assert_eq!(ceph.committed_epoch(&img.spec()), 1);
}

#[test]
fn an_osd_outage_past_the_op_timeout_fails_cleanly_and_resumes() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(ceph) = ceph() else { return };
    if !root_or_skip("restarting the test cluster's OSD") {
        return;
    }
    let lab = Lab::new(&["esx01"]);
    let img = TestImage::new(&ceph, "osd-long");
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Random, 62).unwrap();
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &["--ceph-op-timeout", "4s"]);
    let out = sync_across_an_outage(&lab, &sink, &ceph, &img, &src, Duration::from_secs(12));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a sync whose writes timed out reported success");
    println!("the agent said: {err}");
    assert!(err.to_lowercase().contains("timed out"), "no clear error: {err}\nsink log:\n{}", lab.sink_log());
    assert_eq!(ceph.committed_epoch(&img.spec()), 0, "an epoch was committed across failed writes");

    // The same command, with the OSD back: resumes from what was durable, ends exact.
    let again = lab.sync(&sink, "esx01", &src, &img.target(), &[]);
    println!("after the outage: {again}");
    assert_eq!(u(&again, "epoch"), 1, "{again}");
    assert_eq!(ceph.export_hash(&img.spec(), lab.dir.path()), sha(&src));
}
