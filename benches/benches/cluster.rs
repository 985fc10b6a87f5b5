//! The cluster: the replicated key-value store's puts and gets on three
//! in-process nodes over loopback TCP (each node its own courier-rpc server
//! and data directory, Raft storage on the segment log with one fdatasync
//! per append batch) beside a single-node cluster and beside the raw limits
//! measured in the same run (one fdatasync of a 256-byte write, a TCP
//! ping-pong), and the failover time of three real `courier serve`
//! processes whose leader is killed with SIGKILL.
//!
//! Workloads (filters: `put`, `get`, `failover`):
//!
//! - `kv_put_seq`: sequential linearizable puts of 256-byte values
//!   (fsync always), p50/p99/p99.9; `kv_put_x32`: 32 puts in flight from one
//!   client (32 tasks sharing one `KvClient` connection), puts/s. Three
//!   nodes and one node.
//! - `kv_get_seq` / `kv_get_x32`: linearizable gets (the leader confirms it
//!   still leads with a heartbeat round to a majority) and stale gets (the
//!   node's own state; at the leader, and `stale-f` at a follower), three
//!   nodes.
//! - `failover`: three `courier serve` processes; the leader is killed
//!   (SIGKILL), and the time is taken until a survivor says it leads
//!   (`elect`, polled every 5 ms) and until the first put succeeds through a
//!   `KvClient` that knows all three addresses (`put`); the killed node is
//!   restarted on its data directory and the time until it is a caught-up
//!   follower again is `rejoin`. Repeated (10 kills in full mode, 2 in
//!   smoke mode; skipped with a note when the release binary is absent).
//!
//! Placement. These machines have 2 CPUs, so three nodes and a client
//! cannot each have one. Every thread of an in-process node (its
//! current-thread runtime, its blocking pool, its log's writer thread,
//! which inherit the pin) is pinned with its node:
//!
//! - `same`: the client and all nodes on CPU 0 — no cross-CPU wake-ups,
//!   the software's own cost;
//! - `split`: the leader (node 1, whose election timer is the shortest,
//!   so it wins the first election) on CPU 1,
//!   the client and both followers on CPU 0 — every message of the put path
//!   (client→leader, leader→followers and back) crosses CPUs, as it would
//!   cross a network between machines. One node: the node on CPU 1, the
//!   client on CPU 0.
//!
//! Timers: default `Timing` (heartbeat 250 ms, election 1–2 s) in full
//! mode, in process and for the processes; in smoke mode heartbeat 25 ms,
//! election 150–300 ms (for the processes through a `--config` file), to
//! keep it short.
//!
//! The release binary is `$COURIER_BIN`, else `target/release/courier` of
//! the target directory this bench runs from (`cargo xtask bench` builds
//! it first).

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_benches::{
    filters, latency_histogram, median_and_spread, output_dir, pin, raw, record, runtime, selected,
    Mode, Placement, Report,
};
use courier_cluster::client::KvClient;
use courier_cluster::network::{Peers, RaftHost, RaftTransportServer};
use courier_cluster::node::{ClusterNode, NodeConfig, Read, Timing};
use courier_cluster::service::{ClusterHost, ClusterServiceServer};
use courier_cluster::types::{NodeId, METADATA_GROUP};
use courier_rpc::{ClientConfig, Server, ServerConfig};
use courier_transport::Address;
use hdrhistogram::Histogram;

/// Value size of every put, and message size of the raw baselines.
const SIZE: usize = 256;
/// Requests in flight in the throughput workloads.
const IN_FLIGHT: usize = 32;

fn key(i: usize, keys: usize) -> String {
    format!("bench/{:04}", i % keys)
}

fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "courier-bench-cluster-{}-{name}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn cpus() -> usize {
    core_affinity::get_core_ids().map_or(1, |ids| ids.len())
}

/// Runs `work` on a thread pinned to `core`.
fn on_core<T: Send>(core: usize, work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                pin(core);
                work()
            })
            .join()
            .expect("pinned thread")
    })
}

// ---------------------------------------------------------------- in process

/// One in-process node: a pinned thread with its own current-thread
/// runtime, running a `ClusterNode` and the rpc server in front of it.
struct LocalNode {
    id: NodeId,
    address: Address,
    node: Option<Arc<ClusterNode>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// An in-process cluster; dropping it stops every node and removes their
/// data directories.
struct LocalCluster {
    nodes: Vec<LocalNode>,
    dirs: Vec<PathBuf>,
}

type Started = Result<Arc<ClusterNode>, String>;

impl LocalCluster {
    /// `size` nodes, node `id` pinned to `core_of(id)`, with `timing`, but
    /// the election timers of all but node 1 three times as long, so node
    /// 1 wins the first election (a pristine node's vote carries no leader
    /// lease, so the first node whose timer fires wins) and the placement
    /// knows where the leader is. No election happens while measuring, so
    /// the longer timers change nothing measured.
    fn start(size: u64, core_of: impl Fn(NodeId) -> usize, timing: Timing) -> LocalCluster {
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            dirs: Vec::new(),
        };
        let mut members_txs = Vec::new();
        let mut node_rxs = Vec::new();
        for id in 1..=size {
            let dir = scratch(&format!("node{id}"));
            std::fs::create_dir_all(&dir).expect("a data directory");
            cluster.dirs.push(dir.clone());
            let (address_tx, address_rx) = std::sync::mpsc::channel::<Address>();
            let (members_tx, members_rx) = std::sync::mpsc::channel::<BTreeMap<NodeId, String>>();
            let (node_tx, node_rx) = std::sync::mpsc::channel::<Started>();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let core = core_of(id);
            let timing = if id == 1 {
                timing
            } else {
                Timing {
                    heartbeat_ms: timing.heartbeat_ms,
                    election_min_ms: timing.election_min_ms * 3,
                    election_max_ms: timing.election_max_ms * 3,
                }
            };
            let thread = std::thread::Builder::new()
                .name(format!("node-{id}"))
                .spawn(move || {
                    pin(core);
                    let runtime = runtime();
                    let listener = runtime
                        .block_on(courier_transport::bind(
                            &"tcp://127.0.0.1:0".parse().expect("an address"),
                            &Default::default(),
                        ))
                        .expect("a loopback listener");
                    let _ = address_tx.send(listener.local_addr().clone());
                    let Ok(members) = members_rx.recv() else {
                        return;
                    };
                    runtime.block_on(async move {
                        let peers = Peers::new(ClientConfig::default());
                        let config = NodeConfig::new(id, members[&id].clone(), members, &dir)
                            .with_timing(timing);
                        let node =
                            match ClusterNode::start(config, peers.network(METADATA_GROUP)).await {
                                Ok(node) => Arc::new(node),
                                Err(e) => {
                                    let _ = node_tx.send(Err(e.to_string()));
                                    return;
                                }
                            };
                        let host = RaftHost::default();
                        host.insert(METADATA_GROUP, node.raft().clone());
                        let server = Server::new(ServerConfig::default())
                            .service(RaftTransportServer::new(host))
                            .service(ClusterServiceServer::new(ClusterHost::new(node.clone())))
                            .spawn(listener);
                        let _ = node_tx.send(Ok(node.clone()));
                        let _ = stop_rx.await;
                        let _ = tokio::time::timeout(Duration::from_secs(5), async {
                            server.shutdown(Duration::ZERO).await;
                            let _ = node.raft().shutdown().await;
                        })
                        .await;
                    });
                })
                .expect("a node thread");
            let address = address_rx.recv().expect("the node announces its address");
            cluster.nodes.push(LocalNode {
                id,
                address,
                node: None,
                stop: Some(stop_tx),
                thread: Some(thread),
            });
            members_txs.push(members_tx);
            node_rxs.push(node_rx);
        }
        let members: BTreeMap<NodeId, String> = cluster
            .nodes
            .iter()
            .map(|n| (n.id, n.address.to_string()))
            .collect();
        for tx in members_txs {
            let _ = tx.send(members.clone());
        }
        for (node, rx) in cluster.nodes.iter_mut().zip(node_rxs) {
            match rx.recv() {
                Ok(Ok(started)) => node.node = Some(started),
                Ok(Err(e)) => panic!("node {} did not start: {e}", node.id),
                Err(_) => panic!("node {} thread ended before starting", node.id),
            }
        }
        cluster
    }

    /// The node that says it leads, in the highest term, if any.
    fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .map(|n| n.status())
            .filter(|s| s.leader == Some(s.node) && s.role == "leader")
            .max_by_key(|s| s.term)
            .map(|s| s.node)
    }

    /// Waits (up to 30 s) for a leader that every node follows.
    async fn wait_leader(&self) -> Option<NodeId> {
        for _ in 0..3000 {
            if let Some(leader) = self.leader() {
                let all = self
                    .nodes
                    .iter()
                    .filter_map(|n| n.node.as_ref())
                    .all(|n| n.status().leader == Some(leader));
                if all {
                    return Some(leader);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.leader()
    }

    /// A client knowing every node, `first` first.
    fn client(&self, first: NodeId) -> KvClient {
        let mut addresses = vec![self.nodes[first as usize - 1].address.clone()];
        addresses.extend(
            self.nodes
                .iter()
                .filter(|n| n.id != first)
                .map(|n| n.address.clone()),
        );
        KvClient::new(&addresses, ClientConfig::default()).expect("addresses")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.node = None;
            if let Some(stop) = node.stop.take() {
                let _ = stop.send(());
            }
        }
        for node in &mut self.nodes {
            if let Some(thread) = node.thread.take() {
                let _ = thread.join();
            }
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Percentiles in microseconds, and failed operations.
#[derive(Clone, Copy, Debug, Default)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    errors: usize,
}

impl Latency {
    fn of(histogram: &Histogram<u64>, errors: usize) -> Latency {
        let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1e3;
        Latency {
            p50: us(0.5),
            p99: us(0.99),
            p999: us(0.999),
            errors,
        }
    }
}

/// Operations per second (median of repeats), the spread, failures.
#[derive(Clone, Copy, Debug, Default)]
struct Rate {
    per_s: f64,
    spread: f64,
    errors: usize,
}

/// `warmup + count` operations one after another; the later `count` timed.
async fn sequential<F, Fut>(warmup: usize, count: usize, op: F) -> Latency
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut histogram = latency_histogram();
    let mut errors = 0;
    for i in 0..warmup + count {
        let started = Instant::now();
        let ok = op(i).await;
        if i >= warmup {
            if ok {
                record(&mut histogram, started.elapsed());
            } else {
                errors += 1;
            }
        }
    }
    Latency::of(&histogram, errors)
}

/// `total` operations by [`IN_FLIGHT`] tasks, `repeats` times; operations
/// per second (median) and the spread.
async fn in_flight<F, Fut>(repeats: usize, total: usize, op: F) -> Rate
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let op = Arc::new(op);
    let mut rates = Vec::new();
    let errors = Arc::new(AtomicUsize::new(0));
    for _ in 0..repeats {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let (op, next, errors) = (op.clone(), next.clone(), errors.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            break;
                        }
                        if !op(i).await {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a workload task");
        }
        rates.push(total as f64 / started.elapsed().as_secs_f64());
    }
    let (per_s, spread) = median_and_spread(&mut rates);
    Rate {
        per_s,
        spread,
        errors: errors.load(Ordering::Relaxed),
    }
}

type Op = std::pin::Pin<Box<dyn Future<Output = bool> + Send>>;

/// A put of a 256-byte value to key `i`: whether it succeeded.
fn put_op(kv: &KvClient, keys: usize) -> impl Fn(usize) -> Op + Send + Sync + 'static {
    let kv = kv.clone();
    let value = Bytes::from(vec![0xA5u8; SIZE]);
    move |i| {
        let (kv, value) = (kv.clone(), value.clone());
        Box::pin(async move { kv.put(&key(i, keys), value).await.is_ok() })
    }
}

/// A get of key `i` (which exists): whether it found it.
fn get_op(kv: &KvClient, keys: usize) -> impl Fn(usize) -> Op + Send + Sync + 'static {
    let kv = kv.clone();
    move |i| {
        let kv = kv.clone();
        Box::pin(async move { matches!(kv.get(&key(i, keys)).await, Ok(Some(_))) })
    }
}

/// How much of each in-process workload to do.
#[derive(Clone, Copy, Debug)]
struct Counts {
    keys: usize,
    warmup: usize,
    puts: usize,
    gets: usize,
    repeats: usize,
    puts_in_flight: usize,
    gets_in_flight: usize,
}

/// What one cluster size measured in one placement.
#[derive(Clone, Debug, Default)]
struct Measured {
    leader: Option<NodeId>,
    put_seq: Latency,
    put_x32: Rate,
    gets: Vec<(&'static str, Latency)>,
    gets_x32: Vec<(&'static str, Rate)>,
}

/// Starts a cluster of `size` in `placement`, measures, stops it.
fn measure_cluster(
    size: u64,
    placement: Placement,
    timing: Timing,
    counts: Counts,
    gets: bool,
) -> Measured {
    // The leader (node 1) alone on CPU 1 when split; everything else on 0.
    let core_of = move |id: NodeId| match placement {
        Placement::Split if id == 1 => 1,
        _ => 0,
    };
    let cluster = LocalCluster::start(size, core_of, timing);
    on_core(0, || {
        runtime().block_on(async {
            let leader = cluster.wait_leader().await;
            let kv = cluster.client(leader.unwrap_or(1));
            let mut measured = Measured {
                leader,
                ..Default::default()
            };
            // Warm up: the connection, and every key exists for the gets.
            let put = put_op(&kv, counts.keys);
            let _ = sequential(0, counts.keys, &put).await;
            measured.put_seq = sequential(counts.warmup, counts.puts, &put).await;
            measured.put_x32 = in_flight(counts.repeats, counts.puts_in_flight, put).await;
            if gets {
                let follower = cluster
                    .nodes
                    .iter()
                    .find(|n| Some(n.id) != leader)
                    .map(|n| n.address.clone());
                let linear = kv.with_read(Read::Linearizable);
                let stale = kv.with_read(Read::Stale);
                for (name, client) in [("linear", &linear), ("stale", &stale)] {
                    let get = get_op(client, counts.keys);
                    let latency = sequential(counts.warmup, counts.gets, &get).await;
                    measured.gets.push((name, latency));
                }
                if let Some(follower) = follower {
                    let at_follower = KvClient::new(&[follower], ClientConfig::default())
                        .expect("an address")
                        .with_read(Read::Stale);
                    let get = get_op(&at_follower, counts.keys);
                    let latency = sequential(counts.warmup, counts.gets, &get).await;
                    measured.gets.push(("stale-f", latency));
                }
                for (name, client) in [("linear", &linear), ("stale", &stale)] {
                    let rate = in_flight(
                        counts.repeats,
                        counts.gets_in_flight,
                        get_op(client, counts.keys),
                    )
                    .await;
                    measured.gets_x32.push((name, rate));
                }
            }
            measured
        })
    })
}

/// 256-byte write + fdatasync, one after another: the latency histogram
/// and the rate.
fn raw_fsync(warmup: usize, count: usize) -> (Latency, f64) {
    let dir = scratch("raw-fsync");
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let mut file = std::fs::File::create(dir.join("raw")).expect("a file");
    let record_bytes = [0xA5u8; SIZE];
    let mut histogram = latency_histogram();
    let mut started_all = Instant::now();
    for i in 0..warmup + count {
        if i == warmup {
            started_all = Instant::now();
        }
        let started = Instant::now();
        file.write_all(&record_bytes).expect("write");
        file.sync_data().expect("fdatasync");
        if i >= warmup {
            record(&mut histogram, started.elapsed());
        }
    }
    let rate = count as f64 / started_all.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_dir_all(&dir);
    (Latency::of(&histogram, 0), rate)
}

/// Raw baselines of one placement.
#[derive(Clone, Copy, Debug)]
struct Raw {
    tcp: Latency,
    tcp_x32: f64,
}

// ----------------------------------------------------------------- processes

/// Three `courier serve` processes; dropping it kills every one still
/// running and removes their data.
struct Processes {
    bin: PathBuf,
    dir: PathBuf,
    ports: Vec<u16>,
    cores: Vec<usize>,
    config: Option<PathBuf>,
    children: Vec<Option<Child>>,
}

impl Processes {
    fn new(bin: PathBuf, count: usize, timing: Option<Timing>) -> anyhow::Result<Processes> {
        let dir = scratch("processes");
        std::fs::create_dir_all(&dir)?;
        // Free ports: bind port 0, read it, let it go (all at once, so distinct).
        let listeners: Vec<std::net::TcpListener> = (0..count)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        drop(listeners);
        let config = match timing {
            Some(t) => {
                let path = dir.join("timing.toml");
                std::fs::write(
                    &path,
                    format!(
                        "[cluster]\nheartbeat_ms = {}\nelection_min_ms = {}\nelection_max_ms = {}\n",
                        t.heartbeat_ms, t.election_min_ms, t.election_max_ms
                    ),
                )?;
                Some(path)
            }
            None => None,
        };
        let cpus = cpus();
        Ok(Processes {
            bin,
            dir,
            ports,
            cores: (0..count).map(|i| i % cpus).collect(),
            config,
            children: (0..count).map(|_| None).collect(),
        })
    }

    fn address(&self, i: usize) -> String {
        format!("tcp://127.0.0.1:{}", self.ports[i])
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{}.log", i + 1))
    }

    /// Starts node `i + 1` (pinned to its core: a process inherits the
    /// affinity of the thread that forks it).
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let mut command = Command::new(&self.bin);
        command
            .arg("serve")
            .arg("--listen")
            .arg(self.address(i))
            .arg("--data")
            .arg(self.dir.join(format!("node{}", i + 1)))
            .arg("--metrics")
            .arg("")
            .arg("--log")
            .arg("warn")
            .arg("--node")
            .arg((i + 1).to_string());
        for j in (0..self.ports.len()).filter(|j| *j != i) {
            command
                .arg("--peer")
                .arg(format!("{}={}", j + 1, self.address(j)));
        }
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("COURIER_") {
                command.env_remove(name);
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let core = self.cores[i];
        let child = on_core(core, move || command.spawn())?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// Waits until node `i + 1` accepts connections.
    fn wait_listening(&mut self, i: usize) -> anyhow::Result<()> {
        for _ in 0..1000 {
            if let Some(child) = self.children[i].as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.children[i] = None;
                    anyhow::bail!("node {} exited ({status}):\n{}", i + 1, self.log_tail(i));
                }
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.ports[i])).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        anyhow::bail!("node {} not listening after 10 s", i + 1)
    }

    /// Starts node `i + 1` and waits until it listens, trying again a few
    /// times if it exits at once (its port taken again for a moment).
    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..5 {
            self.spawn(i)?;
            match self.wait_listening(i) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.kill(i);
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("node {} did not start", i + 1)))
    }

    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.log(i)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGKILL, then reap.
    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn client_of(&self, i: usize) -> KvClient {
        let address: Address = self.address(i).parse().expect("an address");
        KvClient::new(&[address], ClientConfig::default()).expect("an address")
    }

    fn client(&self) -> KvClient {
        let addresses: Vec<Address> = (0..self.ports.len())
            .map(|i| self.address(i).parse().expect("an address"))
            .collect();
        KvClient::new(&addresses, ClientConfig::default()).expect("addresses")
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The release binary: `$COURIER_BIN`, else `target/release/courier` in the
/// target directory this bench was built into, else the workspace's.
fn courier_binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("COURIER_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!("COURIER_BIN={} is not a file", bin.display()))
        };
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/cluster-<hash>
        if let Some(target) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(target.join("release").join("courier"));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/courier"));
    let Some(bin) = candidates.iter().find(|c| c.is_file()) else {
        return Err(format!(
            "no courier binary at {}; build it with `cargo build --release -p courier-cli` \
             (cargo xtask bench does), or set COURIER_BIN",
            candidates[0].display()
        ));
    };
    let help = Command::new(bin)
        .args(["serve", "--help"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let help = String::from_utf8_lossy(&help.stdout);
    if !help.contains("--node") || !help.contains("--peer") {
        return Err(format!(
            "{} predates clusters (no `serve --node`); rebuild it with \
             `cargo build --release -p courier-cli`",
            bin.display()
        ));
    }
    Ok(bin.clone())
}

/// One kill: times in seconds.
#[derive(Clone, Copy, Debug)]
struct Kill {
    elect: f64,
    put: f64,
    rejoin: f64,
}

/// Polls `what` every `every` until it gives `Some`, at most `tries` times.
async fn poll<T, F, Fut>(tries: usize, every: Duration, what: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..tries {
        if let Some(value) = what().await {
            return Some(value);
        }
        tokio::time::sleep(every).await;
    }
    None
}

/// The failover workload: `kills` times, kill the leader and time the
/// recovery. `Err` on a setup failure (reported, not judged).
fn failover(bin: PathBuf, kills: usize, timing: Option<Timing>) -> anyhow::Result<Vec<Kill>> {
    let mut procs = Processes::new(bin, 3, timing)?;
    for i in 0..3 {
        procs.spawn(i)?;
    }
    for i in 0..3 {
        procs.wait_listening(i)?;
    }
    let rt = runtime();
    let kv = procs.client();
    let value = Bytes::from(vec![0xA5u8; SIZE]);
    // The cluster serves writes.
    let last_error = std::sync::Mutex::new(String::new());
    let ready = rt.block_on(poll(600, Duration::from_millis(50), || async {
        match kv.put("failover/ready", value.clone()).await {
            Ok(revision) => Some(revision),
            Err(e) => {
                *last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
                None
            }
        }
    }));
    if ready.is_none() {
        let logs: Vec<String> = (0..3)
            .map(|i| format!("node {} log:\n{}", i + 1, procs.log_tail(i)))
            .collect();
        anyhow::bail!(
            "the cluster did not accept a put within 30 s (last error: {})\n{}",
            last_error.lock().unwrap_or_else(|p| p.into_inner()),
            logs.join("\n")
        );
    }
    let mut results = Vec::new();
    for round in 0..kills {
        // Everyone caught up, so any of them may win the election.
        let leader = rt.block_on(poll(1500, Duration::from_millis(20), || async {
            let status = kv.leader_status().await.ok()?;
            let caught_up =
                status.members.len() == 3 && status.members.iter().all(|m| m.lag == Some(0));
            caught_up.then_some(status)
        }));
        let Some(leader) = leader else {
            anyhow::bail!("round {round}: no leader with every follower caught up within 30 s");
        };
        let victim = leader.node as usize - 1;
        let old_term = leader.term;
        let survivors: Vec<KvClient> = (0..3)
            .filter(|i| *i != victim)
            .map(|i| procs.client_of(i))
            .collect();
        // Warm the survivors' status connections before the clock starts.
        for s in &survivors {
            let _ = rt.block_on(s.status());
        }
        let killed_at = Instant::now();
        procs.kill(victim);
        let (elect, put) = rt.block_on(async {
            let watcher = tokio::spawn(async move {
                poll(6000, Duration::from_millis(5), || {
                    let survivors = survivors.clone();
                    async move {
                        for s in &survivors {
                            if let Ok(status) = s.status().await {
                                if status.role == "leader" && status.term > old_term {
                                    return Some(killed_at.elapsed());
                                }
                            }
                        }
                        None
                    }
                })
                .await
            });
            let mut put = None;
            for _ in 0..100_000 {
                if killed_at.elapsed() > Duration::from_secs(30) {
                    break;
                }
                match kv.put("failover/after", value.clone()).await {
                    Ok(revision) => {
                        put = Some((killed_at.elapsed(), revision));
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
            (watcher.await.ok().flatten(), put)
        });
        let (Some(elect), Some((put, revision))) = (elect, put) else {
            anyhow::bail!("round {round}: no new leader or no put within 30 s of the kill");
        };
        // Back on its data directory, until it follows and has the put.
        let restarted_at = Instant::now();
        procs.start(victim)?;
        let own = procs.client_of(victim);
        let rejoined = rt.block_on(poll(3000, Duration::from_millis(10), || async {
            let status = own.status().await.ok()?;
            (status.role == "follower" && status.leader.is_some() && status.revision >= revision)
                .then_some(())
        }));
        if rejoined.is_none() {
            anyhow::bail!(
                "round {round}: node {} not a caught-up follower within 30 s of its restart:\n{}",
                victim + 1,
                procs.log_tail(victim)
            );
        }
        let kill = Kill {
            elect: elect.as_secs_f64(),
            put: put.as_secs_f64(),
            rejoin: restarted_at.elapsed().as_secs_f64(),
        };
        println!(
            "  kill {:>2}: node {} (term {old_term}): new leader after {:>6.0} ms, first put after {:>6.0} ms, back as a follower {:>6.0} ms after its restart",
            round + 1,
            victim + 1,
            kill.elect * 1e3,
            kill.put * 1e3,
            kill.rejoin * 1e3
        );
        results.push(kill);
    }
    drop(procs);
    Ok(results)
}

/// p50, p90 and max of some seconds, in milliseconds.
fn spread_ms(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.map(|s| s * 1e3).collect();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.9), v[v.len() - 1])
}

// ---------------------------------------------------------------------- main

fn latency_row(workload: &str, subject: &str, place: Placement, l: &Latency, vs: &str) {
    println!(
        "{workload:<14} {subject:<8} {:<6} {:>10.1} {:>10.1} {:>10.1} {:>12} {vs}",
        place.label(),
        l.p50,
        l.p99,
        l.p999,
        "-"
    );
}

fn rate_row(workload: &str, subject: &str, place: Placement, r: &Rate, vs: &str) {
    println!(
        "{workload:<14} {subject:<8} {:<6} {:>10} {:>10} {:>10} {:>12.0} {vs}  (spread {:.0}%)",
        place.label(),
        "-",
        "-",
        "-",
        r.per_s,
        r.spread * 100.0
    );
}

fn add_latency(report: &mut Report, workload: &str, subject: &str, place: Placement, l: &Latency) {
    report.add(workload, subject, place, "p50_us", l.p50);
    report.add(workload, subject, place, "p99_us", l.p99);
    report.add(workload, subject, place, "p99.9_us", l.p999);
    report.add(workload, subject, place, "errors", l.errors as f64);
}

fn add_rate(report: &mut Report, workload: &str, subject: &str, place: Placement, r: &Rate) {
    report.add(workload, subject, place, "ops_per_s", r.per_s);
    report.add(workload, subject, place, "spread", r.spread);
    report.add(workload, subject, place, "errors", r.errors as f64);
}

fn main() -> anyhow::Result<()> {
    let mode = Mode::from_args();
    let filters = filters();
    let mut report = Report::default();
    // Smoke mode: short timers, so two elections fit in a few seconds.
    let smoke_timing = Timing {
        heartbeat_ms: 25,
        election_min_ms: 150,
        election_max_ms: 300,
    };
    let timing = mode.pick(Timing::default(), smoke_timing);
    let counts = Counts {
        keys: mode.pick(1024, 16),
        warmup: mode.pick(200, 5),
        puts: mode.pick(2_000, 20),
        gets: mode.pick(5_000, 20),
        repeats: mode.pick(3, 1),
        puts_in_flight: mode.pick(6_000, 64),
        gets_in_flight: mode.pick(20_000, 64),
    };
    let cpus = cpus();
    println!(
        "cluster benchmarks ({mode:?}): {SIZE}-byte values, {} keys, fsync always (one fdatasync per append batch); \
         timers: heartbeat {} ms, election {}–{} ms",
        counts.keys, timing.heartbeat_ms, timing.election_min_ms, timing.election_max_ms
    );
    println!(
        "{cpus} CPUs: three nodes and a client cannot each have one. same = client and every node on CPU 0; \
         split = leader (node 1) on CPU 1, client and followers on CPU 0, so every hop of the put path crosses CPUs \
         (one node: node on CPU 1, client on CPU 0). Each node's threads (runtime, blocking pool, log writer) share its pin.\n"
    );

    let want_put = selected(&filters, "put");
    let want_get = selected(&filters, "get");
    if want_put || want_get {
        let (fsync, fsync_rate) = on_core(0, || raw_fsync(counts.warmup, counts.puts));
        report.add(
            "raw_fsync_256B",
            "raw-disk",
            Placement::Same,
            "p50_us",
            fsync.p50,
        );
        report.add(
            "raw_fsync_256B",
            "raw-disk",
            Placement::Same,
            "p99_us",
            fsync.p99,
        );
        report.add(
            "raw_fsync_256B",
            "raw-disk",
            Placement::Same,
            "per_s",
            fsync_rate,
        );
        println!(
            "raw disk (CPU 0): write + fdatasync of {SIZE} B: p50 {:.1} µs, p99 {:.1} µs, {fsync_rate:.0}/s sequential",
            fsync.p50, fsync.p99
        );
        println!(
            "\n{:<14} {:<8} {:<6} {:>10} {:>10} {:>10} {:>12} vs raw (same run, same placement)",
            "workload", "subject", "place", "p50 µs", "p99 µs", "p99.9 µs", "ops/s"
        );
        // The same-CPU ping-pong, for the follower read in `split` (the
        // follower shares CPU 0 with the client there).
        let mut same_tcp_p50 = None;
        for place in Placement::available() {
            let tcp_hist = raw::pingpong(place, SIZE, counts.warmup, counts.gets);
            let tcp = Latency::of(&tcp_hist, 0);
            let tcp_x32 = {
                let count = counts.gets_in_flight as u64;
                count as f64 / raw::pipelined(place, SIZE, IN_FLIGHT, count).as_secs_f64()
            };
            let raw = Raw { tcp, tcp_x32 };
            if place == Placement::Same {
                same_tcp_p50 = Some(tcp.p50);
            }
            add_latency(&mut report, "raw_pingpong_256B", "raw-tcp", place, &raw.tcp);
            report.add(
                "raw_pipelined_256B_x32",
                "raw-tcp",
                place,
                "msgs_per_s",
                raw.tcp_x32,
            );
            latency_row("raw_pingpong", "raw-tcp", place, &raw.tcp, "");
            println!(
                "{:<14} {:<8} {:<6} {:>10} {:>10} {:>10} {:>12.0}",
                "raw_pipe_x32",
                "raw-tcp",
                place.label(),
                "-",
                "-",
                "-",
                raw.tcp_x32
            );

            let three = measure_cluster(3, place, timing, counts, want_get);
            let one = if want_put {
                Some(measure_cluster(1, place, timing, counts, false))
            } else {
                None
            };
            if three.leader != Some(1) {
                println!(
                    "  note: node 1 did not win the election (leader {:?}); the {} placement is not as labelled",
                    three.leader,
                    place.label()
                );
            }
            if want_put {
                let one = one.as_ref().expect("measured");
                for (subject, m, hops) in [("3node", &three, 2.0), ("1node", one, 1.0)] {
                    let floor = fsync.p50 + hops * raw.tcp.p50;
                    let ratio = m.put_seq.p50 / floor;
                    let vs = format!(
                        "{ratio:.2}x floor (fsync p50 + {hops:.0} x tcp p50 = {floor:.0} µs)"
                    );
                    latency_row("kv_put_seq", subject, place, &m.put_seq, &vs);
                    add_latency(&mut report, "kv_put_seq", subject, place, &m.put_seq);
                    report.ratio("kv_put_seq", subject, place, ratio, f64::NAN, false);
                    let ratio = m.put_x32.per_s / fsync_rate;
                    let vs = format!("{ratio:.2}x raw fsync rate");
                    rate_row("kv_put_x32", subject, place, &m.put_x32, &vs);
                    add_rate(&mut report, "kv_put_x32", subject, place, &m.put_x32);
                    report.ratio("kv_put_x32", subject, place, ratio, f64::NAN, true);
                }
                let p50 = three.put_seq.p50 / one.put_seq.p50;
                let rate = three.put_x32.per_s / one.put_x32.per_s;
                println!(
                    "{:<14} {:<8} {:<6} 3-node / 1-node: p50 {p50:.2}x, throughput {rate:.2}x",
                    "kv_put",
                    "3n/1n",
                    place.label()
                );
                report.add("kv_put_seq", "3node", place, "ratio_to_1node", p50);
                report.add("kv_put_x32", "3node", place, "ratio_to_1node", rate);
                let errors = three.put_seq.errors
                    + three.put_x32.errors
                    + one.put_seq.errors
                    + one.put_x32.errors;
                if errors > 0 {
                    println!("  note: {errors} puts failed (not timed)");
                }
            }
            if want_get {
                for (subject, l) in &three.gets {
                    let hops = if *subject == "linear" { 2.0 } else { 1.0 };
                    let (tcp, which) = match (*subject, same_tcp_p50) {
                        ("stale-f", Some(same)) if place == Placement::Split => {
                            (same, " (same-CPU: the follower is on the client's CPU)")
                        }
                        _ => (raw.tcp.p50, ""),
                    };
                    let ratio = l.p50 / (hops * tcp);
                    let vs = format!("{ratio:.2}x {hops:.0} x tcp p50{which}");
                    latency_row("kv_get_seq", subject, place, l, &vs);
                    add_latency(&mut report, "kv_get_seq", subject, place, l);
                    report.ratio("kv_get_seq", subject, place, ratio, f64::NAN, false);
                    if l.errors > 0 {
                        println!("  note: {} gets failed (not timed)", l.errors);
                    }
                }
                for (subject, r) in &three.gets_x32 {
                    let ratio = r.per_s / raw.tcp_x32;
                    let vs = format!("{ratio:.2}x raw tcp x32");
                    rate_row("kv_get_x32", subject, place, r, &vs);
                    add_rate(&mut report, "kv_get_x32", subject, place, r);
                    report.ratio("kv_get_x32", subject, place, ratio, f64::NAN, true);
                    if r.errors > 0 {
                        println!("  note: {} gets failed", r.errors);
                    }
                }
            }
            println!();
        }
    }

    if selected(&filters, "failover") {
        let kills = mode.pick(10, 2);
        // Processes pinned round robin: node 1 and 3 on CPU 0, node 2 on CPU 1.
        let place = if cpus >= 2 {
            Placement::Split
        } else {
            Placement::Same
        };
        match courier_binary() {
            Err(why) => println!("failover: skipped: {why}\n"),
            Ok(bin) => {
                println!(
                    "failover: three `{} serve` processes (node i on CPU (i-1) mod {cpus}); kill -9 the leader, {kills} times:",
                    bin.display()
                );
                let process_timing = match mode {
                    Mode::Full => None,
                    Mode::Smoke => Some(timing),
                };
                match failover(bin, kills, process_timing) {
                    Err(e) => {
                        println!("failover: did not complete: {e:#}\n");
                        if format!("{e:#}").contains("protocol mismatch") {
                            println!(
                                "  the binary was built from other sources than this bench: \
                                 rebuild it (`cargo build --release -p courier-cli`; cargo xtask bench does)\n"
                            );
                        }
                    }
                    Ok(results) => {
                        let timeout_mid =
                            (timing.election_min_ms + timing.election_max_ms) as f64 / 2.0;
                        let (e50, e90, emax) = spread_ms(results.iter().map(|k| k.elect));
                        let (p50, p90, pmax) = spread_ms(results.iter().map(|k| k.put));
                        let (r50, r90, rmax) = spread_ms(results.iter().map(|k| k.rejoin));
                        println!(
                            "\n{:<14} {:<8} {:<6} {:>10} {:>10} {:>10}  vs",
                            "workload", "subject", "place", "p50 ms", "p90 ms", "max ms"
                        );
                        let rows = [
                            (
                                "elect",
                                (e50, e90, emax),
                                format!(
                                    "{:.2}x the election timeout's midpoint ({timeout_mid:.0} ms, configured)",
                                    e50 / timeout_mid
                                ),
                            ),
                            (
                                "put",
                                (p50, p90, pmax),
                                format!(
                                    "{:.2}x elect (same run): the client's retry cost on top",
                                    p50 / e50
                                ),
                            ),
                            ("rejoin", (r50, r90, rmax), String::new()),
                        ];
                        for (subject, (a, b, c), vs) in rows {
                            println!(
                                "{:<14} {subject:<8} {:<6} {a:>10.0} {b:>10.0} {c:>10.0}  {vs}",
                                "failover",
                                place.label()
                            );
                            report.add("failover", subject, place, "p50_ms", a);
                            report.add("failover", subject, place, "p90_ms", b);
                            report.add("failover", subject, place, "max_ms", c);
                            report.add("failover", subject, place, "kills", results.len() as f64);
                        }
                        report.add(
                            "failover",
                            "elect",
                            place,
                            "ratio_to_election_timeout",
                            e50 / timeout_mid,
                        );
                        report.ratio("failover", "put", place, p50 / e50, f64::NAN, false);
                        println!();
                    }
                }
            }
        }
    }

    println!(
        "context (published, not measured here): etcd gives above 30,000 writes/s for three members under heavy load; \
         election timeouts by default: NATS 4–9 s, Redpanda 1.5 s, Courier 1–2 s (heartbeat 250 ms; see courier-cluster node.rs)."
    );
    println!("\n{}", report.ratio_table());
    let (tsv, svg) = report.write(&output_dir(mode), "cluster")?;
    println!("figures: {}\nplot:    {}", tsv.display(), svg.display());
    Ok(())
}
