//! Bad input is refused with a clear error and writes nothing: malformed change lists, targets
//! outside the file root, agents without permission, unknown agents, certificates from another CA.

mod common;

use blockship_bench::image::{self, Profile};
use common::*;

const DISK: u64 = 64 << 20;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn bad_change_lists_are_refused_before_anything_is_sent(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 1).unwrap();
    lab.sync(&sink, "esx01", &src, "file:vm", &[]);
    scribble(&src, 0, 4096, 1);
    let before = sha(&lab.target("vm"));
    let connects_before = lab.sink_log().matches("agent connected").count();

    let cases = [
        (
            "past the end",
            format!(
                r#"{{"startOffset":0,"length":{DISK},"changedArea":[{{"start":{},"length":8192}}]}}"#,
                DISK - 4096
            ),
            "changedArea[0]",
        ),
        (
            "negative",
            format!(r#"{{"startOffset":0,"length":{DISK},"changedArea":[{{"start":-4096,"length":4096}}]}}"#),
            "negative",
        ),
        (
            "overlapping pages",
            format!(
                r#"[{{"startOffset":0,"length":{},"changedArea":[]}},{{"startOffset":{},"length":{},"changedArea":[]}}]"#,
                DISK / 2 + 4096,
                DISK / 2,
                DISK / 2
            ),
            "overlaps",
        ),
        (
            "pages not covering the disk",
            format!(
                r#"{{"startOffset":0,"length":{},"changedArea":[{{"start":0,"length":4096}}]}}"#,
                DISK / 2
            ),
            "do not cover the disk",
        ),
        ("not json", "startOffset=0".to_string(), "not valid JSON"),
    ];
    for (what, text, expect) in cases {
        let list = lab.path("bad.json");
        std::fs::write(&list, text).unwrap();
        let out = lab.try_sync(&sink, "esx01", &src, "file:vm", &["--changed-areas", list.to_str().unwrap()]);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(stderr(&out).contains(expect), "{what}: message {:?} lacks {expect:?}", stderr(&out));
        assert!(stderr(&out).contains("bad.json"), "{what}: message does not name the file");
    }
    assert_eq!(sha(&lab.target("vm")), before, "a refused change list wrote data");
    assert_eq!(state_of(&lab, "file:vm").unwrap()["committed_epoch"], 1);
    assert_eq!(
        lab.sink_log().matches("agent connected").count(),
        connects_before,
        "the agent connected anyway"
    );
}

fn incremental_needs_a_committed_full_sync(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 1).unwrap();
    let list = lab.path("c.json");
    std::fs::write(&list, format!(r#"{{"startOffset":0,"length":{DISK},"changedArea":[]}}"#)).unwrap();
    let out = lab.try_sync(&sink, "esx01", &src, "file:new", &["--changed-areas", list.to_str().unwrap()]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("does not exist") && e.contains("run a full sync first"), "{e}");
    assert!(!lab.target("new").exists());
}

fn a_busy_listen_address_is_named_once(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    // The sink needs the port on UDP (QUIC) and on TCP (gRPC): either one busy is named.
    let (_udp, _tcp, addr);
    if transport == "quic" {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        addr = s.local_addr().unwrap().to_string();
        (_udp, _tcp) = (Some(s), None);
    } else {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        addr = s.local_addr().unwrap().to_string();
        (_udp, _tcp) = (None, Some(s));
    }
    let out = std::process::Command::new(bin("blockship-sink"))
        .args(["serve", "--listen", &addr, "--allow", "esx01=file:*", "--pki"])
        .arg(lab.pki())
        .arg("--file-root")
        .arg(lab.path("root"))
        .arg("--state-dir")
        .arg(lab.path("state"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second sink bound a busy port");
    let e = stderr(&out);
    assert!(e.contains(&addr), "the message does not name the address: {e}");
    assert_eq!(e.matches("os error 98").count(), 1, "the cause is repeated: {e}");
}

fn a_second_name_for_a_file_is_refused(transport: &str) {
    // Symlinks and hard links inside the file root would give a1's disk a second name that b2's
    // rules allow: b2 could overwrite it and a1's index would still vouch for its own data.
    let lab = Lab::over(&["a1", "b2"], transport);
    let sink = lab.sink(&["a1=file:a1/*", "b2=file:b2/*"], &[]);
    let (src_a, src_b) = (lab.path("a.img"), lab.path("b.img"));
    image::generate(&src_a, DISK, Profile::Mixed, 1).unwrap();
    image::generate(&src_b, DISK, Profile::Random, 2).unwrap();
    lab.sync(&sink, "a1", &src_a, "file:a1/disk.img", &[]);
    let before = sha(&lab.target("a1/disk.img"));
    std::fs::create_dir_all(lab.target("b2")).unwrap();
    std::os::unix::fs::symlink("../a1/disk.img", lab.target("b2/alias.img")).unwrap();
    std::fs::hard_link(lab.target("a1/disk.img"), lab.target("b2/hard.img")).unwrap();
    for (target, expect) in [("file:b2/alias.img", "symlink"), ("file:b2/hard.img", "hard link")] {
        let out = lab.try_sync(&sink, "b2", &src_b, target, &[]);
        assert!(!out.status.success(), "{target}: b2 wrote through a second name");
        assert!(stderr(&out).contains(expect), "{target}: {}", stderr(&out));
    }
    assert_eq!(sha(&lab.target("a1/disk.img")), before, "a1's disk was written through another name");
    // While the hard link exists, a1's own name is refused as well; without it a1 syncs again.
    assert!(!lab.try_sync(&sink, "a1", &src_a, "file:a1/disk.img", &[]).status.success());
    std::fs::remove_file(lab.target("b2/hard.img")).unwrap();
    let again = lab.sync(&sink, "a1", &src_a, "file:a1/disk.img", &[]);
    assert_eq!(u(&again, "bytes_sent"), 0, "{again}");
    assert!(lab.verify(&sink, "a1", &src_a, "file:a1/disk.img").status.success());

    // Two agents at once, one on t.img and one on a link to it: only one name is accepted.
    let lab = Lab::over(&["x", "y"], transport);
    let sink = lab.sink(&["x=file:**", "y=file:**"], &[]);
    let (src_x, src_y) = (lab.path("x.img"), lab.path("y.img"));
    image::generate(&src_x, DISK, Profile::Mixed, 3).unwrap();
    image::generate(&src_y, DISK, Profile::Random, 4).unwrap();
    lab.sync(&sink, "x", &src_x, "file:t.img", &[]);
    std::os::unix::fs::symlink("t.img", lab.target("l.img")).unwrap();
    scribble(&src_x, 0, 1 << 20, 9);
    let x = lab.spawn_sync(&sink, "x", &src_x, "file:t.img", &["--bwlimit", "16MiB", "--changes", "full"]);
    let y = lab.try_sync(&sink, "y", &src_y, "file:l.img", &[]);
    let x = x.wait_with_output().unwrap();
    assert!(x.status.success(), "{}", stderr(&x));
    assert!(!y.status.success(), "y wrote t.img through the link");
    assert!(same_file(&src_x, &lab.target("t.img")), "t.img matches neither source");
}

fn targets_outside_the_root_and_forbidden_targets_are_refused(transport: &str) {
    let lab = Lab::over(&["esx01", "esx02", "stranger"], transport);
    let outside = lab.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, lab.target("escape")).unwrap();
    let sink = lab.sink(&["esx01=file:**", "esx02=file:esx02/*"], &[]);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 1).unwrap();

    for (target, expect) in [
        ("file:../outside/x", "'..' is refused"),
        ("file:/etc/blockship-test", "absolute paths are refused"),
        ("file:escape/x", "symlink"),
        ("nfs:server/x", "unknown target type"),
    ] {
        let out = lab.try_sync(&sink, "esx01", &src, target, &[]);
        assert!(!out.status.success(), "{target} accepted");
        assert!(stderr(&out).contains(expect), "{target}: {}", stderr(&out));
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "something was written outside the root");
    assert!(!std::path::Path::new("/etc/blockship-test").exists());

    let out = lab.try_sync(&sink, "esx02", &src, "file:esx01/vm", &[]);
    assert!(!out.status.success(), "a forbidden target was accepted");
    assert!(stderr(&out).contains("may not write file:esx01/vm"), "{}", stderr(&out));
    assert!(!lab.target("esx01/vm").exists());

    let out = lab.try_sync(&sink, "stranger", &src, "file:stranger/vm", &[]);
    assert!(!out.status.success(), "an unknown agent was accepted");
    assert!(stderr(&out).contains("not known to this sink"), "{}", stderr(&out));
    assert!(!lab.target("stranger").exists());
}

fn certificates_from_another_ca_are_refused(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let other = Lab::over(&["esx01"], transport);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 1).unwrap();
    let pki = lab.pki();
    let foreign = other.pki();
    // Our CA, a certificate from another CA.
    let out = std::process::Command::new(bin("blockship-agent"))
        .args([
            "sync",
            "--sink",
            &sink.addr,
            "--transport",
            transport,
            "--no-progress",
            "--target",
            "file:vm",
        ])
        .arg("--source")
        .arg(&src)
        .arg("--ca")
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(foreign.join("agents/esx01.pem"))
        .arg("--key")
        .arg(foreign.join("agents/esx01.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the sink rejected our certificate"), "{}", stderr(&out));
    // A sink certificate we do not trust.
    let out = std::process::Command::new(bin("blockship-agent"))
        .args([
            "sync",
            "--sink",
            &sink.addr,
            "--transport",
            transport,
            "--no-progress",
            "--target",
            "file:vm",
        ])
        .arg("--source")
        .arg(&src)
        .arg("--ca")
        .arg(foreign.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("agents/esx01.pem"))
        .arg("--key")
        .arg(pki.join("agents/esx01.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("sink's certificate is not signed by our --ca"), "{}", stderr(&out));
    assert!(!lab.target("vm").exists());
    assert!(lab.sink_log().contains("handshake failed"));
}

each_transport!(
    bad_change_lists_are_refused_before_anything_is_sent,
    incremental_needs_a_committed_full_sync,
    a_busy_listen_address_is_named_once,
    a_second_name_for_a_file_is_refused,
    targets_outside_the_root_and_forbidden_targets_are_refused,
    certificates_from_another_ca_are_refused
);
