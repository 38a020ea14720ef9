//! Dropout with masks that cost one pass. Burn's `Dropout` draws a Bernoulli tensor through its
//! generic sampler (ChaCha, one draw per element), then multiplies twice; on the CPU that was 14 %
//! of a training step (`docs/bench/train.md`). Here the mask — 0 or 1/keep — is a hash of each
//! element's index (two rounds of MurmurHash3's 32-bit finaliser, keyed by SplitMix64 of the step's
//! seed and the call), drawn on the host 8 lanes at a time on all cores, and the input is multiplied
//! once. Kernels that fuse dropout ([`HostMask`]) draw it inside their own pass, and again for the
//! backward, instead of storing it.
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
use crate::fused::math::MaskStream;

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

/// The mask of probability `prob` keyed by `seed`: each element's value a hash of its index
/// (`crate::fused::math::MaskStream`), so any range of a mask can be drawn alone, in any order.
fn stream(prob: f64, seed: u64) -> MaskStream {
    let keep = 1.0 - prob;
    let key = splitmix(seed);
    // Keep when a uniform 32-bit draw is below keep × 2³².
    MaskStream { k1: key as u32, k2: (key >> 32) as u32, threshold: (keep * 4_294_967_296.0).min(4_294_967_295.0) as u32, scale: (1.0 / keep) as f32 }
}

/// Fills `mask` with 0 (probability `prob`) or `1 / (1 - prob)`, from `seed`, as elements
/// `start ..` of a mask drawn whole.
#[cfg(test)]
fn fill_mask(mask: &mut [f32], prob: f64, seed: u64, start: usize) {
    crate::fused::math::mask_fill(mask, start as u64, stream(prob, seed));
}

/// One host mask of a step, not drawn yet: kernels that fuse dropout draw it where they apply it
/// (and draw it again for the backward, instead of keeping it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostMask {
    stream: MaskStream,
    start: u64,
}

impl HostMask {
    /// `values ← values · mask`.
    pub fn multiply(&self, values: &mut [f32]) {
        crate::fused::math::mask_multiply(values, self.start, self.stream);
    }

    /// `values ← base + values · mask` (a residual connection's add), element by element.
    pub fn multiply_add(&self, values: &mut [f32], base: &[f32]) {
        crate::fused::math::mask_multiply_add(values, base, self.start, self.stream);
    }

    /// The mask itself.
    pub fn fill(&self, mask: &mut [f32]) {
        crate::fused::math::mask_fill(mask, self.start, self.stream);
    }
}

/// The host mask `dropout` takes next in this step for a tensor of `dims` (the batch first), in a
/// training (autodiff) pass: what [`apply`] would multiply by. `None` without dropout or with host
/// masks off; the call is then not counted.
pub fn next_host_mask(dropout: &Dropout, dims: &[usize]) -> Option<HostMask> {
    if dropout.prob == 0.0 {
        return None;
    }
    let (seed, call) = STEP.with(|s| s.get())?;
    STEP.with(|s| s.set(Some((seed, call + 1))));
    let n: usize = dims.iter().product();
    let start = FIRST_ROW.with(|r| r.get()) * (n / dims.first().copied().unwrap_or(1).max(1));
    Some(HostMask { stream: stream(dropout.prob, splitmix(seed ^ splitmix(call))), start: start as u64 })
}

/// `dropout.forward(x)`, with a host mask when the step turned them on.
pub fn apply<B: Backend, const D: usize>(dropout: &Dropout, x: Tensor<B, D>) -> Tensor<B, D> {
    if dropout.prob == 0.0 || !B::ad_enabled(&x.device()) {
        return x;
    }
    let shape = x.shape();
    let Some(host) = next_host_mask(dropout, &shape.dims::<D>()) else {
        return dropout.forward(x);
    };
    let mut mask = vec![0f32; shape.num_elements()];
    host.fill(&mut mask);
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

    /// Any range drawn alone equals that range of the whole mask: odd and even starts, across the
    /// parallel chunks (16 Ki elements) and across a change of the index's high 32 bits.
    #[test]
    fn a_range_drawn_alone_is_that_range_of_the_whole_mask() {
        const C: usize = 16 * 1024;
        let mut whole = vec![0f32; 3 * C + 77];
        fill_mask(&mut whole, 0.3, 9, 0);
        for (start, len) in [(0, 5), (1, 1), (1, 2), (7, 100), (C - 3, 10), (C, C), (C + 1, 2 * C + 76), (2 * C - 1, C + 2)] {
            let mut part = vec![0f32; len];
            fill_mask(&mut part, 0.3, 9, start);
            assert_eq!(part, whole[start..start + len], "elements {start}..{}", start + len);
        }
        let high = (1usize << 32) - 1000;
        let mut across = vec![0f32; 3000];
        fill_mask(&mut across, 0.3, 9, high);
        for (i, &m) in across.iter().enumerate().step_by(97) {
            let mut one = [0f32];
            fill_mask(&mut one, 0.3, 9, high + i);
            assert_eq!(one[0], m, "element {}", high + i);
        }
    }

    /// The vectorised kernels against the definition, written out again here: element `i` kept
    /// when fmix32(fmix32(lo ⊕ k1) ⊕ hi ⊕ k2) < keep·2³².
    #[test]
    fn masks_follow_their_definition_element_by_element() {
        fn fmix(mut h: u32) -> u32 {
            h ^= h >> 16;
            h = h.wrapping_mul(0x85EB_CA6B);
            h ^= h >> 13;
            h = h.wrapping_mul(0xC2B2_AE35);
            h ^ (h >> 16)
        }
        let s = stream(0.25, 77);
        let start = (5u64 << 32) + 123;
        let mut got = vec![0f32; 40_000];
        crate::fused::math::mask_fill(&mut got, start, s);
        for (i, &m) in got.iter().enumerate() {
            let index = start + i as u64;
            let kept = fmix(fmix(index as u32 ^ s.k1) ^ (index >> 32) as u32 ^ s.k2) < s.threshold;
            assert_eq!(m, if kept { s.scale } else { 0.0 }, "element {index}");
        }
        let mut values: Vec<f32> = (0..40_000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let base: Vec<f32> = (0..40_000).map(|i| (i % 13) as f32).collect();
        let want: Vec<f32> = values.iter().zip(&base).zip(&got).map(|((v, b), m)| b + v * m).collect();
        crate::fused::math::mask_multiply_add(&mut values, &base, start, s);
        assert_eq!(values, want);
    }

    /// No visible structure: neighbours and consecutive calls' masks are kept together as often
    /// as independent draws would be (keep² = 0.81 at p = 0.1).
    #[test]
    fn neighbouring_elements_and_consecutive_masks_are_independent() {
        let n = 400_000;
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        fill_mask(&mut a, 0.1, 5, 0);
        fill_mask(&mut b, 0.1, 6, 0);
        let both = |x: &[f32], y: &[f32]| x.iter().zip(y).filter(|(p, q)| **p != 0.0 && **q != 0.0).count() as f64 / x.len() as f64;
        for (what, share) in [("neighbours", both(&a[..n - 1], &a[1..])), ("row apart", both(&a[..n - 128], &a[128..])), ("consecutive masks", both(&a, &b))] {
            assert!((share - 0.81).abs() < 0.004, "{what}: kept together {share}");
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
