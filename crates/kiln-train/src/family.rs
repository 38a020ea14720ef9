//! Model families as the training loop sees them. The loop needs three things of a model: the
//! logits of a batch's labelled positions (the loss is the same label-smoothed cross-entropy for
//! every family), an evaluation on the validation or test split, and being a Burn module it can
//! optimise and save. Adding a family is one model module plus an impl of [`TrainModel`] here.

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use kiln_data::text::{blocks_per_batch, eval_blocks, HostBlocks};
use kiln_data::{HostBatch, Prepared, PAD};
use kiln_model::{label_smoothed_loss, DecoderLm, Seq2Seq};
use kiln_recipe::Recipe;

use crate::evaluate::{evaluate, flat, ids, EvalResult};

/// Which held-out split to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Valid,
    Test,
}

/// Host-side counts of a batch: the loop's token and padding statistics need no device read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchStats {
    /// Rows (sentences or blocks).
    pub size: usize,
    /// Labels that count in the loss.
    pub target_tokens: usize,
    /// Real tokens and the slots holding them, both sides: padding % = 1 − real / slots.
    pub real_tokens: usize,
    pub slots: usize,
}

/// A batch as the loader workers leave it: tensors already on the device.
#[derive(Clone)]
pub struct DeviceBatch<B: Backend> {
    pub stats: BatchStats,
    /// Encoder input (sentence pairs only).
    pub src: Option<Tensor<B, 2, Int>>,
    /// Decoder input: `<s>` + target, or a block of text.
    pub input: Tensor<B, 2, Int>,
    /// Flat positions with a label, and those labels.
    pub label_rows: Tensor<B, 1, Int>,
    pub labels: Tensor<B, 1, Int>,
}

impl<B: Backend> DeviceBatch<B> {
    /// A padded batch of sentence pairs.
    pub fn new(host: HostBatch, device: &B::Device) -> Self {
        Self {
            stats: BatchStats { size: host.size, target_tokens: host.target_tokens, real_tokens: host.real_tokens, slots: host.slots },
            src: Some(ids(&host.src, host.size, host.src_len, device)),
            input: ids(&host.tgt_in, host.size, host.tgt_len, device),
            label_rows: flat(&host.label_rows, device),
            labels: flat(&host.labels, device),
        }
    }

    /// The batch on another device (a data-parallel replica's).
    pub fn to_device(self, device: &B::Device) -> Self {
        Self {
            stats: self.stats,
            src: self.src.map(|t| t.to_device(device)),
            input: self.input.to_device(device),
            label_rows: self.label_rows.to_device(device),
            labels: self.labels.to_device(device),
        }
    }

    /// The batch cut by rows into at most `parts` parts of (nearly) equal rows, each with the
    /// first row it starts at. Every part keeps the whole batch's padded lengths, so a part's
    /// tensors are rows of the whole batch's and its dropout masks those rows of the whole's
    /// (`kiln_model::dropout::MaskState::at_row`). A part's `stats` count its own rows and labels;
    /// its token and slot counts are the whole batch's (the loop counts whole batches). Reads the
    /// labels' positions on the host: meant for host devices, where that is a copy.
    pub fn split_rows(&self, parts: usize) -> Vec<(usize, DeviceBatch<B>)> {
        let [rows, len] = self.input.dims();
        let parts = parts.clamp(1, rows.max(1));
        if parts == 1 {
            return vec![(0, self.clone())];
        }
        let device = self.input.device();
        let positions: Vec<i64> = self.label_rows.to_data().iter::<i64>().collect();
        let labels: Vec<i64> = self.labels.to_data().iter::<i64>().collect();
        (0..parts)
            .map(|p| {
                let (first, end) = (p * rows / parts, (p + 1) * rows / parts);
                let (lo, hi) = ((first * len) as i64, (end * len) as i64);
                let (mine, my_labels): (Vec<i32>, Vec<i32>) =
                    positions.iter().zip(&labels).filter(|(&at, _)| (lo..hi).contains(&at)).map(|(&at, &label)| ((at - lo) as i32, label as i32)).unzip();
                let stats = BatchStats { size: end - first, target_tokens: mine.len(), ..self.stats };
                let part = DeviceBatch {
                    stats,
                    src: self.src.as_ref().map(|src| src.clone().slice([first..end, 0..src.dims()[1]])),
                    input: self.input.clone().slice([first..end, 0..len]),
                    label_rows: flat(&mine, &device),
                    labels: flat(&my_labels, &device),
                };
                (first, part)
            })
            .collect()
    }

    /// A batch of text blocks.
    pub fn blocks(host: HostBlocks, device: &B::Device) -> Self {
        let (rows, labels): (Vec<i32>, Vec<i32>) = host.labels.iter().enumerate().filter(|(_, &t)| t != PAD as i32).map(|(i, &t)| (i as i32, t)).unzip();
        Self {
            stats: BatchStats { size: host.size, target_tokens: host.tokens, real_tokens: host.tokens, slots: host.size * host.len },
            src: None,
            input: ids(&host.input, host.size, host.len, device),
            label_rows: flat(&rows, device),
            labels: flat(&labels, device),
        }
    }
}

/// What the training loop asks of a model.
pub trait TrainModel<B: AutodiffBackend>: AutodiffModule<B> + Clone + Send + 'static {
    /// Logits `[labelled positions, vocab]` of a batch, in the order of `batch.labels`.
    fn logits(&self, batch: &DeviceBatch<B>) -> Tensor<B, 2>;
    /// Loss, perplexity and (for translation) BLEU on a held-out split, without dropout.
    fn evaluate(&self, data: &Prepared, split: Split, recipe: &Recipe, device: &B::Device) -> EvalResult;
    /// Whether `data` holds this split (a test split is optional).
    fn has_split(data: &Prepared, split: Split) -> bool;
}

impl<B: AutodiffBackend> TrainModel<B> for Seq2Seq<B> {
    fn logits(&self, b: &DeviceBatch<B>) -> Tensor<B, 2> {
        let src = b.src.clone().expect("sentence-pair batches have a source");
        self.forward_rows(src, b.input.clone(), b.label_rows.clone())
    }

    fn evaluate(&self, data: &Prepared, split: Split, recipe: &Recipe, device: &B::Device) -> EvalResult {
        match split {
            Split::Valid => evaluate(&self.valid(), &data.valid, &data.tokenizer, recipe, device),
            Split::Test => {
                // `eval.bleu_sentences` only shortens the per-epoch validation; the test figure
                // is over the whole split.
                let mut whole = recipe.clone();
                whole.eval.bleu_sentences = 0;
                evaluate(&self.valid(), &data.test, &data.tokenizer, &whole, device)
            }
        }
    }

    fn has_split(data: &Prepared, split: Split) -> bool {
        match split {
            Split::Valid => !data.valid.examples.is_empty(),
            Split::Test => !data.test.examples.is_empty(),
        }
    }
}

impl<B: AutodiffBackend> TrainModel<B> for DecoderLm<B> {
    fn logits(&self, b: &DeviceBatch<B>) -> Tensor<B, 2> {
        self.forward_rows(b.input.clone(), b.label_rows.clone())
    }

    fn evaluate(&self, data: &Prepared, split: Split, recipe: &Recipe, device: &B::Device) -> EvalResult {
        let text = data.text.as_ref().expect("a language model trains on text");
        let stream = match split {
            Split::Valid => &text.valid,
            Split::Test => &text.test,
        };
        evaluate_lm(&self.valid(), stream, recipe, device)
    }

    fn has_split(data: &Prepared, split: Split) -> bool {
        data.text.as_ref().is_some_and(|t| match split {
            Split::Valid => t.valid.len() > 1,
            Split::Test => t.test.len() > 1,
        })
    }
}

/// Mean per-token NLL of a token stream, every next-token prediction counted once (consecutive
/// blocks from position 0); one device read at the end.
pub fn evaluate_lm<B: Backend>(lm: &DecoderLm<B>, stream: &[u32], recipe: &Recipe, device: &B::Device) -> EvalResult {
    let block = recipe.data.block_size;
    let settings = kiln_data::batching::BatchSettings { max_tokens: crate::autobatch::budget(&recipe.loader.max_tokens), max_sentences: recipe.loader.max_sentences, pool_batches: 0, multiple: 1 };
    let starts = eval_blocks(stream.len(), block);
    let mut nll: Option<Tensor<B, 1>> = None;
    let mut tokens = 0usize;
    for chunk in starts.chunks(blocks_per_batch(block, settings)) {
        let host = HostBlocks::build(stream, chunk, block);
        tokens += host.tokens;
        let b = DeviceBatch::<B>::blocks(host, device);
        let logits = lm.forward_rows(b.input, b.label_rows);
        let sums = label_smoothed_loss(logits, b.labels, PAD, 0.0);
        nll = Some(match nll {
            Some(acc) => acc + sums.nll,
            None => sums.nll,
        });
    }
    let loss = nll.map(|t| t.into_data().iter::<f64>().next().unwrap_or(f64::NAN) / tokens.max(1) as f64).unwrap_or(f64::NAN);
    EvalResult { loss, ppl: loss.exp(), bleu: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use kiln_data::{Example, BOS, EOS};
    use kiln_model::dropout::{mask_state, seed_step, set_mask_state};
    use kiln_model::Seq2SeqConfig;
    use kiln_recipe::ModelSection;

    type B = Autodiff<Flex>;

    fn logits(model: &Seq2Seq<B>, batch: &DeviceBatch<B>) -> Vec<f32> {
        model.logits(batch).into_data().to_vec().unwrap()
    }

    /// A batch cut by rows (`backend.cpu_split`): each part, run with the mask state at its first
    /// row, gives exactly its rows of the whole batch's logits — dropout (0.3) included, so the
    /// parts draw the whole batch's masks. Uneven parts (7 rows in 3), sentences of varied lengths.
    #[test]
    fn parts_of_a_batch_give_its_logits_with_its_dropout_masks() {
        let device = Default::default();
        let token = |k: usize, i: usize| 4 + ((i * 7 + k * 13) % 50) as u32;
        let examples: Vec<Example> = (0..7).map(|k| Example { src: (0..3 + k % 4).map(|i| token(k, i)).collect(), tgt: (0..2 + k % 3).map(|i| token(k + 1, i)).collect() }).collect();
        let host = HostBatch::build(&examples, &(0..7).collect::<Vec<_>>());
        let batch = DeviceBatch::<B>::new(host, &device);
        let model = ModelSection { d_model: 16, n_heads: 2, d_ff: 32, encoder_layers: 1, decoder_layers: 1, dropout: 0.3, max_positions: 32, ..Default::default() };
        let model = Seq2SeqConfig { vocab_size: 60, pad: PAD, bos: BOS, eos: EOS, model }.init::<B>(&device);
        seed_step(Some(11));
        let start = mask_state();
        let whole = logits(&model, &batch);
        let parts = batch.split_rows(3);
        assert_eq!(parts.iter().map(|(first, p)| (*first, p.stats.size)).collect::<Vec<_>>(), vec![(0, 2), (2, 2), (4, 3)]);
        assert_eq!(parts.iter().map(|(_, p)| p.stats.target_tokens).sum::<usize>(), batch.stats.target_tokens);
        let mut joined = Vec::new();
        for (first, part) in &parts {
            set_mask_state(start.at_row(*first));
            joined.extend(logits(&model, part));
        }
        assert_eq!(joined.len(), whole.len());
        let worst = joined.iter().zip(&whole).map(|(a, b)| (a - b).abs() / b.abs().max(1e-3)).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "parts' logits differ from the whole batch's by {worst}");
        // The comparison can fail: the last part with the masks of rows 0.. instead.
        let (first, last) = &parts[2];
        set_mask_state(start);
        let wrong = logits(&model, last);
        let at = whole.len() - wrong.len();
        assert!(wrong.iter().zip(&whole[at..]).any(|(a, b)| (a - b).abs() > 1e-3), "masks of rows {first}.. needed");
        seed_step(None);
    }
}
