//! Corruption points for the hardening tests. A build with `--features failpoints` (never a
//! release build) reads `FAILPOINTS` (the `fail` crate's syntax) at start; when
//! `agent::corrupt-after-hash` triggers (e.g. `agent::corrupt-after-hash=2%return`), one bit of
//! a chunk is flipped after its BLAKE3 was computed, as a memory error between hashing and
//! sending would. At most one chunk per disk epoch attempt is corrupted: the sink ends that
//! disk's epoch at the first bad chunk and drops the disk's later items unread, so each
//! injected corruption is one the sink must have seen, and the counts can be compared exactly.

use std::sync::Mutex;

use blockship_proto::HASH_LEN;
use bytes::Bytes;

/// The points this agent declares.
pub const POINTS: &[&str] = &["agent::corrupt-after-hash"];

/// One epoch attempt's corruption allowance (see the module note). A lock, not a flag: the
/// point is evaluated by one hashing thread at a time and only while the allowance is unused, so
/// an action such as `3*return` injects exactly three corruptions (with a flag, two threads could
/// both consume a `return` and only one of them flip a bit — CI saw 2 injected for `3*return`).
#[derive(Debug, Default)]
pub struct Once(#[cfg_attr(not(feature = "failpoints"), allow(dead_code))] Mutex<bool>);

/// Corrupt `data` (whose digest is `hash`, or computed here) if the point is armed and this
/// attempt has not corrupted a chunk yet. Returns the data to send and its (original) digest.
pub fn corrupt_after_hash(
    once: &Once,
    offset: u64,
    data: Bytes,
    hash: Option<[u8; HASH_LEN]>,
) -> (Bytes, Option<[u8; HASH_LEN]>) {
    #[cfg(feature = "failpoints")]
    if once.0.lock().is_ok_and(|mut used| {
        let fire = !*used && fail::eval("agent::corrupt-after-hash", |_| ()).is_some();
        *used |= fire;
        fire
    }) {
        let hash = hash.unwrap_or_else(|| *blake3::hash(&data).as_bytes());
        let mut bad = data.to_vec();
        // A bit that depends on the offset, so runs differ in where the damage lands.
        let bit = (offset / 4096) as usize % (bad.len() * 8);
        bad[bit / 8] ^= 1 << (bit % 8);
        tracing::warn!(offset, bit, "failpoint agent::corrupt-after-hash: flipped one bit after hashing");
        metrics::counter!("blockship_agent_injected_corruptions_total").increment(1);
        return (Bytes::from(bad), Some(hash));
    }
    let _ = (once, offset);
    (data, hash)
}

/// Arm the points named in `FAILPOINTS` (kept for the life of the process), after checking them
/// (see `blockship_transport::failpoints`).
pub fn setup() -> Result<(), String> {
    let wanted = std::env::var("FAILPOINTS").unwrap_or_default();
    let built = cfg!(feature = "failpoints");
    blockship_transport::failpoints::check(&wanted, &[POINTS], "agent", "blockship-agent/failpoints", built)?;
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
    Ok(())
}
