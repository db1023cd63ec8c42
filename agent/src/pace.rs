//! Bandwidth limits: a token bucket over payload bytes whose rate follows a schedule of windows
//! in local time (e.g. `200MiB` on weekdays 08:00–20:00, unlimited otherwise), shared by every
//! data stream of the agent. The clock can be moved for tests (`BLOCKSHIP_CLOCK`, a local time
//! such as `2026-12-07T09:00:00` that then runs at the normal speed).

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use chrono::{Datelike, Local, NaiveDateTime, NaiveTime, Weekday};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// One window of the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Days it applies to (Monday = 0).
    pub days: [bool; 7],
    pub from: NaiveTime,
    /// Exclusive; before `from` means the window runs past midnight.
    pub to: NaiveTime,
    /// Bytes per second; None = unlimited.
    pub limit: Option<u64>,
}

/// Rates over the week: the first window that contains the moment wins, else `default`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    pub default: Option<u64>,
    pub windows: Vec<Window>,
}

impl Schedule {
    pub fn constant(limit: Option<u64>) -> Self {
        Schedule { default: limit, windows: Vec::new() }
    }

    /// The limit at local time `t`.
    pub fn limit_at(&self, t: NaiveDateTime) -> Option<u64> {
        let day = t.weekday().num_days_from_monday() as usize;
        let time = t.time();
        for w in &self.windows {
            let inside = if w.from <= w.to {
                w.days[day] && time >= w.from && time < w.to
            } else {
                // Past midnight: the evening part belongs to `day`, the morning part to the day before.
                (w.days[day] && time >= w.from) || (w.days[(day + 6) % 7] && time < w.to)
            };
            if inside {
                return w.limit;
            }
        }
        self.default
    }

    /// Whether no window ever limits anything.
    pub fn unlimited(&self) -> bool {
        self.default.is_none() && self.windows.iter().all(|w| w.limit.is_none())
    }
}

/// Parse days such as `mon-fri`, `sat,sun`, `daily`.
pub fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    if s.trim().eq_ignore_ascii_case("daily") || s.trim() == "*" {
        return Ok([true; 7]);
    }
    let day = |d: &str| -> Result<usize, String> {
        d.trim()
            .parse::<Weekday>()
            .map(|w| w.num_days_from_monday() as usize)
            .map_err(|_| format!("bad day {d:?} (mon, tue, ..., sun)"))
    };
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    days[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    Ok(days)
}

/// Parse `HH:MM`.
pub fn parse_time(s: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(s.trim(), "%H:%M").map_err(|e| format!("bad time {s:?} (HH:MM): {e}"))
}

/// The local time now, or the test clock's.
pub fn now() -> NaiveDateTime {
    static CLOCK: OnceLock<Option<(NaiveDateTime, Instant)>> = OnceLock::new();
    let fake = CLOCK.get_or_init(|| {
        let v = std::env::var("BLOCKSHIP_CLOCK").ok()?;
        match NaiveDateTime::parse_from_str(&v, "%Y-%m-%dT%H:%M:%S") {
            Ok(t) => Some((t, Instant::now())),
            Err(e) => {
                tracing::warn!("BLOCKSHIP_CLOCK={v:?} ignored: {e}");
                None
            }
        }
    });
    match fake {
        Some((start, at)) => *start + chrono::Duration::from_std(at.elapsed()).unwrap_or_default(),
        None => Local::now().naive_local(),
    }
}

/// Paces payload bytes by the schedule; cheap to check, and the bucket is rebuilt only when the
/// rate changes.
pub struct Pacer {
    schedule: Schedule,
    current: Mutex<(Option<u64>, Option<Arc<DefaultDirectRateLimiter>>)>,
    /// When the rate was last looked up (checked at most once a second).
    checked: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer").field("schedule", &self.schedule).finish()
    }
}

/// The smallest burst (KiB); payloads are taken from the bucket in pieces of at most this.
const BURST_FLOOR_KIB: u32 = 64;

fn bucket(bytes_per_second: u64) -> Arc<DefaultDirectRateLimiter> {
    // governor counts cells in u32: use 1 KiB cells.
    let kib = (bytes_per_second / 1024).clamp(1, u64::from(u32::MAX)) as u32;
    // A tenth of a second of traffic at once: a limit is there to leave the link to others, so
    // it should not let a full second through in one burst. (`take` splits larger payloads.)
    let burst = (kib / 10).max(BURST_FLOOR_KIB);
    let quota = Quota::per_second(NonZeroU32::new(kib).expect("clamped to >= 1"))
        .allow_burst(NonZeroU32::new(burst).expect("burst >= 1"));
    Arc::new(RateLimiter::direct(quota))
}

impl Pacer {
    pub fn new(schedule: Schedule) -> Arc<Self> {
        Arc::new(Pacer { schedule, current: Mutex::new((None, None)), checked: Mutex::new(None) })
    }

    /// The limit in force now (bytes per second; None = unlimited).
    pub fn limit(&self) -> Option<u64> {
        self.bucket().0
    }

    fn bucket(&self) -> (Option<u64>, Option<Arc<DefaultDirectRateLimiter>>) {
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if checked.is_none_or(|t| t.elapsed().as_secs() >= 1) {
            *checked = Some(Instant::now());
            let limit = self.schedule.limit_at(now());
            if limit != cur.0 || (limit.is_some() && cur.1.is_none()) {
                if cur.0 != limit {
                    tracing::info!(?limit, "bandwidth limit changes (schedule)");
                }
                *cur = (limit, limit.map(bucket));
            }
        }
        cur.clone()
    }

    /// Wait until `bytes` may be sent.
    pub async fn take(&self, bytes: usize) {
        let (_, bucket) = self.bucket();
        if let Some(b) = bucket {
            let mut cells = bytes.div_ceil(1024).max(1) as u64;
            while cells > 0 {
                let n = cells.min(u64::from(BURST_FLOOR_KIB));
                cells -= n;
                // Cannot fail: no request exceeds the smallest burst.
                let _ = b.until_n_ready(NonZeroU32::new(n as u32).expect(">= 1")).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M").unwrap()
    }

    #[test]
    fn windows_pick_the_rate() {
        let s = Schedule {
            default: None,
            windows: vec![
                Window {
                    days: parse_days("mon-fri").unwrap(),
                    from: parse_time("08:00").unwrap(),
                    to: parse_time("20:00").unwrap(),
                    limit: Some(200 << 20),
                },
                Window {
                    days: parse_days("sat").unwrap(),
                    from: parse_time("22:00").unwrap(),
                    to: parse_time("02:00").unwrap(),
                    limit: Some(1 << 20),
                },
            ],
        };
        // 2026-12-07 is a Monday.
        assert_eq!(s.limit_at(at("2026-12-07T09:00")), Some(200 << 20));
        assert_eq!(s.limit_at(at("2026-12-07T20:00")), None);
        assert_eq!(s.limit_at(at("2026-12-07T07:59")), None);
        assert_eq!(s.limit_at(at("2026-12-11T19:59")), Some(200 << 20)); // Friday
        assert_eq!(s.limit_at(at("2026-12-12T09:00")), None); // Saturday
        assert_eq!(s.limit_at(at("2026-12-12T23:00")), Some(1 << 20)); // Saturday night
        assert_eq!(s.limit_at(at("2026-12-13T01:00")), Some(1 << 20)); // ... into Sunday
        assert_eq!(s.limit_at(at("2026-12-14T01:00")), None); // not Sunday night
        assert_eq!(parse_days("fri-mon").unwrap(), [true, false, false, false, true, true, true]);
        assert_eq!(parse_days("daily").unwrap(), [true; 7]);
        assert!(parse_days("someday").is_err());
        assert!(parse_time("25:00").is_err());
        assert!(!s.unlimited() && Schedule::constant(None).unlimited());
    }
}
