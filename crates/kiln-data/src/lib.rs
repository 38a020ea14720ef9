//! Data for kiln: parallel corpora on disk → token ids → padded host batches.
//!
//! `corpus` reads and checks TSV files, `split` carves train/valid/test deterministically,
//! `tokenizer` trains or loads a HF `tokenizers` model, `batching` groups examples under a token
//! budget, and `prepare` ties them together for a recipe. Nothing here knows about tensors.

pub mod batching;
pub mod cache;
pub mod corpus;
pub mod loader;
pub mod prepare;
pub mod split;
pub mod tokenizer;

use std::fmt;

/// One-line, user-facing error about data: `origin` is `file:line`, a file, or a recipe key.
#[derive(Debug, Clone, PartialEq)]
pub struct DataError {
    pub origin: String,
    pub message: String,
}

impl DataError {
    pub fn new(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Self { origin: origin.into(), message: message.into() }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

impl std::error::Error for DataError {}

pub use batching::{plan_batches, HostBatch};
pub use corpus::{read_parallel, Pair};
pub use prepare::{prepare, CacheReport, EvalSet, Example, Prepared, Stage, TokenizerSource};
pub use tokenizer::{SubwordTokenizer, BOS, EOS, PAD, UNK};
