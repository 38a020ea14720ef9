//! Multi-node data parallel (`--nodes N --node-rank R --coordinator HOST:PORT`): the owner of this
//! process's place among the nodes. It names the node, builds the global part of Burn's
//! `CollectiveConfig`, runs the coordinator (Burn's global orchestrator) in rank 0's process, and
//! bounds every wait on the other nodes ([`Watchdog`]): Burn 0.21's global level has no timeout of
//! its own, and `register` retries a coordinator that never answers without end.
//!
//! Burn does the work: each node reduces its local replicas' gradients, the nodes all-reduce
//! between them over WebSockets (strategy `Tree(2)`: Burn's default, `Ring`, refuses kiln's `[1]`
//! loss sums), and each node hands the result back to its replicas — the same `all_reduce` call a
//! one-process run makes. burn-collective and burn-communication 0.21.0 are vendored with the fixes
//! this needs (`vendor/README.md`).

use std::fmt;
use std::net::ToSocketAddrs;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::collective::{AllReduceStrategy, CollectiveConfig};

/// Exit code of a process that lost a node (or never saw all of them join).
pub const NODE_LOST_EXIT: u8 = 4;

/// `host:port`, as a flag gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim().trim_start_matches("ws://");
        let (host, port) = text.rsplit_once(':').ok_or_else(|| format!("expected HOST:PORT, got `{text}`"))?;
        let port: u16 = port.parse().map_err(|_| format!("`{port}` is not a port (1-65535) in `{text}`"))?;
        if host.is_empty() || port == 0 {
            return Err(format!("expected HOST:PORT with a port of 1-65535, got `{text}`"));
        }
        if host.contains(':') || host.starts_with('[') {
            // Seen: two nodes on fd00::2 never met (Burn's servers bind 0.0.0.0).
            return Err(format!("`{text}`: IPv6 addresses are not supported (Burn 0.21's collective listens on IPv4 only); give an IPv4 address or a host name"));
        }
        Ok(Self { host: host.to_string(), port })
    }

    fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    fn ws(&self) -> String {
        format!("ws://{}:{}", self.host, self.port)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// This process's place in a multi-node run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeGroup {
    /// Processes in the run (2 or more).
    pub nodes: usize,
    /// This one's rank, 0..nodes; rank 0 runs the coordinator and alone writes the run's files.
    pub rank: usize,
    /// Where rank 0's coordinator listens.
    pub coordinator: HostPort,
    /// Where the other nodes reach this one's data service.
    pub address: HostPort,
    /// The longest any node waits for the others: to join, and in each all-reduce (which spans
    /// the slowest node's step, its validation and its saves).
    pub timeout: Duration,
    /// What every node must agree on before the first step (the caller's part: the recipe, the
    /// tokenizer); the trainer adds the data's shape and the resume point.
    pub agreement: Vec<u8>,
}

impl NodeGroup {
    /// The flags' values, checked. `address` defaults to the coordinator's host at port
    /// `coordinator port + 1 + rank`; a coordinator that is not on this machine needs it given
    /// (the other nodes must reach this one there).
    pub fn new(nodes: usize, rank: usize, coordinator: &str, address: Option<&str>, timeout_s: f64) -> Result<Self, String> {
        if nodes < 2 {
            return Err(format!("--nodes: expected 2 or more processes, got {nodes}"));
        }
        if rank >= nodes {
            return Err(format!("--node-rank: expected 0..{} for --nodes {nodes}, got {rank}", nodes - 1));
        }
        if !(timeout_s.is_finite() && timeout_s > 0.0 && timeout_s <= 86_400.0) {
            return Err(format!("--node-timeout: expected seconds in (0, 86400], got {timeout_s}"));
        }
        let coordinator = HostPort::parse(coordinator).map_err(|m| format!("--coordinator: {m}"))?;
        let address = match address {
            Some(a) => HostPort::parse(a).map_err(|m| format!("--node-address: {m}"))?,
            None if coordinator.is_loopback() || rank == 0 => {
                let port = u16::try_from(coordinator.port as usize + 1 + rank).map_err(|_| format!("--coordinator: port {} leaves no port for node {rank} (port + 1 + rank > 65535); give --node-address", coordinator.port))?;
                HostPort { host: coordinator.host.clone(), port }
            }
            None => return Err(format!("--node-address: required on node {rank} when the coordinator ({coordinator}) is on another machine: the host and port the other nodes reach this one at")),
        };
        if address.port == coordinator.port && (address.host == coordinator.host || address.is_loopback() && coordinator.is_loopback()) {
            return Err(format!("--node-address: {address} is the coordinator's own port"));
        }
        (address.host.as_str(), address.port).to_socket_addrs().map_err(|e| format!("--node-address: cannot resolve {address}: {e}"))?;
        Ok(Self { nodes, rank, coordinator, address, timeout: Duration::from_secs_f64(timeout_s), agreement: Vec::new() })
    }

    /// Rank 0 writes the run directory; the others train alike and write nothing.
    pub fn writes_run_files(&self) -> bool {
        self.rank == 0
    }

    /// The collective's configuration for this node with `local` replicas.
    pub(crate) fn config(&self, local: usize) -> CollectiveConfig {
        CollectiveConfig::default()
            .with_num_devices(local)
            .with_num_nodes(self.nodes as u32)
            .with_global_address(self.coordinator.ws().parse().expect("an address always parses"))
            .with_node_address(self.address.ws().parse().expect("an address always parses"))
            .with_data_service_port(self.address.port)
            .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2))
    }

    /// Rank 0: starts the coordinator on a thread of its own (a tokio runtime of its own too),
    /// listening on every interface at the coordinator's port. It lives as long as the process.
    pub(crate) fn start_coordinator(&self) -> Result<(), String> {
        let port = self.coordinator.port;
        // The orchestrator logs a port in use and returns; binding first turns that into an error.
        std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("--coordinator: cannot listen on port {port}: {e}"))?;
        let (ended, end) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("kiln-coordinator".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ended.send(format!("cannot start the coordinator's runtime: {e}"));
                        return;
                    }
                };
                // Until the process ends: SIGINT and SIGTERM stay kiln's (a stop with a checkpoint).
                let result = runtime.block_on(burn_collective::start_global_orchestrator_until(port, std::future::pending()));
                let _ = ended.send(result.err().unwrap_or_else(|| "the coordinator ended".into()));
            })
            .map_err(|e| format!("cannot start the coordinator's thread: {e}"))?;
        // A bind that fails fails at once.
        match end.recv_timeout(Duration::from_millis(200)) {
            Ok(why) => Err(format!("--coordinator: port {port}: {why}")),
            Err(_) => Ok(()),
        }
    }

    /// The nodes that have joined so far, as the coordinator saw them (rank 0 only: empty else).
    pub(crate) fn joined(&self) -> Vec<String> {
        if self.rank == 0 {
            burn_collective::registered_node_addresses()
        } else {
            Vec::new()
        }
    }

    /// Rank 0, when the others are late: who joined (`joined`: their data-service addresses),
    /// and who is missing where the nodes use the default ports (coordinator port + 1 + rank).
    pub(crate) fn missing_nodes(&self, joined: &[String]) -> String {
        let default_port = |rank: usize| self.coordinator.port as usize + 1 + rank;
        let ports: Vec<Option<usize>> = joined.iter().map(|a| HostPort::parse(a).ok().map(|hp| hp.port as usize)).collect();
        let rank_of = |port: Option<usize>| port.and_then(|p| (0..self.nodes).find(|r| default_port(*r) == p));
        let named: Vec<String> = joined.iter().zip(&ports).map(|(a, p)| match rank_of(*p) {
            Some(rank) => format!("node {rank} ({})", a.trim_start_matches("ws://")),
            None => a.trim_start_matches("ws://").to_string(),
        }).collect();
        let head = format!("{} of {} nodes joined the coordinator at {}", joined.len(), self.nodes, self.coordinator);
        let all_default = ports.iter().all(|p| rank_of(*p).is_some());
        let missing: Vec<String> = (0..self.nodes).filter(|r| !ports.contains(&Some(default_port(*r)))).map(|r| format!("node {r}")).collect();
        match (named.is_empty(), all_default) {
            (true, _) => format!("{head}; none joined"),
            (false, true) => format!("{head} ({}); missing: {}", named.join(", "), missing.join(", ")),
            (false, false) => format!("{head} ({}); the others never did", named.join(", ")),
        }
    }

    /// Rank 0, at the end: keeps the coordinator until the other nodes have left (they tell it
    /// when they finish), within the timeout, so none is left waiting on it.
    pub(crate) fn wait_for_others_to_leave(&self) {
        if self.rank != 0 {
            return;
        }
        let until = Instant::now() + self.timeout;
        while Instant::now() < until && !burn_collective::registered_node_addresses().is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// "node 1 (127.0.0.1:29502)" for a data-service address, the rank found from the roll call.
    pub(crate) fn name_address(&self, address: &str, ranks_by_port: &[u16]) -> String {
        let bare = address.trim_start_matches("ws://");
        let port = HostPort::parse(bare).ok().map(|hp| hp.port);
        let ranks: Vec<usize> = ranks_by_port.iter().enumerate().filter(|(_, p)| Some(**p) == port).map(|(r, _)| r).collect();
        match ranks.as_slice() {
            [rank] => format!("node {rank} ({bare})"),
            _ => format!("the node at {bare}"),
        }
    }
}

/// A node was lost (or some never joined): the run cannot go on. Its checkpoints are whole; a
/// later `--resume` of every node continues from the last one.
#[derive(Debug)]
pub struct NodeLost(pub String);

impl fmt::Display for NodeLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NodeLost {}

type Describe = Box<dyn Fn() -> String + Send>;

type LastWords = Box<dyn Fn(&str) + Send + Sync>;
static LAST_WORDS: std::sync::OnceLock<LastWords> = std::sync::OnceLock::new();

/// What the process does with the watchdog's line before it ends (the `kiln` command: an `error`
/// row in rank 0's `metrics.jsonl`, as a failed run gets): the loop is blocked in Burn then, and
/// cannot log it itself. Set once per process; later calls keep the first.
pub fn set_last_words(record: impl Fn(&str) + Send + Sync + 'static) {
    let _ = LAST_WORDS.set(Box::new(record));
}

/// Bounds the waits on other nodes: armed around each one (joining, an all-reduce), it ends the
/// process with one line and [`NODE_LOST_EXIT`] when a wait outlasts the timeout. The waits are
/// blocking calls into Burn with no way to cancel them, so the process itself must end; nothing
/// is being written while one is armed (saves happen between them), so nothing is left torn, and
/// the line is recorded first where the program says how ([`set_last_words`]).
#[derive(Clone)]
pub(crate) struct Watchdog {
    armed: Arc<Mutex<Option<(Instant, Describe)>>>,
}

impl Watchdog {
    pub fn start(timeout: Duration, rank: usize) -> Self {
        let armed: Arc<Mutex<Option<(Instant, Describe)>>> = Arc::new(Mutex::new(None));
        let watched = Arc::downgrade(&armed);
        std::thread::Builder::new()
            .name("kiln-node-watchdog".into())
            .spawn(move || {
                while let Some(armed) = watched.upgrade() {
                    if let Some((since, describe)) = armed.lock().ok().as_deref().and_then(|a| a.as_ref()) {
                        if since.elapsed() > timeout {
                            let line = format!("node {rank}: {} (waited {:.0} s, --node-timeout)", describe(), timeout.as_secs_f64());
                            eprintln!("kiln: error: {line}");
                            if let Some(record) = LAST_WORDS.get() {
                                record(&line);
                            }
                            std::process::exit(NODE_LOST_EXIT as i32);
                        }
                    }
                    drop(armed);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
            .expect("kiln: cannot start the node watchdog");
        Self { armed }
    }

    /// Runs `wait` under the watchdog; `describe` says what was waited for if it never returns.
    pub fn around<R>(&self, describe: impl Fn() -> String + Send + 'static, wait: impl FnOnce() -> R) -> R {
        *self.armed.lock().expect("watchdog") = Some((Instant::now(), Box::new(describe)));
        let out = wait();
        *self.armed.lock().expect("watchdog") = None;
        out
    }
}

/// The roll call's tensor for node `rank` of `nodes`: a one at `rank` (each rank once), the
/// node's data port at `nodes + rank`, then the agreement digest's 32 bytes and their squares.
/// Summed over the nodes, every slot stays an integer below 2²⁴, so f32 holds it exactly.
pub(crate) fn roll_call_values(nodes: usize, rank: usize, port: u16, digest: &[u8; 32]) -> Vec<f32> {
    let mut v = vec![0.0f32; 2 * nodes + 64];
    v[rank] = 1.0;
    v[nodes + rank] = port as f32;
    for (i, b) in digest.iter().enumerate() {
        v[2 * nodes + i] = *b as f32;
        v[2 * nodes + 32 + i] = (*b as f32) * (*b as f32);
    }
    v
}

/// Reads the summed roll call: each node's data port by rank, or why the nodes cannot train
/// together. Equal sums of the digest's bytes and of their squares (n·b and n·b² for this node's
/// b) leave no spread between the nodes: every node has the same digest.
pub(crate) fn read_roll_call(sums: &[f32], nodes: usize, digest: &[u8; 32]) -> Result<Vec<u16>, String> {
    let counts = &sums[..nodes];
    if let Some(rank) = counts.iter().position(|c| *c > 1.0) {
        return Err(format!("{} nodes say they are node {rank}: give each process its own --node-rank (0..{})", counts[rank], nodes - 1));
    }
    if let Some(rank) = counts.iter().position(|c| *c != 1.0) {
        return Err(format!("no node says it is node {rank}: give each process its own --node-rank (0..{})", nodes - 1));
    }
    let n = nodes as f32;
    for (i, b) in digest.iter().enumerate() {
        let b = *b as f32;
        if sums[2 * nodes + i] != n * b || sums[2 * nodes + 32 + i] != n * b * b {
            return Err("the nodes do not run the same thing (recipe, tokenizer, data, resume point or kiln build differ): start every node with the same recipe and files".into());
        }
    }
    Ok(sums[nodes..2 * nodes].iter().map(|p| *p as u16).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(rows: &[Vec<f32>]) -> Vec<f32> {
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i]).sum()).collect()
    }

    #[test]
    fn a_roll_call_of_agreeing_nodes_gives_their_ports() {
        let d = *blake3::hash(b"recipe").as_bytes();
        let rows: Vec<_> = (0..3).map(|r| roll_call_values(3, r, 29501 + r as u16, &d)).collect();
        assert_eq!(read_roll_call(&sum(&rows), 3, &d), Ok(vec![29501, 29502, 29503]));
    }

    #[test]
    fn a_roll_call_refuses_a_differing_digest_and_a_doubled_rank() {
        let (a, b) = (*blake3::hash(b"recipe").as_bytes(), *blake3::hash(b"recipe2").as_bytes());
        let rows = vec![roll_call_values(2, 0, 1, &a), roll_call_values(2, 1, 2, &b)];
        assert!(read_roll_call(&sum(&rows), 2, &a).unwrap_err().contains("same"));
        // Bytes that differ but keep the sum (3+5 = 4+4) still differ in their squares.
        let (mut c, mut e) = ([4u8; 32], [4u8; 32]);
        c[0] = 3;
        e[0] = 5;
        let rows: Vec<_> = [c, e, [4u8; 32], [4u8; 32]].iter().enumerate().map(|(r, d)| roll_call_values(4, r, 1, d)).collect();
        assert!(read_roll_call(&sum(&rows), 4, &[4u8; 32]).is_err());
        let rows = vec![roll_call_values(2, 1, 1, &a), roll_call_values(2, 1, 2, &a)];
        assert!(read_roll_call(&sum(&rows), 2, &a).unwrap_err().contains("node 1"));
    }

    #[test]
    fn flags_are_checked_and_addresses_defaulted() {
        let g = NodeGroup::new(2, 1, "127.0.0.1:29500", None, 60.0).unwrap();
        assert_eq!(g.address, HostPort { host: "127.0.0.1".into(), port: 29502 });
        assert!(NodeGroup::new(2, 2, "127.0.0.1:29500", None, 60.0).unwrap_err().contains("--node-rank"));
        assert!(NodeGroup::new(1, 0, "127.0.0.1:29500", None, 60.0).unwrap_err().contains("--nodes"));
        assert!(NodeGroup::new(2, 0, "127.0.0.1", None, 60.0).unwrap_err().contains("--coordinator"));
        assert!(NodeGroup::new(2, 1, "10.1.2.3:29500", None, 60.0).unwrap_err().contains("--node-address"));
        assert!(NodeGroup::new(2, 0, "127.0.0.1:29500", Some("127.0.0.1:29500"), 60.0).unwrap_err().contains("coordinator's own port"));
        assert!(NodeGroup::new(2, 0, "127.0.0.1:29500", None, 0.0).unwrap_err().contains("--node-timeout"));
        assert!(NodeGroup::new(2, 0, "[fd00::2]:29500", None, 60.0).unwrap_err().contains("IPv6"));
        assert_eq!(g.name_address("ws://127.0.0.1:29502", &[29501, 29502]), "node 1 (127.0.0.1:29502)");
        let g = NodeGroup::new(3, 0, "127.0.0.1:29500", None, 60.0).unwrap();
        let line = g.missing_nodes(&["ws://127.0.0.1:29501".into(), "ws://127.0.0.1:29503".into()]);
        assert!(line.ends_with("(node 0 (127.0.0.1:29501), node 2 (127.0.0.1:29503)); missing: node 1"), "{line}");
    }
}
