//! Plain text for language models: every split is one token stream (each line's ids followed by
//! `</s>`, so line and paragraph breaks survive), cut into blocks of `data.block_size` tokens.
//!
//! A training block starting at `s` feeds the model `stream[s .. s+B]` and asks it to predict
//! `stream[s+1 .. s+B+1]`. Each epoch cuts the stream from a new random offset in `[0, B)` drawn
//! from (seed, epoch), so block boundaries move between epochs while every token is still used
//! once per epoch; evaluation blocks start at 0 and cover the whole stream, the last one partial.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::batching::BatchSettings;
use crate::store::{Ids, Tokens};
use crate::tokenizer::PAD;

/// Token streams of a text corpus, read from the store where they lie.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextStreams {
    pub train: Tokens,
    pub valid: Tokens,
    pub test: Tokens,
    /// Characters of the validation and test text (`prepare::text_chars`), for the loss per
    /// character; 0 where not known.
    pub valid_chars: u64,
    pub test_chars: u64,
}

/// Start offsets of one epoch's training blocks (full blocks only, in stream order).
pub fn train_blocks(stream_len: usize, block: usize, seed: u64) -> Vec<usize> {
    if stream_len < block + 1 {
        return Vec::new();
    }
    let offset = StdRng::seed_from_u64(seed).random_range(0..block.min(stream_len - block));
    (offset..).step_by(block).take_while(|s| s + block < stream_len).collect()
}

/// Start offsets of evaluation blocks: from 0, every token predicted once, the last block partial.
pub fn eval_blocks(stream_len: usize, block: usize) -> Vec<usize> {
    (0..stream_len.saturating_sub(1)).step_by(block.max(1)).collect()
}

/// Blocks per batch: `max_tokens / block`, capped by `max_sentences`, rounded down to a multiple
/// of `multiple` when that leaves at least one multiple.
pub fn blocks_per_batch(block: usize, settings: BatchSettings) -> usize {
    let mut n = (settings.max_tokens.at(block) / block.max(1)).max(1);
    if settings.max_sentences > 0 {
        n = n.min(settings.max_sentences);
    }
    let m = settings.multiple.max(1);
    if n >= m { n / m * m } else { n }
}

/// Groups block starts into batches; `shuffle = Some(seed)` shuffles the blocks first (training).
pub fn plan_blocks(mut starts: Vec<usize>, block: usize, settings: BatchSettings, shuffle: Option<u64>) -> Vec<Vec<usize>> {
    if let Some(seed) = shuffle {
        starts.shuffle(&mut StdRng::seed_from_u64(seed));
    }
    starts.chunks(blocks_per_batch(block, settings)).map(<[usize]>::to_vec).collect()
}

/// A batch of blocks on the host, row-major `[size, len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBlocks {
    pub size: usize,
    pub len: usize,
    /// Model input: `stream[s .. s+len]` (padded with `<pad>` past the stream's end).
    pub input: Vec<i32>,
    /// Next-token labels `stream[s+1 .. s+len+1]`; `<pad>` where there is none (not counted).
    pub labels: Vec<i32>,
    /// Labels that are not padding.
    pub tokens: usize,
    pub starts: Vec<usize>,
}

impl HostBlocks {
    pub fn build(stream: Ids<'_>, starts: &[usize], block: usize) -> HostBlocks {
        let size = starts.len();
        let mut input = vec![PAD as i32; size * block];
        let mut labels = vec![PAD as i32; size * block];
        let mut tokens = 0;
        for (row, &s) in starts.iter().enumerate() {
            let n = block.min(stream.len().saturating_sub(s + 1));
            if n > 0 {
                for (j, t) in stream.slice(s..s + n + 1).iter().enumerate() {
                    if j < n {
                        input[row * block + j] = t as i32;
                    }
                    if j > 0 {
                        labels[row * block + j - 1] = t as i32;
                    }
                }
            }
            tokens += n;
        }
        HostBlocks { size, len: block, input, labels, tokens, starts: starts.to_vec() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: BatchSettings = BatchSettings { max_tokens: crate::batching::TokenBudget::fixed(64), max_sentences: 0, pool_batches: 0, multiple: 1 };

    #[test]
    fn an_epoch_uses_every_full_block_once_from_a_seeded_offset() {
        let (len, block) = (1000, 16);
        let starts = train_blocks(len, block, 3);
        assert_eq!(starts, train_blocks(len, block, 3));
        assert!(starts[0] < block);
        assert!(starts.windows(2).all(|w| w[1] - w[0] == block));
        assert!(starts.last().unwrap() + block < len, "the last block has its next-token label");
        assert!(starts.len() >= (len - 1) / block - 1);
        let offsets: std::collections::BTreeSet<usize> = (0..20).map(|seed| train_blocks(len, block, seed)[0]).collect();
        assert!(offsets.len() > 5, "offsets move with the seed: {offsets:?}");
        assert!(train_blocks(16, 16, 1).is_empty());
        assert_eq!(train_blocks(17, 16, 1), vec![0]);

        let batches = plan_blocks(starts.clone(), block, SETTINGS, Some(9));
        assert!(batches.iter().all(|b| b.len() <= 4));
        let mut seen: Vec<usize> = batches.concat();
        seen.sort_unstable();
        assert_eq!(seen, starts, "every block exactly once");
        assert_ne!(batches.concat(), starts, "shuffled");
    }

    #[test]
    fn blocks_hold_inputs_and_shifted_labels() {
        let stream: Vec<u32> = (10..30).collect();
        let b = HostBlocks::build(Ids::U32(&stream), &[0, 15], 5);
        assert_eq!(b.input, vec![10, 11, 12, 13, 14, 25, 26, 27, 28, 0]);
        assert_eq!(b.labels, vec![11, 12, 13, 14, 15, 26, 27, 28, 29, 0]);
        assert_eq!(b.tokens, 9);
        // Evaluation covers every next-token prediction exactly once.
        let starts = eval_blocks(stream.len(), 6);
        let all = HostBlocks::build(Ids::U32(&stream), &starts, 6);
        assert_eq!(all.tokens, stream.len() - 1);
        assert_eq!(blocks_per_batch(5, BatchSettings { max_tokens: crate::batching::TokenBudget::fixed(64), max_sentences: 3, pool_batches: 0, multiple: 1 }), 3);
        assert_eq!(blocks_per_batch(5, BatchSettings { max_tokens: crate::batching::TokenBudget::fixed(64), max_sentences: 0, pool_batches: 0, multiple: 8 }), 8);
    }
}
