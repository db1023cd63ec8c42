//! An agent daemon (`blockship-agent run --config`) as the `continuous`, `cutover` and `estate`
//! scenarios drive it: its TOML written from the sink's address, the lab's PKI and the
//! scenario's groups; started with its log in the scenario's folder; ready once it answers on its
//! control socket (a stale socket file does not count); asked for status and actions through that
//! socket, as an operator would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use super::Ctx;
use crate::proc::{Server, Usage};

pub struct Daemon {
    server: Server,
    agent: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Write `dir/agent.toml` (`[agent]` for the sink at `sink`, `[daemon]` with its control
    /// socket plus `daemon_keys`, then `groups`, the `[[group]]` tables) and start the daemon.
    pub fn start(ctx: &Ctx, sink: &str, dir: &Path, daemon_keys: &str, groups: &str) -> Result<Daemon> {
        let socket = dir.join("agent.sock");
        let config = format!(
            "[agent]\nsink = \"{sink}\"\npki = \"{}\"\nname = \"bench\"\n[daemon]\ncontrol_socket = \"{}\"\n{daemon_keys}{groups}",
            ctx.lab.dir.join("pki").display(),
            socket.display()
        );
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, config)?;
        let log = dir.join("agent.log");
        let agent = ctx.lab.bins.agent.clone();
        let server = Server::start_logging(
            Command::new(&agent).args(["run", "--config"]).arg(&config_path).env("RUST_LOG", "warn"),
            std::fs::File::create(&log)?,
        )?;
        let daemon = Daemon { server, agent, socket, log };
        let started = Instant::now();
        while daemon.status().is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                return Err(daemon.failed("the agent daemon did not answer on its control socket in 30 s"));
            }
            // Each poll is a process; inside estate's timed window, not more often than this.
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    /// Every group's status (`status --json`).
    pub fn status(&self) -> Result<Vec<serde_json::Value>> {
        let f = crate::proc::run_ok(self.control("status").arg("--json"))?;
        let v: serde_json::Value =
            serde_json::from_str(f.stdout.trim()).map_err(|e| anyhow!("status --json: {e}"))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// `blockship-agent SUB --control-socket SOCKET`, for the caller to add arguments and run.
    pub fn control(&self, sub: &str) -> Command {
        let mut cmd = Command::new(&self.agent);
        cmd.arg(sub).arg("--control-socket").arg(&self.socket);
        cmd
    }

    /// An error saying `what`, with the daemon's log so far.
    pub fn failed(&self, what: &str) -> anyhow::Error {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        anyhow!("{what}; the daemon's log ({}):\n{}", self.log.display(), log.trim())
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn stop(self) -> Result<Usage> {
        self.server.stop()
    }
}
