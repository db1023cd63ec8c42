//! Blockship's benchmark harness: deterministic test images and (growing) scenarios that run the
//! real agent and sink next to peer tools in the same run and report ratios.

pub mod image;
