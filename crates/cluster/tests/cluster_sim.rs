//! Clusters of 3 and 5 nodes under partitions (both ways and one way),
//! lost, duplicated and delayed messages, and crashes, with clients
//! writing and reading throughout. Checked: at most one leader per term;
//! every acknowledged write is in every node's history, unchanged, at the
//! revision it was acknowledged with; every node ends with the same store;
//! and the clients' history is linearizable (by the checker in
//! courier-test-support).
//!
//! `COURIER_SEED=N` replays a run's faults; `COURIER_SIM_STEPS=N` runs
//! longer (`cargo xtask` long runs set it).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{put, seed, Faults, Outcome, SimClient, SimCluster};
use courier_cluster::node::ClusterError;
use courier_cluster::types::{Condition, EventKind, KvError, KvResponse, NodeId};
use courier_test_support::lincheck::{self, Call, Op, Outcome as Seen};
use courier_test_support::Rng;

const KEYS: [&str; 3] = ["k0", "k1", "k2"];

fn steps(default: usize) -> usize {
    std::env::var("COURIER_SIM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A logical clock shared by every client: one tick per invocation and
/// per completion, so the order of ticks is the real-time order.
static TICKS: AtomicU64 = AtomicU64::new(0);

fn tick() -> u64 {
    TICKS.fetch_add(1, Ordering::SeqCst)
}

#[derive(Default)]
struct Acked {
    /// (key, value, revision) of every acknowledged put.
    puts: Vec<(String, String, u64)>,
}

async fn client(
    cluster: Arc<SimCluster>,
    id: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Op>>>,
    acked: Arc<Mutex<Acked>>,
) {
    let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(id as u64));
    let mut sim = SimClient::new(cluster.clone(), 1 + (id as u64 % cluster.ids.len() as u64));
    let mut written = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let key = KEYS[rng.index(KEYS.len())];
        // Every operation starts at a node picked at random, as clients
        // spread over a cluster do: a node that cannot serve it (a
        // follower, a deposed leader) must send it on, never answer.
        sim.at = cluster.ids[rng.index(cluster.ids.len())];
        let within = Duration::from_secs(2);
        match rng.below(3) {
            0 => {
                written += 1;
                let value = format!("c{id}-{written}");
                let invoke = tick();
                let outcome = sim.write(put(key, &value, Condition::Any), within).await;
                let complete = tick();
                let seen = match outcome {
                    Outcome::Done(Ok(KvResponse::Put { revision, .. })) => {
                        acked
                            .lock()
                            .unwrap()
                            .puts
                            .push((key.into(), value.clone(), revision));
                        Seen::Ok(None)
                    }
                    // Refused before anything was done: not an operation.
                    Outcome::Done(Err(ClusterError::Unavailable(_))) => continue,
                    Outcome::Done(other) => panic!("unexpected answer to a put: {other:?}"),
                    Outcome::Unknown => Seen::Unknown,
                };
                history.lock().unwrap().push(Op {
                    client: id,
                    key: key.into(),
                    call: Call::Put(value),
                    outcome: seen,
                    invoke,
                    complete,
                });
            }
            1 => {
                let invoke = tick();
                let got = sim.get(key, within).await;
                let complete = tick();
                if let Some(kv) = got {
                    let value = kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                    history.lock().unwrap().push(Op {
                        client: id,
                        key: key.into(),
                        call: Call::Get,
                        outcome: Seen::Ok(value),
                        invoke,
                        complete,
                    });
                }
            }
            _ => {
                // Compare-and-set from what a read saw: the modification
                // revision names that value (values are unique per key).
                let Some(current) = sim.get(key, within).await else {
                    continue;
                };
                let (expected, condition) = match &current {
                    Some(kv) => (
                        Some(String::from_utf8_lossy(&kv.value).into_owned()),
                        Condition::ModRevision(kv.mod_revision),
                    ),
                    None => (None, Condition::Absent),
                };
                written += 1;
                let value = format!("c{id}-{written}");
                let invoke = tick();
                let outcome = sim.write(put(key, &value, condition), within).await;
                let complete = tick();
                let seen = match outcome {
                    Outcome::Done(Ok(KvResponse::Put { revision, .. })) => {
                        acked
                            .lock()
                            .unwrap()
                            .puts
                            .push((key.into(), value.clone(), revision));
                        Seen::Cas(true)
                    }
                    Outcome::Done(Err(ClusterError::Kv(KvError::ConditionFailed { .. }))) => {
                        Seen::Cas(false)
                    }
                    Outcome::Done(Err(ClusterError::Unavailable(_))) => continue,
                    Outcome::Done(other) => panic!("unexpected answer to a cas: {other:?}"),
                    Outcome::Unknown => Seen::Unknown,
                };
                history.lock().unwrap().push(Op {
                    client: id,
                    key: key.into(),
                    call: Call::Cas {
                        expected,
                        new: value,
                    },
                    outcome: seen,
                    invoke,
                    complete,
                });
            }
        }
    }
}

/// Watch every node's leaders; fail if two lead in one term.
async fn one_leader_per_term(
    cluster: Arc<SimCluster>,
    stop: Arc<AtomicBool>,
) -> BTreeMap<u64, NodeId> {
    let mut seen: BTreeMap<u64, NodeId> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        for (term, leader, vote) in cluster.leader_votes() {
            if !seen.contains_key(&term) && std::env::var_os("COURIER_SIM_TRACE").is_some() {
                eprintln!("term {term}: leader {leader} ({vote})");
            }
            let first = *seen.entry(term).or_insert(leader);
            assert_eq!(
                first, leader,
                "two leaders in term {term}: {first} and {leader} (vote {vote})"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

/// Throw faults at the cluster for `steps` steps, from `seed`.
async fn nemesis(cluster: Arc<SimCluster>, seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let n = cluster.ids.len();
    let mut down: Vec<NodeId> = Vec::new();
    for step in 0..steps {
        let action = rng.below(8);
        let leader = cluster.leaders().into_iter().max().map(|(_, id)| id);
        match action {
            0 => {
                eprintln!("step {step}: heal");
                cluster.heal();
            }
            1 => {
                // A minority, possibly with the leader in it.
                let size = 1 + rng.index(n.div_ceil(2) - 1);
                let mut group: Vec<NodeId> = Vec::new();
                while group.len() < size {
                    let id = cluster.ids[rng.index(n)];
                    if !group.contains(&id) {
                        group.push(id);
                    }
                }
                eprintln!("step {step}: partition {group:?} from the rest");
                cluster.partition(&group);
            }
            2 => {
                if let Some(leader) = leader {
                    eprintln!("step {step}: isolate the leader {leader}");
                    cluster.partition(&[leader]);
                }
            }
            3 => {
                if let Some(leader) = leader {
                    let other = cluster.ids[rng.index(n)];
                    if other != leader {
                        eprintln!("step {step}: one way, {leader} cannot reach {other}");
                        cluster.one_way(leader, other);
                    }
                }
            }
            4 => {
                eprintln!("step {step}: lossy (drop 10%, duplicate 10%, delay up to 30 ms)");
                let mut faults = cluster.router.faults();
                faults.drop = 0.1;
                faults.duplicate = 0.1;
                faults.max_delay = Duration::from_millis(30);
                cluster.router.set_faults(faults);
            }
            5 if down.len() < n / 2 => {
                let victim = leader.unwrap_or(cluster.ids[rng.index(n)]);
                if !down.contains(&victim) {
                    eprintln!("step {step}: kill {victim}");
                    cluster.kill(victim).await;
                    down.push(victim);
                }
            }
            _ => {
                if let Some(id) = down.pop() {
                    eprintln!("step {step}: restart {id}");
                    cluster.boot(id).await;
                }
            }
        }
        tokio::time::sleep(rng.between(Duration::from_millis(400), Duration::from_millis(1200)))
            .await;
    }
    eprintln!("end: heal, restart {down:?}");
    cluster.router.set_faults(Faults::default());
    for id in down {
        cluster.boot(id).await;
    }
}

/// Nodes lose power, one at a time (the leader as often as not), then all
/// at once: each time only what their fsyncs covered survives.
async fn power_cuts(cluster: Arc<SimCluster>, seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let n = cluster.ids.len();
    for step in 0..steps {
        let leader = cluster.leaders().into_iter().max().map(|(_, id)| id);
        let victim = match leader {
            Some(leader) if rng.chance(0.5) => leader,
            _ => cluster.ids[rng.index(n)],
        };
        eprintln!("step {step}: power loss of node {victim}");
        cluster.power_loss(&[victim]).await;
        tokio::time::sleep(rng.between(Duration::from_millis(100), Duration::from_millis(800)))
            .await;
        cluster.boot(victim).await;
        tokio::time::sleep(rng.between(Duration::from_millis(300), Duration::from_millis(1000)))
            .await;
    }
    eprintln!("end: power loss of every node at once");
    cluster.power_loss(&cluster.ids.clone()).await;
    for id in cluster.ids.clone() {
        cluster.boot(id).await;
    }
}

#[derive(Clone, Copy)]
enum Scenario {
    /// Partitions, one-way links, loss, duplication, delay, crashes.
    Network,
    /// Power losses that discard whatever was not fsynced.
    PowerLoss,
}

async fn run(size: u64, default_seed: u64, default_steps: usize, scenario: Scenario) {
    let seed = seed(default_seed);
    let steps = steps(default_steps);
    // Snapshots every 40 entries, so restarted and lagging nodes also
    // catch up by snapshot.
    let cluster = Arc::new(SimCluster::start(size, seed, 40).await);
    cluster
        .wait_for_leader(Duration::from_secs(15))
        .await
        .expect("a first leader");
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(Vec::new()));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let watcher = tokio::spawn(one_leader_per_term(cluster.clone(), stop.clone()));
    let clients: Vec<_> = (0..3)
        .map(|id| {
            tokio::spawn(client(
                cluster.clone(),
                id,
                seed,
                stop.clone(),
                history.clone(),
                acked.clone(),
            ))
        })
        .collect();
    match scenario {
        Scenario::Network => nemesis(cluster.clone(), seed, steps).await,
        Scenario::PowerLoss => power_cuts(cluster.clone(), seed, steps).await,
    }
    // Let the clients run a little on the healed cluster, then stop them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("a client panicked");
    }
    let terms = watcher.await.expect("two leaders in one term");
    assert!(
        cluster.wait_converged(Duration::from_secs(30)).await,
        "the nodes did not converge after healing"
    );

    // Every acknowledged put is in every node's history, as acknowledged.
    let acked = std::mem::take(&mut acked.lock().unwrap().puts);
    assert!(
        !acked.is_empty(),
        "no write was acknowledged in the whole run"
    );
    for id in cluster.live() {
        let node = cluster.node(id).unwrap();
        let events = node
            .history("", 1)
            .expect("history from revision 1 is kept");
        for (key, value, revision) in &acked {
            let found = events.iter().any(|e| {
                e.kind == EventKind::Put
                    && e.kv.mod_revision == *revision
                    && e.kv.key == *key
                    && e.kv.value.as_ref() == value.as_bytes()
            });
            assert!(found, "node {id} lost or changed the acknowledged put {key}={value} at revision {revision}");
        }
    }
    // And all nodes hold the same store.
    let stores: Vec<_> = cluster
        .live()
        .iter()
        .map(|id| cluster.node(*id).unwrap().dump())
        .collect();
    assert!(
        stores.windows(2).all(|w| w[0] == w[1]),
        "the nodes' stores differ"
    );

    let history = std::mem::take(&mut *history.lock().unwrap());
    let ops = history.len();
    if let Err(violation) = lincheck::check(&history) {
        // Leave the evidence: every operation, and the store's own order.
        let path = std::env::temp_dir().join(format!("courier-sim-{seed}.txt"));
        let mut report = String::new();
        for op in &history {
            report.push_str(&format!("{op:?}\n"));
        }
        if let Some(node) = cluster.live().first().and_then(|id| cluster.node(*id)) {
            for event in node.history("", 1).unwrap_or_default() {
                report.push_str(&format!(
                    "revision {} {:?} {} = {}\n",
                    event.kv.mod_revision,
                    event.kind,
                    event.kv.key,
                    String::from_utf8_lossy(&event.kv.value)
                ));
            }
        }
        let _ = std::fs::write(&path, report);
        panic!(
            "not linearizable (seed {seed}; history in {}): {violation}",
            path.display()
        );
    }
    eprintln!(
        "seed {seed}: {size} nodes, {steps} fault steps, {ops} operations ({} acknowledged puts), {} terms, linearizable",
        acked.len(),
        terms.len()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_partitions_loss_and_crashes_stay_linearizable() {
    run(3, 0x5eed_0003, 12, Scenario::Network).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_of_one_node_then_of_all_loses_no_acknowledged_write() {
    run(3, 0x5eed_0303, 6, Scenario::PowerLoss).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_under_partitions_loss_and_crashes_stay_linearizable() {
    run(5, 0x5eed_0005, 12, Scenario::Network).await;
}
