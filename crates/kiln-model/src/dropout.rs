//! Dropout with masks that cost one pass. Burn's `Dropout` draws a Bernoulli tensor through its
//! generic sampler (ChaCha, one draw per element), then multiplies twice; on the CPU that was 14 %
//! of a training step (`docs/bench/train.md`). Here the mask — 0 or 1/keep — is filled on the host
//! from a counter-based generator (SplitMix64 of (step seed, call, block)), on all cores, and the
//! input is multiplied once.
//!
//! The trainer turns host masks on per step for CPU devices ([`seed_step`]); elsewhere (GPUs, where
//! the mask should be drawn on the device) and outside training, Burn's `Dropout` runs as before.
//! Masks depend only on (seed, step, the order of dropout calls in the forward pass), so resumed
//! and replayed steps see the same masks whatever the thread count.

use std::cell::Cell;

use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

thread_local! {
    /// (seed of the step, dropout calls so far in it); `None`: Burn's dropout.
    static STEP: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
}

/// Starts a training step's host masks from `seed` (on this thread), or turns them off.
pub fn seed_step(seed: Option<u64>) {
    STEP.with(|s| s.set(seed.map(|seed| (seed, 0))));
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const BLOCK: usize = 1 << 14;

/// Fills `mask` with 0 (probability `prob`) or `1 / (1 - prob)`, from `seed`.
fn fill_mask(mask: &mut [f32], prob: f64, seed: u64) {
    let keep = 1.0 - prob;
    // Keep when a uniform 32-bit draw is below keep × 2³².
    let threshold = (keep * 4_294_967_296.0).min(4_294_967_295.0) as u64;
    let scale = (1.0 / keep) as f32;
    mask.par_chunks_mut(BLOCK).enumerate().for_each(|(block, chunk)| {
        let mut state = splitmix(seed ^ (block as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        for pair in chunk.chunks_mut(2) {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let bits = splitmix(state);
            for (k, m) in pair.iter_mut().enumerate() {
                let draw = (bits >> (32 * k)) & 0xFFFF_FFFF;
                *m = if draw < threshold { scale } else { 0.0 };
            }
        }
    });
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
    let mut mask = vec![0f32; shape.num_elements()];
    fill_mask(&mut mask, dropout.prob, splitmix(seed ^ splitmix(call)));
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
        fill_mask(&mut a, 0.1, 42);
        let kept = a.iter().filter(|&&m| m != 0.0).count() as f64 / a.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        assert!(a.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.9).abs() < 1e-6));
        // The mean is preserved: E[mask] = 1.
        let mean = a.iter().map(|&m| m as f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        let mut b = vec![0f32; 200_000];
        fill_mask(&mut b, 0.1, 42);
        assert_eq!(a, b, "same seed, same mask (whatever the thread count)");
        fill_mask(&mut b, 0.1, 43);
        assert_ne!(a, b);
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
