//! Cutover (`blockship-agent cutover`): a live three-disk qemu group (a qemu-storage-daemon "VM"
//! with a sequence-numbered writer) replicating into RBD is cut over. The pre-freeze hook stops
//! the writer and waits until its last write completed; the final images (and their
//! `blockship-final` snapshots) must equal the stopped source byte for byte and hold every write
//! of the log. After the cutover the sink refuses replication into the targets unless forced.
//! `--abort` after the freeze restarts the source and replication goes on; an agent killed
//! during the final cycle, and a sink killed while finalising, are completed by running the same
//! command again. A VMware VM is stopped through the fake vCenter.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::ceph::*;
use common::daemon::*;
use common::*;

const DISK: u64 = 16 << 20;

/// A running group `vm` of three qsd disks with a writer that stops at its stop file.
struct Setup {
    lab: Lab,
    vm: Vm,
    writer: Option<SeqWriter>,
    stop_file: PathBuf,
    group: String,
}

impl Setup {
    fn new(targets: &[String], lab: Lab) -> Setup {
        let vm = Vm::start(lab.dir.path(), 3, DISK).unwrap();
        let stop_file = lab.path("writer.stop");
        let writer = SeqWriter::start_until(
            (0..3).map(|i| vm.export_uri(i)).collect(),
            DISK / BLOCK,
            lab.dir.path(),
            Some(stop_file.clone()),
        );
        let disks: Vec<String> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{{ disk = \"disk{i}\", target = \"{t}\" }}"))
            .collect();
        let group = format!(
            "[[group]]\nname = \"vm\"\nkind = \"qemu\"\ninterval = \"5s\"\nqmp = \"{}\"\nnbd_socket = \"{}\"\ndisks = [{}]\n",
            vm.qmp.display(),
            vm.nbd.display(),
            disks.join(", ")
        );
        Setup { lab, vm, writer: Some(writer), stop_file, group }
    }

    /// The pre-freeze hook: stop the writer and wait until its last write completed.
    fn stop_writer_hook(&self) -> String {
        let f = self.stop_file.display();
        format!("touch {f}; until [ -e {f}.done ]; do sleep 0.02; done; echo writer stopped")
    }

    /// The source disks as they are now.
    fn source(&self, i: usize) -> Vec<u8> {
        let out = self.lab.path(&format!("source{i}.img"));
        common::qemu::nbd_to_file(&self.vm.export_uri(i), &out);
        std::fs::read(&out).unwrap()
    }
}

fn cutover_cmd(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(bin("blockship-agent"));
    c.args(["cutover", "--group", "vm", "--control-socket"]).arg(&d.socket).args(args);
    c
}

fn cutover(d: &Daemon, args: &[&str]) -> Output {
    cutover_cmd(d, args).output().unwrap()
}

/// A cutover running in the background (its output collected at the end).
fn spawn_cutover(d: &Daemon, args: &[&str]) -> std::process::Child {
    cutover_cmd(d, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn rbd_export(ceph: &Ceph, dir: &Path, spec: &str) -> Vec<u8> {
    let file = dir.join("export.img");
    let _ = std::fs::remove_file(&file);
    ceph.rbd_ok(&["export", "--no-progress", spec, file.to_str().unwrap()]);
    std::fs::read(&file).unwrap()
}

#[test]
fn a_live_qemu_group_cuts_over_to_images_equal_to_the_stopped_source() {
    let Some(ceph) = ceph() else { return };
    if !common::qemu::available() {
        return;
    }
    let images: Vec<TestImage> = (0..3).map(|i| TestImage::new(&ceph, &format!("cut{i}"))).collect();
    let s = Setup::new(&images.iter().map(|i| i.target()).collect::<Vec<_>>(), Lab::new(&["esx01"]));
    let sink = ceph.sink(&s.lab, &["esx01=rbd:rbd/*"], &[]);
    let daemon = Daemon::start(&s.lab, &sink, "esx01", "", &s.group, &[]);
    daemon.wait_epoch("vm", 2, Duration::from_secs(60));

    // Without a hook, a qemu-storage-daemon (no guest, no QMP `stop`) cannot be stopped: a
    // clear refusal, nothing cut over, replication goes on.
    let o = cutover(&daemon, &[]);
    assert!(!o.status.success() && text(&o).contains("has no `stop`"), "{}", text(&o));
    let before = daemon.group("vm")["committed_epoch"].as_u64().unwrap();
    daemon.wait_epoch("vm", before + 1, Duration::from_secs(30));

    let post = s.lab.path("post.txt");
    let post_hook = format!("echo \"$BLOCKSHIP_EPOCH $BLOCKSHIP_TARGETS\" > {}", post.display());
    let o =
        cutover(&daemon, &["--pre-freeze", &s.stop_writer_hook(), "--post-cutover", &post_hook, "--json"]);
    assert!(o.status.success(), "cutover failed: {}\n{}", text(&o), daemon.log_text());
    let reply: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let epoch = reply["epoch"].as_u64().unwrap();
    let downtime = reply["downtime_seconds"].as_f64().unwrap();
    let phases: Vec<String> = reply["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{} {:.3} s ({})",
                p["name"].as_str().unwrap(),
                p["seconds"].as_f64().unwrap(),
                p["detail"]
            )
        })
        .collect();
    println!("cut over at epoch {epoch}: downtime {downtime:.2} s; {}", phases.join("; "));
    let names: Vec<&str> =
        reply["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "pre-freeze",
            "source point in time",
            "delta read + transfer",
            "final commit",
            "finalise",
            "post-cutover"
        ],
        "{reply}"
    );
    let targets: Vec<String> = images.iter().map(|i| i.target()).collect();
    assert_eq!(std::fs::read_to_string(&post).unwrap().trim(), format!("{epoch} {}", targets.join(" ")));

    // The final images, and their final snapshots, are the stopped source byte for byte, and
    // hold every write the writer completed.
    let mut s = s;
    let log = s.writer.take().unwrap().finish();
    let mut finals = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let source = s.source(i);
        let head = rbd_export(&ceph, s.lab.dir.path(), &img.spec());
        assert!(head == source, "target {i} differs from the stopped source");
        let snap = rbd_export(&ceph, s.lab.dir.path(), &format!("{}@blockship-final", img.spec()));
        assert!(snap == source, "blockship-final of target {i} differs from the stopped source");
        let epoch_snap = rbd_export(&ceph, s.lab.dir.path(), &format!("{}@blockship-{epoch}", img.spec()));
        assert!(epoch_snap == source, "blockship-{epoch} of target {i} differs from the final image");
        finals.push(head);
    }
    assert_eq!(consistent_cut(&log, &finals).unwrap(), log.len(), "the final images miss writes");
    let g = daemon.group("vm");
    assert_eq!(g["state"], "cut over", "{g}");
    assert_eq!(g["cut_over_epoch"].as_u64(), Some(epoch), "{g}");

    // A second cutover, and replication into a cut-over target, are refused.
    let o = cutover(&daemon, &["--pre-freeze", "true"]);
    assert!(!o.status.success() && text(&o).contains("cut over already"), "{}", text(&o));
    let src = s.lab.path("other.img");
    std::fs::write(&src, vec![7u8; DISK as usize]).unwrap();
    let o = s
        .lab
        .agent_cmd(&sink, "esx01", "sync")
        .args(["--source", src.to_str().unwrap(), "--target", &targets[0]])
        .output()
        .unwrap();
    assert!(!o.status.success(), "a sync into a cut-over target was accepted");
    assert!(
        text(&o).contains("was cut over at epoch") && text(&o).contains("--force-resume"),
        "{}",
        text(&o)
    );
    let o = s
        .lab
        .agent_cmd(&sink, "esx01", "sync")
        .args(["--source", src.to_str().unwrap(), "--target", &targets[0], "--force-resume"])
        .output()
        .unwrap();
    assert!(o.status.success(), "--force-resume: {}", text(&o));
    assert!(rbd_export(&ceph, s.lab.dir.path(), &images[0].spec()) == std::fs::read(&src).unwrap());
}

#[test]
fn an_abort_after_the_freeze_restarts_the_source_and_replication_goes_on() {
    if !common::qemu::available() {
        return;
    }
    let targets: Vec<String> = (0..3).map(|i| format!("file:abort-d{i}.img")).collect();
    let s = Setup::new(&targets, Lab::new(&["esx01"]));
    let sink = s.lab.sink(&["esx01=file:*"], &[]);
    // A slow link (4 MiB/s), and 24 MiB written by the pre-freeze hook: the final cycle takes
    // seconds, so the abort lands after the freeze and before the final commit.
    let daemon = Daemon::start(&s.lab, &sink, "esx01", "[bandwidth]\ndefault = \"4MiB\"\n", &s.group, &[]);
    daemon.wait_epoch("vm", 2, Duration::from_secs(90));
    let resumed = s.lab.path("resumed");
    let hook = slow_hook(&s);
    let running = spawn_cutover(
        &daemon,
        &["--pre-freeze", &hook, "--on-abort", &format!("touch {}", resumed.display())],
    );
    // Past the freeze: the hook is done and the final cycle is sending.
    let mut done = s.stop_file.clone().into_os_string();
    done.push(".done");
    assert!(wait_until(Duration::from_secs(60), || Path::new(&done).exists()), "{}", daemon.log_text());
    assert!(
        wait_until(Duration::from_secs(60), || daemon
            .log_text()
            .contains("the source is stopped; final cycle")),
        "{}",
        daemon.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let o = cutover(&daemon, &["--abort", "--on-abort", &format!("touch {}", resumed.display())]);
    assert!(o.status.success(), "abort: {}\n{}", text(&o), daemon.log_text());
    let first = running.wait_with_output().unwrap();
    println!("abort answered in {:.2} s: {}", started.elapsed().as_secs_f64(), text(&o).trim());
    assert!(!first.status.success() && text(&first).contains("aborted"), "{}", text(&first));
    assert!(resumed.exists(), "the on-abort hook did not run");
    let g = daemon.group("vm");
    assert_eq!(g["cut_over_epoch"].as_u64().unwrap_or(0), 0, "{g}");
    // Replication goes on (the 24 MiB arrive with the next epochs), into targets not cut over.
    let e = g["committed_epoch"].as_u64().unwrap();
    daemon.wait_epoch("vm", e + 2, Duration::from_secs(90));
    assert_ne!(daemon.group("vm")["state"], "cut over");
    drop(s);
}

/// The pre-freeze hook of the slow-link tests: 8 MiB on the first disk, stop the writer, 8 MiB
/// on each other disk (so the final cycle carries 24 MiB).
fn slow_hook(s: &Setup) -> String {
    format!(
        "qemu-io -f raw -c 'write -P 9 0 8M' '{}' >/dev/null && {} && qemu-io -f raw -c 'write -P 9 0 8M' '{}' >/dev/null && qemu-io -f raw -c 'write -P 9 0 8M' '{}' >/dev/null",
        s.vm.export_uri(0),
        s.stop_writer_hook(),
        s.vm.export_uri(1),
        s.vm.export_uri(2)
    )
}

#[test]
fn an_agent_killed_during_the_final_cycle_is_completed_by_running_cutover_again() {
    if !common::qemu::available() {
        return;
    }
    let targets: Vec<String> = (0..3).map(|i| format!("file:crash-d{i}.img")).collect();
    let mut s = Setup::new(&targets, Lab::new(&["esx01"]));
    let sink = s.lab.sink(&["esx01=file:*"], &[]);
    let slow = "[bandwidth]\ndefault = \"4MiB\"\n";
    let mut daemon = Daemon::start(&s.lab, &sink, "esx01", slow, &s.group, &[]);
    daemon.wait_epoch("vm", 2, Duration::from_secs(90));
    let hook = slow_hook(&s);
    let running = spawn_cutover(&daemon, &["--pre-freeze", &hook]);
    assert!(
        wait_until(Duration::from_secs(60), || daemon
            .log_text()
            .contains("the source is stopped; final cycle")),
        "{}",
        daemon.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    daemon.kill9();
    let first = running.wait_with_output().unwrap();
    assert!(!first.status.success(), "the cutover survived its daemon: {}", text(&first));
    // The daemon comes back (its group replicates the stopped source meanwhile) and the same
    // command completes the cutover.
    let daemon = Daemon::start(&s.lab, &sink, "esx01", slow, &s.group, &[]);
    let o = cutover(&daemon, &["--pre-freeze", &hook, "--json"]);
    assert!(o.status.success(), "re-run: {}\n{}", text(&o), daemon.log_text());
    println!("completed after an agent crash: {}", String::from_utf8_lossy(&o.stdout).trim());
    let log = s.writer.take().unwrap().finish();
    assert!(!log.is_empty());
    for (i, t) in targets.iter().enumerate() {
        let target = std::fs::read(s.lab.target(t.strip_prefix("file:").unwrap())).unwrap();
        assert!(target == s.source(i), "{t} differs from the stopped source");
        let state = state_of(&s.lab, t).unwrap();
        assert!(state["cut_over"]["epoch"].as_u64().is_some(), "{t}: {state}");
    }
}

#[test]
fn a_sink_killed_while_finalising_is_completed_by_running_cutover_again() {
    let Some(ceph) = ceph() else { return };
    if !common::qemu::available() {
        return;
    }
    let images: Vec<TestImage> = (0..3).map(|i| TestImage::new(&ceph, &format!("cutk{i}"))).collect();
    let mut s = Setup::new(&images.iter().map(|i| i.target()).collect::<Vec<_>>(), Lab::new(&["esx01"]));
    let args: Vec<&str> = ceph.sink_args.iter().map(String::as_str).collect();
    let armed = [("FAILPOINTS", "sink::cutover-between-states=return")];
    let sink = s.lab.sink_with("127.0.0.1:0", &["esx01=rbd:rbd/*"], &args, &armed);
    let addr = sink.addr.clone();
    let daemon = Daemon::start(&s.lab, &sink, "esx01", "", &s.group, &[]);
    daemon.wait_epoch("vm", 2, Duration::from_secs(60));
    let o = cutover(&daemon, &["--pre-freeze", &s.stop_writer_hook()]);
    assert!(!o.status.success(), "the sink did not crash while finalising: {}", text(&o));
    assert!(text(&o).contains("cutover --group vm --abort"), "{}", text(&o));
    drop(sink);
    // One member was marked cut over when the sink died; the others were not.
    let sink = s.lab.sink_with(&addr, &["esx01=rbd:rbd/*"], &args, &[]);
    let o = cutover(&daemon, &["--pre-freeze", &s.stop_writer_hook(), "--json"]);
    assert!(o.status.success(), "re-run: {}\n{}", text(&o), daemon.log_text());
    let reply: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    println!("completed: {reply}");
    let epoch = reply["epoch"].as_u64().unwrap();
    let log = s.writer.take().unwrap().finish();
    let mut finals = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let source = s.source(i);
        let snap = rbd_export(&ceph, s.lab.dir.path(), &format!("{}@blockship-final", img.spec()));
        assert!(snap == source, "blockship-final of target {i} differs from the stopped source");
        finals.push(snap);
    }
    assert_eq!(consistent_cut(&log, &finals).unwrap(), log.len());
    assert_eq!(daemon.group("vm")["cut_over_epoch"].as_u64(), Some(epoch));
    drop(sink);
}

#[test]
fn a_vmware_group_is_powered_off_by_the_built_in_and_cut_over() {
    if !common::qemu::available() {
        return;
    }
    const SIZE: u64 = 32 << 20;
    let lab = Lab::new(&["esx01"]);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let vm = common::vcenter::vmware_vm(&lab, SIZE);
    let targets = ["file:vm42-a", "file:vm42-b"];
    let group = format!(
        "[[group]]\nname = \"vm\"\nkind = \"vmware\"\nvm = \"{}\"\nvcenter = \"{}\"\ninterval = \"1h\"\ndisks = [{{ disk = \"2000\", target = \"{}\" }}, {{ disk = \"Hard disk 2\", target = \"{}\" }}]\n",
        common::vcenter::VM_UUID,
        vm.vc.addr,
        targets[0],
        targets[1]
    );
    let daemon = Daemon::start_with(&lab, &sink, "esx01", &vm.agent, "", &group, &[]);
    daemon.wait_epoch("vm", 1, Duration::from_secs(60));

    // A cutover that stopped the VM and then died (simulated: the VM is off, nothing runs):
    // `--abort` powers it on through vCenter.
    vm.vc.state.lock().unwrap().power = "poweredOff".into();
    let o = cutover(&daemon, &["--abort"]);
    assert!(o.status.success(), "abort: {}", text(&o));
    assert_eq!(vm.vc.state.lock().unwrap().power, "poweredOn");
    assert!(vm.vc.calls().contains(&"PowerOnVM_Task".to_string()));

    // The guest writes until the freeze; it has no VMware Tools, so the guest shutdown is
    // refused and the VM is powered off.
    vm.write(0, 1 << 20, 5 << 20, 7);
    vm.write(1, 9 << 20, 3000, 8);
    vm.vc.state.lock().unwrap().tools = false;
    let o = cutover(&daemon, &["--json"]);
    assert!(o.status.success(), "cutover: {}\n{}", text(&o), daemon.log_text());
    let reply: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    println!("vmware cutover: {reply}");
    assert_eq!(vm.vc.state.lock().unwrap().power, "poweredOff");
    let calls = vm.vc.calls();
    let shutdown = calls.iter().position(|c| c == "ShutdownGuest").expect("no guest shutdown tried");
    let off = calls.iter().position(|c| c == "PowerOffVM_Task").expect("no power off");
    let snap = calls.iter().rposition(|c| c == "CreateSnapshot_Task").unwrap();
    assert!(shutdown < off && off < snap, "power off must precede the final snapshot: {calls:?}");
    let pre = &reply["phases"][0];
    assert!(pre["detail"].as_str().unwrap().contains("ToolsUnavailable"), "{reply}");
    let epoch = reply["epoch"].as_u64().unwrap();
    assert_eq!(epoch, 2, "{reply}");
    vm.check_epoch(&lab, &targets, vm.vc.snapshots_created() as u64);
    for (i, t) in targets.iter().enumerate() {
        assert!(same_file(&vm.images[i], &lab.target(t.strip_prefix("file:").unwrap())), "{t}");
        let state = state_of(&lab, t).unwrap();
        assert_eq!(state["cut_over"]["epoch"].as_u64(), Some(epoch), "{state}");
    }
}
