//! The run directory's machine-readable files: `metrics.jsonl` (one JSON object per line, flushed
//! per line so a live run can be followed) and `summary.json` (written atomically at the end).
//!
//! Rows of `metrics.jsonl` by `"kind"`: `start` (the run's facts, once per process), `train` (a
//! sync window), `valid` (a validation), `note` (`{"text":…}`), `checkpoint`. Readers skip kinds
//! they do not know.

use std::fs::{File, OpenOptions};
use std::io::Write;
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
        writeln!(self.metrics, "{text}")
            .and_then(|_| self.metrics.flush())
            .map_err(|e| format!("{}: cannot write: {e}", self.dir.join("metrics.jsonl").display()))
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: cannot write: {e}", path.display())
    })
}

impl EventSink for RunFiles {
    fn emit(&mut self, event: &Event) -> Result<(), String> {
        match event {
            Event::RunStarted(info) => self.line("start", info),
            Event::Window(row) => self.line("train", row),
            Event::Validation(row) => self.line("valid", row),
            Event::Note(text) => self.line("note", &serde_json::json!({ "text": text })),
            Event::Checkpoint { epoch, step, path } => self.line("checkpoint", &serde_json::json!({ "epoch": epoch, "step": step, "path": path })),
            Event::Finished(summary) => {
                let text = serde_json::to_string_pretty(summary).expect("summary serialises");
                write_atomic(&self.dir.join("summary.json"), text.as_bytes())
            }
            Event::EpochEnd { .. } => Ok(()),
        }
    }
}
