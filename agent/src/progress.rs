//! Progress bars for interactive runs (stderr, only when it is a terminal): bytes examined out of
//! the plan, with what went on the wire; `Bars` shows one per epoch the engine runs.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use crate::pipeline::Stats;

pub struct Progress {
    bar: Option<ProgressBar>,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// A bar over `total` bytes fed from `stats`; hidden when not wanted or not on a terminal.
    pub fn start(enabled: bool, label: &str, total: u64, stats: Arc<Stats>) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Progress { bar: None, ticker: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        let b = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                b.set_position(Stats::get(&stats.bytes_done));
                b.set_message(format!("sent {}", indicatif::BinaryBytes(Stats::get(&stats.bytes_sent))));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Progress { bar: Some(bar), ticker: Some(ticker) }
    }

    pub fn message(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
        }
    }

    pub fn finish(self) {
        if let Some(t) = self.ticker {
            t.abort();
        }
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// An engine observer drawing a bar per epoch (nothing when not on a terminal).
pub struct Bars {
    enabled: bool,
    bars: std::sync::Mutex<Vec<(String, Progress)>>,
}

impl Bars {
    pub fn new(enabled: bool) -> Self {
        Bars { enabled, bars: std::sync::Mutex::default() }
    }
}

impl crate::engine::Observer for Bars {
    fn begun(&self, target: &str, epoch: u64, planned: u64, stats: &Arc<Stats>) {
        let p = Progress::start(self.enabled, &format!("{target} epoch {epoch}"), planned, stats.clone());
        self.bars.lock().unwrap_or_else(|p| p.into_inner()).push((target.to_string(), p));
    }

    fn waiting(&self, target: &str) {
        for (t, p) in self.bars.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if t == target {
                p.message("waiting for the sink to make the epoch durable");
            }
        }
    }

    fn ended(&self, target: &str) {
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = bars.iter().position(|(t, _)| t == target) {
            bars.swap_remove(i).1.finish();
        }
    }
}
