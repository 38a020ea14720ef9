//! Data for kiln: corpora on disk → token ids → padded host batches.
//!
//! `corpus` reads and checks TSV and text files, `split` carves train/valid/test deterministically,
//! `tokenizer` trains or loads a HF `tokenizers` model, `store` holds the token ids in one
//! memory-mapped file and `cache` keys and keeps it, `batching`
//! groups sentence pairs under a token budget, `text` cuts token streams into blocks for language
//! models, `augment` resamples segmentations for training, `loader` builds batches on worker
//! threads, and `prepare` ties them together for a recipe. Nothing here knows about tensors.

pub mod augment;
pub mod batching;
pub mod cache;
pub mod corpus;
pub mod loader;
pub mod memo;
pub mod mix;
pub mod prepare;
pub mod split;
pub mod store;
pub mod text;
pub mod tokenizer;

use std::fmt;

/// Mixes a seed with counters into an independent 64-bit seed (SplitMix64 finaliser): every
/// random choice of a run is drawn from a seed made this way from `train.seed` and its position
/// (epoch, step, example), so re-running or resuming repeats it exactly.
pub fn mix_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

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

pub use augment::Regulariser;
pub use batching::{plan_batches, plan_batches_by, BatchPlan, HostBatch};
pub use corpus::{read_parallel, Pair};
pub use prepare::{prepare, CacheReport, DevData, EvalSet, Example, Prepared, Stage, StoreInfo, TokenizerSource};
pub use store::{Ids, PairIds, PairSet, Tokens, Width};
pub use mix::{epoch_counts, MixCorpus, MixedEpoch};
pub use text::{HostBlocks, TextStreams};
pub use tokenizer::{SubwordTokenizer, BOS, EOS, PAD, UNK};
