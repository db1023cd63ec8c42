//! Bad input is refused with a clear error and writes nothing: malformed change lists, targets
//! outside the file root, agents without permission, unknown agents, certificates from another CA.

mod common;

use blockship_bench::image::{self, Profile};
use common::*;

const DISK: u64 = 64 << 20;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_change_lists_are_refused_before_anything_is_sent() {
    let lab = Lab::new(&["esx01"]);
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

#[test]
fn incremental_needs_a_committed_full_sync() {
    let lab = Lab::new(&["esx01"]);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 1).unwrap();
    let list = lab.path("c.json");
    std::fs::write(&list, format!(r#"{{"startOffset":0,"length":{DISK},"changedArea":[]}}"#)).unwrap();
    let out = lab.try_sync(&sink, "esx01", &src, "file:new", &["--changed-areas", list.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(!lab.target("new").exists());
}

#[test]
fn targets_outside_the_root_and_forbidden_targets_are_refused() {
    let lab = Lab::new(&["esx01", "esx02", "stranger"]);
    let outside = lab.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, lab.target("escape")).unwrap();
    let sink = lab.sink(&["esx01=file:**", "esx02=file:esx02/*"], &[]);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 1).unwrap();

    for (target, expect) in [
        ("file:../outside/x", "'..' is refused"),
        ("file:/etc/blockship-test", "absolute paths are refused"),
        ("file:escape/x", "leaves the file root"),
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

#[test]
fn certificates_from_another_ca_are_refused() {
    let lab = Lab::new(&["esx01"]);
    let other = Lab::new(&["esx01"]);
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 1).unwrap();
    let pki = lab.pki();
    let foreign = other.pki();
    // Our CA, a certificate from another CA.
    let out = std::process::Command::new(bin("blockship-agent"))
        .args(["sync", "--sink", &sink.addr, "--no-progress", "--target", "file:vm", "--source"])
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
        .args(["sync", "--sink", &sink.addr, "--no-progress", "--target", "file:vm", "--source"])
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
