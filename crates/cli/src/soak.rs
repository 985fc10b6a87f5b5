//! `courier soak`: a mixed workload over one broker process with faults
//! injected on a schedule drawn from a seed, and checks that hold through
//! all of it.
//!
//! The broker is a child process (`courier serve`, `fsync = always`, short
//! leases). Every client reaches it through an in-process TCP proxy, so the
//! soak can stall or cut connections as a bad network would, and the broker
//! can be killed (`kill -9`) and restarted, or frozen (SIGSTOP) and thawed,
//! without the clients' addresses changing. A `courier sub` child process
//! is frozen and thawed too: a client that stops reading.
//!
//! Workloads: producers enqueue numbered jobs with idempotency keys and
//! retry until confirmed; competing consumers ack most deliveries, nack
//! some, hold some until their lease expires, and always refuse "poison"
//! jobs, which must end in the dead-letter queue; a publisher publishes
//! numbered events, large and small, to subscribers under each
//! slow-consumer policy (two of them slow); a requester calls a responder.
//!
//! Checks: every confirmed job is acknowledged or dead-lettered; each
//! subscriber receives every publisher's events in order, without
//! duplicates, with every missing one accounted for by a reported gap
//! (or, across a reconnect, by the `Restored` event that says messages were
//! missed); every operation ends within its deadline plus a margin (no
//! hang); the broker's resident memory stays under a cap. The seed is
//! printed first and with every violation, so a run can be replayed with
//! `--seed`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use courier_pubsub::remote::{RemotePubSub, RemoteSubscription};
use courier_pubsub::{Event, SlowConsumer, SubscribeOptions};
use courier_queue::remote::RemoteQueue;
use courier_queue::Message;
use courier_rpc::{Client, ClientConfig};
use courier_transport::Address;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// How long to run the workload with faults, in minutes (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    minutes: f64,
    /// The seed of the fault schedule and the workload's choices; random if absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Where the broker keeps its data; a fresh temporary directory if absent.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The broker's resident memory may not exceed this many MiB.
    #[arg(long, default_value_t = 512)]
    max_rss_mib: u64,
    /// Run the workload and its checks without injecting faults (a baseline).
    #[arg(long)]
    no_faults: bool,
}

/// Lease of a delivery in the soak's broker: short, so leases expire often.
const LEASE_MS: u64 = 600;
/// Deliveries before a job is dead-lettered.
const MAX_DELIVERIES: u32 = 4;
/// Deliveries a consumer sits on at once (of its prefetch of 8).
const HELD: usize = 2;
/// Enqueues per second per producer: below what the consumers can take, so
/// the backlog stays small and the drain at the end is quick.
const PRODUCER_RATE: u64 = 400;
/// Every job whose number is a multiple of this is poison: always refused.
const POISON_EVERY: u64 = 97;
/// How much longer than its own deadline an operation may take before it
/// counts as a hang.
const HANG_MARGIN: Duration = Duration::from_secs(10);
/// The deadline of each client call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// splitmix64: small, seeded, and the same on every platform.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `low..high`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low).max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// What the checks found wrong, with the seed to replay it.
#[derive(Debug, Default)]
struct Violations {
    seed: u64,
    found: Mutex<Vec<String>>,
}

impl Violations {
    fn report(&self, what: String) {
        eprintln!("soak: VIOLATION (seed {}): {what}", self.seed);
        let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        if found.len() < 1000 {
            found.push(what);
        }
    }

    fn count(&self) -> usize {
        self.found.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Runs `future` and reports a hang if it takes longer than `limit`.
async fn bounded<T>(
    violations: &Violations,
    what: &str,
    limit: Duration,
    future: impl std::future::Future<Output = T>,
) -> Option<T> {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => Some(value),
        Err(_) => {
            violations.report(format!("{what} did not finish within {limit:?} (hang)"));
            None
        }
    }
}

/// The broker child process.
struct BrokerProcess {
    child: Child,
    address: SocketAddr,
}

impl BrokerProcess {
    fn start(data: &std::path::Path) -> anyhow::Result<BrokerProcess> {
        let exe = std::env::current_exe().context("cannot find the courier binary")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut child = Command::new(&exe)
                .args(["serve", "--listen", "tcp://127.0.0.1:0", "--metrics", ""])
                .args(["--grace", "1s", "--fsync", "always", "--log", "error"])
                .arg("--data")
                .arg(data)
                .env("COURIER_VISIBILITY_TIMEOUT_MS", LEASE_MS.to_string())
                .env("COURIER_MAX_DELIVERIES", MAX_DELIVERIES.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot start courier serve")?;
            let stdout = child.stdout.take().context("no stdout")?;
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            if let Some(Ok(line)) = lines.next() {
                if let Some(url) = line.strip_prefix("listening tcp://") {
                    let address = url.parse().context("a listening address")?;
                    std::thread::spawn(move || for _ in lines {});
                    return Ok(BrokerProcess { child, address });
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            if Instant::now() > deadline {
                bail!("courier serve did not start (data directory still locked?)");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident memory in bytes, from /proc.
    fn rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        signal(self.child.id(), "CONT");
        self.kill9();
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// A TCP proxy in front of the broker that can stall or cut every
/// connection through it, and follows the broker to a new port.
struct Proxy {
    address: SocketAddr,
    target: watch::Sender<SocketAddr>,
    stalled: watch::Sender<bool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> anyhow::Result<Arc<Proxy>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = Arc::new(Proxy {
            address: listener.local_addr()?,
            target: watch::channel(target).0,
            stalled: watch::channel(false).0,
            cut: watch::channel(0).0,
        });
        let weak = Arc::downgrade(&proxy);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Some(proxy) = weak.upgrade() else { return };
                let target = *proxy.target.borrow();
                let (stalled, mut cut) = (proxy.stalled.subscribe(), proxy.cut.subscribe());
                drop(proxy);
                tokio::spawn(async move {
                    let Ok(Ok(server)) =
                        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target))
                            .await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pipe(client_read, server_write, stalled.clone()) => {}
                        _ = pipe(server_read, client_write, stalled) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(proxy)
    }
}

/// Copies bytes one way, pausing (without reading) while stalled.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        while *stalled.borrow_and_update() {
            if stalled.changed().await.is_err() {
                return;
            }
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// What the workloads did, for the final checks.
#[derive(Debug, Default)]
struct Ledger {
    confirmed: BTreeSet<u64>,
    acked: BTreeSet<u64>,
    /// Acks whose answer never came: taken effect or not, nobody can say.
    ack_unknown: BTreeSet<u64>,
    /// Each job's last outcome here, with its delivery number: printed for
    /// any job found lost, so the violation explains itself.
    last_seen: HashMap<u64, (String, u32)>,
    deliveries: u64,
    enqueue_failures: u64,
    published: u64,
    publish_failures: u64,
    requests_ok: u64,
    requests_failed: u64,
}

struct Shared {
    violations: Violations,
    ledger: Mutex<Ledger>,
    stop_producing: AtomicBool,
    stop_all: AtomicBool,
    proxy: SocketAddr,
    large_sent: AtomicU64,
}

impl Shared {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn address(&self) -> Address {
        format!("tcp://{}", self.proxy)
            .parse()
            .expect("a proxy address")
    }
}

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::default();
    config.timeout = CALL_TIMEOUT;
    config
}

/// A client, retried until the broker can be reached or the soak ends.
async fn connect(shared: &Shared) -> Option<Client> {
    while !shared.stop_all.load(Ordering::Relaxed) {
        let attempt = bounded(
            &shared.violations,
            "connect",
            CALL_TIMEOUT + HANG_MARGIN,
            Client::connect(&shared.address(), client_config()),
        )
        .await;
        if let Some(Ok(client)) = attempt {
            return Some(client);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

const QUEUE: &str = "soak.jobs";

async fn producer(shared: Arc<Shared>, index: u64) {
    let Some(client) = connect(&shared).await else {
        return;
    };
    let queue = RemoteQueue::with_client(client, QUEUE);
    let mut n = 0u64;
    while !shared.stop_producing.load(Ordering::Relaxed) {
        let job = index << 40 | n;
        let key = format!("job-{job}");
        // Retried with the same key until confirmed: duplicates are the
        // host's to refuse, not ours to avoid.
        for _ in 0..20 {
            let message = Message::new(job.to_le_bytes().to_vec()).with_key(key.clone());
            let outcome = bounded(
                &shared.violations,
                "enqueue",
                CALL_TIMEOUT + HANG_MARGIN,
                queue.enqueue(message),
            )
            .await;
            match outcome {
                Some(Ok(_)) => {
                    shared.ledger().confirmed.insert(job);
                    break;
                }
                _ => {
                    shared.ledger().enqueue_failures += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        n += 1;
        // Paced: a soak checks correctness under faults, not throughput.
        tokio::time::sleep(Duration::from_micros(1_000_000 / PRODUCER_RATE)).await;
    }
}

async fn consumer(shared: Arc<Shared>, seed: u64) {
    let mut rng = Rng(seed);
    // Deliveries this consumer sits on, as a hung worker would, answered
    // only after their lease has surely ended.
    let mut held: Vec<(Instant, courier_queue::remote::RemoteDelivery)> = Vec::new();
    while !shared.stop_all.load(Ordering::Relaxed) {
        let Some(client) = connect(&shared).await else {
            return;
        };
        let queue = RemoteQueue::with_client(client, QUEUE);
        let Ok(mut consumer) = queue.consumer(8).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            if shared.stop_all.load(Ordering::Relaxed) {
                return;
            }
            answer_late(&shared, &mut held).await;
            let next = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
            let delivery = match next {
                Err(_) => continue,
                Ok(Ok(delivery)) => delivery,
                Ok(_) => break,
            };
            shared.ledger().deliveries += 1;
            let number = delivery.delivery;
            let Some(job) = job_of(&delivery.payload) else {
                shared
                    .violations
                    .report(format!("a job with a bad payload: {:?}", delivery.payload));
                continue;
            };
            if job % POISON_EVERY == 0 {
                let _ = bounded(
                    &shared.violations,
                    "nack",
                    CALL_TIMEOUT + HANG_MARGIN,
                    delivery.nack(Duration::ZERO),
                )
                .await;
                continue;
            }
            // Hold a few (never more than HELD at once, so the consumer
            // keeps most of its prefetch), nack some, ack the rest.
            let choice = match rng.range(0, 100) {
                97.. if held.len() < HELD => 2,
                90..=96 => 1,
                _ => 0,
            };
            match choice {
                0 => {
                    let acked = bounded(
                        &shared.violations,
                        "ack",
                        CALL_TIMEOUT + HANG_MARGIN,
                        delivery.ack(),
                    )
                    .await;
                    let mut ledger = shared.ledger();
                    let seen = format!("ack: {acked:?}");
                    ledger.last_seen.insert(job, (seen, number));
                    match acked {
                        Some(Ok(())) => {
                            ledger.acked.insert(job);
                        }
                        // The answer was lost (the connection or the broker
                        // died): the ack may have taken effect.
                        Some(Err(courier_queue::remote::RemoteQueueError::Rpc(_))) => {
                            ledger.ack_unknown.insert(job);
                        }
                        _ => {}
                    }
                }
                1 => {
                    let nacked = bounded(
                        &shared.violations,
                        "nack",
                        CALL_TIMEOUT + HANG_MARGIN,
                        delivery.nack(Duration::from_millis(20)),
                    )
                    .await;
                    let seen = format!("nack: {nacked:?}");
                    shared.ledger().last_seen.insert(job, (seen, number));
                }
                // Hold it: the lease expires and it goes to someone else.
                _ => {
                    let seen = "held".to_string();
                    shared.ledger().last_seen.insert(job, (seen, number));
                    held.push((Instant::now(), delivery));
                }
            }
        }
        held.clear();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn job_of(payload: &[u8]) -> Option<u64> {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
}

/// Acknowledges held deliveries once their lease has ended: the host must
/// refuse each (the message may be with another consumer by now), and the
/// answer gives the consumer's credit back.
async fn answer_late(
    shared: &Shared,
    held: &mut Vec<(Instant, courier_queue::remote::RemoteDelivery)>,
) {
    let late = Duration::from_millis(LEASE_MS * 2);
    while held.first().is_some_and(|(at, _)| at.elapsed() > late) {
        let (_, delivery) = held.remove(0);
        let job = job_of(&delivery.payload);
        let outcome = bounded(
            &shared.violations,
            "late ack",
            CALL_TIMEOUT + HANG_MARGIN,
            delivery.ack(),
        )
        .await;
        if let (Some(Ok(())), Some(job)) = (outcome, job) {
            shared.violations.report(format!(
                "job {job} acknowledged {:?} after its {LEASE_MS} ms lease began (it should have expired)",
                late
            ));
        }
    }
}

/// Events published: `[publisher index][number]` then padding.
async fn publisher(shared: Arc<Shared>, index: u64, seed: u64) {
    let mut rng = Rng(seed);
    let Some(client) = connect(&shared).await else {
        return;
    };
    let bus = RemotePubSub::with_client(client).publisher();
    let mut n = 0u64;
    // One-way publishes since the last flush; a flush that succeeds
    // confirms them all (the host has applied them), one that fails leaves
    // them attempted only.
    let mut unflushed = 0u64;
    loop {
        let stopping = shared.stop_producing.load(Ordering::Relaxed);
        if stopping || (unflushed > 0 && n.is_multiple_of(64)) {
            let flushed = bounded(
                &shared.violations,
                "flush",
                CALL_TIMEOUT + HANG_MARGIN,
                bus.flush(),
            )
            .await;
            {
                let mut ledger = shared.ledger();
                match flushed {
                    Some(Ok(())) => ledger.published += unflushed,
                    _ => ledger.publish_failures += unflushed,
                }
            }
            unflushed = 0;
            if stopping {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let large = rng.chance(3);
        let size = if large { 256 * 1024 } else { 64 };
        let mut payload = vec![0u8; size];
        payload[..8].copy_from_slice(&index.to_le_bytes());
        payload[8..16].copy_from_slice(&n.to_le_bytes());
        let outcome = bounded(
            &shared.violations,
            "publish",
            CALL_TIMEOUT + HANG_MARGIN,
            bus.publish(&format!("soak.events.{}", n % 4), payload),
        )
        .await;
        match outcome {
            Some(Ok(())) => {
                unflushed += 1;
                if large {
                    shared.large_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => shared.ledger().publish_failures += 1,
        }
        n += 1;
    }
}

/// One subscriber's view of one publisher since the last restore.
#[derive(Debug, Default)]
struct Track {
    last_seq: Option<u64>,
    last_number: Option<u64>,
    /// Gaps reported since the last message: `from..to` ranges.
    gaps: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct SubscriberReport {
    received: u64,
    gap_messages: u64,
    restores: u64,
    endings: u64,
    last_event: Instant,
    /// The host's drop count for the current subscription.
    host_dropped: u64,
}

impl Default for SubscriberReport {
    fn default() -> Self {
        SubscriberReport {
            received: 0,
            gap_messages: 0,
            restores: 0,
            endings: 0,
            last_event: Instant::now(),
            host_dropped: 0,
        }
    }
}

/// Receives and checks: per publisher, numbers strictly increase, and every
/// jump of the subscription's sequence is covered by the gaps reported just
/// before it.
async fn subscriber(
    shared: Arc<Shared>,
    name: &'static str,
    policy: SlowConsumer,
    slow: bool,
    report: Arc<Mutex<SubscriberReport>>,
) {
    let mut tracks: HashMap<u64, Track> = HashMap::new();
    while !shared.stop_all.load(Ordering::Relaxed) {
        let Some(client) = connect(&shared).await else {
            return;
        };
        let bus = RemotePubSub::with_client(client);
        let options = SubscribeOptions::default().buffer(256).policy(policy);
        let Ok(Ok(mut subscription)) =
            tokio::time::timeout(CALL_TIMEOUT, bus.subscribe("soak.events.>", options)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // A new subscription: sequence numbers start again.
        tracks.clear();
        consume(&shared, name, slow, &mut subscription, &mut tracks, &report).await;
        lock(&report).endings += 1;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

async fn consume(
    shared: &Shared,
    name: &str,
    slow: bool,
    subscription: &mut RemoteSubscription,
    tracks: &mut HashMap<u64, Track>,
    report: &Mutex<SubscriberReport>,
) {
    while let Some(event) = next_event(shared, subscription).await {
        {
            let mut report = lock(report);
            report.last_event = Instant::now();
            report.host_dropped = subscription.dropped();
        }
        match event {
            Event::Message(message) => {
                lock(report).received += 1;
                let (Some(index), Some(number)) = (
                    message.payload.get(..8).and_then(|b| b.try_into().ok()),
                    message.payload.get(8..16).and_then(|b| b.try_into().ok()),
                ) else {
                    shared
                        .violations
                        .report(format!("{name}: a message too short to be the soak's"));
                    continue;
                };
                let _publisher_index = u64::from_le_bytes(index);
                let number = u64::from_le_bytes(number);
                let track = tracks.entry(message.publisher).or_default();
                if let Some(last) = track.last_number {
                    if number <= last {
                        shared.violations.report(format!(
                            "{name}: publisher {} sent {number} after {last} (order or duplicate)",
                            message.publisher
                        ));
                    }
                }
                if let Some(last_seq) = track.last_seq {
                    let mut expected = last_seq + 1;
                    for &(from, to) in &track.gaps {
                        if from == expected {
                            expected = to;
                        }
                    }
                    if message.seq != expected {
                        shared.violations.report(format!(
                            "{name}: publisher {} went from sequence {last_seq} to {} with gaps {:?} reported: {} messages unaccounted for",
                            message.publisher,
                            message.seq,
                            track.gaps,
                            message.seq.saturating_sub(expected)
                        ));
                    }
                }
                track.last_seq = Some(message.seq);
                track.last_number = Some(number);
                track.gaps.clear();
                if slow {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Event::Gap {
                publisher,
                from,
                to,
            } => {
                lock(report).gap_messages += to.saturating_sub(from);
                let track = tracks.entry(publisher).or_default();
                if track.gaps.len() < 1024 {
                    track.gaps.push((from, to));
                }
            }
            Event::Dropped { count } => lock(report).gap_messages += count,
            Event::Restored => {
                lock(report).restores += 1;
                // Missed while away is not knowable: start afresh.
                tracks.clear();
            }
            _ => {}
        }
    }
}

/// The next event, waiting in short steps so that the soak's end is
/// noticed; `None` once the soak ends or the subscription does.
async fn next_event(shared: &Shared, subscription: &mut RemoteSubscription) -> Option<Event> {
    while !shared.stop_all.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(500), subscription.recv()).await {
            Err(_) => continue,
            Ok(Some(Ok(event))) => return Some(event),
            Ok(_) => return None,
        }
    }
    None
}

async fn requester(shared: Arc<Shared>) {
    let Some(client) = connect(&shared).await else {
        return;
    };
    let bus = RemotePubSub::with_client(client);
    let mut n = 0u64;
    while !shared.stop_producing.load(Ordering::Relaxed) {
        let body = format!("ping {n}");
        let outcome = bounded(
            &shared.violations,
            "request",
            CALL_TIMEOUT + HANG_MARGIN,
            bus.request("soak.svc", body.clone(), Duration::from_secs(1)),
        )
        .await;
        match outcome {
            Some(Ok(reply)) => {
                if reply.payload != body.to_uppercase().as_bytes() {
                    shared.violations.report(format!(
                        "request {body:?} answered with {:?}",
                        String::from_utf8_lossy(&reply.payload)
                    ));
                }
                shared.ledger().requests_ok += 1;
            }
            _ => {
                shared.ledger().requests_failed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        n += 1;
    }
}

async fn responder(shared: Arc<Shared>) {
    while !shared.stop_all.load(Ordering::Relaxed) {
        let Some(client) = connect(&shared).await else {
            return;
        };
        let bus = RemotePubSub::with_client(client);
        let replies = bus.publisher();
        let options = SubscribeOptions::default().group("svc");
        let Ok(Ok(mut subscription)) =
            tokio::time::timeout(CALL_TIMEOUT, bus.subscribe("soak.svc", options)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while let Some(event) = next_event(&shared, &mut subscription).await {
            if let Event::Message(request) = event {
                let answer = String::from_utf8_lossy(&request.payload).to_uppercase();
                let _ = bounded(
                    &shared.violations,
                    "reply",
                    CALL_TIMEOUT + HANG_MARGIN,
                    replies.reply(&request, answer.into_bytes()),
                )
                .await;
            }
        }
    }
}

/// A `courier sub` child process: a real client that gets frozen.
async fn frozen_client(proxy: SocketAddr) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["--url", &format!("tcp://{proxy}"), "sub", "soak.>"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
    if !matches!(first, Ok(Ok(Some(ref line))) if line.starts_with("subscribed")) {
        bail!("courier sub did not subscribe: {first:?}");
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

#[derive(Debug, Default)]
struct Faults(BTreeMap<&'static str, u64>);

impl Faults {
    fn count(&mut self, name: &'static str) {
        *self.0.entry(name).or_default() += 1;
    }
}

pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!(
        "soak: seed {seed} (replay with --seed {seed}), {} min",
        args.minutes
    );
    let temporary = args.data.is_none();
    let data = args.data.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("courier-soak-{}-{seed}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let outcome = soak(seed, args.minutes, &data, args.max_rss_mib, !args.no_faults).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&data);
    }
    outcome
}

async fn soak(
    seed: u64,
    minutes: f64,
    data: &std::path::Path,
    max_rss_mib: u64,
    faults_on: bool,
) -> anyhow::Result<()> {
    let mut rng = Rng(seed);
    let mut broker = BrokerProcess::start(data)?;
    let proxy = Proxy::start(broker.address).await?;
    let shared = Arc::new(Shared {
        violations: Violations {
            seed,
            ..Violations::default()
        },
        ledger: Mutex::default(),
        stop_producing: AtomicBool::new(false),
        stop_all: AtomicBool::new(false),
        proxy: proxy.address,
        large_sent: AtomicU64::new(0),
    });

    let mut tasks = Vec::new();
    let producers: Vec<_> = (0..2)
        .map(|i| tokio::spawn(producer(shared.clone(), i)))
        .collect();
    for i in 0..3 {
        tasks.push(tokio::spawn(consumer(shared.clone(), rng.next() ^ i)));
    }
    tasks.push(tokio::spawn(responder(shared.clone())));
    tasks.push(tokio::spawn(requester(shared.clone())));
    let policies = [
        ("drop-oldest (slow)", SlowConsumer::DropOldest, true),
        ("drop-newest (slow)", SlowConsumer::DropNewest, true),
        ("disconnect", SlowConsumer::Disconnect, false),
        ("backpressure", SlowConsumer::Backpressure, false),
    ];
    let mut reports = Vec::new();
    for (name, policy, slow) in policies {
        let report = Arc::new(Mutex::new(SubscriberReport::default()));
        reports.push((name, report.clone()));
        tasks.push(tokio::spawn(subscriber(
            shared.clone(),
            name,
            policy,
            slow,
            report,
        )));
    }
    // Subscribers first, so the publisher's first events have somewhere to go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..2 {
        tasks.push(tokio::spawn(publisher(shared.clone(), i, rng.next())));
    }
    let mut frozen = frozen_client(proxy.address).await.ok();

    let started = Instant::now();
    let length = Duration::from_secs_f64((minutes * 60.0).max(1.0));
    let mut faults = Faults::default();
    let mut max_rss = 0u64;
    let mut last_line = Instant::now();
    while started.elapsed() < length {
        let pause = Duration::from_millis(rng.range(1500, 4000));
        // Watch memory while waiting.
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if let Some(rss) = broker.rss() {
                max_rss = max_rss.max(rss);
                if rss > max_rss_mib << 20 {
                    shared.violations.report(format!(
                        "broker resident memory {} MiB over the {max_rss_mib} MiB cap",
                        rss >> 20
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if last_line.elapsed() > Duration::from_secs(15) {
            last_line = Instant::now();
            let ledger = shared.ledger();
            println!(
                "soak: {:>4.0}s  confirmed {}  acked {}  published {}  requests {}  faults {:?}  rss {} MiB",
                started.elapsed().as_secs_f64(),
                ledger.confirmed.len(),
                ledger.acked.len(),
                ledger.published,
                ledger.requests_ok,
                faults.0,
                max_rss >> 20
            );
        }
        let fault = rng.range(0, 6);
        if !faults_on {
            continue;
        }
        match fault {
            0 => {
                faults.count("proxy stall");
                proxy.stalled.send_replace(true);
                tokio::time::sleep(Duration::from_millis(rng.range(200, 2500))).await;
                proxy.stalled.send_replace(false);
            }
            1 => {
                faults.count("proxy cut");
                proxy.cut.send_modify(|n| *n += 1);
            }
            2 => {
                faults.count("broker SIGSTOP");
                signal(broker.pid(), "STOP");
                tokio::time::sleep(Duration::from_millis(rng.range(200, 2000))).await;
                signal(broker.pid(), "CONT");
            }
            3 => {
                faults.count("broker kill -9");
                broker.kill9();
                tokio::time::sleep(Duration::from_millis(rng.range(0, 500))).await;
                broker = BrokerProcess::start(data)?;
                proxy.target.send_replace(broker.address);
                proxy.cut.send_modify(|n| *n += 1);
            }
            4 => {
                if let Some(pid) = frozen.as_ref().and_then(|c| c.id()) {
                    faults.count("client SIGSTOP");
                    signal(pid, "STOP");
                    tokio::time::sleep(Duration::from_millis(rng.range(500, 3000))).await;
                    signal(pid, "CONT");
                }
            }
            _ => {
                if let Some(mut old) = frozen.take() {
                    faults.count("client restart");
                    let _ = old.kill().await;
                }
                frozen = frozen_client(proxy.address).await.ok();
            }
        }
    }

    // Quiesce: no more faults, producers stop, consumers drain the queue.
    println!("soak: faults over, draining");
    shared.stop_producing.store(true, Ordering::Relaxed);
    // Every enqueue ends (confirmed or given up) before the queue is judged
    // empty: a retry confirmed after that would be counted lost.
    for producer in producers {
        if tokio::time::timeout(Duration::from_secs(120), producer)
            .await
            .is_err()
        {
            shared
                .violations
                .report("a producer did not stop within 120 s".into());
        }
    }
    let client = connect(&shared).await.context("no broker to drain")?;
    let queue = RemoteQueue::with_client(client.clone(), QUEUE);
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = tokio::time::timeout(CALL_TIMEOUT, queue.stats()).await;
        if let Ok(Ok(stats)) = stats {
            if stats.depth == 0 && stats.in_flight == 0 {
                break;
            }
        }
        if Instant::now() > drain_deadline {
            shared
                .violations
                .report(format!("the queue did not drain within 60 s: {stats:?}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Let subscribers read what is buffered for them and hear of the last
    // drops, then check that every subscription that lived through the
    // whole run accounts for every publish: received or reported missing.
    let quiet_deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < quiet_deadline
        && reports
            .iter()
            .any(|(_, r)| lock(r).last_event.elapsed() < Duration::from_millis(1500))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    {
        let (published, attempted) = {
            let ledger = shared.ledger();
            (ledger.published, ledger.published + ledger.publish_failures)
        };
        for (name, report) in &reports {
            let report = lock(report);
            if report.restores > 0 || report.endings > 0 {
                continue; // what was missed while away is not knowable
            }
            let accounted = report.received + report.gap_messages;
            if accounted < published || accounted > attempted {
                shared.violations.report(format!(
                    "{name}: {} received + {} reported missing = {accounted}, but {published} publishes were confirmed ({attempted} attempted)",
                    report.received, report.gap_messages
                ));
            }
        }
    }
    shared.stop_all.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
    }

    // Read the dead letters: each is a poison job, or a job that was
    // refused too often.
    let mut dead = BTreeSet::new();
    let dlq = RemoteQueue::with_client(client, &format!("{QUEUE}.dlq"));
    match dlq.consumer(64).await {
        Ok(mut consumer) => {
            while let Ok(Ok(delivery)) =
                tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await
            {
                let original = courier_queue::parse_dead_letter(delivery.payload.clone())
                    .map(|(_, payload)| payload);
                match original.as_deref().and_then(job_of) {
                    Some(job) => {
                        dead.insert(job);
                    }
                    None => shared
                        .violations
                        .report("an undecodable dead letter".to_string()),
                }
                let _ = delivery.ack().await;
            }
        }
        Err(err) => shared
            .violations
            .report(format!("the dead-letter queue cannot be read: {err}")),
    }

    let ledger = shared.ledger();
    let unaccounted = |job: &&u64| !ledger.acked.contains(job) && !dead.contains(job);
    // A job whose last ack lost its answer was most likely acknowledged.
    let uncertain = ledger
        .confirmed
        .iter()
        .filter(unaccounted)
        .filter(|job| ledger.ack_unknown.contains(job))
        .count();
    let lost: Vec<u64> = ledger
        .confirmed
        .iter()
        .filter(unaccounted)
        .filter(|job| !ledger.ack_unknown.contains(job))
        .copied()
        .collect();
    if !lost.is_empty() {
        let described: Vec<String> = lost
            .iter()
            .take(10)
            .map(|job| match ledger.last_seen.get(job) {
                Some((seen, number)) => format!("{job} (delivery {number}, last {seen})"),
                None => format!("{job} (never delivered here)"),
            })
            .collect();
        shared.violations.report(format!(
            "{} confirmed jobs neither acknowledged nor dead-lettered: {}",
            lost.len(),
            described.join("; ")
        ));
    }
    let poison_confirmed = ledger
        .confirmed
        .iter()
        .filter(|job| *job % POISON_EVERY == 0)
        .count();
    let poison_dead = dead.iter().filter(|job| *job % POISON_EVERY == 0).count();
    if poison_dead < poison_confirmed {
        shared.violations.report(format!(
            "{poison_confirmed} poison jobs confirmed but only {poison_dead} dead-lettered"
        ));
    }

    println!("\nsoak: seed {seed}, {:.0?}", started.elapsed());
    println!("faults injected: {:?}", faults.0);
    println!(
        "queue: {} confirmed ({} enqueue attempts failed), {} deliveries, {} acknowledged ({uncertain} more whose ack lost its answer), {} dead-lettered ({poison_dead} of them poison), {} lost",
        ledger.confirmed.len(),
        ledger.enqueue_failures,
        ledger.deliveries,
        ledger.acked.len(),
        dead.len(),
        lost.len()
    );
    println!(
        "pub/sub: {} published ({} large, {} failed)",
        ledger.published,
        shared.large_sent.load(Ordering::Relaxed),
        ledger.publish_failures
    );
    for (name, report) in &reports {
        let report = lock(report);
        println!(
            "  {name:<20} received {:>8}, reported missing {:>8} (host counted {:>8}), restores {:>3}, ended {:>3}",
            report.received, report.gap_messages, report.host_dropped, report.restores, report.endings
        );
    }
    println!(
        "request-reply: {} answered, {} failed (faults)",
        ledger.requests_ok, ledger.requests_failed
    );
    println!(
        "broker memory: max {} MiB resident (cap {max_rss_mib} MiB)",
        max_rss >> 20
    );
    drop(ledger);
    if ledger_is_empty(&shared) {
        shared
            .violations
            .report("nothing was confirmed: the workload did not run".into());
    }
    let violations = shared.violations.count();
    if violations > 0 {
        bail!("{violations} violation(s); replay with --seed {seed}");
    }
    println!("soak: no violations");
    Ok(())
}

fn ledger_is_empty(shared: &Shared) -> bool {
    let ledger = shared.ledger();
    ledger.confirmed.is_empty() || ledger.published == 0
}
