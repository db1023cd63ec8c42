//! NBD sources with QEMU dirty bitmaps as the change tracking: real `qemu-nbd` exports of a qcow2
//! image written with `qemu-io`, bitmap rotation as a hypervisor would do it, a bitmap left
//! `in-use` by a crashed writer, and a live "VM" (`qemu-storage-daemon`) that keeps writing while
//! frozen views are replicated. The target must equal the frozen view after every cycle.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use blockship_agent::source::nbd::NbdSource;
use blockship_bench::image::{self, Profile};
use common::qemu::{self, nbd_to_file, qemu_io, run, Export, StorageDaemon};
use common::*;

const DISK: u64 = 256 << 20;

fn dirty_bytes(uri: &str, bitmap: &str) -> u64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let n = NbdSource::connect(uri, Some(bitmap)).await.unwrap();
        let d = n.dirty(bitmap).await.unwrap();
        n.disconnect().await.unwrap();
        d.iter().map(|e| e.len).sum()
    })
}

fn s(v: &str) -> String {
    v.to_string()
}

#[test]
fn dirty_bitmap_cycles_with_qemu_nbd() {
    if !qemu::available() {
        return;
    }
    let lab = Lab::new(&["esx01"]);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let raw = lab.path("base.raw");
    image::generate(&raw, DISK, Profile::Mixed, 21).unwrap();
    let disk = lab.path("disk.qcow2");
    let d = disk.to_str().unwrap();
    run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), d]);
    // Tracking starts at the point in time of epoch 1.
    run("qemu-img", &["bitmap", "--add", "--enable", d, "cbt1"]);
    let view = lab.path("view.raw");

    // Epoch 1: a full sync; cbt1 becomes the target's change point.
    {
        let e = Export::start(lab.dir.path(), &disk, "qcow2", None);
        let s1 = lab.sync(&sink, "esx01", &e.uri, "file:vm", &["--change-point", "cbt1"]);
        assert_eq!((s1["mode"].as_str(), s1["change_point"].as_str()), (Some("full"), Some("cbt1")), "{s1}");
        assert_eq!(s1["reader"], "nbd");
        nbd_to_file(&e.uri, &view);
        assert!(same_file(&view, &lab.target("vm")));
    }

    // Guest writes: data, write-zeroes, discard, an unaligned write. Then rotate the bitmaps.
    qemu_io(
        d,
        "qcow2",
        &[
            s("write -P 0x11 4M 64k"),
            s("write -P 0x22 10M 200k"),
            s("write -P 0x33 100M 1M"),
            s("write -z 40M 64k"),
            s("discard 64M 128k"),
            s("write -P 0x44 130M 1000"),
        ],
    );
    run("qemu-img", &["bitmap", "--disable", d, "cbt1"]);
    run("qemu-img", &["bitmap", "--add", "--enable", d, "cbt2"]);

    // Epoch 2: exactly the dirty extents of cbt1.
    {
        let e = Export::start(lab.dir.path(), &disk, "qcow2", Some("cbt1"));
        let dirty = dirty_bytes(&e.uri, "cbt1");
        assert!((1024 * 1024 + 200 * 1024..=2 * MIB).contains(&dirty), "unexpected dirty bytes {dirty}");
        let s2 = lab.sync(
            &sink,
            "esx01",
            &e.uri,
            "file:vm",
            &["--changes", "nbd-bitmap:cbt1", "--change-point", "cbt2"],
        );
        assert_eq!((s2["mode"].as_str(), u(&s2, "epoch")), (Some("incremental"), 2), "{s2}");
        assert_eq!(u(&s2, "bytes_read"), dirty, "read more than the dirty extents: {s2}");
        assert!(u(&s2, "zero_extents") > 0, "zeroed/discarded areas not sent as zeros: {s2}");
        nbd_to_file(&e.uri, &view);
        assert!(same_file(&view, &lab.target("vm")), "target differs from the frozen view after epoch 2");
    }
    run("qemu-img", &["bitmap", "--remove", d, "cbt1"]);

    // Epoch 3 with --changes auto: the target's change point (cbt2) names the bitmap to read.
    qemu_io(d, "qcow2", &[s("write -P 0x55 200M 3M"), s("write -P 0x66 5M 4k")]);
    run("qemu-img", &["bitmap", "--disable", d, "cbt2"]);
    run("qemu-img", &["bitmap", "--add", "--enable", d, "cbt3"]);
    {
        let e = Export::start(lab.dir.path(), &disk, "qcow2", Some("cbt2"));
        let dirty = dirty_bytes(&e.uri, "cbt2");
        let s3 = lab.sync(&sink, "esx01", &e.uri, "file:vm", &["--change-point", "cbt3"]);
        assert_eq!((s3["mode"].as_str(), u(&s3, "bytes_read")), (Some("incremental"), dirty), "{s3}");
        nbd_to_file(&e.uri, &view);
        assert!(same_file(&view, &lab.target("vm")));
        // Naming a bitmap that does not start at the last epoch is refused.
        let bad = lab.try_sync(&sink, "esx01", &e.uri, "file:vm", &["--changes", "nbd-bitmap:cbt2"]);
        assert!(!bad.status.success());
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("not bitmap \"cbt2\""),
            "{}",
            String::from_utf8_lossy(&bad.stderr)
        );
    }

    // A writer that crashes leaves cbt3 in-use; qemu can no longer export it. Under auto the
    // agent says why and falls back to a compare-mode resync.
    {
        let sock = lab.path("writer.sock");
        let mut writer = std::process::Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-t", "--socket"])
            .arg(&sock)
            .arg(&disk)
            .spawn()
            .unwrap();
        assert!(wait_until(std::time::Duration::from_secs(10), || sock.exists()));
        qemu_io(&format!("nbd+unix:///?socket={}", sock.display()), "raw", &[s("write -P 0x77 50M 64k")]);
        writer.kill().unwrap();
        writer.wait().unwrap();
        let info = run("qemu-img", &["info", "--force-share", "--output=json", d]);
        assert!(info.contains("in-use"), "bitmap not left in-use: {info}");
    }
    {
        let e = Export::start(lab.dir.path(), &disk, "qcow2", None);
        let s4 = lab.sync(&sink, "esx01", &e.uri, "file:vm", &["--change-point", "cbt4"]);
        assert_eq!(s4["mode"], "compare", "{s4}");
        assert!(s4["note"].as_str().unwrap().contains("does not offer dirty bitmap \"cbt3\""), "{s4}");
        nbd_to_file(&e.uri, &view);
        assert!(same_file(&view, &lab.target("vm")));
    }
}

/// A "VM" (qemu-storage-daemon) keeps writing while three cycles each freeze a view (fleecing:
/// copy-before-write into an overlay) and atomically rotate the dirty bitmap, the way a
/// hypervisor's backup API does; after each cycle the target equals that cycle's frozen view.
#[test]
fn live_writer_three_cycles() {
    if !qemu::available() {
        return;
    }
    let lab = Lab::new(&["esx01"]);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let raw = lab.path("base.raw");
    image::generate(&raw, DISK, Profile::Mixed, 22).unwrap();
    let live = lab.path("live.qcow2");
    run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), live.to_str().unwrap()]);
    let mut qsd = StorageDaemon::start(lab.dir.path(), &live);

    // The guest: random 64 KiB writes until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let vm_uri = qsd.export_uri("vm");
    let writer = {
        let (stop, uri, writes) = (stop.clone(), vm_uri.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut rng = image::Rng::new(99);
            while !stop.load(Ordering::Relaxed) {
                let cmds: Vec<String> = (0..8)
                    .map(|_| {
                        let off = (rng.next_u64() % (DISK / 65536)) * 65536;
                        format!("write -P {} {off} 64k", rng.next_u64() % 250 + 1)
                    })
                    .collect();
                qemu_io(&uri, "raw", &cmds);
                writes.fetch_add(8, Ordering::Relaxed);
            }
        })
    };

    let view = lab.path("view.raw");
    for k in 1..=3u32 {
        // Every cycle must overlap guest writes, so the view really is frozen under a moving disk.
        let before = writes.load(Ordering::Relaxed);
        let overlay = lab.path(&format!("fleece{k}.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                live.to_str().unwrap(),
                "-F",
                "qcow2",
                overlay.to_str().unwrap(),
            ],
        );
        qsd.qmp.cmd(serde_json::json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": format!("fleece{k}"),
            "file": {"driver": "file", "filename": overlay.to_str().unwrap()}, "backing": "disk0"}}));
        let mut actions = vec![
            serde_json::json!({"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": format!("cbt{k}"), "persistent": true}}),
        ];
        if k > 1 {
            actions.push(serde_json::json!({"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": format!("cbt{}", k - 1)}}));
        }
        actions.push(serde_json::json!({"type": "blockdev-backup", "data": {"job-id": format!("fleece{k}"), "device": "disk0", "target": format!("fleece{k}"), "sync": "none"}}));
        qsd.qmp.cmd(serde_json::json!({"execute": "transaction", "arguments": {"actions": actions}}));
        let bitmaps: Vec<String> = if k > 1 { vec![format!("cbt{}", k - 1)] } else { vec![] };
        qsd.qmp.cmd(serde_json::json!({"execute": "block-export-add", "arguments": {"type": "nbd", "id": format!("bk{k}"),
            "node-name": format!("fleece{k}"), "name": format!("backup{k}"), "writable": false, "bitmaps": bitmaps}}));

        let uri = qsd.export_uri(&format!("backup{k}"));
        let s = lab.sync(&sink, "esx01", &uri, "file:vm", &["--change-point", &format!("cbt{k}")]);
        let expect = if k == 1 { "full" } else { "incremental" };
        assert_eq!(s["mode"], expect, "cycle {k}: {s}");
        if k > 1 {
            assert!(u(&s, "bytes_read") > 0, "cycle {k} read nothing although the guest wrote: {s}");
        }
        nbd_to_file(&uri, &view);
        assert!(same_file(&view, &lab.target("vm")), "cycle {k}: target differs from the frozen view");
        println!("cycle {k}: {s}");
        assert!(
            wait_until(std::time::Duration::from_secs(30), || writes.load(Ordering::Relaxed) > before),
            "cycle {k}: the guest did not write"
        );

        qsd.qmp
            .cmd(serde_json::json!({"execute": "block-export-del", "arguments": {"id": format!("bk{k}")}}));
        qsd.qmp.cmd(
            serde_json::json!({"execute": "block-job-cancel", "arguments": {"device": format!("fleece{k}")}}),
        );
        // The node is released once the export and the job are gone.
        let mut removed = false;
        for _ in 0..200 {
            writeln_ok(&mut qsd, k, &mut removed);
            if removed {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        assert!(removed, "fleece{k} could not be removed");
        if k > 1 {
            qsd.qmp.cmd(serde_json::json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "disk0", "name": format!("cbt{}", k - 1)}}));
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

fn writeln_ok(qsd: &mut StorageDaemon, k: u32, removed: &mut bool) {
    *removed = qsd
        .qmp
        .try_cmd(
            serde_json::json!({"execute": "blockdev-del", "arguments": {"node-name": format!("fleece{k}")}}),
        )
        .is_ok();
}

/// nbdkit (the server that carries VMware's vddk plugin in production) as the source: a full
/// sync that skips the holes its file plugin reports, then a compare-mode sync after scattered
/// overwrites, then `verify`. The target must equal the image each time.
#[test]
fn nbdkit_export_full_compare_and_verify() {
    if !qemu::available() {
        return;
    }
    let lab = Lab::new(&["esx01"]);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let img = lab.path("disk.raw");
    image::generate(&img, DISK, Profile::Mixed, 23).unwrap();
    let e = Export::nbdkit(lab.dir.path(), &img, "disk");
    let first = lab.sync(&sink, "esx01", &e.uri, "file:vm", &[]);
    assert_eq!((first["mode"].as_str(), first["reader"].as_str()), (Some("full"), Some("nbd")), "{first}");
    assert!(u(&first, "bytes_read") < DISK, "holes were read: {first}");
    assert!(same_file(&img, &lab.target("vm")));

    // nbdkit serves the file as it is now: overwrite 20 scattered 4 KiB blocks.
    for i in 0..20u64 {
        scribble(&img, i * 12 * MIB + 4096 * i, 4096, 500 + i);
    }
    let second = lab.sync(&sink, "esx01", &e.uri, "file:vm", &[]);
    assert_eq!(second["mode"], "compare", "{second}");
    assert!(u(&second, "chunks_sent") <= 20, "{second}");
    assert!(same_file(&img, &lab.target("vm")));
    let v = lab.verify(&sink, "esx01", &e.uri, "file:vm");
    assert!(v.status.success(), "verify: {}", String::from_utf8_lossy(&v.stderr));
}
