//! The training loop: ours, not burn-train's Learner (which reads the loss back every step).
//!
//! Each optimizer step runs `train.accumulate` batches forward and backward, clips the global
//! gradient norm on the device and applies AdamW. The step's summed loss stays on the device and
//! is added into the current sync window; the host reads the window's sum once every
//! `train.sync_interval` steps and at epoch end. With `train.sync_overlap` the read runs on a
//! reader thread while the loop queues the next window's steps, and is waited for when that
//! window closes: the device always has work queued, and the host is never more than one window
//! ahead of what it has read. Token counts come from the host batches, so they need no read.
//! Batch order and dropout are functions of (seed, epoch) and (seed, step, rank), which makes a
//! resumed run see the same batches and masks as an unbroken one.
//!
//! The window's read also brings back each step's summed loss and gradient norm (one transfer):
//! a non-finite one is handled as `train.on_nan` says (stop with a diagnosis, replay the window
//! without the step, or roll back to the last checkpoint with a lower learning rate). Found one
//! window late under `sync_overlap`, the steps queued after it are replayed or abandoned with it;
//! saves wait for every read, so no checkpoint holds a step that was not checked.
//!
//! Also here: batches cut by rows into parts that run side by side on the CPU's threads
//! (`run_parts`, `backend.cpu_split`), data parallel over `backend.devices` (`ReplicaPool`: a
//! replica per device, the gradients all-reduced with Burn's collective), f16 loss scaling (`apply_step`, with
//! `crate::loss_scale`), and the probe of `loader.max_tokens = "auto"` (`probe_batch_sizes`).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, NamedMpkFileRecorder, Recorder};
use burn::collective::{finish_collective, register, CollectiveConfig, PeerId, ReduceOperation};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use kiln_data::batching::{plan_batches, BatchSettings};
use kiln_data::loader::{pair_jobs, Job, Loader};
use kiln_data::text::{plan_blocks, train_blocks, HostBlocks};
use kiln_data::{Example, HostBatch, Prepared, BOS, EOS, PAD};
use kiln_events::{DataFigures, EvalFigures, Event, EventSink, RunInfo, Summary, ValidRow, WindowRow};
use kiln_model::{label_smoothed_loss, LmConfig, Seq2SeqConfig};
use kiln_recipe::{OnNan, Recipe, TokenLimit};

use crate::checkpoint::{self, TrainState, STATE_FORMAT};
use crate::clip::{clip_global_norm, global_norm};
use crate::loss_scale::{keep_if_skipped, AdamWOptimizer, LossScale};
pub use crate::family::DeviceBatch;
use crate::family::{Split, TrainModel};
use crate::schedule::LrSchedule;
use crate::system::ProcessSample;

pub use kiln_data::mix_seed;

fn batch_settings(recipe: &Recipe) -> BatchSettings {
    BatchSettings {
        max_tokens: crate::autobatch::budget(&recipe.loader.max_tokens),
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

/// Training loss summed on the device over the steps of one sync window, and each step's summed
/// loss and gradient norm: the flags of a non-finite step, read with the sum in the same transfer.
struct SyncWindow<B: Backend> {
    loss_sum: Option<Tensor<B, 1>>,
    /// `[loss, gradient norm]` of each step, in order.
    checks: Vec<Tensor<B, 1>>,
    /// The host-side sum, for a window replayed without its non-finite steps (`on_nan = "skip"`).
    host_sum: f64,
    /// Steps done before the window's first step.
    first_step: usize,
    tokens: u64,
    sentences: u64,
    real: u64,
    slots: u64,
    steps: usize,
    started: Instant,
    /// Target tokens of each replica (data parallel; empty with one device).
    device_tokens: Vec<u64>,
    /// f16: steps undone for overflowing gradients, and the loss scale after the window.
    scaling: (u64, Option<f64>),
    /// When the loop finished with the window: its last step queued and, for a window read at
    /// once, its read done. The window's wall time ends here, so windows tile the run's time.
    closed: Option<Instant>,
}

/// What one window read brought back.
struct WindowRead {
    loss_sum: f64,
    /// `(step, summed loss, gradient norm)` of each step of the window.
    steps: Vec<(usize, f64, f64)>,
    /// How long the loop waited for the data.
    ms: f64,
    /// f16: the loss scale after the window.
    loss_scale: Option<f64>,
}

impl WindowRead {
    fn first_nonfinite(&self) -> Option<usize> {
        self.steps.iter().find(|(_, loss, norm)| !loss.is_finite() || !norm.is_finite()).map(|s| s.0)
    }

    /// f16 steps undone for overflowing gradients (their norm reads -1, see `apply_step`).
    fn overflows(&self) -> u64 {
        self.steps.iter().filter(|s| s.2 == -1.0).count() as u64
    }
}

/// Reads tensors to the host on a thread of its own, so the loop thread can queue the next
/// window's steps while a window's data is in flight. One thread for the run: on CUDA each host
/// thread gets its own stream, and a thread per read would make a stream per read.
struct WindowReader<B: Backend> {
    jobs: std::sync::mpsc::Sender<(Tensor<B, 1>, std::sync::mpsc::Sender<Option<TensorData>>)>,
}

impl<B: Backend> WindowReader<B> {
    fn new() -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<(Tensor<B, 1>, std::sync::mpsc::Sender<Option<TensorData>>)>();
        std::thread::Builder::new()
            .name("kiln-window-reader".into())
            .spawn(move || {
                // Ends when the loop drops the reader (the channel closes).
                for (tensor, reply) in queue {
                    let _ = reply.send(tensor.try_into_data().ok());
                }
            })
            .expect("cannot start the window reader thread");
        Self { jobs }
    }
}

/// A window's read, started: in flight on the reader thread, or done at once on the loop thread.
enum InFlight {
    Empty,
    Done { data: Option<TensorData>, ms: f64 },
    Reading(std::sync::mpsc::Receiver<Option<TensorData>>),
}

/// A closed window whose read has started.
struct ClosedWindow {
    read: InFlight,
    host_sum: f64,
    first_step: usize,
    steps: usize,
    /// The read ends with the loss scale (f16).
    scaled: bool,
}

impl ClosedWindow {
    /// The window's data: waits for it when it is still in flight (that wait is the sync time).
    fn wait(self) -> WindowRead {
        let (data, ms) = match self.read {
            InFlight::Empty => return WindowRead { loss_sum: self.host_sum, steps: Vec::new(), ms: 0.0, loss_scale: None },
            InFlight::Done { data, ms } => (data, ms),
            InFlight::Reading(reply) => {
                let t0 = Instant::now();
                let data = reply.recv().ok().flatten();
                (data, t0.elapsed().as_secs_f64() * 1e3)
            }
        };
        let values: Vec<f64> = data.map(|d| d.iter::<f64>().collect()).unwrap_or_default();
        let value = |i: usize| values.get(i).copied().unwrap_or(f64::NAN);
        let steps = (0..self.steps).map(|k| (self.first_step + k + 1, value(1 + 2 * k), value(2 + 2 * k))).collect();
        let loss_scale = self.scaled.then(|| value(1 + 2 * self.steps));
        WindowRead { loss_sum: value(0), steps, ms, loss_scale }
    }
}

impl<B: Backend> SyncWindow<B> {
    fn new() -> Self {
        Self {
            loss_sum: None,
            checks: Vec::new(),
            host_sum: 0.0,
            first_step: 0,
            tokens: 0,
            sentences: 0,
            real: 0,
            slots: 0,
            steps: 0,
            started: Instant::now(),
            device_tokens: Vec::new(),
            scaling: (0, None),
            closed: None,
        }
    }

    fn add(&mut self, loss_sum: Tensor<B, 1>, grad_norm: Tensor<B, 1>) {
        self.checks.push(loss_sum.clone());
        self.checks.push(grad_norm);
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(acc) => acc + loss_sum,
            None => loss_sum,
        });
    }

    fn count(&mut self, batches: &[DeviceBatch<impl Backend>]) {
        self.tokens += batches.iter().map(|b| b.stats.target_tokens as u64).sum::<u64>();
        self.sentences += batches.iter().map(|b| b.stats.size as u64).sum::<u64>();
        self.real += batches.iter().map(|b| b.stats.real_tokens as u64).sum::<u64>();
        self.slots += batches.iter().map(|b| b.stats.slots as u64).sum::<u64>();
        self.steps += 1;
    }

    /// Starts the one device→host read of the window, its loss sum and every step's flags in one
    /// tensor: on the reader thread (`reader`), or here, now (`None`).
    /// `loss_scale` (f16) is read in the same transfer, after the steps.
    fn start_read(&mut self, reader: Option<&WindowReader<B>>, loss_scale: Option<Tensor<B, 1>>) -> ClosedWindow {
        let scaled = loss_scale.is_some();
        let read = match self.loss_sum.take() {
            None => InFlight::Empty,
            Some(sum) => {
                let mut parts = vec![sum];
                parts.append(&mut self.checks);
                parts.extend(loss_scale);
                let all = Tensor::cat(parts, 0);
                let (reply, answer) = std::sync::mpsc::channel();
                match reader {
                    Some(r) if r.jobs.send((all.clone(), reply)).is_ok() => InFlight::Reading(answer),
                    _ => {
                        let t0 = Instant::now();
                        let data = all.try_into_data().ok();
                        InFlight::Done { data, ms: t0.elapsed().as_secs_f64() * 1e3 }
                    }
                }
            }
        };
        ClosedWindow { read, host_sum: self.host_sum, first_step: self.first_step, steps: self.steps, scaled }
    }
}

/// A window the loop has closed, its read in flight (`train.sync_overlap`): resolved when the next
/// window closes, or before anything that needs every step's loss (a save, evaluation, the end).
struct PendingWindow<B: AutodiffBackend, M, O> {
    /// The window's host-side counters (its device sums moved into the read).
    window: SyncWindow<B::InnerBackend>,
    read: ClosedWindow,
    /// `on_nan = "skip"`: where the window started.
    start: Option<WindowStart<B, M, O>>,
    epoch: usize,
    /// The learning rate after its last step.
    lr: f64,
}

/// `on_nan = "skip"`: the model, optimizer and state at the open window's start, and the batches
/// of its steps so far, to replay the window without its non-finite steps.
struct WindowStart<B: AutodiffBackend, M, O> {
    model: M,
    optim: O,
    step: usize,
    batches: Vec<Vec<DeviceBatch<B>>>,
}

/// The run stopped on a non-finite loss or gradient norm (`train.on_nan`); `kiln` exits with 3.
#[derive(Debug)]
pub struct NonFiniteStop(pub String);

impl std::fmt::Display for NonFiniteStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NonFiniteStop {}

/// Which replica runs a step. Rank 0 is the loop's own and draws the dropout masks a
/// single-device run draws; with several devices each rank is a peer of Burn's collective.
#[derive(Debug, Clone, Copy)]
struct Replica {
    rank: usize,
    peer: Option<PeerId>,
}

const SINGLE: Replica = Replica { rank: 0, peer: None };

/// How a step uses a host (CPU) device: dropout masks drawn by kiln on the host, and the parts
/// each batch is cut into by rows (`backend.cpu_split`), run side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostStep {
    pub masks: bool,
    pub parts: usize,
}

/// A device that is not the CPU: the backend draws masks, batches run whole.
pub(crate) const DEVICE_STEP: HostStep = HostStep { masks: false, parts: 1 };

impl HostStep {
    /// For the device named `device_name` (`cpu…` or another) and the recipe's `backend.cpu_split`
    /// (0: one part per thread of the pool).
    pub(crate) fn new(device_name: &str, cpu_split: usize) -> Self {
        if !device_name.starts_with("cpu") {
            return DEVICE_STEP;
        }
        let parts = if cpu_split == 0 { rayon::current_num_threads() } else { cpu_split };
        Self { masks: true, parts: parts.max(1) }
    }
}

/// `batch` cut into `parts` parts that each have a label; empty (run it whole) when that leaves
/// fewer than two.
fn split_parts<B: Backend>(batch: &DeviceBatch<B>, parts: usize) -> Vec<(usize, DeviceBatch<B>)> {
    if parts < 2 {
        return Vec::new();
    }
    let parts: Vec<_> = batch.split_rows(parts).into_iter().filter(|(_, part)| part.stats.target_tokens > 0).collect();
    if parts.len() < 2 {
        return Vec::new();
    }
    parts
}

/// Runs the parts of a batch side by side on the thread pool, each on its own autodiff graph
/// (the model's parameters as fresh leaves over the same weights), each with the dropout masks
/// of its rows of the whole batch. Single-threaded kernels on independent parts keep every core
/// busy where one graph's kernels, one after another, leave cores waiting between them. Results
/// come back in part order, so their sum does not depend on which thread ran what.
fn run_parts<B: AutodiffBackend, M: TrainModel<B>, R: Send>(model: &M, parts: Vec<(usize, DeviceBatch<B>)>, run: &(dyn Fn(&M, &DeviceBatch<B>) -> R + Sync)) -> Vec<R> {
    use rayon::prelude::*;
    let masks = kiln_model::dropout::mask_state();
    let compute = kiln_model::autocast::compute();
    let units: Vec<(usize, DeviceBatch<B>, M)> =
        parts.into_iter().enumerate().map(|(i, (first, part))| (first, part, if i == 0 { model.clone() } else { M::from_inner(model.valid()) })).collect();
    let done: Vec<(R, kiln_model::dropout::MaskState)> = units
        .into_par_iter()
        .map(|(first, part, model)| {
            let _autocast = kiln_model::autocast::enter(compute);
            kiln_model::dropout::set_mask_state(masks.at_row(first));
            let out = run(&model, &part);
            (out, kiln_model::dropout::mask_state())
        })
        .collect();
    // Every part drew the same number of masks: the step goes on from there, at row 0.
    kiln_model::dropout::set_mask_state(done[0].1.at_row(0));
    done.into_iter().map(|(out, _)| out).collect()
}

/// Forward and backward passes of one optimizer step (`step` = steps done before it): the
/// gradients, clipped, and, on the device, the step's summed loss and pre-clip gradient norm.
/// `step_tokens` counts the target tokens of the whole step (all replicas'), so that the
/// gradients of the replicas, summed, are those of one big batch. An `idle` replica (the last
/// step of an epoch may have fewer batches than devices) runs its batch at weight 0: it still
/// takes part in the all-reduce, with zero gradients and a zero loss.
#[allow(clippy::too_many_arguments)] // one step's inputs
fn step_gradients<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    batches: &[DeviceBatch<B>],
    tr: &kiln_recipe::TrainSection,
    step: usize,
    device: &B::Device,
    host: HostStep,
    step_tokens: usize,
    idle: bool,
    replica: Replica,
    loss_scale: Option<&Tensor<B::InnerBackend, 1>>,
) -> (GradientsParams, Tensor<B::InnerBackend, 1>, Tensor<B::InnerBackend, 1>) {
    // Dropout masks are a function of (seed, step, rank): resuming and replaying reproduce them.
    // On the CPU kiln draws them on the host (kiln_model::dropout), elsewhere the backend does.
    let seed = if replica.rank == 0 { tr.seed } else { mix_seed(tr.seed, 7, replica.rank as u64) };
    B::seed(device, mix_seed(seed, 2, step as u64));
    kiln_model::dropout::seed_step(host.masks.then(|| mix_seed(seed, 5, step as u64)));
    let mut accumulator = GradientsAccumulator::<M>::new();
    let mut step_loss: Option<Tensor<B::InnerBackend, 1>> = None;
    let poisoned = injected_nonfinite_steps().contains(&(step + 1));
    // Forward and backward of one batch (or part of one): its gradients and summed loss.
    let run = |model: &M, b: &DeviceBatch<B>| {
        let logits = model.logits(b);
        let mut sums = label_smoothed_loss(logits, b.labels.clone(), PAD, tr.label_smoothing);
        if poisoned {
            sums.smoothed = sums.smoothed * f64::NAN;
        }
        if idle {
            sums.smoothed = sums.smoothed * 0.0;
        }
        let inner = sums.smoothed.clone().inner();
        // Mean over the tokens of the whole optimizer step, so accumulation = a bigger batch.
        let mut loss = sums.smoothed / step_tokens.max(1) as f64;
        if let Some(scale) = loss_scale {
            // f16: gradients scaled up past f16's smallest numbers, divided back below.
            loss = loss * Tensor::<B, 1>::from_inner(scale.clone());
            if injected_overflow_steps().contains(&(step + 1)) {
                loss = loss * f64::INFINITY;
            }
        }
        (GradientsParams::from_grads(loss.backward(), model), inner)
    };
    for b in batches {
        let parts = if replica.peer.is_none() { split_parts(b, host.parts) } else { Vec::new() };
        let results = if parts.len() > 1 {
            run_parts(model, parts, &run)
        } else {
            vec![run(model, b)]
        };
        for (grads, inner) in results {
            step_loss = Some(match step_loss.take() {
                Some(acc) => acc + inner,
                None => inner,
            });
            accumulator.accumulate(model, grads);
        }
    }
    kiln_model::dropout::seed_step(None);
    let mut grads = accumulator.grads();
    let zero = || Tensor::<B, 1>::zeros([1], device).inner();
    let mut step_loss = step_loss.unwrap_or_else(zero);
    if let Some(peer) = replica.peer {
        // The replicas' gradients and losses summed, on every replica: each then clips and
        // steps alike, so the replicas stay identical.
        grads = grads.all_reduce::<B::InnerBackend>(peer, ReduceOperation::Sum).expect("kiln: gradient all-reduce failed");
        let summed = burn::collective::all_reduce::<B::InnerBackend>(peer, step_loss.into_primitive().tensor(), ReduceOperation::Sum)
            .expect("kiln: loss all-reduce failed");
        step_loss = Tensor::from_primitive(TensorPrimitive::Float(summed));
    }
    if let Some(scale) = loss_scale {
        crate::clip::scale_gradients::<B, _>(model, &mut grads, scale.clone().recip());
    }
    let norm = if tr.clip_norm > 0.0 { clip_global_norm::<B, _>(model, &mut grads, tr.clip_norm) } else { global_norm::<B, _>(model, &grads) };
    (grads, step_loss, norm.unwrap_or_else(zero))
}

/// The optimizer step after [`step_gradients`]. With f16 loss scaling the scaler takes the
/// step's verdict (finite gradients or not) and an overflowing step is undone on the device; the
/// returned norm is then -1 for a skipped step (finite, so the window does not take it for a
/// divergence; counted as an overflow when the window is read).
fn apply_step<B: AutodiffBackend, M: TrainModel<B>>(
    model: M,
    optim: AdamWOptimizer<M, B>,
    grads: GradientsParams,
    norm: Tensor<B::InnerBackend, 1>,
    lr: f64,
    scaler: Option<&mut LossScale<B::InnerBackend>>,
) -> (M, AdamWOptimizer<M, B>, Tensor<B::InnerBackend, 1>) {
    let mut optim = optim;
    match scaler {
        None => {
            let model = optim.step(lr, model, grads);
            (model, optim, norm)
        }
        Some(scaler) => {
            let skip = scaler.update(norm.clone().is_finite());
            let before = (model.clone(), optim.clone());
            let stepped = optim.step(lr, model, grads);
            let (model, optim) = keep_if_skipped(&skip, (&before.0, &before.1), (stepped, optim));
            (model, optim, norm.mask_fill(skip, -1.0))
        }
    }
}

/// Work for a replica thread.
enum ReplicaJob<B: AutodiffBackend, M: TrainModel<B>> {
    /// One optimizer step over its share of the step's batches.
    Step { batches: Vec<DeviceBatch<B>>, idle: bool, step: usize, lr: f64, step_tokens: usize },
    /// Continue from this model and optimizer (rank 0's after a skip or a rollback).
    Reset { model: M, optim: AdamWOptimizer<M, B> },
}

/// Data parallel (`backend.devices`): ranks 1..N as threads, each with its model replica and
/// optimizer on its device; rank 0 is the loop itself. Every step the loop hands each rank its
/// share of the step's batches; all ranks meet in the all-reduce, then step alike. The loop
/// never waits for the replicas otherwise: the all-reduce is the only meeting point.
struct ReplicaPool<B: AutodiffBackend, M: TrainModel<B>> {
    ranks: Vec<std::sync::mpsc::Sender<ReplicaJob<B, M>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl<B: AutodiffBackend, M: TrainModel<B>> ReplicaPool<B, M> {
    /// Starts ranks 1.. on `devices` and registers rank 0 (the calling thread) on `main_device`.
    fn start(model: &M, optim: &AdamWOptimizer<M, B>, tr: &kiln_recipe::TrainSection, main_device: &B::Device, devices: &[B::Device], host: HostStep, compute: Option<burn::tensor::FloatDType>) -> Self {
        let config = CollectiveConfig::default().with_num_devices(devices.len() + 1);
        let mut ranks = Vec::new();
        let mut threads = Vec::new();
        for (i, device) in devices.iter().enumerate() {
            let rank = i + 1;
            let (jobs, queue) = std::sync::mpsc::channel::<ReplicaJob<B, M>>();
            let (model, optim, tr, device, config) = (model.clone(), optim.clone(), tr.clone(), device.clone(), config.clone());
            let thread = std::thread::Builder::new()
                .name(format!("kiln-replica-{rank}"))
                .spawn(move || {
                    let peer = PeerId::from(rank);
                    register::<B::InnerBackend>(peer, device.clone(), config).expect("kiln: cannot join the collective");
                    let _autocast = kiln_model::autocast::enter(compute);
                    let (mut model, mut optim) = (model.fork(&device), optim);
                    // Each rank scales alike: the same verdicts from the same all-reduced norms.
                    let mut scaler = (tr.precision == kiln_recipe::Precision::F16).then(|| LossScale::<B::InnerBackend>::standard(&device));
                    for job in queue {
                        match job {
                            ReplicaJob::Step { batches, idle, step, lr, step_tokens } => {
                                let batches: Vec<DeviceBatch<B>> = batches.into_iter().map(|b| b.to_device(&device)).collect();
                                let scale = scaler.as_ref().map(|s| &s.scale);
                                let (grads, _, norm) = step_gradients(&model, &batches, &tr, step, &device, host, step_tokens, idle, Replica { rank, peer: Some(peer) }, scale);
                                (model, optim, _) = apply_step(model, optim, grads, norm, lr, scaler.as_mut());
                            }
                            ReplicaJob::Reset { model: m, optim: o } => {
                                model = m.fork(&device);
                                optim = o;
                            }
                        }
                    }
                    let _ = finish_collective::<B::InnerBackend>(peer);
                })
                .expect("kiln: cannot start a replica thread");
            ranks.push(jobs);
            threads.push(thread);
        }
        register::<B::InnerBackend>(PeerId::from(0), main_device.clone(), config).expect("kiln: cannot join the collective");
        Self { ranks, threads }
    }

    /// Replicas, the loop's included.
    fn len(&self) -> usize {
        self.ranks.len() + 1
    }

    /// Hands ranks 1.. their batches of a step (`shares[r]` for rank r; rank 0's stays here). A
    /// rank without a batch runs the step's first batch at weight 0.
    fn send(&self, shares: &mut [Vec<DeviceBatch<B>>], step: usize, lr: f64, step_tokens: usize) {
        let spare = shares[0].first().cloned().expect("rank 0 always has a batch");
        for (r, jobs) in self.ranks.iter().enumerate() {
            let mine = std::mem::take(&mut shares[r + 1]);
            let idle = mine.is_empty();
            let batches = if idle { vec![spare.clone()] } else { mine };
            jobs.send(ReplicaJob::Step { batches, idle, step, lr, step_tokens }).expect("kiln: a replica thread ended");
        }
    }

    /// Makes every replica continue from rank 0's model and optimizer.
    fn reset(&self, model: &M, optim: &AdamWOptimizer<M, B>) {
        for jobs in &self.ranks {
            jobs.send(ReplicaJob::Reset { model: model.clone(), optim: optim.clone() }).expect("kiln: a replica thread ended");
        }
    }
}

impl<B: AutodiffBackend, M: TrainModel<B>> Drop for ReplicaPool<B, M> {
    fn drop(&mut self) {
        // Closing the queues ends the replica threads after their last step.
        self.ranks.clear();
        let _ = finish_collective::<B::InnerBackend>(PeerId::from(0));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Test hook: `KILN_TEST_NONFINITE_STEPS=3,7` makes those steps' loss NaN before the backward pass
/// (so their gradients and the model after them are NaN, as in a real divergence), every time
/// they run. It lets the tests reach `train.on_nan` at a chosen step without a diverging model.
fn injected_nonfinite_steps() -> &'static [usize] {
    static STEPS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    STEPS.get_or_init(|| steps_from_env("KILN_TEST_NONFINITE_STEPS"))
}

/// Test hook: `KILN_TEST_OVERFLOW_STEPS=5` makes those steps' scaled loss infinite for the backward
/// pass only (f16 loss scaling): their gradients overflow, their reported loss stays finite.
fn injected_overflow_steps() -> &'static [usize] {
    static STEPS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    STEPS.get_or_init(|| steps_from_env("KILN_TEST_OVERFLOW_STEPS"))
}

fn steps_from_env(name: &str) -> Vec<usize> {
    std::env::var(name).map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect()).unwrap_or_default()
}

/// Writes `nonfinite.json` (what the window read showed) and returns the one-line stop error.
fn nonfinite_stop(run_dir: &Path, read: &WindowRead, epoch: usize, lr_at: impl Fn(usize) -> f64, state: &TrainState, why: &str) -> anyhow::Error {
    let first = read.first_nonfinite().unwrap_or(state.step);
    let latest = checkpoint::latest(run_dir).ok().flatten();
    let diagnosis = serde_json::json!({
        "reason": why,
        "first_nonfinite_step": first,
        "epoch": epoch + 1,
        // Losses are summed over the step's target tokens; null = not finite.
        "steps": read.steps.iter().map(|(step, loss, norm)| serde_json::json!({ "step": step, "loss_sum": loss, "grad_norm": norm, "lr": lr_at(*step) })).collect::<Vec<_>>(),
        "lr_scale": state.lr_scale,
        "skipped_steps": state.skipped_steps,
        "rollbacks": state.rollbacks,
        "last_checkpoint": latest.as_ref().map(|p| p.display().to_string()),
    });
    let path = run_dir.join("nonfinite.json");
    let written = kiln_views::run_files::write_atomic(&path, serde_json::to_string_pretty(&diagnosis).expect("json").as_bytes());
    let saved = match &latest {
        Some(p) => format!("the last checkpoint {} is intact; continue with a lower learning rate: kiln train --resume {} --set train.lr=…", p.display(), run_dir.display()),
        None => "no checkpoint was saved before it".to_string(),
    };
    let diagnosis = match written {
        Ok(()) => format!("diagnosis in {}", path.display()),
        Err(e) => format!("no diagnosis ({e})"),
    };
    anyhow::Error::new(NonFiniteStop(format!("non-finite training loss or gradient at step {first} (epoch {}): {why}; {diagnosis}; {saved}", epoch + 1)))
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
    /// A measurement run (`kiln bench train`): each step's milliseconds (batch in hand to update
    /// done) go here, and nothing is validated, tested or saved.
    pub step_times: Option<StepTimes>,
    /// Measures the device's memory for `loader.max_tokens = "auto"` (`None`: cannot be measured).
    pub memory: Option<Box<dyn crate::autobatch::MemoryMeter>>,
    /// Data parallel: the devices of ranks 1.. (`device` is rank 0's); empty for one device.
    pub replica_devices: Vec<B::Device>,
}

/// Milliseconds of each optimizer step of a measurement run.
pub type StepTimes = Arc<std::sync::Mutex<Vec<f64>>>;

type FileRecorder = NamedMpkFileRecorder<FullPrecisionSettings>;
type BytesRecorder = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// Probes the batch budget per length range for `loader.max_tokens = "auto"` ([`crate::autobatch`]):
/// each try is one training step (forward, backward, clipping, AdamW) on a synthetic batch, on
/// copies of the model and optimizer that are then dropped, so training starts untouched. A try
/// that panics (a backend's out-of-memory error) counts as a failure.
fn probe_batch_sizes<B: AutodiffBackend, M: TrainModel<B>, O: Optimizer<M, B>>(
    model: &M,
    optim: &O,
    recipe: &Recipe,
    data: &Prepared,
    device: &B::Device,
    device_name: &str,
    meter: &mut dyn crate::autobatch::MemoryMeter,
) -> Result<crate::autobatch::Table, String> {
    let started = Instant::now();
    let capacity = meter.capacity();
    let limit = (capacity as f64 * 0.85) as u64;
    let text = data.text.is_some();
    let lengths = if text { vec![recipe.data.block_size] } else { crate::autobatch::length_ranges(recipe.data.max_len + 2) };
    let vocab = data.tokenizer.vocab_size() as u32;
    let host = HostStep::new(device_name, recipe.backend.cpu_split);
    // Ordinary (non-special) ids, varied so no kernel sees a constant.
    let token = |i: usize| 4 + (i as u32).wrapping_mul(2_654_435_761) % (vocab.max(5) - 4);
    let mut try_size = |len: usize, n: usize| -> crate::autobatch::Outcome {
        let batch = if text {
            let stream: Vec<u32> = (0..n * len + 1).map(token).collect();
            let starts: Vec<usize> = (0..n).map(|k| k * len).collect();
            DeviceBatch::<B>::blocks(HostBlocks::build(&stream, &starts, len), device)
        } else {
            // Source and target both at the range's top (the lengths count the added `</s>`).
            let examples: Vec<Example> = (0..n).map(|k| Example { src: (0..len - 1).map(|i| token(k * len + i)).collect(), tgt: (0..len - 1).map(|i| token(k * len + i + 7)).collect() }).collect();
            DeviceBatch::<B>::new(HostBatch::build(&examples, &(0..n).collect::<Vec<_>>()), device)
        };
        meter.reset();
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let tokens = batch.stats.target_tokens;
            let (grads, loss, norm) = step_gradients(model, std::slice::from_ref(&batch), &recipe.train, 0, device, host, tokens, false, SINGLE, None);
            let stepped = optim.clone().step(recipe.train.lr, model.clone(), grads);
            // Waits for the step, optimizer included, to finish on the device.
            let _ = Tensor::cat(vec![loss, norm], 0).into_data();
            drop(stepped);
        }));
        std::panic::set_hook(previous_hook);
        match ran {
            Ok(()) => Ok(meter.peak()),
            Err(panic) => Err(panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "the step failed".into())),
        }
    };
    let cap = recipe.loader.auto_token_cap;
    let (rows, probes) = crate::autobatch::plan(&lengths, limit, cap, &mut try_size).map_err(|e| format!("loader.max_tokens = \"auto\": {e} on {device_name}"))?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(crate::autobatch::Table { rows, device: device_name.to_string(), capacity_mb: mib(capacity), limit_mb: mib(limit), cap_tokens: cap, probes, seconds: started.elapsed().as_secs_f64() })
}

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

    // Burn creates parameters lazily, at first use, and a clone of an uncreated parameter creates
    // its own. Created here, from the seed alone, the weights are the same whatever runs first
    // (the batch-size probe, a checkpoint kept for rollback) and every clone shares them.
    struct CreateParams;
    impl<B: Backend> burn::module::ModuleVisitor<B> for CreateParams {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    let mut model = model;
    model.visit(&mut CreateParams);
    let mut optim = AdamWConfig::new()
        .with_beta_1(tr.beta1 as f32)
        .with_beta_2(tr.beta2 as f32)
        .with_epsilon(tr.eps as f32)
        .with_weight_decay(tr.weight_decay as f32)
        .init::<B, M>();
    let recorder = FileRecorder::new();

    let architecture = checkpoint::Architecture::new(&recipe.model, data.tokenizer.vocab_size());
    let mut state = TrainState { format: STATE_FORMAT, architecture: Some(architecture.clone()), ..Default::default() };
    if let Some(dir) = &job.resume_from {
        state = checkpoint::read_state(dir).map_err(|m| anyhow!(m))?;
        checkpoint::check_architecture(dir, &state, &architecture).map_err(|m| anyhow!(m))?;
        state.architecture = Some(architecture.clone());
        model = crate::infer::load_weights(model, &dir.join("model"), device)?;
        let optim_path = dir.join("optimizer");
        let record = recorder
            .load(optim_path.clone(), device)
            .map_err(|e| anyhow!("{}.mpk: cannot load optimizer state: {}", optim_path.display(), one_line(&e.to_string())))?;
        optim = optim.load_record(record);
    }

    // `loader.max_tokens = "auto"`: the budget table is probed now (or read back on a resume, so
    // the batches stay those the run started with) and stands in for the key from here on.
    let probed_recipe;
    let recipe = if recipe.loader.max_tokens == TokenLimit::Auto {
        let table = match &job.resume_from {
            Some(_) => crate::autobatch::read(job.run_dir).map_err(|m| anyhow!(m))?,
            None => {
                let mut meter = job.memory;
                let meter = meter.as_deref_mut().ok_or_else(|| anyhow!("loader.max_tokens = \"auto\": the memory of {} cannot be measured; give loader.max_tokens a number", job.device_name))?;
                let table = probe_batch_sizes(&model, &optim, recipe, data, device, &job.device_name, meter).map_err(|m| anyhow!(m))?;
                crate::autobatch::write(job.run_dir, &table).map_err(|m| anyhow!(m))?;
                table
            }
        };
        if job.resume_from.is_some() {
            emit(sink, Event::Note(format!("loader.max_tokens = \"auto\": the budgets probed when the run started ({})", crate::autobatch::FILE)))?;
        }
        for line in table.lines() {
            emit(sink, Event::Note(line))?;
        }
        let mut r = recipe.clone();
        r.loader.max_tokens = TokenLimit::Table(table.budget_rows());
        probed_recipe = r;
        &probed_recipe
    } else {
        recipe
    };
    let tr = &recipe.train;

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
    let per_step = tr.accumulate * (job.replica_devices.len() + 1);
    let epoch_steps: Vec<usize> = (0..tr.epochs).map(|e| epoch_plan(e).1.len().div_ceil(per_step)).collect();
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
    let mut window = SyncWindow::<B::InnerBackend>::new();
    let mut last_lr = schedule.at(state.step.max(1)) * state.lr_scale;
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
            // Serialised in memory, written by us: a failed write (a full disk) then reports the
            // operating system's reason, which Burn's file recorder would hide.
            let bytes = BytesRecorder::new();
            let write = |file: &str, record: Result<Vec<u8>, burn::record::RecorderError>| -> Result<(), String> {
                let path = dir.join(file);
                let bytes = record.map_err(|e| format!("{}: cannot serialise: {e}", path.display()))?;
                std::fs::write(&path, bytes).map_err(|e| format!("{}: cannot write: {e}", path.display()))
            };
            write("model.mpk", Recorder::<B>::record(&bytes, model.clone().into_record(), ()))?;
            write("optimizer.mpk", Recorder::<B>::record(&bytes, Optimizer::<M, B>::to_record(optim), ()))
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

    let policy = tr.on_nan;
    let measuring = job.step_times.is_some();
    let host = HostStep::new(&job.device_name, recipe.backend.cpu_split);
    // f16: dynamic loss scaling, on the device (a resumed run starts again at 2¹⁶).
    let mut scaler = (tr.precision == kiln_recipe::Precision::F16).then(|| LossScale::<B::InnerBackend>::standard(device));
    // Data parallel: ranks 1.. start from the model and optimizer as they are now (resumed or
    // fresh), so every replica starts identical.
    let pool = (!job.replica_devices.is_empty())
        .then(|| ReplicaPool::start(&model, &optim, tr, device, &job.replica_devices, host, kiln_model::autocast::compute()));
    let replicas = pool.as_ref().map_or(1, ReplicaPool::len);

    // `skip`: where the open window started, to replay it without its non-finite steps.
    let mut window_start: Option<WindowStart<B, M, _>> = None;
    // `rollback`: the model, optimizer and state of the last checkpoint (or of the start). Held in
    // memory (the tensors are shared, not copied), so going back reads nothing from disk.
    let mut last_good = (policy == OnNan::Rollback).then(|| (model.clone(), optim.clone(), state.clone()));

    // Window reads: on the reader thread, one window late (`train.sync_overlap`), or at once.
    let reader = tr.sync_overlap.then(WindowReader::<B::InnerBackend>::new);
    // The closed window whose read is in flight.
    let mut pending: Option<PendingWindow<B, M, _>> = None;

    // Waits for a closed window's read and logs it; a non-finite step is handled as
    // `train.on_nan` says. Evaluates to `true` when training went back to a checkpoint.
    macro_rules! resolve {
        ($closed:expr) => {{
            let PendingWindow { window: mut done, read, start, epoch: done_epoch, lr: done_lr } = $closed;
            let read = read.wait();
            done.closed.get_or_insert_with(Instant::now);
            let mut rolled_back = false;
            match read.first_nonfinite() {
                None => {
                    done.scaling = (read.overflows(), read.loss_scale);
                    record_window(&mut done, read.loss_sum, read.ms, &mut state, done_epoch, done_lr, &mut clock, loader.take_wait(), loader.ready(), sink)?;
                }
                Some(_) if policy == OnNan::Stop => {
                    return Err(nonfinite_stop(job.run_dir, &read, done_epoch, |k| schedule.at(k) * state.lr_scale, &state, "train.on_nan = \"stop\""));
                }
                Some(_) if policy == OnNan::Skip => {
                    // Back to the window's start; its steps again, each read (this is the rare
                    // path), applying only those with a finite loss and gradient.
                    let start = start.expect("skip keeps the window's start");
                    model = start.model;
                    optim = start.optim;
                    state.step = start.step;
                    // Steps queued after it while its read was in flight ran on the bad model:
                    // they run again after it, as the open window.
                    let queued_after = window_start.take().map(|open| open.batches).unwrap_or_default();
                    window = SyncWindow::new();
                    let mut replayed = SyncWindow::<B::InnerBackend>::new();
                    replayed.started = done.started;
                    replayed.first_step = start.step;
                    let mut skipped = Vec::new();
                    for batches in &start.batches {
                        let tokens = batches.iter().map(|b| b.stats.target_tokens).sum();
                        let (grads, loss, norm) = step_gradients(&model, batches, tr, state.step, device, host, tokens, false, SINGLE, scaler.as_ref().map(|s| &s.scale));
                        let values: Vec<f64> = Tensor::cat(vec![loss, norm], 0).into_data().iter::<f64>().collect();
                        state.step += 1;
                        last_lr = schedule.at(state.step) * state.lr_scale;
                        if values.iter().all(|v| v.is_finite()) {
                            model = optim.step(last_lr, model, grads);
                            replayed.host_sum += values[0];
                            replayed.count(batches);
                        } else {
                            if state.skipped_steps >= tr.nan_max_recoveries {
                                let why = format!("{} steps skipped already (train.nan_max_recoveries)", state.skipped_steps);
                                return Err(nonfinite_stop(job.run_dir, &read, done_epoch, |k| schedule.at(k) * state.lr_scale, &state, &why));
                            }
                            state.skipped_steps += 1;
                            skipped.push(state.step);
                            // The skipped step's batches were consumed: the window still counts it.
                            replayed.steps += 1;
                        }
                    }
                    emit(sink, Event::Note(match skipped.len() {
                        // A step that was non-finite once and finite when replayed: nothing skipped.
                        0 => format!("non-finite loss or gradient, finite on replay (window replayed from step {})", start.step + 1),
                        n => format!(
                            "non-finite loss or gradient: skipped step{} {} (window replayed from step {})",
                            if n == 1 { "" } else { "s" },
                            skipped.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
                            start.step + 1
                        ),
                    }))?;
                    let host_sum = replayed.host_sum;
                    record_window(&mut replayed, host_sum, read.ms, &mut state, done_epoch, last_lr, &mut clock, loader.take_wait(), loader.ready(), sink)?;
                    if !queued_after.is_empty() {
                        window.first_step = state.step;
                        window_start = Some(WindowStart { model: model.clone(), optim: optim.clone(), step: state.step, batches: Vec::new() });
                        for batches in queued_after {
                            let tokens = batches.iter().map(|b| b.stats.target_tokens).sum();
                            let (grads, loss_sum, norm) = step_gradients(&model, &batches, tr, state.step, device, host, tokens, false, SINGLE, scaler.as_ref().map(|s| &s.scale));
                            state.step += 1;
                            last_lr = schedule.at(state.step) * state.lr_scale;
                            let (m, o, norm) = apply_step(model, optim, grads, norm, last_lr, scaler.as_mut());
                            (model, optim) = (m, o);
                            window.add(loss_sum, norm);
                            window.count(&batches);
                            window_start.as_mut().expect("just set").batches.push(batches);
                        }
                    }
                    // The replicas continue from the replayed model (the replay ran on rank 0 alone,
                    // every batch of each step: the same gradients, up to the order of the sums).
                    if let Some(pool) = &pool {
                        pool.reset(&model, &optim);
                    }
                }
                Some(first) => {
                    if state.rollbacks >= tr.nan_max_recoveries {
                        let why = format!("{} rollbacks made already (train.nan_max_recoveries)", state.rollbacks);
                        return Err(nonfinite_stop(job.run_dir, &read, done_epoch, |k| schedule.at(k) * state.lr_scale, &state, &why));
                    }
                    let (good_model, good_optim, good_state) = last_good.clone().expect("rollback keeps the last checkpoint");
                    let mut sync = state.sync;
                    sync.record(read.ms);
                    let (skipped_steps, rollbacks, lr_scale) = (state.skipped_steps, state.rollbacks + 1, state.lr_scale * tr.nan_lr_factor);
                    model = good_model;
                    optim = good_optim;
                    state = good_state;
                    // The syncs happened; the recoveries and the lowered rate carry on.
                    state.sync = sync;
                    state.skipped_steps = skipped_steps;
                    state.rollbacks = rollbacks;
                    state.lr_scale = lr_scale;
                    last_valid = state.last_valid.clone();
                    last_lr = schedule.at(state.step.max(1)) * state.lr_scale;
                    // Steps queued after the window are abandoned with it.
                    window = SyncWindow::new();
                    window_start = None;
                    // The pending batches belong to the abandoned steps.
                    loader = Loader::new(recipe.loader.workers, recipe.loader.prefetch);
                    if let Some(pool) = &pool {
                        pool.reset(&model, &optim);
                    }
                    emit(sink, Event::Rollback { step: state.step })?;
                    emit(sink, Event::Note(format!(
                        "non-finite loss or gradient at step {first}: rolled back to step {} (rollback {}), learning rate × {:.3e} from here",
                        state.step, state.rollbacks, state.lr_scale
                    )))?;
                    rolled_back = true;
                }
            }
            rolled_back
        }};
    }

    // Closes the open window: resolves the previous window's read first (windows are logged in
    // order), then starts this one's (the one sync). With `$wait` (a save, evaluation or the end
    // comes next) or without `train.sync_overlap` the read is waited for here; otherwise it stays
    // in flight while the next window's steps are queued. Evaluates to `true` on a rollback.
    macro_rules! close_window {
        ($epoch:expr, $wait:expr) => {{
            let mut rolled_back = false;
            if let Some(previous) = pending.take() {
                rolled_back = resolve!(previous);
            }
            if !rolled_back && window.steps > 0 {
                let overlap = if $wait { None } else { reader.as_ref() };
                let read = window.start_read(overlap, scaler.as_ref().map(|s| s.scale.clone()));
                let mut done = std::mem::replace(&mut window, SyncWindow::new());
                if overlap.is_some() {
                    done.closed = Some(Instant::now());
                }
                let closed = PendingWindow { window: done, read, start: window_start.take(), epoch: $epoch, lr: last_lr };
                if overlap.is_some() {
                    pending = Some(closed);
                } else {
                    rolled_back = resolve!(closed);
                }
            }
            rolled_back
        }};
    }

    // A finished run resumed with more epochs or steps continues; `finished` is informational.
    let mut stop = tr.max_steps > 0 && state.step >= tr.max_steps;
    while !stop && state.epoch < tr.epochs {
        let epoch = state.epoch;
        let (examples, plan) = epoch_plan(epoch);
        let mut pos = state.batch_in_epoch;
        loader.start(jobs(&examples, &plan[pos..]));
        let mut rolled_back = false;
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
                window.first_step = state.step;
                if policy == OnNan::Skip {
                    window_start = Some(WindowStart { model: model.clone(), optim: optim.clone(), step: state.step, batches: Vec::new() });
                }
            }
            let group = (tr.accumulate * replicas).min(plan.len() - pos);
            let batches: Vec<DeviceBatch<B>> = (0..group).map(|_| loader.next_batch().expect("the pass holds the rest of the epoch")).collect();
            let step_started = Instant::now();
            let step_tokens: usize = batches.iter().map(|b| b.stats.target_tokens).sum();
            let lr = schedule.at(state.step + 1) * state.lr_scale;
            let scale = scaler.as_ref().map(|s| &s.scale);
            let (grads, loss_sum, norm) = match &pool {
                None => step_gradients(&model, &batches, tr, state.step, device, host, step_tokens, false, SINGLE, scale),
                Some(pool) => {
                    // Rank r takes the step's batches r·accumulate .. (r+1)·accumulate.
                    let mut shares: Vec<Vec<DeviceBatch<B>>> = (0..pool.len()).map(|r| batches.iter().skip(r * tr.accumulate).take(tr.accumulate).cloned().collect()).collect();
                    window.device_tokens.resize(pool.len(), 0);
                    for (r, share) in shares.iter().enumerate() {
                        window.device_tokens[r] += share.iter().map(|b| b.stats.target_tokens as u64).sum::<u64>();
                    }
                    pool.send(&mut shares, state.step, lr, step_tokens);
                    step_gradients(&model, &shares[0], tr, state.step, device, host, step_tokens, false, Replica { rank: 0, peer: Some(PeerId::from(0)) }, scale)
                }
            };
            state.step += 1;
            last_lr = lr;
            let (m, o, norm) = apply_step(model, optim, grads, norm, last_lr, scaler.as_mut());
            (model, optim) = (m, o);
            window.add(loss_sum, norm);
            if let Some(times) = &job.step_times {
                // Host time: the step's whole cost on an eager backend (Flex); queueing time on CUDA.
                times.lock().expect("step times").push(step_started.elapsed().as_secs_f64() * 1e3);
            }
            pos += group;
            state.batch_in_epoch = pos;
            window.count(&batches);
            if let Some(start) = &mut window_start {
                start.batches.push(batches);
            }
            let last_of_epoch = pos >= plan.len();
            let save_now = tr.save_every_steps > 0 && state.step.is_multiple_of(tr.save_every_steps) && !last_of_epoch;
            let at_limit = tr.max_steps > 0 && state.step >= tr.max_steps;
            // A save needs every step so far in its running loss sums; the epoch's end and the
            // step limit close the window too, and wait for its read.
            let wait = save_now || last_of_epoch || at_limit || control.stop_requested();
            if (window.steps >= tr.sync_interval || wait) && close_window!(epoch, wait) {
                rolled_back = true;
                break;
            }
            if save_now && !measuring {
                state.wall_s = clock.wall();
                save(&model, &optim, &mut state, sink)?;
                if let Some(good) = &mut last_good {
                    *good = (model.clone(), optim.clone(), state.clone());
                }
            }
        }
        // A stop request between a step and the next leaves a window open, or a read in flight.
        if !rolled_back && (window.steps > 0 || pending.is_some()) && close_window!(epoch, true) {
            rolled_back = true;
        }
        if rolled_back {
            stop = false;
            stopped = false;
            continue;
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
        if (epoch_done || (stop && !stopped)) && !measuring {
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
        if (finished || periodic || stopped || step_save) && !measuring {
            state.finished = finished;
            state.wall_s = clock.wall();
            save(&model, &optim, &mut state, sink)?;
            if let Some(good) = &mut last_good {
                *good = (model.clone(), optim.clone(), state.clone());
            }
        }
    }

    if stopped {
        emit(
            sink,
            Event::Note(format!("stopped on request at step {}; continue with: kiln train --resume {}", state.step, job.run_dir.display())),
        )?;
    }
    let test = if !M::has_split(data, Split::Test) || stopped || measuring {
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
        skipped_steps: state.skipped_steps,
        rollbacks: state.rollbacks,
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

/// Logs a read window: its loss sum joins the epoch's, its figures go to the sinks.
#[allow(clippy::too_many_arguments)] // the window's inputs, each from a different owner
fn record_window<B: Backend>(
    window: &mut SyncWindow<B>,
    loss_sum: f64,
    ms: f64,
    state: &mut TrainState,
    epoch: usize,
    lr: f64,
    clock: &mut Clock,
    data_wait: std::time::Duration,
    prefetch_ready: usize,
    sink: &mut dyn EventSink,
) -> Result<()> {
    state.sync.record(ms);
    state.epoch_loss_sum += loss_sum;
    state.epoch_tokens += window.tokens;
    state.total_tokens += window.tokens;
    let secs = window.closed.unwrap_or_else(Instant::now).duration_since(window.started).as_secs_f64();
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
        // The window's last step: under `sync_overlap` the loop is a window further on.
        step: window.first_step + window.steps,
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
        device_tokens: std::mem::take(&mut window.device_tokens),
        overflow_skips: window.scaling.0,
        loss_scale: window.scaling.1,
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
