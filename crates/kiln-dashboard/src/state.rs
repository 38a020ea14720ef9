//! What the dashboard knows about a run: built only from the event stream (live, or read back
//! from `metrics.jsonl` by `watch`), so both show the same thing. Derived figures (rates, shares
//! of wall time, ETA) are computed here, not in the widgets, to keep them testable.

use std::collections::VecDeque;

use kiln_events::{Event, RunInfo, Summary, ValidRow, WindowRow};

/// Chart range: every window, or the most recent ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Range {
    #[default]
    All,
    Recent,
}

/// Windows shown in the `Recent` range.
pub const RECENT_WINDOWS: usize = 100;
const NOTES_KEPT: usize = 200;

#[derive(Debug, Default)]
pub struct DashboardState {
    pub info: Option<RunInfo>,
    pub windows: Vec<WindowRow>,
    pub valids: Vec<ValidRow>,
    pub notes: VecDeque<String>,
    pub last_checkpoint: Option<(usize, String)>,
    pub summary: Option<Summary>,
    /// From the data note, when one was seen: `Some(true)` = dataset cache hit.
    pub cache_hit: Option<bool>,
    /// Sums over the windows seen (this process for a live run; all processes for `watch`).
    pub data_wait_ms: f64,
    pub train_s: f64,
    pub range: Range,
    pub show_help: bool,
    pub paused: bool,
    pub stopping: bool,
    /// `watch`: lines of `metrics.jsonl` that could not be read.
    pub malformed_lines: usize,
    /// `watch`: the run has a `summary.json` (replay of a finished run).
    pub finished: bool,
    /// Extra title text (`live`, `watching`, `replay`).
    pub mode: String,
    /// The dashboard drives the run (`q` stops it, `p` pauses it); `watch` only looks.
    pub controls: bool,
    /// GPU utilisation % and memory used/total MiB, when sampled (CUDA runs).
    pub gpu: Option<(f64, f64, f64)>,
}

impl DashboardState {
    pub fn new(mode: &str) -> Self {
        Self { mode: mode.to_string(), ..Self::default() }
    }

    fn note(&mut self, text: String) {
        if self.notes.len() == NOTES_KEPT {
            self.notes.pop_front();
        }
        self.notes.push_back(text);
    }

    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::RunStarted(info) => self.info = Some(info.clone()),
            Event::Data(report) => {
                self.cache_hit = match report.cache {
                    kiln_events::CacheUse::Hit => Some(true),
                    kiln_events::CacheUse::Miss => Some(false),
                    kiln_events::CacheUse::Off => None,
                };
                self.note(report.line());
            }
            Event::Note(text) => self.note(text.clone()),
            Event::Window(w) => {
                self.data_wait_ms += w.data_wait_ms;
                self.train_s += w.window_s;
                self.windows.push(w.clone());
            }
            Event::EpochEnd { .. } => {}
            Event::Progress(p) => self.note(format!("{} {}/{} {} ({:.0}%)", p.what, p.done, p.total, p.unit, 100.0 * p.done as f64 / p.total.max(1) as f64)),
            // The chart follows the main validation set; a named set's figures are a note.
            Event::Validation(v) if v.set.is_some() => {
                let name = v.set.as_deref().unwrap_or_default();
                self.note(format!("valid {name} | step {} | loss {:.4} | bleu {}", v.step, v.loss, v.bleu.map(|b| format!("{b:.2}")).unwrap_or_else(|| "-".into())))
            }
            Event::Validation(v) => self.valids.push(v.clone()),
            Event::Checkpoint { step, path, .. } => self.last_checkpoint = Some((*step, path.clone())),
            Event::Rollback { step } => {
                self.windows.retain(|w| w.step <= *step);
                self.valids.retain(|v| v.step <= *step);
            }
            Event::Finished(s) => {
                if self.cache_hit.is_none() {
                    self.cache_hit = Some(s.data.cache_hit);
                }
                self.summary = Some(s.clone());
                self.finished = true;
            }
        }
    }

    pub fn last(&self) -> Option<&WindowRow> {
        self.windows.last()
    }

    /// Windows in the chart range.
    pub fn shown(&self) -> &[WindowRow] {
        match self.range {
            Range::All => &self.windows,
            Range::Recent => &self.windows[self.windows.len().saturating_sub(RECENT_WINDOWS)..],
        }
    }

    pub fn step(&self) -> usize {
        self.summary.as_ref().map(|s| s.steps).or(self.last().map(|w| w.step)).or(self.info.as_ref().map(|i| i.start_step)).unwrap_or(0)
    }

    pub fn epoch(&self) -> usize {
        self.last().map(|w| w.epoch).or(self.info.as_ref().map(|i| i.start_epoch + 1)).unwrap_or(0)
    }

    pub fn total_steps(&self) -> usize {
        self.info.as_ref().map(|i| i.total_steps).unwrap_or(0)
    }

    /// Seconds of the run so far (summed over resumes), from the last window.
    pub fn wall_s(&self) -> f64 {
        self.summary.as_ref().map(|s| s.wall_s).or(self.last().map(|w| w.wall_s)).unwrap_or(0.0)
    }

    /// Sentences/s and steps/s of the last window.
    pub fn rates(&self) -> (f64, f64) {
        match self.last() {
            Some(w) if w.window_s > 0.0 => (w.sentences as f64 / w.window_s, w.steps as f64 / w.window_s),
            _ => (0.0, 0.0),
        }
    }

    /// Seconds left: remaining steps at the pace of the last few windows.
    pub fn eta_s(&self) -> Option<f64> {
        let recent = &self.windows[self.windows.len().saturating_sub(5)..];
        let (steps, secs) = recent.iter().fold((0usize, 0.0f64), |(n, t), w| (n + w.steps, t + w.window_s));
        if steps == 0 || secs <= 0.0 || self.summary.is_some() {
            return None;
        }
        Some(self.total_steps().saturating_sub(self.step()) as f64 * secs / steps as f64)
    }

    /// Sync figures: (syncs, steps per sync, last ms, avg ms, max ms, % of wall in sync,
    /// % of the last window in its sync).
    pub fn sync_figures(&self) -> SyncFigures {
        let Some(w) = self.last() else { return SyncFigures::default() };
        let s = w.sync;
        SyncFigures {
            count: s.count,
            steps_per_sync: if s.count > 0 { w.step as f64 / s.count as f64 } else { 0.0 },
            last_ms: w.sync_ms,
            avg_ms: s.avg_ms(),
            max_ms: s.max_ms,
            wall_pct: if w.wall_s > 0.0 { 100.0 * s.total_ms / 1e3 / w.wall_s } else { 0.0 },
            window_pct: if w.window_s > 0.0 { 100.0 * w.sync_ms / 1e3 / w.window_s } else { 0.0 },
            window_steps: w.steps,
        }
    }

    /// Share of training-window time spent waiting for data, percent.
    pub fn data_wait_pct(&self) -> f64 {
        if self.train_s > 0.0 { 100.0 * self.data_wait_ms / 1e3 / self.train_s } else { 0.0 }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncFigures {
    pub count: u64,
    pub steps_per_sync: f64,
    pub last_ms: f64,
    pub avg_ms: f64,
    pub max_ms: f64,
    pub wall_pct: f64,
    pub window_pct: f64,
    pub window_steps: usize,
}
