//! Protocol version negotiation: the agent offers a range, the sink picks the highest version
//! both speak or refuses the session with a message naming both ranges.

use crate::pb::{Hello, HelloReply};

/// Oldest protocol version this build speaks.
pub const MIN_VERSION: u32 = 3;
/// Newest protocol version this build speaks (4: cutover — GroupCutover, cut-over targets).
pub const MAX_VERSION: u32 = 4;
/// First version with cutover.
pub const CUTOVER_VERSION: u32 = 4;

/// Capabilities this build understands; unknown ones offered by a peer are ignored.
pub const CAPABILITIES: &[&str] = &[CAP_ZSTD, CAP_ZERO_EXTENTS, CAP_BENCH, CAP_JOIN];
/// Chunks may be zstd-compressed.
pub const CAP_ZSTD: &str = "zstd";
/// Zero extents are written as zeroes (holes or explicit zeros), never skipped.
pub const CAP_ZERO_EXTENTS: &str = "zero-extents";
/// The sink honours `OpenDisk.bench` (refuses a replica), `EpochBegin.measure` (sends
/// `Ack.usage`) and `null:` targets. A sink without it would ignore those fields and let a
/// bench overwrite a replica, so `blockship-agent bench` refuses to run against it.
pub const CAP_BENCH: &str = "bench";

/// The sink hands out a session token (`HelloReply.session_token`) and accepts further
/// connections of the same agent that join the session with it (`Hello.join`) as data-only
/// connections: `--connections N`. Without it the agent uses one connection.
pub const CAP_JOIN: &str = "join";

/// Why a `Hello` cannot be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "no common protocol version: peer speaks {peer_min}..={peer_max}, we speak {MIN_VERSION}..={MAX_VERSION}; upgrade the older side"
)]
pub struct VersionMismatch {
    pub peer_min: u32,
    pub peer_max: u32,
}

/// The `Hello` this build sends.
pub fn hello(software: &str) -> Hello {
    Hello {
        min_version: MIN_VERSION,
        max_version: MAX_VERSION,
        capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
        software: software.to_string(),
        join: Default::default(),
    }
}

/// Answer a peer's `Hello`: the highest common version and the capabilities both sides have.
pub fn negotiate(
    hello: &Hello,
    software: &str,
    identity: &str,
    idle_timeout_ms: u32,
) -> Result<HelloReply, VersionMismatch> {
    let mismatch = VersionMismatch { peer_min: hello.min_version, peer_max: hello.max_version };
    if hello.min_version > hello.max_version {
        return Err(mismatch);
    }
    let version = hello.max_version.min(MAX_VERSION);
    if version < hello.min_version.max(MIN_VERSION) {
        return Err(mismatch);
    }
    let capabilities =
        hello.capabilities.iter().filter(|c| CAPABILITIES.contains(&c.as_str())).cloned().collect();
    Ok(HelloReply {
        version,
        capabilities,
        software: software.to_string(),
        identity: identity.to_string(),
        idle_timeout_ms,
        session_token: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_highest_common_version() {
        let mut h = hello("agent");
        h.max_version = MAX_VERSION + 5;
        let reply = negotiate(&h, "sink", "esx01", 30_000).unwrap();
        assert_eq!(reply.version, MAX_VERSION);
        assert_eq!(reply.identity, "esx01");
    }

    #[test]
    fn refuses_disjoint_ranges() {
        let mut h = hello("agent");
        h.min_version = MAX_VERSION + 1;
        h.max_version = MAX_VERSION + 3;
        let err = negotiate(&h, "sink", "x", 30_000).unwrap_err();
        assert!(err.to_string().contains("no common protocol version"), "{err}");
        h.min_version = 3;
        h.max_version = 2;
        assert!(negotiate(&h, "sink", "x", 30_000).is_err());
    }

    #[test]
    fn keeps_only_known_capabilities() {
        let mut h = hello("agent");
        h.capabilities.push("teleport".into());
        let reply = negotiate(&h, "sink", "x", 30_000).unwrap();
        assert!(reply.capabilities.iter().any(|c| c == CAP_ZSTD));
        assert!(reply.capabilities.iter().any(|c| c == CAP_BENCH));
        assert!(!reply.capabilities.iter().any(|c| c == "teleport"));
        // A peer that does not offer it (an older agent or sink) does not get it.
        h.capabilities.retain(|c| c != CAP_BENCH);
        let reply = negotiate(&h, "sink", "x", 30_000).unwrap();
        assert!(!reply.capabilities.iter().any(|c| c == CAP_BENCH));
    }
}
