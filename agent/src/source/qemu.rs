//! QEMU sources: the disks of a running QEMU or qemu-storage-daemon, reached through its QMP
//! socket, with no scripting around it. One QMP transaction freezes every disk of the group at
//! once: for each disk it starts a new persistent dirty bitmap (the next change point), stops the
//! one that tracked the time since the last epoch, and starts a `blockdev-backup sync=none` job
//! into a fleecing overlay, so the overlay node reads as the disk at that instant while the guest
//! goes on writing. The overlays are exported through QEMU's NBD server together with the
//! stopped bitmap, and read like any NBD source with the `qemu:dirty-bitmap` context. After the
//! group commit the exports, jobs, overlays and the consumed bitmaps are removed; after a failure
//! the frozen views stay, and the retry reads them again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::nbd::NbdSource;
use super::{Freeze, Hold, PointInTime, Source};

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("QMP {socket}: {what}")]
    Qmp { socket: String, what: String },
    #[error("QMP {socket}: {command} failed: {desc}")]
    Command { socket: String, command: String, desc: String },
    #[error("QEMU has no block node {0:?} (query-named-block-nodes lists the node names)")]
    NoNode(String),
    #[error("QEMU source: {0}")]
    Other(String),
    #[error("QEMU source: {0}")]
    Nbd(#[from] super::nbd::NbdError),
}

/// A QMP connection (commands one at a time; events skipped).
struct Qmp {
    socket: String,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &Path) -> Result<Qmp, QemuError> {
        let socket = path.display().to_string();
        let err = |what: String| QemuError::Qmp { socket: socket.clone(), what };
        let stream = UnixStream::connect(path).await.map_err(|e| {
            err(format!("cannot connect ({e}): is the VM running, and is this its QMP socket?"))
        })?;
        let (r, w) = stream.into_split();
        let mut q = Qmp { socket: socket.clone(), reader: BufReader::new(r), writer: w };
        let greeting = q.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("not a QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn read(&mut self) -> Result<Value, QemuError> {
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .await
                .map_err(|e| QemuError::Qmp { socket: self.socket.clone(), what: e.to_string() })?;
            if n == 0 {
                return Err(QemuError::Qmp {
                    socket: self.socket.clone(),
                    what: "QEMU closed the QMP connection".into(),
                });
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| QemuError::Qmp {
                socket: self.socket.clone(),
                what: format!("bad reply {line:?}: {e}"),
            })?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        let line = format!("{}\n", json!({"execute": command, "arguments": arguments}));
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| QemuError::Qmp { socket: self.socket.clone(), what: e.to_string() })?;
        let r = self.read().await?;
        if let Some(e) = r.get("error") {
            return Err(QemuError::Command {
                socket: self.socket.clone(),
                command: command.to_string(),
                desc: e.get("desc").and_then(Value::as_str).unwrap_or("unknown error").to_string(),
            });
        }
        Ok(r.get("return").cloned().unwrap_or(Value::Null))
    }
}

/// One disk of the VM: its block node and the names Blockship gives its objects there.
#[derive(Debug, Clone)]
pub struct QemuDisk {
    pub node: String,
    /// Short tag of the target (QEMU node names are at most 31 characters).
    tag: String,
    pub size: u64,
}

impl QemuDisk {
    fn fleece(&self) -> String {
        format!("bsf-{}", self.tag)
    }
    fn export_id(&self) -> String {
        format!("bse-{}", self.tag)
    }
    /// The bitmap that starts at the freeze of `epoch` (its change point) and the name the
    /// frozen view of `epoch` is exported under.
    fn bitmap(&self, epoch: u64) -> String {
        format!("bs-{}-{epoch}", self.tag)
    }
}

/// A frozen view of one disk.
#[derive(Debug, Clone)]
pub struct QemuView {
    pub disk: usize,
    /// The bitmap of the time since the last epoch, exported with the view (None: none exists).
    pub bitmap: Option<String>,
    pub uri: String,
}

/// A running VM and the disks of a group on it.
pub struct QemuVm {
    qmp: tokio::sync::Mutex<Qmp>,
    qmp_path: PathBuf,
    nbd_socket: PathBuf,
    /// Where the fleecing overlays live.
    dir: PathBuf,
    pub disks: Vec<QemuDisk>,
}

/// A dirty bitmap as `query-named-block-nodes` reports it.
struct Bitmap {
    name: String,
    recording: bool,
    count: Option<u64>,
    inconsistent: bool,
}

/// Whether a `query-named-block-nodes` reply has node `name`.
fn has_node(nodes: &Value, name: &str) -> bool {
    nodes
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n.get("node-name").and_then(Value::as_str) == Some(name)))
}

/// The dirty bitmaps of block node `node` in a `query-named-block-nodes` reply.
fn node_bitmaps(nodes: &Value, node: &str) -> Result<Vec<Bitmap>, QemuError> {
    let n = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n.get("node-name").and_then(Value::as_str) == Some(node)))
        .ok_or_else(|| QemuError::NoNode(node.to_string()))?;
    Ok(n.get("dirty-bitmaps")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    Some(Bitmap {
                        name: b.get("name")?.as_str()?.to_string(),
                        recording: b.get("recording").and_then(Value::as_bool).unwrap_or(true),
                        count: b.get("count").and_then(Value::as_u64),
                        inconsistent: b.get("inconsistent").and_then(Value::as_bool).unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default())
}

fn tag(target: &str) -> String {
    blake3::hash(target.as_bytes()).to_hex()[..8].to_string()
}

impl QemuVm {
    /// Connect to the VM's QMP socket and find the group's block nodes (`disks`: node name and
    /// target). Uses the NBD server at `nbd_socket` when given, else starts one of QEMU's.
    pub async fn open(
        qmp_path: &Path,
        disks: &[(String, String)],
        nbd_socket: Option<&Path>,
        dir: &Path,
    ) -> Result<Arc<QemuVm>, QemuError> {
        let mut qmp = Qmp::connect(qmp_path).await?;
        let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true})).await?;
        let mut found = Vec::new();
        for (node, target) in disks {
            let n = nodes
                .as_array()
                .and_then(|a| {
                    a.iter().find(|n| n.get("node-name").and_then(Value::as_str) == Some(node.as_str()))
                })
                .ok_or_else(|| QemuError::NoNode(node.clone()))?;
            let size = n.pointer("/image/virtual-size").and_then(Value::as_u64).unwrap_or(0);
            if size == 0 {
                return Err(QemuError::Other(format!("block node {node:?} reports no size")));
            }
            found.push(QemuDisk { node: node.clone(), tag: tag(target), size });
        }
        std::fs::create_dir_all(dir).map_err(|e| QemuError::Other(format!("{}: {e}", dir.display())))?;
        let nbd_socket = match nbd_socket {
            Some(s) => s.to_path_buf(),
            None => {
                let s = dir.join("nbd.sock");
                let _ = std::fs::remove_file(&s);
                let started = qmp
                    .execute(
                        "nbd-server-start",
                        json!({"addr": {"type": "unix", "data": {"path": s.display().to_string()}}}),
                    )
                    .await;
                match started {
                    Ok(_) => s,
                    Err(QemuError::Command { desc, .. }) => {
                        return Err(QemuError::Other(format!(
                            "QEMU runs an NBD server already ({desc}): give its socket as nbd_socket in the group"
                        )))
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        Ok(Arc::new(QemuVm {
            qmp: tokio::sync::Mutex::new(qmp),
            qmp_path: qmp_path.to_path_buf(),
            nbd_socket,
            dir: dir.to_path_buf(),
            disks: found,
        }))
    }

    pub fn disk_id(&self, i: usize) -> String {
        format!("qemu:{}/{}", self.qmp_path.display(), self.disks[i].node)
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_socket.display())
    }

    async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        self.qmp.lock().await.execute(command, arguments).await
    }

    /// Pause the guest (`stop`: QEMU drains its I/O first), or let it run again (`cont`); both
    /// are no-ops in the state asked for. A `qemu-storage-daemon` runs no guest and has neither.
    pub async fn set_running(&self, running: bool) -> Result<(), QemuError> {
        let command = if running { "cont" } else { "stop" };
        match self.execute(command, json!({})).await {
            Err(QemuError::Command { desc, .. }) if desc.contains("has not been found") => {
                Err(QemuError::Other(format!(
                    "the QMP server at {} has no `{command}` (a qemu-storage-daemon runs no guest): give a hook command that {} what writes to its disks",
                    self.qmp_path.display(),
                    if running { "restarts" } else { "stops" }
                )))
            }
            r => r.map(|_| ()),
        }
    }

    /// Bitmaps on `node`: (name, recording). A persistent bitmap left *inconsistent* by a crash
    /// (in use when QEMU died) is not listed: it says nothing about what changed, so the disk
    /// resyncs in compare mode, and the next freeze removes it.
    async fn bitmaps(&self, node: &str) -> Result<Vec<(String, bool)>, QemuError> {
        let nodes = self.execute("query-named-block-nodes", json!({"flat": true})).await?;
        Ok(node_bitmaps(&nodes, node)?
            .into_iter()
            .filter(|b| !b.inconsistent)
            .map(|b| (b.name, b.recording))
            .collect())
    }

    /// Remove the bitmaps of ours on disk `d` that a crash left inconsistent (QEMU refuses every
    /// other operation on them), as `nodes` (a `query-named-block-nodes` reply) lists them.
    async fn remove_inconsistent(&self, nodes: &Value, d: &QemuDisk) -> Result<(), QemuError> {
        let ours = format!("bs-{}-", d.tag);
        for b in
            node_bitmaps(nodes, &d.node)?.into_iter().filter(|b| b.inconsistent && b.name.starts_with(&ours))
        {
            tracing::warn!(node = %d.node, bitmap = %b.name, "dirty bitmap left inconsistent by a crash: removed; this disk resyncs in compare mode");
            self.execute("block-dirty-bitmap-remove", json!({"node": d.node, "name": b.name})).await?;
        }
        Ok(())
    }

    /// Whether a frozen view of disk `i` is exported now (left by an earlier attempt), as
    /// `exports` (a `query-block-exports` reply) says.
    fn exported(&self, exports: &Value, i: usize) -> bool {
        let id = self.disks[i].export_id();
        exports
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e.get("id").and_then(Value::as_str) == Some(id.as_str())))
    }

    /// The points in time of an epoch with nothing to send, when no disk changed since the last
    /// committed freeze: each disk's stored bitmap exists, records and counts nothing, and no
    /// retry is pending. One QMP query instead of a freeze, an export and NBD reads. Counts only
    /// grow, so zero counts read one after another mean that at the first read every disk was
    /// still at the last committed point: one instant for the whole group. (A view left by a
    /// dead attempt disabled its stored bitmap, so it takes the freeze path, which cleans up.)
    pub async fn unchanged(&self, freezes: &[Freeze<'_>]) -> Result<Option<Vec<PointInTime>>, QemuError> {
        if freezes.len() != self.disks.len()
            || freezes.iter().any(|f| f.prior_view.is_some_and(|v| !v.is_empty()))
        {
            return Ok(None);
        }
        let nodes = self.execute("query-named-block-nodes", json!({"flat": true})).await?;
        let mut points = Vec::with_capacity(freezes.len());
        for (d, f) in self.disks.iter().zip(freezes) {
            let Some(stored) = f.stored_point.filter(|s| !s.is_empty()) else { return Ok(None) };
            let clean = node_bitmaps(&nodes, &d.node)?
                .iter()
                .any(|b| b.name == stored && b.recording && !b.inconsistent && b.count == Some(0));
            if !clean {
                return Ok(None);
            }
            points.push(PointInTime::unchanged(d.size, stored));
        }
        Ok(Some(points))
    }

    /// Freeze every disk at one instant (`freezes[i]` for disk i), or take up again the views
    /// an interrupted attempt at this epoch left, when every member's prior view names them.
    pub async fn freeze(&self, freezes: &[Freeze<'_>]) -> Result<Vec<PointInTime>, QemuError> {
        let epoch = freezes.first().map(|f| f.epoch).unwrap_or(1);
        let views: Vec<String> = (0..self.disks.len()).map(|i| self.view_id(i, epoch)).collect();
        let reuse =
            !freezes.is_empty() && freezes.iter().zip(&views).all(|(f, v)| f.prior_view == Some(v.as_str()));
        // What QEMU holds now, read once: views, nodes and bitmaps. Abandoning leftovers below
        // only merges bitmaps into the stored ones and removes others, so whether each disk's
        // stored bitmap exists (and is usable) stays as read here.
        let exports = self.execute("query-block-exports", json!({})).await?;
        let nodes = self.execute("query-named-block-nodes", json!({"flat": true})).await?;
        let live: Vec<bool> = (0..self.disks.len()).map(|i| self.exported(&exports, i)).collect();
        let mut stored = Vec::with_capacity(freezes.len());
        for (d, f) in self.disks.iter().zip(freezes) {
            let usable = node_bitmaps(&nodes, &d.node)?;
            stored.push(
                f.stored_point
                    .filter(|s| !s.is_empty() && usable.iter().any(|b| b.name == *s && !b.inconsistent))
                    .map(str::to_string),
            );
        }
        if reuse && live.iter().all(|l| *l) {
            tracing::info!("retrying the interrupted epoch from the frozen views QEMU still holds");
        } else {
            // What an attempt nobody will resume left (a view, or a freeze that failed half
            // way): give its changes back first.
            for (i, l) in live.iter().enumerate() {
                if *l || self.leftover(&nodes, i, freezes[i].stored_point)? {
                    self.abandon(i, epoch, freezes[i].stored_point).await?;
                }
            }
            self.freeze_now(&nodes, epoch, &stored).await?;
        }
        let mut points = Vec::new();
        for (i, bitmap) in stored.into_iter().enumerate() {
            let d = &self.disks[i];
            // The old bitmap went out with the view if the node had it.
            let uri = self.uri(&d.bitmap(epoch));
            let reader = NbdSource::connect(&uri, None).await?;
            points.push(PointInTime {
                source: Arc::new(Source::Nbd(Arc::new(reader))),
                change_point: Some(d.bitmap(epoch)),
                hold: Hold::Qemu(QemuView { disk: i, bitmap, uri }),
                view: views[i].clone(),
            });
        }
        Ok(points)
    }

    fn view_id(&self, i: usize, epoch: u64) -> String {
        format!("qemu:{}/{}@{}", self.qmp_path.display(), self.disks[i].node, self.disks[i].bitmap(epoch))
    }

    /// Freeze every disk now: `stored[i]` is disk i's stored bitmap if QEMU has it (usable),
    /// `nodes` what `query-named-block-nodes` said before any leftover was abandoned.
    async fn freeze_now(
        &self,
        nodes: &Value,
        epoch: u64,
        stored: &[Option<String>],
    ) -> Result<(), QemuError> {
        let mut actions = Vec::new();
        let mut exports = Vec::new();
        for (d, old) in self.disks.iter().zip(stored) {
            self.remove_inconsistent(nodes, d).await?;
            let overlay = self.dir.join(format!("{}.qcow2", d.fleece()));
            let _ = std::fs::remove_file(&overlay);
            let out = tokio::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&overlay)
                .arg(d.size.to_string())
                .output()
                .await
                .map_err(|e| QemuError::Other(format!("qemu-img create: {e} (install qemu-utils)")))?;
            if !out.status.success() {
                return Err(QemuError::Other(format!(
                    "qemu-img create: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            self.execute(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": d.fleece(),
                       "file": {"driver": "file", "filename": overlay.display().to_string()}, "backing": d.node}),
            )
            .await?;
            // A bitmap of this epoch left by a failed attempt was merged back and removed by
            // `abandon` (see `leftover`), so the name is free.
            let new = d.bitmap(epoch);
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {"node": d.node, "name": new, "persistent": true}}));
            if let Some(old) = old {
                actions.push(
                    json!({"type": "block-dirty-bitmap-disable", "data": {"node": d.node, "name": old}}),
                );
            }
            actions.push(json!({"type": "blockdev-backup",
                "data": {"job-id": d.fleece(), "device": d.node, "target": d.fleece(), "sync": "none"}}));
            exports.push((d.export_id(), d.fleece(), new, old.clone()));
        }
        // The instant every disk is frozen at: one transaction.
        self.execute("transaction", json!({"actions": actions})).await?;
        for (id, node, name, old) in exports {
            let bitmaps: Vec<String> = old.into_iter().collect();
            self.execute(
                "block-export-add",
                json!({"type": "nbd", "id": id, "node-name": node, "name": name, "writable": false, "bitmaps": bitmaps}),
            )
            .await?;
        }
        Ok(())
    }

    /// Whether disk `i` (with no exported view) carries what a failed freeze left: its fleecing
    /// node, or a bitmap of ours besides the stored one (the transaction ran, the export did
    /// not). Such a bitmap holds writes since that freeze, so it must be merged back, not dropped.
    fn leftover(&self, nodes: &Value, i: usize, stored: Option<&str>) -> Result<bool, QemuError> {
        let d = &self.disks[i];
        let ours = format!("bs-{}-", d.tag);
        Ok(has_node(nodes, &d.fleece())
            || node_bitmaps(nodes, &d.node)?
                .iter()
                .any(|b| !b.inconsistent && b.name.starts_with(&ours) && Some(b.name.as_str()) != stored))
    }

    /// Tear down disk `i`'s frozen view: export, job, overlay node and file.
    async fn release(&self, i: usize) -> Result<(), QemuError> {
        let d = &self.disks[i];
        let _ = self.execute("block-export-del", json!({"id": d.export_id()})).await;
        let _ = self.execute("block-job-cancel", json!({"device": d.fleece()})).await;
        let nodes = self.execute("query-named-block-nodes", json!({"flat": true})).await?;
        if !has_node(&nodes, &d.fleece()) {
            // A freeze that failed before its node was added.
            let _ = std::fs::remove_file(self.dir.join(format!("{}.qcow2", d.fleece())));
            return Ok(());
        }
        // The node is released once the export and the job are gone.
        let mut last = None;
        for _ in 0..200 {
            match self.execute("blockdev-del", json!({"node-name": d.fleece()})).await {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        if let Some(e) = last {
            return Err(e);
        }
        let _ = std::fs::remove_file(self.dir.join(format!("{}.qcow2", d.fleece())));
        Ok(())
    }

    /// Give up a frozen view no retry will read: its new bitmap's changes go back into the old
    /// one, which records again, so no change since the last commit is lost.
    async fn abandon(&self, i: usize, epoch: u64, stored: Option<&str>) -> Result<(), QemuError> {
        self.release(i).await?;
        let d = &self.disks[i];
        let have = self.bitmaps(&d.node).await?;
        for (name, _) in have.iter().filter(|(n, _)| n.starts_with(&format!("bs-{}-", d.tag))) {
            if Some(name.as_str()) == stored {
                continue;
            }
            if let Some(old) = stored.filter(|s| have.iter().any(|(n, _)| n == s)) {
                self.execute(
                    "block-dirty-bitmap-merge",
                    json!({"node": d.node, "target": old, "bitmaps": [name]}),
                )
                .await?;
            }
            self.execute("block-dirty-bitmap-remove", json!({"node": d.node, "name": name})).await?;
        }
        if let Some(old) = stored.filter(|s| have.iter().any(|(n, r)| n == s && !r)) {
            self.execute("block-dirty-bitmap-enable", json!({"node": d.node, "name": old})).await?;
        }
        tracing::info!(node = %d.node, epoch, "abandoned a frozen view left by an earlier attempt");
        Ok(())
    }

    /// End of a cycle: after the group commit, drop the views and the consumed bitmaps; after a
    /// failure keep them for the retry.
    pub async fn finish(&self, points: Vec<PointInTime>, committed: bool) -> Result<(), QemuError> {
        for p in points {
            let PointInTime { source, hold, .. } = p;
            if let Source::Nbd(n) = source.as_ref() {
                let _ = n.disconnect().await;
            }
            let Hold::Qemu(view) = hold else { continue };
            if !committed {
                continue;
            }
            self.release(view.disk).await?;
            if let Some(old) = view.bitmap {
                self.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": self.disks[view.disk].node, "name": old}),
                )
                .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_qemu() {
        let d = QemuDisk { node: "disk0".into(), tag: tag("rbd:rbd/vm42-disk-0"), size: 1 };
        // Node names: at most 31 characters.
        assert!(d.fleece().len() <= 31 && d.export_id().len() <= 31);
        assert_ne!(tag("file:a"), tag("file:b"));
        assert_eq!(d.bitmap(7), format!("bs-{}-7", d.tag));
    }
}
