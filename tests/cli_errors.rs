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
