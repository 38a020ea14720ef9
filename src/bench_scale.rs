//! `kiln bench data RECIPE --scale 1m,4m,20m`: the data side at corpus sizes real users train on.
//! For each size a synthetic corpus is made from the recipe's own (real) pairs
//! (`benches/corpus.rs`, deterministic), then the recipe trains a few steps on it twice as a child
//! process: cold (empty cache: the corpus is read, the tokenizer trained on its sample, every pair
//! encoded into the store) and warm (the store mapped from the cache). A sampler reads the child's
//! `/proc/<pid>/status` every 20 ms: the peak of `RssAnon` (heap and other anonymous memory; the
//! mapped corpus and store are file pages the kernel may drop, so they do not count) while
//! preparing and while training, and the kernel's own `VmHWM` (peak of all resident memory).

#[path = "../benches/corpus.rs"]
mod corpus;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

/// `1m`, `4M`, `20m`, `500k`, `250000` → pairs.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_lowercase().replace('_', "");
    let (digits, scale) = match t.strip_suffix('m') {
        Some(d) => (d.to_string(), 1_000_000.0),
        None => match t.strip_suffix('k') {
            Some(d) => (d.to_string(), 1_000.0),
            None => (t.clone(), 1.0),
        },
    };
    match digits.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Ok((x * scale).round() as u64),
        _ => bail!("--scale: expected sizes such as 1m,4m,20m or 500k, got {text:?}"),
    }
}

/// One child run's measurements.
struct Measured {
    wall_s: f64,
    prepare_s: f64,
    hit: bool,
    prepare_anon_mb: f64,
    train_anon_mb: f64,
    hwm_mb: f64,
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `binary` with `args`, sampling its memory; the phase flips to training at the data line.
fn measure(binary: &Path, args: &[String]) -> Result<Measured> {
    let started = Instant::now();
    let mut child = Command::new(binary).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    let training = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let (prep_peak, train_peak, hwm) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (training, done, prep_peak, train_peak, hwm) = (training.clone(), done.clone(), prep_peak.clone(), train_peak.clone(), hwm.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kb) = status_kb(pid, "RssAnon:") {
                    let peak = if training.load(Ordering::Relaxed) { &train_peak } else { &prep_peak };
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                if let Some(kb) = status_kb(pid, "VmHWM:") {
                    hwm.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut prepare_s = f64::NAN;
    let mut hit = false;
    let mut tail = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        if line.starts_with("kiln | data |") {
            training.store(true, Ordering::Relaxed);
            hit = line.contains("cache hit");
            prepare_s = line.rsplit("prepared in ").next().and_then(|s| s.trim_end_matches(" s").trim().parse().ok()).unwrap_or(f64::NAN);
        }
        tail.push(line);
        if tail.len() > 20 {
            tail.remove(0);
        }
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr)?;
    let status = child.wait()?;
    done.store(true, Ordering::Relaxed);
    sampler.join().map_err(|_| anyhow!("the memory sampler panicked"))?;
    if !status.success() {
        bail!("kiln {}: {}\n{}", args.join(" "), stderr.trim(), tail.join("\n"));
    }
    let mb = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1024.0;
    Ok(Measured { wall_s: started.elapsed().as_secs_f64(), prepare_s, hit, prepare_anon_mb: mb(&prep_peak), train_anon_mb: mb(&train_peak), hwm_mb: mb(&hwm) })
}

/// The store written for a size: its bytes, id width and tokens (`None` for another build's
/// entries, which this one cannot read).
fn store_shape(cache: &Path) -> Result<Option<(u64, usize, u64)>> {
    for entry in std::fs::read_dir(cache)?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|x| x == kiln_data::cache::EXTENSION) {
            let map = kiln_data::cache::map_entry(&path).map_err(anyhow::Error::msg)?.ok_or_else(|| anyhow!("{}: vanished", path.display()))?;
            let Ok((_, store)) = kiln_data::store::Store::open_map(map, None) else { return Ok(None) };
            let (ids, _) = store.sizes();
            let width = store.width().bytes();
            return Ok(Some((entry.metadata()?.len(), width, ids / width as u64)));
        }
    }
    bail!("{}: no store was written", cache.display())
}

/// A row of the table.
struct Row {
    pairs: u64,
    corpus_mb: f64,
    cold: Measured,
    warm: Measured,
    /// Bytes, id width, tokens of the store.
    store: Option<(u64, usize, u64)>,
}

/// `binary`: the kiln to measure (another build, for a before/after), else this one.
pub fn bench_scale(recipe_path: &Path, sets: &[String], sizes: &[u64], steps: usize, scratch: Option<PathBuf>, binary: Option<PathBuf>, out: &Path) -> Result<()> {
    let binary = match binary {
        Some(b) => b,
        None => std::env::current_exe()?,
    };
    let overrides = sets.iter().map(|s| kiln_recipe::Override::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let recipe = kiln_recipe::Recipe::load(recipe_path, &overrides)?;
    if recipe.data.format != kiln_recipe::CorpusFormat::Pairs {
        bail!("{}: --scale recombines sentence pairs; the recipe's corpus is text", recipe_path.display());
    }
    let temp;
    let scratch = match scratch {
        Some(dir) => dir,
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&scratch)?;
    let real = corpus::read_pairs(&[recipe.data.train.main()]).map_err(anyhow::Error::msg)?;
    let mut rows = Vec::new();
    for &pairs in sizes {
        let corpus_path = scratch.join(format!("corpus-{pairs}.tsv"));
        let t0 = Instant::now();
        let bytes = corpus::generate(&real, pairs, 1, &corpus_path).map_err(anyhow::Error::msg)?;
        eprintln!("bench data --scale: {pairs} pairs ({:.0} MB) made in {:.1} s", bytes as f64 / 1e6, t0.elapsed().as_secs_f64());
        let cache = scratch.join(format!("cache-{pairs}"));
        let _ = std::fs::remove_dir_all(&cache);
        let args = |run: &str| -> Vec<String> {
            let mut a = vec!["train".to_string(), recipe_path.display().to_string(), "--no-tui".into(), "--run-dir".into(), scratch.join(format!("run-{pairs}-{run}")).display().to_string()];
            let mut set = sets.to_vec();
            set.extend([
                format!("data.train={:?}", corpus_path.display().to_string()),
                format!("loader.cache_dir={:?}", cache.display().to_string()),
                format!("train.max_steps={steps}"),
                "eval.bleu=false".into(),
            ]);
            for s in set {
                a.extend(["--set".into(), s]);
            }
            a
        };
        let _ = std::fs::remove_dir_all(scratch.join(format!("run-{pairs}-cold")));
        let _ = std::fs::remove_dir_all(scratch.join(format!("run-{pairs}-warm")));
        let cold = measure(&binary, &args("cold"))?;
        eprintln!("  cold: prepared in {:.1} s, peak RssAnon {:.0} MB preparing, {:.0} MB training", cold.prepare_s, cold.prepare_anon_mb, cold.train_anon_mb);
        let warm = measure(&binary, &args("warm"))?;
        if cold.hit || !warm.hit {
            bail!("{}: expected a cold run then a cache hit", cache.display());
        }
        eprintln!("  warm: prepared in {:.2} s, peak RssAnon {:.0} MB preparing, {:.0} MB training", warm.prepare_s, warm.prepare_anon_mb, warm.train_anon_mb);
        let store = store_shape(&cache)?;
        rows.push(Row { pairs, corpus_mb: bytes as f64 / 1e6, cold, warm, store });
        // Corpora of 20 M pairs take gigabytes: only the last one is kept in a given scratch.
        let _ = std::fs::remove_file(&corpus_path);
        let _ = std::fs::remove_dir_all(&cache);
    }
    let (machine, commit, date) = crate::provenance(out);
    let mut section = format!(
        "\n## Scale: {} — {date}\n\n{machine}, commit `{commit}`{}. `kiln bench data {} --scale …`: synthetic corpora recombined from the recipe's pairs (`benches/corpus.rs`, seed 1), {steps} training steps per run, a child process per run sampled every 20 ms. RssAnon = anonymous memory (heap); the mapped corpus and token store are file pages and do not count. VmHWM = peak of all resident memory, file pages included.\n\n\
| pairs | corpus | cold prepare | pairs/s | RssAnon preparing | RssAnon training | VmHWM | warm prepare | RssAnon preparing | RssAnon training | store | bytes/token |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        recipe.name,
        if binary == std::env::current_exe()? { String::new() } else { format!(", measuring `{}`", binary.display()) },
        recipe_path.display()
    );
    for r in &rows {
        section.push_str(&format!(
            "| {} | {:.0} MB | {:.1} s | {} | {:.0} MB | {:.0} MB | {:.0} MB | {:.2} s | {:.0} MB | {:.0} MB | {} |\n",
            kiln_views::progress::thousands(r.pairs as f64),
            r.corpus_mb,
            r.cold.prepare_s,
            kiln_views::progress::thousands(r.pairs as f64 / r.cold.prepare_s),
            r.cold.prepare_anon_mb,
            r.cold.train_anon_mb,
            r.cold.hwm_mb,
            r.warm.prepare_s,
            r.warm.prepare_anon_mb,
            r.warm.train_anon_mb,
            match r.store {
                Some((bytes, width, tokens)) => format!("{:.0} MB ({} tokens, {}-bit ids) | {:.2}", bytes as f64 / 1e6, kiln_views::progress::thousands(tokens as f64), width * 8, bytes as f64 / tokens.max(1) as f64),
                None => "another build's entry | —".into(),
            },
        ));
    }
    let walls: Vec<String> = rows.iter().map(|r| format!("{}: {:.0} s cold, {:.0} s warm", kiln_views::progress::thousands(r.pairs as f64), r.cold.wall_s, r.warm.wall_s)).collect();
    section.push_str(&format!("\nWhole runs (prepare, {steps} steps, validation and test): {}.\n", walls.join("; ")));
    print!("{section}");
    crate::append_section(out, crate::DATA_HEADER, &section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(parse_size("1m").unwrap(), 1_000_000);
        assert_eq!(parse_size("4M").unwrap(), 4_000_000);
        assert_eq!(parse_size("500k").unwrap(), 500_000);
        assert_eq!(parse_size("2_500").unwrap(), 2_500);
        assert_eq!(parse_size("0.5m").unwrap(), 500_000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn the_generator_is_deterministic_and_keeps_pairs_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let real = vec![("eins".to_string(), "one".to_string()), ("zwei".to_string(), "two".to_string()), ("drei".to_string(), "three".to_string())];
        let (a, b) = (dir.path().join("a.tsv"), dir.path().join("b.tsv"));
        corpus::generate(&real, 500, 7, &a).unwrap();
        corpus::generate(&real, 500, 7, &b).unwrap();
        let text = std::fs::read_to_string(&a).unwrap();
        assert_eq!(text, std::fs::read_to_string(&b).unwrap());
        assert_eq!(text.lines().count(), 500);
        let word = |w: &str| ["eins", "zwei", "drei"].iter().position(|x| *x == w).unwrap();
        let english = |w: &str| ["one", "two", "three"].iter().position(|x| *x == w).unwrap();
        let mut pieces = std::collections::BTreeSet::new();
        for line in text.lines() {
            let (s, t) = line.split_once('\t').unwrap();
            let (s, t): (Vec<&str>, Vec<&str>) = (s.split(' ').collect(), t.split(' ').collect());
            pieces.insert(s.len());
            assert_eq!(s.iter().map(|w| word(w)).collect::<Vec<_>>(), t.iter().map(|w| english(w)).collect::<Vec<_>>(), "{line}");
        }
        assert_eq!(pieces, [1, 2, 3].into(), "one to three pairs joined");
        corpus::generate(&real, 500, 8, &b).unwrap();
        assert_ne!(text, std::fs::read_to_string(&b).unwrap(), "another seed, another corpus");
    }
}
