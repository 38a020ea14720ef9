//! The built-in families as ordinary users of the task API ([`kiln_train::task::Task`]): a
//! transformer translating sentence pairs ([`TranslationTask`]) and a decoder-only language model
//! on text blocks ([`LmTask`]), both on kiln's [`DeviceBatch`] and label-smoothed cross-entropy,
//! both fed by kiln's prepared corpora ([`PairData`], [`TextData`]).

use std::sync::Arc;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use kiln_data::batching::{plan_batches_by, BatchSettings};
use kiln_data::loader::{pair_jobs, Job};
use kiln_data::text::{blocks_per_batch, eval_blocks, plan_blocks, train_blocks, HostBlocks};
use kiln_data::{epoch_counts, mix_seed, BatchPlan, MixedEpoch, HostBatch, Ids, PairIds, PairSet, Prepared, Regulariser, Tokens, BOS, EOS, PAD};
use kiln_model::{label_smoothed_loss, DecoderLm, LmConfig, Seq2Seq, Seq2SeqConfig};
use kiln_recipe::Recipe;

use kiln_train::checkpoint::Architecture;
use kiln_train::data::TrainData;
use crate::evaluate::{evaluate, flat, ids, EvalFigures};
pub use kiln_train::task::{BatchStats, Split};
use kiln_train::task::{Task, TaskBatch, TaskInfo, TaskOutput};

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

pub fn model_config(recipe: &Recipe, vocab_size: usize) -> Seq2SeqConfig {
    Seq2SeqConfig { vocab_size, pad: PAD, bos: BOS, eos: EOS, model: recipe.model.clone() }
}

pub fn lm_config(recipe: &Recipe, vocab_size: usize) -> LmConfig {
    LmConfig { vocab_size, model: recipe.model.clone() }
}

/// About how many numbers a built-in model holds (parameters plus its position tables), from
/// its recipe alone: counted in f64, so no size the schema accepts overflows. Used to refuse a
/// model that cannot fit before any of it is allocated.
pub fn model_size_estimate(recipe: &Recipe, vocab_size: usize) -> f64 {
    let m = &recipe.model;
    let (d, f, v, p) = (m.d_model as f64, m.d_ff as f64, vocab_size as f64, m.max_positions as f64);
    let attention = 4.0 * d * d + 4.0 * d;
    let feed_forward = 2.0 * d * f + d + f;
    let norm = 2.0 * d;
    let positions = match m.positions {
        kiln_recipe::Positions::Learned | kiln_recipe::Positions::Sinusoidal => p * d,
        kiln_recipe::Positions::Rotary => 2.0 * p * (d / m.n_heads as f64),
    };
    match m.family {
        kiln_recipe::ModelFamily::Transformer => {
            let encoder = m.encoder_layers as f64 * (attention + feed_forward + 2.0 * norm);
            let decoder = m.decoder_layers as f64 * (2.0 * attention + feed_forward + 3.0 * norm);
            let embeddings = v * d * if m.tie_embeddings { 1.0 } else { 3.0 } + v;
            encoder + decoder + embeddings + 2.0 * positions
        }
        kiln_recipe::ModelFamily::Lm => {
            let blocks = m.decoder_layers as f64 * (attention + feed_forward + 2.0 * norm);
            let embeddings = v * d * if m.tie_embeddings { 1.0 } else { 2.0 } + v;
            blocks + embeddings + positions
        }
    }
}

/// Refuses, in one line naming the model's keys, a model whose weights, gradients and AdamW
/// moments (four f32 copies, five with `train.ema_decay`'s average) alone exceed the device's
/// memory (`capacity` bytes).
pub fn check_model_fits(recipe: &Recipe, vocab_size: usize, capacity: u64, device: &str) -> anyhow::Result<()> {
    let numbers = model_size_estimate(recipe, vocab_size);
    let copies = if recipe.train.ema_decay > 0.0 { 5.0 } else { 4.0 };
    let bytes = numbers * copies * 4.0;
    if bytes <= capacity as f64 {
        return Ok(());
    }
    let m = &recipe.model;
    let gib = |b: f64| b / (1u64 << 30) as f64;
    anyhow::bail!(
        "model: d_model = {}, d_ff = {}, {} + {} layers, max_positions = {} and a vocabulary of {vocab_size} make about {numbers:.3e} numbers, {:.1} GiB with gradients and optimizer state: more than the {:.1} GiB {device} has",
        m.d_model,
        m.d_ff,
        m.encoder_layers,
        m.decoder_layers,
        m.max_positions,
        gib(bytes),
        gib(capacity as f64)
    )
}

impl<B: Backend> TaskBatch<B> for DeviceBatch<B> {
    fn stats(&self) -> BatchStats {
        self.stats
    }

    fn to_device(self, device: &B::Device) -> Self {
        DeviceBatch::to_device(self, device)
    }

    fn split_rows(&self, parts: usize) -> Vec<(usize, Self)> {
        DeviceBatch::split_rows(self, parts)
    }
}

/// What batches are cut for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batches {
    /// Training: length-sorted pools of `loader.bucket_pool` batches, `loader.batch_multiple` rows.
    Train,
    /// Evaluation and decoding: one length order (pools and multiples play no part).
    Eval,
}

/// The one place batch settings come from a recipe's `[loader]`.
pub fn batch_settings(recipe: &Recipe, batches: Batches) -> BatchSettings {
    let train = batches == Batches::Train;
    BatchSettings {
        max_tokens: kiln_train::autobatch::budget(&recipe.loader.max_tokens),
        max_sentences: recipe.loader.max_sentences,
        pool_batches: if train { recipe.loader.bucket_pool } else { 1 },
        multiple: if train { recipe.loader.batch_multiple } else { 1 },
    }
}

/// Batches of epoch `epoch` (0-based): a pure function of the data, the recipe and the epoch.
/// Lengths come from the data's index (a store's offsets), never from a copied list.
pub fn epoch_batches(train: &dyn PairIds, recipe: &Recipe, epoch: usize) -> BatchPlan {
    let lengths = |i: usize| {
        let (s, t) = train.pair_lengths(i);
        (s + 1, t + 1)
    };
    plan_batches_by(train.pair_count(), lengths, batch_settings(recipe, Batches::Train), Some(mix_seed(recipe.train.seed, 1, epoch as u64)))
}

/// Batches of block starts of epoch `epoch` over a training stream of `len` tokens: the blocks
/// are cut from an offset drawn from (seed, epoch), then shuffled.
pub fn epoch_blocks(len: usize, recipe: &Recipe, epoch: usize) -> Vec<Vec<usize>> {
    let block = recipe.data.block_size;
    let starts = train_blocks(len, block, mix_seed(recipe.train.seed, 4, epoch as u64));
    plan_blocks(starts, block, batch_settings(recipe, Batches::Train), Some(mix_seed(recipe.train.seed, 1, epoch as u64)))
}

/// Pairs of each training corpus (main first), and what every epoch draws from each.
fn mix_counts(data: &Prepared, recipe: &Recipe) -> (Vec<usize>, Vec<usize>) {
    let sizes: Vec<usize> = std::iter::once(data.train.len()).chain(data.mix.iter().map(|c| c.pairs.len())).collect();
    let weights: Vec<f64> = recipe.data.train.files().iter().map(|f| f.weight).collect();
    let counts = epoch_counts(&sizes, &weights, recipe.data.temperature);
    (sizes, counts)
}

/// Training pairs an epoch draws: the main corpus's, or what the mixture draws from every corpus.
pub fn epoch_pairs(data: &Prepared, recipe: &Recipe) -> usize {
    if recipe.data.train.is_mix() { mix_counts(data, recipe).1.iter().sum() } else { data.train.len() }
}

/// Sentence pairs in token-budget batches. Subword regularisation gives every epoch its own
/// segmentations of the training examples, drawn from (seed, epoch, example); without it every
/// epoch shares the prepared ids. Several corpora (`data.train` with weights or
/// `data.temperature`) are drawn into each epoch by `kiln_data::mix`.
pub struct PairData {
    examples: Arc<PairSet>,
    /// Further corpora, and the counts each epoch draws from every corpus (main first); `None`
    /// for one corpus at weight 1, which trains on its pairs as they are.
    mix: Option<(Vec<Arc<PairSet>>, Vec<usize>)>,
    regulariser: Option<Regulariser>,
    recipe: Recipe,
}

impl PairData {
    /// `recipe` as the run uses it (its `loader.max_tokens` probed already where it was "auto").
    pub fn new(data: &Prepared, recipe: &Recipe) -> Result<Self, kiln_data::DataError> {
        let regulariser = Regulariser::new(&data.tokenizer, &recipe.tokenizer)?;
        let mix = if recipe.data.train.is_mix() {
            let sets: Vec<Arc<PairSet>> = data.mix.iter().map(|c| Arc::new(c.pairs.clone())).collect();
            let (sizes, counts) = mix_counts(data, recipe);
            if sizes.iter().sum::<usize>() > u32::MAX as usize || counts.iter().sum::<usize>() > u32::MAX as usize {
                return Err(kiln_data::DataError::new("data.train", format!("{} pairs in all corpora, {} per epoch: kiln indexes at most {} pairs", sizes.iter().sum::<usize>(), counts.iter().sum::<usize>(), u32::MAX)));
            }
            Some((sets, counts))
        } else {
            None
        };
        Ok(Self { examples: Arc::new(data.train.clone()), mix, regulariser, recipe: recipe.clone() })
    }

    /// A line for the log when corpora are mixed: what each epoch draws from each.
    pub fn mix_note(&self, data: &Prepared) -> Option<String> {
        let (_, counts) = self.mix.as_ref()?;
        let files = self.recipe.data.train.files();
        let sizes = std::iter::once(data.train.len()).chain(data.mix.iter().map(|c| c.pairs.len()));
        let parts: Vec<String> = files
            .iter()
            .zip(sizes)
            .zip(counts)
            .map(|((f, n), c)| format!("{} {c} of {n}", f.path.file_name().map_or_else(|| f.path.display().to_string(), |x| x.to_string_lossy().into_owned())))
            .collect();
        let how = if self.recipe.data.temperature > 0.0 { format!("temperature {}", self.recipe.data.temperature) } else { "by weight".into() };
        Some(format!("{} corpora mixed {how}, pairs per epoch: {}", counts.len(), parts.join(", ")))
    }

    /// A line for the log when every epoch draws new segmentations.
    pub fn regularisation_note(&self) -> Option<String> {
        self.regulariser.as_ref()?;
        let t = &self.recipe.tokenizer;
        let how = if t.sample_alpha > 0.0 { format!("Unigram sampling, alpha {}", t.sample_alpha) } else { format!("BPE-dropout {}", t.bpe_dropout) };
        Some(format!("subword regularisation: {how}, new segmentations every epoch (training only)"))
    }

    fn epoch_examples(&self, epoch: usize) -> Arc<dyn PairIds> {
        let seed = mix_seed(self.recipe.train.seed, 3, epoch as u64);
        // Corpus 0 is the main one, resampled as it always was; the others with seeds of their own.
        let resampled = |set: &Arc<PairSet>, corpus: u64| -> Arc<dyn PairIds> {
            match &self.regulariser {
                None => Arc::clone(set) as Arc<dyn PairIds>,
                Some(r) => Arc::new(r.epoch(set, if corpus == 0 { seed } else { mix_seed(seed, 7, corpus) }, self.recipe.data.max_len)),
            }
        };
        match &self.mix {
            None => resampled(&self.examples, 0),
            Some((others, counts)) => {
                let sets: Vec<Arc<dyn PairIds>> = std::iter::once(&self.examples).chain(others).enumerate().map(|(i, s)| resampled(s, i as u64)).collect();
                Arc::new(MixedEpoch::draw(sets, counts, self.recipe.train.seed, epoch).expect("the corpora's sizes were checked when the data was made"))
            }
        }
    }
}

impl<B: Backend> TrainData<B> for PairData {
    type Batch = DeviceBatch<B>;

    fn batches(&self, epoch: usize) -> usize {
        epoch_batches(&*self.epoch_examples(epoch), &self.recipe, epoch).len()
    }

    fn epoch(&self, epoch: usize, device: &B::Device) -> Vec<Job<DeviceBatch<B>>> {
        let examples = self.epoch_examples(epoch);
        let plan = Arc::new(epoch_batches(&*examples, &self.recipe, epoch));
        // Loader workers pad batches and put their tensors on the device ahead of the loop.
        let device = device.clone();
        let build: Arc<kiln_data::loader::Build<DeviceBatch<B>>> = Arc::new(move |b| DeviceBatch::new(b, &device));
        pair_jobs(&examples, &plan, &build)
    }

    fn examples(&self) -> usize {
        self.mix.as_ref().map_or(self.examples.len(), |(_, counts)| counts.iter().sum())
    }
}

/// A token stream cut into blocks, in batches of blocks.
pub struct TextData {
    stream: Tokens,
    recipe: Recipe,
}

impl TextData {
    pub fn new(data: &Prepared, recipe: &Recipe) -> Self {
        Self { stream: data.text.as_ref().map(|t| t.train.clone()).unwrap_or_default(), recipe: recipe.clone() }
    }
}

impl<B: Backend> TrainData<B> for TextData {
    type Batch = DeviceBatch<B>;

    fn batches(&self, epoch: usize) -> usize {
        epoch_blocks(self.stream.len(), &self.recipe, epoch).len()
    }

    fn epoch(&self, epoch: usize, device: &B::Device) -> Vec<Job<DeviceBatch<B>>> {
        let block = self.recipe.data.block_size;
        epoch_blocks(self.stream.len(), &self.recipe, epoch)
            .into_iter()
            .map(|starts| {
                let (stream, device) = (self.stream.clone(), device.clone());
                Box::new(move || DeviceBatch::blocks(HostBlocks::build(stream.ids(), &starts, block), &device)) as Job<DeviceBatch<B>>
            })
            .collect()
    }

    fn examples(&self) -> usize {
        self.stream.len() / self.recipe.data.block_size.max(1)
    }
}

/// German→English and other sentence-pair translation: the label-smoothed loss of the target's
/// tokens; validation loss, perplexity and (with `eval.bleu`) BLEU of greedy translations.
pub struct TranslationTask {
    data: Arc<Prepared>,
    recipe: Recipe,
}

impl TranslationTask {
    pub fn new(data: Arc<Prepared>, recipe: Recipe) -> Self {
        Self { data, recipe }
    }
}

impl<B: AutodiffBackend> Task<B> for TranslationTask {
    type Model = Seq2Seq<B>;
    type Batch = DeviceBatch<B>;

    fn forward(&self, model: &Seq2Seq<B>, b: &DeviceBatch<B>) -> TaskOutput<B> {
        let src = b.src.clone().expect("sentence-pair batches have a source");
        let logits = model.forward_rows(src, b.input.clone(), b.label_rows.clone());
        TaskOutput::loss(label_smoothed_loss(logits, b.labels.clone(), PAD, self.recipe.train.label_smoothing).smoothed)
    }

    fn evaluate(&self, model: &Seq2Seq<B::InnerBackend>, split: Split, device: &B::Device) -> Option<EvalFigures> {
        match split {
            Split::Valid if !self.data.valid.examples.is_empty() => Some(evaluate(model, &self.data.valid, &self.data.tokenizer, &self.recipe, device)),
            Split::Test if !self.data.test.examples.is_empty() => {
                // `eval.bleu_sentences` only shortens the per-epoch validation; the test figure
                // is over the whole split.
                let mut whole = self.recipe.clone();
                whole.eval.bleu_sentences = 0;
                Some(evaluate(model, &self.data.test, &self.data.tokenizer, &whole, device))
            }
            _ => None,
        }
    }

    fn named_sets(&self) -> Vec<String> {
        self.data.dev.iter().map(|s| s.name.clone()).collect()
    }

    fn evaluate_named(&self, model: &Seq2Seq<B::InnerBackend>, name: &str, device: &B::Device) -> Option<EvalFigures> {
        let set = self.data.dev.iter().find(|s| s.name == name)?;
        Some(evaluate(model, &set.pairs, &self.data.tokenizer, &self.recipe, device))
    }

    fn info(&self) -> TaskInfo {
        let d = &self.data;
        TaskInfo { vocab_size: d.tokenizer.vocab_size(), train_examples: epoch_pairs(d, &self.recipe), valid_examples: d.valid.examples.len(), test_label: format!("{} pairs", d.test.examples.len()) }
    }

    fn architecture(&self) -> Option<Architecture> {
        Some(Architecture::new(&self.recipe.model, self.data.tokenizer.vocab_size()))
    }
}

/// A GPT-style language model on text blocks: next-token loss; validation loss and perplexity.
pub struct LmTask {
    data: Arc<Prepared>,
    recipe: Recipe,
}

impl LmTask {
    pub fn new(data: Arc<Prepared>, recipe: Recipe) -> Self {
        Self { data, recipe }
    }

    fn stream(&self, split: Split) -> Ids<'_> {
        match (&self.data.text, split) {
            (Some(t), Split::Valid) => t.valid.ids(),
            (Some(t), Split::Test) => t.test.ids(),
            (None, _) => Ids::U32(&[]),
        }
    }

    fn chars(&self, split: Split) -> u64 {
        match (&self.data.text, split) {
            (Some(t), Split::Valid) => t.valid_chars,
            (Some(t), Split::Test) => t.test_chars,
            (None, _) => 0,
        }
    }
}

impl<B: AutodiffBackend> Task<B> for LmTask {
    type Model = DecoderLm<B>;
    type Batch = DeviceBatch<B>;

    fn forward(&self, model: &DecoderLm<B>, b: &DeviceBatch<B>) -> TaskOutput<B> {
        let logits = model.forward_rows(b.input.clone(), b.label_rows.clone());
        TaskOutput::loss(label_smoothed_loss(logits, b.labels.clone(), PAD, self.recipe.train.label_smoothing).smoothed)
    }

    fn evaluate(&self, model: &DecoderLm<B::InnerBackend>, split: Split, device: &B::Device) -> Option<EvalFigures> {
        let stream = self.stream(split);
        (stream.len() > 1).then(|| evaluate_lm(model, stream, self.chars(split), &self.recipe, device))
    }

    fn named_sets(&self) -> Vec<String> {
        self.data.dev.iter().map(|s| s.name.clone()).collect()
    }

    fn evaluate_named(&self, model: &DecoderLm<B::InnerBackend>, name: &str, device: &B::Device) -> Option<EvalFigures> {
        let set = self.data.dev.iter().find(|s| s.name == name)?;
        Some(evaluate_lm(model, set.text.as_ref()?.ids(), set.chars, &self.recipe, device))
    }

    fn info(&self) -> TaskInfo {
        let block = self.recipe.data.block_size.max(1);
        let (train, valid) = self.data.text.as_ref().map_or((0, 0), |t| (t.train.len() / block, t.valid.len().div_ceil(block)));
        TaskInfo { vocab_size: self.data.tokenizer.vocab_size(), train_examples: train, valid_examples: valid, test_label: format!("{} tokens", self.stream(Split::Test).len()) }
    }

    fn architecture(&self) -> Option<Architecture> {
        Some(Architecture::new(&self.recipe.model, self.data.tokenizer.vocab_size()))
    }
}

/// Mean per-token NLL of a token stream, every next-token prediction counted once (consecutive
/// blocks from position 0); one device read at the end. With the text's character count
/// (`chars` > 0), also `loss_per_char`: the loss per token times tokens per character, which
/// compares runs whatever their tokenizer (a character tokenizer's is its loss per token).
pub fn evaluate_lm<B: Backend>(lm: &DecoderLm<B>, stream: Ids<'_>, chars: u64, recipe: &Recipe, device: &B::Device) -> EvalFigures {
    let block = recipe.data.block_size;
    let settings = batch_settings(recipe, Batches::Eval);
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
    let mut metrics = std::collections::BTreeMap::new();
    if chars > 0 {
        metrics.insert(LOSS_PER_CHAR.to_string(), loss_per_char(loss, stream.len(), chars));
    }
    kiln_train::task::figures(loss, metrics)
}

/// The validation metric of a text's loss per character (nats).
pub const LOSS_PER_CHAR: &str = "loss_per_char";

/// Loss per token × tokens per character.
pub fn loss_per_char(loss: f64, tokens: usize, chars: u64) -> f64 {
    loss * tokens as f64 / chars as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use kiln_model::dropout::{mask_state, seed_step, set_mask_state};
    use kiln_data::Example;
    use kiln_recipe::ModelSection;

    type B = Autodiff<Flex>;

    fn logits(model: &Seq2Seq<B>, batch: &DeviceBatch<B>) -> Vec<f32> {
        model.forward_rows(batch.src.clone().unwrap(), batch.input.clone(), batch.label_rows.clone()).into_data().to_vec().unwrap()
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
