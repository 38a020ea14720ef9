//! Deterministic train/valid/test split: a seeded shuffle of indices, test first, then valid.
//! The same corpus and seed always give the same split, whatever else the recipe says.
//!
//! [`held_out`] draws the same split without a permutation of the whole corpus: it replays the
//! shuffle (rand 0.9's forward Fisher–Yates, `IncreasingUniform`) keeping only the first
//! `valid + test` positions, so a corpus of any size costs O(valid + test) memory and the split
//! is the one [`split_indices`] gives (a test compares them). `IncreasingUniform` is private to
//! rand, so its few lines are repeated here (rand is MIT/Apache-2.0). [`Sampler`] draws a
//! seeded sample of a stream in one pass (the tokenizer's sentences, a mixture's partial corpus).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Indices of each split, each sorted ascending so files keep their order within a split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub valid: Vec<usize>,
    pub test: Vec<usize>,
}

/// Splits `n` items; `valid` and `test` are shrunk if the corpus is too small to keep ≥ 1 training
/// item (the caller reports sizes).
pub fn split_indices(n: usize, valid: usize, test: usize, seed: u64) -> Split {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let test = test.min(n.saturating_sub(1));
    let valid = valid.min(n.saturating_sub(1 + test));
    let mut t: Vec<usize> = order[..test].to_vec();
    let mut v: Vec<usize> = order[test..test + valid].to_vec();
    let mut tr: Vec<usize> = order[test + valid..].to_vec();
    t.sort_unstable();
    v.sort_unstable();
    tr.sort_unstable();
    Split { train: tr, valid: v, test: t }
}

/// The held-out items of [`split_indices`], each sorted ascending; every other item trains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldOut {
    pub valid: Vec<usize>,
    pub test: Vec<usize>,
}

/// The held-out part of `split_indices(n, valid, test, seed)`, in O(valid + test) memory.
pub fn held_out(n: usize, valid: usize, test: usize, seed: u64) -> HeldOut {
    let test = test.min(n.saturating_sub(1));
    let valid = valid.min(n.saturating_sub(1 + test));
    let k = test + valid;
    // Positions 0..k of the shuffled order. Step i swaps positions i and j ≤ i; position i holds
    // i until then, so positions ≥ k only matter when they move a new value into one below k.
    let mut first: Vec<usize> = (0..k).collect();
    if n > 1 && k > 0 {
        let mut chooser = IncreasingUniform::new(StdRng::seed_from_u64(seed));
        for i in 0..n {
            let j = chooser.next_index();
            if i < k {
                first.swap(i, j);
            } else if j < k {
                first[j] = i;
            }
        }
    }
    let mut t = first[..test].to_vec();
    let mut v = first[test..].to_vec();
    t.sort_unstable();
    v.sort_unstable();
    HeldOut { valid: v, test: t }
}

/// Selection sampling (Knuth's algorithm S): keeps `want` of `population` items met in order,
/// each set of `want` equally likely, in one pass and O(1) state; keeps all when `want` ≥
/// `population`. The kept items stay in file order.
pub(crate) struct Sampler {
    rng: StdRng,
    want: usize,
    left: usize,
}

impl Sampler {
    pub(crate) fn new(want: usize, population: usize, seed: u64) -> Sampler {
        Sampler { rng: StdRng::seed_from_u64(seed), want: want.min(population), left: population }
    }
    pub(crate) fn keep(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        let take = self.want > 0 && (self.want == self.left || self.rng.random_range(0..self.left) < self.want);
        self.left -= 1;
        if take {
            self.want -= 1;
        }
        take
    }
}

/// A number in `[0, n]`, `n` growing by one per call, several drawn from one random `u32`:
/// rand 0.9's `seq::increasing_uniform`, which `shuffle` uses for slices shorter than `u32::MAX`.
struct IncreasingUniform {
    rng: StdRng,
    n: u32,
    chunk: u32,
    chunk_remaining: u8,
}

impl IncreasingUniform {
    /// The first number returned is in `[0, 0]`.
    fn new(rng: StdRng) -> Self {
        Self { rng, n: 0, chunk: 0, chunk_remaining: 1 }
    }

    fn next_index(&mut self) -> usize {
        let next_n = self.n + 1;
        let next_chunk_remaining = self.chunk_remaining.checked_sub(1).unwrap_or_else(|| {
            let (bound, remaining) = bound_u32(next_n);
            self.chunk = self.rng.random_range(..bound);
            remaining - 1
        });
        let result = if next_chunk_remaining == 0 {
            self.chunk as usize
        } else {
            let r = self.chunk % next_n;
            self.chunk /= next_n;
            r as usize
        };
        self.chunk_remaining = next_chunk_remaining;
        self.n = next_n;
        result
    }
}

/// `(m (m+1) … (m+count-1), count)`, the longest such product that fits a `u32`.
fn bound_u32(m: u32) -> (u32, u8) {
    let mut product = m;
    let mut current = m + 1;
    loop {
        match u32::checked_mul(product, current) {
            Some(p) => {
                product = p;
                current += 1;
            }
            None => return (product, (current - m) as u8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_is_the_split_without_the_permutation() {
        for n in [0, 1, 2, 3, 7, 100, 1000, 20_000] {
            for (valid, test) in [(0, 0), (1, 0), (0, 1), (5, 3), (50, 30), (500, 700)] {
                for seed in [0, 1, 42, 12345] {
                    let s = split_indices(n, valid, test, seed);
                    assert_eq!(held_out(n, valid, test, seed), HeldOut { valid: s.valid, test: s.test }, "n {n}, valid {valid}, test {test}, seed {seed}");
                }
            }
        }
    }

    #[test]
    fn split_is_a_deterministic_partition() {
        let a = split_indices(1000, 50, 30, 7);
        assert_eq!(a, split_indices(1000, 50, 30, 7));
        assert_ne!(a, split_indices(1000, 50, 30, 8));
        assert_eq!((a.train.len(), a.valid.len(), a.test.len()), (920, 50, 30));
        let mut all: Vec<usize> = a.train.iter().chain(&a.valid).chain(&a.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn tiny_corpus_keeps_a_training_item() {
        let s = split_indices(3, 5, 5, 1);
        assert_eq!(s.train.len(), 1);
    }
}
