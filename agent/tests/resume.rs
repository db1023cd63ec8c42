//! Crashes mid-epoch: SIGKILL of the sink or of the agent during a 256 MiB sync, then the same
//! command again. The target must end up byte-identical and the second run must not resend
//! what was already durable.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use blockship_bench::image::{self, Profile};
use common::*;

// Big enough for many chunks and for a paced sync to be caught half-way, small enough that
// the suite stays quick (it was 1 GiB: four minutes of CI for the same checks).
const DISK: u64 = 256 * MIB;

/// Start a paced sync in the background (so there is time to crash it).
fn paced_sync(lab: &Lab, sink: &Sink, src: &std::path::Path, target: &str, extra: &[&str]) -> Child {
    lab.spawn_sync(sink, "esx01", src, target, &[&["--bwlimit", "50MiB"], extra].concat())
}

fn sink_killed_mid_sync_resumes_without_resending(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 5).unwrap();
    let mut sink = lab.sink(&["esx01=file:*"], &[]);
    let reference = lab.sync(&sink, "esx01", &src, "file:reference", &[]);
    let total = u(&reference, "bytes_sent");

    // Kill about half-way: the durable half must not travel again.
    let agent = paced_sync(&lab, &sink, &src, "file:victim", &[]);
    assert!(
        wait_until(Duration::from_secs(30), || durable_offset(&lab, "file:victim") >= 160 * MIB),
        "no durable progress; sink log:\n{}",
        lab.sink_log()
    );
    sink.kill9();
    let out = agent.wait_with_output().unwrap();
    assert!(!out.status.success(), "agent claimed success although the sink died");
    let state = state_of(&lab, "file:victim").unwrap();
    assert_eq!(state["committed_epoch"], 0, "{state}");
    // What the dead sink had made durable: none of it may travel again. Only what was in flight
    // (sent, not yet durable: bounded by the sink's in-flight budget and the transport's windows)
    // is sent twice.
    let durable_at_crash = state["in_progress"]["durable_offset"].as_u64().unwrap_or(0);
    assert!(durable_at_crash >= 160 * MIB, "{state}");

    let sink = lab.sink(&["esx01=file:*"], &[]);
    let second = lab.sync(&sink, "esx01", &src, "file:victim", &[]);
    assert!(same_file(&src, &lab.target("victim")), "target differs after the resumed sync");
    assert_eq!(u(&second, "epoch"), 1, "{second}");
    let durable = u(&second, "bytes_equal");
    assert!(
        durable >= durable_at_crash,
        "durable chunks were resent: {durable_at_crash} bytes were durable at the crash, {durable} skipped: {second}"
    );
    // The image's layout is uniform, so the rest is well under 60 % of the first run's bytes.
    assert!(
        u(&second, "bytes_sent") * 100 < total * 60,
        "second run sent {} of {total} bytes: {second}",
        u(&second, "bytes_sent")
    );
    println!(
        "first run total {total} bytes; {durable_at_crash} durable at the crash, {durable} skipped after it: {second}"
    );
}

fn agent_killed_mid_sync_resumes_and_takes_over_its_session(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 6).unwrap();
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let mut agent = paced_sync(&lab, &sink, &src, "file:vm", &[]);
    assert!(wait_until(Duration::from_secs(30), || durable_offset(&lab, "file:vm") >= 50 * MIB));
    agent.kill().unwrap();
    agent.wait().unwrap();
    // Right away: the sink still holds the dead agent's session; the same agent takes over.
    let second = lab.sync(&sink, "esx01", &src, "file:vm", &[]);
    assert!(same_file(&src, &lab.target("vm")));
    assert!(u(&second, "bytes_equal") >= 50 * MIB, "durable chunks were resent: {second}");
}

fn interrupted_incremental_resumes_after_its_durable_offset(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Random, 7).unwrap();
    let sink = lab.sink(&["esx01=file:*"], &[]);
    lab.sync(&sink, "esx01", &src, "file:vm", &[]);
    // Rewrite the first 150 MiB and describe it in a change list.
    for i in 0..150u64 {
        scribble(&src, i * MIB, MIB as usize, 10_000 + i);
    }
    let list = lab.path("changes.json");
    std::fs::write(
        &list,
        format!(
            r#"{{"startOffset":0,"length":{DISK},"changedArea":[{{"start":0,"length":{}}}]}}"#,
            150 * MIB
        ),
    )
    .unwrap();
    let args = ["--changed-areas", list.to_str().unwrap()];
    let mut agent = paced_sync(&lab, &sink, &src, "file:vm", &args);
    assert!(wait_until(Duration::from_secs(30), || durable_offset(&lab, "file:vm") >= 40 * MIB));
    agent.kill().unwrap();
    agent.wait().unwrap();
    let resumed_at = durable_offset(&lab, "file:vm");
    let second = lab.sync(&sink, "esx01", &src, "file:vm", &args);
    assert!(same_file(&src, &lab.target("vm")));
    assert_eq!(u(&second, "epoch"), 2);
    assert!(u(&second, "resumed_from") >= resumed_at, "{second}");
    assert_eq!(u(&second, "bytes_read"), 150 * MIB - u(&second, "resumed_from"), "{second}");
}

fn an_interrupted_incremental_of_a_file_that_changed_starts_over(transport: &str) {
    // A plain file is its own frozen view only while it does not change: after a rewrite between
    // the attempts, resuming would keep the first attempt's data below the durable offset.
    let lab = Lab::over(&["esx01"], transport);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Random, 8).unwrap();
    let sink = lab.sink(&["esx01=file:*"], &[]);
    lab.sync(&sink, "esx01", &src, "file:vm", &[]);
    for i in 0..150u64 {
        scribble(&src, i * MIB, MIB as usize, 20_000 + i);
    }
    let list = lab.path("changes.json");
    std::fs::write(
        &list,
        format!(
            r#"{{"startOffset":0,"length":{DISK},"changedArea":[{{"start":0,"length":{}}}]}}"#,
            150 * MIB
        ),
    )
    .unwrap();
    let args = ["--changed-areas", list.to_str().unwrap()];
    let mut agent = paced_sync(&lab, &sink, &src, "file:vm", &args);
    assert!(wait_until(Duration::from_secs(30), || durable_offset(&lab, "file:vm") >= 40 * MIB));
    agent.kill().unwrap();
    agent.wait().unwrap();
    // The first 25 MiB change again (still inside the listed area).
    for i in 0..25u64 {
        scribble(&src, i * MIB, MIB as usize, 30_000 + i);
    }
    let second = lab.sync(&sink, "esx01", &src, "file:vm", &args);
    assert_eq!(u(&second, "resumed_from"), 0, "resumed although the file changed: {second}");
    assert!(same_file(&src, &lab.target("vm")), "the target mixes two versions of the file");
}

fn a_file_target_rolls_back_to_its_last_committed_epoch(transport: &str) {
    let lab = Lab::over(&["esx01"], transport);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 9).unwrap();
    let mut sink = lab.sink(&["esx01=file:*"], &[]);
    lab.sync(&sink, "esx01", &src, "file:vm", &[]);
    // sha256 of the committed epoch 1, as an operator would record it.
    let sha256 = |p: &std::path::Path| {
        let out = Command::new("sha256sum").arg(p).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
    };
    let epoch1 = sha256(&lab.target("vm"));
    // Epoch 2 rewrites most of the disk (and grows it); the sink dies half-way.
    for i in 0..200u64 {
        scribble(&src, i * MIB, MIB as usize, 40_000 + i);
    }
    std::fs::OpenOptions::new().write(true).open(&src).unwrap().set_len(DISK + 16 * MIB).unwrap();
    let agent = paced_sync(&lab, &sink, &src, "file:vm", &[]);
    assert!(
        wait_until(Duration::from_secs(30), || durable_offset(&lab, "file:vm") >= 75 * MIB),
        "no durable progress; sink log:\n{}",
        lab.sink_log()
    );
    sink.kill9();
    assert!(!agent.wait_with_output().unwrap().status.success());
    assert_ne!(sha256(&lab.target("vm")), epoch1, "nothing was overwritten before the crash");

    let out = Command::new(bin("blockship-sink"))
        .args(["rollback", "--target", "file:vm", "--file-root"])
        .arg(lab.path("root"))
        .arg("--state-dir")
        .arg(lab.path("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "rollback failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unfinished epoch 2 was dropped"));
    assert_eq!(sha256(&lab.target("vm")), epoch1, "the file is not back at epoch 1");
    let state = state_of(&lab, "file:vm").unwrap();
    assert!(state["committed_epoch"] == 1 && state["in_progress"].is_null(), "{state}");

    // Replication goes on from epoch 1; the index does not vouch for rolled-back chunks.
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let again = lab.sync(&sink, "esx01", &src, "file:vm", &[]);
    assert_eq!(u(&again, "epoch"), 2, "{again}");
    assert!(same_file(&src, &lab.target("vm")));
    assert!(lab.verify(&sink, "esx01", &src, "file:vm").status.success());
}

fn verify_during_a_sync_does_not_break_it(transport: &str) {
    // Verification needs no write lease: it must not take over (and so kill) the agent's own
    // running sync; it says the target is busy instead.
    let lab = Lab::over(&["esx01"], transport);
    let src = lab.path("src.img");
    image::generate(&src, DISK, Profile::Mixed, 10).unwrap();
    let sink = lab.sink(&["esx01=file:*"], &[]);
    let agent = paced_sync(&lab, &sink, &src, "file:vm", &[]);
    assert!(wait_until(Duration::from_secs(30), || durable_offset(&lab, "file:vm") >= 16 * MIB));
    let v = lab.verify(&sink, "esx01", &src, "file:vm");
    assert!(!v.status.success(), "verify of a target being written reported a result");
    let e = String::from_utf8_lossy(&v.stderr);
    assert!(e.contains("being written"), "{e}");
    let out = agent.wait_with_output().unwrap();
    assert!(out.status.success(), "the sync was broken by verify: {}", String::from_utf8_lossy(&out.stderr));
    assert!(lab.verify(&sink, "esx01", &src, "file:vm").status.success());

    // A session the sink closes (here: replaced by a newer one of the same agent) says why.
    let first = paced_sync(&lab, &sink, &src, "file:vm2", &[]);
    assert!(wait_until(Duration::from_secs(30), || durable_offset(&lab, "file:vm2") >= 8 * MIB));
    lab.sync(&sink, "esx01", &src, "file:vm2", &[]);
    let out = first.wait_with_output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("replaced by a new session"), "the closed agent did not print the sink's reason: {e}");
}

each_transport!(
    sink_killed_mid_sync_resumes_without_resending,
    agent_killed_mid_sync_resumes_and_takes_over_its_session,
    interrupted_incremental_resumes_after_its_durable_offset,
    an_interrupted_incremental_of_a_file_that_changed_starts_over,
    a_file_target_rolls_back_to_its_last_committed_epoch,
    verify_during_a_sync_does_not_break_it
);
