//! One run directory read as a record ([`RunRecord::read`]): its name, its status, its steps and
//! figures, the commit it ran at; and the runs under a folder ([`find_runs`]), for `kiln runs`.

use std::path::{Path, PathBuf};

use kiln_events::{Event, RunLock, Summary};

/// Where a run stands, from its files and its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// A process holds the run's lock now.
    Running,
    /// `summary.json` says it reached its end (its epochs, `max_steps` or early stopping).
    Finished,
    /// It ended before its end and can be continued with `--resume`: stopped on request, or
    /// killed (no summary, no error).
    Stopped,
    /// Its last attempt ended with an error (or a non-finite loss).
    Failed,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Finished => "finished",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
        }
    }
}

/// A run directory's figures.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub dir: PathBuf,
    /// The recipe's `name`.
    pub name: String,
    pub status: Status,
    pub steps: usize,
    pub total_steps: usize,
    /// Lowest validation loss and highest validation BLEU of any validation.
    pub best_valid_loss: Option<f64>,
    pub best_bleu: Option<f64>,
    /// The same, per named validation set (`eval.sets`).
    pub best_dev: std::collections::BTreeMap<String, (Option<f64>, Option<f64>)>,
    /// BLEU of the final model on the test split (`summary.json`).
    pub test_bleu: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub wall_s: Option<f64>,
    pub commit: String,
    /// The error line of a failed run.
    pub error: Option<String>,
    pub summary: Option<Summary>,
    /// Every validation row, in order (for charts and comparisons).
    pub valid: Vec<kiln_events::ValidRow>,
    /// Every training window, in order.
    pub windows: Vec<kiln_events::WindowRow>,
}

/// Whether `dir` looks like a run directory (kiln wrote its recipe or its log there).
pub fn is_run_dir(dir: &Path) -> bool {
    dir.join("recipe.toml").is_file() && (dir.join("metrics.jsonl").is_file() || dir.join("checkpoints").is_dir())
}

/// Run directories under `root` (or `root` itself), at most four levels down
/// (`runs/<name>/<time>/`, `runs/sweeps/<sweep>/<combination>/`), in path order.
pub fn find_runs(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        if is_run_dir(dir) {
            out.push(dir.to_path_buf());
            return;
        }
        if depth == 0 {
            return;
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))).collect();
        entries.sort();
        for entry in entries {
            if entry.file_name().is_some_and(|n| n == "checkpoints") {
                continue;
            }
            walk(&entry, depth - 1, out);
        }
    }
    let mut out = Vec::new();
    walk(root, 4, &mut out);
    out
}

/// The `text` of the log's last `error` row when it comes after the last `start` row: how the
/// latest attempt ended. Read from the raw rows: the event reader keeps no errors.
fn last_error(metrics: &Path) -> Option<String> {
    let text = std::fs::read_to_string(metrics).ok()?;
    let mut error = None;
    for line in text.lines() {
        let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        match row.get("kind").and_then(|k| k.as_str()) {
            Some("start") => error = None,
            Some("error") => error = row.get("text").and_then(|t| t.as_str()).map(str::to_string),
            _ => {}
        }
    }
    error
}

impl RunRecord {
    /// Reads a run directory; a directory that is not one is refused in one line.
    pub fn read(dir: &Path) -> Result<RunRecord, String> {
        if !is_run_dir(dir) {
            return Err(format!("{}: not a kiln run directory (no recipe.toml with a metrics.jsonl or checkpoints/)", dir.display()));
        }
        let recipe_path = dir.join("recipe.toml");
        let recipe_text = std::fs::read_to_string(&recipe_path).map_err(|e| format!("{}: cannot read: {e}", recipe_path.display()))?;
        let recipe: toml::Table = toml::from_str(&recipe_text).map_err(|e| format!("{}: not a recipe: {}", recipe_path.display(), e.message()))?;
        let name = recipe.get("name").and_then(|n| n.as_str()).filter(|n| !n.is_empty()).map(str::to_string).unwrap_or_else(|| dir.file_name().unwrap_or_default().to_string_lossy().into_owned());
        let metrics = dir.join("metrics.jsonl");
        let events = if metrics.is_file() { kiln_views::metrics_log::read_all(&metrics)?.0 } else { Vec::new() };
        let summary: Option<Summary> = std::fs::read_to_string(dir.join("summary.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
        let mut record = RunRecord {
            dir: dir.to_path_buf(),
            name,
            status: Status::Stopped,
            steps: 0,
            total_steps: 0,
            best_valid_loss: None,
            best_bleu: None,
            best_dev: Default::default(),
            test_bleu: summary.as_ref().and_then(|s| s.test.as_ref()).and_then(|t| t.bleu),
            tokens_per_s: summary.as_ref().map(|s| s.tokens_per_s),
            wall_s: summary.as_ref().map(|s| s.wall_s),
            commit: String::new(),
            error: None,
            summary: None,
            valid: Vec::new(),
            windows: Vec::new(),
        };
        for event in events {
            match event {
                Event::RunStarted(info) => {
                    record.total_steps = info.total_steps;
                    if !info.commit.is_empty() {
                        record.commit = info.commit;
                    }
                }
                Event::Window(w) => {
                    record.steps = record.steps.max(w.step);
                    record.windows.push(w);
                }
                Event::Validation(v) if v.set.is_some() => {
                    let (loss, bleu) = record.best_dev.entry(v.set.clone().unwrap_or_default()).or_default();
                    if v.loss.is_finite() {
                        *loss = Some(loss.map_or(v.loss, |b: f64| b.min(v.loss)));
                    }
                    if let Some(b) = v.bleu.filter(|b| b.is_finite()) {
                        *bleu = Some(bleu.map_or(b, |x: f64| x.max(b)));
                    }
                }
                Event::Validation(v) => {
                    if v.loss.is_finite() {
                        record.best_valid_loss = Some(record.best_valid_loss.map_or(v.loss, |b| b.min(v.loss)));
                    }
                    if let Some(bleu) = v.bleu.filter(|b| b.is_finite()) {
                        record.best_bleu = Some(record.best_bleu.map_or(bleu, |b| b.max(bleu)));
                    }
                    record.valid.push(v);
                }
                // Rows past a rollback's step no longer describe the run.
                Event::Rollback { step } => {
                    record.windows.retain(|w| w.step <= step);
                    record.valid.retain(|v| v.step <= step);
                }
                _ => {}
            }
        }
        if record.tokens_per_s.is_none() && !record.windows.is_empty() {
            let (tokens, secs) = record.windows.iter().fold((0u64, 0.0), |(t, s), w| (t + w.tokens, s + w.window_s));
            record.tokens_per_s = (secs > 0.0).then(|| tokens as f64 / secs);
        }
        if record.wall_s.is_none() {
            record.wall_s = record.windows.last().map(|w| w.wall_s);
        }
        if let Some(s) = &summary {
            record.steps = s.steps;
        }
        record.error = last_error(&metrics);
        record.status = if RunLock::held_elsewhere(dir) {
            Status::Running
        } else if let Some(s) = &summary {
            if s.stopped { Status::Stopped } else { Status::Finished }
        } else if record.error.is_some() {
            Status::Failed
        } else {
            Status::Stopped
        };
        record.summary = summary;
        Ok(record)
    }
}

/// How `kiln runs` orders its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    /// By directory (names, then the time stamps inside them).
    Path,
    /// Best validation loss first.
    ValidLoss,
    /// Highest BLEU first (test BLEU where there is one, else the best validation BLEU).
    Bleu,
}

impl SortBy {
    pub fn parse(text: &str) -> Result<SortBy, String> {
        match text {
            "path" => Ok(SortBy::Path),
            "valid_loss" => Ok(SortBy::ValidLoss),
            "bleu" => Ok(SortBy::Bleu),
            other => Err(format!("--sort: expected path, valid_loss or bleu, got {other:?}")),
        }
    }
}

impl RunRecord {
    /// The BLEU a run is known by: its test BLEU, else its best validation BLEU.
    pub fn bleu(&self) -> Option<f64> {
        self.test_bleu.or(self.best_bleu)
    }
}

/// Sorts records; runs without the figure go last, ties by path.
pub fn sort(records: &mut [RunRecord], by: SortBy) {
    let key = |r: &RunRecord| -> Option<f64> {
        match by {
            SortBy::Path => None,
            SortBy::ValidLoss => r.best_valid_loss,
            SortBy::Bleu => r.bleu().map(|b| -b),
        }
    };
    records.sort_by(|a, b| match (key(a), key(b)) {
        (Some(x), Some(y)) => x.total_cmp(&y).then_with(|| a.dir.cmp(&b.dir)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.dir.cmp(&b.dir),
    });
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

/// Seconds as `1h02m`, `12m05s` or `42s`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The `kiln runs` table: a header and one line per run, columns aligned.
pub fn table(records: &[RunRecord], root: &Path) -> String {
    let mut rows = vec![["run", "name", "status", "steps", "valid loss", "valid BLEU", "test BLEU", "tok/s", "wall", "commit"].map(String::from).to_vec()];
    for r in records {
        let shown = r.dir.strip_prefix(root).ok().filter(|p| !p.as_os_str().is_empty()).unwrap_or(&r.dir);
        let steps = if r.total_steps > 0 && r.status != Status::Finished { format!("{}/{}", r.steps, r.total_steps) } else { r.steps.to_string() };
        rows.push(vec![
            shown.display().to_string(),
            r.name.clone(),
            r.status.name().to_string(),
            steps,
            opt(r.best_valid_loss, 4),
            opt(r.best_bleu, 2),
            opt(r.test_bleu, 2),
            r.tokens_per_s.map(|t| format!("{t:.0}")).unwrap_or_else(|| "-".into()),
            r.wall_s.map(duration).unwrap_or_else(|| "-".into()),
            if r.commit.is_empty() { "-".into() } else { r.commit.clone() },
        ]);
    }
    align(&rows)
}

/// Rows as columns padded to their widest cell, two spaces apart; a column whose cells (below
/// the header) are all numbers or `-` is right-aligned.
pub fn align(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let is_number = |s: &str| s == "-" || s.parse::<f64>().is_ok();
    let numeric_col: Vec<bool> = (0..cols).map(|c| rows.iter().skip(1).filter_map(|r| r.get(c)).all(|s| is_number(s)) && rows.iter().skip(1).any(|r| r.get(c).is_some_and(|s| s != "-"))).collect();
    let numeric = |c: usize, s: &str| numeric_col[c] && is_number(s);
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let pad = widths[c].saturating_sub(s.chars().count());
                if numeric(c, s) { format!("{}{s}", " ".repeat(pad)) } else { format!("{s}{}", " ".repeat(pad)) }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
