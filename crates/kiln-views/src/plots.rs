//! End-of-run charts in the run directory: `loss.png` (training loss per sync window and
//! validation loss against step) and `throughput.png` (target tokens/s per window). Drawn from
//! `metrics.jsonl`, so a resumed run's charts cover all its processes. The font is embedded
//! (DejaVu Sans Mono, `assets/fonts/`): no system fonts needed. [`overlay`] draws several runs
//! on one chart for `kiln compare`.

use std::path::{Path, PathBuf};
use std::sync::Once;

use kiln_events::Event;
use plotters::prelude::*;

use crate::metrics_log;

static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The embedded font is known good; failure would be a build defect, caught by the tests.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Writes `loss.png` and `throughput.png` into `run_dir` from its `metrics.jsonl`; returns the
/// paths written. A run without training windows gets no charts.
pub fn write_charts(run_dir: &Path, title: &str) -> Result<Vec<PathBuf>, String> {
    let (events, _) = metrics_log::read_all(&run_dir.join("metrics.jsonl"))?;
    let mut train = Vec::new();
    let mut valid = Vec::new();
    // Named validation sets (`eval.sets`): a series each.
    let mut named: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    let mut speed = Vec::new();
    for e in &events {
        match e {
            Event::Window(w) if w.loss.is_finite() => {
                train.push((w.step as f64, w.loss));
                speed.push((w.step as f64, w.tokens_per_s));
            }
            Event::Validation(v) if v.loss.is_finite() => match &v.set {
                Some(set) => named.entry(set.clone()).or_default().push((v.step as f64, v.loss)),
                None => valid.push((v.step as f64, v.loss)),
            },
            _ => {}
        }
    }
    if train.is_empty() {
        return Ok(Vec::new());
    }
    register_font();
    let loss = run_dir.join("loss.png");
    let labels: Vec<String> = named.keys().map(|n| format!("valid {n} (NLL)")).collect();
    let mut series: Vec<Series<'_>> = vec![("train (label-smoothed, per sync window)", &train, &BLUE), ("valid (NLL)", &valid, &RED)];
    series.extend(labels.iter().zip(named.values()).zip(PALETTE.iter().skip(2).cycle()).map(|((l, v), c)| (l.as_str(), v.as_slice(), c)));
    draw(&loss, &format!("{title}: loss"), "loss (nats/token)", &series)?;
    let throughput = run_dir.join("throughput.png");
    draw(&throughput, &format!("{title}: throughput"), "target tokens/s", &[("train", &speed, &GREEN)])?;
    Ok(vec![loss, throughput])
}

/// One chart of lines (with point markers when a series is short) against step, written through a
/// temporary file and a rename.
/// A named line of (step, value) points and its colour.
type Series<'a> = (&'a str, &'a [(f64, f64)], &'a RGBColor);

fn draw(path: &Path, caption: &str, y_label: &str, series: &[Series<'_>]) -> Result<(), String> {
    draw_against(path, caption, "optimizer step", y_label, series)
}

/// Colours of overlaid runs, in order (then repeated).
const PALETTE: [RGBColor; 8] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(255, 127, 14), RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(227, 119, 194), RGBColor(23, 190, 207)];

/// One chart of several runs' lines (`kiln compare`): each a named list of (x, y) points.
pub fn overlay(path: &Path, caption: &str, x_label: &str, y_label: &str, lines: &[(String, Vec<(f64, f64)>)]) -> Result<(), String> {
    register_font();
    let series: Vec<Series<'_>> = lines.iter().enumerate().map(|(i, (name, data))| (name.as_str(), data.as_slice(), &PALETTE[i % PALETTE.len()])).collect();
    draw_against(path, caption, x_label, y_label, &series)
}

fn draw_against(path: &Path, caption: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> Result<(), String> {
    let fail = |e: String| format!("{}: cannot draw chart: {e}", path.display());
    let points = series.iter().flat_map(|s| s.1.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-6);
    let (y_min, y_max) = ((y_min - pad).max(if y_min >= 0.0 { 0.0 } else { f64::NEG_INFINITY }), y_max + pad);
    let tmp = path.with_file_name(format!(".{}.{}.tmp.png", path.file_stem().unwrap_or_default().to_string_lossy(), std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, (960, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, y_min..y_max)
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for &(name, data, color) in series {
            if data.is_empty() {
                continue;
            }
            let color = *color;
            chart
                .draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            if data.len() <= 50 {
                chart.draw_series(data.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| fail(e.to_string()))?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn charts_are_png_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_charts(dir.path(), "empty").unwrap().is_empty(), "no metrics, no charts");
        let mut f = std::fs::File::create(dir.path().join("metrics.jsonl")).unwrap();
        for i in 1..=30 {
            let row = format!(
                r#"{{"kind":"train","epoch":1,"step":{},"loss":{},"tokens":100,"tokens_per_s":{},"lr":0.001,"sync":{{"count":{i},"total_ms":0.1,"max_ms":0.1}},"sync_ms":0.1,"steps":10,"wall_s":2.0,"padding_pct":5.0,"data_wait_ms":0.0}}"#,
                i * 10,
                8.0 / (i as f64).sqrt(),
                900.0 + i as f64
            );
            writeln!(f, "{row}").unwrap();
        }
        writeln!(f, r#"{{"kind":"valid","epoch":1,"step":300,"loss":2.1,"ppl":8.2,"bleu":null}}"#).unwrap();
        drop(f);
        let written = write_charts(dir.path(), "test").unwrap();
        assert_eq!(written.len(), 2);
        for p in written {
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
            assert!(bytes.len() > 5_000, "a chart with text and lines, not a blank image: {} bytes", bytes.len());
        }
        assert!(std::fs::read_dir(dir.path()).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().contains(".tmp")));
    }
}
