//! Multi-node data parallel (`--nodes`), as users run it: several `kiln train` processes on this
//! machine, one CPU device each, joined over loopback (127.0.0.1) through Burn's collective. They
//! must train exactly as one process with as many devices, stop together, resume together, and
//! fail fast and clearly when a node dies, never joins or runs something else.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A coordinator port whose next `n` ports are free too (nodes listen at port + 1 + rank).
fn free_ports(n: u16) -> u16 {
    use std::net::TcpListener;
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64 ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    for i in 0..200u64 {
        let base = 20_000 + ((seed.wrapping_mul(6364136223846793005).wrapping_add(i * 7919)) % 40_000) as u16;
        if (0..=n).all(|k| TcpListener::bind(("0.0.0.0", base + k)).is_ok()) {
            return base;
        }
    }
    panic!("no free ports");
}

/// `kiln train` as node `rank` of `nodes`, started, not waited for.
fn node(rank: usize, nodes: usize, port: u16, args: &[&str], sets: &[&str]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("train").args(args).args(["--no-tui", "--nodes", &nodes.to_string(), "--node-rank", &rank.to_string(), "--coordinator", &format!("127.0.0.1:{port}"), "--node-timeout", "30"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.current_dir(root()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("kiln starts")
}

/// Every node of a run started at once (`args_of(rank)`), each waited for.
fn run_nodes(nodes: usize, args_of: impl Fn(usize) -> Vec<String>, sets: &[&str]) -> Vec<Output> {
    let port = free_ports(nodes as u16 + 1);
    let children: Vec<Child> = (0..nodes)
        .map(|r| {
            let args = args_of(r);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            node(r, nodes, port, &args, sets)
        })
        .collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

fn fresh(run_dir: &Path) -> impl Fn(usize) -> Vec<String> + '_ {
    // Every node gets the same command line but its rank; rank 0 alone uses the run directory.
    move |_| vec![smoke(), "--run-dir".into(), run_dir.display().to_string()]
}

fn one_process(run_dir: &Path, devices: usize, sets: &[&str]) {
    let list = vec!["\"cpu\""; devices].join(", ");
    let devices = format!("backend.devices=[{list}]");
    let o = train_with(&smoke(), run_dir, &[sets, &[devices.as_str()]].concat(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn train_rows(run_dir: &Path) -> Vec<Value> {
    read_jsonl(&run_dir.join("metrics.jsonl")).into_iter().filter(|r| r["kind"] == "train").collect()
}

fn weights(run_dir: &Path, step: usize) -> Vec<u8> {
    std::fs::read(run_dir.join(format!("checkpoints/step-{step:07}/model.mpk"))).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

const COMMON: [&str; 3] = ["train.epochs=2", "eval.bleu=false", "train.keep_checkpoints=0"];

#[test]
fn two_processes_train_exactly_as_one_process_with_two_devices() {
    let dir = tempfile::tempdir().unwrap();
    let (one, multi) = (dir.path().join("one"), dir.path().join("multi"));
    // Dropout on: each replica draws the masks of its global rank, as the devices of one process do.
    one_process(&one, 2, &COMMON);
    let outs = run_nodes(2, fresh(&multi), &COMMON);
    for (rank, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "node {rank}: {}\n{}", stderr(o), stdout(o));
        assert!(stdout(o).contains(&format!("node {rank} of 2 nodes")), "{}", stdout(o));
    }
    assert!(stdout(&outs[1]).contains("rank 0 writes the run directory"), "{}", stdout(&outs[1]));
    let (a, b) = (train_rows(&one), train_rows(&multi));
    assert_eq!(a.len(), b.len());
    assert!(a.len() >= 4, "{}", a.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        assert!((f(&x["loss"]) - f(&y["loss"])).abs() <= 1e-6, "step {}: one process {} vs two nodes {}", x["step"], x["loss"], y["loss"]);
        assert_eq!(x["device_tokens"], y["device_tokens"], "each replica took the same batches");
        // Per-node throughput and the all-reduce's time: in the log of the multi-node run.
        assert_eq!(y["node_tokens"], y["device_tokens"], "one device per node");
        let reduce = &y["reduce"];
        assert_eq!(reduce["count"], y["step"], "one all-reduce per step: {y}");
        assert!(f(&reduce["total_ms"]) > 0.0 && f(&reduce["max_ms"]) > 0.0, "{y}");
        assert!(x.get("node_tokens").is_none(), "one process: no node figures");
    }
    let last = f(&b.last().unwrap()["step"]) as usize;
    assert_eq!(weights(&one, last), weights(&multi, last), "the final weights, byte for byte");
    let (s1, s2) = (read_json(&one.join("summary.json")), read_json(&multi.join("summary.json")));
    assert_eq!((&s1["valid_loss"], &s1["test"]["loss"]), (&s2["valid_loss"], &s2["test"]["loss"]));
}

/// One process with `devices` CPU replicas, then `nodes` processes of `devices / nodes` each, on
/// the same steps: every window's loss within 1e-6 (three or more CPU peers of one process are
/// summed in hash order, so not always bit for bit) and the same batches per replica. The
/// multi-node run's windows, for further checks.
fn nodes_match_one_process(devices: usize, nodes: usize) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let (one, multi) = (dir.path().join("one"), dir.path().join("multi"));
    let sets = ["train.epochs=1", "eval.bleu=false"];
    one_process(&one, devices, &sets);
    let local = format!("backend.devices=[{}]", vec!["\"cpu\""; devices / nodes].join(", "));
    let outs = run_nodes(nodes, fresh(&multi), &[&sets[..], &[local.as_str()]].concat());
    for (rank, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "node {rank}: {}", stderr(o));
    }
    let (a, b) = (train_rows(&one), train_rows(&multi));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["device_tokens"], y["device_tokens"], "the same shares, replica by replica");
        assert!((f(&x["loss"]) - f(&y["loss"])).abs() <= 1e-6, "step {}: {} vs {}", x["step"], x["loss"], y["loss"]);
    }
    b
}

#[test]
fn two_nodes_of_two_devices_train_as_one_process_with_four() {
    // Global replica = node × 2 + local rank: the same shares and masks as devices 0..3.
    for y in nodes_match_one_process(4, 2) {
        let d: Vec<u64> = y["device_tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(y["node_tokens"], serde_json::json!([d[0] + d[1], d[2] + d[3]]), "{y}");
    }
}

#[test]
fn three_processes_train_as_one_process_with_three_devices() {
    // Three nodes: Burn's tree of arity 2 has a root with two children.
    nodes_match_one_process(3, 3);
}

/// Waits until rank 0's log shows a checkpoint at step ≥ `step`.
fn wait_for_checkpoint(run_dir: &Path, step: u64, limit: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let saved = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|r| r["kind"] == "checkpoint" && r["step"].as_u64() >= Some(step));
        if saved {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no checkpoint at step {step} within {limit:?}");
}

fn kill(child: &mut Child) {
    // SIGKILL: the node dies between two instructions, as a machine that loses power.
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn a_killed_node_stops_the_other_at_once_naming_it_and_every_node_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (one, multi) = (dir.path().join("one"), dir.path().join("multi"));
    let sets = ["train.epochs=8", "eval.bleu=false", "train.save_every_steps=10", "train.keep_checkpoints=0"];
    one_process(&one, 2, &sets);
    let port = free_ports(3);
    let m = multi.display().to_string();
    let rank0 = node(0, 2, port, &[&smoke(), "--run-dir", &m], &sets);
    let mut rank1 = node(1, 2, port, &[&smoke()], &sets);
    wait_for_checkpoint(&multi, 30, Duration::from_secs(120));
    kill(&mut rank1);
    let killed = Instant::now();
    let o = rank0.wait_with_output().unwrap();
    let waited = killed.elapsed();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}\n{}", stdout(&o));
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("node 0: lost node 1 (127.0.0.1:") && !err.contains("panicked"), "{err}");
    // Bounded: the lost peer is found by the next all-reduce, long before --node-timeout (30 s).
    assert!(waited < Duration::from_secs(20), "{waited:?}");
    let summary = !multi.join("summary.json").exists();
    assert!(summary, "the run did not end");

    // Every node resumes from rank 0's run directory; the run ends as an unbroken one.
    let outs = run_nodes(2, |_| vec!["--resume".into(), m.clone()], &[]);
    for (rank, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "node {rank}: {}\n{}", stderr(o), stdout(o));
    }
    let (s1, s2) = (read_json(&one.join("summary.json")), read_json(&multi.join("summary.json")));
    assert_eq!(s1["steps"], s2["steps"]);
    for key in ["train_loss", "valid_loss"] {
        assert!((f(&s1[key]) - f(&s2[key])).abs() <= 1e-6, "{key}: {} vs {}", s1[key], s2[key]);
    }
    let last = s1["steps"].as_u64().unwrap() as usize;
    assert_eq!(weights(&one, last), weights(&multi, last), "the resumed run's final weights");
}

#[test]
fn a_stop_asked_of_one_node_stops_every_node_at_the_same_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let multi = dir.path().join("multi");
    let sets = ["train.epochs=200", "eval.bleu=false", "train.save_every_steps=20"];
    let port = free_ports(3);
    let m = multi.display().to_string();
    let rank0 = node(0, 2, port, &[&smoke(), "--run-dir", &m], &sets);
    let rank1 = node(1, 2, port, &[&smoke()], &sets);
    wait_for_checkpoint(&multi, 20, Duration::from_secs(120));
    // SIGINT to node 1 only: the nodes agree on it at the next window's close.
    unsafe { libc::kill(rank1.id() as i32, libc::SIGINT) };
    let (o0, o1) = (rank0.wait_with_output().unwrap(), rank1.wait_with_output().unwrap());
    assert!(o0.status.success() && o1.status.success(), "{}\n{}", stderr(&o0), stderr(&o1));
    let summary = read_json(&multi.join("summary.json"));
    assert_eq!(summary["stopped"], true);
    let step = summary["steps"].as_u64().unwrap();
    assert!(stdout(&o1).contains(&format!("stopped on request at step {step}")), "{}", stdout(&o1));
    assert!(multi.join(format!("checkpoints/step-{step:07}")).is_dir(), "rank 0 saved the stop's checkpoint");
}

#[test]
fn nodes_that_do_not_run_the_same_recipe_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let multi = dir.path().join("multi");
    let port = free_ports(3);
    let m = multi.display().to_string();
    let rank0 = node(0, 2, port, &[&smoke(), "--run-dir", &m], &COMMON);
    let rank1 = node(1, 2, port, &[&smoke()], &[&COMMON[..], &["train.lr=0.002"]].concat());
    for (rank, o) in [rank0.wait_with_output().unwrap(), rank1.wait_with_output().unwrap()].iter().enumerate() {
        let err = assert_user_error(o, &[&format!("node {rank}: the nodes do not run the same thing")]);
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!multi.join("checkpoints").exists(), "no step was trained");
}

#[test]
fn a_node_that_never_joins_ends_the_others_within_the_timeout_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_ports(4);
    let run = dir.path().join("run").display().to_string();
    let started = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["train", &smoke(), "--run-dir", &run, "--no-tui", "--nodes", "3", "--node-rank", "0", "--coordinator", &format!("127.0.0.1:{port}"), "--node-timeout", "3"]);
    let rank0 = cmd.current_dir(root()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut rank2 = Command::new(env!("CARGO_BIN_EXE_kiln"));
    rank2.args(["train", &smoke(), "--no-tui", "--nodes", "3", "--node-rank", "2", "--coordinator", &format!("127.0.0.1:{port}"), "--node-timeout", "3"]);
    let rank2 = rank2.current_dir(root()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (o0, o2) = (rank0.wait_with_output().unwrap(), rank2.wait_with_output().unwrap());
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    for o in [&o0, &o2] {
        assert_eq!(o.status.code(), Some(4), "{}", stderr(o));
        assert_eq!(stderr(o).trim_end().lines().count(), 1, "{}", stderr(o));
    }
    assert!(stderr(&o0).contains("2 of 3 nodes joined") && stderr(&o0).contains("missing: node 1"), "{}", stderr(&o0));
    // The log says how the attempt ended, as for any failed run.
    let log = read_jsonl(&dir.path().join("run/metrics.jsonl"));
    assert!(log.iter().any(|r| r["kind"] == "error" && r["text"].as_str().unwrap_or("").contains("missing: node 1")), "{log:?}");
    assert!(stderr(&o2).contains("node 2: the run did not start"), "{}", stderr(&o2));
}

#[test]
fn node_flags_are_checked_before_anything_runs() {
    let o = kiln(&["train", &smoke(), "--no-tui", "--node-rank", "1"]);
    assert_user_error(&o, &["--node-rank: only with --nodes 2 or more"]);
    let o = kiln(&["train", &smoke(), "--no-tui", "--nodes", "2"]);
    assert_user_error(&o, &["--coordinator: required with --nodes 2"]);
    let o = kiln(&["train", &smoke(), "--no-tui", "--nodes", "2", "--node-rank", "2", "--coordinator", "127.0.0.1:29500"]);
    assert_user_error(&o, &["--node-rank: expected 0..1"]);
    let o = kiln(&["train", &smoke(), "--no-tui", "--nodes", "2", "--node-rank", "1", "--coordinator", "10.9.8.7:29500"]);
    assert_user_error(&o, &["--node-address: required on node 1"]);
    let o = kiln(&["train", &smoke(), "--no-tui", "--nodes", "2", "--coordinator", "127.0.0.1:notaport"]);
    assert_user_error(&o, &["--coordinator: `notaport` is not a port"]);
}
