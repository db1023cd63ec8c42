//! The Blockship sink: receives chunks from agents over QUIC or gRPC with mutual TLS, verifies every
//! chunk's BLAKE3, writes it into the target and acknowledges only what is durable.

pub mod auth;
pub mod commit;
pub mod config;
pub mod control;
pub mod datastream;
pub mod disk;
pub mod epoch;
pub mod failover;
pub mod failpoint;
pub mod group;
pub mod hashes;
pub mod index;
pub mod joins;
pub mod lease;
pub mod limits;
pub mod liveness;
pub mod pki;
pub mod refusal;
pub mod rollback;
pub mod roster;
pub mod server;
pub mod session;
pub mod state;
pub mod targets;
pub mod undo;
pub mod usage;
pub mod watermark;
pub mod writer;
