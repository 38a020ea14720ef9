//! One plain line per sync window, in the style of YOLOv5's and fairseq's logs:
//! `epoch 3/10 | step 420/1400 | loss 4.812 | 12,345 tok/s | lr 4.2e-04 | sync 0.3 ms (avg 0.2, 42 syncs)`.

use std::io::Write;

use kiln_events::{Event, EventSink};

pub struct ProgressLine<W: Write> {
    out: W,
    epochs: usize,
    total_steps: usize,
}

impl<W: Write> ProgressLine<W> {
    pub fn new(out: W) -> Self {
        Self { out, epochs: 0, total_steps: 0 }
    }
}

/// `12345.6` → `12,346`.
pub fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl<W: Write + Send> EventSink for ProgressLine<W> {
    fn emit(&mut self, event: &Event) -> Result<(), String> {
        let line = match event {
            Event::RunStarted(info) => {
                self.epochs = info.epochs;
                self.total_steps = info.total_steps;
                format!(
                    "kiln | {} | {} | device {} | {} parameters | vocab {} | {} train / {} valid pairs | {} steps/epoch, sync every {}",
                    info.recipe,
                    info.run_dir,
                    info.device,
                    thousands(info.parameters as f64),
                    info.vocab_size,
                    thousands(info.train_examples as f64),
                    thousands(info.valid_examples as f64),
                    info.steps_per_epoch,
                    info.sync_interval
                )
            }
            Event::Note(text) => format!("kiln | {text}"),
            Event::Data(report) => format!("kiln | {}", report.line()),
            Event::Window(w) => format!(
                "epoch {}/{} | step {}/{} | loss {:.4} | {} tok/s | lr {:.2e} | sync {:.2} ms (avg {:.2}, max {:.2}, {} syncs) | pad {:.1}% | data wait {:.1} ms{}",
                w.epoch,
                self.epochs,
                w.step,
                self.total_steps,
                w.loss,
                thousands(w.tokens_per_s),
                w.lr,
                w.sync_ms,
                w.sync.avg_ms(),
                w.sync.max_ms,
                w.sync.count,
                w.padding_pct,
                w.data_wait_ms,
                extras(w)
            ),
            Event::EpochEnd { epoch, step, train_loss } => {
                format!("epoch {epoch}/{} done | step {step} | train loss {train_loss:.4}", self.epochs)
            }
            Event::Validation(v) => format!(
                "valid | epoch {} | step {} | loss {:.4} | ppl {:.2} | bleu {}{}",
                v.epoch,
                v.step,
                v.loss,
                v.ppl,
                v.bleu.map(|b| format!("{b:.2}")).unwrap_or_else(|| "-".into()),
                named(&v.metrics)
            ),
            Event::Checkpoint { path, step, .. } => format!("checkpoint | step {step} | {path}"),
            Event::Rollback { step } => format!("rollback | back to step {step}"),
            Event::Finished(s) => format!(
                "done | {} steps, {} epochs in {:.1} s | train loss {:.4} | valid loss {} | bleu {} | {} tok/s | {} syncs, {:.1} ms total, {:.2} ms avg, {:.2} ms max",
                s.steps,
                s.epochs,
                s.wall_s,
                s.train_loss,
                s.valid_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into()),
                s.bleu.map(|b| format!("{b:.2}")).unwrap_or_else(|| "-".into()),
                thousands(s.tokens_per_s),
                s.sync.count,
                s.sync.total_ms,
                s.sync.avg_ms,
                s.sync.max_ms
            ),
        };
        // A closed stdout (`| head`) must not stop training.
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
        Ok(())
    }
}

/// A task's own metrics as ` | name value` pairs.
fn named(metrics: &std::collections::BTreeMap<String, f64>) -> String {
    metrics.iter().map(|(name, value)| format!(" | {name} {value:.4}")).collect()
}

/// What only some runs have: a task's own metrics, each node's or device's tokens/s and the
/// all-reduce time (data parallel), the f16 loss scale and the steps it undid.
fn extras(w: &kiln_events::WindowRow) -> String {
    let mut out = named(&w.metrics);
    let rates = |tokens: &[u64]| tokens.iter().map(|t| thousands(*t as f64 / w.window_s)).collect::<Vec<_>>().join(" / ");
    if !w.node_tokens.is_empty() && w.window_s > 0.0 {
        out.push_str(&format!(" | per node {} tok/s", rates(&w.node_tokens)));
    } else if !w.device_tokens.is_empty() && w.window_s > 0.0 {
        out.push_str(&format!(" | per device {} tok/s", rates(&w.device_tokens)));
    }
    if let Some(r) = w.reduce {
        // The steps' all-reduces, cumulative like the loss reads' figures.
        out.push_str(&format!(" | all-reduce avg {:.2} ms (max {:.2}, {} calls)", r.avg_ms(), r.max_ms, r.count));
    }
    if let Some(scale) = w.loss_scale {
        out.push_str(&format!(" | loss scale {scale}"));
        if w.overflow_skips > 0 {
            out.push_str(&format!(" ({} overflowing step{} undone)", w.overflow_skips, if w.overflow_skips == 1 { "" } else { "s" }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_events::{SyncStats, WindowRow};

    #[test]
    fn window_line_carries_the_figures() {
        let mut buf = Vec::new();
        let row;
        {
            let mut p = ProgressLine::new(&mut buf);
            let mut sync = SyncStats::default();
            sync.record(1.5);
            sync.record(0.5);
            row = WindowRow { epoch: 2, step: 40, loss: 3.25, tokens: 5000, tokens_per_s: 12345.6, lr: 4.2e-4, sync, sync_ms: 0.5, steps: 10, wall_s: 3.0, padding_pct: 12.5, data_wait_ms: 0.0, sentences: 200, window_s: 0.4, prefetch_ready: 3, rss_mb: 100.0, cpu_pct: 150.0, device_mb: None, device_reserved_mb: None, device_tokens: vec![], node_tokens: vec![], reduce: None, overflow_skips: 0, loss_scale: None, metrics: Default::default() };
            p.emit(&Event::Window(row.clone())).unwrap();
        }
        let line = String::from_utf8(buf).unwrap();
        assert!(line.starts_with("epoch 2/0 | step 40/0 | loss 3.2500 | 12,346 tok/s | lr 4.20e-4 | sync 0.50 ms (avg 1.00, max 1.50, 2 syncs)"), "{line}");
        assert!(!line.contains("per device") && !line.contains("loss scale"), "{line}");
        let row = WindowRow { device_tokens: vec![3000, 2000], loss_scale: Some(16384.0), overflow_skips: 2, ..row };
        let line = extras(&row);
        assert_eq!(line, " | per device 7,500 / 5,000 tok/s | loss scale 16384 (2 overflowing steps undone)");
        let row = WindowRow { metrics: [("accuracy".to_string(), 0.5)].into(), ..row };
        assert!(extras(&row).starts_with(" | accuracy 0.5000 | per device"), "{}", extras(&row));
        // Several nodes: each node's rate instead of each device's, and the all-reduce figures.
        let row = WindowRow { node_tokens: vec![3000, 2000], reduce: Some(SyncStats { count: 4, total_ms: 10.0, max_ms: 4.0 }), loss_scale: None, metrics: Default::default(), ..row };
        assert_eq!(extras(&row), " | per node 7,500 / 5,000 tok/s | all-reduce avg 2.50 ms (max 4.00, 4 calls)");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
    }
}
