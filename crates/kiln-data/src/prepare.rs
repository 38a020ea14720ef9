//! From a recipe to token ids: read the corpus, split it, train or load the tokenizer, encode.
//! Pairs: training pairs longer than `data.max_len` tokens on either side are dropped (and
//! counted); validation and test pairs are kept whole as references but their ids are truncated.
//! Text: each split becomes one token stream (`text`), cut into blocks by the trainer.

use std::path::Path;
use std::time::Instant;

use kiln_recipe::Recipe;

use std::path::PathBuf;

use crate::cache::{self, CachedData};
use crate::corpus::{read_parallel, read_text, Pair};
use crate::text::TextStreams;
use kiln_recipe::CorpusFormat;
use crate::split::split_indices;
use crate::tokenizer::{SubwordTokenizer, EOS};
use crate::DataError;

/// Token ids of one pair, without specials (batching adds `<s>` / `</s>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub src: Vec<u32>,
    pub tgt: Vec<u32>,
}

/// An evaluation split: ids plus the raw text for BLEU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalSet {
    pub examples: Vec<Example>,
    pub sources: Vec<String>,
    pub references: Vec<String>,
}

/// Everything the trainer needs from the data side. A pairs corpus fills `train`, `valid` and
/// `test`; a text corpus fills `text` and leaves those empty.
pub struct Prepared {
    pub tokenizer: SubwordTokenizer,
    pub train: Vec<Example>,
    pub valid: EvalSet,
    pub test: EvalSet,
    pub text: Option<TextStreams>,
    pub skipped_lines: usize,
    pub dropped_long: usize,
    pub prepare_s: f64,
    pub cache: CacheReport,
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
    /// Sentence pairs encoded so far, of all splits.
    Encoding { done: usize, total: usize },
}

/// Pairs encoded per call into `tokenizers` (which spreads a call over all cores).
const ENCODE_CHUNK: usize = 4096;

/// Prepares the data of a recipe, through the dataset cache in `cache_dir` when one is given.
/// `progress` hears about the slow stages (a cache hit has none).
pub fn prepare(recipe: &Recipe, tokenizer: TokenizerSource<'_>, cache_dir: Option<&Path>, progress: &dyn Fn(Stage)) -> Result<Prepared, DataError> {
    let started = Instant::now();
    let Some(dir) = cache_dir else {
        return prepare_uncached(recipe, tokenizer, progress);
    };
    let (run_tokenizer, resuming) = match tokenizer {
        TokenizerSource::TrainAndSave(p) => (p, false),
        TokenizerSource::Load(p) => (p, true),
    };
    let key = cache::key(recipe, resuming.then_some(run_tokenizer))?;
    let mut report = CacheReport::default();
    match cache::load(dir, &key) {
        Ok(Some(c)) => 'hit: {
            let path = cache::entry_path(dir, &key);
            let tokenizer = match SubwordTokenizer::from_json(&c.tokenizer_json, &path.display().to_string()) {
                Ok(t) => t,
                Err(why) => {
                    report.note = Some(format!("dataset cache: {why}; rebuilding it"));
                    break 'hit;
                }
            };
            // Text corpora keep no pairs, so the length bound only matters for pairs.
            if let Err(why) = c.check_meaning(tokenizer.vocab_size(), recipe.data.max_len) {
                report.note = Some(format!("dataset cache: {}: {why}; rebuilding it", path.display()));
                break 'hit;
            }
            if !resuming {
                kiln_events::write_atomic(run_tokenizer, c.tokenizer_json.as_bytes())
                    .map_err(|e| DataError::new(run_tokenizer.display().to_string(), format!("cannot write tokenizer: {e}")))?;
            }
            return Ok(Prepared {
                tokenizer,
                train: c.train,
                valid: c.valid,
                test: c.test,
                text: c.text,
                skipped_lines: c.skipped_lines,
                dropped_long: c.dropped_long,
                prepare_s: started.elapsed().as_secs_f64(),
                cache: CacheReport { hit: true, path: Some(path), note: None },
            });
        }
        Ok(None) => {}
        Err(why) => report.note = Some(format!("dataset cache: {why}; rebuilding it")),
    }
    let mut prepared = prepare_uncached(recipe, tokenizer, progress)?;
    let entry = CachedData {
        tokenizer_json: prepared.tokenizer.to_json(),
        train: prepared.train.clone(),
        valid: prepared.valid.clone(),
        test: prepared.test.clone(),
        text: prepared.text.clone(),
        skipped_lines: prepared.skipped_lines,
        dropped_long: prepared.dropped_long,
    };
    match cache::store(dir, &key, &entry) {
        Ok(path) => report.path = Some(path),
        // Not fatal: the run has its data; the next one prepares again.
        Err(why) => report.note = Some(format!("dataset cache: {why}")),
    }
    prepared.cache = report;
    prepared.prepare_s = started.elapsed().as_secs_f64();
    Ok(prepared)
}

fn prepare_uncached(recipe: &Recipe, tokenizer: TokenizerSource<'_>, progress: &dyn Fn(Stage)) -> Result<Prepared, DataError> {
    match recipe.data.format {
        CorpusFormat::Pairs => prepare_pairs(recipe, tokenizer, progress),
        CorpusFormat::Text => prepare_text(recipe, tokenizer, progress),
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

/// Encodes lines in chunks (each one parallel call into `tokenizers`), reporting progress.
fn encode_lines(tokenizer: &SubwordTokenizer, lines: &[&str], mut done: impl FnMut(usize)) -> Result<Vec<Vec<u32>>, DataError> {
    let mut out = Vec::with_capacity(lines.len());
    for chunk in lines.chunks(ENCODE_CHUNK) {
        out.extend(tokenizer.encode_batch(chunk)?);
        done(chunk.len());
    }
    Ok(out)
}

fn prepare_text(recipe: &Recipe, tokenizer: TokenizerSource<'_>, progress: &dyn Fn(Stage)) -> Result<Prepared, DataError> {
    let started = Instant::now();
    let d = &recipe.data;
    let main = read_text(&d.train, d.on_bad_line, d.limit)?;
    let mut skipped = main.skipped;
    let lines = main.lines;
    // No shuffling: neighbouring lines are not independent, so held-out text is a contiguous tail.
    let (train, valid, test): (Vec<String>, Vec<String>, Vec<String>) = if d.valid.as_os_str().is_empty() {
        let held = d.valid_size + d.test_size;
        if held >= lines.len() {
            return Err(DataError::new("data.valid_size", format!("the corpus has {} lines, too few to hold out {held} (valid_size + test_size)", lines.len())));
        }
        let cut = lines.len() - held;
        let mut lines = lines;
        let test = lines.split_off(cut + d.valid_size);
        let valid = lines.split_off(cut);
        (lines, valid, test)
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
        (lines, valid.lines, test)
    };
    let train_refs: Vec<&str> = train.iter().map(String::as_str).filter(|l| !l.trim().is_empty()).collect();
    let tokenizer = obtain_tokenizer(recipe, tokenizer, &train_refs, progress)?;
    let total = train.len() + valid.len() + test.len();
    let done = std::cell::Cell::new(0usize);
    let stream = |lines: &[String]| -> Result<Vec<u32>, DataError> {
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let ids = encode_lines(&tokenizer, &refs, |n| {
            done.set(done.get() + n);
            progress(Stage::Encoding { done: done.get(), total });
        })?;
        let mut out = Vec::with_capacity(ids.iter().map(|l| l.len() + 1).sum());
        for line in ids {
            out.extend(line);
            out.push(EOS);
        }
        Ok(out)
    };
    let streams = TextStreams { train: stream(&train)?, valid: stream(&valid)?, test: stream(&test)? };
    if streams.train.len() < d.block_size + 1 {
        return Err(DataError::new(
            "data.block_size",
            format!("the training text has {} tokens, fewer than block_size + 1 = {}", streams.train.len(), d.block_size + 1),
        ));
    }
    if streams.valid.len() < 2 {
        return Err(DataError::new("data.valid_size", "the validation text has no tokens to predict"));
    }
    Ok(Prepared {
        tokenizer,
        train: Vec::new(),
        valid: EvalSet::default(),
        test: EvalSet::default(),
        text: Some(streams),
        skipped_lines: skipped,
        dropped_long: 0,
        prepare_s: started.elapsed().as_secs_f64(),
        cache: CacheReport::default(),
    })
}

fn prepare_pairs(recipe: &Recipe, tokenizer: TokenizerSource<'_>, progress: &dyn Fn(Stage)) -> Result<Prepared, DataError> {
    let started = Instant::now();
    let d = &recipe.data;
    let orient = |mut pairs: Vec<Pair>| {
        if d.swap {
            for p in &mut pairs {
                std::mem::swap(&mut p.source, &mut p.target);
            }
        }
        pairs
    };
    let main = read_parallel(&d.train, d.on_bad_line, d.limit)?;
    let mut skipped = main.skipped;
    let all = orient(main.pairs);
    let (train_pairs, valid_pairs, test_pairs) = if d.valid.as_os_str().is_empty() {
        let s = split_indices(all.len(), d.valid_size, d.test_size, d.split_seed);
        let pick = |idx: &[usize]| idx.iter().map(|&i| all[i].clone()).collect::<Vec<_>>();
        (pick(&s.train), pick(&s.valid), pick(&s.test))
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
        (all, orient(valid.pairs), orient(test))
    };
    if valid_pairs.is_empty() {
        return Err(DataError::new("data.valid_size", "corpus too small to hold out a validation set"));
    }

    let texts: Vec<&str> = train_pairs.iter().flat_map(|p| [p.source.as_str(), p.target.as_str()]).collect();
    let tokenizer = obtain_tokenizer(recipe, tokenizer, &texts, progress)?;
    drop(texts);

    let total = train_pairs.len() + valid_pairs.len() + test_pairs.len();
    let done = std::cell::Cell::new(0usize);
    // Batched: each chunk is one parallel call into `tokenizers`, then a progress report.
    let encode = |pairs: &[Pair]| -> Result<Vec<Example>, DataError> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(ENCODE_CHUNK) {
            let src: Vec<&str> = chunk.iter().map(|p| p.source.as_str()).collect();
            let tgt: Vec<&str> = chunk.iter().map(|p| p.target.as_str()).collect();
            let (src, tgt) = (tokenizer.encode_batch(&src)?, tokenizer.encode_batch(&tgt)?);
            out.extend(src.into_iter().zip(tgt).map(|(src, tgt)| Example { src, tgt }));
            done.set(done.get() + chunk.len());
            progress(Stage::Encoding { done: done.get(), total });
        }
        Ok(out)
    };
    let max_len = d.max_len;
    let encoded = encode(&train_pairs)?;
    let before = encoded.len();
    let train: Vec<Example> = encoded.into_iter().filter(|e| e.src.len() <= max_len && e.tgt.len() <= max_len).collect();
    let dropped_long = before - train.len();
    if train.is_empty() {
        return Err(DataError::new("data.max_len", format!("every training pair is longer than {max_len} tokens")));
    }
    let eval_set = |pairs: Vec<Pair>| -> Result<EvalSet, DataError> {
        let mut examples = encode(&pairs)?;
        for e in &mut examples {
            e.src.truncate(max_len);
            e.tgt.truncate(max_len);
        }
        let (sources, references) = pairs.into_iter().map(|p| (p.source, p.target)).unzip();
        Ok(EvalSet { examples, sources, references })
    };
    Ok(Prepared {
        valid: eval_set(valid_pairs)?,
        test: eval_set(test_pairs)?,
        text: None,
        tokenizer,
        train,
        skipped_lines: skipped,
        dropped_long,
        prepare_s: started.elapsed().as_secs_f64(),
        cache: CacheReport::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_recipe::CorpusFormat;

    fn shakespeare_recipe(dir: &Path) -> Recipe {
        let mut r = Recipe::default();
        r.data.format = CorpusFormat::Text;
        r.data.train = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/shakespeare.txt")).to_path_buf();
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
        let text = cold.text.clone().unwrap();
        let lines: Vec<String> = std::fs::read_to_string(&r.data.train).unwrap().lines().take(3000).map(|l| l.trim_end().to_string()).collect();
        // One `</s>` per line; held-out lines are the contiguous tail (test last).
        let ends = |s: &[u32]| s.iter().filter(|&&t| t == EOS).count();
        assert_eq!((ends(&text.train), ends(&text.valid), ends(&text.test)), (2700, 200, 100));
        let first_line = &text.valid[..text.valid.iter().position(|&t| t == EOS).unwrap()];
        assert_eq!(cold.tokenizer.decode(first_line), lines[2700]);
        let last: Vec<&[u32]> = text.test.split(|&t| t == EOS).collect();
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
