//! The run directory's machine-readable files: `metrics.jsonl` (one JSON object per line, flushed
//! per line so a live run can be followed) and `summary.json` (written atomically at the end).
//!
//! Rows of `metrics.jsonl` by `"kind"`: `start` (the run's facts, once per process), `train` (a
//! sync window), `valid` (a validation), `data` (how the data was prepared), `note` (`{"text":…}`), `checkpoint`, `error` (`{"text":…}`: why an attempt failed), `rollback` (`{"step":…}`: training went back to that step's
//! checkpoint; the rows past it were removed). Readers skip kinds
//! they do not know.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use kiln_events::{Event, EventSink};
use serde::Serialize;

#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    kind: &'static str,
    #[serde(flatten)]
    row: &'a T,
}

pub struct RunFiles {
    dir: PathBuf,
    metrics: File,
}

impl RunFiles {
    /// Opens `metrics.jsonl` for appending (a resumed run continues the same file).
    pub fn open(dir: &Path) -> Result<Self, String> {
        let path = dir.join("metrics.jsonl");
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: cannot open for writing: {e}", path.display()))?;
        Ok(Self { dir: dir.to_path_buf(), metrics })
    }

    fn line<T: Serialize>(&mut self, kind: &'static str, row: &T) -> Result<(), String> {
        let text = serde_json::to_string(&Tagged { kind, row }).expect("rows serialise");
        kiln_events::files::append_row(&mut self.metrics, &text).map_err(|e| format!("{}: cannot write: {e}", self.dir.join("metrics.jsonl").display()))
    }

    /// Appends an `error` row (`{"text":…}`): how a failed attempt ended, kept in the log.
    pub fn record_error(dir: &Path, text: &str) -> Result<(), String> {
        let mut files = Self::open(dir)?;
        files.line("error", &serde_json::json!({ "text": text }))?;
        files.sync()
    }

    /// The log made durable up to here (at each checkpoint: a resume never finds fewer rows than
    /// its checkpoint's steps).
    fn sync(&mut self) -> Result<(), String> {
        self.metrics.sync_data().map_err(|e| format!("{}: cannot sync: {e}", self.dir.join("metrics.jsonl").display()))
    }
}

/// Drops the rows of a `metrics.jsonl` whose `step` is past `step` (a resume or a rollback goes back
/// there, so the log continues as the run does); returns how many went.
pub fn drop_rows_after(path: &Path, step: usize) -> Result<usize, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    let beyond = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64())).is_some_and(|s| s as usize > step)
    };
    let kept: Vec<&str> = text.lines().filter(|l| !beyond(l)).collect();
    let dropped = text.lines().count() - kept.len();
    if dropped > 0 {
        let mut out = kept.join("\n");
        out.push('\n');
        write_atomic(path, out.as_bytes())?;
    }
    Ok(dropped)
}

pub use kiln_events::write_atomic;

impl EventSink for RunFiles {
    fn emit(&mut self, event: &Event) -> Result<(), String> {
        match event {
            Event::RunStarted(info) => self.line("start", info),
            Event::Data(report) => self.line("data", report),
            Event::Window(row) => self.line("train", row),
            Event::Validation(row) => self.line("valid", row),
            Event::Note(text) => self.line("note", &serde_json::json!({ "text": text })),
            Event::Checkpoint { epoch, step, path } => {
                self.line("checkpoint", &serde_json::json!({ "epoch": epoch, "step": step, "path": path }))?;
                self.sync()
            }
            Event::Finished(summary) => {
                let text = serde_json::to_string_pretty(summary).expect("summary serialises");
                write_atomic(&self.dir.join("summary.json"), text.as_bytes())
            }
            Event::Rollback { step } => {
                let path = self.dir.join("metrics.jsonl");
                drop_rows_after(&path, *step)?;
                // The file was replaced: append to the new one.
                *self = Self::open(&self.dir)?;
                self.line("rollback", &serde_json::json!({ "step": step }))
            }
            // Progress is for people watching; the log keeps the data report that follows it.
            Event::EpochEnd { .. } | Event::Progress(_) => Ok(()),
        }
    }
}
