//! Render tests on ratatui's `TestBackend`: the panels show the figures fed to them, and `watch`
//! on a recorded run directory (a real smoke run, `tests/fixtures/smoke-run/`) shows its end.

use std::path::{Path, PathBuf};

use kiln_dashboard::render::draw;
use kiln_dashboard::state::{DashboardState, Range};
use kiln_dashboard::load_run;
use kiln_events::{Event, RunInfo, SyncStats, ValidRow, WindowRow};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

fn screen(state: &DashboardState, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| draw(f, state)).unwrap();
    let buffer = terminal.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..height {
        for x in 0..width {
            out.push_str(buffer[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}

fn info() -> RunInfo {
    RunInfo {
        recipe: "quickstart".into(),
        run_dir: "runs/quickstart/t".into(),
        device: "cpu (flex, 2 threads)".into(),
        epochs: 4,
        steps_per_epoch: 277,
        total_steps: 1108,
        start_step: 0,
        start_epoch: 0,
        parameters: 3_100_000,
        vocab_size: 4000,
        train_examples: 14912,
        valid_examples: 500,
        sync_interval: 10,
        prefetch: 8,
        commit: String::new(),
    }
}

fn window(step: usize, tokens_per_s: f64, sync_ms: f64, sync: SyncStats) -> WindowRow {
    WindowRow {
        epoch: 2,
        step,
        loss: 4.25,
        tokens: 12_000,
        tokens_per_s,
        lr: 4.2e-4,
        sync,
        sync_ms,
        steps: 10,
        wall_s: 120.0,
        padding_pct: 4.5,
        data_wait_ms: 30.0,
        sentences: 500,
        window_s: 10.0,
        prefetch_ready: 6,
        rss_mb: 512.0,
        cpu_pct: 190.0,
        device_mb: Some(12.4),
        device_reserved_mb: Some(48.0),
        device_tokens: vec![],
        node_tokens: vec![],
        reduce: None,
        overflow_skips: 0,
        loss_scale: None,
        grad_norm: None,
        grad_norm_max: None,
        metrics: Default::default(),
    }
}

#[test]
fn sync_and_throughput_panels_show_the_figures_fed_to_them() {
    let mut s = DashboardState::new("live");
    s.controls = true;
    s.apply(&Event::RunStarted(info()));
    s.apply(&Event::Window(window(410, 11_000.0, 0.5, SyncStats { count: 41, total_ms: 10.25, max_ms: 1.5 })));
    s.apply(&Event::Window(window(420, 12_345.6, 0.75, SyncStats { count: 42, total_ms: 11.0, max_ms: 1.5 })));
    s.apply(&Event::Validation(ValidRow { epoch: 1, step: 277, loss: 4.5, ppl: 90.0, bleu: Some(1.25), metrics: Default::default(), set: None, samples: Vec::new() }));
    let text = screen(&s, 140, 40);
    // Throughput: tokens/s, sentences/s (500 in 10 s), steps/s (10 in 10 s).
    for needle in ["12,346 tok/s", "50.0 sent/s", "1.00 steps/s"] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    // Sync: 42 syncs at step 420, last/avg/max, share of wall (11 ms of 120 s) and of the window.
    for needle in ["42 syncs", "10.0 steps/sync", "last 0.750 ms", "avg 0.262 ms", "max 1.500 ms", "0.009 % of wall", "10 steps, 0.007 % in its sync"] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    // Header, data, system and chart title.
    for needle in ["step 420/1108", "epoch 2/4", "prefetch queue 6/8", "padding 4.5 %", "CPU 190 %", "RSS 512 MiB", "device 12/48 MiB", "valid 4.500", "BLEU 1.25", "lr 4.20e-4"] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    assert!(text.contains("q stop & save"), "{text}");

    // Tab: the recent range; ? : help over the panels.
    s.range = Range::Recent;
    s.show_help = true;
    let text = screen(&s, 140, 40);
    assert!(text.contains("range recent") && text.contains("pause / resume training"), "{text}");
}

/// Data parallel: the throughput panel shows each device's tokens/s of the last window.
#[test]
fn the_throughput_panel_shows_each_devices_rate_under_data_parallel() {
    let mut s = DashboardState::new("live");
    s.apply(&Event::RunStarted(info()));
    let one = window(410, 11_000.0, 0.5, SyncStats { count: 41, total_ms: 10.25, max_ms: 1.5 });
    s.apply(&Event::Window(one.clone()));
    assert!(!screen(&s, 140, 40).contains("per device"), "one device: no per-device line");
    s.apply(&Event::Window(WindowRow { device_tokens: vec![61_000, 59_000], ..one }));
    let text = screen(&s, 140, 40);
    assert!(text.contains("per device 6,100 | 5,900 tok/s"), "{text}");
}

/// Several nodes: each node's tokens/s, and the steps' all-reduce time in the sync panel.
#[test]
fn the_dashboard_shows_each_nodes_rate_and_the_all_reduce_time() {
    let mut s = DashboardState::new("live");
    s.apply(&Event::RunStarted(info()));
    let one = window(410, 11_000.0, 0.5, SyncStats { count: 41, total_ms: 10.25, max_ms: 1.5 });
    s.apply(&Event::Window(one.clone()));
    assert!(!screen(&s, 140, 40).contains("all-reduce"), "one device: no all-reduce line");
    let reduce = SyncStats { count: 400, total_ms: 2_000.0, max_ms: 40.0 };
    s.apply(&Event::Window(WindowRow { device_tokens: vec![61_000, 59_000], node_tokens: vec![61_000, 59_000], reduce: Some(reduce), ..one }));
    let text = screen(&s, 140, 40);
    assert!(text.contains("per node 6,100 | 5,900 tok/s"), "{text}");
    assert!(text.contains("all-reduce: 400 · avg 5.00 ms · max 40.00 ms"), "{text}");
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smoke-run")
}

#[test]
fn watch_on_a_recorded_run_renders_its_final_state() {
    let s = load_run(&fixture()).unwrap();
    assert!(s.finished);
    assert_eq!(s.malformed_lines, 0);
    let text = screen(&s, 140, 40);
    for needle in ["kiln · smoke · replay", "step 40/40", "FINISHED", "4 syncs", "9,763 tok/s", "valid 4.896", "cache hit", "q quit"] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
}

#[test]
fn watch_skips_malformed_lines_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["recipe.toml", "metrics.jsonl", "summary.json"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let mut lines: Vec<&str> = metrics.lines().collect();
    lines.insert(3, "{\"kind\":\"train\",\"step\":");
    lines.insert(5, "garbage");
    std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let s = load_run(dir.path()).unwrap();
    assert_eq!(s.malformed_lines, 2);
    assert_eq!(s.windows.len(), 4, "the good rows are all there");
    let text = screen(&s, 140, 40);
    assert!(text.contains("2 malformed metrics.jsonl lines skipped"), "{text}");
    assert!(load_run(&dir.path().join("nope")).unwrap_err().contains("not a kiln run directory"));
}
