//! Tokenizer: a HF `tokenizers` Unigram or BPE model with a Metaspace pre-tokenizer, trained on
//! the training split (both sides: one shared vocabulary), characters or bytes, or loaded from a
//! `tokenizer.json`. Special tokens have fixed ids so models and checkpoints can rely on them.
//!
//! Characters and bytes are `tokenizers` models too, so `tokenizer.json` stays the one format:
//! a BPE model without merges splits its input into characters and looks each up. Characters:
//! the vocabulary is the training text's characters after NFC, unknown ones become `<unk>`, and
//! a `Fuse` decoder joins them back without spaces. Bytes: a vocabulary of the 256 byte tokens
//! `<0x00>`…`<0xFF>` (ids 4…259, in byte order) and nothing else, so every character falls back
//! to its UTF-8 bytes (`byte_fallback`), and the `ByteFallback` decoder puts the bytes together.

use std::path::Path;

use kiln_recipe::{TokenizerKind, TokenizerSection};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder};
use std::collections::BTreeMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::ModelWrapper;
use tokenizers::normalizers::{Lowercase, NormalizerWrapper, Sequence, NFC, NFKC};
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
        if matches!(settings.kind, TokenizerKind::Char | TokenizerKind::Byte) {
            return Self::characters(settings, texts);
        }
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
            TokenizerKind::Char | TokenizerKind::Byte => unreachable!("characters and bytes return above"),
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

    /// `kind = "char"` (the texts' characters) or `"byte"` (the 256 bytes; `texts` unused).
    fn characters(settings: &TokenizerSection, texts: &[&str]) -> Result<Self, DataError> {
        let fail = |e: tokenizers::Error| DataError::new("tokenizer", format!("building the {:?} tokenizer failed: {e}", settings.kind));
        let mut norms: Vec<NormalizerWrapper> = Vec::new();
        let mut vocab: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        let byte = settings.kind == TokenizerKind::Byte;
        if byte {
            vocab.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        } else {
            norms.push(NFC.into());
        }
        if settings.lowercase {
            norms.push(Lowercase.into());
        }
        let normalizer: Option<NormalizerWrapper> = (!norms.is_empty()).then(|| Sequence::new(norms).into());
        if !byte {
            let mut counts: BTreeMap<char, u64> = BTreeMap::new();
            for text in texts {
                let mut normalized = NormalizedString::from(*text);
                if let Some(n) = &normalizer {
                    n.normalize(&mut normalized).map_err(fail)?;
                }
                for c in normalized.get().chars() {
                    *counts.entry(c).or_default() += 1;
                }
            }
            for special in SPECIALS {
                // A character that spells a special token on its own cannot be one here.
                counts.retain(|c, _| c.to_string() != special);
            }
            let room = settings.vocab_size.saturating_sub(SPECIALS.len());
            let mut kept: Vec<(char, u64)> = counts.into_iter().collect();
            if kept.len() > room {
                // The most frequent characters; ties by code point, so the vocabulary is one.
                kept.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                kept.truncate(room);
            }
            let mut chars: Vec<char> = kept.into_iter().map(|(c, _)| c).collect();
            chars.sort_unstable();
            vocab.extend(chars.into_iter().map(String::from));
        }
        let ids: ahash::AHashMap<String, u32> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        // Whole lines are the model's words here: its word cache would only hold lines.
        let model = BPE::builder().vocab_and_merges(ids, Vec::new()).cache_capacity(0).unk_token("<unk>".into()).byte_fallback(byte).build().map_err(fail)?;
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_normalizer(normalizer);
        if byte {
            tokenizer.with_decoder(Some(DecoderSequence::new(vec![ByteFallback::new().into(), Fuse::new().into()])));
        } else {
            tokenizer.with_decoder(Some(Fuse::new()));
        }
        let specials: Vec<AddedToken> = SPECIALS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
        tokenizer.add_special_tokens(&specials);
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

    /// Characters: the vocabulary is the training text's characters after NFC (a decomposed "é"
    /// is one), ids by code point after the specials; text round-trips; a character not seen
    /// in training is one `<unk>`; the most frequent characters are kept under `vocab_size`.
    #[test]
    fn characters_are_tokens() {
        let settings = TokenizerSection { kind: TokenizerKind::Char, vocab_size: 100, ..Default::default() };
        let texts = ["First Citizen:", "Before we proceed any further, hear me speak.", "Gru\u{308}ße, e\u{301}te"];
        let tok = SubwordTokenizer::train(&settings, &texts).unwrap();
        let expected: Vec<char> = { let mut v: Vec<char> = "First Citizen:Before we proceed any further, hear me speak.Grüße, éte".chars().collect(); v.sort_unstable(); v.dedup(); v };
        assert_eq!(tok.vocab_size(), 4 + expected.len());
        let ids = tok.encode_batch(&["hear me", "Grüße"]).unwrap();
        assert_eq!(ids[0].len(), 7, "one id per character, spaces included");
        assert_eq!(ids[1].len(), 5);
        assert_eq!(ids[0][0], 4 + expected.iter().position(|&c| c == 'h').unwrap() as u32, "ids by code point");
        assert_eq!(tok.decode(&ids[0]), "hear me");
        assert_eq!(tok.decode(&ids[1]), "Grüße");
        // Unseen characters: one <unk> each.
        let unseen = tok.encode_batch(&["hXq!"]).unwrap().remove(0);
        assert_eq!(unseen, vec![ids[0][0], UNK, UNK, UNK]);
        // Reloaded from its JSON, the same ids; trained again, the same file.
        let again = SubwordTokenizer::from_json(&tok.to_json(), "test").unwrap();
        assert_eq!(again.encode_batch(&["hear me", "Grüße"]).unwrap(), ids);
        assert_eq!(SubwordTokenizer::train(&settings, &texts).unwrap().to_json(), tok.to_json());
        // A cap keeps the most frequent characters.
        let small = SubwordTokenizer::train(&TokenizerSection { vocab_size: 6, ..settings }, &["aaab", "ab c"]).unwrap();
        assert_eq!(small.vocab_size(), 6);
        assert_eq!(small.encode_batch(&["abc"]).unwrap()[0], vec![4, 5, UNK]);
    }

    /// Bytes: 256 byte tokens after the specials, in byte order; every text round-trips, none is
    /// unknown, a character of n UTF-8 bytes is n tokens.
    #[test]
    fn bytes_are_tokens() {
        let settings = TokenizerSection { kind: TokenizerKind::Byte, ..Default::default() };
        let tok = SubwordTokenizer::train(&settings, &[]).unwrap();
        assert_eq!(tok.vocab_size(), 260);
        let texts = ["To be, or not to be", "Grüße 世界 🙂", " \t leading and trailing  "];
        let ids = tok.encode_batch(&texts).unwrap();
        for (text, ids) in texts.iter().zip(&ids) {
            assert_eq!(ids.len(), text.len(), "{text}");
            assert_eq!(ids, &text.bytes().map(|b| 4 + b as u32).collect::<Vec<_>>());
            assert_eq!(tok.decode(ids), *text);
        }
        let again = SubwordTokenizer::from_json(&tok.to_json(), "test").unwrap();
        assert_eq!(again.encode_batch(&texts).unwrap(), ids);
    }
}
