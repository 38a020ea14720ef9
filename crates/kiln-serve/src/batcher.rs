//! The decoding thread: the one owner of the model on its device, fed by the HTTP handlers'
//! jobs. Requests that arrive within the wait of the first are decoded together (one list,
//! length-sorted into batches by the translator, as `kiln translate` sorts a file), so
//! concurrent clients share the device's batches instead of queueing one by one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use kiln_families::infer::{RunModel, Translate};
use kiln_families::BeamSettings;

use crate::Counters;

/// The n best translations (text, score) of each line of a job, or why there are none.
pub(crate) type Reply = Result<Vec<Vec<(String, f64)>>, String>;

/// One request's sentences and how to decode them.
pub(crate) struct Job {
    pub lines: Vec<String>,
    /// Source tokens of the lines (the batch budget counts them).
    pub tokens: usize,
    pub beam: BeamSettings,
    pub n_best: usize,
    pub reply: tokio::sync::oneshot::Sender<Reply>,
}

impl Job {
    /// Jobs decoded in one list must agree on everything but their lines.
    fn settings(&self) -> (usize, u64, usize) {
        (self.beam.beam, self.beam.len_penalty.to_bits(), self.n_best)
    }
}

/// The running decoding thread.
pub(crate) struct Decoder {
    thread: JoinHandle<Result<()>>,
    /// The device the model decodes on, as its backend names it.
    pub device: String,
}

impl Decoder {
    /// Waits for the thread, which ends once every job sender is gone and the queue is empty.
    pub fn join(self) -> Result<()> {
        self.thread.join().map_err(|_| anyhow!("the decoding thread panicked"))?
    }
}

/// Loads the run's model on the decoding thread; returns once it is ready (or why it is not).
pub(crate) fn start(run: Arc<RunModel>, wait: Duration, budget: usize, counters: Arc<Counters>) -> Result<(Sender<Job>, Decoder)> {
    let (jobs, queue) = channel::<Job>();
    let (ready, loaded) = channel::<Result<String, String>>();
    let thread = std::thread::Builder::new().name("kiln-decode".into()).spawn(move || {
        let told = ready.clone();
        let result = kiln_families::with_translator(&run, |translator| {
            let _ = told.send(Ok(translator.device()));
            run_jobs(translator, queue, wait, budget, &counters);
            Ok(())
        });
        if let Err(why) = &result {
            let _ = ready.send(Err(format!("{why:#}")));
        }
        result
    })?;
    match loaded.recv() {
        Ok(Ok(device)) => Ok((jobs, Decoder { thread, device })),
        Ok(Err(why)) => {
            let _ = thread.join();
            Err(anyhow!(why))
        }
        Err(_) => Err(anyhow!("the decoding thread ended while loading the model")),
    }
}

fn run_jobs(translator: &dyn Translate, queue: Receiver<Job>, wait: Duration, budget: usize, counters: &Counters) {
    while let Ok(first) = queue.recv() {
        let mut tokens = first.tokens;
        let mut jobs = vec![first];
        let deadline = Instant::now() + wait;
        while tokens < budget {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match queue.recv_timeout(left) {
                Ok(job) => {
                    tokens += job.tokens;
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        // Jobs with the same settings decode as one list, in arrival order.
        while !jobs.is_empty() {
            let settings = jobs[0].settings();
            let (same, rest): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| j.settings() == settings);
            jobs = rest;
            decode(translator, same, counters);
        }
    }
}

fn decode(translator: &dyn Translate, jobs: Vec<Job>, counters: &Counters) {
    let lines: Vec<String> = jobs.iter().flat_map(|j| j.lines.iter().cloned()).collect();
    let (beam, n_best) = (jobs[0].beam, jobs[0].n_best);
    // A failure (or a panic in the backend) answers these jobs with an error; the thread goes on.
    let result: Reply = match catch_unwind(AssertUnwindSafe(|| translator.translate(&lines, beam, n_best))) {
        Ok(Ok(out)) if out.len() == lines.len() => Ok(out),
        Ok(Ok(out)) => Err(format!("the translator gave {} results for {} sentences", out.len(), lines.len())),
        Ok(Err(why)) => Err(format!("{why:#}")),
        Err(panic) => Err(panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "the decoder panicked".into())),
    };
    counters.batches.fetch_add(1, Ordering::Relaxed);
    let mut at = 0;
    for job in jobs {
        let n = job.lines.len();
        let reply = result.as_ref().map(|all| all[at..at + n].to_vec()).map_err(Clone::clone);
        at += n;
        counters.queued.fetch_sub(n, Ordering::Relaxed);
        // A client that went away does not take its answer: nothing to do.
        let _ = job.reply.send(reply);
    }
}
