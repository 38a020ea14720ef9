//! `kiln average`: checkpoint averaging (as fairseq's `average_checkpoints.py` and Marian's
//! `--average`). The weights of several checkpoints of one run are averaged parameter by
//! parameter ([`kiln_train::weights::average`]) and written as a checkpoint of its own
//! (`checkpoints/avg-K-step-NNNNNNN`), which `eval`, `translate` and `export` take with
//! `--checkpoint` like any other. It holds weights only: resuming and pruning never take it, and
//! `latest` and `best` keep naming the run's own checkpoints.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use burn::backend::Flex;
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use kiln_train::checkpoint::{self, Architecture, TrainState, WeightsFile};

use crate::infer::RunModel;
use crate::registry::{self, Family, UseFamily};

/// Which checkpoints to average.
#[derive(Debug, Clone, PartialEq)]
pub enum Pick {
    /// The newest K `step-…` checkpoints of the run.
    Last(usize),
    /// These checkpoints, by name (`step-0001000`, `best`, …).
    Named(Vec<String>),
}

/// What `kiln average` wrote.
#[derive(Debug, Clone)]
pub struct Averaged {
    pub dir: PathBuf,
    /// The checkpoints averaged, oldest first.
    pub from: Vec<String>,
    /// The weights file averaged: `model.mpk` (raw) or `ema.mpk`.
    pub weights: WeightsFile,
}

fn name_of(dir: &Path) -> String {
    dir.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// Averages the checkpoints `pick` of the run opened as `run` (its recipe and tokenizer), their
/// raw weights or (`ema`) their moving averages, into `checkpoints/<name>`.
pub fn average(run: &RunModel, pick: &Pick, ema: bool, name: Option<&str>) -> Result<Averaged> {
    let run_dir = run.run_dir.as_path();
    let dirs: Vec<PathBuf> = match pick {
        Pick::Last(k) => {
            let all = checkpoint::list(run_dir);
            if *k < 2 || *k > all.len() {
                bail!("--last: expected 2 to {} (the run's step checkpoints), got {k}", all.len());
            }
            all.into_iter().take(*k).rev().map(|(_, dir)| dir).collect()
        }
        Pick::Named(names) => {
            if names.len() < 2 {
                bail!("--checkpoints: expected two or more checkpoint names, got {}", names.len());
            }
            let dirs = names.iter().map(|n| checkpoint::resolve(run_dir, n).map_err(|m| anyhow!("--checkpoints: {m}"))).collect::<Result<Vec<_>>>()?;
            if let Some(missing) = dirs.iter().find(|d| !d.is_dir()) {
                bail!("--checkpoints: {}: no such checkpoint", missing.display());
            }
            dirs
        }
    };
    let weights = if ema { WeightsFile::Ema } else { WeightsFile::Model };
    let expected = Architecture::new(&run.recipe.model, run.tokenizer.vocab_size());
    let mut states = Vec::new();
    for dir in &dirs {
        let state = checkpoint::verify(dir).map_err(|m| anyhow!(m))?;
        checkpoint::check_architecture(dir, &state, &expected).map_err(|m| anyhow!(m))?;
        checkpoint::check_run_files(dir, &state).map_err(|m| anyhow!(m))?;
        if !state.averaged_from.is_empty() {
            bail!("{}: an averaged checkpoint; average the run's own checkpoints", dir.display());
        }
        if ema && !state.ema {
            bail!("--weights ema: {} holds no moving average of the weights", dir.display());
        }
        states.push(state);
    }
    let from: Vec<String> = dirs.iter().map(|d| name_of(d)).collect();
    let name = match name {
        Some(n) => n.to_string(),
        None => format!("avg-{}-{}{}", dirs.len(), from.last().expect("two or more"), if ema { "-ema" } else { "" }),
    };
    // The newest checkpoint's state, marked as the average it now is.
    let state = TrainState { averaged_from: from.clone(), averaged_ema: ema, ema: false, integrity: None, ..states.pop().expect("two or more") };
    let dir = registry::dispatch(run.recipe.model.family, WriteAverage { run, dirs: &dirs, weights, name: &name, state: &state })?;
    Ok(Averaged { dir, from, weights })
}

struct WriteAverage<'a> {
    run: &'a RunModel,
    dirs: &'a [PathBuf],
    weights: WeightsFile,
    name: &'a str,
    state: &'a TrainState,
}

impl UseFamily for WriteAverage<'_> {
    type Output = Result<PathBuf>;

    fn with<F: Family>(self) -> Result<PathBuf> {
        let device = Default::default();
        let vocab = self.run.tokenizer.vocab_size();
        let models = self.dirs.iter().map(|dir| checkpoint::load_weights(F::build::<Flex>(&self.run.recipe, vocab, &device), &self.weights.path_in(dir), &device)).collect::<Result<Vec<_>>>()?;
        let mean = kiln_train::weights::average(models).map_err(|m| anyhow!("{}: the checkpoints do not average: {m}", self.run.run_dir.display()))?;
        let record = Recorder::<Flex>::record(&NamedMpkBytesRecorder::<FullPrecisionSettings>::new(), mean.into_record(), ()).map_err(|e| anyhow!("cannot serialise the average: {e}"))?;
        checkpoint::save_derived(&self.run.run_dir, self.name, self.state, |dir| {
            let path = dir.join("model.mpk");
            std::fs::write(&path, &record).map_err(|e| format!("{}: cannot write: {e}", path.display()))
        })
        .map_err(|m| anyhow!(m))
    }
}
