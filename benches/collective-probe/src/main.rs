//! Runs one process of a global (multi-process) data-parallel group of burn-collective 0.21 on
//! the Flex backend, over loopback, and reports how far it gets: `collective-probe RANK NODES
//! OPS [PORT]`. Rank 0 also runs the orchestrator (on PORT, default 3100); node R serves its
//! tensors on PORT + 1 + R. Each process registers one device, then makes OPS all-reduces (sum)
//! of a `[2]` tensor, each waited for at most 20 s; a call that does not return in time is
//! reported and the process exits with 124.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn_backend::TensorData;
use burn_collective::{all_reduce, finish_collective, register, AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};
use burn_flex::{Flex, FlexTensor};

const TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: Option<u64>| args.get(i).and_then(|a| a.parse().ok()).or(default).expect("usage: collective-probe RANK NODES OPS [PORT]");
    let (rank, nodes, ops, port) = (arg(1, None) as u32, arg(2, None) as u32, arg(3, None) as usize, arg(4, Some(3100)) as u16);

    if rank == 0 {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(burn_collective::start_global_orchestrator(port));
        });
    }

    // A watchdog: the calls below block without a timeout of their own.
    let progress = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(std::sync::Mutex::new((Instant::now(), "register".to_string())));
    {
        let started = Arc::clone(&started);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let (since, what) = started.lock().unwrap().clone();
            if since.elapsed() > TIMEOUT {
                println!("rank {rank}: {what} did not return within {} s", TIMEOUT.as_secs());
                std::process::exit(124);
            }
        });
    }
    let begin = |what: String| *started.lock().unwrap() = (Instant::now(), what);

    let data_port = port + 1 + rank as u16;
    let config = CollectiveConfig::default()
        .with_num_devices(1)
        .with_num_nodes(nodes)
        .with_global_address(format!("ws://127.0.0.1:{port}").parse().expect("address"))
        .with_node_address(format!("ws://127.0.0.1:{data_port}").parse().expect("address"))
        .with_data_service_port(data_port)
        .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2));
    let peer = PeerId::from(rank);
    let t0 = Instant::now();
    register::<Flex>(peer, Default::default(), config).expect("register");
    println!("rank {rank}: registered in {:.2} s", t0.elapsed().as_secs_f64());

    for i in 0..ops {
        begin(format!("all_reduce {}", i + 1));
        let t = FlexTensor::from_data(TensorData::new(vec![rank as f32 + 1.0, i as f32], [2]));
        let t0 = Instant::now();
        let sum = all_reduce::<Flex>(peer, t, ReduceOperation::Sum).expect("all_reduce");
        let values: Vec<f32> = sum.into_data().to_vec().expect("f32");
        println!("rank {rank}: all_reduce {} = {values:?} in {:.1} ms", i + 1, t0.elapsed().as_secs_f64() * 1e3);
        progress.fetch_add(1, Ordering::Relaxed);
    }
    begin("finish_collective".into());
    finish_collective::<Flex>(peer).expect("finish");
    println!("rank {rank}: finished, {} all-reduces", progress.load(Ordering::Relaxed));
    // The orchestrator lives in rank 0: let the other ranks' finish reach it first.
    std::thread::sleep(Duration::from_secs(1));
}
