//! Storage going wrong under a run: truncated checkpoints, a full disk while saving, a run
//! directory that cannot be written. Each is one line naming the path, exit code ≠ 0, and what
//! was saved before stays intact.

mod common;
use common::*;
use std::path::Path;
use std::process::Output;

fn train(run_dir: &Path, sets: &[&str]) -> Output {
    train_with(&smoke(), run_dir, sets, &[])
}

fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

#[test]
fn truncated_checkpoints_are_passed_over_then_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = train(&run, &["train.epochs=1", "train.save_every_steps=20"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run_s = run.display().to_string();

    // Inference refuses the truncated latest checkpoint by name.
    truncate(&run.join("checkpoints/step-0000040/model.mpk"));
    let o = kiln(&["eval", &run_s]);
    assert_user_error(&o, &["step-0000040/model.mpk", "checksum mismatch"]);

    // Resuming passes over it to step 20, says so, and still ends where an unbroken run would.
    let o = kiln(&["train", "--resume", &run_s, "--no-tui"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("step-0000040/model.mpk: checksum mismatch") && stdout(&o).contains("resumed at step 20"), "{}", stderr(&o));
    assert_eq!(read_json(&run.join("summary.json"))["steps"], 40);

    // With every checkpoint truncated there is nothing to resume: one line, nothing deleted.
    for entry in std::fs::read_dir(run.join("checkpoints")).unwrap().flatten() {
        if entry.path().join("optimizer.mpk").exists() {
            truncate(&entry.path().join("optimizer.mpk"));
        }
    }
    let o = kiln(&["train", "--resume", &run_s, "--set", "train.epochs=2", "--no-tui"]);
    assert_user_error(&o, &["no intact checkpoint", "optimizer.mpk"]);
    assert!(run.join("checkpoints/step-0000040").is_dir() && run.join("metrics.jsonl").is_file());
}

#[test]
fn a_full_disk_while_saving_names_the_path_and_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = train(&run, &["train.epochs=1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = std::fs::read(run.join("checkpoints/step-0000040/state.json")).unwrap();

    // A file-size limit below the model's size makes writing a checkpoint fail as a full disk
    // does (EFBIG instead of ENOSPC); SIGXFSZ is ignored so the write returns the error.
    let script = format!(
        "ulimit -f 64; trap '' XFSZ; exec {:?} train --resume {:?} --set train.epochs=2 --no-tui",
        env!("CARGO_BIN_EXE_kiln"),
        run.display().to_string()
    );
    let o = std::process::Command::new("bash").args(["-c", &script]).current_dir(root()).output().unwrap();
    let err = stderr(&o);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(err.starts_with("kiln: error: ") && err.trim_end().lines().count() == 1 && !err.contains("panicked"), "{err}");
    assert!(err.contains("step-0000080") && err.contains("cannot write"), "the error names what could not be written: {err}");

    // The previous checkpoint is the latest still, intact; no half-written one is left.
    assert_eq!(std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(), "step-0000040");
    assert_eq!(std::fs::read(run.join("checkpoints/step-0000040/state.json")).unwrap(), before);
    let names: Vec<String> = std::fs::read_dir(run.join("checkpoints")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains("tmp") && n != "step-0000080"), "{names:?}");
    // With room again, the run resumes from it and finishes.
    let o = resume_with(&run, &["train.epochs=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_json(&run.join("summary.json"))["steps"], 80);
}

#[test]
fn a_run_directory_that_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    // Under a file: the directory cannot be created at all.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let o = train(&blocker.join("run"), &[]);
    assert_user_error(&o, &["a-file/run", "cannot create run directory"]);

    // A file where the checkpoints go: training runs, the first save fails naming the path.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("checkpoints"), "in the way").unwrap();
    let o = train(&run, &["train.epochs=1"]);
    assert_user_error(&o, &["run/checkpoints", "cannot create"]);
    assert!(read_jsonl(&run.join("metrics.jsonl")).iter().any(|r| r["kind"] == "train"), "the log of the work done stays");
}
