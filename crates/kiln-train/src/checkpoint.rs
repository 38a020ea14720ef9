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

/// Where training stands; enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

fn one() -> f64 {
    1.0
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
            finished: false,
            architecture: None,
            files: Default::default(),
            best: None,
            lr_scale: 1.0,
            skipped_steps: 0,
            rollbacks: 0,
        }
    }
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
        let mut state = state.clone();
        state.files = hash_files(&tmp)?;
        let state_text = serde_json::to_string_pretty(&state).expect("state serialises");
        kiln_events::write_atomic(&tmp.join("state.json"), state_text.as_bytes())?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(|e| format!("{}: cannot replace: {e}", dest.display()))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: cannot rename into place: {e}", dest.display()))?;
        kiln_events::write_atomic(&root.join("latest"), name.as_bytes())?;
        if let Some((best, _)) = &state.best {
            kiln_events::write_atomic(&root.join("best"), best.as_bytes())?;
        }
        Ok(())
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

    /// Fuzzing the checkpoint readers: `state.json` mutated at random, and weight files truncated
    /// or altered under hashes that match (as if state.json were rewritten with them), loaded by
    /// Burn's recorder into a real model. Never a panic: an error, or a state that is whole.
    mod fuzz {
        use super::*;
        use burn::module::Module;
        use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
        use proptest::prelude::*;

        type B = burn::backend::Flex;

        fn saved_state() -> String {
            let state = TrainState { step: 40, epoch: 1, best: Some(("step-0000040".into(), 2.5)), ..Default::default() };
            serde_json::to_string_pretty(&state).unwrap()
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
                match read_state(dir.path()) {
                    Ok(state) => prop_assert_eq!(state.format, STATE_FORMAT),
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
