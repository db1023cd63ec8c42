//! `blockship-agent sync`: one cycle of the replication engine for a group of one disk. Open the
//! source, check the change list before anything is sent, connect, run the cycle (the sink's
//! committed epoch and change point decide what is sent), and succeed only on the sink's durable
//! commit acknowledgement; the source's point in time is released after it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::changes::{cbt_file, Changes};
use crate::config::Resolved;
use crate::engine::cycle::{self, Member};
use crate::link::Link;
use crate::progress::Bars;
use crate::report::SyncSummary;
use crate::source::group::GroupOrigin;
use crate::source::{Origin, Source, SourceOptions};
use crate::AgentError;
use blockship_proto::pb::ErrorCode;
use blockship_transport::conn::PathStats;

pub struct SyncRequest {
    pub source: String,
    pub target: String,
    pub changes: Changes,
    /// Change point to record with this epoch where the platform does not define one (e.g. the
    /// dirty bitmap that started tracking when the source was frozen).
    pub change_point: Option<String>,
    pub disk_id: Option<String>,
    pub progress: bool,
    pub source_opts: SourceOptions,
    /// Replicate into a target that was cut over (`--force-resume`).
    pub force_resume: bool,
    /// A benchmark (see `cycle::Opening::bench`).
    pub bench: bool,
}

fn usage(msg: impl Into<String>) -> AgentError {
    AgentError::Usage(msg.into())
}

/// Whether `changes` can be used with `origin` at all.
pub fn check_changes(changes: &Changes, origin: &Origin) -> Result<(), AgentError> {
    let is_nbd = matches!(origin, Origin::Plain { source, .. } if matches!(source.as_ref(), Source::Nbd(_)));
    match (changes, origin) {
        (Changes::NbdBitmap(_), _) if !is_nbd => {
            Err(usage("--changes nbd-bitmap needs an nbd:// or nbd+unix:// source"))
        }
        (Changes::Vmware, o) if !matches!(o, Origin::Vmware(..)) => {
            Err(usage("--changes vmware needs a vmware source"))
        }
        (Changes::RbdSnap, o) if !matches!(o, Origin::Rbd(_)) => {
            Err(usage("--changes rbd-snap needs an rbd: source"))
        }
        _ => Ok(()),
    }
}

/// A change list file's extents, checked against a disk of `size` bytes.
pub fn change_list(changes: &Changes, size: u64) -> Result<Option<Vec<crate::extents::Extent>>, AgentError> {
    let Changes::CbtFile(path) = changes else { return Ok(None) };
    let err = |err| AgentError::ChangeList { path: path.display().to_string(), err };
    let text =
        std::fs::read_to_string(path).map_err(|e| err(cbt_file::ChangeListError::Shape(e.to_string())))?;
    Ok(Some(cbt_file::parse(&text, size).map_err(err)?))
}

pub async fn sync(cfg: &Resolved, req: &SyncRequest) -> Result<SyncSummary, AgentError> {
    let started = Instant::now();
    let origin = GroupOrigin::of(vec![Origin::open(&req.source, &req.source_opts).await?]);
    let mut retries = 0;
    let result = loop {
        match run(cfg, req, &origin).await {
            // Data damaged between hashing and sending (the sink wrote none of it): the same
            // frozen view is still open, so the retry resumes from what is durable.
            Err(AgentError::Refused { code: ErrorCode::Checksum, message })
                if retries < cfg.checksum_retries =>
            {
                retries += 1;
                tracing::warn!(
                    retries,
                    "the sink refused a chunk that failed its checksum, retrying: {message}"
                );
            }
            other => break other,
        }
    };
    origin.close().await;
    let (cycle, path, connections) = result?;
    let report = cycle.members.into_iter().next();
    let report = report.ok_or_else(|| AgentError::Internal("a cycle without its disk".into()))?;
    let mut summary = SyncSummary::new(&req.target, report, started.elapsed().as_secs_f64());
    summary.checksum_retries = retries;
    summary.path = path;
    summary.connections = connections;
    Ok(summary)
}

async fn run(
    cfg: &Resolved,
    req: &SyncRequest,
    origin: &GroupOrigin,
) -> Result<(cycle::CycleReport, Option<PathStats>, usize), AgentError> {
    let source = &origin.members()[0];
    check_changes(&req.changes, source)?;
    // A bad change list is refused before anything is sent.
    let file_extents = change_list(&req.changes, source.size())?;
    let member = Member {
        target: req.target.clone(),
        disk_id: req.disk_id.clone(),
        changes: req.changes.clone(),
        change_point: req.change_point.clone(),
        file_extents,
    };
    let link = Link::connect(&cfg.link()).await?;
    let mut open = [None];
    let bars = Bars::new(req.progress);
    let parallel = Arc::new(tokio::sync::Semaphore::new(1));
    let how = cycle::Opening { force_resume: req.force_resume, bench: req.bench, ..Default::default() };
    let cycle =
        cycle::run(&link, None, origin, &[member], &mut open, &cfg.transfer(), &parallel, &bars, how).await;
    drop(open);
    let (path, connections) = (link.path(), link.connections());
    link.close().await;
    Ok((cycle?, path, connections))
}

/// `--changed-areas FILE` is `--changes cbt-file:FILE`.
pub fn changes_from_flags(
    changes: Option<&str>,
    changed_areas: Option<PathBuf>,
) -> Result<Changes, AgentError> {
    match (changes, changed_areas) {
        (Some(_), Some(_)) => Err(usage("give --changes or --changed-areas, not both")),
        (None, Some(f)) => Ok(Changes::CbtFile(f)),
        (Some(c), None) => c.parse().map_err(usage),
        (None, None) => Ok(Changes::Auto),
    }
}
