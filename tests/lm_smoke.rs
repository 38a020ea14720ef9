//! The decoder-only language model through the same loop, data pipeline, checkpoints and run
//! directory as the translation model: `recipes/smoke-lm.toml` (3,000 lines of Shakespeare).

mod common;
use common::*;
use serde_json::Value;

fn train_lm(run_dir: &std::path::Path, sets: &[&str]) {
    let smoke_lm = root().join("recipes/smoke-lm.toml").display().to_string();
    let run = run_dir.display().to_string();
    let mut args = vec!["train", smoke_lm.as_str(), "--run-dir", run.as_str(), "--no-tui"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = kiln(&args);
    assert!(o.status.success(), "training failed: {}\n{}", stderr(&o), stdout(&o));
}

#[test]
fn lm_perplexity_falls_and_a_stopped_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    train_lm(&whole, &[]);
    let rows = read_jsonl(&whole.join("metrics.jsonl"));
    let valid: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "valid").collect();
    assert_eq!(valid.len(), 2);
    let ppl = |r: &Value| r["ppl"].as_f64().unwrap();
    assert!(ppl(valid[1]) < ppl(valid[0]), "validation perplexity did not fall: {} → {}", ppl(valid[0]), ppl(valid[1]));
    assert!(ppl(valid[0]) < 300.0, "after one epoch the model beats a uniform guess over 300 tokens: {}", ppl(valid[0]));
    let train: Vec<f64> = rows.iter().filter(|r| r["kind"] == "train").map(|r| r["loss"].as_f64().unwrap()).collect();
    assert!(train.last().unwrap() < &train[0]);
    let summary = read_json(&whole.join("summary.json"));
    assert!(summary["test"]["ppl"].as_f64().unwrap().is_finite());
    assert!(summary["bleu"].is_null());
    assert_eq!(summary["data"]["padding_pct"].as_f64().unwrap(), 0.0, "training blocks are full");

    // Stopped mid-epoch by max_steps, then resumed: the same end as the unbroken run.
    let split = dir.path().join("split");
    train_lm(&split, &["train.max_steps=45"]);
    let o = kiln(&["train", "--resume", &split.display().to_string(), "--set", "train.max_steps=0", "--no-tui"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (read_json(&whole.join("summary.json")), read_json(&split.join("summary.json")));
    assert_eq!(a["steps"], b["steps"]);
    assert_eq!(a["train_loss"], b["train_loss"]);
    assert_eq!(a["valid_loss"], b["valid_loss"]);
}

#[test]
fn family_and_format_must_match() {
    assert_user_error(&kiln(&["train", &smoke(), "--set", "model.family=lm"]), &["data.format", "text"]);
    assert_user_error(&kiln(&["train", &smoke(), "--set", "model.family=gpt"]), &["model.family", "gpt"]);
    assert_user_error(&kiln(&["train", &smoke(), "--set", "model.positions=rotary"]), &["model.positions", "rotary"]);
    let smoke_lm = root().join("recipes/smoke-lm.toml").display().to_string();
    assert_user_error(&kiln(&["train", &smoke_lm, "--set", "tokenizer.sample_alpha=0.2"]), &["tokenizer.sample_alpha", "sentence pairs"]);
    assert_user_error(&kiln(&["train", &smoke_lm, "--set", "model.pre_ln=false"]), &["model.pre_ln", "pre-LN"]);
}

/// A character- and a byte-level model of the smoke text: the run trains and learns; its
/// validation rows carry the loss per character, equal to the loss per token for characters
/// (one token each) and below it for bytes (a character is one byte or more), and a subword
/// run's is its loss scaled by tokens per character; `eval` writes it too; `generate` continues a
/// prompt in the run's own alphabet, and the character vocabulary is the text's characters.
#[test]
fn character_and_byte_models_report_the_loss_per_character() {
    let dir = tempfile::tempdir().unwrap();
    let mut per_char = Vec::new();
    for kind in ["char", "byte", "unigram"] {
        let run = dir.path().join(kind);
        train_lm(&run, &[&format!("tokenizer.kind={kind}"), "train.max_steps=30", "train.epochs=1"]);
        let rows = read_jsonl(&run.join("metrics.jsonl"));
        let valid = rows.iter().rfind(|r| r["kind"] == "valid").unwrap();
        let (loss, lpc) = (valid["loss"].as_f64().unwrap(), valid["metrics"]["loss_per_char"].as_f64().unwrap());
        match kind {
            "char" => assert!((lpc - loss).abs() <= 1e-12 * loss, "characters: {lpc} vs {loss}"),
            "byte" => assert!(lpc >= loss, "bytes: at least one per character: {lpc} vs {loss}"),
            _ => assert!(lpc < loss, "subwords: several characters a token: {lpc} vs {loss}"),
        }
        per_char.push(lpc);
        let o = kiln(&["eval", &run.display().to_string(), "--split", "valid"]);
        assert!(o.status.success() && stdout(&o).contains("loss/char"), "{}{}", stdout(&o), stderr(&o));
        let report = read_json(&run.join("eval-valid.json"));
        assert!((report["loss_per_char"].as_f64().unwrap() - lpc).abs() <= 1e-9 * lpc, "{report}");
        let o = kiln(&["generate", &run.display().to_string(), "--prompt", "KING", "--max-tokens", "12", "--seed", "1"]);
        assert!(o.status.success() && stdout(&o).starts_with("KING"), "{kind}: {}{}", stdout(&o), stderr(&o));
        if kind == "char" {
            let tokenizer: Value = serde_json::from_str(&std::fs::read_to_string(run.join("tokenizer.json")).unwrap()).unwrap();
            let vocab = tokenizer["model"]["vocab"].as_object().unwrap();
            let text = std::fs::read_to_string(root().join("assets/shakespeare.txt")).unwrap();
            assert!(vocab.contains_key("K") && vocab.contains_key(" ") && vocab.len() < 100, "{}", vocab.len());
            assert!(vocab.keys().filter(|k| !k.starts_with('<')).all(|k| text.contains(k.as_str())), "only the text's characters");
        }
    }
    assert!(per_char.iter().all(|x| x.is_finite() && *x > 0.0), "{per_char:?}");
}
