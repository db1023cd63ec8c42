//! `blockship-agent run`: the daemon that keeps groups of disks replicated, each group at one
//! point in time across its disks, a cycle per interval, over one long-lived connection to the
//! sink. Groups run concurrently under one budget (disks at a time, a bandwidth schedule); a
//! failing group backs off without holding up the others. SIGTERM lets running cycles finish
//! within the grace period, abandons the rest (no group commit is ever half done: the sink
//! commits a group in one request), and exits 0.

pub mod config;
pub mod control;
pub mod cutover;
pub mod group;
pub mod hook;
pub mod links;
pub mod status;

/// The control service's messages (`proto/proto/agent_control.proto`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("blockship.agent.v1");
}

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::pace::Pacer;

/// A group name: 1 to 128 letters, digits, '.', '_' or '-' (as the sink requires).
pub fn check_group_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 128
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!("bad group name {name:?}: 1 to 128 letters, digits, '.', '_' or '-'"));
    }
    Ok(())
}

/// Run the daemon until SIGTERM or SIGINT.
pub async fn run(d: config::Daemon) -> Result<()> {
    if let Some(addr) = d.metrics_listen {
        blockship_transport::metrics::serve(addr).map_err(anyhow::Error::msg)?;
        // Every group's failure series exist at zero from the start, so that alerts on their
        // increase work before the first failure.
        for g in &d.groups {
            for kind in ["link", "group"] {
                metrics::counter!("blockship_group_cycle_failures_total", "group" => g.name.clone(), "kind" => kind)
                    .increment(0);
            }
        }
    }
    let mut link = d.agent.link();
    link.pacer = (!d.bandwidth.unlimited()).then(|| Pacer::new(d.bandwidth.clone()));
    link.hold = true;
    let board = status::Board::new(d.groups.iter().map(group::initial).collect());
    let shared = Arc::new(group::Shared {
        agent: d.agent.clone(),
        links: links::Links::new(link),
        board: board.clone(),
        transfer: d.agent.transfer(),
        parallel: Arc::new(Semaphore::new(d.max_parallel_disks)),
        max_backoff: d.max_backoff,
    });
    let listener = control::bind(&d.control_socket)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut commands = HashMap::new();
    let mut tasks = Vec::new();
    let n = d.groups.len().max(1) as u32;
    for (k, g) in d.groups.iter().enumerate() {
        let (tx, rx) = mpsc::channel(8);
        commands.insert(g.name.clone(), tx);
        // First cycles are spread over one interval, so that many groups' cycles do not all
        // start at one instant and queue behind each other at the source and the sink.
        let first = g.interval * k as u32 / n;
        tasks.push(tokio::spawn(group::run(g.clone(), shared.clone(), rx, stop_rx.clone(), first)));
    }
    let mut control_stop = stop_rx.clone();
    let server = tokio::spawn(control::serve(listener, control::Control { board, commands }, async move {
        let _ = control_stop.wait_for(|s| *s).await;
    }));
    // The RPO gauge ages between commits: refreshed every second from the status board.
    let rpo_board = shared.board.clone();
    let rpo = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            for g in rpo_board.all() {
                metrics::gauge!("blockship_group_rpo_seconds", "group" => g.name.clone()).set(g.rpo_seconds);
            }
        }
    });
    tracing::info!(groups = d.groups.len(), socket = %d.control_socket.display(), "daemon running");
    println!(
        "blockship-agent daemon running {} groups; control socket {}",
        d.groups.len(),
        d.control_socket.display()
    );
    blockship_transport::shutdown::signal().await;
    tracing::info!(grace = ?d.shutdown_grace, "stopping: running cycles may finish");
    let _ = stop_tx.send(true);
    let all = futures::future::join_all(tasks.iter_mut());
    if tokio::time::timeout(d.shutdown_grace, all).await.is_err() {
        tracing::warn!("cycles still running after the grace period are abandoned (nothing half committed)");
        for t in &tasks {
            t.abort();
        }
    }
    rpo.abort();
    shared.links.close().await;
    let _ = server.await;
    let _ = std::fs::remove_file(&d.control_socket);
    Ok(())
}
