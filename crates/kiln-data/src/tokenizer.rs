//! Subword tokenizer: a HF `tokenizers` Unigram or BPE model with a Metaspace pre-tokenizer,
//! trained on the training split (both sides: one shared vocabulary) or loaded from a
//! `tokenizer.json`. Special tokens have fixed ids so models and checkpoints can rely on them.

use std::path::Path;

use kiln_recipe::{TokenizerKind, TokenizerSection};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::normalizers::{Lowercase, NormalizerWrapper, Sequence, NFKC};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, Tokenizer};

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
    /// Trains on `texts` (every sentence of both sides of the training split).
    pub fn train(settings: &TokenizerSection, texts: &[&str]) -> Result<Self, DataError> {
        let specials: Vec<AddedToken> = SPECIALS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
        let (model, mut trainer): (ModelWrapper, TrainerWrapper) = match settings.kind {
            TokenizerKind::Unigram => (
                Unigram::default().into(),
                UnigramTrainerBuilder::default()
                    .show_progress(false)
                    .vocab_size(settings.vocab_size as u32)
                    .special_tokens(specials)
                    .unk_token(Some("<unk>".into()))
                    .build()
                    .map_err(|e| DataError::new("tokenizer", e.to_string()))?
                    .into(),
            ),
            TokenizerKind::Bpe => (
                BPE::builder().unk_token("<unk>".into()).build().map_err(|e| DataError::new("tokenizer", e.to_string()))?.into(),
                BpeTrainerBuilder::default()
                    .show_progress(false)
                    .vocab_size(settings.vocab_size)
                    .min_frequency(settings.min_frequency)
                    .special_tokens(specials)
                    .build()
                    .into(),
            ),
        };
        let mut tokenizer = Tokenizer::new(model);
        let mut norms: Vec<NormalizerWrapper> = vec![NFKC.into()];
        if settings.lowercase {
            norms.push(Lowercase.into());
        }
        tokenizer.with_normalizer(Some(Sequence::new(norms)));
        tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
        tokenizer.with_decoder(Some(MetaspaceDecoder::new('▁', PrependScheme::Always, true)));
        tokenizer
            .train(&mut trainer, texts.iter())
            .map_err(|e| DataError::new("tokenizer", format!("training failed: {e}")))?;
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

    fn checked(inner: Tokenizer, origin: &str) -> Result<Self, DataError> {
        for (id, tok) in SPECIALS.iter().enumerate() {
            if inner.token_to_id(tok) != Some(id as u32) {
                return Err(DataError::new(origin, format!("expected special token {tok} at id {id}")));
            }
        }
        Ok(Self { inner })
    }

    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        self.inner.save(path, false).map_err(|e| DataError::new(path.display().to_string(), format!("cannot write tokenizer: {e}")))
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
