//! The fault matrix of `docs/reliability.md`, each row a test on the real binary: kill -9 at
//! random moments across a run (mid-step, mid-save, mid-cache-build), two processes on one run
//! directory, a damaged or forged `state.json`, a torn log row, a run that failed before its first
//! checkpoint, paths that would leave the run directory. Each asserts what kiln did and that
//! nothing beyond the save interval was lost.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SETS: [&str; 5] = ["train.epochs=2", "train.save_every_steps=7", "train.sync_interval=3", "train.keep_checkpoints=3", "eval.bleu=false"];

fn spawn(args: &[String], env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn train_args(run: &Path, sets: &[&str]) -> Vec<String> {
    let mut args = vec!["train".to_string(), smoke(), "--run-dir".into(), run.display().to_string(), "--no-tui".into()];
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    args
}

fn resume_args(run: &Path) -> Vec<String> {
    vec!["train".into(), "--resume".into(), run.display().to_string(), "--no-tui".into()]
}

fn wait_for(what: &str, ready: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !ready() {
        assert!(t0.elapsed().as_secs() < 120, "{what} did not appear");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A pseudo-random number from the clock (the moments of the kills).
fn clock_draw(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    nanos.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) % n.max(1)
}

/// Kills `child` with SIGKILL after asserting that it was still running (so the kill cut a run
/// short, never a finished one).
fn kill_unfinished(child: &mut Child, run: &Path) {
    assert!(child.try_wait().unwrap().is_none(), "the run ended before the kill");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!run.join("summary.json").exists(), "a killed run has no summary");
}

fn summary(run: &Path) -> Value {
    read_json(&run.join("summary.json"))
}

fn assert_same_end(whole: &Path, other: &Path) {
    let (a, b) = (summary(whole), summary(other));
    assert_eq!(a["steps"], b["steps"]);
    assert_eq!(a["train_loss"], b["train_loss"], "bit-exact continuation");
    assert_eq!(a["valid_loss"], b["valid_loss"]);
    // The log continues without the lost steps' rows, and every row is whole JSON.
    let steps: Vec<u64> = read_jsonl(&other.join("metrics.jsonl")).iter().filter(|r| r["kind"] == "train").map(|r| r["step"].as_u64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    // TensorBoard's curves too: the lost steps' points dropped, the same loss curve as unbroken.
    let (board_whole, board_other) = (assert_board_matches_metrics(whole), assert_board_matches_metrics(other));
    assert_eq!(board_whole.scalars["train/loss"], board_other.scalars["train/loss"]);
    assert_eq!(board_whole.scalars["valid/loss"], board_other.scalars["valid/loss"]);
}

fn unbroken(dir: &Path, sets: &[&str]) -> (PathBuf, Duration) {
    let whole = dir.join("whole");
    let t0 = Instant::now();
    let o = kiln(&train_args(&whole, sets).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    (whole, t0.elapsed())
}

#[test]
fn killed_at_random_moments_across_a_whole_run_each_resume_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, took) = unbroken(dir.path(), &SETS);
    let killed = dir.path().join("killed");
    // Three kills, each at a moment drawn across what is left of the run (the unbroken run's
    // duration bounds it), the first possibly before any checkpoint or during data preparation.
    let mut child = spawn(&train_args(&killed, &SETS), &[]);
    let mut kills = 0;
    for round in 0..3 {
        let budget = took.as_millis() as u64 * (3 - round) / 5;
        std::thread::sleep(Duration::from_millis(clock_draw(budget)));
        if child.try_wait().unwrap().is_some() {
            break; // finished before this kill: the remaining rounds have nothing to cut
        }
        kill_unfinished(&mut child, &killed);
        kills += 1;
        child = spawn(&resume_args(&killed), &[]);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "the last resume failed");
    assert!(kills >= 1, "no kill cut the run");
    assert_same_end(&whole, &killed);
}

#[test]
fn killed_during_a_checkpoint_write_resumes_from_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, _) = unbroken(dir.path(), &SETS);
    let killed = dir.path().join("killed");
    // The save pauses between the weights and the state: the kill lands inside the write.
    let mut child = spawn(&train_args(&killed, &SETS), &[("KILN_TEST_PAUSE_IN_SAVE_MS", "400")]);
    wait_for("a second checkpoint being written", || {
        killed.join("checkpoints/latest").exists() && std::fs::read_dir(killed.join("checkpoints")).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    });
    let latest_before = std::fs::read_to_string(killed.join("checkpoints/latest")).unwrap();
    kill_unfinished(&mut child, &killed);
    assert_eq!(std::fs::read_to_string(killed.join("checkpoints/latest")).unwrap(), latest_before, "the half-written checkpoint never became the latest");
    let o = kiln(&resume_args(&killed).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("resumed at step {}", latest_before.trim_start_matches("step-").trim_start_matches('0'))), "{}", stdout(&o));
    assert_same_end(&whole, &killed);
}

#[test]
fn killed_before_the_first_checkpoint_the_run_starts_again_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let sets = ["train.epochs=1", "eval.bleu=false", "loader.cache_dir=\"\""];
    let (whole, _) = unbroken(dir.path(), &sets);
    let killed = dir.path().join("killed");
    let mut child = spawn(&train_args(&killed, &sets), &[]);
    // Mid-epoch, before the only checkpoint (at the epoch's end).
    wait_for("a training window", || std::fs::read_to_string(killed.join("metrics.jsonl")).is_ok_and(|t| t.contains("\"kind\":\"train\"")));
    kill_unfinished(&mut child, &killed);
    assert!(!killed.join("checkpoints/latest").exists());
    let o = kiln(&resume_args(&killed).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("no checkpoint yet; the run starts again from step 0 in place"), "{}", stderr(&o));
    assert_same_end(&whole, &killed);
}

#[test]
fn killed_while_the_dataset_cache_is_built_the_next_run_builds_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_set = format!("loader.cache_dir={:?}", cache.display().to_string());
    let sets = ["train.epochs=1", "train.max_steps=3", "eval.bleu=false", cache_set.as_str()];
    let run = dir.path().join("run");
    let mut child = spawn(&train_args(&run, &sets), &[]);
    // Somewhere in the first moments: reading, training the tokenizer, encoding, writing the entry.
    std::thread::sleep(Duration::from_millis(20 + clock_draw(400)));
    if child.try_wait().unwrap().is_none() {
        child.kill().unwrap();
    }
    child.wait().unwrap();
    // No torn entry is ever read: the next run finds a whole entry or none, and finishes.
    let again = if run.join("recipe.toml").exists() { resume_args(&run) } else { train_args(&run, &sets) };
    let o = kiln(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = kiln(&["cache", "verify", "--dir", &cache.display().to_string()]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let names: Vec<String> = std::fs::read_dir(&cache).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().any(|n| n.ends_with(".kds")), "{names:?}");
}

#[test]
fn a_second_process_on_a_run_directory_is_refused_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut first = spawn(&train_args(&run, &["train.epochs=20", "eval.bleu=false"]), &[]);
    wait_for("the first run's start row", || std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|t| t.contains("\"kind\":\"start\"")));
    let pid = first.id().to_string();
    let run_s = run.display().to_string();
    for args in [resume_args(&run), train_args(&run, &[])] {
        let o = kiln(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_user_error(&o, &[&run_s, &format!("in use by process {pid}")]);
    }
    wait_for("a checkpoint", || run.join("checkpoints/latest").exists());
    let o = kiln(&["eval", &run_s]);
    assert_user_error(&o, &[&format!("in use by process {pid}")]);
    // Reading commands do not write into the run: they need no lock.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["translate", &run_s]).current_dir(root()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap().wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(first.try_wait().unwrap().is_none(), "the first run goes on, untouched");
    first.kill().unwrap();
    first.wait().unwrap();
    // Its lock went with it: the run resumes.
    let o = kiln(&[&resume_args(&run)[..], &["--set".into(), "train.epochs=1".into()]].concat().iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Two checkpoints (steps 20 and 40) of a one-epoch smoke run.
fn two_checkpoints(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    let o = train_with(&smoke(), &run, &["train.epochs=1", "train.save_every_steps=20", "eval.bleu=false"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    run
}

#[test]
fn a_changed_digit_in_state_json_is_caught_and_the_previous_checkpoint_used() {
    let dir = tempfile::tempdir().unwrap();
    let run = two_checkpoints(dir.path());
    let state = run.join("checkpoints/step-0000040/state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let edited = text.replacen("\"total_tokens\": ", "\"total_tokens\": 1", 1);
    assert_ne!(text, edited);
    std::fs::write(&state, edited).unwrap();
    let o = resume_with(&run, &["train.epochs=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("step-0000040/state.json: integrity check failed") && stdout(&o).contains("resumed at step 20"), "{}\n{}", stderr(&o), stdout(&o));
    assert_eq!(summary(&run)["steps"], 80);
}

#[test]
fn a_forged_state_whose_position_does_not_fit_the_run_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let run = two_checkpoints(dir.path());
    // Sealed again after the edit, as a careless tool would: the integrity check passes, the
    // position check against the run's data does not.
    let ckpt = run.join("checkpoints/step-0000040");
    let mut state = kiln_train::checkpoint::read_state(&ckpt).unwrap();
    state.batch_in_epoch = 9_999;
    std::fs::write(ckpt.join("state.json"), serde_json::to_string_pretty(&state.sealed()).unwrap()).unwrap();
    let o = resume_with(&run, &["train.epochs=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("`batch_in_epoch` is 9999") && out.contains("resuming from") && out.contains("resumed at step 20"), "{out}");
    assert_eq!(summary(&run)["steps"], 80);
}

#[test]
fn a_torn_last_log_row_is_cut_on_resume_and_an_old_summary_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let run = two_checkpoints(dir.path());
    let log = run.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"kind\":\"train\",\"epo");
    std::fs::write(&log, text).unwrap();
    let child = spawn(&[&resume_args(&run)[..], &["--set".into(), "train.epochs=2".into()]].concat(), &[]);
    // While the resumed run trains, readers see a run in progress, not the first one's end.
    wait_for("the resumed run's start row", || std::fs::read_to_string(&log).is_ok_and(|t| t.matches("\"kind\":\"start\"").count() == 2));
    assert!(!run.join("summary.json").exists() && run.join("summary.superseded.json").exists());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("cut a torn last row (20 bytes"), "{}", stderr(&o));
    // Every row is whole JSON again (read_jsonl fails on any other), and the run finished.
    assert!(read_jsonl(&log).iter().all(|r| r["kind"].is_string()));
    assert_eq!(summary(&run)["steps"], 80);
}

#[test]
fn checkpoint_names_and_recipe_names_stay_inside_their_directories() {
    let dir = tempfile::tempdir().unwrap();
    let run = two_checkpoints(dir.path());
    let run_s = run.display().to_string();
    for name in ["../../secrets", "/etc", "step-0000040/../../x", ".hidden"] {
        let o = kiln(&["eval", &run_s, "--checkpoint", name]);
        assert_user_error(&o, &["--checkpoint", "not a checkpoint name"]);
    }
    // `best` and `latest` follow their pointers, which are checked the same way.
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "Guten Morgen.\nWo ist der Bahnhof?\n").unwrap();
    let o = kiln(&["translate", &run_s, "--checkpoint", "best", "--input", &input.display().to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(run.join("checkpoints/latest"), "../../elsewhere").unwrap();
    let o = kiln(&["eval", &run_s]);
    assert_user_error(&o, &["checkpoints/latest", "not a checkpoint name"]);
    // A recipe's name becomes runs/<name>/: a path is refused.
    let corpus = root().join("assets/de-en.ding.tsv");
    let recipe = dir.path().join("outside.toml");
    std::fs::write(&recipe, format!("name = \"../../outside\"\n[data]\ntrain = {:?}\n", corpus.display().to_string())).unwrap();
    let o = kiln(&["train", &recipe.display().to_string()]);
    assert_user_error(&o, &["outside.toml:1", "name", "plain name"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// One flipped byte (the middle one) or a truncation (to half) of a file.
fn damage(path: &Path, flip: bool) {
    let mut bytes = std::fs::read(path).unwrap();
    if flip {
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
    } else {
        bytes.truncate(bytes.len() / 2);
    }
    std::fs::write(path, bytes).unwrap();
}

/// Every file kind of a run directory and of the dataset cache, flipped and truncated, under a
/// resume: kiln either continues to the very end an undamaged resume reaches (passing over what
/// it had to, saying so), or refuses in one line naming the file. Never a panic, never a silent
/// use of a damaged file, nothing saved lost.
#[test]
fn a_flipped_byte_or_a_truncation_in_any_run_file_is_passed_over_or_named() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_set = format!("loader.cache_dir={:?}", cache.display().to_string());
    let template = dir.path().join("template");
    let o = train_with(&smoke(), &template, &["train.epochs=1", "train.save_every_steps=20", "eval.bleu=false", &cache_set], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let resume = |run: &Path| resume_with(run, &["train.epochs=2"]);
    let reference = dir.path().join("reference");
    copy_dir(&template, &reference);
    let o = resume(&reference);
    assert!(o.status.success(), "{}", stderr(&o));
    // The cache holds the first run's entry and the resumes' (keyed on the run's tokenizer too).
    let entries: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&cache).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "kds")).map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    assert_eq!(entries.len(), 2, "{:?}", entries.iter().map(|e| &e.0).collect::<Vec<_>>());

    // (file, what a resume must do): `true` = continue to the reference's end, naming the file
    // when it was damaged in a way that matters; `false` = refuse, naming it.
    let cases: [(&str, bool); 11] = [
        ("checkpoints/step-0000040/model.mpk", true),
        ("checkpoints/step-0000040/optimizer.mpk", true),
        ("checkpoints/step-0000040/state.json", true),
        ("checkpoints/latest", true),
        ("checkpoints/best", true),
        ("metrics.jsonl", true),
        ("summary.json", true),
        (".lock", true),
        ("tokenizer.json", false),
        ("recipe.toml", false),
        ("CACHE", true),
    ];
    // A tokenizer edited so that it still loads (one score changed): only the checkpoint's
    // record of the run's files can tell.
    let run = dir.path().join("case-tokenizer-edited");
    copy_dir(&template, &run);
    let tok = std::fs::read_to_string(run.join("tokenizer.json")).unwrap();
    let at = tok.find("\",-").expect("a unigram score") + 3;
    let digit = tok.as_bytes()[at];
    assert!(digit.is_ascii_digit());
    let edited = format!("{}{}{}", &tok[..at], if digit == b'9' { '8' } else { (digit + 1) as char }, &tok[at + 1..]);
    std::fs::write(run.join("tokenizer.json"), edited).unwrap();
    assert_user_error(&resume(&run), &["tokenizer.json: checksum mismatch with checkpoint"]);
    // A recipe edited so that it still parses and validates (another corpus size): the same.
    let run = dir.path().join("case-recipe-edited");
    copy_dir(&template, &run);
    let recipe = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    let edited = recipe.replacen("limit = 1200", "limit = 1100", 1);
    assert_ne!(recipe, edited);
    std::fs::write(run.join("recipe.toml"), edited).unwrap();
    assert_user_error(&resume(&run), &["recipe.toml: checksum mismatch with checkpoint"]);

    for (file, continues) in cases {
        for flip in [true, false] {
            let what = format!("{file} {}", if flip { "with a flipped byte" } else { "truncated" });
            let run = dir.path().join(format!("case-{}-{flip}", file.replace('/', "_")));
            copy_dir(&template, &run);
            if file == "CACHE" {
                entries.iter().for_each(|(path, _)| damage(path, flip));
            } else {
                damage(&run.join(file), flip);
            }
            let o = resume(&run);
            let err = stderr(&o);
            assert!(!err.contains("panicked"), "{what}: {err}");
            if continues {
                assert!(o.status.success(), "{what}: {err}");
                let (a, b) = (summary(&reference), summary(&run));
                assert_eq!((&a["steps"], &a["train_loss"], &a["valid_loss"]), (&b["steps"], &b["train_loss"], &b["valid_loss"]), "{what}");
                let named = format!("{err}{}", stdout(&o));
                match file {
                    "checkpoints/step-0000040/model.mpk" | "checkpoints/step-0000040/optimizer.mpk" | "checkpoints/step-0000040/state.json" => {
                        assert!(named.contains(file) && named.contains("resumed at step 20"), "{what}: {named}")
                    }
                    "checkpoints/latest" => assert!(named.contains("checkpoints/latest") || named.contains("resumed at step 40"), "{what}: {named}"),
                    "CACHE" => assert!(named.contains("dataset cache") && named.contains("rebuilding"), "{what}: {named}"),
                    _ => {}
                }
            } else {
                assert_user_error(&o, &[file]);
                // Nothing saved was touched: the checkpoints are those of the template.
                assert_eq!(std::fs::read(run.join("checkpoints/step-0000040/state.json")).unwrap(), std::fs::read(template.join("checkpoints/step-0000040/state.json")).unwrap(), "{what}");
            }
            for (path, bytes) in &entries {
                std::fs::write(path, bytes).unwrap();
            }
        }
    }
}

#[test]
fn sigterm_during_an_evaluation_finishes_it_saves_and_the_resume_ends_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let sets = ["train.epochs=2", "eval.bleu=false"];
    let (whole, _) = unbroken(dir.path(), &sets);
    let stopped = dir.path().join("stopped");
    let log = stopped.join("metrics.jsonl");
    // Each validation starts with a pause: the signal lands inside the first one.
    let child = spawn(&train_args(&stopped, &sets), &[("KILN_TEST_PAUSE_IN_EVAL_MS", "1500")]);
    wait_for("the first epoch's last window", || std::fs::read_to_string(&log).is_ok_and(|t| t.lines().any(|l| l.contains("\"kind\":\"train\"") && l.contains("\"step\":40,"))));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!std::fs::read_to_string(&log).unwrap().contains("\"kind\":\"valid\""), "the signal must come during the validation");
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "a stop is a clean exit: {}", String::from_utf8_lossy(&o.stderr));
    let rows = read_jsonl(&log);
    assert!(rows.iter().any(|r| r["kind"] == "valid" && r["step"] == 40), "the evaluation ran to its end");
    assert_eq!(std::fs::read_to_string(stopped.join("checkpoints/latest")).unwrap(), "step-0000040");
    let o = kiln(&resume_args(&stopped).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_end(&whole, &stopped);
}

/// `chattr +i`: an immutable directory, which even root cannot write into (permission bits do
/// not bind root, and the tests may run as root). Where the file system or the sandbox does not
/// allow it, the test says so and checks nothing.
fn immutable(path: &Path, on: bool) -> bool {
    Command::new("chattr").arg(if on { "+i" } else { "-i" }).arg(path).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

#[test]
fn a_read_only_run_directory_stops_the_run_in_one_line_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = two_checkpoints(dir.path());
    let checkpoints = run.join("checkpoints");
    if !immutable(&checkpoints, true) {
        eprintln!("chattr +i is not available here: read-only directories not checked");
        return;
    }
    let before = std::fs::read(checkpoints.join("step-0000040/state.json")).unwrap();
    let o = resume_with(&run, &["train.epochs=2"]);
    immutable(&checkpoints, false);
    assert_user_error(&o, &["checkpoints", "cannot"]);
    assert_eq!(std::fs::read(checkpoints.join("step-0000040/state.json")).unwrap(), before);
    assert_eq!(std::fs::read_to_string(checkpoints.join("latest")).unwrap(), "step-0000040");
    // Writable again, the run continues from what it had.
    let o = resume_with(&run, &["train.epochs=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(summary(&run)["steps"], 80);

    // The whole run directory immutable: refused before anything is read or written.
    assert!(immutable(&run, true));
    let o = resume_with(&run, &["train.epochs=3"]);
    immutable(&run, false);
    assert_user_error(&o, &[&run.display().to_string()]);
}

#[test]
fn a_full_disk_while_logging_stops_in_one_line_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let run = two_checkpoints(dir.path());
    // The log is grown to just under a 256 KiB file-size limit with whole note rows; the
    // resumed run's first rows cross it (EFBIG, as a full disk gives ENOSPC).
    let log = run.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    while text.len() < 256 * 1024 - 300 {
        text.push_str(&format!("{{\"kind\":\"note\",\"text\":\"{}\"}}\n", "x".repeat(200)));
    }
    std::fs::write(&log, &text).unwrap();
    let script = format!("ulimit -f 256; trap '' XFSZ; exec {:?} train --resume {:?} --set train.epochs=2 --no-tui", env!("CARGO_BIN_EXE_kiln"), run.display().to_string());
    let o = Command::new("bash").args(["-c", &script]).current_dir(root()).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.trim_end().lines().filter(|l| l.starts_with("kiln: error: ")).count() == 1 && !err.contains("panicked"), "{err}");
    assert!(err.contains("metrics.jsonl"), "the error names the log: {err}");
    assert_eq!(std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(), "step-0000040");
    // With room again: a torn row the failed write may have left is cut, and the run finishes.
    let o = resume_with(&run, &["train.epochs=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(summary(&run)["steps"], 80);
    assert!(read_jsonl(&log).iter().all(|r| r["kind"].is_string()));
}
