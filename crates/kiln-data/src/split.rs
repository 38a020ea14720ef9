//! Deterministic train/valid/test split: a seeded shuffle of indices, test first, then valid.
//! The same corpus and seed always give the same split, whatever else the recipe says.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

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

#[cfg(test)]
mod tests {
    use super::*;

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
