//! The dashboard as a running thing: a thread that owns the terminal, takes events from a
//! channel (so the trainer never waits on it), redraws at most ten times a second and turns keys
//! into [`Control`] requests. `watch` runs the same view over a run directory's files.
//!
//! The terminal is restored when the thread ends (the event channel closes, or `q` in `watch`)
//! and, through ratatui's panic hook, on a panic anywhere in the process. In raw mode Ctrl-C
//! arrives as a key, and is handled as `q`.

use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_events::{Control, Event, EventSink};
use ratatui::crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};

use crate::render;
use crate::state::{DashboardState, Range};
use crate::watch::RunFollower;

const FRAME: Duration = Duration::from_millis(100);

/// The trainer's side: sending never blocks (an unbounded channel; events are small and few).
pub struct DashboardSink {
    tx: Sender<Event>,
}

impl EventSink for DashboardSink {
    fn emit(&mut self, event: &Event) -> Result<(), String> {
        // A dashboard that has gone (its terminal failed) must not stop the training.
        let _ = self.tx.send(event.clone());
        Ok(())
    }
}

/// The dashboard thread; `finish` waits for it to restore the terminal.
pub struct DashboardThread {
    handle: JoinHandle<Result<(), String>>,
}

impl DashboardThread {
    pub fn finish(self) -> Result<(), String> {
        self.handle.join().unwrap_or_else(|_| Err("the dashboard thread panicked".into()))
    }
}

/// Starts the live dashboard of a training run. Drop every clone of the sink (the end of the run)
/// to close it.
pub fn start_live(control: Control) -> Result<(DashboardSink, DashboardThread), String> {
    let (tx, rx) = channel();
    let terminal = ratatui::try_init().map_err(|e| format!("cannot open the terminal dashboard: {e}"))?;
    let handle = std::thread::Builder::new()
        .name("kiln-dashboard".into())
        .spawn(move || {
            let result = live_loop(terminal, rx, control);
            ratatui::restore();
            result
        })
        .map_err(|e| format!("cannot start the dashboard thread: {e}"))?;
    Ok((DashboardSink { tx }, DashboardThread { handle }))
}

fn live_loop(mut terminal: ratatui::DefaultTerminal, rx: Receiver<Event>, control: Control) -> Result<(), String> {
    let mut state = DashboardState::new("live");
    state.controls = true;
    let mut gpu = GpuSampler::default();
    let mut last_draw: Option<Instant> = None;
    let mut dirty = true;
    loop {
        loop {
            match rx.try_recv() {
                Ok(e) => {
                    state.apply(&e);
                    dirty = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(()),
            }
        }
        if state.paused != control.paused() {
            state.paused = control.paused();
            dirty = true;
        }
        if let Some(g) = gpu.sample(&state) {
            state.gpu = Some(g);
        }
        if dirty && last_draw.is_none_or(|t| t.elapsed() >= FRAME) {
            terminal.draw(|f| render::draw(f, &state)).map_err(|e| format!("dashboard: {e}"))?;
            last_draw = Some(Instant::now());
            dirty = false;
        }
        if event::poll(Duration::from_millis(30)).map_err(|e| format!("dashboard: {e}"))? {
            dirty = true;
            match key(event::read().map_err(|e| format!("dashboard: {e}"))?) {
                Some(Key::Quit) => {
                    control.request_stop();
                    state.stopping = true;
                }
                Some(Key::Pause) => state.paused = control.toggle_pause(),
                Some(other) => other.apply(&mut state),
                None => {}
            }
        }
    }
}

/// `watch`: the dashboard over a run directory, following its files until `q`.
pub fn watch(run_dir: &Path) -> Result<(), String> {
    let mut follower = RunFollower::open(run_dir)?;
    let mut state = DashboardState::new("watching");
    follower.update(&mut state)?;
    let mut terminal = ratatui::try_init().map_err(|e| format!("cannot open the terminal dashboard: {e}"))?;
    let result = (|| -> Result<(), String> {
        let mut last_poll = Instant::now();
        let mut dirty = true;
        loop {
            if last_poll.elapsed() >= Duration::from_millis(250) {
                dirty |= follower.update(&mut state)?;
                last_poll = Instant::now();
            }
            if dirty {
                terminal.draw(|f| render::draw(f, &state)).map_err(|e| format!("watch: {e}"))?;
                dirty = false;
            }
            if event::poll(FRAME).map_err(|e| format!("watch: {e}"))? {
                dirty = true;
                match key(event::read().map_err(|e| format!("watch: {e}"))?) {
                    Some(Key::Quit) => return Ok(()),
                    Some(other) => other.apply(&mut state),
                    None => {}
                }
            }
        }
    })();
    ratatui::restore();
    result
}

enum Key {
    Quit,
    Pause,
    Help,
    Range,
}

impl Key {
    fn apply(self, state: &mut DashboardState) {
        match self {
            Key::Help => state.show_help = !state.show_help,
            Key::Range => {
                state.range = match state.range {
                    Range::All => Range::Recent,
                    Range::Recent => Range::All,
                }
            }
            Key::Quit | Key::Pause => {}
        }
    }
}

fn key(e: TermEvent) -> Option<Key> {
    let TermEvent::Key(k) = e else { return None };
    if k.kind != KeyEventKind::Press {
        return None;
    }
    match k.code {
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Some(Key::Quit),
        KeyCode::Char('q') => Some(Key::Quit),
        KeyCode::Char('p') => Some(Key::Pause),
        KeyCode::Char('?') | KeyCode::Char('h') => Some(Key::Help),
        KeyCode::Tab => Some(Key::Range),
        _ => None,
    }
}

/// GPU utilisation and memory from `nvidia-smi`, every two seconds, for CUDA runs only.
#[derive(Default)]
struct GpuSampler {
    last: Option<Instant>,
    broken: bool,
}

impl GpuSampler {
    fn sample(&mut self, state: &DashboardState) -> Option<(f64, f64, f64)> {
        let device = &state.info.as_ref()?.device;
        let index = device.strip_prefix("cuda:")?.split(|c: char| !c.is_ascii_digit()).next()?.to_string();
        if self.broken || self.last.is_some_and(|t| t.elapsed() < Duration::from_secs(2)) {
            return None;
        }
        self.last = Some(Instant::now());
        let out = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=utilization.gpu,memory.used,memory.total", "--format=csv,noheader,nounits", "-i", &index])
            .output();
        let parsed = out.ok().filter(|o| o.status.success()).and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let v: Vec<f64> = text.trim().split(',').filter_map(|x| x.trim().parse().ok()).collect();
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        });
        if parsed.is_none() {
            self.broken = true;
        }
        parsed
    }
}
