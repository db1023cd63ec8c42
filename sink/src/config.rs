//! Sink settings: a TOML file (`--config`) with the same names as the command-line flags; flags
//! given on the command line override the file. Resolution checks that everything required is
//! present and says which flag or key is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use blockship_transport::{QuicTuning, TlsFiles};

use crate::limits::Limits;
use crate::targets::rbd::CephOptions;
use crate::writer::CheckpointPolicy;

/// Settings as they appear in the TOML file and on the command line (all optional here).
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    /// Address to listen on, e.g. 0.0.0.0:7443: QUIC on UDP and gRPC on TCP (same port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Serve gRPC (agents' `--transport grpc`, the control API) on this TCP address instead.
    #[arg(long)]
    pub grpc_listen: Option<SocketAddr>,
    /// Identity (certificate CN) that may use the control API (status, rollback, test
    /// failover). Repeatable; nobody may without one.
    #[arg(long = "admin", value_name = "NAME")]
    #[serde(default)]
    pub admins: Vec<String>,
    /// Serve Prometheus metrics at this address (GET /metrics), e.g. 127.0.0.1:9102.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// PKI directory written by `blockship-sink pki init` (ca.pem, sink.pem, sink.key).
    #[arg(long)]
    pub pki: Option<PathBuf>,
    /// CA certificate that signs agent certificates (instead of --pki).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Sink certificate chain (PEM), instead of --pki.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Sink private key (PEM), instead of --pki.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Directory below which `file:` targets live.
    #[arg(long)]
    pub file_root: Option<PathBuf>,
    /// Directory for replication state and hash indexes.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// NAME=GLOB: agent NAME (certificate CN) may write targets matching GLOB. Repeatable.
    #[arg(long = "allow", value_name = "NAME=GLOB")]
    #[serde(default)]
    pub allow: Vec<String>,
    /// Make written data durable and acknowledge it at least every this many bytes (e.g. 64MiB).
    #[arg(long)]
    pub checkpoint_bytes: Option<String>,
    /// ... and at least this often (e.g. 1s, 500ms).
    #[arg(long)]
    pub checkpoint_interval: Option<String>,
    /// Drop a silent agent connection after this long (default 30s).
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// QUIC receive moderation: after a read that empties the socket while data arrives at a
    /// moderate rate (8-200 MB/s), wait this long before the next (default 1ms; 0 turns it off).
    #[arg(long, value_name = "D")]
    pub recv_hold: Option<String>,
    /// Most agent connections served at once (default 256); more are told BUSY.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most connections of one agent at once (default 16).
    #[arg(long)]
    pub max_agent_connections: Option<usize>,
    /// Most TLS handshakes in progress from one address (default 128); more are closed at once.
    #[arg(long)]
    pub max_handshakes_per_address: Option<usize>,
    /// Most TLS handshakes in progress in all (default 1024).
    #[arg(long)]
    pub max_handshakes: Option<usize>,
    /// Most disks one connection may have open (default 256).
    #[arg(long)]
    pub max_disks_per_connection: Option<usize>,
    /// Largest source disk accepted (default 64TiB).
    #[arg(long)]
    pub max_disk_size: Option<String>,
    /// Drop a connection that has not said Hello after this long (default 10s).
    #[arg(long)]
    pub hello_timeout: Option<String>,
    /// Chunk bytes held in memory at once, in all (default 64MiB; one agent gets half at most).
    #[arg(long)]
    pub max_inflight: Option<String>,
    /// ... and per connection (default 32MiB).
    #[arg(long)]
    pub max_inflight_per_connection: Option<String>,
    /// Keep no undo journal for file targets: incremental epochs write each byte once instead
    /// of saving what they overwrite, but a failed epoch can no longer be rolled back.
    #[arg(long)]
    #[serde(default)]
    pub no_file_rollback: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub ceph: CephSettings,
}

/// Ceph client settings for `rbd:` targets (Ceph's usual flags).
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
pub struct CephSettings {
    /// Ceph configuration file (default: $CEPH_CONF, then /etc/ceph/ceph.conf).
    // No clap `env`: librados reads $CEPH_CONF itself, so a config file's value beats the
    // environment and a flag beats both.
    #[arg(long)]
    pub ceph_conf: Option<PathBuf>,
    /// Ceph client id, without "client." (default admin).
    #[arg(long)]
    pub ceph_id: Option<String>,
    /// Keyring for the client (default: the one the Ceph config names).
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// Give up connecting to the cluster after this long (default 15s).
    #[arg(long)]
    pub ceph_connect_timeout: Option<String>,
    /// Fail an OSD operation after this long (default 5m; 0 waits forever).
    #[arg(long)]
    pub ceph_op_timeout: Option<String>,
    /// Per-epoch snapshots (blockship-<epoch>) kept on each RBD image (default 2).
    #[arg(long)]
    pub keep_snapshots: Option<u32>,
    /// Refuse rbd: targets (no Ceph connection is ever made).
    #[arg(long)]
    #[serde(default)]
    pub no_rbd: bool,
}

impl CephSettings {
    fn over(self, file: CephSettings) -> CephSettings {
        CephSettings {
            ceph_conf: self.ceph_conf.or(file.ceph_conf),
            ceph_id: self.ceph_id.or(file.ceph_id),
            keyring: self.keyring.or(file.keyring),
            ceph_connect_timeout: self.ceph_connect_timeout.or(file.ceph_connect_timeout),
            ceph_op_timeout: self.ceph_op_timeout.or(file.ceph_op_timeout),
            keep_snapshots: self.keep_snapshots.or(file.keep_snapshots),
            no_rbd: self.no_rbd || file.no_rbd,
        }
    }

    /// Ceph client options, or None with `--no-rbd`.
    pub fn resolve(&self) -> Result<Option<CephOptions>> {
        if self.no_rbd {
            return Ok(None);
        }
        let mut o =
            CephOptions { conf: self.ceph_conf.clone(), keyring: self.keyring.clone(), ..Default::default() };
        if let Some(id) = &self.ceph_id {
            o.id = id.strip_prefix("client.").unwrap_or(id).to_string();
        }
        if let Some(t) = &self.ceph_connect_timeout {
            o.connect_timeout =
                humantime::parse_duration(t).with_context(|| format!("--ceph-connect-timeout {t:?}"))?;
        }
        if let Some(t) = &self.ceph_op_timeout {
            o.op_timeout = if t == "0" {
                Duration::ZERO
            } else {
                humantime::parse_duration(t).with_context(|| format!("--ceph-op-timeout {t:?}"))?
            };
        }
        if let Some(k) = self.keep_snapshots {
            if k == 0 {
                bail!("--keep-snapshots must be at least 1: the last snapshot is the point in time rollback returns to");
            }
            o.keep_snapshots = k;
        }
        Ok(Some(o))
    }
}

/// Fully resolved serve settings.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub listen: SocketAddr,
    pub grpc_listen: Option<SocketAddr>,
    pub admins: Vec<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsFiles,
    pub file_root: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub allow: Vec<String>,
    pub checkpoint: CheckpointPolicy,
    pub tuning: QuicTuning,
    pub ceph: Option<CephOptions>,
    pub file_rollback: bool,
    pub limits: Limits,
}

impl ServeSettings {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    /// `self` (flags) over `file`.
    pub fn over(self, file: ServeSettings) -> ServeSettings {
        ServeSettings {
            listen: self.listen.or(file.listen),
            grpc_listen: self.grpc_listen.or(file.grpc_listen),
            admins: if self.admins.is_empty() { file.admins } else { self.admins },
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            pki: self.pki.or(file.pki),
            ca: self.ca.or(file.ca),
            cert: self.cert.or(file.cert),
            key: self.key.or(file.key),
            file_root: self.file_root.or(file.file_root),
            state_dir: self.state_dir.or(file.state_dir),
            allow: if self.allow.is_empty() { file.allow } else { self.allow },
            checkpoint_bytes: self.checkpoint_bytes.or(file.checkpoint_bytes),
            checkpoint_interval: self.checkpoint_interval.or(file.checkpoint_interval),
            idle_timeout: self.idle_timeout.or(file.idle_timeout),
            recv_hold: self.recv_hold.or(file.recv_hold),
            no_file_rollback: self.no_file_rollback || file.no_file_rollback,
            max_connections: self.max_connections.or(file.max_connections),
            max_agent_connections: self.max_agent_connections.or(file.max_agent_connections),
            max_handshakes_per_address: self.max_handshakes_per_address.or(file.max_handshakes_per_address),
            max_handshakes: self.max_handshakes.or(file.max_handshakes),
            max_disks_per_connection: self.max_disks_per_connection.or(file.max_disks_per_connection),
            max_disk_size: self.max_disk_size.or(file.max_disk_size),
            hello_timeout: self.hello_timeout.or(file.hello_timeout),
            max_inflight: self.max_inflight.or(file.max_inflight),
            max_inflight_per_connection: self
                .max_inflight_per_connection
                .or(file.max_inflight_per_connection),
            ceph: self.ceph.over(file.ceph),
        }
    }

    pub fn resolve(self) -> Result<Resolved> {
        let listen = self.listen.context("--listen is required (flag, or `listen` in the config file)")?;
        let tls = match (self.pki, self.ca, self.cert, self.key) {
            (Some(pki), None, None, None) => TlsFiles::sink_in_pki(&pki),
            (None, Some(ca), Some(cert), Some(key)) => TlsFiles { ca, cert, key },
            (None, None, None, None) => bail!("TLS is mandatory: give --pki DIR, or --ca, --cert and --key"),
            _ => bail!("give either --pki DIR or all of --ca, --cert and --key, not a mix"),
        };
        let state_dir =
            self.state_dir.context("--state-dir is required (flag, or `state_dir` in the config file)")?;
        let ceph = self.ceph.resolve()?;
        if self.file_root.is_none() && ceph.is_none() {
            bail!("no targets possible: give --file-root DIR, or allow rbd: targets (drop --no-rbd)");
        }
        if self.allow.is_empty() {
            bail!("no --allow rules: no agent could write anything (e.g. --allow esx01='file:esx01/*')");
        }
        let mut checkpoint = CheckpointPolicy::default();
        if let Some(b) = &self.checkpoint_bytes {
            checkpoint.bytes = parse_bytes(b).with_context(|| format!("--checkpoint-bytes {b:?}"))?;
        }
        if let Some(i) = &self.checkpoint_interval {
            checkpoint.interval =
                humantime::parse_duration(i).with_context(|| format!("--checkpoint-interval {i:?}"))?;
            if checkpoint.interval < Duration::from_millis(10) {
                bail!("--checkpoint-interval must be at least 10ms");
            }
        }
        // The sink's receive side: 1 MiB per data stream (a 1 MiB chunk per round trip and
        // stream), at most 16 streams per connection (see server::Windows).
        let mut tuning = QuicTuning { stream_window: 1 << 20, max_uni_streams: 16, ..QuicTuning::default() };
        if let Some(t) = &self.idle_timeout {
            tuning.set_idle_timeout(t).map_err(anyhow::Error::msg)?;
        }
        if let Some(h) = &self.recv_hold {
            tuning.set_recv_hold(h).map_err(anyhow::Error::msg)?;
        }
        let mut limits = Limits { idle_timeout: tuning.idle_timeout, ..Limits::default() };
        if let Some(n) = self.max_connections {
            limits.max_connections = n;
        }
        if let Some(n) = self.max_agent_connections {
            limits.max_agent_connections = n;
        }
        if let Some(n) = self.max_handshakes_per_address {
            limits.max_handshakes_per_address = n;
        }
        if let Some(n) = self.max_handshakes {
            limits.max_handshakes = n;
        }
        if let Some(n) = self.max_disks_per_connection {
            limits.max_disks_per_connection = n;
        }
        if let Some(v) = &self.max_disk_size {
            limits.max_disk_size = parse_bytes(v).with_context(|| format!("--max-disk-size {v:?}"))?;
        }
        if let Some(v) = &self.hello_timeout {
            limits.hello_timeout =
                humantime::parse_duration(v).with_context(|| format!("--hello-timeout {v:?}"))?;
        }
        if let Some(v) = &self.max_inflight {
            limits.max_inflight = parse_bytes(v).with_context(|| format!("--max-inflight {v:?}"))?;
        }
        if let Some(v) = &self.max_inflight_per_connection {
            limits.max_inflight_per_connection =
                parse_bytes(v).with_context(|| format!("--max-inflight-per-connection {v:?}"))?;
        }
        limits.check().map_err(anyhow::Error::msg)?;
        Ok(Resolved {
            listen,
            grpc_listen: self.grpc_listen,
            admins: self.admins,
            tls,
            file_root: self.file_root,
            state_dir,
            allow: self.allow,
            checkpoint,
            tuning,
            ceph,
            file_rollback: !self.no_file_rollback,
            metrics_listen: self.metrics_listen,
            limits,
        })
    }
}

/// "64MiB", "1G" (binary units), or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64> {
    parse_size::Config::new().with_binary().parse_size(s).map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let file: ServeSettings = toml::from_str(
            r#"
            listen = "0.0.0.0:7443"
            pki = "/etc/blockship/pki"
            file_root = "/srv/bs"
            state_dir = "/var/lib/bs"
            allow = ["esx01=file:esx01/*"]
            checkpoint_bytes = "32MiB"
            "#,
        )
        .unwrap();
        let flags = ServeSettings { listen: Some("127.0.0.1:9000".parse().unwrap()), ..Default::default() };
        let r = flags.over(file).resolve().unwrap();
        assert_eq!(r.listen.port(), 9000);
        assert_eq!(r.tls.cert, PathBuf::from("/etc/blockship/pki/sink.pem"));
        assert_eq!(r.allow, vec!["esx01=file:esx01/*".to_string()]);
        assert_eq!(r.checkpoint.bytes, 32 << 20);
        assert_eq!(r.tuning.recv_hold, std::time::Duration::from_millis(1));
        let file: ServeSettings =
            toml::from_str("listen = \"127.0.0.1:1\"\npki = \"/p\"\nstate_dir = \"/s\"\nallow = [\"a=file:*\"]\nrecv_hold = \"3ms\"")
                .unwrap();
        assert_eq!(file.clone().resolve().unwrap().tuning.recv_hold, std::time::Duration::from_millis(3));
        let flags = ServeSettings { recv_hold: Some("0".into()), ..Default::default() };
        assert!(flags.over(file).resolve().unwrap().tuning.recv_hold.is_zero());
    }

    #[test]
    fn unknown_keys_and_missing_settings_are_errors() {
        assert!(toml::from_str::<ServeSettings>("listne = \"x\"").is_err());
        assert!(toml::from_str::<ServeSettings>("ceph_cnof = \"x\"").is_err());
        let c: ServeSettings = toml::from_str("ceph_id = \"blockship\"\nkeep_snapshots = 3").unwrap();
        assert_eq!(c.ceph.resolve().unwrap().unwrap().keep_snapshots, 3);
        let err = ServeSettings::default().resolve().unwrap_err().to_string();
        assert!(err.contains("--listen is required"), "{err}");
        let s = ServeSettings {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            pki: Some("/p".into()),
            ca: Some("/ca".into()),
            ..Default::default()
        };
        assert!(s.resolve().unwrap_err().to_string().contains("not a mix"));
    }

    #[test]
    fn the_example_config_parses() {
        // examples/sink.toml is what operators copy: it must stay valid.
        let c: ServeSettings = toml::from_str(include_str!("../../examples/sink.toml")).unwrap();
        assert_eq!(c.allow.len(), 3);
        assert_eq!(c.ceph.keep_snapshots, Some(2));
    }
}
