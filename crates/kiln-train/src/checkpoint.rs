//! Checkpoints: `checkpoints/<name>/` holds `model.mpk`, `optimizer.mpk` (Burn's named
//! MessagePack recorder, full precision) and `state.json` (counters, data position, the epoch's
//! running loss sums, sync statistics, the architecture, and a BLAKE3 hash of each weight file).
//! A checkpoint is written into a temporary directory, fsynced and renamed into place;
//! `checkpoints/latest` then names it, so a crash never leaves a half checkpoint as the latest.
//! Resuming verifies the hashes and falls back to the newest checkpoint that passes. The schedule
//! and the RNG need no state: both are functions of (seed, step, epoch). After each save, all but
//! the newest `train.keep_checkpoints` and the best by validation loss (`checkpoints/best`) go.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::Backend;
use kiln_events::{SyncStats, ValidRow};
use kiln_recipe::ModelSection;
use serde::{Deserialize, Serialize};

pub const STATE_FORMAT: u32 = 1;

/// Where training stands; enough to continue exactly. Unknown fields are refused, so a damaged
/// field name is caught like a damaged value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// The named validation sets' rows of the last validation (`eval.sets`). Left out when
    /// empty, so the digest of a state written before named sets existed still holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_dev: Vec<ValidRow>,
    /// The run reached its end (all epochs or `max_steps`).
    pub finished: bool,
    /// The architecture the weights belong to: checked before loading them anywhere.
    #[serde(default)]
    pub architecture: Option<Architecture>,
    /// BLAKE3 (hex) of each file of the checkpoint but `state.json`, checked before resuming.
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, String>,
    /// The best checkpoint so far by validation loss: (name, loss).
    #[serde(default)]
    pub best: Option<(String, f64)>,
    /// Learning-rate factor left by rollbacks after non-finite losses (1 = none).
    #[serde(default = "one")]
    pub lr_scale: f64,
    /// Steps whose update was skipped, and rollbacks made, after non-finite losses.
    #[serde(default)]
    pub skipped_steps: usize,
    #[serde(default)]
    pub rollbacks: usize,
    /// The best `train.best_metric` of any validation so far, and the validations since it
    /// (`train.patience`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_value: Option<f64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stale_validations: usize,
    /// The checkpoint holds `ema.mpk`, the moving average of the weights (`train.ema_decay`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub ema: bool,
    /// An averaged checkpoint (`kiln average`): the checkpoints whose weights it is the mean of.
    /// It holds weights only and is never resumed from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub averaged_from: Vec<String>,
    /// An averaged checkpoint made from the moving averages of its checkpoints (`kiln average
    /// --ema`), not from their raw weights: its `model.mpk` is an average of averages.
    #[serde(default, skip_serializing_if = "is_false")]
    pub averaged_ema: bool,
    /// BLAKE3 (hex) of run files the checkpoint depends on (`tokenizer.json`), by name under
    /// the run directory: a file changed since the save is refused before the checkpoint is used.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub run_files: std::collections::BTreeMap<String, String>,
    /// Data parallel: the host's time in the steps' all-reduces so far (across nodes: the
    /// reduce between them included), as the sync statistics count the loss reads.
    #[serde(default, skip_serializing_if = "no_reads")]
    pub reduce: SyncStats,
    /// BLAKE3 (hex) of the state itself (every other field, as canonical JSON): a changed digit
    /// anywhere in `state.json` is caught before the state is used. Absent in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
}

fn one() -> f64 {
    1.0
}

// Fields added after the first format are left out at their defaults, so a state written
// before them keeps its digest (the canonical JSON of its fields).
fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn no_reads(s: &SyncStats) -> bool {
    s.count == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Default for TrainState {
    fn default() -> Self {
        Self {
            format: STATE_FORMAT,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            epoch_loss_sum: 0.0,
            epoch_tokens: 0,
            last_epoch_loss: None,
            total_tokens: 0,
            sync: SyncStats::default(),
            wall_s: 0.0,
            last_valid: None,
            last_dev: Vec::new(),
            finished: false,
            architecture: None,
            files: Default::default(),
            best: None,
            lr_scale: 1.0,
            skipped_steps: 0,
            rollbacks: 0,
            best_value: None,
            stale_validations: 0,
            ema: false,
            averaged_from: Vec::new(),
            averaged_ema: false,
            run_files: Default::default(),
            reduce: SyncStats::default(),
            integrity: None,
        }
    }
}

impl TrainState {
    /// The last validation's row of the set `best_set` names ("" or "valid": the main one).
    pub fn chosen_valid(&self, best_set: &str) -> Option<&ValidRow> {
        if best_set.is_empty() || best_set == "valid" {
            self.last_valid.as_ref()
        } else {
            self.last_dev.iter().find(|r| r.set.as_deref() == Some(best_set))
        }
    }

    /// The state's digest: BLAKE3 of its canonical JSON (keys sorted, `integrity` left out).
    pub fn digest(&self) -> String {
        let mut state = self.clone();
        state.integrity = None;
        let value = serde_json::to_value(&state).expect("state serialises");
        blake3::hash(&serde_json::to_vec(&value).expect("state serialises")).to_hex().to_string()
    }

    /// The state with its digest, as written.
    pub fn sealed(&self) -> TrainState {
        TrainState { integrity: Some(self.digest()), ..self.clone() }
    }

    /// Checks the fields against each other and against the checkpoint's name, before anything
    /// uses them; the first field that cannot be right is named.
    pub fn check_fields(&self, dir: &Path) -> Result<(), String> {
        let path = dir.join("state.json");
        let bad = |field: &str, why: String| Err(format!("{}: `{field}` {why}", path.display()));
        if let Some(step) = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-")).and_then(|n| n.parse::<usize>().ok()) {
            if step != self.step {
                return bad("step", format!("is {}, but the checkpoint is {}", self.step, dir.file_name().unwrap_or_default().to_string_lossy()));
            }
        }
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !finite_nonneg(self.epoch_loss_sum) {
            return bad("epoch_loss_sum", format!("is {}, expected a finite sum >= 0", self.epoch_loss_sum));
        }
        if self.epoch_tokens > self.total_tokens {
            return bad("epoch_tokens", format!("is {}, more than total_tokens = {}", self.epoch_tokens, self.total_tokens));
        }
        if self.batch_in_epoch == 0 && (self.epoch_tokens != 0 || self.epoch_loss_sum != 0.0) {
            return bad("epoch_tokens", "counts tokens of an epoch that has not started (batch_in_epoch = 0)".into());
        }
        if self.last_epoch_loss.is_some_and(|l| !finite_nonneg(l)) {
            return bad("last_epoch_loss", "is not a finite loss >= 0".into());
        }
        if !finite_nonneg(self.wall_s) {
            return bad("wall_s", format!("is {}, expected finite seconds >= 0", self.wall_s));
        }
        let s = &self.sync;
        if !(finite_nonneg(s.total_ms) && finite_nonneg(s.max_ms)) || (s.count == 0 && s.total_ms > 0.0) {
            return bad("sync", "holds impossible read times".into());
        }
        if !(self.lr_scale.is_finite() && self.lr_scale > 0.0 && self.lr_scale <= 1.0) {
            return bad("lr_scale", format!("is {}, expected a factor in (0, 1]", self.lr_scale));
        }
        if self.skipped_steps > self.step {
            return bad("skipped_steps", format!("is {}, more than the {} steps done", self.skipped_steps, self.step));
        }
        if let Some((name, loss)) = &self.best {
            plain_checkpoint_name(name).map_err(|why| format!("{}: `best` {why}", path.display()))?;
            if !loss.is_finite() {
                return bad("best", "holds a non-finite loss".into());
            }
        }
        if let Some(v) = &self.last_valid {
            if v.step > self.step || !v.loss.is_finite() {
                return bad("last_valid", format!("is at step {} with loss {}, for a checkpoint at step {}", v.step, v.loss, self.step));
            }
        }
        for (name, hash) in &self.run_files {
            if plain_checkpoint_name(name).is_err() || hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad("run_files", format!("holds {name:?} = {hash:?}, not a run file's BLAKE3 hash"));
            }
        }
        for (name, hash) in &self.files {
            if plain_checkpoint_name(name).is_err() || name == "state.json" {
                return bad("files", format!("names {name:?}, not a file of this checkpoint"));
            }
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad("files", format!("holds {hash:?} for {name}, not a BLAKE3 hash"));
            }
        }
        Ok(())
    }
}

/// A checkpoint's name (from `checkpoints/latest`, `checkpoints/best`, `--checkpoint`, a state's
/// `best`): one plain path component, so that it resolves inside the run's `checkpoints/`.
pub fn plain_checkpoint_name(name: &str) -> Result<(), String> {
    if kiln_recipe::is_plain_name(name) { Ok(()) } else { Err(format!("{name:?} is not a checkpoint name (expected a plain name such as step-0001000 inside checkpoints/)")) }
}

/// `checkpoints/<name>` of a run, refusing names that would resolve elsewhere.
pub fn named(run_dir: &Path, name: &str) -> Result<PathBuf, String> {
    plain_checkpoint_name(name).map_err(|why| format!("{}: {why}", checkpoints_dir(run_dir).display()))?;
    Ok(checkpoints_dir(run_dir).join(name))
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
        // Dropout changes no weight.
        kiln_recipe::first_difference("model", a.as_table()?, b.as_table()?, &["dropout"])
            .map(|(key, theirs, ours)| (key, theirs.to_string(), ours.map(|x| x.to_string()).unwrap_or_else(|| "nothing".into())))
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

/// `checkpoints/<name>`, where `latest` and `best` follow their pointer files; every name is
/// confined to the run's `checkpoints/` ([`plain_checkpoint_name`]).
pub fn resolve(run_dir: &Path, name: &str) -> Result<PathBuf, String> {
    match name {
        "latest" => latest(run_dir)?.ok_or_else(|| format!("{}: the run has no checkpoint yet", checkpoints_dir(run_dir).display())),
        "best" => {
            let pointer = checkpoints_dir(run_dir).join("best");
            let text = std::fs::read_to_string(&pointer).map_err(|e| format!("{}: {e}", pointer.display()))?;
            named(run_dir, text.trim()).map_err(|why| format!("{}: {why}", pointer.display()))
        }
        _ => named(run_dir, name),
    }
}

/// The checkpoint `checkpoints/latest` names, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>, String> {
    let pointer = checkpoints_dir(run_dir).join("latest");
    match std::fs::read_to_string(&pointer) {
        Ok(name) => {
            let dir = named(run_dir, name.trim()).map_err(|why| format!("{}: {why}", pointer.display()))?;
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
    // serde's message quotes the damaged text, which may hold a line break: one line always.
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a kiln checkpoint state: {}", path.display(), e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")))?;
    if state.format != STATE_FORMAT {
        return Err(format!("{}: state format {} (this kiln reads {STATE_FORMAT})", path.display(), state.format));
    }
    if let Some(recorded) = &state.integrity {
        if *recorded != state.digest() {
            return Err(format!("{}: integrity check failed (the state was changed or damaged)", path.display()));
        }
    }
    state.check_fields(dir)?;
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
    let dest = write_dir(&root, name, state, write_files)?;
    kiln_events::write_atomic(&root.join("latest"), name.as_bytes())?;
    if let Some((best, _)) = &state.best {
        kiln_events::write_atomic(&root.join("best"), best.as_bytes())?;
    }
    Ok(dest)
}

/// Writes a checkpoint made from others (an average, `kiln average`): the same files and checks
/// as [`save`], but `latest` and `best` keep naming the run's own checkpoints, and its name may
/// not look like one of theirs (`step-…`), so resuming and pruning never take it.
pub fn save_derived(run_dir: &Path, name: &str, state: &TrainState, write_files: impl FnOnce(&Path) -> Result<(), String>) -> Result<PathBuf, String> {
    let root = checkpoints_dir(run_dir);
    plain_checkpoint_name(name).map_err(|why| format!("{}: {why}", root.display()))?;
    if name.starts_with("step-") || name == "latest" || name == "best" {
        return Err(format!("{}: {name:?} is a name of the run's own checkpoints; choose another", root.display()));
    }
    write_dir(&root, name, state, write_files)
}

/// `checkpoints/<name>`, written whole or not at all: a temporary directory filled, hashed,
/// fsynced and renamed into place.
fn write_dir(root: &Path, name: &str, state: &TrainState, write_files: impl FnOnce(&Path) -> Result<(), String>) -> Result<PathBuf, String> {
    std::fs::create_dir_all(root).map_err(|e| format!("{}: cannot create: {e}", root.display()))?;
    // Named for this process; any other temporary checkpoint is a killed process's (the run's
    // lock lets one process write here), left half-written, and goes.
    let tmp = root.join(format!(".{name}.{}.tmp", std::process::id()));
    let dest = root.join(name);
    for stale in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let file = stale.file_name().to_string_lossy().into_owned();
        if file.starts_with('.') && file.ends_with(".tmp") {
            let _ = std::fs::remove_dir_all(stale.path());
        }
    }
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: cannot create: {e}", tmp.display()))?;
    let result = (|| {
        write_files(&tmp)?;
        let mut state = state.clone();
        state.files = hash_files(&tmp)?;
        let state = state.sealed();
        let state_text = serde_json::to_string_pretty(&state).expect("state serialises");
        kiln_events::write_atomic(&tmp.join("state.json"), state_text.as_bytes())?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| format!("{}: cannot replace: {e}", dest.display()))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: cannot rename into place: {e}", dest.display()))?;
        // The checkpoint's name is durable before a pointer names it.
        kiln_events::files::sync_dir(root)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| dest)
}

/// BLAKE3 of every file in a checkpoint directory except `state.json`, fsynced on the way.
fn hash_files(dir: &Path) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "state.json" || !entry.path().is_file() {
            continue;
        }
        let bytes = std::fs::read(entry.path()).map_err(|e| format!("{}: {e}", entry.path().display()))?;
        std::fs::File::open(entry.path()).and_then(|f| f.sync_all()).map_err(|e| format!("{}: cannot sync: {e}", entry.path().display()))?;
        out.insert(name, blake3::hash(&bytes).to_hex().to_string());
    }
    Ok(out)
}

/// Reads a checkpoint's state and checks its files against the hashes it records.
pub fn verify(dir: &Path) -> Result<TrainState, String> {
    let state = read_state(dir)?;
    for (name, expected) in &state.files {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        if blake3::hash(&bytes).to_hex().as_str() != expected {
            return Err(format!("{}: checksum mismatch (corrupted or truncated)", path.display()));
        }
    }
    Ok(state)
}

/// Checks the run files a checkpoint depends on ([`TrainState::run_files`]) against their hashes:
/// a file changed since the save is a changed run, not a damaged checkpoint, so this comes after
/// the checkpoint is chosen and its architecture checked (whose message says more).
pub fn check_run_files(dir: &Path, state: &TrainState) -> Result<(), String> {
    // checkpoints/<name>/ lives two levels under the run directory.
    let Some(run_dir) = dir.parent().and_then(Path::parent) else { return Ok(()) };
    for (name, expected) in &state.run_files {
        let path = run_dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        if blake3::hash(&bytes).to_hex().as_str() != expected {
            return Err(format!("{}: checksum mismatch with checkpoint {} (changed or damaged since it was saved)", path.display(), dir.file_name().unwrap_or_default().to_string_lossy()));
        }
    }
    Ok(())
}

/// BLAKE3 of the run files `names` (under `run_dir`), for a checkpoint's state.
pub fn hash_run_files(run_dir: &Path, names: &[String]) -> Result<std::collections::BTreeMap<String, String>, String> {
    names
        .iter()
        .map(|name| {
            let path = run_dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
            Ok((name.clone(), blake3::hash(&bytes).to_hex().to_string()))
        })
        .collect()
}

/// Checkpoint directories `step-NNNNNNN` with their steps, newest first.
pub fn list(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(checkpoints_dir(run_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    out
}

/// The checkpoint to resume from: the latest if it verifies, else the newest one that does.
/// Returns it and one line per checkpoint passed over.
pub fn resume_point(run_dir: &Path) -> Result<(PathBuf, Vec<String>), String> {
    let mut skipped = Vec::new();
    let latest = latest(run_dir).unwrap_or_else(|e| {
        skipped.push(e);
        None
    });
    let mut candidates: Vec<PathBuf> = latest.into_iter().collect();
    candidates.extend(list(run_dir).into_iter().map(|(_, p)| p));
    let mut seen = std::collections::HashSet::new();
    for dir in candidates {
        if !seen.insert(dir.clone()) {
            continue;
        }
        match verify(&dir) {
            Ok(_) => return Ok((dir, skipped)),
            Err(why) => skipped.push(format!("{why}; passing over this checkpoint")),
        }
    }
    let root = checkpoints_dir(run_dir);
    if skipped.is_empty() {
        Err(format!("{}: no checkpoint to resume from", root.display()))
    } else {
        Err(format!("{}: no intact checkpoint to resume from ({})", root.display(), skipped.join("; ")))
    }
}

/// Deletes all but the newest `keep` checkpoints and the best one (`keep` = 0: keeps all).
pub fn prune(run_dir: &Path, keep: usize, best: Option<&str>) -> Result<(), String> {
    if keep == 0 {
        return Ok(());
    }
    for (_, dir) in list(run_dir).into_iter().skip(keep) {
        if best.is_some_and(|b| dir.file_name().is_some_and(|n| n == b)) {
            continue;
        }
        std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: cannot remove old checkpoint: {e}", dir.display()))?;
    }
    Ok(())
}

/// One of the weights files of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFile {
    /// `model.mpk`: the weights the optimizer trained (or, in an averaged checkpoint, their mean).
    Model,
    /// `ema.mpk`: their moving average (`train.ema_decay`).
    Ema,
}

impl WeightsFile {
    /// The file's name without `.mpk`, as [`load_weights`] takes it.
    pub fn stem(self) -> &'static str {
        match self {
            WeightsFile::Model => "model",
            WeightsFile::Ema => "ema",
        }
    }

    /// The file in checkpoint directory `dir`, as [`load_weights`] takes it.
    pub fn path_in(self, dir: &Path) -> PathBuf {
        dir.join(self.stem())
    }
}

/// Loads weights saved at `path` (`.mpk` added) into `model`; a file that does not fit is one line.
pub fn load_weights<B: Backend, M: Module<B>>(model: M, path: &Path, device: &B::Device) -> anyhow::Result<M> {
    model
        .load_file(path.to_path_buf(), &NamedMpkFileRecorder::<FullPrecisionSettings>::new(), device)
        .map_err(|e| anyhow::anyhow!("{}.mpk: checkpoint does not match the recipe's model: {}", path.display(), e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save_fake(run: &Path, step: usize, best: Option<(String, f64)>) -> PathBuf {
        let state = TrainState { format: STATE_FORMAT, step, best, ..Default::default() };
        save(run, &format!("step-{step:07}"), &state, |dir| std::fs::write(dir.join("model.mpk"), vec![step as u8; 100]).map_err(|e| e.to_string())).unwrap()
    }

    #[test]
    fn corrupted_latest_falls_back_and_pruning_keeps_the_best() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        for step in [10, 20, 30] {
            save_fake(run, step, Some(("step-0000020".into(), 1.5)));
        }
        assert_eq!(resume_point(run).unwrap().0, checkpoints_dir(run).join("step-0000030"));
        // Flip a byte of the latest checkpoint's weights: resume passes over it, saying why.
        let model = checkpoints_dir(run).join("step-0000030/model.mpk");
        let mut bytes = std::fs::read(&model).unwrap();
        bytes[50] ^= 1;
        std::fs::write(&model, bytes).unwrap();
        let (point, skipped) = resume_point(run).unwrap();
        assert_eq!(point, checkpoints_dir(run).join("step-0000020"));
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("checksum mismatch") && skipped[0].contains("step-0000030"), "{skipped:?}");

        for step in [40, 50] {
            save_fake(run, step, Some(("step-0000020".into(), 1.5)));
        }
        prune(run, 2, Some("step-0000020")).unwrap();
        let left: Vec<usize> = list(run).into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, vec![50, 40, 20], "the newest two and the best");
        assert_eq!(std::fs::read_to_string(checkpoints_dir(run).join("best")).unwrap(), "step-0000020");
        prune(run, 0, None).unwrap();
        assert_eq!(list(run).len(), 3, "keep = 0 keeps all");
    }

    #[test]
    fn impossible_fields_are_named_before_use() {
        let dir = Path::new("/runs/x/checkpoints/step-0000040");
        let ok = TrainState { step: 40, epoch: 1, batch_in_epoch: 2, epoch_tokens: 10, total_tokens: 100, epoch_loss_sum: 3.0, ..Default::default() };
        assert_eq!(ok.check_fields(dir), Ok(()));
        let cases: Vec<(&str, TrainState)> = vec![
            ("`step` is 41", TrainState { step: 41, ..ok.clone() }),
            ("`epoch_tokens`", TrainState { epoch_tokens: 101, ..ok.clone() }),
            ("`epoch_tokens`", TrainState { batch_in_epoch: 0, ..ok.clone() }),
            ("`epoch_loss_sum`", TrainState { epoch_loss_sum: f64::NAN, ..ok.clone() }),
            ("`lr_scale`", TrainState { lr_scale: 2.0, ..ok.clone() }),
            ("`skipped_steps`", TrainState { skipped_steps: 41, ..ok.clone() }),
            ("`best`", TrainState { best: Some(("../../elsewhere".into(), 1.0)), ..ok.clone() }),
            ("`files`", TrainState { files: [("../model.mpk".to_string(), "0".repeat(64))].into(), ..ok.clone() }),
            ("`run_files`", TrainState { run_files: [("tokenizer.json".to_string(), "not a hash".to_string())].into(), ..ok.clone() }),
        ];
        for (field, state) in cases {
            let err = state.check_fields(dir).unwrap_err();
            assert!(err.contains(field) && err.contains("state.json"), "{field}: {err}");
        }
        for name in ["", ".", "..", "../x", "a/b", ".hidden", "a\\b"] {
            assert!(plain_checkpoint_name(name).is_err(), "{name:?}");
        }
        assert!(plain_checkpoint_name("step-0000040").is_ok());
    }

    /// Fuzzing the checkpoint readers: `state.json` mutated at random, and weight files truncated
    /// or altered under hashes that match (as if state.json were rewritten with them), loaded by
    /// Burn's recorder into a real model. Never a panic: an error, or a state that is whole.
    mod fuzz {
        use super::*;
        use burn::module::Module;
        use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
        use proptest::prelude::*;

        type B = burn::backend::Flex;

        fn original() -> TrainState {
            TrainState { step: 40, epoch: 1, batch_in_epoch: 3, epoch_loss_sum: 0.1 + 0.2, epoch_tokens: 77, total_tokens: 1234, best: Some(("step-0000040".into(), 2.5)), ..Default::default() }.sealed()
        }

        fn saved_state() -> String {
            serde_json::to_string_pretty(&original()).unwrap()
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

            /// Whatever floats a state holds, its digest recomputes after a round trip through
            /// its file (serde_json's `float_roundtrip` reads back the float written).
            #[test]
            fn sealed_states_read_back_whole(sum in 0.0f64..1e12, wall in 0.0f64..1e9, scale in 1e-9f64..=1.0, tokens in 0u64..1u64 << 40) {
                let state = TrainState { step: 7, batch_in_epoch: 7, epoch_loss_sum: sum, wall_s: wall, lr_scale: scale, epoch_tokens: tokens, total_tokens: tokens, ..Default::default() }.sealed();
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(dir.path().join("state.json"), serde_json::to_string_pretty(&state).unwrap()).unwrap();
                prop_assert_eq!(read_state(dir.path()), Ok(state));
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

            #[test]
            fn mutated_state_files_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<char>()), 1..6)) {
                let mut text: Vec<char> = saved_state().chars().collect();
                for (at, c) in edits {
                    let i = at.index(text.len());
                    text[i] = c;
                }
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(dir.path().join("state.json"), text.into_iter().collect::<String>()).unwrap();
                // Accepted only when nothing of meaning changed (white space, say): a changed
                // digit, name or value fails the integrity check or the field checks.
                match read_state(dir.path()) {
                    Ok(state) => prop_assert_eq!(state, original()),
                    Err(e) => prop_assert!(e.contains("state.json") && !e.contains('\n'), "{}", e),
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 60, ..ProptestConfig::default() })]

            #[test]
            fn damaged_weight_files_are_errors_not_panics(cut in any::<prop::sample::Index>(), edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)) {
                let device = Default::default();
                let config = kiln_model::Seq2SeqConfig {
                    vocab_size: 40, pad: 0, bos: 2, eos: 3,
                    model: kiln_recipe::ModelSection { d_model: 8, n_heads: 2, d_ff: 16, encoder_layers: 1, decoder_layers: 1, max_positions: 16, ..Default::default() },
                };
                let model = config.init::<B>(&device);
                let dir = tempfile::tempdir().unwrap();
                let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
                model.clone().save_file(dir.path().join("model"), &recorder).unwrap();
                let path = dir.path().join("model.mpk");
                let mut bytes = std::fs::read(&path).unwrap();
                for (at, b) in edits {
                    let i = at.index(bytes.len());
                    bytes[i] = b;
                }
                bytes.truncate(cut.index(bytes.len() + 1));
                std::fs::write(&path, &bytes).unwrap();
                let loaded = load_weights(model, &path.with_extension(""), &device);
                if let Err(e) = loaded {
                    prop_assert!(e.to_string().contains("model.mpk") && !e.to_string().contains('\n'));
                }
            }
        }
    }
}
