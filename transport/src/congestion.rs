//! Which congestion controller a connection sends with (`--congestion`). `auto`, the default:
//! Cubic on short paths, BBR on long ones, chosen per connection from its measured minimum
//! round-trip time. quinn's BBR is what keeps a long link with random
//! loss full (the `wan` bench's 20 ms, 0.1 % loss path), where a loss-based controller halves its
//! window at every drop. On a LAN or loopback it costs: its window is the bandwidth times the
//! minimum RTT, and a path whose minimum RTT is tens of microseconds while a busy receiver answers
//! in milliseconds leaves it window-limited — each fresh connection ramps up ~0.15 s slower than
//! Cubic on loopback, and the bench has seen it stuck at a few MB/s for seconds. quinn's
//! maintainers call their BBR experimental (quinn-rs/quinn#2156). Short paths do not carry random
//! loss at a rate that matters, so there Cubic is both faster and safe.
//!
//! The controller feeds every event to both and sends with the window of the one the path
//! calls for. quinn passes the connection's RTT estimate with each acknowledgement; its minimum
//! only falls, so once a path is judged short it stays so. Before the first sample (the
//! handshake) the long-path controller answers.
//!
//! Both `auto` and `bbr` run quinn's BBR through [`GuardedBbr`], which keeps two start-up faults
//! of quinn's version out (see there).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{
    Bbr, BbrConfig, Controller, ControllerFactory, ControllerMetrics, Cubic, CubicConfig, NewRenoConfig,
};
use quinn_proto::RttEstimator;

/// Congestion controller of the connections this side sends on (`--congestion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// Cubic on paths under 5 ms of RTT, BBR on longer ones (`congestion`).
    Auto,
    Cubic,
    /// Model-based, not loss-based: keeps lossy long-distance links full.
    Bbr,
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Congestion::Auto),
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "newreno" => Ok(Congestion::NewReno),
            other => Err(format!("congestion controller {other:?}: use auto, bbr, cubic or newreno")),
        }
    }
}

impl Congestion {
    /// The factory quinn builds each connection's controller with. `cubic` is the Cubic that
    /// `auto` uses on short paths, so that naming it gives what `auto` would have chosen.
    pub fn factory(self) -> Arc<dyn ControllerFactory + Send + Sync> {
        match self {
            Congestion::Auto => Arc::new(AutoConfig::default()),
            Congestion::Cubic => Arc::new(short_path_cubic()),
            Congestion::Bbr => Arc::new(GuardedBbrConfig::default()),
            Congestion::NewReno => Arc::new(NewRenoConfig::default()),
        }
    }
}

/// Cubic with the same first flight as BBR's (200 × 1200 bytes); quinn's own Cubic starts with
/// 10 datagrams, which on a short path only costs a few more round trips of slow start.
fn short_path_cubic() -> CubicConfig {
    let mut cubic = CubicConfig::default();
    cubic.initial_window(200 * 1200);
    cubic
}

/// Paths whose minimum RTT is below this are short: a LAN, a metro link, loopback.
pub const SHORT_PATH_RTT: Duration = Duration::from_millis(5);

/// Which controller a path with minimum RTT `min_rtt` sends with.
pub fn short_path(min_rtt: Duration) -> bool {
    min_rtt < SHORT_PATH_RTT
}

/// Builds an [`Auto`] controller per connection.
#[derive(Debug)]
pub struct AutoConfig {
    cubic: Arc<CubicConfig>,
    bbr: Arc<BbrConfig>,
}

impl Default for AutoConfig {
    fn default() -> Self {
        AutoConfig { cubic: Arc::new(short_path_cubic()), bbr: Arc::default() }
    }
}

impl ControllerFactory for AutoConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Auto {
            cubic: Box::new(Cubic::new(self.cubic.clone(), now, current_mtu)),
            bbr: Box::new(GuardedBbr::new(self.bbr.clone(), current_mtu)),
            short: false,
        })
    }
}

/// Cubic and BBR side by side; `short` says whose window counts.
pub struct Auto {
    cubic: Box<dyn Controller>,
    bbr: Box<dyn Controller>,
    short: bool,
}

impl Auto {
    /// Whether the connection sends with Cubic (its path was judged short).
    pub fn on_short_path(&self) -> bool {
        self.short
    }

    fn active(&self) -> &dyn Controller {
        if self.short {
            self.cubic.as_ref()
        } else {
            self.bbr.as_ref()
        }
    }
}

impl Controller for Auto {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.cubic.on_sent(now, bytes, last_packet_number);
        self.bbr.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.short |= short_path(rtt.min());
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
        self.bbr.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest: Option<u64>) {
        self.cubic.on_end_acks(now, in_flight, app_limited, largest);
        self.bbr.on_end_acks(now, in_flight, app_limited, largest);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, persistent: bool, lost_bytes: u64) {
        self.cubic.on_congestion_event(now, sent, persistent, lost_bytes);
        self.bbr.on_congestion_event(now, sent, persistent, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.cubic.on_mtu_update(new_mtu);
        self.bbr.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.active().window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.active().metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Auto { cubic: self.cubic.clone_box(), bbr: self.bbr.clone_box(), short: self.short })
    }

    fn initial_window(&self) -> u64 {
        self.active().initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// How long before its first real end of acknowledgements [`GuardedBbr`] starts BBR's ProbeRTT:
/// more than the 200 ms a ProbeRTT lasts, so that one is over at the next round trip.
const PROBE_RTT_BEHIND: Duration = Duration::from_millis(250);

/// Builds a [`GuardedBbr`] per connection: `--congestion bbr`.
#[derive(Debug, Default)]
pub struct GuardedBbrConfig(Arc<BbrConfig>);

impl ControllerFactory for GuardedBbrConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(GuardedBbr::new(self.0.clone(), current_mtu))
    }
}

/// quinn's BBR with two start-up faults of quinn 0.11's version kept out. It starts its ProbeRTT
/// clock at the first end of acknowledgements that is not application-limited, and until then
/// takes "no ProbeRTT yet" for "minimum RTT expired":
/// - so the first acknowledgement of a connection with data to send puts it in ProbeRTT, its
///   window 0.75 × a bandwidth-delay product still made of handshake samples, for 200 ms and a
///   round trip: ~0.25 s at ~27 datagrams per 100 ms on the `wan` bench's 20 ms path (3 % of a
///   512 MiB sync), on every connection of a long path;
/// - and it records its minimum RTT only while that clock reads "expired" or when a sample is
///   below the stored value, which starts at zero. If the first such end of acknowledgements
///   comes before any RTT sample of a packet sent while not application-limited (one that
///   acknowledged only packets sent while the connection was idle, as after the handshake), the
///   minimum RTT stays zero for 10 s, the bandwidth-delay product with it, and the window falls
///   back to the initial 240 KB once BBR leaves start-up: ~12 MB/s on that path, the `wan`
///   bench's impaired row at 0.55–0.61.
///
/// So BBR is shown every end of acknowledgements as application-limited until it has had such a
/// sample (which sets its minimum RTT), and then, before that first real one, one that
/// acknowledges nothing new, dated [`PROBE_RTT_BEHIND`] earlier: its ProbeRTT begins "then", has
/// run its 200 ms by now, and ends at the next round trip instead of 200 ms later.
pub struct GuardedBbr {
    bbr: Bbr,
    /// BBR has had an RTT sample from a packet sent while not application-limited.
    sampled: bool,
    /// Its ProbeRTT clock was started, [`PROBE_RTT_BEHIND`] early.
    started: bool,
}

impl GuardedBbr {
    pub fn new(config: Arc<BbrConfig>, current_mtu: u16) -> Self {
        GuardedBbr { bbr: Bbr::new(config, current_mtu), sampled: false, started: false }
    }
}

impl Controller for GuardedBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.bbr.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.sampled |= !app_limited;
        self.bbr.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest: Option<u64>) {
        let app_limited = app_limited || !self.sampled;
        if !app_limited && !self.started {
            self.started = true;
            if let Some(then) = now.checked_sub(PROBE_RTT_BEHIND) {
                // Nothing in flight "then", so the ProbeRTT's 200 ms count from "then".
                self.bbr.on_end_acks(then, 0, false, None);
            }
        }
        self.bbr.on_end_acks(now, in_flight, app_limited, largest);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, persistent: bool, lost_bytes: u64) {
        self.bbr.on_congestion_event(now, sent, persistent, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.bbr.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.bbr.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.bbr.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(GuardedBbr { bbr: self.bbr.clone(), sampled: self.sampled, started: self.started })
    }

    fn initial_window(&self) -> u64 {
        self.bbr.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_is_the_cubic_auto_uses_on_short_paths() {
        let now = Instant::now();
        let first = |c: Congestion| c.factory().build(now, 1200).window();
        let auto = Arc::new(AutoConfig::default()).build(now, 1200);
        let auto_cubic = auto.into_any().downcast::<Auto>().map(|a| a.cubic.window());
        assert_eq!(auto_cubic.ok(), Some(first(Congestion::Cubic)), "auto's Cubic and `--congestion cubic`");
        assert_eq!(
            first(Congestion::Cubic),
            first(Congestion::Bbr),
            "every long-lived controller's first flight"
        );
        assert_eq!(first(Congestion::Auto), first(Congestion::Bbr));
    }

    #[test]
    fn short_paths_are_lans() {
        assert!(short_path(Duration::from_micros(40)), "loopback");
        assert!(short_path(Duration::from_micros(900)), "a LAN");
        assert!(!short_path(SHORT_PATH_RTT));
        assert!(!short_path(Duration::from_millis(20)), "the wan bench's impaired path");
    }

    #[test]
    fn before_any_sample_the_long_path_controller_answers() {
        let c = Arc::new(AutoConfig::default()).build(Instant::now(), 1200);
        let bbr = Arc::new(BbrConfig::default()).build(Instant::now(), 1200);
        assert_eq!(c.window(), bbr.window());
        assert_eq!(c.initial_window(), bbr.initial_window());
        let auto = c.into_any().downcast::<Auto>().map_err(|_| "not an Auto controller").unwrap();
        assert!(!auto.on_short_path());
    }

    /// The handshake's acknowledgements are of packets sent while idle; the first end of
    /// acknowledgements with data waiting comes before any RTT sample of data. quinn's own BBR
    /// starts its ProbeRTT there, with no minimum RTT; ours waits for a sample.
    #[test]
    fn bbr_waits_for_an_rtt_sample_of_data() {
        let now = Instant::now();
        let mut plain = Bbr::new(Arc::default(), 1200);
        plain.on_sent(now, 1200, 0);
        plain.on_end_acks(now, 1200, false, None);
        assert!(
            format!("{plain:?}").contains("mode: ProbeRtt"),
            "quinn's BBR no longer starts in ProbeRTT: GuardedBbr may not be needed"
        );
        let mut guarded = GuardedBbr::new(Arc::default(), 1200);
        guarded.on_sent(now, 1200, 0);
        guarded.on_end_acks(now, 1200, false, None);
        let state = format!("{:?}", guarded.bbr);
        assert!(state.contains("mode: Startup"), "{state}");
    }

    /// The number after `field: ` in quinn's BBR's debug output.
    fn field(state: &str, field: &str) -> String {
        let at = state.find(&format!("{field}: ")).map(|i| i + field.len() + 2).unwrap_or(state.len());
        state[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '.').collect()
    }

    /// Through a path of 20 ms RTT, BBR's ProbeRTT at the start of a transfer ends at the next
    /// round trip — quinn's own lasts 200 ms, ~10 round trips here — and BBR has a minimum RTT.
    #[tokio::test]
    async fn bbr_starts_without_a_long_probe_rtt() {
        use crate::quic::QuicTuning;
        use crate::testkit::{transfer, Via};
        let tuning = QuicTuning { congestion: Congestion::Bbr, ..Default::default() };
        let mut t = transfer(&tuning, Via::Delaying(Duration::from_millis(10)), 8 << 20).await;
        let state = || {
            let c = t.conn.congestion_state().into_any();
            let g = c.downcast::<GuardedBbr>().map_err(|_| "not the guarded BBR").unwrap();
            format!("{:?}", g.bbr)
        };
        // Rounds (round trips as BBR counts them) seen in ProbeRTT while the data goes across.
        let mut probe_rounds = std::collections::BTreeSet::new();
        // The writer is done once quinn holds the data; the receiver, once it arrived.
        while !t.is_received() {
            let s = state();
            if field(&s, "mode") == "ProbeRtt" {
                probe_rounds.insert(field(&s, "round_count"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let s = state();
        assert_eq!(t.received().await.0, 8 << 20);
        assert!(probe_rounds.len() <= 2, "ProbeRTT over rounds {probe_rounds:?}");
        assert_ne!(field(&s, "min_rtt"), "0ns", "{s}");
    }
}
