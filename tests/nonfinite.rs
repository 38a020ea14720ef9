//! Non-finite losses (`train.on_nan`): a learning rate of 1e30 makes the smoke model's loss NaN at
//! its second step; each mode must catch it at the sync window. `stop` ends with exit code 3 and a
//! diagnosis, leaving the last checkpoint intact; `skip` replays the window without the bad steps;
//! `rollback` goes back to the last checkpoint with a lower learning rate.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Output;

fn train_env(run_dir: &Path, sets: &[&str], env: &[(&str, &str)]) -> Output {
    train_with(&smoke(), run_dir, sets, env)
}

fn resume(run_dir: &Path, sets: &[&str]) -> Output {
    resume_with(run_dir, sets)
}

/// Exit code 3, one line on stderr naming the diagnosis file, no panic.
fn assert_nonfinite_stop(o: &Output, run: &Path) -> Value {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(3), "exit code; stderr: {err}\nstdout: {}", stdout(o));
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected, got: {err}");
    assert!(err.contains("non-finite") && err.contains("nonfinite.json") && !err.contains("panicked"), "{err}");
    read_json(&run.join("nonfinite.json"))
}

fn train_rows(run: &Path) -> Vec<Value> {
    read_jsonl(&run.join("metrics.jsonl")).into_iter().filter(|r| r["kind"] == "train").collect()
}

#[test]
fn stop_ends_with_a_diagnosis_and_leaves_the_last_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = train_env(&run, &["train.epochs=1"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let latest = run.join("checkpoints/step-0000040");
    let before: Vec<(String, Vec<u8>)> =
        ["model.mpk", "optimizer.mpk", "state.json"].iter().map(|f| (f.to_string(), std::fs::read(latest.join(f)).unwrap())).collect();

    // The second epoch diverges at once.
    let o = resume(&run, &["train.epochs=2", "train.lr=1e30"]);
    let diagnosis = assert_nonfinite_stop(&o, &run);
    let err = stderr(&o);
    assert!(err.contains("step-0000040 is intact") && err.contains("--resume"), "{err}");
    let first = diagnosis["first_nonfinite_step"].as_u64().unwrap();
    assert!(first > 40 && first <= 50, "first non-finite step {first}");
    let steps = diagnosis["steps"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["loss_sum"].is_null()), "{diagnosis}");
    assert!(steps.iter().all(|s| s["lr"].is_number()), "{diagnosis}");

    // Nothing saved after the divergence: the checkpoint is byte for byte what it was.
    assert_eq!(std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(), "step-0000040");
    for (f, bytes) in before {
        assert_eq!(std::fs::read(latest.join(&f)).unwrap(), bytes, "{f} changed");
    }
    assert!(train_rows(&run).iter().all(|r| r["loss"].is_number()), "a non-finite window is not logged as a loss");

    // The advice works: resuming with a sane learning rate finishes the run.
    let o = resume(&run, &["train.epochs=2", "train.lr=3e-3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_json(&run.join("summary.json"))["steps"], 80);
}

#[test]
fn stop_before_any_checkpoint_keeps_the_run_directory_for_its_diagnosis() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = train_env(&run, &["train.lr=1e30"], &[]);
    let diagnosis = assert_nonfinite_stop(&o, &run);
    assert!(stderr(&o).contains("no checkpoint was saved"), "{}", stderr(&o));
    assert_eq!(diagnosis["first_nonfinite_step"], 2, "{diagnosis}");
    assert!(diagnosis["last_checkpoint"].is_null());
    assert!(!run.join("checkpoints").exists());
}

#[test]
fn skip_replays_the_window_without_the_bad_step() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean");
    let o = train_env(&clean, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let skipped = dir.path().join("skipped");
    let o = train_env(&skipped, &["train.on_nan=skip"], &[("KILN_TEST_NONFINITE_STEPS", "13")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("skipped step 13 (window replayed from step 11)"), "{}", stdout(&o));

    let (a, b) = (read_json(&clean.join("summary.json")), read_json(&skipped.join("summary.json")));
    assert_eq!(b["skipped_steps"], 1);
    assert_eq!(a["steps"], b["steps"], "a skipped step still consumes its batches");
    assert!(b["train_loss"].as_f64().unwrap().is_finite() && b["valid_loss"].as_f64().unwrap().is_finite());
    let (ra, rb) = (train_rows(&clean), train_rows(&skipped));
    assert_eq!(ra[0]["loss"], rb[0]["loss"], "the window before the bad step is untouched");
    assert_ne!(ra[1]["loss"], rb[1]["loss"], "the replayed window lacks step 13");
    assert!(rb[1]["tokens"].as_u64() < ra[1]["tokens"].as_u64(), "the skipped step's tokens do not count");
}

/// Under `train.sync_overlap` (the default) a window is read while the next one's steps run, so
/// a bad step is found one window late and the steps queued after it ran on a NaN model. Each
/// mode must end exactly as when every window is read at its end: the same windows logged, the
/// same losses, the same steps skipped or rolled back.
///
/// Batches run whole (`backend.cpu_split = 1`): the comparison is of the recovery, and a batch cut
/// into parts on a loaded machine once gave a rollback trajectory 1e-4 off from its first window
/// (1 CI run; not reproduced in 178 runs of the same case under load), which is tracked on its own.
#[test]
fn a_bad_step_found_one_window_late_ends_as_one_found_at_once() {
    let dir = tempfile::tempdir().unwrap();
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 2] = [
        ("skip", &["train.on_nan=skip", "backend.cpu_split=1"], &[("KILN_TEST_NONFINITE_STEPS", "13")]),
        ("rollback", &["train.lr=1e30", "train.on_nan=rollback", "train.nan_lr_factor=1e-33", "backend.cpu_split=1"], &[]),
    ];
    for (mode, sets, env) in cases {
        let [late, at_once] = ["late", "at-once"].map(|n| dir.path().join(format!("{mode}-{n}")));
        let o = train_env(&late, &[sets, &["train.sync_overlap=true"]].concat(), env);
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        let o = train_env(&at_once, &[sets, &["train.sync_overlap=false"]].concat(), env);
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        let figures = |run: &Path| {
            let rows: Vec<_> = train_rows(run).iter().map(|r| (r["step"].clone(), r["loss"].clone(), r["tokens"].clone())).collect();
            let s = read_json(&run.join("summary.json"));
            (rows, s["steps"].clone(), s["train_loss"].clone(), s["valid_loss"].clone(), s["skipped_steps"].clone(), s["rollbacks"].clone())
        };
        let (a, b) = (figures(&late), figures(&at_once));
        assert!(a.4 == 1 || a.5 == 1, "{mode}: one recovery expected: {a:?}");
        assert_eq!(a, b, "{mode}: read one window late vs at once");
    }
}

/// Data parallel over two CPU replicas: `skip` replays the window on rank 0 and `rollback` goes
/// back to the checkpoint there, then the other replica continues from rank 0's model. Without
/// dropout both end as one device accumulating the same two batches a step does.
#[test]
fn skip_and_rollback_bring_every_replica_along() {
    let dir = tempfile::tempdir().unwrap();
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 2] = [
        ("skip", &["train.on_nan=skip"], &[("KILN_TEST_NONFINITE_STEPS", "7")]),
        ("rollback", &["train.lr=1e30", "train.on_nan=rollback", "train.nan_lr_factor=1e-33"], &[]),
    ];
    for (mode, sets, env) in cases {
        let [dp, acc] = ["dp", "acc"].map(|n| dir.path().join(format!("{mode}-{n}")));
        // Whole batches on the accumulating side too (replicas never cut theirs).
        let common = [sets, &["model.dropout=0", "eval.bleu=false", "backend.cpu_split=1"]].concat();
        let o = train_env(&dp, &[&common[..], &["backend.devices=[\"cpu\", \"cpu\"]"]].concat(), env);
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        // One recovery: a replica left behind (not reset) would poison the next steps again.
        let out = stdout(&o);
        assert_eq!(out.matches("window replayed").count() + out.matches("rolled back").count(), 1, "{mode}: {out}");
        let o = train_env(&acc, &[&common[..], &["train.accumulate=2"]].concat(), env);
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        let (a, b) = (read_json(&dp.join("summary.json")), read_json(&acc.join("summary.json")));
        assert_eq!((&a["steps"], &a["skipped_steps"], &a["rollbacks"]), (&b["steps"], &b["skipped_steps"], &b["rollbacks"]), "{mode}");
        assert_eq!(a["skipped_steps"].as_u64().unwrap() + a["rollbacks"].as_u64().unwrap(), 1, "{mode}: {a}");
        for key in ["train_loss", "valid_loss"] {
            let (x, y) = (f64_of(&a[key]), f64_of(&b[key]));
            assert!(x.is_finite() && (x - y).abs() / y <= 1e-6, "{mode} {key}: data parallel {x} vs accumulation {y}");
        }
    }
}

#[test]
fn rollback_goes_back_with_a_lower_learning_rate_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // One rollback brings the rate from 1e30 to 1e-3.
    let o = train_env(&run, &["train.lr=1e30", "train.on_nan=rollback", "train.nan_lr_factor=1e-33"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("rolled back to step 0 (rollback 1)"), "{}", stdout(&o));
    let s = read_json(&run.join("summary.json"));
    assert_eq!((s["rollbacks"].as_u64(), s["steps"].as_u64()), (Some(1), Some(80)));
    let rows = train_rows(&run);
    assert!(rows.iter().all(|r| r["loss"].as_f64().is_some_and(f64::is_finite)));
    let steps: Vec<u64> = rows.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "steps go forward in the log: {steps:?}");
    assert!(rows.iter().all(|r| r["lr"].as_f64().unwrap() <= 1e-2), "the lowered rate is logged");
    assert!(f64_of(&rows.last().unwrap()["loss"]) < f64_of(&rows[0]["loss"]), "it learns after the rollback");
    // TensorBoard's curves follow the log, the rollback marked as a restart.
    assert_eq!(assert_board_matches_metrics(&run).restarts, 1);
    let state = read_json(&run.join("checkpoints/step-0000080/state.json"));
    assert_eq!(state["rollbacks"], 1);
    assert!((state["lr_scale"].as_f64().unwrap() - 1e-33).abs() < 1e-45, "{state}");
}

/// With lr 1e30 every step after the first diverges: neither skipping nor rolling back (at the
/// default factor) can save the run, which stops once its recoveries are spent.
#[test]
fn skip_and_rollback_stop_once_their_recoveries_are_spent() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, counter, expected) in [("skip", "skipped_steps", 3), ("rollback", "rollbacks", 2)] {
        let run = dir.path().join(mode);
        let recoveries = format!("train.nan_max_recoveries={expected}");
        let o = train_env(&run, &["train.lr=1e30", &format!("train.on_nan={mode}"), &recoveries], &[]);
        let diagnosis = assert_nonfinite_stop(&o, &run);
        assert_eq!(diagnosis[counter], expected, "{mode}: {diagnosis}");
        assert!(diagnosis["reason"].as_str().unwrap().contains("nan_max_recoveries"), "{diagnosis}");
        if mode == "rollback" {
            assert!((diagnosis["lr_scale"].as_f64().unwrap() - 0.25).abs() < 1e-12, "two halvings: {diagnosis}");
        }
    }
}

fn f64_of(v: &Value) -> f64 {
    v.as_f64().unwrap()
}
