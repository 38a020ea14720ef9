//! The built-in model families and the recipe launch: from a resolved recipe and a run directory
//! to a trained model, its checkpoints and its event stream. [`launch`] picks the backend and
//! device, prepares the data and hands the recipe's family ([`registry`]) to kiln's
//! [`kiln_train::Trainer`], as any library user does. Also the commands that use a trained
//! model (`infer`), evaluation (`evaluate`) and the benchmarks (`bench`).

pub mod average;
pub mod bench;
pub mod evaluate;
pub mod export;
pub mod family;
pub mod flops;
pub mod infer;
pub mod registry;
pub mod rundir;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use burn::tensor::backend::AutodiffBackend;
use kiln_data::prepare::TokenizerSource;
use kiln_events::{Event, EventSink, Summary};
use kiln_recipe::Recipe;


pub use kiln_train::{resolve_device, DeviceChoice, Split};
use kiln_train::{autobatch, checkpoint, step, trainer, Task, TrainData, Trainer};
pub use kiln_model::sampling::Sampling;
pub use kiln_model::seq2seq::BeamSettings;


/// A run to start or continue.
pub struct Launch {
    /// The resolved recipe (for a resume: the run directory's, with allowed overrides applied).
    pub recipe: Recipe,
    pub run_dir: PathBuf,
    /// Continue from this checkpoint directory (see [`checkpoint::resume_point`]).
    pub resume: Option<PathBuf>,
    /// Pause and stop requests from the dashboard or signal handlers.
    pub control: kiln_events::Control,
    /// A measurement run (`kiln bench train`): per-step times go here; no validation, no saves.
    pub step_times: Option<trainer::StepTimes>,
    /// The commit kiln was built from, for the run's header (`""`: not known).
    pub commit: String,
    /// Multi-node (`--nodes`): this process's place among the nodes.
    pub nodes: Option<kiln_train::nodes::NodeGroup>,
}

/// Prepares the run directory and data, then trains on the recipe's device.
pub fn launch(launch: &Launch, sink: &mut (dyn EventSink + Send)) -> Result<Summary> {
    let recipe = &launch.recipe;
    if recipe.backend.devices.len() > 1 {
        return launch_data_parallel(launch, sink);
    }
    let device_spec = recipe.backend.devices.first().unwrap_or(&recipe.backend.device);
    let resolved = resolve_device(device_spec)?;
    if let Some(why) = &resolved.note {
        note(sink, why.clone())?;
    }
    let auto = if device_spec == "auto" { "; auto" } else { "" };
    if resolved.choice == DeviceChoice::Cpu {
        cpu_precision_note(recipe, sink)?;
    }
    if recipe.backend.threads > 0 {
        // Only the first call in a process can size the global pool; later calls keep it.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(recipe.backend.threads).build_global();
    }
    match resolved.choice {
        DeviceChoice::Cpu => {
            type B = burn::backend::Autodiff<burn::backend::Flex>;
            let parts = step::HostStep::for_backend::<B>(recipe.backend.cpu_split).parts;
            // Replicas (a node of several) run their batches whole.
            let split = if parts > 1 && launch.nodes.is_none() { format!(", batches in {parts} parts") } else { String::new() };
            let name = format!("cpu (flex, {} threads{split}{auto})", rayon::current_num_threads());
            let memory = autobatch::HostMemory::new().map(|m| Box::new(m) as Box<dyn autobatch::MemoryMeter>);
            train_on::<B>(launch, Default::default(), Vec::new(), name, memory, None, sink)
        }
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu(adapter) => {
            type B = burn::backend::Autodiff<burn::backend::Wgpu>;
            kiln_train::device::keep_kernel_choices_in(&launch.run_dir);
            let opened = kiln_train::wgpu_device::open(adapter, 0, device_spec).map_err(|m| anyhow!(m))?;
            wgpu_precision_check(recipe, &opened.info)?;
            let memory = match recipe.loader.max_tokens {
                kiln_recipe::TokenLimit::Auto if launch.resume.is_none() => Some(Box::new(kiln_train::wgpu_device::WgpuMemory::new(&opened).map_err(|m| anyhow!(m))?) as Box<dyn autobatch::MemoryMeter>),
                _ => None,
            };
            let name = format!("wgpu:{} ({adapter}{auto})", opened.info.describe());
            let reader = wgpu_memory_reader(opened.device.clone());
            train_on::<B>(launch, opened.device, Vec::new(), name, memory, Some(reader), sink)
        }
        #[cfg(not(feature = "wgpu"))]
        DeviceChoice::Wgpu(_) => unreachable!("resolve_device refuses wgpu in builds without it"),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(index) => {
            type B = burn::backend::Autodiff<burn::backend::Cuda>;
            kiln_train::device::keep_kernel_choices_in(&launch.run_dir);
            let device = burn::backend::cuda::CudaDevice::new(index);
            // The meter asks nvidia-smi for the GPU's size: only when a budget is to be probed.
            let memory = match recipe.loader.max_tokens {
                kiln_recipe::TokenLimit::Auto if launch.resume.is_none() => Some(Box::new(autobatch::CudaMemory::new(index).map_err(|m| anyhow!(m))?) as Box<dyn autobatch::MemoryMeter>),
                _ => None,
            };
            let reader: kiln_train::trainer::DeviceMemory = Arc::new(move || autobatch::cuda_memory_use(index));
            train_on::<B>(launch, device, Vec::new(), format!("cuda:{index}{}", if auto.is_empty() { "" } else { " (auto)" }), memory, Some(reader), sink)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => unreachable!("resolve_device refuses CUDA in CPU-only builds"),
    }
}

/// Data parallel over `backend.devices` (two or more): one process, a model replica per device,
/// gradients all-reduced with Burn's collective ([`trainer`]). All CPU (replicas as threads on the
/// one CPU: the path, not a speed-up) or all CUDA.
fn launch_data_parallel(launch: &Launch, sink: &mut (dyn EventSink + Send)) -> Result<Summary> {
    let recipe = &launch.recipe;
    let specs = &recipe.backend.devices;
    let mut choices = Vec::new();
    for spec in specs {
        let resolved = resolve_device(spec).map_err(|e| anyhow!("{}", e.to_string().replacen("backend.device =", "backend.devices:", 1)))?;
        choices.push(resolved.choice);
    }
    if recipe.backend.threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(recipe.backend.threads).build_global();
    }
    let n = choices.len();
    match choices[0] {
        DeviceChoice::Cpu => {
            type B = burn::backend::Autodiff<burn::backend::Flex>;
            cpu_precision_note(recipe, sink)?;
            note(sink, format!("backend.devices: {n} replicas on the CPU share its {} threads: this runs the data-parallel path, it is not faster than one", rayon::current_num_threads()))?;
            let name = format!("cpu ×{n} (flex, {} threads, data parallel)", rayon::current_num_threads());
            let memory = autobatch::HostMemory::new().map(|m| Box::new(m) as Box<dyn autobatch::MemoryMeter>);
            train_on::<B>(launch, Default::default(), vec![Default::default(); n - 1], name, memory, None, sink)
        }
        DeviceChoice::Wgpu(_) => unreachable!("the recipe check refuses data parallel over wgpu devices"),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(_) => {
            type B = burn::backend::Autodiff<burn::backend::Cuda>;
            let index = |c: &DeviceChoice| match c {
                DeviceChoice::Cuda(i) => *i,
                _ => unreachable!("the recipe check keeps devices of one kind"),
            };
            kiln_train::device::keep_kernel_choices_in(&launch.run_dir);
            let devices: Vec<_> = choices.iter().map(|c| burn::backend::cuda::CudaDevice::new(index(c))).collect();
            let name = format!("{} (data parallel)", specs.join(", "));
            let memory = match recipe.loader.max_tokens {
                kiln_recipe::TokenLimit::Auto if launch.resume.is_none() => Some(Box::new(autobatch::CudaMemory::new(index(&choices[0])).map_err(|m| anyhow!(m))?) as Box<dyn autobatch::MemoryMeter>),
                _ => None,
            };
            let first = index(&choices[0]);
            let reader: kiln_train::trainer::DeviceMemory = Arc::new(move || autobatch::cuda_memory_use(first));
            train_on::<B>(launch, devices[0].clone(), devices[1..].to_vec(), name, memory, Some(reader), sink)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => unreachable!("resolve_device refuses CUDA in CPU-only builds"),
    }
}

fn train_on<B: AutodiffBackend>(
    launch: &Launch,
    device: B::Device,
    replica_devices: Vec<B::Device>,
    device_name: String,
    memory: Option<Box<dyn autobatch::MemoryMeter>>,
    device_memory: Option<kiln_train::trainer::DeviceMemory>,
    sink: &mut (dyn EventSink + Send),
) -> Result<Summary> {
    let recipe = &launch.recipe;
    let data = prepare_data(launch, sink)?;
    let device_name = match recipe.train.precision {
        kiln_recipe::Precision::F32 => device_name,
        kiln_recipe::Precision::Bf16 => format!("{device_name}, bf16 products"),
        kiln_recipe::Precision::F16 => format!("{device_name}, f16 products"),
    };
    let device_name = match &launch.nodes {
        Some(g) => format!("{device_name}; node {} of {} nodes", g.rank, g.nodes),
        None => device_name,
    };
    let run = FamilyRun::<B> { launch, device, replica_devices, device_name, memory, device_memory, data };
    registry::dispatch(recipe.model.family, FitFamily { run, sink })
}

/// Training of one family (the registry picks it from `model.family`).
struct FitFamily<'a, 's, B: AutodiffBackend> {
    run: FamilyRun<'a, B>,
    sink: &'s mut (dyn EventSink + Send),
}

impl<B: AutodiffBackend> registry::UseFamily for FitFamily<'_, '_, B> {
    type Output = Result<Summary>;

    fn with<F: registry::Family>(self) -> Result<Summary> {
        F::fit(self.run, self.sink)
    }
}

/// Ordinary (non-special) ids for the probe's synthetic batches, varied so no kernel sees a constant.
pub(crate) fn probe_token(vocab: usize, i: usize) -> u32 {
    let vocab = vocab.max(5) as u32;
    4 + (i as u32).wrapping_mul(2_654_435_761) % (vocab - 4)
}

/// Reads, splits, tokenizes (or loads from the cache) the run's corpus, with progress notes.
fn prepare_data(launch: &Launch, sink: &mut (dyn EventSink + Send)) -> Result<Arc<kiln_data::Prepared>> {
    let recipe = &launch.recipe;
    let run_dir = &launch.run_dir;
    let tokenizer_path = run_dir.join("tokenizer.json");
    let source = if launch.resume.is_some() { TokenizerSource::Load(&tokenizer_path) } else { TokenizerSource::TrainAndSave(&tokenizer_path) };
    let cache_dir = Some(recipe.loader.cache_dir.as_path()).filter(|p| !p.as_os_str().is_empty());
    // Progress of slow preparations: the views decide how often to show it.
    let sink = std::cell::RefCell::new(sink);
    let unit = if recipe.data.format == kiln_recipe::CorpusFormat::Text { "lines" } else { "pairs" };
    let progress = |stage: kiln_data::Stage| {
        let event = match stage {
            kiln_data::Stage::TrainingTokenizer { sentences } => Event::Note(format!("training the tokenizer on {sentences} sentences…")),
            kiln_data::Stage::Encoding { corpus, done, total } => {
                let file = recipe.data.train.files().get(corpus).map(|f| f.path.file_name().map_or_else(|| f.path.display().to_string(), |n| n.to_string_lossy().into_owned())).unwrap_or_default();
                Event::Progress(kiln_events::Progress { what: format!("tokenizing {file}"), done: done as u64, total: total as u64, unit: unit.into() })
            }
        };
        // A failing log sink surfaces at the next note the trainer sends.
        let _ = sink.borrow_mut().emit(&event);
    };
    let data = kiln_data::prepare(recipe, source, cache_dir, &progress).map_err(|e| anyhow!("{e}"))?;
    let sink = sink.into_inner();
    if let Some(why) = &data.cache.note {
        note(sink, why.clone())?;
    }
    let report = kiln_events::DataReport {
        sizes: match &data.text {
            Some(t) => format!("{} train, {} valid, {} test tokens of text", t.train.len(), t.valid.len(), t.test.len()),
            None if data.mix.is_empty() => format!("{} train, {} valid, {} test pairs", data.train.len(), data.valid.examples.len(), data.test.examples.len()),
            None => {
                let more: usize = data.mix.iter().map(|c| c.pairs.len()).sum();
                format!("{} train (+ {more} in {} more corpora), {} valid, {} test pairs", data.train.len(), data.mix.len(), data.valid.examples.len(), data.test.examples.len())
            }
        },
        vocab_size: data.tokenizer.vocab_size(),
        dropped_long: data.dropped_long + data.mix.iter().map(|c| c.dropped_long).sum::<usize>(),
        skipped_lines: data.skipped_lines + data.mix.iter().map(|c| c.skipped_lines).sum::<usize>(),
        cache: match (&data.cache.path, data.cache.hit) {
            (Some(_), true) => kiln_events::CacheUse::Hit,
            (Some(_), false) => kiln_events::CacheUse::Miss,
            (None, _) => kiln_events::CacheUse::Off,
        },
        cache_path: data.cache.path.as_ref().map(|p| p.display().to_string()),
        prepare_s: data.prepare_s,
    };
    sink.emit(&Event::Data(report)).map_err(|m| anyhow!(m))?;
    if data.unknown_tokens > 0 {
        note(sink, format!("{} tokens are <unk>: characters the tokenizer has no token for", data.unknown_tokens))?;
    }
    Ok(Arc::new(data))
}

/// A synthetic batch of (length, rows) on a device, for the batch-size probe.
type ProbeBatch<'a, B, T> = dyn Fn(usize, usize, &burn::tensor::Device<B>) -> <T as Task<B>>::Batch + 'a;

/// A built-in family's run on backend `B`: the batch-size probe where the recipe asks for it,
/// then the family's task and data handed to [`Trainer`].
pub struct FamilyRun<'a, B: AutodiffBackend> {
    launch: &'a Launch,
    pub(crate) device: B::Device,
    replica_devices: Vec<B::Device>,
    device_name: String,
    memory: Option<Box<dyn autobatch::MemoryMeter>>,
    device_memory: Option<kiln_train::trainer::DeviceMemory>,
    pub(crate) data: Arc<kiln_data::Prepared>,
}

impl<B: AutodiffBackend> FamilyRun<'_, B> {
    /// The recipe of the run.
    pub fn recipe(&self) -> &Recipe {
        &self.launch.recipe
    }

    /// The family's model on the run's device, its weights drawn from `train.seed` on the host
    /// (Flex) and moved there, so that a seed means the same model on every device. On the CPU
    /// the model is drawn in place: the same draws in the same order, without the copy.
    pub(crate) fn initial_model<F: registry::Family>(&self, vocab_size: usize) -> Result<F::Model<B>> {
        let recipe = self.recipe();
        if step::is_host_backend::<B>() {
            B::seed(&self.device, recipe.train.seed);
            let model = F::build::<B>(recipe, vocab_size, &self.device);
            trainer::create_params(&model);
            return Ok(model);
        }
        let host = Default::default();
        <burn::backend::Flex as burn::tensor::backend::Backend>::seed(&host, recipe.train.seed);
        let drawn = F::build::<burn::backend::Flex>(recipe, vocab_size, &host);
        trainer::create_params(&drawn);
        trainer::weights_from_host(drawn, F::build::<B>(recipe, vocab_size, &self.device), &self.device)
    }

    /// Refuses a model that cannot fit the device before it is allocated (where the device's
    /// memory can be measured).
    pub(crate) fn check_model_fits(&self, vocab_size: usize) -> Result<()> {
        match &self.memory {
            Some(meter) => family::check_model_fits(self.recipe(), vocab_size, meter.capacity(), &self.device_name),
            None => Ok(()),
        }
    }

    /// Trains a family's task and model on its data: the probe where the recipe asks for it,
    /// then [`Trainer`].
    #[allow(clippy::too_many_arguments)] // a family's parts, each its own
    pub(crate) fn fit<T, D>(
        self,
        task_for: impl Fn(&Recipe) -> T,
        model: T::Model,
        probe_lengths: &[usize],
        probe_batch: &ProbeBatch<'_, B, T>,
        data_for: impl FnOnce(&Recipe) -> Result<(D, Option<String>)>,
        sink: &mut (dyn EventSink + Send),
    ) -> Result<Summary>
    where
        T: Task<B>,
        D: TrainData<B, Batch = T::Batch>,
        Trainer<B, T>: Send,
    {
        let FamilyRun { launch, device, replica_devices, device_name, memory, device_memory, data } = self;
        let recipe = &launch.recipe;
        // The parameters are created from the seed before the probe copies the model.
        B::seed(&device, recipe.train.seed);
        trainer::create_params(&model);
        // `loader.max_tokens = "auto"`: the budget table is probed now (or read back on a resume,
        // so the batches stay those the run started with) and stands in for the key from here on.
        let mut recipe = recipe.clone();
        if recipe.loader.max_tokens == kiln_recipe::TokenLimit::Auto {
            let table = match &launch.resume {
                Some(_) => autobatch::read(&launch.run_dir).map_err(|m| anyhow!(m))?,
                None => {
                    let mut meter = memory;
                    let meter = meter.as_deref_mut().ok_or_else(|| anyhow!("loader.max_tokens = \"auto\": the memory of {device_name} cannot be measured; give loader.max_tokens a number"))?;
                    let _autocast = kiln_model::autocast::enter(compute_dtype(recipe.train.precision));
                    let make = |len: usize, n: usize| probe_batch(len, n, &device);
                    let table = autobatch::probe(&task_for(&recipe), &model, &recipe.train, recipe.backend.cpu_split, &device, &device_name, meter, probe_lengths, recipe.loader.auto_token_cap, &make).map_err(|m| anyhow!(m))?;
                    autobatch::write(&launch.run_dir, &table).map_err(|m| anyhow!(m))?;
                    table
                }
            };
            if launch.resume.is_some() {
                note(sink, format!("loader.max_tokens = \"auto\": the budgets probed when the run started ({})", autobatch::FILE))?;
            }
            for line in table.lines() {
                note(sink, line)?;
            }
            recipe.loader.max_tokens = kiln_recipe::TokenLimit::Table(table.budget_rows());
        }
        let (train_data, data_note) = data_for(&recipe)?;
        if let Some(line) = data_note {
            note(sink, line)?;
        }
        let mut trainer = Trainer::new(task_for(&recipe), model, device)
            .settings(recipe.train.clone())
            .name(recipe.name.clone())
            .run_dir(launch.run_dir.clone())
            .device_name(device_name)
            .loader(recipe.loader.workers, recipe.loader.prefetch)
            .cpu_split(recipe.backend.cpu_split)
            .resume(launch.resume.clone())
            // The run's recipe and tokenizer are fixed for its life (a resume changes keys with
            // `--set`, never the file): a checkpoint refuses either once edited or damaged.
            .guard_run_file("recipe.toml")
            .guard_run_file("tokenizer.json")
            .control(launch.control.clone())
            .commit(launch.commit.clone())
            .replicas(replica_devices)
            .data_figures(kiln_events::DataFigures { cache_hit: data.cache.hit, prepare_s: data.prepare_s, padding_pct: 0.0 });
        if let Some(group) = &launch.nodes {
            let mut group = group.clone();
            group.agreement = node_agreement(&recipe, &data).to_vec();
            trainer = trainer.nodes(group);
        }
        if let Some(times) = &launch.step_times {
            trainer = trainer.measure_steps(times.clone());
        }
        if let Some(read) = device_memory {
            trainer = trainer.device_memory(read);
        }
        trainer.fit(&train_data, sink)
    }
}

/// What the nodes of a run must agree on, from the recipe and the prepared data: the sections
/// that fix the training (paths and this machine's loader threads and cache left out: they may
/// differ between machines), the device count, and the data itself — the tokenizer and every
/// token id — so nodes whose corpora or tokenizers differ are refused, wherever their files are.
fn node_agreement(recipe: &Recipe, data: &kiln_data::Prepared) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let mut table = toml::Value::try_from(recipe).ok().and_then(|t| t.as_table().cloned()).unwrap_or_default();
    let paths: [(&str, &[&str]); 2] = [("data", &["train", "valid", "test"]), ("tokenizer", &["path"])];
    for (section, keys) in paths {
        if let Some(t) = table.get_mut(section).and_then(|t| t.as_table_mut()) {
            for key in keys {
                t.remove(*key);
            }
        }
    }
    for section in ["data", "tokenizer", "model", "train"] {
        if let Some(t) = table.get(section) {
            h.update(format!("[{section}]{t}").as_bytes());
        }
    }
    // The corpora's paths are left out above, not how they are mixed.
    let mixing: Vec<(f64, Option<bool>)> = recipe.data.train.files().iter().map(|f| (f.weight, f.swap)).collect();
    h.update(format!("{mixing:?}").as_bytes());
    let loader = &recipe.loader;
    h.update(format!("{:?}|{}|{}|{}", loader.max_tokens, loader.max_sentences, loader.bucket_pool, recipe.backend.devices.len().max(1)).as_bytes());
    h.update(data.tokenizer.to_json().as_bytes());
    // Each sequence as its length (u64) then its ids (u32), little-endian, buffered.
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut ids = |xs: kiln_data::Ids<'_>| {
        buf.extend_from_slice(&(xs.len() as u64).to_le_bytes());
        for x in xs.iter() {
            buf.extend_from_slice(&x.to_le_bytes());
            if buf.len() >= 1 << 16 {
                h.update(&buf);
                buf.clear();
            }
        }
    };
    for set in std::iter::once(&data.train).chain(data.mix.iter().map(|c| &c.pairs)) {
        for i in 0..set.len() {
            ids(set.src(i));
            ids(set.tgt(i));
        }
    }
    for e in data.valid.examples.iter().chain(&data.test.examples) {
        ids(kiln_data::Ids::U32(&e.src));
        ids(kiln_data::Ids::U32(&e.tgt));
    }
    if let Some(text) = &data.text {
        ids(text.train.ids());
        ids(text.valid.ids());
        ids(text.test.ids());
    }
    drop(ids);
    h.update(&buf);
    *h.finalize().as_bytes()
}

/// Half precision on the CPU runs, but slower than f32: says so.
fn cpu_precision_note(recipe: &Recipe, sink: &mut dyn EventSink) -> Result<()> {
    match recipe.train.precision {
        kiln_recipe::Precision::F32 => Ok(()),
        kiln_recipe::Precision::Bf16 => note(sink, "train.precision = \"bf16\" on the CPU: Flex rounds the products' operands and results to bf16 but multiplies in f32, so this gives bf16's numerics without its speed".into()),
        kiln_recipe::Precision::F16 => note(sink, "train.precision = \"f16\" on the CPU: f16 products with dynamic loss scaling, slower than f32 here; it checks the path".into()),
    }
}

pub use kiln_train::compute_dtype;

/// Half precision on a wgpu adapter: f16 where its shaders have f16 (wgpu's `SHADER_F16`); bf16
/// nowhere (WGSL, the language CubeCL compiles to for wgpu, has no bf16 type).
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
fn wgpu_precision_check(recipe: &Recipe, adapter: &kiln_train::device::AdapterInfo) -> Result<()> {
    match recipe.train.precision {
        kiln_recipe::Precision::F32 => Ok(()),
        kiln_recipe::Precision::F16 if adapter.shader_f16 => Ok(()),
        kiln_recipe::Precision::F16 => bail!("train.precision = \"f16\": {} has no f16 in shaders (wgpu feature SHADER_F16); use \"f32\" on this adapter", adapter.describe()),
        kiln_recipe::Precision::Bf16 => bail!("train.precision = \"bf16\": wgpu's shading language (WGSL) has no bf16 type; use \"f16\" where the adapter has it, or \"f32\""),
    }
}

/// CubeCL's memory on the run's wgpu device, for the windows' rows.
#[cfg(feature = "wgpu")]
fn wgpu_memory_reader(device: burn::backend::wgpu::WgpuDevice) -> kiln_train::trainer::DeviceMemory {
    Arc::new(move || kiln_train::wgpu_device::memory_use(&device))
}

fn note(sink: &mut dyn EventSink, text: String) -> Result<()> {
    sink.emit(&Event::Note(text)).map_err(|m| anyhow!(m))
}

/// The recipe to continue `run_dir` with: its resolved `recipe.toml` plus overrides that do not
/// change the model, data or tokens.
pub fn resume_recipe(run_dir: &Path, overrides: &[kiln_recipe::Override]) -> Result<Recipe> {
    let path = run_dir.join("recipe.toml");
    if !path.is_file() {
        bail!("{}: not a kiln run directory (no recipe.toml)", run_dir.display());
    }
    for o in overrides {
        if !kiln_recipe::resumable_override(&o.key) {
            bail!("--set {}={}: cannot change {} when resuming ({})", o.key, o.raw, o.key, kiln_recipe::resume_rule());
        }
    }
    Ok(Recipe::load(&path, overrides)?)
}

/// Runs `f` on the inference backend of a run (its `backend.device`), in the run's precision.
macro_rules! on_backend {
    ($run:expr, $f:ident ( $($arg:expr),* )) => {{
        // The run's `train.precision`, as in training's validation, so figures agree with the log.
        let _autocast = kiln_model::autocast::enter(compute_dtype($run.recipe.train.precision));
        match resolve_device(&$run.recipe.backend.device)?.choice {
            DeviceChoice::Cpu => infer::$f::<burn::backend::Flex>($($arg,)* &Default::default()),
            #[cfg(feature = "wgpu")]
            DeviceChoice::Wgpu(adapter) => {
                kiln_train::device::keep_kernel_choices_in(&$run.run_dir);
                let opened = kiln_train::wgpu_device::open(adapter, 0, &$run.recipe.backend.device).map_err(|m| anyhow!(m))?;
                wgpu_precision_check(&$run.recipe, &opened.info)?;
                infer::$f::<burn::backend::Wgpu>($($arg,)* &opened.device)
            }
            #[cfg(not(feature = "wgpu"))]
            DeviceChoice::Wgpu(_) => unreachable!("resolve_device refuses wgpu in builds without it"),
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda(index) => {
                kiln_train::device::keep_kernel_choices_in(&$run.run_dir);
                infer::$f::<burn::backend::Cuda>($($arg,)* &burn::backend::cuda::CudaDevice::new(index))
            }
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda(_) => unreachable!("resolve_device refuses CUDA in CPU-only builds"),
        }
    }};
}

/// `--beam K`: at least 1, and at most the vocabulary (from the first step on, a wider beam can
/// only hold duplicates; its tensors grow with K).
fn check_beam(run: &infer::RunModel, beam: &kiln_model::seq2seq::BeamSettings) -> Result<()> {
    let vocab = run.tokenizer.vocab_size();
    if beam.beam == 0 || beam.beam > vocab {
        bail!("--beam: expected an integer in [1, {vocab}] (the run's vocabulary), got {}", beam.beam);
    }
    Ok(())
}

/// Translates lines with a run's model (`kiln translate`).
pub fn translate(run: &infer::RunModel, lines: &[String], beam: kiln_model::seq2seq::BeamSettings) -> Result<Vec<String>> {
    check_beam(run, &beam)?;
    on_backend!(run, translate_lines(run, lines, beam))
}

/// The `n` best translations of each line with their scores (`kiln translate --n-best`); `n` is
/// at most the beam.
pub fn translate_n_best(run: &infer::RunModel, lines: &[String], beam: kiln_model::seq2seq::BeamSettings, n: usize) -> Result<Vec<Vec<(String, f64)>>> {
    check_beam(run, &beam)?;
    check_n_best(n, &beam)?;
    on_backend!(run, translate_lines_n_best(run, lines, beam, n))
}

/// Loads a run's translation model once on its device and runs `serve` with it on this thread
/// (`kiln serve`'s decoding thread).
pub fn with_translator(run: &infer::RunModel, serve: impl FnOnce(&dyn infer::Translate) -> Result<()>) -> Result<()> {
    on_backend!(run, with_translator(run, serve))
}

/// `--n-best M`: from 1 to the beam (a beam of K holds at most K hypotheses).
pub fn check_n_best(n: usize, beam: &kiln_model::seq2seq::BeamSettings) -> Result<()> {
    if n == 0 || n > beam.beam.max(1) {
        bail!("--n-best: expected an integer in [1, {}] (at most --beam), got {n}", beam.beam.max(1));
    }
    Ok(())
}

/// `kiln bench upload`: whether uploads from a loader thread overlap a step on `spec`'s device.
pub fn bench_upload(spec: &str, width: usize, depth: usize, uploads: usize, shape: [usize; 2], rounds: usize) -> Result<bench::UploadBench> {
    let resolved = resolve_device(spec)?;
    match resolved.choice {
        DeviceChoice::Cpu => Ok(bench::bench_upload::<burn::backend::Flex>(&Default::default(), "cpu (flex)", width, depth, uploads, shape, rounds)),
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu(adapter) => {
            let opened = kiln_train::wgpu_device::open(adapter, 0, spec).map_err(|m| anyhow!(m))?;
            Ok(bench::bench_upload::<burn::backend::Wgpu>(&opened.device, &format!("wgpu:{}", opened.info.describe()), width, depth, uploads, shape, rounds))
        }
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(index) => Ok(bench::bench_upload::<burn::backend::Cuda>(&burn::backend::cuda::CudaDevice::new(index), &format!("cuda:{index}"), width, depth, uploads, shape, rounds)),
        #[allow(unreachable_patterns)]
        _ => unreachable!("resolve_device refuses devices this build lacks"),
    }
}

/// Continues a prompt with a run's language model (`kiln generate`).
pub fn generate(run: &infer::RunModel, prompt: &str, sampling: kiln_model::sampling::Sampling, keep_going: &(dyn Fn() -> bool + Sync)) -> Result<String> {
    on_backend!(run, generate_text(run, prompt, sampling, keep_going))
}

/// Evaluates a run's checkpoint on a split and writes `eval-<split>.json` (`kiln eval`).
pub fn evaluate(run: &infer::RunModel, split: family::Split, beam: kiln_model::seq2seq::BeamSettings) -> Result<infer::EvalReport> {
    check_beam(run, &beam)?;
    on_backend!(run, evaluate_run(run, split, beam))
}

/// Where `--resume RUN_DIR` continues, and the run directory made ready for it.
#[derive(Debug)]
pub struct ResumePoint {
    /// The newest checkpoint that passes its checks; `None`: the run failed or was stopped before
    /// its first checkpoint, and starts again from step 0 in place.
    pub checkpoint: Option<PathBuf>,
    /// One line per thing the user should know (checkpoints passed over, a torn log row cut).
    pub notes: Vec<String>,
}

/// Where `--resume RUN_DIR` continues: the newest checkpoint that passes its checksums (one note
/// per checkpoint passed over), or step 0 when the run never saved one. The log is made to match:
/// a torn last row (a crash during a write) is cut, rows past the checkpoint's step (written
/// before a crash) are dropped, and an earlier `summary.json` is set aside as
/// `summary.superseded.json`, so the log continues exactly as the resumed run does and readers
/// see a run in progress.
pub fn prepare_resume(run_dir: &Path) -> Result<ResumePoint> {
    let mut notes = Vec::new();
    let never_saved = !rundir::holds_checkpoints(run_dir);
    let (checkpoint, step) = if never_saved {
        notes.push(format!("{}: no checkpoint yet; the run starts again from step 0 in place", run_dir.display()));
        (None, 0)
    } else {
        let (dir, skipped) = checkpoint::resume_point(run_dir).map_err(|m| anyhow!(m))?;
        notes.extend(skipped);
        let step = checkpoint::read_state(&dir).map_err(|m| anyhow!(m))?.step;
        (Some(dir), step)
    };
    let log = run_dir.join("metrics.jsonl");
    let torn = kiln_events::files::cut_torn_tail(&log).map_err(|m| anyhow!(m))?;
    if torn > 0 {
        notes.push(format!("{}: cut a torn last row ({torn} bytes, written when the run was killed)", log.display()));
    }
    kiln_views::run_files::drop_rows_after(&log, step).map_err(|m| anyhow!(m))?;
    let summary = run_dir.join("summary.json");
    if summary.exists() {
        let aside = run_dir.join("summary.superseded.json");
        std::fs::rename(&summary, &aside).map_err(|e| anyhow!("{}: cannot set aside: {e}", summary.display()))?;
        kiln_events::files::sync_dir(run_dir).map_err(|m| anyhow!(m))?;
    }
    Ok(ResumePoint { checkpoint, notes })
}
