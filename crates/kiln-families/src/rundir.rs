//! The run directory: `runs/<recipe name>/<UTC timestamp>/` by default, holding `recipe.toml`
//! (resolved), `tokenizer.json`, `checkpoints/`, `metrics.jsonl` and `summary.json`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use kiln_events::RunLock;
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

/// Creates a new run directory, exclusively (a name another process created first is not
/// shared: the timestamped default takes the next `-N`), takes its lock, refuses a directory that
/// already holds a run with a checkpoint, and writes the resolved recipe into it. The lock is held while the
/// returned [`RunLock`] lives.
pub fn create(recipe: &Recipe, explicit: Option<&Path>) -> Result<(PathBuf, RunLock)> {
    let dir = match explicit {
        Some(d) => {
            match std::fs::create_dir_all(kiln_events::files::parent_of(d)).and_then(|_| std::fs::create_dir(d)) {
                Ok(()) => {}
                // An existing directory may take a new run if it holds none (checked under the lock).
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
                Err(e) => bail!("{}: cannot create run directory: {e}", d.display()),
            }
            d.to_path_buf()
        }
        None => {
            let base = Path::new("runs").join(&recipe.name);
            std::fs::create_dir_all(&base).with_context(|| format!("{}: cannot create", base.display()))?;
            let stamp = timestamp(SystemTime::now());
            let mut n = 1;
            loop {
                let dir = if n == 1 { base.join(&stamp) } else { base.join(format!("{stamp}-{n}")) };
                match std::fs::create_dir(&dir) {
                    Ok(()) => break dir,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 10_000 => n += 1,
                    Err(e) => bail!("{}: cannot create run directory: {e}", dir.display()),
                }
            }
        }
    };
    let lock = RunLock::acquire(&dir).map_err(anyhow::Error::msg)?;
    if holds_checkpoints(&dir) {
        bail!("{}: already holds a run; continue it with --resume {} or choose another --run-dir", dir.display(), dir.display());
    }
    // A run that failed before its first checkpoint starts again in place: its log is kept and
    // continues (the new `start` row follows the attempt's `error` row).
    kiln_events::write_atomic(&dir.join("recipe.toml"), recipe.to_toml().as_bytes()).map_err(anyhow::Error::msg)?;
    Ok((dir, lock))
}

/// Whether a run directory holds a run that saved a checkpoint (what a new run must not overwrite
/// and `--resume` continues).
pub fn holds_checkpoints(dir: &Path) -> bool {
    !kiln_train::checkpoint::list(dir).is_empty() || kiln_train::checkpoint::checkpoints_dir(dir).join("latest").exists()
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
