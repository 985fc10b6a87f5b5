//! Replicated queues beside unreplicated ones, same machine, same run:
//! brokers in process (each node a pinned thread with its own
//! current-thread runtime and data directory, loopback TCP between them),
//! 256-byte messages, 256 enqueues outstanding from one client connected
//! to node 1.
//!
//! Subjects:
//!
//! - `R3`: three cluster members, the queues replicated on all three
//!   (`queue_replicas = 3`): an enqueue is answered once two of them have
//!   it fdatasynced. With several queues, their leaders spread over the
//!   nodes, so most operations are forwarded one hop by node 1.
//! - `R3-own`: the same, but each queue's group with a log of its own
//!   (`shared_queue_log = false`), so one fsync per group per batch instead
//!   of one per node: what the node's shared log saves.
//! - `R1`: a one-member cluster, the queues replicated on it alone: the
//!   same code path without the network hops.
//! - `local`: one broker keeping the queues itself, `fsync = always`.
//! - `raw-disk`: sequential 256-byte writes, each followed by fdatasync.
//!
//! Workloads (filters `enqueue`, `ack`, `failover`):
//!
//! - `enqueue_Nq`: M messages over N queues (1, 10, 100), 256 in flight,
//!   messages per second;
//! - `consume_ack_Nq`: the same messages taken by one consumer per queue
//!   (prefetch 256 / N, at least 16), each acknowledged as it comes with
//!   up to the prefetch's acks in flight (the client coalesces them),
//!   messages per second;
//! - beside each rate, the CPU it cost per message: user and system time
//!   of the whole process (every node, its log writers and the client)
//!   over the workload, divided by its messages. On two CPUs running three
//!   nodes, R3's rate is bounded by what it costs; the CPU ratio to R1 says
//!   how much of R3's gap is work and how much is waiting;
//! - `failover`: R3; the broker leading the queue is stopped abruptly (its
//!   runtime dropped: every socket closes at once, as at a `kill -9`), and
//!   the time is taken until the next enqueue through a surviving node is
//!   confirmed. p50 and max over the kills (10 in full mode, 2 in smoke),
//!   and p50 against openraft's floor: a follower that knew a leader
//!   stands only once the leader's lease (`election_max_ms`) and its own
//!   election timeout have passed since it last heard from it.
//!
//! Placement: `same` = every node and the client on CPU 0; `split` = node 1
//! on CPU 1, the others and the client on CPU 0.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use courier_benches::{
    filters, output_dir, pin, process_cpu, runtime, selected, Mode, Placement, Report,
};
use courier_broker::config::ClusterSection;
use courier_broker::{Broker, BrokerConfig, BrokerServiceClient};
use courier_cluster::node::Timing;
use courier_queue::remote::RemoteQueue;
use courier_queue::Message;
use courier_rpc::ClientConfig;
use courier_transport::Address;

const SIZE: usize = 256;
const IN_FLIGHT: usize = 256;

fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "courier-bench-rq-{}-{name}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Subject {
    R3,
    R3Own,
    R1,
    Local,
}

impl Subject {
    fn label(self) -> &'static str {
        match self {
            Subject::R3 => "R3",
            Subject::R3Own => "R3-own",
            Subject::R1 => "R1",
            Subject::Local => "local",
        }
    }
    fn nodes(self) -> usize {
        if matches!(self, Subject::R3 | Subject::R3Own) {
            3
        } else {
            1
        }
    }
}

/// One broker on a pinned thread; stopping drops its runtime (abruptly)
/// or shuts it down.
struct Node {
    stop: Option<tokio::sync::oneshot::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    fn start(core: usize, config: BrokerConfig) -> Node {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<bool>();
        let thread = std::thread::spawn(move || {
            pin(core);
            let rt = runtime();
            rt.block_on(async move {
                let broker = match Broker::start(config).await {
                    Ok(broker) => broker,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                // true: shut down gracefully; false (or the sender
                // dropped): return, and the runtime drops every task.
                if let Ok(true) = stopped.await {
                    broker.shutdown().await;
                } else {
                    drop(broker);
                }
            });
        });
        ready_rx
            .recv()
            .expect("the node thread answers")
            .expect("the broker starts");
        Node {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(mut self, gracefully: bool) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(gracefully);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Setup {
    nodes: Vec<Option<Node>>,
    addresses: Vec<String>,
    configs: Vec<BrokerConfig>,
    cores: Vec<usize>,
    dir: PathBuf,
}

impl Setup {
    fn start(subject: Subject, place: Placement, timing: Timing) -> Setup {
        let dir = scratch(subject.label());
        let count = subject.nodes();
        let addresses: Vec<String> = (0..count)
            .map(|_| format!("tcp://127.0.0.1:{}", free_port()))
            .collect();
        let mut configs = Vec::new();
        for id in 1..=count as u64 {
            let mut config = BrokerConfig::default();
            config.listen = vec![addresses[(id - 1) as usize].clone()];
            config.data_dir = dir.join(format!("node-{id}"));
            config.metrics = String::new();
            config.shutdown_grace_ms = 200;
            if subject != Subject::Local {
                let mut section = ClusterSection::default();
                section.node = id;
                section.heartbeat_ms = timing.heartbeat_ms;
                section.election_min_ms = timing.election_min_ms;
                section.election_max_ms = timing.election_max_ms;
                section.replicated_queues = vec!["bench.*".into()];
                section.queue_replicas = count;
                section.shared_queue_log = subject != Subject::R3Own;
                for (i, address) in addresses.iter().enumerate() {
                    let peer = i as u64 + 1;
                    if peer != id {
                        section.peers.insert(peer.to_string(), address.clone());
                    }
                }
                config.cluster = Some(section);
            }
            configs.push(config);
        }
        let cores: Vec<usize> = (0..count)
            .map(|i| usize::from(place == Placement::Split && i == 0))
            .collect();
        let nodes = configs
            .iter()
            .zip(&cores)
            .map(|(config, core)| Some(Node::start(*core, config.clone())))
            .collect();
        Setup {
            nodes,
            addresses,
            configs,
            cores,
            dir,
        }
    }

    fn address(&self, index: usize) -> Address {
        self.addresses[index].parse().unwrap()
    }

    fn all(&self) -> Vec<Address> {
        (0..self.addresses.len()).map(|i| self.address(i)).collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut() {
            if let Some(node) = node.take() {
                node.stop(true);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Enqueues with retries while a new queue finds its leader.
async fn enqueue_retrying(queue: &RemoteQueue, message: Message) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match queue.enqueue(message.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Rates and CPU per message for `messages` over `queues`.
async fn measure(
    address: Address,
    prefix: &str,
    queues: usize,
    messages: usize,
) -> anyhow::Result<Measured> {
    let client = courier_rpc::Client::connect(&address, ClientConfig::default()).await?;
    let handles: Vec<RemoteQueue> = (0..queues)
        .map(|q| RemoteQueue::with_client(client.clone(), &format!("{prefix}.{q}")))
        .collect();
    // Declare (place) every queue first, outside the timing.
    for queue in &handles {
        enqueue_retrying(queue, Message::new(vec![0u8; SIZE])).await?;
    }
    let payload = bytes::Bytes::from(vec![7u8; SIZE]);
    // What each queue gets: its declaring message, then its tasks' shares.
    let mut shares = vec![1usize; queues];
    let started = Instant::now();
    let cpu = process_cpu();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..IN_FLIGHT {
        let queue = handles[t % queues].clone();
        let payload = payload.clone();
        let count = messages / IN_FLIGHT + usize::from(t < messages % IN_FLIGHT);
        shares[t % queues] += count;
        tasks.spawn(async move {
            for _ in 0..count {
                queue.enqueue(Message::new(payload.clone())).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let enqueue_rate = messages as f64 / started.elapsed().as_secs_f64();
    let enqueue_cpu = (process_cpu() - cpu).as_secs_f64() * 1e6 / messages as f64;

    let prefetch = (IN_FLIGHT / queues).max(16) as u32;
    let started = Instant::now();
    let cpu = process_cpu();
    let mut tasks = tokio::task::JoinSet::new();
    for (queue, share) in handles.iter().zip(shares) {
        let queue = queue.clone();
        tasks.spawn(async move {
            let mut consumer = queue.consumer(prefetch).await?;
            // Acks in flight while the next deliveries are taken, as a
            // consumer that processes them concurrently would send them.
            let mut acks = tokio::task::JoinSet::new();
            for taken in 0..share {
                let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("no delivery within 30 s ({taken} of {share})")
                    })??;
                acks.spawn(delivery.ack());
                while acks.len() >= prefetch as usize {
                    acks.join_next().await.expect("an ack")??;
                }
            }
            while let Some(ack) = acks.join_next().await {
                ack??;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let ack_rate = (messages + queues) as f64 / started.elapsed().as_secs_f64();
    let ack_cpu = (process_cpu() - cpu).as_secs_f64() * 1e6 / (messages + queues) as f64;
    Ok(Measured {
        enqueue_rate,
        ack_rate,
        enqueue_cpu,
        ack_cpu,
    })
}

/// One subject's figures for one workload.
struct Measured {
    /// Enqueues confirmed per second.
    enqueue_rate: f64,
    /// Messages consumed and acknowledged per second.
    ack_rate: f64,
    /// CPU µs per enqueue, every node and the client together.
    enqueue_cpu: f64,
    /// CPU µs per consume + ack, likewise.
    ack_cpu: f64,
}

/// The index of the node leading `queue`, from the nodes' stats.
async fn leader_of(setup: &Setup, queue: &str) -> Option<usize> {
    for (i, node) in setup.nodes.iter().enumerate() {
        if node.is_none() {
            continue;
        }
        let Ok(client) =
            courier_rpc::Client::connect(&setup.address(i), ClientConfig::default()).await
        else {
            continue;
        };
        let Ok(stats) = BrokerServiceClient::new(client).stats().await else {
            continue;
        };
        let leads = stats.cluster.is_some_and(|c| {
            c.queues
                .iter()
                .any(|q| q.name == queue && q.role == "leader")
        });
        if leads {
            return Some(i);
        }
    }
    None
}

/// Milliseconds from stopping the leader to the next confirmed enqueue,
/// per kill.
fn failover(place: Placement, timing: Timing, kills: usize) -> anyhow::Result<Vec<f64>> {
    let mut setup = Setup::start(Subject::R3, place, timing);
    pin(0);
    let rt = runtime();
    let mut times = Vec::new();
    for kill in 0..kills {
        let queue_name = "bench.failover";
        let addresses = setup.all();
        let producer = rt.block_on(RemoteQueue::connect_any(
            &addresses,
            queue_name,
            ClientConfig::default(),
        ))?;
        rt.block_on(enqueue_retrying(
            &producer,
            Message::new(format!("before {kill}")),
        ))?;
        let Some(leader) = rt.block_on(async {
            for _ in 0..200 {
                if let Some(l) = leader_of(&setup, queue_name).await {
                    return Some(l);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        }) else {
            anyhow::bail!("no leader for {queue_name}");
        };
        // A producer connected to a survivor.
        let survivor = (0..3).find(|i| *i != leader).unwrap();
        let producer = rt.block_on(RemoteQueue::connect(
            &setup.address(survivor),
            queue_name,
            ClientConfig::default(),
        ))?;
        setup.nodes[leader].take().unwrap().stop(false);
        let stopped = Instant::now();
        rt.block_on(enqueue_retrying(
            &producer,
            Message::new(format!("after {kill}")).with_key(format!("after-{kill}")),
        ))?;
        times.push(stopped.elapsed().as_secs_f64() * 1000.0);
        // Back on its data directory for the next round.
        setup.nodes[leader] = Some(Node::start(
            setup.cores[leader],
            setup.configs[leader].clone(),
        ));
    }
    Ok(times)
}

fn raw_fsync_rate(count: usize) -> f64 {
    use std::io::Write as _;
    let dir = scratch("raw");
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = std::fs::File::create(dir.join("log")).unwrap();
    let record = [5u8; SIZE];
    let started = Instant::now();
    for _ in 0..count {
        file.write_all(&record).unwrap();
        file.sync_data().unwrap();
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

fn main() -> anyhow::Result<()> {
    let mode = Mode::from_args();
    let filters = filters();
    // Before anything pins this thread: the CPUs it may use are what
    // `available` counts.
    let places = Placement::available();
    let mut report = Report::default();
    let timing = mode.pick(
        Timing::default(),
        Timing {
            heartbeat_ms: 25,
            election_min_ms: 150,
            election_max_ms: 300,
        },
    );
    let messages = mode.pick(20_000, 600);
    let queue_counts: Vec<usize> = mode.pick(vec![1, 10, 100], vec![1, 10]);
    println!(
        "replicated queues ({mode:?}): {SIZE}-byte messages, {messages} per workload, {IN_FLIGHT} enqueues in flight from one client on CPU 0, connected to node 1"
    );
    println!(
        "same = every node and the client on CPU 0; split = node 1 on CPU 1, the rest on CPU 0\n"
    );

    let want_rates = selected(&filters, "enqueue") || selected(&filters, "ack");
    if want_rates {
        pin(0);
        let disk = raw_fsync_rate(mode.pick(2_000, 50));
        println!("raw disk (CPU 0): write + fdatasync of {SIZE} B, one at a time: {disk:.0}/s");
        report.add("raw_fsync_256B", "raw-disk", Placement::Same, "per_s", disk);
        println!(
            "\n{:<18} {:<6} {:>6} {:>11} {:>14} {:>9} {:>9}  vs (rate; CPU per message)",
            "workload", "place", "subj", "enqueue/s", "consume+ack/s", "enq µs", "ack µs"
        );
        for &place in &places {
            for &queues in &queue_counts {
                let mut first: Option<Measured> = None;
                for subject in [Subject::R3, Subject::R3Own, Subject::R1, Subject::Local] {
                    let setup = Setup::start(subject, place, timing);
                    pin(0);
                    let rt = runtime();
                    let prefix = format!("bench.q{queues}");
                    let got = rt.block_on(measure(setup.address(0), &prefix, queues, messages))?;
                    drop(rt);
                    drop(setup);
                    let label = subject.label();
                    for (workload, unit, value) in [
                        (format!("enqueue_{queues}q"), "msgs_per_s", got.enqueue_rate),
                        (format!("consume_ack_{queues}q"), "msgs_per_s", got.ack_rate),
                        (
                            format!("enqueue_{queues}q_cpu"),
                            "cpu_us_per_msg",
                            got.enqueue_cpu,
                        ),
                        (
                            format!("consume_ack_{queues}q_cpu"),
                            "cpu_us_per_msg",
                            got.ack_cpu,
                        ),
                    ] {
                        report.add(&workload, label, place, unit, value);
                    }
                    let vs = match &first {
                        None => String::new(),
                        Some(r3) => format!(
                            "R3 / {label}: enqueue {:.2}x, consume+ack {:.2}x; CPU {:.2}x, {:.2}x",
                            r3.enqueue_rate / got.enqueue_rate,
                            r3.ack_rate / got.ack_rate,
                            r3.enqueue_cpu / got.enqueue_cpu,
                            r3.ack_cpu / got.ack_cpu,
                        ),
                    };
                    println!(
                        "{:<18} {:<6} {:>6} {:>11.0} {:>14.0} {:>9.1} {:>9.1}  {vs}",
                        format!("queues_{queues}q"),
                        place.label(),
                        label,
                        got.enqueue_rate,
                        got.ack_rate,
                        got.enqueue_cpu,
                        got.ack_cpu,
                    );
                    if let Some(r3) = &first {
                        let target = if subject == Subject::R1 {
                            0.5
                        } else {
                            f64::NAN
                        };
                        report.ratio(
                            &format!("enqueue_{queues}q_R3_vs"),
                            label,
                            place,
                            r3.enqueue_rate / got.enqueue_rate,
                            target,
                            true,
                        );
                        report.ratio(
                            &format!("consume_ack_{queues}q_R3_vs"),
                            label,
                            place,
                            r3.ack_rate / got.ack_rate,
                            target,
                            true,
                        );
                    } else {
                        first = Some(got);
                    }
                }
            }
        }
        println!();
    }

    if selected(&filters, "failover") {
        let kills = mode.pick(10, 2);
        let place = if places.contains(&Placement::Split) {
            Placement::Split
        } else {
            Placement::Same
        };
        match failover(place, timing, kills) {
            Ok(mut times) => {
                times.sort_by(f64::total_cmp);
                let p50 = times[times.len() / 2];
                let max = times[times.len() - 1];
                // openraft's floor: a follower that knew a leader stands
                // only after that leader's lease (`election_max_ms`) and
                // then its own election timeout (midpoint here) have passed
                // since it last heard from it.
                let floor = timing.election_max_ms as f64
                    + (timing.election_min_ms + timing.election_max_ms) as f64 / 2.0;
                println!(
                    "failover (R3, {}): leader stopped abruptly -> first confirmed enqueue through a survivor, {kills} kills: p50 {p50:.0} ms, max {max:.0} ms ({:.2}x openraft's floor of {floor:.0} ms: the lease, election_max_ms, plus a mean election timeout)",
                    place.label(),
                    p50 / floor
                );
                report.add("failover", "R3", place, "p50_ms", p50);
                report.add("failover", "R3", place, "max_ms", max);
                report.ratio("failover", "R3", place, p50 / floor, f64::NAN, false);
            }
            Err(e) => println!("failover: did not complete: {e:#}"),
        }
    }

    println!(
        "\ncontext (published, not measured here): RabbitMQ quorum queues about 25k msg/s with 3 replicas on 14 CPUs; \
         synchronous JetStream R3 publishes reported at a few thousand per second."
    );
    println!("\n{}", report.ratio_table());
    let (tsv, svg) = report.write(&output_dir(mode), "replicated_queue")?;
    println!("figures: {}\nplot:    {}", tsv.display(), svg.display());
    Ok(())
}
