//! A rate-limited link for the `wan` scenario: a network namespace joined to this one by a veth
//! pair, both ends shaped with `tc tbf`. Needs root and iproute2; removed on drop.

use std::process::Command;

use anyhow::{bail, Result};

use crate::proc;

pub struct Link {
    pub ns: String,
    host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
    pub rate_mbit: u64,
}

fn ip(args: &[&str]) -> Result<()> {
    proc::run_ok(Command::new("ip").args(args)).map(|_| ())
}

impl Link {
    pub fn new(rate_mbit: u64) -> Result<Link> {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            bail!("needs root (network namespaces and tc)");
        }
        let id = std::process::id() % 200 + 20;
        let ns = format!("bs-wan-{id}");
        let (host_if, ns_if) = (format!("bsh{id}"), format!("bsn{id}"));
        let (host_ip, ns_ip) = (format!("10.77.{id}.1"), format!("10.77.{id}.2"));
        let _ = proc::run(Command::new("ip").args(["netns", "del", &ns]));
        let _ = proc::run(Command::new("ip").args(["link", "del", &host_if]));
        ip(&["netns", "add", &ns])?;
        let link = Link {
            ns: ns.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
            rate_mbit,
        };
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if])?;
        ip(&["link", "set", &ns_if, "netns", &ns])?;
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["netns", "exec", &ns, "ip", "addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if])?;
        ip(&["netns", "exec", &ns, "ip", "link", "set", &ns_if, "up"])?;
        ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        let rate = format!("{rate_mbit}mbit");
        let tbf = ["root", "tbf", "rate", rate.as_str(), "burst", "1mb", "latency", "50ms"];
        proc::run_ok(Command::new("tc").args(["qdisc", "add", "dev", &host_if]).args(tbf))?;
        proc::run_ok(
            Command::new("ip").args(["netns", "exec", &ns, "tc", "qdisc", "add", "dev", &ns_if]).args(tbf),
        )?;
        Ok(link)
    }

    /// `cmd` run inside the namespace.
    pub fn inside(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Bytes per second the link carries.
    pub fn bytes_per_s(&self) -> f64 {
        self.rate_mbit as f64 * 1e6 / 8.0
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = proc::run(Command::new("ip").args(["netns", "del", &self.ns]));
        let _ = proc::run(Command::new("ip").args(["link", "del", &self.host_if]));
    }
}
