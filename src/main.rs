//! `kiln`: the command-line entry point. Parses flags, loads and validates the recipe, opens the
//! run directory's loggers and starts (or resumes) training. Every user error ends here as one
//! line on stderr and exit code 2; nothing already saved is touched.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln_events::Fanout;
use kiln_recipe::{Override, Recipe};
use kiln_views::{ProgressLine, RunFiles};

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
    /// Plain progress lines instead of the terminal dashboard.
    #[arg(long)]
    no_tui: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}").replace('\n', " ");
            eprintln!("kiln: error: {text}");
            ExitCode::from(2)
        }
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let overrides = args.set.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let (recipe, run_dir, resume, created) = match &args.resume {
        Some(dir) => {
            let recipe = kiln_train::resume_recipe(dir, &overrides)?;
            if let Some(path) = &args.recipe {
                let given = Recipe::load(path, &[])?;
                if let Some(key) = first_difference(&given, &recipe) {
                    anyhow::bail!("{}: differs from {} at `{key}`; a run resumes with its own recipe", path.display(), dir.join("recipe.toml").display());
                }
            }
            (recipe, dir.clone(), true, false)
        }
        None => {
            let Some(path) = &args.recipe else {
                anyhow::bail!("a recipe is required: kiln train <recipe.toml> (or --resume RUN_DIR)");
            };
            let recipe = Recipe::load(path, &overrides)?;
            let (dir, created) = kiln_train::rundir::create(&recipe, args.run_dir.as_deref())?;
            (recipe, dir, false, created)
        }
    };
    // The dashboard arrives with its own issue; until then every run logs plain lines.
    let _ = args.no_tui;
    let result = (|| {
        let files = RunFiles::open(&run_dir).map_err(anyhow::Error::msg)?;
        let mut sink = Fanout::new().with(ProgressLine::new(std::io::stdout())).with(files);
        kiln_train::launch(&kiln_train::Launch { recipe, run_dir: run_dir.clone(), resume }, &mut sink)
    })();
    if result.is_err() && created && !run_dir.join("checkpoints").exists() {
        // A run that failed before saving anything (bad corpus, say) leaves no directory behind.
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    result.map(|_| ())
}

/// First key (dotted path) of the model/data/tokenizer/loader sections where two recipes differ.
fn first_difference(a: &Recipe, b: &Recipe) -> Option<String> {
    let (a, b) = (toml::Value::try_from(a).ok()?, toml::Value::try_from(b).ok()?);
    for section in ["data", "tokenizer", "loader", "model"] {
        let (x, y) = (a.get(section)?.as_table()?, b.get(section)?.as_table()?);
        for (k, v) in x {
            if y.get(k) != Some(v) {
                return Some(format!("{section}.{k}"));
            }
        }
    }
    None
}
