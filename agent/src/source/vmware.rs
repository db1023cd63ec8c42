//! VMware sources: the vSphere API tells what changed (Changed Block Tracking), an NBD endpoint
//! produced by a configurable command reads the data of a VM snapshot. Each epoch snapshots the
//! VM, takes the snapshot disk's `changeId` as the new change point, asks
//! `QueryChangedDiskAreas` what changed since the change point the sink stored (`"*"`: what is
//! allocated, for a first sync), and removes the snapshot after the sink's durable ack. A failed
//! epoch keeps its snapshot: the retry reads it again (the sink recorded it as the epoch's view),
//! so an epoch never mixes two points in time. Snapshots carry a tag of the target they feed;
//! a run removes only its own target's abandoned ones, never another disk's. The data command
//! (in production `nbdkit vddk ... snapshot=... --unix SOCKET`) is a shell command line that
//! receives its parameters as environment variables, so the agent never links VDDK; its stderr
//! is drained into the log, so a chatty command never stalls on a full pipe.

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::extents::Extent;
use crate::source::nbd::NbdSource;
use crate::vsphere::{change_id_uuid, MoRef, Trust, VirtualDisk, Vsphere, VsphereError};

/// Prefix of the snapshots Blockship creates on VMs.
pub const SNAP_PREFIX: &str = "blockship-";

#[derive(Debug, thiserror::Error)]
pub enum VmwareError {
    #[error(transparent)]
    Vsphere(#[from] VsphereError),
    #[error("VMware source: {0}")]
    Config(String),
    #[error("VMware data command: {0}")]
    DataCommand(String),
    #[error("VMware source: {0}")]
    Nbd(#[from] crate::source::nbd::NbdError),
}

/// Settings of a VMware source.
#[derive(Debug, Clone)]
pub struct VmwareOptions {
    /// vCenter or ESXi host[:port].
    pub host: String,
    pub user: String,
    pub password: String,
    pub trust: Trust,
    /// VM BIOS UUID or inventory path.
    pub vm: String,
    /// Disk device keys ("2000") or labels ("Hard disk 1"), frozen together with one VM
    /// snapshot; empty: the VM's only disk.
    pub disks: Vec<String>,
    /// Shell command serving the snapshot disk over NBD on $BLOCKSHIP_NBD_SOCKET.
    pub nbd_command: String,
    /// Quiesce the guest file systems when snapshotting (VMware Tools).
    pub quiesce: bool,
}

/// A VM and the disks replicated from it, before a point in time is frozen.
pub struct VmwareOrigin {
    opts: VmwareOptions,
    api: Arc<Mutex<Vsphere>>,
    vm: MoRef,
    disks: Vec<VirtualDisk>,
    cbt: bool,
}

/// A frozen point in time of one disk: a VM snapshot, the disk's changeId, and the NBD reader
/// of its data.
pub struct VmwareView {
    /// Which of the origin's disks.
    pub disk: usize,
    pub snapshot: MoRef,
    pub change_id: Option<String>,
    pub reader: Arc<NbdSource>,
    /// `vmware:VM/SNAPSHOT#CHANGEID`: the identity the sink records for a retry.
    pub id: String,
    process: Child,
    _dir: tempfile::TempDir,
}

/// How long the data command gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of the data command's stderr kept for error messages.
const STDERR_TAIL: usize = 20;

/// Snapshot name `blockship-<epoch>-<tag>`; the tag names the target the snapshot feeds.
fn snapshot_name(epoch: u64, tag: &str) -> String {
    format!("{SNAP_PREFIX}{epoch}-{tag}")
}

/// Short tag of a target name (its BLAKE3, 8 hex digits).
fn target_tag(target: &str) -> String {
    blake3::hash(target.as_bytes()).to_hex()[..8].to_string()
}

/// The snapshot moref in a view identity `vmware:VM/SNAPSHOT#CHANGEID`.
fn view_snapshot(view: &str) -> Option<&str> {
    let (left, _) = view.strip_prefix("vmware:")?.split_once('#')?;
    Some(left.split_once('/')?.1)
}

async fn call<T: Send + 'static>(
    api: &Arc<Mutex<Vsphere>>,
    f: impl FnOnce(&mut Vsphere) -> Result<T, VsphereError> + Send + 'static,
) -> Result<T, VmwareError> {
    let api = api.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = api.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    })
    .await
    .map_err(|e| VmwareError::Config(format!("vSphere call: {e}")))?
    .map_err(VmwareError::from)
}

impl VmwareOrigin {
    /// Log in, find the VM and its disks.
    pub async fn open(opts: VmwareOptions) -> Result<VmwareOrigin, VmwareError> {
        let o = opts.clone();
        let api =
            tokio::task::spawn_blocking(move || Vsphere::login(&o.host, &o.user, &o.password, &o.trust))
                .await
                .map_err(|e| VmwareError::Config(e.to_string()))??;
        let api = Arc::new(Mutex::new(api));
        let vm_name = opts.vm.clone();
        let vm = call(&api, move |a| a.find_vm(&vm_name)).await?;
        let v = vm.clone();
        let (all, cbt) = call(&api, move |a| a.vm_disks(&v)).await?;
        let disks = if opts.disks.is_empty() {
            vec![pick_disk(&all, None)?]
        } else {
            opts.disks.iter().map(|d| pick_disk(&all, Some(d))).collect::<Result<Vec<_>, _>>()?
        };
        Ok(VmwareOrigin { opts, api, vm, disks, cbt })
    }

    /// How many of the VM's disks are replicated.
    pub fn disks(&self) -> usize {
        self.disks.len()
    }

    pub fn size(&self, disk: usize) -> u64 {
        self.disks[disk].capacity
    }

    pub fn disk_id(&self, disk: usize) -> String {
        format!("vmware:{}/{}", self.opts.vm, self.disks[disk].key)
    }

    pub fn cbt_enabled(&self) -> bool {
        self.cbt
    }

    /// The point in time of epoch `epoch` for every disk: one VM snapshot, the one an
    /// interrupted attempt was reading if every disk's `priors` entry (as the sink recorded it)
    /// names it and it still exists, else a new one. Other snapshots tagged for these targets
    /// are abandoned and removed; snapshots of other targets (other disks of the same VM, other
    /// replicas) are left alone. Then each disk's changeId is read and its data command started.
    pub async fn freeze(
        &self,
        epoch: u64,
        priors: &[Option<&str>],
        targets: &[&str],
    ) -> Result<Vec<VmwareView>, VmwareError> {
        let tag = target_tag(&targets.join(","));
        let v = self.vm.clone();
        let ours: Vec<(String, MoRef)> = call(&self.api, move |a| a.snapshots_named(&v, SNAP_PREFIX))
            .await?
            .into_iter()
            .filter(|(name, _)| name.ends_with(&format!("-{tag}")))
            .collect();
        let wanted = priors.first().copied().flatten().and_then(view_snapshot);
        let agreed = priors.iter().all(|p| p.and_then(view_snapshot) == wanted);
        let reused =
            ours.iter().find(|(_, mo)| agreed && Some(mo.value.as_str()) == wanted).map(|(_, mo)| mo.clone());
        for (name, snap) in ours {
            if Some(&snap) != reused.as_ref() {
                tracing::warn!(snapshot = %name, "removing a Blockship snapshot these targets' earlier run abandoned");
                call(&self.api, move |a| a.remove_snapshot(&snap)).await?;
            }
        }
        let snapshot = match reused {
            Some(s) => {
                tracing::info!(snapshot = %s.value, "retrying the interrupted epoch from its own VM snapshot");
                s
            }
            None => {
                let (vm, quiesce, name) = (self.vm.clone(), self.opts.quiesce, snapshot_name(epoch, &tag));
                call(&self.api, move |a| a.create_snapshot(&vm, &name, quiesce)).await?
            }
        };
        let s = snapshot.clone();
        let in_snapshot = call(&self.api, move |a| a.snapshot_disks(&s)).await?;
        let mut views = Vec::new();
        for (i, disk) in self.disks.iter().enumerate() {
            let result = match in_snapshot.iter().find(|d| d.key == disk.key) {
                None => Err(VmwareError::Config(format!("the snapshot has no disk with key {}", disk.key))),
                Some(snap_disk) => {
                    self.start_reader(&snapshot, snap_disk).await.map(|(process, reader, dir)| VmwareView {
                        disk: i,
                        id: format!(
                            "vmware:{}/{}#{}",
                            self.vm.value,
                            snapshot.value,
                            snap_disk.change_id.as_deref().unwrap_or("")
                        ),
                        snapshot: snapshot.clone(),
                        change_id: snap_disk.change_id.clone(),
                        reader: Arc::new(reader),
                        process,
                        _dir: dir,
                    })
                }
            };
            match result {
                Ok(v) => views.push(v),
                Err(e) => {
                    for v in views {
                        let _ = v.reader.disconnect().await;
                        stop(v.process, STOP_GRACE).await;
                    }
                    let s = snapshot.clone();
                    let _ = call(&self.api, move |a| a.remove_snapshot(&s)).await;
                    return Err(e);
                }
            }
        }
        Ok(views)
    }

    async fn start_reader(
        &self,
        snapshot: &MoRef,
        disk: &VirtualDisk,
    ) -> Result<(Child, NbdSource, tempfile::TempDir), VmwareError> {
        let dir = tempfile::Builder::new()
            .prefix("blockship-vddk-")
            .tempdir()
            .map_err(|e| VmwareError::DataCommand(format!("temp dir: {e}")))?;
        let socket: PathBuf = dir.path().join("nbd.sock");
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, &self.opts.password)
            .map_err(|e| VmwareError::DataCommand(format!("password file: {e}")))?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(&self.opts.nbd_command)
            .env("BLOCKSHIP_NBD_SOCKET", &socket)
            .env("BLOCKSHIP_VCENTER", &self.opts.host)
            .env("BLOCKSHIP_VCENTER_USER", &self.opts.user)
            .env("BLOCKSHIP_VCENTER_PASSWORD_FILE", &password_file)
            .env("BLOCKSHIP_VM", &self.vm.value)
            .env("BLOCKSHIP_SNAPSHOT", &snapshot.value)
            .env("BLOCKSHIP_DISK_FILE", &disk.file_name)
            .env("BLOCKSHIP_DISK_KEY", disk.key.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Its own process group, so stopping it also stops whatever it started.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| VmwareError::DataCommand(format!("starting sh -c: {e}")))?;
        let tail = drain_stderr(&mut child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                // Give the drain thread a moment to take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let lines: Vec<String> =
                    tail.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
                return Err(VmwareError::DataCommand(format!(
                    "exited ({status}) before serving NBD: {}",
                    lines.join("\n").trim()
                )));
            }
            if socket.exists() {
                match NbdSource::connect(&uri, None).await {
                    Ok(r) => return Ok((child, r, dir)),
                    Err(e) if Instant::now() > deadline => {
                        stop(child, STOP_GRACE).await;
                        return Err(e.into());
                    }
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                stop(child, STOP_GRACE).await;
                return Err(VmwareError::DataCommand("no NBD socket after 60 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Extents allocated in the snapshot (`QueryChangedDiskAreas` with changeId "*").
    pub async fn allocated(&self, view: &VmwareView) -> Result<Vec<Extent>, VmwareError> {
        self.changes(view, "*").await.map(|(e, _)| e)
    }

    /// Changes in `view` since `change_id`, paging through `QueryChangedDiskAreas`; returns the
    /// extents and the number of pages.
    pub async fn changes(
        &self,
        view: &VmwareView,
        change_id: &str,
    ) -> Result<(Vec<Extent>, usize), VmwareError> {
        let disk = &self.disks[view.disk];
        let (vm, snap, key, cap, cid) =
            (self.vm.clone(), view.snapshot.clone(), disk.key, disk.capacity, change_id.to_string());
        call(&self.api, move |a| a.changed_areas(&vm, &snap, key, cap, &cid)).await
    }

    /// Why the stored change point cannot be used with this view, if it cannot.
    pub fn unusable(&self, view: &VmwareView, stored: &str) -> Option<String> {
        if !self.cbt {
            return Some("changed block tracking is off on this VM (enable ctkEnabled)".into());
        }
        let Some(new) = &view.change_id else {
            return Some("the snapshot's disk carries no changeId (changed block tracking off?)".into());
        };
        if stored.is_empty() {
            return Some("the target has no changeId yet".into());
        }
        if change_id_uuid(stored) != change_id_uuid(new) {
            return Some(format!(
                "changed block tracking was reset (changeId {} → {}): earlier changes are unknown",
                change_id_uuid(stored),
                change_id_uuid(new)
            ));
        }
        None
    }

    /// Stop the data commands; remove the snapshot once the epoch is durable (every disk's
    /// view names the same snapshot). After a failed epoch it is kept, for the retry.
    pub async fn finish(&self, views: Vec<VmwareView>, committed: bool) -> Result<(), VmwareError> {
        let mut snapshot = None;
        for view in views {
            let VmwareView { snapshot: snap, reader, process, _dir, .. } = view;
            let _ = reader.disconnect().await;
            stop(process, STOP_GRACE).await;
            drop(_dir);
            snapshot = Some(snap);
        }
        let Some(snapshot) = snapshot else { return Ok(()) };
        if committed {
            call(&self.api, move |a| a.remove_snapshot(&snapshot)).await?;
        } else {
            tracing::warn!(snapshot = %snapshot.value, "epoch not committed: the VM snapshot is kept for the retry");
        }
        Ok(())
    }

    /// Stop the VM (guest shutdown within `shutdown_timeout`, then power off) or power it on.
    pub async fn set_running(
        &self,
        running: bool,
        shutdown_timeout: Duration,
    ) -> Result<String, VmwareError> {
        let vm = self.vm.clone();
        if running {
            call(&self.api, move |a| a.start_vm(&vm)).await
        } else {
            call(&self.api, move |a| a.stop_vm(&vm, shutdown_timeout)).await
        }
    }

    pub async fn logout(&self) {
        let _ = call(&self.api, |a| {
            a.logout();
            Ok(())
        })
        .await;
    }
}

/// Log the data command's stderr (it would stall once the pipe filled up) and keep its last
/// lines for error messages.
fn drain_stderr(child: &mut Child) -> Arc<Mutex<VecDeque<String>>> {
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
    if let Some(err) = child.stderr.take() {
        let t = tail.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                tracing::info!(target: "blockship_agent::nbd_command", "{line}");
                let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
    }
    tail
}

/// Stop the data command's process group: SIGTERM, then SIGKILL after `grace`. Waits on the
/// blocking pool, so the runtime's workers stay free.
async fn stop(mut child: Child, grace: Duration) {
    let _ = tokio::task::spawn_blocking(move || {
        // SAFETY: signalling the process group we created for the command.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = child.wait();
    })
    .await;
}

fn pick_disk(disks: &[VirtualDisk], wanted: Option<&str>) -> Result<VirtualDisk, VmwareError> {
    let list = || disks.iter().map(|d| format!("{} ({})", d.key, d.label)).collect::<Vec<_>>().join(", ");
    match wanted {
        Some(w) => disks
            .iter()
            .find(|d| d.key.to_string() == w || d.label == w)
            .cloned()
            .ok_or_else(|| VmwareError::Config(format!("the VM has no disk {w:?} (disks: {})", list()))),
        None if disks.len() == 1 => Ok(disks[0].clone()),
        None if disks.is_empty() => Err(VmwareError::Config("the VM has no virtual disk".into())),
        None => {
            Err(VmwareError::Config(format!("the VM has several disks; pick one with --disk ({})", list())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_identities_name_their_snapshot() {
        assert_eq!(view_snapshot("vmware:vm-42/snapshot-7#52 1f/3"), Some("snapshot-7"));
        assert_eq!(view_snapshot("vmware:vm-42/snapshot-7#"), Some("snapshot-7"));
        assert_eq!(view_snapshot("rbd:p/i@blockship-src-2#4"), None);
        assert_eq!(view_snapshot(""), None);
        let (a, b) = (target_tag("file:vm42"), target_tag("file:vm43"));
        assert_ne!(a, b);
        assert_eq!(snapshot_name(3, &a), format!("blockship-3-{a}"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stopping_a_stubborn_command_leaves_the_runtime_free() {
        // A data command that ignores SIGTERM: stopping it takes the whole grace period, which
        // must not block the (here single) runtime thread.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; sleep 30"]);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        stop(child, Duration::from_secs(1)).await;
        ticker.abort();
        let n = ticks.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n >= 5, "the runtime was blocked while the command was stopped ({n} ticks in ~1 s)");
    }
}
