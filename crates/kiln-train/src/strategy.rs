//! kiln's sync-every-N as a burn-train training strategy: an existing burn-train 0.21 program
//! (`SupervisedTraining`, a model with `TrainStep` / `InferenceStep`, burn's metrics) gets it by
//! one line, `.with_training_strategy(TrainingStrategy::Custom(Arc::new(SyncEveryN::new(device, 10))))`.
//!
//! burn-train's default epoch hands every step's output item to its event processor, whose
//! worker calls `ItemLazy::sync()` on it: for `ClassificationOutput` a read of the loss, the
//! logits and the targets, every step (1–2 steps late, through a one-slot channel). Here the
//! step outputs of a window of N steps are merged on the device ([`WindowItem::merge`]:
//! concatenated along the batch dimension, no read) and the processor gets one item per window:
//! one read per N steps, plus one at the end of each epoch. Burn's metrics see every step: a
//! merged `ClassificationOutput` holds each step's loss as one entry of its `[N]` loss tensor, so
//! `LossMetric` (a mean weighted by the entries) and `AccuracyMetric` (weighted by rows) aggregate
//! an epoch exactly as they do with one item per step.
//!
//! What this strategy keeps of burn-train: its `Learner` (model, optimizer, scheduler), its
//! gradient accumulation, its `Interrupter`, its per-epoch checkpointer and early stopping, its
//! renderer. kiln's own loop ([`crate::Trainer`]) does not use those last two: they work per
//! epoch, where kiln saves every K steps with the data position (exact mid-epoch resume) and
//! keeps the best by validation; burn-train's `DataLoader` order is drawn by its workers as they
//! run and its queue depth is fixed (see [`crate::data`]); and its TUI has fixed views, without
//! sync statistics. `SequenceOutput` has no merge: its logits of different batches have
//! different lengths.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::{Device, Tensor};
use burn_train::{
    ClassificationOutput, EventProcessorTraining, LearnerEvent, TrainingItem, InferenceStep, Learner, LearningComponentsTypes, RegressionOutput, SupervisedLearningStrategy, SupervisedTrainingEventProcessor, TrainLoader, TrainStep,
    TrainingBackend, TrainingComponents, TrainingModel, ValidLoader,
};
use burn::data::dataloader::Progress;
use burn::optim::GradientsAccumulator;

/// A step's output item that can be merged with the next one on the device, without a read.
pub trait WindowItem: Sized {
    fn merge(self, next: Self) -> Self;
}

impl<B: Backend> WindowItem for ClassificationOutput<B> {
    fn merge(self, next: Self) -> Self {
        Self { loss: Tensor::cat(vec![self.loss, next.loss], 0), output: Tensor::cat(vec![self.output, next.output], 0), targets: Tensor::cat(vec![self.targets, next.targets], 0) }
    }
}

impl<B: Backend> WindowItem for RegressionOutput<B> {
    fn merge(self, next: Self) -> Self {
        Self { loss: Tensor::cat(vec![self.loss, next.loss], 0), output: Tensor::cat(vec![self.output, next.output], 0), targets: Tensor::cat(vec![self.targets, next.targets], 0) }
    }
}

/// Items handed to burn-train's event processor (each one is read back by its worker), counted
/// per split.
#[derive(Debug, Default)]
pub struct Handed {
    pub train: AtomicUsize,
    pub valid: AtomicUsize,
}

/// The strategy: one device, the event processor fed one merged item per `sync_interval` steps.
pub struct SyncEveryN<LC: LearningComponentsTypes> {
    device: Device<TrainingBackend<LC>>,
    sync_interval: usize,
    handed: Arc<Handed>,
}

impl<LC: LearningComponentsTypes> SyncEveryN<LC> {
    pub fn new(device: Device<TrainingBackend<LC>>, sync_interval: usize) -> Self {
        Self { device, sync_interval: sync_interval.max(1), handed: Arc::default() }
    }

    /// The items handed to the processor so far (shared: read it while or after training).
    pub fn handed(&self) -> Arc<Handed> {
        Arc::clone(&self.handed)
    }
}

/// Steps of one window, merged on the device.
struct Window<T> {
    item: Option<T>,
    steps: usize,
}

impl<T: WindowItem> Window<T> {
    fn new() -> Self {
        Self { item: None, steps: 0 }
    }

    fn add(&mut self, item: T) {
        self.item = Some(match self.item.take() {
            Some(w) => w.merge(item),
            None => item,
        });
        self.steps += 1;
    }

    fn take(&mut self) -> Option<T> {
        self.steps = 0;
        self.item.take()
    }
}

impl<LC> SupervisedLearningStrategy<LC> for SyncEveryN<LC>
where
    LC: LearningComponentsTypes,
    <LC::TrainingModel as TrainStep>::Output: WindowItem,
    <LC::InferenceModel as InferenceStep>::Output: WindowItem,
{
    fn fit(
        &self,
        components: TrainingComponents<LC>,
        mut learner: Learner<LC>,
        train: TrainLoader<LC>,
        valid: ValidLoader<LC>,
        starting_epoch: usize,
    ) -> (TrainingModel<LC>, SupervisedTrainingEventProcessor<LC>) {
        let train = train.to_device(&self.device);
        let valid = valid.to_device(&self.device);
        learner.fork(&self.device);
        let mut processor = components.event_processor;
        let mut checkpointer = components.checkpointer;
        let mut early_stopping = components.early_stopping;
        let interrupter = components.interrupter;
        for epoch in starting_epoch..=components.num_epochs {
            let global = Progress { items_processed: epoch, items_total: components.num_epochs };
            self.train_epoch(&mut learner, &train, components.grad_accumulation, &global, &mut processor, &interrupter);
            if interrupter.should_stop() {
                break;
            }
            self.valid_epoch(&learner, &valid, &global, &mut processor, &interrupter);
            if let Some(checkpointer) = &mut checkpointer {
                checkpointer.checkpoint(&learner, epoch, &components.event_store);
            }
            if let Some(early_stopping) = &mut early_stopping {
                if early_stopping.should_stop(epoch, &components.event_store) {
                    break;
                }
            }
        }
        (learner.model(), processor)
    }
}

impl<LC: LearningComponentsTypes> SyncEveryN<LC> {
    fn train_epoch(
        &self,
        learner: &mut Learner<LC>,
        loader: &TrainLoader<LC>,
        accumulation: Option<usize>,
        global: &Progress,
        processor: &mut SupervisedTrainingEventProcessor<LC>,
        interrupter: &burn_train::Interrupter,
    ) where
        <LC::TrainingModel as TrainStep>::Output: WindowItem,
    {
        let mut iterator = loader.iter();
        let (mut iteration, mut accumulated) = (0, 0);
        let mut accumulator = GradientsAccumulator::new();
        let mut window = Window::new();
        let hand = |item: Option<_>, progress: Progress, iteration: usize, lr: f64, processor: &mut SupervisedTrainingEventProcessor<LC>| {
            if let Some(item) = item {
                self.handed.train.fetch_add(1, Ordering::Relaxed);
                processor.process_train(LearnerEvent::ProcessedItem(TrainingItem::new(item, progress, global.clone(), Some(iteration), Some(lr))));
            }
        };
        let mut progress = iterator.progress();
        while let Some(item) = iterator.next() {
            iteration += 1;
            learner.lr_step();
            progress = iterator.progress();
            let out = learner.train_step(item);
            match accumulation {
                Some(every) => {
                    accumulator.accumulate(&learner.model(), out.grads);
                    accumulated += 1;
                    if accumulated >= every {
                        learner.optimizer_step(accumulator.grads());
                        accumulated = 0;
                    }
                }
                None => learner.optimizer_step(out.grads),
            }
            window.add(out.item);
            if window.steps >= self.sync_interval {
                hand(window.take(), progress.clone(), iteration, learner.lr_current(), processor);
            }
            if interrupter.should_stop() {
                break;
            }
        }
        hand(window.take(), progress, iteration, learner.lr_current(), processor);
        processor.process_train(LearnerEvent::EndEpoch(global.items_processed));
    }

    fn valid_epoch(&self, learner: &Learner<LC>, loader: &ValidLoader<LC>, global: &Progress, processor: &mut SupervisedTrainingEventProcessor<LC>, interrupter: &burn_train::Interrupter)
    where
        <LC::InferenceModel as InferenceStep>::Output: WindowItem,
    {
        let model = learner.model().valid();
        let mut iterator = loader.iter();
        let mut iteration = 0;
        let mut window = Window::new();
        let hand = |item: Option<_>, progress: Progress, iteration: usize, processor: &mut SupervisedTrainingEventProcessor<LC>| {
            if let Some(item) = item {
                self.handed.valid.fetch_add(1, Ordering::Relaxed);
                processor.process_valid(LearnerEvent::ProcessedItem(TrainingItem::new(item, progress, global.clone(), Some(iteration), None)));
            }
        };
        let mut progress = iterator.progress();
        while let Some(item) = iterator.next() {
            iteration += 1;
            progress = iterator.progress();
            window.add(model.step(item));
            if window.steps >= self.sync_interval {
                hand(window.take(), progress.clone(), iteration, processor);
            }
            if interrupter.should_stop() {
                break;
            }
        }
        hand(window.take(), progress, iteration, processor);
        processor.process_valid(LearnerEvent::EndEpoch(global.items_processed));
    }
}

/// burn-train's metrics into kiln's events: a `MetricsRenderer` for
/// `SupervisedTraining::renderer`, so a burn-train program's metrics land in kiln's
/// `metrics.jsonl` (with the run directory's files as the sink) and its dashboard. Each rendered
/// training item becomes a window row (`loss` from burn's `Loss` metric, the others under
/// `metrics`; with [`SyncEveryN`] one row per window), each epoch's validation a validation row.
/// burn-train reports no read times, so the rows count reads and leave their times at 0.
pub struct EventRenderer {
    sink: std::sync::Mutex<Box<dyn kiln_events::EventSink + Send>>,
    name: String,
    names: std::collections::HashMap<burn_train::metric::MetricId, String>,
    train: std::collections::BTreeMap<String, f64>,
    valid: std::collections::BTreeMap<String, f64>,
    /// The epoch whose validation is pending (`None`: nothing to flush).
    valid_epoch: Option<usize>,
    started: Option<std::time::Instant>,
    step: usize,
    sync: kiln_events::SyncStats,
    failed: bool,
}

impl EventRenderer {
    pub fn new(name: impl Into<String>, sink: impl kiln_events::EventSink + Send + 'static) -> Self {
        Self {
            sink: std::sync::Mutex::new(Box::new(sink)),
            name: name.into(),
            names: Default::default(),
            train: Default::default(),
            valid: Default::default(),
            valid_epoch: None,
            started: None,
            step: 0,
            sync: Default::default(),
            failed: false,
        }
    }

    fn emit(&mut self, event: kiln_events::Event) {
        if self.failed {
            return;
        }
        let sink = self.sink.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Err(why) = sink.emit(&event) {
            // A renderer cannot fail the training: say it once and stop writing.
            eprintln!("kiln: {why}; burn-train metrics no longer recorded");
            self.failed = true;
        }
    }

    fn record(&mut self, state: burn_train::renderer::MetricState, valid: bool) {
        if let burn_train::renderer::MetricState::Numeric(entry, value) = state {
            let name = self.names.get(&entry.metric_id).cloned().unwrap_or_else(|| "metric".into());
            let into = if valid { &mut self.valid } else { &mut self.train };
            into.insert(name, value.current());
        }
    }

    /// The pending validation as a row (burn's `Loss` as the loss, the rest as metrics).
    fn flush_valid(&mut self) {
        let Some(epoch) = self.valid_epoch.take() else { return };
        let mut metrics = std::mem::take(&mut self.valid);
        let loss = metrics.remove("Loss").unwrap_or(f64::NAN);
        self.emit(kiln_events::Event::Validation(kiln_events::ValidRow { epoch, step: self.step, loss, ppl: loss.exp(), bleu: None, metrics, set: None, samples: Vec::new() }));
    }
}

impl burn_train::renderer::MetricsRendererTraining for EventRenderer {
    fn update_train(&mut self, state: burn_train::renderer::MetricState) {
        self.record(state, false);
    }

    fn update_valid(&mut self, state: burn_train::renderer::MetricState) {
        self.record(state, true);
    }

    fn render_train(&mut self, item: burn_train::renderer::TrainingProgress, _: Vec<burn_train::renderer::ProgressType>) {
        let epoch = item.global_progress.items_processed;
        if self.started.is_none() {
            self.started = Some(std::time::Instant::now());
            let info = kiln_events::RunInfo {
                recipe: self.name.clone(),
                run_dir: String::new(),
                device: "burn-train".into(),
                epochs: item.global_progress.items_total,
                steps_per_epoch: 0,
                total_steps: 0,
                start_step: 0,
                start_epoch: epoch.saturating_sub(1),
                parameters: 0,
                vocab_size: 0,
                train_examples: item.progress.as_ref().map_or(0, |p| p.items_total),
                valid_examples: 0,
                sync_interval: 0,
                prefetch: 0,
                commit: String::new(),
            };
            self.emit(kiln_events::Event::RunStarted(info));
        }
        if self.valid_epoch.is_some_and(|e| e < epoch) {
            self.flush_valid();
        }
        let step = item.iteration.unwrap_or(self.step + 1);
        let steps = step.saturating_sub(self.step).max(1);
        self.step = step;
        self.sync.record(0.0);
        let mut metrics = self.train.clone();
        let loss = metrics.remove("Loss").unwrap_or(f64::NAN);
        let wall_s = self.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let row = kiln_events::WindowRow {
            epoch,
            step,
            loss,
            tokens: 0,
            tokens_per_s: 0.0,
            lr: metrics.get("Learning Rate").copied().unwrap_or(0.0),
            sync: self.sync,
            sync_ms: 0.0,
            steps,
            wall_s,
            padding_pct: 0.0,
            data_wait_ms: 0.0,
            sentences: 0,
            window_s: 0.0,
            prefetch_ready: 0,
            rss_mb: 0.0,
            cpu_pct: 0.0,
            device_mb: None,
            device_reserved_mb: None,
            device_tokens: Vec::new(),
            node_tokens: Vec::new(),
            reduce: None,
            overflow_skips: 0,
            loss_scale: None,
            grad_norm: None,
            grad_norm_max: None,
            metrics,
        };
        self.emit(kiln_events::Event::Window(row));
    }

    fn render_valid(&mut self, item: burn_train::renderer::TrainingProgress, _: Vec<burn_train::renderer::ProgressType>) {
        self.valid_epoch = Some(item.global_progress.items_processed);
    }

    fn on_train_end(&mut self, _summary: Option<burn_train::LearnerSummary>) -> Result<(), Box<dyn core::error::Error>> {
        let (valid_loss, metrics) = (self.valid.get("Loss").copied(), self.valid.iter().filter(|(k, _)| k.as_str() != "Loss").map(|(k, v)| (k.clone(), *v)).collect());
        let epoch = self.valid_epoch.unwrap_or(0);
        self.flush_valid();
        let summary = kiln_events::Summary {
            steps: self.step,
            epochs: epoch,
            train_loss: self.train.get("Loss").copied().unwrap_or(f64::NAN),
            valid_loss,
            bleu: None,
            tokens_per_s: 0.0,
            wall_s: self.started.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            sync: self.sync.into(),
            data: kiln_events::DataFigures { cache_hit: false, prepare_s: 0.0, padding_pct: 0.0 },
            test: None,
            stopped: false,
            skipped_steps: 0,
            rollbacks: 0,
            metrics,
            early_stopped: false,
            best: None,
            ema: false,
            dev: Default::default(),
        };
        self.emit(kiln_events::Event::Finished(summary));
        Ok(())
    }
}

impl burn_train::renderer::MetricsRendererEvaluation for EventRenderer {
    fn update_test(&mut self, _: burn_train::renderer::EvaluationName, _: burn_train::renderer::MetricState) {}

    fn render_test(&mut self, _: burn_train::renderer::EvaluationProgress, _: Vec<burn_train::renderer::ProgressType>) {}
}

impl burn_train::renderer::MetricsRenderer for EventRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: burn_train::metric::MetricDefinition) {
        self.names.insert(definition.metric_id, definition.name);
    }
}
