//! Views and loggers of the trainer's event stream: the plain progress line (one per sync window,
//! fit for `nohup` files), the run directory's machine-readable files (`metrics.jsonl`,
//! `summary.json`) and what is made from them afterwards: the charts `loss.png` and
//! `throughput.png` and the closing summary table. They only consume [`kiln_events::Event`]s.
//! The terminal dashboard lives in its own crate (`kiln-dashboard`); `bench_report` renders the
//! figures of `kiln bench train`.

pub mod metrics_log;
pub mod plots;
pub mod bench_report;
pub mod progress;
pub mod run_files;
pub mod summary_table;

pub use progress::ProgressLine;
pub use run_files::RunFiles;
