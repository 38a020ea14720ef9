//! `kiln bench serve`: `kiln serve` under load, on loopback only. The same requests are sent
//! twice, to a server that batches concurrent requests (`--batch-wait-ms 5`) and to one that
//! decodes each request alone (`--batch-wait-ms 0`), each from N client threads with one
//! connection per request: sentences/s over the whole load and p50 / p99 latency per request.
//! Every request carries an id; each must be answered exactly once, with one translation per
//! sentence, and the two servers' translations must be the same (batching changes nothing).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// What the load test asks.
pub struct Load {
    pub clients: usize,
    pub requests: usize,
    pub sentences: usize,
}

/// A request's id, its latency in ms and its translations.
type Answered = (u64, f64, Vec<String>);

/// One server's figures under the load.
struct Measured {
    wall_s: f64,
    latencies_ms: Vec<f64>,
    batches: u64,
    /// Translations by request id.
    answers: BTreeMap<u64, Vec<String>>,
}

impl Measured {
    fn percentile(&self, p: f64) -> f64 {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let at = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
        sorted.get(at).copied().unwrap_or(0.0)
    }
}

/// Source sentences: each line's first tab-separated field (a corpus's source side, or a plain
/// file of sentences), empty lines and `#` comments skipped, and those longer than the run's
/// model takes (`data.max_len` tokens, which the server refuses) left out.
fn read_sentences(input: &Path, run_dir: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(input).map_err(|e| anyhow!("--input: {}: cannot read: {e}", input.display()))?;
    let lines: Vec<String> = text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(|l| l.split('\t').next().unwrap_or("").trim().to_string()).filter(|s| !s.is_empty()).collect();
    let run = kiln_families::infer::open_run(run_dir, None)?;
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let ids = run.tokenizer.encode_batch(&refs).map_err(|e| anyhow!("{e}"))?;
    let fit: Vec<String> = lines.iter().zip(&ids).filter(|(_, t)| t.len() <= run.recipe.data.max_len).map(|(l, _)| l.clone()).collect();
    if fit.is_empty() {
        bail!("--input: {}: no sentence of at most {} tokens (the run's data.max_len)", input.display(), run.recipe.data.max_len);
    }
    Ok(fit)
}

pub fn bench_serve(run_dir: &Path, input: &Path, load: &Load, out: &Path) -> Result<()> {
    if load.clients == 0 || load.requests == 0 || load.sentences == 0 {
        bail!("--clients, --requests and --sentences: expected integers >= 1");
    }
    let sentences = read_sentences(input, run_dir)?;
    // Request r asks for sentences [r·s, r·s + s) of the input, wrapping around.
    let requests: Vec<Vec<String>> = (0..load.requests).map(|r| (0..load.sentences).map(|k| sentences[(r * load.sentences + k) % sentences.len()].clone()).collect()).collect();
    let on = measure(run_dir, 5, load.clients, &requests)?;
    let off = measure(run_dir, 0, load.clients, &requests)?;
    let same = on.answers == off.answers;
    let date = String::from_utf8(Command::new("date").arg("-u").arg("+%Y-%m-%d").output()?.stdout).unwrap_or_default();
    let total = (load.requests * load.sentences) as f64;
    let rows: Vec<String> = [("on (5 ms)", &on), ("off", &off)]
        .iter()
        .map(|(batching, m)| {
            format!(
                "| {} | {} | {} | {} | {} × {} | {batching} | {:.1} | {:.0} | {:.0} | {} ({:.1} requests each) | {} |",
                date.trim(),
                env!("KILN_COMMIT"),
                run_dir.display(),
                load.clients,
                load.requests,
                load.sentences,
                total / m.wall_s,
                m.percentile(50.0),
                m.percentile(99.0),
                m.batches,
                load.requests as f64 / m.batches.max(1) as f64,
                if same { "same" } else { "DIFFERENT" },
            )
        })
        .collect();
    for row in &rows {
        println!("{row}");
    }
    let header = "| date | commit | run | clients | requests × sentences | batching | sentences/s | p50 ms | p99 ms | decode batches | translations on vs off |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    let mut text = std::fs::read_to_string(out).unwrap_or_default();
    if !text.contains("| date | commit | run | clients |") {
        text.push_str(&format!("\n## Load (`kiln bench serve`)\n\n{header}"));
    }
    for row in rows {
        text.push_str(&row);
        text.push('\n');
    }
    std::fs::write(out, text).map_err(|e| anyhow!("{}: {e}", out.display()))?;
    eprintln!("bench serve: rows appended to {}", out.display());
    if !same {
        bail!("bench serve: the batching and the one-by-one server translated differently");
    }
    Ok(())
}

/// Starts `kiln serve` with the batch wait, sends every request from `clients` threads, reads
/// its counters and stops it with SIGTERM (it must exit 0).
fn measure(run_dir: &Path, batch_wait_ms: u64, clients: usize, requests: &[Vec<String>]) -> Result<Measured> {
    let exe = std::env::current_exe().context("the kiln binary")?;
    let mut child = Command::new(exe)
        .arg("serve")
        .arg(run_dir)
        .args(["--port", "0", "--batch-wait-ms", &batch_wait_ms.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("kiln serve")?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let Some(address) = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_string) else {
        let _ = child.kill();
        bail!("kiln serve did not start: {}", line.trim());
    };
    let started = Instant::now();
    let results: Vec<Result<Vec<Answered>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let address = address.as_str();
                scope.spawn(move || -> Result<Vec<Answered>> {
                    let mut done = Vec::new();
                    for r in (c..requests.len()).step_by(clients) {
                        let t0 = Instant::now();
                        let (status, body) = exchange(address, "POST", "/translate", &json!({ "src": requests[r], "id": r }))?;
                        let ms = t0.elapsed().as_secs_f64() * 1e3;
                        if status != 200 {
                            bail!("request {r}: HTTP {status}: {body}");
                        }
                        let texts: Vec<String> = body["translations"].as_array().map(|t| t.iter().map(|x| x["text"].as_str().unwrap_or("").to_string()).collect()).unwrap_or_default();
                        if texts.len() != requests[r].len() {
                            bail!("request {r}: {} translations for {} sentences", texts.len(), requests[r].len());
                        }
                        done.push((body["id"].as_u64().ok_or_else(|| anyhow!("request {r}: answered without its id"))?, ms, texts));
                    }
                    Ok(done)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a client thread panicked")))).collect()
    });
    let wall_s = started.elapsed().as_secs_f64();
    let health = exchange(&address, "GET", "/health", &Value::Null).map(|(_, b)| b);
    // SIGTERM: the server drains and exits 0.
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait()?;
    let mut rest = String::new();
    let _ = stdout.read_to_string(&mut rest);
    let mut measured = Measured { wall_s, latencies_ms: Vec::new(), batches: health?["batches"].as_u64().unwrap_or(0), answers: BTreeMap::new() };
    for result in results {
        for (id, ms, texts) in result? {
            measured.latencies_ms.push(ms);
            if measured.answers.insert(id, texts).is_some() {
                bail!("request {id} was answered twice");
            }
        }
    }
    if measured.answers.len() != requests.len() {
        bail!("{} of {} requests answered", measured.answers.len(), requests.len());
    }
    if !status.success() {
        bail!("kiln serve exited with {status} after SIGTERM");
    }
    Ok(measured)
}

/// One request on its own connection: the status and the body as JSON.
fn exchange(address: &str, method: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
    let body = if body.is_null() { String::new() } else { body.to_string() };
    let (status, text) = kiln_serve::client::request(address, method, path, body.as_bytes())?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}
