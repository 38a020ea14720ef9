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
