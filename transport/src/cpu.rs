//! Where a daemon's CPU goes, for `blockship-agent bench`: per-stage CPU clocks (thread CPU time
//! spent inside a stage, summed over threads) and samples of the whole process (CPU time, and per
//! thread the time spent running and waiting to run). Two samples and the wall time between them
//! tell whether a side was CPU-bound: a thread that ran or waited for a core all the time, or
//! every usable core busy. Linux only (`/proc/self/task/*/schedstat`); elsewhere the samples
//! are empty and only the stage clocks count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out pointer; both clocks exist on every Linux.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of the calling thread.
pub fn thread_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of the whole process (all threads, user and system).
pub fn process_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU time spent in one stage by every thread of the process.
pub struct Stage(AtomicU64);

impl Stage {
    pub const fn new() -> Self {
        Stage(AtomicU64::new(0))
    }

    /// Run `f` (synchronous work on this thread) and count its CPU time.
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = thread_ns();
        let r = f();
        self.0.fetch_add(thread_ns().saturating_sub(t0), Ordering::Relaxed);
        r
    }

    pub fn ns(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Stage {
    fn default() -> Self {
        Stage::new()
    }
}

/// Cores this process may run on (its affinity mask).
pub fn usable_cores() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

/// The CPUs this process may run on, by number (None if the kernel does not say).
pub fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data, zero is a valid (empty) set; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return None;
    }
    // SAFETY: CPU_ISSET reads the set filled above, for indexes below CPU_SETSIZE.
    let cpus: Vec<usize> =
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect();
    (!cpus.is_empty()).then_some(cpus)
}

/// One look at the process: its CPU time, and per thread (by id) the time it ran and the time it
/// was ready to run but waited for a core.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub cpu_ns: u64,
    threads: HashMap<u32, (u64, u64)>,
}

impl Sample {
    pub fn now() -> Sample {
        let mut threads = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for entry in dir.flatten() {
                let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else { continue };
                // A thread that ended meanwhile is simply not counted.
                let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else { continue };
                let mut f = text.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
                if let (Some(run), Some(wait)) = (f.next(), f.next()) {
                    threads.insert(tid, (run, wait));
                }
            }
        }
        Sample { at: Instant::now(), cpu_ns: process_ns(), threads }
    }

    /// What happened between `earlier` and this sample.
    pub fn since(&self, earlier: &Sample) -> Load {
        let wall_ns = self.at.duration_since(earlier.at).as_nanos() as u64;
        let (mut busiest_ns, mut wait_ns) = (0u64, 0u64);
        for (tid, (run, wait)) in &self.threads {
            let (run0, wait0) = earlier.threads.get(tid).copied().unwrap_or((0, 0));
            let (run, wait) = (run.saturating_sub(run0), wait.saturating_sub(wait0));
            busiest_ns = busiest_ns.max(run + wait);
            wait_ns += wait;
        }
        Load {
            wall_ns,
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            busiest_ns,
            wait_ns,
            cores: usable_cores(),
        }
    }
}

/// A process's CPU use over a stretch of wall time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub wall_ns: u64,
    pub cpu_ns: u64,
    /// The thread that ran or waited to run the longest: its running plus waiting time.
    pub busiest_ns: u64,
    /// Time threads were ready to run but had no core, summed over threads.
    pub wait_ns: u64,
    pub cores: u32,
}

/// Above this share of the wall time a thread (or every usable core) counts as saturated.
pub const SATURATED: f64 = 0.85;

impl Load {
    /// Cores' worth of CPU used (1.0 = one core all the time).
    pub fn cores_used(&self) -> f64 {
        self.cpu_ns as f64 / self.wall_ns.max(1) as f64
    }

    /// Why this side was CPU-bound, or None: one thread running or waiting for a core nearly
    /// all the time (a serial stage), or the process wanting more cores than it may use.
    pub fn saturated(&self) -> Option<String> {
        let wall = self.wall_ns.max(1) as f64;
        let busiest = self.busiest_ns as f64 / wall;
        let wanted = self.cpu_ns.saturating_add(self.wait_ns) as f64 / wall;
        if wanted >= SATURATED * self.cores.max(1) as f64 {
            return Some(format!(
                "{:.2} of {} usable cores used, threads waiting for a core {:.0} % of the time",
                self.cores_used(),
                self.cores,
                self.wait_ns as f64 / wall * 100.0
            ));
        }
        if busiest >= SATURATED {
            return Some(format!(
                "one thread running or waiting for a core {:.0} % of the time",
                busiest * 100.0
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(cpu: u64, busiest: u64, wait: u64, cores: u32) -> Load {
        Load { wall_ns: 1000, cpu_ns: cpu, busiest_ns: busiest, wait_ns: wait, cores }
    }

    #[test]
    fn saturation_is_a_serial_thread_or_all_cores() {
        assert_eq!(load(300, 200, 0, 4).saturated(), None);
        assert!(load(900, 900, 0, 4).saturated().unwrap().contains("one thread"));
        // Two threads on one core: each runs half the time and waits the other half.
        assert!(load(1000, 1000, 1000, 1).saturated().unwrap().contains("1 usable"));
        assert!(load(3500, 700, 200, 4).saturated().unwrap().contains("4 usable"));
    }

    #[test]
    fn stage_clocks_count_thread_cpu_and_samples_see_it() {
        let stage = Stage::new();
        let before = Sample::now();
        let spun = stage.time(|| {
            let t = Instant::now();
            let mut x = 0u64;
            while t.elapsed().as_millis() < 50 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            x
        });
        std::hint::black_box(spun);
        let load = Sample::now().since(&before);
        assert!(stage.ns() >= 20_000_000, "the stage counted {} ns of a 50 ms spin", stage.ns());
        assert!(
            load.cpu_ns >= stage.ns() / 2,
            "process CPU {} below the stage's {}",
            load.cpu_ns,
            stage.ns()
        );
        if std::path::Path::new("/proc/self/task").exists() {
            assert!(load.busiest_ns >= 20_000_000, "busiest thread {} ns", load.busiest_ns);
        }
    }
}
