//! QUIC endpoints tuned for bulk block transfer. quinn's defaults target ~12.5 MB/s per stream at
//! 100 ms RTT; replication needs windows sized for the bandwidth-delay product, socket buffers
//! big enough not to drop bursts (quinn never sets them), and datagrams larger than 1452 bytes
//! where the path allows, because per-packet cost is what bounds QUIC throughput.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, MtuDiscoveryConfig, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

use crate::congestion::Congestion;
use crate::moderation::Moderated;
use crate::tls::TlsError;
use crate::TransportError;

/// Transport knobs; the defaults suit 10–25 GbE and WAN links up to ~100 ms RTT.
#[derive(Debug, Clone)]
pub struct QuicTuning {
    /// Receive window per stream (bytes).
    pub stream_window: u64,
    /// Receive window per connection (bytes); bounds what a peer can make us buffer.
    pub connection_window: u64,
    /// Unacknowledged bytes we keep per connection.
    pub send_window: u64,
    /// Upper bound for path MTU discovery (UDP payload bytes). quinn 0.11 loses packets silently
    /// when GSO batches exceed 64 KiB, so with GSO on this is capped at 6500 (10 segments).
    pub mtu_upper_bound: u16,
    /// Use UDP generic segmentation offload (worth ~3.5x in packet rate).
    pub gso: bool,
    /// SO_RCVBUF / SO_SNDBUF for the UDP socket.
    pub socket_buffer: usize,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Concurrent unidirectional data streams a peer may open.
    pub max_uni_streams: u32,
    pub congestion: Congestion,
    /// Ack-eliciting packets the peer may receive before it must acknowledge (QUIC
    /// ACK-frequency extension); 1 is QUIC's default of every second packet.
    pub ack_threshold: u32,
    /// ... and within this long of a packet (with `ack_threshold` > 1).
    pub ack_delay: Duration,
    /// Receive moderation (`moderation`): after a read that empties the socket while data
    /// arrives at a moderate rate, wait this long before the next; zero reads at once.
    pub recv_hold: Duration,
}

/// Largest UDP payload quinn may put in one GSO batch of 10 segments without exceeding 65507.
pub const GSO_SAFE_MTU: u16 = 6500;

impl Default for QuicTuning {
    fn default() -> Self {
        QuicTuning {
            stream_window: 16 << 20,
            connection_window: 32 << 20,
            send_window: 32 << 20,
            mtu_upper_bound: GSO_SAFE_MTU,
            gso: true,
            socket_buffer: 16 << 20,
            idle_timeout: Duration::from_secs(30),
            // Keep-alives also find a restarted sink (its stateless reset answers them) within
            // a couple of seconds; one small packet every 2 s per connection costs nothing.
            keep_alive: Duration::from_secs(2),
            max_uni_streams: 64,
            congestion: Congestion::Auto,
            // Measured on the bench's 500 Mbit/s link (1500-byte MTU, 40k packets/s): 32 cut
            // CPU per GiB by ~20 % on the agent and ~30 % on the sink, with the same
            // throughput there, through 20 ms of RTT with 0.1 % loss, and on loopback.
            ack_threshold: 32,
            // ... or within 2 ms of a packet, not QUIC's 25: a flight shorter than the threshold
            // (a new connection's first windows, the tail of a burst) would otherwise wait 25 ms
            // for its ACK. At 500 Mbit/s the threshold fills in 0.7 ms, so no ACKs are added there.
            ack_delay: Duration::from_millis(2),
            // Measured on the bench's 500 Mbit/s link (hand runs, 512 MiB): ~19 % less CPU per
            // GiB on the sink and ~13 % on the agent (the sink sends fewer ACK datagrams), the
            // same throughput; loopback throughput unchanged (outside the hold's rate band).
            recv_hold: Duration::from_millis(1),
        }
    }
}

impl QuicTuning {
    /// Set the idle timeout from text such as "30s", with keep-alives at a third of it.
    pub fn set_idle_timeout(&mut self, text: &str) -> Result<(), String> {
        let t = humantime::parse_duration(text).map_err(|e| format!("--idle-timeout {text:?}: {e}"))?;
        if t < Duration::from_secs(1) {
            return Err("--idle-timeout must be at least 1s".into());
        }
        self.idle_timeout = t;
        self.keep_alive = self.keep_alive.min(t / 3);
        Ok(())
    }

    /// `--recv-hold D`: receive moderation's hold (`moderation`); `0` turns it off. Above 10 ms
    /// a held read would delay acknowledgements by a good part of a LAN round trip.
    pub fn set_recv_hold(&mut self, text: &str) -> Result<(), String> {
        // humantime reads a bare "0" as zero, so no unit is needed to turn moderation off.
        let t = humantime::parse_duration(text)
            .map_err(|e| format!("--recv-hold {text:?}: {e} (e.g. 1ms; 0 turns it off)"))?;
        if t > Duration::from_millis(10) {
            return Err(format!("--recv-hold {text:?}: at most 10ms"));
        }
        self.recv_hold = t;
        Ok(())
    }

    fn mtu(&self) -> u16 {
        if self.gso {
            self.mtu_upper_bound.min(GSO_SAFE_MTU)
        } else {
            self.mtu_upper_bound
        }
    }

    fn transport(&self) -> Result<Arc<TransportConfig>, TransportError> {
        let var = |v: u64| VarInt::from_u64(v).map_err(|e| TlsError::Config(format!("QUIC window {v}: {e}")));
        let mut t = TransportConfig::default();
        t.stream_receive_window(var(self.stream_window)?)
            .receive_window(var(self.connection_window)?)
            .send_window(self.send_window)
            .max_concurrent_uni_streams(self.max_uni_streams.into())
            .max_concurrent_bidi_streams(8u32.into())
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(
                self.idle_timeout.try_into().map_err(|e| TlsError::Config(format!("idle timeout: {e}")))?,
            ))
            .enable_segmentation_offload(self.gso);
        t.congestion_controller_factory(self.congestion.factory());
        // Ask the peer (QUIC ACK-frequency extension; both ends are quinn) to acknowledge
        // every `ack_threshold` packets instead of every second one: on a 1500-byte-MTU link
        // each ACK is a datagram the receiver sends and the sender wakes up for.
        if self.ack_threshold > 1 {
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(VarInt::from_u32(self.ack_threshold));
            ack.max_ack_delay(Some(self.ack_delay));
            t.ack_frequency_config(Some(ack));
        }
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.mtu());
        t.mtu_discovery_config(Some(mtu));
        Ok(Arc::new(t))
    }

    /// Endpoint settings; `accept` is the largest UDP payload taken from peers.
    fn endpoint_config(&self, accept: u16) -> Result<EndpointConfig, TransportError> {
        let mut cfg = EndpointConfig::default();
        cfg.max_udp_payload_size(accept.max(self.mtu()).max(1472))
            .map_err(|e| TlsError::Config(format!("max UDP payload: {e}")))?;
        Ok(cfg)
    }
}

/// A UDP socket with large buffers. As root, SO_*BUFFORCE lifts the sysctl cap (rmem_max).
/// Public for the bench's impairment relay, which must not drop more than it is asked to.
pub fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Listening on [::] accepts IPv4 too.
        let _ = socket.set_only_v6(false);
    }
    set_buffer(&socket, libc::SO_RCVBUFFORCE, buffer, |s| s.set_recv_buffer_size(buffer));
    set_buffer(&socket, libc::SO_SNDBUFFORCE, buffer, |s| s.set_send_buffer_size(buffer));
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn set_buffer(
    socket: &Socket,
    force: libc::c_int,
    size: usize,
    fallback: impl Fn(&Socket) -> std::io::Result<()>,
) {
    use std::os::fd::AsRawFd;
    let val = size.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt with a valid fd, a pointer to a c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            force,
            &val as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        if let Err(e) = fallback(socket) {
            tracing::warn!("cannot set UDP socket buffer to {size} bytes: {e}; expect drops at high rates");
        }
    }
}

/// The key of QUIC stateless resets: an HMAC (keyed BLAKE3) of a connection id. A server that
/// restarts with the same key answers packets of its predecessor's connections with a reset the
/// peer accepts, so agents learn at once that their connection is gone instead of after the
/// idle timeout.
struct ResetKey([u8; 32]);

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = blake3::keyed_hash(&self.0, data);
        let n = signature_out.len().min(32);
        signature_out[..n].copy_from_slice(&mac.as_bytes()[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        // blake3::Hash compares in constant time.
        match <[u8; 32]>::try_from(signature) {
            Ok(sig) if blake3::keyed_hash(&self.0, data) == blake3::Hash::from_bytes(sig) => Ok(()),
            _ => Err(quinn::crypto::CryptoError),
        }
    }
}

/// A server endpoint on `listen` presenting `tls`; `reset_seed` (secret, stable across restarts,
/// e.g. the server's private key) derives the stateless reset key.
pub fn server_endpoint(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    tuning: &QuicTuning,
    reset_seed: &[u8],
) -> Result<quinn::Endpoint, TransportError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // Credit granted in the handshake cannot be taken back: every connection starts with one data
    // stream and a window for two streams' worth, which the server raises once it knows how
    // many connections share its memory (`set_max_concurrent_uni_streams`, `set_receive_window`).
    let initial =
        QuicTuning { max_uni_streams: 1, connection_window: 2 * tuning.stream_window, ..tuning.clone() };
    server.transport_config(initial.transport()?);
    let socket = udp_socket(listen, tuning.socket_buffer)
        .map_err(|source| TransportError::Bind { addr: listen, source })?;
    // Accept the large datagrams an agent on a large-MTU path sends (see `connect`).
    let mut endpoint = tuning.endpoint_config(LARGE_DATAGRAM)?;
    let key = ResetKey(blake3::derive_key("blockship 2026-11 QUIC stateless reset key", reset_seed));
    endpoint.reset_key(Arc::new(key));
    Ok(endpoint_on(endpoint, Some(server), socket, tuning)?)
}

/// A client endpoint (ephemeral port) presenting `tls`.
pub fn client_endpoint(
    tls: rustls::ClientConfig,
    tuning: &QuicTuning,
    ipv6: bool,
) -> Result<quinn::Endpoint, TransportError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(tuning.transport()?);
    let bind: SocketAddr =
        if ipv6 { "[::]:0".parse() } else { "0.0.0.0:0".parse() }.expect("literal socket address");
    let socket = udp_socket(bind, tuning.socket_buffer)?;
    let mut endpoint = endpoint_on(tuning.endpoint_config(0)?, None, socket, tuning)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// An endpoint on `socket`, its reads moderated as `tuning` says.
fn endpoint_on(
    config: EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: UdpSocket,
    tuning: &QuicTuning,
) -> std::io::Result<quinn::Endpoint> {
    use quinn::Runtime;
    let runtime = Arc::new(quinn::TokioRuntime);
    // What the kernel granted (SO_RCVBUFFORCE needs root), not what we asked for.
    let buffer = socket2::SockRef::from(&socket).recv_buffer_size()?;
    let mut socket = runtime.wrap_udp_socket(socket)?;
    if !tuning.recv_hold.is_zero() {
        socket = Arc::new(Moderated::new(socket, tuning.recv_hold, buffer));
    }
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

/// Route MTUs from this size up (loopback's 65536) make plain large datagrams the better choice.
const LARGE_MTU_FROM: u32 = 16 * 1024;
/// UDP payload bound used then (measured on loopback: fastest of 9000..60000, ~25 % over GSO).
pub const LARGE_DATAGRAM: u16 = 32 * 1024;

/// The MTU of the route to `addr` as the kernel knows it (IP_MTU of a connected socket), or None.
pub fn route_mtu(addr: SocketAddr) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let bind: SocketAddr = if addr.is_ipv6() { "[::]:0".parse().ok()? } else { "0.0.0.0:0".parse().ok()? };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(addr).ok()?;
    let (level, name) =
        if addr.is_ipv6() { (libc::IPPROTO_IPV6, libc::IPV6_MTU) } else { (libc::IPPROTO_IP, libc::IP_MTU) };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on a valid fd with a pointer to a c_int and its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            name,
            &mut mtu as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0 && mtu > 0).then_some(mtu as u32)
}

/// Split "HOST:PORT" (or "[V6]:PORT") into the host (for certificate checks) and port.
pub fn split_host_port(target: &str) -> Result<(String, u16), TransportError> {
    let bad = || TransportError::Resolve(format!("{target:?}: expected HOST:PORT"));
    let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Connect to `target` ("HOST:PORT"), checking the sink certificate against `server_name`
/// (default: HOST).
pub async fn connect(
    tls: rustls::ClientConfig,
    tuning: &QuicTuning,
    target: &str,
    server_name: Option<&str>,
) -> Result<(quinn::Endpoint, quinn::Connection), TransportError> {
    let (host, port) = split_host_port(target)?;
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| TransportError::Resolve(format!("{target}: {e}")))?
        .next()
        .ok_or_else(|| TransportError::Resolve(format!("{target}: no address")))?;
    let tuned;
    let tuning = match route_mtu(addr) {
        Some(mtu) if tuning.gso && mtu >= LARGE_MTU_FROM => {
            // Loopback or a huge-MTU fabric: fewer, bigger datagrams beat GSO batches of 6500.
            tuned = QuicTuning { gso: false, mtu_upper_bound: LARGE_DATAGRAM, ..tuning.clone() };
            tracing::debug!(mtu, "large path MTU: GSO off, datagrams up to {LARGE_DATAGRAM} bytes");
            &tuned
        }
        _ => tuning,
    };
    let endpoint = client_endpoint(tls, tuning, addr.is_ipv6())?;
    let name = server_name.unwrap_or(&host);
    let conn = endpoint.connect(addr, name)?.await?;
    Ok((endpoint, conn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{transfer, Via};

    #[test]
    fn host_port_parsing() {
        assert_eq!(split_host_port("sink.lab:7443").unwrap(), ("sink.lab".into(), 7443));
        assert_eq!(split_host_port("[::1]:7443").unwrap(), ("::1".into(), 7443));
        assert!(split_host_port("sink.lab").is_err());
        assert!(split_host_port(":7443").is_err());
        assert!(split_host_port("h:99999").is_err());
    }

    #[test]
    fn recv_hold_parsing() {
        let mut t = QuicTuning::default();
        for (text, want) in [("0", 0), ("0ms", 0), ("500us", 500), ("2ms", 2000), ("10ms", 10_000)] {
            t.set_recv_hold(text).unwrap();
            assert_eq!(t.recv_hold, Duration::from_micros(want), "{text}");
        }
        for bad in ["11ms", "1s", "fast", "-1ms"] {
            let e = t.set_recv_hold(bad).unwrap_err();
            assert!(e.contains("--recv-hold"), "{e}");
        }
    }

    #[test]
    fn loopback_route_mtu_is_known() {
        let mtu = route_mtu("127.0.0.1:9".parse().unwrap());
        // Linux loopback: 65536 (a container may differ, but never below the IPv4 minimum).
        assert!(mtu.is_some_and(|m| m >= 576), "{mtu:?}");
    }

    /// Sends 16 MiB over one stream with `ack_threshold` on the sending side, across a paced
    /// link; returns (datagrams the sender sent, ACK frames the receiver sent).
    async fn acks_for(ack_threshold: u32) -> (u64, u64) {
        // GSO off and 1452-byte datagrams: the per-packet regime of a WAN link. Datagrams
        // arrive one by one (the relay paces them): in bursts the receiver acknowledges once per
        // read whatever the threshold. Moderation off: held reads would batch them again.
        // A 25 ms ACK delay, QUIC's default: only the threshold sets the count.
        let tuning = QuicTuning {
            gso: false,
            mtu_upper_bound: 1452,
            ack_threshold,
            ack_delay: Duration::from_millis(25),
            recv_hold: Duration::ZERO,
            ..Default::default()
        };
        let mut t = transfer(&tuning, Via::Spacing(Duration::from_micros(20)), 16 << 20).await;
        let (got, acks) = t.received().await;
        assert_eq!(got, 16 << 20);
        (t.conn.stats().udp_tx.datagrams, acks)
    }

    #[tokio::test]
    async fn the_receiver_acknowledges_every_ack_threshold_packets() {
        let (sent, acks) = acks_for(QuicTuning::default().ack_threshold).await;
        let (sent_1, acks_1) = acks_for(1).await;
        // QUIC's default: an ACK every second packet (fewer when packets arrive in batches).
        assert!(acks_1 * 8 > sent_1, "threshold 1: {acks_1} ACKs for {sent_1} datagrams");
        // Threshold 32: at most about one per 32 packets, plus the max_ack_delay ones.
        assert!(acks * 16 < sent, "threshold 32: {acks} ACKs for {sent} datagrams");
    }

    /// Connects with the default tuning (`--congestion auto`) through `delay` each way, sends
    /// 1 MiB, and says whether the sending side chose the short-path controller.
    async fn sends_on_short_path(via: Via) -> bool {
        let tuning = QuicTuning::default();
        assert_eq!(tuning.congestion, Congestion::Auto);
        let mut t = transfer(&tuning, via, 1 << 20).await;
        assert_eq!(t.received().await.0, 1 << 20);
        let state = t.conn.congestion_state().into_any();
        let auto =
            state.downcast::<crate::congestion::Auto>().map_err(|_| "not the auto controller").unwrap();
        auto.on_short_path()
    }

    #[tokio::test]
    async fn auto_congestion_follows_the_path_length() {
        assert!(sends_on_short_path(Via::Direct).await, "loopback is a short path: Cubic");
        let long = Via::Delaying(Duration::from_millis(10));
        assert!(!sends_on_short_path(long).await, "20 ms RTT is long: BBR");
    }

    #[test]
    fn gso_caps_the_mtu() {
        let t = QuicTuning { mtu_upper_bound: 9000, ..Default::default() };
        assert_eq!(t.mtu(), GSO_SAFE_MTU);
        let t = QuicTuning { mtu_upper_bound: 9000, gso: false, ..Default::default() };
        assert_eq!(t.mtu(), 9000);
    }
}
