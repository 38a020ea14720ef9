//! The task contract: what kiln's loop asks of anything it trains, in the spirit of burn-train's
//! `TrainStep`. A [`Task`] names its model (any Burn `AutodiffModule`) and its batch type, runs
//! forward and loss on a batch, declares its metrics and evaluates a held-out split. The loop owns
//! everything else: steps, accumulation, clipping, the sync windows, checkpoints, recovery,
//! replicas. The built-in families (`crate::family`) come in through this same door.
//!
//! Losses and metric sums stay on the device as tensors; the host supplies the counts it already
//! knows ([`BatchStats`], from the batch as it was built), so a window's mean needs no extra read.

use std::collections::BTreeMap;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
pub use kiln_events::EvalFigures;

use crate::checkpoint::Architecture;

/// Which held-out split to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Valid,
    Test,
}

/// Host-side counts of a batch: the loop's token and padding statistics need no device read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchStats {
    /// Rows (sentences, blocks, examples).
    pub size: usize,
    /// Units the loss is summed over (labelled tokens; examples for a classifier). A step's
    /// gradient is that of the mean over its units, and the logged loss is per unit.
    pub target_tokens: usize,
    /// Real tokens and the slots holding them, both sides: padding % = 1 − real / slots
    /// (equal, or both 0, where a batch has no padding).
    pub real_tokens: usize,
    pub slots: usize,
}

/// A batch as the loader workers leave it: its tensors on the device, its counts on the host.
pub trait TaskBatch<B: Backend>: Clone + Send + 'static {
    fn stats(&self) -> BatchStats;

    /// The batch on another device (a data-parallel replica's).
    fn to_device(self, device: &B::Device) -> Self;

    /// The batch cut by rows into at most `parts` parts, each with the row it starts at, for
    /// running parts side by side on a CPU's threads. Part statistics count their own rows and
    /// units. The default keeps the batch whole (a batch type that cannot be cut).
    fn split_rows(&self, parts: usize) -> Vec<(usize, Self)> {
        let _ = parts;
        vec![(0, self.clone())]
    }
}

/// What one batch's forward pass gives the loop.
pub struct TaskOutput<B: Backend> {
    /// The loss summed over the batch's units (`BatchStats::target_tokens`), shape `[1]`, with
    /// its autodiff graph: the loop divides by the step's units and runs the backward pass.
    pub loss_sum: Tensor<B, 1>,
    /// The task's training metrics summed over the batch, shape `[1]` each, in the order of
    /// [`Task::metrics`]. Detached by the loop; read with the window's loss in one transfer.
    pub metric_sums: Vec<Tensor<B, 1>>,
}

impl<B: Backend> TaskOutput<B> {
    pub fn loss(loss_sum: Tensor<B, 1>) -> Self {
        Self { loss_sum, metric_sums: Vec::new() }
    }

    pub fn with_metric(mut self, sum: Tensor<B, 1>) -> Self {
        self.metric_sums.push(sum);
        self
    }
}

/// What a metric's sum is divided by in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    /// The window's loss units (`BatchStats::target_tokens`).
    Unit,
    /// The window's rows (`BatchStats::size`).
    Row,
}

/// A training metric a task reports: its name in `metrics.jsonl` and what its sum is per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    pub name: &'static str,
    pub per: Per,
}

/// Sizes a task reports for the run's header (0 where it does not know).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskInfo {
    pub vocab_size: usize,
    pub train_examples: usize,
    pub valid_examples: usize,
    /// How the test split is described in the run's closing line (e.g. "500 pairs").
    pub test_label: String,
}

/// The inference-mode model of a task (dropout off, no autodiff).
pub type ValidModel<B, T> = <<T as Task<B>>::Model as AutodiffModule<B>>::InnerModule;

/// What kiln's loop trains. Shared by the loop and its replica threads, hence `Sync`.
pub trait Task<B: AutodiffBackend>: Send + Sync + 'static {
    type Model: AutodiffModule<B> + Clone + Send + 'static;
    type Batch: TaskBatch<B>;

    /// Forward pass and loss of one batch, in training mode.
    fn forward(&self, model: &Self::Model, batch: &Self::Batch) -> TaskOutput<B>;

    /// Names of the sums in [`TaskOutput::metric_sums`].
    fn metrics(&self) -> Vec<MetricDef> {
        Vec::new()
    }

    /// Figures on a held-out split, without dropout; `None` where the task has no such split.
    fn evaluate(&self, model: &ValidModel<B, Self>, split: Split, device: &B::Device) -> Option<EvalFigures>;

    /// Names of further validation sets, each validated after the main one every time.
    fn named_sets(&self) -> Vec<String> {
        Vec::new()
    }

    /// Figures on the named validation set `name`, without dropout.
    fn evaluate_named(&self, _model: &ValidModel<B, Self>, _name: &str, _device: &B::Device) -> Option<EvalFigures> {
        None
    }

    fn info(&self) -> TaskInfo {
        TaskInfo::default()
    }

    /// What a checkpoint must match to be resumed by this task (`None`: not checked).
    fn architecture(&self) -> Option<Architecture> {
        None
    }
}

/// Figures from a mean loss: perplexity derived, no BLEU, the given metrics.
pub fn figures(loss: f64, metrics: BTreeMap<String, f64>) -> EvalFigures {
    EvalFigures { loss, ppl: loss.exp(), bleu: None, metrics, samples: Vec::new() }
}
