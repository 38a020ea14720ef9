//! Using trained models: open a run directory (its recipe, tokenizer and a checkpoint, the latest
//! or a named one), check that the checkpoint fits the recipe's architecture, and translate,
//! generate or evaluate. Decoding goes through the models' key/value caches.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use kiln_data::batching::plan_batches;
use kiln_data::prepare::TokenizerSource;
use kiln_data::{Example, HostBatch, SubwordTokenizer, EOS, PAD};
use kiln_metrics::{BleuStats, ChrfStats};
use kiln_model::sampling::Sampling;
use kiln_model::seq2seq::BeamSettings;
use kiln_model::{DecoderLm, Seq2Seq};
use kiln_recipe::{ModelFamily, Recipe};
use serde::Serialize;

use kiln_train::checkpoint::{self, Architecture, WeightsFile};
use crate::evaluate::{beam_translate, beam_translate_n, evaluate, ids, max_len_for};
use crate::family::{evaluate_lm, Split};
use crate::family::{lm_config, model_config};

/// A run directory opened for inference.
pub struct RunModel {
    pub run_dir: PathBuf,
    pub recipe: Recipe,
    pub tokenizer: SubwordTokenizer,
    pub checkpoint: PathBuf,
    pub step: usize,
    /// The weights file of the checkpoint that decodes: `ema.mpk` (the moving average of the
    /// weights, `train.ema_decay`) where the checkpoint has one, else `model.mpk`.
    pub weights: WeightsFile,
    /// The checkpoint is an average of moving averages (`kiln average --ema`).
    pub averaged_ema: bool,
}

/// Which of a checkpoint's weights to use (`--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weights {
    /// The moving average where the checkpoint has one, else the raw weights.
    #[default]
    Auto,
    /// The moving average; refused where the checkpoint has none.
    Ema,
    /// The weights the optimizer trained.
    Raw,
}

/// Opens `run_dir` at `checkpoint` (a name under `checkpoints/`, e.g. `step-0001108`; default:
/// the latest).
pub fn open_run(run_dir: &Path, checkpoint: Option<&str>) -> Result<RunModel> {
    let recipe_path = run_dir.join("recipe.toml");
    if !recipe_path.is_file() {
        bail!("{}: not a kiln run directory (no recipe.toml)", run_dir.display());
    }
    let mut recipe = Recipe::load(&recipe_path, &[])?;
    if recipe.loader.max_tokens == kiln_recipe::TokenLimit::Auto {
        // The budgets the run probed; evaluation and decoding batch like training did.
        let table = kiln_train::autobatch::read(run_dir).map_err(|m| anyhow!(m))?;
        recipe.loader.max_tokens = kiln_recipe::TokenLimit::Table(table.budget_rows());
    }
    let tokenizer = SubwordTokenizer::load(&run_dir.join("tokenizer.json")).map_err(|e| anyhow!("{e}"))?;
    let dir = match checkpoint {
        Some(name) => {
            let dir = checkpoint::resolve(run_dir, name).map_err(|m| anyhow!("--checkpoint: {m}"))?;
            if !dir.is_dir() {
                bail!("--checkpoint: {}: no such checkpoint", dir.display());
            }
            dir
        }
        None => checkpoint::latest(run_dir)
            .map_err(|m| anyhow!(m))?
            .ok_or_else(|| anyhow!("{}: the run has no checkpoint yet", checkpoint::checkpoints_dir(run_dir).display()))?,
    };
    // A corrupted or truncated checkpoint is named here, not met as a decoding error later.
    let state = checkpoint::verify(&dir).map_err(|m| anyhow!(m))?;
    checkpoint::check_architecture(&dir, &state, &Architecture::new(&recipe.model, tokenizer.vocab_size())).map_err(|m| anyhow!(m))?;
    checkpoint::check_run_files(&dir, &state).map_err(|m| anyhow!(m))?;
    let weights = if state.ema { WeightsFile::Ema } else { WeightsFile::Model };
    Ok(RunModel { run_dir: run_dir.to_path_buf(), recipe, tokenizer, checkpoint: dir, step: state.step, weights, averaged_ema: state.averaged_ema })
}

fn load<B: Backend, M: Module<B>>(model: M, run: &RunModel, device: &B::Device) -> Result<M> {
    kiln_train::checkpoint::load_weights(model, &run.weights.path_in(&run.checkpoint), device)
}

impl RunModel {
    /// Whether the weights that decode are a moving average (`ema.mpk`, or an average of them).
    pub fn decodes_moving_average(&self) -> bool {
        self.weights == WeightsFile::Ema || self.averaged_ema
    }

    /// Decodes with `which` of the checkpoint's weights.
    pub fn use_weights(&mut self, which: Weights) -> Result<()> {
        self.weights = match which {
            Weights::Auto => self.weights,
            Weights::Raw if self.averaged_ema => bail!("--weights raw: {} is an average of moving averages (kiln average --ema); it holds no raw weights", self.checkpoint.display()),
            Weights::Raw => WeightsFile::Model,
            Weights::Ema if self.averaged_ema => WeightsFile::Model,
            Weights::Ema if self.checkpoint.join("ema.mpk").is_file() => WeightsFile::Ema,
            Weights::Ema => bail!("--weights ema: {} holds no moving average of the weights (the run had train.ema_decay = 0)", self.checkpoint.display()),
        };
        Ok(())
    }

    pub fn translation_model<B: Backend>(&self, device: &B::Device) -> Result<Seq2Seq<B>> {
        if self.recipe.model.family != ModelFamily::Transformer {
            bail!("{}: this run trained a language model; use `generate`", self.run_dir.display());
        }
        load(model_config(&self.recipe, self.tokenizer.vocab_size()).init::<B>(device), self, device)
    }

    pub fn language_model<B: Backend>(&self, device: &B::Device) -> Result<DecoderLm<B>> {
        if self.recipe.model.family != ModelFamily::Lm {
            bail!("{}: this run trained a translation model; use `translate`", self.run_dir.display());
        }
        load(lm_config(&self.recipe, self.tokenizer.vocab_size()).init::<B>(device), self, device)
    }
}

/// Translates token-id sentences (no specials). Beam 1 decodes batches greedily; a wider beam
/// decodes sentence by sentence, its beams as one batch. Outputs are in input order.
pub fn translate_ids<B: Backend>(model: &Seq2Seq<B>, sources: &[Vec<u32>], recipe: &Recipe, beam: BeamSettings, device: &B::Device) -> Vec<Vec<u32>> {
    let examples = capped(sources, recipe);
    if beam.beam <= 1 {
        let mut out = vec![Vec::new(); sources.len()];
        greedy_batches(model, &examples, recipe, device, |_, batch, hyps| {
            for (&i, hyp) in batch.iter().zip(hyps) {
                out[i] = hyp;
            }
        });
        out
    } else {
        let sources: Vec<&[u32]> = examples.iter().map(|e| e.src.as_slice()).collect();
        beam_translate(model, &sources, recipe, beam, device)
    }
}

/// The `n` best translations of each sentence (`n` ≤ the beam), best first, with the score the
/// beam ranks by ([`Seq2Seq::beam_search_n`]); at beam 1, the greedy translation (the same as
/// [`translate_ids`]) scored by one teacher-forced pass per batch ([`Seq2Seq::score_rows`]).
pub fn translate_n_best<B: Backend>(model: &Seq2Seq<B>, sources: &[Vec<u32>], recipe: &Recipe, beam: BeamSettings, n: usize, device: &B::Device) -> Vec<Vec<(Vec<u32>, f64)>> {
    let examples = capped(sources, recipe);
    if beam.beam <= 1 {
        let mut out = vec![Vec::new(); sources.len()];
        greedy_batches(model, &examples, recipe, device, |src, batch, hyps| {
            let scores = model.score_rows(src, &hyps, beam.len_penalty);
            for ((&i, hyp), score) in batch.iter().zip(hyps).zip(scores) {
                out[i] = vec![(hyp, score)];
            }
        });
        out
    } else {
        let sources: Vec<&[u32]> = examples.iter().map(|e| e.src.as_slice()).collect();
        beam_translate_n(model, &sources, recipe, beam, n, device)
    }
}

/// Sources cut to `data.max_len` tokens, as training saw them.
fn capped(sources: &[Vec<u32>], recipe: &Recipe) -> Vec<Example> {
    let cap = recipe.data.max_len;
    sources.iter().map(|s| Example { src: s[..s.len().min(cap)].to_vec(), tgt: Vec::new() }).collect()
}

/// Greedy decoding in length-sorted batches under the recipe's evaluation budget; `done` gets
/// each batch's source tensor, its example indices and their hypotheses (cut at `</s>`).
fn greedy_batches<B: Backend>(model: &Seq2Seq<B>, examples: &[Example], recipe: &Recipe, device: &B::Device, mut done: impl FnMut(burn::tensor::Tensor<B, 2, burn::tensor::Int>, &[usize], Vec<Vec<u32>>)) {
    let lengths: Vec<(usize, usize)> = examples.iter().map(|e| (e.src.len() + 1, 1)).collect();
    let settings = crate::family::batch_settings(recipe, crate::family::Batches::Eval);
    for batch in plan_batches(&lengths, settings, None) {
        let b = HostBatch::build(examples, &batch);
        let max_lens: Vec<usize> = batch.iter().map(|&i| max_len_for(recipe, examples[i].src.len() + 1)).collect();
        let src = ids(&b.src, b.size, b.src_len, device);
        let tokens = model.greedy_rows(src.clone(), &max_lens, 8);
        let cols = tokens.dims()[1];
        let flat: Vec<i64> = tokens.into_data().iter::<i64>().collect();
        // A row ends at its `</s>`, or where it reached its own limit and only pads follow.
        let hyps = (0..batch.len()).map(|row| flat[row * cols..(row + 1) * cols].iter().map(|&t| t as u32).take_while(|&t| t != EOS && t != PAD).collect()).collect();
        done(src, &batch, hyps);
    }
}

/// Translates lines of text.
pub fn translate_lines<B: Backend>(run: &RunModel, lines: &[String], beam: BeamSettings, device: &B::Device) -> Result<Vec<String>> {
    let model = run.translation_model::<B>(device)?;
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let sources = run.tokenizer.encode_batch(&refs).map_err(|e| anyhow!("{e}"))?;
    let hyps = translate_ids(&model, &sources, &run.recipe, beam, device);
    // An empty line stays empty (the model would otherwise invent a sentence for it).
    Ok(hyps.iter().zip(lines).map(|(h, line)| if line.trim().is_empty() { String::new() } else { run.tokenizer.decode(h) }).collect())
}

/// The `n` best translations of each line with their scores (an empty line: one empty
/// translation scored 0).
pub fn translate_lines_n_best<B: Backend>(run: &RunModel, lines: &[String], beam: BeamSettings, n: usize, device: &B::Device) -> Result<Vec<Vec<(String, f64)>>> {
    Loaded { run, model: run.translation_model::<B>(device)?, device: device.clone() }.translate(lines, beam, n)
}

/// A translation model loaded once on its device, for a server's requests: `translate` answers
/// as [`translate_lines_n_best`] does, without loading the model again.
pub trait Translate {
    /// The `n` best translations of each line (`n` ≤ the beam) with their scores.
    fn translate(&self, lines: &[String], beam: BeamSettings, n: usize) -> Result<Vec<Vec<(String, f64)>>>;
    /// The device it decodes on, as its backend names it.
    fn device(&self) -> String;
}

struct Loaded<'a, B: Backend> {
    run: &'a RunModel,
    model: Seq2Seq<B>,
    device: B::Device,
}

impl<B: Backend> Translate for Loaded<'_, B> {
    fn translate(&self, lines: &[String], beam: BeamSettings, n: usize) -> Result<Vec<Vec<(String, f64)>>> {
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let sources = self.run.tokenizer.encode_batch(&refs).map_err(|e| anyhow!("{e}"))?;
        let hyps = translate_n_best(&self.model, &sources, &self.run.recipe, beam, n, &self.device);
        let decode = |h: Vec<(Vec<u32>, f64)>| h.into_iter().map(|(t, s)| (self.run.tokenizer.decode(&t), s)).collect();
        Ok(hyps.into_iter().zip(lines).map(|(h, line)| if line.trim().is_empty() { vec![(String::new(), 0.0)] } else { decode(h) }).collect())
    }

    fn device(&self) -> String {
        format!("{:?}", self.device)
    }
}

/// Loads the run's translation model on `device` and hands it to `serve`, on this thread (the
/// run's precision is in force here).
pub fn with_translator<B: Backend>(run: &RunModel, serve: impl FnOnce(&dyn Translate) -> Result<()>, device: &B::Device) -> Result<()> {
    let model = run.translation_model::<B>(device)?;
    serve(&Loaded { run, model, device: device.clone() })
}

/// Continues `prompt` with the run's language model; returns the generated text (lines broken at
/// `</s>`, as the training text was), to be printed right after the prompt: the first line is
/// decoded together with the prompt and the prompt's own decoding cut off, so that whatever the
/// tokenizer does at a word's start (Metaspace's "▁" becomes a space; characters and bytes add
/// nothing) comes out as it would inside a text. `keep_going` is asked before each token.
pub fn generate_text<B: Backend>(run: &RunModel, prompt: &str, sampling: Sampling, keep_going: &(dyn Fn() -> bool + Sync), device: &B::Device) -> Result<String> {
    let lm = run.language_model::<B>(device)?;
    let prompt_ids = if prompt.is_empty() { Vec::new() } else { run.tokenizer.encode_batch(&[prompt]).map_err(|e| anyhow!("{e}"))?.remove(0) };
    // An empty prompt starts a new line.
    let ids = if prompt_ids.is_empty() { vec![EOS] } else { prompt_ids.clone() };
    let out = kiln_model::sampling::generate_while(&lm, &ids, &sampling, true, device, keep_going);
    let mut segments = out.split(|&t| t == EOS);
    let first = segments.next().unwrap_or(&[]);
    let head = if prompt_ids.is_empty() {
        run.tokenizer.decode(first)
    } else {
        let before = run.tokenizer.decode(&prompt_ids);
        let whole = run.tokenizer.decode(&[prompt_ids.as_slice(), first].concat());
        match whole.strip_prefix(before.as_str()) {
            Some(rest) => rest.to_string(),
            None => format!(" {}", run.tokenizer.decode(first)),
        }
    };
    let lines: Vec<String> = std::iter::once(head).chain(segments.map(|line| run.tokenizer.decode(line))).collect();
    Ok(lines.join("\n"))
}

/// The figures `eval` prints and writes to `eval-<split>.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub split: String,
    pub checkpoint: String,
    pub step: usize,
    /// Sentence pairs, or tokens of text: `size` of `unit`.
    pub size: usize,
    pub unit: String,
    pub loss: f64,
    pub ppl: f64,
    pub beam: usize,
    pub len_penalty: f64,
    /// `ema` (a moving average of the weights: `ema.mpk`, or an average of them) or `model`
    /// (the raw weights, or an average of them).
    pub weights: String,
    /// sacreBLEU-equal corpus BLEU and chrF of the decoded split (translation runs).
    pub bleu: Option<f64>,
    pub chrf: Option<f64>,
    /// Language models: the loss per character of the split's text (nats).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_per_char: Option<f64>,
}

/// Evaluates a run's checkpoint on its validation or test split (prepared through the dataset
/// cache with the run's own tokenizer).
pub fn evaluate_run<B: Backend>(run: &RunModel, split: Split, beam: BeamSettings, device: &B::Device) -> Result<EvalReport> {
    let tokenizer_path = run.run_dir.join("tokenizer.json");
    let cache_dir = Some(run.recipe.loader.cache_dir.as_path()).filter(|p| !p.as_os_str().is_empty());
    let data = kiln_data::prepare(&run.recipe, TokenizerSource::Load(&tokenizer_path), cache_dir, &|_| {}).map_err(|e| anyhow!("{e}"))?;
    let name = match split {
        Split::Valid => "valid",
        Split::Test => "test",
    };
    let mut report = EvalReport {
        split: name.into(),
        checkpoint: run.checkpoint.display().to_string(),
        step: run.step,
        size: 0,
        unit: String::new(),
        loss: f64::NAN,
        ppl: f64::NAN,
        beam: beam.beam,
        len_penalty: beam.len_penalty,
        weights: if run.decodes_moving_average() { "ema" } else { "model" }.to_string(),
        loss_per_char: None,
        bleu: None,
        chrf: None,
    };
    crate::registry::dispatch(run.recipe.model.family, EvaluateCheckpoint::<B> { run, data: &data, split, beam, device, report: &mut report })?;
    let path = run.run_dir.join(format!("eval-{name}.json"));
    kiln_events::write_atomic(&path, serde_json::to_string_pretty(&report).expect("serialises").as_bytes()).map_err(|m| anyhow!(m))?;
    Ok(report)
}

/// `kiln eval` of one family: fills the report's size, loss, perplexity and (translation) the
/// decoded split's BLEU and chrF.
struct EvaluateCheckpoint<'a, B: Backend> {
    run: &'a RunModel,
    data: &'a kiln_data::Prepared,
    split: Split,
    beam: BeamSettings,
    device: &'a B::Device,
    report: &'a mut EvalReport,
}

impl<B: Backend> crate::registry::UseFamily for EvaluateCheckpoint<'_, B> {
    type Output = Result<()>;

    fn with<F: crate::registry::Family>(self) -> Result<()> {
        F::evaluate_checkpoint::<B>(self.run, self.data, self.split, self.beam, self.device, self.report)
    }
}

/// [`crate::registry::Family::evaluate_checkpoint`] of the language model.
pub(crate) fn evaluate_lm_checkpoint<B: Backend>(run: &RunModel, data: &kiln_data::Prepared, split: Split, device: &B::Device, report: &mut EvalReport) -> Result<()> {
    let lm = run.language_model::<B>(device)?;
    let text = data.text.as_ref().ok_or_else(|| anyhow!("{}: no text corpus", run.run_dir.display()))?;
    let (stream, chars) = if split == Split::Valid { (text.valid.ids(), text.valid_chars) } else { (text.test.ids(), text.test_chars) };
    if stream.len() < 2 {
        bail!("{}: the run's data has no {} split", run.run_dir.display(), report.split);
    }
    let r = evaluate_lm(&lm, stream, chars, &run.recipe, device);
    (report.size, report.unit, report.loss, report.ppl) = (stream.len(), "tokens".into(), r.loss, r.ppl);
    report.loss_per_char = r.metrics.get(crate::family::LOSS_PER_CHAR).copied();
    Ok(())
}

/// [`crate::registry::Family::evaluate_checkpoint`] of the translation model.
pub(crate) fn evaluate_translation_checkpoint<B: Backend>(run: &RunModel, data: &kiln_data::Prepared, split: Split, beam: BeamSettings, device: &B::Device, report: &mut EvalReport) -> Result<()> {
    let model = run.translation_model::<B>(device)?;
    let set = if split == Split::Valid { &data.valid } else { &data.test };
    if set.examples.is_empty() {
        bail!("{}: the run's data has no {} split", run.run_dir.display(), report.split);
    }
    let mut loss_only = run.recipe.clone();
    loss_only.eval.bleu = false;
    let r = evaluate(&model, set, &data.tokenizer, &loss_only, device);
    let sources: Vec<Vec<u32>> = set.examples.iter().map(|e| e.src.clone()).collect();
    let hyps = translate_ids(&model, &sources, &run.recipe, beam, device);
    let (mut bleu, mut chrf) = (BleuStats::default(), ChrfStats::default());
    for (h, reference) in hyps.iter().zip(&set.references) {
        let text = data.tokenizer.decode(h);
        bleu.add(&text, reference);
        chrf.add(&text, reference);
    }
    (report.size, report.unit, report.loss, report.ppl) = (set.examples.len(), "pairs".into(), r.loss, r.ppl);
    report.bleu = Some(bleu.score());
    report.chrf = Some(chrf.score());
    Ok(())
}
