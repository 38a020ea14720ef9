//! Using trained runs: `translate`, `generate` and `eval` on real (small) runs of the smoke
//! recipes, and the one-line refusal of a checkpoint that does not fit the recipe.

mod common;
use common::*;

fn trained(dir: &std::path::Path, recipe: &str, bleu: &str) -> String {
    let run = dir.join(recipe.trim_end_matches(".toml")).display().to_string();
    let recipe = root().join("recipes").join(recipe).display().to_string();
    let o = kiln(&["train", &recipe, "--run-dir", &run, "--no-tui", "--set", "train.epochs=1", "--set", bleu]);
    assert!(o.status.success(), "{}", stderr(&o));
    run
}

fn with_stdin(args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn translate_eval_and_architecture_checks() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path(), "smoke.toml", "eval.bleu=false");
    let input = "Ich gehe nach Hause.\nDas Wetter ist heute schön.\n\nWo ist der Bahnhof?\n";
    for beam in ["1", "3"] {
        let o = with_stdin(&["translate", &run, "--beam", beam], input);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert_eq!(out.lines().count(), 4, "one line out per line in, empty lines included: {out}");
        assert_eq!(out.lines().nth(2), Some(""), "an empty line stays empty");
    }
    // --input reads a file and gives what stdin gives.
    let file = dir.path().join("in.txt");
    std::fs::write(&file, input).unwrap();
    let a = kiln(&["translate", &run, "--input", &file.display().to_string()]);
    let b = with_stdin(&["translate", &run], input);
    assert_eq!(stdout(&a), stdout(&b));
    assert_user_error(&kiln(&["translate", &run, "--beam", "0"]), &["--beam"]);

    // --n-best: Moses' `index ||| text ||| score`, the first of each the 1-best of that beam.
    for (beam, n) in [("1", 1usize), ("3", 3)] {
        let plain = stdout(&with_stdin(&["translate", &run, "--beam", beam], input));
        let o = with_stdin(&["translate", &run, "--beam", beam, "--n-best", &n.to_string()], input);
        assert!(o.status.success(), "{}", stderr(&o));
        let rows: Vec<(usize, String, f64)> = stdout(&o)
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(" ||| ").collect();
                assert_eq!(f.len(), 3, "{l}");
                (f[0].parse().unwrap(), f[1].to_string(), f[2].parse().unwrap())
            })
            .collect();
        for (i, best) in plain.lines().enumerate() {
            let hyps: Vec<&(usize, String, f64)> = rows.iter().filter(|r| r.0 == i).collect();
            assert_eq!(hyps[0].1, best, "beam {beam}: line {i}'s first is the 1-best");
            assert_eq!(hyps.len(), if best.is_empty() { 1 } else { n }, "beam {beam}, line {i}: {rows:?}");
            assert!(hyps.iter().all(|h| h.2.is_finite() && h.2 <= 0.0), "log-probabilities: {rows:?}");
        }
    }
    assert_user_error(&kiln(&["translate", &run, "--beam", "2", "--n-best", "3"]), &["--n-best", "at most --beam"]);

    let o = kiln(&["eval", &run, "--split", "test", "--beam", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = read_json(&std::path::Path::new(&run).join("eval-test.json"));
    assert_eq!(report["size"], 20, "the smoke recipe holds out 20 test pairs");
    assert_eq!(report["beam"], 2);
    for key in ["bleu", "chrf"] {
        let v = report[key].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&v), "{key} {v}");
    }
    let summary = read_json(&std::path::Path::new(&run).join("summary.json"));
    assert!((report["loss"].as_f64().unwrap() - summary["test"]["loss"].as_f64().unwrap()).abs() < 1e-6, "eval's test loss is the run's test loss");

    // The LM commands refuse a translation run.
    assert_user_error(&kiln(&["generate", &run, "--prompt", "x"]), &["translation model", "translate"]);

    // A checkpoint that does not fit the recipe is refused in one line naming what differs.
    let recipe_path = std::path::Path::new(&run).join("recipe.toml");
    let text = std::fs::read_to_string(&recipe_path).unwrap();
    std::fs::write(&recipe_path, text.replacen("d_model = 32", "d_model = 48", 1)).unwrap();
    assert_user_error(&kiln(&["eval", &run]), &["model.d_model = 32", "48"]);
    assert_user_error(&kiln(&["train", "--resume", &run, "--set", "train.epochs=2"]), &["model.d_model = 32", "48"]);
}

#[test]
fn generate_is_seeded_and_eval_reports_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path(), "smoke-lm.toml", "eval.bleu=false");
    let gen = |seed: &str| {
        let o = kiln(&["generate", &run, "--prompt", "KING.", "--max-tokens", "30", "--seed", seed]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let (a, b, c) = (gen("1"), gen("1"), gen("2"));
    assert!(a.starts_with("KING.") && a.trim().len() > "KING.".len(), "{a}");
    assert_eq!(a, b, "same seed, same text");
    assert_ne!(a, c, "another seed, another text");
    let o = kiln(&["eval", &run, "--split", "valid"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = read_json(&std::path::Path::new(&run).join("eval-valid.json"));
    let valid_loss = read_json(&std::path::Path::new(&run).join("summary.json"))["valid_loss"].as_f64().unwrap();
    assert!((report["loss"].as_f64().unwrap() - valid_loss).abs() < 1e-6);
    assert!(report["bleu"].is_null());
    assert_user_error(&with_stdin(&["translate", &run], "x\n"), &["language model", "generate"]);
}

/// A golden test of translation: a fixed tiny checkpoint (`tests/fixtures/golden-run`, a 32-wide
/// model trained 600 steps on the Ding pairs) and fixed input give the recorded greedy and beam-4
/// lines, exactly. A change to decoding, the tokenizer's use, the model's arithmetic or the
/// checkpoint reader that changes a token shows here.
#[test]
fn a_fixed_checkpoint_translates_to_the_recorded_lines() {
    let run = root().join("tests/fixtures/golden-run");
    let (run_s, input) = (run.display().to_string(), run.join("input.de").display().to_string());
    for (beam, expected) in [("1", "expected-greedy.en"), ("4", "expected-beam4.en")] {
        let o = kiln(&["translate", &run_s, "--input", &input, "--beam", beam]);
        assert!(o.status.success(), "{}", stderr(&o));
        let want = std::fs::read_to_string(run.join(expected)).unwrap();
        assert_eq!(stdout(&o), want, "beam {beam}");
    }
    assert_ne!(std::fs::read_to_string(run.join("expected-greedy.en")).unwrap(), std::fs::read_to_string(run.join("expected-beam4.en")).unwrap(), "the beam finds other lines than greedy");
    assert!(!run.join(".lock").exists(), "translating writes nothing into the run");
}
