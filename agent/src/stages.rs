//! The agent's CPU per stage, for `blockship-agent bench`: generating synthetic data, BLAKE3
//! hashing and zstd compression, each timed on the thread that does it (the blocking pool).
//! What is left of the process's CPU is reading the source, transport and TLS. The clocks are
//! process-wide; `bench` reads them before and after its run.

use blockship_transport::cpu::Stage;

pub static GENERATE: Stage = Stage::new();
pub static HASH: Stage = Stage::new();
pub static COMPRESS: Stage = Stage::new();
