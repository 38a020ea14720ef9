//! A run's session: the views and files around the loop, for the `kiln` command and for library
//! users alike. The trainer emits events; here they go to `metrics.jsonl` / `summary.json`
//! ([`kiln_views::RunFiles`]) and to the dashboard (in a terminal) or to progress lines (under
//! `nohup`, in CI), SIGINT / SIGTERM become a stop request, and at the end the charts are drawn
//! and the summary table printed.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use kiln_events::{Control, EventSink, Fanout, RunLock, Summary};
use kiln_train::{Task, TrainData, Trainer};
use kiln_views::{ProgressLine, RunFiles};

/// How a session shows the run.
#[derive(Debug, Clone)]
pub struct Session {
    /// The dashboard when stdout and stdin are a terminal (`false`: progress lines always).
    pub dashboard: bool,
    /// The run's name in the charts' titles.
    pub name: String,
}

impl Default for Session {
    fn default() -> Self {
        Self { dashboard: true, name: "run".into() }
    }
}

/// Trains with `train`, its events going to the run directory's files and to the live view;
/// `control` receives the dashboard's keys and the stop signals. Charts and the summary table
/// follow a successful run.
pub fn run(run_dir: &Path, session: &Session, control: &Control, train: impl FnOnce(&mut (dyn EventSink + Send)) -> Result<Summary>) -> Result<Summary> {
    // Taken again here (shared within the process) so that every run holds its directory.
    let _lock = RunLock::acquire(run_dir).map_err(anyhow::Error::msg)?;
    install_stop_signals(control);
    let tui = session.dashboard && std::io::stdout().is_terminal() && std::io::stdin().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
    let files = RunFiles::open(run_dir).map_err(anyhow::Error::msg)?;
    let dashboard = if tui {
        match kiln_dashboard::start_live(control.clone()) {
            Ok(d) => Some(d),
            Err(why) => {
                eprintln!("kiln: {why}; plain progress lines instead");
                None
            }
        }
    } else {
        None
    };
    let result = match dashboard {
        Some((view, thread)) => {
            let mut sink = Fanout::new().with(view).with(files).with(kiln_tensorboard::TensorBoard::new(run_dir));
            let result = train(&mut sink);
            // Closing the channel ends the dashboard, which restores the terminal.
            drop(sink);
            if let Err(why) = thread.finish() {
                eprintln!("kiln: {why}");
            }
            result
        }
        None => {
            let mut sink = Fanout::new().with(ProgressLine::new(std::io::stdout()).live(std::io::stdout().is_terminal())).with(files).with(kiln_tensorboard::TensorBoard::new(run_dir));
            train(&mut sink)
        }
    };
    if let Err(why) = &result {
        // The log says how the attempt ended; the run can be resumed (or started again) in place.
        if let Err(also) = RunFiles::record_error(run_dir, &format!("{why:#}").replace('\n', " ")) {
            eprintln!("kiln: warning: {also}");
        }
    }
    if let Ok(summary) = &result {
        println!("\n{}", kiln_views::summary_table::summary_table(summary, &run_dir.display().to_string()));
        match kiln_views::plots::write_charts(run_dir, &session.name) {
            Ok(paths) if !paths.is_empty() => {
                let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                println!("  charts  {}", names.join(", "));
            }
            Ok(_) => {}
            // The run itself is saved; a chart that cannot be drawn is worth a line, not a failure.
            Err(why) => eprintln!("kiln: warning: {why}"),
        }
    }
    result
}

/// A run that writes no files (a multi-node run's ranks > 0): progress lines on stdout, SIGINT /
/// SIGTERM a stop request.
pub fn run_without_files(control: &Control, train: impl FnOnce(&mut (dyn EventSink + Send)) -> Result<Summary>) -> Result<Summary> {
    install_stop_signals(control);
    let mut sink = Fanout::new().with(ProgressLine::new(std::io::stdout()).live(std::io::stdout().is_terminal()));
    train(&mut sink)
}

/// A library run: `trainer` on `data` in the session, with the run directory the trainer was
/// given (created if missing). Ctrl-C stops it after the current step, with a checkpoint.
pub fn fit<B, T, D>(trainer: Trainer<B, T>, data: &D, session: &Session) -> Result<Summary>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: TrainData<B, Batch = T::Batch>,
    Trainer<B, T>: Send,
{
    let run_dir = trainer.run_dir_path().to_path_buf();
    std::fs::create_dir_all(&run_dir).map_err(|e| anyhow::anyhow!("{}: cannot create run directory: {e}", run_dir.display()))?;
    let control = Control::new();
    let trainer = trainer.control(control.clone());
    run(&run_dir, session, &control, |sink| trainer.fit(data, sink))
}

/// A run directory held by this process (its lock lives as long as this does), and where the
/// run continues from.
#[derive(Debug)]
pub struct RunDir {
    pub path: PathBuf,
    /// The checkpoint to resume from (`None`: from step 0).
    pub checkpoint: Option<PathBuf>,
    pub lock: RunLock,
}

/// A new run directory, locked: refused when it already holds a run with a checkpoint (continue
/// that one with [`resume_point`]) or when another process holds it. A run that failed before
/// its first checkpoint starts again in place, its log kept.
pub fn new_run_dir(dir: &Path) -> Result<RunDir> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: cannot create run directory: {e}", dir.display()))?;
    let lock = RunLock::acquire(dir).map_err(anyhow::Error::msg)?;
    if kiln_families::rundir::holds_checkpoints(dir) {
        anyhow::bail!("{}: already holds a run; continue it with --resume {} or choose another directory", dir.display(), dir.display());
    }
    Ok(RunDir { path: dir.to_path_buf(), checkpoint: None, lock })
}

/// Where a run continues, locked: its newest checkpoint that passes its checks (a line on stderr
/// for each thing passed over or repaired), or step 0 when it never saved one; the log is cut to
/// match (see [`kiln_families::prepare_resume`]).
pub fn resume_point(run_dir: &Path) -> Result<RunDir> {
    let lock = RunLock::acquire(run_dir).map_err(anyhow::Error::msg)?;
    let point = kiln_families::prepare_resume(run_dir)?;
    for line in &point.notes {
        eprintln!("kiln: warning: {line}");
    }
    Ok(RunDir { path: run_dir.to_path_buf(), checkpoint: point.checkpoint, lock })
}

/// SIGINT / SIGTERM: the first asks the trainer to finish its step, save and stop (resumable);
/// a second one ends the process at once. One handler per process: later calls keep the first.
fn install_stop_signals(control: &Control) {
    let control = control.clone();
    let _ = ctrlc::set_handler(move || {
        if control.stop_requested() {
            eprintln!("\nkiln: stopping now, without saving");
            std::process::exit(130);
        }
        eprintln!("\nkiln: stopping after this step and saving a checkpoint (again to quit at once)");
        control.request_stop();
    });
}
