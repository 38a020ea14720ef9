//! kiln's terminal dashboard (ratatui): throughput, loss, sync statistics, data and system
//! panels, fed only by the trainer's event stream (`app::start_live`) or by a run directory's
//! files (`app::watch`). `state` holds what is known and derives the figures, `render` draws it.

pub mod app;
pub mod render;
pub mod state;
pub mod watch;

pub use app::{start_live, watch, DashboardSink, DashboardThread};
pub use state::DashboardState;
pub use watch::load_run;
