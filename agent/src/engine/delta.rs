//! What an epoch reads: where the source holds data at all (its allocated extents; VMware asks
//! Changed Block Tracking for them), and what the platform's change tracking says changed since
//! the target's change point — a QEMU dirty bitmap over NBD, an RBD snapshot diff, vSphere's
//! `QueryChangedDiskAreas` — or why it cannot say (then the epoch compares instead).

use crate::changes::Changes;
use crate::extents::Extent;
use crate::source::nbd::{NbdError, NbdSource};
use crate::source::{Hold, Origin, PointInTime, Source};
use crate::AgentError;

/// Where the source holds data: VMware asks CBT for the allocated areas ("*"), other sources
/// report their holes themselves.
pub async fn allocation(origin: &Origin, point: &PointInTime) -> Result<Vec<Extent>, AgentError> {
    if let (Origin::Vmware(v, _), Hold::Vmware(view)) = (origin, &point.hold) {
        if v.cbt_enabled() && view.change_id.is_some() {
            return Ok(v.allocated(view).await?);
        }
    }
    Ok(point.source.allocated().await?)
}

/// What the platform's change tracking says about the time since the last epoch.
pub enum Delta {
    Changed(Vec<Extent>),
    /// The source tracks changes, but not usably now (the reason is shown to the operator).
    Unusable(String),
    /// A plain file or device: no change tracking, so compare is its normal mode.
    Untracked,
}

/// The platform's changed extents since `stored`, or why there are none to use.
pub async fn delta(
    changes: &Changes,
    origin: &Origin,
    point: &PointInTime,
    stored: &str,
) -> Result<Delta, AgentError> {
    let explicit = *changes != Changes::Auto;
    match (origin, &point.hold) {
        (Origin::Plain { spec, source }, _) if matches!(source.as_ref(), Source::Nbd(_)) => {
            if stored.is_empty() {
                return Ok(Delta::Unusable(
                    "the target has no change point (no dirty bitmap to read)".into(),
                ));
            }
            match NbdSource::connect(spec, Some(stored)).await {
                Ok(n) => {
                    let dirty = n.dirty(stored).await;
                    let _ = n.disconnect().await;
                    Ok(Delta::Changed(dirty?))
                }
                Err(NbdError::ContextUnavailable { .. }) => Ok(Delta::Unusable(format!(
                    "the export does not offer dirty bitmap {stored:?} (missing, or left in-use by a crash)"
                ))),
                Err(e) => Err(e.into()),
            }
        }
        (Origin::Rbd(r), Hold::Rbd(view)) => {
            if stored.is_empty() {
                return Ok(Delta::Unusable(
                    "the target has no change point (no source snapshot to diff against)".into(),
                ));
            }
            if !r.has_snapshot(stored).await? {
                return Ok(Delta::Unusable(format!(
                    "source snapshot {stored:?} of the last replicated epoch is gone"
                )));
            }
            Ok(Delta::Changed(view.changed_since(stored).await?))
        }
        (Origin::Vmware(v, _), Hold::Vmware(view)) => {
            if let Some(why) = v.unusable(view, stored) {
                return Ok(Delta::Unusable(why));
            }
            match v.changes(view, stored).await {
                Ok((extents, pages)) => {
                    tracing::info!(pages, extents = extents.len(), "changed areas from vCenter");
                    Ok(Delta::Changed(extents))
                }
                Err(e) if explicit => Err(e.into()),
                Err(e) => Ok(Delta::Unusable(format!("vCenter could not list the changed areas: {e}"))),
            }
        }
        (Origin::Qemu(..), Hold::Qemu(view)) => {
            if stored.is_empty() {
                return Ok(Delta::Unusable(
                    "the target has no change point (no dirty bitmap to read)".into(),
                ));
            }
            if view.bitmap.as_deref() != Some(stored) {
                return Ok(Delta::Unusable(format!(
                    "the VM has no dirty bitmap {stored:?} (QEMU restarted, or the bitmap was lost)"
                )));
            }
            let n = NbdSource::connect(&view.uri, Some(stored)).await?;
            let dirty = n.dirty(stored).await;
            let _ = n.disconnect().await;
            Ok(Delta::Changed(dirty?))
        }
        _ => Ok(Delta::Untracked),
    }
}
