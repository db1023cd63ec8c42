//! Blockship's benchmark harness: deterministic test images, measured child processes, and
//! scenarios that run the real agent and sink next to peer tools in the same run and report
//! ratios (results.md, results.json, PNG charts).

pub mod chaos;
pub mod charts;
pub mod floor;
pub mod grpc_peer;
pub mod image;
pub mod lab;
pub mod machine;
pub mod nbd_export;
pub mod netns;
pub mod osd;
pub mod proc;
pub mod quic_peer;
pub mod relay;
pub mod report;
pub mod scenario;
pub mod tls_peer;
pub mod vm;
pub mod workload;
