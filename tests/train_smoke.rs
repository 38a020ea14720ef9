//! End-to-end training on the smoke recipe (real Ding sentence pairs, tiny model): the loss falls,
//! the run directory honours its contract, sync windows are exact, and resume continues a run.

mod common;
use common::*;
use serde_json::Value;

fn train(run_dir: &std::path::Path, sets: &[&str]) -> std::process::Output {
    let run = run_dir.display().to_string();
    let mut args = vec!["train".to_string(), smoke(), "--run-dir".into(), run, "--no-tui".into()];
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = kiln(&args);
    assert!(o.status.success(), "training failed: {}\n{}", stderr(&o), stdout(&o));
    o
}

/// Starts a smoke-recipe training in the background (output captured).
fn spawn_train(run_dir: &std::path::Path, sets: &[&str]) -> std::process::Child {
    let mut args = vec!["train".to_string(), smoke(), "--run-dir".into(), run_dir.display().to_string(), "--no-tui".into()];
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Polls `ready` every 10 ms, for two minutes at most.
fn wait_for(what: &str, ready: impl Fn() -> bool) {
    let t0 = std::time::Instant::now();
    while !ready() {
        assert!(t0.elapsed().as_secs() < 120, "{what} did not appear");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn windows(rows: &[Value]) -> Vec<&Value> {
    rows.iter().filter(|r| r["kind"] == "train").collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn smoke_run_learns_and_writes_the_run_directory_contract() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = train(&run, &["train.epochs=3", "train.sync_interval=5"]);
    let out = stdout(&o);
    assert!(out.contains("epoch 1/3 | step"), "progress lines expected:\n{out}");

    for f in ["recipe.toml", "tokenizer.json", "metrics.jsonl", "summary.json", "checkpoints/latest"] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let resolved = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(resolved.contains("epochs = 3") && resolved.contains("sync_interval = 5"), "{resolved}");

    let rows = read_jsonl(&run.join("metrics.jsonl"));
    let train_rows = windows(&rows);
    assert!(train_rows.len() >= 4);
    for r in &train_rows {
        for k in ["epoch", "step", "loss", "tokens", "tokens_per_s", "lr"] {
            assert!(r[k].is_number(), "{k} in {r}");
        }
        for k in ["count", "total_ms", "max_ms"] {
            assert!(r["sync"][k].is_number(), "sync.{k} in {r}");
        }
    }
    let valid: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "valid").collect();
    assert_eq!(valid.len(), 3, "one validation per epoch");
    for v in &valid {
        for k in ["epoch", "step", "loss", "ppl", "bleu"] {
            assert!(v[k].is_number(), "{k} in {v}");
        }
        assert!((f(&v["ppl"]) - f(&v["loss"]).exp()).abs() < 1e-6 * f(&v["ppl"]));
    }
    // The loss falls: last window well below the first, validation improves.
    let first = f(&train_rows[0]["loss"]);
    let last = f(&train_rows[train_rows.len() - 1]["loss"]);
    assert!(last < first * 0.8, "loss did not fall: {first} → {last}");
    assert!(f(&valid[2]["loss"]) < f(&valid[0]["loss"]), "validation loss did not fall");

    let s = read_json(&run.join("summary.json"));
    for k in ["steps", "epochs", "train_loss", "valid_loss", "bleu", "tokens_per_s", "wall_s"] {
        assert!(s[k].is_number(), "{k} in {s}");
    }
    for k in ["count", "total_ms", "avg_ms", "max_ms"] {
        assert!(s["sync"][k].is_number(), "sync.{k} in {s}");
    }
    assert_eq!(s["epochs"], 3);
    assert_eq!(s["steps"], train_rows.last().unwrap()["step"]);
    assert_eq!(s["sync"]["count"].as_u64().unwrap(), train_rows.len() as u64, "one sync per window row");
    // train_loss is the token-weighted mean over the last epoch's windows.
    let last_epoch: Vec<&&Value> = train_rows.iter().filter(|r| r["epoch"] == 3).collect();
    let (sum, tok) = last_epoch.iter().fold((0.0, 0.0), |(s, t), r| (s + f(&r["loss"]) * f(&r["tokens"]), t + f(&r["tokens"])));
    assert!((f(&s["train_loss"]) - sum / tok).abs() < 1e-9 * (sum / tok));
}

/// Σ loss × tokens over all windows, the number of steps, and the sync count.
fn totals(run: &std::path::Path) -> (f64, u64, u64) {
    let rows = read_jsonl(&run.join("metrics.jsonl"));
    let w = windows(&rows);
    let sum = w.iter().map(|r| f(&r["loss"]) * f(&r["tokens"])).sum();
    let steps = w.last().unwrap()["step"].as_u64().unwrap();
    let syncs = w.last().unwrap()["sync"]["count"].as_u64().unwrap();
    (sum, steps, syncs)
}

#[test]
fn sync_interval_does_not_change_the_summed_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("every1"), dir.path().join("every10"));
    train(&a, &["train.sync_interval=1", "train.epochs=2"]);
    train(&b, &["train.sync_interval=10", "train.epochs=2"]);
    let (sum1, steps1, syncs1) = totals(&a);
    let (sum10, steps10, syncs10) = totals(&b);
    assert_eq!(steps1, steps10);
    assert!(steps1 > 20, "need several windows, got {steps1} steps");
    let rel = (sum1 - sum10).abs() / sum1.abs();
    assert!(rel <= 1e-5, "summed loss differs: {sum1} vs {sum10} (rel {rel})");
    assert_eq!(syncs1, steps1, "sync_interval = 1 reads every step");
    // ⌈steps / 10⌉ windows plus at most one extra read per epoch end.
    assert!(syncs10 <= steps10.div_ceil(10) + 2, "{syncs10} syncs for {steps10} steps");
    let s1 = read_json(&a.join("summary.json"));
    let s10 = read_json(&b.join("summary.json"));
    let (l1, l10) = (f(&s1["train_loss"]), f(&s10["train_loss"]));
    assert!((l1 - l10).abs() / l1 <= 1e-5, "train_loss {l1} vs {l10}");
}

/// Reading each window while the next one runs (`train.sync_overlap`) changes when the loop
/// waits, not what it computes or logs: the same rows, bit for bit, and the same end.
#[test]
fn sync_overlap_changes_when_windows_are_read_not_what_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("overlap"), dir.path().join("at-once"));
    train(&a, &["train.sync_overlap=true", "train.sync_interval=3"]);
    train(&b, &["train.sync_overlap=false", "train.sync_interval=3"]);
    let rows = |run: &std::path::Path| -> Vec<(Value, Value, Value, Value)> {
        read_jsonl(&run.join("metrics.jsonl"))
            .into_iter()
            .filter(|r| r["kind"] == "train")
            .map(|r| (r["step"].clone(), r["loss"].clone(), r["tokens"].clone(), r["lr"].clone()))
            .collect()
    };
    let (ra, rb) = (rows(&a), rows(&b));
    assert!(ra.len() > 5, "need several windows: {ra:?}");
    assert_eq!(ra, rb);
    let steps: Vec<u64> = ra.iter().map(|r| r.0.as_u64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "each row names its own window's last step: {steps:?}");
    let (sa, sb) = (read_json(&a.join("summary.json")), read_json(&b.join("summary.json")));
    assert_eq!((&sa["train_loss"], &sa["valid_loss"], &sa["steps"]), (&sb["train_loss"], &sb["valid_loss"], &sb["steps"]));
    assert_eq!(sa["sync"]["count"], sb["sync"]["count"], "one read per window either way");
}

/// `train.precision = "bf16"`: the matrix products run in bf16 (on Flex: operands and results
/// rounded to bf16), everything else in f32. It learns like the f32 run, close but not equal,
/// and says so in the header.
#[test]
fn bf16_products_train_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("f32"), dir.path().join("bf16"));
    train(&a, &["train.precision=f32"]);
    let o = train(&b, &["train.precision=bf16"]);
    assert!(stdout(&o).contains("bf16 products"), "{}", stdout(&o));
    let losses = |run: &std::path::Path| -> Vec<f64> {
        read_jsonl(&run.join("metrics.jsonl")).into_iter().filter(|r| r["kind"] == "train").map(|r| f(&r["loss"])).collect()
    };
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), lb.len());
    assert!(lb.last() < lb.first(), "bf16 learns: {lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() / x <= 0.02, "window loss f32 {x} vs bf16 {y}");
    }
    assert_ne!(la, lb, "bf16 gave f32's losses exactly: the products did not run in bf16");
    let (sa, sb) = (read_json(&a.join("summary.json")), read_json(&b.join("summary.json")));
    assert!((f(&sa["valid_loss"]) - f(&sb["valid_loss"])).abs() / f(&sa["valid_loss"]) <= 0.02, "{sa} vs {sb}");
}

/// `loader.max_tokens = "auto"`: the run probes a budget per length range once, writes it to
/// `autobatch.json` and says so; batches follow that table exactly (the same run with the table
/// written into the recipe ends bit-identical); a resume reads the table back instead of probing
/// again and ends like the unbroken run; `kiln eval` batches with it too.
#[test]
fn automatic_batch_size_probes_once_and_the_run_keeps_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let (auto, explicit, split) = (dir.path().join("auto"), dir.path().join("explicit"), dir.path().join("split"));
    let sets = ["loader.max_tokens=auto", "loader.auto_token_cap=900", "train.epochs=2"];
    let o = train(&auto, &sets);
    let out = stdout(&o);
    assert!(out.contains("loader.max_tokens = \"auto\"") && out.contains("probe steps"), "{out}");
    let table = read_json(&auto.join("autobatch.json"));
    let rows: Vec<(u64, u64, u64)> = table["rows"].as_array().unwrap().iter().map(|r| (r["up_to"].as_u64().unwrap(), r["sentences"].as_u64().unwrap(), r["tokens"].as_u64().unwrap())).collect();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![66, 32, 16], "longest range first: {table}");
    for &(up_to, sentences, tokens) in &rows {
        assert!(tokens == sentences * up_to && tokens <= 900 && tokens + up_to > 900, "within one sentence of the cap: {table}");
    }
    assert!(table["probes"].as_u64().unwrap() >= 4 && table["limit_mb"].as_f64() < table["capacity_mb"].as_f64());

    // The same table, given by hand.
    let by_hand: Vec<String> = rows.iter().rev().map(|r| format!("[{}, {}]", r.0, r.2)).collect();
    let by_hand = format!("loader.max_tokens=[{}]", by_hand.join(", "));
    let o = train(&explicit, &[by_hand.as_str(), "train.epochs=2"]);
    assert!(!stdout(&o).contains("probe steps"));
    let (a, b) = (read_json(&auto.join("summary.json")), read_json(&explicit.join("summary.json")));
    assert_eq!((&a["steps"], &a["train_loss"], &a["valid_loss"]), (&b["steps"], &b["train_loss"], &b["valid_loss"]));

    // Stopped mid-run and resumed: the table is read back, not probed again.
    train(&split, &[&sets[..], &["train.max_steps=7"]].concat());
    let probed = std::fs::read(split.join("autobatch.json")).unwrap();
    let o = kiln(&["train", "--resume", &split.display().to_string(), "--set", "train.max_steps=0", "--no-tui"]);
    assert!(o.status.success(), "resume failed: {}", stderr(&o));
    assert!(stdout(&o).contains("the budgets probed when the run started"), "{}", stdout(&o));
    assert_eq!(std::fs::read(split.join("autobatch.json")).unwrap(), probed, "the table is not probed again");
    let c = read_json(&split.join("summary.json"));
    assert_eq!((&c["steps"], &c["train_loss"]), (&a["steps"], &a["train_loss"]), "the resumed run batches like the unbroken one");

    let o = kiln(&["eval", &auto.display().to_string(), "--split", "valid"]);
    assert!(o.status.success(), "eval: {}", stderr(&o));
}

/// Data parallel (`backend.devices`), three replicas as threads on the CPU: each takes a third
/// of the step's batches and the gradients are all-reduced with Burn's collective, so (without
/// dropout, whose masks differ per replica) it computes exactly what one device accumulating
/// three batches computes, the epoch's last step with idle replicas included (40 batches a
/// epoch: the 14th step has one), up to the order of the all-reduce's sums. A run stopped and
/// resumed rebuilds the replicas from the checkpoint and ends the same.
#[test]
fn data_parallel_replicas_compute_what_accumulation_computes() {
    let dir = tempfile::tempdir().unwrap();
    let (dp, acc, split) = (dir.path().join("dp"), dir.path().join("acc"), dir.path().join("split"));
    // Whole batches (`backend.cpu_split = 1`) on the accumulating side too: replicas never cut
    // their batches, and this test is about replicas, not parts.
    let common = ["model.dropout=0", "train.epochs=2", "eval.bleu=false", "backend.cpu_split=1"];
    let devices = "backend.devices=[\"cpu\", \"cpu\", \"cpu\"]";
    let o = train(&dp, &[&common[..], &[devices]].concat());
    assert!(stdout(&o).contains("cpu ×3") && stdout(&o).contains("data parallel"), "{}", stdout(&o));
    train(&acc, &[&common[..], &["train.accumulate=3"]].concat());
    let (a, b) = (read_json(&dp.join("summary.json")), read_json(&acc.join("summary.json")));
    assert_eq!(a["steps"], b["steps"]);
    assert_eq!(a["steps"], 28, "⌈40 / 3⌉ steps an epoch");
    for key in ["train_loss", "valid_loss"] {
        let (x, y) = (f(&a[key]), f(&b[key]));
        assert!((x - y).abs() / y <= 1e-6, "{key}: data parallel {x} vs accumulation {y}");
    }
    let rows: Vec<Value> = read_jsonl(&dp.join("metrics.jsonl")).into_iter().filter(|r| r["kind"] == "train").collect();
    for r in &rows {
        let per_device: Vec<u64> = r["device_tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(per_device.len(), 3, "{r}");
        assert_eq!(per_device.iter().sum::<u64>(), r["tokens"].as_u64().unwrap(), "{r}");
        assert!(per_device.iter().all(|&t| t > 0), "{r}");
    }
    // Two replicas: a + b = b + a, so the all-reduce is exact whatever order the peers arrive in
    // (with three, Burn's tree adds same-id devices, as all CPU "devices" are, in hash order, and
    // the last bits vary run to run). Stopped in epoch 1, resumed: epoch 2 and the model after it
    // are bit-identical to the unbroken run's.
    let (whole, two) = (dir.path().join("whole"), "backend.devices=[\"cpu\", \"cpu\"]");
    train(&whole, &[&common[..], &[two]].concat());
    train(&split, &[&common[..], &[two, "train.max_steps=9"]].concat());
    let o = kiln(&["train", "--resume", &split.display().to_string(), "--set", "train.max_steps=0", "--no-tui"]);
    assert!(o.status.success(), "resume failed: {}", stderr(&o));
    let (w, c) = (read_json(&whole.join("summary.json")), read_json(&split.join("summary.json")));
    assert_eq!((&c["steps"], &c["train_loss"], &c["valid_loss"]), (&w["steps"], &w["train_loss"], &w["valid_loss"]), "resumed data-parallel run");
}

/// `train.precision = "f16"`: f16 products with dynamic loss scaling decided on the device. It
/// learns like f32; steps whose gradients overflow (injected at steps 5 and 6) are undone on the
/// device and counted, the scale halves at each (2¹⁶ → 2¹⁴), and nothing is taken for a
/// divergence.
#[test]
fn f16_loss_scaling_undoes_overflowing_steps_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("f32"), dir.path().join("f16"), dir.path().join("f16-overflow"));
    train(&a, &[]);
    let o = train(&b, &["train.precision=f16"]);
    assert!(stdout(&o).contains("f16 products"), "{}", stdout(&o));
    let rows = |run: &std::path::Path| -> Vec<Value> { read_jsonl(&run.join("metrics.jsonl")).into_iter().filter(|r| r["kind"] == "train").collect() };
    for (x, y) in rows(&a).iter().zip(rows(&b)) {
        let (x, y) = (f(&x["loss"]), f(&y["loss"]));
        assert!((x - y).abs() / x <= 0.03, "window loss f32 {x} vs f16 {y}");
    }
    assert!(rows(&b).iter().all(|r| r["overflow_skips"].is_null() && r["loss_scale"] == 65536.0), "no overflow, scale 2^16");

    let o = common::train_with(&smoke(), &c, &["train.precision=f16"], &[("KILN_TEST_OVERFLOW_STEPS", "5,6")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).contains("non-finite") && !c.join("nonfinite.json").exists(), "{}", stdout(&o));
    let r = rows(&c);
    assert_eq!((r[0]["step"].as_u64(), r[0]["overflow_skips"].as_u64(), r[0]["loss_scale"].as_f64()), (Some(10), Some(2), Some(16384.0)), "{}", r[0]);
    assert!(r[1..].iter().all(|w| w["overflow_skips"].is_null() && w["loss_scale"] == 16384.0));
    assert!(r.iter().all(|w| f(&w["loss"]).is_finite()) && f(&r.last().unwrap()["loss"]) < f(&r[0]["loss"]));
    let s = read_json(&c.join("summary.json"));
    assert_eq!((s["skipped_steps"].as_u64(), s["rollbacks"].as_u64()), (Some(0), Some(0)), "overflows are not divergences: {s}");
}

#[test]
fn resume_continues_to_the_same_end() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    train(&whole, &["train.epochs=2"]);
    train(&split, &["train.epochs=1"]);
    let after_one = read_json(&split.join("summary.json"));
    assert_eq!(after_one["epochs"], 1);
    let o = kiln(&["train", "--resume", &split.display().to_string(), "--set", "train.epochs=2", "--no-tui"]);
    assert!(o.status.success(), "resume failed: {}", stderr(&o));
    assert!(stdout(&o).contains("resumed at step"), "{}", stdout(&o));
    let a = read_json(&whole.join("summary.json"));
    let b = read_json(&split.join("summary.json"));
    assert_eq!(a["steps"], b["steps"]);
    assert_eq!(b["epochs"], 2);
    let (la, lb) = (f(&a["train_loss"]), f(&b["train_loss"]));
    assert!((la - lb).abs() / la <= 1e-5, "train_loss after resume {lb} vs unbroken {la}");
    // Stopped mid-epoch by max_steps and resumed: the same batches and dropout masks follow, so the
    // end is bit-identical to the unbroken run.
    let mid = dir.path().join("mid");
    train(&mid, &["train.epochs=2", "train.max_steps=25"]);
    let o = kiln(&["train", "--resume", &mid.display().to_string(), "--set", "train.max_steps=0", "--no-tui"]);
    assert!(o.status.success(), "resume failed: {}", stderr(&o));
    assert!(stdout(&o).contains("resumed at step 25"), "{}", stdout(&o));
    let m = read_json(&mid.join("summary.json"));
    assert_eq!(m["steps"], a["steps"]);
    assert_eq!(m["train_loss"], a["train_loss"], "mid-epoch resume must be exact");
    assert_eq!(m["valid_loss"], a["valid_loss"]);
    // Resuming with a change to the model is refused.
    let o = kiln(&["train", "--resume", &split.display().to_string(), "--set", "model.d_model=64"]);
    assert_user_error(&o, &["model.d_model", "cannot change"]);
}

/// Three corpora mixed by weight (the Ding pairs, the Gospels at 0.5, Psalms and Proverbs at 2):
/// each epoch draws each corpus its count, each corpus gets its own cache entry that a
/// reweighting reuses, and a run stopped mid-epoch resumes to the unbroken run's very end.
#[test]
fn several_corpora_mix_by_weight_cache_apart_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let asset = |name: &str| root().join("assets").join(name).display().to_string();
    let mix = |gospels: f64| {
        format!(
            "data.train=[{{ path = {:?} }}, {{ path = {:?}, weight = {gospels}, swap = true }}, {{ path = {:?}, weight = 2.0, swap = true }}]",
            asset("de-en.ding.tsv"),
            asset("en-de.bible.gospels.tsv"),
            asset("en-de.bible.wisdom.tsv")
        )
    };
    let cache_set = format!("loader.cache_dir={:?}", cache.display().to_string());
    let half = mix(0.5);
    let sets = [half.as_str(), "data.limit=300", "train.epochs=2", "eval.bleu=false", cache_set.as_str()];
    let whole = dir.path().join("whole");
    let o = train(&whole, &sets);
    // Each corpus's pairs per epoch against its size (pairs past max_len dropped): once, half, twice.
    let drawn = |out: &str| -> Vec<(String, f64, f64)> {
        let line = out.lines().find(|l| l.contains("3 corpora mixed by weight, pairs per epoch: ")).unwrap_or_else(|| panic!("no mix note: {out}"));
        line.split("pairs per epoch: ").nth(1).unwrap().split(", ").map(|part| {
            let w: Vec<&str> = part.split(' ').collect();
            (w[0].to_string(), w[1].parse().unwrap(), w[3].parse().unwrap())
        }).collect()
    };
    let d = drawn(&stdout(&o));
    assert_eq!(d.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["de-en.ding.tsv", "en-de.bible.gospels.tsv", "en-de.bible.wisdom.tsv"]);
    assert_eq!(d[0].1, d[0].2);
    assert_eq!(d[1].1, (d[1].2 * 0.5).round());
    assert_eq!(d[2].1, d[2].2 * 2.0);
    assert!(d.iter().all(|x| x.2 > 50.0), "{d:?}");
    let entries = || std::fs::read_dir(&cache).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "kds")).count();
    assert_eq!(entries(), 3, "one entry per corpus");
    let a = read_json(&whole.join("summary.json"));
    assert!(f(&a["valid_loss"]).is_finite());

    // Stopped mid-epoch, resumed: the same draws, batches and masks follow.
    let mid = dir.path().join("mid");
    train(&mid, &[&sets[..], &["train.max_steps=7"]].concat());
    let o = kiln(&["train", "--resume", &mid.display().to_string(), "--set", "train.max_steps=0", "--no-tui"]);
    assert!(o.status.success(), "resume failed: {}", stderr(&o));
    let m = read_json(&mid.join("summary.json"));
    assert_eq!((&m["steps"], &m["train_loss"], &m["valid_loss"]), (&a["steps"], &a["train_loss"], &a["valid_loss"]), "mid-epoch resume of a mixture must be exact");

    // Reweighted: every corpus comes from the cache, nothing is encoded again; other draws. (The
    // resume keyed the main corpus on its own tokenizer.json, an entry of its own; the further
    // corpora's entries, keyed on the tokenizer's content, served it.)
    assert_eq!(entries(), 4);
    let once = mix(1.0);
    let again = dir.path().join("reweighted");
    let o = train(&again, &[once.as_str(), "data.limit=300", "train.epochs=1", "eval.bleu=false", cache_set.as_str()]);
    assert!(!stdout(&o).contains("tokenizing"), "{}", stdout(&o));
    let d = drawn(&stdout(&o));
    assert_eq!(d[1].1, d[1].2, "the Gospels once per epoch now");
    assert_eq!(entries(), 4);
    assert_eq!(read_json(&again.join("summary.json"))["data"]["cache_hit"], true);
}

/// Named validation sets: each validated every time under its name (metrics.jsonl, the progress
/// line, summary.json, `kiln compare`), with chrF next to BLEU; `train.best_set` makes the best
/// checkpoint follow one of them; an unknown name is refused naming the key.
#[test]
fn named_dev_sets_are_validated_under_their_names_and_can_pick_the_best() {
    let dir = tempfile::tempdir().unwrap();
    let bible = root().join("assets/en-de.bible.wisdom.tsv");
    // 40 verses, German→English as the smoke recipe translates.
    let dev = dir.path().join("wisdom-40.tsv");
    let lines: Vec<String> = std::fs::read_to_string(&bible).unwrap().lines().take(40).map(|l| {
        let (en, de) = l.split_once('\t').unwrap();
        format!("{de}\t{en}")
    }).collect();
    std::fs::write(&dev, lines.join("\n") + "\n").unwrap();
    let sets = format!("eval.sets=[{{ name = \"wisdom\", path = {:?} }}]", dev.display().to_string());
    let run = dir.path().join("run");
    let o = train(&run, &[sets.as_str(), "train.best_set=wisdom", "eval.bleu_sentences=10"]);
    let out = stdout(&o);
    assert!(out.contains("valid wisdom | epoch 1 |") && out.contains("valid wisdom | epoch 2 |"), "{out}");
    let rows = read_jsonl(&run.join("metrics.jsonl"));
    let named: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "valid" && r["set"] == "wisdom").collect();
    let main: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "valid" && r["set"].is_null()).collect();
    assert_eq!((named.len(), main.len()), (2, 2), "one row per set and validation");
    assert!(named.iter().all(|r| f(&r["loss"]).is_finite() && r["bleu"].is_number() && r["metrics"]["chrf"].is_number()), "{named:?}");
    assert_ne!(named[1]["loss"], main[1]["loss"], "another set, other figures");
    let s = read_json(&run.join("summary.json"));
    assert_eq!(s["dev"]["wisdom"]["loss"], named[1]["loss"]);
    assert_eq!(s["valid_loss"], main[1]["loss"], "valid_loss stays the main set's");
    // The best checkpoint is the one with the lower loss on the named set.
    let best = named.iter().map(|r| f(&r["loss"])).fold(f64::INFINITY, f64::min);
    assert_eq!(f(&s["best"]["value"]), best, "{s}");
    let o = kiln(&["compare", &run.display().to_string(), &run.display().to_string()]);
    assert!(stdout(&o).contains("best wisdom loss"), "{}", stdout(&o));
    // A name that is not a set is refused, naming the key.
    let o = kiln(&["train", &smoke(), "--set", "train.best_set=news", "--run-dir", &dir.path().join("bad").display().to_string(), "--no-tui"]);
    assert_user_error(&o, &["train.best_set", "news"]);
}

#[test]
fn gradient_accumulation_halves_the_optimizer_steps_and_still_learns() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("acc1"), dir.path().join("acc2"));
    train(&one, &["train.epochs=1", "eval.bleu=false"]);
    train(&two, &["train.epochs=1", "train.accumulate=2", "eval.bleu=false"]);
    let s1 = read_json(&one.join("summary.json"));
    let s2 = read_json(&two.join("summary.json"));
    let (n1, n2) = (s1["steps"].as_u64().unwrap(), s2["steps"].as_u64().unwrap());
    assert_eq!(n2, n1.div_ceil(2), "{n1} batches → {n2} steps");
    // Same batches, same tokens: the window rows of both runs add up to the same token count.
    let tokens = |run: &std::path::Path| windows(&read_jsonl(&run.join("metrics.jsonl"))).iter().map(|r| r["tokens"].as_u64().unwrap()).sum::<u64>();
    assert_eq!(tokens(&one), tokens(&two));
    let rows = read_jsonl(&two.join("metrics.jsonl"));
    let w = windows(&rows);
    assert!(f(&w.last().unwrap()["loss"]) < f(&w[0]["loss"]), "loss did not fall with accumulation");
    assert!(s2["bleu"].is_null(), "BLEU disabled → null");
}

#[test]
fn dataset_cache_hits_and_rebuilds_a_corrupted_entry() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let set_cache = format!("loader.cache_dir={}", cache.display());
    let sets = [set_cache.as_str(), "train.max_steps=3", "eval.bleu=false"];
    train(&dir.path().join("cold"), &sets);
    let cold = read_json(&dir.path().join("cold/summary.json"));
    assert_eq!(cold["data"]["cache_hit"], false);
    let entries: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(entries.len(), 1, "one entry: {entries:?}");

    let o = train(&dir.path().join("warm"), &sets);
    let warm = read_json(&dir.path().join("warm/summary.json"));
    assert_eq!(warm["data"]["cache_hit"], true, "{}", stdout(&o));
    // A hit gives the very same data: same tokenizer, same losses.
    assert_eq!(std::fs::read(dir.path().join("cold/tokenizer.json")).unwrap(), std::fs::read(dir.path().join("warm/tokenizer.json")).unwrap());
    assert_eq!(cold["train_loss"], warm["train_loss"]);

    // Flip one bit in the middle of the entry: reported in one line, rebuilt, not used.
    let mut bytes = std::fs::read(&entries[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&entries[0], &bytes).unwrap();
    let o = train(&dir.path().join("flipped"), &sets);
    let out = stdout(&o);
    assert!(out.contains("dataset cache:") && out.contains("checksum mismatch") && out.contains("rebuilding"), "{out}");
    assert_eq!(read_json(&dir.path().join("flipped/summary.json"))["data"]["cache_hit"], false);

    // Truncate it: the same.
    let len = std::fs::metadata(&entries[0]).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&entries[0]).unwrap().set_len(len - 10).unwrap();
    let out = stdout(&train(&dir.path().join("truncated"), &sets));
    assert!(out.contains("truncated") && out.contains("rebuilding"), "{out}");
    // And the rebuilt entry serves the next run.
    train(&dir.path().join("again"), &sets);
    assert_eq!(read_json(&dir.path().join("again/summary.json"))["data"]["cache_hit"], true);
    // A tokenizer setting change misses.
    let sets2 = [set_cache.as_str(), "train.max_steps=3", "eval.bleu=false", "tokenizer.vocab_size=350"];
    train(&dir.path().join("other"), &sets2);
    assert_eq!(read_json(&dir.path().join("other/summary.json"))["data"]["cache_hit"], false);
}

#[test]
fn worker_count_does_not_change_training() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("w1"), dir.path().join("w2"));
    train(&one, &["loader.workers=1", "loader.prefetch=1", "train.max_steps=25", "eval.bleu=false"]);
    train(&two, &["loader.workers=2", "loader.prefetch=6", "train.max_steps=25", "eval.bleu=false"]);
    let losses = |run: &std::path::Path| -> Vec<(u64, String)> {
        windows(&read_jsonl(&run.join("metrics.jsonl"))).iter().map(|r| (r["tokens"].as_u64().unwrap(), r["loss"].to_string())).collect()
    };
    // Same batches in the same order: the same tokens and bit-identical losses per window.
    assert_eq!(losses(&one), losses(&two));
    // And the same weights file, byte for byte, parameter ids included (numbered in module
    // order, not drawn at random). The optimizer's file holds the same moments, but in the order
    // of Burn's hash map of them, which differs from process to process.
    let saved = |run: &std::path::Path| {
        let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
        std::fs::read(run.join("checkpoints").join(latest.trim()).join("model.mpk")).unwrap()
    };
    assert!(saved(&one) == saved(&two), "model.mpk differs between the two runs");
    for r in windows(&read_jsonl(&two.join("metrics.jsonl"))) {
        assert!(r["data_wait_ms"].is_number() && r["padding_pct"].is_number(), "{r}");
    }
}

#[test]
fn subword_regularisation_resamples_every_epoch_and_still_learns() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, sampled) = (dir.path().join("plain"), dir.path().join("sampled"));
    let epoch_tokens = |run: &std::path::Path| -> Vec<u64> {
        let rows = read_jsonl(&run.join("metrics.jsonl"));
        let mut per_epoch = vec![0u64; 2];
        for r in windows(&rows) {
            per_epoch[r["epoch"].as_u64().unwrap() as usize - 1] += r["tokens"].as_u64().unwrap();
        }
        per_epoch
    };
    train(&plain, &["train.epochs=2", "eval.bleu=false"]);
    let o = train(&sampled, &["train.epochs=2", "eval.bleu=false", "tokenizer.sample_alpha=0.2"]);
    assert!(stdout(&o).contains("subword regularisation: Unigram sampling, alpha 0.2"), "{}", stdout(&o));
    // Without regularisation both epochs see the same ids; with it each epoch has its own
    // segmentations (sampled ones are longer on average than the best one).
    let (p, s) = (epoch_tokens(&plain), epoch_tokens(&sampled));
    assert_eq!(p[0], p[1]);
    assert_ne!(s[0], s[1]);
    assert!(s[0] > p[0] && s[1] > p[1], "{s:?} vs {p:?}");
    // And the model still learns from the noisier segmentations.
    let w = windows(&read_jsonl(&sampled.join("metrics.jsonl"))).into_iter().cloned().collect::<Vec<_>>();
    assert!(f(&w.last().unwrap()["loss"]) < f(&w[0]["loss"]), "loss did not fall with sampling");
}

#[test]
fn sigint_stops_after_the_step_saves_and_resumes_to_the_same_end() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, stopped) = (dir.path().join("whole"), dir.path().join("stopped"));
    let sets = ["train.epochs=3", "train.sync_interval=2", "eval.bleu=false"];
    train(&whole, &sets);

    let child = spawn_train(&stopped, &sets);
    // Wait for the first sync window, then interrupt as a user's Ctrl-C would.
    let metrics = stopped.join("metrics.jsonl");
    wait_for("a training window", || std::fs::read_to_string(&metrics).unwrap_or_default().contains("\"kind\":\"train\""));
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "a requested stop is a success; stderr: {}", stderr(&o));
    assert!(stdout(&o).contains("stopped on request at step"), "{}", stdout(&o));
    let s = read_json(&stopped.join("summary.json"));
    assert_eq!(s["stopped"], true);
    let at = s["steps"].as_u64().unwrap();
    let end = read_json(&whole.join("summary.json"))["steps"].as_u64().unwrap();
    assert!(at > 0 && at < end, "stopped at {at} of {end}");
    assert!(stopped.join(format!("checkpoints/step-{at:07}")).is_dir(), "the stop saved a checkpoint at its step");

    let o = kiln(&["train", "--resume", &stopped.display().to_string(), "--no-tui"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (read_json(&whole.join("summary.json")), read_json(&stopped.join("summary.json")));
    assert_eq!(b["stopped"], false);
    assert_eq!(a["steps"], b["steps"]);
    assert_eq!(a["train_loss"], b["train_loss"], "the resumed run ends exactly where the unbroken one does");
    assert_eq!(a["valid_loss"], b["valid_loss"]);
}

#[test]
fn killed_at_a_random_moment_resumes_to_the_unbroken_end() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, killed) = (dir.path().join("whole"), dir.path().join("killed"));
    let sets = ["train.epochs=2", "train.save_every_steps=7", "train.sync_interval=3", "train.keep_checkpoints=3", "eval.bleu=false"];
    let t0 = std::time::Instant::now();
    train(&whole, &sets);
    let took_ms = t0.elapsed().as_millis() as u64;
    // Pruned to the newest three plus the best by validation loss, which `best` names.
    let left = std::fs::read_dir(whole.join("checkpoints")).unwrap().flatten().filter(|e| e.path().is_dir()).count();
    assert!(left <= 4, "{left} checkpoints kept");
    let best = std::fs::read_to_string(whole.join("checkpoints/best")).unwrap();
    assert!(whole.join("checkpoints").join(best.trim()).is_dir());

    let mut child = spawn_train(&killed, &sets);
    wait_for("a checkpoint", || killed.join("checkpoints/latest").exists());
    // A moment drawn from the clock, mid-step or mid-save: within the first third of the
    // unbroken run's duration after the first checkpoint, so the run is still going.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    std::thread::sleep(std::time::Duration::from_millis(u64::from(nanos) % (took_ms / 3).max(1)));
    // The kill must cut the run short: a run that already ended proves nothing.
    assert!(child.try_wait().unwrap().is_none() && !killed.join("summary.json").exists(), "the run ended before the kill");
    child.kill().unwrap(); // SIGKILL: no chance to save or clean up
    child.wait().unwrap();

    let o = kiln(&["train", "--resume", &killed.display().to_string(), "--no-tui"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (read_json(&whole.join("summary.json")), read_json(&killed.join("summary.json")));
    assert_eq!(a["steps"], b["steps"]);
    assert_eq!(a["train_loss"], b["train_loss"], "bit-exact continuation after kill -9");
    assert_eq!(a["valid_loss"], b["valid_loss"]);
    // The log continues without the rows of the lost steps: training steps only go forward.
    let steps: Vec<u64> = windows(&read_jsonl(&killed.join("metrics.jsonl"))).iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
}

/// The fused CPU kernels (`kiln_model::fused`: cross-entropy, GELU, softmax, layer norm) against
/// Burn's composition of the same functions (`KILN_UNFUSED=1`) over a real run: same batches, same
/// dropout masks, same steps. Rounding differs, so the losses are close rather than equal; a
/// kernel that computed something else (a smoothing term, a gradient) would move them by far more.
#[test]
fn fused_kernels_train_like_burns_composition() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("fused"), dir.path().join("composed"));
    // GELU and smoothing are the smoke recipe's defaults; named so that a change there keeps them.
    let sets = ["train.epochs=2", "model.activation=gelu", "train.label_smoothing=0.1"];
    let oa = train_with(&smoke(), &a, &sets, &[]);
    let ob = train_with(&smoke(), &b, &sets, &[("KILN_UNFUSED", "1")]);
    assert!(oa.status.success() && ob.status.success(), "{}\n{}", stderr(&oa), stderr(&ob));
    let (ra, rb) = (read_jsonl(&a.join("metrics.jsonl")), read_jsonl(&b.join("metrics.jsonl")));
    let (wa, wb) = (windows(&ra), windows(&rb));
    assert_eq!(wa.len(), wb.len());
    assert!(wa.len() >= 4, "need several windows, got {}", wa.len());
    for (i, (x, y)) in wa.iter().zip(&wb).enumerate() {
        assert_eq!(x["step"], y["step"]);
        let (lx, ly) = (f(&x["loss"]), f(&y["loss"]));
        // Measured: within 3e-7 over two epochs; rounding does not snowball at this size.
        assert!((lx - ly).abs() / ly <= 1e-5, "window {i}: loss {lx} fused vs {ly} composed");
    }
    let (va, vb) = (read_json(&a.join("summary.json")), read_json(&b.join("summary.json")));
    let (la, lb) = (f(&va["valid_loss"]), f(&vb["valid_loss"]));
    assert!((la - lb).abs() / lb <= 1e-5, "validation loss {la} fused vs {lb} composed");
}

/// `backend.cpu_split`: each batch cut by rows into parts that run side by side, one autodiff
/// graph each, gradients summed. The same batches and the same dropout masks (each part draws its
/// rows of the whole batch's), so the run is the whole-batch run up to the order of float sums.
/// Three parts on the pool's threads: uneven parts, one of them waiting for a thread; and with
/// two batches a step, the masks carry on from one batch's parts to the next batch.
#[test]
fn batch_parts_train_like_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    for accumulate in [1, 2] {
        let (a, b) = (dir.path().join(format!("whole-{accumulate}")), dir.path().join(format!("parts-{accumulate}")));
        let acc = format!("train.accumulate={accumulate}");
        let oa = train(&a, &["backend.cpu_split=1", "train.epochs=2", &acc]);
        let ob = train(&b, &["backend.cpu_split=3", "train.epochs=2", &acc]);
        assert!(!stdout(&oa).contains("parts"), "{}", stdout(&oa));
        assert!(stdout(&ob).contains("batches in 3 parts"), "the header names the parts:\n{}", stdout(&ob));
        let (ra, rb) = (read_jsonl(&a.join("metrics.jsonl")), read_jsonl(&b.join("metrics.jsonl")));
        let (wa, wb) = (windows(&ra), windows(&rb));
        assert_eq!(wa.len(), wb.len());
        assert!(wa.len() >= 2, "need several windows, got {}", wa.len());
        for (i, (x, y)) in wa.iter().zip(&wb).enumerate() {
            assert_eq!((&x["step"], &x["tokens"]), (&y["step"], &y["tokens"]));
            let (lx, ly) = (f(&x["loss"]), f(&y["loss"]));
            assert!((lx - ly).abs() / lx <= 1e-5, "accumulate {accumulate}, window {i}: loss {lx} whole vs {ly} in parts");
        }
        let (sa, sb) = (read_json(&a.join("summary.json")), read_json(&b.join("summary.json")));
        let (la, lb) = (f(&sa["valid_loss"]), f(&sb["valid_loss"]));
        assert!((la - lb).abs() / la <= 1e-5, "accumulate {accumulate}: validation loss {la} whole vs {lb} in parts");
    }
}
