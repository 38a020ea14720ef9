//! Following a run directory: `metrics.jsonl` as it grows, then `summary.json` when the run ends.
//! Works the same on a live run (another process writing) and a finished one (replay).

use std::path::{Path, PathBuf};

use kiln_events::{Event, Summary};
use kiln_views::metrics_log::MetricsReader;

use crate::state::DashboardState;

pub struct RunFollower {
    dir: PathBuf,
    reader: MetricsReader,
    done: bool,
}

impl RunFollower {
    pub fn open(run_dir: &Path) -> Result<Self, String> {
        // A recipe run has its recipe.toml; a library run (kiln's `Trainer`, or a burn-train
        // program with kiln's renderer) only its log.
        if !run_dir.join("recipe.toml").is_file() && !run_dir.join("metrics.jsonl").is_file() {
            return Err(format!("{}: not a kiln run directory (no recipe.toml, no metrics.jsonl)", run_dir.display()));
        }
        Ok(Self { dir: run_dir.to_path_buf(), reader: MetricsReader::new(&run_dir.join("metrics.jsonl")), done: false })
    }

    /// Applies what is new; returns whether anything changed.
    pub fn update(&mut self, state: &mut DashboardState) -> Result<bool, String> {
        if self.done {
            return Ok(false);
        }
        let mut changed = false;
        for e in self.reader.poll()? {
            state.apply(&e);
            changed = true;
        }
        let summary_path = self.dir.join("summary.json");
        // summary.json is written (atomically) after the last metrics line: once it is there,
        // the metrics file is complete.
        if summary_path.is_file() && !state.finished {
            for e in self.reader.poll()? {
                state.apply(&e);
            }
            self.reader.finish();
            let text = std::fs::read_to_string(&summary_path).map_err(|e| format!("{}: cannot read: {e}", summary_path.display()))?;
            match serde_json::from_str::<Summary>(&text) {
                Ok(s) => state.apply(&Event::Finished(s)),
                Err(e) => state.apply(&Event::Note(format!("{}: unreadable ({e})", summary_path.display()))),
            }
            state.finished = true;
            state.mode = "replay".into();
            self.done = true;
            changed = true;
        }
        if state.malformed_lines != self.reader.malformed {
            state.malformed_lines = self.reader.malformed;
            changed = true;
        }
        Ok(changed)
    }
}

/// The whole state of a run directory as it is now (what `watch` shows first).
pub fn load_run(run_dir: &Path) -> Result<DashboardState, String> {
    let mut follower = RunFollower::open(run_dir)?;
    let mut state = DashboardState::new("watching");
    follower.update(&mut state)?;
    Ok(state)
}
