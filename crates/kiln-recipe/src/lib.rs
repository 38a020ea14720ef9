//! Recipes: the TOML schema of a training run, its defaults, `--set` overrides and validation.
//!
//! A recipe has the sections `data`, `tokenizer`, `loader`, `model`, `train`, `backend` and `eval`.
//! Every user mistake (syntax, unknown key, wrong type, out-of-range value, bad override) becomes a
//! [`RecipeError`] whose one-line `Display` names the file and line (or the `--set` flag), the key
//! path and what was expected. `recipes/README.md` documents every key; keep the two in step.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod corpora;
pub use corpora::{TrainFile, TrainFiles};

pub mod device;
pub use device::{DeviceSpec, WgpuAdapter, DEVICE_FORMS};

/// One-line, user-facing error about a recipe or an override.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeError {
    /// Where: `path:line`, `path`, or `--set key=value`.
    pub origin: String,
    /// Dotted key path, e.g. `train.lr`; empty for syntax errors.
    pub key: String,
    pub message: String,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: {}: {}", self.origin, self.key, self.message)
        }
    }
}

impl std::error::Error for RecipeError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnBadLine {
    #[default]
    Error,
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    #[default]
    Unigram,
    Bpe,
    /// One token per character (Unicode scalar value after NFC): the vocabulary is the training
    /// text's characters (the most frequent `vocab_size - 4` when there are more); others are `<unk>`.
    Char,
    /// One token per UTF-8 byte: a fixed vocabulary of 256 bytes after the specials; nothing is unknown.
    Byte,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// Encoder-decoder Transformer for translation (`data.format = "pairs"`).
    #[default]
    Transformer,
    /// Decoder-only Transformer language model, GPT-style (`data.format = "text"`).
    Lm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    #[default]
    Sinusoidal,
    Learned,
    /// Rotary position embeddings on queries and keys (language models only).
    Rotary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Gelu,
    Relu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    InverseSqrt,
    Cosine,
    Constant,
}

/// What a non-finite training loss or gradient norm does (`train.on_nan`), seen at the sync window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnNan {
    /// Stop the run with a diagnosis (`nonfinite.json`); the last checkpoint stays as it was.
    #[default]
    Stop,
    /// Go back to the window's start and replay it without the offending steps.
    Skip,
    /// Go back to the last checkpoint and lower the learning rate.
    Rollback,
}

/// Arithmetic of the forward and backward passes (`train.precision`); weights and optimizer state
/// stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

/// The validation figure that picks the best checkpoint and drives early stopping
/// (`train.best_metric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BestMetric {
    /// Lowest validation loss.
    #[default]
    ValidLoss,
    /// Highest validation BLEU (translation with `eval.bleu`).
    Bleu,
}

impl BestMetric {
    /// The figure of a validation, if it has one.
    pub fn of(self, loss: f64, bleu: Option<f64>) -> Option<f64> {
        match self {
            BestMetric::ValidLoss => Some(loss),
            BestMetric::Bleu => bleu,
        }
        .filter(|v| v.is_finite())
    }

    /// Whether `new` beats `old`.
    pub fn better(self, new: f64, old: f64) -> bool {
        match self {
            BestMetric::ValidLoss => new < old,
            BestMetric::Bleu => new > old,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BestMetric::ValidLoss => "validation loss",
            BestMetric::Bleu => "validation BLEU",
        }
    }
}

/// What kind of corpus `data.train` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CorpusFormat {
    /// `source<TAB>target` lines (translation).
    #[default]
    Pairs,
    /// Plain text: one token stream cut into blocks of `data.block_size` (language models).
    Text,
}

/// `[data]`: where the corpus comes from and how it is split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// `pairs` (TSV) or `text` (plain text for language models).
    pub format: CorpusFormat,
    /// The corpus: TSV of `source<TAB>target` lines, or plain text; split into train/valid/test
    /// unless `valid` is set. Sentence pairs may name several corpora mixed by weight
    /// ([`corpora`]); the first is the main one.
    pub train: TrainFiles,
    /// Several corpora: > 0 samples each epoch's pairs ∝ corpus size^(1/temperature) instead of
    /// by the weights (0 = by the weights).
    pub temperature: f64,
    /// Explicit validation file; empty = carve `valid_size` pairs out of `train`.
    pub valid: PathBuf,
    /// Explicit test file; empty = carve `test_size` pairs out of `train` (when `valid` is empty).
    pub test: PathBuf,
    pub valid_size: usize,
    pub test_size: usize,
    /// Seed of the train/valid/test shuffle; independent of `train.seed`.
    pub split_seed: u64,
    /// Translate column 2 → column 1 instead of column 1 → column 2.
    pub swap: bool,
    pub on_bad_line: OnBadLine,
    /// Training pairs with more tokens than this on either side are dropped (valid/test are kept).
    pub max_len: usize,
    /// Use only the first N pairs (lines) of each file (0 = all): for quick experiments and tests.
    pub limit: usize,
    /// Text corpora: tokens per training block (the model sees `block_size` tokens and predicts
    /// the next token at each).
    pub block_size: usize,
}

impl DataSection {
    /// Whether `file`'s columns are swapped (its own `swap`, else `data.swap`).
    pub fn swap_of(&self, file: &TrainFile) -> bool {
        file.swap.unwrap_or(self.swap)
    }
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            format: CorpusFormat::Pairs,
            train: TrainFiles::default(),
            temperature: 0.0,
            valid: PathBuf::new(),
            test: PathBuf::new(),
            valid_size: 500,
            test_size: 500,
            split_seed: 1,
            swap: false,
            on_bad_line: OnBadLine::Error,
            max_len: 128,
            limit: 0,
            block_size: 256,
        }
    }
}

/// `[tokenizer]`: subword model trained on the training split, or loaded from a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerSection {
    pub kind: TokenizerKind,
    pub vocab_size: usize,
    /// Load this `tokenizer.json` instead of training one (empty = train).
    pub path: PathBuf,
    /// Lowercase before tokenizing (part of the tokenizer's normaliser).
    pub lowercase: bool,
    /// BPE only: merges must occur at least this often.
    pub min_frequency: u64,
    /// Train the tokenizer on a seeded sample of at most this many sentences of the training
    /// corpus (both sides of a pair count), as SentencePiece's `input_sentence_size`; 0 = all.
    pub train_sentences: usize,
    /// Unigram only: subword regularisation; each training epoch samples a segmentation of every
    /// example with scores scaled by this inverse temperature (0 = off; 0.1–0.5 usual).
    pub sample_alpha: f64,
    /// BPE only: BPE-dropout; each training epoch re-segments every example skipping each merge
    /// with this probability (0 = off; 0.1 usual).
    pub bpe_dropout: f64,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        Self {
            kind: TokenizerKind::Unigram,
            vocab_size: 8000,
            path: PathBuf::new(),
            lowercase: false,
            min_frequency: 2,
            train_sentences: 1_000_000,
            sample_alpha: 0.0,
            bpe_dropout: 0.0,
        }
    }
}

/// `[loader]`: how examples become batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderSection {
    /// Budget of padded tokens per batch (batch size × longest side, source or target): a number,
    /// a table by length, or `"auto"` (probed on the device at the start of a run).
    pub max_tokens: TokenLimit,
    /// `max_tokens = "auto"`: the largest budget the probe may choose, in tokens (probing costs a
    /// training step per try, and past a point a bigger batch is not faster).
    pub auto_token_cap: usize,
    /// Cap on sentences per batch (0 = none).
    pub max_sentences: usize,
    /// Examples are sorted by length inside pools of this many batches' worth, to limit padding
    /// (0 = no sorting).
    pub bucket_pool: usize,
    /// Dataset cache directory (relative paths: to the current directory); empty = no cache.
    pub cache_dir: PathBuf,
    /// Loader threads that build batches (padding, tensors on the device) ahead of the trainer.
    pub workers: usize,
    /// Ready batches kept ahead of the trainer, at most (at least one per worker).
    pub prefetch: usize,
    /// Full batches hold a multiple of this many sentences (1 = any, 8 suits GPU tensor cores).
    pub batch_multiple: usize,
}

impl Default for LoaderSection {
    fn default() -> Self {
        Self { max_tokens: TokenLimit::Tokens(4096), auto_token_cap: 65536, max_sentences: 0, bucket_pool: 400, cache_dir: PathBuf::from(".kiln/cache"), workers: 2, prefetch: 8, batch_multiple: 1 }
    }
}

/// `loader.max_tokens`: padded tokens per batch.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenLimit {
    /// One budget for every batch: `max_tokens = 4096`.
    Tokens(usize),
    /// A budget by the batch's longest side, Marian-style: `max_tokens = [[32, 12000], [64, 9000]]`
    /// gives batches whose longest side is ≤ 32 up to 12,000 tokens, ≤ 64 up to 9,000; longer ones
    /// the last row's. Rows in increasing length.
    Table(Vec<(usize, usize)>),
    /// `max_tokens = "auto"`: a table probed on the device when a run starts (≤ 85 % of its memory).
    Auto,
}

impl TokenLimit {
    /// The budget of a batch whose longest side is `len`; `None` for `Auto` (not probed yet).
    pub fn at(&self, len: usize) -> Option<usize> {
        match self {
            TokenLimit::Tokens(n) => Some(*n),
            TokenLimit::Table(rows) => rows.iter().find(|(up_to, _)| len <= *up_to).or(rows.last()).map(|r| r.1),
            TokenLimit::Auto => None,
        }
    }
}

impl fmt::Display for TokenLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenLimit::Tokens(n) => write!(f, "{n}"),
            TokenLimit::Auto => f.write_str("\"auto\""),
            TokenLimit::Table(rows) => {
                let rows: Vec<String> = rows.iter().map(|(l, t)| format!("[{l}, {t}]")).collect();
                write!(f, "[{}]", rows.join(", "))
            }
        }
    }
}

impl Serialize for TokenLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TokenLimit::Tokens(n) => s.serialize_u64(*n as u64),
            TokenLimit::Auto => s.serialize_str("auto"),
            TokenLimit::Table(rows) => rows.iter().map(|&(l, t)| [l as u64, t as u64]).collect::<Vec<_>>().serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TokenLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TokenLimit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of tokens, \"auto\", or a table [[longest side, tokens], ...]")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TokenLimit, E> {
                usize::try_from(v).map(TokenLimit::Tokens).map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TokenLimit, E> {
                usize::try_from(v).map(TokenLimit::Tokens).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TokenLimit, E> {
                if v == "auto" { Ok(TokenLimit::Auto) } else { Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)) }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<TokenLimit, A::Error> {
                let mut rows = Vec::new();
                while let Some(row) = seq.next_element::<Vec<u64>>()? {
                    let size = |v: u64| usize::try_from(v).map_err(|_| serde::de::Error::invalid_value(serde::de::Unexpected::Unsigned(v), &"a size that fits this machine's integers"));
                    match row[..] {
                        [len, tokens] => rows.push((size(len)?, size(tokens)?)),
                        _ => return Err(serde::de::Error::invalid_length(row.len(), &"a row [longest side, tokens]")),
                    }
                }
                Ok(TokenLimit::Table(rows))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[model]`: architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    pub family: ModelFamily,
    pub d_model: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub dropout: f64,
    /// Pre-LayerNorm blocks (plus a final norm) instead of post-LN.
    pub pre_ln: bool,
    /// One embedding matrix for encoder input, decoder input and output projection.
    pub tie_embeddings: bool,
    pub positions: Positions,
    /// Longest sequence the model accepts (size of the learned position table).
    pub max_positions: usize,
    pub activation: Activation,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            family: ModelFamily::Transformer,
            d_model: 256,
            n_heads: 4,
            d_ff: 1024,
            encoder_layers: 3,
            decoder_layers: 3,
            dropout: 0.1,
            pre_ln: true,
            tie_embeddings: true,
            positions: Positions::Sinusoidal,
            max_positions: 256,
            activation: Activation::Gelu,
        }
    }
}

/// `[train]`: optimisation and the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Seed of initialisation, dropout and batch order.
    pub seed: u64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (0 = no limit); whichever of this and `epochs` comes first.
    pub max_steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// Floor of the cosine schedule.
    pub min_lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global-norm gradient clipping threshold (0 = off).
    pub clip_norm: f64,
    /// Batches whose gradients are summed into one optimizer step.
    pub accumulate: usize,
    pub label_smoothing: f64,
    /// Steps between device→host reads of the loss.
    pub sync_interval: usize,
    /// Read each window while the next window's steps are queued (one window late, so the device
    /// never drains); `false` reads at the window's end. Checkpoints, evaluation and the epoch's
    /// end always wait for every read.
    pub sync_overlap: bool,
    /// Save a checkpoint every N epochs (0 = only at the end); always at the end.
    pub save_every: usize,
    /// Also save every N optimizer steps (0 = off).
    pub save_every_steps: usize,
    /// Keep the newest N checkpoints (plus the best by validation loss); 0 = keep all.
    pub keep_checkpoints: usize,
    /// What a non-finite loss or gradient norm does.
    pub on_nan: OnNan,
    /// `rollback`: the learning rate is multiplied by this at each rollback.
    pub nan_lr_factor: f64,
    /// Recoveries a run may make (steps skipped, or rollbacks) before a non-finite step stops it.
    pub nan_max_recoveries: usize,
    /// Compute precision of the passes.
    pub precision: Precision,
    /// Exponential moving average of the weights after each step, `ema ← d·ema + (1−d)·w`
    /// (0 = off). Validation, the test split and `eval`/`translate` use the average.
    pub ema_decay: f64,
    /// Stop after this many validations in a row without a new best `best_metric` (0 = off).
    pub patience: usize,
    /// What "best" means for `checkpoints/best` and for `patience`.
    pub best_metric: BestMetric,
    /// The validation set `best_metric` is read on: "" (or "valid") the main one, else the name
    /// of one of `eval.sets`.
    pub best_set: String,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            seed: 1,
            epochs: 10,
            max_steps: 0,
            lr: 5e-4,
            schedule: Schedule::InverseSqrt,
            warmup_steps: 400,
            min_lr: 0.0,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-9,
            clip_norm: 1.0,
            accumulate: 1,
            label_smoothing: 0.1,
            sync_interval: 10,
            sync_overlap: true,
            save_every: 1,
            save_every_steps: 0,
            keep_checkpoints: 5,
            on_nan: OnNan::Stop,
            nan_lr_factor: 0.5,
            nan_max_recoveries: 5,
            precision: Precision::F32,
            ema_decay: 0.0,
            patience: 0,
            best_metric: BestMetric::ValidLoss,
            best_set: String::new(),
        }
    }
}

/// `[backend]`: where tensors live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendSection {
    /// `"cpu"`, `"cuda"`, `"cuda:N"`, `"wgpu"` (the preferred adapter), `"wgpu:cpu"`,
    /// `"wgpu:discrete:N"`, `"wgpu:integrated:N"`, `"wgpu:virtual:N"`, or `"auto"` (CUDA when built
    /// in and present, then a GPU adapter through wgpu when built in, else the CPU).
    pub device: String,
    /// CPU threads for tensor kernels (0 = all cores).
    pub threads: usize,
    /// On the CPU, each batch is cut by rows into this many parts, run side by side on the
    /// threads, one autodiff graph each, their gradients summed (0 = one part per thread, 1 =
    /// whole batches). The same batches and dropout masks: only the order of float sums differs.
    pub cpu_split: usize,
    /// Data parallel over several devices, one model replica each, gradients all-reduced with
    /// Burn's collective: `["cuda:0", "cuda:1"]`. Replaces `device` when it holds two or more.
    /// Devices of one kind, CPU or CUDA (CubeCL 0.10's wgpu runtime has no collective operations).
    /// `["cpu", "cpu"]` runs replicas as threads sharing the CPU (it checks the path; it is not
    /// faster).
    pub devices: Vec<String>,
}

impl Default for BackendSection {
    fn default() -> Self {
        Self { device: "auto".into(), threads: 0, cpu_split: 0, devices: Vec::new() }
    }
}

/// `[eval]`: validation at the end of each epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Compute BLEU on the validation set with greedy decoding.
    pub bleu: bool,
    /// Decode at most this many validation sentences for BLEU (0 = all); loss uses all.
    pub bleu_sentences: usize,
    /// Longest hypothesis: `max_len_a × source length + max_len_b` tokens.
    pub max_len_a: f64,
    pub max_len_b: usize,
    /// Beam width of the BLEU decodes during training and of the final test split (1 = greedy).
    pub beam: usize,
    /// GNMT length penalty α of those beam decodes.
    pub len_penalty: f64,
    /// Named validation sets, each validated every time after the main one (`[[eval.sets]]`).
    pub sets: Vec<DevSet>,
    /// Translations of the first N validation sentences kept per validation for people to read
    /// (TensorBoard's text tab); they come from the BLEU decodes, so none without `bleu`.
    pub samples: usize,
}

/// A named validation set: a file in the corpus's format (pairs in the main corpus's
/// orientation, or text), validated with its own figures under its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevSet {
    pub name: String,
    pub path: PathBuf,
    /// Column 2 → column 1 for this file (default: the main corpus's orientation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<bool>,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self { bleu: true, bleu_sentences: 0, max_len_a: 1.5, max_len_b: 10, beam: 1, len_penalty: 1.0, sets: Vec::new(), samples: 3 }
    }
}

/// A whole recipe. `name` defaults to the recipe file's stem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub data: DataSection,
    pub tokenizer: TokenizerSection,
    pub loader: LoaderSection,
    pub model: ModelSection,
    pub train: TrainSection,
    pub backend: BackendSection,
    pub eval: EvalSection,
}

/// A `--set section.key=value` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub key: String,
    pub raw: String,
}

impl Override {
    /// Parses `section.key=value`; the value is TOML (`3`, `1e-4`, `true`, `"x"`) or a bare string.
    pub fn parse(text: &str) -> Result<Self, RecipeError> {
        let err = |m: &str| RecipeError {
            origin: format!("--set {text}"),
            key: String::new(),
            message: m.to_string(),
        };
        let (key, raw) = text.split_once('=').ok_or_else(|| err("expected section.key=value"))?;
        let key = key.trim();
        if key.split('.').count() < 2 || key.split('.').any(|p| p.is_empty()) {
            return Err(err("expected section.key=value"));
        }
        Ok(Override { key: key.to_string(), raw: raw.trim().to_string() })
    }

    fn origin(&self) -> String {
        format!("--set {}={}", self.key, self.raw)
    }

    fn value(&self) -> toml::Value {
        // A bare word such as `bpe` or `cuda:0` is not TOML; take it as a string.
        match toml::from_str::<toml::Table>(&format!("v = {}", self.raw)) {
            Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(self.raw.clone())),
            Err(_) => toml::Value::String(self.raw.clone()),
        }
    }
}

impl Recipe {
    /// Reads a recipe file, applies overrides, validates, and resolves data paths relative to the
    /// recipe's directory.
    pub fn load(path: &Path, overrides: &[Override]) -> Result<Recipe, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError {
            origin: path.display().to_string(),
            key: String::new(),
            message: format!("cannot read recipe: {e}"),
        })?;
        let mut recipe = Self::parse(&text, &path.display().to_string(), overrides)?;
        if recipe.name.is_empty() {
            recipe.name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            plain_name(&recipe.name).map_err(|why| RecipeError { origin: path.display().to_string(), key: "name".into(), message: format!("{why} (from the file's name; set `name` in the recipe)") })?;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        recipe.resolve_paths(base);
        Ok(recipe)
    }

    /// Parses recipe text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str, overrides: &[Override]) -> Result<Recipe, RecipeError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| RecipeError {
            origin: match e.span() {
                Some(span) => format!("{origin}:{}", line_of(text, span.start)),
                None => origin.to_string(),
            },
            key: String::new(),
            message: first_line(e.message()),
        })?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let where_is = |key: &str| -> String {
            if let Some(o) = overrides.iter().find(|o| o.key == key) {
                return o.origin();
            }
            match find_key_line(text, key) {
                Some(line) => format!("{origin}:{line}"),
                None => origin.to_string(),
            }
        };
        let recipe: Recipe = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            let inner = e.into_inner();
            let message = first_line(&inner.to_string());
            // Make sure an unknown field's path names the field itself, not only its section.
            let key = match unknown_field(&message) {
                Some(field) if key.is_empty() => field,
                Some(field) if !key.ends_with(&format!(".{field}")) && key != field => format!("{key}.{field}"),
                _ => key,
            };
            RecipeError { origin: where_is(&key), key, message }
        })?;
        recipe.validate().map_err(|(key, message): (String, String)| RecipeError { origin: where_is(&key), key, message })?;
        Ok(recipe)
    }

    /// Range and consistency checks; returns the key at fault and what was expected.
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn positive(key: &str, v: usize) -> Result<(), (String, String)> {
            if v == 0 { Err((key.into(), "expected an integer > 0, got 0".into())) } else { Ok(()) }
        }
        fn in_range(key: &str, v: f64, lo: f64, hi: f64, lo_open: bool, hi_open: bool) -> Result<(), (String, String)> {
            let ok_lo = if lo_open { v > lo } else { v >= lo };
            let ok_hi = if hi_open { v < hi } else { v <= hi };
            if v.is_finite() && ok_lo && ok_hi {
                return Ok(());
            }
            let l = if lo_open { "(" } else { "[" };
            let h = if hi_open { ")" } else { "]" };
            let hi_s = if hi.is_infinite() { "inf".to_string() } else { hi.to_string() };
            Err((key.into(), format!("expected a number in {l}{lo}, {hi_s}{h}, got {v}")))
        }
        fn at_most(key: &str, v: usize, max: usize, why: &str) -> Result<(), (String, String)> {
            if v > max { Err((key.into(), format!("expected at most {max} ({why}), got {v}"))) } else { Ok(()) }
        }
        if !self.name.is_empty() {
            plain_name(&self.name).map_err(|why| ("name".to_string(), why))?;
        }
        let d = &self.data;
        if d.train.is_empty() {
            return Err(("data.train".into(), "expected a path to a TSV corpus, got nothing".into()));
        }
        for (i, f) in d.train.files().iter().enumerate() {
            if f.path.as_os_str().is_empty() {
                return Err(("data.train".into(), format!("corpus {} has no path", i + 1)));
            }
            if !(f.weight.is_finite() && f.weight > 0.0) {
                return Err(("data.train".into(), format!("{}: expected a weight > 0, got {}", f.path.display(), f.weight)));
            }
            if d.temperature > 0.0 && f.weight != 1.0 {
                return Err(("data.temperature".into(), format!("set either data.temperature or weights in data.train, not both ({} has weight {})", f.path.display(), f.weight)));
            }
        }
        in_range("data.temperature", d.temperature, 0.0, f64::INFINITY, false, true)?;
        if d.train.is_mix() && d.format == CorpusFormat::Text {
            return Err(("data.train".into(), "several corpora or weights are for sentence pairs; a text corpus is one file".into()));
        }
        positive("data.max_len", d.max_len)?;
        if d.valid.as_os_str().is_empty() {
            positive("data.valid_size", d.valid_size)?;
        }
        let t = &self.tokenizer;
        if t.path.as_os_str().is_empty() && t.vocab_size < 16 {
            return Err(("tokenizer.vocab_size".into(), format!("expected an integer >= 16, got {}", t.vocab_size)));
        }
        at_most("tokenizer.vocab_size", t.vocab_size, MAX_VOCAB, "token ids are 32-bit signed integers in the model's tensors")?;
        in_range("tokenizer.sample_alpha", t.sample_alpha, 0.0, f64::INFINITY, false, true)?;
        in_range("tokenizer.bpe_dropout", t.bpe_dropout, 0.0, 1.0, false, true)?;
        if t.path.as_os_str().is_empty() {
            if t.sample_alpha > 0.0 && t.kind != TokenizerKind::Unigram {
                return Err(("tokenizer.sample_alpha".into(), "subword sampling needs kind = \"unigram\" (use tokenizer.bpe_dropout for BPE)".into()));
            }
            if t.bpe_dropout > 0.0 && t.kind != TokenizerKind::Bpe {
                return Err(("tokenizer.bpe_dropout".into(), "BPE-dropout needs kind = \"bpe\" (use tokenizer.sample_alpha for Unigram)".into()));
            }
        }
        if t.sample_alpha > 0.0 && t.bpe_dropout > 0.0 {
            return Err(("tokenizer.bpe_dropout".into(), "set either tokenizer.sample_alpha or tokenizer.bpe_dropout, not both".into()));
        }
        match (self.model.family, d.format) {
            (ModelFamily::Transformer, CorpusFormat::Text) => {
                return Err((
                    "data.format".into(),
                    "\"text\" corpora train language models (model.family = \"lm\"); model.family = \"transformer\" is an encoder-decoder for sentence pairs".into(),
                ))
            }
            (ModelFamily::Lm, CorpusFormat::Pairs) => {
                return Err(("data.format".into(), "model.family = \"lm\" trains on plain text: set data.format = \"text\"".into()))
            }
            _ => {}
        }
        if self.model.family == ModelFamily::Lm && !self.model.pre_ln {
            return Err(("model.pre_ln".into(), "the language model is pre-LN (GPT-style); post-LN is available for model.family = \"transformer\"".into()));
        }
        if self.model.family == ModelFamily::Transformer && self.model.positions == Positions::Rotary {
            return Err(("model.positions".into(), "\"rotary\" is available for model.family = \"lm\"; the encoder-decoder takes \"sinusoidal\" or \"learned\"".into()));
        }
        if d.format == CorpusFormat::Text {
            if t.sample_alpha > 0.0 || t.bpe_dropout > 0.0 {
                let key = if t.sample_alpha > 0.0 { "tokenizer.sample_alpha" } else { "tokenizer.bpe_dropout" };
                return Err((key.into(), "subword regularisation applies to sentence pairs (data.format = \"pairs\"), not to text streams".into()));
            }
            if self.model.max_positions < d.block_size {
                return Err(("model.max_positions".into(), format!("expected at least data.block_size = {}, got {}", d.block_size, self.model.max_positions)));
            }
            positive("data.block_size", d.block_size)?;
            if let Some(budget) = self.loader.max_tokens.at(d.block_size).filter(|b| *b < d.block_size) {
                return Err((
                    "loader.max_tokens".into(),
                    format!("expected at least data.block_size = {} so one block fits a batch, got {budget}", d.block_size),
                ));
            }
        }
        match &self.loader.max_tokens {
            TokenLimit::Tokens(n) => positive("loader.max_tokens", *n)?,
            TokenLimit::Auto => positive("loader.auto_token_cap", self.loader.auto_token_cap)?,
            TokenLimit::Table(rows) => {
                let bad = |m: String| Err(("loader.max_tokens".to_string(), m));
                if rows.is_empty() || rows.len() > 16 {
                    return bad(format!("expected 1 to 16 rows [longest side, tokens], got {}", rows.len()));
                }
                for (i, &(len, tokens)) in rows.iter().enumerate() {
                    if len == 0 || tokens < len {
                        return bad(format!("row {} [{len}, {tokens}]: expected a longest side > 0 and at least that many tokens", i + 1));
                    }
                    if i > 0 && len <= rows[i - 1].0 {
                        return bad(format!("row {} [{len}, {tokens}]: rows must go by increasing length", i + 1));
                    }
                }
            }
        }
        positive("loader.workers", self.loader.workers)?;
        at_most("loader.workers", self.loader.workers, MAX_THREADS, "one thread each, started up front")?;
        positive("loader.prefetch", self.loader.prefetch)?;
        at_most("loader.prefetch", self.loader.prefetch, MAX_PREFETCH, "the ready queue is allocated up front")?;
        positive("loader.batch_multiple", self.loader.batch_multiple)?;
        // Every position a sequence can take must exist in the model: checked before any sum
        // with max_len could overflow.
        at_most("data.max_len", d.max_len, MAX_POSITIONS_LIMIT, "the model's positions are counted in 32-bit integers")?;
        at_most("data.block_size", d.block_size, MAX_POSITIONS_LIMIT, "the model's positions are counted in 32-bit integers")?;
        if d.format == CorpusFormat::Pairs {
            if let Some(budget) = self.loader.max_tokens.at(d.max_len + 2).filter(|b| *b < d.max_len + 2) {
                return Err((
                    "loader.max_tokens".into(),
                    format!("expected at least data.max_len + 2 = {} so the longest pair fits a batch, got {budget}", d.max_len + 2),
                ));
            }
        }
        let m = &self.model;
        positive("model.d_model", m.d_model)?;
        positive("model.n_heads", m.n_heads)?;
        if !m.d_model.is_multiple_of(m.n_heads) {
            return Err(("model.n_heads".into(), format!("expected a divisor of model.d_model = {}, got {}", m.d_model, m.n_heads)));
        }
        positive("model.d_ff", m.d_ff)?;
        positive("model.encoder_layers", m.encoder_layers)?;
        positive("model.decoder_layers", m.decoder_layers)?;
        at_most("model.max_positions", m.max_positions, MAX_POSITIONS_LIMIT, "positions are counted in 32-bit integers")?;
        match m.positions {
            // Burn's sinusoids (burn-nn 0.21 `generate_sinusoids`) need an even width and at most
            // as many positions as their time scale, 10,000.
            Positions::Sinusoidal => {
                if !m.d_model.is_multiple_of(2) {
                    return Err(("model.d_model".into(), format!("expected an even width for model.positions = \"sinusoidal\", got {}", m.d_model)));
                }
                at_most("model.max_positions", m.max_positions, SINUSOID_POSITIONS, "Burn's sinusoidal encoding has a time scale of 10,000; use positions = \"learned\" for more")?;
            }
            // Rotary encoding turns pairs of each head's features (burn-nn 0.21 `RotaryEncodingConfig`).
            Positions::Rotary => {
                if !(m.d_model / m.n_heads).is_multiple_of(2) {
                    return Err(("model.n_heads".into(), format!("expected heads of an even width for model.positions = \"rotary\", got d_model / n_heads = {} / {} = {}", m.d_model, m.n_heads, m.d_model / m.n_heads)));
                }
            }
            Positions::Learned => {}
        }
        in_range("model.dropout", m.dropout, 0.0, 1.0, false, true)?;
        if d.format == CorpusFormat::Pairs && m.max_positions < d.max_len + 2 {
            return Err((
                "model.max_positions".into(),
                format!("expected at least data.max_len + 2 = {}, got {}", d.max_len + 2, m.max_positions),
            ));
        }
        let tr = &self.train;
        positive("train.epochs", tr.epochs)?;
        at_most("train.epochs", tr.epochs, MAX_EPOCHS, "every epoch's batches are counted when a run starts")?;
        in_range("train.lr", tr.lr, 0.0, f64::INFINITY, true, true)?;
        in_range("train.min_lr", tr.min_lr, 0.0, tr.lr, false, false)?;
        in_range("train.weight_decay", tr.weight_decay, 0.0, f64::INFINITY, false, true)?;
        in_range("train.beta1", tr.beta1, 0.0, 1.0, false, true)?;
        in_range("train.beta2", tr.beta2, 0.0, 1.0, false, true)?;
        in_range("train.eps", tr.eps, 0.0, f64::INFINITY, true, true)?;
        in_range("train.clip_norm", tr.clip_norm, 0.0, f64::INFINITY, false, true)?;
        positive("train.accumulate", tr.accumulate)?;
        in_range("train.label_smoothing", tr.label_smoothing, 0.0, 1.0, false, true)?;
        positive("train.sync_interval", tr.sync_interval)?;
        in_range("train.nan_lr_factor", tr.nan_lr_factor, 0.0, 1.0, true, true)?;
        at_most("backend.threads", self.backend.threads, MAX_THREADS, "one thread each, started up front")?;
        at_most("backend.cpu_split", self.backend.cpu_split, MAX_THREADS, "one autodiff graph per part")?;
        if self.backend.devices.len() > MAX_DEVICES {
            return Err(("backend.devices".into(), format!("expected at most {MAX_DEVICES} devices (one replica thread each), got {}", self.backend.devices.len())));
        }
        DeviceSpec::parse(&self.backend.device).map_err(|m| ("backend.device".to_string(), m))?;
        let devices = &self.backend.devices;
        if !devices.is_empty() {
            let bad = |m: String| Err(("backend.devices".to_string(), m));
            let mut specs = Vec::new();
            for d in devices {
                match DeviceSpec::parse(d) {
                    Ok(DeviceSpec::Auto) => return bad("expected named devices, got \"auto\"".into()),
                    Ok(spec) => specs.push(spec),
                    Err(m) => return bad(m),
                }
            }
            if specs.iter().any(|s| s.kind() != specs[0].kind()) {
                return bad("expected devices of one kind, all \"cpu\", all \"cuda:N\" or all \"wgpu…\"".into());
            }
            if specs[0].kind() == "cuda" && (1..specs.len()).any(|i| specs[..i].contains(&specs[i])) {
                return bad(format!("expected each CUDA device once, got {devices:?}"));
            }
            if specs[0].kind() == "wgpu" && specs.len() > 1 {
                // cubecl-runtime 0.10 `ComputeServer::comm_init` is `unimplemented!()` for the wgpu
                // server, and Burn's collective calls it at the first all-reduce.
                return bad("data parallel over wgpu devices is not possible with CubeCL 0.10 (its wgpu runtime has no collective operations); name one wgpu device in backend.device".into());
            }
        }
        in_range("train.ema_decay", tr.ema_decay, 0.0, 1.0, false, true)?;
        for (i, set) in self.eval.sets.iter().enumerate() {
            plain_name(&set.name).map_err(|why| ("eval.sets".to_string(), format!("set {}: name: {why}", i + 1)))?;
            if set.name == "valid" || set.name == "test" || self.eval.sets[..i].iter().any(|s| s.name == set.name) {
                return Err(("eval.sets".into(), format!("set {}: the name {:?} is taken (\"valid\", \"test\" and every set's own)", i + 1, set.name)));
            }
            if set.path.as_os_str().is_empty() {
                return Err(("eval.sets".into(), format!("set {:?} has no path", set.name)));
            }
        }
        if !(tr.best_set.is_empty() || tr.best_set == "valid" || self.eval.sets.iter().any(|s| s.name == tr.best_set)) {
            let names: Vec<String> = std::iter::once("valid".to_string()).chain(self.eval.sets.iter().map(|s| s.name.clone())).collect();
            return Err(("train.best_set".into(), format!("expected one of {}, got {:?}", names.join(", "), tr.best_set)));
        }
        if tr.best_metric == BestMetric::Bleu && !(self.eval.bleu && self.model.family == ModelFamily::Transformer) {
            return Err(("train.best_metric".into(), "\"bleu\" needs a translation model (model.family = \"transformer\") with eval.bleu = true".into()));
        }
        in_range("eval.max_len_a", self.eval.max_len_a, 0.0, f64::INFINITY, false, true)?;
        positive("eval.beam", self.eval.beam)?;
        if t.path.as_os_str().is_empty() {
            at_most("eval.beam", self.eval.beam, t.vocab_size, "a beam holds distinct tokens of the vocabulary, tokenizer.vocab_size")?;
        }
        in_range("eval.len_penalty", self.eval.len_penalty, 0.0, f64::INFINITY, false, true)?;
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                let joined = base.join(&*p);
                *p = std::path::absolute(&joined).unwrap_or(joined);
            }
        };
        for f in self.data.train.files_mut() {
            abs(&mut f.path);
        }
        abs(&mut self.data.valid);
        abs(&mut self.data.test);
        abs(&mut self.tokenizer.path);
        for set in &mut self.eval.sets {
            abs(&mut set.path);
        }
        // The cache belongs to where kiln runs, like `runs/`, not to the recipe's folder.
        let cache = &mut self.loader.cache_dir;
        if !cache.as_os_str().is_empty() && cache.is_relative() {
            if let Ok(abs) = std::path::absolute(&*cache) {
                *cache = abs;
            }
        }
    }

    /// The resolved recipe as TOML, every key written out.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a recipe always serialises")
    }
}

/// Bounds the code really has, each named where it is checked: token ids and positions are
/// 32-bit signed integers in the model's `Int` tensors; threads and queues are made up front.
pub const MAX_VOCAB: usize = i32::MAX as usize;
pub const MAX_POSITIONS_LIMIT: usize = i32::MAX as usize - 2;
pub const SINUSOID_POSITIONS: usize = 10_000;
pub const MAX_THREADS: usize = 1024;
pub const MAX_PREFETCH: usize = 65_536;
pub const MAX_DEVICES: usize = 256;
pub const MAX_EPOCHS: usize = 1_000_000;

/// Whether `name` is one plain path component, on every system kiln runs on: not empty, at most
/// 200 bytes, no separators (`/`, `\\`, `:`), no control characters, not hidden (so not `.` or
/// `..`), no surrounding spaces. Run names and checkpoint names must be: they become paths.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 200 && !name.starts_with('.') && !name.contains(['/', '\\', ':']) && !name.chars().any(char::is_control) && name.trim() == name
}

/// A recipe's `name` becomes `runs/<name>/`: [`is_plain_name`], or why not.
pub fn plain_name(name: &str) -> Result<(), String> {
    if is_plain_name(name) { Ok(()) } else { Err(format!("expected a plain name (letters, digits, -, _, no path separators), got {name:?}")) }
}

/// The resume rule, stated once: the sections a resumed run may change, and the keys of those
/// that it may not (the seed draws the batches and masks; a step's batch count hangs on
/// `train.accumulate` and `backend.devices`). Everything else shapes the model, the data or the
/// tokens, and must be the run's own.
pub const RESUMABLE_SECTIONS: [&str; 3] = ["train", "eval", "backend"];
pub const FIXED_ON_RESUME: [&str; 5] = ["train.seed", "train.accumulate", "train.best_metric", "train.best_set", "backend.devices"];

/// Keys that may change when resuming a run (see [`RESUMABLE_SECTIONS`]).
pub fn resumable_override(key: &str) -> bool {
    let section = key.split('.').next().unwrap_or("");
    RESUMABLE_SECTIONS.contains(&section) && !FIXED_ON_RESUME.contains(&key)
}

/// The resume rule in words, for errors.
pub fn resume_rule() -> String {
    let and = |items: Vec<String>| match items.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => items.join(""),
    };
    let sections = and(RESUMABLE_SECTIONS.iter().map(|s| format!("{s}.*")).collect());
    format!("only {sections} keys, except {}", and(FIXED_ON_RESUME.iter().map(|k| k.to_string()).collect()))
}

/// The first key (`prefix.key`) where two tables differ, with both values (`None`: absent),
/// skipping the keys in `ignore`. One comparison for recipes and checkpoints' architectures.
pub fn first_difference(prefix: &str, a: &toml::Table, b: &toml::Table, ignore: &[&str]) -> Option<(String, toml::Value, Option<toml::Value>)> {
    a.iter().filter(|(k, _)| !ignore.contains(&k.as_str())).find(|(k, v)| b.get(k.as_str()) != Some(*v)).map(|(k, v)| (format!("{prefix}.{k}"), v.clone(), b.get(k.as_str()).cloned()))
}

impl Recipe {
    /// The first key of the sections that fix a run (data, tokenizer, loader, model) where two
    /// recipes differ: what a `--resume` with a recipe file must agree on.
    pub fn run_difference(&self, other: &Recipe) -> Option<String> {
        let (a, b) = (toml::Value::try_from(self).ok()?, toml::Value::try_from(other).ok()?);
        ["data", "tokenizer", "loader", "model"].iter().find_map(|section| first_difference(section, a.get(section)?.as_table()?, b.get(section)?.as_table()?, &[]).map(|d| d.0))
    }
}

fn apply_override(table: &mut toml::Table, o: &Override) -> Result<(), RecipeError> {
    let parts: Vec<&str> = o.key.split('.').collect();
    let known = toml::Value::try_from(Recipe::default()).expect("defaults serialise");
    // Check the key exists in the schema, so a typo is caught before it is silently inserted.
    let mut cursor = &known;
    for (i, part) in parts.iter().enumerate() {
        match cursor.get(part) {
            Some(next) => cursor = next,
            None => {
                let parent = parts[..i].join(".");
                let expected: Vec<String> = match cursor.as_table() {
                    Some(t) => t.keys().map(|k| if parent.is_empty() { k.clone() } else { format!("{parent}.{k}") }).collect(),
                    None => vec![],
                };
                return Err(RecipeError {
                    origin: o.origin(),
                    key: o.key.clone(),
                    message: format!("no such recipe key; expected one of {}", expected.join(", ")),
                });
            }
        }
    }
    let mut t = table;
    for part in &parts[..parts.len() - 1] {
        let entry = t.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        t = entry.as_table_mut().ok_or_else(|| RecipeError {
            origin: o.origin(),
            key: o.key.clone(),
            message: format!("`{part}` is not a section in the recipe"),
        })?;
    }
    t.insert(parts[parts.len() - 1].to_string(), o.value());
    Ok(())
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

fn first_line(s: &str) -> String {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
}

/// 1-based line of `section.key` (or of `[section]` for a one-part key) in simple recipe text.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let mut parts = key.split('.');
    let section = parts.next()?;
    let field = parts.next();
    let mut current = String::new();
    let mut section_line = None;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            current = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            if current == section {
                section_line = Some(i + 1);
            }
            continue;
        }
        let Some((k, _)) = l.split_once('=') else { continue };
        let k = k.trim();
        match field {
            Some(f) if current == section && k == f => return Some(i + 1),
            Some(f) if current.is_empty() && k == format!("{section}.{f}") => return Some(i + 1),
            None if current.is_empty() && k == section => return Some(i + 1),
            _ => {}
        }
    }
    section_line
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "[data]\ntrain = \"c.tsv\"\n\n[train]\nlr = 0.001\nepochs = 2\n";

    /// `loader.max_tokens`: a number, `"auto"`, or a table by length; anything else, or a table
    /// out of order, names the key (and the line, from a file). The resolved recipe writes each
    /// form back as it was given.
    #[test]
    fn max_tokens_takes_a_number_auto_or_a_table_by_length() {
        let with = |v: &str| Recipe::parse(&format!("{GOOD}\n[loader]\nmax_tokens = {v}\n"), "r.toml", &[]);
        assert_eq!(with("2048").unwrap().loader.max_tokens, TokenLimit::Tokens(2048));
        assert_eq!(with("\"auto\"").unwrap().loader.max_tokens, TokenLimit::Auto);
        let table = with("[[32, 9000], [66, 6000]]").unwrap().loader.max_tokens;
        assert_eq!(table, TokenLimit::Table(vec![(32, 9000), (66, 6000)]));
        assert_eq!((table.at(10), table.at(32), table.at(33), table.at(500)), (Some(9000), Some(9000), Some(6000), Some(6000)));
        for v in ["2048", "\"auto\"", "[[32, 9000], [66, 6000]]"] {
            let r = with(v).unwrap();
            let again = Recipe::parse(&r.to_toml(), "resolved.toml", &[]).unwrap();
            assert_eq!(again.loader.max_tokens, r.loader.max_tokens, "{v}");
        }
        let o = Recipe::parse(GOOD, "r.toml", &[Override::parse("loader.max_tokens=auto").unwrap()]).unwrap();
        assert_eq!(o.loader.max_tokens, TokenLimit::Auto);
        for (v, needle) in [
            ("\"big\"", "\"auto\""),
            ("-5", "-5"),
            ("[[66, 6000], [32, 9000]]", "increasing length"),
            ("[[32, 20]]", "[32, 20]"),
            ("[[32, 9000, 1]]", "[longest side, tokens]"),
            ("[[16, 600], [32, 60]]", "data.max_len + 2"),
        ] {
            let e = with(v).unwrap_err();
            assert_eq!(e.key, "loader.max_tokens", "{v}: {e}");
            assert!(e.to_string().contains(needle), "{v}: {e}");
            assert!(e.origin.starts_with("r.toml"), "{v}: {e}");
        }
    }

    #[test]
    fn backend_devices_are_one_kind_and_each_once() {
        let with = |v: &str, extra: &str| Recipe::parse(&format!("{GOOD}{extra}\n[backend]\ndevices = {v}\n"), "r.toml", &[]);
        assert_eq!(with("[\"cuda:0\", \"cuda:1\"]", "").unwrap().backend.devices, vec!["cuda:0", "cuda:1"]);
        assert_eq!(with("[\"cpu\", \"cpu\"]", "").unwrap().backend.devices.len(), 2);
        for (v, extra, key, needle) in [
            ("[\"wgpu\", \"cuda:0\"]", "", "backend.devices", "one kind"),
            ("[\"auto\", \"auto\"]", "", "backend.devices", "named devices"),
            ("[\"wgpu:discrete:0\", \"wgpu:discrete:1\"]", "", "backend.devices", "no collective operations"),
            ("[\"cuda:0\", \"cpu\"]", "", "backend.devices", "one kind"),
            ("[\"cuda:1\", \"cuda:1\"]", "", "backend.devices", "once"),
            ("[\"tpu\"]", "", "backend.devices", "\"tpu\""),
        ] {
            let e = with(v, extra).unwrap_err();
            assert_eq!(e.key, key, "{v}: {e}");
            assert!(e.to_string().contains(needle), "{v}: {e}");
        }
        assert!(!resumable_override("backend.devices"), "a step's batch count hangs on it, like train.accumulate");
        assert!(!resumable_override("train.best_set"), "the best so far was measured on that set");
        assert_eq!(resume_rule(), "only train.*, eval.* and backend.* keys, except train.seed, train.accumulate, train.best_metric, train.best_set and backend.devices");
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let r = Recipe::parse(GOOD, "r.toml", &[]).unwrap();
        assert_eq!(r.train.lr, 0.001);
        assert_eq!(r.train.sync_interval, 10);
        assert_eq!(r.model.d_model, 256);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "[data]\ntrain = \"c.tsv\"\n[train]\nlr = 0.001\nlrr = 3\n";
        let e = Recipe::parse(text, "r.toml", &[]).unwrap_err();
        assert_eq!(e.origin, "r.toml:5");
        assert_eq!(e.key, "train.lrr");
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn wrong_type_names_key() {
        let text = "[data]\ntrain = \"c.tsv\"\n[model]\nd_model = \"big\"\n";
        let e = Recipe::parse(text, "r.toml", &[]).unwrap_err();
        assert_eq!(e.key, "model.d_model");
        assert_eq!(e.origin, "r.toml:4");
        assert!(e.message.contains("invalid type"), "{e}");
    }

    #[test]
    fn out_of_range_value_is_rejected() {
        let text = "[data]\ntrain = \"c.tsv\"\n[train]\nlabel_smoothing = 1.5\n";
        let e = Recipe::parse(text, "r.toml", &[]).unwrap_err();
        assert_eq!(e.key, "train.label_smoothing");
        assert_eq!(e.origin, "r.toml:4");
        assert!(e.message.contains("[0, 1)"), "{e}");
        let text = "[data]\ntrain = \"c.tsv\"\n[model]\nd_model = 100\nn_heads = 3\n";
        assert_eq!(Recipe::parse(text, "r.toml", &[]).unwrap_err().key, "model.n_heads");
    }

    /// Named validation sets and several training corpora: refused with the key at fault.
    #[test]
    fn dev_sets_and_corpora_are_checked() {
        let base = "[data]\ntrain = \"c.tsv\"\n";
        let err = |extra: &str| Recipe::parse(&format!("{base}{extra}"), "r.toml", &[]).err().map(|e| (e.key, e.message));
        assert_eq!(err("[[eval.sets]]\nname = \"news\"\npath = \"n.tsv\"\n[train]\nbest_set = \"news\"\n"), None);
        let (key, why) = err("[[eval.sets]]\nname = \"a\"\npath = \"a.tsv\"\n[[eval.sets]]\nname = \"a\"\npath = \"b.tsv\"\n").unwrap();
        assert_eq!(key, "eval.sets");
        assert!(why.contains("taken"), "{why}");
        assert_eq!(err("[[eval.sets]]\nname = \"valid\"\npath = \"a.tsv\"\n").unwrap().0, "eval.sets");
        assert_eq!(err("[[eval.sets]]\nname = \"a/b\"\npath = \"a.tsv\"\n").unwrap().0, "eval.sets");
        let (key, why) = err("[train]\nbest_set = \"news\"\n").unwrap();
        assert_eq!((key.as_str(), why.as_str()), ("train.best_set", "expected one of valid, got \"news\""));
        let mixed = "[data]\ntrain = [\"a.tsv\", { path = \"b.tsv\", weight = 0.0 }]\n";
        assert_eq!(Recipe::parse(mixed, "r.toml", &[]).unwrap_err().key, "data.train");
        let both = "[data]\ntrain = [\"a.tsv\", { path = \"b.tsv\", weight = 2.0 }]\ntemperature = 2.0\n";
        assert_eq!(Recipe::parse(both, "r.toml", &[]).unwrap_err().key, "data.temperature");
        let text = "[data]\nformat = \"text\"\ntrain = [\"a.txt\", \"b.txt\"]\n[model]\nfamily = \"lm\"\n";
        assert_eq!(Recipe::parse(text, "r.toml", &[]).unwrap_err().key, "data.train");
    }

    #[test]
    fn syntax_error_names_line() {
        let e = Recipe::parse("[data]\ntrain = \n", "r.toml", &[]).unwrap_err();
        assert_eq!(e.origin, "r.toml:2");
    }

    #[test]
    fn overrides_are_validated_like_the_file() {
        let o = [Override::parse("train.lr=0.01").unwrap(), Override::parse("tokenizer.kind=bpe").unwrap()];
        let r = Recipe::parse(GOOD, "r.toml", &o).unwrap();
        assert_eq!(r.train.lr, 0.01);
        assert_eq!(r.tokenizer.kind, TokenizerKind::Bpe);

        let e = Recipe::parse(GOOD, "r.toml", &[Override::parse("train.sync_interval=0").unwrap()]).unwrap_err();
        assert_eq!(e.origin, "--set train.sync_interval=0");
        assert_eq!(e.key, "train.sync_interval");

        let e = Recipe::parse(GOOD, "r.toml", &[Override::parse("train.nope=1").unwrap()]).unwrap_err();
        assert_eq!(e.key, "train.nope");
        assert!(e.message.contains("no such recipe key"), "{e}");

        let e = Recipe::parse(GOOD, "r.toml", &[Override::parse("train.epochs=many").unwrap()]).unwrap_err();
        assert_eq!(e.key, "train.epochs");
        assert!(Override::parse("train").is_err());
    }

    #[test]
    fn resolved_recipe_round_trips() {
        let r = Recipe::parse(GOOD, "r.toml", &[]).unwrap();
        let again = Recipe::parse(&r.to_toml(), "recipe.toml", &[]).unwrap();
        assert_eq!(r, again);
    }

    /// Fuzzing: recipe text mutated at random (bytes replaced, inserted, deleted, lines cut) and
    /// random `--set` overrides never panic; every refusal is one line naming where.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const SMOKE: &str = include_str!("../../../recipes/smoke.toml");

        fn check(text: &str, overrides: &[Override]) {
            match Recipe::parse(text, "r.toml", overrides) {
                Ok(r) => {
                    // An accepted recipe is valid and survives its own round trip.
                    assert!(r.validate().is_ok());
                    let again = Recipe::parse(&r.to_toml(), "resolved.toml", &[]).expect("a resolved recipe parses");
                    assert_eq!(again.to_toml(), r.to_toml());
                }
                Err(e) => {
                    let line = e.to_string();
                    assert!(!line.contains('\n'), "one line: {line:?}");
                    assert!(line.starts_with("r.toml") || line.starts_with("--set"), "names where: {line:?}");
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

            #[test]
            fn mutated_recipes_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<char>()), 1..8)) {
                let mut text: Vec<char> = SMOKE.chars().collect();
                for (at, op, c) in edits {
                    let i = at.index(text.len().max(1)).min(text.len());
                    match op {
                        0 if i < text.len() => text[i] = c,
                        1 => text.insert(i, c),
                        2 if i < text.len() => { text.remove(i); }
                        _ => text.truncate(i),
                    }
                }
                check(&text.into_iter().collect::<String>(), &[]);
            }

            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
                check(&text, &[]);
            }

            #[test]
            fn random_overrides_never_panic(
                key in prop::sample::select(vec!["train.lr", "train.epochs", "model.d_model", "loader.max_tokens", "data.format", "train.on_nan", "tokenizer.kind", "backend.device", "x.y", "train.nope", "model.dropout"]),
                value in "[-0-9a-z.\"e+\\[\\]{}=:]{0,12}",
            ) {
                if let Ok(o) = Override::parse(&format!("{key}={value}")) {
                    check(SMOKE, &[o]);
                }
            }
        }
    }
}
