//! A replicated queue (one Raft group on 3 nodes, the real `QueueGroup`
//! on real storage) on a simulated network that partitions, loses,
//! duplicates and delays messages, with its leader killed and restarted
//! or losing power, while producers enqueue with idempotency keys
//! (retrying whatever was not confirmed) and competing consumers ack,
//! or nack the poison messages until they are dead-lettered.
//!
//! Checked by the history, not by eye:
//! - no delivery (message, delivery number) is ever given twice;
//! - every key is stored once: retries (after an unconfirmed enqueue, and
//!   on purpose after a confirmed one, as if its answer was lost) are
//!   answered with the first id;
//! - nothing is delivered that no enqueue confirmed;
//! - every confirmed message ends acknowledged by a consumer or in the
//!   dead letters, and the queue ends empty;
//! - every dead letter was delivered exactly `max_deliveries` times, by
//!   its replicated history, across every failover; every poison message
//!   is among them.
//!
//! `COURIER_SEED=N` replays a run's faults; `COURIER_SIM_STEPS=N` runs
//! longer.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{seed, Faults, Router, SimNetwork};
use courier_cluster::node::Timing;
use courier_cluster::queue_group::{QueueGroup, QueueGroupConfig};
use courier_cluster::queue_state::{EnqueueOutcome, Part, QueueSettings};
use courier_cluster::types::NodeId;
use courier_cluster::wal::{NodeWal, WalOptions};
use courier_queue::Message;
use courier_test_support::{Rng, TempDir};
use openraft::ServerState;

const GROUP: u32 = 1;
const MAX_DELIVERIES: u32 = 3;
const PRODUCERS: usize = 2;
const CONSUMERS: usize = 2;

fn steps(default: usize) -> usize {
    std::env::var("COURIER_SIM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn messages_per_producer() -> usize {
    std::env::var("COURIER_SIM_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120)
}

struct QueueSim {
    router: Arc<Router>,
    ids: Vec<NodeId>,
    groups: Mutex<BTreeMap<NodeId, Arc<QueueGroup>>>,
    powered: Mutex<HashMap<NodeId, Arc<AtomicBool>>>,
    dirs: BTreeMap<NodeId, TempDir>,
    replicas: BTreeMap<NodeId, String>,
    /// Whether each node keeps the group's entries in its shared log
    /// (`courier_cluster::wal`, what a broker does) or in a log of the
    /// group's own (what groups created before it keep).
    shared_log: bool,
}

fn settings() -> QueueSettings {
    QueueSettings {
        max_deliveries: MAX_DELIVERIES,
        lease_ms: 1000,
        ..QueueSettings::default()
    }
}

impl QueueSim {
    async fn start(seed: u64, shared_log: bool) -> QueueSim {
        let ids: Vec<NodeId> = vec![1, 2, 3];
        let sim = QueueSim {
            router: Router::new(seed),
            replicas: ids
                .iter()
                .map(|id| (*id, format!("mem://node-{id}")))
                .collect(),
            dirs: ids
                .iter()
                .map(|id| (*id, TempDir::new(&format!("queue-sim-{id}"))))
                .collect(),
            ids: ids.clone(),
            groups: Mutex::new(BTreeMap::new()),
            powered: Mutex::new(HashMap::new()),
            shared_log,
        };
        for id in ids {
            sim.boot(id).await;
        }
        sim
    }

    async fn boot(&self, id: NodeId) {
        let config = QueueGroupConfig::new(
            id,
            GROUP,
            "jobs",
            self.replicas.clone(),
            self.dirs[&id].path(),
        )
        .with_settings(settings())
        .with_timing(Timing::fast())
        // Snapshots every 50 entries: restarted and lagging
        // replicas also catch up by snapshot.
        .with_snapshot_after(50);
        let config = if self.shared_log {
            let wal = NodeWal::open(
                &self.dirs[&id].path().join("node-wal"),
                WalOptions::default(),
            )
            .await
            .expect("the node log opens");
            config.with_wal(Some(wal))
        } else {
            config
        };
        let group = QueueGroup::start(config, SimNetwork::new(id, self.router.clone()))
            .await
            .expect("the group starts");
        self.router.register(id, group.raft().clone());
        self.powered
            .lock()
            .unwrap()
            .insert(id, Arc::new(AtomicBool::new(true)));
        self.groups.lock().unwrap().insert(id, Arc::new(group));
    }

    async fn kill(&self, id: NodeId) {
        self.router.unregister(id);
        let group = self.groups.lock().unwrap().remove(&id);
        if let Some(group) = group {
            group.shutdown().await;
        }
    }

    /// Node `id` loses power: only what its fsyncs covered survives.
    async fn power_loss(&self, id: NodeId) {
        if let Some(flag) = self.powered.lock().unwrap().get(&id) {
            flag.store(false, Ordering::SeqCst);
        }
        let image = self
            .groups
            .lock()
            .unwrap()
            .get(&id)
            .map(|g| g.durable_probe().image());
        self.kill(id).await;
        if let Some(image) = image {
            image.apply().expect("the power-loss image applies");
        }
    }

    fn live(&self) -> Vec<NodeId> {
        self.groups.lock().unwrap().keys().copied().collect()
    }

    /// The live replica that leads in the highest term, if any.
    fn leader(&self) -> Option<(NodeId, Arc<QueueGroup>)> {
        let groups = self.groups.lock().unwrap();
        groups
            .iter()
            .filter_map(|(id, g)| {
                let m = g.raft().metrics().borrow().clone();
                (m.state == ServerState::Leader).then(|| (m.current_term, *id, g.clone()))
            })
            .max_by_key(|(term, id, _)| (*term, *id))
            .map(|(_, id, g)| (id, g))
    }

    fn partition(&self, group: &[NodeId]) {
        let mut faults = self.router.faults();
        faults.blocked.clear();
        for a in &self.ids {
            for b in &self.ids {
                if group.contains(a) != group.contains(b) {
                    faults.blocked.insert((*a, *b));
                }
            }
        }
        self.router.set_faults(faults);
    }

    async fn shutdown(&self) {
        for id in self.live() {
            self.kill(id).await;
        }
    }
}

#[derive(Default)]
struct History {
    /// Key → every id an enqueue of it was confirmed with.
    confirmed: BTreeMap<String, BTreeSet<u64>>,
    /// (id, delivery) → the consumers given it.
    deliveries: BTreeMap<(u64, u32), Vec<u64>>,
    /// Ids a consumer sent an ack for (whatever its answer).
    ack_sent: BTreeSet<u64>,
    /// Poison ids, as delivered.
    poison: BTreeSet<u64>,
}

fn is_poison(key: &str) -> bool {
    key.ends_with('0')
}

async fn producer(sim: Arc<QueueSim>, p: usize, history: Arc<Mutex<History>>) {
    let keys: Vec<String> = (0..messages_per_producer())
        .map(|i| format!("p{p}-{i}"))
        .collect();
    let mut rng = Rng(p as u64 + 17);
    for batch in keys.chunks(4) {
        // Paced, so the enqueues span the faults.
        tokio::time::sleep(rng.between(Duration::from_millis(40), Duration::from_millis(160)))
            .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut resent = false;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "producer {p}: no enqueue confirmed within 60 s"
            );
            let Some((node, group)) = sim.leader() else {
                tokio::time::sleep(Duration::from_millis(30)).await;
                continue;
            };
            let messages = batch
                .iter()
                .map(|key| {
                    let body = if is_poison(key) { "poison" } else { "work" };
                    Message::new(body).with_key(key.clone())
                })
                .collect();
            let powered = sim.powered.lock().unwrap().get(&node).cloned();
            let answer =
                tokio::time::timeout(Duration::from_secs(3), group.enqueue(messages)).await;
            // An answer given after the node lost power never reached us.
            if powered.is_some_and(|p| !p.load(Ordering::SeqCst)) {
                continue;
            }
            match answer {
                Ok(Ok(outcomes)) => {
                    {
                        let mut history = history.lock().unwrap();
                        for (key, outcome) in batch.iter().zip(outcomes) {
                            match outcome {
                                EnqueueOutcome::Stored(id) | EnqueueOutcome::Duplicate(id) => {
                                    history.confirmed.entry(key.clone()).or_default().insert(id);
                                }
                                other => panic!("enqueue of {key}: {other:?}"),
                            }
                        }
                    }
                    // As if the answer had been lost: send it again, maybe
                    // to the next leader. The replicated key window must
                    // answer with the same ids.
                    if !resent && rng.chance(0.25) {
                        resent = true;
                        tokio::time::sleep(rng.between(Duration::ZERO, Duration::from_millis(300)))
                            .await;
                        continue;
                    }
                    break;
                }
                // Not confirmed: send the same keys again.
                Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(30)).await,
            }
        }
    }
}

async fn consumer(sim: Arc<QueueSim>, stop: Arc<AtomicBool>, history: Arc<Mutex<History>>) {
    while !stop.load(Ordering::SeqCst) {
        let Some((_, group)) = sim.leader() else {
            tokio::time::sleep(Duration::from_millis(30)).await;
            continue;
        };
        let Ok(Ok(mut consumer)) =
            tokio::time::timeout(Duration::from_secs(2), group.consumer(4, Part::Main)).await
        else {
            tokio::time::sleep(Duration::from_millis(30)).await;
            continue;
        };
        while !stop.load(Ordering::SeqCst) {
            let delivery =
                match tokio::time::timeout(Duration::from_millis(300), consumer.recv()).await {
                    Err(_) => continue,  // nothing yet: look at `stop` again
                    Ok(Err(_)) => break, // not the leader any more: find it
                    Ok(Ok(delivery)) => delivery,
                };
            let poison = &delivery.message.payload[..] == b"poison";
            {
                let mut history = history.lock().unwrap();
                history
                    .deliveries
                    .entry((delivery.id, delivery.delivery))
                    .or_default()
                    .push(consumer.id());
                if poison {
                    history.poison.insert(delivery.id);
                } else {
                    history.ack_sent.insert(delivery.id);
                }
            }
            // Whatever the answer: a refused or lost one is redelivered.
            let within = Duration::from_secs(2);
            let _ = if poison {
                tokio::time::timeout(within, consumer.nack(&delivery, Duration::ZERO)).await
            } else {
                tokio::time::timeout(within, consumer.ack(&delivery)).await
            };
        }
    }
}

async fn nemesis(sim: Arc<QueueSim>, seed: u64, steps: usize, power: bool) {
    let mut rng = Rng(seed);
    let mut down: Option<NodeId> = None;
    for step in 0..steps {
        let leader = sim.leader().map(|(id, _)| id);
        match rng.below(6) {
            0 => {
                eprintln!("step {step}: heal");
                sim.router.set_faults(Faults::default());
            }
            1 => {
                if let Some(leader) = leader {
                    eprintln!("step {step}: partition the leader {leader} from the majority");
                    sim.partition(&[leader]);
                }
            }
            2 => {
                eprintln!("step {step}: lossy (drop 10%, duplicate 10%, delay up to 30 ms)");
                let mut faults = sim.router.faults();
                faults.drop = 0.1;
                faults.duplicate = 0.1;
                faults.max_delay = Duration::from_millis(30);
                sim.router.set_faults(faults);
            }
            _ if down.is_none() => {
                let victim = leader.unwrap_or(sim.ids[rng.index(sim.ids.len())]);
                if power {
                    eprintln!("step {step}: power loss of {victim}");
                    sim.power_loss(victim).await;
                } else {
                    eprintln!("step {step}: kill {victim}");
                    sim.kill(victim).await;
                }
                down = Some(victim);
            }
            _ => {
                if let Some(id) = down.take() {
                    eprintln!("step {step}: restart {id}");
                    sim.boot(id).await;
                }
            }
        }
        tokio::time::sleep(rng.between(Duration::from_millis(300), Duration::from_millis(1000)))
            .await;
    }
    eprintln!("end: heal, restart {down:?}");
    sim.router.set_faults(Faults::default());
    if let Some(id) = down {
        sim.boot(id).await;
    }
}

async fn run(default_seed: u64, default_steps: usize, power: bool, shared_log: bool) {
    let seed = seed(default_seed);
    let steps = steps(default_steps);
    println!("queue sim: seed {seed}, shared log {shared_log}");
    let sim = Arc::new(QueueSim::start(seed, shared_log).await);
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| tokio::spawn(producer(sim.clone(), p, history.clone())))
        .collect();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| tokio::spawn(consumer(sim.clone(), stop.clone(), history.clone())))
        .collect();
    nemesis(sim.clone(), seed, steps, power).await;
    for p in producers {
        p.await.expect("a producer failed");
    }

    // Every key is confirmed; wait until the queue is empty and every
    // poison message is a dead letter.
    let poison_keys = history
        .lock()
        .unwrap()
        .confirmed
        .keys()
        .filter(|k| is_poison(k))
        .count() as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let settled = loop {
        if let Some((_, leader)) = sim.leader() {
            let stats = leader.stats();
            let q = stats.queue;
            if q.depth == 0 && q.in_flight == 0 && stats.dead_letters.depth >= poison_keys {
                break Some(leader);
            }
            if tokio::time::Instant::now() > deadline {
                panic!("the queue did not drain (seed {seed}): {stats:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.store(true, Ordering::SeqCst);
    for c in consumers {
        c.await.expect("a consumer failed");
    }
    let leader = settled.expect("a leader");

    // The dead letters, read as a consumer of them.
    let mut dead = leader
        .consumer(64, Part::DeadLetters)
        .await
        .expect("a dead-letter consumer");
    let dead_count = leader.stats().dead_letters.depth;
    let mut dead_letters = BTreeMap::new();
    for _ in 0..dead_count {
        let d = tokio::time::timeout(Duration::from_secs(5), dead.recv())
            .await
            .expect("a dead letter within 5 s")
            .expect("a dead letter");
        dead_letters.insert(d.id, d);
    }

    let history = std::mem::take(&mut *history.lock().unwrap());
    // Each key stored once, under one id; ids are distinct across keys.
    let mut ids_by_key = BTreeMap::new();
    for (key, ids) in &history.confirmed {
        assert_eq!(
            ids.len(),
            1,
            "key {key} was stored as {ids:?} (seed {seed})"
        );
        ids_by_key.insert(*ids.iter().next().unwrap(), key.clone());
    }
    assert_eq!(
        ids_by_key.len(),
        history.confirmed.len(),
        "two keys share an id (seed {seed})"
    );
    assert_eq!(
        history.confirmed.len(),
        PRODUCERS * messages_per_producer(),
        "every key is confirmed"
    );
    // No delivery twice.
    for ((id, delivery), consumers) in &history.deliveries {
        assert_eq!(
            consumers.len(),
            1,
            "message {id} delivery {delivery} was given to {consumers:?} (seed {seed})"
        );
        assert!(
            ids_by_key.contains_key(id),
            "message {id} was never confirmed (seed {seed})"
        );
        assert!(
            *delivery >= 1 && *delivery <= MAX_DELIVERIES,
            "delivery {delivery} of {id}"
        );
    }
    // Nothing lost: every confirmed message was acked by a consumer or is
    // a dead letter; every poison message is a dead letter; every dead
    // letter used exactly its deliveries.
    for (id, key) in &ids_by_key {
        assert!(
            history.ack_sent.contains(id) || dead_letters.contains_key(id),
            "message {id} ({key}) is neither acknowledged nor a dead letter (seed {seed})"
        );
        if is_poison(key) {
            assert!(
                dead_letters.contains_key(id),
                "poison {id} ({key}) not dead-lettered (seed {seed})"
            );
        }
    }
    for (id, d) in &dead_letters {
        assert!(
            ids_by_key.contains_key(id),
            "dead letter {id} was never confirmed"
        );
        assert_eq!(
            d.history.len(),
            MAX_DELIVERIES as usize,
            "dead letter {id} has the history {:?} (seed {seed})",
            d.history
        );
    }
    let stats = leader.stats();
    eprintln!(
        "seed {seed}: {} messages, {} deliveries seen, {} dead letters, queue {:?}",
        ids_by_key.len(),
        history.deliveries.len(),
        dead_letters.len(),
        stats.queue
    );
    drop(dead);
    sim.shutdown().await;
}

/// With each group's log its own (as groups made before the shared log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_queue_under_partitions_loss_and_leader_kills_loses_nothing() {
    run(0x517e_0001, 10, false, false).await;
}

/// In each node's shared log, as a broker keeps them: the power loss
/// drops what that log's fsyncs did not cover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_queue_loses_nothing_when_a_minority_loses_power() {
    run(0x517e_0002, 8, true, true).await;
}
