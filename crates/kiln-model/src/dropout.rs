//! Dropout with masks that cost one pass. Burn's `Dropout` draws a Bernoulli tensor through its
//! generic sampler (ChaCha, one draw per element), then multiplies twice; on the CPU that was 14 %
//! of a training step (`docs/bench/train.md`). Here the mask — 0 or 1/keep — is filled on the host
//! from a counter-based generator (SplitMix64 of (step seed, call, block)), on all cores, and the
//! input is multiplied once.
//!
//! The trainer turns host masks on per step for CPU devices ([`seed_step`]); elsewhere (GPUs, where
//! the mask should be drawn on the device) and outside training, Burn's `Dropout` runs as before.
//! Masks depend only on (seed, step, the order of dropout calls in the forward pass), so resumed
//! and replayed steps see the same masks whatever the thread count. A batch cut into parts by
//! rows (the CPU trainer's `backend.cpu_split`) draws, part by part, the very masks of the whole
//! batch: each value is a function of its index in the whole tensor ([`MaskState::at_row`]).

use std::cell::Cell;

use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

thread_local! {
    /// (seed of the step, dropout calls so far in it); `None`: Burn's dropout.
    static STEP: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
    /// The batch row this thread's tensors start at (a part of a batch cut by rows).
    static FIRST_ROW: Cell<usize> = const { Cell::new(0) };
}

/// Starts a training step's host masks from `seed` (on this thread), or turns them off; the
/// batch starts at row 0.
pub fn seed_step(seed: Option<u64>) {
    STEP.with(|s| s.set(seed.map(|seed| (seed, 0))));
    FIRST_ROW.with(|r| r.set(0));
}

/// Where a thread's host masks stand: the step's seed, the dropout calls drawn so far, and the
/// batch row its tensors start at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskState {
    step: Option<(u64, u64)>,
    first_row: usize,
}

impl MaskState {
    /// The same point of the step, for a forward pass of rows `row ..` of the batch: masks are
    /// drawn as for the whole batch, at those rows (every dropped tensor has the batch in its
    /// first dimension).
    pub fn at_row(self, row: usize) -> Self {
        Self { first_row: row, ..self }
    }
}

/// This thread's mask state, to carry over to another thread.
pub fn mask_state() -> MaskState {
    MaskState { step: STEP.with(|s| s.get()), first_row: FIRST_ROW.with(|r| r.get()) }
}

/// Continues from `state` on this thread.
pub fn set_mask_state(state: MaskState) {
    STEP.with(|s| s.set(state.step));
    FIRST_ROW.with(|r| r.set(state.first_row));
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const BLOCK: usize = 1 << 14;

/// Fills `mask` with 0 (probability `prob`) or `1 / (1 - prob)`, from `seed`, as elements
/// `start ..` of a mask drawn whole. Element `e` is half of the 64-bit draw number `e mod BLOCK / 2`
/// of a counter-based stream seeded per block `e / BLOCK`, so any range can be drawn alone.
fn fill_mask(mask: &mut [f32], prob: f64, seed: u64, start: usize) {
    let keep = 1.0 - prob;
    // Keep when a uniform 32-bit draw is below keep × 2³².
    let threshold = (keep * 4_294_967_296.0).min(4_294_967_295.0) as u64;
    let scale = (1.0 / keep) as f32;
    let block_state = |block: usize| splitmix(seed ^ (block as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let draw = |state: u64, pair: usize| splitmix(state.wrapping_add((pair as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    // Chunks aligned to the blocks of the whole mask: the first one ends where its block does.
    let head = (BLOCK - start % BLOCK).min(mask.len());
    let (first, rest) = mask.split_at_mut(head);
    let fill = |chunk: &mut [f32], at: usize| {
        let state = block_state(at / BLOCK);
        let mut offset = at % BLOCK;
        let mut chunk = chunk;
        if offset % 2 == 1 {
            // Starts on the high half of a draw.
            let bits = draw(state, offset / 2);
            chunk[0] = if (bits >> 32) < threshold { scale } else { 0.0 };
            chunk = &mut chunk[1..];
            offset += 1;
        }
        for (i, pair) in chunk.chunks_mut(2).enumerate() {
            let bits = draw(state, offset / 2 + i);
            for (k, m) in pair.iter_mut().enumerate() {
                *m = if (bits >> (32 * k)) & 0xFFFF_FFFF < threshold { scale } else { 0.0 };
            }
        }
    };
    if !first.is_empty() {
        fill(first, start);
    }
    rest.par_chunks_mut(BLOCK).enumerate().for_each(|(i, chunk)| fill(chunk, start + head + i * BLOCK));
}

/// `dropout.forward(x)`, with a host mask when the step turned them on.
pub fn apply<B: Backend, const D: usize>(dropout: &Dropout, x: Tensor<B, D>) -> Tensor<B, D> {
    if dropout.prob == 0.0 || !B::ad_enabled(&x.device()) {
        return x;
    }
    let Some((seed, call)) = STEP.with(|s| s.get()) else {
        return dropout.forward(x);
    };
    STEP.with(|s| s.set(Some((seed, call + 1))));
    let shape = x.shape();
    let n = shape.num_elements();
    let start = FIRST_ROW.with(|r| r.get()) * (n / shape.dims::<D>()[0].max(1));
    let mut mask = vec![0f32; n];
    fill_mask(&mut mask, dropout.prob, splitmix(seed ^ splitmix(call)), start);
    let mask = Tensor::<B, D>::from_data(TensorData::new(mask, shape), &x.device());
    x * mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    #[test]
    fn masks_keep_the_right_share_scale_and_repeat_from_the_seed() {
        let mut a = vec![0f32; 200_000];
        fill_mask(&mut a, 0.1, 42, 0);
        let kept = a.iter().filter(|&&m| m != 0.0).count() as f64 / a.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        assert!(a.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.9).abs() < 1e-6));
        // The mean is preserved: E[mask] = 1.
        let mean = a.iter().map(|&m| m as f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        let mut b = vec![0f32; 200_000];
        fill_mask(&mut b, 0.1, 42, 0);
        assert_eq!(a, b, "same seed, same mask (whatever the thread count)");
        fill_mask(&mut b, 0.1, 43, 0);
        assert_ne!(a, b);
    }

    /// Any range drawn alone equals that range of the whole mask: odd and even starts, within a
    /// block and across block boundaries.
    #[test]
    fn a_range_drawn_alone_is_that_range_of_the_whole_mask() {
        let mut whole = vec![0f32; 3 * BLOCK + 77];
        fill_mask(&mut whole, 0.3, 9, 0);
        for (start, len) in [(0, 5), (1, 1), (1, 2), (7, 100), (BLOCK - 3, 10), (BLOCK, BLOCK), (BLOCK + 1, 2 * BLOCK + 76), (2 * BLOCK - 1, BLOCK + 2)] {
            let mut part = vec![0f32; len];
            fill_mask(&mut part, 0.3, 9, start);
            assert_eq!(part, whole[start..start + len], "elements {start}..{}", start + len);
        }
    }

    #[test]
    fn host_masks_only_in_training_steps_that_ask_for_them() {
        type B = Autodiff<Flex>;
        let device = Default::default();
        let dropout = burn::nn::DropoutConfig::new(0.5).init();
        let x = Tensor::<B, 2>::ones([64, 64], &device);
        seed_step(Some(7));
        let first = apply(&dropout, x.clone()).into_data();
        let second = apply(&dropout, x.clone()).into_data();
        assert_ne!(first, second, "each call in a step draws a new mask");
        seed_step(Some(7));
        assert_eq!(apply(&dropout, x.clone()).into_data(), first, "a step seeded alike repeats its masks");
        let values: Vec<f32> = first.to_vec().unwrap();
        assert!(values.iter().all(|&v| v == 0.0 || v == 2.0));
        // Without autodiff (evaluation) nothing is dropped.
        let plain = Tensor::<Flex, 2>::ones([4, 4], &device);
        assert_eq!(apply(&dropout, plain.clone()).into_data(), plain.into_data());
        seed_step(None);
    }
}
