//! Results: per-tool samples reduced to medians, ratios against peers measured in the same run,
//! written as `results.json`, `results.md` (with date and machine) and PNG charts.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::machine::Machine;

/// Resources of one process of a run (agent, sink, nbdcopy, qemu-nbd ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Side {
    pub name: String,
    pub cpu_s: f64,
    pub max_rss_kib: u64,
}

/// One measured run of one tool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub wall_s: f64,
    /// Bytes of disk the run covered (what MB/s is measured in).
    pub disk_bytes: u64,
    /// Payload bytes on the wire, where the tool reports them.
    pub wire_bytes: Option<u64>,
    pub sides: Vec<Side>,
}

/// A tool (or variant) in a scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub tool: String,
    pub samples: Vec<Sample>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Row {
    pub fn new(tool: impl Into<String>) -> Row {
        Row { tool: tool.into(), samples: Vec::new() }
    }

    pub fn median_wall(&self) -> f64 {
        median(self.samples.iter().map(|s| s.wall_s).collect())
    }

    /// Median throughput in MB/s (10^6 bytes) of disk covered.
    pub fn mb_per_s(&self) -> f64 {
        median(self.samples.iter().map(|s| s.disk_bytes as f64 / s.wall_s / 1e6).collect())
    }

    pub fn median_wire(&self) -> Option<f64> {
        let v: Vec<f64> = self.samples.iter().filter_map(|s| s.wire_bytes.map(|b| b as f64)).collect();
        (!v.is_empty()).then(|| median(v))
    }

    /// Side names in order of first appearance.
    pub fn side_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for s in &self.samples {
            for side in &s.sides {
                if !names.contains(&side.name) {
                    names.push(side.name.clone());
                }
            }
        }
        names
    }

    /// Median CPU seconds per GiB of disk for one side.
    pub fn cpu_per_gib(&self, side: &str) -> f64 {
        median(
            self.samples
                .iter()
                .filter_map(|s| {
                    let c = s.sides.iter().find(|x| x.name == side)?;
                    Some(c.cpu_s / (s.disk_bytes as f64 / (1u64 << 30) as f64))
                })
                .collect(),
        )
    }

    /// Median CPU seconds per GiB put on the wire (after zero skipping and compression) for
    /// one side; per GiB of disk for rows that do not report wire bytes.
    pub fn cpu_per_wire_gib(&self, side: &str) -> f64 {
        median(
            self.samples
                .iter()
                .filter_map(|s| {
                    let c = s.sides.iter().find(|x| x.name == side)?;
                    Some(c.cpu_s / (s.wire_bytes.unwrap_or(s.disk_bytes) as f64 / (1u64 << 30) as f64))
                })
                .collect(),
        )
    }

    /// Peak RSS of one side over all runs, MiB.
    pub fn peak_rss_mib(&self, side: &str) -> f64 {
        self.samples
            .iter()
            .filter_map(|s| s.sides.iter().find(|x| x.name == side).map(|c| c.max_rss_kib as f64 / 1024.0))
            .fold(0.0, f64::max)
    }
}

/// A ratio the project has a target for (or just reports).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
    /// (">=" or "<=", threshold)
    pub target: Option<(String, f64)>,
}

impl Ratio {
    pub fn at_least(name: impl Into<String>, value: f64, min: f64) -> Ratio {
        Ratio { name: name.into(), value, target: Some((">=".into(), min)) }
    }

    pub fn at_most(name: impl Into<String>, value: f64, max: f64) -> Ratio {
        Ratio { name: name.into(), value, target: Some(("<=".into(), max)) }
    }

    pub fn info(name: impl Into<String>, value: f64) -> Ratio {
        Ratio { name: name.into(), value, target: None }
    }

    pub fn met(&self) -> Option<bool> {
        self.target.as_ref().map(|(op, t)| if op == ">=" { self.value >= *t } else { self.value <= *t })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub name: String,
    pub title: String,
    pub setup: String,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
    pub notes: Vec<String>,
    pub skipped: Option<String>,
}

impl ScenarioResult {
    pub fn new(name: &str, title: &str, setup: impl Into<String>) -> Self {
        ScenarioResult {
            name: name.into(),
            title: title.into(),
            setup: setup.into(),
            rows: Vec::new(),
            ratios: Vec::new(),
            notes: Vec::new(),
            skipped: None,
        }
    }

    pub fn skipped(name: &str, title: &str, why: impl Into<String>) -> Self {
        let mut r = ScenarioResult::new(name, title, "");
        r.skipped = Some(why.into());
        r
    }

    pub fn row(&self, tool: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.tool == tool)
    }

    /// Throughput ratio of two rows (a / b).
    pub fn speed_ratio(&self, a: &str, b: &str) -> Option<f64> {
        Some(self.row(a)?.mb_per_s() / self.row(b)?.mb_per_s())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub quick: bool,
    pub runs: usize,
    pub scenarios: Vec<ScenarioResult>,
}

impl Report {
    /// A report written earlier (`results.json`), to render its markdown and charts again.
    pub fn load(json: &Path) -> Result<Report> {
        Ok(serde_json::from_str(&std::fs::read_to_string(json)?)?)
    }

    pub fn write(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("results.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(out.join("results.md"), self.markdown())?;
        crate::charts::draw(self, out)?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "# Blockship benchmark results\n\n{} on **{}**{}; medians of {} run(s) per tool. \
             Ratios compare tools measured in this same run.\n\n",
            self.date,
            self.machine.label(),
            if self.quick { " (**--quick**: small sizes, smoke test only)" } else { "" },
            self.runs
        ));
        s.push_str("| scenario | ratio | value | target | met |\n| --- | --- | --- | --- | --- |\n");
        for sc in &self.scenarios {
            for r in &sc.ratios {
                let (t, m) = match (&r.target, r.met()) {
                    (Some((op, v)), Some(m)) => (format!("{op} {v}"), if m { "yes" } else { "**no**" }),
                    _ => (String::new(), ""),
                };
                s.push_str(&format!("| {} | {} | {:.3} | {t} | {m} |\n", sc.name, r.name, r.value));
            }
        }
        for sc in &self.scenarios {
            s.push_str(&format!("\n## {} — {}\n\n", sc.name, sc.title));
            if let Some(why) = &sc.skipped {
                s.push_str(&format!("Skipped: {why}\n"));
                continue;
            }
            s.push_str(&format!("{}\n\n", sc.setup));
            // Scenarios measured against targets rather than peers have no rows.
            if !sc.rows.is_empty() {
                s.push_str(
                "| tool | MB/s (disk) | wall s | wire MiB | CPU s/GiB per side | peak RSS MiB per side |\n",
            );
                s.push_str("| --- | ---: | ---: | ---: | --- | --- |\n");
                for row in &sc.rows {
                    let sides = row.side_names();
                    let cpu: Vec<String> =
                        sides.iter().map(|n| format!("{n} {:.2}", row.cpu_per_gib(n))).collect();
                    let rss: Vec<String> =
                        sides.iter().map(|n| format!("{n} {:.0}", row.peak_rss_mib(n))).collect();
                    s.push_str(&format!(
                        "| {} | {:.0} | {:.2} | {} | {} | {} |\n",
                        row.tool,
                        row.mb_per_s(),
                        row.median_wall(),
                        row.median_wire()
                            .map(|w| format!("{:.0}", w / (1u64 << 20) as f64))
                            .unwrap_or_default(),
                        cpu.join(", "),
                        rss.join(", ")
                    ));
                }
            }
            for n in &sc.notes {
                s.push_str(&format!("\n- {n}"));
            }
            s.push('\n');
        }
        s.push_str("\n![throughput](throughput.png)\n![cpu](cpu.png)\n![rss](rss.png)\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        let mut r = Row::new("x");
        for w in [2.0, 1.0, 4.0] {
            r.samples.push(Sample {
                wall_s: w,
                disk_bytes: 1 << 30,
                wire_bytes: Some(100),
                sides: vec![Side { name: "a".into(), cpu_s: w, max_rss_kib: (w * 1024.0) as u64 }],
            });
        }
        assert_eq!(r.median_wall(), 2.0);
        assert!((r.mb_per_s() - (1u64 << 30) as f64 / 2.0 / 1e6).abs() < 1e-6);
        assert_eq!(r.cpu_per_gib("a"), 2.0);
        assert_eq!(r.peak_rss_mib("a"), 4.0);
        assert_eq!(Ratio::at_least("r", 0.9, 0.8).met(), Some(true));
        assert_eq!(Ratio::at_most("r", 0.9, 0.8).met(), Some(false));
        assert_eq!(Ratio::info("r", 1.0).met(), None);
    }
}
