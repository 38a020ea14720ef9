//! The dataset cache: a prepared dataset (tokenizer and token ids of every split) stored under
//! `loader.cache_dir`, so a run never redoes the tokenizer training and encoding an earlier run did.
//!
//! The key is a BLAKE3 hash of everything that changes the tokens: the corpus files' *content*
//! (not size or mtime), the tokenizer file's bytes when one is given, every `[data]` and
//! `[tokenizer]` setting, the cache format version, kiln's version and a fingerprint of the code
//! that makes tokens (this crate's sources and the locked `tokenizers` version, from `build.rs`).
//!
//! File `<key>.kds`: header (magic, format version, key, payload length), payload, BLAKE3 checksum
//! of header and payload. The payload is a token store (`store`): the entry *is* the dataset,
//! mapped and read in place by training. Written to a temporary file and renamed into place, so
//! two runs building the same entry leave one valid file. A truncated, corrupted, wrong-version or
//! wrong-key file is reported in one line and rebuilt, never used; so is one whose checksum holds
//! but whose meaning does not ([`check_meaning`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_recipe::{Recipe, TrainFile, TrainFiles};

use crate::store::{Ids, Store};
use crate::DataError;

/// 3: the memory-mapped token store (2 held every split as one decoded payload).
pub const FORMAT_VERSION: u32 = 3;
pub(crate) const MAGIC: &[u8; 8] = b"KILNDS\r\n";
pub(crate) const HEADER_LEN: usize = 8 + 4 + 32 + 8;
pub(crate) const CHECKSUM_LEN: usize = 32;
pub const EXTENSION: &str = "kds";

/// Sizes of a store's splits, for `cache verify`.
pub fn describe(store: &Store) -> String {
    let count = |name: &str| store.meta.held_out.iter().find(|(n, _)| n == name).map_or(0, |(_, t)| t.sources.len());
    if store.meta.kind == "corpus" {
        return format!("{} training pairs of a further corpus", store.pairs("train").map_or(0, |p| p.len()));
    }
    if store.meta.kind == "text" {
        let len = |name: &str| store.tokens(name).map_or(0, |t| t.len());
        format!("{} train, {} valid, {} test tokens of text", len("train"), len("valid"), len("test"))
    } else {
        let train = store.pairs("train").map_or(0, |p| p.len());
        format!("{train} train, {} valid, {} test pairs", count("valid"), count("test"))
    }
}

/// Checks what a store's bytes mean, not only that they are the bytes written: every section a
/// kind needs is there and well formed, every token id is inside the vocabulary (an id past it
/// would index past the embedding table), each held-out split has one source and one reference
/// per example, and no training pair is longer than `max_len` (pairs corpora drop longer ones
/// when preparing). One line on failure.
pub fn check_meaning(store: &Store, vocab_size: usize, max_len: usize) -> Result<(), String> {
    let out_of_vocab = |what: &str, ids: Ids<'_>| match ids.max() {
        Some(id) if id as usize >= vocab_size => Err(format!("{what} holds token id {id}, past the tokenizer's vocabulary of {vocab_size}")),
        _ => Ok(()),
    };
    match store.meta.kind.as_str() {
        "pairs" => {
            for name in ["train", "valid", "test"] {
                let set = store.pairs(name)?;
                out_of_vocab(&format!("the {name} split"), set.src.tokens().ids())?;
                out_of_vocab(&format!("the {name} split"), set.tgt.tokens().ids())?;
                if name == "train" {
                    if let Some(i) = (0..set.len()).find(|&i| set.src.len_of(i) > max_len || set.tgt.len_of(i) > max_len) {
                        let (s, t) = set.lengths(i);
                        return Err(format!("train pair {} has {s} / {t} tokens, past data.max_len = {max_len}", i + 1));
                    }
                    continue;
                }
                let text = store.meta.held_out.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()).unwrap_or_default();
                let n = set.len();
                if text.sources.len() != n || text.references.len() != n {
                    return Err(format!("the {name} split has {n} examples but {} sources and {} references", text.sources.len(), text.references.len()));
                }
            }
        }
        "text" => {
            for name in ["train", "valid", "test"] {
                out_of_vocab(&format!("the {name} text"), store.tokens(name)?.ids())?;
            }
        }
        "corpus" => {
            let set = store.pairs("train")?;
            out_of_vocab("the corpus", set.src.tokens().ids())?;
            out_of_vocab("the corpus", set.tgt.tokens().ids())?;
            if let Some(i) = (0..set.len()).find(|&i| set.src.len_of(i) > max_len || set.tgt.len_of(i) > max_len) {
                let (s, t) = set.lengths(i);
                return Err(format!("pair {} has {s} / {t} tokens, past data.max_len = {max_len}", i + 1));
            }
        }
        other => return Err(format!("unknown corpus kind {other:?}")),
    }
    Ok(())
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
    let err = |e: std::io::Error| DataError::new(path.display().to_string(), format!("cannot read {what}: {e}"));
    let len = std::fs::metadata(path).map_err(err)?.len();
    h.update(&len.to_le_bytes());
    // Mapped and hashed on every core: a corpus larger than memory costs no heap.
    let mut content = blake3::Hasher::new();
    content.update_mmap_rayon(path).map_err(err)?;
    h.update(content.finalize().as_bytes());
    Ok(())
}

/// A hasher primed with what every key shares: the format and the code that makes tokens.
fn code_hasher() -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.update(MAGIC);
    h.update(&FORMAT_VERSION.to_le_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(env!("KILN_DATA_CODE_HASH").as_bytes());
    h.update(env!("KILN_TOKENIZERS_VERSION").as_bytes());
    h
}

/// The key of a recipe's prepared data. `tokenizer_file` overrides `tokenizer.path` (a resumed run
/// keys on its own `tokenizer.json`).
pub fn key(recipe: &Recipe, tokenizer_file: Option<&Path>) -> Result<CacheKey, DataError> {
    let mut h = code_hasher();
    // Settings, without the paths (their content is hashed below, so moving a file still hits).
    let mut data = recipe.data.clone();
    // The main corpus alone: other corpora have entries of their own, and mixing them (weights,
    // temperature) changes no stored id.
    let main = recipe.data.train.files().first().cloned().unwrap_or_else(|| TrainFile::new(""));
    data.swap = recipe.data.swap_of(&main);
    data.train = TrainFiles::default();
    data.temperature = 0.0;
    data.valid = PathBuf::new();
    data.test = PathBuf::new();
    let mut tok = recipe.tokenizer.clone();
    tok.path = PathBuf::new();
    // Regularisation resamples at training time; the stored ids do not depend on it.
    tok.sample_alpha = 0.0;
    tok.bpe_dropout = 0.0;
    h.update(toml::to_string(&data).expect("serialises").as_bytes());
    h.update(toml::to_string(&tok).expect("serialises").as_bytes());
    hash_file(&mut h, "train", &main.path)?;
    hash_file(&mut h, "valid", &recipe.data.valid)?;
    hash_file(&mut h, "test", &recipe.data.test)?;
    let tokenizer_path = tokenizer_file.map(Path::to_path_buf).unwrap_or_else(|| recipe.tokenizer.path.clone());
    hash_file(&mut h, "tokenizer", &tokenizer_path)?;
    Ok(CacheKey(*h.finalize().as_bytes()))
}

/// The key of a further training corpus's entry: its content, the settings that change its ids,
/// and the tokenizer that encodes it (the main corpus's), so adding or reweighting corpora reuses
/// every other entry.
pub fn corpus_key(recipe: &Recipe, file: &TrainFile, tokenizer_json: &str) -> Result<CacheKey, DataError> {
    let mut h = code_hasher();
    let d = &recipe.data;
    h.update(format!("training corpus|{:?}|{:?}|{}|{}|{}", d.format, d.on_bad_line, d.max_len, d.limit, d.swap_of(file)).as_bytes());
    h.update(blake3::hash(tokenizer_json.as_bytes()).as_bytes());
    hash_file(&mut h, "train", &file.path)?;
    Ok(CacheKey(*h.finalize().as_bytes()))
}

pub fn entry_path(dir: &Path, key: &CacheKey) -> PathBuf {
    dir.join(format!("{}.{EXTENSION}", key.hex()))
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
    // On every core: a store of gigabytes is checked each time a run opens it.
    let mut sum = blake3::Hasher::new();
    sum.update_rayon(&bytes[..body_end]);
    if sum.finalize().as_bytes() != &bytes[body_end..] {
        return Err(bad("checksum mismatch (corrupted)"));
    }
    Ok((stored_key, &bytes[HEADER_LEN..body_end]))
}

/// Why an entry was not used; `Display` is one line.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid(pub String);

/// Looks an entry up and opens it (container and checksum checked; the caller checks meaning).
/// `Ok(None)`: no entry; `Err`: an entry exists but is unusable (the caller reports it and
/// rebuilds).
pub fn load(dir: &Path, key: &CacheKey) -> Result<Option<Store>, String> {
    let path = entry_path(dir, key);
    let Some(map) = map_entry(&path)? else { return Ok(None) };
    Store::open_map(map, Some(key)).map(|(_, s)| Some(s)).map_err(|why| format!("{}: {why}", path.display()))
}

/// An entry's bytes, memory-mapped; `None` when there is no entry.
pub fn map_entry(path: &Path) -> Result<Option<memmap2::Mmap>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: cannot open: {e}", path.display())),
    };
    // SAFETY: entries are only ever replaced by rename, never written in place, so the mapped
    // bytes cannot change under us; a file truncated by someone else fails the checks after.
    unsafe { memmap2::Mmap::map(&file) }.map(Some).map_err(|e| format!("{}: cannot map: {e}", path.display()))
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
            let checked = || -> Result<(CacheKey, String), String> {
                let map = map_entry(&path)?.ok_or("vanished")?;
                if kind == EXTENSION {
                    let (key, store) = Store::open_map(map, None)?;
                    let vocab = crate::SubwordTokenizer::from_json(&store.meta.tokenizer_json, "tokenizer").map_err(|e| e.message)?.vocab_size();
                    // The length bound is the recipe's: checked when a run uses the entry.
                    check_meaning(&store, vocab, usize::MAX)?;
                    Ok((key, describe(&store)))
                } else {
                    crate::memo::check(&map).map(|(key, len)| (key, format!("{len} bytes of preprocessed data"))).map_err(|Invalid(why)| why)
                }
            };
            match checked() {
                Ok((key, what)) if key.hex() == name_key => Ok(what),
                Ok(_) => Err("key in the file does not match its name".into()),
                Err(why) => Err(why),
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

    fn recipe_for(corpus: &Path) -> Recipe {
        let mut r = Recipe::default();
        r.data.train = corpus.into();
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

    use crate::store::{HeldOutText, StoreMeta, StoreWriter, Width};

    /// A pairs store with the given training pairs and one held-out pair per split, sealed and
    /// checksummed as kiln writes them: whatever it holds, the container is sound.
    fn forged(dir: &Path, train: &[(&[u32], &[u32])], held_texts: usize) -> Store {
        let key = CacheKey([9; 32]);
        let mut w = StoreWriter::new(dir, &key, Width::U16).unwrap();
        for (name, pairs) in [("train", train.to_vec()), ("valid", vec![(&[5u32][..], &[6u32][..])]), ("test", vec![])] {
            let (mut s, mut t) = (w.table(&format!("{name}.src")).unwrap(), w.table(&format!("{name}.tgt")).unwrap());
            for (a, b) in pairs {
                w.push(&mut s, a).unwrap();
                w.push(&mut t, b).unwrap();
            }
        }
        let text = HeldOutText { sources: vec!["a".into(); held_texts], references: vec!["b".into(); held_texts] };
        let meta = StoreMeta { kind: "pairs".into(), tokenizer_json: "{}".into(), held_out: vec![("valid".into(), text), ("test".into(), HeldOutText::default())], ..Default::default() };
        w.finish(meta, &key, &dir.join("forged.kds")).unwrap().1
    }

    /// Entries whose checksum holds but whose meaning does not are refused in one line: an id
    /// past the vocabulary, a training pair past `data.max_len`, held-out text that does not
    /// match its ids. A sound one passes.
    #[test]
    fn sound_containers_with_wrong_meaning_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ok = forged(dir.path(), &[(&[4, 5], &[6]), (&[7], &[8, 9])], 1);
        assert_eq!(check_meaning(&ok, 10, 2), Ok(()));
        assert_eq!(describe(&ok), "2 train, 1 valid, 0 test pairs");
        let e = check_meaning(&ok, 9, 2).unwrap_err();
        assert_eq!(e, "the train split holds token id 9, past the tokenizer's vocabulary of 9");
        let e = check_meaning(&ok, 10, 1).unwrap_err();
        assert_eq!(e, "train pair 1 has 2 / 1 tokens, past data.max_len = 1");
        let unmatched = forged(dir.path(), &[(&[4], &[6])], 2);
        assert_eq!(check_meaning(&unmatched, 10, 8).unwrap_err(), "the valid split has 1 examples but 2 sources and 2 references");
    }

    /// Fuzzing the reader: arbitrary files, and — past the checksum, where the parser works —
    /// arbitrary payloads under a valid header and checksum. Never a panic or a huge allocation.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn sealed(key: &CacheKey, payload: &[u8]) -> Vec<u8> {
            seal(MAGIC, FORMAT_VERSION, key, payload)
        }

        fn open_bytes(bytes: &[u8]) -> Result<(), String> {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("e.kds");
            std::fs::write(&path, bytes).unwrap();
            match map_entry(&path)? {
                None => Ok(()),
                Some(map) => Store::open_map(map, None).map(|_| ()),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_files_are_refused(bytes in prop::collection::vec(any::<u8>(), 1..400)) {
                prop_assert!(open_bytes(&bytes).is_err());
            }

            #[test]
            fn arbitrary_payloads_never_panic(payload in prop::collection::vec(any::<u8>(), 0..300)) {
                let _ = open_bytes(&sealed(&CacheKey([3; 32]), &payload));
            }

            #[test]
            fn arbitrary_metas_never_panic(meta_len in 0u64..400, meta in "\\{[\"a-z:,0-9\\[\\]{} ]{0,200}", tail in prop::collection::vec(any::<u8>(), 0..64)) {
                let mut payload = meta_len.to_le_bytes().to_vec();
                payload.extend_from_slice(meta.as_bytes());
                payload.extend_from_slice(&tail);
                let _ = open_bytes(&sealed(&CacheKey([3; 32]), &payload));
            }
        }
    }
}
