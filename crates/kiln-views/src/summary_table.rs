//! The short table printed when a run ends: the figures of `summary.json`, for humans.

use kiln_events::Summary;

use crate::progress::thousands;

/// Rows of (measure, value), rendered as an aligned two-column table.
pub fn summary_table(s: &Summary, run_dir: &str) -> String {
    let opt = |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into());
    let sync_pct = if s.wall_s > 0.0 { 100.0 * s.sync.total_ms / 1e3 / s.wall_s } else { 0.0 };
    let mut rows: Vec<(String, String)> = vec![
        ("run".into(), run_dir.to_string()),
        ("status".into(), if s.stopped { "stopped on request (resumable)".into() } else { "finished".into() }),
        ("steps / epochs".into(), format!("{} / {}", s.steps, s.epochs)),
        ("train loss (last epoch)".into(), format!("{:.4}", s.train_loss)),
        ("valid loss".into(), opt(s.valid_loss, 4)),
        ("valid BLEU".into(), opt(s.bleu, 2)),
    ];
    for (name, value) in &s.metrics {
        rows.push((format!("valid {name}"), format!("{value:.4}")));
    }
    for (set, f) in &s.dev {
        let metrics: String = f.metrics.iter().map(|(k, v)| format!(" / {k} {v:.2}")).collect();
        rows.push((format!("{set} loss / BLEU"), format!("{:.4} / {}{metrics}", f.loss, opt(f.bleu, 2))));
    }
    if s.skipped_steps > 0 || s.rollbacks > 0 {
        rows.push(("non-finite losses".into(), format!("{} steps skipped, {} rollbacks", s.skipped_steps, s.rollbacks)));
    }
    if let Some(t) = &s.test {
        rows.push(("test loss / ppl / BLEU".into(), format!("{:.4} / {:.2} / {}", t.loss, t.ppl, opt(t.bleu, 2))));
        for (name, value) in &t.metrics {
            rows.push((format!("test {name}"), format!("{value:.4}")));
        }
    }
    rows.extend([
        ("throughput".into(), format!("{} target tok/s", thousands(s.tokens_per_s))),
        ("wall time".into(), format!("{:.1} s", s.wall_s)),
        ("syncs".into(), format!("{} (avg {:.2} ms, max {:.2} ms, {:.2} % of wall)", s.sync.count, s.sync.avg_ms, s.sync.max_ms, sync_pct)),
        ("data".into(), format!("cache {}, prepared in {:.2} s, padding {:.1} %", if s.data.cache_hit { "hit" } else { "miss" }, s.data.prepare_s, s.data.padding_pct)),
    ]);
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_events::{DataFigures, SummarySync};

    #[test]
    fn table_shows_the_figures() {
        let s = Summary {
            steps: 1108,
            epochs: 4,
            train_loss: 3.5,
            valid_loss: Some(3.95),
            bleu: Some(1.34),
            tokens_per_s: 1030.4,
            wall_s: 898.0,
            sync: SummarySync { count: 112, total_ms: 0.3, avg_ms: 0.0027, max_ms: 0.01 },
            data: DataFigures { cache_hit: true, prepare_s: 0.05, padding_pct: 4.1 },
            test: None,
            stopped: false,
            skipped_steps: 0,
            rollbacks: 0,
            metrics: [("accuracy".to_string(), 0.975)].into(),
            early_stopped: false,
            best: None,
            ema: false,
            dev: Default::default(),
        };
        let t = summary_table(&s, "runs/q");
        assert!(t.contains("1108 / 4") && t.contains("1,030 target tok/s") && t.contains("112 (avg 0.00 ms") && t.contains("padding 4.1 %"), "{t}");
        assert!(t.lines().any(|l| l.contains("valid accuracy") && l.ends_with("0.9750")), "a task's metric has its row: {t}");
        assert!(t.lines().all(|l| l.starts_with("  ")));
    }
}
