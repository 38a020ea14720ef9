//! `kiln bench data`: the data pipeline's figures, measured in one run on this machine: cold
//! preparation against a dataset-cache hit, loader throughput with 1 and 2 workers, and padding
//! with and without length bucketing, and the cost of resampling an epoch's segmentations
//! (subword regularisation). Ratios, not absolute timings, are the point.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use burn::backend::Flex;
use kiln_data::batching::{BatchPlan, BatchSettings};
use kiln_data::loader::Loader;
use kiln_data::prepare::TokenizerSource;
use kiln_data::{HostBatch, HostBlocks, PairIds};
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

fn padding(batches: &BatchPlan, examples: &kiln_data::PairSet) -> f64 {
    let (mut real, mut slots) = (0u64, 0u64);
    for k in 0..batches.len() {
        let h = HostBatch::build(examples, &batches.indices(k));
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

    let plan = Arc::new(epoch_batches(&warm.train, recipe, 0));
    let examples: Arc<dyn kiln_data::PairIds> = Arc::new(warm.train.clone());
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

    let lengths = |i: usize| {
        let (s, t) = warm.train.lengths(i);
        (s + 1, t + 1)
    };
    let unbucketed_settings = BatchSettings { pool_batches: 0, ..crate::family::batch_settings(recipe, crate::family::Batches::Train) };
    let unbucketed = kiln_data::plan_batches_by(warm.train.len(), lengths, unbucketed_settings, Some(recipe.train.seed));

    // The regulariser the recipe's tokenizer kind would use, at a usual strength.
    let mut reg_settings = recipe.tokenizer.clone();
    let resample = match recipe.tokenizer.kind {
        kiln_recipe::TokenizerKind::Unigram => {
            reg_settings.sample_alpha = 0.2;
            Some("Unigram sampling, α = 0.2")
        }
        kiln_recipe::TokenizerKind::Bpe => {
            reg_settings.bpe_dropout = 0.1;
            Some("BPE-dropout 0.1")
        }
        // One segmentation only: nothing to resample.
        kiln_recipe::TokenizerKind::Char | kiln_recipe::TokenizerKind::Byte => None,
    };
    let (resample_what, resample_s) = match resample {
        Some(what) => {
            let regulariser = kiln_data::Regulariser::new(&warm.tokenizer, &reg_settings).map_err(|e| anyhow!("{e}"))?.expect("settings turn it on");
            let t0 = Instant::now();
            std::hint::black_box(regulariser.epoch(&warm.train, recipe.train.seed, recipe.data.max_len));
            (what.to_string(), t0.elapsed().as_secs_f64())
        }
        None => ("none (characters and bytes have one segmentation)".to_string(), 0.0),
    };
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
    /// Device→host reads of the loss in the measured windows, and the host's wait in them (ms).
    pub reads: u64,
    pub sync_ms_total: f64,
    pub sync_ms_max: f64,
    /// Wall time of the measured windows, seconds.
    pub wall_s: f64,
    /// Σ loss × tokens over the measured windows: equal for every sync setting of one recipe.
    pub loss_token_sum: f64,
    /// Model FLOPs ([`crate::flops`]) per second over the measured steps, in GFLOP/s, and per
    /// target token.
    pub model_gflops: f64,
    pub flops_per_token: f64,
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
    let flops = run_flops(&recipe, scratch, warmup, times.len())?;
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
        reads: measured.len() as u64,
        sync_ms_total: sync_s * 1e3,
        sync_ms_max: measured.iter().map(|w| w.sync_ms).fold(0.0, f64::max),
        wall_s: wall,
        loss_token_sum: measured.iter().map(|w| w.loss * w.tokens as f64).sum(),
        model_gflops: if wall > 0.0 { flops / wall / 1e9 } else { 0.0 },
        flops_per_token: flops / (tokens as f64).max(1.0),
    })
}

/// One setting of `bench sync`: read the loss every `interval` steps, overlapped with the next
/// window or not.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SyncCase {
    pub interval: usize,
    pub overlap: bool,
}

/// A setting's figures: the median over the rounds of each.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncFigures {
    pub case: SyncCase,
    pub steps: usize,
    pub reads: u64,
    pub wait_ms_total: f64,
    pub wait_ms_avg: f64,
    pub wait_ms_max: f64,
    /// Host wait as a share of the measured wall time, percent.
    pub wait_pct: f64,
    pub wall_s: f64,
    pub step_ms_median: f64,
    pub tokens_per_s: f64,
    /// Σ loss × tokens of the measured windows (first round): the same for every setting.
    pub loss_token_sum: f64,
    /// Each round's wall time, seconds.
    pub round_wall_s: Vec<f64>,
}

/// `bench sync`: the same steps of `recipe` read every step and every `interval` steps, each
/// overlapped with the next window and not, alternated over `rounds` rounds.
pub struct SyncBench {
    pub recipe: String,
    pub device: String,
    pub warmup_steps: usize,
    pub rounds: u32,
    pub cases: Vec<SyncFigures>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

pub fn bench_sync(recipe: &Recipe, interval: usize, steps: usize, warmup: usize, rounds: u32, scratch: &Path) -> Result<SyncBench> {
    if interval < 2 {
        return Err(anyhow!("--interval: expected at least 2 (it is compared with reading every step), got {interval}"));
    }
    if steps == 0 || steps % interval != 0 {
        return Err(anyhow!("--steps: expected a positive multiple of --interval {interval} (whole windows in every setting), got {steps}"));
    }
    // Every setting warms up the same steps: whole windows of the longer interval.
    let warmup = warmup.div_ceil(interval) * interval;
    let cases = [SyncCase { interval: 1, overlap: false }, SyncCase { interval: 1, overlap: true }, SyncCase { interval, overlap: false }, SyncCase { interval, overlap: true }];
    let mut runs: Vec<Vec<TrainBench>> = vec![Vec::new(); cases.len()];
    let mut device = String::new();
    for round in 0..rounds {
        for (i, case) in cases.iter().enumerate() {
            eprintln!("bench sync: round {} of {rounds}, sync_interval = {}, sync_overlap = {}", round + 1, case.interval, case.overlap);
            let mut r = recipe.clone();
            r.train.sync_interval = case.interval;
            r.train.sync_overlap = case.overlap;
            let dir = scratch.join(format!("round-{round}-case-{i}"));
            std::fs::create_dir_all(&dir)?;
            let b = bench_train(&r, steps, warmup, &dir)?;
            device = b.device.clone();
            runs[i].push(b);
        }
    }
    let figures = cases
        .iter()
        .zip(runs)
        .map(|(case, rs)| {
            let m = |f: fn(&TrainBench) -> f64| median(rs.iter().map(f).collect());
            let reads = rs[0].reads;
            let wait_ms_total = m(|b| b.sync_ms_total);
            SyncFigures {
                case: *case,
                steps: rs[0].steps,
                reads,
                wait_ms_total,
                wait_ms_avg: wait_ms_total / reads.max(1) as f64,
                wait_ms_max: m(|b| b.sync_ms_max),
                wait_pct: m(|b| 100.0 * b.sync_ms_total / 1e3 / b.wall_s.max(1e-9)),
                wall_s: m(|b| b.wall_s),
                step_ms_median: m(|b| b.step_ms_median),
                tokens_per_s: m(|b| b.tokens_per_s),
                loss_token_sum: rs[0].loss_token_sum,
                round_wall_s: rs.iter().map(|b| b.wall_s).collect(),
            }
        })
        .collect();
    Ok(SyncBench { recipe: recipe.name.clone(), device, warmup_steps: warmup, rounds, cases: figures })
}

impl SyncBench {
    /// The setting every ratio is taken against: a read after every step, waited for at once.
    pub fn baseline(&self) -> &SyncFigures {
        &self.cases[0]
    }

    /// Whether every setting summed the same losses (relative 1e-5: the reads move, the sums not).
    pub fn losses_agree(&self) -> bool {
        let base = self.baseline().loss_token_sum;
        self.cases.iter().all(|c| (c.loss_token_sum - base).abs() <= 1e-5 * base.abs())
    }

    /// A Markdown section for `docs/bench/sync.md`.
    pub fn markdown(&self, machine: &str, commit: &str, date: &str, sets: &[String]) -> String {
        let base = self.baseline();
        let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { "–".into() };
        let mut out = format!(
            "## {date} · {recipe} · {device} · commit {commit}\n\n\
             Machine: {machine}. {steps} measured steps after {warmup} warm-up steps, median of {rounds} alternated round(s){sets}. \
             Σ loss × tokens of the measured windows {agree} across the settings.\n\n\
             | sync_interval | overlap | reads | host wait total / avg / max ms | wait % of wall | wall s | step ms (median) | tokens/s | reads × | wait × | wall × |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
            recipe = self.recipe,
            device = self.device,
            steps = base.steps,
            warmup = self.warmup_steps,
            rounds = self.rounds,
            sets = if sets.is_empty() { String::new() } else { format!(", `--set {}`", sets.join(" --set ")) },
            agree = if self.losses_agree() { "agree (relative 1e-5)" } else { "**differ**" },
        );
        for c in &self.cases {
            out.push_str(&format!(
                "| {} | {} | {} | {:.1} / {:.3} / {:.2} | {:.2} | {:.2} | {:.1} | {:.0} | {} | {} | {} |\n",
                c.case.interval,
                if c.case.overlap { "on" } else { "off" },
                c.reads,
                c.wait_ms_total,
                c.wait_ms_avg,
                c.wait_ms_max,
                c.wait_pct,
                c.wall_s,
                c.step_ms_median,
                c.tokens_per_s,
                ratio(c.reads as f64, base.reads as f64),
                ratio(c.wait_ms_total, base.wait_ms_total),
                ratio(c.wall_s, base.wall_s),
            ));
        }
        out.push_str("\nRatios (×) against sync_interval = 1 without overlap, the loop that reads every step.\n\n");
        out
    }
}

/// The batches of a run's first `steps` optimizer steps (each step's `train.accumulate` batches of
/// example indices, or block starts for text), epoch after epoch, as its loader plans them.
fn run_plan(recipe: &Recipe, data: &kiln_data::Prepared, steps: usize) -> Vec<Vec<Vec<usize>>> {
    let per_step = recipe.train.accumulate.max(1);
    let mut plan: Vec<Vec<usize>> = Vec::new();
    for epoch in 0..recipe.train.epochs {
        if plan.len() >= steps * per_step {
            break;
        }
        match &data.text {
            Some(t) => plan.extend(crate::family::epoch_blocks(t.train.len(), recipe, epoch)),
            None => plan.extend(epoch_batches(&data.train, recipe, epoch).to_vecs()),
        }
    }
    plan.chunks(per_step).take(steps).map(<[Vec<usize>]>::to_vec).collect()
}

/// Model FLOPs ([`crate::flops`]) of steps `from .. to` of a run (its data prepared with the
/// run's tokenizer, through the cache).
fn run_flops(recipe: &Recipe, scratch: &Path, from: usize, to: usize) -> Result<f64> {
    let tok = scratch.join("run/tokenizer.json");
    let cache_dir = Some(recipe.loader.cache_dir.as_path()).filter(|p| !p.as_os_str().is_empty());
    let data = kiln_data::prepare(recipe, TokenizerSource::Load(&tok), cache_dir, &|_| {}).map_err(|e| anyhow!("{e}"))?;
    let vocab = data.tokenizer.vocab_size();
    let plan = run_plan(recipe, &data, to);
    let mut total = 0.0;
    for batch in plan.iter().skip(from).flatten() {
        total += match &data.text {
            Some(t) => {
                let b = HostBlocks::build(t.train.ids(), batch, recipe.data.block_size);
                let rows: Vec<usize> = b.labels.chunks(b.len.max(1)).map(|row| row.iter().filter(|&&l| l != kiln_data::PAD as i32).count()).collect();
                crate::flops::lm_step(&recipe.model, vocab, &rows, b.tokens)
            }
            None => {
                let sequences: Vec<(usize, usize)> = batch
                    .iter()
                    .map(|&i| {
                        let (s, t) = data.train.pair_lengths(i);
                        (s + 1, t + 1)
                    })
                    .collect();
                let labels = sequences.iter().map(|p| p.1).sum();
                crate::flops::translation_step(&recipe.model, vocab, &sequences, labels)
            }
        };
    }
    Ok(total)
}

/// The machine's peak f32 rate for the MFU: the largest rate Flex's matrix product reaches here
/// (a short probe of square products), and the FMA peak the CPU's description implies.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peak {
    pub measured_gflops: f64,
    /// The largest product's size and its rate.
    pub probe: String,
    /// threads × clock × f32 FLOPs a cycle (two FMA units of 8 lanes with AVX2+FMA, 16 with
    /// AVX-512), from `/proc/cpuinfo`; absent where it does not say.
    pub theoretical_gflops: Option<f64>,
    pub theoretical_from: Option<String>,
}

/// Probes [`Peak`]: products of 256 to 2048 square, ten times each, the best rate (about a second;
/// single products vary by ±20 % here, their best by less).
pub fn machine_peak() -> Peak {
    use burn::tensor::{Distribution, Tensor};
    let device = Default::default();
    let mut best = (0.0f64, 0usize);
    for n in [256usize, 512, 1024, 2048] {
        let a = Tensor::<Flex, 2>::random([n, n], Distribution::Default, &device);
        let b = Tensor::<Flex, 2>::random([n, n], Distribution::Default, &device);
        for _ in 0..10 {
            let t0 = Instant::now();
            let c = a.clone().matmul(b.clone());
            let _ = c.into_data();
            let rate = 2.0 * (n * n * n) as f64 / t0.elapsed().as_secs_f64() / 1e9;
            if rate > best.0 {
                best = (rate, n);
            }
        }
    }
    let (theoretical_gflops, theoretical_from) = match theoretical_peak(rayon::current_num_threads()) {
        Some((g, why)) => (Some(g), Some(why)),
        None => (None, None),
    };
    Peak { measured_gflops: best.0, probe: format!("{0}×{0} · {0}×{0}", best.1), theoretical_gflops, theoretical_from }
}

/// threads × the CPU's clock × its f32 FLOPs a cycle, where `/proc/cpuinfo` says them.
fn theoretical_peak(threads: usize) -> Option<(f64, String)> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let field = |name: &str| info.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string());
    let mhz: f64 = field("cpu MHz")?.parse().ok()?;
    let flags = field("flags")?;
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let (per_cycle, isa) = if has("avx512f") {
        (64.0, "AVX-512 FMA")
    } else if has("avx2") && has("fma") {
        (32.0, "AVX2 FMA")
    } else if has("avx") {
        (16.0, "AVX")
    } else {
        (8.0, "SSE")
    };
    let gflops = threads as f64 * mhz / 1e3 * per_cycle;
    Some((gflops, format!("{threads} threads × {:.2} GHz × {per_cycle:.0} FLOP/cycle ({isa})", mhz / 1e3)))
}

/// The PyTorch peer's input (`benches/peer/peer_train.py`): the model and training settings and
/// the batches of the first `steps` optimizer steps, exactly as kiln's loader builds them.
pub fn peer_spec(recipe: &Recipe, scratch: &Path, steps: usize, warmup: usize) -> Result<serde_json::Value> {
    if recipe.tokenizer.sample_alpha > 0.0 || recipe.tokenizer.bpe_dropout > 0.0 {
        return Err(anyhow!("the PyTorch peer gets the prepared segmentations; turn subword regularisation off to compare"));
    }
    let lm = recipe.model.family == kiln_recipe::ModelFamily::Lm;
    let tok = scratch.join("run/tokenizer.json");
    let cache_dir = Some(recipe.loader.cache_dir.as_path()).filter(|p| !p.as_os_str().is_empty());
    let data = kiln_data::prepare(recipe, TokenizerSource::Load(&tok), cache_dir, &|_| {}).map_err(|e| anyhow!("{e}"))?;
    let sync = recipe.train.sync_interval;
    let warmup = warmup.div_ceil(sync) * sync;
    let batch_json = |indices: &[usize]| -> serde_json::Value {
        if lm {
            let stream = data.text.as_ref().map(|t| t.train.ids()).unwrap_or(kiln_data::Ids::U32(&[]));
            let b = HostBlocks::build(stream, indices, recipe.data.block_size);
            let (rows, labels): (Vec<i32>, Vec<i32>) = b.labels.iter().enumerate().filter(|(_, &t)| t != kiln_data::PAD as i32).map(|(i, &t)| (i as i32, t)).unzip();
            serde_json::json!({ "input": b.input, "input_shape": [b.size, b.len], "label_rows": rows, "labels": labels })
        } else {
            let b = HostBatch::build(&data.train, indices);
            serde_json::json!({
                "src": b.src, "src_shape": [b.size, b.src_len],
                "tgt_in": b.tgt_in, "tgt_shape": [b.size, b.tgt_len],
                "label_rows": b.label_rows, "labels": b.labels,
            })
        }
    };
    let batches: Vec<Vec<serde_json::Value>> = run_plan(recipe, &data, warmup + steps).iter().map(|group| group.iter().map(|indices| batch_json(indices)).collect()).collect();
    let m = &recipe.model;
    let tr = &recipe.train;
    Ok(serde_json::json!({
        "threads": rayon::current_num_threads(),
        "seed": tr.seed,
        "warmup_steps": warmup,
        "sync_interval": sync,
        "family": if lm { "lm" } else { "transformer" },
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

/// `bench upload`: whether a batch uploaded from a loader thread overlaps a training step running
/// on the loop's thread. CubeCL gives each thread its own stream, so the question is whether the
/// device (and its runtime) runs one thread's uploads while another's kernels are queued, or
/// serialises them. Three timings on the device: the "step" alone (a chain of matrix products and
/// an activation on the loop's thread, then a read), the uploads alone (token-id batches of the
/// given shape created on a second thread, as kiln's loader workers create them, until they are
/// on the device), and both at once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UploadBench {
    pub device: String,
    pub uploads: usize,
    pub batch_shape: [usize; 2],
    pub step_alone_ms: f64,
    pub uploads_alone_ms: f64,
    /// Wall time of the step and the uploads started together, and the step's own time then.
    pub both_ms: f64,
    pub step_with_uploads_ms: f64,
    /// (step alone + uploads alone − both) / the shorter of the two: 1 = fully hidden, 0 = serial,
    /// below 0 = running both at once costs more than one after the other.
    pub overlap: f64,
}

/// Runs [`UploadBench`]'s timings on `device` (medians of `rounds`).
pub fn bench_upload<B: burn::tensor::backend::Backend>(device: &B::Device, device_name: &str, width: usize, depth: usize, uploads: usize, shape: [usize; 2], rounds: usize) -> UploadBench {
    use burn::tensor::{Distribution, Int, Tensor, TensorData};
    let weight = Tensor::<B, 2>::random([width, width], Distribution::Uniform(-0.05, 0.05), device);
    let input = Tensor::<B, 2>::random([width, width], Distribution::Uniform(-1.0, 1.0), device);
    let step = || {
        let t0 = Instant::now();
        let mut x = input.clone();
        for _ in 0..depth {
            x = burn::tensor::activation::gelu(x.matmul(weight.clone()));
        }
        let _ = x.sum().into_data();
        t0.elapsed().as_secs_f64() * 1e3
    };
    let host: Vec<i32> = (0..shape[0] * shape[1]).map(|i| (i as i32).wrapping_mul(2_654_435) & 0xfff).collect();
    // Waits until everything queued on the device so far has run.
    let drain = |device: &B::Device| {
        let _ = Tensor::<B, 1>::zeros([1], device).into_data();
    };
    // The batches created as a loader worker creates them (no read), then drained from the same
    // thread so that the time counts the copies on the device too. The drain waits for the whole
    // queue (one per device on wgpu), the step's kernels included when they run at once: "both"
    // is then the wall time until the step and the uploads are done.
    let upload = |device: &B::Device| {
        let t0 = Instant::now();
        let made: Vec<_> = (0..uploads).map(|_| Tensor::<B, 2, Int>::from_data(TensorData::new(host.clone(), shape), device)).collect();
        drain(device);
        drop(made);
        t0.elapsed().as_secs_f64() * 1e3
    };
    // Warm-up: kernels compiled, pools filled.
    step();
    upload(device);
    let (mut alone, mut up, mut both, mut with) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        alone.push(step());
        up.push(upload(device));
        let t0 = Instant::now();
        let step_ms = std::thread::scope(|s| {
            let loader = s.spawn(|| upload(device));
            let step_ms = step();
            loader.join().expect("upload thread");
            step_ms
        });
        both.push(t0.elapsed().as_secs_f64() * 1e3);
        with.push(step_ms);
    }
    let (a, u, b, w) = (median(alone), median(up), median(both), median(with));
    UploadBench {
        device: device_name.to_string(),
        uploads,
        batch_shape: shape,
        step_alone_ms: a,
        uploads_alone_ms: u,
        both_ms: b,
        step_with_uploads_ms: w,
        overlap: ((a + u - b) / a.min(u).max(1e-9)).min(1.0),
    }
}

impl UploadBench {
    pub fn markdown(&self, machine: &str, commit: &str, date: &str) -> String {
        format!(
            "### {date} · uploads from a loader thread · {device} · commit {commit}\n\nMachine: {machine}. {n} [{r}, {c}] token-id batches created on a second thread as loader workers create them (timed until they are on the device), against a step on the loop's thread (products, then a read); overlap = (step alone + uploads alone − both) / the shorter of the two (100 %: the uploads hide entirely behind the step; 0: one waits for the other).\n\n\
             | step alone ms | uploads alone ms | both at once ms | step during uploads ms | overlap |\n|---|---|---|---|---|\n\
             | {a:.1} | {u:.1} | {b:.1} | {w:.1} | {o} |\n\n",
            device = self.device,
            n = self.uploads,
            r = self.batch_shape[0],
            c = self.batch_shape[1],
            a = self.step_alone_ms,
            u = self.uploads_alone_ms,
            b = self.both_ms,
            w = self.step_with_uploads_ms,
            o = if self.overlap >= 0.0 { format!("{:.0} %", 100.0 * self.overlap) } else { format!("none: {:.1} ms more than one after the other", self.both_ms - self.step_alone_ms - self.uploads_alone_ms) },
        )
    }
}
