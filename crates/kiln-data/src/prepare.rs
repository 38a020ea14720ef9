//! From a recipe to a token store: read the corpus where it lies, split it, train or load the
//! tokenizer, encode straight into the store, then map it.
//!
//! Preparation streams: the corpus is mapped (the kernel's file cache, not the heap) and read in
//! passes — one to count and check lines, one to collect the held-out pairs and the tokenizer's
//! sample, one to encode in chunks (each a parallel call into `tokenizers`) written to the store
//! as they come. What is held in memory is bounded by the recipe, not by the corpus: the held-out
//! sets, the tokenizer's sample (`tokenizer.train_sentences`, borrowed from the mapped corpus) and
//! one chunk. The split is `split::held_out`'s, the permutation-free replay of the split kiln
//! has always made, so existing recipes keep their exact data.
//!
//! Pairs: training pairs longer than `data.max_len` tokens on either side are dropped (and
//! counted); validation and test pairs are kept whole as references but their ids are truncated.
//! Text: each split becomes one token stream (`text`), cut into blocks by the trainer.

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_recipe::{CorpusFormat, DevSet, Recipe, TrainFile};

use crate::cache::{self, CacheKey};
use crate::mix::MixCorpus;
use crate::corpus::{read_parallel, read_text, MappedCorpus, Pair};
use crate::split::{held_out, Sampler};
use crate::store::{HeldOutText, PairSet, Store, StoreMeta, StoreWriter, Tokens, Width};
use crate::text::TextStreams;
use crate::tokenizer::{SubwordTokenizer, EOS, UNK};
use crate::{mix_seed, DataError};

/// Token ids of one pair, without specials (batching adds `<s>` / `</s>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub src: Vec<u32>,
    pub tgt: Vec<u32>,
}

/// An evaluation split: ids plus the raw text for BLEU. Held-out sets are bounded by the recipe
/// (`data.valid_size`, or the dev file), so they are read out of the store into memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalSet {
    pub examples: Vec<Example>,
    pub sources: Vec<String>,
    pub references: Vec<String>,
}

/// Everything the trainer needs from the data side. A pairs corpus fills `train`, `valid` and
/// `test`; a text corpus fills `text` and leaves those empty. Token ids are read from the store's
/// mapped file.
pub struct Prepared {
    pub tokenizer: SubwordTokenizer,
    pub train: PairSet,
    pub valid: EvalSet,
    pub test: EvalSet,
    pub text: Option<TextStreams>,
    /// Further training corpora (`data.train` after the first), in recipe order.
    pub mix: Vec<MixCorpus>,
    /// Named validation sets (`eval.sets`), in recipe order.
    pub dev: Vec<DevData>,
    pub skipped_lines: usize,
    pub dropped_long: usize,
    /// Tokens that are `<unk>`, every split (characters the tokenizer has no token for).
    pub unknown_tokens: u64,
    pub prepare_s: f64,
    pub cache: CacheReport,
    pub store: StoreInfo,
}

/// A named validation set, encoded with the run's tokenizer: pairs (ids truncated to
/// `data.max_len`, text kept for BLEU) or a text stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DevData {
    pub name: String,
    pub pairs: EvalSet,
    pub text: Option<Tokens>,
    /// Characters of a text set (`text_chars`), for the loss per character.
    pub chars: u64,
}

/// The store's shape on disk, for reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreInfo {
    pub width: Width,
    /// Bytes of token ids, of offsets, and the ids' count.
    pub id_bytes: u64,
    pub offset_bytes: u64,
    pub tokens: u64,
}

/// What the dataset cache did for this preparation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheReport {
    /// The data came from the cache: no tokenizer training, no encoding.
    pub hit: bool,
    /// The entry used or written.
    pub path: Option<PathBuf>,
    /// A one-line notice: an unusable entry that was rebuilt, or an entry that could not be written.
    pub note: Option<String>,
    /// Further training corpora that came from the cache.
    pub corpora_hit: usize,
}

/// Where the tokenizer comes from: trained (then saved to `save_to`) or loaded.
pub enum TokenizerSource<'a> {
    TrainAndSave(&'a Path),
    Load(&'a Path),
}

/// A step of preparation, reported to the caller as it goes (for progress lines or bars).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    TrainingTokenizer { sentences: usize },
    /// Sentence pairs (or lines) of training corpus `corpus` (0: the main one, with its held-out
    /// splits) encoded so far.
    Encoding { corpus: usize, done: usize, total: usize },
}

/// Pairs (or lines) encoded per call into `tokenizers` (which spreads a call over all cores).
const ENCODE_CHUNK: usize = 8192;

/// Prepares the data of a recipe, through the dataset cache in `cache_dir` when one is given
/// (without one, the store is built in a private temporary directory and unlinked once mapped).
/// The main corpus first (held-out sets, tokenizer), then each further training corpus into a
/// store of its own, encoded with the main corpus's tokenizer. `progress` hears about the slow
/// stages (a cache hit has none).
pub fn prepare(recipe: &Recipe, tokenizer: TokenizerSource<'_>, cache_dir: Option<&Path>, progress: &dyn Fn(Stage)) -> Result<Prepared, DataError> {
    let started = Instant::now();
    let mut prepared = prepare_main(recipe, tokenizer, cache_dir, progress)?;
    for (i, file) in recipe.data.train.extra().iter().enumerate() {
        let (corpus, hit, note) = prepare_corpus(recipe, i + 1, file, &prepared.tokenizer, cache_dir, progress)?;
        prepared.cache.corpora_hit += usize::from(hit);
        if let Some(note) = note {
            prepared.cache.note = Some(match prepared.cache.note.take() {
                Some(first) => format!("{first}; {note}"),
                None => note,
            });
        }
        prepared.mix.push(corpus);
    }
    // Named validation sets are a few thousand lines: encoded every run, in one call each.
    for set in &recipe.eval.sets {
        prepared.dev.push(encode_dev(recipe, set, &prepared.tokenizer)?);
    }
    prepared.prepare_s = started.elapsed().as_secs_f64();
    Ok(prepared)
}

/// Reads and encodes a named validation set in the corpus's format.
fn encode_dev(recipe: &Recipe, set: &DevSet, tokenizer: &SubwordTokenizer) -> Result<DevData, DataError> {
    let d = &recipe.data;
    match d.format {
        CorpusFormat::Text => {
            let lines = read_text(&set.path, d.on_bad_line, 0)?.lines;
            let mut stream = Vec::new();
            for ids in tokenizer.encode_batch(&lines.iter().map(String::as_str).collect::<Vec<_>>())? {
                stream.extend(ids);
                stream.push(EOS);
            }
            if stream.len() < 2 {
                return Err(DataError::new(set.path.display().to_string(), "the validation text has no tokens to predict"));
            }
            let chars = lines.iter().map(|l| text_chars(l)).sum();
            Ok(DevData { name: set.name.clone(), pairs: EvalSet::default(), text: Some(Tokens::from_ids(&stream)), chars })
        }
        CorpusFormat::Pairs => {
            let swap = set.swap.unwrap_or_else(|| d.train.files().first().is_some_and(|f| d.swap_of(f)));
            let pairs = read_parallel(&set.path, d.on_bad_line, 0)?.pairs;
            let (sources, references): (Vec<String>, Vec<String>) = pairs.into_iter().map(|p| if swap { (p.target, p.source) } else { (p.source, p.target) }).unzip();
            let texts: Vec<&str> = sources.iter().zip(&references).flat_map(|(s, t)| [s.as_str(), t.as_str()]).collect();
            let examples = tokenizer
                .encode_batch(&texts)?
                .chunks(2)
                .map(|ids| Example { src: ids[0][..ids[0].len().min(d.max_len)].to_vec(), tgt: ids[1][..ids[1].len().min(d.max_len)].to_vec() })
                .collect();
            Ok(DevData { name: set.name.clone(), pairs: EvalSet { examples, sources, references }, text: None, chars: 0 })
        }
    }
}

/// Where a store is built: the cache, or a temporary directory (returned, to be dropped once the
/// store is mapped) when there is no cache or it cannot be written — the run still has its data;
/// the next one prepares again.
fn build_dir(cache_dir: Option<&Path>, note: &mut Option<String>) -> Result<(PathBuf, Option<tempfile::TempDir>), DataError> {
    let probe = |dir: &Path| -> Result<(), String> {
        std::fs::create_dir_all(dir).and_then(|_| tempfile::tempfile_in(dir)).map(drop).map_err(|e| format!("{}: cannot write the cache directory: {e}", dir.display()))
    };
    if let Some(dir) = cache_dir {
        match probe(dir) {
            Ok(()) => return Ok((dir.to_path_buf(), None)),
            Err(why) => *note = Some(format!("dataset cache: {why}")),
        }
    }
    let t = tempfile::Builder::new().prefix("kiln-store-").tempdir().map_err(|e| DataError::new("loader.cache_dir", format!("cannot create a temporary directory for the token store: {e}")))?;
    Ok((t.path().to_path_buf(), Some(t)))
}

/// A key for a store that is never looked up (no cache).
fn private_key(what: &str) -> CacheKey {
    CacheKey(*blake3::hash(format!("{what}:{}:{:?}", std::process::id(), std::time::SystemTime::now()).as_bytes()).as_bytes())
}

/// A further training corpus: from the cache, or encoded into a store of its own. Returns the
/// corpus, whether it came from the cache, and a note about an unusable entry.
fn prepare_corpus(recipe: &Recipe, index: usize, file: &TrainFile, tokenizer: &SubwordTokenizer, cache_dir: Option<&Path>, progress: &dyn Fn(Stage)) -> Result<(MixCorpus, bool, Option<String>), DataError> {
    let origin = file.path.display().to_string();
    let vocab = tokenizer.vocab_size();
    let from = |store: &Store| -> Result<MixCorpus, String> {
        if store.meta.kind != "corpus" {
            return Err(format!("holds a {} entry, not a further corpus", store.meta.kind));
        }
        cache::check_meaning(store, vocab, recipe.data.max_len)?;
        Ok(MixCorpus { origin: origin.clone(), pairs: store.pairs("train")?, dropped_long: store.meta.dropped_long as usize, skipped_lines: store.meta.skipped_lines as usize })
    };
    let key = match cache_dir {
        Some(_) => cache::corpus_key(recipe, file, &tokenizer.to_json())?,
        None => private_key(&origin),
    };
    let mut note = None;
    if let Some(dir) = cache_dir {
        let path = cache::entry_path(dir, &key);
        match cache::load(dir, &key) {
            Ok(Some(store)) => match from(&store) {
                Ok(corpus) => return Ok((corpus, true, None)),
                Err(why) => note = Some(format!("dataset cache: {}: {why}; rebuilding it", path.display())),
            },
            Ok(None) => {}
            Err(why) => note = Some(format!("dataset cache: {why}; rebuilding it")),
        }
    }
    let (dir, temp) = build_dir(cache_dir, &mut note)?;
    let path = cache::entry_path(&dir, &key);
    let store = build_corpus(recipe, index, file, tokenizer, &dir, &key, &path, progress)?;
    let corpus = from(&store).map_err(|why| DataError::new(path.display().to_string(), why))?;
    drop(temp);
    Ok((corpus, false, note))
}

/// Encodes every pair of a further training corpus into a store (no held-out sets; pairs past
/// `data.max_len` dropped and counted).
#[allow(clippy::too_many_arguments)]
fn build_corpus(recipe: &Recipe, index: usize, file: &TrainFile, tokenizer: &SubwordTokenizer, dir: &Path, key: &CacheKey, path: &Path, progress: &dyn Fn(Stage)) -> Result<Store, DataError> {
    let d = &recipe.data;
    let swap = d.swap_of(file);
    let corpus = MappedCorpus::open(&file.path)?;
    let mut lines = corpus.pairs(d.on_bad_line, d.limit);
    let mut total = 0usize;
    for pair in lines.by_ref() {
        pair?;
        total += 1;
    }
    let skipped = lines.skipped;
    if total == 0 {
        return Err(DataError::new(&corpus.origin, "corpus has no sentence pairs"));
    }
    let err = write_err(path);
    let mut store = StoreWriter::new(dir, key, Width::for_vocab(tokenizer.vocab_size())).map_err(&err)?;
    let (mut src_table, mut tgt_table) = (store.table("train.src").map_err(&err)?, store.table("train.tgt").map_err(&err)?);
    let (mut kept, mut dropped_long, mut done) = (0usize, 0usize, 0usize);
    let mut chunk: Vec<&str> = Vec::with_capacity(2 * ENCODE_CHUNK);
    let mut pairs = corpus.pairs(d.on_bad_line, d.limit).peekable();
    while pairs.peek().is_some() {
        chunk.clear();
        for pair in pairs.by_ref() {
            let (s, t) = pair?;
            chunk.extend(if swap { [t, s] } else { [s, t] });
            if chunk.len() >= 2 * ENCODE_CHUNK {
                break;
            }
        }
        for ids in tokenizer.encode_batch(&chunk)?.chunks(2) {
            if ids[0].len() <= d.max_len && ids[1].len() <= d.max_len {
                store.push(&mut src_table, &ids[0]).map_err(&err)?;
                store.push(&mut tgt_table, &ids[1]).map_err(&err)?;
                kept += 1;
            } else {
                dropped_long += 1;
            }
        }
        done += chunk.len() / 2;
        progress(Stage::Encoding { corpus: index, done, total });
    }
    if kept == 0 {
        return Err(DataError::new(&corpus.origin, format!("every pair is longer than data.max_len = {} tokens", d.max_len)));
    }
    let meta = StoreMeta { kind: "corpus".into(), tokenizer_json: tokenizer.to_json(), skipped_lines: skipped as u64, dropped_long: dropped_long as u64, ..Default::default() };
    store.finish(meta, key, path).map(|(_, s)| s).map_err(err)
}

/// The main corpus: held-out sets, tokenizer, training pairs.
fn prepare_main(recipe: &Recipe, tokenizer: TokenizerSource<'_>, cache_dir: Option<&Path>, progress: &dyn Fn(Stage)) -> Result<Prepared, DataError> {
    let started = Instant::now();
    let (run_tokenizer, resuming) = match tokenizer {
        TokenizerSource::TrainAndSave(p) => (p, false),
        TokenizerSource::Load(p) => (p, true),
    };
    let mut report = CacheReport::default();
    let key = match cache_dir {
        Some(_) => cache::key(recipe, resuming.then_some(run_tokenizer))?,
        None => private_key("main"),
    };
    if let Some(dir) = cache_dir {
        match cache::load(dir, &key) {
            Ok(Some(store)) => {
                let path = cache::entry_path(dir, &key);
                match from_store(&store, recipe) {
                    Ok(mut prepared) => {
                        if !resuming {
                            kiln_events::write_atomic(run_tokenizer, store.meta.tokenizer_json.as_bytes())
                                .map_err(|e| DataError::new(run_tokenizer.display().to_string(), format!("cannot write tokenizer: {e}")))?;
                        }
                        prepared.prepare_s = started.elapsed().as_secs_f64();
                        prepared.cache = CacheReport { hit: true, path: Some(path), note: None, corpora_hit: 0 };
                        return Ok(prepared);
                    }
                    Err(why) => report.note = Some(format!("dataset cache: {}: {why}; rebuilding it", path.display())),
                }
            }
            Ok(None) => {}
            Err(why) => report.note = Some(format!("dataset cache: {why}; rebuilding it")),
        }
    }
    let (dir, temp) = build_dir(cache_dir, &mut report.note)?;
    let path = cache::entry_path(&dir, &key);
    let source = if resuming { TokenizerSource::Load(run_tokenizer) } else { TokenizerSource::TrainAndSave(run_tokenizer) };
    let store = match recipe.data.format {
        CorpusFormat::Pairs => build_pairs(recipe, source, &dir, &key, &path, progress)?,
        CorpusFormat::Text => build_text(recipe, source, &dir, &key, &path, progress)?,
    };
    let mut prepared = from_store(&store, recipe).map_err(|why| DataError::new(path.display().to_string(), why))?;
    if temp.is_none() {
        report.path = Some(path);
    }
    // A temporary store is unlinked now; its mapping lives on until the run ends.
    drop(temp);
    prepared.cache = report;
    prepared.prepare_s = started.elapsed().as_secs_f64();
    Ok(prepared)
}

/// Characters of a text line as the loss per character counts them: Unicode scalar values after
/// NFC, and one for the line's break (the stream's `</s>`).
pub fn text_chars(line: &str) -> u64 {
    use tokenizers::{NormalizedString, Normalizer};
    let mut normalized = NormalizedString::from(line);
    match tokenizers::normalizers::NFC.normalize(&mut normalized) {
        Ok(()) => normalized.get().chars().count() as u64 + 1,
        Err(_) => line.chars().count() as u64 + 1,
    }
}

/// The run's view of a store: its meaning checked against the recipe.
fn from_store(store: &Store, recipe: &Recipe) -> Result<Prepared, String> {
    let tokenizer = SubwordTokenizer::from_json(&store.meta.tokenizer_json, "tokenizer").map_err(|e| e.message)?;
    cache::check_meaning(store, tokenizer.vocab_size(), recipe.data.max_len)?;
    let (id_bytes, offset_bytes) = store.sizes();
    let info = StoreInfo { width: store.width(), id_bytes, offset_bytes, tokens: id_bytes / store.width().bytes() as u64 };
    let base = |tokenizer, train, valid, test, text| Prepared {
        tokenizer,
        train,
        valid,
        test,
        text,
        mix: Vec::new(),
        dev: Vec::new(),
        skipped_lines: store.meta.skipped_lines as usize,
        dropped_long: store.meta.dropped_long as usize,
        unknown_tokens: store.meta.unknown_tokens,
        prepare_s: 0.0,
        cache: CacheReport::default(),
        store: info,
    };
    match store.meta.kind.as_str() {
        "text" => {
            let chars = |name: &str| store.meta.chars.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c);
            let text = TextStreams { train: store.tokens("train")?, valid: store.tokens("valid")?, test: store.tokens("test")?, valid_chars: chars("valid"), test_chars: chars("test") };
            Ok(base(tokenizer, PairSet::default(), EvalSet::default(), EvalSet::default(), Some(text)))
        }
        _ => {
            let eval_set = |name: &str| -> Result<EvalSet, String> {
                let set = store.pairs(name)?;
                let text = store.meta.held_out.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()).unwrap_or_default();
                Ok(EvalSet { examples: (0..set.len()).map(|i| set.example(i)).collect(), sources: text.sources, references: text.references })
            };
            let (valid, test) = (eval_set("valid")?, eval_set("test")?);
            Ok(base(tokenizer, store.pairs("train")?, valid, test, None))
        }
    }
}

/// Trains (on `train_texts`, then saves) or loads the tokenizer.
fn obtain_tokenizer(recipe: &Recipe, source: TokenizerSource<'_>, train_texts: &[&str], progress: &dyn Fn(Stage)) -> Result<SubwordTokenizer, DataError> {
    match source {
        TokenizerSource::Load(path) => SubwordTokenizer::load(path),
        TokenizerSource::TrainAndSave(save_to) => {
            let tok = if recipe.tokenizer.path.as_os_str().is_empty() {
                progress(Stage::TrainingTokenizer { sentences: train_texts.len() });
                SubwordTokenizer::train(&recipe.tokenizer, train_texts)?
            } else {
                SubwordTokenizer::load(&recipe.tokenizer.path)?
            };
            tok.save(save_to)?;
            Ok(tok)
        }
    }
}

/// Whether the tokenizer is trained here (so a sample of the training text is needed).
fn trains_tokenizer(recipe: &Recipe, source: &TokenizerSource<'_>) -> bool {
    matches!(source, TokenizerSource::TrainAndSave(_)) && recipe.tokenizer.path.as_os_str().is_empty()
}

/// How many of `population` items (each `per_item` sentences) the tokenizer trains on.
fn sample_size(recipe: &Recipe, population: usize, per_item: usize) -> usize {
    match recipe.tokenizer.train_sentences {
        0 => population,
        n => (n / per_item).max(1).min(population),
    }
}

fn write_err(path: &Path) -> impl Fn(String) -> DataError + '_ {
    move |why| DataError::new(path.display().to_string(), why)
}

fn build_pairs(recipe: &Recipe, source: TokenizerSource<'_>, dir: &Path, key: &CacheKey, path: &Path, progress: &dyn Fn(Stage)) -> Result<Store, DataError> {
    let d = &recipe.data;
    // The main corpus's orientation (its own `swap`, else `data.swap`) holds for the held-out files.
    let main = d.train.files().first().ok_or_else(|| DataError::new("data.train", "no corpus"))?;
    let swap = d.swap_of(main);
    let orient = |(s, t): (&str, &str)| -> (String, String) { if swap { (t.to_string(), s.to_string()) } else { (s.to_string(), t.to_string()) } };
    let corpus = MappedCorpus::open(&main.path)?;
    // Pass 1: count (and check) the good pairs.
    let mut lines = corpus.pairs(d.on_bad_line, d.limit);
    let mut n = 0usize;
    for pair in lines.by_ref() {
        pair?;
        n += 1;
    }
    let mut skipped = lines.skipped;
    if n == 0 {
        return Err(DataError::new(&corpus.origin, "corpus has no sentence pairs"));
    }
    if n > u32::MAX as usize {
        return Err(DataError::new(&corpus.origin, format!("{n} sentence pairs: kiln indexes at most {} per corpus", u32::MAX)));
    }
    // Held-out pairs: drawn from the corpus (a sorted list of line indices), or their own files.
    let (held, mut valid_pairs, mut test_pairs) = if d.valid.as_os_str().is_empty() {
        (Some(held_out(n, d.valid_size, d.test_size, d.split_seed)), Vec::new(), Vec::new())
    } else {
        let valid = read_parallel(&d.valid, d.on_bad_line, d.limit)?;
        skipped += valid.skipped;
        let test = if d.test.as_os_str().is_empty() {
            Vec::new()
        } else {
            let t = read_parallel(&d.test, d.on_bad_line, d.limit)?;
            skipped += t.skipped;
            t.pairs
        };
        let own = |pairs: Vec<Pair>| pairs.into_iter().map(|p| orient((&p.source, &p.target))).collect::<Vec<_>>();
        (None, own(valid.pairs), own(test))
    };
    // Which split item `i` of the corpus belongs to: 0 train, 1 valid, 2 test.
    let held_count = held.as_ref().map_or(0, |h| h.valid.len() + h.test.len());
    let split_of = |cursor: &mut (usize, usize), i: usize| -> u8 {
        let Some(h) = &held else { return 0 };
        if h.valid.get(cursor.0) == Some(&i) {
            cursor.0 += 1;
            1
        } else if h.test.get(cursor.1) == Some(&i) {
            cursor.1 += 1;
            2
        } else {
            0
        }
    };
    let train_count = n - held_count;
    let sampling = trains_tokenizer(recipe, &source);
    let mut sample: Vec<&str> = Vec::new();
    // Pass 2: the held-out pairs and the tokenizer's sample (borrowed from the mapped corpus).
    if held.is_some() || sampling {
        let mut sampler = Sampler::new(if sampling { sample_size(recipe, train_count, 2) } else { 0 }, train_count, mix_seed(d.split_seed, 5, 0));
        let mut cursor = (0, 0);
        for (i, pair) in corpus.pairs(d.on_bad_line, d.limit).enumerate() {
            let (s, t) = pair?;
            let (s, t) = if swap { (t, s) } else { (s, t) };
            match split_of(&mut cursor, i) {
                1 => valid_pairs.push((s.to_string(), t.to_string())),
                2 => test_pairs.push((s.to_string(), t.to_string())),
                _ if sampler.keep() => sample.extend([s, t]),
                _ => {}
            }
        }
    }
    if valid_pairs.is_empty() {
        return Err(DataError::new("data.valid_size", "corpus too small to hold out a validation set"));
    }
    let tokenizer = obtain_tokenizer(recipe, source, &sample, progress)?;
    drop(sample);

    let err = write_err(path);
    let mut store = StoreWriter::new(dir, key, Width::for_vocab(tokenizer.vocab_size())).map_err(&err)?;
    let total = n + if held.is_some() { 0 } else { valid_pairs.len() + test_pairs.len() };
    let mut done = 0usize;
    // Pass 3: encode the training pairs in chunks, straight into the store.
    let (mut src_table, mut tgt_table) = (store.table("train.src").map_err(&err)?, store.table("train.tgt").map_err(&err)?);
    let max_len = d.max_len;
    let (mut kept, mut dropped_long) = (0usize, 0usize);
    let mut chunk: Vec<&str> = Vec::with_capacity(2 * ENCODE_CHUNK);
    let mut cursor = (0, 0);
    let mut flush = |chunk: &mut Vec<&str>, store: &mut StoreWriter| -> Result<(), DataError> {
        let ids = tokenizer.encode_batch(chunk)?;
        for pair in ids.chunks(2) {
            if pair[0].len() <= max_len && pair[1].len() <= max_len {
                store.push(&mut src_table, &pair[0]).map_err(&err)?;
                store.push(&mut tgt_table, &pair[1]).map_err(&err)?;
                kept += 1;
            } else {
                dropped_long += 1;
            }
        }
        chunk.clear();
        Ok(())
    };
    for (i, pair) in corpus.pairs(d.on_bad_line, d.limit).enumerate() {
        let (s, t) = pair?;
        done += 1;
        if split_of(&mut cursor, i) != 0 {
            continue;
        }
        chunk.extend(if swap { [t, s] } else { [s, t] });
        if chunk.len() >= 2 * ENCODE_CHUNK {
            flush(&mut chunk, &mut store)?;
            progress(Stage::Encoding { corpus: 0, done, total });
        }
    }
    flush(&mut chunk, &mut store)?;
    drop(flush);
    if kept == 0 {
        return Err(DataError::new("data.max_len", format!("every training pair is longer than {max_len} tokens")));
    }
    // The held-out sets: ids truncated to `max_len`, text kept whole for BLEU.
    let mut held_text = Vec::new();
    for (name, pairs) in [("valid", &valid_pairs), ("test", &test_pairs)] {
        let (mut st, mut tt) = (store.table(&format!("{name}.src")).map_err(&err)?, store.table(&format!("{name}.tgt")).map_err(&err)?);
        for part in pairs.chunks(ENCODE_CHUNK) {
            let texts: Vec<&str> = part.iter().flat_map(|(s, t)| [s.as_str(), t.as_str()]).collect();
            for ids in tokenizer.encode_batch(&texts)?.chunks(2) {
                store.push(&mut st, &ids[0][..ids[0].len().min(max_len)]).map_err(&err)?;
                store.push(&mut tt, &ids[1][..ids[1].len().min(max_len)]).map_err(&err)?;
            }
            if held.is_none() {
                done += part.len();
            }
        }
        let (sources, references) = pairs.iter().cloned().unzip();
        held_text.push((name.to_string(), HeldOutText { sources, references }));
    }
    progress(Stage::Encoding { corpus: 0, done, total });
    let meta = StoreMeta { kind: "pairs".into(), tokenizer_json: tokenizer.to_json(), skipped_lines: skipped as u64, dropped_long: dropped_long as u64, held_out: held_text, ..Default::default() };
    store.finish(meta, key, path).map(|(_, s)| s).map_err(err)
}

fn build_text(recipe: &Recipe, source: TokenizerSource<'_>, dir: &Path, key: &CacheKey, path: &Path, progress: &dyn Fn(Stage)) -> Result<Store, DataError> {
    let d = &recipe.data;
    let corpus = MappedCorpus::open(d.train.main())?;
    // Pass 1: count (and check) the lines.
    let mut lines = corpus.lines(d.on_bad_line, d.limit);
    let (mut n, mut any_text) = (0usize, false);
    for line in lines.by_ref() {
        any_text |= !line?.trim().is_empty();
        n += 1;
    }
    let mut skipped = lines.skipped;
    if !any_text {
        return Err(DataError::new(&corpus.origin, "corpus has no text"));
    }
    // No shuffling: neighbouring lines are not independent, so held-out text is a contiguous tail.
    let (cut, valid, test): (usize, Vec<String>, Vec<String>) = if d.valid.as_os_str().is_empty() {
        let held = d.valid_size + d.test_size;
        if held >= n {
            return Err(DataError::new("data.valid_size", format!("the corpus has {n} lines, too few to hold out {held} (valid_size + test_size)")));
        }
        let cut = n - held;
        let tail: Vec<String> = corpus.lines(d.on_bad_line, d.limit).skip(cut).map(|l| l.map(str::to_string)).collect::<Result<_, _>>()?;
        let (valid, test) = tail.split_at(d.valid_size);
        (cut, valid.to_vec(), test.to_vec())
    } else {
        let valid = read_text(&d.valid, d.on_bad_line, d.limit)?;
        skipped += valid.skipped;
        let test = if d.test.as_os_str().is_empty() {
            Vec::new()
        } else {
            let t = read_text(&d.test, d.on_bad_line, d.limit)?;
            skipped += t.skipped;
            t.lines
        };
        (n, valid.lines, test)
    };
    let train_lines = || corpus.lines(d.on_bad_line, d.limit).take(cut);
    let mut sample: Vec<&str> = Vec::new();
    if trains_tokenizer(recipe, &source) {
        let population = train_lines().filter(|l| matches!(l, Ok(l) if !l.trim().is_empty())).count();
        let mut sampler = Sampler::new(sample_size(recipe, population, 1), population, mix_seed(d.split_seed, 5, 0));
        for line in train_lines() {
            let line = line?;
            if !line.trim().is_empty() && sampler.keep() {
                sample.push(line);
            }
        }
    }
    let tokenizer = obtain_tokenizer(recipe, source, &sample, progress)?;
    drop(sample);

    let err = write_err(path);
    let mut store = StoreWriter::new(dir, key, Width::for_vocab(tokenizer.vocab_size())).map_err(&err)?;
    let total = cut + valid.len() + test.len();
    let mut done = 0usize;
    let mut lengths = [0usize; 3];
    let (mut unknown, mut chars) = (0u64, [0u64; 3]);
    let mut write_stream = |name: &str, which: usize, lines: &mut dyn Iterator<Item = Result<&str, DataError>>, store: &mut StoreWriter| -> Result<(), DataError> {
        let section = store.flat(name).map_err(&err)?;
        let mut chunk: Vec<&str> = Vec::with_capacity(ENCODE_CHUNK);
        let mut out: Vec<u32> = Vec::new();
        let mut more = true;
        while more {
            chunk.clear();
            for line in &mut *lines {
                chunk.push(line?);
                if chunk.len() == ENCODE_CHUNK {
                    break;
                }
            }
            more = chunk.len() == ENCODE_CHUNK;
            out.clear();
            for ids in tokenizer.encode_batch(&chunk)? {
                out.extend(ids);
                out.push(EOS);
            }
            unknown += out.iter().filter(|&&t| t == UNK).count() as u64;
            if which > 0 {
                chars[which] += chunk.iter().map(|l| text_chars(l)).sum::<u64>();
            }
            lengths[which] += out.len();
            store.append(section, &out).map_err(&err)?;
            done += chunk.len();
            progress(Stage::Encoding { corpus: 0, done, total });
        }
        Ok(())
    };
    write_stream("train", 0, &mut train_lines(), &mut store)?;
    write_stream("valid", 1, &mut valid.iter().map(|l| Ok(l.as_str())), &mut store)?;
    write_stream("test", 2, &mut test.iter().map(|l| Ok(l.as_str())), &mut store)?;
    if lengths[0] < d.block_size + 1 {
        return Err(DataError::new("data.block_size", format!("the training text has {} tokens, fewer than block_size + 1 = {}", lengths[0], d.block_size + 1)));
    }
    if lengths[1] < 2 {
        return Err(DataError::new("data.valid_size", "the validation text has no tokens to predict"));
    }
    let chars = vec![("valid".to_string(), chars[1]), ("test".to_string(), chars[2])];
    let meta = StoreMeta { kind: "text".into(), tokenizer_json: tokenizer.to_json(), skipped_lines: skipped as u64, unknown_tokens: unknown, chars, ..Default::default() };
    store.finish(meta, key, path).map(|(_, s)| s).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_recipe::CorpusFormat;

    fn shakespeare_recipe(dir: &Path) -> Recipe {
        let mut r = Recipe::default();
        r.data.format = CorpusFormat::Text;
        r.data.train = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/shakespeare.txt")).into();
        r.data.limit = 3000;
        r.data.valid_size = 200;
        r.data.test_size = 100;
        r.data.block_size = 64;
        r.tokenizer.vocab_size = 500;
        r.loader.cache_dir = dir.join("cache");
        r
    }

    #[test]
    fn text_becomes_streams_with_line_ends_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let r = shakespeare_recipe(dir.path());
        let tok_path = dir.path().join("tokenizer.json");
        let cold = prepare(&r, TokenizerSource::TrainAndSave(&tok_path), Some(&r.loader.cache_dir), &|_| {}).unwrap();
        assert!(!cold.cache.hit);
        assert!(cold.train.is_empty() && cold.valid.examples.is_empty());
        assert_eq!(cold.store.width, Width::U16, "500 ids fit 16 bits");
        let text = cold.text.clone().unwrap();
        let lines: Vec<String> = std::fs::read_to_string(r.data.train.main()).unwrap().lines().take(3000).map(|l| l.trim_end().to_string()).collect();
        // One `</s>` per line; held-out lines are the contiguous tail (test last).
        let ends = |s: &crate::Tokens| s.ids().iter().filter(|&t| t == EOS).count();
        assert_eq!((ends(&text.train), ends(&text.valid), ends(&text.test)), (2700, 200, 100));
        let (valid, test) = (text.valid.ids().to_vec(), text.test.ids().to_vec());
        let first_line = &valid[..valid.iter().position(|&t| t == EOS).unwrap()];
        assert_eq!(cold.tokenizer.decode(first_line), lines[2700]);
        let last: Vec<&[u32]> = test.split(|&t| t == EOS).collect();
        assert_eq!(cold.tokenizer.decode(last[last.len() - 2]), lines[2999]);

        let warm = prepare(&r, TokenizerSource::TrainAndSave(&tok_path), Some(&r.loader.cache_dir), &|_| {}).unwrap();
        assert!(warm.cache.hit);
        assert_eq!(warm.text, cold.text);

        // A block larger than the training stream is refused, naming the key.
        let mut big = r.clone();
        big.data.block_size = text.train.len();
        big.loader.cache_dir = PathBuf::new();
        let e = prepare(&big, TokenizerSource::TrainAndSave(&tok_path), None, &|_| {}).err().unwrap();
        assert_eq!(e.origin, "data.block_size");
    }
}
