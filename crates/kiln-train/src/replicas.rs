//! Data parallel (`backend.devices`): the owner of the model replicas. Ranks 1..N are threads,
//! each with its replica and optimizer on its device; rank 0 is the loop itself. Every step the
//! loop hands each rank its share of the step's batches; all ranks meet in the all-reduce of
//! `step::step_gradients`, then step alike. The loop never waits for the replicas otherwise: the
//! all-reduce is the only meeting point.

use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use burn::collective::{finish_collective, register, CollectiveConfig, PeerId};
use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use kiln_recipe::TrainSection;

use crate::loss_scale::{AdamWOptimizer, LossScale};
use crate::step::{apply_step, step_gradients, Faults, HostStep, Replica, StepPlace};
use crate::task::{Task, TaskBatch};

/// Work for a replica thread.
enum ReplicaJob<B: AutodiffBackend, T: Task<B>> {
    /// One optimizer step over its share of the step's batches.
    Step { batches: Vec<T::Batch>, idle: bool, step: usize, lr: f64, step_tokens: usize },
    /// Continue from this model and optimizer (rank 0's after a skip or a rollback).
    Reset { model: T::Model, optim: AdamWOptimizer<T::Model, B> },
}

pub(crate) struct ReplicaPool<B: AutodiffBackend, T: Task<B>> {
    ranks: Vec<Sender<ReplicaJob<B, T>>>,
    threads: Vec<JoinHandle<()>>,
}

/// How each replica runs: the loop's settings, its host step, its mixed precision, its faults.
pub(crate) struct ReplicaSettings {
    pub train: TrainSection,
    pub host: HostStep,
    pub compute: Option<burn::tensor::FloatDType>,
    pub faults: Faults,
}

impl<B: AutodiffBackend, T: Task<B>> ReplicaPool<B, T> {
    /// Starts ranks 1.. on `devices` and registers rank 0 (the calling thread) on `main_device`.
    pub fn start(task: &Arc<T>, model: &T::Model, optim: &AdamWOptimizer<T::Model, B>, settings: ReplicaSettings, main_device: &B::Device, devices: &[B::Device]) -> Self {
        let config = CollectiveConfig::default().with_num_devices(devices.len() + 1);
        let settings = Arc::new(settings);
        let mut ranks = Vec::new();
        let mut threads = Vec::new();
        for (i, device) in devices.iter().enumerate() {
            let rank = i + 1;
            let (jobs, queue) = channel::<ReplicaJob<B, T>>();
            let (task, model, optim, settings, device, config) = (Arc::clone(task), model.clone(), optim.clone(), Arc::clone(&settings), device.clone(), config.clone());
            let thread = std::thread::Builder::new()
                .name(format!("kiln-replica-{rank}"))
                .spawn(move || {
                    let peer = PeerId::from(rank);
                    register::<B::InnerBackend>(peer, device.clone(), config).expect("kiln: cannot join the collective");
                    let _autocast = kiln_model::autocast::enter(settings.compute);
                    let (mut model, mut optim) = (model.fork(&device), optim);
                    // Each rank scales alike: the same verdicts from the same all-reduced norms.
                    let mut scaler = (settings.train.precision == kiln_recipe::Precision::F16).then(|| LossScale::<B::InnerBackend>::standard(&device));
                    for job in queue {
                        match job {
                            ReplicaJob::Step { batches, idle, step, lr, step_tokens } => {
                                let batches: Vec<T::Batch> = batches.into_iter().map(|b| b.to_device(&device)).collect();
                                let at = StepPlace { device: &device, host: settings.host, replica: Replica { rank, peer: Some(peer) }, loss_scale: scaler.as_ref().map(|s| &s.scale), faults: &settings.faults };
                                let sums = step_gradients(&*task, &model, &batches, &settings.train, step, step_tokens, idle, at);
                                (model, optim, _) = apply_step(model, optim, sums.grads, sums.norm, lr, scaler.as_mut());
                            }
                            ReplicaJob::Reset { model: m, optim: o } => {
                                model = m.fork(&device);
                                optim = o;
                            }
                        }
                    }
                    let _ = finish_collective::<B::InnerBackend>(peer);
                })
                .expect("kiln: cannot start a replica thread");
            ranks.push(jobs);
            threads.push(thread);
        }
        register::<B::InnerBackend>(PeerId::from(0), main_device.clone(), config).expect("kiln: cannot join the collective");
        Self { ranks, threads }
    }

    /// Replicas, the loop's included.
    pub fn len(&self) -> usize {
        self.ranks.len() + 1
    }

    /// Hands ranks 1.. their batches of a step (`shares[r]` for rank r; rank 0's stays here). A
    /// rank without a batch runs the step's first batch at weight 0.
    pub fn send(&self, shares: &mut [Vec<T::Batch>], step: usize, lr: f64, step_tokens: usize) {
        let spare = shares[0].first().cloned().expect("rank 0 always has a batch");
        for (r, jobs) in self.ranks.iter().enumerate() {
            let mine = std::mem::take(&mut shares[r + 1]);
            let idle = mine.is_empty();
            let batches = if idle { vec![spare.clone()] } else { mine };
            jobs.send(ReplicaJob::Step { batches, idle, step, lr, step_tokens }).expect("kiln: a replica thread ended");
        }
    }

    /// Makes every replica continue from rank 0's model and optimizer.
    pub fn reset(&self, model: &T::Model, optim: &AdamWOptimizer<T::Model, B>) {
        for jobs in &self.ranks {
            jobs.send(ReplicaJob::Reset { model: model.clone(), optim: optim.clone() }).expect("kiln: a replica thread ended");
        }
    }
}

impl<B: AutodiffBackend, T: Task<B>> Drop for ReplicaPool<B, T> {
    fn drop(&mut self) {
        // Closing the queues ends the replica threads after their last step.
        self.ranks.clear();
        let _ = finish_collective::<B::InnerBackend>(PeerId::from(0));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
