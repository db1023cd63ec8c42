//! PNG charts of a report: throughput per tool (a panel per scenario), CPU seconds per GiB per side, peak RSS per side.
//! Text needs a TrueType font; DejaVu Sans (Debian's fonts-dejavu-core) is used when present,
//! otherwise the charts are skipped with a note.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::report::Report;

const FONT_PATHS: &[&str] =
    &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                // The font must live as long as the process: leak it once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn panel_height(items: usize) -> u32 {
    80 + 28 * items as u32
}

/// Horizontal bars with labels, one chart per file.
fn bars(path: &Path, title: &str, unit: &str, items: &[(String, f64)]) -> Result<()> {
    let items: Vec<(String, f64)> = items.iter().filter(|(_, v)| v.is_finite()).cloned().collect();
    if items.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (1000, panel_height(items.len()))).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    panel(&root, title, unit, &items)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Several bar charts stacked in one file, each with its own scale.
fn panels(path: &Path, charts: &[(String, Vec<(String, f64)>)], unit: &str) -> Result<()> {
    let charts: Vec<(&String, Vec<(String, f64)>)> = charts
        .iter()
        .map(|(t, items)| (t, items.iter().filter(|(_, v)| v.is_finite()).cloned().collect::<Vec<_>>()))
        .filter(|(_, items)| !items.is_empty())
        .collect();
    if charts.is_empty() {
        return Ok(());
    }
    let height: u32 = charts.iter().map(|(_, i)| panel_height(i.len())).sum();
    let root = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut rest = root.clone();
    for (title, items) in &charts {
        let (top, bottom) = rest.split_vertically(panel_height(items.len()));
        panel(&top, title, unit, items)?;
        rest = bottom;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    items: &[(String, f64)],
) -> Result<()> {
    let max = items.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(360)
        .build_cartesian_2d(0.0..max, (0..items.len()).into_segmented())
        .map_err(|e| anyhow!("{e}"))?;
    let labels: Vec<String> = items.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .y_labels(items.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(items.iter().enumerate().map(|(i, (_, v))| {
            let color = Palette99::pick(i).filled();
            Rectangle::new([(0.0, SegmentValue::Exact(i)), (*v, SegmentValue::Exact(i + 1))], color)
        }))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(items.iter().enumerate().map(|(i, (_, v))| {
            Text::new(format!("{v:.1}"), (*v, SegmentValue::CenterOf(i)), ("sans-serif", 13))
        }))
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

pub fn draw(report: &Report, out: &Path) -> Result<()> {
    if !font_ready() {
        eprintln!("no TrueType font found ({}); charts skipped", FONT_PATHS.join(", "));
        return Ok(());
    }
    let mut speed = Vec::new();
    let mut cpu = Vec::new();
    let mut rss = Vec::new();
    // MB/s of the memory scenario mean nothing (two epochs per run, sparse disks).
    for sc in report.scenarios.iter().filter(|s| s.skipped.is_none()) {
        if sc.name != "memory" {
            let items = sc.rows.iter().map(|r| (r.tool.clone(), r.mb_per_s())).collect();
            speed.push((sc.name.clone(), items));
        }
        for row in &sc.rows {
            for side in row.side_names() {
                cpu.push((format!("{}: {} / {side}", sc.name, row.tool), row.cpu_per_gib(&side)));
                rss.push((format!("{}: {} / {side}", sc.name, row.tool), row.peak_rss_mib(&side)));
            }
        }
    }
    let when = format!("{} — {}", report.date, report.machine.hostname);
    let speed: Vec<(String, Vec<(String, f64)>)> =
        speed.into_iter().map(|(t, i)| (format!("{t}: throughput, MB/s of disk ({when})"), i)).collect();
    panels(&out.join("throughput.png"), &speed, "MB/s")?;
    bars(&out.join("cpu.png"), &format!("CPU seconds per GiB, per process ({when})"), "CPU s / GiB", &cpu)?;
    bars(&out.join("rss.png"), &format!("Peak RSS per process, MiB ({when})"), "MiB", &rss)?;
    Ok(())
}
