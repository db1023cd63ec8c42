//! Arbitrary text as the TOML configs: the agent's (`[agent]`), the daemon's (`[daemon]`,
//! `[[group]]`) and the sink's. Parsing and checking end in a config or an error, never a panic.
#![no_main]

use blockship_agent::config::AgentSettings;
use blockship_agent::daemon::config::DaemonFile;
use blockship_sink::config::ServeSettings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(agent) = toml::from_str::<AgentSettings>(text) {
        let _ = agent.resolve();
    }
    if let Ok(daemon) = toml::from_str::<DaemonFile>(text) {
        let _ = daemon.resolve(AgentSettings::default(), None);
    }
    if let Ok(sink) = toml::from_str::<ServeSettings>(text) {
        let _ = sink.resolve();
    }
});
