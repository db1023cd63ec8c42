//! Test failover and failback on RBD. `blockship-sink test-failover` clones a group's latest
//! committed epoch while the daemon keeps replicating it at a 5 s interval: the clones hold that
//! epoch, replication keeps its RPO and never fails a commit over the cloned snapshots, and
//! `--cleanup` removes them. Failback: a group replicated RBD → RBD is cut over, the DR images
//! change (1 %), the original images too (discarded), and a `failback = true` group replicates the
//! DR images back sending about 1 % of the disks, after which the originals equal the DR images.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ceph::*;
use common::daemon::*;
use common::*;

const DISK: u64 = 16 << 20;

fn sink_admin(ceph: &Ceph, lab: &Lab, args: &[&str]) -> std::process::Output {
    Command::new(bin("blockship-sink"))
        .args(args)
        .arg("--state-dir")
        .arg(lab.path("state"))
        .args(ceph.sink_args.iter().map(String::as_str))
        .output()
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Numbered epoch snapshots (`blockship-<N>`) of `spec`.
fn epoch_snapshots(ceph: &Ceph, spec: &str) -> Vec<u64> {
    let out = ceph.rbd_ok(&["snap", "ls", "--format", "json", spec]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str()?.strip_prefix("blockship-")?.parse().ok())
        .collect()
}

#[test]
fn a_test_failover_clones_the_committed_epoch_while_replication_goes_on() {
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let sources: Vec<_> = (0..2).map(|i| lab.path(&format!("src{i}.img"))).collect();
    for (i, s) in sources.iter().enumerate() {
        std::fs::File::create(s).unwrap().set_len(DISK).unwrap();
        scribble(s, 0, DISK as usize, 70 + i as u64);
    }
    let images: Vec<TestImage> = (0..2).map(|i| TestImage::new(&ceph, &format!("tf{i}"))).collect();
    let disks: Vec<String> = sources
        .iter()
        .zip(&images)
        .map(|(s, t)| format!("{{ source = \"{}\", target = \"{}\" }}", s.display(), t.target()))
        .collect();
    let group = format!(
        "[[group]]\nname = \"vm\"\nkind = \"file\"\ninterval = \"5s\"\ndisks = [{}]\n",
        disks.join(", ")
    );
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &["--keep-snapshots", "2"]);
    let daemon = Daemon::start(&lab, &sink, "esx01", "", &group, &[]);
    daemon.wait_epoch("vm", 2, Duration::from_secs(60));
    // The sources change all the time (a region per disk every second).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, sources) = (stop.clone(), sources.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for s in &sources {
                    scribble(s, (n * 1_048_576) % (DISK - 65536), 65536, 1000 + n);
                }
                n += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    let prefix = format!("tf{}-", std::process::id());
    let o = sink_admin(&ceph, &lab, &["test-failover", "--group", "esx01/vm", "--prefix", &prefix]);
    assert!(o.status.success(), "test-failover: {}", text(&o));
    let out = text(&o);
    println!("{}", out.trim());
    let epoch: u64 =
        out.split("epoch ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
    let clones: Vec<String> = images.iter().map(|i| format!("rbd/{prefix}{}", i.name)).collect();
    let mut cloned = Vec::new();
    for (img, clone) in images.iter().zip(&clones) {
        let snap = ceph.export_hash(&format!("{}@blockship-{epoch}", img.spec()), lab.dir.path());
        let copy = ceph.export_hash(clone, lab.dir.path());
        assert_eq!(snap, copy, "{clone} does not hold epoch {epoch}");
        cloned.push(copy);
    }
    let listed = Command::new(bin("blockship-sink"))
        .args(["status", "--json", "--state-dir"])
        .arg(lab.path("state"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let g = &v["groups"][0];
    assert_eq!(g["test_failover_epoch"].as_u64(), Some(epoch), "{v}");
    assert_eq!(g["test_failover_clones"].as_array().map(Vec::len), Some(2), "{v}");
    // RBD members keep their state in the image; the listing still shows their commits.
    assert!(g["committed_epoch"].as_u64().unwrap() >= epoch, "{v}");
    assert_eq!(v["targets"].as_array().map(Vec::len), Some(2), "{v}");

    // Replication goes on over the cloned snapshots: more epochs, no failure, RPO kept.
    let started = Instant::now();
    let mut max_rpo = 0f64;
    while started.elapsed() < Duration::from_secs(20) {
        let g = daemon.group("vm");
        assert_eq!(
            g["failures"].as_u64(),
            Some(0),
            "a cycle failed while clones exist: {g}\n{}",
            lab.sink_log()
        );
        max_rpo = max_rpo.max(g["rpo_seconds"].as_f64().unwrap());
        std::thread::sleep(Duration::from_millis(500));
    }
    let g = daemon.group("vm");
    let after = g["committed_epoch"].as_u64().unwrap();
    println!("epochs {epoch} -> {after} with clones; RPO at most {max_rpo:.2} s");
    assert!(after >= epoch + 3, "replication stalled with clones: {g}");
    assert!(max_rpo <= 5.0 + g["last_cycle_seconds"].as_f64().unwrap() + 2.0, "RPO {max_rpo:.2} s");
    assert!(!lab.sink_log().contains("refused"), "{}", lab.sink_log());
    for (clone, want) in clones.iter().zip(&cloned) {
        assert_eq!(&ceph.export_hash(clone, lab.dir.path()), want, "{clone} changed with replication");
    }

    let o = sink_admin(&ceph, &lab, &["test-failover", "--group", "esx01/vm", "--cleanup"]);
    assert!(o.status.success(), "cleanup: {}", text(&o));
    let ls = ceph.rbd_ok(&["ls", "rbd"]);
    assert!(!ls.contains(&prefix), "clones left after --cleanup: {ls}");
    // Pruning catches up: the cloned epoch's snapshot goes once it is old.
    let e = daemon.group("vm")["committed_epoch"].as_u64().unwrap();
    daemon.wait_epoch("vm", e + 2, Duration::from_secs(60));
    for img in &images {
        let snaps = epoch_snapshots(&ceph, &img.spec());
        // (Three while a commit is between its snapshot and the pruning of the oldest.)
        assert!(snaps.len() <= 3 && !snaps.contains(&epoch), "{}: {snaps:?}", img.spec());
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

#[test]
fn failback_sends_only_what_changed_since_the_last_common_epoch() {
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let primary: Vec<TestImage> = (0..2).map(|i| TestImage::new(&ceph, &format!("fbp{i}"))).collect();
    let dr: Vec<TestImage> = (0..2).map(|i| TestImage::new(&ceph, &format!("fbd{i}"))).collect();
    for (i, p) in primary.iter().enumerate() {
        let file = lab.path(&format!("p{i}.img"));
        std::fs::File::create(&file).unwrap().set_len(DISK).unwrap();
        scribble(&file, 0, DISK as usize, 300 + i as u64);
        ceph.rbd_ok(&["import", "--no-progress", file.to_str().unwrap(), &p.spec()]);
    }
    let group = |name: &str, from: &[TestImage], to: &[TestImage], extra: &str| {
        let disks: Vec<String> = from
            .iter()
            .zip(to)
            .map(|(s, t)| format!("{{ source = \"{}\", target = \"{}\" }}", s.target(), t.target()))
            .collect();
        format!(
            "[[group]]\nname = \"{name}\"\nkind = \"rbd\"\ninterval = \"5s\"\n{extra}disks = [{}]\n",
            disks.join(", ")
        )
    };
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);

    // Primary -> DR, two epochs, then the failover.
    let mut forward = Daemon::start(&lab, &sink, "esx01", "", &group("fwd", &primary, &dr, ""), &[]);
    forward.wait_epoch("fwd", 2, Duration::from_secs(90));
    let o = Command::new(bin("blockship-agent"))
        .args(["cutover", "--group", "fwd", "--pre-freeze", "true", "--json", "--control-socket"])
        .arg(&forward.socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "failover: {}", text(&o));
    let n = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["epoch"].as_u64().unwrap();
    assert!(forward.stop().success());

    // The DR side runs and writes 1 % of each disk; the primary's late writes are to be lost.
    let bench = |spec: &str, bytes: u64, pattern: &str| {
        ceph.rbd_ok(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4096",
            "--io-pattern",
            pattern,
            "--io-threads",
            "1",
            "--io-total",
            &bytes.to_string(),
            spec,
        ]);
    };
    for d in &dr {
        bench(&d.spec(), DISK / 100 / 4096 * 4096, "seq");
    }
    bench(&primary[0].spec(), 1 << 20, "rand");

    // DR -> primary from epoch N.
    let back =
        Daemon::start(&lab, &sink, "esx01", "", &group("back", &dr, &primary, "failback = true\n"), &[]);
    let g = back.wait_epoch("back", n + 1, Duration::from_secs(90));
    println!("failback from epoch {n}: {g}");
    for (i, d) in g["disks"].as_array().unwrap().iter().enumerate() {
        let sent = d["bytes_sent"].as_u64().unwrap();
        let read = d["bytes_read"].as_u64().unwrap();
        println!(
            "disk {i}: {read} bytes read, {sent} sent of {DISK} ({:.2} %)",
            100.0 * read as f64 / DISK as f64
        );
        assert_eq!(d["mode"], "incremental", "{d}");
        assert!(
            read <= DISK / 100 * 3,
            "disk {i}: read {read} bytes, far more than the 1 % that changed: {d}"
        );
    }
    for (p, d) in primary.iter().zip(&dr) {
        assert_eq!(
            ceph.export_hash(&p.spec(), lab.dir.path()),
            ceph.export_hash(&d.spec(), lab.dir.path()),
            "{} differs from {} after failback",
            p.spec(),
            d.spec()
        );
    }
    drop(back);
}
