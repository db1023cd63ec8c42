//! `--congestion auto`, the default: Cubic on short paths, BBR on long ones, chosen per connection
//! from its measured minimum round-trip time. quinn's BBR is what keeps a long link with random
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

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{
    Bbr, BbrConfig, Controller, ControllerFactory, ControllerMetrics, Cubic, CubicConfig,
};
use quinn_proto::RttEstimator;

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
        let mut cubic = CubicConfig::default();
        // The same first flight as BBR's (200 × 1200 bytes); Cubic's own is 10 datagrams,
        // which on a short path only costs a few more round trips of slow start.
        cubic.initial_window(200 * 1200);
        AutoConfig { cubic: Arc::new(cubic), bbr: Arc::default() }
    }
}

impl ControllerFactory for AutoConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Auto {
            cubic: Box::new(Cubic::new(self.cubic.clone(), now, current_mtu)),
            bbr: Box::new(Bbr::new(self.bbr.clone(), current_mtu)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
