//! `kiln bench nodes`: what training across processes costs. The same steps run twice, back to
//! back on this machine: one process with N CPU replicas (`backend.devices`, reduced inside the
//! process), then N processes of one replica each joined over loopback (`--nodes N`, reduced
//! between the processes through Burn's global collective). Both compute the same steps (the
//! first window's loss is compared); the row says how long the host spent in the steps'
//! all-reduces, as a share of the training windows' time, and the tokens/s of each.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Result};

/// What one setup measured, from rank 0's `metrics.jsonl`.
struct Measured {
    tokens_per_s: f64,
    train_s: f64,
    reduce_count: u64,
    reduce_total_ms: f64,
    reduce_max_ms: f64,
    first_loss: f64,
    node_tokens_per_s: Vec<f64>,
}

impl Measured {
    fn read(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let rows: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).filter(|r: &serde_json::Value| r["kind"] == "train").collect();
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else { bail!("{}: no training window", path.display()) };
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        let train_s: f64 = rows.iter().map(|r| f(&r["window_s"])).sum();
        let tokens: f64 = rows.iter().map(|r| f(&r["tokens"])).sum();
        let nodes = last["node_tokens"].as_array().map_or(0, Vec::len);
        let node_tokens_per_s = (0..nodes).map(|n| rows.iter().map(|r| f(&r["node_tokens"][n])).sum::<f64>() / train_s.max(1e-9)).collect();
        Ok(Self {
            tokens_per_s: tokens / train_s.max(1e-9),
            train_s,
            reduce_count: last["reduce"]["count"].as_u64().unwrap_or(0),
            reduce_total_ms: f(&last["reduce"]["total_ms"]),
            reduce_max_ms: f(&last["reduce"]["max_ms"]),
            first_loss: f(&first["loss"]),
            node_tokens_per_s,
        })
    }

    fn reduce_share_pct(&self) -> f64 {
        100.0 * self.reduce_total_ms / 1e3 / self.train_s.max(1e-9)
    }
}

/// A free coordinator port with the next `n` free too (the nodes' data services).
fn free_ports(n: u16) -> Result<u16> {
    for base in (29_500..60_000).step_by(17) {
        if (0..=n).all(|k| std::net::TcpListener::bind(("0.0.0.0", base + k)).is_ok()) {
            return Ok(base);
        }
    }
    bail!("no free ports for the nodes on this machine")
}

fn kiln_train(recipe: &Path, sets: &[String], extra: &[String]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("the running binary"));
    cmd.arg("train").arg(recipe).arg("--no-tui");
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.args(extra).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

fn check(what: &str, out: std::process::Output) -> Result<()> {
    if !out.status.success() {
        bail!("bench nodes: {what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub fn bench_nodes(recipe: &Path, set: &[String], nodes: usize, steps: usize, out: &Path) -> Result<()> {
    if !(2..=8).contains(&nodes) {
        bail!("--nodes: expected 2..8 processes, got {nodes}");
    }
    if steps == 0 {
        bail!("--steps: expected 1 or more");
    }
    let scratch = tempfile::tempdir()?;
    let mut sets: Vec<String> = set.to_vec();
    sets.extend([format!("train.max_steps={steps}"), "eval.bleu=false".into(), "train.save_every=0".into()]);
    let one_dir = scratch.path().join("one-process");
    let devices = format!("backend.devices=[{}]", vec!["\"cpu\""; nodes].join(", "));
    eprintln!("bench nodes: {} — {steps} steps in one process with {nodes} replicas…", recipe.display());
    let one = kiln_train(recipe, &[sets.clone(), vec![devices]].concat(), &["--run-dir".into(), one_dir.display().to_string()]).output()?;
    check("the one-process run", one)?;
    let port = free_ports(nodes as u16)?;
    eprintln!("bench nodes: the same steps in {nodes} processes over 127.0.0.1:{port}…");
    let multi_dir: PathBuf = scratch.path().join("nodes");
    let children: Vec<_> = (0..nodes)
        .map(|rank| {
            let mut extra = vec!["--nodes".into(), nodes.to_string(), "--node-rank".into(), rank.to_string(), "--coordinator".into(), format!("127.0.0.1:{port}")];
            if rank == 0 {
                extra.extend(["--run-dir".into(), multi_dir.display().to_string()]);
            }
            kiln_train(recipe, &sets, &extra).spawn()
        })
        .collect::<std::io::Result<_>>()?;
    for (rank, child) in children.into_iter().enumerate() {
        check(&format!("node {rank}"), child.wait_with_output()?)?;
    }
    let (a, b) = (Measured::read(&one_dir)?, Measured::read(&multi_dir)?);
    let same = (a.first_loss - b.first_loss).abs() <= 1e-6 * a.first_loss.abs().max(1.0);
    let per_node: Vec<String> = b.node_tokens_per_s.iter().map(|t| format!("{t:.0}")).collect();
    let date = String::from_utf8(Command::new("date").arg("-u").arg("+%Y-%m-%d").output()?.stdout).unwrap_or_default();
    let row = format!(
        "| {} | {} | {} | {steps} | {nodes} | {:.0} | {:.1} % | {:.0} ({}) | {} / {:.0} / {:.1} | {:.1} % | {} |",
        date.trim(),
        env!("KILN_COMMIT"),
        if set.is_empty() { recipe.display().to_string() } else { format!("{} ({})", recipe.display(), set.join(", ")) },
        a.tokens_per_s,
        a.reduce_share_pct(),
        b.tokens_per_s,
        per_node.join(" / "),
        b.reduce_count,
        b.reduce_total_ms,
        b.reduce_max_ms,
        b.reduce_share_pct(),
        if same { "same" } else { "DIFFERENT" },
    );
    println!("{row}");
    let header = "| date | commit | recipe | steps | replicas | one process: tok/s | its all-reduce share | N processes: tok/s (per node) | their all-reduces: count / total ms / max ms | their share of training time | first window's loss |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    let mut text = std::fs::read_to_string(out).unwrap_or_default();
    if !text.contains("| date | commit | recipe | steps | replicas |") {
        text.push_str(&format!("\n## Across processes (`kiln bench nodes`)\n\n{header}"));
    }
    text.push_str(&row);
    text.push('\n');
    std::fs::write(out, text).map_err(|e| anyhow!("{}: {e}", out.display()))?;
    eprintln!("bench nodes: row appended to {}", out.display());
    if !same {
        bail!("bench nodes: the two setups' first windows differ ({} vs {}): they did not compute the same steps", a.first_loss, b.first_loss);
    }
    Ok(())
}
