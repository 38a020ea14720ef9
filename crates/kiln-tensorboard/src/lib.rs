//! TensorBoard event files from kiln's events: a sink beside `metrics.jsonl` that writes
//! `<run>/tb/events.out.tfevents.<seconds>.<host>.kiln`, the format TensorBoard (and W&B's
//! `sync_tensorboard`) reads.
//!
//! No maintained Rust writer of this format was found (`tensorboard-rs` has had no release since
//! 2021 and pulls image and protobuf-codegen dependencies), and the format is small: a file of
//! records, each `length (u64 LE) · masked CRC-32C of the length · data · masked CRC-32C of the
//! data`, the data a protobuf `Event` (TensorFlow's `event.proto`, `summary.proto`). The messages
//! are declared here with prost's derive (only the fields kiln writes, with TensorFlow's field
//! numbers); the CRC is the `crc32c` crate's.
//!
//! What goes in: per sync window `train/loss`, `train/lr`, `train/tokens_per_s`, `train/sync_ms`,
//! `train/data_wait_ms`, `train/padding_pct`, `train/grad_norm` / `train/grad_norm_max` (before
//! clipping), `train/loss_scale` (f16) and the task's training metrics; per validation
//! `valid/loss`, `valid/ppl`, `valid/bleu`, the task's metrics and a few sample translations as a
//! text table (`valid_<name>/…` for a named set); at the end the test split's figures
//! (`test/…`); at each start the recipe as text and its keys as TensorBoard hyperparameters
//! (HParams tab). Points are keyed by optimizer step. A resumed run (or a rollback) first writes
//! a `SessionLog` START at the step it continues from + 1: TensorBoard's reader then drops the
//! points past it that the previous process logged after its last checkpoint, as `metrics.jsonl`
//! drops their rows, so the curves continue without duplicates.

pub mod proto;
pub mod read;
pub mod record;
mod sink;

pub use sink::TensorBoard;
