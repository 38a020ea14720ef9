//! Bad input at the command line: each mistake is one line naming the file and line or the key,
//! exit code 2, no panic, and no run directory left behind.

mod common;
use common::*;

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn corpus_path() -> String {
    root().join("assets/de-en.ding.tsv").display().to_string()
}

#[test]
fn unknown_recipe_key_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let r = write(dir.path(), "r.toml", &format!("[data]\ntrain = {:?}\n\n[train]\nepochs = 1\nlearning_rate = 0.1\n", corpus_path()));
    let o = kiln(&["train", &r, "--run-dir", &dir.path().join("run").display().to_string()]);
    assert_user_error(&o, &["r.toml:6", "train.learning_rate", "unknown field"]);
    assert!(!dir.path().join("run").exists(), "no run directory for a bad recipe");
}

#[test]
fn wrong_type_and_out_of_range_values() {
    let dir = tempfile::tempdir().unwrap();
    let r = write(dir.path(), "r.toml", &format!("[data]\ntrain = {:?}\n[model]\nd_model = \"wide\"\n", corpus_path()));
    assert_user_error(&kiln(&["train", &r]), &["r.toml:4", "model.d_model", "invalid type"]);
    let r = write(dir.path(), "r2.toml", &format!("[data]\ntrain = {:?}\n[model]\ndropout = 1.5\n", corpus_path()));
    assert_user_error(&kiln(&["train", &r]), &["r2.toml:4", "model.dropout", "expected a number in [0, 1)"]);
}

#[test]
fn bad_overrides_name_the_flag() {
    assert_user_error(&kiln(&["train", &smoke(), "--set", "train.sync_interval=0"]), &["--set train.sync_interval=0", "expected an integer > 0"]);
    assert_user_error(&kiln(&["train", &smoke(), "--set", "train.no_such_key=1"]), &["train.no_such_key", "no such recipe key"]);
    assert_user_error(&kiln(&["train", &smoke(), "--set", "trainlr"]), &["--set trainlr", "section.key=value"]);
    assert_user_error(&kiln(&["train", &smoke(), "--set", "tokenizer.bpe_dropout=0.1"]), &["tokenizer.bpe_dropout", "kind = \"bpe\""]);
    assert_user_error(&kiln(&["train", &smoke(), "--set", "data.format=text"]), &["data.format", "language models"]);
}

#[test]
fn missing_recipe_and_missing_corpus() {
    assert_user_error(&kiln(&["train", "no/such/recipe.toml"]), &["no/such/recipe.toml", "cannot read recipe"]);
    let dir = tempfile::tempdir().unwrap();
    let r = write(dir.path(), "r.toml", "[data]\ntrain = \"missing.tsv\"\n");
    assert_user_error(&kiln(&["train", &r, "--run-dir", &dir.path().join("run").display().to_string()]), &["missing.tsv", "cannot read corpus"]);
}

#[test]
fn corpus_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    // Real Ding lines, with a line lacking its tab at line 4.
    let text = std::fs::read_to_string(root().join("assets/de-en.ding.tsv")).unwrap();
    let mut lines: Vec<String> = text.lines().take(300).map(str::to_string).collect();
    lines[3] = lines[3].replace('\t', " ");
    let corpus = write(dir.path(), "bad.tsv", &(lines.join("\n") + "\n"));
    let r = write(dir.path(), "r.toml", &format!("[data]\ntrain = {corpus:?}\nvalid_size = 20\ntest_size = 0\n"));
    let run = dir.path().join("run").display().to_string();
    assert_user_error(&kiln(&["train", &r, "--run-dir", &run]), &["bad.tsv:4", "no tab"]);
}

#[test]
fn resume_of_a_directory_that_is_not_a_run() {
    let dir = tempfile::tempdir().unwrap();
    assert_user_error(&kiln(&["train", "--resume", &dir.path().display().to_string()]), &["not a kiln run directory"]);
}

/// Real Ding lines (the first `n` of the corpus), to be spoiled one way or another.
fn ding_lines(n: usize) -> Vec<String> {
    std::fs::read_to_string(root().join("assets/de-en.ding.tsv")).unwrap().lines().take(n).map(str::to_string).collect()
}

/// A recipe training on `corpus` (a tiny model; a run that gets going stops after two steps).
fn tiny_recipe(dir: &std::path::Path, corpus: &str, extra: &str) -> String {
    let text = format!(
        "[data]\ntrain = {corpus:?}\nvalid_size = 20\ntest_size = 0\n[tokenizer]\nvocab_size = 200\n[model]\nd_model = 16\nn_heads = 2\nd_ff = 32\nencoder_layers = 1\ndecoder_layers = 1\n[train]\nepochs = 1\nmax_steps = 2\n[loader]\ncache_dir = \"\"\n{extra}"
    );
    write(dir, "r.toml", &text)
}

#[test]
fn mistyped_section_negative_and_zero_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let r = write(dir.path(), "a.toml", &format!("[data]\ntrain = {:?}\n[trian]\nepochs = 1\n", corpus_path()));
    assert_user_error(&kiln(&["train", &r]), &["a.toml:3", "trian", "unknown field"]);
    let r = write(dir.path(), "b.toml", &format!("[data]\ntrain = {:?}\n[loader]\nmax_tokens = -5\n", corpus_path()));
    assert_user_error(&kiln(&["train", &r]), &["b.toml:4", "loader.max_tokens", "-5"]);
    let r = write(dir.path(), "c.toml", &format!("[data]\ntrain = {:?}\n[model]\nd_model = 0\n", corpus_path()));
    assert_user_error(&kiln(&["train", &r]), &["c.toml", "model.d_model", "expected an integer > 0"]);
    assert_user_error(&kiln(&["train", &smoke(), "--set", "train.lr=-1"]), &["--set train.lr=-1", "train.lr"]);
    assert_user_error(&kiln(&["train", &smoke(), "--set", "train.on_nan=ignore"]), &["train.on_nan", "unknown variant"]);
}

#[test]
fn corpus_with_an_empty_side_or_invalid_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run").display().to_string();
    let mut lines = ding_lines(200);
    let german = lines[6].split('\t').next().unwrap().to_string();
    lines[6] = format!("{german}\t   ");
    let corpus = write(dir.path(), "side.tsv", &(lines.join("\n") + "\n"));
    assert_user_error(&kiln(&["train", &tiny_recipe(dir.path(), &corpus, ""), "--run-dir", &run]), &["side.tsv:7", "empty"]);

    let mut bytes = ding_lines(200).join("\n").into_bytes();
    let at = bytes.iter().position(|&b| b == b'\n').unwrap() + 3; // inside line 2
    bytes.insert(at, 0xff);
    let corpus = dir.path().join("utf8.tsv");
    std::fs::write(&corpus, bytes).unwrap();
    let corpus = corpus.display().to_string();
    assert_user_error(&kiln(&["train", &tiny_recipe(dir.path(), &corpus, ""), "--run-dir", &run]), &["utf8.tsv:2", "UTF-8"]);
    // Both attempts failed before a checkpoint: the directory keeps their log, errors included.
    let errors = error_rows(&dir.path().join("run"));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("side.tsv:7") && errors[1].contains("utf8.tsv:2"), "{errors:?}");
}

#[test]
fn empty_corpus_and_missing_validation_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run").display().to_string();
    let corpus = write(dir.path(), "empty.tsv", "");
    assert_user_error(&kiln(&["train", &tiny_recipe(dir.path(), &corpus, ""), "--run-dir", &run]), &["empty.tsv", "no sentence pairs"]);
    let corpus = write(dir.path(), "ok.tsv", &(ding_lines(200).join("\n") + "\n"));
    let r = write(dir.path(), "v.toml", &format!("[data]\ntrain = {corpus:?}\nvalid = \"nope.tsv\"\n[loader]\ncache_dir = \"\"\n"));
    assert_user_error(&kiln(&["train", &r, "--run-dir", &run]), &["nope.tsv", "cannot read"]);
}

#[test]
fn bom_and_crlf_corpus_reads_like_a_plain_one() {
    let dir = tempfile::tempdir().unwrap();
    let lines = ding_lines(300);
    let plain = write(dir.path(), "plain.tsv", &(lines.join("\n") + "\n"));
    let windows = write(dir.path(), "windows.tsv", &format!("\u{feff}{}\r\n", lines.join("\r\n")));
    let mut losses = Vec::new();
    for (name, corpus) in [("plain", plain), ("windows", windows)] {
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).unwrap();
        let run = sub.join("run").display().to_string();
        let o = kiln(&["train", &tiny_recipe(&sub, &corpus, ""), "--run-dir", &run, "--no-tui"]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let s = read_json(&sub.join("run/summary.json"));
        losses.push((s["train_loss"].clone(), std::fs::read(sub.join("run/tokenizer.json")).unwrap()));
    }
    assert_eq!(losses[0], losses[1], "a BOM and CRLF line ends change nothing");
}

#[test]
fn tokenizer_file_that_does_not_parse() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write(dir.path(), "tokenizer.json", "{\"version\": \"1.0\", \"model\": ");
    let corpus = write(dir.path(), "ok.tsv", &(ding_lines(200).join("\n") + "\n"));
    let text = format!(
        "[data]\ntrain = {corpus:?}\nvalid_size = 20\ntest_size = 0\n[tokenizer]\npath = {tok:?}\n[train]\nepochs = 1\nmax_steps = 2\n[loader]\ncache_dir = \"\"\n"
    );
    let r = write(dir.path(), "t.toml", &text);
    let run = dir.path().join("run").display().to_string();
    assert_user_error(&kiln(&["train", &r, "--run-dir", &run]), &["tokenizer.json"]);
}

#[test]
fn device_and_precision_requests_this_build_cannot_serve_or_does_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.display().to_string();
    if !cfg!(feature = "cuda") {
        assert_user_error(&kiln(&["train", &smoke(), "--run-dir", &run_s, "--set", "backend.device=cuda:0"]), &["backend.device = \"cuda:0\"", "built without CUDA"]);
    }
    assert_user_error(&kiln(&["train", &smoke(), "--run-dir", &run_s, "--set", "train.precision=f8"]), &["train.precision", "f8"]);
    if !cfg!(feature = "cuda") {
        assert!(error_rows(&run)[0].contains("built without CUDA"), "the failed attempt's log is kept");
    }
    // `auto` without CUDA trains on the CPU and says so, in a note and in the header.
    let o = kiln(&["train", &smoke(), "--run-dir", &run_s, "--no-tui", "--set", "backend.device=auto", "--set", "train.max_steps=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("backend.device = \"auto\"") && out.contains("training on the CPU") && out.contains("device cpu (flex, ") && out.contains("; auto)"), "{out}");
}

/// The `error` rows of a run's log: how its failed attempts ended.
fn error_rows(run: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "error")
        .map(|v| v["text"].as_str().unwrap_or_default().to_string())
        .collect()
}
