//! `kiln sweep`: a grid of recipe values, each combination trained as its own run directory
//! inside one sweep directory, which holds `sweep.json` (the recipe, the grid and each
//! combination's status and figures). Every combination is checked as a recipe before anything
//! starts, so a bad key or value is refused in one line like `--set`. Running the same sweep again
//! skips the finished runs, resumes the stopped ones and starts those not yet begun.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use kiln_recipe::{Override, Recipe};
use serde::{Deserialize, Serialize};

use crate::list::{sort, RunRecord, SortBy, Status};

/// One `--grid key=v1,v2,…`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

/// Splits `text` at commas outside brackets and quotes (a value may be a TOML array).
fn split_values(text: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None);
    for c in text.chars() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            ('[' | '{', None) => depth += 1,
            (']' | '}', None) => depth -= 1,
            (',', None) if depth == 0 => {
                out.push(std::mem::take(&mut cur).trim().to_string());
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur.trim().to_string());
    out
}

impl Axis {
    pub fn parse(text: &str) -> Result<Axis, String> {
        let bad = |why: &str| format!("--grid {text}: {why}");
        let (key, values) = text.split_once('=').ok_or_else(|| bad("expected section.key=v1,v2,…"))?;
        let key = key.trim();
        // The key's form is `--set`'s.
        Override::parse(&format!("{key}=0")).map_err(|e| bad(&e.message))?;
        let values = split_values(values);
        if values.iter().any(String::is_empty) {
            return Err(bad("an empty value (expected v1,v2,… with none empty)"));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = values.iter().find(|v| !seen.insert(v.as_str())) {
            return Err(bad(&format!("{dup} is given twice")));
        }
        Ok(Axis { key: key.to_string(), values })
    }
}

/// One combination: its run directory's name and its overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Combination {
    pub name: String,
    pub set: Vec<String>,
}

/// A value as a piece of a directory name: characters of plain names only.
fn name_piece(value: &str) -> String {
    let piece: String = value.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+') { c } else { '_' }).collect();
    piece.chars().take(40).collect()
}

/// Every combination of the axes (the last axis varies fastest), named `NN-key=value_…` by
/// each key's last part (its whole path where two axes share one).
pub fn combinations(axes: &[Axis]) -> Result<Vec<Combination>, String> {
    if axes.is_empty() {
        return Err("--grid: expected at least one section.key=v1,v2,…".into());
    }
    for (i, a) in axes.iter().enumerate() {
        if axes[..i].iter().any(|b| b.key == a.key) {
            return Err(format!("--grid {}: the key is given twice", a.key));
        }
    }
    let total: usize = axes.iter().map(|a| a.values.len()).try_fold(1usize, |acc, n| acc.checked_mul(n)).filter(|&n| n <= 10_000).ok_or("--grid: more than 10,000 combinations")?;
    let short = |key: &str| key.rsplit('.').next().unwrap_or(key).to_string();
    let label = |key: &str| if axes.iter().filter(|a| short(&a.key) == short(key)).count() > 1 { key.replace('.', "-") } else { short(key) };
    let width = total.to_string().len().max(2);
    Ok((0..total)
        .map(|mut i| {
            let mut picks = vec![0; axes.len()];
            for (a, axis) in axes.iter().enumerate().rev() {
                picks[a] = i % axis.values.len();
                i /= axis.values.len();
            }
            let set: Vec<String> = axes.iter().zip(&picks).map(|(a, &p)| format!("{}={}", a.key, a.values[p])).collect();
            let parts: Vec<String> = axes.iter().zip(&picks).map(|(a, &p)| format!("{}={}", label(&a.key), name_piece(&a.values[p]))).collect();
            (set, parts)
        })
        .enumerate()
        .map(|(i, (set, parts))| Combination { name: format!("{:0width$}-{}", i + 1, parts.join("_")), set })
        .collect())
}

/// `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepFile {
    pub recipe: String,
    pub grid: Vec<Axis>,
    pub metric: String,
    pub combinations: Vec<CombinationState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CombinationState {
    pub name: String,
    pub set: Vec<String>,
    pub status: String,
    pub steps: usize,
    pub best_valid_loss: Option<f64>,
    pub best_bleu: Option<f64>,
    pub test_bleu: Option<f64>,
    pub wall_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A sweep, checked and laid out, ready to run.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub recipe: PathBuf,
    pub dir: PathBuf,
    pub grid: Vec<Axis>,
    pub metric: SortBy,
    pub combinations: Vec<Combination>,
}

impl Sweep {
    /// Checks every combination as a recipe (the first bad one is refused in the recipe's own
    /// one-line error) and that `dir`, if it holds a sweep already, holds this one.
    pub fn plan(recipe: &Path, grid: &[String], dir: Option<&Path>, metric: SortBy) -> Result<Sweep, String> {
        let axes: Vec<Axis> = grid.iter().map(|g| Axis::parse(g)).collect::<Result<_, _>>()?;
        let combinations = combinations(&axes)?;
        let mut name = String::new();
        for c in &combinations {
            let overrides = c.set.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
            let r = Recipe::load(recipe, &overrides).map_err(|e| format!("--grid: {e}"))?;
            name = r.name;
        }
        let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("runs").join("sweeps").join(&name));
        let recipe_abs = std::path::absolute(recipe).unwrap_or_else(|_| recipe.to_path_buf());
        let file = dir.join("sweep.json");
        if let Ok(text) = std::fs::read_to_string(&file) {
            let old: SweepFile = serde_json::from_str(&text).map_err(|e| format!("{}: not a sweep file: {e}", file.display()))?;
            if old.grid != axes || old.recipe != recipe_abs.display().to_string() {
                return Err(format!("{}: holds another sweep (recipe {}, {} axes); choose another directory with --dir", file.display(), old.recipe, old.grid.len()));
            }
        }
        Ok(Sweep { recipe: recipe_abs, dir, grid: axes, metric, combinations })
    }

    pub fn run_dir(&self, c: &Combination) -> PathBuf {
        self.dir.join(&c.name)
    }

    /// What running a combination means now: nothing (finished, running elsewhere, failed), a
    /// resume (stopped with a checkpoint) or a start (not begun, or stopped before one).
    pub fn action(&self, c: &Combination) -> Action {
        let dir = self.run_dir(c);
        match RunRecord::read(&dir) {
            Err(_) => Action::Start,
            Ok(r) => match r.status {
                Status::Finished => Action::Skip("finished"),
                Status::Running => Action::Skip("running in another process"),
                Status::Failed => Action::Skip("failed (see its metrics.jsonl; resume it with kiln train --resume)"),
                Status::Stopped if dir.join("checkpoints").join("latest").is_file() => Action::Resume,
                Status::Stopped => Action::Start,
            },
        }
    }

    /// The `kiln train` command of a combination (`exe` is kiln itself).
    pub fn command(&self, exe: &Path, c: &Combination, action: Action) -> Option<Command> {
        let dir = self.run_dir(c);
        let mut cmd = Command::new(exe);
        match action {
            Action::Skip(_) => return None,
            Action::Resume => {
                cmd.arg("train").arg("--resume").arg(&dir);
            }
            Action::Start => {
                cmd.arg("train").arg(&self.recipe).arg("--run-dir").arg(&dir);
                for s in &c.set {
                    cmd.arg("--set").arg(s);
                }
            }
        }
        cmd.arg("--no-tui");
        Some(cmd)
    }

    /// Runs what is left, `parallel` processes at a time, each one's output in
    /// `<sweep>/<combination>.log`; `say` gets a line per start and end. Writes `sweep.json`
    /// after each run ends. Returns how many runs failed now.
    pub fn run(&self, exe: &Path, parallel: usize, say: &mut dyn FnMut(String)) -> Result<usize, String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: cannot create: {e}", self.dir.display()))?;
        self.write_file()?;
        let mut queue: std::collections::VecDeque<(usize, Action)> = self.combinations.iter().enumerate().map(|(i, c)| (i, self.action(c))).collect();
        let mut running: Vec<(usize, Child)> = Vec::new();
        let mut failed = 0;
        let total = self.combinations.len();
        loop {
            while running.len() < parallel.max(1) {
                let Some((i, action)) = queue.pop_front() else { break };
                let c = &self.combinations[i];
                let Some(mut cmd) = self.command(exe, c, action) else {
                    if let Action::Skip(why) = action {
                        say(format!("sweep [{}/{total}] {}: {why}, skipped", i + 1, c.name));
                    }
                    continue;
                };
                let log_path = self.dir.join(format!("{}.log", c.name));
                let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| format!("{}: cannot open: {e}", log_path.display()))?;
                let err = log.try_clone().map_err(|e| format!("{}: {e}", log_path.display()))?;
                cmd.stdout(Stdio::from(log)).stderr(Stdio::from(err)).stdin(Stdio::null());
                let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
                let verb = if action == Action::Resume { "resuming" } else { "starting" };
                say(format!("sweep [{}/{total}] {}: {verb} ({}), log {}", i + 1, c.name, c.set.join(" "), log_path.display()));
                running.push((i, child));
            }
            if running.is_empty() {
                break;
            }
            // Wait for whichever ends first.
            let done = loop {
                if let Some(k) = running.iter_mut().position(|(_, child)| child.try_wait().ok().flatten().is_some()) {
                    break k;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            };
            let (i, mut child) = running.swap_remove(done);
            let status = child.wait().map_err(|e| e.to_string())?;
            let c = &self.combinations[i];
            if status.success() {
                say(format!("sweep [{}/{total}] {}: done", i + 1, c.name));
            } else {
                failed += 1;
                say(format!("sweep [{}/{total}] {}: ended with exit code {} (see {})", i + 1, c.name, status.code().unwrap_or(-1), self.dir.join(format!("{}.log", c.name)).display()));
            }
            self.write_file()?;
        }
        self.write_file()?;
        Ok(failed)
    }

    /// The combinations' records that exist, sorted by the sweep's metric.
    pub fn records(&self) -> Vec<RunRecord> {
        let mut records: Vec<RunRecord> = self.combinations.iter().filter_map(|c| RunRecord::read(&self.run_dir(c)).ok()).collect();
        sort(&mut records, self.metric);
        records
    }

    fn write_file(&self) -> Result<(), String> {
        let combinations = self
            .combinations
            .iter()
            .map(|c| {
                let r = RunRecord::read(&self.run_dir(c)).ok();
                CombinationState {
                    name: c.name.clone(),
                    set: c.set.clone(),
                    status: r.as_ref().map_or("not started", |r| r.status.name()).to_string(),
                    steps: r.as_ref().map_or(0, |r| r.steps),
                    best_valid_loss: r.as_ref().and_then(|r| r.best_valid_loss),
                    best_bleu: r.as_ref().and_then(|r| r.best_bleu),
                    test_bleu: r.as_ref().and_then(|r| r.test_bleu),
                    wall_s: r.as_ref().and_then(|r| r.wall_s),
                    error: r.and_then(|r| r.error),
                }
            })
            .collect();
        let metric = match self.metric {
            SortBy::Bleu => "bleu",
            SortBy::ValidLoss => "valid_loss",
            SortBy::Path => "path",
        };
        let file = SweepFile { recipe: self.recipe.display().to_string(), grid: self.grid.clone(), metric: metric.into(), combinations };
        kiln_events::write_atomic(&self.dir.join("sweep.json"), serde_json::to_string_pretty(&file).expect("serialises").as_bytes())
    }
}

/// What a sweep does with a combination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Resume,
    Skip(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_expand_to_named_combinations() {
        let axes = vec![Axis::parse("train.lr=1e-3,2e-3").unwrap(), Axis::parse("loader.max_tokens=[[32, 800], [66, 600]],1024").unwrap()];
        assert_eq!(axes[1].values, vec!["[[32, 800], [66, 600]]".to_string(), "1024".to_string()]);
        let c = combinations(&axes).unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].set, vec!["train.lr=1e-3".to_string(), "loader.max_tokens=[[32, 800], [66, 600]]".to_string()]);
        assert_eq!(c[1].name, "02-lr=1e-3_max_tokens=1024");
        assert_eq!(c[3].set, vec!["train.lr=2e-3".to_string(), "loader.max_tokens=1024".to_string()]);
        assert!(c.iter().all(|c| kiln_recipe::is_plain_name(&c.name)), "{c:?}");
        // Two keys ending alike are told apart by their whole path.
        let twins = combinations(&[Axis::parse("train.seed=1,2").unwrap(), Axis::parse("data.seed=3").unwrap()]).unwrap();
        assert_eq!(twins[0].name, "01-train-seed=1_data-seed=3");
        assert!(Axis::parse("train.lr").unwrap_err().contains("expected section.key=v1,v2"));
        assert!(Axis::parse("train.lr=1,,2").unwrap_err().contains("empty value"));
        assert!(Axis::parse("train.lr=1,1").unwrap_err().contains("twice"));
        assert!(combinations(&[Axis::parse("train.lr=1").unwrap(), Axis::parse("train.lr=2").unwrap()]).unwrap_err().contains("given twice"));
    }
}
