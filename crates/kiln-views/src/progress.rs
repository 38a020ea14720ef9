//! One plain line per sync window, in the style of YOLOv5's and fairseq's logs:
//! `epoch 3/10 | step 420/1400 | loss 4.812 | 12,345 tok/s | lr 4.2e-04 | sync 0.3 ms (avg 0.2, 42 syncs)`.
//!
//! Progress before training (tokenizing a corpus) is a bar redrawn in place on a terminal; into
//! a file or a pipe it is a line at every further tenth, or after ten quiet seconds, so a corpus
//! of any size logs about a dozen lines.

use std::io::Write;
use std::time::{Duration, Instant};

use kiln_events::{Event, EventSink, Progress};

pub struct ProgressLine<W: Write> {
    out: W,
    epochs: usize,
    total_steps: usize,
    /// Redraw progress in place (a terminal) instead of printing lines.
    live: bool,
    /// A bar is drawn and its line not yet ended.
    bar_open: bool,
    /// The last progress line printed: its step, its fraction done, when.
    last_progress: Option<(String, f64, Instant)>,
}

impl<W: Write> ProgressLine<W> {
    pub fn new(out: W) -> Self {
        Self { out, epochs: 0, total_steps: 0, live: false, bar_open: false, last_progress: None }
    }

    /// Progress as a bar redrawn in place (`out` is a terminal).
    pub fn live(mut self, live: bool) -> Self {
        self.live = live;
        self
    }

    fn progress(&mut self, p: &Progress) {
        let fraction = p.done as f64 / p.total.max(1) as f64;
        let finished = p.done >= p.total;
        let figures = format!("{}/{} {} ({:.0}%)", thousands(p.done as f64), thousands(p.total as f64), p.unit, 100.0 * fraction);
        if self.live {
            let filled = (fraction.clamp(0.0, 1.0) * 30.0).round() as usize;
            let _ = write!(self.out, "\r\x1b[2Kkiln | {} [{}{}] {figures}", p.what, "#".repeat(filled), "-".repeat(30 - filled));
            self.bar_open = !finished;
            if finished {
                let _ = writeln!(self.out);
            }
            let _ = self.out.flush();
            return;
        }
        let due = match &self.last_progress {
            Some((what, last, at)) if *what == p.what => finished || fraction - last >= 0.1 || at.elapsed() >= Duration::from_secs(10),
            _ => true,
        };
        if due {
            self.last_progress = Some((p.what.clone(), fraction, Instant::now()));
            let _ = writeln!(self.out, "kiln | {} {figures}", p.what);
            let _ = self.out.flush();
        }
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
        if let Event::Progress(p) = event {
            self.progress(p);
            return Ok(());
        }
        if std::mem::take(&mut self.bar_open) {
            let _ = writeln!(self.out);
        }
        let line = match event {
            Event::Progress(_) => unreachable!("handled above"),
            Event::RunStarted(info) => {
                self.epochs = info.epochs;
                self.total_steps = info.total_steps;
                format!(
                    "kiln | {} | {} | device {} | {} parameters | vocab {} | {} train / {} valid examples | {} steps/epoch, sync every {}",
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
                "valid{} | epoch {} | step {} | loss {:.4} | ppl {:.2} | bleu {}{}",
                v.set.as_ref().map(|s| format!(" {s}")).unwrap_or_default(),
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

    fn progress(done: u64, total: u64) -> Event {
        Event::Progress(Progress { what: "tokenizing c.tsv".into(), done, total, unit: "pairs".into() })
    }

    /// Into a file: a line per further tenth (and the last), whatever the number of updates;
    /// on a terminal: one bar redrawn in place, its line ended when done or when a line follows.
    #[test]
    fn progress_is_a_line_per_tenth_or_a_bar_in_place() {
        let mut buf = Vec::new();
        {
            let mut p = ProgressLine::new(&mut buf);
            for done in (0..=1000).step_by(7).chain([1000]) {
                p.emit(&progress(done, 1000)).unwrap();
            }
        }
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 11, "{text}");
        assert_eq!(lines[0], "kiln | tokenizing c.tsv 0/1,000 pairs (0%)");
        assert_eq!(*lines.last().unwrap(), "kiln | tokenizing c.tsv 1,000/1,000 pairs (100%)");
        let mut buf = Vec::new();
        {
            let mut p = ProgressLine::new(&mut buf).live(true);
            p.emit(&progress(250, 1000)).unwrap();
            p.emit(&Event::Note("a note".into())).unwrap();
            p.emit(&progress(1000, 1000)).unwrap();
        }
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.matches('\r').count(), 2, "{text:?}");
        assert!(text.starts_with("\r\x1b[2Kkiln | tokenizing c.tsv [########----------------------] 250/1,000 pairs (25%)\nkiln | a note\n"), "{text:?}");
        assert!(text.ends_with("(100%)\n"), "{text:?}");
    }

    #[test]
    fn window_line_carries_the_figures() {
        let mut buf = Vec::new();
        let row;
        {
            let mut p = ProgressLine::new(&mut buf);
            let mut sync = SyncStats::default();
            sync.record(1.5);
            sync.record(0.5);
            row = WindowRow { epoch: 2, step: 40, loss: 3.25, tokens: 5000, tokens_per_s: 12345.6, lr: 4.2e-4, sync, sync_ms: 0.5, steps: 10, wall_s: 3.0, padding_pct: 12.5, data_wait_ms: 0.0, sentences: 200, window_s: 0.4, prefetch_ready: 3, rss_mb: 100.0, cpu_pct: 150.0, device_mb: None, device_reserved_mb: None, device_tokens: vec![], node_tokens: vec![], reduce: None, overflow_skips: 0, loss_scale: None, grad_norm: None, grad_norm_max: None, metrics: Default::default() };
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
