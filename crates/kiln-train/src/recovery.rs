//! `train.on_nan`: the owner of what happens when a window's read shows a non-finite loss or
//! gradient norm. `stop` writes `nonfinite.json` and ends the run (exit 3); `skip` replays the
//! window from its start without the non-finite steps; `rollback` goes back to the last
//! checkpoint (held in memory) with a lower learning rate. Found one window late under
//! `sync_overlap`, the steps queued after the bad window are replayed or abandoned with it.

use std::time::Instant;

use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use kiln_data::loader::Loader;
use kiln_events::Event;

use crate::checkpoint;
use crate::data::TrainData;
use crate::step::{step_gradients, SINGLE};
use crate::task::{Task, TaskBatch};
use crate::trainer::{Fit, Held};
use crate::window::{SyncWindow, WindowRead};

/// `on_nan = "skip"`: the model, optimizer and state at the open window's start, and the batches
/// of its steps so far, to replay the window without its non-finite steps.
pub(crate) struct WindowStart<B: AutodiffBackend, T: Task<B>> {
    pub held: Held<B, T::Model>,
    pub step: usize,
    pub batches: Vec<Vec<T::Batch>>,
}

impl<B: AutodiffBackend, T: Task<B>> WindowStart<B, T> {
    /// The open window starts here: a copy of the model and optimizer (shared tensors).
    pub fn at(learner: &crate::trainer::Learner<B, T::Model>, step: usize) -> Self {
        Self { held: learner.snapshot(), step, batches: Vec::new() }
    }
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

impl<B: AutodiffBackend, T: Task<B>, D: TrainData<B, Batch = T::Batch>> Fit<'_, B, T, D> {
    /// Writes `nonfinite.json` (what the window read showed) and returns the one-line stop error.
    pub(crate) fn nonfinite_stop(&self, read: &WindowRead, epoch: usize, why: &str) -> anyhow::Error {
        let state = &self.state;
        let run_dir = self.run_dir.as_path();
        let first = read.first_nonfinite().unwrap_or(state.step);
        let latest = checkpoint::latest(run_dir).ok().flatten();
        let lr_at = |k: usize| self.schedule.at(k) * state.lr_scale;
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
        let written = kiln_events::write_atomic(&path, serde_json::to_string_pretty(&diagnosis).expect("json").as_bytes());
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

    /// `skip`: back to the window's start; its steps again, each read (this is the rare path),
    /// applying only those with a finite loss and gradient. Steps queued after it while its read
    /// was in flight ran on the bad model: they run again after it, as the open window.
    pub(crate) fn replay_without_nonfinite(&mut self, done: SyncWindow<B::InnerBackend>, start: WindowStart<B, T>, read: &WindowRead, epoch: usize) -> anyhow::Result<()> {
        self.learner.restore(start.held);
        self.state.step = start.step;
        let queued_after = self.window_start.take().map(|open| open.batches).unwrap_or_default();
        self.window = SyncWindow::new();
        let mut replayed = SyncWindow::<B::InnerBackend>::new();
        replayed.started = done.started;
        replayed.first_step = start.step;
        replayed.host_metrics = vec![0.0; self.metric_defs.len()];
        let mut skipped = Vec::new();
        let mut norms = Vec::new();
        for batches in &start.batches {
            let stats: Vec<_> = batches.iter().map(TaskBatch::stats).collect();
            let tokens = stats.iter().map(|s| s.target_tokens).sum();
            let sums = step_gradients(&*self.task, self.learner.model(), batches, &self.tr, self.state.step, tokens, false, self.place(SINGLE)).expect("rank 0 alone makes no collective call");
            let mut parts = vec![sums.loss_sum, sums.norm];
            parts.extend(sums.metric_sums);
            let values: Vec<f64> = Tensor::cat(parts, 0).into_data().iter::<f64>().collect();
            self.state.step += 1;
            self.last_lr = self.schedule.at(self.state.step) * self.state.lr_scale;
            if values[..2].iter().all(|v| v.is_finite()) {
                let lr = self.last_lr;
                self.learner.step(self.state.step, |model, mut optim| (optim.step(lr, model, sums.grads), optim, ()));
                replayed.host_sum += values[0];
                norms.push(values[1]);
                for (acc, v) in replayed.host_metrics.iter_mut().zip(&values[2..]) {
                    *acc += v;
                }
                replayed.count(&stats);
            } else {
                if self.state.skipped_steps >= self.tr.nan_max_recoveries {
                    let why = format!("{} steps skipped already (train.nan_max_recoveries)", self.state.skipped_steps);
                    return Err(self.nonfinite_stop(read, epoch, &why));
                }
                self.state.skipped_steps += 1;
                skipped.push(self.state.step);
                // The skipped step's batches were consumed: the window still counts it.
                replayed.steps += 1;
            }
        }
        self.emit(Event::Note(match skipped.len() {
            // A step that was non-finite once and finite when replayed: nothing skipped.
            0 => format!("non-finite loss or gradient, finite on replay (window replayed from step {})", start.step + 1),
            n => format!(
                "non-finite loss or gradient: skipped step{} {} (window replayed from step {})",
                if n == 1 { "" } else { "s" },
                skipped.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
                start.step + 1
            ),
        }))?;
        let (host_sum, host_metrics) = (replayed.host_sum, replayed.host_metrics.clone());
        let lr = self.last_lr;
        // The norms of the steps applied on replay.
        let grad_norms = crate::window::mean_and_max(norms.into_iter());
        self.record_window(replayed, host_sum, &host_metrics, read.ms, epoch, lr, (0, None), grad_norms)?;
        if !queued_after.is_empty() {
            self.window.open(self.state.step);
            self.window.started = Instant::now();
            self.window_start = Some(WindowStart::at(&self.learner, self.state.step));
            for batches in queued_after {
                let stats: Vec<_> = batches.iter().map(TaskBatch::stats).collect();
                let tokens = stats.iter().map(|s| s.target_tokens).sum();
                let sums = step_gradients(&*self.task, self.learner.model(), &batches, &self.tr, self.state.step, tokens, false, self.place(SINGLE)).expect("rank 0 alone makes no collective call");
                self.state.step += 1;
                self.last_lr = self.schedule.at(self.state.step) * self.state.lr_scale;
                self.apply(sums);
                self.window.count(&stats);
                self.window_start.as_mut().expect("just set").batches.push(batches);
            }
        }
        // The replicas continue from the replayed model (the replay ran on rank 0 alone, every
        // batch of each step: the same gradients, up to the order of the sums).
        if let Some(pool) = &self.pool {
            pool.reset(self.learner.model(), self.learner.optim());
        }
        Ok(())
    }

    /// `rollback`: back to the last checkpoint with the learning rate lowered; the steps queued
    /// after the window are abandoned with it.
    pub(crate) fn roll_back(&mut self, read: &WindowRead, epoch: usize) -> anyhow::Result<()> {
        let first = read.first_nonfinite().unwrap_or(self.state.step);
        if self.state.rollbacks >= self.tr.nan_max_recoveries {
            let why = format!("{} rollbacks made already (train.nan_max_recoveries)", self.state.rollbacks);
            return Err(self.nonfinite_stop(read, epoch, &why));
        }
        let (good, good_state) = self.last_good.clone().expect("rollback keeps the last checkpoint");
        let mut sync = self.state.sync;
        sync.record(read.ms);
        let reduce = self.state.reduce;
        let (skipped_steps, rollbacks, lr_scale) = (self.state.skipped_steps, self.state.rollbacks + 1, self.state.lr_scale * self.tr.nan_lr_factor);
        self.learner.restore(good);
        self.state = good_state;
        // The syncs happened; the recoveries and the lowered rate carry on.
        self.state.sync = sync;
        self.state.reduce = reduce;
        self.state.skipped_steps = skipped_steps;
        self.state.rollbacks = rollbacks;
        self.state.lr_scale = lr_scale;
        self.last_lr = self.schedule.at(self.state.step.max(1)) * self.state.lr_scale;
        self.window = SyncWindow::new();
        self.window_start = None;
        // The pending batches belong to the abandoned steps.
        self.loader = Loader::new(self.workers, self.prefetch);
        if let Some(pool) = &self.pool {
            pool.reset(self.learner.model(), self.learner.optim());
        }
        self.emit(Event::Rollback { step: self.state.step })?;
        let line = format!("non-finite loss or gradient at step {first}: rolled back to step {} (rollback {}), learning rate × {:.3e} from here", self.state.step, self.state.rollbacks, self.state.lr_scale);
        self.emit(Event::Note(line))
    }
}
