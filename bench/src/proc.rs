//! Child processes measured the way the kernel accounts them: wall time, user and system CPU
//! seconds and peak RSS from `wait4`'s rusage, for one-shot commands and for servers that are
//! started, used, and stopped with SIGTERM.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Resources a finished process used.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    pub wall_s: f64,
    pub cpu_s: f64,
    pub max_rss_kib: u64,
}

impl Usage {
    /// Many processes counted as one side: CPU summed, the largest RSS (each has its own).
    pub fn together(all: impl IntoIterator<Item = Usage>) -> Usage {
        all.into_iter().fold(Usage::default(), |t, u| Usage {
            wall_s: t.wall_s.max(u.wall_s),
            cpu_s: t.cpu_s + u.cpu_s,
            max_rss_kib: t.max_rss_kib.max(u.max_rss_kib),
        })
    }
}

/// Reap `pid` and return its exit status and rusage.
fn wait4(pid: u32) -> Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain data, zero is a valid value; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) };
    if r < 0 {
        bail!("wait4({pid}): {}", std::io::Error::last_os_error());
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
    Ok((code, ru))
}

fn cpu(ru: &libc::rusage) -> f64 {
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Make `cmd` start with fork(2) rather than vfork/posix_spawn. With a shared address space the
/// child's `ru_maxrss` starts at this process's peak RSS (Linux carries the old mm's high-water
/// mark across exec), which would credit the bench's own memory to every tool it measures.
fn real_fork(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook does nothing; it only stops std from choosing posix_spawn.
    unsafe { cmd.pre_exec(|| Ok(())) }
}

/// Make `cmd` run on CPU `cpu` only (like `taskset -c CPU`), threads and children included.
pub fn pin(cmd: &mut Command, cpu: usize) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the hook only calls sched_setaffinity, which is
    // async-signal-safe, on a cpu_set_t on its own stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The first two CPUs this process may run on (None with fewer): where the pinned rows put
/// their two sides.
pub fn two_cpus() -> Option<(usize, usize)> {
    let cpus = blockship_transport::cpu::allowed_cpus()?;
    Some((*cpus.first()?, *cpus.get(1)?))
}

/// Output and usage of a one-shot command.
pub struct Finished {
    pub usage: Usage,
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run `cmd` to completion.
pub fn run(cmd: &mut Command) -> Result<Finished> {
    let started = Instant::now();
    let mut child = real_fork(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let out = drain(child.stdout.take().expect("piped"));
    let err = drain(child.stderr.take().expect("piped"));
    let (status, ru) = wait4(child.id())?;
    let wall_s = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    Ok(Finished {
        usage: Usage { wall_s, cpu_s: cpu(&ru), max_rss_kib: ru.ru_maxrss as u64 },
        status,
        stdout,
        stderr,
    })
}

/// Run `cmd` and fail with its stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Result<Finished> {
    let f = run(cmd)?;
    if f.status != 0 {
        bail!("{cmd:?} exited {}: {}", f.status, f.stderr.trim());
    }
    Ok(f)
}

/// A long-running process (sink, qemu-nbd, relay) measured from start to stop.
pub struct Server {
    child: Option<Child>,
    started: Instant,
    pub ready_line: String,
}

impl Server {
    /// Start `cmd` and wait until a stdout line satisfies `ready` (or `timeout` passes).
    pub fn start(cmd: &mut Command, ready: impl Fn(&str) -> bool, timeout: Duration) -> Result<Server> {
        let started = Instant::now();
        let mut child = real_fork(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = drain(child.stderr.take().expect("piped"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + timeout;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if ready(&line) => {
                    return Ok(Server { child: Some(child), started, ready_line: line })
                }
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    let _ = wait4(child.id());
                    let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
                    bail!("{cmd:?} did not become ready: {}", err.trim());
                }
            }
        }
    }

    /// A server that is ready as soon as it runs (e.g. daemons that bind before forking work).
    pub fn start_detached(cmd: &mut Command) -> Result<Server> {
        let child = real_fork(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Server { child: Some(child), started: Instant::now(), ready_line: String::new() })
    }

    /// `start_detached`, with stderr appended to `log`.
    pub fn start_logging(cmd: &mut Command, log: std::fs::File) -> Result<Server> {
        let child = real_fork(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Server { child: Some(child), started: Instant::now(), ready_line: String::new() })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGKILL: no chance to clean up (the crash loop's kill).
    pub fn kill9(self) {
        drop(self);
    }

    /// SIGTERM, wait, and report what the server used over its lifetime.
    // Reaped with wait4 (which also yields the rusage), not Child::wait.
    #[allow(clippy::zombie_processes)]
    pub fn stop(mut self) -> Result<Usage> {
        let child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let (_, ru) = wait4(child.id())?;
        Ok(Usage {
            wall_s: self.started.elapsed().as_secs_f64(),
            cpu_s: cpu(&ru),
            max_rss_kib: ru.ru_maxrss as u64,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = wait4(c.id());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_cpu_and_rss() {
        let f =
            run(Command::new("sh").args(["-c", "head -c 50000000 /dev/zero | md5sum >/dev/null; echo ok"]))
                .unwrap();
        assert_eq!(f.status, 0);
        assert_eq!(f.stdout.trim(), "ok");
        assert!(f.usage.wall_s > 0.0);
        let s = Server::start(
            Command::new("sh").args(["-c", "echo ready; exec sleep 30"]),
            |l| l == "ready",
            Duration::from_secs(5),
        )
        .unwrap();
        let u = s.stop().unwrap();
        assert!(u.wall_s < 5.0);
    }
}
