//! What a run did: one human line, or one JSON object (`--json`) for scripts and the bench.

use serde::Serialize;

use crate::engine::epoch::EpochReport;

/// What `sync` did: the epoch's report with the target, the whole run's time and rate.
#[derive(Debug, Clone, Serialize)]
pub struct SyncSummary {
    pub target: String,
    #[serde(flatten)]
    pub epoch: EpochReport,
    /// Scanned bytes per second over the whole run, in MB/s (10^6).
    pub mb_per_s: f64,
    /// Attempts the sink refused because a chunk failed its checksum (each retried).
    pub checksum_retries: u32,
    /// Connections the data crossed on (`--connections`; 1 if the sink cannot take more).
    pub connections: usize,
    /// The network path as the transport saw it at the end (QUIC only).
    #[serde(skip)]
    pub path: Option<blockship_transport::conn::PathStats>,
}

impl SyncSummary {
    /// The summary of `epoch`, for a run of `seconds` (connecting and freezing included).
    pub fn new(target: &str, mut epoch: EpochReport, seconds: f64) -> Self {
        epoch.seconds = seconds;
        let mb_per_s = epoch.bytes_scanned as f64 / seconds.max(1e-9) / 1e6;
        SyncSummary {
            target: target.to_string(),
            epoch,
            mb_per_s,
            checksum_retries: 0,
            connections: 1,
            path: None,
        }
    }
}

fn size(b: u64) -> String {
    indicatif::BinaryBytes(b).to_string()
}

impl SyncSummary {
    pub fn human(&self) -> String {
        let e = &self.epoch;
        format!(
            "epoch {} committed to {} ({}{}): {} scanned, {} read, {} sent in {} chunks, {} zero, {} unchanged; {:.1} s, {:.0} MB/s{}",
            e.epoch,
            self.target,
            e.mode,
            if e.resumed_from > 0 { format!(", resumed at {}", size(e.resumed_from)) } else { String::new() },
            size(e.bytes_scanned),
            size(e.bytes_read),
            size(e.bytes_sent),
            e.chunks_sent,
            size(e.bytes_zero),
            size(e.bytes_equal),
            e.seconds,
            self.mb_per_s,
            match self.checksum_retries {
                0 => String::new(),
                n => format!("; retried {n} time(s) after chunks failed their checksum at the sink"),
            },
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifySummary {
    pub target: String,
    pub equal: bool,
    pub source_size: u64,
    pub target_size: u64,
    pub chunk_size: u32,
    pub chunks_compared: u64,
    pub chunks_differing: u64,
    /// First differing byte ranges, `[start, end)`.
    pub first_differences: Vec<(u64, u64)>,
    pub seconds: f64,
}

impl VerifySummary {
    pub fn human(&self) -> String {
        if self.equal {
            return format!(
                "{}: identical to the source ({} in {} chunks, {:.1} s)",
                self.target,
                size(self.source_size),
                self.chunks_compared,
                self.seconds
            );
        }
        let mut s = format!("{}: DIFFERS from the source", self.target);
        if self.source_size != self.target_size {
            s.push_str(&format!(
                "; sizes differ (source {} bytes, target {} bytes)",
                self.source_size, self.target_size
            ));
        }
        if self.chunks_differing > 0 {
            s.push_str(&format!(
                "; {} of {} chunks differ, first ranges:",
                self.chunks_differing, self.chunks_compared
            ));
            for (a, b) in self.first_differences.iter().take(10) {
                s.push_str(&format!(" [{a}, {b})"));
            }
            if self.first_differences.len() > 10 {
                s.push_str(&format!(
                    " and {} more (--json lists up to {})",
                    self.first_differences.len() - 10,
                    crate::verify::MAX_RANGES
                ));
            }
        }
        s
    }
}
