//! Agent settings shared by `sync` and `verify`: connection, TLS and transfer knobs. A TOML file
//! (`--config`) uses the flag names with underscores; flags override the file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use blockship_proto::codec::Compression;
use blockship_transport::TlsFiles;
use serde::Deserialize;

use crate::engine::Transfer;
use crate::link::LinkConfig;
use crate::pace::{Pacer, Schedule};
use crate::source::rbd::CephClient;
use crate::source::vmware::VmwareOptions;
use crate::source::SourceOptions;
use crate::vsphere::Trust;

#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Sink address, HOST:PORT.
    #[arg(long)]
    pub sink: Option<String>,
    /// PKI directory (ca.pem, agents/NAME.pem, agents/NAME.key); needs --name.
    #[arg(long)]
    pub pki: Option<PathBuf>,
    /// Agent name in the PKI directory.
    #[arg(long)]
    pub name: Option<String>,
    /// CA certificate that signed the sink certificate (instead of --pki/--name).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Agent certificate chain (PEM).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Agent private key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Name the sink certificate must carry (default: the HOST of --sink).
    #[arg(long)]
    pub server_name: Option<String>,
    /// quic (UDP, default) or grpc (TCP, for networks that block or police UDP); the sink
    /// serves both on the same address.
    #[arg(long)]
    pub transport: Option<String>,
    /// Chunk size of a new target (power of two, 64KiB..16MiB; default 1MiB).
    #[arg(long)]
    pub chunk_size: Option<String>,
    /// Parallel data streams (default 4; over grpc at most the sink's limit, 8).
    #[arg(long)]
    pub streams: Option<usize>,
    /// Connections to spread the data streams over: auto (one per two cores, at most 8; over grpc at least 2) or 1..=16. One connection moves data on about one core per side; more need a sink that
    /// offers joined connections (else one is used).
    #[arg(long)]
    pub connections: Option<crate::link::Connections>,
    /// auto (zstd where it saves >= 1/8), zstd, or none (default auto).
    #[arg(long)]
    pub compression: Option<String>,
    /// zstd level (default 1).
    #[arg(long)]
    pub zstd_level: Option<i32>,
    /// Limit payload bandwidth, bytes per second (e.g. 100MiB).
    #[arg(long)]
    pub bwlimit: Option<String>,
    /// Chunks read and encoded concurrently (default: 2 x CPUs + 2).
    #[arg(long)]
    pub depth: Option<usize>,
    /// Retry an epoch the sink refused because a chunk failed its BLAKE3 check (data damaged
    /// between hashing and sending) up to N times, resuming from what is durable (default 3).
    #[arg(long, value_name = "N")]
    pub checksum_retries: Option<u32>,
    /// Give up on a silent sink after this long (default 30s).
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// QUIC congestion controller: auto (default: cubic on paths under 5 ms of RTT, bbr on
    /// longer ones, where it holds up with random loss), bbr, cubic, newreno.
    #[arg(long)]
    pub congestion: Option<String>,
    /// QUIC receive moderation: after a read that empties the socket while data arrives at a
    /// moderate rate (8-200 MB/s), wait this long before the next (default 1ms; 0 turns it off).
    #[arg(long, value_name = "D")]
    pub recv_hold: Option<String>,
    /// Read files with pread even where io_uring is available.
    #[arg(long)]
    #[serde(default)]
    pub no_io_uring: bool,
    /// Ceph configuration for rbd: sources (default: $CEPH_CONF, then /etc/ceph/ceph.conf).
    // No clap `env`: librados reads $CEPH_CONF itself, so a config file's value beats the
    // environment and a flag beats both.
    #[arg(long)]
    pub ceph_conf: Option<PathBuf>,
    /// Ceph client id for rbd: sources, without "client." (default admin).
    #[arg(long)]
    pub ceph_id: Option<String>,
    /// Ceph keyring for rbd: sources.
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// vSphere user for vmware:// sources.
    #[arg(long)]
    pub vcenter_user: Option<String>,
    /// File holding the vSphere password (or set BLOCKSHIP_VCENTER_PASSWORD).
    #[arg(long)]
    pub vcenter_password_file: Option<PathBuf>,
    /// CA certificate that signed the vCenter certificate (default: the web PKI roots).
    #[arg(long)]
    pub vcenter_ca: Option<PathBuf>,
    /// Do not verify the vCenter certificate (labs only).
    #[arg(long)]
    #[serde(default)]
    pub vcenter_insecure: bool,
    /// VM to replicate: BIOS UUID or inventory path (DC/vm/FOLDER/NAME).
    #[arg(long)]
    pub vm: Option<String>,
    /// VM disk: device key (2000) or label ("Hard disk 1"); default: the VM's only disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// Shell command serving the snapshot disk over NBD on $BLOCKSHIP_NBD_SOCKET (see README).
    #[arg(long)]
    pub nbd_command: Option<String>,
    /// Quiesce guest file systems when snapshotting the VM.
    #[arg(long)]
    #[serde(default)]
    pub quiesce: bool,
}

#[derive(Debug, Clone)]
pub struct Resolved {
    pub sink: String,
    pub tls: TlsFiles,
    pub server_name: Option<String>,
    pub transport: blockship_transport::Transport,
    pub chunk_size: u32,
    pub streams: usize,
    /// Connections per link.
    pub connections: crate::link::Connections,
    pub compression: Compression,
    pub bwlimit: Option<u64>,
    pub depth: usize,
    /// Retries of an epoch refused for a checksum failure (`sync`).
    pub checksum_retries: u32,
    pub tuning: blockship_transport::QuicTuning,
    settings: AgentSettings,
}

/// "1MiB", "64K" (binary units), or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64> {
    parse_size::Config::new().with_binary().parse_size(s).map_err(|e| anyhow::anyhow!("{s:?}: {e}"))
}

impl AgentSettings {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    /// `self` (flags) over `file`.
    pub fn over(self, file: AgentSettings) -> AgentSettings {
        AgentSettings {
            sink: self.sink.or(file.sink),
            pki: self.pki.or(file.pki),
            name: self.name.or(file.name),
            ca: self.ca.or(file.ca),
            cert: self.cert.or(file.cert),
            key: self.key.or(file.key),
            server_name: self.server_name.or(file.server_name),
            transport: self.transport.or(file.transport),
            chunk_size: self.chunk_size.or(file.chunk_size),
            streams: self.streams.or(file.streams),
            connections: self.connections.or(file.connections),
            compression: self.compression.or(file.compression),
            zstd_level: self.zstd_level.or(file.zstd_level),
            bwlimit: self.bwlimit.or(file.bwlimit),
            depth: self.depth.or(file.depth),
            checksum_retries: self.checksum_retries.or(file.checksum_retries),
            idle_timeout: self.idle_timeout.or(file.idle_timeout),
            congestion: self.congestion.or(file.congestion),
            recv_hold: self.recv_hold.or(file.recv_hold),
            no_io_uring: self.no_io_uring || file.no_io_uring,
            ceph_conf: self.ceph_conf.or(file.ceph_conf),
            ceph_id: self.ceph_id.or(file.ceph_id),
            keyring: self.keyring.or(file.keyring),
            vcenter_user: self.vcenter_user.or(file.vcenter_user),
            vcenter_password_file: self.vcenter_password_file.or(file.vcenter_password_file),
            vcenter_ca: self.vcenter_ca.or(file.vcenter_ca),
            vcenter_insecure: self.vcenter_insecure || file.vcenter_insecure,
            vm: self.vm.or(file.vm),
            disk: self.disk.or(file.disk),
            nbd_command: self.nbd_command.or(file.nbd_command),
            quiesce: self.quiesce || file.quiesce,
        }
    }

    pub fn resolve(self) -> Result<Resolved> {
        let settings = self.clone();
        let sink = self.sink.context("--sink HOST:PORT is required")?;
        let tls = match (self.pki, self.name, self.ca, self.cert, self.key) {
            (Some(pki), Some(name), None, None, None) => TlsFiles::agent_in_pki(&pki, &name),
            (Some(_), None, ..) => bail!("--pki needs --name (the agent's certificate name)"),
            (None, _, Some(ca), Some(cert), Some(key)) => TlsFiles { ca, cert, key },
            (None, None, None, None, None) => {
                bail!("TLS is mandatory: give --pki DIR --name NAME, or --ca, --cert and --key")
            }
            _ => bail!("give either --pki/--name or all of --ca, --cert and --key, not a mix"),
        };
        let chunk_size = match &self.chunk_size {
            Some(s) => {
                let v = parse_bytes(s)?;
                let v = u32::try_from(v)
                    .ok()
                    .filter(|v| blockship_proto::valid_chunk_size(*v))
                    .with_context(|| {
                        format!(
                            "--chunk-size {s}: must be a power of two between {} and {} bytes",
                            blockship_proto::MIN_CHUNK_SIZE,
                            blockship_proto::MAX_CHUNK_SIZE
                        )
                    })?;
                v
            }
            None => blockship_proto::DEFAULT_CHUNK_SIZE,
        };
        let level = self.zstd_level.unwrap_or(1);
        if !(-7..=22).contains(&level) {
            bail!("--zstd-level {level}: must be between -7 and 22");
        }
        let compression = match self.compression.as_deref().unwrap_or("auto") {
            "auto" => Compression::Auto { level },
            "zstd" => Compression::Zstd { level },
            "none" => Compression::None,
            other => bail!("--compression {other:?}: use auto, zstd or none"),
        };
        let streams = self.streams.unwrap_or(4);
        if !(1..=64).contains(&streams) {
            bail!("--streams {streams}: must be between 1 and 64");
        }
        let bwlimit = match &self.bwlimit {
            Some(s) => Some(parse_bytes(s)?).filter(|v| *v > 0),
            None => None,
        };
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let depth = self.depth.unwrap_or(2 * cpus + 2).clamp(1, 256);
        let mut tuning = blockship_transport::QuicTuning::default();
        if let Some(t) = &self.idle_timeout {
            tuning.set_idle_timeout(t).map_err(anyhow::Error::msg)?;
        }
        if let Some(c) = &self.congestion {
            tuning.congestion = c.parse().map_err(anyhow::Error::msg)?;
        }
        if let Some(h) = &self.recv_hold {
            tuning.set_recv_hold(h).map_err(anyhow::Error::msg)?;
        }
        let transport = match &self.transport {
            Some(t) => t.parse().map_err(anyhow::Error::msg)?,
            None => blockship_transport::Transport::Quic,
        };
        Ok(Resolved {
            sink,
            tls,
            transport,
            server_name: self.server_name,
            chunk_size,
            streams,
            connections: self.connections.unwrap_or_default(),
            compression,
            bwlimit,
            depth,
            checksum_retries: self.checksum_retries.unwrap_or(3),
            tuning,
            settings,
        })
    }
}

impl Resolved {
    /// How the engine reaches the sink.
    pub fn link(&self) -> LinkConfig {
        LinkConfig {
            sink: self.sink.clone(),
            tls: self.tls.clone(),
            server_name: self.server_name.clone(),
            tuning: self.tuning.clone(),
            transport: self.transport,
            streams: self.streams,
            connections: self.connections,
            pacer: self.bwlimit.map(|b| Pacer::new(Schedule::constant(Some(b)))),
            adaptive: matches!(self.compression, Compression::Auto { .. }),
            hold: false,
        }
    }

    /// How the engine cuts and encodes data.
    pub fn transfer(&self) -> Transfer {
        Transfer { chunk_size: self.chunk_size, compression: self.compression, depth: self.depth }
    }

    /// How to reach VM `vm` on vCenter/ESXi `host` and read `disks` of it: the credentials and
    /// trust come from these settings, `nbd_command` overrides theirs.
    pub fn vmware_options(
        &self,
        host: &str,
        vm: String,
        disks: Vec<String>,
        nbd_command: Option<String>,
    ) -> Result<VmwareOptions> {
        let s = &self.settings;
        let host = host.trim_end_matches('/');
        if host.is_empty() {
            bail!("--source vmware://HOST[:PORT]: name the vCenter or ESXi host");
        }
        let user = s.vcenter_user.clone().context("a vmware:// source needs --vcenter-user")?;
        let password = match (&s.vcenter_password_file, std::env::var("BLOCKSHIP_VCENTER_PASSWORD")) {
            (Some(f), _) => std::fs::read_to_string(f)
                .with_context(|| format!("reading --vcenter-password-file {}", f.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            (None, Ok(p)) => p,
            (None, Err(_)) => {
                bail!("a vmware:// source needs --vcenter-password-file or BLOCKSHIP_VCENTER_PASSWORD")
            }
        };
        let trust = match (&s.vcenter_ca, s.vcenter_insecure) {
            (Some(_), true) => bail!("give --vcenter-ca or --vcenter-insecure, not both"),
            (Some(ca), false) => Trust::Ca(ca.clone()),
            (None, true) => Trust::Insecure,
            (None, false) => Trust::WebPki,
        };
        Ok(VmwareOptions {
            host: host.to_string(),
            user,
            password,
            trust,
            vm,
            disks,
            nbd_command: nbd_command
                .or_else(|| s.nbd_command.clone())
                .context("a vmware:// source needs --nbd-command (e.g. nbdkit ... vddk ...; see README)")?,
            quiesce: s.quiesce,
        })
    }

    /// What the source named `spec` needs: Ceph client settings for rbd:, vSphere settings for
    /// vmware://HOST (checked here, so a missing setting is reported before anything starts).
    pub fn source_options(&self, spec: &str) -> Result<SourceOptions> {
        let s = &self.settings;
        let mut opts = SourceOptions {
            ceph: CephClient { conf: s.ceph_conf.clone(), id: s.ceph_id.clone(), keyring: s.keyring.clone() },
            vmware: None,
            io_uring: !s.no_io_uring,
        };
        if let Some(host) = spec.strip_prefix("vmware://") {
            let vm = s.vm.clone().context("a vmware:// source needs --vm (BIOS UUID or inventory path)")?;
            let disks = s.disk.clone().into_iter().collect();
            opts.vmware = Some(self.vmware_options(host, vm, disks, s.nbd_command.clone())?);
        }
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let file: AgentSettings = toml::from_str(
            "sink = \"sink:7443\"\npki = \"/pki\"\nname = \"esx01\"\ncompression = \"zstd\"\nzstd_level = 3\n",
        )
        .unwrap();
        let flags = AgentSettings {
            compression: Some("none".into()),
            chunk_size: Some("4MiB".into()),
            ..Default::default()
        };
        let r = flags.over(file).resolve().unwrap();
        assert_eq!(r.sink, "sink:7443");
        assert_eq!(r.tls.key, PathBuf::from("/pki/agents/esx01.key"));
        assert_eq!(r.compression, Compression::None);
        assert_eq!(r.chunk_size, 4 << 20);
        assert_eq!(r.streams, 4);
        assert_eq!(r.tuning.recv_hold, std::time::Duration::from_millis(1));
        // Receive moderation comes from the file unless a flag says otherwise.
        let file: AgentSettings =
            toml::from_str("sink = \"s:1\"\npki = \"/p\"\nname = \"a\"\nrecv_hold = \"0\"\n").unwrap();
        assert!(file.clone().resolve().unwrap().tuning.recv_hold.is_zero());
        let flags = AgentSettings { recv_hold: Some("2ms".into()), ..Default::default() };
        assert_eq!(flags.over(file).resolve().unwrap().tuning.recv_hold, std::time::Duration::from_millis(2));
    }

    #[test]
    fn bad_values_are_explained() {
        let base = || AgentSettings {
            sink: Some("s:1".into()),
            pki: Some("/p".into()),
            name: Some("a".into()),
            ..Default::default()
        };
        let e =
            AgentSettings { chunk_size: Some("3MiB".into()), ..base() }.resolve().unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
        let e =
            AgentSettings { compression: Some("lz4".into()), ..base() }.resolve().unwrap_err().to_string();
        assert!(e.contains("auto, zstd or none"), "{e}");
        let e = AgentSettings { recv_hold: Some("1s".into()), ..base() }.resolve().unwrap_err().to_string();
        assert!(e.contains("--recv-hold") && e.contains("at most 10ms"), "{e}");
        let e = AgentSettings { name: None, ..base() }.resolve().unwrap_err().to_string();
        assert!(e.contains("--pki needs --name"), "{e}");
        assert!(toml::from_str::<AgentSettings>("sinc = \"x\"").is_err());
    }
}
