//! The run directory: `runs/<recipe name>/<UTC timestamp>/` by default, holding `recipe.toml`
//! (resolved), `tokenizer.json`, `checkpoints/`, `metrics.jsonl` and `summary.json`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use kiln_recipe::Recipe;

/// `YYYY-MM-DDTHH-MM-SS` in UTC (no colons: safe in file names everywhere).
pub fn timestamp(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}-{:02}-{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Creates a new run directory (refusing one that already holds a run) and writes the resolved
/// recipe into it. Returns the directory and whether this call created it.
pub fn create(recipe: &Recipe, explicit: Option<&Path>) -> Result<(PathBuf, bool)> {
    let dir = match explicit {
        Some(d) => d.to_path_buf(),
        None => {
            let base = Path::new("runs").join(&recipe.name);
            let stamp = timestamp(SystemTime::now());
            let mut dir = base.join(&stamp);
            let mut n = 1;
            while dir.exists() {
                n += 1;
                dir = base.join(format!("{stamp}-{n}"));
            }
            dir
        }
    };
    if dir.join("recipe.toml").exists() {
        bail!("{}: already holds a run; continue it with --resume {} or choose another --run-dir", dir.display(), dir.display());
    }
    let created = !dir.exists();
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create run directory", dir.display()))?;
    kiln_events::write_atomic(&dir.join("recipe.toml"), recipe.to_toml().as_bytes()).map_err(anyhow::Error::msg)?;
    Ok((dir, created))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00-00-00");
        // 2026-11-29 03:43:36 UTC
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_secs(1_795_923_816)), "2026-11-29T03-43-36");
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00-00-00");
    }
}
