//! `make-corpus PAIRS OUT.tsv [INPUT.tsv ...] [--seed S]`: a synthetic translation corpus of PAIRS
//! pairs recombined from real ones (`benches/corpus.rs`), deterministic. Inputs default to the
//! German–English pairs in `assets/`. Example: 20 M pairs for a scale test,
//! `cargo run --release --bin make-corpus -- 20000000 /tmp/de-en.20m.tsv`.

#[path = "corpus.rs"]
mod corpus;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut seed = 1u64;
    if let Some(i) = args.iter().position(|a| a == "--seed") {
        match args.get(i + 1).and_then(|s| s.parse().ok()) {
            Some(s) => seed = s,
            None => return fail("--seed: expected an integer"),
        }
        args.drain(i..i + 2);
    }
    let [count, out, inputs @ ..] = args.as_slice() else {
        return fail("usage: make-corpus PAIRS OUT.tsv [INPUT.tsv ...] [--seed S]");
    };
    let Ok(count) = count.replace('_', "").parse::<u64>() else {
        return fail(&format!("PAIRS: expected a count, got {count:?}"));
    };
    let default = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/de-en.ding.tsv"));
    let inputs: Vec<&Path> = if inputs.is_empty() { vec![default.as_path()] } else { inputs.iter().map(Path::new).collect() };
    let result = corpus::read_pairs(&inputs).and_then(|pairs| corpus::generate(&pairs, count, seed, Path::new(out)));
    match result {
        Ok(bytes) => {
            println!("{out}: {count} pairs, {bytes} bytes");
            ExitCode::SUCCESS
        }
        Err(why) => fail(&why),
    }
}

fn fail(why: &str) -> ExitCode {
    eprintln!("make-corpus: error: {why}");
    ExitCode::from(2)
}
