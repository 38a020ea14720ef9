//! The multi-worker loader: persistent worker threads turn batch plans (lists of example indices)
//! into ready batches ahead of the trainer, at most `prefetch` ready batches in flight.
//!
//! Batch `k` of a pass always goes to worker `k mod workers`, and the trainer takes batch `k` from
//! that worker's queue, so the order the trainer sees never depends on the worker count or on
//! thread timing. Workers live as long as the loader, across epochs. What a worker builds is up to
//! the caller: each batch is a job (a closure), and kiln's trainer pads the batch and puts its
//! tensors on the device there, so the training thread only runs the model. The time the trainer
//! spends waiting is measured.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::batching::{BatchPlan, HostBatch};
use crate::store::PairIds;

/// Builds a batch on a worker thread.
pub type Job<T> = Box<dyn FnOnce() -> T + Send>;

/// What becomes of a padded batch of sentence pairs (tensors on the device, for the trainer).
pub type Build<T> = dyn Fn(HostBatch) -> T + Send + Sync;

/// Jobs for a plan of sentence-pair batches: each pads its batch of `examples` (the store's pairs,
/// or an epoch's resampled ones under subword regularisation) and hands it to `build`. Jobs share
/// the plan; a batch's indices are read when it is built.
pub fn pair_jobs<T: 'static>(examples: &Arc<dyn PairIds>, plan: &Arc<BatchPlan>, build: &Arc<Build<T>>) -> Vec<Job<T>> {
    (0..plan.len())
        .map(|k| {
            let (examples, plan, build) = (Arc::clone(examples), Arc::clone(plan), Arc::clone(build));
            Box::new(move || build(HostBatch::build(&*examples, &plan.indices(k)))) as Job<T>
        })
        .collect()
}

struct Worker<T> {
    jobs: Option<Sender<Job<T>>>,
    ready: Option<Receiver<T>>,
    handle: Option<JoinHandle<()>>,
}

/// Builds batches on `workers` threads, `prefetch` ready batches at most (at least one per worker).
pub struct Loader<T: Send + 'static> {
    workers: Vec<Worker<T>>,
    /// Batches handed out since the last `start`.
    next: usize,
    /// Batches queued since the last `start`.
    queued: usize,
    waited: Duration,
    /// Built batches waiting to be taken, over all workers.
    ready: Arc<AtomicUsize>,
}

impl<T: Send + 'static> Loader<T> {
    pub fn new(workers: usize, prefetch: usize) -> Self {
        let n = workers.max(1);
        let depth = prefetch.max(n).div_ceil(n);
        let ready = Arc::new(AtomicUsize::new(0));
        let workers = (0..n)
            .map(|i| {
                let (job_tx, job_rx) = channel::<Job<T>>();
                let (ready_tx, ready_rx): (SyncSender<T>, Receiver<T>) = sync_channel(depth);
                let ready = Arc::clone(&ready);
                let handle = std::thread::Builder::new()
                    .name(format!("kiln-loader-{i}"))
                    .spawn(move || {
                        for job in job_rx {
                            let batch = job();
                            ready.fetch_add(1, Ordering::Relaxed);
                            if ready_tx.send(batch).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawn a loader thread");
                Worker { jobs: Some(job_tx), ready: Some(ready_rx), handle: Some(handle) }
            })
            .collect();
        Self { workers, next: 0, queued: 0, waited: Duration::ZERO, ready }
    }

    /// Queues a pass of batch jobs (one epoch, or its remainder after a resume). The previous
    /// pass must have been consumed.
    pub fn start(&mut self, jobs: Vec<Job<T>>) {
        assert_eq!(self.next, self.queued, "the previous pass was not consumed");
        self.next = 0;
        self.queued = jobs.len();
        let n = self.workers.len();
        for (k, job) in jobs.into_iter().enumerate() {
            let w = &self.workers[k % n];
            w.jobs.as_ref().expect("workers live while the loader does").send(job).expect("loader worker alive");
        }
    }

    /// The next batch of the pass, in plan order; `None` when the pass is done.
    pub fn next_batch(&mut self) -> Option<T> {
        if self.next >= self.queued {
            return None;
        }
        let w = &self.workers[self.next % self.workers.len()];
        let t0 = Instant::now();
        let batch = w.ready.as_ref().expect("workers live while the loader does").recv().expect("loader worker alive");
        self.waited += t0.elapsed();
        self.ready.fetch_sub(1, Ordering::Relaxed);
        self.next += 1;
        Some(batch)
    }

    /// Time spent waiting in `next_batch` since the last call, and resets it.
    pub fn take_wait(&mut self) -> Duration {
        std::mem::take(&mut self.waited)
    }

    /// Built batches waiting in the queues right now (the prefetch depth in use).
    pub fn ready(&self) -> usize {
        self.ready.load(Ordering::Relaxed)
    }
}

impl<T: Send + 'static> Drop for Loader<T> {
    fn drop(&mut self) {
        // Closing the job queues ends each worker's loop; dropping the ready queues makes a worker
        // blocked on a full queue (or finishing a batch) fail its send and stop.
        for w in &mut self.workers {
            w.jobs.take();
            w.ready.take();
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::Example;

    fn examples(n: usize) -> Arc<dyn PairIds> {
        let ex: Vec<Example> = (0..n as u32).map(|i| Example { src: vec![10 + i % 7; 1 + (i as usize % 5)], tgt: vec![20 + i % 3; 1 + (i as usize % 4)] }).collect();
        Arc::new(crate::PairSet::from_examples(&ex))
    }

    fn plan(n: usize) -> Vec<Vec<usize>> {
        (0..n).collect::<Vec<_>>().chunks(3).rev().map(|c| c.to_vec()).collect()
    }

    fn shared(batches: &[Vec<usize>]) -> Arc<BatchPlan> {
        Arc::new(BatchPlan::from_batches(batches))
    }

    fn drain(loader: &mut Loader<HostBatch>) -> Vec<HostBatch> {
        std::iter::from_fn(|| loader.next_batch()).collect()
    }

    #[test]
    fn same_batches_in_the_same_order_for_any_worker_count() {
        let ex = examples(100);
        let batches = plan(100);
        let build: Arc<Build<HostBatch>> = Arc::new(|b| b);
        let mut one = Loader::new(1, 2);
        let mut three = Loader::new(3, 4);
        for epoch in 0..2 {
            // Each pass may bring its own examples (resampled segmentations).
            let ex = if epoch == 0 { Arc::clone(&ex) } else { examples(101) };
            one.start(pair_jobs(&ex, &shared(&batches), &build));
            three.start(pair_jobs(&ex, &shared(&batches), &build));
            let (a, b) = (drain(&mut one), drain(&mut three));
            assert_eq!(a[0], HostBatch::build(&*ex, &batches[0]), "epoch {epoch}");
            assert_eq!(a.len(), batches.len(), "epoch {epoch}");
            assert_eq!(a, b, "epoch {epoch}");
            let expected: Vec<Vec<usize>> = a.iter().map(|b| b.indices.clone()).collect();
            assert_eq!(expected, batches);
        }
    }

    #[test]
    fn dropping_a_loader_mid_pass_joins_its_workers() {
        let build: Arc<Build<HostBatch>> = Arc::new(|b| b);
        let mut l = Loader::new(2, 2);
        l.start(pair_jobs(&examples(60), &shared(&plan(60)), &build));
        assert!(l.next_batch().is_some());
        drop(l);
    }
}
