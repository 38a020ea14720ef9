//! An ordinary burn-train 0.21 program — `SupervisedTraining`, a model with `TrainStep` /
//! `InferenceStep`, burn's `DataLoader`, `LossMetric` and `AccuracyMetric` — whose only kiln line
//! is its training strategy. It tells German from English sentences (the Ding pairs in
//! `assets/`) with a bag-of-bytes classifier, once with burn-train's default strategy and once
//! with kiln's [`SyncEveryN`], on the same data, and prints the device→host reads per epoch of
//! each: every `ItemLazy::sync()` the event processor makes is counted (the `Counted` wrapper
//! below is the measurement, not part of the program).
//!
//! ```sh
//! cargo run --release --example burn_train_strategy -- --run-dir runs/burn-train
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use burn::backend::{Autodiff, Flex};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::optim::AdamConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn_train::metric::{AccuracyMetric, LossMetric};
use burn_train::{ClassificationOutput, InferenceStep, ItemLazy, Learner, SupervisedTraining, TrainOutput, TrainStep, TrainingStrategy};
use kiln_train::strategy::{EventRenderer, SyncEveryN, WindowItem};

const MAX_BYTES: usize = 96;

#[derive(Module, Debug)]
struct BagOfBytes<B: Backend> {
    bytes: Embedding<B>,
    head: Linear<B>,
}

impl<B: Backend> BagOfBytes<B> {
    fn new(device: &B::Device) -> Self {
        Self { bytes: EmbeddingConfig::new(257, 32).init(device), head: LinearConfig::new(32, 2).init(device) }
    }

    fn forward(&self, batch: SentenceBatch<B>) -> ClassificationOutput<B> {
        let keep = batch.bytes.clone().greater_elem(0).float().unsqueeze_dim::<3>(2);
        let x = self.bytes.forward(batch.bytes) * keep.clone();
        let pooled = x.sum_dim(1).squeeze_dim::<2>(1) / keep.sum_dim(1).squeeze_dim::<2>(1).clamp_min(1.0);
        let output = self.head.forward(pooled);
        let loss = CrossEntropyLossConfig::new().init(&output.device()).forward(output.clone(), batch.languages.clone());
        ClassificationOutput { loss, output, targets: batch.languages }
    }
}

impl<B: AutodiffBackend> TrainStep for BagOfBytes<B> {
    type Input = SentenceBatch<B>;
    type Output = Counted<ClassificationOutput<B>>;

    fn step(&self, batch: SentenceBatch<B>) -> TrainOutput<Self::Output> {
        let item = self.forward(batch);
        TrainOutput::new(self, item.loss.backward(), Counted(item))
    }
}

impl<B: Backend> InferenceStep for BagOfBytes<B> {
    type Input = SentenceBatch<B>;
    type Output = Counted<ClassificationOutput<B>>;

    fn step(&self, batch: SentenceBatch<B>) -> Self::Output {
        Counted(self.forward(batch))
    }
}

/// The measurement: counts each read of a step's output (the event processor's sync).
static READS: AtomicUsize = AtomicUsize::new(0);

struct Counted<O>(O);

impl<O: ItemLazy> ItemLazy for Counted<O> {
    type ItemSync = O::ItemSync;

    fn sync(self) -> O::ItemSync {
        READS.fetch_add(1, Ordering::Relaxed);
        self.0.sync()
    }
}

impl<O: WindowItem> WindowItem for Counted<O> {
    fn merge(self, next: Self) -> Self {
        Counted(self.0.merge(next.0))
    }
}

#[derive(Clone, Debug)]
struct Sentence {
    bytes: Vec<u8>,
    language: i64,
}

#[derive(Clone, Debug)]
struct SentenceBatch<B: Backend> {
    bytes: Tensor<B, 2, Int>,
    languages: Tensor<B, 1, Int>,
}

#[derive(Clone)]
struct SentenceBatcher;

impl<B: Backend> Batcher<B, Sentence, SentenceBatch<B>> for SentenceBatcher {
    fn batch(&self, items: Vec<Sentence>, device: &B::Device) -> SentenceBatch<B> {
        let len = items.iter().map(|s| s.bytes.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![0i64; items.len() * len];
        for (r, s) in items.iter().enumerate() {
            for (i, b) in s.bytes.iter().enumerate() {
                ids[r * len + i] = *b as i64 + 1;
            }
        }
        SentenceBatch {
            bytes: Tensor::from_data(TensorData::new(ids, [items.len(), len]), device),
            languages: Tensor::from_data(TensorData::new(items.iter().map(|s| s.language).collect::<Vec<_>>(), [items.len()]), device),
        }
    }
}

fn sentences(corpus: &std::path::Path, pairs: usize) -> Result<(Vec<Sentence>, Vec<Sentence>)> {
    let text = std::fs::read_to_string(corpus).with_context(|| format!("{}: cannot read", corpus.display()))?;
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().take(if pairs > 0 { pairs } else { usize::MAX }).enumerate() {
        let Some((de, en)) = line.split_once('\t') else { continue };
        let split = if i % 10 == 0 { &mut valid } else { &mut train };
        for (text, language) in [(de, 0), (en, 1)] {
            let mut end = text.len().min(MAX_BYTES);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            split.push(Sentence { bytes: text.as_bytes()[..end].to_vec(), language });
        }
    }
    Ok((train, valid))
}

type B = Autodiff<Flex>;

/// One burn-train run; `kiln` chooses the strategy. Returns the reads it made.
fn train(dir: PathBuf, train: Vec<Sentence>, valid: Vec<Sentence>, epochs: usize, kiln: bool) -> usize {
    let device = Default::default();
    let loader_train = DataLoaderBuilder::<B, _, _>::new(SentenceBatcher).batch_size(64).shuffle(7).num_workers(2).build(InMemDataset::new(train));
    let loader_valid = DataLoaderBuilder::<Flex, _, _>::new(SentenceBatcher).batch_size(64).num_workers(2).build(InMemDataset::new(valid));
    let learner = Learner::new(BagOfBytes::<B>::new(&device), AdamConfig::new().init(), 5e-3);
    let mut training = SupervisedTraining::new(dir.clone(), loader_train, loader_valid).metrics((LossMetric::new(), AccuracyMetric::new())).num_epochs(epochs);
    if kiln {
        // The one kiln line: the loss read once every 10 steps.
        training = training.with_training_strategy(TrainingStrategy::Custom(Arc::new(SyncEveryN::new(device, 10))));
        // Optional: burn's metrics into kiln's `metrics.jsonl` (and `kiln watch`) and TensorBoard's
        // `tb/`, one row a window.
        std::fs::create_dir_all(&dir).expect("run directory");
        let files = kiln_views::RunFiles::open(&dir).expect("metrics.jsonl");
        let sinks = kiln_events::Fanout::new().with(files).with(kiln_tensorboard::TensorBoard::new(&dir));
        training = training.renderer(EventRenderer::new("burn-train", sinks));
    }
    let before = READS.load(Ordering::Relaxed);
    let _result = training.launch(learner);
    READS.load(Ordering::Relaxed) - before
}

fn main() {
    if let Err(e) = run() {
        eprintln!("burn_train_strategy: error: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> Result<()> {
    let (mut run_dir, mut corpus, mut epochs, mut pairs) = (None, PathBuf::from("assets/de-en.ding.tsv"), 1, 0);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--run-dir" => run_dir = Some(PathBuf::from(value)),
            "--corpus" => corpus = value.into(),
            "--epochs" => epochs = value.parse().context("--epochs")?,
            "--pairs" => pairs = value.parse().context("--pairs")?,
            other => bail!("unknown flag {other}; usage: burn_train_strategy --run-dir DIR [--corpus FILE.tsv] [--epochs N] [--pairs N]"),
        }
    }
    let run_dir = run_dir.context("--run-dir DIR is required")?;
    let (train_set, valid_set) = sentences(&corpus, pairs)?;
    let steps = train_set.len().div_ceil(64);
    let default_reads = train(run_dir.join("default"), train_set.clone(), valid_set.clone(), epochs, false);
    let kiln_reads = train(run_dir.join("kiln"), train_set, valid_set, epochs, true);
    println!("{steps} training steps per epoch, batches of 64");
    println!("device->host reads per epoch (training and validation): burn-train default {}, kiln SyncEveryN(10) {}", default_reads / epochs, kiln_reads / epochs);
    Ok(())
}
