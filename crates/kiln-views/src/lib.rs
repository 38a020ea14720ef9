//! Views and loggers of the trainer's event stream: the plain progress line (one per sync window,
//! fit for `nohup` files) and the run directory's machine-readable files, `metrics.jsonl` and
//! `summary.json`. They only consume [`kiln_events::Event`]s.

pub mod progress;
pub mod run_files;

pub use progress::ProgressLine;
pub use run_files::RunFiles;
