//! The sink's CPU per stage, reported to the agent with each epoch's end (`Ack.usage`) so that
//! `blockship-agent bench` can say where the sink's time went: verifying chunks (decode and
//! BLAKE3), handing data to the target, and the rest (transport, TLS, framing, librbd's threads).
//! The clocks are process-wide: on a sink shared by several agents the figures include their work.

use blockship_proto::pb::SinkUsage;
use blockship_transport::cpu::{Sample, Stage};

/// Decoding and verifying chunks (blocking pool).
pub static VERIFY: Stage = Stage::new();
/// Writing data into file targets (blocking pool); RBD writes run on librbd's threads.
pub static WRITE: Stage = Stage::new();

/// The clocks at an epoch's begin.
pub struct Start {
    sample: Sample,
    verify_ns: u64,
    write_ns: u64,
}

impl Start {
    pub fn now() -> Start {
        Start { sample: Sample::now(), verify_ns: VERIFY.ns(), write_ns: WRITE.ns() }
    }

    /// The sink's CPU since `self`.
    pub fn usage(&self) -> SinkUsage {
        let load = Sample::now().since(&self.sample);
        SinkUsage {
            wall_ns: load.wall_ns,
            cpu_ns: load.cpu_ns,
            verify_ns: VERIFY.ns().saturating_sub(self.verify_ns),
            write_ns: WRITE.ns().saturating_sub(self.write_ns),
            busiest_ns: load.busiest_ns,
            wait_ns: load.wait_ns,
            cores: load.cores,
        }
    }
}
