//! Drawing the dashboard from a [`DashboardState`]: header with progress and ETA, throughput,
//! sync statistics, the loss chart, data, system and the log. Pure: a state in, a frame out, so
//! it is tested on ratatui's `TestBackend`.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Clear, Dataset, Gauge, GraphType, Paragraph, Sparkline};
use ratatui::Frame;

use crate::state::{DashboardState, Range};
use kiln_views::progress::thousands;

const ACCENT: Color = Color::Cyan;

pub fn draw(frame: &mut Frame, s: &DashboardState) {
    let [header, middle, chart, bottom, keys] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(6),
        Constraint::Min(8),
        Constraint::Length(6),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_header(frame, header, s);
    let [throughput, sync] = Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(middle);
    draw_throughput(frame, throughput, s);
    draw_sync(frame, sync, s);
    draw_loss(frame, chart, s);
    let [data, system, log] = Layout::horizontal([Constraint::Length(30), Constraint::Length(28), Constraint::Min(20)]).areas(bottom);
    draw_data(frame, data, s);
    draw_system(frame, system, s);
    draw_log(frame, log, s);
    draw_keys(frame, keys, s);
    if s.show_help {
        draw_help(frame, frame.area());
    }
}

fn block(title: &str) -> Block<'_> {
    Block::bordered().title(Span::styled(format!(" {title} "), Style::new().fg(ACCENT).add_modifier(Modifier::BOLD)))
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn draw_header(frame: &mut Frame, area: Rect, s: &DashboardState) {
    let (recipe, run_dir, device, params, sync_every, epochs) = match &s.info {
        Some(i) => (i.recipe.as_str(), i.run_dir.as_str(), i.device.as_str(), i.parameters, i.sync_interval, i.epochs),
        None => ("…", "…", "…", 0, 0, 0),
    };
    let title = format!("kiln · {recipe} · {}", s.mode);
    let outer = block(&title);
    let inner = outer.inner(area);
    frame.render_widget(outer, area);
    let [line, gauge] = Layout::vertical([Constraint::Length(1), Constraint::Length(1)]).areas(inner);
    let facts = format!("{run_dir} · device {device} · {} parameters · sync every {sync_every} steps", thousands(params as f64));
    frame.render_widget(Paragraph::new(facts), line);
    let (step, total) = (s.step(), s.total_steps());
    let ratio = if total > 0 { (step as f64 / total as f64).clamp(0.0, 1.0) } else { 0.0 };
    let eta = match (&s.summary, s.eta_s()) {
        (Some(sum), _) if sum.stopped => "stopped".to_string(),
        (Some(_), _) => "done".to_string(),
        (None, Some(t)) => format!("ETA {}", duration(t)),
        (None, None) => "ETA …".to_string(),
    };
    let label = format!("epoch {}/{epochs} · step {step}/{total} · {:.0} % · {} elapsed · {eta}", s.epoch(), ratio * 100.0, duration(s.wall_s()));
    frame.render_widget(Gauge::default().gauge_style(Style::new().fg(ACCENT).bg(Color::Black)).ratio(ratio).label(label), gauge);
}

fn draw_throughput(frame: &mut Frame, area: Rect, s: &DashboardState) {
    let outer = block("throughput");
    let inner = outer.inner(area);
    frame.render_widget(outer, area);
    let [text, spark] = Layout::vertical([Constraint::Length(2), Constraint::Min(1)]).areas(inner);
    let (sent, steps) = s.rates();
    let tok = s.last().map(|w| w.tokens_per_s).unwrap_or(0.0);
    // Data parallel: each node's share of the last window (several nodes), else each device's.
    let rates = |tokens: &[u64], window_s: f64| tokens.iter().map(|t| thousands(*t as f64 / window_s)).collect::<Vec<_>>().join(" | ");
    let per_replica = s.last().filter(|w| w.window_s > 0.0).and_then(|w| match (w.node_tokens.is_empty(), w.device_tokens.is_empty()) {
        (false, _) => Some(format!("per node {}", rates(&w.node_tokens, w.window_s))),
        (true, false) => Some(format!("per device {}", rates(&w.device_tokens, w.window_s))),
        (true, true) => None,
    });
    let lines = vec![
        Line::from(vec![Span::styled(format!("{} tok/s", thousands(tok)), Style::new().add_modifier(Modifier::BOLD)), Span::raw(format!("  {sent:.1} sent/s"))]),
        Line::from(match per_replica {
            Some(shares) => format!("{steps:.2} steps/s · {shares} tok/s"),
            None => format!("{steps:.2} steps/s"),
        }),
    ];
    frame.render_widget(Paragraph::new(lines), text);
    let width = spark.width as usize;
    let shown = s.shown();
    let history: Vec<u64> = shown[shown.len().saturating_sub(width)..].iter().map(|w| w.tokens_per_s.max(0.0) as u64).collect();
    frame.render_widget(Sparkline::default().data(&history).style(Style::new().fg(Color::Green)), spark);
}

fn draw_sync(frame: &mut Frame, area: Rect, s: &DashboardState) {
    let f = s.sync_figures();
    let lines = vec![
        Line::from(vec![
            Span::styled(format!("{} syncs", f.count), Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!(" · {:.1} steps/sync", f.steps_per_sync)),
        ]),
        Line::from(format!("last {:.3} ms · avg {:.3} ms · max {:.3} ms", f.last_ms, f.avg_ms, f.max_ms)),
    ];
    let mut lines = lines;
    match s.last().and_then(|w| w.reduce.map(|r| (r, w.wall_s))) {
        // Data parallel: the steps' all-reduces are syncs too (across nodes, the wait on them).
        Some((r, wall_s)) => {
            lines.push(Line::from(format!("in sync: {:.3} % of wall · window {} steps, {:.3} %", f.wall_pct, f.window_steps, f.window_pct)));
            let pct = if wall_s > 0.0 { 100.0 * r.total_ms / 1e3 / wall_s } else { 0.0 };
            lines.push(Line::from(format!("all-reduce: {} · avg {:.2} ms · max {:.2} ms · {pct:.1} % of wall", r.count, r.avg_ms(), r.max_ms)));
        }
        None => {
            lines.push(Line::from(format!("in sync: {:.3} % of wall", f.wall_pct)));
            lines.push(Line::from(format!("this window: {} steps, {:.3} % in its sync", f.window_steps, f.window_pct)));
        }
    }
    frame.render_widget(Paragraph::new(lines).block(block("sync · device→host reads")), area);
}

fn draw_loss(frame: &mut Frame, area: Rect, s: &DashboardState) {
    let shown = s.shown();
    let train: Vec<(f64, f64)> = shown.iter().filter(|w| w.loss.is_finite()).map(|w| (w.step as f64, w.loss)).collect();
    let x_min = train.first().map(|p| p.0).unwrap_or(0.0);
    let x_max = train.last().map(|p| p.0).unwrap_or(1.0).max(x_min + 1.0);
    let valid: Vec<(f64, f64)> = s.valids.iter().filter(|v| v.loss.is_finite() && v.step as f64 >= x_min).map(|v| (v.step as f64, v.loss)).collect();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(_, y) in train.iter().chain(&valid) {
        lo = lo.min(y);
        hi = hi.max(y);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(0.01);
    let (lo, hi) = ((lo - pad).max(0.0), hi + pad);
    let lr = s.last().map(|w| format!("{:.2e}", w.lr)).unwrap_or_else(|| "-".into());
    let last_valid = s.valids.last().map(|v| {
        let bleu = v.bleu.map(|b| format!(" · BLEU {b:.2}")).unwrap_or_default();
        format!(" · valid {:.3} (ppl {:.1}){bleu}", v.loss, v.ppl)
    });
    let range = match s.range {
        Range::All => "all",
        Range::Recent => "recent",
    };
    let title = format!(
        "loss · train {}{} · lr {lr} · range {range}",
        s.last().map(|w| format!("{:.3}", w.loss)).unwrap_or_else(|| "-".into()),
        last_valid.unwrap_or_default()
    );
    let datasets = vec![
        Dataset::default().name("train").marker(Marker::Braille).graph_type(GraphType::Line).style(Style::new().fg(Color::Cyan)).data(&train),
        Dataset::default().name("valid").marker(Marker::Dot).graph_type(GraphType::Scatter).style(Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)).data(&valid),
    ];
    let label = |v: f64| Span::raw(format!("{v:.2}"));
    let chart = Chart::new(datasets)
        .block(block(&title))
        .x_axis(Axis::default().bounds([x_min, x_max]).labels([Span::raw(format!("{x_min:.0}")), Span::raw(format!("{:.0}", (x_min + x_max) / 2.0)), Span::raw(format!("{x_max:.0}"))]))
        .y_axis(Axis::default().bounds([lo, hi]).labels([label(lo), label((lo + hi) / 2.0), label(hi)]));
    frame.render_widget(chart, area);
}

fn draw_data(frame: &mut Frame, area: Rect, s: &DashboardState) {
    let last = s.last();
    let capacity = s.info.as_ref().map(|i| i.prefetch).filter(|&c| c > 0).map(|c| format!("/{c}")).unwrap_or_default();
    let lines = vec![
        Line::from(format!("wait {:.2} % of train time", s.data_wait_pct())),
        Line::from(format!("prefetch queue {}{capacity}", last.map(|w| w.prefetch_ready).unwrap_or(0))),
        Line::from(format!(
            "cache {}",
            match s.cache_hit {
                Some(true) => "hit",
                Some(false) => "miss",
                None => "-",
            }
        )),
        Line::from(format!("padding {:.1} %", last.map(|w| w.padding_pct).unwrap_or(0.0))),
    ];
    frame.render_widget(Paragraph::new(lines).block(block("data")), area);
}

fn draw_system(frame: &mut Frame, area: Rect, s: &DashboardState) {
    let last = s.last();
    let gpu = match s.gpu {
        Some((util, used, total)) => format!("GPU {util:.0} % · {used:.0}/{total:.0} MiB"),
        None => "GPU -".to_string(),
    };
    let mut lines = vec![
        Line::from(format!("CPU {:.0} %", last.map(|w| w.cpu_pct).unwrap_or(0.0))),
        Line::from(format!("RSS {:.0} MiB", last.map(|w| w.rss_mb).unwrap_or(0.0))),
        Line::from(gpu),
    ];
    // CubeCL's pools on the device (wgpu, CUDA): what tensors use and what the pools hold.
    if let Some((used, reserved)) = last.and_then(|w| w.device_mb.zip(w.device_reserved_mb)) {
        lines.push(Line::from(format!("device {used:.0}/{reserved:.0} MiB")));
    }
    frame.render_widget(Paragraph::new(lines).block(block("system")), area);
}

fn draw_log(frame: &mut Frame, area: Rect, s: &DashboardState) {
    // One line per note, newest at the bottom, cut at the panel's width (the files keep them whole).
    let height = area.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = s.notes.iter().rev().take(height).rev().map(|n| Line::from(n.as_str())).collect();
    let title = if s.malformed_lines > 0 { format!("log · {} malformed metrics.jsonl lines skipped", s.malformed_lines) } else { "log".to_string() };
    frame.render_widget(Paragraph::new(lines).block(block(&title)), area);
}

fn draw_keys(frame: &mut Frame, area: Rect, s: &DashboardState) {
    let keys = if s.controls { " q stop & save · p pause · tab range · ? help " } else { " q quit · tab range · ? help " };
    let mut spans = vec![Span::raw(keys)];
    if s.paused {
        spans.push(Span::styled(" PAUSED ", Style::new().fg(Color::Black).bg(Color::Yellow)));
    }
    if s.stopping {
        spans.push(Span::styled(" STOPPING: finishing the step, saving… ", Style::new().fg(Color::Black).bg(Color::Red)));
    }
    if s.finished {
        spans.push(Span::styled(" FINISHED ", Style::new().fg(Color::Black).bg(Color::Green)));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_help(frame: &mut Frame, area: Rect) {
    let w = 62.min(area.width);
    let h = 12.min(area.height);
    let popup = Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h };
    let text = vec![
        Line::from("q / Ctrl-C  finish the step, save a checkpoint, exit (resumable)"),
        Line::from("p           pause / resume training"),
        Line::from("tab         chart range: all windows / recent"),
        Line::from("?           this help"),
        Line::from(""),
        Line::from("sync: device→host reads of the training loss, one per"),
        Line::from("window of train.sync_interval steps; the time they wait"),
        Line::from("is time the host could not queue work."),
    ];
    frame.render_widget(Clear, popup);
    frame.render_widget(Paragraph::new(text).block(block("help")), popup);
}
