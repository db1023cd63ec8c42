//! The sources of a group of disks that must share a point in time (the disks of one VM). The
//! group freezes its members together where the platform can: one VM snapshot for all disks of
//! a VMware VM, one QMP transaction for the disks of a running QEMU. Members of other kinds are
//! frozen one after another, which is one point in time only for sources that do not change
//! (stopped machines); the daemon's `status` says which a group gets (`atomic` or `per-disk`).

use super::{Freeze, Origin, PointInTime, SourceError};

pub struct GroupOrigin {
    members: Vec<Origin>,
}

/// The VMware VM every member is a disk of, when they all are (one snapshot for all).
fn one_vmware(members: &[Origin]) -> Option<&std::sync::Arc<super::vmware::VmwareOrigin>> {
    let first = match members.first()? {
        Origin::Vmware(vm, _) => vm,
        _ => return None,
    };
    members
        .iter()
        .all(|m| matches!(m, Origin::Vmware(vm, _) if std::sync::Arc::ptr_eq(vm, first)))
        .then_some(first)
}

/// The VM every member is a disk of, when they all are disks of one QEMU (frozen together).
fn one_qemu(members: &[Origin]) -> Option<&std::sync::Arc<super::qemu::QemuVm>> {
    let first = match members.first()? {
        Origin::Qemu(vm, _) => vm,
        _ => return None,
    };
    members
        .iter()
        .all(|m| matches!(m, Origin::Qemu(vm, _) if std::sync::Arc::ptr_eq(vm, first)))
        .then_some(first)
}

impl GroupOrigin {
    /// Independent members, frozen one after another.
    pub fn of(members: Vec<Origin>) -> Self {
        GroupOrigin { members }
    }

    pub fn members(&self) -> &[Origin] {
        &self.members
    }

    /// When the platform can tell at once that no member changed since the last committed epoch
    /// (the dirty bitmaps of a QEMU VM), the points in time of an epoch with nothing to send;
    /// None when the group must be frozen and read.
    pub async fn unchanged(&self, freezes: &[Freeze<'_>]) -> Result<Option<Vec<PointInTime>>, SourceError> {
        match one_qemu(&self.members) {
            Some(vm) => Ok(vm.unchanged(freezes).await?),
            None => Ok(None),
        }
    }

    /// Freeze every member's point in time (`freezes[i]` for member i). On failure the points
    /// already taken are kept for the retry, like a failed epoch's.
    pub async fn freeze(&self, freezes: &[Freeze<'_>]) -> Result<Vec<PointInTime>, SourceError> {
        if let Some(vm) = one_qemu(&self.members) {
            // Members are the VM's disks in its order (see `QemuVm::open`).
            return Ok(vm.freeze(freezes).await?);
        }
        if let Some(vm) = one_vmware(&self.members) {
            let priors: Vec<Option<&str>> = freezes.iter().map(|f| f.prior_view).collect();
            let targets: Vec<&str> = freezes.iter().map(|f| f.target).collect();
            let views = vm.freeze(freezes.first().map_or(1, |f| f.epoch), &priors, &targets).await?;
            return Ok(views
                .into_iter()
                .map(|view| PointInTime {
                    source: std::sync::Arc::new(super::Source::Nbd(view.reader.clone())),
                    change_point: view.change_id.clone(),
                    view: view.id.clone(),
                    hold: super::Hold::Vmware(view),
                })
                .collect());
        }
        let mut points = Vec::with_capacity(self.members.len());
        for (m, f) in self.members.iter().zip(freezes) {
            match m.freeze(f).await {
                Ok(p) => points.push(p),
                Err(e) => {
                    for (m, p) in self.members.iter().zip(points) {
                        let _ = m.finish(p, false).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(points)
    }

    /// End of a cycle: release or keep every member's point in time.
    pub async fn finish(&self, points: Vec<PointInTime>, committed: bool) {
        if let Some(vm) = one_qemu(&self.members) {
            if let Err(e) = vm.finish(points, committed).await {
                tracing::warn!(committed, "releasing the VM's frozen views failed: {e}");
            }
            return;
        }
        if let Some(vm) = one_vmware(&self.members) {
            let views = points
                .into_iter()
                .filter_map(|p| match p.hold {
                    super::Hold::Vmware(v) => Some(v),
                    _ => None,
                })
                .collect();
            if let Err(e) = vm.finish(views, committed).await {
                tracing::warn!(committed, "releasing the VM snapshot failed: {e}");
            }
            return;
        }
        for (m, p) in self.members.iter().zip(points) {
            if let Err(e) = m.finish(p, committed).await {
                tracing::warn!(committed, "releasing a source point in time failed: {e}");
            }
        }
    }

    /// Stop (`running` false) or restart the machine the members are disks of, where the
    /// platform has a way (QEMU over QMP; a VMware VM through vCenter: guest shutdown within
    /// `shutdown_timeout`, then power off). None: no built-in way for this group's kind.
    pub async fn set_running(
        &self,
        running: bool,
        shutdown_timeout: std::time::Duration,
    ) -> Option<Result<String, SourceError>> {
        if let Some(vm) = one_qemu(&self.members) {
            let r = vm.set_running(running).await.map_err(SourceError::from);
            return Some(r.map(|()| if running { "QMP cont" } else { "QMP stop" }.to_string()));
        }
        if let Some(vm) = one_vmware(&self.members) {
            return Some(vm.set_running(running, shutdown_timeout).await.map_err(SourceError::from));
        }
        None
    }

    pub async fn close(&self) {
        if let Some(vm) = one_vmware(&self.members) {
            // One vCenter session for all the VM's disks.
            vm.logout().await;
            return;
        }
        for m in &self.members {
            m.close().await;
        }
    }
}
