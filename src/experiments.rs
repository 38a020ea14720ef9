//! The experiment commands: `kiln runs`, `compare` and `sweep` (on `kiln_runs`), and the
//! checkpoint tools `average` and `export` (on `kiln_families`). Each prints what it did and
//! where it wrote.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use kiln_runs::list::{sort, table, SortBy};
use kiln_runs::RunRecord;

pub fn runs(dir: &Path, name: Option<&str>, order: &str) -> Result<()> {
    let by = SortBy::parse(order).map_err(anyhow::Error::msg)?;
    if !dir.is_dir() {
        bail!("{}: no such folder", dir.display());
    }
    let mut records = Vec::new();
    for run in kiln_runs::find_runs(dir) {
        match RunRecord::read(&run) {
            Ok(r) if name.is_none_or(|n| r.name.contains(n)) => records.push(r),
            Ok(_) => {}
            Err(why) => eprintln!("kiln: warning: {why}"),
        }
    }
    sort(&mut records, by);
    print!("{}", table(&records, dir));
    println!("{} run{} under {}", records.len(), if records.len() == 1 { "" } else { "s" }, dir.display());
    Ok(())
}

pub fn compare(dirs: &[std::path::PathBuf], out: &Path) -> Result<()> {
    let records = dirs.iter().map(|d| RunRecord::read(d)).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
    print!("{}", kiln_runs::compare::report(&records).map_err(anyhow::Error::msg)?);
    let charts = kiln_runs::compare::charts(&records, out).map_err(anyhow::Error::msg)?;
    for c in charts {
        println!("wrote {}", c.display());
    }
    Ok(())
}

pub fn sweep(recipe: &Path, grid: &[String], parallel: usize, dir: Option<&Path>, metric: &str) -> Result<()> {
    let metric = SortBy::parse(metric).map_err(anyhow::Error::msg)?;
    let plan = kiln_runs::sweep::Sweep::plan(recipe, grid, dir, metric).map_err(anyhow::Error::msg)?;
    println!("sweep: {} combinations in {}", plan.combinations.len(), plan.dir.display());
    let exe = std::env::current_exe().map_err(|e| anyhow!("cannot find the kiln executable: {e}"))?;
    let failed = plan.run(&exe, parallel, &mut |line| println!("{line}")).map_err(anyhow::Error::msg)?;
    let records = plan.records();
    print!("{}", table(&records, &plan.dir));
    println!("wrote {}", plan.dir.join("sweep.json").display());
    if failed > 0 {
        bail!("{failed} of the sweep's runs failed (their logs are in {})", plan.dir.display());
    }
    Ok(())
}

pub fn average(run_dir: &Path, last: Option<usize>, names: Vec<String>, ema: bool, name: Option<&str>) -> Result<()> {
    use kiln_families::average::Pick;
    let pick = match (last, names.is_empty()) {
        (Some(k), true) => Pick::Last(k),
        (None, false) => Pick::Named(names),
        _ => bail!("kiln average: give --last K or --checkpoints A,B,…"),
    };
    // It writes into the run's checkpoints: one process per run directory.
    let _lock = kiln_events::RunLock::acquire(run_dir).map_err(anyhow::Error::msg)?;
    let run = kiln_families::infer::open_run(run_dir, None)?;
    let done = kiln_families::average::average(&run, &pick, ema, name)?;
    let what = if done.weights == kiln_train::checkpoint::WeightsFile::Ema { "moving averages" } else { "weights" };
    println!("averaged the {what} of {} checkpoints ({}) into {}", done.from.len(), done.from.join(", "), done.dir.display());
    println!("use it with --checkpoint {}", done.dir.file_name().unwrap_or_default().to_string_lossy());
    Ok(())
}

pub fn export(run_dir: &Path, out: Option<&Path>, checkpoint: Option<&str>, open: impl Fn(&Path, Option<&str>) -> Result<kiln_families::infer::RunModel>) -> Result<()> {
    let run = open(run_dir, checkpoint)?;
    let name = run.checkpoint.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| run_dir.join("export").join(&name));
    let done = kiln_families::export::export_safetensors(&run, &out)?;
    let weights = if run.decodes_moving_average() { "moving average" } else { "raw weights" };
    println!("exported {name} ({weights}): {} tensors, {} parameters", done.tensors, done.parameters);
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        println!("wrote {}", done.dir.join(file).display());
    }
    Ok(())
}
