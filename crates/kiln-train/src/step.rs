//! One optimizer step: the owner of forward + backward over a step's batches, gradient
//! accumulation, the all-reduce of data parallel, loss scaling, clipping and the update.
//!
//! Also the CPU specifics of a step ([`HostStep`], chosen by the backend's type): dropout masks
//! drawn by kiln on the host, and batches cut by rows into parts run side by side on the
//! thread pool ([`run_parts`], `backend.cpu_split`).

use std::any::TypeId;

use burn::collective::{CollectiveError, PeerId, ReduceOperation};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};
use kiln_recipe::TrainSection;

use crate::clip::{clip_global_norm, global_norm};
use crate::loss_scale::{keep_if_skipped, AdamWOptimizer, LossScale};
use crate::task::{Task, TaskBatch};

pub use kiln_data::mix_seed;

/// Which replica runs a step. Rank 0 is the loop's own and draws the dropout masks a
/// single-device run draws; with several devices each rank is a peer of Burn's collective.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Replica {
    pub rank: usize,
    pub peer: Option<PeerId>,
}

pub(crate) const SINGLE: Replica = Replica { rank: 0, peer: None };

/// How a step uses a host (CPU) device: dropout masks drawn by kiln on the host, and the parts
/// each batch is cut into by rows (`backend.cpu_split`), run side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStep {
    pub masks: bool,
    pub parts: usize,
}

/// A device that is not the CPU: the backend draws masks, batches run whole.
pub const DEVICE_STEP: HostStep = HostStep { masks: false, parts: 1 };

/// Whether `B` computes on this host's CPU (Burn's Flex, with or without autodiff).
pub fn is_host_backend<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<burn::backend::Flex>() || TypeId::of::<B>() == TypeId::of::<burn::backend::Autodiff<burn::backend::Flex>>()
}

impl HostStep {
    /// For backend `B` and the recipe's `backend.cpu_split` (0: one part per thread of the pool).
    pub fn for_backend<B: Backend>(cpu_split: usize) -> Self {
        if !is_host_backend::<B>() {
            return DEVICE_STEP;
        }
        let parts = if cpu_split == 0 { rayon::current_num_threads() } else { cpu_split };
        Self { masks: true, parts: parts.max(1) }
    }
}

/// `batch` cut into `parts` parts that each have a loss unit; empty (run it whole) when that
/// leaves fewer than two.
fn split_parts<B: Backend, X: TaskBatch<B>>(batch: &X, parts: usize) -> Vec<(usize, X)> {
    if parts < 2 {
        return Vec::new();
    }
    let parts: Vec<_> = batch.split_rows(parts).into_iter().filter(|(_, part)| part.stats().target_tokens > 0).collect();
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
fn run_parts<B: AutodiffBackend, M: AutodiffModule<B> + Clone + Send, X: Send, R: Send>(model: &M, parts: Vec<(usize, X)>, run: &(dyn Fn(&M, &X) -> R + Sync)) -> Vec<R> {
    use rayon::prelude::*;
    let masks = kiln_model::dropout::mask_state();
    let compute = kiln_model::autocast::compute();
    let units: Vec<(usize, X, M)> = parts.into_iter().enumerate().map(|(i, (first, part))| (first, part, if i == 0 { model.clone() } else { M::from_inner(model.valid()) })).collect();
    let done: Vec<(R, kiln_model::dropout::MaskState)> = units
        .into_par_iter()
        .map(|(first, part, model)| {
            // A part may run on a thread that is itself inside another part: rayon lets a thread
            // waiting in a join (a multi-threaded kernel) take queued work, this part included.
            // So the thread's mask state is saved and given back, or the part it interrupted
            // would go on with this part's masks (seen as a rare, load-dependent difference).
            let interrupted = kiln_model::dropout::mask_state();
            let _autocast = kiln_model::autocast::enter(compute);
            kiln_model::dropout::set_mask_state(masks.at_row(first));
            let out = run(&model, &part);
            let mine = kiln_model::dropout::mask_state();
            kiln_model::dropout::set_mask_state(interrupted);
            (out, mine)
        })
        .collect();
    // Every part drew the same number of masks: the step goes on from there, at row 0.
    kiln_model::dropout::set_mask_state(done[0].1.at_row(0));
    done.into_iter().map(|(out, _)| out).collect()
}

/// What [`step_gradients`] leaves on the device: the clipped gradients, the step's summed loss,
/// its pre-clip gradient norm and the task's metric sums.
pub(crate) struct StepSums<B: AutodiffBackend> {
    pub grads: GradientsParams,
    pub loss_sum: Tensor<B::InnerBackend, 1>,
    pub norm: Tensor<B::InnerBackend, 1>,
    pub metric_sums: Vec<Tensor<B::InnerBackend, 1>>,
    /// Data parallel: milliseconds the host spent in the step's all-reduce (the wait for the
    /// slowest replica, of any node, included).
    pub reduce_ms: Option<f64>,
}

/// Where a step runs and how.
#[derive(Clone, Copy)]
pub(crate) struct StepPlace<'a, B: AutodiffBackend> {
    pub device: &'a B::Device,
    pub host: HostStep,
    pub replica: Replica,
    pub loss_scale: Option<&'a Tensor<B::InnerBackend, 1>>,
    pub faults: &'a Faults,
    /// Multi-node: bounds this step's wait on the other nodes (on the loop's rank only).
    pub watchdog: Option<&'a crate::nodes::Watchdog>,
}

/// Forward and backward passes of one optimizer step (`step` = steps done before it).
/// `step_tokens` counts the loss units of the whole step (all replicas'), so that the gradients
/// of the replicas, summed, are those of one big batch. An `idle` replica (the last step of an
/// epoch may have fewer batches than devices) runs its batch at weight 0: it still takes part in
/// the all-reduce, with zero gradients and a zero loss.
#[allow(clippy::too_many_arguments)] // one step's inputs, each from its own owner
pub(crate) fn step_gradients<B: AutodiffBackend, T: Task<B>>(
    task: &T,
    model: &T::Model,
    batches: &[T::Batch],
    tr: &TrainSection,
    step: usize,
    step_tokens: usize,
    idle: bool,
    at: StepPlace<'_, B>,
) -> Result<StepSums<B>, CollectiveError> {
    // Dropout masks are a function of (seed, step, rank): resuming and replaying reproduce them.
    // On the CPU kiln draws them on the host (kiln_model::dropout), elsewhere the backend does.
    let seed = if at.replica.rank == 0 { tr.seed } else { mix_seed(tr.seed, 7, at.replica.rank as u64) };
    B::seed(at.device, mix_seed(seed, 2, step as u64));
    kiln_model::dropout::seed_step(at.host.masks.then(|| mix_seed(seed, 5, step as u64)));
    let mut accumulator = GradientsAccumulator::<T::Model>::new();
    let mut step_loss: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut metric_sums: Vec<Tensor<B::InnerBackend, 1>> = Vec::new();
    let poisoned = at.faults.nonfinite_steps.contains(&(step + 1));
    let overflow = at.faults.overflow_steps.contains(&(step + 1));
    // Forward and backward of one batch (or part of one): its gradients and sums.
    let run = |model: &T::Model, b: &T::Batch| {
        let out = task.forward(model, b);
        let mut loss_sum = out.loss_sum;
        if poisoned {
            loss_sum = loss_sum * f64::NAN;
        }
        if idle {
            loss_sum = loss_sum * 0.0;
        }
        let inner = loss_sum.clone().inner();
        let metrics: Vec<_> = out.metric_sums.into_iter().map(|m| if idle { m.inner() * 0.0 } else { m.inner() }).collect();
        // Mean over the units of the whole optimizer step, so accumulation = a bigger batch.
        let mut loss = loss_sum / step_tokens.max(1) as f64;
        if let Some(scale) = at.loss_scale {
            // f16: gradients scaled up past f16's smallest numbers, divided back below.
            loss = loss * Tensor::<B, 1>::from_inner(scale.clone());
            if overflow {
                loss = loss * f64::INFINITY;
            }
        }
        (GradientsParams::from_grads(loss.backward(), model), inner, metrics)
    };
    for b in batches {
        let parts = if at.replica.peer.is_none() { split_parts(b, at.host.parts) } else { Vec::new() };
        let results = if parts.len() > 1 { run_parts(model, parts, &run) } else { vec![run(model, b)] };
        for (grads, inner, metrics) in results {
            step_loss = Some(match step_loss.take() {
                Some(acc) => acc + inner,
                None => inner,
            });
            if metric_sums.is_empty() {
                metric_sums = metrics;
            } else {
                for (acc, m) in metric_sums.iter_mut().zip(metrics) {
                    *acc = acc.clone() + m;
                }
            }
            accumulator.accumulate(model, grads);
        }
    }
    kiln_model::dropout::seed_step(None);
    let mut grads = accumulator.grads();
    let zero = || Tensor::<B, 1>::zeros([1], at.device).inner();
    let mut step_loss = step_loss.unwrap_or_else(zero);
    let mut reduce_ms = None;
    if let Some(peer) = at.replica.peer {
        // The replicas' gradients, losses and metric sums summed, on every replica: each then
        // clips and steps alike, so the replicas stay identical.
        let reduce = || all_reduce_step::<B, T::Model>(model, peer, grads, step_loss, metric_sums);
        let started = std::time::Instant::now();
        (grads, step_loss, metric_sums) = match at.watchdog {
            Some(watchdog) => watchdog.around(move || format!("no answer from the other nodes in the all-reduce of step {}", step + 1), reduce)?,
            None => reduce()?,
        };
        reduce_ms = Some(started.elapsed().as_secs_f64() * 1e3);
    }
    if let Some(scale) = at.loss_scale {
        crate::clip::scale_gradients::<B, _>(model, &mut grads, scale.clone().recip());
    }
    let norm = if tr.clip_norm > 0.0 { clip_global_norm::<B, _>(model, &mut grads, tr.clip_norm) } else { global_norm::<B, _>(model, &grads) };
    Ok(StepSums { grads, loss_sum: step_loss, norm: norm.unwrap_or_else(zero), metric_sums, reduce_ms })
}

/// The step's gradients (every parameter's, in module order), its loss and its metric sums,
/// summed over the replicas in one all-reduce of one flat tensor, then cut back into place.
/// Burn's `GradientsParams::all_reduce` makes one all-reduce per parameter; across nodes each is
/// a round of transfers and a barrier between the processes, so one per step is what keeps the
/// reduce's share of the step small (measured: docs/bench/nodes.md). The sums are the same,
/// element by element.
fn all_reduce_step<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    peer: PeerId,
    mut grads: GradientsParams,
    loss: Tensor<B::InnerBackend, 1>,
    metrics: Vec<Tensor<B::InnerBackend, 1>>,
) -> Result<(GradientsParams, Tensor<B::InnerBackend, 1>, Vec<Tensor<B::InnerBackend, 1>>), CollectiveError> {
    use burn::module::{ModuleVisitor, Param, ParamId};
    type Inner<B> = <B as AutodiffBackend>::InnerBackend;
    /// Takes each gradient out, flattened, with where it came from.
    struct Flatten<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        pieces: Vec<Tensor<Inner<B>, 1>>,
        places: Vec<(ParamId, Vec<usize>)>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<Inner<B>, D>(param.id) {
                let dims = g.dims().to_vec();
                self.pieces.push(g.reshape([dims.iter().product::<usize>()]));
                self.places.push((param.id, dims));
            }
        }
    }
    /// Puts each summed gradient back, in the order it was taken out.
    struct Unflatten<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        summed: Tensor<Inner<B>, 1>,
        places: std::vec::IntoIter<(ParamId, Vec<usize>)>,
        offset: usize,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.places.as_slice().first().is_some_and(|(id, _)| *id == param.id) {
                let (_, dims) = self.places.next().expect("just checked");
                let n: usize = dims.iter().product();
                let dims: [usize; D] = dims.try_into().expect("a gradient has its parameter's rank");
                let g = self.summed.clone().slice([self.offset..self.offset + n]).reshape(dims);
                self.grads.register::<Inner<B>, D>(param.id, g);
                self.offset += n;
            }
        }
    }
    let mut flat = Flatten::<B> { grads: &mut grads, pieces: Vec::new(), places: Vec::new() };
    model.visit(&mut flat);
    let Flatten { mut pieces, places, .. } = flat;
    let sums = 1 + metrics.len();
    pieces.push(loss);
    pieces.extend(metrics);
    let summed = burn::collective::all_reduce::<Inner<B>>(peer, Tensor::cat(pieces, 0).into_primitive().tensor(), ReduceOperation::Sum)?;
    let summed = Tensor::<Inner<B>, 1>::from_primitive(TensorPrimitive::Float(summed));
    let total = summed.dims()[0];
    let mut back = Unflatten::<B> { grads: &mut grads, summed: summed.clone(), places: places.into_iter(), offset: 0 };
    model.visit(&mut back);
    let start = back.offset;
    debug_assert_eq!(start + sums, total);
    let loss = summed.clone().slice([start..start + 1]);
    let metrics = (1..sums).map(|k| summed.clone().slice([start + k..start + k + 1])).collect();
    Ok((grads, loss, metrics))
}

/// The optimizer step after [`step_gradients`]. With f16 loss scaling the scaler takes the
/// step's verdict (finite gradients or not) and an overflowing step is undone on the device; the
/// returned norm is then -1 for a skipped step (finite, so the window does not take it for a
/// divergence; counted as an overflow when the window is read).
pub(crate) fn apply_step<B: AutodiffBackend, M: AutodiffModule<B> + Clone>(
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

/// Faults injected by tests: steps whose loss is made NaN before the backward pass (so their
/// gradients and the model after them are NaN, as in a real divergence), every time they run;
/// and steps whose scaled loss is made infinite for the backward pass only (f16 loss scaling:
/// their gradients overflow, their reported loss stays finite). They let tests reach
/// `train.on_nan` and the loss scaler at a chosen step without a diverging model. Empty unless a
/// test sets them ([`crate::Trainer::inject_faults`], or the `test-hooks` feature's variables).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub nonfinite_steps: Vec<usize>,
    pub overflow_steps: Vec<usize>,
    /// A pause (ms) in the middle of each checkpoint write, after the weights and before the
    /// state: a window in which a test kills the process during a save.
    pub pause_in_save_ms: u64,
    /// A pause (ms) at the start of each validation: a window in which a test signals the
    /// process during an evaluation.
    pub pause_in_eval_ms: u64,
}

impl Faults {
    /// `KILN_TEST_NONFINITE_STEPS=3,7`, `KILN_TEST_OVERFLOW_STEPS=5`, `KILN_TEST_PAUSE_IN_SAVE_MS=500` and `KILN_TEST_PAUSE_IN_EVAL_MS=500`, read only in builds with
    /// the `test-hooks` feature (the CLI tests build with it); release builds ignore them.
    pub fn from_env() -> Self {
        #[cfg(feature = "test-hooks")]
        {
            let steps = |name: &str| std::env::var(name).map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect()).unwrap_or_default();
            let ms = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            Self {
                nonfinite_steps: steps("KILN_TEST_NONFINITE_STEPS"),
                overflow_steps: steps("KILN_TEST_OVERFLOW_STEPS"),
                pause_in_save_ms: ms("KILN_TEST_PAUSE_IN_SAVE_MS"),
                pause_in_eval_ms: ms("KILN_TEST_PAUSE_IN_EVAL_MS"),
            }
        }
        #[cfg(not(feature = "test-hooks"))]
        Self::default()
    }
}
