//! What a run did: one human line, or one JSON object (`--json`) for scripts and the bench.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct SyncSummary {
    pub target: String,
    pub epoch: u64,
    /// "full", "compare" or "incremental".
    pub mode: String,
    /// Why a full or compare sync ran instead of the platform's change tracking ("" otherwise).
    pub note: String,
    /// Change point recorded with this epoch (changeId, bitmap, snapshot; "" if none).
    pub change_point: String,
    /// How the source was read: io_uring, pread, nbd, librbd.
    pub reader: String,
    /// Offset an interrupted incremental epoch resumed from (0: from the start).
    pub resumed_from: u64,
    pub disk_size: u64,
    /// Bytes the plan covered (examined).
    pub bytes_scanned: u64,
    pub bytes_read: u64,
    /// Payload bytes on the wire, after compression.
    pub bytes_sent: u64,
    /// Raw bytes of the chunks sent.
    pub bytes_data: u64,
    pub bytes_zero: u64,
    /// Bytes equal in source and target (compare mode), not sent.
    pub bytes_equal: u64,
    pub chunks_sent: u64,
    pub zero_extents: u64,
    pub seconds: f64,
    /// Scanned bytes per second, in MB/s (10^6).
    pub mb_per_s: f64,
}

fn size(b: u64) -> String {
    indicatif::BinaryBytes(b).to_string()
}

impl SyncSummary {
    pub fn human(&self) -> String {
        format!(
            "epoch {} committed to {} ({}{}): {} scanned, {} read, {} sent in {} chunks, {} zero, {} unchanged; {:.1} s, {:.0} MB/s",
            self.epoch,
            self.target,
            self.mode,
            if self.resumed_from > 0 { format!(", resumed at {}", size(self.resumed_from)) } else { String::new() },
            size(self.bytes_scanned),
            size(self.bytes_read),
            size(self.bytes_sent),
            self.chunks_sent,
            size(self.bytes_zero),
            size(self.bytes_equal),
            self.seconds,
            self.mb_per_s,
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
            for (a, b) in &self.first_differences {
                s.push_str(&format!(" [{a}, {b})"));
            }
        }
        s
    }
}
