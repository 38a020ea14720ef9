//! `kiln export`: a checkpoint's weights for other tools. `model.safetensors` is written by
//! burn-store's safetensors writer (tensor names are Burn's module paths, e.g.
//! `encoder.layers.0.self_attn.query.weight`); beside it `config.json` describes the
//! architecture (the recipe's `[model]`, the vocabulary and its special ids, every tensor's name
//! and shape) and `tokenizer.json` is the run's own. Burn's linear layers hold their weight as
//! `[in, out]`, the transpose of PyTorch's `nn.Linear`: `config.json` says so.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use burn::backend::Flex;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use kiln_data::{BOS, EOS, PAD};
use serde_json::json;

use crate::infer::RunModel;
use crate::registry::{self, Family, UseFamily};

/// What `kiln export` wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub dir: PathBuf,
    pub tensors: usize,
    pub parameters: usize,
}

/// Writes `model.safetensors`, `config.json` and `tokenizer.json` of `run`'s checkpoint (its
/// chosen weights) into `out`, which is created; files there of the same names are replaced.
pub fn export_safetensors(run: &RunModel, out: &Path) -> Result<Exported> {
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let (tensors, parameters, shapes) = registry::dispatch(run.recipe.model.family, WriteSafetensors { run, path: &out.join("model.safetensors") })?;
    let config = json!({
        "format": "kiln-safetensors-1",
        "family": run.recipe.model.family,
        "model": run.recipe.model,
        "vocab_size": run.tokenizer.vocab_size(),
        "special_ids": { "pad": PAD, "unk": 1, "bos": BOS, "eos": EOS },
        "tokenizer": "tokenizer.json",
        "checkpoint": run.checkpoint.file_name().map(|n| n.to_string_lossy().into_owned()),
        "step": run.step,
        "weights": if run.decodes_moving_average() { "ema" } else { "raw" },
        "dtype": "float32",
        "linear_weight_layout": "[in, out] (Burn); transpose for torch.nn.Linear",
        "tensors": shapes,
    });
    let text = serde_json::to_string_pretty(&config).expect("serialises");
    kiln_events::write_atomic(&out.join("config.json"), text.as_bytes()).map_err(|m| anyhow!(m))?;
    let tokenizer = std::fs::read(run.run_dir.join("tokenizer.json")).map_err(|e| anyhow!("{}: cannot read: {e}", run.run_dir.join("tokenizer.json").display()))?;
    kiln_events::write_atomic(&out.join("tokenizer.json"), &tokenizer).map_err(|m| anyhow!(m))?;
    Ok(Exported { dir: out.to_path_buf(), tensors, parameters })
}

struct WriteSafetensors<'a> {
    run: &'a RunModel,
    path: &'a Path,
}

impl UseFamily for WriteSafetensors<'_> {
    /// Tensors, parameters, and each tensor's name and shape.
    type Output = Result<(usize, usize, serde_json::Map<String, serde_json::Value>)>;

    fn with<F: Family>(self) -> Self::Output {
        let device = Default::default();
        let model = F::build::<Flex>(&self.run.recipe, self.run.tokenizer.vocab_size(), &device);
        let model = kiln_train::checkpoint::load_weights(model, &self.run.weights.path_in(&self.run.checkpoint), &device)?;
        let snapshots = model.collect(None, None, false);
        let shapes: serde_json::Map<String, serde_json::Value> = snapshots.iter().map(|t| (t.full_path(), json!(t.shape.to_vec()))).collect();
        let parameters = snapshots.iter().map(|t| t.shape.num_elements()).sum();
        // Written next to its place and renamed: a failed export leaves no half file behind.
        let tmp = self.path.with_extension(format!("safetensors.{}.tmp", std::process::id()));
        let mut store = SafetensorsStore::from_file(&tmp).metadata("producer", "kiln").metadata("kiln.step", self.run.step.to_string());
        let written = model.save_into(&mut store).map_err(|e| anyhow!("{}: cannot write: {e}", self.path.display()));
        if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, self.path).map_err(|e| anyhow!("{}: cannot rename into place: {e}", self.path.display()))) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok((snapshots.len(), parameters, shapes))
    }
}

/// Reads an exported `model.safetensors` back into a model of `run`'s family and architecture
/// (the test of an export; also how a Burn program takes the weights in).
pub fn load_safetensors<F: Family>(run: &RunModel, path: &Path) -> Result<F::Model<Flex>> {
    let device = Default::default();
    let mut model = F::build::<Flex>(&run.recipe, run.tokenizer.vocab_size(), &device);
    let mut store = SafetensorsStore::from_file(path);
    let result = model.load_from(&mut store).map_err(|e| anyhow!("{}: cannot load: {e}", path.display()))?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(anyhow!("{}: {} tensors missing, {} errors", path.display(), result.missing.len(), result.errors.len()));
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Int, Tensor, TensorData};

    /// A Python that imports torch: `KILN_PEER_PYTHON`, the bench's `benches/peer/.venv`, or
    /// `python3`.
    fn python_with_torch() -> Option<std::path::PathBuf> {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/peer/.venv/bin/python");
        let candidates = [std::env::var_os("KILN_PEER_PYTHON").map(Into::into), Some(venv), Some("python3".into())];
        candidates.into_iter().flatten().find(|p| std::process::Command::new(p).args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success()))
    }

    /// The golden run's checkpoint, exported and read back, is the same model: every weight bit
    /// for bit, and the same logits on a batch.
    #[test]
    fn exported_weights_load_back_into_the_same_model() {
        let run_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden-run");
        let run = crate::infer::open_run(&run_dir, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let done = export_safetensors(&run, dir.path()).unwrap();
        assert!(done.tensors > 10 && done.parameters > 1000, "{done:?}");
        let loaded = load_safetensors::<registry::Translation>(&run, &dir.path().join("model.safetensors")).unwrap();
        let device = Default::default();
        let original = run.translation_model::<Flex>(&device).unwrap();
        let values = |m: &kiln_model::Seq2Seq<Flex>| -> Vec<u32> { m.collect(None, None, false).iter().flat_map(|t| t.to_data().unwrap().iter::<f32>().map(f32::to_bits).collect::<Vec<_>>()).collect() };
        assert_eq!(values(&loaded), values(&original));
        let src = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![5i32, 9, 14, 3, 7, 22, 3, 0], [2, 4]), &device);
        let tgt = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![2i32, 11, 6, 2, 8, 0], [2, 3]), &device);
        let logits = |m: &kiln_model::Seq2Seq<Flex>| m.forward(src.clone(), tgt.clone()).into_data().to_vec::<f32>().unwrap();
        assert_eq!(logits(&loaded), logits(&original));
        // The PyTorch reference, where a Python with torch is found, reads the file into its own
        // model and gives the same logits.
        if let Some(python) = python_with_torch() {
            let batch = dir.path().join("batch.json");
            std::fs::write(&batch, r#"{"src": [[5, 9, 14, 3], [7, 22, 3, 0]], "tgt_in": [[2, 11, 6], [2, 8, 0]]}"#).unwrap();
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/peer/peer_logits.py");
            let out = std::process::Command::new(&python).arg(&script).arg(dir.path()).arg(&batch).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let peer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let ours = logits(&original);
            let theirs: Vec<f64> = peer["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(peer["shape"], json!([2, 3, ours.len() / 6]));
            let worst = ours.iter().zip(&theirs).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-4, "PyTorch's logits differ from kiln's by up to {worst}");
            eprintln!("PyTorch ({}) reads the export: its logits within {worst:.1e} of kiln's", python.display());
        } else {
            eprintln!("no Python with torch (KILN_PEER_PYTHON, benches/peer/.venv): the PyTorch reading of the export is not checked");
        }
        // A file of another architecture is refused, not half loaded.
        let mut other = crate::infer::open_run(&run_dir, None).unwrap();
        other.recipe.model.d_ff *= 2;
        assert!(load_safetensors::<registry::Translation>(&other, &dir.path().join("model.safetensors")).is_err());
    }
}
