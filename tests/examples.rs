//! The examples of `examples/`, run as a user runs them: `language_id` (a model kiln does not
//! ship, trained through the library API) learns to tell German from English, reads the loss once
//! per window, and a run stopped by SIGINT and resumed ends exactly where an unbroken run ends.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{read_jsonl, root};

/// The example's binary, brought up to date first (a test target alone does not rebuild it; once
/// per test binary).
fn example(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "--example", name]).current_dir(root());
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        assert!(build.status().expect("cargo runs").success(), "cannot build example {name}");
        built.push(name.to_string());
    }
    let exe = std::env::current_exe().expect("test binary");
    exe.parent().and_then(Path::parent).expect("target/<profile>").join("examples").join(name)
}

/// 3,000 pairs (5,700 training sentences), two epochs: about 300 steps.
const SMALL: &[&str] = &["--pairs", "3000", "--epochs", "2", "--no-tui"];

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).expect("summary.json")).expect("json")
}

#[test]
fn language_id_learns_and_reads_the_loss_once_per_window() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = Command::new(example("language_id")).args(["--run-dir", run.to_str().unwrap()]).args(SMALL).current_dir(root()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = summary(&run);
    let accuracy = s["metrics"]["accuracy"].as_f64().expect("summary.json carries the task's accuracy");
    assert!(accuracy >= 0.9, "held-out accuracy {accuracy}");
    let steps = s["steps"].as_u64().unwrap();
    let windows = read_jsonl(&run.join("metrics.jsonl")).into_iter().filter(|r| r["kind"] == "train").count() as u64;
    // Sync every 10 steps, and at each of the two epoch ends.
    assert_eq!(s["sync"]["count"].as_u64().unwrap(), windows);
    assert!(windows <= steps / 10 + 2 && windows >= steps / 10, "{windows} reads for {steps} steps");
    assert!(run.join("checkpoints/latest").exists() && run.join("loss.png").exists());
}

#[test]
fn language_id_stopped_by_sigint_and_resumed_ends_as_an_unbroken_run() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, broken) = (dir.path().join("whole"), dir.path().join("broken"));
    let unbroken = Command::new(example("language_id")).args(["--run-dir", whole.to_str().unwrap()]).args(SMALL).current_dir(root()).output().unwrap();
    assert!(unbroken.status.success(), "{}", String::from_utf8_lossy(&unbroken.stderr));

    // Stopped with SIGINT once a window past step 40 is logged (the loop finishes its step,
    // saves and exits 0), then resumed.
    let mut child = Command::new(example("language_id")).args(["--run-dir", broken.to_str().unwrap()]).args(SMALL).current_dir(root()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut sent = false;
    for line in lines.map_while(Result::ok) {
        let step = line.split(" | step ").nth(1).and_then(|s| s.split('/').next()).and_then(|s| s.parse::<u64>().ok());
        if !sent && line.starts_with("epoch ") && step.is_some_and(|s| s >= 40) {
            let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success();
            assert!(ok, "kill -INT");
            sent = true;
        }
    }
    assert!(child.wait().unwrap().success());
    assert!(sent, "the run ended before step 40");
    let first = summary(&broken);
    assert_eq!(first["stopped"], true, "the run was stopped before its end: {first}");
    assert!(first["steps"].as_u64().unwrap() < summary(&whole)["steps"].as_u64().unwrap());

    let resumed = Command::new(example("language_id")).args(["--resume", broken.to_str().unwrap()]).args(SMALL).current_dir(root()).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let (a, b) = (summary(&whole), summary(&broken));
    assert_eq!(b["stopped"], false);
    for key in ["steps", "epochs", "train_loss", "valid_loss", "metrics"] {
        assert_eq!(a[key], b[key], "{key}: unbroken {} vs resumed {}", a[key], b[key]);
    }
    assert_eq!(a["test"], b["test"]);
    let valid = |d: &Path| read_jsonl(&d.join("metrics.jsonl")).into_iter().filter(|r| r["kind"] == "valid").collect::<Vec<_>>();
    assert_eq!(valid(&whole), valid(&broken), "every validation row the same");
}

/// burn-train with kiln's strategy: one read per 10 steps (and one at each epoch's end, for
/// training and validation) where burn-train's default reads every step, and burn's metric logs
/// still count every step (entries weighted by the steps they hold).
#[test]
fn burn_train_program_reads_once_per_window_with_kiln_strategy() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(example("burn_train_strategy")).args(["--run-dir", dir.path().to_str().unwrap(), "--pairs", "4000"]).current_dir(root()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("device->host reads")).unwrap_or_else(|| panic!("{stdout}"));
    let numbers: Vec<usize> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect();
    // 3,600 training pairs → 7,200 sentences in 113 batches of 64; 800 validation sentences in 13.
    let (train_steps, valid_steps): (usize, usize) = (113, 13);
    assert_eq!(numbers, vec![train_steps + valid_steps, 10, train_steps.div_ceil(10) + valid_steps.div_ceil(10)], "{line}");
    let counts = |path: PathBuf| -> usize {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).lines().map(|l| l.rsplit(',').next().unwrap().parse::<usize>().unwrap()).sum()
    };
    assert_eq!(counts(dir.path().join("kiln/train/epoch-1/Loss.log")), train_steps, "every step's loss is in the epoch's");
    assert_eq!(counts(dir.path().join("default/train/epoch-1/Loss.log")), train_steps);
    assert_eq!(counts(dir.path().join("kiln/valid/epoch-1/Accuracy.log")), 800, "every validation row counted");
    // burn's metrics in kiln's log: a row a window, burn's loss as the loss, its accuracy by name.
    let rows = read_jsonl(&dir.path().join("kiln/metrics.jsonl"));
    let train: Vec<_> = rows.iter().filter(|r| r["kind"] == "train").collect();
    assert_eq!(train.len(), train_steps.div_ceil(10));
    assert_eq!(train.last().unwrap()["step"], train_steps);
    assert!(train.iter().all(|r| r["loss"].as_f64().is_some_and(f64::is_finite) && r["metrics"]["Accuracy"].as_f64().is_some()), "{train:?}");
    let valid: Vec<_> = rows.iter().filter(|r| r["kind"] == "valid").collect();
    assert_eq!(valid.len(), 1);
    assert!(valid[0]["metrics"]["Accuracy"].as_f64().unwrap() > 50.0, "{:?}", valid[0]);
    let s = summary(&dir.path().join("kiln"));
    assert_eq!((s["steps"].as_u64(), s["sync"]["count"].as_u64()), (Some(train_steps as u64), Some(train_steps.div_ceil(10) as u64)));
    assert_eq!(s["metrics"]["Accuracy"], valid[0]["metrics"]["Accuracy"]);
}
