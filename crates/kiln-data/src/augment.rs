//! Training-only subword regularisation: every epoch, every training example gets a freshly
//! sampled segmentation — Unigram sampling (Kudo 2018: a segmentation drawn from the whole lattice
//! with probability ∝ exp(α · Σ piece scores)) or BPE-dropout (Provilkov et al. 2020: each merge
//! is skipped with probability p). Validation and test never see this: only the trainer's epoch
//! plan calls [`Regulariser::epoch`].
//!
//! It works on token ids alone, so the cache needs no raw text: with kiln's Metaspace
//! pre-tokenizer a word is a run of pieces whose first one starts with `▁`, and the pieces of a
//! word concatenated give back its normalised text, which is segmented again. Special and unknown
//! tokens stay where they are and split a word into independent spans.
//!
//! HF `tokenizers` has both samplers, but draws from an unseeded thread RNG; kiln's must be a pure
//! function of (seed, epoch, example) so runs and resumes are exact.

use std::collections::HashMap;

use kiln_recipe::TokenizerSection;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::prepare::Example;
use crate::store::PairSet;
use crate::tokenizer::{SubwordTokenizer, EOS};
use crate::{mix_seed, DataError};

const WORD_START: char = '▁';

enum Sampler {
    /// Pieces → (id, log-probability score), and inverse temperature α.
    Unigram { pieces: HashMap<String, (u32, f64)>, longest: usize, alpha: f64 },
    /// Single characters → id; (left, right) → (merge rank, merged id); dropout p.
    Bpe { chars: HashMap<char, u32>, merges: HashMap<(u32, u32), (u32, u32)>, dropout: f64 },
}

/// Resamples the segmentation of training examples.
pub struct Regulariser {
    sampler: Sampler,
    /// id → piece text (empty for specials, which are never resampled).
    pieces: Vec<String>,
}

impl Regulariser {
    /// `None` when the recipe asks for no regularisation. The tokenizer must match the setting
    /// (a loaded `tokenizer.json` may be either kind).
    pub fn new(tokenizer: &SubwordTokenizer, settings: &TokenizerSection) -> Result<Option<Self>, DataError> {
        if settings.sample_alpha <= 0.0 && settings.bpe_dropout <= 0.0 {
            return Ok(None);
        }
        let json: Value = serde_json::from_str(&tokenizer.to_json()).map_err(|e| DataError::new("tokenizer", format!("cannot read tokenizer: {e}")))?;
        let model = &json["model"];
        let kind = model["type"].as_str().unwrap_or("?");
        let key = if settings.sample_alpha > 0.0 { "tokenizer.sample_alpha" } else { "tokenizer.bpe_dropout" };
        let wrong = |why: String| DataError::new(key, why);
        if json["pre_tokenizer"]["type"].as_str() != Some("Metaspace") {
            return Err(wrong("subword regularisation needs a tokenizer with a Metaspace pre-tokenizer (as kiln trains them)".into()));
        }
        let mut pieces = vec![String::new(); tokenizer.vocab_size()];
        let sampler = if settings.sample_alpha > 0.0 {
            if kind != "Unigram" {
                return Err(wrong(format!("subword sampling needs a Unigram tokenizer, this one is {kind} (use tokenizer.bpe_dropout)")));
            }
            let mut map = HashMap::new();
            let mut longest = 1;
            for (id, entry) in model["vocab"].as_array().into_iter().flatten().enumerate() {
                let (Some(piece), Some(score)) = (entry[0].as_str(), entry[1].as_f64()) else {
                    return Err(wrong("malformed Unigram vocabulary in the tokenizer".into()));
                };
                if id as u32 > EOS && id < pieces.len() {
                    pieces[id] = piece.to_string();
                    longest = longest.max(piece.chars().count());
                    map.insert(piece.to_string(), (id as u32, score));
                }
            }
            Sampler::Unigram { pieces: map, longest, alpha: settings.sample_alpha }
        } else {
            if kind != "BPE" {
                return Err(wrong(format!("BPE-dropout needs a BPE tokenizer, this one is {kind} (use tokenizer.sample_alpha)")));
            }
            let affixes = ["continuing_subword_prefix", "end_of_word_suffix"];
            if affixes.iter().any(|k| model[*k].as_str().is_some_and(|s| !s.is_empty())) || model["ignore_merges"].as_bool() == Some(true) {
                return Err(wrong("BPE-dropout supports BPE models without subword prefixes/suffixes or ignore_merges".into()));
            }
            let mut vocab: HashMap<String, u32> = HashMap::new();
            for (piece, id) in model["vocab"].as_object().into_iter().flatten() {
                let id = id.as_u64().ok_or_else(|| wrong("malformed BPE vocabulary in the tokenizer".into()))? as u32;
                if id > EOS && (id as usize) < pieces.len() {
                    pieces[id as usize] = piece.clone();
                }
                vocab.insert(piece.clone(), id);
            }
            let mut merges = HashMap::new();
            for (rank, m) in model["merges"].as_array().into_iter().flatten().enumerate() {
                // Newer files store `["a", "b"]`, older ones `"a b"`.
                let (a, b) = match m {
                    Value::Array(p) if p.len() == 2 => (p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")),
                    Value::String(s) => s.split_once(' ').unwrap_or(("", "")),
                    _ => ("", ""),
                };
                let ids = (vocab.get(a), vocab.get(b), vocab.get(&format!("{a}{b}")));
                let (Some(&l), Some(&r), Some(&merged)) = ids else {
                    return Err(wrong(format!("BPE merge {rank} ({a:?} + {b:?}) is not in the vocabulary")));
                };
                merges.entry((l, r)).or_insert((rank as u32, merged));
            }
            let chars = vocab.iter().filter_map(|(p, &id)| {
                let mut it = p.chars();
                match (it.next(), it.next()) {
                    (Some(c), None) if id > EOS => Some((c, id)),
                    _ => None,
                }
            });
            Sampler::Bpe { chars: chars.collect(), merges, dropout: settings.bpe_dropout }
        };
        Ok(Some(Self { sampler, pieces }))
    }

    /// A new segmentation of `ids` (one side of an example, no specials added).
    pub fn resample(&self, ids: &[u32], rng: &mut impl Rng) -> Vec<u32> {
        let mut out = Vec::with_capacity(ids.len() + ids.len() / 2);
        let mut span = String::new();
        let mut span_ids: Vec<u32> = Vec::new();
        let mut flush = |span: &mut String, span_ids: &mut Vec<u32>, out: &mut Vec<u32>| {
            if !span_ids.is_empty() {
                match self.segment(span, rng) {
                    Some(seg) => out.extend(seg),
                    None => out.extend_from_slice(span_ids),
                }
                span.clear();
                span_ids.clear();
            }
        };
        for &id in ids {
            let piece = self.pieces.get(id as usize).map(String::as_str).unwrap_or("");
            if piece.is_empty() {
                // Special or unknown: stays, and ends the span.
                flush(&mut span, &mut span_ids, &mut out);
                out.push(id);
                continue;
            }
            if piece.starts_with(WORD_START) {
                flush(&mut span, &mut span_ids, &mut out);
            }
            span.push_str(piece);
            span_ids.push(id);
        }
        flush(&mut span, &mut span_ids, &mut out);
        out
    }

    /// A sampled segmentation of one span of text, or `None` when it cannot be segmented (the
    /// caller keeps the original ids).
    fn segment(&self, text: &str, rng: &mut impl Rng) -> Option<Vec<u32>> {
        match &self.sampler {
            Sampler::Unigram { pieces, longest, alpha } => sample_lattice(text, pieces, *longest, *alpha, rng),
            Sampler::Bpe { chars, merges, dropout } => {
                let mut symbols: Vec<u32> = text.chars().map(|c| chars.get(&c).copied()).collect::<Option<_>>()?;
                bpe_merge(&mut symbols, merges, *dropout, rng);
                Some(symbols)
            }
        }
    }

    /// This epoch's training examples: each side of example `i` resampled with an RNG seeded from
    /// (`seed`, `i`), on all cores. A resampled side longer than `max_len` keeps its original ids.
    pub fn epoch(&self, train: &PairSet, seed: u64, max_len: usize) -> Vec<Example> {
        let n = train.len();
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(n.max(1));
        let chunk = n.div_ceil(threads).max(1);
        let mut out: Vec<Example> = Vec::with_capacity(n);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .step_by(chunk)
                .map(|start| {
                    s.spawn(move || {
                        (start..(start + chunk).min(n))
                            .map(|i| {
                                let mut rng = StdRng::seed_from_u64(mix_seed(seed, i as u64, 0));
                                let side = |ids: Vec<u32>, rng: &mut StdRng| {
                                    let new = self.resample(&ids, rng);
                                    if new.len() <= max_len { new } else { ids }
                                };
                                let src = side(train.src(i).to_vec(), &mut rng);
                                let tgt = side(train.tgt(i).to_vec(), &mut rng);
                                Example { src, tgt }
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for h in handles {
                out.extend(h.join().expect("a resampling thread panicked"));
            }
        });
        out
    }
}

/// Forward-filtering, backward-sampling over the Unigram lattice of `text`: a segmentation drawn
/// with probability ∝ exp(α · Σ log p(piece)). As α grows this tends to the Viterbi segmentation.
fn sample_lattice(text: &str, pieces: &HashMap<String, (u32, f64)>, longest: usize, alpha: f64, rng: &mut impl Rng) -> Option<Vec<u32>> {
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain(std::iter::once(text.len())).collect();
    let n = bounds.len() - 1;
    // forward[j]: log Σ over segmentations of the first j characters.
    let mut forward = vec![f64::NEG_INFINITY; n + 1];
    forward[0] = 0.0;
    let bounds = &bounds;
    let edges = |j: usize| (j.saturating_sub(longest)..j).filter_map(move |i| pieces.get(&text[bounds[i]..bounds[j]]).map(|&(id, score)| (i, id, score)));
    for j in 1..=n {
        let mut acc = f64::NEG_INFINITY;
        for (i, _, score) in edges(j) {
            acc = log_add(acc, forward[i] + alpha * score);
        }
        forward[j] = acc;
    }
    if !forward[n].is_finite() {
        return None;
    }
    let mut out = Vec::new();
    let mut j = n;
    while j > 0 {
        let mut u: f64 = rng.random::<f64>();
        let mut chosen = None;
        for (i, id, score) in edges(j) {
            let p = (forward[i] + alpha * score - forward[j]).exp();
            chosen = Some((i, id));
            if u < p {
                break;
            }
            u -= p;
        }
        // Rounding can leave `u` just above the last edge's mass: that edge is taken.
        let (i, id) = chosen?;
        out.push(id);
        j = i;
    }
    out.reverse();
    Some(out)
}

fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// Applies BPE merges to `symbols`: lowest rank first, leftmost on ties (as `tokenizers` does);
/// with `dropout` > 0 each candidate merge is skipped with that probability at every round.
fn bpe_merge(symbols: &mut Vec<u32>, merges: &HashMap<(u32, u32), (u32, u32)>, dropout: f64, rng: &mut impl Rng) {
    loop {
        let mut best: Option<(u32, usize, u32)> = None;
        for i in 0..symbols.len().saturating_sub(1) {
            if let Some(&(rank, merged)) = merges.get(&(symbols[i], symbols[i + 1])) {
                if dropout > 0.0 && rng.random::<f64>() < dropout {
                    continue;
                }
                if best.is_none_or(|(r, _, _)| rank < r) {
                    best = Some((rank, i, merged));
                }
            }
        }
        let Some((_, i, merged)) = best else { return };
        symbols[i] = merged;
        symbols.remove(i + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_recipe::TokenizerKind;

    fn ding_sentences(n: usize) -> Vec<String> {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/de-en.ding.tsv")).unwrap();
        text.lines().take(n).flat_map(|l| l.split('\t').map(str::to_string).collect::<Vec<_>>()).collect()
    }

    fn setup(kind: TokenizerKind) -> (SubwordTokenizer, Vec<String>, TokenizerSection) {
        let sents = ding_sentences(1500);
        let refs: Vec<&str> = sents.iter().map(String::as_str).collect();
        let settings = TokenizerSection { kind, vocab_size: 600, ..Default::default() };
        (SubwordTokenizer::train(&settings, &refs).unwrap(), sents, settings)
    }

    /// Sampled segmentations spell the same text, vary, and are a function of the seed; the
    /// limit of no randomness gives back `tokenizers`' own segmentation.
    fn check(kind: TokenizerKind, random: TokenizerSection, exact: TokenizerSection) {
        let (tok, sents, _) = setup(kind);
        let refs: Vec<&str> = sents.iter().take(300).map(String::as_str).collect();
        let encoded = tok.encode_batch(&refs).unwrap();
        let reg = Regulariser::new(&tok, &random).unwrap().unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut changed = 0;
        for (text, ids) in refs.iter().zip(&encoded) {
            let sampled = reg.resample(ids, &mut rng);
            assert_eq!(tok.decode(&sampled), tok.decode(ids), "{kind:?}: {text}");
            changed += usize::from(&sampled != ids);
        }
        assert!(changed > 30, "{kind:?}: only {changed} of 300 sentences got another segmentation");

        let exact = Regulariser::new(&tok, &exact).unwrap().unwrap();
        for ids in &encoded {
            assert_eq!(&exact.resample(ids, &mut rng), ids, "{kind:?}");
        }

        let train: Vec<Example> = encoded.chunks(2).map(|c| Example { src: c[0].clone(), tgt: c[1].clone() }).collect();
        let stored = crate::PairSet::from_examples(&train);
        let a = reg.epoch(&stored, 11, 128);
        assert_eq!(a, reg.epoch(&stored, 11, 128), "{kind:?}: same seed, same epoch");
        assert_ne!(a, reg.epoch(&stored, 12, 128), "{kind:?}: another seed, another epoch");
        assert_eq!(a.len(), train.len());
        let capped = reg.epoch(&stored, 11, 12);
        assert!(capped.iter().zip(&train).all(|(c, t)| (c.src.len() <= 12 || c.src == t.src) && (c.tgt.len() <= 12 || c.tgt == t.tgt)));
    }

    #[test]
    fn unigram_sampling() {
        let base = TokenizerSection { kind: TokenizerKind::Unigram, vocab_size: 600, ..Default::default() };
        // α = 1e4 puts all mass on the best path: the Viterbi segmentation `tokenizers` returns.
        check(TokenizerKind::Unigram, TokenizerSection { sample_alpha: 0.2, ..base.clone() }, TokenizerSection { sample_alpha: 1e4, ..base });
    }

    #[test]
    fn bpe_dropout() {
        let base = TokenizerSection { kind: TokenizerKind::Bpe, vocab_size: 600, ..Default::default() };
        // Dropout 1e-12 never fires: plain BPE must reproduce `tokenizers`' merges exactly.
        check(TokenizerKind::Bpe, TokenizerSection { bpe_dropout: 0.1, ..base.clone() }, TokenizerSection { bpe_dropout: 1e-12, ..base });
    }

    #[test]
    fn off_by_default_and_kind_must_match() {
        let (tok, _, settings) = setup(TokenizerKind::Unigram);
        assert!(Regulariser::new(&tok, &settings).unwrap().is_none());
        let e = Regulariser::new(&tok, &TokenizerSection { bpe_dropout: 0.1, ..settings }).err().unwrap();
        assert_eq!(e.origin, "tokenizer.bpe_dropout");
        assert!(e.message.contains("Unigram"), "{e}");
    }
}
