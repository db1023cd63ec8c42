//! Crash points for tests. A build with `--features failpoints` (never a release build) reads
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

/// Arm the points named in `FAILPOINTS` (kept for the life of the process). Without the feature,
/// a set `FAILPOINTS` is an error: a crash test must never pass by running an unarmed build.
pub fn setup() -> Result<(), String> {
    let wanted = std::env::var("FAILPOINTS").unwrap_or_default();
    #[cfg(feature = "failpoints")]
    {
        for point in wanted.split(';').filter(|p| !p.trim().is_empty()) {
            let name = point.split('=').next().unwrap_or_default().trim();
            if !POINTS.contains(&name) {
                return Err(format!("FAILPOINTS names {name:?}, not a failpoint of this sink ({POINTS:?})"));
            }
        }
        std::mem::forget(fail::FailScenario::setup());
        Ok(())
    }
    #[cfg(not(feature = "failpoints"))]
    if wanted.is_empty() {
        Ok(())
    } else {
        Err("FAILPOINTS is set, but this sink was built without failpoints (cargo build --features blockship-sink/failpoints)".into())
    }
}
