//! `kiln`: the command-line entry point. Parses flags, loads and validates the recipe, opens the
//! run directory's loggers and starts (or resumes) training. Every user error ends here as one
//! line on stderr and exit code 2; nothing already saved is touched.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench_nodes;
mod bench_serve;
mod bench_scale;
mod experiments;
use kiln_events::Control;
use kiln_recipe::{Override, Recipe};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Recipe-driven training of translation models on Burn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model described by a recipe (or continue a run with --resume).
    Train(TrainArgs),
    /// Measure parts of kiln on this machine and append the figures to docs/bench/.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Show the dashboard of a run directory: a live run (following its metrics.jsonl) or a
    /// finished one (replay). q quits.
    Watch {
        run_dir: PathBuf,
    },
    /// Translate lines (stdin, or --input FILE) with a run's translation model, to stdout.
    Translate {
        run_dir: PathBuf,
        /// File of source sentences, one per line (default: stdin).
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
        /// Print the M best translations of each line with their scores, in Moses' n-best format
        /// (`index ||| translation ||| score`, index from 0; M at most --beam). The score is the
        /// one the beam ranks by: log-probability with `</s>` over the length penalty.
        #[arg(long, value_name = "M")]
        n_best: Option<usize>,
        #[command(flatten)]
        decode: DecodeArgs,
    },
    /// Serve a run's translation model over HTTP (POST /translate, GET /health, GET /model),
    /// loaded once; concurrent requests are decoded in shared batches. SIGTERM or Ctrl-C drains
    /// what is in flight and exits 0.
    Serve {
        run_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// 0: any free port (the first line printed says which).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Milliseconds the decoder waits for further requests to join a batch (0: none).
        #[arg(long, default_value_t = 5)]
        batch_wait_ms: u64,
        /// Source tokens one shared batch holds at most.
        #[arg(long, default_value_t = 4096)]
        batch_tokens: usize,
        /// Sentences one request may hold.
        #[arg(long, default_value_t = 256)]
        max_sentences: usize,
        /// Characters one sentence may hold (and at most the model's data.max_len tokens).
        #[arg(long, default_value_t = 4096)]
        max_chars: usize,
        /// Checkpoint name under checkpoints/ (step-NNNNNNN, `latest` or `best`; default: the latest).
        #[arg(long)]
        checkpoint: Option<String>,
        #[command(flatten)]
        weights: WeightsArg,
    },
    /// Continue a prompt with a run's language model.
    Generate {
        run_dir: PathBuf,
        #[arg(long, default_value = "")]
        prompt: String,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sample only among the k most likely tokens (0 = all).
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Checkpoint name under checkpoints/ (step-NNNNNNN, `latest` or `best`; default: the latest).
        #[arg(long)]
        checkpoint: Option<String>,
        #[command(flatten)]
        weights: WeightsArg,
    },
    /// Evaluate a run's checkpoint on its validation or test split: loss, perplexity and, for
    /// translation, BLEU and chrF (sacreBLEU-equal); writes eval-<split>.json into the run.
    Eval {
        run_dir: PathBuf,
        #[arg(long, default_value = "test", value_parser = ["test", "valid"])]
        split: String,
        #[command(flatten)]
        decode: DecodeArgs,
    },
    /// List the runs under a folder (default runs/): name, status, steps, best validation loss
    /// and BLEU, test BLEU, tokens/s, wall time, the commit each ran at.
    Runs {
        #[arg(default_value = "runs")]
        dir: PathBuf,
        /// Only runs whose recipe name contains this.
        #[arg(long)]
        name: Option<String>,
        /// Order: path, valid_loss (lowest first) or bleu (highest first).
        #[arg(long, default_value = "path")]
        sort: String,
    },
    /// Put runs side by side: the recipe keys that differ, their figures, validations by epoch;
    /// overlay charts (loss by step and by wall time, validation loss and BLEU) as PNGs.
    Compare {
        #[arg(required = true, num_args = 2..)]
        runs: Vec<PathBuf>,
        /// Folder the charts are written into.
        #[arg(long, default_value = "runs/compare")]
        out: PathBuf,
    },
    /// Train every combination of a grid of recipe values, each its own run inside one sweep
    /// directory (sweep.json); run again to skip finished runs and resume stopped ones.
    Sweep {
        recipe: PathBuf,
        /// section.key=v1,v2,… (repeatable; every combination is trained).
        #[arg(long = "grid", value_name = "SECTION.KEY=V1,V2", required = true)]
        grid: Vec<String>,
        /// Runs trained at once.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        parallel: u32,
        /// Sweep directory (default runs/sweeps/<recipe name>).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// What the closing table is sorted by: valid_loss or bleu.
        #[arg(long, default_value = "valid_loss", value_parser = ["valid_loss", "bleu"])]
        metric: String,
    },
    /// Average the weights of several checkpoints of a run into a checkpoint of its own
    /// (checkpoints/avg-K-step-N), for eval, translate and export with --checkpoint.
    Average {
        run_dir: PathBuf,
        /// The newest K step checkpoints.
        #[arg(long, conflicts_with = "checkpoints")]
        last: Option<usize>,
        /// These checkpoints, by name (comma-separated).
        #[arg(long, value_delimiter = ',')]
        checkpoints: Vec<String>,
        /// Average the moving averages (train.ema_decay) instead of the raw weights.
        #[arg(long)]
        ema: bool,
        /// Name of the new checkpoint (default avg-K-<newest>).
        #[arg(long)]
        name: Option<String>,
    },
    /// Export a checkpoint's weights with a config.json of the architecture and the tokenizer.
    Export {
        run_dir: PathBuf,
        #[arg(long, default_value = "safetensors", value_parser = ["safetensors"])]
        format: String,
        /// Folder to write into (default <run>/export/<checkpoint>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Checkpoint name under checkpoints/ (default: the latest).
        #[arg(long)]
        checkpoint: Option<String>,
        #[command(flatten)]
        weights: WeightsArg,
    },
    /// The devices this kiln can train on here, by the names `backend.device` takes, and what
    /// `"auto"` picks.
    Devices,
    /// Inspect or prune the dataset cache.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        /// Cache directory (the recipes' default is .kiln/cache).
        #[arg(long, global = true, default_value = ".kiln/cache")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Data pipeline: cold prepare vs cache hit, loader batches/s with 1 and 2 workers, padding
    /// with and without bucketing.
    Data {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Markdown file the figures are appended to.
        #[arg(long, default_value = "docs/bench/data.md")]
        out: PathBuf,
        /// Corpus sizes in pairs (e.g. 1m,4m,20m): synthetic corpora made from the recipe's pairs,
        /// each prepared cold and warm in a child process whose memory is sampled, then trained
        /// for --steps steps.
        #[arg(long, value_delimiter = ',', value_name = "PAIRS")]
        scale: Vec<String>,
        /// Training steps per --scale run.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Where --scale makes its corpora, caches and runs (default: a temporary directory).
        #[arg(long)]
        scratch: Option<PathBuf>,
        /// The kiln binary --scale measures (another build, for a before/after; default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// `kiln serve` under load on loopback: N concurrent clients send the same requests to a
    /// server that batches them and to one that decodes each alone; sentences/s, p50 / p99
    /// latency, every request answered once, the same translations.
    Serve {
        run_dir: PathBuf,
        /// Source sentences: each line's first tab-separated field.
        #[arg(long, default_value = "assets/de-en.ding.tsv")]
        input: PathBuf,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Sentences per request.
        #[arg(long, default_value_t = 4)]
        sentences: usize,
        /// Markdown file the rows are appended to.
        #[arg(long, default_value = "docs/bench/serve.md")]
        out: PathBuf,
    },
    /// Training across processes: the same steps in one process with N CPU replicas and in N
    /// processes joined over loopback (`--nodes`); the all-reduces' share of training time.
    Nodes {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Processes (and replicas of the one-process run).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Optimizer steps each setup runs.
        #[arg(long, default_value_t = 200)]
        steps: usize,
        /// Markdown file the result row is appended to.
        #[arg(long, default_value = "docs/bench/nodes.md")]
        out: PathBuf,
    },
    /// Sync every N, measured: the same steps with the loss read every step and every N steps,
    /// each overlapped with the next window and not; reads, host wait, step time, tokens/s and
    /// the ratios against reading every step.
    Sync {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Steps per read of the setting compared with reading every step.
        #[arg(long, default_value_t = 10)]
        interval: usize,
        /// Optimizer steps measured after the warm-up (a multiple of --interval).
        #[arg(long, default_value_t = 60)]
        steps: usize,
        /// Steps run before measuring (rounded up to whole windows of --interval): kernels
        /// compiled, memory pools filled.
        #[arg(long, default_value_t = 20)]
        warmup: usize,
        /// Rounds of the four settings, alternated; each figure is the median over them.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        rounds: u32,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Markdown file the result section is appended to.
        #[arg(long, default_value = "docs/bench/sync.md")]
        out: PathBuf,
    },
    /// Uploads off the training thread: a step on the loop's thread alone, token-id batches
    /// uploaded from a second thread alone, and both at once, on a device; how much overlaps.
    Upload {
        /// The device (a `backend.device` name).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The step: `depth` products of `width` × `width` matrices.
        #[arg(long, default_value_t = 512)]
        width: usize,
        #[arg(long, default_value_t = 16)]
        depth: usize,
        /// Batches uploaded per measurement, each `rows` × `len` token ids.
        #[arg(long, default_value_t = 8)]
        uploads: usize,
        #[arg(long, default_value_t = 64)]
        rows: usize,
        #[arg(long, default_value_t = 64)]
        len: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Markdown file the result is appended to.
        #[arg(long, default_value = "docs/bench/sync.md")]
        out: PathBuf,
    },
    /// Training throughput: steady-state target tokens/s after a warm-up, step time, sync / data
    /// wait / compute shares, memory; and the same batches through the PyTorch reference
    /// (benches/peer/) when a python3 with torch is found, for the kiln/PyTorch ratio.
    Train {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Optimizer steps measured after the warm-up (0 = the recipe's whole run).
        #[arg(long, default_value_t = 60)]
        steps: usize,
        /// Steps run before measuring (rounded up to whole sync windows).
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Markdown file the result row is appended to.
        #[arg(long, default_value = "docs/bench/train.md")]
        out: PathBuf,
        /// What this run measures (a change and its predicted effect), for the history.
        #[arg(long, default_value = "")]
        note: String,
        /// Skip the PyTorch reference.
        #[arg(long)]
        no_peer: bool,
        /// Run the PyTorch reference eagerly only, not also under `torch.compile`.
        #[arg(long)]
        no_compile: bool,
        /// Alternate kiln and PyTorch this many times and report the round with the median
        /// ratio (the machine's load moves both; adjacent runs share it).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        rounds: u32,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// List entries: key, size, age.
    Ls,
    /// Read every entry and check its header, key and checksum.
    Verify,
    /// Delete entries (all, or those older than --older-than days) and stray temporary files.
    Clean {
        #[arg(long, value_name = "DAYS")]
        older_than: Option<f64>,
    },
}

/// How to decode translations.
#[derive(clap::Args)]
struct DecodeArgs {
    /// Beam width (1 = greedy).
    #[arg(long, default_value_t = 1)]
    beam: usize,
    /// GNMT length penalty α: hypotheses ranked by log p / ((5 + length) / 6)^α.
    #[arg(long, default_value_t = 1.0)]
    len_penalty: f64,
    /// Checkpoint name under checkpoints/ (step-NNNNNNN, `latest` or `best`; default: the latest).
    #[arg(long)]
    checkpoint: Option<String>,
    #[command(flatten)]
    weights: WeightsArg,
}

/// Which weights of a checkpoint decode.
#[derive(clap::Args)]
struct WeightsArg {
    /// `ema`: the moving average of the weights (train.ema_decay); `raw`: the optimizer's weights;
    /// `auto`: the average where the checkpoint has one.
    #[arg(long = "weights", default_value = "auto", value_parser = ["auto", "ema", "raw"])]
    which: String,
}

impl WeightsArg {
    fn open(&self, run_dir: &std::path::Path, checkpoint: Option<&str>) -> anyhow::Result<kiln_families::infer::RunModel> {
        use kiln_families::infer::Weights;
        let mut run = kiln_families::infer::open_run(run_dir, checkpoint)?;
        run.use_weights(match self.which.as_str() {
            "ema" => Weights::Ema,
            "raw" => Weights::Raw,
            _ => Weights::Auto,
        })?;
        Ok(run)
    }
}

impl DecodeArgs {
    fn settings(&self) -> anyhow::Result<kiln_families::BeamSettings> {
        if self.beam == 0 {
            anyhow::bail!("--beam: expected an integer >= 1, got 0");
        }
        if !(self.len_penalty.is_finite() && self.len_penalty >= 0.0) {
            anyhow::bail!("--len-penalty: expected a number >= 0, got {}", self.len_penalty);
        }
        // max_len comes from the run's eval.max_len_a / max_len_b per sentence.
        Ok(kiln_families::BeamSettings { beam: self.beam, max_len: 0, len_penalty: self.len_penalty })
    }
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Recipe file (TOML). Optional with --resume, which uses the run's own recipe.toml.
    recipe: Option<PathBuf>,
    /// Override a recipe key: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Run directory (default runs/<recipe name>/<UTC timestamp>/).
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    run_dir: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Plain progress lines instead of the terminal dashboard (the default when stdout is not a
    /// terminal).
    #[arg(long)]
    no_tui: bool,
    /// Multi-node data parallel: the number of processes (nodes) in the run, each with its own
    /// `backend.devices`; start one per node with the same recipe, its --node-rank and the
    /// --coordinator.
    #[arg(long, value_name = "N", default_value_t = 1)]
    nodes: usize,
    /// This process's rank among the --nodes (0..N-1). Rank 0 runs the coordinator and writes
    /// the run directory; the others write nothing.
    #[arg(long, value_name = "R", default_value_t = 0)]
    node_rank: usize,
    /// Where rank 0's coordinator listens, as every node reaches it (e.g. 10.0.0.1:29500).
    #[arg(long, value_name = "HOST:PORT")]
    coordinator: Option<String>,
    /// Where the other nodes reach this one (default: the coordinator's host, port + 1 + rank;
    /// required on ranks > 0 when the coordinator is on another machine).
    #[arg(long, value_name = "HOST:PORT")]
    node_address: Option<String>,
    /// Seconds a node waits for the others (to join, in each all-reduce, through the slowest
    /// node's validation and saves) before it gives up with exit code 4.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    node_timeout: f64,
}

impl TrainArgs {
    /// The node flags, checked: `None` for a one-process run.
    fn node_group(&self) -> anyhow::Result<Option<kiln_train::nodes::NodeGroup>> {
        if self.nodes <= 1 {
            if self.nodes == 0 {
                anyhow::bail!("--nodes: expected 1 or more processes, got 0");
            }
            for (given, flag) in [(self.node_rank != 0, "--node-rank"), (self.coordinator.is_some(), "--coordinator"), (self.node_address.is_some(), "--node-address")] {
                if given {
                    anyhow::bail!("{flag}: only with --nodes 2 or more");
                }
            }
            return Ok(None);
        }
        let Some(coordinator) = &self.coordinator else {
            anyhow::bail!("--coordinator: required with --nodes {} (HOST:PORT of rank 0's coordinator)", self.nodes);
        };
        let group = kiln_train::nodes::NodeGroup::new(self.nodes, self.node_rank, coordinator, self.node_address.as_deref(), self.node_timeout).map_err(anyhow::Error::msg)?;
        Ok(Some(group))
    }
}

/// mimalloc's `mi_option_purge_delay` (mimalloc.h of the v3 sources libmimalloc-sys builds).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed memory instead of handing it back to the OS after a delay: a training step frees
    // and reallocates the same large buffers, and pages handed back return zeroed by the kernel
    // (page faults and clearing were 10-14 % of a CPU step). Measured: +9 % tokens/s, peak RSS
    // 277 → 308-334 MiB on the quickstart (docs/bench/train.md).
    // SAFETY: sets a process-wide allocator option; no pointers are involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // Rust ignores SIGPIPE, so printing into a closed pipe (`kiln runs | head -1`) would panic.
    // The default action ends the process as other command-line tools end; a training run
    // killed this way is a killed run: its checkpoints stay whole (docs/reliability.md).
    // SAFETY: sets the disposition of one signal before any thread is started.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print as clap writes them; a bad flag or value is one line, exit 2.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("kiln: error: {first} (kiln --help lists the commands and flags)");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Train(args) => train(args),
        Command::Cache { action, dir } => cache(action, &dir),
        Command::Devices => devices(),
        Command::Watch { run_dir } => watch(&run_dir),
        Command::Serve { run_dir, host, port, batch_wait_ms, batch_tokens, max_sentences, max_chars, checkpoint, weights } => {
            let limits = kiln_serve::Limits { max_sentences, max_chars, ..Default::default() };
            let options = kiln_serve::Options { host, port, batch_wait: std::time::Duration::from_millis(batch_wait_ms), batch_tokens, limits };
            serve(&run_dir, options, checkpoint.as_deref(), &weights)
        }
        Command::Translate { run_dir, input, n_best, decode } => translate(&run_dir, input.as_deref(), &decode, n_best),
        Command::Generate { run_dir, prompt, max_tokens, temperature, top_k, seed, checkpoint, weights } => {
            generate(&run_dir, &prompt, kiln_families::Sampling { max_tokens, temperature, top_k, seed, stop: None }, checkpoint.as_deref(), &weights)
        }
        Command::Eval { run_dir, split, decode } => eval(&run_dir, &split, &decode),
        Command::Runs { dir, name, sort } => experiments::runs(&dir, name.as_deref(), &sort),
        Command::Compare { runs, out } => experiments::compare(&runs, &out),
        Command::Sweep { recipe, grid, parallel, dir, metric } => experiments::sweep(&recipe, &grid, parallel as usize, dir.as_deref(), &metric),
        Command::Average { run_dir, last, checkpoints, ema, name } => experiments::average(&run_dir, last, checkpoints, ema, name.as_deref()),
        Command::Export { run_dir, format: _, out, checkpoint, weights } => experiments::export(&run_dir, out.as_deref(), checkpoint.as_deref(), |dir, c| weights.open(dir, c)),
        Command::Bench { what: BenchWhat::Data { recipe, set, out, scale, steps, scratch, binary } } if !scale.is_empty() => {
            scale.iter().map(|s| bench_scale::parse_size(s)).collect::<anyhow::Result<Vec<_>>>().and_then(|sizes| bench_scale::bench_scale(&recipe, &set, &sizes, steps, scratch, binary, &out))
        }
        Command::Bench { what: BenchWhat::Data { recipe, set, out, .. } } => bench_data(&recipe, &set, &out),
        Command::Bench { what: BenchWhat::Serve { run_dir, input, clients, requests, sentences, out } } => bench_serve::bench_serve(&run_dir, &input, &bench_serve::Load { clients, requests, sentences }, &out),
        Command::Bench { what: BenchWhat::Nodes { recipe, set, nodes, steps, out } } => bench_nodes::bench_nodes(&recipe, &set, nodes, steps, &out),
        Command::Bench { what: BenchWhat::Upload { device, width, depth, uploads, rows, len, rounds, out } } => bench_upload(&device, width, depth, uploads, [rows, len], rounds, &out),
        Command::Bench { what: BenchWhat::Sync { recipe, set, interval, steps, warmup, rounds, json, out } } => bench_sync(&recipe, &set, interval, steps, warmup, rounds, json.as_deref(), &out),
        Command::Bench { what: BenchWhat::Train { recipe, set, steps, warmup, json, out, note, no_peer, no_compile, rounds } } => {
            bench_train(&recipe, &set, BenchTrainArgs { steps, warmup, json, out, note, no_peer, no_compile, rounds })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}").replace('\n', " ");
            eprintln!("kiln: error: {text}");
            // 3: training diverged (non-finite loss); 4: a node was lost; 2: everything else the
            // user can fix.
            if e.downcast_ref::<kiln_train::trainer::NonFiniteStop>().is_some() {
                ExitCode::from(3)
            } else if e.downcast_ref::<kiln_train::nodes::NodeLost>().is_some() {
                // 4: a node of a multi-node run was lost (or never joined).
                ExitCode::from(kiln_train::nodes::NODE_LOST_EXIT)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let overrides = args.set.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let nodes = args.node_group()?;
    if let Some(group) = nodes.clone().filter(|g| !g.writes_run_files()) {
        return train_other_node(&args, &overrides, group);
    }
    let (recipe, run_dir, resume, _lock) = match &args.resume {
        Some(dir) => {
            // One process per run: the lock comes before anything in the directory is read or changed.
            let lock = kiln_events::RunLock::acquire(dir).map_err(anyhow::Error::msg)?;
            let recipe = kiln_families::resume_recipe(dir, &overrides)?;
            if let Some(path) = &args.recipe {
                let given = Recipe::load(path, &[])?;
                if let Some(key) = given.run_difference(&recipe) {
                    anyhow::bail!("{}: differs from {} at `{key}`; a run resumes with its own recipe", path.display(), dir.join("recipe.toml").display());
                }
            }
            let point = kiln_families::prepare_resume(dir)?;
            for line in &point.notes {
                eprintln!("kiln: warning: {line}");
            }
            (recipe, dir.clone(), point.checkpoint, lock)
        }
        None => {
            let Some(path) = &args.recipe else {
                anyhow::bail!("a recipe is required: kiln train <recipe.toml> (or --resume RUN_DIR)");
            };
            let recipe = Recipe::load(path, &overrides)?;
            let (dir, lock) = kiln_families::rundir::create(&recipe, args.run_dir.as_deref())?;
            (recipe, dir, None, lock)
        }
    };
    let control = Control::new();
    if nodes.is_some() {
        // A wait on the other nodes that times out ends the process from the watchdog's thread:
        // the log still gets its error row.
        let dir = run_dir.clone();
        kiln_train::nodes::set_last_words(move |line| {
            let _ = kiln_views::RunFiles::record_error(&dir, line);
        });
    }
    let session = kiln::session::Session { dashboard: !args.no_tui, name: recipe.name.clone() };
    let launch = kiln_families::Launch { recipe, run_dir: run_dir.clone(), resume, control: control.clone(), step_times: None, commit: env!("KILN_COMMIT").to_string(), nodes };
    let result = kiln::session::run(&run_dir, &session, &control, |sink| kiln_families::launch(&launch, sink));
    match result {
        Ok(_) => Ok(()),
        // Nothing is deleted: the log keeps the attempt and its error, and the run starts again
        // in place (a non-finite stop keeps its own message and exit code).
        Err(e) if !run_dir.join("checkpoints").join("latest").exists() && e.downcast_ref::<kiln_train::trainer::NonFiniteStop>().is_none() => {
            Err(anyhow::anyhow!("{}; nothing was saved yet: start the run again in place with --resume {}", format!("{e:#}").replace('\n', " "), run_dir.display()))
        }
        Err(e) => Err(e),
    }
}

/// A node of rank > 0: it trains like rank 0 and writes nothing. A fresh run prepares its data in
/// a scratch directory (the tokenizer trained there must come out as rank 0's: the roll call
/// compares them); a resume reads rank 0's run directory (shared, or copied to this machine) and
/// leaves it as it is.
fn train_other_node(args: &TrainArgs, overrides: &[Override], group: kiln_train::nodes::NodeGroup) -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new().prefix("kiln-node-").tempdir().map_err(|e| anyhow::anyhow!("cannot create a scratch directory: {e}"))?;
    let (recipe, resume) = match &args.resume {
        Some(dir) => {
            let recipe = kiln_families::resume_recipe(dir, overrides)?;
            let checkpoint = if kiln_families::rundir::holds_checkpoints(dir) { Some(kiln_train::checkpoint::resume_point(dir).map_err(anyhow::Error::msg)?.0) } else { None };
            (recipe, checkpoint)
        }
        None => {
            let Some(path) = &args.recipe else {
                anyhow::bail!("a recipe is required: kiln train <recipe.toml> (or --resume RUN_DIR)");
            };
            (Recipe::load(path, overrides)?, None)
        }
    };
    // Resuming, rank 0's run directory is read (its tokenizer, its checkpoint); otherwise this
    // node prepares its data in the scratch directory, as rank 0 does in the run's.
    let run_dir = match (&args.resume, &resume) {
        (Some(dir), Some(_)) => dir.clone(),
        _ => {
            let dir = scratch.path().join("run");
            std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            dir
        }
    };
    println!("kiln: node {} of {}: training with the coordinator at {}; rank 0 writes the run directory", group.rank, group.nodes, group.coordinator);
    let control = Control::new();
    let launch = kiln_families::Launch { recipe, run_dir, resume, control: control.clone(), step_times: None, commit: env!("KILN_COMMIT").to_string(), nodes: Some(group) };
    kiln::session::run_without_files(&control, |sink| kiln_families::launch(&launch, sink)).map(|_| ())
}

fn translate(run_dir: &std::path::Path, input: Option<&std::path::Path>, decode: &DecodeArgs, n_best: Option<usize>) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let beam = decode.settings()?;
    if let Some(n) = n_best {
        // Refused before the model loads.
        kiln_families::check_n_best(n, &beam)?;
    }
    let run = decode.weights.open(run_dir, decode.checkpoint.as_deref())?;
    let text = match input {
        Some(path) => std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?,
        None => {
            let mut t = String::new();
            std::io::stdin().read_to_string(&mut t).map_err(|e| anyhow::anyhow!("stdin: {e}"))?;
            t
        }
    };
    let lines: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect();
    let mut stdout = std::io::stdout().lock();
    if let Some(n) = n_best {
        // Moses' n-best format, as Marian and fairseq's scripts read it: `index ||| text ||| score`.
        for (i, hyps) in kiln_families::translate_n_best(&run, &lines, beam, n)?.into_iter().enumerate() {
            for (text, score) in hyps {
                writeln!(stdout, "{i} ||| {text} ||| {score:.6}")?;
            }
        }
        return Ok(());
    }
    let out = kiln_families::translate(&run, &lines, beam)?;
    for line in out {
        writeln!(stdout, "{line}")?;
    }
    Ok(())
}

fn serve(run_dir: &std::path::Path, options: kiln_serve::Options, checkpoint: Option<&str>, weights: &WeightsArg) -> anyhow::Result<()> {
    use std::io::Write;
    if options.limits.max_sentences == 0 || options.limits.max_chars == 0 || options.batch_tokens == 0 {
        anyhow::bail!("--max-sentences, --max-chars and --batch-tokens: expected integers >= 1");
    }
    let run = weights.open(run_dir, checkpoint)?;
    if run.recipe.model.family != kiln_recipe::ModelFamily::Transformer {
        anyhow::bail!("{}: this run trained a language model; `serve` serves translation models", run_dir.display());
    }
    let (name, step) = (run.checkpoint.display().to_string(), run.step);
    let counters = kiln_serve::serve(run, options, |address| {
        // The first line: scripts and tests read the address (and the port, with --port 0) here.
        println!("kiln serve: listening on http://{address} ({name}, step {step})");
        let _ = std::io::stdout().flush();
    })?;
    let count = |c: &std::sync::atomic::AtomicU64, one: &str, many: &str| {
        let n = c.load(std::sync::atomic::Ordering::Relaxed);
        format!("{n} {}", if n == 1 { one } else { many })
    };
    let (requests, sentences, batches) = (count(&counters.requests, "request", "requests"), count(&counters.sentences, "sentence", "sentences"), count(&counters.batches, "batch", "batches"));
    println!("kiln serve: stopped after {requests} ({sentences} in {batches})");
    Ok(())
}

fn generate(run_dir: &std::path::Path, prompt: &str, sampling: kiln_families::Sampling, checkpoint: Option<&str>, weights: &WeightsArg) -> anyhow::Result<()> {
    if !(sampling.temperature.is_finite() && sampling.temperature >= 0.0) {
        anyhow::bail!("--temperature: expected a number >= 0, got {}", sampling.temperature);
    }
    let run = weights.open(run_dir, checkpoint)?;
    // Ctrl-C or SIGTERM ends a long text where it is (printed, exit 0); a second signal at once.
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("kiln: stopping the text here (again to quit at once)");
    });
    let text = kiln_families::generate(&run, prompt, sampling, &|| !STOP.load(std::sync::atomic::Ordering::SeqCst))?;
    println!("{prompt}{text}");
    Ok(())
}

fn eval(run_dir: &std::path::Path, split: &str, decode: &DecodeArgs) -> anyhow::Result<()> {
    let beam = decode.settings()?;
    // It writes eval-<split>.json into the run: one process per run directory.
    let _lock = kiln_events::RunLock::acquire(run_dir).map_err(anyhow::Error::msg)?;
    let run = decode.weights.open(run_dir, decode.checkpoint.as_deref())?;
    let split = if split == "valid" { kiln_families::Split::Valid } else { kiln_families::Split::Test };
    let r = kiln_families::evaluate(&run, split, beam)?;
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
    let per_char = r.loss_per_char.map(|x| format!(" | loss/char {x:.4}")).unwrap_or_default();
    println!(
        "{} | {} | step {} | {} weights | {} {} | loss {:.4}{per_char} | ppl {:.2} | BLEU {} | chrF {} | beam {} (α {})",
        run_dir.display(),
        r.split,
        r.step,
        if r.weights == "ema" { "ema" } else { "raw" },
        r.size,
        r.unit,
        r.loss,
        r.ppl,
        opt(r.bleu),
        opt(r.chrf),
        r.beam,
        r.len_penalty
    );
    println!("wrote {}", run_dir.join(format!("eval-{}.json", r.split)).display());
    Ok(())
}

fn watch(run_dir: &std::path::Path) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        // No terminal: print what the dashboard would show first, as the summary of the run.
        let state = kiln_dashboard::load_run(run_dir).map_err(anyhow::Error::msg)?;
        match &state.summary {
            Some(s) => print!("{}", kiln_views::summary_table::summary_table(s, &run_dir.display().to_string())),
            None => println!("{}: running, step {} of {}", run_dir.display(), state.step(), state.total_steps()),
        }
        if state.malformed_lines > 0 {
            println!("  ({} malformed metrics.jsonl lines skipped)", state.malformed_lines);
        }
        return Ok(());
    }
    kiln_dashboard::watch(run_dir).map_err(anyhow::Error::msg)
}

fn bench_data(recipe_path: &std::path::Path, set: &[String], out: &std::path::Path) -> anyhow::Result<()> {
    let overrides = set.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let recipe = Recipe::load(recipe_path, &overrides)?;
    let scratch = tempfile::tempdir()?;
    eprintln!("bench data: {} (cold prepare, cache hit, loader 1 and 2 workers, padding)…", recipe_path.display());
    let figures = kiln_families::bench::bench_data(&recipe, scratch.path())?;
    let (machine, commit, date) = provenance(out);
    let section = figures.markdown(&recipe.name, &machine, &commit, &date);
    print!("{section}");
    append_section(out, DATA_HEADER, &section)
}

/// The machine (CPU model, cores), the commit (`+dirty` with uncommitted changes) of the checkout
/// the report `out` is written into (wherever the command runs from) and the UTC date.
pub(crate) fn provenance(out: &std::path::Path) -> (String, String, String) {
    let repo = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let git = |args: &[&str]| {
        std::process::Command::new("git").arg("-C").arg(&repo).args(args).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let mut commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
        commit.push_str("+dirty");
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (format!("{cpu}, {cores} cores"), commit, kiln_families::rundir::timestamp(std::time::SystemTime::now()))
}

struct BenchTrainArgs {
    steps: usize,
    warmup: usize,
    json: Option<PathBuf>,
    out: PathBuf,
    note: String,
    no_peer: bool,
    no_compile: bool,
    rounds: u32,
}

/// A Python with torch for the reference: `KILN_PEER_PYTHON`, `benches/peer/.venv`, or `python3`.
fn peer_python() -> Option<String> {
    let candidates = [std::env::var("KILN_PEER_PYTHON").ok(), Some("benches/peer/.venv/bin/python".into()), Some("python3".into())];
    candidates.into_iter().flatten().find(|py| {
        std::process::Command::new(py)
            .args(["-c", "import torch"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The PyTorch reference on the batches kiln's bench round just trained on; `None` where it
/// cannot run them (said why).
fn run_peer(py: &str, recipe: &Recipe, dir: &std::path::Path, kiln: &kiln_families::bench::TrainBench, compile: bool) -> anyhow::Result<Option<serde_json::Value>> {
    let spec = match kiln_families::bench::peer_spec(recipe, dir, kiln.steps, kiln.warmup_steps) {
        Ok(spec) => spec,
        Err(why) => {
            eprintln!("bench train: PyTorch reference skipped: {why}");
            return Ok(None);
        }
    };
    let spec_path = dir.join("peer.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
    let mode = if compile { "torch.compile" } else { "eager" };
    eprintln!("bench train: the same batches through PyTorch, {mode} ({py})…");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer/peer_train.py");
    let mut command = std::process::Command::new(py);
    command.arg(&script).arg(&spec_path);
    if compile {
        command.arg("--compile");
    }
    let o = command.output()?;
    if !o.status.success() {
        let why = String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").to_string();
        if compile {
            // torch.compile needs a working C++ toolchain for its CPU kernels: a machine without
            // one still gets the eager comparison.
            eprintln!("bench train: PyTorch under torch.compile failed, skipped: {why}");
            return Ok(None);
        }
        anyhow::bail!("{}: failed: {why}", script.display());
    }
    Ok(Some(serde_json::from_slice(&o.stdout).map_err(|e| anyhow::anyhow!("{}: unreadable output: {e}", script.display()))?))
}

fn bench_train(recipe_path: &std::path::Path, set: &[String], args: BenchTrainArgs) -> anyhow::Result<()> {
    let overrides = set.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let recipe = Recipe::load(recipe_path, &overrides)?;
    let scratch = tempfile::tempdir()?;
    let python = if args.no_peer { None } else { peer_python() };
    if !args.no_peer && python.is_none() {
        eprintln!("bench train: no python3 with torch found (KILN_PEER_PYTHON, benches/peer/.venv); PyTorch reference skipped, see benches/peer/README.md");
    }
    eprintln!("bench train: probing this machine's peak matrix-product rate…");
    let peak = kiln_families::bench::machine_peak();
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let dir = scratch.path().join(format!("round-{round}"));
        std::fs::create_dir_all(&dir)?;
        let of = if args.rounds > 1 { format!(" (round {} of {})", round + 1, args.rounds) } else { String::new() };
        eprintln!("bench train: {} — {} warm-up + {} measured steps{of}…", recipe_path.display(), args.warmup, args.steps);
        let kiln = kiln_families::bench::bench_train(&recipe, args.steps, args.warmup, &dir)?;
        let peer = match &python {
            Some(py) => run_peer(py, &recipe, &dir, &kiln, false)?,
            None => None,
        };
        let compiled = match &python {
            Some(py) if peer.is_some() && !args.no_compile => run_peer(py, &recipe, &dir, &kiln, true)?,
            _ => None,
        };
        let over = |p: &Option<serde_json::Value>| p.as_ref().and_then(|p| p["tokens_per_s"].as_f64()).map(|p| kiln.tokens_per_s / p.max(1e-9));
        let (ratio, ratio_compile) = (over(&peer), over(&compiled));
        rounds.push((kiln, peer, compiled, ratio, ratio_compile));
    }
    // The round with the median ratio (or median kiln figure without a peer) is the one reported.
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| rounds[i].3.unwrap_or(rounds[i].0.tokens_per_s);
        key(a).total_cmp(&key(b))
    });
    let all: Vec<serde_json::Value> = rounds
        .iter()
        .map(|(k, p, c, r, rc)| {
            serde_json::json!({
                "kiln_tokens_per_s": k.tokens_per_s,
                "peer_tokens_per_s": p.as_ref().map(|p| p["tokens_per_s"].clone()),
                "compile_tokens_per_s": c.as_ref().map(|c| c["tokens_per_s"].clone()),
                "ratio": r,
                "ratio_compile": rc,
            })
        })
        .collect();
    let median = |xs: Vec<f64>| -> Option<f64> {
        let mut xs = xs;
        xs.sort_by(f64::total_cmp);
        (!xs.is_empty()).then(|| xs[xs.len() / 2])
    };
    let ratio_compile_median = median(rounds.iter().filter_map(|r| r.4).collect());
    let (kiln, peer, compiled, ratio, _) = rounds.swap_remove(order[order.len() / 2]);
    let share = |gflops: f64, of: Option<f64>| of.filter(|p| *p > 0.0).map(|p| 100.0 * gflops / p);
    let peer_gflops = |p: &Option<serde_json::Value>| p.as_ref().and_then(|p| p["tokens_per_s"].as_f64()).map(|t| t * kiln.flops_per_token / 1e9);
    let mfu = serde_json::json!({
        "kiln_gflops": kiln.model_gflops,
        "kiln_pct_of_measured": share(kiln.model_gflops, Some(peak.measured_gflops)),
        "kiln_pct_of_theoretical": share(kiln.model_gflops, peak.theoretical_gflops),
        "peer_gflops": peer_gflops(&peer),
        "compile_gflops": peer_gflops(&compiled),
    });
    let (machine, commit, date) = provenance(&args.out);
    let report = serde_json::json!({
        "date": date, "commit": commit, "machine": machine, "note": args.note,
        "kiln": kiln, "peer": peer, "compiled": compiled, "ratio": ratio, "ratio_compile": ratio_compile_median,
        "peak": peak, "mfu": mfu, "rounds": all,
    });
    println!("{}", kiln_views::bench_report::table(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = std::fs::read_to_string(&args.out).unwrap_or_else(|_| kiln_views::bench_report::HEADER.to_string());
    if !text.contains(kiln_views::bench_report::TABLE_HEAD) {
        // Rows before MFU and torch.compile keep their table; new rows start a new one.
        text.push_str(kiln_views::bench_report::SECTION);
    }
    text.push_str(&kiln_views::bench_report::row(&report));
    std::fs::write(&args.out, text).map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", args.out.display()))?;
    eprintln!("appended to {}", args.out.display());
    Ok(())
}

/// `kiln devices`: one line per device name this build can use on this machine.
fn devices() -> anyhow::Result<()> {
    use kiln_train::device::{cuda_device_count, resolve_device, wgpu_adapters, AdapterKind};
    println!("cpu                  Burn Flex, {} threads", std::thread::available_parallelism().map_or(1, |n| n.get()));
    if cfg!(feature = "cuda") {
        match cuda_device_count() {
            Ok(n) => (0..n).for_each(|i| println!("cuda:{i:<16} CUDA device {i}")),
            Err(why) => println!("cuda                 none: {why}"),
        }
    } else {
        println!("cuda                 not built in (cargo xtask train --cuda …, or the `cuda` feature)");
    }
    if cfg!(feature = "wgpu") {
        match wgpu_adapters() {
            Ok(adapters) if !adapters.is_empty() => {
                let mut seen: Vec<AdapterKind> = Vec::new();
                for a in &adapters {
                    let n = seen.iter().filter(|k| **k == a.kind).count();
                    seen.push(a.kind);
                    let name = match a.kind {
                        AdapterKind::Discrete => format!("wgpu:discrete:{n}"),
                        AdapterKind::Integrated => format!("wgpu:integrated:{n}"),
                        AdapterKind::Virtual => format!("wgpu:virtual:{n}"),
                        AdapterKind::Cpu if n == 0 => "wgpu:cpu".to_string(),
                        // Only the first of a kind without an index, or of no kind, is reachable
                        // by name; "wgpu" takes the preferred one.
                        _ => "(wgpu)".to_string(),
                    };
                    println!("{name:<20} {}; f16 {}", a.describe(), if a.shader_f16 { "yes" } else { "no" });
                }
            }
            Ok(_) => println!("wgpu                 no adapter: {}", kiln_train::device::WGPU_INSTALL),
            Err(why) => println!("wgpu                 none: {why}; {}", kiln_train::device::WGPU_INSTALL),
        }
    } else {
        println!("wgpu                 not built in (cargo xtask train --wgpu …, or the `wgpu` feature)");
    }
    let auto = resolve_device("auto")?;
    println!("auto                 {:?}: {}", auto.choice, auto.note.unwrap_or_default());
    Ok(())
}

#[allow(clippy::too_many_arguments)] // the command's flags
fn bench_sync(recipe_path: &std::path::Path, set: &[String], interval: usize, steps: usize, warmup: usize, rounds: u32, json: Option<&std::path::Path>, out: &std::path::Path) -> anyhow::Result<()> {
    let overrides = set.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let recipe = Recipe::load(recipe_path, &overrides)?;
    let scratch = tempfile::tempdir()?;
    let bench = kiln_families::bench::bench_sync(&recipe, interval, steps, warmup, rounds, scratch.path())?;
    let (machine, commit, date) = provenance(out);
    let section = bench.markdown(&machine, &commit, &date, set);
    println!("{section}");
    if let Some(path) = json {
        let value = serde_json::json!({ "date": date, "commit": commit, "machine": machine, "recipe": bench.recipe, "device": bench.device, "set": set, "warmup_steps": bench.warmup_steps, "rounds": bench.rounds, "cases": bench.cases });
        std::fs::write(path, serde_json::to_string_pretty(&value)?).map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
    }
    append_section(out, SYNC_HEADER, &section)
}

fn bench_upload(device: &str, width: usize, depth: usize, uploads: usize, shape: [usize; 2], rounds: usize, out: &std::path::Path) -> anyhow::Result<()> {
    kiln_recipe::DeviceSpec::parse(device).map_err(|m| anyhow::anyhow!("--device: {m}"))?;
    if width == 0 || depth == 0 || uploads == 0 || shape.contains(&0) || rounds == 0 {
        anyhow::bail!("bench upload: --width, --depth, --uploads, --rows, --len and --rounds must be positive");
    }
    let b = kiln_families::bench_upload(device, width, depth, uploads, shape, rounds)?;
    let (machine, commit, date) = provenance(out);
    let section = b.markdown(&machine, &commit, &date);
    println!("{section}");
    append_section(out, SYNC_HEADER, &section)
}

/// Appends a bench's Markdown section to `out`, starting the file with `header` where it is new.
pub(crate) fn append_section(out: &std::path::Path, header: &str, section: &str) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = std::fs::read_to_string(out).unwrap_or_else(|_| header.to_string());
    text.push_str(section);
    std::fs::write(out, text).map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", out.display()))?;
    eprintln!("appended to {}", out.display());
    Ok(())
}

/// The head of a new `docs/bench/data.md`.
const DATA_HEADER: &str = "# Data pipeline benchmarks\n\nAppended by `cargo xtask bench data <recipe>`; each section is one run on one machine.\n\n";

/// The head of a new `docs/bench/sync.md`.
const SYNC_HEADER: &str = "# Sync every N, measured (`kiln bench sync`)\n\nEach section: the same steps of one recipe with the training loss read back every step and every N steps, each read waited for at once (overlap off) or while the next window runs (overlap on). *Host wait* is the time the training thread spent waiting for reads. Figures are medians over alternated rounds.\n\n";

fn cache(action: CacheAction, dir: &std::path::Path) -> anyhow::Result<()> {
    use kiln_data::cache;
    let age_days = |t: std::time::SystemTime| t.elapsed().map(|d| d.as_secs_f64() / 86_400.0).unwrap_or(0.0);
    match action {
        CacheAction::Ls | CacheAction::Verify => {
            let verify = matches!(action, CacheAction::Verify);
            let entries = cache::list(dir, verify).map_err(anyhow::Error::msg)?;
            let mut bad = 0;
            for e in &entries {
                let name = e.path.file_name().unwrap_or_default().to_string_lossy();
                let status = match (&e.status, verify) {
                    (Ok(what), true) => format!("ok: {what}"),
                    (Err(why), _) => {
                        bad += 1;
                        format!("INVALID: {why}")
                    }
                    (Ok(_), false) => String::new(),
                };
                println!("{name}  {:>10} bytes  {:>6.1} days  {status}", e.bytes, age_days(e.modified));
            }
            println!("{} entries in {}", entries.len(), dir.display());
            if bad > 0 {
                anyhow::bail!("{}: {bad} invalid entries (they are rebuilt when next needed; `kiln cache clean` removes them)", dir.display());
            }
            Ok(())
        }
        CacheAction::Clean { older_than } => {
            let mut removed = 0;
            if let Ok(read) = std::fs::read_dir(dir) {
                for entry in read.flatten() {
                    let path = entry.path();
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let ours = [cache::EXTENSION, kiln_data::memo::EXTENSION].iter().any(|x| name.ends_with(&format!(".{x}"))) || (name.starts_with('.') && (name.ends_with(".tmp") || name.ends_with(".part")));
                    let old_enough = match older_than {
                        Some(days) => entry.metadata().and_then(|m| m.modified()).map(|t| age_days(t) >= days).unwrap_or(false),
                        None => true,
                    };
                    if ours && old_enough {
                        std::fs::remove_file(&path).map_err(|e| anyhow::anyhow!("{}: cannot remove: {e}", path.display()))?;
                        removed += 1;
                    }
                }
            }
            println!("removed {removed} files from {}", dir.display());
            Ok(())
        }
    }
}
