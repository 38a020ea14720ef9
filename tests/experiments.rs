//! The experiment commands on real (smoke) runs through the binary: `sweep` trains every
//! combination and a re-run skips finished runs and resumes stopped ones, bad grids are refused
//! before anything starts, `runs` lists and `compare` compares, `average` writes a checkpoint
//! that eval takes and resume never does, `train.ema_decay` and `--weights` choose the weights,
//! `export` writes safetensors whose tensors match its config.

mod common;
use common::*;

fn mtime(p: &std::path::Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn sweep_trains_each_combination_and_a_rerun_skips_finished_runs() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("sweep");
    let s = sweep.display().to_string();
    let args = ["sweep", &smoke(), "--grid", "train.lr=3e-3,1e-3", "--grid", "train.epochs=1", "--dir", &s, "--parallel", "2"];
    let o = kiln(&args);
    assert!(o.status.success(), "{}\n{}", stderr(&o), stdout(&o));
    let runs = ["01-lr=3e-3_epochs=1", "02-lr=1e-3_epochs=1"];
    for r in runs {
        assert!(sweep.join(r).join("summary.json").is_file(), "{r} finished: {}", stdout(&o));
    }
    let file = read_json(&sweep.join("sweep.json"));
    let combos = file["combinations"].as_array().unwrap();
    assert_eq!(combos.len(), 2);
    assert!(combos.iter().all(|c| c["status"] == "finished" && c["steps"].as_u64().unwrap() > 0), "{file}");
    assert_eq!(combos[1]["set"][0], "train.lr=1e-3");
    let recipe = std::fs::read_to_string(sweep.join(runs[1]).join("recipe.toml")).unwrap();
    assert!(recipe.contains("lr = 0.001"), "the combination's value is in its recipe");

    // Again: both finished, nothing trains. One made "stopped" (its summary set aside) resumes.
    let first = mtime(&sweep.join(runs[0]).join("summary.json"));
    std::fs::rename(sweep.join(runs[1]).join("summary.json"), dir.path().join("aside.json")).unwrap();
    let o = kiln(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("{}: finished, skipped", runs[0])), "{out}");
    assert!(out.contains(&format!("{}: resuming", runs[1])), "{out}");
    assert_eq!(mtime(&sweep.join(runs[0]).join("summary.json")), first, "a finished run is not trained again");
    assert!(sweep.join(runs[1]).join("summary.json").is_file());

    // The runs are listed, sortable and filterable.
    let o = kiln(&["runs", &s, "--sort", "valid_loss"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().filter(|l| l.contains("finished")).count(), 2, "{out}");
    assert!(out.contains("2 runs under"), "{out}");
    let o = kiln(&["runs", &s, "--name", "no-such-recipe"]);
    assert!(stdout(&o).contains("0 runs under"), "{}", stdout(&o));

    // Compared: the key that differs, the figures, and the charts.
    let charts = dir.path().join("charts");
    let (a, b) = (sweep.join(runs[0]).display().to_string(), sweep.join(runs[1]).display().to_string());
    let o = kiln(&["compare", &a, &b, "--out", &charts.display().to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lr = out.lines().find(|l| l.trim_start().starts_with("train.lr")).unwrap_or_else(|| panic!("train.lr differs: {out}"));
    assert!(lr.contains("0.003") && lr.contains("0.001"), "{lr}");
    assert!(!out.lines().any(|l| l.trim_start().starts_with("train.epochs")), "equal keys are not listed: {out}");
    assert!(out.contains("best valid loss") && out.contains("validation by epoch"), "{out}");
    for png in ["loss-by-step.png", "loss-by-time.png", "valid-loss.png", "valid-bleu.png"] {
        let bytes = std::fs::read(charts.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }
}

#[test]
fn a_bad_grid_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("sweep");
    let s = sweep.display().to_string();
    let o = kiln(&["sweep", &smoke(), "--grid", "train.lr=1e-3,2e-3", "--grid", "train.lrr=1", "--dir", &s]);
    assert_user_error(&o, &["train.lrr", "no such recipe key"]);
    let o = kiln(&["sweep", &smoke(), "--grid", "train.lr=1e-3,-1", "--dir", &s]);
    assert_user_error(&o, &["train.lr", "-1"]);
    let o = kiln(&["sweep", &smoke(), "--grid", "train.lr", "--dir", &s]);
    assert_user_error(&o, &["--grid"]);
    assert!(!sweep.exists(), "nothing was created");
}

#[test]
fn averaged_checkpoints_evaluate_and_resume_ignores_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = train_with(&smoke(), &run, &["train.epochs=3", "train.keep_checkpoints=0"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = run.display().to_string();
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let o = kiln(&["average", &r, "--last", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let name = format!("avg-3-{}", latest.trim());
    let avg = run.join("checkpoints").join(&name);
    assert!(avg.join("model.mpk").is_file() && !avg.join("optimizer.mpk").exists(), "{}", stdout(&o));
    let state = read_json(&avg.join("state.json"));
    assert_eq!(state["averaged_from"].as_array().unwrap().len(), 3);
    assert_eq!(std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(), latest, "latest still names the run's own checkpoint");
    let o = kiln(&["eval", &r, "--checkpoint", &name]);
    assert!(o.status.success(), "{}", stderr(&o));
    let averaged = read_json(&run.join("eval-test.json"));
    let o = kiln(&["eval", &r]);
    assert!(o.status.success(), "{}", stderr(&o));
    let last = read_json(&run.join("eval-test.json"));
    assert_ne!(averaged["loss"], last["loss"], "the average is other weights than the last");
    // A resume continues from latest, not from the average.
    let o = resume_with(&run, &["train.epochs=4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("resumed at step"), "{}", stdout(&o));
    // Refused in one line: too few, an unknown name, an averaged checkpoint as input.
    assert_user_error(&kiln(&["average", &r, "--last", "1"]), &["--last"]);
    assert_user_error(&kiln(&["average", &r, "--checkpoints", "step-0000001,step-0000002"]), &["no such checkpoint"]);
    assert_user_error(&kiln(&["average", &r, "--checkpoints", &format!("{name},{}", latest.trim())]), &["averaged checkpoint"]);
}

#[test]
fn the_weight_average_is_saved_and_chosen_with_weights() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = train_with(&smoke(), &run, &["train.ema_decay=0.99", "train.epochs=2"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let latest = run.join("checkpoints").join(std::fs::read_to_string(run.join("checkpoints/latest")).unwrap().trim());
    assert!(latest.join("ema.mpk").is_file() && latest.join("model.mpk").is_file());
    let summary = read_json(&run.join("summary.json"));
    assert_eq!(summary["ema"], true);
    let r = run.display().to_string();
    let eval = |weights: &str| {
        let o = kiln(&["eval", &r, "--weights", weights]);
        assert!(o.status.success(), "{}", stderr(&o));
        read_json(&run.join("eval-test.json"))
    };
    let (auto, ema, raw) = (eval("auto"), eval("ema"), eval("raw"));
    assert_eq!((auto["weights"].as_str(), raw["weights"].as_str()), (Some("ema"), Some("model")));
    assert_eq!(auto["loss"], ema["loss"]);
    assert_ne!(ema["loss"], raw["loss"]);
    // The run's own test figure is the average's.
    let test_loss = summary["test"]["loss"].as_f64().unwrap();
    assert!((test_loss - ema["loss"].as_f64().unwrap()).abs() < 1e-9, "{test_loss} vs {}", ema["loss"]);
    // An average of the moving averages is labelled as one, and holds no raw weights.
    let o = kiln(&["average", &r, "--last", "2", "--ema"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("averaged the moving averages of 2 checkpoints"), "{}", stdout(&o));
    let name = "avg-2-step-0000080-ema";
    let o = kiln(&["eval", &r, "--checkpoint", name]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("| ema weights |"), "{}", stdout(&o));
    assert_eq!(read_json(&run.join("eval-test.json"))["weights"], "ema");
    assert_user_error(&kiln(&["eval", &r, "--checkpoint", name, "--weights", "raw"]), &["average of moving averages"]);
    let out = dir.path().join("export");
    let o = kiln(&["export", &r, "--checkpoint", name, "--format", "safetensors", "--out", &out.display().to_string()]);
    assert!(o.status.success() && stdout(&o).contains("(moving average)"), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(read_json(&out.join("config.json"))["weights"], "ema");
    // A run without an average refuses --weights ema in one line.
    let plain = dir.path().join("plain");
    assert!(train_with(&smoke(), &plain, &["train.epochs=1"], &[]).status.success());
    assert_user_error(&kiln(&["eval", &plain.display().to_string(), "--weights", "ema"]), &["no moving average"]);
}

#[test]
fn export_writes_safetensors_that_match_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    let run = root().join("tests/fixtures/golden-run");
    let o = kiln(&["export", &run.display().to_string(), "--format", "safetensors", "--out", &out.display().to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["family"], "transformer");
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let tensors = config["tensors"].as_object().unwrap();
    assert!(tensors.len() > 10, "{}", tensors.len());
    for (name, shape) in tensors {
        let entry = &header[name];
        assert_eq!(&entry["shape"], shape, "{name}");
        assert_eq!(entry["dtype"], "F32", "{name}");
    }
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), std::fs::read(run.join("tokenizer.json")).unwrap());
    assert_user_error(&kiln(&["export", &run.display().to_string(), "--format", "onnx"]), &["onnx"]);
}

/// `eval.beam`: the run's own test BLEU is the beam's, the figure `eval --beam K` gives.
#[test]
fn the_recipes_beam_decodes_the_test_split() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = train_with(&smoke(), &run, &["train.epochs=3", "eval.beam=3", "eval.len_penalty=0.6"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = read_json(&run.join("summary.json"));
    let r = run.display().to_string();
    let bleu = |beam: &str| {
        let o = kiln(&["eval", &r, "--beam", beam, "--len-penalty", "0.6"]);
        assert!(o.status.success(), "{}", stderr(&o));
        read_json(&run.join("eval-test.json"))["bleu"].as_f64().unwrap()
    };
    assert_eq!(summary["test"]["bleu"].as_f64().unwrap().to_bits(), bleu("3").to_bits(), "{summary}");
    assert_user_error(&train_with(&smoke(), &dir.path().join("wide"), &["eval.beam=401"], &[]), &["eval.beam", "400"]);
}
