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

use crate::family::{epoch_batches, DeviceBatch};

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
    let unbucketed_settings = BatchSettings { pool_batches: 0, ..crate::family::batch_settings(recipe, crate::family::Batches::Train) };
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

/// Figures of one `bench train` run: steady-state training after a warm-up, on the recipe's device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBench {
    pub recipe: String,
    pub device: String,
    pub threads: usize,
    pub warmup_steps: usize,
    /// Steps measured (after the warm-up).
    pub steps: usize,
    /// Target tokens per second over the measured sync windows (their wall time: data wait, sync
    /// and compute).
    pub tokens_per_s: f64,
    /// Host time per optimizer step (batch in hand → update done), over the measured steps.
    pub step_ms_median: f64,
    pub step_ms_p90: f64,
    /// Shares of the measured windows' wall time.
    pub sync_pct: f64,
    pub data_wait_pct: f64,
    pub compute_pct: f64,
    /// Resident memory: the process's peak, and the largest sample of each epoch run.
    pub peak_rss_mb: f64,
    pub rss_per_epoch_mb: Vec<f64>,
    /// Σ loss of the first sync window (a check that kiln and the peer start alike).
    pub first_window_loss_sum: f64,
    pub padding_pct: f64,
}

/// A sink that keeps the windows and shows a progress line on stderr.
struct Collect {
    windows: Vec<kiln_events::WindowRow>,
    first_window_loss_sum: Option<f64>,
    device: String,
}

impl kiln_events::EventSink for Collect {
    fn emit(&mut self, event: &kiln_events::Event) -> Result<(), String> {
        match event {
            kiln_events::Event::RunStarted(info) => self.device = info.device.clone(),
            kiln_events::Event::Window(w) => {
                self.first_window_loss_sum.get_or_insert(w.loss * w.tokens as f64);
                eprint!("\r  step {} | {:.0} tok/s   ", w.step, w.tokens_per_s);
                self.windows.push(w.clone());
            }
            _ => {}
        }
        Ok(())
    }
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mb() -> f64 {
    kiln_train::system::status_kb("VmHWM:").map_or(0.0, |kb| kb as f64 / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((p * sorted.len() as f64) as usize).min(sorted.len() - 1)]
}

/// Trains `recipe` for `warmup + steps` optimizer steps (`steps` = 0: the recipe's whole length)
/// in `scratch`, measuring the steps after the warm-up; the warm-up is rounded up to whole sync
/// windows so that every measured window holds measured steps only.
pub fn bench_train(recipe: &Recipe, steps: usize, warmup: usize, scratch: &Path) -> Result<TrainBench> {
    let mut recipe = recipe.clone();
    let sync = recipe.train.sync_interval;
    let warmup = warmup.div_ceil(sync) * sync;
    if steps > 0 {
        recipe.train.max_steps = warmup + steps;
    }
    recipe.eval.bleu = false;
    let times: kiln_train::trainer::StepTimes = Default::default();
    let launch = crate::Launch {
        recipe: recipe.clone(),
        run_dir: scratch.join("run"),
        resume: None,
        control: kiln_events::Control::new(),
        step_times: Some(times.clone()),
        commit: String::new(),
        nodes: None,
    };
    std::fs::create_dir_all(&launch.run_dir)?;
    let mut sink = Collect { windows: Vec::new(), first_window_loss_sum: None, device: String::new() };
    crate::launch(&launch, &mut sink)?;
    eprintln!();
    let times = times.lock().expect("step times").clone();
    if times.len() <= warmup {
        return Err(anyhow!("bench train: the run had {} steps, not more than the {warmup} warm-up steps", times.len()));
    }
    let measured: Vec<&kiln_events::WindowRow> = sink.windows.iter().filter(|w| w.step > warmup).collect();
    let wall: f64 = measured.iter().map(|w| w.window_s).sum();
    let tokens: u64 = measured.iter().map(|w| w.tokens).sum();
    let sync_s: f64 = measured.iter().map(|w| w.sync_ms).sum::<f64>() / 1e3;
    let wait_s: f64 = measured.iter().map(|w| w.data_wait_ms).sum::<f64>() / 1e3;
    let mut step_ms: Vec<f64> = times[warmup..].to_vec();
    step_ms.sort_by(f64::total_cmp);
    let mut rss_per_epoch: Vec<f64> = Vec::new();
    for w in &sink.windows {
        if rss_per_epoch.len() < w.epoch {
            rss_per_epoch.resize(w.epoch, 0.0);
        }
        rss_per_epoch[w.epoch - 1] = rss_per_epoch[w.epoch - 1].max(w.rss_mb);
    }
    let (real, slots): (f64, f64) = measured.iter().fold((0.0, 0.0), |(r, s), w| {
        let slots = w.tokens as f64; // weight windows by their tokens
        (r + slots * (1.0 - w.padding_pct / 100.0), s + slots)
    });
    Ok(TrainBench {
        recipe: recipe.name.clone(),
        device: sink.device,
        threads: rayon::current_num_threads(),
        warmup_steps: warmup,
        steps: times.len() - warmup,
        tokens_per_s: if wall > 0.0 { tokens as f64 / wall } else { 0.0 },
        step_ms_median: percentile(&step_ms, 0.5),
        step_ms_p90: percentile(&step_ms, 0.9),
        sync_pct: 100.0 * sync_s / wall.max(1e-9),
        data_wait_pct: 100.0 * wait_s / wall.max(1e-9),
        compute_pct: 100.0 * (1.0 - (sync_s + wait_s) / wall.max(1e-9)),
        peak_rss_mb: peak_rss_mb(),
        rss_per_epoch_mb: rss_per_epoch,
        first_window_loss_sum: sink.first_window_loss_sum.unwrap_or(f64::NAN),
        padding_pct: 100.0 * (1.0 - real / slots.max(1e-9)),
    })
}

/// The PyTorch peer's input (`benches/peer/peer_train.py`): the model and training settings and
/// the batches of the first `steps` optimizer steps, exactly as kiln's loader builds them.
pub fn peer_spec(recipe: &Recipe, scratch: &Path, steps: usize, warmup: usize) -> Result<serde_json::Value> {
    if recipe.model.family != kiln_recipe::ModelFamily::Transformer {
        return Err(anyhow!("the PyTorch peer covers model.family = \"transformer\" only"));
    }
    if recipe.tokenizer.sample_alpha > 0.0 || recipe.tokenizer.bpe_dropout > 0.0 {
        return Err(anyhow!("the PyTorch peer gets the prepared segmentations; turn subword regularisation off to compare"));
    }
    let tok = scratch.join("run/tokenizer.json");
    let cache_dir = Some(recipe.loader.cache_dir.as_path()).filter(|p| !p.as_os_str().is_empty());
    let data = kiln_data::prepare(recipe, TokenizerSource::Load(&tok), cache_dir, &|_| {}).map_err(|e| anyhow!("{e}"))?;
    let plan = epoch_batches(&data.train, recipe, 0);
    let per_step = recipe.train.accumulate;
    let sync = recipe.train.sync_interval;
    let warmup = warmup.div_ceil(sync) * sync;
    let total = (warmup + steps).min(plan.len() / per_step);
    let batches: Vec<Vec<serde_json::Value>> = plan
        .chunks(per_step)
        .take(total)
        .map(|group| {
            group
                .iter()
                .map(|indices| {
                    let b = HostBatch::build(&data.train, indices);
                    serde_json::json!({
                        "src": b.src, "src_shape": [b.size, b.src_len],
                        "tgt_in": b.tgt_in, "tgt_shape": [b.size, b.tgt_len],
                        "label_rows": b.label_rows, "labels": b.labels,
                    })
                })
                .collect()
        })
        .collect();
    let m = &recipe.model;
    let tr = &recipe.train;
    Ok(serde_json::json!({
        "threads": rayon::current_num_threads(),
        "seed": tr.seed,
        "warmup_steps": warmup,
        "sync_interval": sync,
        "vocab_size": data.tokenizer.vocab_size(),
        "pad": kiln_data::PAD,
        "model": {
            "d_model": m.d_model, "n_heads": m.n_heads, "d_ff": m.d_ff,
            "encoder_layers": m.encoder_layers, "decoder_layers": m.decoder_layers,
            "dropout": m.dropout, "pre_ln": m.pre_ln, "tie_embeddings": m.tie_embeddings,
            "positions": m.positions, "max_positions": m.max_positions, "activation": m.activation,
        },
        "train": {
            "lr": tr.lr, "schedule": tr.schedule, "warmup_steps": tr.warmup_steps, "min_lr": tr.min_lr,
            "beta1": tr.beta1, "beta2": tr.beta2, "eps": tr.eps, "weight_decay": tr.weight_decay,
            "clip_norm": tr.clip_norm, "label_smoothing": tr.label_smoothing,
        },
        "steps": batches,
    }))
}
