//! The agent daemon (`blockship-agent run`): groups of disks replicated continuously, each group
//! epoch one point in time across its disks. A live qemu-storage-daemon "VM" with three disks
//! and a sequence-numbered writer replicates into RBD at a 5 s interval, and every committed
//! epoch's snapshots must be one consistent cut of the writer's log; the RPO shown by `status`
//! stays within interval + cycle time; over QUIC and over gRPC alike.

mod common;

use std::time::{Duration, Instant};

use common::ceph::*;
use common::daemon::*;
use common::*;

const DISK: u64 = 16 << 20;

fn a_live_qemu_group_is_one_consistent_cut_every_epoch(transport: &str) {
    let Some(ceph) = ceph() else { return };
    if !common::qemu::available() {
        return;
    }
    let lab = Lab::over(&["esx01"], transport);
    let images: Vec<TestImage> =
        (0..3).map(|i| TestImage::new(&ceph, &format!("qemu{i}-{transport}"))).collect();
    // Every epoch's snapshots are kept, so each can be checked at the end.
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &["--keep-snapshots", "1000"]);
    let vm = Vm::start(lab.dir.path(), 3, DISK).unwrap();
    let writer = SeqWriter::start((0..3).map(|i| vm.export_uri(i)).collect(), DISK / BLOCK, lab.dir.path());
    let disks: Vec<String> = images
        .iter()
        .enumerate()
        .map(|(i, img)| format!("{{ disk = \"disk{i}\", target = \"{}\" }}", img.target()))
        .collect();
    let group = format!(
        "[[group]]\nname = \"vm\"\nkind = \"qemu\"\ninterval = \"5s\"\nqmp = \"{}\"\nnbd_socket = \"{}\"\ndisks = [{}]\n",
        vm.qmp.display(),
        vm.nbd.display(),
        disks.join(", ")
    );
    let mut daemon = Daemon::start(&lab, &sink, "esx01", "", &group, &[]);

    // At least 60 s of replication while the guest writes; watch the RPO every half second.
    let started = Instant::now();
    let (mut max_rpo, mut max_cycle, mut samples) = (0f64, 0f64, 0u32);
    while started.elapsed() < Duration::from_secs(62) {
        std::thread::sleep(Duration::from_millis(500));
        let g = daemon.group("vm");
        assert!(g["last_error"].as_str().unwrap_or("").is_empty() || g["failures"] == 0, "{g}");
        if g["committed_epoch"].as_u64().unwrap_or(0) >= 1 {
            max_rpo = max_rpo.max(g["rpo_seconds"].as_f64().unwrap());
            max_cycle = max_cycle.max(g["last_cycle_seconds"].as_f64().unwrap());
            samples += 1;
        }
    }
    let last = daemon.group("vm");
    assert_eq!(last["consistency"], "atomic", "{last}");
    let epochs = last["committed_epoch"].as_u64().unwrap();
    assert!(daemon.stop().success(), "the daemon did not exit 0 on SIGTERM: {}", daemon.log_text());
    let log = writer.finish();
    println!(
        "{epochs} group epochs in 62 s, {} writes; RPO at most {max_rpo:.2} s over {samples} samples, cycle at most {max_cycle:.2} s",
        log.len()
    );
    assert!(epochs >= 10, "only {epochs} epochs in 62 s at a 5 s interval: {}", daemon.log_text());
    // The RPO (age of the committed point) never exceeded interval + cycle time (+ sampling).
    assert!(max_rpo <= 5.0 + max_cycle + 0.6, "RPO {max_rpo:.2} s > 5 s + {max_cycle:.2} s");

    // Every committed epoch is one consistent cut of the writer's log across the three disks.
    let mut prefixes = Vec::new();
    for e in 1..=epochs {
        let disks: Vec<Vec<u8>> = images
            .iter()
            .map(|img| {
                let file = lab.path("snap.img");
                let _ = std::fs::remove_file(&file);
                ceph.rbd_ok(&[
                    "export",
                    "--no-progress",
                    &format!("{}@blockship-{e}", img.spec()),
                    file.to_str().unwrap(),
                ]);
                std::fs::read(&file).unwrap()
            })
            .collect();
        let prefix = consistent_cut(&log, &disks).unwrap_or_else(|e| panic!("epoch {e}: {e}"));
        prefixes.push(prefix);
    }
    assert!(prefixes.windows(2).all(|w| w[0] <= w[1]), "epochs went back in time: {prefixes:?}");
    assert!(prefixes.last().copied().unwrap_or(0) > 0, "no write was replicated: {prefixes:?}");
    // Each epoch overlapped guest writes: the cuts differ.
    let distinct = prefixes.windows(2).filter(|w| w[0] < w[1]).count();
    assert!(distinct + 1 >= prefixes.len() - 1, "cuts did not move with the writer: {prefixes:?}");
    drop(vm);
}

#[test]
fn the_verifier_catches_disks_frozen_at_different_moments() {
    // The check above must be able to fail: build each disk's image from the log as it stood
    // after a given number of writes.
    let blocks = 16u64;
    let log: Vec<Logged> = (0..300u64).map(|seq| (seq, (seq % 3) as usize, (seq / 3 * 7) % blocks)).collect();
    let image = |disk: usize, prefix: usize| {
        let mut img = vec![0u8; (blocks * BLOCK) as usize];
        for &(seq, d, index) in &log[..prefix] {
            if d == disk {
                let at = (index * BLOCK) as usize;
                img[at..at + BLOCK as usize].copy_from_slice(&block(seq));
            }
        }
        img
    };
    let same: Vec<Vec<u8>> = (0..3).map(|d| image(d, 200)).collect();
    assert_eq!(consistent_cut(&log, &same), Ok(200));
    let skewed = vec![image(0, 200), image(1, 170), image(2, 200)];
    let e = consistent_cut(&log, &skewed).unwrap_err();
    assert!(e.contains("not frozen at one instant"), "{e}");
    let mut torn = same.clone();
    torn[2][(3 * BLOCK) as usize + 100] ^= 1;
    assert!(consistent_cut(&log, &torn).is_err());
}

#[test]
fn an_rbd_group_commits_each_epoch_equal_to_its_source_snapshots() {
    let Some(ceph) = ceph() else { return };
    let lab = Lab::new(&["esx01"]);
    let sources: Vec<TestImage> = (0..2).map(|i| TestImage::new(&ceph, &format!("gsrc{i}"))).collect();
    let targets: Vec<TestImage> = (0..2).map(|i| TestImage::new(&ceph, &format!("gdst{i}"))).collect();
    for s in &sources {
        ceph.rbd_ok(&["create", "--size", "64M", &s.spec()]);
    }
    let sink = ceph.sink(&lab, &["esx01=rbd:rbd/*"], &[]);
    let disks: Vec<String> = sources
        .iter()
        .zip(&targets)
        .map(|(s, t)| format!("{{ source = \"{}\", target = \"{}\" }}", s.target(), t.target()))
        .collect();
    // Cycles on demand (SyncNow), so every epoch can be checked before the next one.
    let group = format!(
        "[[group]]\nname = \"dr\"\nkind = \"rbd\"\ninterval = \"1h\"\ndisks = [{}]\n",
        disks.join(", ")
    );
    let daemon = Daemon::start(&lab, &sink, "esx01", "", &group, &[]);
    for epoch in 1..=3u64 {
        for (i, s) in sources.iter().enumerate() {
            write_random(&ceph, &s.name, (epoch * 8 + i as u64) << 20, 4 << 20, epoch * 10 + i as u64);
        }
        if epoch > 1 {
            daemon.control("sync-now", "dr");
        }
        let g = daemon.wait_epoch("dr", epoch, Duration::from_secs(60));
        assert_eq!(g["consistency"], "per-disk", "{g}");
        for (s, t) in sources.iter().zip(&targets) {
            let target = ceph.export_hash(&format!("{}@blockship-{epoch}", t.spec()), lab.dir.path());
            let source = ceph.export_hash(&format!("{}@blockship-src-{epoch}", s.spec()), lab.dir.path());
            assert_eq!(target, source, "epoch {epoch}: {} differs from its source snapshot", t.target());
        }
        if epoch > 1 {
            let modes: Vec<&str> =
                g["disks"].as_array().unwrap().iter().map(|d| d["mode"].as_str().unwrap()).collect();
            assert_eq!(modes, ["incremental", "incremental"], "{g}");
        }
    }
    let table = std::process::Command::new(bin("blockship-agent"))
        .args(["status", "--control-socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("frozen one after another"), "status does not say the group is per-disk: {table}");
}

#[test]
fn a_vmware_group_takes_one_vm_snapshot_per_cycle_and_advances_every_change_id_together() {
    if !common::qemu::available() {
        return;
    }
    const SIZE: u64 = 32 << 20;
    let lab = Lab::new(&["esx01"]);
    let mut sink = lab.sink(&["esx01=file:*"], &[]);
    let vm = common::vcenter::vmware_vm(&lab, SIZE);
    let targets = ["file:vm42-a", "file:vm42-b"];
    let group = format!(
        "[bandwidth]\ndefault = \"6MiB\"\n[[group]]\nname = \"vm42\"\nkind = \"vmware\"\nvm = \"{}\"\nvcenter = \"{}\"\ninterval = \"1h\"\ndisks = [{{ disk = \"2000\", target = \"{}\" }}, {{ disk = \"Hard disk 2\", target = \"{}\" }}]\n",
        common::vcenter::VM_UUID,
        vm.vc.addr,
        targets[0],
        targets[1]
    );
    let daemon = Daemon::start_with(&lab, &sink, "esx01", &vm.agent, "max_backoff = \"2s\"", &group, &[]);

    // Epoch 1: the allocated areas of both disks, from one VM snapshot.
    let g = daemon.wait_epoch("vm42", 1, Duration::from_secs(60));
    assert_eq!(g["consistency"], "atomic", "{g}");
    assert_eq!(vm.vc.snapshots_created(), 1, "one cycle, one VM snapshot");
    vm.check_epoch(&lab, &targets, 1);
    assert!(vm.vc.snapshots().is_empty(), "snapshot left after the commit: {:?}", vm.vc.snapshots());

    // Epoch 2: changes on both disks, again one snapshot.
    vm.write(0, MIB, 64 * 1024, 1);
    vm.write(1, 9 * MIB, 3000, 2);
    daemon.control("sync-now", "vm42");
    let g = daemon.wait_epoch("vm42", 2, Duration::from_secs(60));
    let read: Vec<u64> = g["disks"].as_array().unwrap().iter().map(|d| u(d, "bytes_read")).collect();
    assert_eq!(read, [64 * 1024, 3000], "{g}");
    assert_eq!(vm.vc.snapshots_created(), 2);
    vm.check_epoch(&lab, &targets, 2);

    // Epoch 3 dies with the sink: neither changeId advances (even if one disk's data was all
    // sent), the snapshot is kept, and the retry reads that same snapshot.
    for disk in 0..2 {
        vm.write(disk, 4 * MIB, 8 * MIB, 10 + disk as u64);
    }
    daemon.control("sync-now", "vm42");
    let durable = |t: &str| durable_offset(&lab, t);
    assert!(
        wait_until(Duration::from_secs(30), || durable(targets[0]) > 0 || durable(targets[1]) > 0),
        "epoch 3 made no durable progress: {}",
        daemon.log_text()
    );
    sink.kill9();
    for t in targets {
        let cid = state_of(&lab, t).unwrap()["change_point"].as_str().unwrap().to_string();
        assert!(cid.contains("/2-"), "{t} advanced to {cid} although the group did not commit");
    }
    assert_eq!(vm.vc.snapshots().len(), 1, "the failed cycle's snapshot was not kept");
    // Writes after the failed cycle belong to the next one.
    vm.write(0, 20 * MIB, 4096, 20);
    let _sink = lab.sink_on(&sink.addr, &["esx01=file:*"], &[]);
    let g = daemon.wait_epoch("vm42", 3, Duration::from_secs(60));
    assert_eq!(vm.vc.snapshots_created(), 3, "the retry took a new snapshot instead of the frozen one: {g}");
    vm.check_epoch(&lab, &targets, 3);
    assert!(vm.vc.snapshots().is_empty(), "snapshot left: {:?}", vm.vc.snapshots());
    daemon.control("sync-now", "vm42");
    let g = daemon.wait_epoch("vm42", 4, Duration::from_secs(60));
    let read: Vec<u64> = g["disks"].as_array().unwrap().iter().map(|d| u(d, "bytes_read")).collect();
    assert_eq!(read, [4096, 0], "{g}");
    vm.check_epoch(&lab, &targets, 4);
    assert!(
        same_file(&vm.images[0], &lab.target("vm42-a")) && same_file(&vm.images[1], &lab.target("vm42-b"))
    );
}

/// Two file disks replicated into two RBD images by a daemon, with the sink armed to crash at
/// `point` during the second group commit.
struct CrashLab<'a> {
    lab: Lab,
    ceph: &'a Ceph,
    sources: Vec<std::path::PathBuf>,
    targets: Vec<TestImage<'a>>,
    group: String,
}

impl<'a> CrashLab<'a> {
    fn new(ceph: &'a Ceph, tag: &str) -> CrashLab<'a> {
        let lab = Lab::new(&["esx01"]);
        let sources: Vec<_> = (0..2).map(|i| lab.path(&format!("src{i}.img"))).collect();
        for (i, s) in sources.iter().enumerate() {
            std::fs::File::create(s).unwrap().set_len(DISK).unwrap();
            scribble(s, 0, DISK as usize, 500 + i as u64);
        }
        let targets: Vec<_> = (0..2).map(|i| TestImage::new(ceph, &format!("{tag}{i}"))).collect();
        let disks: Vec<String> = sources
            .iter()
            .zip(&targets)
            .map(|(s, t)| format!("{{ source = \"{}\", target = \"{}\" }}", s.display(), t.target()))
            .collect();
        let group = format!(
            "[[group]]\nname = \"crash\"\nkind = \"file\"\ninterval = \"1h\"\ndisks = [{}]\n",
            disks.join(", ")
        );
        CrashLab { lab, ceph, sources, targets, group }
    }

    fn sink(&self, listen: &str, env: &[(&str, &str)]) -> Sink {
        let mut args: Vec<&str> = self.ceph.sink_args.iter().map(String::as_str).collect();
        args.extend(["--keep-snapshots", "2"]);
        self.lab.sink_with(listen, &["esx01=rbd:rbd/*"], &args, env)
    }

    /// Committed epoch of each member, as its state (kept with the image) says.
    fn committed(&self) -> Vec<u64> {
        self.targets
            .iter()
            .map(|t| {
                let text = self.ceph.rbd_ok(&["image-meta", "get", &t.spec(), "blockship.state"]);
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                v["committed_epoch"].as_u64().unwrap()
            })
            .collect()
    }

    /// Every member image (or its snapshot `@snap`) equals the source copies saved as `tag`.
    fn check(&self, snap: &str, tag: &str) {
        for (i, t) in self.targets.iter().enumerate() {
            let want = sha(&self.lab.path(&format!("src{i}.{tag}")));
            let got = self.ceph.export_hash(&format!("{}{snap}", t.spec()), self.lab.dir.path());
            assert_eq!(got, want, "{}{snap} is not the sources' epoch {tag}", t.spec());
        }
    }

    fn save(&self, tag: &str) {
        for (i, s) in self.sources.iter().enumerate() {
            std::fs::copy(s, self.lab.path(&format!("src{i}.{tag}"))).unwrap();
        }
    }

    fn rollback(&self) -> String {
        let out = std::process::Command::new(bin("blockship-sink"))
            .args(["rollback", "--group", "esx01/crash", "--state-dir"])
            .arg(self.lab.path("state"))
            .args(&self.ceph.sink_args)
            .output()
            .unwrap();
        assert!(out.status.success(), "rollback --group failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Epoch 1 commits; epoch 2 crashes the sink at `point`; the daemon is stopped with it.
    fn crash(&self, point: &str) -> String {
        let arm = format!("{point}=1*off->return");
        let mut sink = self.sink("127.0.0.1:0", &[("FAILPOINTS", &arm)]);
        let mut daemon = Daemon::start(&self.lab, &sink, "esx01", "", &self.group, &[]);
        daemon.wait_epoch("crash", 1, Duration::from_secs(60));
        self.save("1");
        for (i, s) in self.sources.iter().enumerate() {
            scribble(s, (2 + i as u64) * MIB, 3 * MIB as usize, 600 + i as u64);
        }
        self.save("2");
        daemon.control("sync-now", "crash");
        assert!(sink.wait_exit(Duration::from_secs(60)), "{point} never fired: {}", self.lab.sink_log());
        daemon.kill9();
        sink.addr.clone()
    }
}

#[test]
fn a_crash_between_member_snapshots_leaves_every_member_at_one_epoch() {
    let Some(ceph) = ceph() else { return };
    let c = CrashLab::new(&ceph, "gsnap");
    let addr = c.crash("sink::group-between-snapshots");
    // The first member has its snapshot of epoch 2, the second not; neither state says 2.
    assert_eq!(c.committed(), [1, 1]);
    let out = c.rollback();
    assert!(out.contains("every member is at epoch 1"), "{out}");
    assert_eq!(c.committed(), [1, 1]);
    c.check("", "1");
    // A new sink and agent: the epoch is sent again and commits on both.
    let sink = c.sink(&addr, &[]);
    let daemon = Daemon::start(&c.lab, &sink, "esx01", "", &c.group, &[]);
    daemon.wait_epoch("crash", 2, Duration::from_secs(60));
    assert_eq!(c.committed(), [2, 2]);
    c.check("@blockship-2", "2");
    c.check("@blockship-1", "1");
}

#[test]
fn a_crash_between_member_states_is_completed_on_restart() {
    let Some(ceph) = ceph() else { return };
    let c = CrashLab::new(&ceph, "gstate");
    let addr = c.crash("sink::group-between-states");
    // Every snapshot of epoch 2 exists, one state records it: the group commit is completed
    // (rolled forward) by the sink that next opens the group, before anything else happens.
    assert_eq!(c.committed(), [2, 1], "the crash point is not between the two states");
    let sink = c.sink(&addr, &[]);
    let mut daemon = Daemon::start(&c.lab, &sink, "esx01", "", &c.group, &[]);
    let g = daemon.wait_epoch("crash", 2, Duration::from_secs(60));
    let disks: Vec<u64> = g["disks"].as_array().unwrap().iter().map(|d| u(d, "committed_epoch")).collect();
    assert_eq!(disks[0], disks[1], "{g}");
    c.check("@blockship-2", "2");
    // rollback --group with the sink stopped: every member back at the group's epoch.
    daemon.kill9();
    drop(sink);
    let committed = c.committed();
    assert_eq!(committed[0], committed[1]);
    let out = c.rollback();
    assert!(out.contains(&format!("every member is at epoch {}", committed[0])), "{out}");
    c.check("", "2");
}

#[test]
fn the_bandwidth_schedule_limits_inside_its_window_only() {
    const LIMIT: f64 = 8.0 * MIB as f64;
    const SIZE: u64 = 48 * MIB;
    let lab = Lab::new(&["esx01"]);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let schedule = "[bandwidth]\ndefault = \"unlimited\"\n[[bandwidth.window]]\ndays = \"mon-fri\"\nfrom = \"09:00\"\nto = \"17:00\"\nlimit = \"8MiB\"\n";
    // One full epoch of incompressible data, with the clock inside and then outside the window
    // (2026-12-07 is a Monday).
    let mut rates = Vec::new();
    for (tag, clock) in [("inside", "2026-12-07T10:00:00"), ("outside", "2026-12-07T18:00:00")] {
        let source = lab.path(&format!("{tag}.img"));
        std::fs::File::create(&source).unwrap().set_len(SIZE).unwrap();
        scribble(&source, 0, SIZE as usize, 77);
        let group = format!(
            "{schedule}[[group]]\nname = \"{tag}\"\nkind = \"file\"\ninterval = \"1h\"\ndisks = [{{ source = \"{}\", target = \"file:{tag}\" }}]\n",
            source.display()
        );
        let mut daemon = Daemon::start(&lab, &sink, "esx01", "", &group, &[("BLOCKSHIP_CLOCK", clock)]);
        let g = daemon.wait_epoch(tag, 1, Duration::from_secs(60));
        let d = &g["disks"][0];
        let (sent, seconds) = (u(d, "bytes_sent"), d["seconds"].as_f64().unwrap());
        assert!(sent >= SIZE, "{g}");
        rates.push(sent as f64 / seconds);
        assert!(same_file(&source, &lab.target(tag)));
        daemon.stop();
    }
    let (inside, outside) = (rates[0], rates[1]);
    eprintln!(
        "inside the window: {:.2} MiB/s, outside: {:.1} MiB/s",
        inside / MIB as f64,
        outside / MIB as f64
    );
    assert!((inside - LIMIT).abs() <= 0.1 * LIMIT, "inside the window: {inside:.0} B/s, limit {LIMIT} B/s");
    assert!(outside > 2.0 * LIMIT, "outside the window the limit still applied: {outside:.0} B/s");
}

/// Timestamp of the first log line after byte `from` of `log` that contains `needle`.
fn first_logged(log: &str, from: usize, needle: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    log.get(from..)?
        .lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
}

#[test]
fn a_broken_group_backs_off_alone_and_a_restarted_sink_is_reached_in_seconds() {
    let Some(ceph) = ceph() else { return };
    if !common::qemu::available() {
        return;
    }
    let lab = Lab::new(&["esx01"]);
    let allow = ["esx01=rbd:rbd/*", "esx01=file:*"];
    let mut sink_args: Vec<&str> = ceph.sink_args.iter().map(String::as_str).collect();
    sink_args.extend(["--keep-snapshots", "1000"]);
    let mut sink = lab.sink(&allow, &sink_args);
    // Three healthy groups of two file disks each, into RBD images, changing every second.
    let mut config = String::new();
    let mut sources = Vec::new();
    let mut targets = Vec::new();
    for g in 0..3 {
        let mut disks = Vec::new();
        for d in 0..2 {
            let src = lab.path(&format!("g{g}d{d}.img"));
            std::fs::File::create(&src).unwrap().set_len(DISK).unwrap();
            scribble(&src, 0, DISK as usize, g * 10 + d);
            let t = TestImage::new(&ceph, &format!("fault{g}{d}"));
            disks.push(format!("{{ source = \"{}\", target = \"{}\" }}", src.display(), t.target()));
            sources.push(src);
            targets.push((format!("g{g}"), t));
        }
        config += &format!(
            "[[group]]\nname = \"g{g}\"\nkind = \"file\"\ninterval = \"5s\"\ndisks = [{}]\n",
            disks.join(", ")
        );
    }
    // And a QEMU VM that will go away.
    let vm = Vm::start(lab.dir.path(), 2, DISK).unwrap();
    config += &format!(
        "[[group]]\nname = \"vm\"\nkind = \"qemu\"\ninterval = \"5s\"\nqmp = \"{}\"\nnbd_socket = \"{}\"\ndisks = [{{ disk = \"disk0\", target = \"file:vm-0\" }}, {{ disk = \"disk1\", target = \"file:vm-1\" }}]\n",
        vm.qmp.display(),
        vm.nbd.display()
    );
    let mut daemon = Daemon::start(&lab, &sink, "esx01", "max_backoff = \"20s\"", &config, &[]);
    let healthy = ["g0", "g1", "g2"];
    let mut tick = 0u64;
    let mut change = |sources: &[std::path::PathBuf]| {
        tick += 1;
        for (i, s) in sources.iter().enumerate() {
            scribble(s, (tick * 64 * 1024 * 7) % (DISK - 65536), 65536, tick * 100 + i as u64);
        }
    };
    for g in healthy.iter().chain(&["vm"]) {
        daemon.wait_epoch(g, 1, Duration::from_secs(60));
    }

    // The VM goes away: its group fails and backs off; the others keep their RPO.
    drop(vm);
    let started = Instant::now();
    let (mut max_rpo, mut max_cycle) = (0f64, 0f64);
    let mut broken = serde_json::Value::Null;
    while started.elapsed() < Duration::from_secs(25) {
        std::thread::sleep(Duration::from_millis(500));
        change(&sources);
        for g in healthy {
            let s = daemon.group(g);
            assert_eq!(s["failures"], 0, "healthy group {g} failed: {s}");
            max_rpo = max_rpo.max(s["rpo_seconds"].as_f64().unwrap());
            max_cycle = max_cycle.max(s["last_cycle_seconds"].as_f64().unwrap());
        }
        broken = daemon.group("vm");
    }
    println!("while the VM was gone: healthy RPO at most {max_rpo:.2} s (cycle at most {max_cycle:.2} s); vm: {broken}");
    assert!(max_rpo <= 5.0 + max_cycle + 0.6, "a healthy group's RPO reached {max_rpo:.2} s");
    assert!(u(&broken, "failures") >= 2, "the broken group did not retry: {broken}");
    assert!(u(&broken, "failures") <= 4, "the broken group did not back off: {broken}");
    assert_eq!(broken["state"], "backoff", "{broken}");
    assert!(!broken["last_error"].as_str().unwrap().is_empty(), "{broken}");

    // The sink is SIGKILLed and restarted on the same address.
    let epochs: Vec<u64> = healthy.iter().map(|g| u(&daemon.group(g), "committed_epoch")).collect();
    sink.kill9();
    std::thread::sleep(Duration::from_secs(3));
    change(&sources);
    let log_from = lab.sink_log().len();
    let restarted = chrono::Utc::now();
    let _sink = lab.sink_on(&sink.addr, &allow, &sink_args);
    let back = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || healthy
            .iter()
            .zip(&epochs)
            .all(|(g, e)| u(&daemon.group(g), "committed_epoch") > *e)),
        "the groups did not continue after the sink restarted: {}",
        daemon.log_text()
    );
    let all_committed = back.elapsed().as_secs_f64();
    let log = lab.sink_log();
    let since = |needle: &str| {
        first_logged(&log, log_from, needle).map(|t| (t - restarted).num_milliseconds() as f64 / 1000.0)
    };
    let first_write =
        since("epoch begun target=rbd:").expect("no epoch began on an RBD image after the restart");
    let first_commit = since("epoch committed target=rbd:").unwrap_or(f64::NAN);
    println!(
        "sink restart: first RBD epoch begun after {first_write:.2} s, first RBD commit after {first_commit:.2} s, every healthy group committed again after {all_committed:.2} s"
    );
    assert!(first_write <= 5.0, "the first RBD write came {first_write:.2} s after the restart");

    // Nothing reported committed is missing from any member.
    let mut daemon_groups = Vec::new();
    for g in healthy {
        daemon_groups.push((g, u(&daemon.group(g), "committed_epoch")));
    }
    daemon.stop();
    for (g, e) in daemon_groups {
        for (_, t) in targets.iter().filter(|(n, _)| n == g) {
            let text = ceph.rbd_ok(&["image-meta", "get", &t.spec(), "blockship.state"]);
            let state: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(u(&state, "committed_epoch") >= e, "{g} reported epoch {e}, {} says {state}", t.spec());
            let snaps = ceph.rbd_ok(&["snap", "ls", &t.spec()]);
            assert!(
                snaps.contains(&format!("blockship-{e} ")),
                "{g} reported epoch {e}; {} has {snaps}",
                t.spec()
            );
        }
    }
}

// The continuous group over either transport: the same cuts, the same RPO bound.
each_transport!(a_live_qemu_group_is_one_consistent_cut_every_epoch);
