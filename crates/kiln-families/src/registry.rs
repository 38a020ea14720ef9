//! The registry of built-in model families: the one place that maps `model.family` to the code
//! of a family. Training (`launch`), `kiln eval` and the benchmarks (through `launch`) reach a
//! family only through [`dispatch`]; adding a family is one [`Family`] impl and one arm here
//! (plus its recipe key in `kiln-recipe`).
//!
//! A family's work is generic over the backend, so the registry hands the family to the caller
//! as a type ([`UseFamily::with`]) rather than as a value.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use kiln_data::{Example, HostBatch, HostBlocks, Prepared};
use kiln_events::{EventSink, Summary};
use kiln_model::seq2seq::BeamSettings;
use kiln_recipe::ModelFamily;
use kiln_train::{autobatch, Split};

use crate::family::{lm_config, model_config, DeviceBatch, LmTask, PairData, TextData, TranslationTask};
use crate::infer::{EvalReport, RunModel};
use crate::{probe_token, FamilyRun};

/// What kiln asks of a built-in family.
pub trait Family {
    /// Trains the recipe's model of this family (the run's data is prepared already).
    fn fit<B: AutodiffBackend>(run: FamilyRun<'_, B>, sink: &mut (dyn EventSink + Send)) -> Result<Summary>;

    /// The family's model as a recipe builds it (fresh weights, to be loaded into).
    type Model<B: Backend>: burn::module::Module<B> + burn_store::ModuleSnapshot<B>;

    fn build<B: Backend>(recipe: &kiln_recipe::Recipe, vocab_size: usize, device: &B::Device) -> Self::Model<B>;

    /// `kiln eval`: a checkpoint's figures on a split, into `report`.
    fn evaluate_checkpoint<B: Backend>(run: &RunModel, data: &Prepared, split: Split, beam: BeamSettings, device: &B::Device, report: &mut EvalReport) -> Result<()>;
}

/// Something to do with a family, whichever the recipe names.
pub trait UseFamily {
    type Output;
    fn with<F: Family>(self) -> Self::Output;
}

/// The registry: `model.family` → its [`Family`].
pub fn dispatch<U: UseFamily>(family: ModelFamily, user: U) -> U::Output {
    match family {
        ModelFamily::Transformer => user.with::<Translation>(),
        ModelFamily::Lm => user.with::<LanguageModel>(),
    }
}

/// `model.family = "transformer"`: an encoder-decoder translating sentence pairs.
pub struct Translation;

impl Family for Translation {
    type Model<B: Backend> = kiln_model::Seq2Seq<B>;

    fn build<B: Backend>(recipe: &kiln_recipe::Recipe, vocab_size: usize, device: &B::Device) -> Self::Model<B> {
        model_config(recipe, vocab_size).init::<B>(device)
    }

    fn fit<B: AutodiffBackend>(run: FamilyRun<'_, B>, sink: &mut (dyn EventSink + Send)) -> Result<Summary> {
        let (data, recipe) = (Arc::clone(&run.data), run.recipe().clone());
        let vocab = data.tokenizer.vocab_size();
        if recipe.eval.beam > vocab {
            anyhow::bail!("eval.beam: expected at most the vocabulary's {vocab} tokens (a beam holds distinct tokens), got {}", recipe.eval.beam);
        }
        run.check_model_fits(vocab)?;
        let model = run.initial_model::<Self>(vocab)?;
        let lengths = autobatch::length_ranges(recipe.data.max_len + 2);
        let probe_batch = |len: usize, n: usize, device: &B::Device| {
            // Source and target both at the range's top (the lengths count the added `</s>`).
            let examples: Vec<Example> =
                (0..n).map(|k| Example { src: (0..len - 1).map(|i| probe_token(vocab, k * len + i)).collect(), tgt: (0..len - 1).map(|i| probe_token(vocab, k * len + i + 7)).collect() }).collect();
            DeviceBatch::<B>::new(HostBatch::build(&examples, &(0..n).collect::<Vec<_>>()), device)
        };
        let data_for = |r: &kiln_recipe::Recipe| {
            let pairs = PairData::new(&data, r).map_err(|e| anyhow!("{e}"))?;
            let notes: Vec<String> = [pairs.mix_note(&data), pairs.regularisation_note()].into_iter().flatten().collect();
            Ok((pairs, (!notes.is_empty()).then(|| notes.join("; "))))
        };
        run.fit(|r| TranslationTask::new(Arc::clone(&data), r.clone()), model, &lengths, &probe_batch, data_for, sink)
    }

    fn evaluate_checkpoint<B: Backend>(run: &RunModel, data: &Prepared, split: Split, beam: BeamSettings, device: &B::Device, report: &mut EvalReport) -> Result<()> {
        crate::infer::evaluate_translation_checkpoint::<B>(run, data, split, beam, device, report)
    }
}

/// `model.family = "lm"`: a decoder-only language model on text blocks.
pub struct LanguageModel;

impl Family for LanguageModel {
    type Model<B: Backend> = kiln_model::DecoderLm<B>;

    fn build<B: Backend>(recipe: &kiln_recipe::Recipe, vocab_size: usize, device: &B::Device) -> Self::Model<B> {
        lm_config(recipe, vocab_size).init::<B>(device)
    }

    fn fit<B: AutodiffBackend>(run: FamilyRun<'_, B>, sink: &mut (dyn EventSink + Send)) -> Result<Summary> {
        let (data, recipe) = (Arc::clone(&run.data), run.recipe().clone());
        let vocab = data.tokenizer.vocab_size();
        run.check_model_fits(vocab)?;
        let model = run.initial_model::<Self>(vocab)?;
        let probe_batch = |len: usize, n: usize, device: &B::Device| {
            let stream: Vec<u32> = (0..n * len + 1).map(|i| probe_token(vocab, i)).collect();
            let starts: Vec<usize> = (0..n).map(|k| k * len).collect();
            DeviceBatch::<B>::blocks(HostBlocks::build(kiln_data::Ids::U32(&stream), &starts, len), device)
        };
        run.fit(|r| LmTask::new(Arc::clone(&data), r.clone()), model, &[recipe.data.block_size], &probe_batch, |r| Ok((TextData::new(&data, r), None)), sink)
    }

    fn evaluate_checkpoint<B: Backend>(run: &RunModel, data: &Prepared, split: Split, _beam: BeamSettings, device: &B::Device, report: &mut EvalReport) -> Result<()> {
        crate::infer::evaluate_lm_checkpoint::<B>(run, data, split, device, report)
    }
}
