//! kiln's loop as a library: [`Trainer`] gives any [`Task`] (a Burn model with its batch type,
//! loss and metrics) and any [`TrainData`] kiln's loop, with sync windows, checkpoints, recovery
//! and data parallel; [`strategy`] gives it to burn-train programs. Nothing here knows a model
//! family or a recipe file: the built-in families and the recipe launch are `kiln-families`.

pub mod autobatch;
pub mod checkpoint;
pub mod clip;
pub mod data;
pub mod device;
pub mod loss_scale;
pub mod nodes;
mod recovery;
mod replicas;
pub mod schedule;
pub mod step;
pub mod strategy;
pub mod system;
pub mod task;
pub mod trainer;
pub mod weights;
#[cfg(feature = "wgpu")]
pub mod wgpu_device;
mod window;

pub use data::{Batching, DatasetData, TrainData};
pub use device::{resolve_device, DeviceChoice};
pub use task::{BatchStats, EvalFigures, MetricDef, Per, Split, Task, TaskBatch, TaskInfo, TaskOutput, ValidModel};
pub use trainer::{compute_dtype, Trainer};
