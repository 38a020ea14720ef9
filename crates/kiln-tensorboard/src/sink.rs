//! The sink: kiln's events as TensorBoard points, flushed per event (a killed run loses none it
//! emitted) and made durable at each checkpoint, as `metrics.jsonl` is.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_events::{Event, EventSink, Sample, Summary as RunSummary, ValidRow, WindowRow};
use prost::Message;

use crate::proto::{self, HParam, SessionLog, Summary, Value, What};
use crate::record::{whole_length, write_record};

/// Writes `<run>/tb/events.out.tfevents.<seconds>.<host>.kiln` from a run's events; a resumed
/// run continues the same file.
pub struct TensorBoard {
    run_dir: PathBuf,
    out: Option<(PathBuf, BufWriter<File>)>,
}

const PREFIX: &str = "events.out.tfevents.";
const SUFFIX: &str = ".kiln";

impl TensorBoard {
    /// For the run in `run_dir`; nothing is written before the run starts.
    pub fn new(run_dir: &Path) -> Self {
        Self { run_dir: run_dir.to_path_buf(), out: None }
    }

    /// The event file this process writes, once the run has started.
    pub fn path(&self) -> Option<&Path> {
        self.out.as_ref().map(|(p, _)| p.as_path())
    }

    /// Opens the run's event file: the latest one an earlier process of the run wrote, continued
    /// after its last whole record (a killed writer may have torn the one after), or a new one.
    /// One file per run, so that TensorBoard's reader, which reads a directory's files in name
    /// order, sees the processes' points in the order they were written. A file damaged inside
    /// (a checksum fails) is left as it is and a new file follows it. `true`: an earlier
    /// process's points are there.
    fn open(&mut self) -> Result<bool, String> {
        let dir = self.run_dir.join("tb");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
        let latest: Option<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: cannot read: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX)))
            .max();
        if let Some(path) = latest.clone() {
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
            if let Ok(keep) = whole_length(&bytes) {
                let mut file = OpenOptions::new().write(true).open(&path).map_err(|e| format!("{}: cannot open for writing: {e}", path.display()))?;
                file.set_len(keep as u64).map_err(|e| format!("{}: cannot cut a torn record: {e}", path.display()))?;
                file.seek(SeekFrom::End(0)).map_err(|e| format!("{}: {e}", path.display()))?;
                self.out = Some((path, BufWriter::new(file)));
                if keep == 0 {
                    self.write(0, What::FileVersion("brain.Event:2".into()))?;
                }
                return Ok(keep > 0);
            }
        }
        let earlier = latest.is_some();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty() && !h.contains('/')).unwrap_or_else(|| "localhost".into());
        let mut secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        // A name not taken yet (a damaged file of this second keeps its own).
        let (path, file) = loop {
            let path = dir.join(format!("{PREFIX}{secs}.{host}{SUFFIX}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => secs += 1,
                Err(e) => return Err(format!("{}: cannot create: {e}", path.display())),
            }
        };
        self.out = Some((path, BufWriter::new(file)));
        self.write(0, What::FileVersion("brain.Event:2".into()))?;
        Ok(earlier)
    }

    fn write(&mut self, step: usize, what: What) -> Result<(), String> {
        let Some((path, out)) = self.out.as_mut() else { return Ok(()) };
        let wall_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let event = proto::Event { wall_time, step: step as i64, what: Some(what) };
        write_record(out, &event.encode_to_vec()).and_then(|()| out.flush()).map_err(|e| format!("{}: cannot write: {e}", path.display()))
    }

    fn points(&mut self, step: usize, value: Vec<Value>) -> Result<(), String> {
        if value.is_empty() {
            return Ok(());
        }
        self.write(step, What::Summary(Summary { value }))
    }

    /// Points past `step` logged before now no longer describe the run (a resume from `step`'s
    /// checkpoint, or a rollback to it): TensorBoard's reader drops them at this record.
    fn restart_after(&mut self, step: usize) -> Result<(), String> {
        let log = SessionLog { status: proto::SESSION_START, checkpoint_path: String::new(), msg: format!("kiln: continued from step {step}") };
        self.write(step + 1, What::SessionLog(log))
    }

    /// The file made durable up to here (at each checkpoint, as `metrics.jsonl`).
    fn sync(&mut self) -> Result<(), String> {
        let Some((path, out)) = self.out.as_mut() else { return Ok(()) };
        out.flush().and_then(|()| out.get_ref().sync_data()).map_err(|e| format!("{}: cannot sync: {e}", path.display()))
    }

    /// The run's start: the recipe as text and its keys as hyperparameters, from the run
    /// directory's `recipe.toml` (absent for a library run without one).
    fn describe_run(&mut self, step: usize) -> Result<(), String> {
        let Ok(text) = std::fs::read_to_string(self.run_dir.join("recipe.toml")) else { return Ok(()) };
        let mut points = vec![Value::text("recipe", &format!("```toml\n{}\n```", text.trim_end()))];
        if let Ok(table) = text.parse::<toml::Table>() {
            let mut hparams = BTreeMap::new();
            flatten("", &toml::Value::Table(table), &mut hparams);
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            points.push(Value::hparams(hparams, now));
        }
        self.points(step, points)
    }
}

/// A recipe's keys as `section.key` hyperparameters: numbers, strings and booleans as they are,
/// arrays and tables of arrays (devices, corpora, dev sets) as their TOML text.
fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, HParam>) {
    let param = match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten(&name, value, out);
            }
            return;
        }
        toml::Value::Integer(n) => HParam::Number(*n as f64),
        toml::Value::Float(x) => HParam::Number(*x),
        toml::Value::Boolean(b) => HParam::Bool(*b),
        toml::Value::String(s) => HParam::Text(s.clone()),
        other => HParam::Text(other.to_string()),
    };
    out.insert(prefix.to_string(), param);
}

/// The scalars of a sync window.
pub fn window_points(w: &WindowRow) -> Vec<Value> {
    let mut points = vec![
        Value::scalar("train/loss", w.loss),
        Value::scalar("train/lr", w.lr),
        Value::scalar("train/tokens_per_s", w.tokens_per_s),
        Value::scalar("train/sync_ms", w.sync_ms),
        Value::scalar("train/data_wait_ms", w.data_wait_ms),
        Value::scalar("train/padding_pct", w.padding_pct),
    ];
    let optional = [("train/grad_norm", w.grad_norm), ("train/grad_norm_max", w.grad_norm_max), ("train/loss_scale", w.loss_scale)];
    points.extend(optional.into_iter().filter_map(|(tag, v)| v.map(|v| Value::scalar(tag, v))));
    points.extend(w.metrics.iter().map(|(name, v)| Value::scalar(format!("train/{name}"), *v)));
    points
}

/// The scalars of a validation: `valid/…`, or `valid_<name>/…` for a named set; its sample
/// translations as a text table.
pub fn validation_points(v: &ValidRow) -> Vec<Value> {
    let prefix = match &v.set {
        Some(name) => format!("valid_{name}"),
        None => "valid".to_string(),
    };
    let mut points = vec![Value::scalar(format!("{prefix}/loss"), v.loss), Value::scalar(format!("{prefix}/ppl"), v.ppl)];
    if let Some(bleu) = v.bleu {
        points.push(Value::scalar(format!("{prefix}/bleu"), bleu));
    }
    points.extend(v.metrics.iter().map(|(name, x)| Value::scalar(format!("{prefix}/{name}"), *x)));
    if !v.samples.is_empty() {
        points.push(Value::text(format!("{prefix}/samples"), &samples_table(&v.samples)));
    }
    points
}

/// Samples as a markdown table (TensorBoard's text tab renders markdown).
pub fn samples_table(samples: &[Sample]) -> String {
    // A cell is one line, its pipes escaped.
    let cell = |s: &str| s.replace('\\', "\\\\").replace('|', "\\|").replace(['\n', '\r'], " ");
    let mut table = String::from("| source | reference | translation |\n|---|---|---|\n");
    for s in samples {
        table.push_str(&format!("| {} | {} | {} |\n", cell(&s.source), cell(&s.reference), cell(&s.hypothesis)));
    }
    table
}

/// The final figures on the test split, at the run's last step.
fn test_points(summary: &RunSummary) -> Vec<Value> {
    let Some(test) = &summary.test else { return Vec::new() };
    let mut points = vec![Value::scalar("test/loss", test.loss), Value::scalar("test/ppl", test.ppl)];
    if let Some(bleu) = test.bleu {
        points.push(Value::scalar("test/bleu", bleu));
    }
    points.extend(test.metrics.iter().map(|(name, x)| Value::scalar(format!("test/{name}"), *x)));
    points
}

impl EventSink for TensorBoard {
    fn emit(&mut self, event: &Event) -> Result<(), String> {
        match event {
            Event::RunStarted(info) => {
                // A resume (or a run started again in place after a kill before its first
                // checkpoint) drops what the earlier process logged past where this one starts.
                if self.open()? {
                    self.restart_after(info.start_step)?;
                }
                self.describe_run(info.start_step)
            }
            Event::Window(w) => self.points(w.step, window_points(w)),
            Event::Validation(v) => self.points(v.step, validation_points(v)),
            Event::Checkpoint { .. } => self.sync(),
            Event::Rollback { step } => self.restart_after(*step),
            Event::Finished(summary) => {
                self.points(summary.steps, test_points(summary))?;
                self.sync()
            }
            Event::Data(_) | Event::Note(_) | Event::Progress(_) | Event::EpochEnd { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cells stay cells: pipes escaped, lines joined.
    #[test]
    fn samples_are_one_table_row_each() {
        let table = samples_table(&[Sample { source: "a | b".into(), reference: "two\nlines".into(), hypothesis: "x".into() }]);
        assert_eq!(table.lines().nth(2), Some("| a \\| b | two lines | x |"));
        assert_eq!(table.lines().count(), 3);
    }

    /// Every scalar key of a recipe becomes a hyperparameter under its dotted name.
    #[test]
    fn recipe_keys_flatten_to_dotted_hparams() {
        let table: toml::Table = "name = \"q\"\n[train]\nlr = 5e-4\nepochs = 3\nema = true\n[backend]\ndevices = [\"cpu\", \"cpu\"]\n".parse().unwrap();
        let mut out = BTreeMap::new();
        flatten("", &toml::Value::Table(table), &mut out);
        assert_eq!(out["name"], HParam::Text("q".into()));
        assert_eq!(out["train.lr"], HParam::Number(5e-4));
        assert_eq!(out["train.epochs"], HParam::Number(3.0));
        assert_eq!(out["train.ema"], HParam::Bool(true));
        assert_eq!(out["backend.devices"], HParam::Text("[\"cpu\", \"cpu\"]".into()));
        assert_eq!(out.len(), 5);
    }
}
