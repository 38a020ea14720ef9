//! The training loop as a library: [`Trainer`] takes any [`Task`] (a Burn model with its batch
//! type, loss and metrics) and any [`TrainData`], and gives it all of kiln's loop. Ours, not
//! burn-train's Learner, which reads each step's output back (see `crate::strategy`).
//!
//! ```text
//! fit ─ per epoch ─ per step: step::step_gradients → step::apply_step → window.add
//!                 └ every sync_interval steps: close_window → (read in flight) → resolve
//!                                                            └ recovery (train.on_nan)
//!       epoch end: validate → save
//! ```
//!
//! Each optimizer step runs `train.accumulate` batches forward and backward, clips the global
//! gradient norm on the device and applies AdamW. The step's summed loss stays on the device and
//! is added into the current sync window (`crate::window`); the host reads the window's sum once
//! every `train.sync_interval` steps and at epoch end. With `train.sync_overlap` the read runs on
//! a reader thread while the loop queues the next window's steps, and is waited for when that
//! window closes: the device always has work queued, and the host is never more than one window
//! ahead of what it has read. Unit counts come from the host batches, so they need no read.
//! Batch order and dropout are functions of (seed, epoch) and (seed, step, rank), which makes a
//! resumed run see the same batches and masks as an unbroken one.
//!
//! A window's read also brings back each step's summed loss and gradient norm (one transfer): a
//! non-finite one is handled as `train.on_nan` says (`crate::recovery`). Saves wait for every
//! read, so no checkpoint holds a step that was not checked. Data parallel over several devices
//! is `crate::replicas`; the CPU specifics (host dropout masks, batches in parts, the loop on a
//! rayon worker) are chosen here by the backend's type.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use kiln_data::loader::Loader;
use kiln_events::{Control, DataFigures, EvalFigures, Event, EventSink, RunInfo, Summary, ValidRow, WindowRow};
use kiln_recipe::{OnNan, Precision, TrainSection};

use crate::checkpoint::{self, TrainState, STATE_FORMAT};
use crate::data::TrainData;
use crate::loss_scale::{AdamWOptimizer, LossScale};
use crate::nodes::NodeGroup;
use crate::recovery::WindowStart;
use crate::replicas::{ReplicaPool, ReplicaSettings};
use crate::schedule::LrSchedule;
use crate::step::{apply_step, is_host_backend, step_gradients, Faults, HostStep, Replica, StepPlace, SINGLE};
use crate::system::ProcessSample;
use crate::task::{MetricDef, Split, Task, TaskBatch};
use crate::weights::Ema;
use crate::window::{ClosedWindow, SyncWindow, WindowReader};

pub use crate::recovery::NonFiniteStop;
pub use kiln_data::mix_seed;

/// Milliseconds of each optimizer step of a measurement run.
pub type StepTimes = Arc<std::sync::Mutex<Vec<f64>>>;

type FileRecorder = NamedMpkFileRecorder<FullPrecisionSettings>;
type BytesRecorder = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// The dtype of matrix products for `train.precision` (`None`: f32 throughout).
pub fn compute_dtype(precision: Precision) -> Option<burn::tensor::FloatDType> {
    match precision {
        Precision::F32 => None,
        Precision::Bf16 => Some(burn::tensor::FloatDType::BF16),
        Precision::F16 => Some(burn::tensor::FloatDType::F16),
    }
}

/// AdamW as `[train]` sets it (the learning rate comes with each step).
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(train: &TrainSection) -> AdamWOptimizer<M, B> {
    AdamWConfig::new()
        .with_beta_1(train.beta1 as f32)
        .with_beta_2(train.beta2 as f32)
        .with_epsilon(train.eps as f32)
        .with_weight_decay(train.weight_decay as f32)
        .init::<B, M>()
}

/// Burn creates parameters lazily, at first use, and a clone of an uncreated parameter creates
/// its own. Created at once, from the seed alone, the weights are the same whatever runs first
/// (the batch-size probe, a copy kept for rollback) and every clone shares them.
pub fn create_params<B: Backend, M: Module<B>>(model: &M) {
    struct CreateParams;
    impl<B: Backend> burn::module::ModuleVisitor<B> for CreateParams {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    model.visit(&mut CreateParams);
}

/// `model` (built on its device, parameters not yet created) with the weights of `host`, the same
/// module built and created on another backend (kiln draws them on Flex from the seed, so that a
/// seed means the same model on every device). The weights travel as a named record, as a
/// checkpoint does; `model`'s lazy initialisers never run.
pub fn weights_from_host<H: Backend, B: Backend, MH: Module<H>, M: Module<B>>(host: MH, model: M, device: &B::Device) -> Result<M> {
    let bytes = Recorder::<H>::record(&BytesRecorder::new(), host.into_record(), ()).map_err(|e| anyhow!("cannot serialise the initial weights: {e}"))?;
    let record = Recorder::<B>::load(&BytesRecorder::new(), bytes, device).map_err(|e| anyhow!("the initial weights do not fit the model: {}", one_line(&e.to_string())))?;
    Ok(model.load_record(record))
}

/// Gives the parameters the ids 0, 1, 2, … in module order. Burn draws each id at random when it
/// builds a module, and the optimizer's state and the checkpoint files are keyed by them: numbered,
/// two runs of the same recipe save the same bytes, and processes that build the same model agree
/// on which parameter is which. Values, devices and gradient tracking are untouched.
pub fn number_params<B: Backend, M: Module<B>>(model: M) -> M {
    use burn::module::{Param, ParamId};
    use burn::tensor::{Bool, Int};
    struct Number(u64);
    impl Number {
        fn next(&mut self) -> ParamId {
            self.0 += 1;
            ParamId::from(self.0 - 1)
        }
    }
    impl<B: Backend> burn::module::ModuleMapper<B> for Number {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (_, value, mapper) = param.consume();
            Param::from_mapped_value(self.next(), value, mapper)
        }
        fn map_int<const D: usize>(&mut self, param: Param<Tensor<B, D, Int>>) -> Param<Tensor<B, D, Int>> {
            let (_, value, mapper) = param.consume();
            Param::from_mapped_value(self.next(), value, mapper)
        }
        fn map_bool<const D: usize>(&mut self, param: Param<Tensor<B, D, Bool>>) -> Param<Tensor<B, D, Bool>> {
            let (_, value, mapper) = param.consume();
            Param::from_mapped_value(self.next(), value, mapper)
        }
    }
    model.map(&mut Number(0))
}

/// kiln's loop for a task: build it, set what differs from the defaults, call [`Trainer::fit`].
///
/// Runs are reproducible: `fit` seeds the backend from `train.seed` and creates the model's
/// parameters from it, batch order is a function of the data's seed and the epoch, dropout of
/// (seed, step, rank). The backend's RNG is one per process, so two fits running at once in one
/// process draw from it in turn and are no longer reproducible; run them one after another.
///
/// ```ignore
/// let summary = Trainer::new(task, model, device)
///     .run_dir("runs/language-id")
///     .settings(TrainSection { epochs: 3, lr: 1e-3, ..Default::default() })
///     .sync_interval(10)
///     .fit(&data, &mut sink)?;
/// ```
pub struct Trainer<B: AutodiffBackend, T: Task<B>> {
    task: Arc<T>,
    model: T::Model,
    device: B::Device,
    replica_devices: Vec<B::Device>,
    train: TrainSection,
    name: String,
    run_dir: PathBuf,
    device_name: String,
    workers: usize,
    prefetch: usize,
    cpu_split: usize,
    resume_from: Option<PathBuf>,
    control: Control,
    step_times: Option<StepTimes>,
    data_figures: DataFigures,
    faults: Faults,
    guarded: Vec<String>,
    commit: String,
    nodes: Option<NodeGroup>,
    device_memory: Option<DeviceMemory>,
}

/// Reads the device's memory: (bytes in use by tensors, bytes reserved by its pools); `None`
/// where it cannot tell. Called once per sync window, after its read.
pub type DeviceMemory = Arc<dyn Fn() -> Option<(u64, u64)> + Send + Sync>;

impl<B: AutodiffBackend, T: Task<B>> Trainer<B, T> {
    /// A trainer of `model` for `task` on `device`, with the recipe's defaults for everything.
    pub fn new(task: T, model: T::Model, device: B::Device) -> Self {
        let loader = kiln_recipe::LoaderSection::default();
        Self {
            task: Arc::new(task),
            model,
            device_name: if is_host_backend::<B>() { "cpu".into() } else { format!("{device:?}") },
            device,
            replica_devices: Vec::new(),
            train: TrainSection::default(),
            name: "run".into(),
            run_dir: PathBuf::from("runs/run"),
            workers: loader.workers,
            prefetch: loader.prefetch,
            cpu_split: kiln_recipe::BackendSection::default().cpu_split,
            resume_from: None,
            control: Control::new(),
            step_times: None,
            data_figures: DataFigures { cache_hit: false, prepare_s: 0.0, padding_pct: 0.0 },
            faults: Faults::from_env(),
            guarded: Vec::new(),
            commit: String::new(),
            nodes: None,
            device_memory: None,
        }
    }

    /// Every `[train]` setting at once (optimizer, schedule, windows, checkpoints, recovery).
    pub fn settings(mut self, train: TrainSection) -> Self {
        self.train = train;
        self
    }

    /// Steps between device→host reads of the loss (`train.sync_interval`).
    pub fn sync_interval(mut self, steps: usize) -> Self {
        self.train.sync_interval = steps.max(1);
        self
    }

    pub fn epochs(mut self, epochs: usize) -> Self {
        self.train.epochs = epochs;
        self
    }

    /// The run's name (the recipe's `name`) in its header.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Where checkpoints, `nonfinite.json` and (through the caller's sinks) the logs go.
    pub fn run_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.run_dir = dir.into();
        self
    }

    /// The run directory this trainer writes into.
    pub fn run_dir_path(&self) -> &Path {
        &self.run_dir
    }

    /// How the device is named in the header and in errors.
    pub fn device_name(mut self, name: impl Into<String>) -> Self {
        self.device_name = name.into();
        self
    }

    /// Loader threads and the ready batches they keep ahead of the loop.
    pub fn loader(mut self, workers: usize, prefetch: usize) -> Self {
        self.workers = workers.max(1);
        self.prefetch = prefetch;
        self
    }

    /// On the CPU, the parts each batch is cut into by rows (`backend.cpu_split`, 0 = one per thread).
    pub fn cpu_split(mut self, parts: usize) -> Self {
        self.cpu_split = parts;
        self
    }

    /// A file of the run directory (by name, e.g. `tokenizer.json`) that the run depends on and
    /// never rewrites: each checkpoint records its BLAKE3, and resuming (or loading the
    /// checkpoint anywhere) refuses a file that changed since.
    pub fn guard_run_file(mut self, name: impl Into<String>) -> Self {
        self.guarded.push(name.into());
        self
    }

    /// The commit of the code that trains (for the run's header and `kiln runs`).
    pub fn commit(mut self, commit: impl Into<String>) -> Self {
        self.commit = commit.into();
        self
    }

    /// Continue from this checkpoint directory (`checkpoints/step-…` of the run).
    pub fn resume(mut self, checkpoint: Option<PathBuf>) -> Self {
        self.resume_from = checkpoint;
        self
    }

    /// Pause and stop requests (the dashboard's keys, signal handlers), polled between steps.
    pub fn control(mut self, control: Control) -> Self {
        self.control = control;
        self
    }

    /// Data parallel: the devices of ranks 1.. (rank 0 is the trainer's own device).
    pub fn replicas(mut self, devices: Vec<B::Device>) -> Self {
        self.replica_devices = devices;
        self
    }

    /// Multi-node data parallel: this process is one node of `group` (its local devices are this
    /// trainer's device and [`Self::replicas`]). Every node must train the same task on the same
    /// data; only rank 0 writes checkpoints.
    pub fn nodes(mut self, group: NodeGroup) -> Self {
        self.nodes = Some(group);
        self
    }

    /// How to read the device's memory (CubeCL's pools), for each window's row and the dashboard.
    pub fn device_memory(mut self, read: DeviceMemory) -> Self {
        self.device_memory = Some(read);
        self
    }

    /// A measurement run: each step's milliseconds go here; nothing is validated, tested or saved.
    pub fn measure_steps(mut self, times: StepTimes) -> Self {
        self.step_times = Some(times);
        self
    }

    /// How the data was prepared, for `summary.json`.
    pub fn data_figures(mut self, figures: DataFigures) -> Self {
        self.data_figures = figures;
        self
    }

    /// Tests: make these steps non-finite or overflowing (see [`Faults`]).
    pub fn inject_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Trains on `data`, validating with the task at each epoch end, until `train.epochs` or
    /// `train.max_steps`, a stop request or an error. Events go to `sink`. On the CPU the loop
    /// runs on a rayon worker, so each parallel kernel starts on a worker that takes part in it
    /// instead of this thread handing it over and sleeping: two thread switches fewer per
    /// operation, 8-20 % of the quickstart step (docs/bench/train.md, step 12). With one thread
    /// it stays here: nothing would be left to serve other threads' rayon work.
    pub fn fit<D>(self, data: &D, sink: &mut (dyn EventSink + Send)) -> Result<Summary>
    where
        D: TrainData<B, Batch = T::Batch>,
        Self: Send,
    {
        if is_host_backend::<B>() && rayon::current_num_threads() >= 2 {
            rayon::scope(|_| self.fit_here(data, sink))
        } else {
            self.fit_here(data, sink)
        }
    }

    fn fit_here<D: TrainData<B, Batch = T::Batch>>(self, data: &D, sink: &mut (dyn EventSink + Send)) -> Result<Summary> {
        // Mixed precision: the loop runs on this thread, so its matrix products (training and
        // validation) follow this setting; weights and optimizer state stay f32.
        let _autocast = kiln_model::autocast::enter(compute_dtype(self.train.precision));
        Fit::start(self, data, sink)?.train()
    }
}

/// The model, its optimizer and (`train.ema_decay`) the average of its weights. Between steps
/// they are owned here alone, and a step moves the model and optimizer into the update: a
/// parameter or moment tensor nobody else holds is updated in place where the backend can (Flex
/// reuses a buffer it owns alone); copies are taken only where a recovery needs them
/// (`on_nan = "skip"` / `"rollback"`). Every update goes through [`Learner::step`], which moves
/// the average along with it, so a replayed or recovered step keeps it exact too.
pub(crate) struct Learner<B: AutodiffBackend, M: AutodiffModule<B>> {
    parts: Option<(M, AdamWOptimizer<M, B>)>,
    ema: Option<Ema<B, M>>,
}

/// The model, optimizer and weight average at a point of the run (shared tensors, not copies).
pub(crate) struct Held<B: AutodiffBackend, M: AutodiffModule<B>> {
    pub model: M,
    pub optim: AdamWOptimizer<M, B>,
    pub ema: Option<Ema<B, M>>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B> + Clone> Clone for Held<B, M> {
    fn clone(&self) -> Self {
        Self { model: self.model.clone(), optim: self.optim.clone(), ema: self.ema.clone() }
    }
}

impl<B: AutodiffBackend, M: AutodiffModule<B> + Clone> Learner<B, M> {
    fn new(model: M, optim: AdamWOptimizer<M, B>, ema: Option<Ema<B, M>>) -> Self {
        Self { parts: Some((model, optim)), ema }
    }

    fn parts(&self) -> &(M, AdamWOptimizer<M, B>) {
        self.parts.as_ref().expect("the model is in place between steps")
    }

    pub fn model(&self) -> &M {
        &self.parts().0
    }

    pub fn optim(&self) -> &AdamWOptimizer<M, B> {
        &self.parts().1
    }

    /// The weight average, when the run keeps one.
    pub fn ema(&self) -> Option<&Ema<B, M>> {
        self.ema.as_ref()
    }

    /// The weights evaluation uses: the average when there is one, else the model's.
    pub fn eval_model(&self) -> M::InnerModule {
        match &self.ema {
            Some(ema) => ema.module.clone(),
            None => self.model().valid(),
        }
    }

    /// A copy that shares the tensors (taken for recovery).
    pub fn snapshot(&self) -> Held<B, M> {
        let (model, optim) = self.parts().clone();
        Held { model, optim, ema: self.ema.clone() }
    }

    /// Continues from a recovery's copy.
    pub fn restore(&mut self, held: Held<B, M>) {
        self.parts = Some((held.model, held.optim));
        self.ema = held.ema;
    }

    /// An update that takes the model and optimizer by value and gives them back; the weight
    /// average then takes in the new weights.
    /// `step` is the optimizer step this update makes (1-based), for the average's warm-up.
    pub fn step<R>(&mut self, step: usize, update: impl FnOnce(M, AdamWOptimizer<M, B>) -> (M, AdamWOptimizer<M, B>, R)) -> R {
        let (model, optim) = self.parts.take().expect("the model is in place between steps");
        let (model, optim, out) = update(model, optim);
        if let Some(ema) = &mut self.ema {
            ema.update(&model, step);
        }
        self.parts = Some((model, optim));
        out
    }
}

/// A window the loop has closed, its read in flight (`train.sync_overlap`): resolved when the next
/// window closes, or before anything that needs every step's loss (a save, evaluation, the end).
pub(crate) struct PendingWindow<B: AutodiffBackend, T: Task<B>> {
    /// The window's host-side counters (its device sums moved into the read).
    pub window: SyncWindow<B::InnerBackend>,
    pub read: ClosedWindow,
    /// `on_nan = "skip"`: where the window started.
    pub start: Option<WindowStart<B, T>>,
    pub epoch: usize,
    /// The learning rate after its last step.
    pub lr: f64,
}

/// Wall time of the run (summed over resumes) and time spent inside training windows.
pub(crate) struct Clock {
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
    fn new(wall_before: f64) -> Self {
        Self { started: Instant::now(), wall_before, train_tokens: 0, train_s: 0.0, real: 0, slots: 0, process: ProcessSample::now(), process_at: Instant::now() }
    }

    pub fn wall(&self) -> f64 {
        self.wall_before + self.started.elapsed().as_secs_f64()
    }
}

/// How an epoch's pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Every batch of the epoch ran.
    Done,
    /// `train.max_steps` was reached, or a stop was requested.
    Cut,
    /// Training went back to a checkpoint (`on_nan = "rollback"`): the epoch starts again there.
    RolledBack,
}

/// The model, optimizer and state at a point of the run (shared tensors, not copies).
pub(crate) type Snapshot<B, T> = (Held<B, <T as Task<B>>::Model>, TrainState);

/// One run of the loop: the model, the optimizer and everything that changes as it trains.
pub(crate) struct Fit<'a, B: AutodiffBackend, T: Task<B>, D: TrainData<B, Batch = T::Batch>> {
    pub task: Arc<T>,
    pub data: &'a D,
    pub sink: &'a mut (dyn EventSink + Send),
    pub tr: TrainSection,
    pub device: B::Device,
    pub run_dir: PathBuf,
    pub control: Control,
    pub step_times: Option<StepTimes>,
    pub data_figures: DataFigures,
    pub faults: Faults,
    /// Run files each checkpoint records the hash of ([`Trainer::guard_run_file`]).
    pub guarded: Vec<String>,
    pub metric_defs: Vec<MetricDef>,
    pub workers: usize,
    pub prefetch: usize,

    pub learner: Learner<B, T::Model>,
    pub state: TrainState,
    pub schedule: LrSchedule,
    pub clock: Clock,
    pub host: HostStep,
    /// f16: dynamic loss scaling, on the device (a resumed run starts again at 2¹⁶).
    pub scaler: Option<LossScale<B::InnerBackend>>,
    pub pool: Option<ReplicaPool<B, T>>,
    pub loader: Loader<T::Batch>,
    /// Window reads: on the reader thread, one window late (`train.sync_overlap`), or at once.
    pub reader: Option<WindowReader<B::InnerBackend>>,
    pub window: SyncWindow<B::InnerBackend>,
    /// The closed window whose read is in flight.
    pub pending: Option<PendingWindow<B, T>>,
    /// `skip`: where the open window started, to replay it without its non-finite steps.
    pub window_start: Option<WindowStart<B, T>>,
    /// `rollback`: the model, optimizer and state of the last checkpoint (or of the start). Held
    /// in memory (the tensors are shared, not copied), so going back reads nothing from disk.
    pub last_good: Option<Snapshot<B, T>>,
    pub last_lr: f64,
    pub stopped: bool,
    /// Multi-node: the stop request every node agreed on at the last window's close (a stop on
    /// one node alone would leave the others waiting in the next all-reduce).
    pub agreed_stop: bool,
    /// Reads the device's memory for each window's row ([`Trainer::device_memory`]).
    pub device_memory: Option<DeviceMemory>,
}

/// The state to resume from: `asked`'s when it is whole (read by [`checkpoint::read_state`]:
/// integrity and fields) and its position fits this run (`fits`); else the newest other
/// checkpoint of the run that passes every check, with a note saying what was passed over.
fn resume_checkpoint(asked: &Path, run_dir: &Path, fits: impl Fn(&TrainState) -> Result<(), String>, notes: &mut Vec<String>) -> Result<(PathBuf, TrainState)> {
    let whole = |dir: &Path| checkpoint::verify(dir).and_then(|state| fits(&state).map(|_| state));
    let first_why = match whole(asked) {
        Ok(state) => return Ok((asked.to_path_buf(), state)),
        Err(why) => why,
    };
    let others = checkpoint::list(run_dir).into_iter().map(|(_, dir)| dir).filter(|dir| dir != asked);
    let mut passed = vec![first_why];
    for dir in others {
        match whole(&dir) {
            Ok(state) => {
                notes.extend(passed.into_iter().map(|why| format!("{why}; passing over this checkpoint")));
                notes.push(format!("resuming from {} instead", dir.display()));
                return Ok((dir, state));
            }
            Err(why) => passed.push(why),
        }
    }
    Err(anyhow!("{}: no intact checkpoint to resume from ({})", checkpoint::checkpoints_dir(run_dir).display(), passed.join("; ")))
}

/// The weight average of a run with `train.ema_decay`: continued from the checkpoint's `ema.mpk`
/// when it has one, else started at the weights as they are (a fresh run; or a resume of a run
/// that kept none, which a note says).
fn start_ema<B: AutodiffBackend, M: AutodiffModule<B>>(tr: &TrainSection, model: &M, resumed: Option<(&Path, &TrainState)>, device: &B::Device, notes: &mut Vec<String>) -> Result<Option<Ema<B, M>>> {
    if tr.ema_decay <= 0.0 {
        if resumed.is_some_and(|(_, state)| state.ema) {
            notes.push("train.ema_decay = 0: the checkpoint's weight average is not continued; the raw weights train on".into());
        }
        return Ok(None);
    }
    Ok(Some(match resumed {
        Some((dir, state)) if state.ema => Ema::resume(tr.ema_decay, checkpoint::load_weights(model.valid(), &checkpoint::WeightsFile::Ema.path_in(dir), device)?),
        Some((dir, state)) => {
            notes.push(format!("{}: no weight average saved; train.ema_decay = {} starts one at step {}", dir.display(), tr.ema_decay, state.step));
            Ema::start(tr.ema_decay, model)
        }
        None => Ema::start(tr.ema_decay, model),
    }))
}

/// Checks a saved data position against this run's data: the batch inside its epoch, and the
/// step count those batches make (`per_step` batches per step; every step, skipped or not,
/// consumed its batches). A position that does not fit would skip or repeat data silently.
fn check_position<B: Backend, D: TrainData<B>>(state: &TrainState, data: &D, per_step: usize, epoch_steps: &[usize]) -> Result<(), String> {
    let known: usize = epoch_steps.iter().sum();
    if state.epoch >= epoch_steps.len() {
        // A run past this recipe's last epoch (resumed with fewer `train.epochs`): nothing is left
        // to train, so only what can be counted is checked.
        if state.batch_in_epoch != 0 || (state.epoch == epoch_steps.len() && state.step != known) || state.step < known {
            return Err(format!("state.json: `step` {} at epoch {}, batch {} does not fit the {} epochs ({known} steps) of this run", state.step, state.epoch + 1, state.batch_in_epoch, epoch_steps.len()));
        }
        return Ok(());
    }
    let batches = data.batches(state.epoch);
    if state.batch_in_epoch > batches {
        return Err(format!("state.json: `batch_in_epoch` is {}, but epoch {} has {batches} batches", state.batch_in_epoch, state.epoch + 1));
    }
    let expected = epoch_steps[..state.epoch].iter().sum::<usize>() + state.batch_in_epoch.div_ceil(per_step);
    if expected != state.step {
        return Err(format!("state.json: `step` is {}, but {} epochs and {} batches of this run make {expected} steps", state.step, state.epoch, state.batch_in_epoch));
    }
    Ok(())
}

impl<'a, B: AutodiffBackend, T: Task<B>, D: TrainData<B, Batch = T::Batch>> Fit<'a, B, T, D> {
    /// Creates the parameters, the optimizer and the state (fresh or from the checkpoint to
    /// resume), counts the run's steps and announces the run.
    fn start(trainer: Trainer<B, T>, data: &'a D, sink: &'a mut (dyn EventSink + Send)) -> Result<Self> {
        let Trainer { task, model, device, replica_devices, train: tr, name, run_dir, device_name, workers, prefetch, cpu_split, resume_from, control, step_times, data_figures, faults, guarded, commit, nodes, device_memory } = trainer;
        // Initialisation is the first use of the seed, so a model starts the same whatever
        // happened before.
        B::seed(&device, tr.seed);
        create_params(&model);
        // A resumed run takes the ids saved with its checkpoint (the optimizer's state is keyed by them).
        let mut model = number_params(model);
        let mut optim = adamw::<B, T::Model>(&tr);

        // Steps per epoch, counted up front (the schedule needs the exact total); each epoch's
        // batches are made again when the epoch starts (a pure function of the epoch).
        let replicas = (replica_devices.len() + 1) * nodes.as_ref().map_or(1, |g| g.nodes);
        let per_step = tr.accumulate.max(1).saturating_mul(replicas);
        let epoch_steps: Vec<usize> = (0..tr.epochs).map(|e| data.batches(e).div_ceil(per_step)).collect();
        let mut total_steps: usize = epoch_steps.iter().sum();
        if tr.max_steps > 0 {
            total_steps = total_steps.min(tr.max_steps);
        }

        let architecture = task.architecture();
        let mut state = TrainState { format: STATE_FORMAT, architecture: architecture.clone(), ..Default::default() };
        let mut resume_notes = Vec::new();
        let mut resumed_dir = None;
        if let Some(asked) = &resume_from {
            let (dir, saved) = resume_checkpoint(asked, &run_dir, |state| check_position(state, data, per_step, &epoch_steps), &mut resume_notes)?;
            state = saved;
            if let Some(expected) = &architecture {
                checkpoint::check_architecture(&dir, &state, expected).map_err(|m| anyhow!(m))?;
            }
            checkpoint::check_run_files(&dir, &state).map_err(|m| anyhow!(m))?;
            state.architecture = architecture;
            state.integrity = None;
            model = checkpoint::load_weights(model, &checkpoint::WeightsFile::Model.path_in(&dir), &device)?;
            resumed_dir = Some(dir.clone());
            let optim_path = dir.join("optimizer");
            let record = FileRecorder::new()
                .load(optim_path.clone(), &device)
                .map_err(|e| anyhow!("{}.mpk: cannot load optimizer state: {}", optim_path.display(), one_line(&e.to_string())))?;
            optim = optim.load_record(record);
        }

        let agreement = nodes.as_ref().map(|g| {
            // What the nodes must share: the caller's part (recipe, tokenizer), the build, the
            // settings, the model's size, the data's shape and the point the run starts from.
            let mut h = blake3::Hasher::new();
            h.update(&g.agreement);
            let facts = format!("{commit}|{tr:?}|{}|{epoch_steps:?}|{total_steps}|{}|{}|{}|{:?}", model.num_params(), state.step, state.epoch, state.batch_in_epoch, state.architecture);
            h.update(facts.as_bytes());
            *h.finalize().as_bytes()
        });
        let ema = start_ema(&tr, &model, resumed_dir.as_deref().map(|dir| (dir, &state)), &device, &mut resume_notes)?;
        let schedule = LrSchedule::new(&tr, total_steps);
        let info = task.info();
        sink.emit(&Event::RunStarted(RunInfo {
            recipe: name,
            run_dir: run_dir.display().to_string(),
            device: device_name,
            epochs: tr.epochs,
            steps_per_epoch: epoch_steps.first().copied().unwrap_or(0),
            total_steps,
            start_step: state.step,
            start_epoch: state.epoch,
            parameters: model.num_params(),
            vocab_size: info.vocab_size,
            train_examples: if info.train_examples > 0 { info.train_examples } else { data.examples() },
            valid_examples: info.valid_examples,
            sync_interval: tr.sync_interval,
            // The loader's capacity: a queue of ⌈prefetch / workers⌉ per worker.
            prefetch: prefetch.max(workers).div_ceil(workers) * workers,
            commit,
        }))
        .map_err(|m| anyhow!(m))?;
        let fell_back = !resume_notes.is_empty();
        for note in resume_notes {
            sink.emit(&Event::Note(note)).map_err(|m| anyhow!(m))?;
        }
        if fell_back {
            // The log was cut at the checkpoint first asked for; rows past this one go too.
            sink.emit(&Event::Rollback { step: state.step }).map_err(|m| anyhow!(m))?;
        }
        if resume_from.is_some() {
            sink.emit(&Event::Note(format!("resumed at step {}, epoch {}, batch {}", state.step, state.epoch + 1, state.batch_in_epoch))).map_err(|m| anyhow!(m))?;
        }

        let host = HostStep::for_backend::<B>(cpu_split);
        let scaler = (tr.precision == Precision::F16).then(|| LossScale::<B::InnerBackend>::standard(&device));
        // Data parallel: ranks 1.. start from the model and optimizer as they are now (resumed or
        // fresh), so every replica starts identical.
        let pool = match (replica_devices.is_empty(), nodes) {
            (true, None) => None,
            (_, nodes) => {
                let settings = ReplicaSettings { train: tr.clone(), host, compute: kiln_model::autocast::compute(), faults: faults.clone() };
                let mut pool = ReplicaPool::start(&task, &model, &optim, settings, &device, &replica_devices, nodes)?;
                if let Some(digest) = &agreement {
                    pool.roll_call(digest)?;
                }
                Some(pool)
            }
        };
        let last_good = (tr.on_nan == OnNan::Rollback).then(|| (Held { model: model.clone(), optim: optim.clone(), ema: ema.clone() }, state.clone()));
        Ok(Self {
            metric_defs: task.metrics(),
            task,
            data,
            sink,
            last_lr: schedule.at(state.step.max(1)) * state.lr_scale,
            clock: Clock::new(state.wall_s),
            reader: tr.sync_overlap.then(WindowReader::new),
            loader: Loader::new(workers, prefetch),
            tr,
            device,
            run_dir,
            control,
            step_times,
            data_figures,
            faults,
            guarded,
            workers,
            prefetch,
            learner: Learner::new(model, optim, ema),
            state,
            schedule,
            host,
            scaler,
            pool,
            window: SyncWindow::new(),
            pending: None,
            window_start: None,
            last_good,
            stopped: false,
            agreed_stop: false,
            device_memory,
        })
    }

    fn measuring(&self) -> bool {
        self.step_times.is_some()
    }

    /// Replicas of the run, every node's.
    fn replicas(&self) -> usize {
        self.pool.as_ref().map_or(1, ReplicaPool::global_len)
    }

    /// The multi-node group, when this process is one node of several.
    fn group(&self) -> Option<&NodeGroup> {
        self.pool.as_ref().and_then(ReplicaPool::group)
    }

    /// Rank 0 (or the only process) writes checkpoints; the other nodes write nothing.
    fn writes_run_files(&self) -> bool {
        self.group().is_none_or(NodeGroup::writes_run_files)
    }

    /// A stop asked for (the dashboard, a signal): across nodes, the one they agreed on.
    fn stop_requested(&self) -> bool {
        if self.group().is_some() {
            self.agreed_stop
        } else {
            self.control.stop_requested()
        }
    }

    fn at_step_limit(&self) -> bool {
        self.tr.max_steps > 0 && self.state.step >= self.tr.max_steps
    }

    /// `train.patience` validations in a row brought no new best: the run is over.
    fn out_of_patience(&self) -> bool {
        self.tr.patience > 0 && self.state.stale_validations >= self.tr.patience
    }

    pub fn emit(&mut self, event: Event) -> Result<()> {
        self.sink.emit(&event).map_err(|m| anyhow!(m))
    }

    /// The whole run: epochs until the end, then the test split and the summary.
    fn train(mut self) -> Result<Summary> {
        // A finished run resumed with more epochs or steps continues; `finished` is informational.
        let mut stop = self.at_step_limit() || self.out_of_patience();
        while !stop && self.state.epoch < self.tr.epochs {
            let epoch = self.state.epoch;
            let pass = self.train_epoch(epoch)?;
            if pass == Pass::RolledBack {
                self.stopped = false;
                continue;
            }
            stop = pass == Pass::Cut;
            let epoch_done = pass == Pass::Done;
            self.end_epoch(epoch, epoch_done, stop)?;
            stop = stop || self.out_of_patience();
        }
        self.finish()
    }

    /// One pass over the rest of epoch `epoch`, step by step, closing windows as they fill.
    fn train_epoch(&mut self, epoch: usize) -> Result<Pass> {
        let jobs = self.data.epoch(epoch, &self.device);
        let batches = jobs.len();
        let mut pos = self.state.batch_in_epoch.min(batches);
        self.loader.start(jobs.into_iter().skip(pos).collect());
        while pos < batches {
            if self.at_step_limit() {
                return self.close_before(epoch, Pass::Cut);
            }
            self.wait_while_paused()?;
            if self.stop_requested() {
                self.stopped = true;
                return self.close_before(epoch, Pass::Cut);
            }
            if self.window.steps == 0 {
                self.window.open(self.state.step);
                if self.tr.on_nan == OnNan::Skip {
                    self.window_start = Some(WindowStart::at(&self.learner, self.state.step));
                }
            }
            let group = self.tr.accumulate.max(1).saturating_mul(self.replicas()).min(batches - pos);
            let step_batches: Vec<T::Batch> = (0..group).map(|_| self.loader.next_batch().expect("the pass holds the rest of the epoch")).collect();
            self.train_step(step_batches)?;
            pos += group;
            self.state.batch_in_epoch = pos;

            let last_of_epoch = pos >= batches;
            let save_now = self.tr.save_every_steps > 0 && self.state.step.is_multiple_of(self.tr.save_every_steps) && !last_of_epoch;
            // A save needs every step so far in its running loss sums; the epoch's end and the
            // step limit close the window too, and wait for its read.
            let wait = save_now || last_of_epoch || self.at_step_limit() || self.stop_requested();
            if (self.window.steps >= self.tr.sync_interval || wait) && self.close_window(epoch, wait)? {
                return Ok(Pass::RolledBack);
            }
            if save_now && !self.measuring() {
                self.save()?;
            }
        }
        self.close_before(epoch, Pass::Done)
    }

    /// A pass ends: a window left open, or a read in flight, is closed and read first.
    fn close_before(&mut self, epoch: usize, pass: Pass) -> Result<Pass> {
        if (self.window.steps > 0 || self.pending.is_some()) && self.close_window(epoch, true)? {
            return Ok(Pass::RolledBack);
        }
        Ok(pass)
    }

    fn wait_while_paused(&mut self) -> Result<()> {
        if !self.control.paused() || self.control.stop_requested() {
            return Ok(());
        }
        if self.group().is_some() {
            // One node paused would hold the others in the next all-reduce until they time out.
            self.control.toggle_pause();
            return self.emit(Event::Note("pausing is not available in a multi-node run (stop and --resume instead)".into()));
        }
        self.emit(Event::Note(format!("paused at step {}", self.state.step)))?;
        let t0 = Instant::now();
        while self.control.paused() && !self.control.stop_requested() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // The pause is not training time.
        self.window.started += t0.elapsed();
        self.emit(Event::Note("resumed".into()))
    }

    /// Where rank 0's steps run.
    pub(crate) fn place(&self, replica: Replica) -> StepPlace<'_, B> {
        StepPlace { device: &self.device, host: self.host, replica, loss_scale: self.scaler.as_ref().map(|s| &s.scale), faults: &self.faults, watchdog: self.pool.as_ref().and_then(ReplicaPool::watchdog) }
    }

    /// One optimizer step over a step's batches (all replicas', of every node), its sums into the
    /// window.
    fn train_step(&mut self, batches: Vec<T::Batch>) -> Result<()> {
        let step_started = Instant::now();
        let stats: Vec<_> = batches.iter().map(TaskBatch::stats).collect();
        let step_tokens: usize = stats.iter().map(|s| s.target_tokens).sum();
        let lr = self.schedule.at(self.state.step + 1) * self.state.lr_scale;
        let sums = match &self.pool {
            None => step_gradients(&*self.task, self.learner.model(), &batches, &self.tr, self.state.step, step_tokens, false, self.place(SINGLE)).expect("one device makes no collective call"),
            Some(pool) => {
                // Global replica g takes the step's batches g·accumulate .. (g+1)·accumulate.
                let per = self.tr.accumulate.max(1);
                let replicas = pool.global_len();
                self.window.device_tokens.resize(replicas, 0);
                for g in 0..replicas {
                    self.window.device_tokens[g] += stats.iter().skip(g * per).take(per).map(|s| s.target_tokens as u64).sum::<u64>();
                }
                let (mine, idle) = pool.send(&batches, per, self.state.step, lr, step_tokens);
                let rank0 = Replica { rank: pool.first(), peer: Some(burn::collective::PeerId::from(pool.first())) };
                let step = self.state.step + 1;
                step_gradients(&*self.task, self.learner.model(), &mine, &self.tr, self.state.step, step_tokens, idle, self.place(rank0)).map_err(|e| pool.collective_error(&e, &format!("the all-reduce of step {step}")))?
            }
        };
        self.state.step += 1;
        self.last_lr = lr;
        if let Some(ms) = sums.reduce_ms {
            self.window.reduce.record(ms);
        }
        self.apply(sums);
        if let Some(times) = &self.step_times {
            // Host time: the step's whole cost on an eager backend (Flex); queueing time on CUDA.
            times.lock().expect("step times").push(step_started.elapsed().as_secs_f64() * 1e3);
        }
        self.window.count(&stats);
        if let Some(start) = &mut self.window_start {
            start.batches.push(batches);
        }
        Ok(())
    }

    /// The update of a step whose sums are in hand, at `self.last_lr`; its sums join the window.
    pub fn apply(&mut self, sums: crate::step::StepSums<B>) {
        let (lr, scaler) = (self.last_lr, self.scaler.as_mut());
        let norm = self.learner.step(self.state.step, |model, optim| apply_step(model, optim, sums.grads, sums.norm, lr, scaler));
        self.window.add(sums.loss_sum, norm, sums.metric_sums);
    }

    /// Closes the open window: resolves the previous window's read first (windows are logged in
    /// order), then starts this one's (the one sync). With `wait` (a save, evaluation or the end
    /// comes next) or without `train.sync_overlap` the read is waited for here; otherwise it stays
    /// in flight while the next window's steps are queued. `true`: training rolled back.
    fn close_window(&mut self, epoch: usize, wait: bool) -> Result<bool> {
        if let Some(previous) = self.pending.take() {
            if self.resolve(previous)? {
                return Ok(true);
            }
        }
        if self.window.steps == 0 {
            return Ok(false);
        }
        self.agree_on_stop()?;
        let overlap = if wait { None } else { self.reader.as_ref() };
        let read = self.window.close(overlap, self.scaler.as_ref().map(|s| s.scale.clone()));
        let in_flight = overlap.is_some();
        let mut done = std::mem::replace(&mut self.window, SyncWindow::new());
        if in_flight {
            done.closed = Some(Instant::now());
        }
        let closed = PendingWindow { window: done, read, start: self.window_start.take(), epoch, lr: self.last_lr };
        if in_flight {
            self.pending = Some(closed);
            Ok(false)
        } else {
            self.resolve(closed)
        }
    }

    /// Multi-node: whether any node was asked to stop, made known to every node at a window's
    /// close (one read per window, of one value); the steps from here see the same answer.
    fn agree_on_stop(&mut self) -> Result<()> {
        let Some(pool) = self.pool.as_ref().filter(|p| p.group().is_some()) else {
            return Ok(());
        };
        let asked = if self.control.stop_requested() { 1.0 } else { 0.0 };
        let sums = pool.all_reduce_host(vec![asked], "the stop check at a window's close")?;
        self.agreed_stop = self.agreed_stop || sums[0] > 0.0;
        Ok(())
    }

    /// Waits for a closed window's read and logs it; a non-finite step is handled as
    /// `train.on_nan` says. `true`: training went back to a checkpoint.
    fn resolve(&mut self, closed: PendingWindow<B, T>) -> Result<bool> {
        let PendingWindow { window: mut done, read, start, epoch, lr } = closed;
        let read = read.wait();
        done.closed.get_or_insert_with(Instant::now);
        if let Some(why) = &read.failed {
            let (first, last) = (done.first_step + 1, done.first_step + done.steps);
            return Err(anyhow!("the device failed while training steps {first}–{last}: reading their loss back gave {why}"));
        }
        if read.first_nonfinite().is_none() {
            let scaling = (read.overflows(), read.loss_scale);
            self.record_window(done, read.loss_sum, &read.metric_sums, read.ms, epoch, lr, scaling, read.grad_norms())?;
            return Ok(false);
        }
        match self.tr.on_nan {
            OnNan::Stop => Err(self.nonfinite_stop(&read, epoch, "train.on_nan = \"stop\"")),
            OnNan::Skip => {
                let start = start.expect("skip keeps the window's start");
                self.replay_without_nonfinite(done, start, &read, epoch)?;
                Ok(false)
            }
            OnNan::Rollback => {
                self.roll_back(&read, epoch)?;
                Ok(true)
            }
        }
    }

    /// Logs a read window: its loss sum joins the epoch's, its figures go to the sinks.
    #[allow(clippy::too_many_arguments)] // a window's read figures, each from its own place
    pub fn record_window(&mut self, window: SyncWindow<B::InnerBackend>, loss_sum: f64, metric_sums: &[f64], ms: f64, epoch: usize, lr: f64, scaling: (u64, Option<f64>), grad_norms: Option<(f64, f64)>) -> Result<()> {
        let node_tokens = match self.group() {
            // Global replicas are numbered node by node.
            Some(g) => window.device_tokens.chunks(window.device_tokens.len().div_ceil(g.nodes).max(1)).map(|c| c.iter().sum()).collect(),
            None => Vec::new(),
        };
        let state = &mut self.state;
        let clock = &mut self.clock;
        state.sync.record(ms);
        state.reduce.merge(&window.reduce);
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
        let device_memory = self.device_memory.as_ref().and_then(|read| read());
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
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
            data_wait_ms: self.loader.take_wait().as_secs_f64() * 1e3,
            sentences: window.sentences,
            window_s: secs,
            prefetch_ready: self.loader.ready(),
            rss_mb: process.rss_mb,
            cpu_pct,
            device_mb: device_memory.map(|(used, _)| mib(used)),
            device_reserved_mb: device_memory.map(|(_, reserved)| mib(reserved)),
            metrics: window.metric_means(&self.metric_defs, metric_sums),
            device_tokens: window.device_tokens,
            node_tokens,
            reduce: (state.reduce.count > 0).then_some(state.reduce),
            overflow_skips: scaling.0,
            loss_scale: scaling.1,
            grad_norm: grad_norms.map(|g| g.0),
            grad_norm_max: grad_norms.map(|g| g.1),
        };
        self.emit(Event::Window(row))
    }

    /// An epoch's pass is over: its figures, validation, the epoch counter and a checkpoint.
    fn end_epoch(&mut self, epoch: usize, epoch_done: bool, stop: bool) -> Result<()> {
        let epoch_loss = self.state.epoch_loss_sum / self.state.epoch_tokens.max(1) as f64;
        self.state.last_epoch_loss = Some(epoch_loss);
        if epoch_done {
            self.emit(Event::EpochEnd { epoch: epoch + 1, step: self.state.step, train_loss: epoch_loss })?;
        }
        // Validate at each epoch end, and once more when `max_steps` ends the run mid-epoch (not
        // on a stop request: the user wants out, and the checkpoint resumes the run).
        if (epoch_done || (stop && !self.stopped)) && !self.measuring() {
            self.validate(epoch)?;
        }
        if epoch_done {
            self.state.epoch += 1;
            self.state.batch_in_epoch = 0;
            // The last epoch's sums stay in `last_epoch_loss`; the next epoch starts afresh.
            self.state.epoch_loss_sum = 0.0;
            self.state.epoch_tokens = 0;
        }
        let early_stop = self.out_of_patience();
        if early_stop {
            let line = format!("early stop: {} validations without a better {} (train.patience)", self.state.stale_validations, self.tr.best_metric.name());
            self.emit(Event::Note(line))?;
        }
        let finished = (stop && !self.stopped) || early_stop || self.state.epoch >= self.tr.epochs;
        let periodic = epoch_done && self.tr.save_every > 0 && self.state.epoch.is_multiple_of(self.tr.save_every);
        let step_save = self.tr.save_every_steps > 0 && self.state.step.is_multiple_of(self.tr.save_every_steps);
        if (finished || periodic || self.stopped || step_save) && !self.measuring() {
            self.state.finished = finished;
            self.save()?;
        }
        Ok(())
    }

    fn validate(&mut self, epoch: usize) -> Result<()> {
        if self.faults.pause_in_eval_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.faults.pause_in_eval_ms));
        }
        let model = self.learner.eval_model();
        let Some(valid) = self.task.evaluate(&model, Split::Valid, &self.device) else {
            return Ok(());
        };
        let step = self.state.step;
        let row_of = |f: EvalFigures, set: Option<String>| ValidRow { epoch: epoch + 1, step, loss: f.loss, ppl: f.ppl, bleu: f.bleu, metrics: f.metrics, set, samples: f.samples };
        let row = row_of(valid, None);
        let named: Vec<ValidRow> = self.task.named_sets().into_iter().filter_map(|name| self.task.evaluate_named(&model, &name, &self.device).map(|f| row_of(f, Some(name)))).collect();
        self.state.last_valid = Some(row.clone());
        self.state.last_dev = named.clone();
        // Early stopping's count, on the set `train.best_set` names: a validation without a
        // figure (a non-finite loss) is no better.
        let metric = self.tr.best_metric;
        let chosen = self.state.chosen_valid(&self.tr.best_set).cloned().unwrap_or_else(|| row.clone());
        match metric.of(chosen.loss, chosen.bleu) {
            Some(v) if self.state.best_value.is_none_or(|best| metric.better(v, best)) => {
                self.state.best_value = Some(v);
                self.state.stale_validations = 0;
            }
            _ => self.state.stale_validations += 1,
        }
        self.emit(Event::Validation(row))?;
        named.into_iter().try_for_each(|r| self.emit(Event::Validation(r)))
    }

    /// Saves `checkpoints/step-N`, records it as the best when the validation just measured
    /// beats the best so far, prunes old checkpoints and tells the sinks.
    fn save(&mut self) -> Result<()> {
        if !self.writes_run_files() {
            // Another node's rank 0 writes this checkpoint; this one keeps the same point to roll
            // back to.
            if let Some(good) = &mut self.last_good {
                *good = (self.learner.snapshot(), self.state.clone());
            }
            return Ok(());
        }
        self.state.wall_s = self.clock.wall();
        let state = &mut self.state;
        let name = format!("step-{:07}", state.step);
        let metric = self.tr.best_metric;
        if let Some(value) = state.chosen_valid(&self.tr.best_set).filter(|v| v.step == state.step).and_then(|v| metric.of(v.loss, v.bleu)) {
            if state.best.as_ref().is_none_or(|(_, best)| metric.better(value, *best)) {
                state.best = Some((name.clone(), value));
            }
        }
        let (model, optim, ema) = (self.learner.model(), self.learner.optim(), self.learner.ema());
        state.ema = ema.is_some();
        let pause_in_save_ms = self.faults.pause_in_save_ms;
        state.run_files = checkpoint::hash_run_files(&self.run_dir, &self.guarded).map_err(|m| anyhow!(m))?;
        let path = checkpoint::save(&self.run_dir, &name, state, |dir| {
            // Serialised in memory, written by us: a failed write (a full disk) then reports the
            // operating system's reason, which Burn's file recorder would hide.
            let bytes = BytesRecorder::new();
            let write = |file: &str, record: Result<Vec<u8>, burn::record::RecorderError>| -> Result<(), String> {
                let path = dir.join(file);
                let bytes = record.map_err(|e| format!("{}: cannot serialise: {e}", path.display()))?;
                std::fs::write(&path, bytes).map_err(|e| format!("{}: cannot write: {e}", path.display()))
            };
            write("model.mpk", Recorder::<B>::record(&bytes, model.clone().into_record(), ()))?;
            if let Some(ema) = ema {
                write("ema.mpk", Recorder::<B::InnerBackend>::record(&bytes, ema.module.clone().into_record(), ()))?;
            }
            if pause_in_save_ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(pause_in_save_ms));
            }
            write("optimizer.mpk", Recorder::<B>::record(&bytes, Optimizer::<T::Model, B>::to_record(optim), ()))
        })
        .map_err(|m| anyhow!(m))?;
        checkpoint::prune(&self.run_dir, self.tr.keep_checkpoints, state.best.as_ref().map(|(n, _)| n.as_str())).map_err(|m| anyhow!(m))?;
        let event = Event::Checkpoint { epoch: state.epoch, step: state.step, path: path.display().to_string() };
        if let Some(good) = &mut self.last_good {
            *good = (self.learner.snapshot(), self.state.clone());
        }
        self.emit(event)
    }

    /// The run is over: the test split (unless stopped or measuring) and the summary.
    fn finish(mut self) -> Result<Summary> {
        if self.stopped {
            let line = match self.group().filter(|g| !g.writes_run_files()) {
                Some(_) => format!("stopped on request at step {}; continue with every node's kiln train --resume <node 0's run directory>", self.state.step),
                None => format!("stopped on request at step {}; continue with: kiln train --resume {}", self.state.step, self.run_dir.display()),
            };
            self.emit(Event::Note(line))?;
        }
        let test = if self.stopped || self.measuring() { None } else { self.task.evaluate(&self.learner.eval_model(), Split::Test, &self.device) };
        if let Some(t) = &test {
            let label = self.task.info().test_label;
            let metrics: String = t.metrics.iter().map(|(k, v)| format!(" | {k} {v:.4}")).collect();
            let line = format!("test | {label} | loss {:.4} | ppl {:.2} | bleu {}{metrics}", t.loss, t.ppl, t.bleu.map(|b| format!("{b:.2}")).unwrap_or_else(|| "-".into()));
            self.emit(Event::Note(line))?;
        }
        let last_valid = self.state.last_valid.clone();
        let clock = &self.clock;
        let summary = Summary {
            steps: self.state.step,
            epochs: self.state.epoch,
            train_loss: self.state.last_epoch_loss.unwrap_or(f64::NAN),
            valid_loss: last_valid.as_ref().map(|v| v.loss),
            bleu: last_valid.as_ref().and_then(|v| v.bleu),
            tokens_per_s: if clock.train_s > 0.0 { clock.train_tokens as f64 / clock.train_s } else { 0.0 },
            wall_s: clock.wall(),
            sync: self.state.sync.into(),
            data: DataFigures { padding_pct: padding_pct(clock.real, clock.slots), ..self.data_figures },
            test,
            stopped: self.stopped,
            skipped_steps: self.state.skipped_steps,
            rollbacks: self.state.rollbacks,
            metrics: last_valid.map(|v| v.metrics).unwrap_or_default(),
            dev: self.state.last_dev.iter().map(|r| (r.set.clone().unwrap_or_default(), EvalFigures { loss: r.loss, ppl: r.ppl, bleu: r.bleu, metrics: r.metrics.clone(), samples: Vec::new() })).collect(),
            early_stopped: self.out_of_patience(),
            best: self.state.best.as_ref().map(|(name, value)| kiln_events::BestCheckpoint {
                checkpoint: name.clone(),
                metric: match self.tr.best_metric {
                    kiln_recipe::BestMetric::ValidLoss => "valid_loss".into(),
                    kiln_recipe::BestMetric::Bleu => "bleu".into(),
                },
                value: *value,
            }),
            ema: self.learner.ema().is_some(),
        };
        self.emit(Event::Finished(summary.clone()))?;
        Ok(summary)
    }
}

fn padding_pct(real: u64, slots: u64) -> f64 {
    if slots == 0 { 0.0 } else { 100.0 * (1.0 - real as f64 / slots as f64) }
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
