//! Durable run files: whole-file writes that readers never see half done ([`write_atomic`]),
//! directory syncs after renames ([`sync_dir`]), log rows appended in one write ([`append_row`]),
//! and the one-process-per-run-directory lock ([`RunLock`]). Everything that writes into a run
//! directory or a cache goes through here, so the durability rules live in one place.
//!
//! The lock is the operating system's advisory file lock (`flock` on Unix, `LockFileEx` on
//! Windows) through `std::fs::File::try_lock` (stable since Rust 1.89), so no lock crate is needed:
//! the kernel releases it when the process ends, however it ends (kill -9 included), so a stale
//! lock never blocks a later resume.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file (named for this process), an fsync, a rename
/// and an fsync of the directory, so readers never see half a file and the new name survives a
/// power cut. Every run-directory file that is rewritten whole goes through here.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: cannot write: {e}", path.display())
    })?;
    sync_dir(parent_of(path))
}

/// The directory a path's name lives in (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Fsyncs a directory, so the names created, renamed or removed in it are durable. On systems
/// where a directory cannot be opened for syncing (Windows) this does nothing.
pub fn sync_dir(dir: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: cannot sync directory: {e}", dir.display()))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Appends one log row (`text` plus its newline) in a single write, so a crash leaves either the
/// whole row or a torn tail that [`cut_torn_tail`] removes, never a row merged with the next.
pub fn append_row(file: &mut File, text: &str) -> std::io::Result<()> {
    let mut row = String::with_capacity(text.len() + 1);
    row.push_str(text);
    row.push('\n');
    file.write_all(row.as_bytes())?;
    file.flush()
}

/// Cuts a torn last row from a line log (`metrics.jsonl`): bytes after the last newline, left by a
/// crash during a write. Returns how many bytes went (0 when the file ends with a newline or does
/// not exist).
pub fn cut_torn_tail(path: &Path) -> Result<u64, String> {
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok(0);
    }
    // Read backwards in blocks until a newline: a torn row is at most one row long.
    let mut end_of_rows = 0u64;
    let mut pos = len;
    let mut block = vec![0u8; 64 * 1024];
    'search: while pos > 0 {
        let start = pos.saturating_sub(block.len() as u64);
        let n = (pos - start) as usize;
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        file.read_exact(&mut block[..n]).map_err(io)?;
        if let Some(i) = block[..n].iter().rposition(|&b| b == b'\n') {
            end_of_rows = start + i as u64 + 1;
            break 'search;
        }
        pos = start;
    }
    if end_of_rows == len {
        return Ok(0);
    }
    file.set_len(end_of_rows).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(len - end_of_rows)
}

/// Exclusive ownership of a run directory for the life of the process: `<dir>/.lock`, locked by
/// the OS and holding the owner's pid. Within one process the lock is shared (taking it again
/// gives the same lock), so the command, the session and the trainer may each ask for it; the
/// last handle dropped, or the process's end, releases it.
#[derive(Debug, Clone)]
pub struct RunLock {
    held: std::sync::Arc<HeldLock>,
}

#[derive(Debug)]
struct HeldLock {
    _file: File,
    path: PathBuf,
}

/// The run directories this process holds, by canonical path.
fn held_here() -> &'static std::sync::Mutex<std::collections::HashMap<PathBuf, std::sync::Weak<HeldLock>>> {
    static HELD: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<PathBuf, std::sync::Weak<HeldLock>>>> = std::sync::OnceLock::new();
    HELD.get_or_init(Default::default)
}

impl RunLock {
    pub const FILE: &'static str = ".lock";

    /// Takes the lock of `dir` (which must exist), or says in one line which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, String> {
        let key = std::fs::canonicalize(dir).map_err(|e| format!("{}: cannot open run directory: {e}", dir.display()))?;
        let mut held = held_here().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = held.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(Self { held: lock });
        }
        let path = dir.join(Self::FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("{}: cannot open the run lock: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
                return Err(format!("{}: in use by {who} (one process per run directory; wait for it to end or stop it)", dir.display()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(format!("{}: cannot lock: {e}", path.display())),
        }
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
            .and_then(|_| file.flush())
            .map_err(|e| format!("{}: cannot write the run lock: {e}", path.display()))?;
        let lock = std::sync::Arc::new(HeldLock { _file: file, path });
        held.insert(key, std::sync::Arc::downgrade(&lock));
        Ok(Self { held: lock })
    }

    /// Whether another process holds the lock of `dir` now (`false` when there is no lock file
    /// or this process holds it). Asks with a shared lock, taken and released at once.
    pub fn held_elsewhere(dir: &Path) -> bool {
        if let Ok(key) = std::fs::canonicalize(dir) {
            let held = held_here().lock().unwrap_or_else(|p| p.into_inner());
            if held.get(&key).is_some_and(|w| w.strong_count() > 0) {
                return false;
            }
        }
        let Ok(file) = File::open(dir.join(Self::FILE)) else {
            return false;
        };
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                false
            }
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(std::fs::TryLockError::Error(_)) => false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.held.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_shared_within_a_process_and_released_with_its_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let again = RunLock::acquire(dir.path()).expect("the same process may take its own lock again");
        assert_eq!(std::fs::read_to_string(first.path()).unwrap(), std::process::id().to_string());
        // Another open file description conflicts, as another process's would.
        let other = File::open(first.path()).unwrap();
        assert!(matches!(other.try_lock(), Err(std::fs::TryLockError::WouldBlock)));
        assert!(!RunLock::held_elsewhere(dir.path()), "this process holds it");
        drop(first);
        assert!(matches!(other.try_lock(), Err(std::fs::TryLockError::WouldBlock)), "a handle is left");
        drop(again);
        other.try_lock().expect("released with the last handle");
    }

    #[test]
    fn a_torn_last_row_is_cut_and_whole_rows_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        assert_eq!(cut_torn_tail(&path).unwrap(), 5);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"a\":2}\n");
        assert_eq!(cut_torn_tail(&path).unwrap(), 0, "a whole file is left alone");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        append_row(&mut f, "{\"a\":3}").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().last(), Some("{\"a\":3}"));
        std::fs::write(&path, "no newline at all").unwrap();
        assert_eq!(cut_torn_tail(&path).unwrap(), 17);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
    }
}
