//! TensorBoard event files from every run (`<run>/tb/`): kiln's reader checks them against
//! `metrics.jsonl` everywhere (and `tests/reliability.rs` after each of its kills); where a Python
//! with the `tensorboard` package is found, TensorBoard's own reader (EventAccumulator, with the
//! hparams plugin's protobuf) reads the same figures. `KILN_TENSORBOARD_PYTHON` names that Python
//! and makes the tier required (CI sets it).

mod common;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn python_with_tensorboard() -> Option<String> {
    if let Ok(py) = std::env::var("KILN_TENSORBOARD_PYTHON") {
        return Some(py);
    }
    let candidates = [root().join("benches/peer/.venv/bin/python").display().to_string(), "python3".into()];
    candidates.into_iter().find(|py| Command::new(py).args(["-c", "import tensorboard"]).output().is_ok_and(|o| o.status.success()))
}

/// The run's files as TensorBoard's reader loads them (`scripts/tb_read.py`), or `None` where no
/// Python with TensorBoard is installed (and none is required).
fn read_with_tensorboard(run: &Path) -> Option<Value> {
    let Some(py) = python_with_tensorboard() else {
        eprintln!("TensorBoard tier skipped: no Python with the tensorboard package (pip install tensorboard)");
        return None;
    };
    let o = Command::new(&py).arg(root().join("scripts/tb_read.py")).arg(run.join("tb")).output().unwrap_or_else(|e| panic!("{py}: {e}"));
    assert!(o.status.success(), "{py} scripts/tb_read.py: {}", String::from_utf8_lossy(&o.stderr));
    Some(serde_json::from_slice(&o.stdout).unwrap())
}

/// TensorBoard's reader holds every scalar kiln's reader holds, point for point, and no other.
fn assert_tensorboard_agrees(board: &kiln_tensorboard::read::Board, theirs: &Value) {
    let scalars = theirs["scalars"].as_object().unwrap();
    let mut tags: Vec<&String> = scalars.keys().collect();
    tags.sort();
    assert_eq!(tags, board.scalars.keys().collect::<Vec<_>>(), "the same tags");
    for (tag, points) in &board.scalars {
        let read: Vec<(i64, f32)> = scalars[tag].as_array().unwrap().iter().map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32)).collect();
        assert_eq!(&read, points, "{tag}: TensorBoard's reader");
    }
}

/// A run stopped by `max_steps` and resumed: every window's and validation's figures in the
/// event file exactly as in `metrics.jsonl` (the gradient norm too), three sample translations
/// per validation, the test figures, the recipe as text and as hyperparameters, one restart
/// marker for the resume, one file; TensorBoard's reader agrees.
#[test]
fn every_run_writes_tensorboard_files_equal_to_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = train_with(&smoke(), &run, &["train.max_steps=25", "train.sync_interval=5", "eval.bleu_sentences=4"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = kiln(&["train", "--resume", &run.display().to_string(), "--set", "train.max_steps=50", "--no-tui"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let board = assert_board_matches_metrics(&run);
    let rows = read_jsonl(&run.join("metrics.jsonl"));
    let losses = &board.scalars["train/loss"];
    assert!(losses.len() >= 10 && losses.last().unwrap().0 == 50, "every window to step 50: {losses:?}");
    let norms: Vec<(i64, f32)> = rows.iter().filter(|r| r["kind"] == "train").map(|r| (r["step"].as_i64().unwrap(), r["grad_norm"].as_f64().expect("grad_norm in every window") as f32)).collect();
    assert_eq!(board.scalars["train/grad_norm"], norms);
    assert!(norms.iter().all(|(_, n)| *n > 0.0));
    assert_eq!(board.restarts, 1, "the resume marks its restart");
    assert!(board.texts["recipe"].iter().all(|(_, t)| t.contains("[model]")), "the recipe as text");
    let valid_steps: Vec<i64> = rows.iter().filter(|r| r["kind"] == "valid").map(|r| r["step"].as_i64().unwrap()).collect();
    let samples = &board.texts["valid/samples"];
    assert_eq!(samples.iter().map(|s| s.0).collect::<Vec<_>>(), valid_steps, "samples at every validation");
    assert!(samples.iter().all(|(_, t)| t.lines().count() == 2 + 3 && t.starts_with("| source | reference | translation |")), "{samples:?}");
    let summary = read_json(&run.join("summary.json"));
    // Each process that finished evaluated the test split: the last one is the summary's.
    assert_eq!(board.scalars["test/loss"].last(), Some(&(50, summary["test"]["loss"].as_f64().unwrap() as f32)));
    assert_eq!(std::fs::read_dir(run.join("tb")).unwrap().count(), 1, "one event file per run");

    let Some(theirs) = read_with_tensorboard(&run) else { return };
    assert_tensorboard_agrees(&board, &theirs);
    assert_eq!(theirs["texts"]["valid/samples"].as_array().unwrap().len(), valid_steps.len());
    let hparams = &theirs["hparams"];
    assert_eq!(hparams["train.lr"].as_f64(), Some(3e-3), "{hparams}");
    assert_eq!(hparams["model.d_model"].as_f64(), Some(32.0));
    assert_eq!(hparams["tokenizer.kind"].as_str(), Some("unigram"));
    assert_eq!(hparams["eval.bleu"].as_bool(), Some(true));
}

/// SIGKILL after a checkpoint and a window past it, then `--resume`: the killed process's points
/// past its checkpoint are dropped, as its rows are from `metrics.jsonl`, by kiln's reader and by
/// TensorBoard's.
#[test]
fn a_killed_and_resumed_run_reads_back_as_its_log_in_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let args: Vec<String> = ["train", &smoke(), "--run-dir", &run.display().to_string(), "--no-tui", "--set", "train.save_every_steps=6", "--set", "train.sync_interval=2", "--set", "eval.bleu=false"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).current_dir(root()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // A window logged after the first checkpoint: points the resume must drop.
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
        if text.split("\"kind\":\"checkpoint\"").nth(1).is_some_and(|after| after.contains("\"kind\":\"train\"")) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no window after a checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(child.try_wait().unwrap().is_none(), "the run ended before the kill");
    child.kill().unwrap();
    child.wait().unwrap();
    let checkpointed = read_jsonl(&run.join("metrics.jsonl")).iter().filter(|r| r["kind"] == "checkpoint").map(|r| r["step"].as_i64().unwrap()).max().unwrap();
    let before = kiln_tensorboard::read::read_dir(&run.join("tb")).unwrap();
    assert!(before.scalars["train/loss"].iter().any(|p| p.0 > checkpointed), "the killed process logged past its checkpoint at {checkpointed}");
    let o = resume_with(&run, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let board = assert_board_matches_metrics(&run);
    assert_eq!(board.restarts, 1);
    let steps: Vec<i64> = board.scalars["train/loss"].iter().map(|p| p.0).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "no step twice: {steps:?}");

    let Some(theirs) = read_with_tensorboard(&run) else { return };
    assert_tensorboard_agrees(&board, &theirs);
}
