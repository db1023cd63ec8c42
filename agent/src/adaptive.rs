//! `--compression auto`: compress only while the network, not the CPU, limits the epoch.
//! Compression buys throughput when chunks queue up in front of the link and cores sit idle; on
//! a CPU-bound path (a fast LAN, loopback, agent and sink sharing cores) it costs more CPU than
//! the bytes it saves are worth. A monitor samples the send queue and the machine's idle CPU and
//! flips one flag that the encoders read per chunk.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the send queue is sampled; the CPU is read every `CPU_EVERY` samples.
const SAMPLE: Duration = Duration::from_millis(10);
const CPU_EVERY: u32 = 5;
/// Decisions in a row that must ask for compression before it is turned on.
const STREAK: u32 = 3;
/// Weight of a new queue sample in the moving average (about 50 ms of memory).
const ALPHA: f64 = 0.2;

/// What the monitor sees.
#[derive(Debug, Clone, Copy)]
pub struct Signals {
    /// Average fill of the queue in front of the network, 0..=1.
    pub backlog: f64,
    /// Share of the machine's CPU time that was idle, 0..=1.
    pub idle: f64,
}

/// The rule, with hysteresis so it does not flap: turn compression on when chunks wait for the
/// link and much of the CPU is idle (a CPU-bound pipeline still idles 20-30 % in its sync points,
/// so less says nothing); off only when the CPU is nearly saturated. A queue that drains while
/// compression is on (a run of zero chunks, say) is no reason to stop: spare CPU costs nothing,
/// and switching back on would lag the next compressible region.
pub fn decide(on: bool, s: Signals) -> bool {
    if on {
        s.idle >= 0.05
    } else {
        s.backlog >= 0.5 && s.idle >= 0.4
    }
}

/// The shared decision.
#[derive(Debug, Default)]
pub struct Adaptive {
    on: AtomicBool,
    /// Decisions taken with compression on / in total, for the log.
    on_samples: AtomicU64,
    samples: AtomicU64,
}

impl Adaptive {
    /// Start with compression `on` (a `--bwlimit` makes the link the bottleneck from the start).
    pub fn new(on: bool) -> Self {
        Adaptive { on: AtomicBool::new(on), ..Default::default() }
    }

    /// Whether chunks encoded now should be compressed.
    pub fn compress(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Share of decisions that had compression on.
    pub fn share_on(&self) -> f64 {
        let n = self.samples.load(Ordering::Relaxed);
        if n == 0 {
            0.0
        } else {
            self.on_samples.load(Ordering::Relaxed) as f64 / n as f64
        }
    }

    /// One decision; turning on needs `STREAK` qualifying decisions in a row, because a CPU-bound
    /// pipeline also shows a full queue and idle cores for a moment after a run of zero chunks.
    fn apply(&self, s: Signals, streak: &mut u32) {
        let was = self.compress();
        let want = decide(was, s);
        tracing::trace!(backlog = s.backlog, idle = s.idle, was, want, "adaptive compression");
        *streak = if want && !was { *streak + 1 } else { 0 };
        let on = if was { want } else { *streak >= STREAK };
        if on != was {
            *streak = 0;
        }
        self.on.store(on, Ordering::Relaxed);
        self.samples.fetch_add(1, Ordering::Relaxed);
        if on {
            self.on_samples.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sample `queue_fill` (0..=1) and `cpu` until the returned guard is dropped.
    pub fn monitor(
        self: &Arc<Self>,
        queue_fill: impl Fn() -> f64 + Send + 'static,
        mut cpu: impl FnMut() -> Option<f64> + Send + 'static,
    ) -> MonitorGuard {
        let me = self.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut backlog, mut n, mut streak) = (0.0f64, 0u32, 0u32);
            // Unknown CPU (no /proc/stat): decide on the queue alone.
            let mut idle = cpu().unwrap_or(1.0);
            loop {
                tick.tick().await;
                backlog += ALPHA * (queue_fill().clamp(0.0, 1.0) - backlog);
                n += 1;
                if n % CPU_EVERY == 0 {
                    if let Some(i) = cpu() {
                        idle = i;
                    }
                    me.apply(Signals { backlog, idle }, &mut streak);
                }
            }
        });
        MonitorGuard(task.abort_handle())
    }
}

/// Stops the monitor when dropped.
pub struct MonitorGuard(tokio::task::AbortHandle);

impl Drop for MonitorGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Idle share of the CPUs this process may run on (its affinity mask, as `taskset` or a cpuset
/// sets it) between successive calls, from /proc/stat (None before the second reading, or where
/// /proc/stat cannot be read). The machine's total would call an agent confined to one busy core
/// of many idle and switch compression on exactly when it has no CPU to spare. (A cgroup CPU
/// quota without a cpuset is not seen.)
#[derive(Debug)]
pub struct CpuMeter {
    cpus: Option<Vec<usize>>,
    last: Option<(u64, u64)>,
}

impl Default for CpuMeter {
    fn default() -> Self {
        CpuMeter { cpus: blockship_transport::cpu::allowed_cpus(), last: None }
    }
}

impl CpuMeter {
    pub fn sample(&mut self) -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let now = parse_stat(&stat, self.cpus.as_deref())?;
        let prev = self.last.replace(now)?;
        let (idle, total) = (now.0.saturating_sub(prev.0), now.1.saturating_sub(prev.1));
        (total > 0).then(|| idle as f64 / total as f64)
    }
}

/// (idle + iowait, total) jiffies of /proc/stat: the aggregate `cpu` line, or with `cpus` the sum
/// of those CPUs' `cpuN` lines (None if none of them is there).
pub fn parse_stat(stat: &str, cpus: Option<&[usize]>) -> Option<(u64, u64)> {
    let times = |line: &str| -> Option<(u64, u64)> {
        let v: Vec<u64> =
            line.split_whitespace().skip(1).take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
        (v.len() >= 5).then(|| (v[3] + v[4], v.iter().sum()))
    };
    let Some(cpus) = cpus else {
        return times(stat.lines().find(|l| l.starts_with("cpu "))?);
    };
    let mut found = None;
    for line in stat.lines() {
        let Some(n) = line.split_whitespace().next().and_then(|w| w.strip_prefix("cpu")) else { continue };
        if n.parse::<usize>().is_ok_and(|n| cpus.contains(&n)) {
            let (i, t) = times(line)?;
            let (si, st) = found.unwrap_or((0, 0));
            found = Some((si + i, st + t));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn rule_needs_a_queue_and_spare_cpu_and_does_not_flap() {
        let s = |backlog, idle| Signals { backlog, idle };
        // Link-bound: full queue, idle cores.
        assert!(decide(false, s(0.9, 0.8)));
        // CPU-bound: full queue but no spare CPU; or a starved queue.
        assert!(!decide(false, s(0.9, 0.05)));
        assert!(!decide(false, s(0.1, 0.9)));
        // Hysteresis: once on, a moderately full queue and some idle CPU keep it on.
        assert!(decide(true, s(0.4, 0.1)));
        assert!(!decide(false, s(0.4, 0.1)));
        assert!(!decide(false, s(0.9, 0.3)));
        assert!(decide(true, s(0.1, 0.9)));
        assert!(!decide(true, s(0.9, 0.02)));
    }

    #[test]
    fn proc_stat_is_parsed() {
        let stat = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 50 2 25 400 10 0 1 1 0 0\ncpu1 50 3 25 400 10 1 1 2 0 0\nintr 1 2\n";
        assert_eq!(parse_stat(stat, None), Some((820, 981)));
        assert_eq!(parse_stat("intr 1 2\n", None), None);
        assert_eq!(parse_stat("cpu  a b c d e\n", None), None);
        // Confined to some CPUs: only theirs count (cpu1 here: 410 idle of 492), and a mask that
        // names no listed CPU gives nothing rather than the machine's figure.
        assert_eq!(parse_stat(stat, Some(&[1])), Some((410, 492)));
        assert_eq!(parse_stat(stat, Some(&[0, 1])), Some((820, 981)));
        assert_eq!(parse_stat(stat, Some(&[7])), None);
        // The live meter on this (Linux) machine: nothing before two readings, then a share.
        let mut m = CpuMeter::default();
        assert_eq!(m.sample(), None, "an idle share from a single reading");
        std::thread::sleep(Duration::from_millis(50));
        let idle = m.sample();
        assert!(idle.is_some_and(|i| (0.0..=1.0).contains(&i)), "/proc/stat gave no idle share: {idle:?}");
    }

    #[test]
    fn the_meter_watches_the_cpus_it_may_run_on() {
        // A thread confined to CPU 0 (affinity is per thread and inherited): its meter reads cpu0.
        let cpus = std::thread::spawn(|| {
            // SAFETY: a zeroed cpu_set_t is empty; CPU_SET adds CPU 0, which every machine has.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            unsafe { libc::CPU_SET(0, &mut set) };
            let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
            assert_eq!(r, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
            let mut m = CpuMeter::default();
            m.sample();
            std::thread::sleep(Duration::from_millis(20));
            (m.cpus.clone(), m.sample())
        })
        .join()
        .unwrap();
        assert_eq!(cpus.0, Some(vec![0]));
        assert!(cpus.1.is_some_and(|i| (0.0..=1.0).contains(&i)), "no idle share for cpu0: {:?}", cpus.1);
    }

    #[tokio::test(start_paused = true)]
    async fn monitor_follows_the_signals() {
        let a = Arc::new(Adaptive::default());
        let fill = Arc::new(Mutex::new(1.0f64));
        let idle = Arc::new(Mutex::new(0.9f64));
        let (f, i) = (fill.clone(), idle.clone());
        let _guard = a.monitor(move || *f.lock().unwrap(), move || Some(*i.lock().unwrap()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(a.compress(), "a full queue with idle CPU must turn compression on");
        *idle.lock().unwrap() = 0.02;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!a.compress(), "a saturated CPU must turn it off");
        *idle.lock().unwrap() = 0.9;
        *fill.lock().unwrap() = 0.0;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!a.compress(), "an empty queue means the link keeps up: no reason to start");
        *fill.lock().unwrap() = 1.0;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(a.compress());
        *fill.lock().unwrap() = 0.0;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(a.compress(), "a drained queue with idle CPU keeps it on");
        assert!(a.share_on() > 0.0 && a.share_on() < 1.0);
    }
}
