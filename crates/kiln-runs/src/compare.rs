//! `kiln compare`: runs side by side. The recipe keys whose values differ, the figures of each
//! run, the validations epoch by epoch (readable in a terminal), and overlay charts written as
//! PNGs: training loss against step and against wall time, validation loss and BLEU against step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::list::{align, duration, RunRecord};

/// Every leaf of a recipe as `section.key = value` (values as TOML writes them).
fn flatten(table: &toml::Table, prefix: &str, out: &mut BTreeMap<String, String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            toml::Value::Table(t) => flatten(t, &path, out),
            other => {
                out.insert(path, other.to_string());
            }
        }
    }
}

/// Keys holding a path: compared as the files they name (`a/../b` and `b` are one file).
const PATH_KEYS: [&str; 5] = ["data.train", "data.valid", "data.test", "tokenizer.path", "loader.cache_dir"];

/// A run's resolved recipe, flattened.
pub fn recipe_keys(dir: &Path) -> Result<BTreeMap<String, String>, String> {
    let path = dir.join("recipe.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: not a recipe: {}", path.display(), e.message()))?;
    let mut out = BTreeMap::new();
    flatten(&table, "", &mut out);
    for key in PATH_KEYS {
        if let Some(v) = out.get_mut(key) {
            let raw = v.trim_matches('"');
            if let Ok(real) = std::fs::canonicalize(raw) {
                *v = format!("{:?}", real.display().to_string());
            }
        }
    }
    Ok(out)
}

/// The keys whose values are not the same in every run (a key a run lacks shows as `-`: an
/// older recipe without it), each with the runs' values in order.
pub fn differences(runs: &[RunRecord]) -> Result<Vec<(String, Vec<String>)>, String> {
    let keys: Vec<BTreeMap<String, String>> = runs.iter().map(|r| recipe_keys(&r.dir)).collect::<Result<_, _>>()?;
    let all: std::collections::BTreeSet<&String> = keys.iter().flat_map(|k| k.keys()).collect();
    Ok(all
        .into_iter()
        .filter_map(|key| {
            let values: Vec<String> = keys.iter().map(|k| k.get(key).cloned().unwrap_or_else(|| "-".into())).collect();
            values.iter().any(|v| *v != values[0]).then(|| (key.clone(), values))
        })
        .collect())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

/// Short column names for the runs: their directory names, or their paths when those repeat.
pub fn labels(runs: &[RunRecord]) -> Vec<String> {
    let names: Vec<String> = runs.iter().map(|r| r.dir.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    let unique = names.iter().collect::<std::collections::BTreeSet<_>>().len() == names.len();
    if unique { names } else { runs.iter().map(|r| r.dir.display().to_string()).collect() }
}

/// The whole comparison as text: differing keys, figures, validations by epoch.
pub fn report(runs: &[RunRecord]) -> Result<String, String> {
    let labels = labels(runs);
    let header = |first: &str| std::iter::once(first.to_string()).chain(labels.iter().cloned()).collect::<Vec<_>>();
    let mut out = String::new();
    let diffs = differences(runs)?;
    out.push_str("recipe keys that differ\n");
    if diffs.is_empty() {
        out.push_str("  (none: the runs share one recipe)\n");
    } else {
        let mut rows = vec![header("key")];
        rows.extend(diffs.into_iter().map(|(k, v)| std::iter::once(k).chain(v).collect()));
        out.push_str(&indent(&align(&rows)));
    }
    out.push_str("\nfigures\n");
    let figure = |name: &str, f: &dyn Fn(&RunRecord) -> String| std::iter::once(name.to_string()).chain(runs.iter().map(f)).collect::<Vec<_>>();
    let mut rows = vec![
        header(""),
        figure("status", &|r| r.status.name().into()),
        figure("steps", &|r| r.steps.to_string()),
        figure("best valid loss", &|r| opt(r.best_valid_loss, 4)),
        figure("best valid BLEU", &|r| opt(r.best_bleu, 2)),
    ];
    // Named validation sets, by name, in every run that has them.
    let sets: std::collections::BTreeSet<&String> = runs.iter().flat_map(|r| r.best_dev.keys()).collect();
    for name in sets {
        rows.push(figure(&format!("best {name} loss"), &|r| opt(r.best_dev.get(name).and_then(|d| d.0), 4)));
        rows.push(figure(&format!("best {name} BLEU"), &|r| opt(r.best_dev.get(name).and_then(|d| d.1), 2)));
    }
    rows.extend([
        figure("test loss", &|r| opt(r.summary.as_ref().and_then(|s| s.test.as_ref()).map(|t| t.loss), 4)),
        figure("test BLEU", &|r| opt(r.test_bleu, 2)),
        figure("tokens/s", &|r| r.tokens_per_s.map(|t| format!("{t:.0}")).unwrap_or_else(|| "-".into())),
        figure("wall", &|r| r.wall_s.map(duration).unwrap_or_else(|| "-".into())),
        figure("commit", &|r| if r.commit.is_empty() { "-".into() } else { r.commit.clone() }),
    ]);
    out.push_str(&indent(&align(&rows)));
    let epochs = runs.iter().flat_map(|r| r.valid.iter().map(|v| v.epoch)).max().unwrap_or(0);
    if epochs > 0 {
        out.push_str("\nvalidation by epoch: loss / BLEU\n");
        let mut rows = vec![header("epoch")];
        for e in 1..=epochs {
            let cells = runs.iter().map(|r| match r.valid.iter().rev().find(|v| v.epoch == e) {
                Some(v) => match v.bleu {
                    Some(b) => format!("{:.4} / {b:.2}", v.loss),
                    None => format!("{:.4}", v.loss),
                },
                None => "-".into(),
            });
            rows.push(std::iter::once(e.to_string()).chain(cells).collect());
        }
        out.push_str(&indent(&align(&rows)));
    }
    Ok(out)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// Writes the overlay charts into `out`: `loss-by-step.png`, `loss-by-time.png`,
/// `valid-loss.png` and, when any run has validation BLEU, `valid-bleu.png`. Returns their paths.
pub fn charts(runs: &[RunRecord], out: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: cannot create: {e}", out.display()))?;
    let labels = labels(runs);
    let series = |f: &dyn Fn(&RunRecord) -> Vec<(f64, f64)>| labels.iter().cloned().zip(runs.iter().map(f)).collect::<Vec<_>>();
    let by_step = series(&|r| r.windows.iter().filter(|w| w.loss.is_finite()).map(|w| (w.step as f64, w.loss)).collect());
    let by_time = series(&|r| r.windows.iter().filter(|w| w.loss.is_finite()).map(|w| (w.wall_s, w.loss)).collect());
    let valid = series(&|r| r.valid.iter().filter(|v| v.loss.is_finite()).map(|v| (v.step as f64, v.loss)).collect());
    let bleu = series(&|r| r.valid.iter().filter_map(|v| v.bleu.map(|b| (v.step as f64, b))).collect());
    let mut written = Vec::new();
    let mut draw = |file: &str, caption: &str, x: &str, y: &str, data: &[(String, Vec<(f64, f64)>)]| -> Result<(), String> {
        if data.iter().all(|(_, d)| d.is_empty()) {
            return Ok(());
        }
        let path = out.join(file);
        kiln_views::plots::overlay(&path, caption, x, y, data)?;
        written.push(path);
        Ok(())
    };
    draw("loss-by-step.png", "training loss (per sync window)", "optimizer step", "loss (nats/token)", &by_step)?;
    draw("loss-by-time.png", "training loss against wall time", "wall time (s)", "loss (nats/token)", &by_time)?;
    draw("valid-loss.png", "validation loss", "optimizer step", "loss (nats/token)", &valid)?;
    draw("valid-bleu.png", "validation BLEU", "optimizer step", "BLEU", &bleu)?;
    Ok(written)
}
