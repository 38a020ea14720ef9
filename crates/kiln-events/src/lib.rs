//! The trainer's typed event stream. The trainer emits [`Event`]s to [`EventSink`]s and knows
//! nothing of terminals or files; progress lines, `metrics.jsonl`, `summary.json` and the
//! dashboard are sinks. Field names here are the run directory's JSON contract: fields are added
//! (with defaults, so older files still read), never renamed or removed. [`Control`] is the one
//! way back: views ask the trainer to pause or stop, and the trainer polls it between steps.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Cumulative device→host synchronisation statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStats {
    /// Reads of training loss from the device so far.
    pub count: u64,
    pub total_ms: f64,
    pub max_ms: f64,
}

impl SyncStats {
    pub fn record(&mut self, ms: f64) {
        self.count += 1;
        self.total_ms += ms;
        self.max_ms = self.max_ms.max(ms);
    }

    /// Adds `other`'s reads to these.
    pub fn merge(&mut self, other: &SyncStats) {
        self.count += other.count;
        self.total_ms += other.total_ms;
        self.max_ms = self.max_ms.max(other.max_ms);
    }

    pub fn avg_ms(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.total_ms / self.count as f64 }
    }
}

/// One sync window of training steps (a `"kind":"train"` row of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowRow {
    pub epoch: usize,
    /// Optimizer steps done so far.
    pub step: usize,
    /// Token-weighted mean training loss over the window's steps.
    pub loss: f64,
    /// Target tokens in the window.
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Learning rate of the window's last step.
    pub lr: f64,
    /// Cumulative sync statistics at the end of the window.
    pub sync: SyncStats,
    /// Milliseconds this window's read waited.
    pub sync_ms: f64,
    /// Optimizer steps in this window.
    pub steps: usize,
    /// Seconds of training so far (summed over resumed runs).
    pub wall_s: f64,
    /// Share of the window's batch slots (both sides) that hold padding, in percent.
    pub padding_pct: f64,
    /// Milliseconds the trainer waited for the loader during the window.
    pub data_wait_ms: f64,
    /// Sentences (or blocks) in the window's batches.
    #[serde(default)]
    pub sentences: u64,
    /// Seconds the window took (its steps, data wait and sync).
    #[serde(default)]
    pub window_s: f64,
    /// Built batches waiting in the loader's queues at the window's end (prefetch depth in use).
    #[serde(default)]
    pub prefetch_ready: usize,
    /// Resident memory of the training process at the window's end, MiB (0 where unknown).
    #[serde(default)]
    pub rss_mb: f64,
    /// CPU use of the training process over the window, percent of one core (0 where unknown).
    #[serde(default)]
    pub cpu_pct: f64,
    /// A CubeCL device (wgpu, CUDA): MiB its tensors use and its memory pools hold at the
    /// window's end; absent on the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_mb: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_reserved_mb: Option<f64>,
    /// Data parallel (`backend.devices`): each device's target tokens in the window, in device
    /// order (its tokens/s = these / `window_s`); absent with one device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_tokens: Vec<u64>,
    /// Multi-node (`--nodes`): each node's target tokens in the window, by rank (its tokens/s =
    /// these / `window_s`); absent in a one-process run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_tokens: Vec<u64>,
    /// Data parallel: cumulative host time in the steps' all-reduces (count, total, max ms; across
    /// nodes the reduce between them included), as `sync` counts the loss reads; absent with
    /// one device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce: Option<SyncStats>,
    /// f16 (`train.precision`): steps of the window undone because their gradients overflowed,
    /// and the dynamic loss scale after it; absent otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub overflow_skips: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Mean and largest global gradient norm (before clipping) of the window's applied steps,
    /// from the window's one read; absent in older logs and where no step was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm_max: Option<f64>,
    /// The task's own training metrics over the window, by name (absent when it has none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Validation at an epoch end (a `"kind":"valid"` row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidRow {
    pub epoch: usize,
    pub step: usize,
    /// Mean per-token negative log-likelihood.
    pub loss: f64,
    pub ppl: f64,
    /// Corpus BLEU of greedy translations (sacreBLEU 13a); null when disabled.
    pub bleu: Option<f64>,
    /// The task's own validation metrics, by name (absent when it has none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// The named validation set (`eval.sets`) these figures are of; absent for the main one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    /// The first `eval.samples` translations of the set, for people to read (TensorBoard's text
    /// tab); not part of `metrics.jsonl`.
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

/// One decoded validation sentence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub source: String,
    pub reference: String,
    pub hypothesis: String,
}

/// Final figures (`summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub steps: usize,
    pub epochs: usize,
    /// Token-weighted mean training loss over the steps of the last epoch run.
    pub train_loss: f64,
    /// Validation figures of the last validation.
    pub valid_loss: Option<f64>,
    pub bleu: Option<f64>,
    /// Target tokens per second inside training windows (evaluation and saving excluded).
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub sync: SummarySync,
    pub data: DataFigures,
    /// The final model on the held-out test split (absent when there is none).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub test: Option<EvalFigures>,
    /// The run was stopped on request (dashboard `q`, SIGINT, SIGTERM) before its end; its last
    /// checkpoint resumes it.
    #[serde(default)]
    pub stopped: bool,
    /// Steps whose update was skipped and rollbacks made after non-finite losses (`train.on_nan`).
    #[serde(default)]
    pub skipped_steps: usize,
    #[serde(default)]
    pub rollbacks: usize,
    /// The task's own metrics at the last validation, by name (e.g. `accuracy`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// `train.patience` ended the run: that many validations in a row brought no new best.
    #[serde(default)]
    pub early_stopped: bool,
    /// The best checkpoint by `train.best_metric` (`checkpoints/best`), and its figure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestCheckpoint>,
    /// The figures above (validation, test) are those of the weights' moving average
    /// (`train.ema_decay`).
    #[serde(default)]
    pub ema: bool,
    /// Figures of each named validation set (`eval.sets`) at the last validation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dev: BTreeMap<String, EvalFigures>,
}

/// The best checkpoint of a run by its `train.best_metric`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestCheckpoint {
    pub checkpoint: String,
    /// `valid_loss` or `bleu`.
    pub metric: String,
    pub value: f64,
}

/// How the data was prepared and fed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DataFigures {
    /// The prepared dataset came from the dataset cache.
    pub cache_hit: bool,
    /// Seconds to prepare the data (read, split, tokenizer, encode; or load from the cache).
    pub prepare_s: f64,
    /// Padding share of the batch slots over this process's training windows, in percent.
    pub padding_pct: f64,
}

/// Loss, perplexity and BLEU of one evaluation, and the task's own metrics by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalFigures {
    pub loss: f64,
    pub ppl: f64,
    pub bleu: Option<f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// A few decoded sentences (translation validation, `eval.samples`); not serialised.
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SummarySync {
    pub count: u64,
    pub total_ms: f64,
    pub avg_ms: f64,
    pub max_ms: f64,
}

impl From<SyncStats> for SummarySync {
    fn from(s: SyncStats) -> Self {
        Self { count: s.count, total_ms: s.total_ms, avg_ms: s.avg_ms(), max_ms: s.max_ms }
    }
}

/// Facts about a run, sent once at its start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub recipe: String,
    pub run_dir: String,
    pub device: String,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    /// Steps the run will end at (epochs × steps per epoch, or `max_steps` if smaller).
    pub total_steps: usize,
    pub start_step: usize,
    pub start_epoch: usize,
    pub parameters: usize,
    pub vocab_size: usize,
    pub train_examples: usize,
    pub valid_examples: usize,
    pub sync_interval: usize,
    /// Ready batches the loader keeps at most (`loader.prefetch`).
    #[serde(default)]
    pub prefetch: usize,
    /// The commit of kiln the run ran at (`""` where not known).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub commit: String,
}

/// Requests from views to the trainer, honoured at the next step boundary. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Control {
    flags: Arc<ControlFlags>,
}

#[derive(Debug, Default)]
struct ControlFlags {
    stop: AtomicBool,
    paused: AtomicBool,
}

impl Control {
    pub fn new() -> Self {
        Self::default()
    }

    /// Finish the current step, save a checkpoint and end the run (resumable).
    pub fn request_stop(&self) {
        self.flags.stop.store(true, Ordering::SeqCst);
    }

    pub fn stop_requested(&self) -> bool {
        self.flags.stop.load(Ordering::SeqCst)
    }

    /// Pauses or resumes training; returns whether it is now paused.
    pub fn toggle_pause(&self) -> bool {
        !self.flags.paused.fetch_xor(true, Ordering::SeqCst)
    }

    pub fn paused(&self) -> bool {
        self.flags.paused.load(Ordering::SeqCst)
    }
}

/// Whether the prepared data came from the dataset cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheUse {
    Hit,
    /// Prepared now and stored.
    Miss,
    /// No cache configured.
    Off,
}

/// How a run's data was prepared (a `"kind":"data"` row), sent once before training starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    /// The splits' sizes for humans, e.g. "15,912 train, 500 valid, 500 test pairs".
    pub sizes: String,
    pub vocab_size: usize,
    pub dropped_long: usize,
    pub skipped_lines: usize,
    pub cache: CacheUse,
    /// The cache entry used or written.
    pub cache_path: Option<String>,
    pub prepare_s: f64,
}

impl DataReport {
    /// The report as one line (the progress line's and the log's).
    pub fn line(&self) -> String {
        let cache = match (&self.cache_path, self.cache) {
            (Some(p), CacheUse::Hit) => format!("hit {p}"),
            (Some(p), CacheUse::Miss) => format!("miss, stored {p}"),
            _ => "off".to_string(),
        };
        format!(
            "data | {} | vocab {} | {} long pairs dropped, {} bad lines skipped | cache {cache} | prepared in {:.2} s",
            self.sizes, self.vocab_size, self.dropped_long, self.skipped_lines, self.prepare_s
        )
    }
}

/// How far a slow step before training is (reading and tokenizing a corpus): a live bar on a
/// terminal, a line now and then elsewhere, nothing in the run's log.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// What is being done, e.g. "tokenizing de-en.tsv".
    pub what: String,
    pub done: u64,
    pub total: u64,
    /// The unit counted, e.g. "pairs".
    pub unit: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    RunStarted(RunInfo),
    /// How the data was prepared.
    Data(DataReport),
    /// Free-form information for humans (data sizes, skipped lines, resume point…).
    Note(String),
    /// Progress of a slow step before training.
    Progress(Progress),
    Window(WindowRow),
    EpochEnd { epoch: usize, step: usize, train_loss: f64 },
    Validation(ValidRow),
    Checkpoint { epoch: usize, step: usize, path: String },
    /// Training went back to the checkpoint at `step` (`train.on_nan = "rollback"`): what was
    /// logged past that step no longer describes the run.
    Rollback { step: usize },
    Finished(Summary),
}

/// A consumer of events. Sinks must be quick: the trainer calls them inline. An error (a log file
/// that cannot be written, say) is one line naming the path; the trainer stops on it.
pub trait EventSink {
    fn emit(&mut self, event: &Event) -> Result<(), String>;
}

/// Sends every event to several sinks in order.
#[derive(Default)]
pub struct Fanout {
    sinks: Vec<Box<dyn EventSink + Send>>,
}

impl Fanout {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, sink: impl EventSink + Send + 'static) -> Self {
        self.sinks.push(Box::new(sink));
        self
    }
}

impl EventSink for Fanout {
    fn emit(&mut self, event: &Event) -> Result<(), String> {
        for sink in &mut self.sinks {
            sink.emit(event)?;
        }
        Ok(())
    }
}

pub mod files;
pub use files::{write_atomic, RunLock};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_is_shared_between_clones() {
        let view = Control::new();
        let trainer = view.clone();
        assert!(!trainer.paused() && !trainer.stop_requested());
        assert!(view.toggle_pause(), "first toggle pauses");
        assert!(trainer.paused());
        assert!(!view.toggle_pause(), "second toggle resumes");
        assert!(!trainer.paused());
        view.request_stop();
        assert!(trainer.stop_requested());
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("kiln-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("summary.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        let err = write_atomic(&dir.join("missing/x.json"), b"x").unwrap_err();
        assert!(err.contains("missing/x.json: cannot write"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn data_report_line_names_the_cache_use() {
        let r = DataReport { sizes: "10 train, 2 valid, 2 test pairs".into(), vocab_size: 40, dropped_long: 1, skipped_lines: 0, cache: CacheUse::Hit, cache_path: Some("/c/x.kds".into()), prepare_s: 0.25 };
        assert_eq!(r.line(), "data | 10 train, 2 valid, 2 test pairs | vocab 40 | 1 long pairs dropped, 0 bad lines skipped | cache hit /c/x.kds | prepared in 0.25 s");
        let off = DataReport { cache: CacheUse::Off, cache_path: None, ..r };
        assert!(off.line().contains("| cache off |"));
    }
}
