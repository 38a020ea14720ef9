//! Training data as the loop sees it: for each epoch, its batches in order, as jobs the loader's
//! workers run ahead of the loop ([`TrainData`]). The order must be a pure function of the epoch
//! (and the data's seed), so that a resumed run sees the batches an unbroken one sees.
//!
//! [`DatasetData`] feeds any burn-dataset `Dataset` through a burn `Batcher` into kiln's
//! token-budget batching (length-bucketed, shuffled from (seed, epoch)), its loader workers and
//! its prefetch. burn-train's `DataLoader` is not used for this: its order comes from a shared
//! RNG that the workers draw from as they run (not a function of the epoch, so a resumed run
//! would see other batches), its batch size is a fixed count of items rather than a token
//! budget, and its queue depth is fixed.

use std::marker::PhantomData;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::backend::Backend;
use kiln_data::batching::{plan_batches, BatchSettings, TokenBudget};
pub use kiln_data::loader::Job;
use kiln_data::mix_seed;

/// What kiln's loop trains on.
pub trait TrainData<B: Backend>: Send + Sync {
    type Batch: Send + 'static;

    /// Batches in epoch `epoch` (0-based); the schedule's length is counted from these.
    fn batches(&self, epoch: usize) -> usize;

    /// The batches of epoch `epoch`, in order, as jobs that build each batch on `device`.
    fn epoch(&self, epoch: usize, device: &B::Device) -> Vec<Job<Self::Batch>>;

    /// Training examples, for the run's header (0 where unknown).
    fn examples(&self) -> usize {
        0
    }
}

/// How [`DatasetData`] cuts batches: a budget of padded tokens (batch rows × the longest item's
/// length), an optional cap on rows, and the pool sorted by length to limit padding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batching {
    pub max_tokens: usize,
    /// Cap on items per batch (0 = none).
    pub max_items: usize,
    /// Items are sorted by length inside pools of this many batches' worth (0 = no sorting).
    pub bucket_pool: usize,
    /// Seed of the order: epoch `e` shuffles from (seed, e).
    pub seed: u64,
}

impl Default for Batching {
    fn default() -> Self {
        Self { max_tokens: 4096, max_items: 0, bucket_pool: 400, seed: 1 }
    }
}

/// The item, batch and backend types a [`DatasetData`] is for (it holds none of them).
type Types<B, I, O> = PhantomData<fn() -> (B, I, O)>;

/// A burn-dataset [`Dataset`] of items `I`, batched by a burn [`Batcher`] into `O`, in batches
/// planned by kiln from each item's length (`length`, measured once when this is made).
pub struct DatasetData<B: Backend, I, O, D, Bt> {
    dataset: Arc<D>,
    batcher: Arc<Bt>,
    lengths: Vec<(usize, usize)>,
    batching: Batching,
    _types: Types<B, I, O>,
}

impl<B, I, O, D, Bt> DatasetData<B, I, O, D, Bt>
where
    B: Backend,
    I: Send + 'static,
    O: Send + 'static,
    D: Dataset<I> + 'static,
    Bt: Batcher<B, I, O> + 'static,
{
    /// Reads every item once to measure it (`length`: tokens, or any size the budget counts).
    pub fn new(dataset: D, batcher: Bt, length: impl Fn(&I) -> usize, batching: Batching) -> Self {
        let lengths = (0..dataset.len()).map(|i| dataset.get(i).map_or(0, |item| length(&item).max(1))).map(|len| (len, len)).collect();
        Self { dataset: Arc::new(dataset), batcher: Arc::new(batcher), lengths, batching, _types: PhantomData }
    }

    fn plan(&self, epoch: usize) -> Vec<Vec<usize>> {
        let b = self.batching;
        let settings = BatchSettings { max_tokens: TokenBudget::fixed(b.max_tokens), max_sentences: b.max_items, pool_batches: b.bucket_pool, multiple: 1 };
        plan_batches(&self.lengths, settings, Some(mix_seed(b.seed, 1, epoch as u64)))
    }
}

impl<B, I, O, D, Bt> TrainData<B> for DatasetData<B, I, O, D, Bt>
where
    B: Backend,
    I: Send + 'static,
    O: Send + 'static,
    D: Dataset<I> + 'static,
    Bt: Batcher<B, I, O> + 'static,
{
    type Batch = O;

    fn batches(&self, epoch: usize) -> usize {
        self.plan(epoch).len()
    }

    fn epoch(&self, epoch: usize, device: &B::Device) -> Vec<Job<O>> {
        self.plan(epoch)
            .into_iter()
            .map(|indices| {
                let (dataset, batcher, device) = (Arc::clone(&self.dataset), Arc::clone(&self.batcher), device.clone());
                Box::new(move || {
                    // An index the dataset no longer holds is left out: the plan was made from it.
                    let items: Vec<I> = indices.iter().filter_map(|&i| dataset.get(i)).collect();
                    batcher.batch(items, &device)
                }) as Job<O>
            })
            .collect()
    }

    fn examples(&self) -> usize {
        self.lengths.len()
    }
}

/// kiln's sentence-pair corpus format (`source<TAB>target` per line) as a burn-dataset
/// [`Dataset`] of [`kiln_data::Pair`]s, read with kiln's reader (BOM, CRLF, bad lines named by
/// file and line, or skipped with `OnBadLine::Skip`).
pub struct TsvPairs {
    pairs: Vec<kiln_data::Pair>,
    /// Lines skipped as bad (`OnBadLine::Skip`).
    pub skipped: usize,
}

impl TsvPairs {
    pub fn open(path: &std::path::Path, on_bad_line: kiln_recipe::OnBadLine) -> Result<Self, kiln_data::DataError> {
        let read = kiln_data::read_parallel(path, on_bad_line, 0)?;
        Ok(Self { pairs: read.pairs, skipped: read.skipped })
    }
}

impl Dataset<kiln_data::Pair> for TsvPairs {
    fn get(&self, index: usize) -> Option<kiln_data::Pair> {
        self.pairs.get(index).cloned()
    }

    fn len(&self) -> usize {
        self.pairs.len()
    }
}

/// kiln's plain-text corpus format as a burn-dataset [`Dataset`] of lines (empty lines kept:
/// they mark paragraphs).
pub struct TextLines {
    lines: Vec<String>,
    pub skipped: usize,
}

impl TextLines {
    pub fn open(path: &std::path::Path, on_bad_line: kiln_recipe::OnBadLine) -> Result<Self, kiln_data::DataError> {
        let read = kiln_data::corpus::read_text(path, on_bad_line, 0)?;
        Ok(Self { lines: read.lines, skipped: read.skipped })
    }
}

impl Dataset<String> for TextLines {
    fn get(&self, index: usize) -> Option<String> {
        self.lines.get(index).cloned()
    }

    fn len(&self) -> usize {
        self.lines.len()
    }
}
