//! Checkpoints: `checkpoints/<name>/` holds `model.mpk`, `optimizer.mpk` (Burn's named
//! MessagePack recorder, full precision) and `state.json` (counters, data position, the epoch's
//! running loss sums, sync statistics). A checkpoint is written into a temporary directory and
//! renamed into place; `checkpoints/latest` then names it, so a crash never leaves a half checkpoint
//! as the latest. The schedule and the RNG need no state: both are functions of (seed, step, epoch).

use std::path::{Path, PathBuf};

use kiln_events::{SyncStats, ValidRow};
use kiln_recipe::ModelSection;
use serde::{Deserialize, Serialize};

pub const STATE_FORMAT: u32 = 1;

/// Where training stands; enough to continue exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    /// Optimizer steps done.
    pub step: usize,
    /// Index (0-based) of the epoch in progress, or of the next one when `batch_in_epoch` is 0.
    pub epoch: usize,
    /// Batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// Σ loss and Σ target tokens over `epoch`'s steps so far.
    pub epoch_loss_sum: f64,
    pub epoch_tokens: u64,
    /// Mean loss of the last epoch that was run (complete or cut by `max_steps`).
    pub last_epoch_loss: Option<f64>,
    pub total_tokens: u64,
    pub sync: SyncStats,
    /// Seconds of training before this checkpoint (summed over resumed runs).
    pub wall_s: f64,
    pub last_valid: Option<ValidRow>,
    /// The run reached its end (all epochs or `max_steps`).
    pub finished: bool,
    /// The architecture the weights belong to: checked before loading them anywhere.
    #[serde(default)]
    pub architecture: Option<Architecture>,
}

/// What a checkpoint's weights fit: the model section (minus training-only keys) and the vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    pub vocab_size: usize,
    pub model: ModelSection,
}

impl Architecture {
    pub fn new(model: &ModelSection, vocab_size: usize) -> Self {
        Self { vocab_size, model: model.clone() }
    }

    /// The first difference that matters for the weights, as `key = theirs` vs `ours`.
    pub fn difference(&self, other: &Architecture) -> Option<(String, String, String)> {
        if self.vocab_size != other.vocab_size {
            return Some(("vocabulary size".into(), self.vocab_size.to_string(), other.vocab_size.to_string()));
        }
        let (a, b) = (toml::Value::try_from(&self.model).ok()?, toml::Value::try_from(&other.model).ok()?);
        let (a, b) = (a.as_table()?, b.as_table()?);
        // Dropout changes no weight.
        a.iter().filter(|(k, _)| k.as_str() != "dropout").find(|(k, v)| b.get(k.as_str()) != Some(*v)).map(|(k, v)| {
            (format!("model.{k}"), v.to_string(), b.get(k.as_str()).map(|x| x.to_string()).unwrap_or_else(|| "nothing".into()))
        })
    }
}

/// Refuses to load `checkpoint` (with `state`) into a model built as `expected`, naming what differs.
pub fn check_architecture(checkpoint: &Path, state: &TrainState, expected: &Architecture) -> Result<(), String> {
    match &state.architecture {
        Some(saved) => match saved.difference(expected) {
            Some((key, theirs, ours)) => Err(format!("{}: the checkpoint was trained with {key} = {theirs}, the recipe asks for {ours}", checkpoint.display())),
            None => Ok(()),
        },
        // Older checkpoints do not say; loading the weights checks their shapes.
        None => Ok(()),
    }
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The checkpoint `checkpoints/latest` names, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>, String> {
    let pointer = checkpoints_dir(run_dir).join("latest");
    match std::fs::read_to_string(&pointer) {
        Ok(name) => {
            let dir = checkpoints_dir(run_dir).join(name.trim());
            if dir.is_dir() {
                Ok(Some(dir))
            } else {
                Err(format!("{}: names {}, which does not exist", pointer.display(), dir.display()))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", pointer.display())),
    }
}

pub fn read_state(dir: &Path) -> Result<TrainState, String> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| format!("{}: not a kiln checkpoint state: {e}", path.display()))?;
    if state.format != STATE_FORMAT {
        return Err(format!("{}: state format {} (this kiln reads {STATE_FORMAT})", path.display(), state.format));
    }
    Ok(state)
}

/// Writes a checkpoint: `write_files` fills a temporary directory, which is then renamed to
/// `checkpoints/<name>` and made the latest.
pub fn save(
    run_dir: &Path,
    name: &str,
    state: &TrainState,
    write_files: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<PathBuf, String> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: cannot create: {e}", root.display()))?;
    let tmp = root.join(format!(".{name}.tmp"));
    let dest = root.join(name);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: cannot create: {e}", tmp.display()))?;
    let result = (|| {
        write_files(&tmp)?;
        let state_text = serde_json::to_string_pretty(state).expect("state serialises");
        kiln_views::run_files::write_atomic(&tmp.join("state.json"), state_text.as_bytes())?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| format!("{}: cannot replace: {e}", dest.display()))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: cannot rename into place: {e}", dest.display()))?;
        kiln_views::run_files::write_atomic(&root.join("latest"), name.as_bytes())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| dest)
}
