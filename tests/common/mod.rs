//! Helpers shared by the integration tests: run the real `kiln` binary on real recipes.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(root()).output().expect("kiln runs")
}

pub fn smoke() -> String {
    root().join("recipes/smoke.toml").display().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts a clean user error: exit code 2, exactly one line on stderr, no panic or backtrace.
pub fn assert_user_error(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit code; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected, got: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    err
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
        .collect()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `kiln train <recipe> --run-dir RUN --no-tui [--set K=V]...`, with extra environment variables.
pub fn train_with(recipe: &str, run_dir: &Path, sets: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec!["train".to_string(), recipe.to_string(), "--run-dir".into(), run_dir.display().to_string(), "--no-tui".into()];
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).envs(env.iter().copied()).current_dir(root()).output().expect("kiln runs")
}

/// `kiln train --resume RUN --no-tui [--set K=V]...`.
pub fn resume_with(run_dir: &Path, sets: &[&str]) -> Output {
    let mut args = vec!["train".to_string(), "--resume".into(), run_dir.display().to_string(), "--no-tui".into()];
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).current_dir(root()).output().expect("kiln runs")
}

/// Asserts that the run's TensorBoard files (read as TensorBoard's reader reads them, restarts
/// dropping what they drop) hold exactly `metrics.jsonl`'s training and validation figures, step
/// by step; returns the board.
#[allow(dead_code)]
pub fn assert_board_matches_metrics(run: &std::path::Path) -> kiln_tensorboard::read::Board {
    let board = kiln_tensorboard::read::read_dir(&run.join("tb")).unwrap_or_else(|e| panic!("{e}"));
    let rows = read_jsonl(&run.join("metrics.jsonl"));
    let train = ["loss", "lr", "tokens_per_s", "sync_ms", "data_wait_ms", "padding_pct", "grad_norm", "grad_norm_max"].map(|f| ("train", f));
    let valid = ["loss", "ppl", "bleu"].map(|f| ("valid", f));
    for (kind, field) in train.into_iter().chain(valid) {
        let tag = format!("{kind}/{field}");
        let want: Vec<(i64, f32)> = rows.iter().filter(|r| r["kind"] == kind && r["set"].is_null()).filter_map(|r| Some((r["step"].as_i64().unwrap(), r[field].as_f64()? as f32))).collect();
        let got = board.scalars.get(&tag).cloned().unwrap_or_default();
        assert_eq!(got, want, "{tag} in {}", run.display());
    }
    board
}
