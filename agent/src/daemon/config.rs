//! The daemon's configuration (`blockship-agent run --config agent.toml`): `[agent]` holds the
//! connection, TLS, transfer and source settings with the same keys as `sync --config` (flags
//! override them), `[daemon]` the scheduler's (control socket, default interval, parallel disks,
//! shutdown grace), `[bandwidth]` the limit and its schedule windows, and each `[[group]]` one
//! set of disks replicated at one point in time. Everything is checked before the daemon starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::changes::Changes;
use crate::config::{parse_bytes, AgentSettings, Resolved};
use crate::pace::{parse_days, parse_time, Schedule, Window};

/// Shortest interval a group may have.
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Interval of a group that names none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonFile {
    #[serde(default)]
    pub agent: AgentSettings,
    #[serde(default)]
    pub daemon: DaemonSection,
    #[serde(default)]
    pub bandwidth: BandwidthSection,
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// Unix socket of the local control service (mode 0600).
    pub control_socket: Option<PathBuf>,
    /// Default interval between the starts of a group's cycles (e.g. "30s").
    pub interval: Option<String>,
    /// Disks replicated at the same time, over all groups.
    pub max_parallel_disks: Option<usize>,
    /// How long SIGTERM waits for running cycles before abandoning them (default 30s).
    pub shutdown_grace: Option<String>,
    /// Longest wait between retries of a failing group (default 5m).
    pub max_backoff: Option<String>,
    /// Serve Prometheus metrics at this address (GET /metrics), e.g. "127.0.0.1:9101".
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandwidthSection {
    /// Limit outside every window ("unlimited" or e.g. "1GiB").
    pub default: Option<String>,
    #[serde(default, rename = "window")]
    pub windows: Vec<WindowSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSection {
    /// e.g. "mon-fri", "sat,sun", "daily".
    pub days: String,
    /// Local time "HH:MM".
    pub from: String,
    pub to: String,
    pub limit: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    pub name: String,
    /// file, rbd, vmware or qemu.
    pub kind: String,
    pub interval: Option<String>,
    /// How changes are found (default: auto).
    pub changes: Option<String>,
    #[serde(default)]
    pub paused: bool,
    /// vmware: the VM (BIOS UUID or inventory path) and vCenter host[:port].
    pub vm: Option<String>,
    pub vcenter: Option<String>,
    /// vmware: the data command (default: the [agent] nbd_command).
    pub nbd_command: Option<String>,
    /// qemu: the QMP socket of the running QEMU or qemu-storage-daemon.
    pub qmp: Option<PathBuf>,
    /// qemu: the socket of an NBD server QEMU already runs (default: the agent starts one).
    pub nbd_socket: Option<PathBuf>,
    /// rbd: the targets are the original images of a failover (this group's sources are their
    /// replicas): replicate back from the last common epoch instead of from scratch.
    #[serde(default)]
    pub failback: bool,
    pub disks: Vec<DiskSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// file and rbd groups: the source (a path, nbd:// or rbd:POOL/IMAGE).
    pub source: Option<String>,
    /// vmware: the disk's device key or label; qemu: the block node name.
    pub disk: Option<String>,
    pub target: String,
    pub disk_id: Option<String>,
}

/// The kinds of group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Rbd,
    Vmware,
    Qemu,
}

/// A checked group.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub kind: Kind,
    pub interval: Duration,
    pub changes: Changes,
    pub paused: bool,
    pub section: GroupSection,
}

/// Everything the daemon needs.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub agent: Resolved,
    pub control_socket: PathBuf,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub max_parallel_disks: usize,
    pub shutdown_grace: Duration,
    pub max_backoff: Duration,
    pub bandwidth: Schedule,
    pub groups: Vec<Group>,
}

fn duration(what: &str, v: &str) -> Result<Duration> {
    humantime::parse_duration(v).with_context(|| format!("{what} {v:?}"))
}

fn limit(what: &str, v: &str) -> Result<Option<u64>> {
    if v.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let b = parse_bytes(v).with_context(|| format!("{what} {v:?} (a rate such as 200MiB, or unlimited)"))?;
    Ok(Some(b).filter(|b| *b > 0))
}

impl DaemonFile {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    /// Check everything; `flags` override `[agent]`, `control_socket` the daemon's socket.
    pub fn resolve(self, flags: AgentSettings, control_socket: Option<PathBuf>) -> Result<Daemon> {
        let agent = flags.over(self.agent).resolve()?;
        let d = self.daemon;
        let interval = match &d.interval {
            Some(v) => duration("[daemon] interval", v)?,
            None => DEFAULT_INTERVAL,
        };
        let control_socket =
            control_socket.or(d.control_socket).unwrap_or_else(|| PathBuf::from("/run/blockship/agent.sock"));
        let max_parallel_disks = d.max_parallel_disks.unwrap_or(8);
        if max_parallel_disks == 0 {
            bail!("[daemon] max_parallel_disks must be at least 1");
        }
        let shutdown_grace = match &d.shutdown_grace {
            Some(v) => duration("[daemon] shutdown_grace", v)?,
            None => Duration::from_secs(30),
        };
        let max_backoff = match &d.max_backoff {
            Some(v) => duration("[daemon] max_backoff", v)?,
            None => Duration::from_secs(300),
        };
        let mut bandwidth = Schedule::constant(match &self.bandwidth.default {
            Some(v) => limit("[bandwidth] default", v)?,
            None => agent.bwlimit,
        });
        for (i, w) in self.bandwidth.windows.iter().enumerate() {
            let what = format!("[[bandwidth.window]] {}", i + 1);
            bandwidth.windows.push(Window {
                days: parse_days(&w.days).map_err(|e| anyhow::anyhow!("{what}: {e}"))?,
                from: parse_time(&w.from).map_err(|e| anyhow::anyhow!("{what}: {e}"))?,
                to: parse_time(&w.to).map_err(|e| anyhow::anyhow!("{what}: {e}"))?,
                limit: limit(&format!("{what} limit"), &w.limit)?,
            });
        }
        if self.groups.is_empty() {
            bail!("no [[group]] in the config: the daemon would have nothing to replicate");
        }
        let mut groups = Vec::new();
        let mut targets = std::collections::HashSet::new();
        for g in self.groups {
            let what = format!("group {:?}", g.name);
            crate::daemon::check_group_name(&g.name).map_err(|e| anyhow::anyhow!("{e}"))?;
            if groups.iter().any(|x: &Group| x.name == g.name) {
                bail!("{what} is defined twice");
            }
            let kind = match g.kind.as_str() {
                "file" => Kind::File,
                "rbd" => Kind::Rbd,
                "vmware" => Kind::Vmware,
                "qemu" => Kind::Qemu,
                other => bail!("{what}: kind {other:?}: use file, rbd, vmware or qemu"),
            };
            let interval = match &g.interval {
                Some(v) => duration(&format!("{what} interval"), v)?,
                None => interval,
            };
            if interval < MIN_INTERVAL {
                bail!("{what}: interval {interval:?} is below the minimum of {MIN_INTERVAL:?}");
            }
            let changes: Changes = match &g.changes {
                Some(c) => c.parse().map_err(|e: String| anyhow::anyhow!("{what}: {e}"))?,
                None => Changes::Auto,
            };
            if matches!(changes, Changes::CbtFile(_)) {
                bail!("{what}: a change list file describes one epoch; a daemon finds changes itself");
            }
            if g.disks.is_empty() {
                bail!("{what} has no disks");
            }
            for disk in &g.disks {
                if !targets.insert(disk.target.clone()) {
                    bail!("{what}: target {} is named twice (a target belongs to one group)", disk.target);
                }
                match kind {
                    Kind::File | Kind::Rbd if disk.source.is_none() => {
                        bail!("{what}: every disk of a {} group needs a source", g.kind)
                    }
                    Kind::Vmware | Kind::Qemu if disk.disk.is_none() => bail!(
                        "{what}: every disk of a {} group names its disk (the VM's disk key or label, or the QEMU node)",
                        g.kind
                    ),
                    _ => {}
                }
                if kind == Kind::Rbd && !disk.source.as_deref().is_some_and(|s| s.starts_with("rbd:")) {
                    bail!("{what}: an rbd group's sources are rbd:POOL/IMAGE");
                }
            }
            match kind {
                Kind::Vmware if g.vm.is_none() || g.vcenter.is_none() => {
                    bail!("{what}: a vmware group needs vm and vcenter")
                }
                // Credentials, trust and the data command are checked now, not at the first cycle.
                Kind::Vmware => {
                    let (host, vm) =
                        (g.vcenter.as_deref().unwrap_or_default(), g.vm.clone().unwrap_or_default());
                    agent
                        .vmware_options(host, vm, Vec::new(), g.nbd_command.clone())
                        .with_context(|| what.clone())?;
                }
                Kind::Qemu if g.qmp.is_none() => bail!("{what}: a qemu group needs qmp (the QMP socket)"),
                _ => {}
            }
            if g.failback && (kind != Kind::Rbd || !g.disks.iter().all(|d| d.target.starts_with("rbd:"))) {
                bail!("{what}: failback replicates RBD replicas back to their original RBD images (kind = \"rbd\", rbd: targets)");
            }
            groups.push(Group {
                name: g.name.clone(),
                kind,
                interval,
                changes,
                paused: g.paused,
                section: g,
            });
        }
        Ok(Daemon {
            agent,
            control_socket,
            metrics_listen: d.metrics_listen,
            max_parallel_disks,
            shutdown_grace,
            max_backoff,
            bandwidth,
            groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[agent]
sink = "sink:7443"
pki = "/pki"
name = "esx01"

[daemon]
control_socket = "/tmp/a.sock"
interval = "10s"
max_parallel_disks = 4

[bandwidth]
default = "unlimited"
[[bandwidth.window]]
days = "mon-fri"
from = "08:00"
to = "20:00"
limit = "200MiB"

[[group]]
name = "vm1"
kind = "file"
disks = [{ source = "/img/a", target = "file:vm1/a" }, { source = "/img/b", target = "file:vm1/b" }]

[[group]]
name = "dr"
kind = "rbd"
interval = "5s"
disks = [{ source = "rbd:rbd/x", target = "rbd:dr/x" }]
"#;

    #[test]
    fn a_config_resolves_with_defaults_and_overrides() {
        let f: DaemonFile = toml::from_str(BASE).unwrap();
        let d = f.resolve(AgentSettings::default(), None).unwrap();
        assert_eq!(d.groups.len(), 2);
        assert_eq!(d.groups[0].interval, Duration::from_secs(10));
        assert_eq!(d.groups[1].interval, Duration::from_secs(5));
        assert_eq!(d.max_parallel_disks, 4);
        assert_eq!(d.bandwidth.windows[0].limit, Some(200 << 20));
        assert_eq!(d.bandwidth.default, None);
        let f: DaemonFile = toml::from_str(BASE).unwrap();
        let flags = AgentSettings { sink: Some("other:1".into()), ..Default::default() };
        let d = f.resolve(flags, Some("/tmp/b.sock".into())).unwrap();
        assert_eq!((d.agent.sink.as_str(), d.control_socket.to_str()), ("other:1", Some("/tmp/b.sock")));
    }

    #[test]
    fn the_example_config_resolves() {
        // examples/agent.toml is what operators copy: it must stay valid.
        // The check reads the vCenter password file: give it one.
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("vcenter.password");
        std::fs::write(&password, "secret\n").unwrap();
        let text = include_str!("../../../examples/agent.toml")
            .replace("/etc/blockship/vcenter.password", password.to_str().unwrap());
        let f: DaemonFile = toml::from_str(&text).unwrap();
        let d = f.resolve(AgentSettings::default(), None).unwrap();
        let kinds: Vec<Kind> = d.groups.iter().map(|g| g.kind).collect();
        assert_eq!(kinds, [Kind::Qemu, Kind::Vmware, Kind::Rbd, Kind::Rbd, Kind::File]);
        assert_eq!(d.bandwidth.windows[0].limit, Some(200 << 20));
        assert!(d.groups[3].section.failback && d.groups[3].paused);
        assert!(d.groups[4].paused);
    }

    #[test]
    fn bad_configs_are_explained() {
        let bad = |edit: &dyn Fn(String) -> String, expect: &str| {
            let f: Result<DaemonFile, _> = toml::from_str(&edit(BASE.to_string()));
            let msg = match f {
                Err(e) => e.to_string(),
                Ok(f) => f.resolve(AgentSettings::default(), None).unwrap_err().to_string(),
            };
            assert!(msg.contains(expect), "{expect:?} not in {msg:?}");
        };
        bad(&|s| s.replace("interval = \"5s\"", "interval = \"1s\""), "below the minimum");
        bad(&|s| s.replace("kind = \"rbd\"", "kind = \"hyperv\""), "use file, rbd, vmware or qemu");
        bad(
            &|s| s.replace("kind = \"file\"", "kind = \"file\"\nfailback = true"),
            "failback replicates RBD replicas",
        );
        bad(&|s| s.replace("file:vm1/b", "file:vm1/a"), "named twice");
        bad(&|s| s.replace("max_parallel_disks = 4", "max_paralel_disks = 4"), "unknown field");
        bad(&|s| s.replace("\"mon-fri\"", "\"workdays\""), "bad day");
        bad(&|s| s.replace("name = \"dr\"", "name = \"vm1\""), "defined twice");
        bad(&|s| s.replace("rbd:rbd/x", "/dev/sdb"), "rbd:POOL/IMAGE");
    }
}
