//! `kiln bench data`: the data pipeline's figures, measured in one run on this machine: cold
//! preparation against a dataset-cache hit, loader throughput with 1 and 2 workers, and padding
//! with and without length bucketing, and the cost of resampling an epoch's segmentations
//! (subword regularisation). Ratios, not absolute timings, are the point.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use burn::backend::Flex;
use kiln_data::batching::{plan_batches, BatchSettings};
use kiln_data::loader::Loader;
use kiln_data::prepare::TokenizerSource;
use kiln_data::HostBatch;
use kiln_recipe::Recipe;

use crate::trainer::{epoch_batches, DeviceBatch};

/// Figures of one `bench data` run.
#[derive(Debug, Clone)]
pub struct DataBench {
    pub pairs: usize,
    pub cold_s: f64,
    pub hit_s: f64,
    /// Batches per second through the loader, with 1 and 2 workers (tensors built on the CPU).
    pub loader_1: f64,
    pub loader_2: f64,
    pub batches: usize,
    pub padding_bucketed: f64,
    pub padding_unbucketed: f64,
    /// How the regularisation row was measured ("Unigram sampling α 0.2" / "BPE-dropout 0.1").
    pub resample_what: String,
    /// Seconds to resample every training example once (one epoch).
    pub resample_s: f64,
}

fn padding(batches: &[Vec<usize>], examples: &[kiln_data::Example]) -> f64 {
    let (mut real, mut slots) = (0u64, 0u64);
    for b in batches {
        let h = HostBatch::build(examples, b);
        real += h.real_tokens as u64;
        slots += h.slots as u64;
    }
    100.0 * (1.0 - real as f64 / slots.max(1) as f64)
}

pub fn bench_data(recipe: &Recipe, scratch: &Path) -> Result<DataBench> {
    let cache = scratch.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let tok = scratch.join("tokenizer.json");
    let t0 = Instant::now();
    let cold = kiln_data::prepare(recipe, TokenizerSource::TrainAndSave(&tok), Some(&cache), &|_| {}).map_err(|e| anyhow!("{e}"))?;
    let cold_s = t0.elapsed().as_secs_f64();
    if cold.cache.hit {
        return Err(anyhow!("{}: expected a cold cache", cache.display()));
    }
    let t0 = Instant::now();
    let warm = kiln_data::prepare(recipe, TokenizerSource::TrainAndSave(&tok), Some(&cache), &|_| {}).map_err(|e| anyhow!("{e}"))?;
    let hit_s = t0.elapsed().as_secs_f64();
    if !warm.cache.hit {
        return Err(anyhow!("{}: the second preparation missed the cache", cache.display()));
    }

    let plan = epoch_batches(&warm.train, recipe, 0);
    let examples = Arc::new(warm.train.clone());
    let rate = |workers: usize| -> f64 {
        let device = Default::default();
        let build: Arc<dyn Fn(HostBatch) -> DeviceBatch<Flex> + Send + Sync> = Arc::new(move |b| DeviceBatch::new(b, &device));
        let mut loader = Loader::new(workers, recipe.loader.prefetch);
        let t0 = Instant::now();
        loader.start(kiln_data::loader::pair_jobs(&examples, &plan, &build));
        let mut n = 0;
        while let Some(b) = loader.next_batch() {
            std::hint::black_box(&b);
            n += 1;
        }
        n as f64 / t0.elapsed().as_secs_f64()
    };
    let loader_1 = rate(1);
    let loader_2 = rate(2);

    let lengths: Vec<(usize, usize)> = warm.train.iter().map(|e| (e.src.len() + 1, e.tgt.len() + 1)).collect();
    let unbucketed_settings = BatchSettings {
        max_tokens: recipe.loader.max_tokens,
        max_sentences: recipe.loader.max_sentences,
        pool_batches: 0,
        multiple: recipe.loader.batch_multiple,
    };
    let unbucketed = plan_batches(&lengths, unbucketed_settings, Some(recipe.train.seed));

    // The regulariser the recipe's tokenizer kind would use, at a usual strength.
    let mut reg_settings = recipe.tokenizer.clone();
    let resample_what = match recipe.tokenizer.kind {
        kiln_recipe::TokenizerKind::Unigram => {
            reg_settings.sample_alpha = 0.2;
            "Unigram sampling, α = 0.2".to_string()
        }
        kiln_recipe::TokenizerKind::Bpe => {
            reg_settings.bpe_dropout = 0.1;
            "BPE-dropout 0.1".to_string()
        }
    };
    let regulariser = kiln_data::Regulariser::new(&warm.tokenizer, &reg_settings).map_err(|e| anyhow!("{e}"))?.expect("settings turn it on");
    let t0 = Instant::now();
    std::hint::black_box(regulariser.epoch(&warm.train, recipe.train.seed, recipe.data.max_len));
    let resample_s = t0.elapsed().as_secs_f64();
    Ok(DataBench {
        pairs: warm.train.len() + warm.valid.examples.len() + warm.test.examples.len(),
        cold_s,
        hit_s,
        loader_1,
        loader_2,
        batches: plan.len(),
        padding_bucketed: padding(&plan, &warm.train),
        padding_unbucketed: padding(&unbucketed, &warm.train),
        resample_what,
        resample_s,
    })
}

impl DataBench {
    /// A Markdown section for `docs/bench/data.md`.
    pub fn markdown(&self, recipe: &str, machine: &str, commit: &str, date: &str) -> String {
        format!(
            "## {date} · {recipe} · commit {commit}\n\n\
             Machine: {machine}. {pairs} sentence pairs, {batches} training batches per epoch.\n\n\
             | measure | value | goal |\n|---|---|---|\n\
             | cold prepare (read, split, train tokenizer, encode, store) | {cold:.2} s | |\n\
             | prepare from a cache hit | {hit:.3} s | |\n\
             | cache speed-up | **{speedup:.0}×** | ≥ 20× |\n\
             | loader, 1 worker | {l1:.0} batches/s | |\n\
             | loader, 2 workers | {l2:.0} batches/s ({lr:.2}× of 1 worker) | |\n\
             | padding with length bucketing | **{pb:.1} %** | ≤ 5 % |\n\
             | padding without bucketing | {pu:.1} % | |\n\
             | bucketed / unbucketed padding | {pr:.1} % | |\n\
             | resampling one epoch's segmentations ({rw}, all cores) | {rs:.2} s ({rf:.1} % of cold prepare) | |\n\n",
            pairs = self.pairs,
            batches = self.batches,
            cold = self.cold_s,
            hit = self.hit_s,
            speedup = self.cold_s / self.hit_s.max(1e-9),
            l1 = self.loader_1,
            l2 = self.loader_2,
            lr = self.loader_2 / self.loader_1.max(1e-9),
            pb = self.padding_bucketed,
            pu = self.padding_unbucketed,
            pr = 100.0 * self.padding_bucketed / self.padding_unbucketed.max(1e-9),
            rw = self.resample_what,
            rs = self.resample_s,
            rf = 100.0 * self.resample_s / self.cold_s.max(1e-9),
        )
    }
}
