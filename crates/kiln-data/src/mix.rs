//! Several training corpora mixed into every epoch (`data.train` with weights, or
//! `data.temperature`).
//!
//! Each epoch draws `count_i` pairs from corpus `i`: `round(weight_i × size_i)` by weights, or
//! `round(total × p_i)` with `p_i ∝ size_i^(1/T)` by temperature (the same number of pairs per
//! epoch as plain concatenation). A count past the corpus's size takes every pair
//! `count_i / size_i` times and the rest by selection sampling; the rest is drawn anew every
//! epoch from (seed, epoch, corpus), so an epoch is a pure function of the data, the recipe and
//! its number — resuming repeats it exactly. The epoch is a list of `u32` positions over the
//! corpora laid end to end (four bytes per drawn pair); the pairs themselves stay in their
//! stores, read where they lie. Batching shuffles and buckets it as any pair set.

use crate::split::Sampler;
use crate::store::{Ids, PairIds, PairSet};
use crate::{mix_seed, DataError};

/// Pairs drawn from each corpus in one epoch.
pub fn epoch_counts(sizes: &[usize], weights: &[f64], temperature: f64) -> Vec<usize> {
    if temperature > 0.0 {
        let total: usize = sizes.iter().sum();
        let scores: Vec<f64> = sizes.iter().map(|&n| (n as f64).powf(1.0 / temperature)).collect();
        let sum: f64 = scores.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        scores.iter().map(|s| (total as f64 * s / sum).round() as usize).collect()
    } else {
        sizes.iter().zip(weights).map(|(&n, &w)| (n as f64 * w).round() as usize).collect()
    }
}

/// One epoch of a mixture: positions into the corpora laid end to end.
pub struct MixedEpoch<S: PairIds> {
    sets: Vec<S>,
    /// `starts[i]`: position of corpus `i`'s first pair; one more entry at the end.
    starts: Vec<u64>,
    order: Vec<u32>,
}

impl<S: PairIds> MixedEpoch<S> {
    /// Draws epoch `epoch`'s pairs from `sets` (main corpus first) by `counts` (from
    /// [`epoch_counts`]).
    pub fn draw(sets: Vec<S>, counts: &[usize], seed: u64, epoch: usize) -> Result<Self, DataError> {
        let mut starts = vec![0u64];
        for s in &sets {
            starts.push(starts.last().unwrap() + s.pair_count() as u64);
        }
        let total: usize = counts.iter().sum();
        if *starts.last().unwrap() > u64::from(u32::MAX) || total > u32::MAX as usize {
            return Err(DataError::new("data.train", format!("{} pairs in all corpora, {total} per epoch: kiln indexes at most {} pairs", starts.last().unwrap(), u32::MAX)));
        }
        let mut order = Vec::with_capacity(total);
        for (i, (set, &count)) in sets.iter().zip(counts).enumerate() {
            let n = set.pair_count();
            if n == 0 {
                continue;
            }
            let base = starts[i] as u32;
            for _ in 0..count / n {
                order.extend((0..n as u32).map(|j| base + j));
            }
            // The rest: a selection sample, seeded per epoch and corpus.
            let mut rest = Sampler::new(count % n, n, mix_seed(seed, 6, mix_seed(epoch as u64, i as u64, 0)));
            order.extend((0..n as u32).filter(|_| rest.keep()).map(|j| base + j));
        }
        Ok(MixedEpoch { sets, starts, order })
    }

    /// Which corpus position `i` of the epoch comes from, and its pair there.
    fn locate(&self, i: usize) -> (usize, usize) {
        let g = u64::from(self.order[i]);
        let c = self.starts.partition_point(|&s| s <= g) - 1;
        (c, (g - self.starts[c]) as usize)
    }

    /// Pairs of this epoch drawn from each corpus.
    pub fn drawn(&self) -> Vec<usize> {
        let mut out = vec![0; self.sets.len()];
        for i in 0..self.order.len() {
            out[self.locate(i).0] += 1;
        }
        out
    }
}

impl<S: PairIds> PairIds for MixedEpoch<S> {
    fn pair_count(&self) -> usize {
        self.order.len()
    }
    fn src_ids(&self, i: usize) -> Ids<'_> {
        let (c, j) = self.locate(i);
        self.sets[c].src_ids(j)
    }
    fn tgt_ids(&self, i: usize) -> Ids<'_> {
        let (c, j) = self.locate(i);
        self.sets[c].tgt_ids(j)
    }
    fn pair_lengths(&self, i: usize) -> (usize, usize) {
        let (c, j) = self.locate(i);
        self.sets[c].pair_lengths(j)
    }
}

/// A training corpus besides the main one, prepared into its own store.
#[derive(Clone, Debug)]
pub struct MixCorpus {
    /// The corpus file, for reports.
    pub origin: String,
    pub pairs: PairSet,
    pub dropped_long: usize,
    pub skipped_lines: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::Example;

    fn corpus(n: usize, tag: u32) -> PairSet {
        PairSet::from_examples(&(0..n as u32).map(|j| Example { src: vec![tag, j], tgt: vec![tag] }).collect::<Vec<_>>())
    }

    #[test]
    fn counts_follow_weights_or_temperature() {
        assert_eq!(epoch_counts(&[1000, 200, 50], &[1.0, 0.5, 3.0], 0.0), vec![1000, 100, 150]);
        // T = 1: plain concatenation; large T: nearly even; the total stays the corpora's sum.
        assert_eq!(epoch_counts(&[1000, 200, 50], &[1.0; 3], 1.0), vec![1000, 200, 50]);
        let even = epoch_counts(&[1000, 200, 50], &[1.0; 3], 100.0);
        assert!(even.iter().all(|&c| (400..=440).contains(&c)), "{even:?}");
        let t5 = epoch_counts(&[1000, 200, 50], &[1.0; 3], 5.0);
        assert!(t5[0] < 1000 && t5[2] > 50, "{t5:?}");
    }

    /// Over an epoch each corpus gives exactly its count (so its share is within rounding of the
    /// weights'), every pair of an upsampled corpus at least its whole number of times, and the
    /// epoch is a pure function of (seed, epoch): drawn again — as a resume does — it is the
    /// same; another epoch draws another subset.
    #[test]
    fn an_epoch_draws_each_corpus_its_count_deterministically() {
        let sets = || vec![corpus(1000, 100), corpus(300, 200), corpus(40, 300)];
        let counts = epoch_counts(&[1000, 300, 40], &[1.0, 0.5, 2.5], 0.0);
        assert_eq!(counts, vec![1000, 150, 100]);
        let a = MixedEpoch::draw(sets(), &counts, 7, 3).unwrap();
        assert_eq!(a.pair_count(), 1250);
        assert_eq!(a.drawn(), counts);
        let tag_of = |e: &MixedEpoch<PairSet>, i: usize| e.src_ids(i).get(0);
        let shares: Vec<f64> = [100, 200, 300].iter().map(|&t| (0..a.pair_count()).filter(|&i| tag_of(&a, i) == t).count() as f64 / 1250.0).collect();
        assert_eq!(shares, vec![0.8, 0.12, 0.08]);
        // The third corpus (40 pairs, weight 2.5): every pair twice, 20 a third time, no repeats beyond.
        let mut seen = [0usize; 40];
        for i in 0..a.pair_count() {
            if tag_of(&a, i) == 300 {
                seen[a.src_ids(i).get(1) as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&k| k == 2 || k == 3) && seen.iter().filter(|&&k| k == 3).count() == 20, "{seen:?}");
        let again = MixedEpoch::draw(sets(), &counts, 7, 3).unwrap();
        let ids = |e: &MixedEpoch<PairSet>| (0..e.pair_count()).map(|i| (e.src_ids(i).to_vec(), e.tgt_ids(i).to_vec())).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&again));
        let next = MixedEpoch::draw(sets(), &counts, 7, 4).unwrap();
        assert_ne!(ids(&a), ids(&next), "another epoch, another half of the second corpus");
        assert_eq!(next.drawn(), counts);
    }
}
