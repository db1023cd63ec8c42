//! Crash and corruption points for tests. A build with `--features failpoints` (never a release build) reads
//! `FAILPOINTS` (the `fail` crate's syntax, e.g. `sink::after-flush=2*off->return`) at start;
//! when a named point triggers, the process kills itself with SIGKILL right there, as a crash
//! after the step before it would. The crash tests restart the sink and check that everything
//! acknowledged is in the target and that nothing reported committed is missing.

/// The points, in the durability order of a checkpoint and a commit.
pub const POINTS: &[&str] = &[
    "sink::after-journal",
    "sink::after-write",
    "sink::after-flush",
    "sink::after-index",
    "sink::after-state",
    "sink::group-between-snapshots",
    "sink::after-snapshot",
    "sink::group-between-states",
    "sink::after-commit-state",
    "sink::cutover-after-snapshots",
    "sink::cutover-between-states",
    "sink::before-ack",
];

/// Corruption points (the hardening tests): data read back from a target while verifying is
/// damaged in the chunks listed, e.g. `sink::corrupt-verify-read=return(3,17,40)`, as a bad disk
/// or a lying cache would; `verify` must name every one of them.
pub const CORRUPTION_POINTS: &[&str] = &["sink::corrupt-verify-read"];

/// Delay points (race tests): the task passing one waits the armed number of milliseconds, e.g.
/// `sink::writer-failure-report=return(300)`, to widen a window a race test must hit every time.
pub const DELAY_POINTS: &[&str] = &["sink::writer-failure-report"];

/// Wait here if the delay point `name` is armed (`return(MS)`).
pub async fn delay_point(name: &'static str) {
    debug_assert!(DELAY_POINTS.contains(&name), "undeclared delay point {name}");
    #[cfg(feature = "failpoints")]
    if let Some(ms) = fail::eval(name, |arg| arg.and_then(|a| a.trim().parse::<u64>().ok())).flatten() {
        tracing::warn!(ms, "failpoint {name}: waiting");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// `data`, read back from the target as chunk `chunk`, with one bit flipped if the point lists it.
pub fn corrupt_verify_read(chunk: u64, data: bytes::Bytes) -> bytes::Bytes {
    #[cfg(feature = "failpoints")]
    if let Some(Some(list)) = fail::eval("sink::corrupt-verify-read", |arg| arg) {
        if !data.is_empty() && list.split(',').any(|c| c.trim().parse() == Ok(chunk)) {
            let mut bad = data.to_vec();
            bad[0] ^= 0x01;
            tracing::warn!(chunk, "failpoint sink::corrupt-verify-read: flipped one bit read back");
            metrics::counter!("blockship_sink_injected_corruptions_total").increment(1);
            return bytes::Bytes::from(bad);
        }
    }
    let _ = chunk;
    data
}

/// Crash here if the point `name` is armed.
pub fn crash_point(name: &'static str) {
    debug_assert!(POINTS.contains(&name), "undeclared failpoint {name}");
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("failpoint {name}: crashing");
        // SAFETY: raising SIGKILL on our own process has no preconditions.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Arm the points named in `FAILPOINTS` (kept for the life of the process), after checking them
/// (see `blockship_transport::failpoints`).
pub fn setup() -> Result<(), String> {
    let wanted = std::env::var("FAILPOINTS").unwrap_or_default();
    let known = [POINTS, CORRUPTION_POINTS, DELAY_POINTS];
    let built = cfg!(feature = "failpoints");
    blockship_transport::failpoints::check(&wanted, &known, "sink", "blockship-sink/failpoints", built)?;
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
    Ok(())
}
