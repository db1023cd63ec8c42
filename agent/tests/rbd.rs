//! Syncs into Ceph RBD through the real sink and a real (throw-away) cluster: full, incremental
//! and compare epochs checked with `rbd export` of each epoch's snapshot, a sink killed mid-sync,
//! pre-existing images holding garbage, state kept in image metadata and picked up by a second
//! sink, and the refusals. Needs `scripts/ceph-up.sh` (CEPH_CONF etc. in the environment);
//! skipped without it unless BLOCKSHIP_REQUIRE_CEPH=1.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockship_bench::image::{self, Profile};
use common::ceph::*;
use common::*;

// Half a GiB: many chunks and time to crash a paced sync half-way, without minutes of CI.
const DISK: u64 = 512 * MIB;

fn change_list(extents: &[(u64, u64)]) -> String {
    let areas: Vec<serde_json::Value> =
        extents.iter().map(|(o, l)| serde_json::json!({"start": o, "length": l})).collect();
    serde_json::json!({"startOffset": 0, "length": DISK, "changedArea": areas}).to_string()
}

#[test]
fn full_incremental_compare_with_snapshots_and_metadata() {
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let img = TestImage::new(&ceph, "epochs");
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 11).unwrap();
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);

    // Epoch 1: full sync into a new image.
    let full = lab.sync(&sink, "esx01", &src, &img.target(), &[]);
    assert_eq!(full["mode"], "full");
    let h1 = sha(&src);
    assert_eq!(ceph.export_hash(&img.spec(), lab.dir.path()), h1, "image differs from the source");
    assert_eq!(ceph.export_hash(&format!("{}@blockship-1", img.spec()), lab.dir.path()), h1);
    // Zero regions are not allocated.
    let du: serde_json::Value =
        serde_json::from_str(&ceph.rbd_ok(&["du", "--format", "json", &img.spec()])).unwrap();
    let used: u64 = du["images"].as_array().unwrap().iter().map(|i| i["used_size"].as_u64().unwrap()).sum();
    let (zero, _, _) = image::composition(Profile::Mixed, DISK);
    assert!(used <= DISK - zero + 16 * MIB, "zero regions allocated: {used} bytes used of {DISK}: {du}");
    println!("full into rbd: {full}; rbd du used {used}");

    // Epoch 2: incremental from a change list (some areas now zero).
    let mut changed = Vec::new();
    for i in 0..40u64 {
        let off = (image::Rng::new(500 + i).next_u64() % (DISK / MIB - 2)) * MIB + 8192;
        if i % 5 == 0 {
            use std::os::unix::fs::FileExt;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&src)
                .unwrap()
                .write_all_at(&[0u8; 65536], off)
                .unwrap();
        } else {
            scribble(&src, off, 65536, i);
        }
        changed.push((off, 65536));
    }
    let list = lab.path("changes.json");
    std::fs::write(&list, change_list(&changed)).unwrap();
    let incr = lab.sync(&sink, "esx01", &src, &img.target(), &["--changed-areas", list.to_str().unwrap()]);
    assert_eq!((incr["mode"].as_str(), u(&incr, "epoch")), (Some("incremental"), 2));
    let h2 = sha(&src);
    assert_eq!(ceph.export_hash(&format!("{}@blockship-2", img.spec()), lab.dir.path()), h2);

    // Epoch 3: compare mode after untold 4 KiB overwrites.
    for i in 0..100u64 {
        scribble(&src, (image::Rng::new(900 + i).next_u64() % (DISK / 4096)) * 4096, 4096, 77 + i);
    }
    let cmp = lab.sync(&sink, "esx01", &src, &img.target(), &[]);
    assert_eq!((cmp["mode"].as_str(), u(&cmp, "epoch")), (Some("compare"), 3));
    assert!(u(&cmp, "chunks_sent") <= 100, "{cmp}");
    let h3 = sha(&src);
    assert_eq!(ceph.export_hash(&format!("{}@blockship-3", img.spec()), lab.dir.path()), h3);
    // Only the newest two epoch snapshots are kept; the state is in the image metadata.
    let snaps = ceph.rbd_ok(&["snap", "ls", &img.spec()]);
    assert!(
        !snaps.contains("blockship-1") && snaps.contains("blockship-2") && snaps.contains("blockship-3"),
        "{snaps}"
    );
    let meta = ceph.rbd_ok(&["image-meta", "list", &img.spec()]);
    assert!(meta.contains("blockship.state") && meta.contains("\"committed_epoch\":3"), "{meta}");

    // A second sink with an empty state dir continues from the image metadata alone.
    drop(sink);
    let other = Lab::new(&["esx01"]);
    std::fs::remove_dir_all(other.pki()).unwrap();
    copy_dir(&lab.pki(), &other.pki());
    let sink2 = ceph.sink(&other, &["esx01=rbd:rbd/*"], &[]);
    scribble(&src, 3 * MIB, 4096, 5);
    std::fs::write(&list, change_list(&[(3 * MIB, 4096)])).unwrap();
    let resumed =
        other.sync(&sink2, "esx01", &src, &img.target(), &["--changed-areas", list.to_str().unwrap()]);
    assert_eq!(u(&resumed, "epoch"), 4, "{resumed}");
    assert_eq!(u(&resumed, "bytes_read"), 4096);
    assert_eq!(ceph.export_hash(&format!("{}@blockship-4", img.spec()), lab.dir.path()), sha(&src));
    let v = other.verify(&sink2, "esx01", &src, &img.target());
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn sink_killed_mid_sync_then_resume_and_rollback() {
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let img = TestImage::new(&ceph, "kill");
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 12).unwrap();
    let mut sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    lab.sync(&sink, "esx01", &src, &img.target(), &[]);
    let epoch1 = sha(&src);
    // Rewrite most of the disk, then crash the sink in the middle of epoch 2.
    for i in 0..400u64 {
        scribble(&src, i * MIB, MIB as usize, 3000 + i);
    }
    let mut agent = lab.spawn_sync(&sink, "esx01", &src, &img.target(), &["--bwlimit", "100MiB"]);
    let durable = || ceph.durable_offset(&img.spec());
    assert!(wait_until(Duration::from_secs(60), || durable() >= 100 * MIB), "no durable progress");
    sink.kill9();
    assert!(!agent.wait().unwrap().success(), "agent succeeded although the sink died");
    // The snapshot of the last committed epoch still holds that epoch.
    assert_eq!(ceph.export_hash(&format!("{}@blockship-1", img.spec()), lab.dir.path()), epoch1);

    // Rolling back drops the partial epoch: the head equals epoch 1 again.
    let mut cmd = Command::new(bin("blockship-sink"));
    cmd.args(["rollback", "--target", &img.target()]).args(&ceph.sink_args);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unfinished epoch 2 was dropped"));
    assert_eq!(ceph.export_hash(&img.spec(), lab.dir.path()), epoch1);

    // Restart and re-run: the image ends identical to the source.
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    let second = lab.sync(&sink, "esx01", &src, &img.target(), &[]);
    assert_eq!(u(&second, "epoch"), 2);
    assert_eq!(ceph.export_hash(&img.spec(), lab.dir.path()), sha(&src));
    assert_eq!(ceph.export_hash(&format!("{}@blockship-2", img.spec()), lab.dir.path()), sha(&src));
}

#[test]
fn sink_killed_then_same_command_resumes_without_resending() {
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let img = TestImage::new(&ceph, "resume");
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Random, 13).unwrap();
    let mut sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    let mut agent = lab.spawn_sync(&sink, "esx01", &src, &img.target(), &["--bwlimit", "100MiB"]);
    assert!(wait_until(Duration::from_secs(60), || ceph.durable_offset(&img.spec()) >= 150 * MIB));
    sink.kill9();
    assert!(!agent.wait().unwrap().success(), "agent claimed success although the sink died");
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    let second = lab.sync(&sink, "esx01", &src, &img.target(), &[]);
    assert_eq!(ceph.export_hash(&img.spec(), lab.dir.path()), sha(&src));
    assert!(u(&second, "bytes_sent") < DISK - 125 * MIB, "durable data was resent: {second}");
}

#[test]
fn preexisting_volume_with_garbage_is_overwritten_exactly() {
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let img = TestImage::new(&ceph, "cinder");
    // A "Cinder volume" full of random bytes, larger chunks of which must become zeros.
    let junk = lab.path("junk.img");
    image::generate(&junk, 256 * MIB, Profile::Random, 99).unwrap();
    ceph.rbd_ok(&["import", "--no-progress", junk.to_str().unwrap(), &img.spec()]);
    let src = lab.path("src.img");
    image::generate(&src, 256 * MIB, Profile::Mixed, 14).unwrap();
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    let s = lab.sync(&sink, "esx01", &src, &img.target(), &[]);
    assert_eq!(s["mode"], "compare", "{s}");
    assert!(u(&s, "zero_extents") > 0, "{s}");
    assert_eq!(ceph.export_hash(&img.spec(), lab.dir.path()), sha(&src));
}

#[test]
fn refusals() {
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let src = lab.path("src.img");
    image::generate(&src, 64 * MIB, Profile::Mixed, 15).unwrap();
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    let err = |out: std::process::Output| {
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let e = err(lab.try_sync(&sink, "esx01", &src, "rbd:nosuchpool/img", &[]));
    assert!(e.contains("may not write"), "{e}");
    let sink_any = ceph.sink(&lab, &["esx01=rbd:**"], &[]);
    let e = err(lab.try_sync(&sink_any, "esx01", &src, "rbd:nosuchpool/img", &[]));
    assert!(e.contains("pool \"nosuchpool\" does not exist"), "{e}");

    // An image bigger than the source would have to shrink.
    let big = TestImage::new(&ceph, "big");
    ceph.rbd_ok(&["create", "--size", "128M", &big.spec()]);
    ceph.rbd_ok(&["bench", "--io-type", "write", "--io-size", "1M", "--io-total", "8M", &big.spec()]);
    let before = ceph.export_hash(&big.spec(), lab.dir.path());
    let e = err(lab.try_sync(&sink, "esx01", &src, &big.target(), &[]));
    assert!(e.contains("never shrinks"), "{e}");
    assert_eq!(ceph.export_hash(&big.spec(), lab.dir.path()), before, "the refused image was written");
    let meta = ceph.rbd(&["image-meta", "list", &big.spec()]);
    assert!(!String::from_utf8_lossy(&meta.stdout).contains("blockship"), "state written to a refused image");
    // A smaller one is grown.
    let small = TestImage::new(&ceph, "small");
    ceph.rbd_ok(&["create", "--size", "16M", &small.spec()]);
    lab.sync(&sink, "esx01", &src, &small.target(), &[]);
    assert_eq!(ceph.export_hash(&small.spec(), lab.dir.path()), sha(&src));

    // A cluster that does not answer: a clear timeout, not a hang.
    let dead = lab.path("dead.conf");
    std::fs::write(&dead, "[global]\nmon host = 127.0.0.1:1\nauth client required = none\n").unwrap();
    let lost = lab
        .sink(&["esx01=rbd:rbd/*"], &["--ceph-conf", dead.to_str().unwrap(), "--ceph-connect-timeout", "3s"]);
    let started = std::time::Instant::now();
    let e = err(lab.try_sync(&lost, "esx01", &src, "rbd:rbd/unreachable", &[]));
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(e.contains("timed out") || e.contains("Connection timed out"), "{e}");
}

#[test]
fn rbd_source_full_then_two_incrementals() {
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let src = TestImage::new(&ceph, "src");
    let dst = TestImage::new(&ceph, "dst");
    let raw = lab.path("src.img");
    image::generate(&raw, 256 * MIB, Profile::Mixed, 16).unwrap();
    ceph.rbd_ok(&["import", "--no-progress", raw.to_str().unwrap(), &src.spec()]);
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    // The agent reads the source cluster with the same restricted client.
    let agent_args: Vec<&str> = ceph.sink_args.iter().map(String::as_str).collect();
    let source = src.target();

    let s1 = lab.sync(&sink, "esx01", &source, &dst.target(), &agent_args);
    assert_eq!(
        (s1["mode"].as_str(), s1["change_point"].as_str(), s1["reader"].as_str()),
        (Some("full"), Some("blockship-src-1"), Some("librbd")),
        "{s1}"
    );
    let snap = |img: &TestImage, s: &str| ceph.export_hash(&format!("{}@{s}", img.spec()), lab.dir.path());
    assert_eq!(snap(&dst, "blockship-1"), snap(&src, "blockship-src-1"));

    for epoch in 2..=3u64 {
        // Random 64 KiB writes to the source's head.
        ceph.rbd_ok(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "64K",
            "--io-total",
            "16M",
            "--io-pattern",
            "rand",
            &src.spec(),
        ]);
        // What librbd reports changed since the last replicated snapshot (the head will not
        // change before the agent snapshots it).
        let diff: serde_json::Value = serde_json::from_str(&ceph.rbd_ok(&[
            "diff",
            "--format",
            "json",
            "--from-snap",
            &format!("blockship-src-{}", epoch - 1),
            &src.spec(),
        ]))
        .unwrap();
        let changed: u64 = diff.as_array().unwrap().iter().map(|e| e["length"].as_u64().unwrap()).sum();
        let s = lab.sync(&sink, "esx01", &source, &dst.target(), &agent_args);
        assert_eq!((s["mode"].as_str(), u(&s, "epoch")), (Some("incremental"), epoch), "{s}");
        assert_eq!(u(&s, "bytes_read"), changed, "read other than librbd's diff: {s}");
        assert!((16 * MIB..256 * MIB / 2).contains(&changed), "diff of {changed} bytes");
        assert_eq!(
            snap(&dst, &format!("blockship-{epoch}")),
            snap(&src, &format!("blockship-src-{epoch}")),
            "epoch {epoch}"
        );
        // Only the newest source snapshot (the next change point) is kept.
        let snaps = ceph.rbd_ok(&["snap", "ls", &src.spec()]);
        assert!(
            snaps.contains(&format!("blockship-src-{epoch}"))
                && !snaps.contains(&format!("blockship-src-{}", epoch - 1)),
            "{snaps}"
        );
    }
    let mut args = agent_args.clone();
    args.extend(["--source", &source, "--target"]);
    let v = lab.agent_cmd(&sink, "esx01", "verify").args(&args).arg(dst.target()).output().unwrap();
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

#[test]
fn an_interrupted_rbd_epoch_is_retried_from_its_own_snapshot() {
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let src = TestImage::new(&ceph, "retry");
    let raw = lab.path("src.img");
    image::generate(&raw, 512 * MIB, Profile::Mixed, 17).unwrap();
    ceph.rbd_ok(&["import", "--no-progress", raw.to_str().unwrap(), &src.spec()]);
    let mut sink = lab.sink(&["esx01=file:*"], &[]);
    let agent_args: Vec<&str> = ceph.sink_args.iter().map(String::as_str).collect();
    let source = src.target();
    lab.sync(&sink, "esx01", &source, "file:dr", &agent_args);

    // Epoch 2: the first 320 MiB change; the sink dies once part of them is durable.
    write_random(&ceph, &src.name, 0, 320 * MIB, 1);
    let running = lab.spawn_sync(
        &sink,
        "esx01",
        &source,
        "file:dr",
        &[&["--bwlimit", "64MiB"], &agent_args[..]].concat(),
    );
    let durable = || durable_offset(&lab, "file:dr");
    assert!(wait_until(Duration::from_secs(60), || durable() >= 160 * MIB), "no durable progress");
    sink.kill9();
    assert!(!running.wait_with_output().unwrap().status.success(), "agent succeeded although the sink died");

    // The guest rewrites the first 100 MiB: inside the part already durable, inside the same
    // changed extents, so a plan of the source's new state looks the same as the first one.
    write_random(&ceph, &src.name, 0, 100 * MIB, 2);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let s2 = lab.sync(&sink, "esx01", &source, "file:dr", &agent_args);
    assert_eq!(u(&s2, "epoch"), 2, "{s2}");
    let point = s2["change_point"].as_str().unwrap().to_string();
    let export = lab.path("point.img");
    ceph.rbd_ok(&["export", "--no-progress", &format!("{}@{point}", src.spec()), export.to_str().unwrap()]);
    assert!(
        same_file(&export, &lab.target("dr")),
        "epoch 2 records {point} but the target holds another point in time (resumed at {})",
        u(&s2, "resumed_from")
    );
    assert!(u(&s2, "resumed_from") >= 160 * MIB, "the retry from the same snapshot did not resume: {s2}");
    let mut args = agent_args.clone();
    args.extend(["--source", &source, "--target", "file:dr"]);
    let v = lab.agent_cmd(&sink, "esx01", "verify").args(&args).output().unwrap();
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    // The next epoch brings the rewrite.
    let s3 = lab.sync(&sink, "esx01", &source, "file:dr", &agent_args);
    assert_eq!((s3["mode"].as_str(), u(&s3, "epoch")), (Some("incremental"), 3), "{s3}");
    std::fs::remove_file(&export).unwrap();
    ceph.rbd_ok(&["export", "--no-progress", &src.spec(), export.to_str().unwrap()]);
    assert!(same_file(&export, &lab.target("dr")));
}

#[test]
fn commits_go_on_while_an_old_epoch_snapshot_has_a_clone() {
    // A test-failover clone of an old epoch (protected snapshot, clone v1 style) makes that
    // snapshot impossible to remove: commits must go on, and the snapshot go once it is free.
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let img = TestImage::new(&ceph, "clone");
    let clone = format!("rbd/{}-failover", img.name);
    let _ = ceph.rbd(&["rm", "--no-progress", &clone]);
    let src = lab.path("src.img");
    image::generate(&src, 64 * MIB, Profile::Mixed, 18).unwrap();
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &["--keep-snapshots", "1"]);
    lab.sync(&sink, "esx01", &src, &img.target(), &[]);
    let epoch1 = sha(&src);
    ceph.rbd_ok(&["snap", "protect", &format!("{}@blockship-1", img.spec())]);
    ceph.rbd_ok(&["clone", &format!("{}@blockship-1", img.spec()), &clone]);
    for epoch in 2..=3u64 {
        scribble(&src, epoch * MIB, 4096, epoch);
        let s = lab.sync(&sink, "esx01", &src, &img.target(), &[]);
        assert_eq!(u(&s, "epoch"), epoch, "{s}");
        assert_eq!(ceph.export_hash(&format!("{}@blockship-{epoch}", img.spec()), lab.dir.path()), sha(&src));
    }
    let snaps = ceph.rbd_ok(&["snap", "ls", &img.spec()]);
    assert!(
        snaps.contains("blockship-1") && !snaps.contains("blockship-2") && snaps.contains("blockship-3"),
        "{snaps}"
    );
    assert_eq!(ceph.export_hash(&clone, lab.dir.path()), epoch1, "the clone lost its epoch");
    // Once the clone is gone, the next commit prunes the old snapshot.
    ceph.rbd_ok(&["rm", "--no-progress", &clone]);
    ceph.rbd_ok(&["snap", "unprotect", &format!("{}@blockship-1", img.spec())]);
    scribble(&src, 9 * MIB, 4096, 9);
    lab.sync(&sink, "esx01", &src, &img.target(), &[]);
    let snaps = ceph.rbd_ok(&["snap", "ls", &img.spec()]);
    assert!(!snaps.contains("blockship-1") && snaps.contains("blockship-4"), "{snaps}");
}

#[test]
fn a_restarted_sink_takes_over_its_images_at_once() {
    // A SIGKILLed sink keeps the image's exclusive lock until its watch times out (~30 s); the
    // restarted sink knows from the image's ownership record that its predecessor is gone and
    // breaks the lock (blocklisting the dead client) instead of waiting.
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let img = TestImage::new(&ceph, "takeover");
    let src = lab.path("src.img");
    image::generate(&src, 512 * MIB, Profile::Random, 19).unwrap();
    let mut sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    let mut agent = lab.spawn_sync(&sink, "esx01", &src, &img.target(), &["--bwlimit", "64MiB"]);
    let durable = || ceph.durable_offset(&img.spec());
    assert!(wait_until(Duration::from_secs(60), || durable() >= 64 * MIB), "no durable progress");
    sink.kill9();
    assert!(!agent.wait().unwrap().success());
    let before = durable();
    let restarted = std::time::Instant::now();
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    let mut again = lab.spawn_sync(&sink, "esx01", &src, &img.target(), &[]);
    assert!(wait_until(Duration::from_secs(60), || durable() > before), "no progress after the restart");
    let took = restarted.elapsed();
    println!("first durable write {:.2} s after the sink restarted", took.as_secs_f64());
    assert!(again.wait().unwrap().success());
    assert!(took < Duration::from_secs(10), "the restarted sink waited {took:?} for the dead sink's lock");
    assert!(lab.sink_log().contains("breaking the image's exclusive lock"), "{}", lab.sink_log());
    assert_eq!(ceph.export_hash(&img.spec(), lab.dir.path()), sha(&src));
}
