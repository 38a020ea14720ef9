//! kiln as a library: bring a Burn model (`#[derive(Module)]`) and a burn-dataset `Dataset`,
//! describe the task (its batch type, loss and metrics) with [`Task`], and train it with
//! kiln's loop: loss read back once every N steps, sync statistics, checkpoints with bit-exact
//! resume, `train.on_nan` recovery, the dashboard and the run directory's files.
//!
//! ```ignore
//! let data = DatasetData::new(dataset, MyBatcher, |item| item.len(), Batching::default());
//! let trainer = Trainer::new(MyTask::new(valid), MyModel::new(&device), device)
//!     .settings(TrainSection { epochs: 4, lr: 1e-3, ..Default::default() })
//!     .sync_interval(10)
//!     .run_dir("runs/my-task");
//! let summary = kiln::session::fit(trainer, &data, &kiln::session::Session::default())?;
//! ```
//!
//! [`session`] owns what a run shows and writes besides training itself: `metrics.jsonl`,
//! `summary.json`, the dashboard or progress lines, Ctrl-C as a stop request, the charts and the
//! closing table. The `kiln` command uses the same session for its recipes.

pub mod session;

pub use kiln_data::memo::{memoize, Fingerprint};
pub use kiln_events::{Control, Event, EventSink, Summary};
pub use kiln_recipe::{OnNan, Precision, Schedule, TrainSection};
pub use kiln_train::data::{TextLines, TsvPairs};
pub use kiln_train::task::figures;
pub use kiln_train::{BatchStats, Batching, DatasetData, EvalFigures, MetricDef, Per, Split, Task, TaskBatch, TaskInfo, TaskOutput, TrainData, Trainer, ValidModel};
