//! An idle VM costs one change query per cycle: a QEMU group whose disks did not change commits
//! its epochs without freezing or reading anything (mode "unchanged"), and the first guest write
//! after that is found by the next cycle and arrives byte for byte.

mod common;

use std::time::Duration;

use common::daemon::*;
use common::*;

const DISK: u64 = 8 << 20;

#[test]
fn an_idle_qemu_group_commits_without_reading_and_the_next_write_arrives() {
    if !common::qemu::available() {
        return;
    }
    let lab = Lab::new(&["kvm01"]);
    let sink = lab.sink(&["kvm01=file:*"], &[]);
    let vm = Vm::start(lab.dir.path(), 2, DISK).unwrap();
    let group = format!(
        "[[group]]\nname = \"vm\"\nkind = \"qemu\"\ninterval = \"5s\"\nqmp = \"{}\"\nnbd_socket = \"{}\"\ndisks = [{{ disk = \"disk0\", target = \"file:idle-0\" }}, {{ disk = \"disk1\", target = \"file:idle-1\" }}]\n",
        vm.qmp.display(),
        vm.nbd.display()
    );
    let mut daemon = Daemon::start(&lab, &sink, "kvm01", "", &group, &[]);
    daemon.wait_epoch("vm", 1, Duration::from_secs(60));

    // Nothing writes: the following epochs commit with nothing read, on the sink too.
    let idle = daemon.wait_epoch("vm", 3, Duration::from_secs(30));
    for d in idle["disks"].as_array().unwrap() {
        assert_eq!(d["mode"], "unchanged", "{idle}");
        assert_eq!(d["bytes_read"], 0, "{idle}");
    }
    let epoch = u(&idle, "committed_epoch");
    for t in ["idle-0", "idle-1"] {
        let state = state_of(&lab, &format!("file:{t}")).expect("target state");
        assert!(u(&state, "committed_epoch") >= epoch, "{t}: {state}");
    }

    // The guest writes 1 MiB into disk1: the next epoch finds it and the replica matches.
    common::qemu::run("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 3145728 1048576", &vm.export_uri(1)]);
    let mut last = serde_json::Value::Null;
    let found = wait_until(Duration::from_secs(30), || {
        last = daemon.group("vm");
        last["disks"][1]["mode"] == "incremental" && u(&last["disks"][1], "bytes_read") > 0
    });
    assert!(found, "no epoch read the write: {last}");
    // The group is frozen as a whole once any disk changed; the untouched disk reads nothing.
    assert_eq!(last["disks"][0]["bytes_read"], 0, "{last}");
    for (i, t) in ["idle-0", "idle-1"].iter().enumerate() {
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &vm.export_uri(i)])
            .arg(lab.target(t))
            .output()
            .unwrap();
        assert!(out.status.success(), "{t} differs from disk{i}: {}", String::from_utf8_lossy(&out.stdout));
    }
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}

#[test]
fn an_idle_daemon_keeps_its_connection_between_cycles() {
    // The test sink closes a session after 5 s without progress (`--idle-timeout 5s`); a daemon
    // whose interval is longer must keep its connection (and its disks open on it) anyway.
    let lab = Lab::new(&["kvm02"]);
    let sink = lab.sink(&["kvm02=file:*"], &[]);
    let src = lab.path("src.img");
    std::fs::File::create(&src).unwrap().set_len(DISK).unwrap();
    scribble(&src, 0, 1 << 20, 7);
    let group = format!(
        "[[group]]\nname = \"quiet\"\nkind = \"file\"\ninterval = \"12s\"\ndisks = [{{ source = \"{}\", target = \"file:quiet\" }}]\n",
        src.display()
    );
    let mut daemon = Daemon::start(&lab, &sink, "kvm02", "", &group, &[]);
    let s = daemon.wait_epoch("quiet", 3, Duration::from_secs(60));
    assert_eq!(s["failures"], 0, "{s}");
    let log = daemon.log_text();
    let connects = log.matches("connected sink=").count();
    assert_eq!(connects, 1, "the daemon reconnected between cycles:\n{log}\nsink:\n{}", lab.sink_log());
    assert!(daemon.stop().success());
}
