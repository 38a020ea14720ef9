//! The content-keyed cache as a layer for any dataset and preprocessing: [`memoize`] runs a
//! preprocessing step once and keeps its result under `loader.cache_dir` (or any directory), keyed
//! on a [`Fingerprint`] of what the result depends on: the source (a file's *content*, or an
//! identifier the user supplies where there is no file), the preprocessing settings (anything
//! `Serialize`) and the preprocessing code's version. Change any of them and the key changes, so
//! an entry cannot go stale; the same inputs find the entry again from any directory.
//!
//! An entry `<key>.kdm` is the dataset cache's container (`crate::cache`: magic, format version,
//! key, length, BLAKE3 checksum, written atomically, read through a memory map) around the
//! result in MessagePack. A damaged or unreadable entry is reported in the returned note and
//! rebuilt, never used; `kiln cache ls | verify | clean` list, check and remove these entries too.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cache::{map_entry, seal, unseal, write_entry, CacheKey, Invalid};
use crate::prepare::CacheReport;
use crate::DataError;

pub const EXTENSION: &str = "kdm";
const MAGIC: &[u8; 8] = b"KILNDM\r\n";
const FORMAT_VERSION: u32 = 1;

/// What a cached result depends on, hashed as it is given.
#[derive(Clone)]
pub struct Fingerprint {
    hasher: blake3::Hasher,
}

impl Fingerprint {
    /// `step` names the preprocessing (entries of different steps never collide); `code_version`
    /// is its version, to change whenever the code changes what it produces.
    pub fn new(step: &str, code_version: &str) -> Self {
        let mut hasher = blake3::Hasher::new();
        for part in [MAGIC.as_slice(), &FORMAT_VERSION.to_le_bytes(), step.as_bytes(), b"\0", code_version.as_bytes(), b"\0"] {
            hasher.update(part);
        }
        Self { hasher }
    }

    /// The content of a source file (not its name, size or time: a moved file still hits).
    pub fn file(mut self, path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|e| DataError::new(path.display().to_string(), format!("cannot read: {e}")))?;
        self.hasher.update(b"file\0");
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(&bytes);
        Ok(self)
    }

    /// A source with no file (a generated or remote dataset): an identifier the user keeps
    /// unique to its content, such as a version or a content hash.
    pub fn source(mut self, id: &str) -> Self {
        self.hasher.update(b"source\0");
        self.hasher.update(&(id.len() as u64).to_le_bytes());
        self.hasher.update(id.as_bytes());
        self
    }

    /// Preprocessing settings, as their JSON.
    pub fn settings(mut self, settings: &impl Serialize) -> Self {
        let text = serde_json::to_string(settings).expect("settings serialise to JSON");
        self.hasher.update(b"settings\0");
        self.hasher.update(&(text.len() as u64).to_le_bytes());
        self.hasher.update(text.as_bytes());
        self
    }

    pub fn key(&self) -> CacheKey {
        CacheKey(*self.hasher.finalize().as_bytes())
    }
}

pub fn entry_path(dir: &Path, key: &CacheKey) -> PathBuf {
    dir.join(format!("{}.{EXTENSION}", key.hex()))
}

/// Checks an entry's container; its key and payload length.
pub(crate) fn check(bytes: &[u8]) -> Result<(CacheKey, usize), Invalid> {
    unseal(MAGIC, FORMAT_VERSION, bytes, None).map(|(key, payload)| (key, payload.len()))
}

/// The result of `build` for `fingerprint`: from the cache in `dir` when an intact entry holds
/// it, else built now and stored (`dir = None`: always built, nothing stored). The report says
/// which, and why an entry was rebuilt or could not be written.
pub fn memoize<T, E>(dir: Option<&Path>, fingerprint: &Fingerprint, build: impl FnOnce() -> Result<T, E>) -> Result<(T, CacheReport), E>
where
    T: Serialize + DeserializeOwned,
{
    let Some(dir) = dir else {
        return build().map(|value| (value, CacheReport::default()));
    };
    let key = fingerprint.key();
    let path = entry_path(dir, &key);
    let mut note = None;
    match read(&path, &key) {
        Ok(Some(value)) => return Ok((value, CacheReport { hit: true, path: Some(path), ..Default::default() })),
        Ok(None) => {}
        Err(why) => note = Some(format!("{why}; rebuilt")),
    }
    let value = build()?;
    let bytes = rmp_serde::to_vec_named(&value).expect("the result serialises");
    let path = match write_entry(dir, path, &key, &seal(MAGIC, FORMAT_VERSION, &key, &bytes)) {
        Ok(path) => Some(path),
        Err(why) => {
            note = Some(format!("{why}; continuing without the cache"));
            None
        }
    };
    Ok((value, CacheReport { hit: false, path, note, ..Default::default() }))
}

fn read<T: DeserializeOwned>(path: &Path, key: &CacheKey) -> Result<Option<T>, String> {
    let Some(map) = map_entry(path)? else { return Ok(None) };
    let (_, payload) = unseal(MAGIC, FORMAT_VERSION, &map, Some(key)).map_err(|Invalid(why)| format!("{}: {why}", path.display()))?;
    rmp_serde::from_slice(payload).map(Some).map_err(|e| format!("{}: does not hold this result: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Real text, a real preprocessing: lines of the Ding pairs lowercased.
    fn corpus(dir: &Path) -> PathBuf {
        let path = dir.join("pairs.tsv");
        std::fs::write(&path, "Ich habe Hunger.\tI am hungry.\nWo ist der Bahnhof?\tWhere is the station?\n").unwrap();
        path
    }

    fn lowered(path: &Path, builds: &Cell<usize>) -> Result<Vec<String>, std::io::Error> {
        builds.set(builds.get() + 1);
        Ok(std::fs::read_to_string(path)?.lines().map(str::to_lowercase).collect())
    }

    #[test]
    fn built_once_then_read_back_and_rekeyed_by_content_settings_and_code() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let path = corpus(dir.path());
        let builds = Cell::new(0);
        let fp = |path: &Path, lowercase: bool, version: &str| Fingerprint::new("lowercase", version).file(path).unwrap().settings(&lowercase);
        let (first, report) = memoize(Some(&cache), &fp(&path, true, "1"), || lowered(&path, &builds)).unwrap();
        assert!(!report.hit && report.path.is_some() && report.note.is_none());
        let (again, report) = memoize(Some(&cache), &fp(&path, true, "1"), || lowered(&path, &builds)).unwrap();
        assert!(report.hit);
        assert_eq!((first.clone(), builds.get()), (again, 1), "read back, not rebuilt");
        // The same content elsewhere hits; other settings, code or content miss.
        let moved = dir.path().join("moved.tsv");
        std::fs::copy(&path, &moved).unwrap();
        assert!(memoize(Some(&cache), &fp(&moved, true, "1"), || lowered(&moved, &builds)).unwrap().1.hit);
        assert!(!memoize(Some(&cache), &fp(&path, false, "1"), || lowered(&path, &builds)).unwrap().1.hit);
        assert!(!memoize(Some(&cache), &fp(&path, true, "2"), || lowered(&path, &builds)).unwrap().1.hit);
        // Same length, other content: the lines in the other order.
        std::fs::write(&path, "Wo ist der Bahnhof?\tWhere is the station?\nIch habe Hunger.\tI am hungry.\n").unwrap();
        let (changed, report) = memoize(Some(&cache), &fp(&path, true, "1"), || lowered(&path, &builds)).unwrap();
        assert!(!report.hit && changed != first);
        assert_eq!(Fingerprint::new("a", "1").source("v7").key(), Fingerprint::new("a", "1").source("v7").key());
        assert_ne!(Fingerprint::new("a", "1").source("v7").key(), Fingerprint::new("a", "1").source("v8").key());
    }

    #[test]
    fn a_damaged_entry_is_rebuilt_with_a_note_never_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = corpus(dir.path());
        let builds = Cell::new(0);
        let fp = Fingerprint::new("lowercase", "1").file(&path).unwrap();
        let (good, report) = memoize(Some(dir.path()), &fp, || lowered(&path, &builds)).unwrap();
        let entry = report.path.unwrap();
        let mut bytes = std::fs::read(&entry).unwrap();
        let last = bytes.len() - 40;
        bytes[last] ^= 1;
        std::fs::write(&entry, &bytes).unwrap();
        let (value, report) = memoize(Some(dir.path()), &fp, || lowered(&path, &builds)).unwrap();
        assert_eq!((value, builds.get(), report.hit), (good.clone(), 2, false));
        assert!(report.note.as_deref().is_some_and(|n| n.contains("checksum mismatch") && n.ends_with("rebuilt")), "{:?}", report.note);
        // A result of another type under the same key is refused, not misread.
        let (n, report) = memoize(Some(dir.path()), &fp, || Ok::<_, std::io::Error>(7u64)).unwrap();
        assert_eq!(n, 7);
        assert!(report.note.as_deref().is_some_and(|n| n.contains("does not hold this result")), "{:?}", report.note);
        // No directory: always built, nothing stored.
        assert!(memoize(None, &fp, || lowered(&path, &builds)).unwrap().1.path.is_none());
    }
}
