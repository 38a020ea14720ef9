//! Subword tokenizer: a HF `tokenizers` Unigram or BPE model with a Metaspace pre-tokenizer,
//! trained on the training split (both sides: one shared vocabulary) or loaded from a
//! `tokenizer.json`. Special tokens have fixed ids so models and checkpoints can rely on them.

use std::path::Path;

use kiln_recipe::{TokenizerKind, TokenizerSection};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder};
use std::collections::BTreeMap;

use tokenizers::models::ModelWrapper;
use tokenizers::normalizers::{Lowercase, NormalizerWrapper, Sequence, NFKC};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer,
};

use crate::DataError;

pub const PAD: u32 = 0;
pub const UNK: u32 = 1;
pub const BOS: u32 = 2;
pub const EOS: u32 = 3;
const SPECIALS: [&str; 4] = ["<pad>", "<unk>", "<s>", "</s>"];

/// A trained or loaded tokenizer with kiln's special-token layout checked.
pub struct SubwordTokenizer {
    inner: Tokenizer,
}

impl SubwordTokenizer {
    /// Trains on `texts` (every sentence of both sides of the training split). The same texts and
    /// settings always give the same tokenizer, byte for byte: `tokenizers`' own `train` counts
    /// words in a randomly seeded hash map and sums float scores in that order, so kiln counts the
    /// words itself (sorted) and calls the trainers directly, serially.
    pub fn train(settings: &TokenizerSection, texts: &[&str]) -> Result<Self, DataError> {
        let vocab_size = u32::try_from(settings.vocab_size).map_err(|_| DataError::new("tokenizer.vocab_size", format!("expected at most {}, got {}", u32::MAX, settings.vocab_size)))?;
        let specials: Vec<AddedToken> = SPECIALS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
        let mut norms: Vec<NormalizerWrapper> = vec![NFKC.into()];
        if settings.lowercase {
            norms.push(Lowercase.into());
        }
        let normalizer: NormalizerWrapper = Sequence::new(norms).into();
        let pre_tokenizer = Metaspace::new('▁', PrependScheme::Always, true);
        let fail = |e: tokenizers::Error| DataError::new("tokenizer", format!("training failed: {e}"));

        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for text in texts {
            let mut normalized = NormalizedString::from(*text);
            normalizer.normalize(&mut normalized).map_err(fail)?;
            let mut words = PreTokenizedString::from(normalized);
            pre_tokenizer.pre_tokenize(&mut words).map_err(fail)?;
            for (word, _, _) in words.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                *counts.entry(word.to_owned()).or_default() += 1;
            }
        }

        // `tokenizers`' parallelism switch is process-wide: hold it off for the whole training,
        // and let one training at a time flip it (two overlapping trainings, as in a test run,
        // would otherwise switch it back on under each other and sum floats in a racy order).
        static TRAINING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _serial = TRAINING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let parallel = tokenizers::utils::parallelism::get_parallelism();
        tokenizers::utils::parallelism::set_parallelism(false);
        let trained: Result<(ModelWrapper, Vec<AddedToken>), tokenizers::Error> = (|| match settings.kind {
            TokenizerKind::Unigram => {
                let trainer = UnigramTrainerBuilder::default()
                    .show_progress(false)
                    .vocab_size(vocab_size)
                    .special_tokens(specials)
                    .unk_token(Some("<unk>".into()))
                    .build()?;
                let mut model = Unigram::default();
                let sentences = counts.into_iter().map(|(w, c)| (w, c.min(u32::MAX as u64) as u32)).collect();
                let added = trainer.do_train(sentences, &mut model)?;
                let mut vocab: Vec<(String, f64)> = model.iter().map(|(p, s)| (p.clone(), *s)).collect();
                canonical_unigram_order(&mut vocab[SPECIALS.len()..]);
                let model = Unigram::from(vocab, Some(UNK as usize), model.byte_fallback())?;
                Ok((model.into(), added))
            }
            TokenizerKind::Bpe => {
                let trainer = BpeTrainerBuilder::default()
                    .show_progress(false)
                    .vocab_size(settings.vocab_size)
                    .min_frequency(settings.min_frequency)
                    .special_tokens(specials)
                    .build();
                let mut model = BPE::builder().unk_token("<unk>".into()).build()?;
                let word_counts = counts.into_iter().map(|(w, c)| (w.into(), c)).collect();
                let added = trainer.do_train(&word_counts, &mut model)?;
                Ok((model.into(), added))
            }
        })();
        tokenizers::utils::parallelism::set_parallelism(parallel);
        let (model, added) = trained.map_err(fail)?;

        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_normalizer(Some(normalizer));
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(MetaspaceDecoder::new('▁', PrependScheme::Always, true)));
        tokenizer.add_special_tokens(&added);
        Self::checked(tokenizer, "trained tokenizer")
    }

    /// Loads a `tokenizer.json`; its first four ids must be `<pad> <unk> <s> </s>`.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let origin = path.display().to_string();
        if !path.exists() {
            return Err(DataError::new(origin, "tokenizer file not found"));
        }
        let inner = Tokenizer::from_file(path).map_err(|e| DataError::new(&origin, format!("not a valid tokenizer.json: {}", one_line(&e.to_string()))))?;
        Self::checked(inner, &origin)
    }

    /// Parses a tokenizer from its JSON (as stored in the dataset cache).
    pub fn from_json(json: &str, origin: &str) -> Result<Self, DataError> {
        let inner: Tokenizer = json.parse().map_err(|e: tokenizers::Error| DataError::new(origin, format!("not a valid tokenizer: {}", one_line(&e.to_string()))))?;
        Self::checked(inner, origin)
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> String {
        self.inner.to_string(false).expect("a tokenizer serialises")
    }

    fn checked(inner: Tokenizer, origin: &str) -> Result<Self, DataError> {
        for (id, tok) in SPECIALS.iter().enumerate() {
            if inner.token_to_id(tok) != Some(id as u32) {
                return Err(DataError::new(origin, format!("expected special token {tok} at id {id}")));
            }
        }
        Ok(Self { inner })
    }

    /// Writes `tokenizer.json` atomically (a crash leaves the old file or the new one, never half).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        kiln_events::write_atomic(path, self.to_json().as_bytes()).map_err(|e| DataError::new(path.display().to_string(), format!("cannot write tokenizer: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of many sentences at once (parallel inside `tokenizers`), without specials.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, DataError> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| DataError::new("tokenizer", format!("encoding failed: {e}")))?;
        Ok(encodings.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of ids, stopping at `</s>` and dropping specials.
    pub fn decode(&self, ids: &[u32]) -> String {
        let end = ids.iter().position(|&t| t == EOS).unwrap_or(ids.len());
        let ids: Vec<u32> = ids[..end].iter().copied().filter(|&t| t > EOS).collect();
        self.inner.decode(&ids, true).unwrap_or_default()
    }
}

/// The Unigram trainer gives required characters that its model dropped the scores
/// `min + 0.0001·k` in hash-map order, and ties come out in that order too. Sort ties by piece and
/// hand that tail's scores out in piece order, so the same corpus always gives the same ids.
fn canonical_unigram_order(pieces: &mut [(String, f64)]) {
    pieces.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let is_char = |p: &str| p.chars().count() == 1;
    let mut start = pieces.len();
    // The tail: single characters whose scores step by 0.0001 (or tie).
    let penalty_step = |gap: f64| gap.abs() < 1e-9 || (gap - 1e-4).abs() < 1e-7;
    while start > 1 && is_char(&pieces[start - 1].0) && is_char(&pieces[start - 2].0) && penalty_step(pieces[start - 2].1 - pieces[start - 1].1) {
        start -= 1;
    }
    let head = start.saturating_sub(1).min(pieces.len());
    let tail = &mut pieces[head..];
    if tail.len() > 1 {
        let scores: Vec<f64> = tail.iter().map(|p| p.1).collect();
        tail.sort_by(|a, b| a.0.cmp(&b.0));
        for (p, s) in tail.iter_mut().zip(scores) {
            p.1 = s;
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ding_sentences(n: usize) -> Vec<String> {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/de-en.ding.tsv")).unwrap();
        text.lines().take(n).flat_map(|l| l.split('\t').map(str::to_string).collect::<Vec<_>>()).collect()
    }

    #[test]
    fn trains_round_trips_and_reloads() {
        let sents = ding_sentences(2000);
        let refs: Vec<&str> = sents.iter().map(String::as_str).collect();
        for kind in [TokenizerKind::Unigram, TokenizerKind::Bpe] {
            let settings = TokenizerSection { kind, vocab_size: 500, ..Default::default() };
            let tok = SubwordTokenizer::train(&settings, &refs).unwrap();
            assert!(tok.vocab_size() <= 500 && tok.vocab_size() > 100, "{kind:?} {}", tok.vocab_size());
            let ids = tok.encode_batch(&refs[..4]).unwrap();
            for (sent, ids) in refs[..4].iter().zip(&ids) {
                assert!(ids.iter().all(|&i| i > EOS || i == UNK));
                assert_eq!(tok.decode(ids), *sent, "{kind:?}");
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tokenizer.json");
            tok.save(&path).unwrap();
            let again = SubwordTokenizer::load(&path).unwrap();
            assert_eq!(again.encode_batch(&refs[..4]).unwrap(), ids);
            // Training is deterministic: the same text gives the same file, byte for byte.
            let path2 = dir.path().join("again.json");
            SubwordTokenizer::train(&settings, &refs).unwrap().save(&path2).unwrap();
            let (a, b) = (std::fs::read_to_string(&path).unwrap(), std::fs::read_to_string(&path2).unwrap());
            if a != b {
                let _ = std::fs::write(format!("/tmp/tok-a-{kind:?}.json"), &a);
                let _ = std::fs::write(format!("/tmp/tok-b-{kind:?}.json"), &b);
            }
            assert!(a == b, "{kind:?}: training twice gave different tokenizers");
        }
    }

    #[test]
    fn bad_tokenizer_file_is_a_one_line_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{ not json").unwrap();
        let e = SubwordTokenizer::load(&path).err().unwrap();
        assert!(e.origin.ends_with("tokenizer.json"));
        assert!(!e.to_string().contains('\n'));
    }
}
