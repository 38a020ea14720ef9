pub(crate) mod base;
pub(crate) mod state;

pub use base::{registered_node_addresses, start_global_orchestrator, start_global_orchestrator_until};
