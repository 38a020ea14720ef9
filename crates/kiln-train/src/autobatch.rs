//! `loader.max_tokens = "auto"`: a token budget per length range, probed on the device when a run
//! starts, like Marian's `mini-batch-fit`. For each range, longest first, training steps on
//! synthetic batches of that length (source and target both at the range's top) grow the batch
//! until the step's peak memory would pass `fraction` (85 %) of the device's, then bisect. The
//! budget of a range is the largest batch that was *measured* to fit; a size that failed (out of
//! memory, or over the limit) bounds every batch at least as big, at that length or longer, and
//! is never returned. Before a try, the peak is extrapolated from the sizes already measured; a
//! size predicted over the limit is not run (on the CPU an allocation failure is the kernel's OOM
//! killer, not an error kiln could catch).
//!
//! The search ([`plan`]) is a pure function of a `try_size` callback, so it is tested with a model
//! of memory; [`MemoryMeter`] is what measures a real device.

use serde::{Deserialize, Serialize};

/// One range's budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Batches whose longest side is at most this many tokens.
    pub up_to: usize,
    pub sentences: usize,
    pub tokens: usize,
    /// Peak device memory of a training step at this size, as measured.
    pub peak_mb: f64,
}

/// What a run chose (`autobatch.json` in the run directory; a resumed run reads it back, so its
/// batches are the ones the run started with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// Longest range first.
    pub rows: Vec<Row>,
    pub device: String,
    pub capacity_mb: f64,
    pub limit_mb: f64,
    pub cap_tokens: usize,
    /// Training steps run while probing.
    pub probes: usize,
    pub seconds: f64,
}

impl Table {
    /// `(up to length, tokens)` in increasing length, for `loader.max_tokens`.
    pub fn budget_rows(&self) -> Vec<(usize, usize)> {
        let mut rows: Vec<(usize, usize)> = self.rows.iter().map(|r| (r.up_to, r.tokens)).collect();
        rows.sort_unstable();
        rows
    }

    /// The table for the log, one line per range.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "loader.max_tokens = \"auto\": {} ≤ {:.0} MiB ({:.0} % of {:.0} MiB), {} probe steps in {:.1} s",
            self.device,
            self.limit_mb,
            100.0 * self.limit_mb / self.capacity_mb.max(1.0),
            self.capacity_mb,
            self.probes,
            self.seconds
        )];
        for r in self.rows.iter().rev() {
            let capped = if r.tokens + r.up_to > self.cap_tokens { " (loader.auto_token_cap)" } else { "" };
            out.push(format!("  longest side ≤ {:>4}: {:>6} tokens, {:>5} sentences, peak {:.0} MiB{capped}", r.up_to, r.tokens, r.sentences, r.peak_mb));
        }
        out
    }
}

/// The batch budget a planned recipe key gives. `Auto` is replaced by the run's probed table
/// before anything is planned (the trainer; `open_run` for a finished run); only `kiln bench
/// data`, which runs no model, sees it here and plans with 4,096 tokens.
pub fn budget(limit: &kiln_recipe::TokenLimit) -> kiln_data::batching::TokenBudget {
    use kiln_data::batching::TokenBudget;
    match limit {
        kiln_recipe::TokenLimit::Tokens(n) => TokenBudget::fixed(*n),
        kiln_recipe::TokenLimit::Table(rows) => TokenBudget::table(rows),
        kiln_recipe::TokenLimit::Auto => TokenBudget::fixed(4096),
    }
}

pub const FILE: &str = "autobatch.json";

/// Reads the table a run chose (`autobatch.json`).
pub fn read(run_dir: &std::path::Path) -> Result<Table, String> {
    let path = run_dir.join(FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: cannot read the probed batch sizes of loader.max_tokens = \"auto\": {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a batch-size table: {e}", path.display()))
}

pub fn write(run_dir: &std::path::Path, table: &Table) -> Result<(), String> {
    let path = run_dir.join(FILE);
    let text = serde_json::to_string_pretty(table).expect("json");
    kiln_events::write_atomic(&path, text.as_bytes()).map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

/// The ranges to probe: powers of two from 16 while clearly below `longest` (by a quarter; a
/// range just under it would cost a probe and change nothing), then `longest` itself.
pub fn length_ranges(longest: usize) -> Vec<usize> {
    let mut out: Vec<usize> = std::iter::successors(Some(16usize), |l| Some(l * 2)).take_while(|l| l * 5 / 4 < longest).collect();
    out.push(longest.max(1));
    out
}

/// A try's outcome: the step's peak bytes, or why it failed.
pub type Outcome = Result<u64, String>;

/// Finds each range's largest batch (in sentences of the range's length) whose training step
/// peaks at ≤ `limit` bytes, with at most `cap_tokens` tokens. `try_size(len, sentences)` runs one
/// step. Returns the rows longest first and the number of steps run, or what did not fit.
pub fn plan(lengths: &[usize], limit: u64, cap_tokens: usize, try_size: &mut dyn FnMut(usize, usize) -> Outcome) -> Result<(Vec<Row>, usize), String> {
    let mut lengths = lengths.to_vec();
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    lengths.dedup();
    // (length, sentences) that failed or went over the limit: bigger batches at that length or
    // longer fail too.
    let mut failed: Vec<(usize, usize)> = Vec::new();
    let mut rows = Vec::new();
    let mut probes = 0;
    let mut previous_tokens: Option<usize> = None;
    for &len in &lengths {
        let max_n = (cap_tokens / len).max(1);
        let known_bad = |failed: &[(usize, usize)]| failed.iter().filter(|f| f.0 <= len).map(|f| f.1).min();
        // (sentences, peak bytes) measured to fit at this length.
        let mut fits: Vec<(usize, u64)> = Vec::new();
        let mut lo = 0;
        let mut hi = known_bad(&failed).unwrap_or(usize::MAX).min(max_n + 1);
        let mut bounded = hi <= max_n;
        // A shorter range starts from the longer one's tokens: usually a fit, often the answer.
        let mut n = previous_tokens.map_or(1, |t| t / len).clamp(1, hi.saturating_sub(1).max(1));
        while n > lo && n < hi {
            let outcome = match predict(&fits, n) {
                Some(p) if p > limit => Err(format!("predicted {} MiB", p >> 20)),
                _ => {
                    probes += 1;
                    match try_size(len, n) {
                        Ok(peak) if peak <= limit => Ok(peak),
                        Ok(peak) => {
                            failed.push((len, n));
                            Err(format!("{} MiB", peak >> 20))
                        }
                        Err(e) => {
                            failed.push((len, n));
                            Err(e)
                        }
                    }
                }
            };
            match outcome {
                Ok(peak) => {
                    fits.push((n, peak));
                    lo = n;
                }
                Err(_) => {
                    hi = n;
                    bounded = true;
                }
            }
            // Within 1/16 of the answer is close enough: each try is a training step.
            if hi - lo <= 1 || (bounded && (hi - lo) * 16 <= lo) {
                break;
            }
            n = if bounded { lo + (hi - lo) / 2 } else { (lo * 2).min(hi - 1) };
        }
        // The guard: only a size measured to fit, below every size that failed.
        let bad = known_bad(&failed).unwrap_or(usize::MAX);
        let Some(&(sentences, peak)) = fits.iter().filter(|f| f.0 < bad).max_by_key(|f| f.0) else {
            return Err(format!("one sequence of {len} tokens does not fit a training step in {} MiB", limit >> 20));
        };
        previous_tokens = Some(sentences * len);
        rows.push(Row { up_to: len, sentences, tokens: sentences * len, peak_mb: peak as f64 / (1u64 << 20) as f64 });
    }
    Ok((rows, probes))
}

/// The peak a step of `n` sentences should reach, from the sizes measured: a line through the two
/// largest, or (one size measured) proportional to it, which overestimates (fixed costs scale too).
fn predict(fits: &[(usize, u64)], n: usize) -> Option<u64> {
    let mut sorted = fits.to_vec();
    sorted.sort_unstable();
    match sorted[..] {
        [] => None,
        [.., (n1, p1), (n2, p2)] if n > n2 => {
            let slope = p2.saturating_sub(p1) as f64 / (n2 - n1) as f64;
            Some(p2 + (slope * (n - n2) as f64) as u64)
        }
        [(n1, p1)] if n > n1 => Some((p1 as f64 * n as f64 / n1 as f64) as u64),
        _ => None,
    }
}

/// Peak memory of the steps run between [`MemoryMeter::reset`] and [`MemoryMeter::peak`].
pub trait MemoryMeter: Send {
    fn capacity(&self) -> u64;
    fn reset(&mut self);
    fn peak(&mut self) -> u64;
}

/// The CPU: the process's resident set (`VmHWM`, reset through `/proc/self/clear_refs`), against
/// the memory it has plus what the system has available.
pub struct HostMemory {
    capacity: u64,
}

impl HostMemory {
    pub fn new() -> Option<Self> {
        let available = crate::system::meminfo_kb("MemAvailable:")?;
        let own = crate::system::status_kb("VmRSS:")?;
        Some(Self { capacity: (available + own) * 1024 })
    }
}

impl MemoryMeter for HostMemory {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn reset(&mut self) {
        crate::system::reset_peak_rss();
    }

    fn peak(&mut self) -> u64 {
        crate::system::status_kb("VmHWM:").unwrap_or(u64::MAX / 2048) * 1024
    }
}

/// A CUDA device: CubeCL's reserved memory on the loop's stream after a step (its pools keep the
/// pages a step needed, so this is the step's peak, with the pool's rounding), emptied of unused
/// pages before each try; the device's size from `nvidia-smi`.
#[cfg(feature = "cuda")]
pub struct CudaMemory {
    client: cubecl::client::ComputeClient<cubecl::cuda::CudaRuntime>,
    capacity: u64,
}

/// The memory size of NVIDIA GPU `index` in bytes, from `nvidia-smi`.
pub fn nvidia_smi_memory(index: usize) -> Result<u64, String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits", &format!("--id={index}")])
        .output()
        .map_err(|e| format!("loader.max_tokens = \"auto\": cannot read the GPU's memory size with nvidia-smi ({e}); give loader.max_tokens a number"))?;
    let mib: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| format!("loader.max_tokens = \"auto\": nvidia-smi gave no memory size for GPU {index}; give loader.max_tokens a number"))?;
    Ok(mib << 20)
}

/// CubeCL's memory on CUDA device `index`: bytes in use by tensors and reserved by its pools.
#[cfg(feature = "cuda")]
pub fn cuda_memory_use(index: usize) -> Option<(u64, u64)> {
    use cubecl::Runtime;
    let usage = cubecl::cuda::CudaRuntime::client(&cubecl::cuda::CudaDevice::new(index)).memory_usage().ok()?;
    Some((usage.bytes_in_use, usage.bytes_reserved))
}

#[cfg(feature = "cuda")]
impl CudaMemory {
    pub fn new(index: usize) -> Result<Self, String> {
        use cubecl::Runtime;
        let capacity = nvidia_smi_memory(index)?;
        let client = cubecl::cuda::CudaRuntime::client(&cubecl::cuda::CudaDevice::new(index));
        Ok(Self { client, capacity })
    }
}

#[cfg(feature = "cuda")]
impl MemoryMeter for CudaMemory {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn reset(&mut self) {
        self.client.memory_cleanup();
    }

    fn peak(&mut self) -> u64 {
        self.client.memory_usage().map(|u| u.bytes_reserved).unwrap_or(u64::MAX / 2)
    }
}

/// Probes the batch budget per length range for `loader.max_tokens = "auto"`: each try is one
/// training step (forward, backward, clipping, AdamW) on a synthetic batch of `rows` rows of
/// `len` tokens (`make_batch`), on copies of the model and of a fresh optimizer that are then
/// dropped, so training starts untouched. A try that panics (a backend's out-of-memory error)
/// counts as a failure.
#[allow(clippy::too_many_arguments)] // the probe's inputs, each from its own owner
pub fn probe<B: burn::tensor::backend::AutodiffBackend, T: crate::task::Task<B>>(
    task: &T,
    model: &T::Model,
    train: &kiln_recipe::TrainSection,
    cpu_split: usize,
    device: &B::Device,
    device_name: &str,
    meter: &mut dyn MemoryMeter,
    lengths: &[usize],
    cap: usize,
    make_batch: &dyn Fn(usize, usize) -> T::Batch,
) -> Result<Table, String> {
    use burn::optim::Optimizer;
    use burn::tensor::Tensor;
    use crate::step::{step_gradients, Faults, HostStep, StepPlace, SINGLE};
    use crate::task::TaskBatch;
    let started = std::time::Instant::now();
    let capacity = meter.capacity();
    let limit = (capacity as f64 * 0.85) as u64;
    let host = HostStep::for_backend::<B>(cpu_split);
    let faults = Faults::default();
    let optim = crate::trainer::adamw::<B, T::Model>(train);
    // A try that fails for another reason than memory ends the probe: that is a bug or a bad
    // model, not a batch that does not fit.
    let mut fatal: Option<String> = None;
    let mut try_size = |len: usize, n: usize| -> Outcome {
        if let Some(why) = &fatal {
            return Err(why.clone());
        }
        let batch = make_batch(len, n);
        meter.reset();
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let tokens = batch.stats().target_tokens;
            let at = StepPlace { device, host, replica: SINGLE, loss_scale: None, faults: &faults, watchdog: None };
            let sums = step_gradients(task, model, std::slice::from_ref(&batch), train, 0, tokens, false, at).expect("one device makes no collective call");
            let stepped = optim.clone().step(train.lr, model.clone(), sums.grads);
            // Waits for the step, optimizer included, to finish on the device.
            let _ = Tensor::cat(vec![sums.loss_sum, sums.norm], 0).into_data();
            drop(stepped);
        }));
        std::panic::set_hook(previous_hook);
        match ran {
            Ok(()) => Ok(meter.peak()),
            Err(panic) => {
                let why = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "the step failed".into());
                if !is_allocation_failure(&why) {
                    fatal = Some(format!("a probe step of {n} × {len} tokens failed, not for memory: {}", why.split_whitespace().collect::<Vec<_>>().join(" ")));
                }
                Err(why)
            }
        }
    };
    let planned = plan(lengths, limit, cap, &mut try_size);
    if let Some(why) = fatal {
        return Err(format!("loader.max_tokens = \"auto\": {why} on {device_name}"));
    }
    let (rows, probes) = planned.map_err(|e| format!("loader.max_tokens = \"auto\": {e} on {device_name}"))?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(Table { rows, device: device_name.to_string(), capacity_mb: mib(capacity), limit_mb: mib(limit), cap_tokens: cap, probes, seconds: started.elapsed().as_secs_f64() })
}

/// Whether a failed step's message is an allocation failure: CubeCL's out-of-memory launch error
/// and buffer error (cubecl-runtime 0.10 `LaunchError::OutOfMemory`, `IoError::BufferTooBig`),
/// the CUDA driver's, and Rust's capacity overflow. Anything else is not "does not fit".
pub fn is_allocation_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["out-of-memory", "out of memory", "outofmemory", "can't allocate", "allocation error", "capacity overflow", "memory allocation of"].iter().any(|p| m.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allocation_failures_count_as_not_fitting() {
        assert!(is_allocation_failure("An out-of-memory error happened during launch\nCaused by: ..."));
        assert!(is_allocation_failure("can't allocate buffer of size: 123"));
        assert!(is_allocation_failure("CUDA allocation error: CUDA_ERROR_OUT_OF_MEMORY"));
        assert!(is_allocation_failure("capacity overflow"));
        assert!(!is_allocation_failure("index out of bounds: the len is 3 but the index is 7"));
        assert!(!is_allocation_failure("d_model(16) of the input must be equal to d_model of encoding(32)"));
    }

    const MB: u64 = 1 << 20;

    /// Memory of a step: fixed costs, plus per token, plus attention's square per sequence.
    fn model(len: usize, n: usize) -> u64 {
        200 * MB + (n * len) as u64 * 40_000 + (n * len * len) as u64 * 600
    }

    fn fits(len: usize, n: usize, limit: u64) -> bool {
        model(len, n) <= limit
    }

    #[test]
    fn each_range_gets_nearly_the_largest_batch_that_fits_and_never_one_that_does_not() {
        let limit = 4096 * MB;
        let mut tried = Vec::new();
        let (rows, probes) = plan(&length_ranges(130), limit, 1 << 20, &mut |len, n| {
            tried.push((len, n));
            Ok(model(len, n))
        })
        .unwrap();
        assert_eq!(rows.iter().map(|r| r.up_to).collect::<Vec<_>>(), vec![130, 64, 32, 16], "longest first");
        for r in &rows {
            assert!(fits(r.up_to, r.sentences, limit), "{r:?} does not fit");
            let best = (1..100_000).take_while(|&n| fits(r.up_to, n, limit)).last().unwrap();
            assert!(r.sentences * 16 >= best * 15, "{r:?}: the best is {best} sentences");
            assert_eq!(r.tokens, r.sentences * r.up_to);
        }
        // Longer sequences cost more per token (the square), so they get fewer tokens.
        assert!(rows.windows(2).all(|w| w[0].tokens < w[1].tokens), "{rows:?}");
        assert!(tried.iter().all(|&(l, n)| model(l, n) <= limit * 2), "no wild try: {tried:?}");
        assert_eq!(probes, tried.len());
        assert!(probes < 60, "{probes} probes");
    }

    /// A device that runs out of memory below what the memory model says (from 24 sentences of
    /// 64 tokens on), and once more by chance (the first try at 32 tokens): each failed size
    /// bounds the answer at its length and longer, though the memory model says it would fit.
    #[test]
    fn a_size_that_failed_is_never_chosen_nor_anything_bigger() {
        let limit = 4096 * MB;
        let mut failures = Vec::new();
        let (rows, _) = plan(&[64, 32], limit, 1 << 20, &mut |len, n| {
            let first_at_32 = len == 32 && !failures.iter().any(|f: &(usize, usize)| f.0 == 32);
            if (len == 64 && n >= 24) || first_at_32 {
                failures.push((len, n));
                Err("CUDA out of memory".into())
            } else {
                Ok(model(len, n))
            }
        })
        .unwrap();
        assert!(failures.len() >= 2, "{failures:?}");
        assert!(rows[0].up_to == 64 && rows[0].sentences < 24 && rows[0].sentences >= 20, "{rows:?}");
        for r in &rows {
            for &(len, n) in &failures {
                if len <= r.up_to {
                    assert!(r.sentences < n, "{r:?} despite a failure at {n} × {len}");
                }
            }
            assert!(fits(r.up_to, r.sentences, limit));
        }
    }

    #[test]
    fn the_token_cap_bounds_every_range_and_the_search_stops_there() {
        let (rows, probes) = plan(&[64, 32, 16], u64::MAX, 4096, &mut |len, n| Ok(model(len, n))).unwrap();
        assert_eq!(rows.iter().map(|r| r.tokens).collect::<Vec<_>>(), vec![4096, 4096, 4096]);
        assert!(probes <= 10, "{probes} probes");
    }

    #[test]
    fn nothing_fits_is_an_error_naming_the_length() {
        let e = plan(&[128], 100 * MB, 1 << 20, &mut |len, n| Ok(model(len, n))).unwrap_err();
        assert!(e.contains("one sequence of 128 tokens") && e.contains("100 MiB"), "{e}");
    }

    #[test]
    fn a_size_predicted_over_the_limit_is_not_run() {
        let limit = 1024 * MB;
        let mut biggest = 0;
        plan(&[64], limit, 1 << 20, &mut |len, n| {
            biggest = biggest.max(model(len, n));
            Ok(model(len, n))
        })
        .unwrap();
        assert!(biggest <= limit * 5 / 4, "ran a step of {} MiB against {} MiB", biggest / MB, limit / MB);
    }

    #[test]
    fn ranges_are_powers_of_two_then_the_longest() {
        assert_eq!(length_ranges(130), vec![16, 32, 64, 130]);
        assert_eq!(length_ranges(66), vec![16, 32, 66]);
        assert_eq!(length_ranges(64), vec![16, 32, 64]);
        assert_eq!(length_ranges(10), vec![10]);
    }
}
