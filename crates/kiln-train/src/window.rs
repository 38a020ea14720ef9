//! The sync window: the one owner of "read the loss back once every N steps".
//!
//! A [`SyncWindow`] adds each step's summed loss (and the task's metric sums) on the device and
//! keeps each step's `[loss, gradient norm]` for the non-finite check; the host counts tokens and
//! rows from the batches it built. [`SyncWindow::close`] starts the window's one device→host
//! read, of everything in one tensor: at once, or on the [`WindowReader`] thread while the loop
//! queues the next window (`train.sync_overlap`). [`ClosedWindow::wait`] resolves it into a
//! [`WindowRead`]; its wait is the sync time the statistics count.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::task::{BatchStats, MetricDef, Per};

/// Training loss and metrics summed on the device over the steps of one window, with the host's
/// counts of what the steps ran on.
pub(crate) struct SyncWindow<B: Backend> {
    loss_sum: Option<Tensor<B, 1>>,
    /// The task's metric sums over the window, in the task's order.
    metric_sums: Vec<Tensor<B, 1>>,
    /// `[loss, gradient norm]` of each step, in order.
    checks: Vec<Tensor<B, 1>>,
    /// Host-side sums, for a window replayed without its non-finite steps (`on_nan = "skip"`):
    /// the loss, then each metric.
    pub host_sum: f64,
    pub host_metrics: Vec<f64>,
    /// Steps done before the window's first step.
    pub first_step: usize,
    pub tokens: u64,
    pub sentences: u64,
    pub real: u64,
    pub slots: u64,
    pub steps: usize,
    pub started: Instant,
    /// Target tokens of each replica (data parallel; empty with one device), every node's.
    pub device_tokens: Vec<u64>,
    /// The host's time in the window's all-reduces (data parallel).
    pub reduce: kiln_events::SyncStats,
    /// When the loop finished with the window: its last step queued and, for a window read at
    /// once, its read done. The window's wall time ends here, so windows tile the run's time.
    pub closed: Option<Instant>,
}

impl<B: Backend> SyncWindow<B> {
    pub fn new() -> Self {
        Self {
            loss_sum: None,
            metric_sums: Vec::new(),
            checks: Vec::new(),
            host_sum: 0.0,
            host_metrics: Vec::new(),
            first_step: 0,
            tokens: 0,
            sentences: 0,
            real: 0,
            slots: 0,
            steps: 0,
            started: Instant::now(),
            device_tokens: Vec::new(),
            reduce: Default::default(),
            closed: None,
        }
    }

    /// Opens the window at its first step: its clock starts here (data wait included), not after
    /// the previous window's validation or checkpoint.
    pub fn open(&mut self, first_step: usize) {
        self.started = Instant::now();
        self.first_step = first_step;
    }

    /// Adds a step's device sums: its loss, its gradient norm and the task's metric sums.
    pub fn add(&mut self, loss_sum: Tensor<B, 1>, grad_norm: Tensor<B, 1>, metric_sums: Vec<Tensor<B, 1>>) {
        self.checks.push(loss_sum.clone());
        self.checks.push(grad_norm);
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(acc) => acc + loss_sum,
            None => loss_sum,
        });
        if self.metric_sums.is_empty() {
            self.metric_sums = metric_sums;
        } else {
            for (acc, m) in self.metric_sums.iter_mut().zip(metric_sums) {
                *acc = acc.clone() + m;
            }
        }
    }

    /// Counts a step's batches (host figures: no read).
    pub fn count(&mut self, batches: &[BatchStats]) {
        self.tokens += batches.iter().map(|b| b.target_tokens as u64).sum::<u64>();
        self.sentences += batches.iter().map(|b| b.size as u64).sum::<u64>();
        self.real += batches.iter().map(|b| b.real_tokens as u64).sum::<u64>();
        self.slots += batches.iter().map(|b| b.slots as u64).sum::<u64>();
        self.steps += 1;
    }

    /// The window's metrics as means, from the read's sums.
    pub fn metric_means(&self, defs: &[MetricDef], sums: &[f64]) -> std::collections::BTreeMap<String, f64> {
        defs.iter()
            .zip(sums)
            .map(|(def, sum)| {
                let per = match def.per {
                    Per::Unit => self.tokens,
                    Per::Row => self.sentences,
                };
                (def.name.to_string(), sum / per.max(1) as f64)
            })
            .collect()
    }

    /// Starts the one device→host read of the window, its loss sum, every step's flags and the
    /// metric sums in one tensor: on the reader thread (`reader`), or here, now (`None`).
    /// `loss_scale` (f16) is read in the same transfer, last.
    pub fn close(&mut self, reader: Option<&WindowReader<B>>, loss_scale: Option<Tensor<B, 1>>) -> ClosedWindow {
        let scaled = loss_scale.is_some();
        let metrics = self.metric_sums.len();
        let read = match self.loss_sum.take() {
            None => InFlight::Empty,
            Some(sum) => {
                let mut parts = vec![sum];
                parts.append(&mut self.checks);
                parts.append(&mut self.metric_sums);
                parts.extend(loss_scale);
                let all = Tensor::cat(parts, 0);
                let (reply, answer) = channel();
                match reader {
                    Some(r) if r.jobs.send((all.clone(), reply)).is_ok() => InFlight::Reading(answer),
                    _ => {
                        let t0 = Instant::now();
                        let data = read_to_host(all);
                        InFlight::Done { data, ms: t0.elapsed().as_secs_f64() * 1e3 }
                    }
                }
            }
        };
        ClosedWindow { read, host_sum: self.host_sum, host_metrics: self.host_metrics.clone(), first_step: self.first_step, steps: self.steps, metrics, scaled }
    }
}

/// Reads tensors to the host on a thread of its own, so the loop thread can queue the next
/// window's steps while a window's data is in flight. One thread for the run: on CUDA each host
/// thread gets its own stream, and a thread per read would make a stream per read.
pub(crate) struct WindowReader<B: Backend> {
    jobs: Sender<(Tensor<B, 1>, Sender<Result<TensorData, String>>)>,
}

impl<B: Backend> WindowReader<B> {
    pub fn new() -> Self {
        let (jobs, queue) = channel::<(Tensor<B, 1>, Sender<Result<TensorData, String>>)>();
        std::thread::Builder::new()
            .name("kiln-window-reader".into())
            .spawn(move || {
                // Ends when the loop drops the reader (the channel closes).
                for (tensor, reply) in queue {
                    let _ = reply.send(read_to_host(tensor));
                }
            })
            .expect("cannot start the window reader thread");
        Self { jobs }
    }
}

/// The tensor's data on the host, or what the device's runtime failed with: an error, or a panic
/// (Burn's fusion client unwraps a failed call of its device thread, `burn-fusion` 0.21
/// `client.rs`), so that a failed read is reported as one, not taken for a non-finite loss.
fn read_to_host<B: Backend>(tensor: Tensor<B, 1>) -> Result<TensorData, String> {
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tensor.try_into_data()));
    let why = match read {
        Ok(Ok(data)) => return Ok(data),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "a panic".into()),
    };
    Err(why.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A window's read, started: in flight on the reader thread, or done at once on the loop thread.
enum InFlight {
    Empty,
    Done { data: Result<TensorData, String>, ms: f64 },
    Reading(Receiver<Result<TensorData, String>>),
}

/// A closed window whose read has started.
pub(crate) struct ClosedWindow {
    read: InFlight,
    host_sum: f64,
    host_metrics: Vec<f64>,
    first_step: usize,
    steps: usize,
    metrics: usize,
    /// The read ends with the loss scale (f16).
    scaled: bool,
}

impl ClosedWindow {
    /// The window's data: waits for it when it is still in flight (that wait is the sync time).
    pub fn wait(self) -> WindowRead {
        let (data, ms) = match self.read {
            InFlight::Empty => return WindowRead { loss_sum: self.host_sum, metric_sums: self.host_metrics, steps: Vec::new(), ms: 0.0, loss_scale: None, failed: None },
            InFlight::Done { data, ms } => (data, ms),
            InFlight::Reading(reply) => {
                let t0 = Instant::now();
                let data = reply.recv().unwrap_or_else(|_| Err("the window reader thread ended".into()));
                (data, t0.elapsed().as_secs_f64() * 1e3)
            }
        };
        let (values, failed): (Vec<f64>, _) = match data {
            Ok(d) => (d.iter::<f64>().collect(), None),
            Err(why) => (Vec::new(), Some(why)),
        };
        let value = |i: usize| values.get(i).copied().unwrap_or(f64::NAN);
        let steps = (0..self.steps).map(|k| (self.first_step + k + 1, value(1 + 2 * k), value(2 + 2 * k))).collect();
        let after_steps = 1 + 2 * self.steps;
        let metric_sums = (0..self.metrics).map(|m| value(after_steps + m)).collect();
        let loss_scale = self.scaled.then(|| value(after_steps + self.metrics));
        WindowRead { loss_sum: value(0), metric_sums, steps, ms, loss_scale, failed }
    }
}

/// The mean and the largest of `values` (`None` for none).
pub(crate) fn mean_and_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (n, sum, max) = values.fold((0usize, 0.0, f64::NEG_INFINITY), |(n, sum, max), v| (n + 1, sum + v, max.max(v)));
    (n > 0).then(|| (sum / n as f64, max))
}

/// What one window read brought back.
pub(crate) struct WindowRead {
    pub loss_sum: f64,
    pub metric_sums: Vec<f64>,
    /// `(step, summed loss, gradient norm)` of each step of the window.
    pub steps: Vec<(usize, f64, f64)>,
    /// How long the loop waited for the data.
    pub ms: f64,
    /// f16: the loss scale after the window.
    pub loss_scale: Option<f64>,
    /// The device could not give the window's data back (its runtime failed): no figure of the
    /// window is known, which is not a non-finite loss.
    pub failed: Option<String>,
}

impl WindowRead {
    pub fn first_nonfinite(&self) -> Option<usize> {
        self.steps.iter().find(|(_, loss, norm)| !loss.is_finite() || !norm.is_finite()).map(|s| s.0)
    }

    /// Mean and largest pre-clip gradient norm of the window's applied steps (f16 steps undone
    /// for an overflow, which read -1, and non-finite ones left out); `None` where none is left.
    pub fn grad_norms(&self) -> Option<(f64, f64)> {
        mean_and_max(self.steps.iter().map(|s| s.2).filter(|n| n.is_finite() && *n >= 0.0))
    }

    /// f16 steps undone for overflowing gradients (their norm reads -1, see `step::apply_step`).
    pub fn overflows(&self) -> u64 {
        self.steps.iter().filter(|s| s.2 == -1.0).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn scalar(x: f32) -> Tensor<Flex, 1> {
        Tensor::from_floats([x], &Default::default())
    }

    /// The window's one read gives back the exact sum of every step's loss, each step's flags in
    /// order and the metric sums, on the reader thread as at once; a NaN step is found by number.
    #[test]
    fn one_read_returns_every_steps_sums_and_flags() {
        for overlap in [false, true] {
            let reader = overlap.then(WindowReader::<Flex>::new);
            let mut w = SyncWindow::<Flex>::new();
            w.open(40);
            let losses = [2.5f32, 1.25, f32::NAN, 0.5];
            for (k, loss) in losses.iter().enumerate() {
                w.add(scalar(*loss), scalar(k as f32), vec![scalar(1.0), scalar(k as f32)]);
                w.count(&[BatchStats { size: 2, target_tokens: 4, real_tokens: 4, slots: 4 }]);
            }
            let read = w.close(reader.as_ref(), Some(scalar(1024.0))).wait();
            assert!(read.loss_sum.is_nan(), "the NaN step is in the sum");
            assert_eq!(read.steps.iter().map(|s| s.0).collect::<Vec<_>>(), vec![41, 42, 43, 44]);
            assert_eq!(read.steps[1].1, 1.25);
            assert_eq!(read.first_nonfinite(), Some(43));
            assert_eq!(read.metric_sums, vec![4.0, 6.0]);
            assert_eq!(read.loss_scale, Some(1024.0));
            assert_eq!(read.grad_norms(), Some((1.5, 3.0)), "mean and max of the steps' norms");
            let defs = [MetricDef { name: "a", per: Per::Row }, MetricDef { name: "b", per: Per::Unit }];
            let means = w.metric_means(&defs, &read.metric_sums);
            assert_eq!((means["a"], means["b"]), (0.5, 6.0 / 16.0));
        }
        let mut w = SyncWindow::<Flex>::new();
        for loss in [2.5f32, 1.25, 0.25] {
            w.add(scalar(loss), scalar(1.0), Vec::new());
            w.count(&[BatchStats::default()]);
        }
        let read = w.close(None, None).wait();
        assert_eq!((read.loss_sum, read.first_nonfinite(), read.loss_scale), (4.0, None, None));
    }

    /// A read the device could not answer is a failure with the runtime's words, not a window of
    /// NaN losses (which `train.on_nan` would take for a diverged model).
    #[test]
    fn a_failed_read_is_a_failure_not_a_nonfinite_loss() {
        let closed = ClosedWindow { read: InFlight::Done { data: Err("task panicked on device runner thread".into()), ms: 1.0 }, host_sum: 0.0, host_metrics: Vec::new(), first_step: 10, steps: 2, metrics: 0, scaled: false };
        let read = closed.wait();
        assert_eq!(read.failed.as_deref(), Some("task panicked on device runner thread"));
        // A reader thread that died answers the same way.
        let (reply, answer) = channel::<Result<TensorData, String>>();
        drop(reply);
        let closed = ClosedWindow { read: InFlight::Reading(answer), host_sum: 0.0, host_metrics: Vec::new(), first_step: 10, steps: 2, metrics: 0, scaled: false };
        assert!(closed.wait().failed.is_some());
        let read = SyncWindow::<Flex>::new().close(None, None).wait();
        assert_eq!(read.failed, None);
        let mut w = SyncWindow::<Flex>::new();
        w.add(scalar(1.0), scalar(1.0), Vec::new());
        assert_eq!(w.close(None, None).wait().failed, None);
    }
}
