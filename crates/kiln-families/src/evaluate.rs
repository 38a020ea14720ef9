//! Validation and test evaluation: mean per-token NLL and perplexity over the whole set (one
//! device read at the end), and corpus BLEU of greedy translations (one read per decoded batch)
//! or, with `eval.beam` > 1, of beam search sentence by sentence.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_data::batching::plan_batches;
use kiln_data::{EvalSet, Example, HostBatch, SubwordTokenizer, PAD};
use kiln_metrics::{BleuStats, ChrfStats};
use kiln_model::seq2seq::BeamSettings;
use kiln_model::{label_smoothed_loss, Seq2Seq};
use kiln_recipe::Recipe;

pub use kiln_events::EvalFigures;
use kiln_events::Sample;

pub fn ids<B: Backend>(data: &[i32], rows: usize, cols: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(data.to_vec(), [rows, cols]), device)
}

pub fn flat<B: Backend>(data: &[i32], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(data.to_vec(), [data.len()]), device)
}

fn eval_batches(set: &EvalSet, recipe: &Recipe, subset: usize) -> Vec<Vec<usize>> {
    let lengths: Vec<(usize, usize)> = set.examples[..subset].iter().map(|e| (e.src.len() + 1, e.tgt.len() + 1)).collect();
    let settings = crate::family::batch_settings(recipe, crate::family::Batches::Eval);
    plan_batches(&lengths, settings, None)
}

/// Longest hypothesis for a source of `src_len` tokens (with `</s>`): `a × len + b`, capped by the
/// model's positions.
pub fn max_len_for(recipe: &Recipe, src_len: usize) -> usize {
    // `as` saturates a huge product at usize::MAX; the sum saturates too: both end at the cap.
    ((recipe.eval.max_len_a * src_len as f64) as usize).saturating_add(recipe.eval.max_len_b).min(recipe.model.max_positions.saturating_sub(1)).max(1)
}

/// The beam of the recipe's own decodes (`eval.beam`, `eval.len_penalty`); each sentence's
/// limit comes from `eval.max_len_a` / `max_len_b`.
pub fn beam_settings(recipe: &Recipe) -> BeamSettings {
    BeamSettings { beam: recipe.eval.beam, max_len: 0, len_penalty: recipe.eval.len_penalty }
}

/// Beam search, sentence by sentence (its beams are the batch), each with its own length limit.
/// `sources` are token ids without specials, at most `data.max_len` long.
pub fn beam_translate<B: Backend>(model: &Seq2Seq<B>, sources: &[&[u32]], recipe: &Recipe, beam: BeamSettings, device: &B::Device) -> Vec<Vec<u32>> {
    beam_translate_n(model, sources, recipe, beam, 1, device).into_iter().map(|h| h.into_iter().next().map(|(t, _)| t).unwrap_or_default()).collect()
}

/// [`beam_translate`]'s `n` best of each sentence with their scores ([`Seq2Seq::beam_search_n`]).
pub fn beam_translate_n<B: Backend>(model: &Seq2Seq<B>, sources: &[&[u32]], recipe: &Recipe, beam: BeamSettings, n: usize, device: &B::Device) -> Vec<Vec<(Vec<u32>, f64)>> {
    sources
        .iter()
        .map(|src| {
            let b = HostBatch::build(&[Example { src: src.to_vec(), tgt: Vec::new() }][..], &[0]);
            let settings = BeamSettings { max_len: max_len_for(recipe, src.len() + 1), ..beam };
            model.beam_search_n(ids(&b.src, 1, b.src_len, device), settings, true, n)
        })
        .collect()
}

pub fn evaluate<B: Backend>(model: &Seq2Seq<B>, set: &EvalSet, tokenizer: &SubwordTokenizer, recipe: &Recipe, device: &B::Device) -> EvalFigures {
    let mut nll: Option<Tensor<B, 1>> = None;
    let mut tokens = 0usize;
    for batch in eval_batches(set, recipe, set.examples.len()) {
        let b = HostBatch::build(&set.examples, &batch);
        let logits = model.forward_rows(ids(&b.src, b.size, b.src_len, device), ids(&b.tgt_in, b.size, b.tgt_len, device), flat(&b.label_rows, device));
        let sums = label_smoothed_loss(logits, flat(&b.labels, device), PAD, 0.0);
        nll = Some(match nll {
            Some(acc) => acc + sums.nll,
            None => sums.nll,
        });
        tokens += b.target_tokens;
    }
    let loss = match nll {
        Some(t) => {
            t.into_data().iter::<f64>().next().unwrap_or(f64::NAN) / tokens.max(1) as f64
        }
        None => f64::NAN,
    };
    let mut samples = Vec::new();
    let bleu = if recipe.eval.bleu && !set.examples.is_empty() {
        let n = if recipe.eval.bleu_sentences == 0 { set.examples.len() } else { recipe.eval.bleu_sentences.min(set.examples.len()) };
        let (mut stats, mut chrf) = (BleuStats::default(), ChrfStats::default());
        if recipe.eval.beam > 1 {
            let sources: Vec<&[u32]> = set.examples[..n].iter().map(|e| e.src.as_slice()).collect();
            let mut samples = Vec::new();
            for (i, (hyp, reference)) in beam_translate(model, &sources, recipe, beam_settings(recipe), device).iter().zip(&set.references).enumerate() {
                let text = tokenizer.decode(hyp);
                stats.add(&text, reference);
                chrf.add(&text, reference);
                if i < recipe.eval.samples {
                    samples.push(sample(set, i, text).1);
                }
            }
            return EvalFigures { loss, ppl: loss.exp(), bleu: Some(stats.score()), metrics: [("chrf".to_string(), chrf.score())].into(), samples };
        }
        for batch in eval_batches(set, recipe, n) {
            let b = HostBatch::build(&set.examples, &batch);
            // Each sentence's own limit, so its translation does not depend on its batch.
            let max_lens: Vec<usize> = batch.iter().map(|&i| max_len_for(recipe, set.examples[i].src.len() + 1)).collect();
            let out = model.greedy_rows(ids(&b.src, b.size, b.src_len, device), &max_lens, 8);
            let cols = out.dims()[1];
            let flat: Vec<i64> = out.into_data().iter::<i64>().collect();
            for (row, &i) in batch.iter().enumerate() {
                let hyp: Vec<u32> = flat[row * cols..(row + 1) * cols].iter().map(|&t| t as u32).collect();
                let text = tokenizer.decode(&hyp);
                stats.add(&text, &set.references[i]);
                chrf.add(&text, &set.references[i]);
                if i < recipe.eval.samples {
                    samples.push(sample(set, i, text));
                }
            }
        }
        // Batches are planned by length: the samples back in the set's order.
        samples.sort_by_key(|s| s.0);

        Some((stats.score(), chrf.score()))
    } else {
        None
    };
    // chrF (character 6-grams, β 2) next to BLEU: kinder to short sentences and small models.
    let metrics = bleu.map(|(_, chrf)| [("chrf".to_string(), chrf)].into()).unwrap_or_default();
    let samples = samples.into_iter().map(|(_, s)| s).collect();
    EvalFigures { loss, ppl: loss.exp(), bleu: bleu.map(|(b, _)| b), metrics, samples }
}

/// Sentence `i` of `set` and its translation.
fn sample(set: &EvalSet, i: usize, hypothesis: String) -> (usize, Sample) {
    let text = |v: &[String]| v.get(i).cloned().unwrap_or_default();
    (i, Sample { source: text(&set.sources), reference: text(&set.references), hypothesis })
}
