//! Data parallel (`backend.devices`, and `--nodes`): the owner of the model replicas. Ranks 1..N
//! of a process are threads, each with its replica and optimizer on its device; rank 0 is the
//! loop itself. Every step the loop hands each rank its share of the step's batches; all ranks (of
//! every node) meet in the all-reduce of `step::step_gradients`, then step alike. The loop never
//! waits for the replicas otherwise: the all-reduce is the only meeting point.
//!
//! Across nodes each replica has a global rank, node rank × replicas per node + its local rank:
//! it picks the replica's share of each step and its dropout masks, so N nodes of M devices train
//! as one process of N·M devices.

use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use burn::collective::{finish_collective, register, CollectiveConfig, CollectiveError, PeerId, ReduceOperation};
use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use kiln_recipe::TrainSection;

use crate::nodes::{NodeGroup, NodeLost, Watchdog};

use crate::loss_scale::{AdamWOptimizer, LossScale};
use crate::step::{apply_step, step_gradients, Faults, HostStep, Replica, StepPlace};
use crate::task::{Task, TaskBatch};

/// Work for a replica thread.
enum ReplicaJob<B: AutodiffBackend, T: Task<B>> {
    /// One optimizer step over its share of the step's batches.
    Step { batches: Vec<T::Batch>, idle: bool, step: usize, lr: f64, step_tokens: usize },
    /// Continue from this model and optimizer (rank 0's after a skip or a rollback).
    Reset { model: T::Model, optim: AdamWOptimizer<T::Model, B> },
    /// Take part in an all-reduce of host values (zeros from this rank) that rank 0 makes.
    Join { len: usize },
}

pub(crate) struct ReplicaPool<B: AutodiffBackend, T: Task<B>> {
    ranks: Vec<Sender<ReplicaJob<B, T>>>,
    threads: Vec<JoinHandle<()>>,
    /// The global rank of this process's rank 0.
    first: usize,
    nodes: Option<Nodes>,
    device: B::Device,
    /// A collective operation failed (a node lost): at the end, nobody is waited for.
    failed: std::sync::atomic::AtomicBool,
}

/// The multi-node part of a pool: the group, its watchdog and each node's data port by rank.
struct Nodes {
    group: NodeGroup,
    watchdog: Watchdog,
    ports: Vec<u16>,
}

/// How each replica runs: the loop's settings, its host step, its mixed precision, its faults.
pub(crate) struct ReplicaSettings {
    pub train: TrainSection,
    pub host: HostStep,
    pub compute: Option<burn::tensor::FloatDType>,
    pub faults: Faults,
}

impl<B: AutodiffBackend, T: Task<B>> ReplicaPool<B, T> {
    /// Starts ranks 1.. on `devices` and registers rank 0 (the calling thread) on `main_device`;
    /// with `nodes`, joins the other nodes (rank 0 of node 0 runs their coordinator) and makes the
    /// roll call that refuses nodes which do not agree on `agreement`.
    pub fn start(task: &Arc<T>, model: &T::Model, optim: &AdamWOptimizer<T::Model, B>, settings: ReplicaSettings, main_device: &B::Device, devices: &[B::Device], nodes: Option<NodeGroup>) -> anyhow::Result<Self> {
        let local = devices.len() + 1;
        let config = nodes.as_ref().map_or_else(|| CollectiveConfig::default().with_num_devices(local), |g| g.config(local));
        let first = nodes.as_ref().map_or(0, |g| g.rank * local);
        if let Some(group) = nodes.as_ref().filter(|g| g.rank == 0) {
            group.start_coordinator().map_err(anyhow::Error::msg)?;
        }
        let settings = Arc::new(settings);
        let mut ranks = Vec::new();
        let mut threads = Vec::new();
        for (i, device) in devices.iter().enumerate() {
            let rank = first + i + 1;
            let (jobs, queue) = channel::<ReplicaJob<B, T>>();
            let (task, model, optim, settings, device, config) = (Arc::clone(task), model.clone(), optim.clone(), Arc::clone(&settings), device.clone(), config.clone());
            let thread = std::thread::Builder::new()
                .name(format!("kiln-replica-{rank}"))
                .spawn(move || {
                    let peer = PeerId::from(rank);
                    // A failed join or reduce is rank 0's to report; this rank just ends.
                    if register::<B::InnerBackend>(peer, device.clone(), config).is_err() {
                        return;
                    }
                    let _autocast = kiln_model::autocast::enter(settings.compute);
                    let (mut model, mut optim) = (model.fork(&device), optim);
                    // Each rank scales alike: the same verdicts from the same all-reduced norms.
                    let mut scaler = (settings.train.precision == kiln_recipe::Precision::F16).then(|| LossScale::<B::InnerBackend>::standard(&device));
                    for job in queue {
                        match job {
                            ReplicaJob::Step { batches, idle, step, lr, step_tokens } => {
                                let batches: Vec<T::Batch> = batches.into_iter().map(|b| b.to_device(&device)).collect();
                                let at = StepPlace { device: &device, host: settings.host, replica: Replica { rank, peer: Some(peer) }, loss_scale: scaler.as_ref().map(|s| &s.scale), faults: &settings.faults, watchdog: None };
                                let Ok(sums) = step_gradients(&*task, &model, &batches, &settings.train, step, step_tokens, idle, at) else {
                                    return;
                                };
                                (model, optim, _) = apply_step(model, optim, sums.grads, sums.norm, lr, scaler.as_mut());
                            }
                            ReplicaJob::Reset { model: m, optim: o } => {
                                model = m.fork(&device);
                                optim = o;
                            }
                            ReplicaJob::Join { len } => {
                                if host_all_reduce::<B>(peer, &device, vec![0.0; len]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = finish_collective::<B::InnerBackend>(peer);
                })
                .expect("kiln: cannot start a replica thread");
            ranks.push(jobs);
            threads.push(thread);
        }
        let mut pool = Self { ranks, threads, first, nodes: None, device: main_device.clone(), failed: Default::default() };
        let peer = PeerId::from(first);
        let Some(group) = nodes else {
            register::<B::InnerBackend>(peer, main_device.clone(), config).map_err(|e| anyhow::anyhow!("cannot join the replicas' collective: {e:?}"))?;
            return Ok(pool);
        };
        let watchdog = Watchdog::start(group.timeout, group.rank);
        let waiting = group.clone();
        let joined = watchdog.around(
            move || {
                let seen = waiting.joined();
                if waiting.rank == 0 {
                    waiting.missing_nodes(&seen)
                } else {
                    format!("the run did not start: not all {} nodes joined the coordinator at {} (is node 0 running?)", waiting.nodes, waiting.coordinator)
                }
            },
            || register::<B::InnerBackend>(peer, main_device.clone(), config),
        );
        joined.map_err(|e| NodeLost(format!("node {}: cannot join the other nodes at {}: {e:?}", group.rank, group.coordinator)))?;
        pool.nodes = Some(Nodes { group, watchdog, ports: Vec::new() });
        Ok(pool)
    }

    /// The roll call, once every node has joined: each node's data port by rank, and a refusal
    /// (on every node alike) when two claim one rank or they disagree on the digest.
    pub fn roll_call(&mut self, digest: &[u8; 32]) -> anyhow::Result<()> {
        let Some(nodes) = &self.nodes else { return Ok(()) };
        let g = &nodes.group;
        let values = crate::nodes::roll_call_values(g.nodes, g.rank, g.address.port, digest);
        let sums = self.all_reduce_host(values, "the roll call")?;
        let rank = g.rank;
        let ports = crate::nodes::read_roll_call(&sums, g.nodes, digest).map_err(|m| anyhow::anyhow!("node {rank}: {m}"))?;
        self.nodes.as_mut().expect("checked above").ports = ports;
        Ok(())
    }

    /// Host values summed over every replica of every node (this rank's `values`, zeros from
    /// ranks 1..), under the watchdog: a read, so made only where the loop reads anyway.
    pub fn all_reduce_host(&self, values: Vec<f32>, what: &'static str) -> anyhow::Result<Vec<f32>> {
        for jobs in &self.ranks {
            jobs.send(ReplicaJob::Join { len: values.len() }).map_err(|_| anyhow::anyhow!("a replica thread ended"))?;
        }
        let peer = PeerId::from(self.first);
        let summed = self.watched(what, || host_all_reduce::<B>(peer, &self.device, values));
        summed.map_err(|e| self.collective_error(&e, what))
    }

    /// Runs a wait on the other nodes under the watchdog (directly without nodes).
    pub fn watched<R>(&self, what: &'static str, wait: impl FnOnce() -> R) -> R {
        match &self.nodes {
            Some(n) => n.watchdog.around(move || format!("no answer from the other nodes in {what}"), wait),
            None => wait(),
        }
    }

    /// One line for a failed collective operation: the node that was lost, by rank where the roll
    /// call knows it.
    pub fn collective_error(&self, err: &CollectiveError, what: &str) -> anyhow::Error {
        self.failed.store(true, std::sync::atomic::Ordering::Relaxed);
        match (&self.nodes, err.lost_peer_address()) {
            (Some(n), Some(address)) => NodeLost(format!("node {}: lost {} in {what}", n.group.rank, n.group.name_address(address, &n.ports))).into(),
            (Some(n), None) => NodeLost(format!("node {}: the all-reduce between nodes failed in {what}: {err:?}", n.group.rank)).into(),
            (None, _) => anyhow::anyhow!("the replicas' all-reduce failed in {what}: {err:?}"),
        }
    }

    /// The watchdog of a multi-node run.
    pub fn watchdog(&self) -> Option<&Watchdog> {
        self.nodes.as_ref().map(|n| &n.watchdog)
    }

    /// The multi-node group, when there is one.
    pub fn group(&self) -> Option<&NodeGroup> {
        self.nodes.as_ref().map(|n| &n.group)
    }

    /// Replicas of every node.
    pub fn global_len(&self) -> usize {
        self.len() * self.nodes.as_ref().map_or(1, |n| n.group.nodes)
    }

    /// The global rank of this process's rank 0.
    pub fn first(&self) -> usize {
        self.first
    }

    /// Replicas, the loop's included.
    pub fn len(&self) -> usize {
        self.ranks.len() + 1
    }

    /// Hands ranks 1.. of this process their shares of a step's batches (`per` each, global
    /// replica g taking `batches[g·per..(g+1)·per]`) and returns rank 0's, with whether it is
    /// idle. A rank without a batch runs the step's first batch at weight 0.
    pub fn send(&self, batches: &[T::Batch], per: usize, step: usize, lr: f64, step_tokens: usize) -> (Vec<T::Batch>, bool) {
        let share = |g: usize| -> (Vec<T::Batch>, bool) {
            let mine: Vec<T::Batch> = batches.iter().skip(g * per).take(per).cloned().collect();
            if mine.is_empty() {
                (vec![batches[0].clone()], true)
            } else {
                (mine, false)
            }
        };
        for (r, jobs) in self.ranks.iter().enumerate() {
            let (batches, idle) = share(self.first + r + 1);
            jobs.send(ReplicaJob::Step { batches, idle, step, lr, step_tokens }).expect("kiln: a replica thread ended");
        }
        share(self.first)
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
        if self.failed.load(std::sync::atomic::Ordering::Relaxed) {
            // A node was lost: the process ends with the error; leaving the collective would wait
            // on a coordinator or peers that may be gone, and the replicas' threads ended on it.
            return;
        }
        let peer = PeerId::from(self.first);
        // Leaving tells the coordinator, which rank 0 keeps until every node has left.
        self.watched("leaving the run", || {
            let _ = finish_collective::<B::InnerBackend>(peer);
        });
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(n) = &self.nodes {
            n.group.wait_for_others_to_leave();
        }
    }
}

/// `values` summed over every replica (of every node), read back to the host.
fn host_all_reduce<B: AutodiffBackend>(peer: PeerId, device: &B::Device, values: Vec<f32>) -> Result<Vec<f32>, CollectiveError> {
    let len = values.len();
    let t = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(values, [len]), device);
    let summed = burn::collective::all_reduce::<B::InnerBackend>(peer, t.into_primitive().tensor(), ReduceOperation::Sum)?;
    let summed = Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(summed));
    Ok(summed.into_data().convert::<f32>().into_vec::<f32>().expect("f32 values"))
}
