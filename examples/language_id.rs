//! A model kiln does not ship, trained by kiln's loop: which language is a sentence in, German or
//! English? Sentences are the two sides of the Ding pairs in `assets/`, read through kiln's corpus
//! reader as a burn-dataset `Dataset`; the model (byte embeddings, a small Transformer encoder,
//! masked mean pooling, a linear head) is an ordinary `#[derive(Module)]`; the task gives its loss
//! and an accuracy metric. kiln brings the rest: token-budget batches by sentence length, loader
//! workers, the loss read once every `--sync` steps, checkpoints, resume, the run directory.
//!
//! ```sh
//! cargo run --release --example language_id -- --run-dir runs/language-id
//! cargo run --release --example language_id -- --resume runs/language-id   # after a stop (Ctrl-C)
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::backend::{Autodiff, Flex};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, InMemDataset};
use burn::module::Module;
use burn::nn::transformer::{TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use kiln::{BatchStats, Batching, DatasetData, EvalFigures, MetricDef, Per, Split, Task, TaskBatch, TaskOutput, TrainSection, Trainer, TsvPairs, ValidModel};

/// Bytes of a sentence the model sees at most.
const MAX_BYTES: usize = 96;
const LANGUAGES: [&str; 2] = ["de", "en"];

#[derive(Module, Debug)]
struct LanguageId<B: Backend> {
    bytes: Embedding<B>,
    positions: Embedding<B>,
    encoder: TransformerEncoder<B>,
    head: Linear<B>,
}

impl<B: Backend> LanguageId<B> {
    fn new(device: &B::Device) -> Self {
        let d = 48;
        Self {
            // Byte values 1..=256; 0 is padding.
            bytes: EmbeddingConfig::new(257, d).init(device),
            positions: EmbeddingConfig::new(MAX_BYTES, d).init(device),
            encoder: TransformerEncoderConfig::new(d, 2 * d, 4, 1).with_dropout(0.1).init(device),
            head: LinearConfig::new(d, LANGUAGES.len()).init(device),
        }
    }

    /// Class scores `[rows, 2]`: the encoder's outputs averaged over each sentence's real bytes.
    fn forward(&self, batch: &SentenceBatch<B>) -> Tensor<B, 2> {
        let [rows, len] = batch.bytes.dims();
        let device = batch.bytes.device();
        let positions = Tensor::<B, 1, Int>::arange(0..len as i64, &device).unsqueeze::<2>().repeat_dim(0, rows);
        let x = self.bytes.forward(batch.bytes.clone()) + self.positions.forward(positions);
        let x = self.encoder.forward(TransformerEncoderInput::new(x).mask_pad(batch.padding.clone()));
        let keep = batch.padding.clone().bool_not().float().unsqueeze_dim::<3>(2);
        let pooled = (x * keep.clone()).sum_dim(1).squeeze_dim::<2>(1) / keep.sum_dim(1).squeeze_dim::<2>(1);
        self.head.forward(pooled)
    }
}

/// One sentence and its language (an index into [`LANGUAGES`]).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Sentence {
    bytes: Vec<u8>,
    language: i64,
}

impl Sentence {
    fn new(text: &str, language: i64) -> Self {
        // Cut at a character boundary, so no sentence ends in half a character.
        let mut end = text.len().min(MAX_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Self { bytes: text.as_bytes()[..end].to_vec(), language }
    }
}

#[derive(Clone, Debug)]
struct SentenceBatch<B: Backend> {
    bytes: Tensor<B, 2, Int>,
    padding: Tensor<B, 2, Bool>,
    languages: Tensor<B, 1, Int>,
    stats: BatchStats,
}

impl<B: Backend> TaskBatch<B> for SentenceBatch<B> {
    fn stats(&self) -> BatchStats {
        self.stats
    }

    fn to_device(self, device: &B::Device) -> Self {
        Self { bytes: self.bytes.to_device(device), padding: self.padding.to_device(device), languages: self.languages.to_device(device), stats: self.stats }
    }
}

#[derive(Clone)]
struct SentenceBatcher;

impl<B: Backend> Batcher<B, Sentence, SentenceBatch<B>> for SentenceBatcher {
    fn batch(&self, items: Vec<Sentence>, device: &B::Device) -> SentenceBatch<B> {
        let rows = items.len();
        let len = items.iter().map(|s| s.bytes.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![0i64; rows * len];
        for (r, s) in items.iter().enumerate() {
            for (i, b) in s.bytes.iter().enumerate() {
                ids[r * len + i] = *b as i64 + 1;
            }
        }
        let padding: Vec<bool> = ids.iter().map(|&id| id == 0).collect();
        let real = padding.iter().filter(|p| !**p).count();
        SentenceBatch {
            bytes: Tensor::from_data(TensorData::new(ids, [rows, len]), device),
            padding: Tensor::from_data(TensorData::new(padding, [rows, len]), device),
            languages: Tensor::from_data(TensorData::new(items.iter().map(|s| s.language).collect::<Vec<_>>(), [rows]), device),
            // The loss is per sentence: a batch's units are its rows.
            stats: BatchStats { size: rows, target_tokens: rows, real_tokens: real, slots: rows * len },
        }
    }
}

/// Summed cross-entropy and the count of sentences classified right, on the device.
fn sums<B: Backend>(model: &LanguageId<B>, batch: &SentenceBatch<B>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let scores = model.forward(batch);
    let loss = log_softmax(scores.clone(), 1).gather(1, batch.languages.clone().unsqueeze_dim(1)).sum().neg();
    let correct = scores.argmax(1).squeeze_dim::<1>(1).equal(batch.languages.clone()).float().sum();
    (loss, correct)
}

struct LanguageTask {
    valid: Vec<Sentence>,
    test: Vec<Sentence>,
}

impl LanguageTask {
    /// Loss and accuracy over a split, in batches of 256, read once at the end.
    fn evaluate_on<B: Backend>(model: &LanguageId<B>, sentences: &[Sentence], device: &B::Device) -> Option<EvalFigures> {
        if sentences.is_empty() {
            return None;
        }
        let mut total: Option<Tensor<B, 1>> = None;
        for chunk in sentences.chunks(256) {
            let batch: SentenceBatch<B> = SentenceBatcher.batch(chunk.to_vec(), device);
            let (loss, correct) = sums(model, &batch);
            let both = Tensor::cat(vec![loss, correct], 0);
            total = Some(match total {
                Some(t) => t + both,
                None => both,
            });
        }
        let values: Vec<f64> = total?.into_data().iter::<f64>().collect();
        let n = sentences.len() as f64;
        Some(kiln::figures(values[0] / n, [("accuracy".to_string(), values[1] / n)].into()))
    }
}

impl<B: AutodiffBackend> Task<B> for LanguageTask {
    type Model = LanguageId<B>;
    type Batch = SentenceBatch<B>;

    fn forward(&self, model: &LanguageId<B>, batch: &SentenceBatch<B>) -> TaskOutput<B> {
        let (loss, correct) = sums(model, batch);
        TaskOutput::loss(loss).with_metric(correct)
    }

    fn metrics(&self) -> Vec<MetricDef> {
        vec![MetricDef { name: "accuracy", per: Per::Row }]
    }

    fn evaluate(&self, model: &ValidModel<B, Self>, split: Split, device: &B::Device) -> Option<EvalFigures> {
        Self::evaluate_on(model, if split == Split::Valid { &self.valid } else { &self.test }, device)
    }

    fn info(&self) -> kiln::TaskInfo {
        kiln::TaskInfo { vocab_size: 257, valid_examples: self.valid.len(), test_label: format!("{} sentences", self.test.len()), ..Default::default() }
    }
}

struct Args {
    run_dir: PathBuf,
    resume: bool,
    corpus: PathBuf,
    epochs: usize,
    pairs: usize,
    sync: usize,
    dashboard: bool,
}

fn args() -> Result<Args> {
    let mut a = Args { run_dir: PathBuf::new(), resume: false, corpus: PathBuf::from("assets/de-en.ding.tsv"), epochs: 3, pairs: 0, sync: 10, dashboard: true };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--run-dir" => a.run_dir = value()?.into(),
            "--resume" => (a.run_dir, a.resume) = (value()?.into(), true),
            "--corpus" => a.corpus = value()?.into(),
            "--epochs" => a.epochs = value()?.parse().context("--epochs")?,
            "--pairs" => a.pairs = value()?.parse().context("--pairs")?,
            "--sync" => a.sync = value()?.parse().context("--sync")?,
            "--no-tui" => a.dashboard = false,
            other => bail!("unknown flag {other}; usage: language_id (--run-dir DIR | --resume DIR) [--corpus FILE.tsv] [--epochs N] [--pairs N] [--sync N] [--no-tui]"),
        }
    }
    if a.run_dir.as_os_str().is_empty() {
        bail!("--run-dir DIR (or --resume DIR) is required");
    }
    Ok(a)
}

/// Every 20th pair is validation, the next one test; both sides of a pair stay together.
fn splits(args: &Args) -> Result<(Vec<Sentence>, Vec<Sentence>, Vec<Sentence>)> {
    let pairs = TsvPairs::open(&args.corpus, Default::default())?;
    let (mut train, mut valid, mut test) = (Vec::new(), Vec::new(), Vec::new());
    let n = if args.pairs > 0 { args.pairs.min(pairs.len()) } else { pairs.len() };
    for i in 0..n {
        let pair = pairs.get(i).expect("within the dataset");
        let split = match i % 20 {
            0 => &mut valid,
            1 => &mut test,
            _ => &mut train,
        };
        split.push(Sentence::new(&pair.source, 0));
        split.push(Sentence::new(&pair.target, 1));
    }
    Ok((train, valid, test))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("language_id: error: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> Result<()> {
    let args = args()?;
    // The splits, prepared once and kept in kiln's dataset cache: keyed on the corpus's content,
    // the settings and this preparation's version, so a changed corpus is prepared again.
    let fingerprint = kiln::Fingerprint::new("language_id sentences", "1").file(&args.corpus)?.settings(&(args.pairs, MAX_BYTES));
    let ((train, valid, test), cache) = kiln::memoize(Some(std::path::Path::new(".kiln/cache")), &fingerprint, || splits(&args))?;
    if let Some(note) = cache.note {
        eprintln!("language_id: {note}");
    }
    let data = DatasetData::new(InMemDataset::new(train), SentenceBatcher, |s: &Sentence| s.bytes.len(), Batching { max_tokens: 3072, max_items: 0, bucket_pool: 50, seed: 1 });

    type B = Autodiff<Flex>;
    let device = Default::default();
    // The run directory, held by this process until the end (one process per run).
    let run = if args.resume { kiln::session::resume_point(&args.run_dir)? } else { kiln::session::new_run_dir(&args.run_dir)? };
    let trainer = Trainer::<B, _>::new(LanguageTask { valid, test }, LanguageId::new(&device), device)
        .name("language-id")
        .settings(TrainSection { epochs: args.epochs, lr: 2e-3, warmup_steps: 100, label_smoothing: 0.0, keep_checkpoints: 2, ..Default::default() })
        .sync_interval(args.sync)
        .run_dir(&args.run_dir)
        .resume(run.checkpoint.clone());
    let summary = kiln::session::fit(trainer, &data, &kiln::session::Session { dashboard: args.dashboard, name: "language-id".into() })?;
    println!(
        "language_id: {} steps, {} loss reads ({:.2} ms in all); validation accuracy {:.4}",
        summary.steps,
        summary.sync.count,
        summary.sync.total_ms,
        summary.metrics.get("accuracy").copied().unwrap_or(f64::NAN)
    );
    Ok(())
}
