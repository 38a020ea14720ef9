//! `cargo xtask`: the project's entry points (matklad's pattern), in Rust so they run wherever
//! cargo does.
//!
//! - `cargo xtask train <recipe.toml> [--cuda] [--wgpu] [kiln train flags...]`: builds the CLI in
//!   release (with the `cuda` / `wgpu` features when asked) and runs `kiln train`.
//! - `cargo xtask watch <run-dir>`: the dashboard of a live or finished run.
//! - `cargo xtask translate | generate | eval | serve <run-dir> ...`: use a trained model.
//! - `cargo xtask runs [DIR]`, `compare RUN RUN…`, `sweep RECIPE --grid key=v1,v2 …`: experiments.
//! - `cargo xtask average RUN --last K`, `export RUN --format safetensors`: checkpoint tools.
//! - `cargo xtask bench data <recipe>`: data pipeline figures, appended to `docs/bench/data.md`.
//! - `cargo xtask cache ls | verify | clean [--older-than DAYS] [--dir DIR]`: the dataset cache.
//! - `cargo xtask devices [--cuda] [--wgpu]`: the devices that build can use here.
//! - `cargo xtask test`: the project's test command (all crates, all tests, built with the `wgpu`
//!   feature; the wgpu tier runs where an adapter is found, and must when `KILN_WGPU_TIER=require`).
//! - `cargo xtask check-cuda`: builds the CLI with the `cuda` feature (no GPU needed).
//! - `cargo xtask fuzz [--cases N] [--seed S]`: the recipe and CLI property test at a size beyond
//!   CI's (N recipes run by the binary, 20 × N through validation; default 2000).

use std::path::PathBuf;
use std::process::{exit, Command};

use anyhow::{bail, Context, Result};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("xtask: error: {e:#}");
        exit(2);
    }
}

fn root() -> PathBuf {
    // `cargo run` says at run time which checkout's xtask this is; the path compiled in may be
    // another checkout's when several share one target folder (the binary is uplifted from it).
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn status(mut c: Command) -> Result<()> {
    let s = c.status().with_context(|| format!("cannot start {c:?}"))?;
    if !s.success() {
        exit(s.code().unwrap_or(1));
    }
    Ok(())
}

fn run(args: &[String]) -> Result<()> {
    let Some((cmd, rest)) = args.split_first() else {
        bail!("usage: cargo xtask <train|watch|translate|generate|eval|serve|runs|compare|sweep|average|export|cache|bench|devices|test|fuzz|check-cuda> ...");
    };
    match cmd.as_str() {
        "train" | "watch" | "translate" | "generate" | "eval" | "serve" | "cache" | "bench" | "runs" | "compare" | "sweep" | "average" | "export" | "devices" => {
            let features: Vec<&str> = [("--cuda", "cuda"), ("--wgpu", "wgpu")].into_iter().filter(|(flag, _)| rest.iter().any(|a| a == flag)).map(|(_, f)| f).collect();
            let rest: Vec<&String> = rest.iter().filter(|a| *a != "--cuda" && *a != "--wgpu").collect();
            let mut build = cargo();
            build.args(["build", "--release", "--quiet", "-p", "kiln", "--bin", "kiln"]);
            if !features.is_empty() {
                build.args(["--features", &features.join(",")]);
            }
            status(build)?;
            let exe = target_dir().join("release").join(format!("kiln{}", std::env::consts::EXE_SUFFIX));
            // Run from the caller's directory so relative recipe and run paths mean what they say.
            let s = Command::new(&exe).arg(cmd).args(rest).status().with_context(|| format!("cannot start {}", exe.display()))?;
            exit(s.code().unwrap_or(1));
        }
        "test" => {
            let mut c = cargo();
            // All targets: unit, integration and binary tests (kiln has no doc tests), in one build
            // with the wgpu backend, so the tier that trains on a wgpu adapter (tests/wgpu.rs) runs
            // where the machine has one (CI installs lavapipe, a Vulkan device on the CPU).
            c.args(["test", "--workspace", "--all-targets", "--features", "kiln/wgpu"]).args(rest);
            status(c)
        }
        "fuzz" => {
            let mut cases = "2000".to_string();
            let mut seed = None;
            let mut it = rest.iter();
            while let Some(flag) = it.next() {
                match flag.as_str() {
                    "--cases" => cases = it.next().context("--cases needs a number")?.clone(),
                    "--seed" => seed = Some(it.next().context("--seed needs a number")?.clone()),
                    other => bail!("fuzz: unknown flag {other}; expected --cases N or --seed S"),
                }
            }
            let n: usize = cases.parse().with_context(|| format!("--cases: expected a number, got {cases}"))?;
            let mut c = cargo();
            c.args(["test", "-p", "kiln", "--test", "recipe_fuzz", "--", "--nocapture", "--test-threads", "1"]);
            c.env("KILN_FUZZ_CASES", n.to_string()).env("KILN_FUZZ_PARSE_CASES", (20 * n).to_string());
            if let Some(s) = seed {
                c.env("KILN_FUZZ_SEED", s);
            }
            status(c)
        }
        "check-cuda" => {
            let mut c = cargo();
            c.args(["build", "-p", "kiln", "--bin", "kiln", "--features", "cuda"]).args(rest);
            status(c)
        }
        other => bail!("unknown task `{other}`; expected train, watch, translate, generate, eval, serve, runs, compare, sweep, average, export, cache, bench, devices, test, fuzz or check-cuda"),
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}
