//! VMware sources against a fake vCenter speaking vim25 SOAP over HTTPS, with `qemu-nbd` serving
//! the disk image as the snapshot's data (standing in for `nbdkit vddk`): the first sync reads
//! the allocated areas ("*"), incrementals page through QueryChangedDiskAreas (an empty page in
//! the middle), a CBT reset and a fault lead to a resync with a reason, and snapshots are removed
//! after each durable epoch but kept (and the changeId not advanced) when the epoch fails.

mod common;

use std::time::Duration;

use blockship_bench::image::{self, Kind, Profile, REGION};
use common::vcenter::{FakeVcenter, VM_UUID};
use common::*;

const DISK: u64 = 128 << 20;

struct Vm {
    vc: FakeVcenter,
    image: std::path::PathBuf,
    args: Vec<String>,
}

fn setup(lab: &Lab) -> Vm {
    let image = lab.path("vm42-flat.img");
    image::generate(&image, DISK, Profile::Mixed, 31).unwrap();
    // Four pages of 32 MiB.
    let vc = FakeVcenter::start(DISK, DISK / 4);
    // The data command serves the snapshot's frozen copy, as nbdkit vddk serves the snapshot.
    let snaps = vc.freeze_disk(&image);
    {
        let mut st = vc.state.lock().unwrap();
        st.allocated = (0..DISK / REGION)
            .filter(|i| Profile::Mixed.kind(*i) != Kind::Zero)
            .map(|i| (i * REGION, REGION))
            .collect();
    }
    let pw = lab.path("vc-password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let cmd = format!(
        "test -n \"$BLOCKSHIP_SNAPSHOT\" && test -r \"$BLOCKSHIP_VCENTER_PASSWORD_FILE\" && exec qemu-nbd -r -f raw -t --socket \"$BLOCKSHIP_NBD_SOCKET\" {}/\"$BLOCKSHIP_SNAPSHOT-$BLOCKSHIP_DISK_KEY\".img",
        snaps.display()
    );
    let args = vec![
        "--vcenter-user".into(),
        "administrator@vsphere.local".into(),
        "--vcenter-password-file".into(),
        pw.display().to_string(),
        "--vcenter-ca".into(),
        vc.ca.display().to_string(),
        "--vm".into(),
        VM_UUID.into(),
        "--nbd-command".into(),
        cmd,
    ];
    Vm { vc, image, args }
}

impl Vm {
    fn source(&self) -> String {
        format!("vmware://{}", self.vc.addr)
    }

    /// The vCenter flags, with `extra` added (an extra `--vm` replaces the default one).
    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v: Vec<&str> = self.args.iter().map(String::as_str).collect();
        if extra.contains(&"--vm") {
            let i = v.iter().position(|a| *a == "--vm").expect("default --vm");
            v.drain(i..i + 2);
        }
        v.extend_from_slice(extra);
        v
    }

    /// Change the disk and tell the fake vCenter, as CBT would record it.
    fn write(&self, offset: u64, len: u64, seed: u64) {
        scribble(&self.image, offset, len as usize, seed);
        self.vc.record_write(offset, len);
    }

    fn qcda_calls(&self) -> usize {
        self.vc.calls().iter().filter(|c| *c == "QueryChangedDiskAreas").count()
    }
}

#[test]
fn cbt_cycles_resyncs_and_snapshot_lifecycle() {
    if !common::qemu::available() {
        return;
    }
    let lab = Lab::new(&["esx01"]);
    let mut sink = lab.sink(&["esx01=file:*"], &[]);
    let vm = setup(&lab);
    let (zero, _, _) = image::composition(Profile::Mixed, DISK);

    // 1. First sync: only the allocated areas ("*") are read.
    let s1 = lab.sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&[]));
    assert_eq!(s1["mode"], "full", "{s1}");
    assert_eq!(u(&s1, "bytes_read"), DISK - zero, "{s1}");
    let cid1 = s1["change_point"].as_str().unwrap().to_string();
    assert!(cid1.ends_with("/1-2000"), "{s1}");
    assert!(same_file(&vm.image, &lab.target("vm42")));
    assert!(vm.vc.snapshots().is_empty(), "snapshot not removed: {:?}", vm.vc.snapshots());

    // 2. Incremental: changes in pages 1, 3 and 4; page 2 stays empty.
    let before = vm.qcda_calls();
    vm.write(MIB, 64 * 1024, 1);
    vm.write(70 * MIB, 1000, 2);
    vm.write(100 * MIB, 3 * MIB, 3);
    let s2 = lab.sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&[]));
    assert_eq!((s2["mode"].as_str(), u(&s2, "epoch")), (Some("incremental"), 2), "{s2}");
    assert_eq!(u(&s2, "bytes_read"), 64 * 1024 + 1000 + 3 * MIB, "{s2}");
    assert_eq!(vm.qcda_calls() - before, 4, "paging stopped early or went on");
    assert!(s2["change_point"].as_str().unwrap().ends_with("/2-2000"));
    assert!(same_file(&vm.image, &lab.target("vm42")));
    assert!(vm.vc.snapshots().is_empty());

    // 3. CBT reset (new changeId UUID): earlier changes are unknown, so a resync.
    vm.vc.state.lock().unwrap().cbt_uuid = "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 01".into();
    vm.write(20 * MIB, 4096, 4);
    let s3 = lab.sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&["--vm", "dc1/vm/vm42"]));
    assert_eq!(s3["mode"], "compare", "{s3}");
    assert!(s3["note"].as_str().unwrap().contains("changed block tracking was reset"), "{s3}");
    assert!(same_file(&vm.image, &lab.target("vm42")));
    let cid3 = s3["change_point"].as_str().unwrap().to_string();

    // 4. A fault from QueryChangedDiskAreas with --changes vmware: a clear error, nothing
    //    advanced, the snapshot kept; the next run removes it and catches up.
    vm.write(90 * MIB, 8192, 5);
    vm.vc.state.lock().unwrap().fail_qcda =
        Some("Error caused by file /vmfs/volumes/ds1/vm42/vm42-ctk.vmdk".into());
    let out = lab.try_sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&["--changes", "vmware"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("QueryChangedDiskAreas") && err.contains("vm42-ctk.vmdk"), "{err}");
    assert_eq!(vm.vc.snapshots().len(), 1, "the failed epoch's snapshot was not kept");
    assert_eq!(state_of(&lab, "file:vm42").unwrap()["change_point"], cid3.as_str());
    let s4 = lab.sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&[]));
    assert_eq!((s4["mode"].as_str(), u(&s4, "bytes_read")), (Some("incremental"), 8192), "{s4}");
    assert!(vm.vc.snapshots().is_empty(), "stale snapshot left: {:?}", vm.vc.snapshots());
    assert!(same_file(&vm.image, &lab.target("vm42")));

    //    The same fault under --changes auto: a resync that says why.
    vm.write(30 * MIB, 4096, 6);
    vm.vc.state.lock().unwrap().fail_qcda = Some("Error caused by file vm42-ctk.vmdk".into());
    let s5 = lab.sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&[]));
    assert_eq!(s5["mode"], "compare", "{s5}");
    assert!(s5["note"].as_str().unwrap().contains("vm42-ctk.vmdk"), "{s5}");
    assert!(same_file(&vm.image, &lab.target("vm42")));
    let cid5 = s5["change_point"].as_str().unwrap().to_string();

    // 5. The sink dies mid-epoch: the snapshot stays and the changeId does not advance.
    for i in 0..60u64 {
        vm.write(i * 2 * MIB, MIB, 100 + i);
    }
    let mut running =
        lab.spawn_sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&["--bwlimit", "5MiB"]));
    let begun = wait_until(Duration::from_secs(30), || {
        vm.vc.snapshots().len() == 1 && lab.sink_log().contains("epoch begun target=file:vm42 epoch=6")
    });
    if !begun {
        let _ = running.kill();
        let out = running.wait_with_output().unwrap();
        panic!(
            "epoch 6 did not begin; agent: {}\nsink log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            lab.sink_log()
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    sink.kill9();
    let out = running.wait_with_output().unwrap();
    assert!(!out.status.success(), "agent succeeded although the sink died");
    assert_eq!(vm.vc.snapshots().len(), 1, "snapshot removed although the epoch failed");
    assert_eq!(state_of(&lab, "file:vm42").unwrap()["change_point"], cid5.as_str());
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let s6 = lab.sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&[]));
    // The retry reads the kept snapshot and resumes: it reads what lies beyond the durable part.
    let resumed = u(&s6, "resumed_from");
    let beyond: u64 = (0..60u64).map(|i| (i * 2 * MIB + MIB).saturating_sub(resumed.max(i * 2 * MIB))).sum();
    assert_eq!((s6["mode"].as_str(), u(&s6, "bytes_read")), (Some("incremental"), beyond), "{s6}");
    assert!(same_file(&vm.image, &lab.target("vm42")));
    assert!(vm.vc.snapshots().is_empty());
}

#[test]
fn vcenter_errors_are_clear() {
    if !common::qemu::available() {
        return;
    }
    let lab = Lab::new(&["esx01"]);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let vm = setup(&lab);
    let bad_pw = lab.path("wrong");
    std::fs::write(&bad_pw, "nope").unwrap();
    let mut args = vm.args(&[]);
    let i = args.iter().position(|a| *a == "--vcenter-password-file").unwrap();
    args[i + 1] = bad_pw.to_str().unwrap();
    let out = lab.try_sync(&sink, "esx01", vm.source(), "file:x", &args);
    assert!(!out.status.success(), "a wrong vCenter password was accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("incorrect user name or password"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lab.try_sync(
        &sink,
        "esx01",
        vm.source(),
        "file:x",
        &vm.args(&["--vm", "4213c2d5-0000-0000-0000-000000000000"]),
    );
    assert!(!out.status.success(), "an unknown VM was accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no VM"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An untrusted vCenter certificate is refused.
    let mut args = vm.args(&[]);
    let i = args.iter().position(|a| *a == "--vcenter-ca").unwrap();
    args.remove(i);
    args.remove(i);
    let out = lab.try_sync(&sink, "esx01", vm.source(), "file:x", &args);
    assert!(!out.status.success());
    assert!(!lab.target("x").exists());
}

#[test]
fn an_interrupted_epoch_is_retried_from_its_own_snapshot() {
    if !common::qemu::available() {
        return;
    }
    let lab = Lab::new(&["esx01"]);
    let mut sink = lab.sink(&["esx01=file:*"], &[]);
    let vm = setup(&lab);
    lab.sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&[]));
    // Epoch 2 changes 60 MiB; the sink dies after part of it is durable.
    for i in 0..60u64 {
        vm.write(i * 2 * MIB, MIB, 200 + i);
    }
    let running = lab.spawn_sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&["--bwlimit", "8MiB"]));
    let durable = || durable_offset(&lab, "file:vm42");
    assert!(wait_until(Duration::from_secs(60), || durable() >= 30 * MIB), "no durable progress");
    sink.kill9();
    assert!(!running.wait_with_output().unwrap().status.success(), "agent succeeded although the sink died");
    let resumable = durable();
    // The guest rewrites blocks inside the already durable part (same changed areas as before).
    for i in 0..8u64 {
        vm.write(i * 2 * MIB, MIB, 900 + i);
    }
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let s2 = lab.sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&[]));
    assert_eq!(u(&s2, "epoch"), 2, "{s2}");
    let cid2 = s2["change_point"].as_str().unwrap().to_string();
    assert!(
        same_file(&vm.vc.snapshot_data(&cid2), &lab.target("vm42")),
        "epoch 2 records changeId {cid2} but the target holds another point in time (resumed at {} of {resumable} durable bytes)",
        u(&s2, "resumed_from")
    );
    assert!(u(&s2, "resumed_from") >= 30 * MIB, "the retry from the same snapshot did not resume: {s2}");
    assert!(vm.vc.snapshots().is_empty(), "snapshots left: {:?}", vm.vc.snapshots());
    // The rewrites arrive with the next epoch.
    let s3 = lab.sync(&sink, "esx01", vm.source(), "file:vm42", &vm.args(&[]));
    assert_eq!((s3["mode"].as_str(), u(&s3, "bytes_read")), (Some("incremental"), 8 * MIB), "{s3}");
    assert!(same_file(&vm.image, &lab.target("vm42")));
}

#[test]
fn a_chatty_data_command_and_another_disks_snapshot() {
    if !common::qemu::available() {
        return;
    }
    let lab = Lab::new(&["esx01"]);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let vm = setup(&lab);
    // Another disk of the same VM (another target) is being replicated: its snapshot must survive.
    let other = "blockship-1-0badc0de".to_string();
    {
        let mut st = vm.vc.state.lock().unwrap();
        let cid = format!("{}/0", st.cbt_uuid);
        st.snapshots.push(("snapshot-999".into(), other.clone(), cid));
    }
    // A data command that logs 1 MiB to stderr before serving (VDDK is that chatty): the pipe
    // must be drained or the command stalls and never serves.
    let i = vm.args.iter().position(|a| a == "--nbd-command").unwrap();
    let chatty = format!("head -c 1048576 /dev/zero | tr '\\0' x | fold -w 100 >&2; {}", vm.args[i + 1]);
    let mut args = vm.args(&[]);
    args[i + 1] = &chatty;
    let s1 = lab.sync(&sink, "esx01", vm.source(), "file:vm42", &args);
    assert_eq!(s1["mode"], "full", "{s1}");
    assert!(same_file(&vm.image, &lab.target("vm42")));
    assert_eq!(vm.vc.snapshots(), vec![other], "another target's snapshot was touched");
}
