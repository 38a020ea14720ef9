//! The training loop: ours, not burn-train's Learner (which reads the loss back every step).
//!
//! Each optimizer step runs `train.accumulate` batches forward and backward, clips the global
//! gradient norm on the device and applies AdamW. The step's summed loss stays on the device and
//! is added into the current sync window; the host reads the window's sum once every
//! `train.sync_interval` steps and at epoch end. Token counts come from the host batches, so they
//! need no read. Batch order and dropout are functions of (seed, epoch) and (seed, step), which
//! makes a resumed run see the same batches and masks as an unbroken one.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder as _};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use kiln_data::batching::{plan_batches, BatchSettings};
use kiln_data::loader::{pair_jobs, Job, Loader};
use kiln_data::text::{plan_blocks, train_blocks, HostBlocks};
use kiln_data::{Example, HostBatch, Prepared, BOS, EOS, PAD};
use kiln_events::{DataFigures, EvalFigures, Event, EventSink, RunInfo, Summary, ValidRow, WindowRow};
use kiln_model::{label_smoothed_loss, LmConfig, Seq2SeqConfig};
use kiln_recipe::Recipe;

use crate::checkpoint::{self, TrainState, STATE_FORMAT};
use crate::clip::clip_global_norm;
pub use crate::family::DeviceBatch;
use crate::family::{Split, TrainModel};
use crate::schedule::LrSchedule;
use crate::system::ProcessSample;

pub use kiln_data::mix_seed;

fn batch_settings(recipe: &Recipe) -> BatchSettings {
    BatchSettings {
        max_tokens: recipe.loader.max_tokens,
        max_sentences: recipe.loader.max_sentences,
        pool_batches: recipe.loader.bucket_pool,
        multiple: recipe.loader.batch_multiple,
    }
}

/// Batches of epoch `epoch` (0-based): a pure function of the data, the recipe and the epoch.
pub fn epoch_batches(train: &[Example], recipe: &Recipe, epoch: usize) -> Vec<Vec<usize>> {
    let lengths: Vec<(usize, usize)> = train.iter().map(|e| (e.src.len() + 1, e.tgt.len() + 1)).collect();
    plan_batches(&lengths, batch_settings(recipe), Some(mix_seed(recipe.train.seed, 1, epoch as u64)))
}

/// Batches of block starts of epoch `epoch` over a training stream of `len` tokens: the blocks
/// are cut from an offset drawn from (seed, epoch), then shuffled.
pub fn epoch_blocks(len: usize, recipe: &Recipe, epoch: usize) -> Vec<Vec<usize>> {
    let block = recipe.data.block_size;
    let starts = train_blocks(len, block, mix_seed(recipe.train.seed, 4, epoch as u64));
    plan_blocks(starts, block, batch_settings(recipe), Some(mix_seed(recipe.train.seed, 1, epoch as u64)))
}

/// Training loss summed on the device over the steps of one sync window.
struct SyncWindow<B: Backend> {
    loss_sum: Option<Tensor<B, 1>>,
    tokens: u64,
    sentences: u64,
    real: u64,
    slots: u64,
    steps: usize,
    started: Instant,
}

impl<B: Backend> SyncWindow<B> {
    fn new() -> Self {
        Self { loss_sum: None, tokens: 0, sentences: 0, real: 0, slots: 0, steps: 0, started: Instant::now() }
    }

    fn add(&mut self, loss_sum: Tensor<B, 1>) {
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(acc) => acc + loss_sum,
            None => loss_sum,
        });
    }

    /// The one device→host read of the window; returns (Σ loss, milliseconds waited).
    fn read(&mut self) -> (f64, f64) {
        let Some(sum) = self.loss_sum.take() else { return (0.0, 0.0) };
        let t0 = Instant::now();
        let data = sum.try_into_data().ok();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let value = data.and_then(|d| d.iter::<f64>().next()).unwrap_or(f64::NAN);
        (value, ms)
    }
}

/// Everything a run needs besides the model: recipe, run directory, prepared data, device.
pub struct TrainJob<'a, B: AutodiffBackend> {
    pub recipe: &'a Recipe,
    pub run_dir: &'a Path,
    pub data: &'a Prepared,
    pub device: B::Device,
    pub device_name: String,
    /// Resume from this checkpoint directory.
    pub resume_from: Option<std::path::PathBuf>,
    /// Pause / stop requests, polled between optimizer steps.
    pub control: kiln_events::Control,
}

type Recorder = NamedMpkFileRecorder<FullPrecisionSettings>;

pub fn model_config(recipe: &Recipe, vocab_size: usize) -> Seq2SeqConfig {
    Seq2SeqConfig { vocab_size, pad: PAD, bos: BOS, eos: EOS, model: recipe.model.clone() }
}

pub fn lm_config(recipe: &Recipe, vocab_size: usize) -> LmConfig {
    LmConfig { vocab_size, model: recipe.model.clone() }
}

/// Trains `model` (freshly initialised from `train.seed`) on the job's data. Generic over the
/// model family: the loop, the data, the checkpoints and the events are the same for all.
pub fn run<B: AutodiffBackend, M: TrainModel<B>>(job: TrainJob<'_, B>, model: M, sink: &mut dyn EventSink) -> Result<Summary> {
    let recipe = job.recipe;
    let tr = &recipe.train;
    let device = &job.device;
    let data = job.data;
    let emit = |sink: &mut dyn EventSink, e: Event| sink.emit(&e).map_err(|m| anyhow!(m));

    let mut model = model;
    let mut optim = AdamWConfig::new()
        .with_beta_1(tr.beta1 as f32)
        .with_beta_2(tr.beta2 as f32)
        .with_epsilon(tr.eps as f32)
        .with_weight_decay(tr.weight_decay as f32)
        .init::<B, M>();
    let recorder = Recorder::new();

    let architecture = checkpoint::Architecture::new(&recipe.model, data.tokenizer.vocab_size());
    let mut state = TrainState { format: STATE_FORMAT, architecture: Some(architecture.clone()), ..Default::default() };
    if let Some(dir) = &job.resume_from {
        state = checkpoint::read_state(dir).map_err(|m| anyhow!(m))?;
        checkpoint::check_architecture(dir, &state, &architecture).map_err(|m| anyhow!(m))?;
        state.architecture = Some(architecture.clone());
        let model_path = dir.join("model");
        model = model.load_file(model_path.clone(), &recorder, device).map_err(|e| {
            anyhow!("{}.mpk: checkpoint does not match the recipe's model: {}", model_path.display(), one_line(&e.to_string()))
        })?;
        let optim_path = dir.join("optimizer");
        let record = recorder
            .load(optim_path.clone(), device)
            .map_err(|e| anyhow!("{}.mpk: cannot load optimizer state: {}", optim_path.display(), one_line(&e.to_string())))?;
        optim = optim.load_record(record);
    }

    // Subword regularisation gives every epoch its own segmentations of the training examples,
    // drawn from (seed, epoch, example); without it every epoch shares the prepared ids.
    let regulariser = kiln_data::Regulariser::new(&data.tokenizer, &recipe.tokenizer).map_err(|e| anyhow!("{e}"))?;
    let prepared_train = Arc::new(data.train.clone());
    let epoch_examples = |epoch: usize| -> Arc<Vec<Example>> {
        match &regulariser {
            None => Arc::clone(&prepared_train),
            Some(r) => Arc::new(r.epoch(&data.train, mix_seed(tr.seed, 3, epoch as u64), recipe.data.max_len)),
        }
    };

    // One epoch's work: its examples (sentence pairs; resampled under regularisation) or the
    // training stream (text), and its batch plan.
    let text_stream = data.text.as_ref().map(|t| Arc::new(t.train.clone()));
    let epoch_plan = |epoch: usize| -> (Option<Arc<Vec<Example>>>, Vec<Vec<usize>>) {
        match &text_stream {
            Some(stream) => (None, epoch_blocks(stream.len(), recipe, epoch)),
            None => {
                let examples = epoch_examples(epoch);
                let plan = epoch_batches(&examples, recipe, epoch);
                (Some(examples), plan)
            }
        }
    };
    // Steps per epoch, counted up front (the schedule needs the exact total); only the counts are
    // kept, and each epoch's plan is made again when the epoch starts (it is a pure function).
    let epoch_steps: Vec<usize> = (0..tr.epochs).map(|e| epoch_plan(e).1.len().div_ceil(tr.accumulate)).collect();
    let mut total_steps: usize = epoch_steps.iter().sum();
    if tr.max_steps > 0 {
        total_steps = total_steps.min(tr.max_steps);
    }
    let schedule = LrSchedule::new(tr, total_steps);

    emit(
        sink,
        Event::RunStarted(RunInfo {
            recipe: recipe.name.clone(),
            run_dir: job.run_dir.display().to_string(),
            device: job.device_name.clone(),
            epochs: tr.epochs,
            steps_per_epoch: epoch_steps.first().copied().unwrap_or(0),
            total_steps,
            start_step: state.step,
            start_epoch: state.epoch,
            parameters: model.num_params(),
            vocab_size: data.tokenizer.vocab_size(),
            train_examples: match &data.text {
                Some(t) => t.train.len() / recipe.data.block_size.max(1),
                None => data.train.len(),
            },
            valid_examples: match &data.text {
                Some(t) => t.valid.len().div_ceil(recipe.data.block_size.max(1)),
                None => data.valid.examples.len(),
            },
            sync_interval: tr.sync_interval,
            // The loader's capacity: a queue of ⌈prefetch / workers⌉ per worker.
            prefetch: recipe.loader.prefetch.max(recipe.loader.workers).div_ceil(recipe.loader.workers) * recipe.loader.workers,
        }),
    )?;
    if regulariser.is_some() {
        let t = &recipe.tokenizer;
        let how = if t.sample_alpha > 0.0 { format!("Unigram sampling, alpha {}", t.sample_alpha) } else { format!("BPE-dropout {}", t.bpe_dropout) };
        emit(sink, Event::Note(format!("subword regularisation: {how}, new segmentations every epoch (training only)")))?;
    }
    if job.resume_from.is_some() {
        emit(sink, Event::Note(format!("resumed at step {}, epoch {}, batch {}", state.step, state.epoch + 1, state.batch_in_epoch)))?;
    }

    let mut clock = Clock {
        started: Instant::now(),
        wall_before: state.wall_s,
        train_tokens: 0,
        train_s: 0.0,
        real: 0,
        slots: 0,
        process: ProcessSample::now(),
        process_at: Instant::now(),
    };
    let control = &job.control;
    let mut stopped = false;
    let mut accumulator = GradientsAccumulator::<M>::new();
    let mut window = SyncWindow::<B::InnerBackend>::new();
    let mut last_lr = schedule.at(state.step.max(1));
    let mut last_valid: Option<ValidRow> = state.last_valid.clone();

    // Saves `checkpoints/step-N`, records it as the best when the validation just measured beats
    // the best so far, prunes old checkpoints and tells the sinks.
    let save = |model: &M, optim: &_, state: &mut TrainState, sink: &mut dyn EventSink| -> Result<()> {
        let name = format!("step-{:07}", state.step);
        if let Some(v) = state.last_valid.as_ref().filter(|v| v.step == state.step && v.loss.is_finite()) {
            if state.best.as_ref().is_none_or(|(_, best)| v.loss < *best) {
                state.best = Some((name.clone(), v.loss));
            }
        }
        let path = checkpoint::save(job.run_dir, &name, state, |dir| {
            recorder
                .record(model.clone().into_record(), dir.join("model"))
                .map_err(|e| format!("{}: cannot write model: {e}", dir.display()))?;
            recorder
                .record(Optimizer::<M, B>::to_record(optim), dir.join("optimizer"))
                .map_err(|e| format!("{}: cannot write optimizer: {e}", dir.display()))
        })
        .map_err(|m| anyhow!(m))?;
        checkpoint::prune(job.run_dir, tr.keep_checkpoints, state.best.as_ref().map(|(n, _)| n.as_str())).map_err(|m| anyhow!(m))?;
        sink.emit(&Event::Checkpoint { epoch: state.epoch, step: state.step, path: path.display().to_string() }).map_err(|m| anyhow!(m))
    };

    // Loader workers pad batches and put their tensors on the device ahead of the loop.
    let build_device = device.clone();
    let build: Arc<dyn Fn(HostBatch) -> DeviceBatch<B> + Send + Sync> = Arc::new(move |b| DeviceBatch::new(b, &build_device));
    let jobs = |examples: &Option<Arc<Vec<Example>>>, plan: &[Vec<usize>]| -> Vec<Job<DeviceBatch<B>>> {
        match (examples, &text_stream) {
            (Some(examples), _) => pair_jobs(examples, plan, &build),
            (None, Some(stream)) => plan
                .iter()
                .map(|starts| {
                    let (stream, starts, device, block) = (Arc::clone(stream), starts.clone(), device.clone(), recipe.data.block_size);
                    Box::new(move || DeviceBatch::blocks(HostBlocks::build(&stream, &starts, block), &device)) as Job<DeviceBatch<B>>
                })
                .collect(),
            (None, None) => unreachable!("an epoch has examples or a text stream"),
        }
    };
    let mut loader = Loader::new(recipe.loader.workers, recipe.loader.prefetch);

    // A finished run resumed with more epochs or steps continues; `finished` is informational.
    let mut stop = tr.max_steps > 0 && state.step >= tr.max_steps;
    while !stop && state.epoch < tr.epochs {
        let epoch = state.epoch;
        let (examples, plan) = epoch_plan(epoch);
        let mut pos = state.batch_in_epoch;
        loader.start(jobs(&examples, &plan[pos..]));
        while pos < plan.len() {
            if tr.max_steps > 0 && state.step >= tr.max_steps {
                stop = true;
                break;
            }
            if control.paused() && !control.stop_requested() {
                emit(sink, Event::Note(format!("paused at step {}", state.step)))?;
                let t0 = Instant::now();
                while control.paused() && !control.stop_requested() {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                // The pause is not training time.
                window.started += t0.elapsed();
                emit(sink, Event::Note("resumed".into()))?;
            }
            if control.stop_requested() {
                stopped = true;
                stop = true;
                break;
            }
            if window.steps == 0 {
                // The window's clock starts with its first step (data wait included), not after
                // the previous window's validation or checkpoint.
                window.started = Instant::now();
            }
            let group = tr.accumulate.min(plan.len() - pos);
            let batches: Vec<DeviceBatch<B>> = (0..group).map(|_| loader.next_batch().expect("the pass holds the rest of the epoch")).collect();
            let step_tokens: usize = batches.iter().map(|b| b.stats.target_tokens).sum();
            // Dropout masks are a function of (seed, step): resuming reproduces them.
            B::seed(device, mix_seed(tr.seed, 2, state.step as u64));
            for b in &batches {
                let logits = model.logits(b);
                let sums = label_smoothed_loss(logits, b.labels.clone(), PAD, tr.label_smoothing);
                window.add(sums.smoothed.clone().inner());
                // Mean over the tokens of the whole optimizer step, so accumulation = a bigger batch.
                let loss = sums.smoothed / step_tokens as f64;
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                accumulator.accumulate(&model, grads);
            }
            let mut grads = accumulator.grads();
            if tr.clip_norm > 0.0 {
                clip_global_norm::<B, _>(&model, &mut grads, tr.clip_norm);
            }
            state.step += 1;
            last_lr = schedule.at(state.step);
            model = optim.step(last_lr, model, grads);
            pos += group;
            state.batch_in_epoch = pos;
            window.tokens += step_tokens as u64;
            window.sentences += batches.iter().map(|b| b.stats.size as u64).sum::<u64>();
            window.real += batches.iter().map(|b| b.stats.real_tokens as u64).sum::<u64>();
            window.slots += batches.iter().map(|b| b.stats.slots as u64).sum::<u64>();
            window.steps += 1;
            if window.steps >= tr.sync_interval {
                flush_window(&mut window, &mut state, epoch, last_lr, &mut clock, loader.take_wait(), loader.ready(), sink)?;
            }
            let last_of_epoch = pos >= plan.len();
            if tr.save_every_steps > 0 && state.step.is_multiple_of(tr.save_every_steps) && !last_of_epoch {
                // The checkpoint's running loss sums must hold every step so far: read the open
                // window first (one extra sync per save).
                if window.steps > 0 {
                    flush_window(&mut window, &mut state, epoch, last_lr, &mut clock, loader.take_wait(), loader.ready(), sink)?;
                }
                state.wall_s = clock.wall();
                save(&model, &optim, &mut state, sink)?;
            }
        }
        if window.steps > 0 {
            flush_window(&mut window, &mut state, epoch, last_lr, &mut clock, loader.take_wait(), loader.ready(), sink)?;
        }
        let epoch_loss = state.epoch_loss_sum / state.epoch_tokens.max(1) as f64;
        state.last_epoch_loss = Some(epoch_loss);
        let epoch_done = pos >= plan.len();
        if tr.max_steps > 0 && state.step >= tr.max_steps {
            stop = true;
        }
        if epoch_done {
            emit(sink, Event::EpochEnd { epoch: epoch + 1, step: state.step, train_loss: epoch_loss })?;
        }
        // Validate at each epoch end, and once more when `max_steps` ends the run mid-epoch (not
        // on a stop request: the user wants out, and the checkpoint resumes the run).
        if epoch_done || (stop && !stopped) {
            let valid = model.evaluate(data, Split::Valid, recipe, device);
            let row = ValidRow { epoch: epoch + 1, step: state.step, loss: valid.loss, ppl: valid.ppl, bleu: valid.bleu };
            emit(sink, Event::Validation(row.clone()))?;
            last_valid = Some(row);
            state.last_valid = last_valid.clone();
        }
        if epoch_done {
            state.epoch += 1;
            state.batch_in_epoch = 0;
            // The last epoch's sums stay in `last_epoch_loss`; the next epoch starts afresh.
            state.epoch_loss_sum = 0.0;
            state.epoch_tokens = 0;
        }
        let finished = (stop && !stopped) || state.epoch >= tr.epochs;
        let periodic = epoch_done && tr.save_every > 0 && state.epoch.is_multiple_of(tr.save_every);
        let step_save = tr.save_every_steps > 0 && state.step.is_multiple_of(tr.save_every_steps);
        if finished || periodic || stopped || step_save {
            state.finished = finished;
            state.wall_s = clock.wall();
            save(&model, &optim, &mut state, sink)?;
        }
    }

    if stopped {
        emit(
            sink,
            Event::Note(format!("stopped on request at step {}; continue with: kiln train --resume {}", state.step, job.run_dir.display())),
        )?;
    }
    let test = if !M::has_split(data, Split::Test) || stopped {
        None
    } else {
        let t = model.evaluate(data, Split::Test, recipe, device);
        emit(
            sink,
            Event::Note(format!(
                "test | {} | loss {:.4} | ppl {:.2} | bleu {}",
                match &data.text {
                    Some(t) => format!("{} tokens", t.test.len()),
                    None => format!("{} pairs", data.test.examples.len()),
                },
                t.loss,
                t.ppl,
                t.bleu.map(|b| format!("{b:.2}")).unwrap_or_else(|| "-".into())
            )),
        )?;
        Some(EvalFigures { loss: t.loss, ppl: t.ppl, bleu: t.bleu })
    };
    let wall_s = clock.wall();
    let summary = Summary {
        steps: state.step,
        epochs: state.epoch,
        train_loss: state.last_epoch_loss.unwrap_or(f64::NAN),
        valid_loss: last_valid.as_ref().map(|v| v.loss),
        bleu: last_valid.as_ref().and_then(|v| v.bleu),
        tokens_per_s: if clock.train_s > 0.0 { clock.train_tokens as f64 / clock.train_s } else { 0.0 },
        wall_s,
        sync: state.sync.into(),
        data: DataFigures { cache_hit: data.cache.hit, prepare_s: data.prepare_s, padding_pct: padding_pct(clock.real, clock.slots) },
        test,
        stopped,
    };
    emit(sink, Event::Finished(summary.clone()))?;
    Ok(summary)
}

/// Wall time of the run (summed over resumes) and time spent inside training windows.
struct Clock {
    started: Instant,
    wall_before: f64,
    /// Target tokens and seconds of this process's training windows (no evaluation, no saving).
    train_tokens: u64,
    train_s: f64,
    /// Real tokens and batch slots of this process's training windows (padding statistics).
    real: u64,
    slots: u64,
    /// The process's counters at the last window's end, and when they were read.
    process: ProcessSample,
    process_at: Instant,
}

impl Clock {
    fn wall(&self) -> f64 {
        self.wall_before + self.started.elapsed().as_secs_f64()
    }
}

#[allow(clippy::too_many_arguments)] // the window's inputs, each from a different owner
fn flush_window<B: Backend>(
    window: &mut SyncWindow<B>,
    state: &mut TrainState,
    epoch: usize,
    lr: f64,
    clock: &mut Clock,
    data_wait: std::time::Duration,
    prefetch_ready: usize,
    sink: &mut dyn EventSink,
) -> Result<()> {
    let (loss_sum, ms) = window.read();
    state.sync.record(ms);
    state.epoch_loss_sum += loss_sum;
    state.epoch_tokens += window.tokens;
    state.total_tokens += window.tokens;
    let secs = window.started.elapsed().as_secs_f64();
    clock.train_tokens += window.tokens;
    clock.train_s += secs;
    clock.real += window.real;
    clock.slots += window.slots;
    let process = ProcessSample::now();
    let cpu_pct = process.cpu_pct_since(&clock.process, clock.process_at.elapsed().as_secs_f64());
    clock.process = process;
    clock.process_at = Instant::now();
    let row = WindowRow {
        epoch: epoch + 1,
        step: state.step,
        loss: loss_sum / window.tokens.max(1) as f64,
        tokens: window.tokens,
        tokens_per_s: if secs > 0.0 { window.tokens as f64 / secs } else { 0.0 },
        lr,
        sync: state.sync,
        sync_ms: ms,
        steps: window.steps,
        wall_s: clock.wall(),
        padding_pct: padding_pct(window.real, window.slots),
        data_wait_ms: data_wait.as_secs_f64() * 1e3,
        sentences: window.sentences,
        window_s: secs,
        prefetch_ready,
        rss_mb: process.rss_mb,
        cpu_pct,
    };
    *window = SyncWindow::new();
    sink.emit(&Event::Window(row)).map_err(|m| anyhow!(m))
}

fn padding_pct(real: u64, slots: u64) -> f64 {
    if slots == 0 { 0.0 } else { 100.0 * (1.0 - real as f64 / slots as f64) }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
