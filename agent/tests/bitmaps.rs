//! QEMU dirty bitmaps across VM restarts. A clean restart stores the persistent bitmaps and
//! replication goes on incrementally; a crash leaves the bitmaps QEMU had loaded from its
//! images *inconsistent* (in use when it died), and then the group must resync in compare mode
//! — with the reason in `status` — instead of failing every cycle.

mod common;

use std::time::Duration;

use common::daemon::*;
use common::*;

const DISK: u64 = 8 << 20;

fn write(vm: &Vm, disk: usize, offset: u64, pattern: u8) {
    let cmd = format!("write -P {pattern} {offset} 1048576");
    common::qemu::run("qemu-io", &["-f", "raw", "-c", &cmd, &vm.export_uri(disk)]);
}

fn same(vm: &Vm, lab: &Lab, disk: usize, target: &str) -> bool {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &vm.export_uri(disk)])
        .arg(lab.target(target))
        .output()
        .unwrap();
    out.status.success()
}

#[test]
fn a_vm_crash_that_leaves_bitmaps_inconsistent_resyncs_the_group_instead_of_failing() {
    if !common::qemu::available() {
        return;
    }
    let lab = Lab::new(&["kvm01"]);
    let sink = lab.sink(&["kvm01=file:*"], &[]);
    let mut vm = Vm::start(lab.dir.path(), 2, DISK).unwrap();
    let group = format!(
        "[[group]]\nname = \"vm\"\nkind = \"qemu\"\ninterval = \"5s\"\nqmp = \"{}\"\nnbd_socket = \"{}\"\ndisks = [{{ disk = \"disk0\", target = \"file:bm-0\" }}, {{ disk = \"disk1\", target = \"file:bm-1\" }}]\n",
        vm.qmp.display(),
        vm.nbd.display()
    );
    let mut daemon = Daemon::start(&lab, &sink, "kvm01", "max_backoff = \"5s\"", &group, &[]);
    write(&vm, 0, 1 << 20, 0x11);
    let s = daemon.wait_epoch("vm", 1, Duration::from_secs(60));

    // A clean restart: the bitmaps survive, the next epochs stay incremental.
    vm.restart().unwrap();
    write(&vm, 1, 2 << 20, 0x22);
    let e = u(&s, "committed_epoch");
    let mut last = serde_json::Value::Null;
    let incremental = wait_until(Duration::from_secs(60), || {
        last = daemon.group("vm");
        u(&last, "committed_epoch") > e
            && last["disks"][1]["mode"] == "incremental"
            && u(&last["disks"][1], "bytes_read") > 0
    });
    assert!(incremental, "no incremental epoch after a clean restart: {last}\n{}", daemon.log_text());
    assert!(same(&vm, &lab, 1, "bm-1"));

    // A crash: the bitmaps the VM had loaded from its images are inconsistent when it comes
    // back. (Bitmaps created since it started are not in the images yet: a clean restart just
    // before the crash puts the active one there.)
    write(&vm, 0, 5 << 20, 0x33);
    vm.restart().unwrap();
    vm.crash_and_restart().unwrap();
    let info = common::qemu::run("qemu-img", &["info", "-U", vm.images[0].to_str().unwrap()]);
    assert!(info.contains("in-use"), "the crash left no in-use bitmap: {info}");
    let e = u(&last, "committed_epoch");
    let resynced = wait_until(Duration::from_secs(90), || {
        last = daemon.group("vm");
        u(&last, "committed_epoch") > e && last["disks"][0]["mode"] == "compare"
    });
    assert!(resynced, "the group did not resync after the crash: {last}\n{}", daemon.log_text());
    assert!(last["disks"][0]["note"].as_str().unwrap_or("").contains("bitmap"), "{last}");
    // And it goes on incrementally from the new bitmaps.
    write(&vm, 0, 6 << 20, 0x44);
    let e = u(&last, "committed_epoch");
    let after = wait_until(Duration::from_secs(60), || {
        last = daemon.group("vm");
        u(&last, "committed_epoch") > e
            && last["disks"][0]["mode"] == "incremental"
            && u(&last["disks"][0], "bytes_read") > 0
    });
    assert!(after, "{last}");
    assert!(same(&vm, &lab, 0, "bm-0") && same(&vm, &lab, 1, "bm-1"), "replicas differ from the VM's disks");
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}
