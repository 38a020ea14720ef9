//! The dataset cache: a prepared dataset (tokenizer and token ids of every split) stored under
//! `loader.cache_dir`, so a run never redoes the tokenizer training and encoding an earlier run did.
//!
//! The key is a BLAKE3 hash of everything that changes the tokens: the corpus files' *content*
//! (not size or mtime), the tokenizer file's bytes when one is given, every `[data]` and
//! `[tokenizer]` setting, the cache format version, kiln's version and a fingerprint of the code
//! that makes tokens (this crate's sources and the locked `tokenizers` version, from `build.rs`).
//!
//! File `<key>.kds`: header (magic, format version, key, payload length), payload, BLAKE3 checksum
//! of header and payload. Written to a temporary file and renamed into place, so two runs building
//! the same entry leave one valid file; read through a memory map. A truncated, corrupted,
//! wrong-version or wrong-key file is reported in one line and rebuilt, never used.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_recipe::Recipe;

use crate::prepare::{EvalSet, Example};
use crate::text::TextStreams;
use crate::DataError;

pub const FORMAT_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"KILNDS\r\n";
const HEADER_LEN: usize = 8 + 4 + 32 + 8;
const CHECKSUM_LEN: usize = 32;
pub const EXTENSION: &str = "kds";

/// Everything `prepare` produces that is worth keeping.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedData {
    pub tokenizer_json: String,
    pub train: Vec<Example>,
    pub valid: EvalSet,
    pub test: EvalSet,
    /// Text corpora: the token streams (the pair fields are then empty).
    pub text: Option<TextStreams>,
    pub skipped_lines: usize,
    pub dropped_long: usize,
}

impl CachedData {
    /// Sizes of the splits, for `cache verify`.
    pub fn describe(&self) -> String {
        match &self.text {
            Some(t) => format!("{} train, {} valid, {} test tokens of text", t.train.len(), t.valid.len(), t.test.len()),
            None => format!("{} train, {} valid, {} test pairs", self.train.len(), self.valid.examples.len(), self.test.examples.len()),
        }
    }
}

impl CachedData {
    /// Checks what the bytes mean, not only that they are the bytes written: every token id is
    /// inside the vocabulary (an id past it would index past the embedding table), each
    /// evaluation split has one source and one reference per example, and no training pair is
    /// longer than `max_len` (pairs corpora drop longer ones when preparing). One line on failure.
    pub fn check_meaning(&self, vocab_size: usize, max_len: usize) -> Result<(), String> {
        let out_of_vocab = |what: &str, ids: &[u32]| match ids.iter().find(|&&id| id as usize >= vocab_size) {
            Some(id) => Err(format!("{what} holds token id {id}, past the tokenizer's vocabulary of {vocab_size}")),
            None => Ok(()),
        };
        for (i, e) in self.train.iter().enumerate() {
            out_of_vocab("the train split", &e.src)?;
            out_of_vocab("the train split", &e.tgt)?;
            if e.src.len() > max_len || e.tgt.len() > max_len {
                return Err(format!("train pair {} has {} / {} tokens, past data.max_len = {max_len}", i + 1, e.src.len(), e.tgt.len()));
            }
        }
        for (name, set) in [("valid", &self.valid), ("test", &self.test)] {
            for e in &set.examples {
                out_of_vocab(&format!("the {name} split"), &e.src)?;
                out_of_vocab(&format!("the {name} split"), &e.tgt)?;
            }
            let n = set.examples.len();
            if set.sources.len() != n || set.references.len() != n {
                return Err(format!("the {name} split has {n} examples but {} sources and {} references", set.sources.len(), set.references.len()));
            }
        }
        if let Some(t) = &self.text {
            out_of_vocab("the train text", &t.train)?;
            out_of_vocab("the valid text", &t.valid)?;
            out_of_vocab("the test text", &t.test)?;
        }
        Ok(())
    }
}

/// A 32-byte cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn hash_file(h: &mut blake3::Hasher, role: &str, path: &Path) -> Result<(), DataError> {
    h.update(role.as_bytes());
    if path.as_os_str().is_empty() {
        h.update(b"\0none");
        return Ok(());
    }
    let what = if role == "tokenizer" { "tokenizer file" } else { "corpus" };
    let bytes = std::fs::read(path).map_err(|e| DataError::new(path.display().to_string(), format!("cannot read {what}: {e}")))?;
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(&bytes);
    Ok(())
}

/// The key of a recipe's prepared data. `tokenizer_file` overrides `tokenizer.path` (a resumed run
/// keys on its own `tokenizer.json`).
pub fn key(recipe: &Recipe, tokenizer_file: Option<&Path>) -> Result<CacheKey, DataError> {
    let mut h = blake3::Hasher::new();
    h.update(MAGIC);
    h.update(&FORMAT_VERSION.to_le_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(env!("KILN_DATA_CODE_HASH").as_bytes());
    h.update(env!("KILN_TOKENIZERS_VERSION").as_bytes());
    // Settings, without the paths (their content is hashed below, so moving a file still hits).
    let mut data = recipe.data.clone();
    data.train = PathBuf::new();
    data.valid = PathBuf::new();
    data.test = PathBuf::new();
    let mut tok = recipe.tokenizer.clone();
    tok.path = PathBuf::new();
    // Regularisation resamples at training time; the stored ids do not depend on it.
    tok.sample_alpha = 0.0;
    tok.bpe_dropout = 0.0;
    h.update(toml::to_string(&data).expect("serialises").as_bytes());
    h.update(toml::to_string(&tok).expect("serialises").as_bytes());
    hash_file(&mut h, "train", &recipe.data.train)?;
    hash_file(&mut h, "valid", &recipe.data.valid)?;
    hash_file(&mut h, "test", &recipe.data.test)?;
    let tokenizer_path = tokenizer_file.map(Path::to_path_buf).unwrap_or_else(|| recipe.tokenizer.path.clone());
    hash_file(&mut h, "tokenizer", &tokenizer_path)?;
    Ok(CacheKey(*h.finalize().as_bytes()))
}

pub fn entry_path(dir: &Path, key: &CacheKey) -> PathBuf {
    dir.join(format!("{}.{EXTENSION}", key.hex()))
}

// ---- encoding -------------------------------------------------------------------------------

struct Writer(Vec<u8>);

impl Writer {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn ids(&mut self, ids: &[u32]) {
        self.u64(ids.len() as u64);
        for &i in ids {
            self.0.extend_from_slice(&i.to_le_bytes());
        }
    }
    fn examples(&mut self, ex: &[Example]) {
        self.u64(ex.len() as u64);
        for e in ex {
            self.ids(&e.src);
            self.ids(&e.tgt);
        }
    }
    fn strings(&mut self, s: &[String]) {
        self.u64(s.len() as u64);
        for x in s {
            self.bytes(x.as_bytes());
        }
    }
    fn eval_set(&mut self, set: &EvalSet) {
        self.examples(&set.examples);
        self.strings(&set.sources);
        self.strings(&set.references);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or("payload ends early")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A count of items of at least `min_size` bytes each, checked against what is left.
    fn count(&mut self, min_size: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(format!("count {n} exceeds the payload"));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.count(1)?;
        self.take(n)
    }
    fn ids(&mut self) -> Result<Vec<u32>, String> {
        let n = self.count(4)?;
        Ok(self.take(n * 4)?.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect())
    }
    fn examples(&mut self) -> Result<Vec<Example>, String> {
        let n = self.count(16)?;
        (0..n).map(|_| Ok(Example { src: self.ids()?, tgt: self.ids()? })).collect()
    }
    fn strings(&mut self) -> Result<Vec<String>, String> {
        let n = self.count(8)?;
        (0..n).map(|_| String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "invalid UTF-8 in payload".to_string())).collect()
    }
    fn eval_set(&mut self) -> Result<EvalSet, String> {
        Ok(EvalSet { examples: self.examples()?, sources: self.strings()?, references: self.strings()? })
    }
}

pub fn encode(key: &CacheKey, data: &CachedData) -> Vec<u8> {
    let mut p = Writer(Vec::new());
    p.u64(data.skipped_lines as u64);
    p.u64(data.dropped_long as u64);
    p.bytes(data.tokenizer_json.as_bytes());
    p.examples(&data.train);
    p.eval_set(&data.valid);
    p.eval_set(&data.test);
    match &data.text {
        None => p.u64(0),
        Some(t) => {
            p.u64(1);
            p.ids(&t.train);
            p.ids(&t.valid);
            p.ids(&t.test);
        }
    }
    seal(MAGIC, FORMAT_VERSION, key, &p.0)
}

/// An entry's container, for every kind of entry: header (magic, format version, key, payload
/// length), payload, BLAKE3 checksum of header and payload.
pub(crate) fn seal(magic: &[u8; 8], version: u32, key: &CacheKey, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&key.0);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Checks a container ([`seal`]) and returns its key and payload. `key` = None accepts any key.
pub(crate) fn unseal<'a>(magic: &[u8; 8], version: u32, bytes: &'a [u8], key: Option<&CacheKey>) -> Result<(CacheKey, &'a [u8]), Invalid> {
    let bad = |m: &str| Invalid(m.to_string());
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(bad("truncated (shorter than a header)"));
    }
    if &bytes[..8] != magic {
        return Err(bad("not a kiln dataset cache file (bad magic)"));
    }
    let stored_version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if stored_version != version {
        return Err(Invalid(format!("format version {stored_version}, this kiln reads {version}")));
    }
    let stored_key = CacheKey(bytes[12..44].try_into().unwrap());
    if let Some(k) = key {
        if *k != stored_key {
            return Err(bad("key in the file does not match its name"));
        }
    }
    let payload_len = u64::from_le_bytes(bytes[44..52].try_into().unwrap());
    let expected = (HEADER_LEN as u64).checked_add(payload_len).and_then(|n| n.checked_add(CHECKSUM_LEN as u64));
    if expected != Some(bytes.len() as u64) {
        return Err(Invalid(format!("truncated or padded: {} bytes, header says {}", bytes.len(), expected.unwrap_or(u64::MAX))));
    }
    let body_end = bytes.len() - CHECKSUM_LEN;
    if blake3::hash(&bytes[..body_end]).as_bytes() != &bytes[body_end..] {
        return Err(bad("checksum mismatch (corrupted)"));
    }
    Ok((stored_key, &bytes[HEADER_LEN..body_end]))
}

/// Why an entry was not used; `Display` is one line.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid(pub String);

/// Checks and decodes an entry's bytes. `key` = None accepts any key (for `cache verify`).
pub fn decode(bytes: &[u8], key: Option<&CacheKey>) -> Result<(CacheKey, CachedData), Invalid> {
    let (stored_key, payload) = unseal(MAGIC, FORMAT_VERSION, bytes, key)?;
    let mut r = Reader { buf: payload, pos: 0 };
    let mut parse = || -> Result<CachedData, String> {
        let skipped_lines = r.u64()? as usize;
        let dropped_long = r.u64()? as usize;
        let tokenizer_json = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "tokenizer is not UTF-8".to_string())?;
        let train = r.examples()?;
        let valid = r.eval_set()?;
        let test = r.eval_set()?;
        let text = match r.u64()? {
            0 => None,
            1 => Some(TextStreams { train: r.ids()?, valid: r.ids()?, test: r.ids()? }),
            other => return Err(format!("unknown corpus kind {other}")),
        };
        if r.pos != r.buf.len() {
            return Err("trailing bytes in payload".into());
        }
        Ok(CachedData { tokenizer_json, train, valid, test, text, skipped_lines, dropped_long })
    };
    parse().map(|d| (stored_key, d)).map_err(Invalid)
}

/// Looks an entry up. `Ok(None)`: no entry; `Err`: an entry exists but is unusable (the caller
/// reports it and rebuilds).
pub fn load(dir: &Path, key: &CacheKey) -> Result<Option<CachedData>, String> {
    let path = entry_path(dir, key);
    let Some(map) = map_entry(&path)? else { return Ok(None) };
    decode(&map, Some(key)).map(|(_, d)| Some(d)).map_err(|Invalid(why)| format!("{}: {why}", path.display()))
}

/// An entry's bytes, memory-mapped; `None` when there is no entry.
pub(crate) fn map_entry(path: &Path) -> Result<Option<memmap2::Mmap>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: cannot open: {e}", path.display())),
    };
    // SAFETY: entries are only ever replaced by rename, never written in place, so the mapped
    // bytes cannot change under us; a file truncated by someone else fails the checks after.
    unsafe { memmap2::Mmap::map(&file) }.map(Some).map_err(|e| format!("{}: cannot map: {e}", path.display()))
}

/// Writes an entry atomically (temporary file, fsync, rename).
pub fn store(dir: &Path, key: &CacheKey, data: &CachedData) -> Result<PathBuf, String> {
    write_entry(dir, entry_path(dir, key), key, &encode(key, data))
}

/// Writes an entry's bytes to `path` in `dir` atomically (temporary file, fsync, rename), so two
/// processes building the same entry leave one valid file.
pub(crate) fn write_entry(dir: &Path, path: PathBuf, key: &CacheKey, bytes: &[u8]) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create cache directory: {e}", dir.display()))?;
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".{}.{}.{nonce}.tmp", key.hex(), std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: cannot write cache entry: {e}", path.display())
    })?;
    Ok(path)
}

/// One entry of `cache ls` / `cache verify`.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub path: PathBuf,
    pub bytes: u64,
    pub modified: std::time::SystemTime,
    /// What the entry holds (empty unless verified), or why it is invalid.
    pub status: Result<String, String>,
}

/// Lists the entries of a cache directory; `verify` reads and checks each one.
pub fn list(dir: &Path, verify: bool) -> Result<Vec<EntryInfo>, String> {
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in read.flatten() {
        let path = entry.path();
        let kind = path.extension().and_then(|x| x.to_str()).unwrap_or("");
        if kind != EXTENSION && kind != crate::memo::EXTENSION {
            continue;
        }
        let meta = entry.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
        let status = if verify {
            let name_key = path.file_stem().and_then(|s| s.to_str()).map(str::to_string).unwrap_or_default();
            let checked = |bytes: &[u8]| -> Result<(CacheKey, String), Invalid> {
                if kind == EXTENSION {
                    decode(bytes, None).map(|(key, d)| (key, d.describe()))
                } else {
                    crate::memo::check(bytes).map(|(key, len)| (key, format!("{len} bytes of preprocessed data")))
                }
            };
            match std::fs::read(&path) {
                Ok(bytes) => match checked(&bytes) {
                    Ok((key, what)) if key.hex() == name_key => Ok(what),
                    Ok(_) => Err("key in the file does not match its name".into()),
                    Err(Invalid(why)) => Err(why),
                },
                Err(e) => Err(e.to_string()),
            }
        } else {
            Ok(String::new())
        };
        out.push(EntryInfo { path, bytes: meta.len(), modified: meta.modified().unwrap_or(std::time::UNIX_EPOCH), status });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CachedData {
        let ex = |a: &[u32], b: &[u32]| Example { src: a.to_vec(), tgt: b.to_vec() };
        CachedData {
            tokenizer_json: "{\"model\":1}".into(),
            train: vec![ex(&[5, 6], &[7]), ex(&[8], &[9, 10, 11])],
            valid: EvalSet { examples: vec![ex(&[12], &[13])], sources: vec!["Hallo".into()], references: vec!["Hello".into()] },
            test: EvalSet::default(),
            text: None,
            skipped_lines: 2,
            dropped_long: 1,
        }
    }

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let key = CacheKey([7; 32]);
        let bytes = encode(&key, &sample());
        assert_eq!(decode(&bytes, Some(&key)).unwrap().1, sample());
        let text = CachedData { text: Some(TextStreams { train: vec![4, 5, 3], valid: vec![6, 3], test: vec![] }), ..sample() };
        assert_eq!(decode(&encode(&key, &text), Some(&key)).unwrap().1, text);
        // Truncation anywhere, a flipped bit anywhere, another key or version: never accepted.
        for cut in [0, 10, HEADER_LEN, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], Some(&key)).is_err(), "cut at {cut}");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode(&b, Some(&key)).is_err(), "flip at {i}");
        }
        assert!(decode(&bytes, Some(&CacheKey([8; 32]))).is_err());
    }

    fn recipe_for(corpus: &Path) -> Recipe {
        let mut r = Recipe::default();
        r.data.train = corpus.to_path_buf();
        r
    }

    #[test]
    fn key_follows_content_and_token_settings_not_paths() {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/de-en.ding.tsv")).unwrap();
        let text: String = text.lines().take(200).map(|l| format!("{l}\n")).collect();
        let a = dir.path().join("a.tsv");
        std::fs::write(&a, &text).unwrap();
        let base = key(&recipe_for(&a), None).unwrap();
        assert_eq!(base, key(&recipe_for(&a), None).unwrap(), "deterministic");

        // The same bytes elsewhere: same key.
        let b = dir.path().join("b.tsv");
        std::fs::write(&b, &text).unwrap();
        assert_eq!(base, key(&recipe_for(&b), None).unwrap());

        // A one-byte edit that keeps the size (and the mtime second, likely): another key.
        let mut edited = text.clone().into_bytes();
        let i = edited.iter().position(|&c| c == b'e').unwrap();
        edited[i] = b'a';
        std::fs::write(&b, &edited).unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().len(), std::fs::metadata(&b).unwrap().len());
        assert_ne!(base, key(&recipe_for(&b), None).unwrap());

        // Any setting that changes tokens: another key.
        let mut r = recipe_for(&a);
        r.tokenizer.vocab_size += 1;
        assert_ne!(base, key(&r, None).unwrap());
        let mut r = recipe_for(&a);
        r.data.max_len += 1;
        assert_ne!(base, key(&r, None).unwrap());
        let mut r = recipe_for(&a);
        r.tokenizer.kind = kiln_recipe::TokenizerKind::Bpe;
        assert_ne!(base, key(&r, None).unwrap());
        // Settings that do not change tokens: the same key.
        let mut r = recipe_for(&a);
        r.train.lr *= 2.0;
        r.model.d_model = 64;
        assert_eq!(base, key(&r, None).unwrap());
    }

    #[test]
    fn store_then_load_and_list() {
        let dir = tempfile::tempdir().unwrap();
        let key = CacheKey([3; 32]);
        assert_eq!(load(dir.path(), &key).unwrap(), None);
        let path = store(dir.path(), &key, &sample()).unwrap();
        assert_eq!(load(dir.path(), &key).unwrap(), Some(sample()));
        let entries = list(dir.path(), true).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].status, Ok("2 train, 1 valid, 0 test pairs".to_string()));
        // A truncated entry is reported, not used.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = load(dir.path(), &key).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        assert!(list(dir.path(), true).unwrap()[0].status.is_err());
    }

    /// Fuzzing the reader: arbitrary files, and — past the checksum, where the parser works —
    /// arbitrary payloads under a valid header and checksum. Never a panic or a huge allocation:
    /// every count is checked against the bytes left.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn sealed(key: &CacheKey, payload: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(MAGIC);
            out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            out.extend_from_slice(&key.0);
            out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            out.extend_from_slice(payload);
            let sum = blake3::hash(&out);
            out.extend_from_slice(sum.as_bytes());
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_files_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
                prop_assert!(decode(&bytes, None).is_err());
            }

            #[test]
            fn arbitrary_payloads_never_panic(payload in prop::collection::vec(any::<u8>(), 0..300)) {
                let key = CacheKey([3; 32]);
                let _ = decode(&sealed(&key, &payload), Some(&key));
            }

            #[test]
            fn mutated_payloads_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>()) {
                let key = CacheKey([3; 32]);
                let good = encode(&key, &sample());
                let mut payload = good[HEADER_LEN..good.len() - CHECKSUM_LEN].to_vec();
                for (at, byte) in edits {
                    let i = at.index(payload.len());
                    payload[i] = byte;
                }
                payload.truncate(cut.index(payload.len() + 1));
                if let Ok((_, data)) = decode(&sealed(&key, &payload), Some(&key)) {
                    // What decodes re-encodes to the same bytes: nothing was invented.
                    prop_assert_eq!(encode(&key, &data), sealed(&key, &payload));
                }
            }
        }
    }
}
