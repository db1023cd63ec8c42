//! Crash the sink at every step of its durability order (failpoints: the sink is built with
//! `--features failpoints` and armed through `FAILPOINTS`) while a fake agent writes an epoch,
//! restart it, and check what a crash may and may not leave behind: everything acknowledged is
//! in the target and the sink's resume point covers it; an epoch is committed after the restart
//! only if all its data is there (and, on RBD, its snapshot); otherwise the previous epoch is
//! intact and `rollback` returns the target to it. Then the epoch is sent again and commits.

mod common;

use blockship_proto::pb::{self, SyncMode};
use common::*;

/// Chunks per epoch (1 MiB each); checkpoints every 4 MiB, so an epoch has about a dozen.
const CHUNKS: u64 = 48;
const SIZE: u64 = CHUNKS * MIB;

fn epoch_data(epoch: u64) -> Vec<(u64, u64, Vec<u8>)> {
    (0..CHUNKS).map(|i| (i, i * MIB, pattern(epoch * 1000 + i, MIB as usize))).collect()
}

fn image(epoch: u64) -> Vec<u8> {
    epoch_data(epoch).into_iter().flat_map(|(_, _, d)| d).collect()
}

/// Where the target's bytes can be read back.
enum Kind<'a> {
    File,
    Rbd { ceph: &'a Ceph, spec: String },
}

impl Kind<'_> {
    fn target(&self) -> String {
        match self {
            Kind::File => "file:disk".into(),
            Kind::Rbd { spec, .. } => format!("rbd:{spec}"),
        }
    }

    fn read(&self, lab: &Lab, snapshot: Option<u64>) -> Vec<u8> {
        match (self, snapshot) {
            (Kind::File, None) => std::fs::read(lab.path("root/disk")).unwrap(),
            (Kind::File, Some(_)) => panic!("file targets have no snapshots"),
            (Kind::Rbd { ceph, spec }, None) => ceph.export(spec, lab.dir.path()),
            (Kind::Rbd { ceph, spec }, Some(e)) => {
                ceph.export(&format!("{spec}@blockship-{e}"), lab.dir.path())
            }
        }
    }

    /// The replication state kept with the data.
    fn state(&self, lab: &Lab) -> serde_json::Value {
        match self {
            Kind::File => lab.state(),
            Kind::Rbd { ceph, spec } => {
                serde_json::from_str(&ceph.rbd_ok(&["image-meta", "get", spec, "blockship.state"])).unwrap()
            }
        }
    }

    fn sink_args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "--allow",
            "esx01=file:*",
            "--allow",
            "esx01=rbd:rbd/*",
            "--checkpoint-bytes",
            "4MiB",
            "--keep-snapshots",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match self {
            Kind::File => a.push("--no-rbd".into()),
            Kind::Rbd { ceph, .. } => a.extend(ceph.sink_args.iter().cloned()),
        }
        a
    }
}

/// One epoch from a fresh connection; returns the acks it saw.
async fn write_epoch(lab: &Lab, kind: &Kind<'_>, epoch: u64) -> Vec<pb::Ack> {
    let mut a = lab.agent().await;
    a.hello().await;
    let opened = a.open_target(&kind.target(), SIZE, SyncMode::Compare).await.unwrap();
    assert_eq!(opened.committed_epoch + 1, epoch, "{opened:?}");
    a.begin_with(epoch, SyncMode::Full, 0, "").await.unwrap();
    a.send_and_commit(epoch, &epoch_data(epoch)).await
}

fn rollback(lab: &Lab, kind: &Kind<'_>) -> std::process::Output {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["rollback", "--target", &kind.target(), "--state-dir"]).arg(lab.path("state"));
    match kind {
        Kind::File => {
            cmd.arg("--file-root").arg(lab.path("root"));
        }
        Kind::Rbd { ceph, .. } => {
            cmd.args(&ceph.sink_args);
        }
    }
    cmd.output().unwrap()
}

async fn crash_at(kind: &Kind<'_>, point: &str, actions: &str) {
    let args = kind.sink_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut lab = Lab::with(&args, &[]);
    let acks = write_epoch(&lab, kind, 1).await;
    assert!(acks.last().is_some_and(|a| a.committed), "{point}: epoch 1 did not commit\n{}", lab.log());

    lab.stop();
    lab.restart(&[("FAILPOINTS", &format!("{point}={actions}"))]);
    let acks = write_epoch(&lab, kind, 2).await;
    let crashed = lab.wait_exit();
    assert!(crashed.is_some(), "{point}: the failpoint never fired (acks {acks:?})\n{}", lab.log());
    lab.restart(&[]);

    let state = kind.state(&lab);
    let committed = state["committed_epoch"].as_u64().unwrap();
    let acked_commit = acks.iter().any(|a| a.committed);
    let durable_items = acks.iter().map(|a| a.durable_items).max().unwrap_or(0);
    let durable_offset = acks.iter().map(|a| a.durable_offset).max().unwrap_or(0);
    let data = kind.read(&lab, None);
    let two = image(2);
    // Everything acknowledged is in the target.
    let acked_bytes = (durable_items * MIB) as usize;
    assert!(data[..acked_bytes] == two[..acked_bytes], "{point}: acknowledged data is missing");
    if acked_commit {
        assert_eq!(committed, 2, "{point}: the commit was acknowledged, the state says {state}");
    }
    match committed {
        2 => {
            // Nothing committed is missing.
            assert!(data == two, "{point}: epoch 2 is committed but its data is not all there");
            if matches!(kind, Kind::Rbd { .. }) {
                assert!(kind.read(&lab, Some(2)) == two, "{point}: the snapshot of epoch 2 is wrong");
            }
        }
        1 => {
            let resume = state["in_progress"]["durable_offset"].as_u64().unwrap_or(0);
            assert!(
                resume >= durable_offset,
                "{point}: acked {durable_offset} but the state resumes at {resume}"
            );
            // The previous point in time is intact: rollback returns the target to it.
            lab.kill();
            let out = rollback(&lab, kind);
            assert!(
                out.status.success(),
                "{point}: rollback failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(kind.read(&lab, None) == image(1), "{point}: rollback did not restore epoch 1");
            lab.restart(&[]);
            // The epoch is sent again and commits.
            let acks = write_epoch(&lab, kind, 2).await;
            assert!(acks.last().is_some_and(|a| a.committed), "{point}: the retry did not commit");
            assert!(kind.read(&lab, None) == two, "{point}: the retried epoch is not in the target");
        }
        other => panic!("{point}: committed epoch {other}"),
    }
    println!("{point} ({actions}): committed {committed}, {} acks before the crash", acks.len());
    // A clean stop closes the image: a killed sink's watch would block its removal for ~30 s.
    lab.stop();
}

/// Points hit per checkpoint or batch crash on a later hit, so that earlier checkpoints were
/// acknowledged; the commit's points fire on their only hit.
const CASES: &[(&str, &str)] = &[
    ("sink::after-journal", "1*off->return"),
    ("sink::after-write", "1*off->return"),
    ("sink::after-flush", "2*off->return"),
    ("sink::after-index", "2*off->return"),
    ("sink::after-state", "2*off->return"),
    ("sink::before-ack", "2*off->return"),
    ("sink::after-snapshot", "return"),
    ("sink::after-commit-state", "return"),
];

#[tokio::test]
async fn crashes_at_every_step_on_file_targets() {
    for (point, actions) in CASES {
        if *point == "sink::after-snapshot" {
            continue; // file targets take no snapshot
        }
        crash_at(&Kind::File, point, actions).await;
    }
}

#[tokio::test]
async fn crashes_at_every_step_on_rbd_targets() {
    let Some(ceph) = ceph() else { return };
    for (point, actions) in CASES {
        // The checkpoint steps are the same code for every target (covered on files); RBD's own
        // steps are the snapshot and the commit around it. (Each restart after a crash waits out
        // the dead sink's exclusive lock on the image, ~30 s.)
        if !matches!(*point, "sink::after-state" | "sink::after-snapshot" | "sink::after-commit-state") {
            continue;
        }
        let spec = format!("rbd/crash-{}-{}", point.trim_start_matches("sink::"), std::process::id());
        ceph.remove_image(&spec);
        crash_at(&Kind::Rbd { ceph: &ceph, spec: spec.clone() }, point, actions).await;
        ceph.remove_image(&spec);
    }
}
