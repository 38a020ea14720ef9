//! Runs as a collection: what `kiln runs` lists ([`list`]), what `kiln compare` puts side by
//! side ([`compare`]) and how `kiln sweep` lays out a grid of recipe values ([`sweep`]). Read
//! from the run directories' own files (`recipe.toml`, `metrics.jsonl`, `summary.json`, the
//! checkpoints and the run's lock); nothing here trains.

pub mod compare;
pub mod list;
pub mod sweep;

pub use list::{find_runs, RunRecord, Status};
