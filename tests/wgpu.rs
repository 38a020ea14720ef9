//! The wgpu tier: kiln on an asynchronous CubeCL device (`backend.device = "wgpu:cpu"`, Mesa's
//! lavapipe in CI: Vulkan on the CPU). The same runs as the Flex tests, small: a seed means the
//! same model as on Flex, the deferred loss is exact, overlap moves reads only, stop and resume,
//! non-finite steps, the batch-size probe through CubeCL's memory meter, the half-precision
//! refusals, and the inference commands. Each kiln process compiles its kernels on first use
//! (tens of seconds on lavapipe), so runs are a few windows long.
//!
//! Where no wgpu adapter is found the tier says so and passes, except under
//! `KILN_WGPU_TIER=require` (CI sets it after installing lavapipe), where that is a failure.

#![cfg(feature = "wgpu")]

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

const DEVICE: &str = "backend.device=wgpu:cpu";

/// Whether the tier runs here: a CPU adapter is listed (`kiln devices`).
fn adapter() -> bool {
    let o = kiln(&["devices"]);
    let listed = stdout(&o);
    let found = o.status.success() && listed.lines().any(|l| l.starts_with("wgpu:cpu "));
    if !found {
        assert!(std::env::var("KILN_WGPU_TIER").as_deref() != Ok("require"), "KILN_WGPU_TIER=require, but no wgpu CPU adapter is listed:\n{listed}{}", stderr(&o));
        eprintln!("wgpu tier skipped: no wgpu CPU adapter (install mesa-vulkan-drivers libvulkan1):\n{listed}");
    }
    found
}

fn run(recipe: &str, run_dir: &Path, sets: &[&str]) -> std::process::Output {
    run_env(recipe, run_dir, sets, &[])
}

fn run_env(recipe: &str, run_dir: &Path, sets: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let o = train_with(recipe, run_dir, sets, env);
    assert!(o.status.success(), "training failed: {}\n{}", stderr(&o), stdout(&o));
    o
}

fn windows(run: &Path) -> Vec<Value> {
    read_jsonl(&run.join("metrics.jsonl")).into_iter().filter(|r| r["kind"] == "train").collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn lm() -> String {
    root().join("recipes/smoke-lm.toml").display().to_string()
}

/// Two windows of the translation smoke recipe without dropout, on Flex and on wgpu: the same
/// initial weights (drawn on the host from the seed), so the first window's loss agrees within
/// 1e-4; both learn; the wgpu rows carry CubeCL's memory; and the inference commands (translate,
/// eval, average, export) run on the run's device.
#[test]
fn a_seed_means_the_same_model_on_flex_and_wgpu_and_both_learn() {
    if !adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cpu, gpu) = (dir.path().join("flex"), dir.path().join("wgpu"));
    let sets = ["model.dropout=0", "train.max_steps=20", "eval.bleu=false"];
    run(&smoke(), &cpu, &[&sets[..], &["backend.device=cpu"]].concat());
    let o = run(&smoke(), &gpu, &[&sets[..], &[DEVICE]].concat());
    assert!(stdout(&o).contains("device wgpu:llvmpipe") || stdout(&o).contains("device wgpu:"), "{}", stdout(&o));
    let (a, b) = (windows(&cpu), windows(&gpu));
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2);
    let (la, lb) = (f(&a[0]["loss"]), f(&b[0]["loss"]));
    eprintln!("first window: Flex {la:e}, wgpu {lb:e}, relative {:.1e}", (la - lb).abs() / la);
    assert!((la - lb).abs() / la <= 1e-4, "first window: Flex {la} vs wgpu {lb}");
    assert_eq!(a[0]["tokens"], b[0]["tokens"], "the same batches");
    for w in [&a, &b] {
        assert!(f(&w[1]["loss"]) < f(&w[0]["loss"]) * 0.95, "learns: {} → {}", w[0]["loss"], w[1]["loss"]);
    }
    assert!(a.iter().all(|r| r["device_mb"].is_null()), "no device memory on Flex");
    assert!(b.iter().all(|r| f(&r["device_mb"]) > 0.0 && f(&r["device_reserved_mb"]) >= f(&r["device_mb"])), "CubeCL memory on wgpu: {:?}", b);
    assert!(gpu.join("autotune").is_dir() && !cpu.join("autotune").exists(), "CubeCL's kernel choices are kept with the wgpu run");

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["translate", &gpu.display().to_string(), "--beam", "2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all("das Haus\nein kleiner Hund\n".as_bytes()).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "translate on wgpu: {}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 2, "{}", stdout(&o));
    let o = kiln(&["eval", &gpu.display().to_string(), "--split", "valid"]);
    assert!(o.status.success(), "eval on wgpu: {}", stderr(&o));
    // The checkpoint evaluated on wgpu gives the loss the run logged for it (both on wgpu).
    let report = read_json(&gpu.join("eval-valid.json"));
    let logged = read_jsonl(&gpu.join("metrics.jsonl")).into_iter().rfind(|r| r["kind"] == "valid").unwrap();
    assert!((f(&report["loss"]) - f(&logged["loss"])).abs() <= 1e-4 * f(&logged["loss"]), "eval {} vs logged {}", report["loss"], logged["loss"]);
    let o = kiln(&["export", &gpu.display().to_string(), "--format", "safetensors"]);
    assert!(o.status.success(), "export: {}", stderr(&o));
}

/// The deferred loss on an asynchronous device: reading every step or every 10 steps, at once or
/// overlapped with the next window, sums the same losses over the same steps; overlap changes
/// when the host waits, not a logged figure.
#[test]
fn sync_every_n_and_overlap_sum_the_same_loss_on_wgpu() {
    if !adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = ["train.max_steps=20", "eval.bleu=false", DEVICE];
    let cases = [("every1", "train.sync_interval=1", "train.sync_overlap=false"), ("every10", "train.sync_interval=10", "train.sync_overlap=false"), ("every10-overlap", "train.sync_interval=10", "train.sync_overlap=true")];
    let mut totals = Vec::new();
    for (name, interval, overlap) in cases {
        let run_dir = dir.path().join(name);
        run(&lm(), &run_dir, &[&base[..], &[interval, overlap]].concat());
        let w = windows(&run_dir);
        let sum: f64 = w.iter().map(|r| f(&r["loss"]) * f(&r["tokens"])).sum();
        let last = w.last().unwrap();
        totals.push((sum, last["step"].as_u64().unwrap(), last["sync"]["count"].as_u64().unwrap(), w));
    }
    let (s1, steps1, reads1, _) = &totals[0];
    for (s, steps, _, _) in &totals[1..] {
        assert_eq!(steps, steps1);
        assert!((s - s1).abs() <= 1e-5 * s1.abs(), "Σ loss {s} vs every step {s1}");
    }
    assert_eq!(*reads1, 20, "one read per step");
    assert_eq!(totals[1].2, 2, "one read per 10 steps");
    let rows = |w: &Vec<Value>| w.iter().map(|r| (r["step"].clone(), r["loss"].clone(), r["tokens"].clone())).collect::<Vec<_>>();
    assert_eq!(rows(&totals[1].3), rows(&totals[2].3), "overlap moves the reads, not the rows");
}

/// Stopped by max_steps and resumed on wgpu, with dropout: the resumed run reaches the unbroken
/// run's end. Batches and dropout masks are functions of (seed, step) on every device; whether the sums
/// come out bit for bit depends on CubeCL's kernels, so the bound is stated: 1e-5 relative.
#[test]
fn stop_and_resume_on_wgpu_reaches_the_unbroken_end() {
    if !adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    // With dropout, so the device's masks are part of what the resumed run must see again.
    let sets = ["train.max_steps=20", "train.sync_interval=5", "model.dropout=0.1", DEVICE];
    run(&lm(), &whole, &sets);
    run(&lm(), &split, &["train.max_steps=10", "train.sync_interval=5", "model.dropout=0.1", DEVICE]);
    let o = kiln(&["train", "--resume", &split.display().to_string(), "--set", "train.max_steps=20", "--no-tui"]);
    assert!(o.status.success(), "resume on wgpu: {}", stderr(&o));
    assert!(stdout(&o).contains("resumed at step 10"), "{}", stdout(&o));
    let (a, b) = (windows(&whole), windows(&split));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        let (lx, ly) = (f(&x["loss"]), f(&y["loss"]));
        assert!((lx - ly).abs() <= 1e-5 * lx, "step {}: unbroken {lx} vs resumed {ly}", x["step"]);
        if x["step"].as_u64() == Some(20) {
            eprintln!("resume on wgpu: last window loss unbroken {lx:e}, resumed {ly:e}, bit-exact: {}", lx.to_bits() == ly.to_bits());
        }
    }
    let (sa, sb) = (read_json(&whole.join("summary.json")), read_json(&split.join("summary.json")));
    let (va, vb) = (f(&sa["valid_loss"]), f(&sb["valid_loss"]));
    assert!((va - vb).abs() <= 1e-5 * va, "valid loss {va} vs {vb}");
    // The language model samples on the run's device, in the checkout where the translation
    // tests tune their kernels too: the run's own kernel choices (`<run>/autotune`) are replayed,
    // never a choice tuned on another model's shapes (README, Devices: kernel choices).
    assert!(split.join("autotune").is_dir(), "the run keeps its kernel choices");
    let o = kiln(&["generate", &split.display().to_string(), "--prompt", "To be", "--max-tokens", "8", "--seed", "3"]);
    assert!(o.status.success() && stdout(&o).starts_with("To be"), "generate on wgpu: {}{}", stdout(&o), stderr(&o));
}

/// Data parallel over wgpu devices is refused before anything runs: CubeCL 0.10's wgpu runtime
/// has no collective operations (its `comm_init` is `unimplemented!()`, which Burn's collective
/// reaches at the first all-reduce; seen as a panic before the recipe check refused it).
#[test]
fn data_parallel_over_wgpu_devices_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let o = train_with(&lm(), &dir.path().join("dp"), &["backend.devices=[\"wgpu:cpu\", \"wgpu:cpu\"]"], &[]);
    assert_user_error(&o, &["backend.devices", "no collective operations"]);
}

/// A non-finite step on the device is found at its window's read and skipped as on the CPU.
#[test]
fn a_nonfinite_step_on_wgpu_is_skipped() {
    if !adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("skip");
    let o = run_env(&lm(), &run_dir, &["train.max_steps=20", "train.on_nan=skip", DEVICE], &[("KILN_TEST_NONFINITE_STEPS", "13")]);
    assert!(stdout(&o).contains("non-finite"), "{}", stdout(&o));
    let s = read_json(&run_dir.join("summary.json"));
    assert_eq!(s["skipped_steps"].as_u64(), Some(1), "{s}");
    assert!(windows(&run_dir).iter().all(|w| f(&w["loss"]).is_finite()));
}

/// `loader.max_tokens = "auto"` on wgpu probes through CubeCL's memory meter (the adapter's
/// reserved bytes) and trains with the table.
#[test]
fn the_batch_size_probe_runs_on_wgpu() {
    if !adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("auto");
    let o = run(&lm(), &run_dir, &["loader.max_tokens=auto", "loader.auto_token_cap=512", "train.max_steps=10", DEVICE]);
    assert!(stdout(&o).contains("probe steps"), "{}", stdout(&o));
    let table = read_json(&run_dir.join("autobatch.json"));
    assert!(table["device"].as_str().unwrap().contains("wgpu"), "{table}");
    assert!(table["probes"].as_u64().unwrap() >= 1 && table["capacity_mb"].as_f64().unwrap() > 0.0, "{table}");
}

/// Half precision where the adapter cannot: one line, exit 2, nothing trained (f16 runs where the
/// adapter has f16 in shaders, as lavapipe does); WGSL has no bf16 at all. Devices that do not
/// exist, and a Vulkan loader without a driver: one line.
#[test]
fn what_the_adapter_cannot_do_is_refused_in_one_line() {
    if !adapter() {
        return;
    }
    let listed = stdout(&kiln(&["devices"]));
    let cpu_line = listed.lines().find(|l| l.starts_with("wgpu:cpu ")).unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    if cpu_line.ends_with("f16 no") {
        let o = train_with(&lm(), &dir.path().join("f16"), &["train.precision=f16", DEVICE], &[]);
        assert_user_error(&o, &["train.precision = \"f16\"", "no f16 in shaders"]);
    } else {
        // Mesa's lavapipe has it (wgpu's SHADER_F16): f16 products with loss scaling on the device.
        let o = run(&lm(), &dir.path().join("f16"), &["train.precision=f16", "train.max_steps=10", DEVICE]);
        assert!(stdout(&o).contains("f16 products"), "{}", stdout(&o));
        let w = windows(&dir.path().join("f16"));
        assert!(w.iter().all(|r| r["loss_scale"] == 65536.0 && f(&r["loss"]).is_finite()), "{w:?}");
    }
    let o = train_with(&lm(), &dir.path().join("bf16"), &["train.precision=bf16", DEVICE], &[]);
    assert_user_error(&o, &["train.precision = \"bf16\"", "WGSL"]);
    let o = train_with(&lm(), &dir.path().join("none"), &["backend.device=wgpu:virtual:7"], &[]);
    assert_user_error(&o, &["backend.device = \"wgpu:virtual:7\"", "no such adapter", "llvmpipe"]);
    // A Vulkan loader that finds no driver: "auto" falls back to Flex saying why; a wgpu name fails.
    let no_driver = [("VK_ICD_FILENAMES", "/nonexistent.json"), ("VK_DRIVER_FILES", "/nonexistent.json")];
    let o = train_with(&lm(), &dir.path().join("nodriver"), &[DEVICE], &no_driver);
    assert_user_error(&o, &["backend.device = \"wgpu:cpu\"", "apt-get install mesa-vulkan-drivers"]);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).arg("devices").envs(no_driver).output().unwrap();
    assert!(o.status.success() && stdout(&o).contains("auto                 Cpu"), "{}{}", stdout(&o), stderr(&o));
    assert!(!dir.path().join("bf16/checkpoints").exists(), "nothing trained");
    let rows = read_jsonl(&dir.path().join("bf16/metrics.jsonl"));
    assert!(rows.iter().all(|r| r["kind"] != "train") && rows.iter().any(|r| r["kind"] == "error"), "the refusal is the run's error row: {rows:?}");
}
