//! Batches under a token budget. Examples are shuffled, sorted by length inside pools (as fairseq
//! and Marian do) so a batch holds sentences of similar length, cut so that
//! `sentences × longest side ≤ max_tokens` (a budget that may depend on that longest side: longer
//! sequences cost more memory per token, attention's square), and the batch order is shuffled again. The sort key is
//! (longer side, target, source): the budget is on the longer side, and sorting on it first halved
//! padding against a (target, source) key on the Bible corpus (`docs/bench/data.md`). Everything is
//! a pure function of (lengths, settings, seed, epoch): resuming and re-running give the same batches.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::store::PairIds;
use crate::tokenizer::{BOS, EOS, PAD};

/// Padded tokens a batch may hold, by its longest side: one figure, or a table of up to
/// [`TokenBudget::MAX_ROWS`] rows `(up to this length, tokens)` in increasing length (lengths past
/// the last row get its budget). Copy, so settings stay plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBudget {
    rows: [(usize, usize); TokenBudget::MAX_ROWS],
    len: usize,
}

impl TokenBudget {
    pub const MAX_ROWS: usize = 16;

    pub const fn fixed(tokens: usize) -> Self {
        let mut rows = [(0, 0); Self::MAX_ROWS];
        rows[0] = (usize::MAX, tokens);
        Self { rows, len: 1 }
    }

    /// Rows in increasing length, at most `MAX_ROWS` (the recipe check refuses longer tables;
    /// extra rows are dropped).
    pub fn table(rows: &[(usize, usize)]) -> Self {
        let mut kept = [(0, 0); Self::MAX_ROWS];
        let n = rows.len().min(Self::MAX_ROWS);
        kept[..n].copy_from_slice(&rows[..n]);
        Self { rows: kept, len: n }
    }

    /// The budget of a batch whose longest side is `len`.
    pub fn at(&self, len: usize) -> usize {
        let rows = &self.rows[..self.len];
        rows.iter().find(|(up_to, _)| len <= *up_to).or(rows.last()).map_or(usize::MAX, |r| r.1)
    }

    pub fn rows(&self) -> &[(usize, usize)] {
        &self.rows[..self.len]
    }
}

/// How to cut batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    pub max_tokens: TokenBudget,
    /// 0 = no cap.
    pub max_sentences: usize,
    /// Sorting pools hold this many batches' worth of examples (0 = no length sorting).
    pub pool_batches: usize,
    /// Full batches hold a multiple of this many sentences (1 = any; 8 suits tensor cores).
    pub multiple: usize,
}

/// Groups example indices into batches (small sets: evaluation, decoding, tests); see
/// [`plan_batches_by`].
pub fn plan_batches(lengths: &[(usize, usize)], settings: BatchSettings, shuffle: Option<u64>) -> Vec<Vec<usize>> {
    plan_batches_by(lengths.len(), |i| lengths[i], settings, shuffle).to_vecs()
}

/// A plan of batches: one order of example indices and each batch's range in it. Four bytes per
/// example and eight per batch: a corpus of 20 M pairs plans in 80 MB (fairseq's numpy plans
/// take eight bytes per example).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchPlan {
    order: Vec<u32>,
    batches: Vec<(u32, u32)>,
}

impl BatchPlan {
    /// A plan of the given batches, in order.
    pub fn from_batches(batches: &[Vec<usize>]) -> BatchPlan {
        let mut plan = BatchPlan::default();
        for b in batches {
            let start = plan.order.len() as u32;
            plan.order.extend(b.iter().map(|&i| i as u32));
            plan.batches.push((start, plan.order.len() as u32));
        }
        plan
    }
    pub fn len(&self) -> usize {
        self.batches.len()
    }
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
    /// Example indices of batch `k`, in row order.
    pub fn batch(&self, k: usize) -> &[u32] {
        let (a, b) = self.batches[k];
        &self.order[a as usize..b as usize]
    }
    /// Example indices of batch `k` as `usize` (what [`HostBatch::build`] takes).
    pub fn indices(&self, k: usize) -> Vec<usize> {
        self.batch(k).iter().map(|&i| i as usize).collect()
    }
    pub fn iter(&self) -> impl Iterator<Item = &[u32]> + '_ {
        (0..self.len()).map(|k| self.batch(k))
    }
    pub fn to_vecs(&self) -> Vec<Vec<usize>> {
        (0..self.len()).map(|k| self.indices(k)).collect()
    }
}

/// Groups the indices of `n` examples into batches. `shuffle = Some(seed)` shuffles examples and
/// batch order (training); `None` keeps a deterministic length order (evaluation).
/// `lengths(i)` is example `i`'s (source, target) length *including* the added `</s>` / `<s>`;
/// it is read from the data's index, so planning holds no per-example lengths. At most
/// `u32::MAX` examples (the data side refuses more).
pub fn plan_batches_by(n: usize, lengths: impl Fn(usize) -> (usize, usize), settings: BatchSettings, shuffle: Option<u64>) -> BatchPlan {
    let n = n.min(u32::MAX as usize);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = shuffle.map(StdRng::seed_from_u64);
    let longer = |i: u32| {
        let (s, t) = lengths(i as usize);
        s.max(t)
    };
    let sort = settings.pool_batches > 0;
    let pool = match &mut rng {
        Some(rng) if !sort => {
            order.shuffle(rng);
            order.len().max(1)
        }
        Some(rng) => {
            order.shuffle(rng);
            let mean = (0..n as u32).map(longer).sum::<usize>().max(1) / n.max(1);
            // Saturating: a budget near the schema's limit times many batches is "all of them".
            (settings.max_tokens.at(mean) / mean.max(1)).max(1).saturating_mul(settings.pool_batches).max(1)
        }
        None => order.len().max(1),
    };
    let multiple = settings.multiple.max(1);
    let mut batches: Vec<(u32, u32)> = Vec::new();
    let mut chunk_start = 0;
    for chunk in order.chunks_mut(pool) {
        if sort {
            // Each key computed once (stable, as `sort_by_key`): lengths come from the data's index.
            chunk.sort_by_cached_key(|&i| {
                let (s, t) = lengths(i as usize);
                (s.max(t), t, s)
            });
        }
        // The batch being filled is always a run `start..end` of the sorted chunk.
        let (mut start, mut end) = (0usize, 0usize);
        let mut longest = 0;
        for k in 0..chunk.len() {
            let len = longer(chunk[k]);
            loop {
                let size = end - start;
                let side = longest.max(len);
                let full_tokens = (size + 1) * side > settings.max_tokens.at(side);
                let full_sents = settings.max_sentences > 0 && size + 1 > settings.max_sentences;
                if size == 0 || !(full_tokens || full_sents) {
                    break;
                }
                // Cut at a multiple of `multiple` sentences when the batch is big enough; the rest
                // starts the next batch.
                let keep = if size >= multiple { size / multiple * multiple } else { size };
                batches.push(((chunk_start + start) as u32, (chunk_start + start + keep) as u32));
                start += keep;
                longest = chunk[start..end].iter().map(|&j| longer(j)).max().unwrap_or(0);
            }
            longest = longest.max(len);
            end = k + 1;
        }
        if end > start {
            batches.push(((chunk_start + start) as u32, (chunk_start + end) as u32));
        }
        chunk_start += chunk.len();
    }
    if let Some(rng) = &mut rng {
        batches.shuffle(rng);
    }
    BatchPlan { order, batches }
}

/// A padded batch on the host, row-major `[size, len]`, ready to become tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    pub size: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    /// Source ids + `</s>`.
    pub src: Vec<i32>,
    /// `<s>` + target ids (decoder input).
    pub tgt_in: Vec<i32>,
    /// Target ids + `</s>` (labels).
    pub tgt_out: Vec<i32>,
    /// Non-padding label tokens: the loss is summed over these.
    pub target_tokens: usize,
    /// Flat positions (`row × tgt_len + column`) of the labels that are not padding, and those
    /// labels: the model's output layer runs only there.
    pub label_rows: Vec<i32>,
    pub labels: Vec<i32>,
    /// Real tokens of both sides (with `</s>` / `<s>`) and the slots that hold them
    /// (`size × (src_len + tgt_len)`): padding % = 1 − real / slots.
    pub real_tokens: usize,
    pub slots: usize,
    /// Example indices, in row order.
    pub indices: Vec<usize>,
}

impl HostBatch {
    /// Pads the pairs `indices` of `examples` (a store's pairs or examples in memory).
    pub fn build<P: PairIds + ?Sized>(examples: &P, indices: &[usize]) -> HostBatch {
        let size = indices.len();
        let src_len = indices.iter().map(|&i| examples.src_ids(i).len() + 1).max().unwrap_or(1);
        let tgt_len = indices.iter().map(|&i| examples.tgt_ids(i).len() + 1).max().unwrap_or(1);
        let mut src = vec![PAD as i32; size * src_len];
        let mut tgt_in = vec![PAD as i32; size * tgt_len];
        let mut tgt_out = vec![PAD as i32; size * tgt_len];
        let mut target_tokens = 0;
        let mut real_tokens = 0;
        for (row, &i) in indices.iter().enumerate() {
            let (ex_src, ex_tgt) = (examples.src_ids(i), examples.tgt_ids(i));
            let s = &mut src[row * src_len..];
            for (j, t) in ex_src.iter().enumerate() {
                s[j] = t as i32;
            }
            s[ex_src.len()] = EOS as i32;
            let ti = &mut tgt_in[row * tgt_len..];
            ti[0] = BOS as i32;
            for (j, t) in ex_tgt.iter().enumerate() {
                ti[j + 1] = t as i32;
            }
            let to = &mut tgt_out[row * tgt_len..];
            for (j, t) in ex_tgt.iter().enumerate() {
                to[j] = t as i32;
            }
            to[ex_tgt.len()] = EOS as i32;
            target_tokens += ex_tgt.len() + 1;
            real_tokens += ex_src.len() + 1 + ex_tgt.len() + 1;
        }
        let (label_rows, labels) =
            tgt_out.iter().enumerate().filter(|(_, &t)| t != PAD as i32).map(|(i, &t)| (i as i32, t)).unzip();
        HostBatch {
            size,
            src_len,
            tgt_len,
            src,
            tgt_in,
            tgt_out,
            target_tokens,
            label_rows,
            labels,
            real_tokens,
            slots: size * (src_len + tgt_len),
            indices: indices.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::Example;

    /// Source and target lengths that vary together, as in real sentence pairs.
    fn lengths(n: usize) -> Vec<(usize, usize)> {
        (0..n)
            .map(|i| {
                let t = 2 + (i * 13) % 45;
                ((t + i % 5).saturating_sub(2).max(1), t)
            })
            .collect()
    }

    const SETTINGS: BatchSettings = BatchSettings { max_tokens: TokenBudget::fixed(300), max_sentences: 0, pool_batches: 4, multiple: 1 };

    #[test]
    fn every_example_once_and_budget_respected() {
        let lens = lengths(1000);
        let batches = plan_batches(&lens, SETTINGS, Some(3));
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lens[i].0.max(lens[i].1)).max().unwrap();
            assert!(b.len() * longest <= 300, "{} × {longest}", b.len());
        }
    }

    /// A budget by length: each batch keeps within the row of its own longest side, and short
    /// sentences get bigger batches than under the long rows' budget.
    #[test]
    fn a_budget_table_applies_the_row_of_each_batchs_longest_side() {
        let lens = lengths(2000);
        let table = TokenBudget::table(&[(16, 600), (32, 400), (64, 200)]);
        assert_eq!((table.at(1), table.at(16), table.at(17), table.at(64), table.at(500)), (600, 600, 400, 200, 200));
        let batches = plan_batches(&lens, BatchSettings { max_tokens: table, ..SETTINGS }, Some(4));
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..2000).collect::<Vec<_>>());
        let mut short_over_long_budget = 0;
        for b in &batches {
            let longest = b.iter().map(|&i| lens[i].0.max(lens[i].1)).max().unwrap();
            assert!(b.len() * longest <= table.at(longest), "{} × {longest} over {}", b.len(), table.at(longest));
            if longest <= 16 && b.len() * longest > 200 {
                short_over_long_budget += 1;
            }
        }
        assert!(short_over_long_budget > 0, "short batches should use their bigger budget");
    }

    #[test]
    fn deterministic_by_seed_and_sentence_cap() {
        let lens = lengths(500);
        assert_eq!(plan_batches(&lens, SETTINGS, Some(1)), plan_batches(&lens, SETTINGS, Some(1)));
        assert_ne!(plan_batches(&lens, SETTINGS, Some(1)), plan_batches(&lens, SETTINGS, Some(2)));
        let capped = BatchSettings { max_sentences: 5, ..SETTINGS };
        assert!(plan_batches(&lens, capped, Some(1)).iter().all(|b| b.len() <= 5));
    }

    #[test]
    fn batches_in_multiples_of_eight() {
        let lens = lengths(3000);
        let settings = BatchSettings { max_tokens: TokenBudget::fixed(600), multiple: 8, ..SETTINGS };
        let batches = plan_batches(&lens, settings, Some(5));
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..3000).collect::<Vec<_>>());
        // Every batch but the last of each pool is a multiple of 8 (all batches here hold ≥ 8).
        let ragged = batches.iter().filter(|b| b.len() % 8 != 0).count();
        let pools = 3000_usize.div_ceil((600 / 26) * 4);
        assert!(ragged <= pools, "{ragged} ragged batches for {pools} pools");
        for b in &batches {
            let longest = b.iter().map(|&i| lens[i].0.max(lens[i].1)).max().unwrap();
            assert!(b.len() * longest <= 600);
        }
    }

    #[test]
    fn bucketing_reduces_padding() {
        let lens = lengths(2000);
        let padding = |batches: &[Vec<usize>]| {
            let (mut real, mut padded) = (0, 0);
            for b in batches {
                let longest = b.iter().map(|&i| lens[i].0.max(lens[i].1)).max().unwrap();
                padded += b.len() * longest;
                real += b.iter().map(|&i| lens[i].0.max(lens[i].1)).sum::<usize>();
            }
            1.0 - real as f64 / padded as f64
        };
        let bucketed = padding(&plan_batches(&lens, SETTINGS, Some(1)));
        let unbucketed = padding(&plan_batches(&lens, BatchSettings { pool_batches: 0, ..SETTINGS }, Some(1)));
        assert!(bucketed < unbucketed / 2.0, "{bucketed} vs {unbucketed}");
    }

    /// The planner before batches became ranges of one order (kept to show the plans are equal).
    fn reference_plan(lengths: &[(usize, usize)], settings: BatchSettings, shuffle: Option<u64>) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        let mut rng = shuffle.map(StdRng::seed_from_u64);
        let key = |&i: &usize| (lengths[i].0.max(lengths[i].1), lengths[i].1, lengths[i].0);
        let sort = settings.pool_batches > 0;
        let pool = match &mut rng {
            Some(rng) if !sort => {
                order.shuffle(rng);
                order.len().max(1)
            }
            Some(rng) => {
                order.shuffle(rng);
                let mean = lengths.iter().map(|&(s, t)| s.max(t)).sum::<usize>().max(1) / lengths.len().max(1);
                (settings.max_tokens.at(mean) / mean.max(1)).max(1).saturating_mul(settings.pool_batches).max(1)
            }
            None => order.len().max(1),
        };
        let mut batches = Vec::new();
        for chunk in order.chunks_mut(pool) {
            if sort {
                chunk.sort_by_key(key);
            }
            let mut current: Vec<usize> = Vec::new();
            let mut longest = 0;
            let multiple = settings.multiple.max(1);
            for &i in chunk.iter() {
                let len = lengths[i].0.max(lengths[i].1);
                loop {
                    let side = longest.max(len);
                    let full_tokens = (current.len() + 1) * side > settings.max_tokens.at(side);
                    let full_sents = settings.max_sentences > 0 && current.len() + 1 > settings.max_sentences;
                    if current.is_empty() || !(full_tokens || full_sents) {
                        break;
                    }
                    let keep = if current.len() >= multiple { current.len() / multiple * multiple } else { current.len() };
                    let rest = current.split_off(keep);
                    batches.push(std::mem::replace(&mut current, rest));
                    longest = current.iter().map(|&j| lengths[j].0.max(lengths[j].1)).max().unwrap_or(0);
                }
                longest = longest.max(len);
                current.push(i);
            }
            if !current.is_empty() {
                batches.push(current);
            }
        }
        if let Some(rng) = &mut rng {
            batches.shuffle(rng);
        }
        batches
    }

    mod same_plans {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
            #[test]
            fn ranges_plan_exactly_as_the_vectors_did(
                lens in prop::collection::vec((1usize..80, 1usize..80), 0..400),
                tokens in 1usize..700, sentences in 0usize..12, pool in 0usize..6, multiple in 1usize..9,
                seed in prop::option::of(any::<u64>()),
            ) {
                let settings = BatchSettings { max_tokens: TokenBudget::fixed(tokens), max_sentences: sentences, pool_batches: pool, multiple };
                prop_assert_eq!(plan_batches(&lens, settings, seed), reference_plan(&lens, settings, seed));
            }
        }
    }

    #[test]
    fn host_batch_layout() {
        let ex = vec![Example { src: vec![10, 11], tgt: vec![20] }, Example { src: vec![12], tgt: vec![21, 22, 23] }];
        let b = HostBatch::build(&ex, &[0, 1]);
        assert_eq!((b.size, b.src_len, b.tgt_len), (2, 3, 4));
        assert_eq!(b.src, vec![10, 11, 3, 12, 3, 0]);
        assert_eq!(b.tgt_in, vec![2, 20, 0, 0, 2, 21, 22, 23]);
        assert_eq!(b.tgt_out, vec![20, 3, 0, 0, 21, 22, 23, 3]);
        assert_eq!(b.target_tokens, 6);
        assert_eq!((b.real_tokens, b.slots), (11, 14));
        assert_eq!(b.label_rows, vec![0, 1, 4, 5, 6, 7]);
        assert_eq!(b.labels, vec![20, 3, 21, 22, 23, 3]);
    }
}
