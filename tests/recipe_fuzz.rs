//! Property test of the promise "every value the schema accepts runs or is refused in one line":
//! recipes drawn across the schema's keys, types and ranges (boundaries, powers of two, 2^63 − 1,
//! negative numbers, NaN and infinities, unknown variants, wrong types), and CLI values of
//! `translate` (`--n-best` too), `generate` and `eval`. Each is run by the real binary and must
//! either be refused with exit 2 and one `kiln: error:` line, or start and stop cleanly (finish,
//! stop at SIGTERM, or stop for a non-finite loss with exit 3): never a panic, never a hang.
//!
//! Two tiers: thousands of recipes through parsing and validation in-process (fast), and a sample
//! run by the binary (`KILN_FUZZ_CASES`, 40 in CI; `cargo xtask fuzz --cases N` runs more).
//! `KILN_FUZZ_SEED` replays a draw; a failure prints the seed, the case and the recipe.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// splitmix64: a seeded, dependency-free stream for the draws.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
}

/// Integers at the edges of what code tends to assume.
const EDGES: [&str; 24] = [
    "0", "1", "2", "3", "5", "8", "16", "31", "32", "64", "100", "256", "1000", "4096", "10000", "10001", "65536", "65537", "2147483647", "2147483648", "4294967296",
    "4611686018427387904", "9223372036854775807", "-1",
];
const FLOATS: [&str; 16] = ["0.0", "-1.0", "1e-12", "1e-9", "0.1", "0.5", "0.999", "1.0", "1.5", "2.0", "1e30", "1e308", "nan", "inf", "-inf", "3"];

enum Kind {
    Int(&'static [&'static str]),
    Float(&'static [&'static str]),
    Bool,
    Word(&'static [&'static str]),
    Raw(&'static [&'static str]),
}

/// Every key of the schema but the corpus paths, with values typical of a tiny run (drawn more
/// often, so that many drawn recipes train) beside the edges.
fn keys() -> Vec<(&'static str, Kind)> {
    use Kind::*;
    vec![
        ("data.valid_size", Int(&["5", "20"])),
        ("data.test_size", Int(&["0", "10"])),
        ("data.split_seed", Int(&["1", "7"])),
        ("data.swap", Bool),
        ("data.on_bad_line", Word(&["error", "skip", "ignore"])),
        ("data.max_len", Int(&["8", "16", "32"])),
        ("data.limit", Int(&["50", "200", "300"])),
        ("data.block_size", Int(&["8", "16", "24"])),
        ("tokenizer.kind", Word(&["unigram", "bpe", "wordpiece"])),
        ("tokenizer.vocab_size", Int(&["16", "60", "100", "400"])),
        ("tokenizer.lowercase", Bool),
        ("tokenizer.min_frequency", Int(&["1", "2", "5"])),
        ("tokenizer.train_sentences", Int(&["0", "40", "1000000"])),
        ("tokenizer.sample_alpha", Float(&["0.0", "0.1", "0.5"])),
        ("tokenizer.bpe_dropout", Float(&["0.0", "0.1"])),
        ("loader.max_tokens", Raw(&["64", "200", "400", "2000", "\"auto\"", "[[16, 400], [64, 300]]", "[[8, 4]]", "[]", "[[0, 0]]", "[[32, 100], [16, 200]]", "\"lots\""])),
        ("loader.auto_token_cap", Int(&["256", "4096"])),
        ("loader.max_sentences", Int(&["0", "4", "16"])),
        ("loader.bucket_pool", Int(&["0", "4", "400"])),
        ("loader.workers", Int(&["1", "2", "3"])),
        ("loader.prefetch", Int(&["1", "4", "8"])),
        ("loader.batch_multiple", Int(&["1", "2", "8"])),
        ("model.d_model", Int(&["8", "12", "16", "9"])),
        ("model.n_heads", Int(&["1", "2", "3", "4"])),
        ("model.d_ff", Int(&["8", "16", "32"])),
        ("model.encoder_layers", Int(&["1", "2"])),
        ("model.decoder_layers", Int(&["1", "2"])),
        ("model.dropout", Float(&["0.0", "0.1", "0.3"])),
        ("model.pre_ln", Bool),
        ("model.tie_embeddings", Bool),
        ("model.positions", Word(&["sinusoidal", "learned", "rotary", "alibi"])),
        ("model.max_positions", Int(&["34", "40", "66", "256"])),
        ("model.activation", Word(&["gelu", "relu", "swish"])),
        ("train.seed", Int(&["1", "2"])),
        ("train.epochs", Int(&["1", "2"])),
        ("train.lr", Float(&["1e-3", "3e-3"])),
        ("train.schedule", Word(&["inverse_sqrt", "cosine", "constant", "linear"])),
        ("train.warmup_steps", Int(&["0", "1", "10"])),
        ("train.min_lr", Float(&["0.0", "1e-5"])),
        ("train.weight_decay", Float(&["0.0", "0.01"])),
        ("train.beta1", Float(&["0.9"])),
        ("train.beta2", Float(&["0.98", "0.999"])),
        ("train.eps", Float(&["1e-9", "1e-6"])),
        ("train.clip_norm", Float(&["0.0", "1.0"])),
        ("train.accumulate", Int(&["1", "2", "3"])),
        ("train.label_smoothing", Float(&["0.0", "0.1"])),
        ("train.sync_interval", Int(&["1", "3", "10"])),
        ("train.sync_overlap", Bool),
        ("train.save_every", Int(&["0", "1"])),
        ("train.save_every_steps", Int(&["0", "1", "2"])),
        ("train.keep_checkpoints", Int(&["0", "1", "3"])),
        ("train.on_nan", Word(&["stop", "skip", "rollback", "ignore"])),
        ("train.nan_lr_factor", Float(&["0.5"])),
        ("train.nan_max_recoveries", Int(&["0", "1", "5"])),
        ("train.precision", Word(&["f32", "bf16", "f16", "f8"])),
        ("train.ema_decay", Float(&["0.0", "0.9", "0.999", "1.0"])),
        ("train.patience", Int(&["0", "1", "3"])),
        ("train.best_metric", Word(&["valid_loss", "bleu", "chrf"])),
        ("backend.device", Word(&["cpu", "auto", "cuda", "cuda:0", "gpu", "wgpu:virtual:3", "wgpu:gpu"])),
        ("backend.threads", Int(&["0", "1", "2"])),
        ("backend.cpu_split", Int(&["0", "1", "2", "3"])),
        ("backend.devices", Raw(&["[]", "[\"cpu\", \"cpu\"]", "[\"cpu\"]", "[\"cuda:0\", \"cpu\"]", "[\"cuda:0\", \"cuda:0\"]", "\"cpu\""])),
        ("eval.bleu", Bool),
        ("eval.bleu_sentences", Int(&["0", "5"])),
        ("eval.max_len_a", Float(&["1.5", "0.0"])),
        ("eval.max_len_b", Int(&["0", "10"])),
        ("eval.beam", Int(&["1", "2", "4"])),
        ("eval.len_penalty", Float(&["0.0", "1.0"])),
    ]
}

fn value(d: &mut Draw, kind: &Kind, edge_rate: f64) -> String {
    let typical = !d.chance(edge_rate);
    match kind {
        Kind::Int(t) if typical => d.pick(t).to_string(),
        Kind::Int(_) => d.pick(&EDGES).to_string(),
        Kind::Float(t) if typical => d.pick(t).to_string(),
        Kind::Float(_) => d.pick(&FLOATS).to_string(),
        Kind::Bool if d.chance(0.9) => d.pick(&["true", "false"]).to_string(),
        Kind::Bool => "1".to_string(),
        Kind::Word(w) => format!("{:?}", d.pick(w)),
        Kind::Raw(r) => d.pick(r).to_string(),
    }
}

/// A drawn recipe: a tiny base (so accepted recipes train in seconds; at most 3 optimizer steps),
/// then a share of the schema's keys drawn, typical values or edges.
fn draw_recipe(d: &mut Draw, pairs: &Path, text: &Path, cache: &Path) -> String {
    let lm = d.chance(0.3);
    let mut table: Vec<(String, String)> = vec![
        ("data.format".into(), if lm { "\"text\"" } else { "\"pairs\"" }.into()),
        ("data.train".into(), format!("{:?}", if lm { text } else { pairs }.display().to_string())),
        ("data.limit".into(), "300".into()),
        ("data.valid_size".into(), "20".into()),
        ("data.test_size".into(), "10".into()),
        ("data.max_len".into(), "32".into()),
        ("data.block_size".into(), "16".into()),
        ("tokenizer.vocab_size".into(), "100".into()),
        ("loader.max_tokens".into(), "400".into()),
        ("loader.cache_dir".into(), format!("{:?}", cache.display().to_string())),
        ("model.family".into(), if lm { "\"lm\"" } else { "\"transformer\"" }.into()),
        ("model.d_model".into(), "16".into()),
        ("model.n_heads".into(), "2".into()),
        ("model.d_ff".into(), "32".into()),
        ("model.encoder_layers".into(), "1".into()),
        ("model.decoder_layers".into(), "1".into()),
        ("model.max_positions".into(), "64".into()),
        ("train.epochs".into(), "1".into()),
        ("train.max_steps".into(), d.pick(&["1", "2", "3"]).into()),
        ("backend.device".into(), "\"cpu\"".into()),
        ("eval.bleu_sentences".into(), "5".into()),
    ];
    // Some recipes stay near the typical (so that many train), others go to the edges.
    let key_rate = d.pick(&[0.05, 0.15, 0.3]);
    let edge_rate = d.pick(&[0.0, 0.05, 0.15, 0.5]);
    for (key, kind) in keys() {
        if d.chance(key_rate) {
            let v = value(d, &kind, edge_rate);
            match table.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = v,
                None => table.push((key.to_string(), v)),
            }
        }
    }
    if d.chance(0.02) {
        table.push(("model.bogus_key".into(), "1".into()));
    }
    let mut out = String::new();
    for section in ["data", "tokenizer", "loader", "model", "train", "backend", "eval"] {
        out.push_str(&format!("[{section}]\n"));
        for (k, v) in table.iter().filter(|(k, _)| k.split('.').next() == Some(section)) {
            out.push_str(&format!("{} = {v}\n", k.split_once('.').unwrap().1));
        }
    }
    out
}

fn seed() -> u64 {
    std::env::var("KILN_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
}

/// The corpora: real sentence pairs and real text, a few hundred lines each.
fn corpora(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let pairs: String = std::fs::read_to_string(root().join("assets/de-en.ding.tsv")).unwrap().lines().take(400).map(|l| format!("{l}\n")).collect();
    let text: String = std::fs::read_to_string(root().join("assets/shakespeare.txt")).unwrap().lines().take(600).map(|l| format!("{l}\n")).collect();
    let (p, t) = (dir.join("pairs.tsv"), dir.join("text.txt"));
    std::fs::write(&p, pairs).unwrap();
    std::fs::write(&t, text).unwrap();
    (p, t)
}

#[test]
fn thousands_of_drawn_recipes_are_accepted_or_refused_in_one_line_without_panicking() {
    let seed = seed();
    let mut d = Draw(seed);
    let dir = tempfile::tempdir().unwrap();
    let (pairs, text) = corpora(dir.path());
    let cases: usize = std::env::var("KILN_FUZZ_PARSE_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..cases {
        let recipe = draw_recipe(&mut d, &pairs, &text, &dir.path().join("cache"));
        let parsed = std::panic::catch_unwind(|| kiln_recipe::Recipe::parse(&recipe, "drawn.toml", &[]));
        let Ok(parsed) = parsed else { panic!("seed {seed} case {case}: parsing panicked on\n{recipe}") };
        match parsed {
            Ok(r) => {
                accepted += 1;
                // The size check runs on every accepted recipe before a model is built.
                let fits = std::panic::catch_unwind(|| kiln_families::family::check_model_fits(&r, r.tokenizer.vocab_size, 24 << 30, "test"));
                assert!(fits.is_ok(), "seed {seed} case {case}: the size check panicked on\n{recipe}");
            }
            Err(e) => {
                refused += 1;
                let line = e.to_string();
                assert!(!line.contains('\n') && line.starts_with("drawn.toml"), "seed {seed} case {case}: {line}\n{recipe}");
            }
        }
    }
    eprintln!("seed {seed}: {cases} recipes, {accepted} accepted, {refused} refused");
    assert!(accepted > cases / 10 && refused > cases / 10, "the draw covers both sides: {accepted} accepted, {refused} refused");
}

/// How a drawn run ended.
#[derive(Debug, PartialEq)]
enum Ending {
    Refused,
    Finished,
    Stopped,
    Diverged,
}

/// Runs `args` and checks the promise: a refusal is exit 2 and one error line; a run that has
/// not ended after `patience` is asked to stop (SIGTERM) and must; never a panic.
fn run_checked(args: &[String], patience: Duration, what: &str) -> Ending {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(root()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    let mut signalled = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let waited = t0.elapsed();
        if (signalled == 0 && waited > patience) || (signalled == 1 && waited > patience * 3) {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            signalled += 1;
        }
        assert!(waited < patience * 5, "{what}: did not stop after SIGTERM twice");
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = {
        use std::io::Read;
        let mut s = String::new();
        child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
        s
    };
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{what}: panicked:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.iter().all(|l| l.starts_with("kiln: ")), "{what}: stray output on stderr:\n{err}");
    match status.code() {
        Some(0) if signalled > 0 => Ending::Stopped,
        Some(0) => Ending::Finished,
        Some(130) if signalled > 1 => Ending::Stopped,
        Some(code @ (2 | 3)) => {
            let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("kiln: error: ")).collect();
            assert_eq!(errors.len(), 1, "{what}: exit {code} wants one error line:\n{err}");
            if code == 2 { Ending::Refused } else { Ending::Diverged }
        }
        other => panic!("{what}: exit {other:?}:\n{err}"),
    }
}

fn cases() -> usize {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(40)
}

#[test]
fn drawn_recipes_run_or_are_refused_by_the_binary() {
    let seed = seed();
    let mut d = Draw(seed ^ 0x5EED);
    let dir = tempfile::tempdir().unwrap();
    let (pairs, text) = corpora(dir.path());
    let mut endings = std::collections::BTreeMap::<String, usize>::new();
    for case in 0..cases() {
        let recipe = draw_recipe(&mut d, &pairs, &text, &dir.path().join("cache"));
        let path = dir.path().join(format!("case-{case}.toml"));
        std::fs::write(&path, &recipe).unwrap();
        let run = dir.path().join(format!("run-{case}"));
        let args = vec!["train".to_string(), path.display().to_string(), "--run-dir".into(), run.display().to_string(), "--no-tui".into()];
        let ending = run_checked(&args, Duration::from_secs(20), &format!("seed {seed} case {case}:\n{recipe}\n"));
        *endings.entry(format!("{ending:?}")).or_default() += 1;
        let _ = std::fs::remove_dir_all(&run);
    }
    eprintln!("seed {seed}: {endings:?}");
    assert!(endings.get("Finished").copied().unwrap_or(0) + endings.get("Stopped").copied().unwrap_or(0) > 0, "no drawn recipe trained: {endings:?}");
}

#[test]
fn drawn_cli_values_of_translate_generate_and_eval_run_or_are_refused() {
    let seed = seed();
    let mut d = Draw(seed ^ 0xC11);
    let dir = tempfile::tempdir().unwrap();
    let (mt, lm) = (dir.path().join("mt"), dir.path().join("lm"));
    let o = train_with(&smoke(), &mt, &["train.epochs=1", "train.max_steps=4", "eval.bleu=false"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train_with(&root().join("recipes/smoke-lm.toml").display().to_string(), &lm, &["train.epochs=1", "train.max_steps=4"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "Guten Morgen.\nWo ist der Bahnhof?\n\n").unwrap();
    let ints = |d: &mut Draw| if d.chance(0.5) { d.pick(&["1", "2", "3", "5", "0"]).to_string() } else { d.pick(&EDGES).to_string() };
    let floats = |d: &mut Draw| d.pick(&FLOATS).to_string();
    let checkpoints = ["latest", "best", "step-0000004", "step-9999999", "../x", "", "/etc"];
    let mut endings = std::collections::BTreeMap::<String, usize>::new();
    for case in 0..cases() {
        let mut args: Vec<String> = match d.below(3) {
            0 => vec!["translate".into(), mt.display().to_string(), "--input".into(), input.display().to_string(), "--beam".into(), ints(&mut d), "--len-penalty".into(), floats(&mut d)],
            1 => vec![
                "generate".into(),
                lm.display().to_string(),
                "--prompt".into(),
                d.pick(&["", "ROMEO:", "\u{feff}x\ty"]).into(),
                "--max-tokens".into(),
                ints(&mut d),
                "--temperature".into(),
                floats(&mut d),
                "--top-k".into(),
                ints(&mut d),
                "--seed".into(),
                ints(&mut d),
            ],
            _ => vec!["eval".into(), d.pick(&[&mt, &lm]).display().to_string(), "--split".into(), d.pick(&["test", "valid", "train"]).into(), "--beam".into(), ints(&mut d)],
        };
        if args[0] == "translate" && d.chance(0.5) {
            args.extend(["--n-best".into(), ints(&mut d)]);
        }
        if d.chance(0.2) {
            args.extend(["--checkpoint".into(), d.pick(&checkpoints).into()]);
        }
        let ending = run_checked(&args, Duration::from_secs(30), &format!("seed {seed} case {case}: kiln {}", args.join(" ")));
        *endings.entry(format!("{} {ending:?}", args[0])).or_default() += 1;
    }
    eprintln!("seed {seed}: {endings:?}");
    assert!(endings.keys().any(|k| k.ends_with("Finished")), "no drawn command ran: {endings:?}");
}
