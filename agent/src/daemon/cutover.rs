//! Cutover of a group, run by its task in the daemon: stop the source (a hook, or the built-in
//! for the group's kind), one final cycle from the quiet source, then the sink cuts the group
//! over at that epoch (`GroupCutover`: final point in time, targets marked, replication into
//! them refused), then the post-cutover hook. Every step is timed; the downtime is the end of
//! the pre-freeze step to the targets cut over. Until the sink is asked to cut over, `--abort`
//! restarts the source (hook or built-in) and replication goes on. A crash anywhere leaves a
//! state that the same command completes: the source stays stopped, a final epoch is committed
//! or not, and a group with any member cut over is only finalised again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::config::{Group, Kind};
use super::group::{Command, Replica, Shared};
use super::{hook, pb};
use crate::engine::cycle::{Member, Opening};

/// How long a hook or a VMware guest shutdown may take unless the request says otherwise.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);

fn hook_timeout(req: &pb::CutoverRequest) -> Duration {
    match req.hook_timeout_ms {
        0 => DEFAULT_HOOK_TIMEOUT,
        ms => Duration::from_millis(ms),
    }
}

fn phase(name: &str, started: Instant, detail: impl Into<String>) -> pb::Phase {
    pb::Phase { name: name.into(), seconds: started.elapsed().as_secs_f64(), detail: detail.into() }
}

/// Stop (`running` false) or restart the group's source: `hook` when given, else the built-in.
async fn source_power(
    g: &Group,
    shared: &Shared,
    r: &mut Replica,
    running: bool,
    hook_cmd: &str,
    timeout: Duration,
) -> Result<String, String> {
    let (step, flag) = if running { ("on-abort", "--on-abort") } else { ("pre-freeze", "--pre-freeze") };
    if !hook_cmd.is_empty() {
        let env = hook::env(g, &shared.agent.sink, step, None);
        return hook::run(step, hook_cmd, &env, timeout).await;
    }
    let origin = r.origin(g, shared).await.map_err(|e| format!("opening the source: {e}"))?;
    match origin.set_running(running, timeout).await {
        Some(result) => result.map_err(|e| e.to_string()),
        None if g.kind == Kind::File => Ok("a file group's machines are stopped already".into()),
        None => Err(format!(
            "a {:?} group has no built-in way to {} its source: give {flag} CMD",
            g.kind,
            if running { "restart" } else { "stop" }
        )),
    }
}

/// Cut group `g` over. `finalising` turns true once the sink is asked to cut over (from then
/// on the cutover can no longer be aborted).
pub async fn run(
    g: &Group,
    shared: &Shared,
    members: &[Member],
    r: &mut Replica,
    req: &pb::CutoverRequest,
    finalising: &AtomicBool,
) -> Result<pb::CutoverReply, String> {
    let timeout = hook_timeout(req);
    let again = format!(
        "the source stays stopped: run `blockship-agent cutover --group {}` again to complete the cutover, or `blockship-agent cutover --group {} --abort` to restart the source",
        g.name, g.name
    );
    let mut phases = Vec::new();
    let t = Instant::now();
    let stopped = source_power(g, shared, r, false, &req.pre_freeze, timeout)
        .await
        .map_err(|e| format!("pre-freeze: {e}; nothing was cut over and replication goes on"))?;
    phases.push(phase("pre-freeze", t, stopped));
    let frozen = Instant::now();
    tracing::warn!(group = %g.name, "cutover: the source is stopped; final cycle");

    let how = Opening { cutover: true, failback: g.section.failback, ..Opening::default() };
    let report = r
        .cycle(g, shared, members, Some(&g.name), how)
        .await
        .map_err(|(e, _)| format!("the final cycle failed: {e}; {again}"))?;
    if !report.already_cut_over {
        let cycles = shared.board.get(&g.name).map_or(0, |s| s.cycles) + 1;
        super::group::record(&shared.board, &g.name, &report, cycles);
        let read: u64 = report.members.iter().map(|m| m.bytes_read).sum();
        let sent: u64 = report.members.iter().map(|m| m.bytes_sent).sum();
        let secs = |s: f64| pb::Phase { seconds: s, ..Default::default() };
        phases.push(pb::Phase { name: "source point in time".into(), ..secs(report.freeze_seconds) });
        phases.push(pb::Phase {
            name: "delta read + transfer".into(),
            detail: format!("{read} bytes read, {sent} sent"),
            ..secs(report.data_seconds)
        });
        phases.push(pb::Phase {
            name: "final commit".into(),
            detail: format!("epoch {}", report.epoch),
            ..secs(report.commit_seconds)
        });
    } else {
        phases.push(phase("final cycle", frozen, format!("already at the final epoch {}", report.epoch)));
    }

    finalising.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let link = r.link_of_cycle(shared).await.map_err(|e| format!("finalising: {e}; {again}"))?;
    link.cut_over_group(&g.name, report.epoch).await.map_err(|e| format!("finalising: {e}; {again}"))?;
    phases.push(phase("finalise", t, "targets cut over"));
    let downtime = frozen.elapsed().as_secs_f64();
    tracing::warn!(group = %g.name, epoch = report.epoch, downtime, "cutover: the group is cut over");

    let mut reply = pb::CutoverReply {
        group: g.name.clone(),
        epoch: report.epoch,
        downtime_seconds: downtime,
        targets: g.section.disks.iter().map(|d| d.target.clone()).collect(),
        message: format!("group {} cut over at epoch {}", g.name, report.epoch),
        ..Default::default()
    };
    if !req.post_cutover.is_empty() {
        let t = Instant::now();
        let env = hook::env(g, &shared.agent.sink, "post-cutover", Some(report.epoch));
        match hook::run("post-cutover", &req.post_cutover, &env, timeout).await {
            Ok(out) => phases.push(phase("post-cutover", t, out)),
            Err(e) => {
                phases.push(phase("post-cutover", t, "failed"));
                reply.post_cutover_failed = true;
                reply.message = format!("{}; but {e}", reply.message);
            }
        }
    }
    reply.phases = phases;
    Ok(reply)
}

/// Serve a cutover request (or its abort) while the group runs no cycle. During a cutover the
/// group's other commands wait, except an abort, which stops the cutover if it has not asked
/// the sink to cut over yet.
pub(super) async fn serve(
    g: &Group,
    shared: &Shared,
    members: &[Member],
    replica: &mut Replica,
    req: pb::CutoverRequest,
    commands: &mut mpsc::Receiver<Command>,
    cut_over: bool,
) -> Result<pb::CutoverReply, String> {
    if req.abort {
        if cut_over {
            return Err(format!(
                "group {} is cut over: too late to abort (to replicate into its targets again, sync them with --force-resume)",
                g.name
            ));
        }
        return restart_source(g, shared, replica, &req).await;
    }
    if cut_over {
        return Err(format!("group {} is cut over already", g.name));
    }
    shared.board.update(&g.name, |s| s.state = "cutting over".into());
    let finalising = AtomicBool::new(false);
    let aborted = {
        let run = run(g, shared, members, replica, &req, &finalising);
        tokio::pin!(run);
        loop {
            tokio::select! {
                r = &mut run => return r,
                cmd = commands.recv() => match cmd {
                    Some(Command::Cutover(a, tx)) if a.abort => {
                        if finalising.load(Ordering::SeqCst) {
                            let _ = tx.send(Err("too late to abort: the sink is cutting the group over".into()));
                        } else {
                            break (a, tx);
                        }
                    }
                    Some(Command::Cutover(_, tx)) => {
                        let _ = tx.send(Err(format!("a cutover of group {} is running", g.name)));
                    }
                    // Pause, resume and sync-now mean nothing during a cutover.
                    Some(_) | None => {}
                },
            }
        }
    };
    // The cutover stopped where it was: its disks' epochs end on the sink, the sources are
    // opened afresh (a half-taken point in time is cleaned up then), the source restarts.
    let (abort, tx) = aborted;
    replica.reset(true).await;
    let restarted = restart_source(g, shared, replica, &abort).await;
    let why = match &restarted {
        Ok(_) => format!("cutover of {} aborted (`cutover --abort`); the source runs again", g.name),
        Err(e) => format!("cutover of {} aborted (`cutover --abort`), but {e}", g.name),
    };
    let _ = tx.send(restarted);
    Err(why)
}

/// Restart the source of a group whose cutover was stopped before its final commit.
pub async fn restart_source(
    g: &Group,
    shared: &Shared,
    r: &mut Replica,
    req: &pb::CutoverRequest,
) -> Result<pb::CutoverReply, String> {
    let t = Instant::now();
    let detail = source_power(g, shared, r, true, &req.on_abort, hook_timeout(req))
        .await
        .map_err(|e| format!("restarting the source: {e}"))?;
    Ok(pb::CutoverReply {
        group: g.name.clone(),
        aborted: true,
        message: format!("cutover of {} aborted: the source runs again and replication goes on", g.name),
        phases: vec![phase("on-abort", t, detail)],
        ..Default::default()
    })
}

/// The reply as the operator reads it: the outcome, the downtime, every phase.
pub fn table(r: &pb::CutoverReply) -> String {
    let mut out = String::new();
    if r.aborted {
        out.push_str(&format!("{}\n", r.message));
    } else {
        out.push_str(&format!("{}: downtime {:.2} s\n", r.message, r.downtime_seconds));
    }
    for p in &r.phases {
        out.push_str(&format!("  {:<24} {:>8.3} s  {}\n", p.name, p.seconds, p.detail));
    }
    if !r.targets.is_empty() {
        out.push_str(&format!("targets: {}\n", r.targets.join(" ")));
    }
    out
}
