//! A replicated queue across three real `courier serve` processes.
//!
//! Killing the leader (in network namespaces, one per node, when the test
//! runs as root; on loopback otherwise): a producer enqueues with confirmation as fast as it can (16 in flight)
//! while the queue's leader is killed with SIGKILL at a random moment and
//! restarted; afterwards every confirmed message is consumed, none is lost,
//! and duplicates never exceed what was unconfirmed at the kill (producers
//! resend with the same idempotency key, so there should be none).
//!
//! Seeded (printed; `COURIER_SEED=N` replays the choices of kill moment and
//! restart delay) and repeated `COURIER_QUEUE_KILLS` times (2 by default;
//! `cargo xtask queue-kills` runs more). Every wait is bounded; nothing is
//! asserted about how long anything took.
//!
//! A rolling restart: each node in turn is stopped (SIGTERM) and started
//! again while producers and a consumer run; every confirmed message is
//! consumed, none stored twice, and the longest wait between deliveries is
//! printed.
//!
//! A queue's leader cut off from the majority, in network namespaces: an
//! enqueue sent to it alone is never confirmed, the other two elect a new
//! leader that takes enqueues and serves consumers, and after healing every
//! confirmed message is consumed and the cut-off one never appears.

mod support;
use support::cluster::*;
use support::netns::Bridged;
use support::{stderr, stdout};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_broker::BrokerServiceClient;
use courier_queue::remote::RemoteQueue;
use courier_queue::{Enqueued, Message};
use courier_rpc::ClientConfig;
use courier_test_support::Rng;
use courier_transport::Address;

/// Messages per round.
const MESSAGES: usize = 400;
/// Enqueues in flight at once.
const PRODUCERS: usize = 16;

fn addresses(cluster: &Cluster) -> Vec<Address> {
    IDS.iter()
        .map(|&id| cluster.address(id).parse().unwrap())
        .collect()
}

/// The node that leads `queue`'s group, as the nodes' stats say.
async fn leader_of(addresses: &[Address], queue: &str) -> Option<u64> {
    for address in addresses {
        let Ok(client) = courier_rpc::Client::connect(address, ClientConfig::default()).await
        else {
            continue;
        };
        let Ok(stats) = BrokerServiceClient::new(client).stats().await else {
            continue;
        };
        let cluster = stats.cluster?;
        if let Some(q) = cluster
            .queues
            .iter()
            .find(|q| q.name == queue && q.role == "leader")
        {
            return q.leader;
        }
    }
    None
}

/// What the producers saw.
#[derive(Default)]
struct Produced {
    /// Key → the id its confirmed enqueue named.
    confirmed: BTreeMap<String, u64>,
    /// Enqueues that failed and were sent again.
    resent: usize,
}

async fn produce(
    addresses: Vec<Address>,
    queue: String,
    confirmed: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
) -> Produced {
    let remote = RemoteQueue::connect_any(&addresses, &queue, ClientConfig::default())
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for producer in 0..PRODUCERS {
        let remote = remote.clone();
        let confirmed = confirmed.clone();
        let in_flight = in_flight.clone();
        tasks.spawn(async move {
            let mut produced = Produced::default();
            for n in (producer..MESSAGES).step_by(PRODUCERS) {
                let key = format!("m{n}");
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    let message = Message::new(key.clone()).with_key(key.clone());
                    let outcome = remote.enqueue(message).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    match outcome {
                        Ok(Enqueued::Stored(id) | Enqueued::Duplicate(id)) => {
                            produced.confirmed.insert(key.clone(), id);
                            confirmed.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Err(e) => {
                            assert!(Instant::now() < deadline, "{key}: still failing: {e}");
                            produced.resent += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            produced
        });
    }
    let mut all = Produced::default();
    while let Some(done) = tasks.join_next().await {
        let done = done.unwrap();
        all.confirmed.extend(done.confirmed);
        all.resent += done.resent;
    }
    all
}

/// Consumes until every key of `expected` was seen and the queue is empty;
/// key → the ids it was delivered under.
async fn drain(
    addresses: &[Address],
    queue: &str,
    expected: &BTreeSet<String>,
) -> BTreeMap<String, BTreeSet<u64>> {
    let remote = RemoteQueue::connect_any(addresses, queue, ClientConfig::default())
        .await
        .unwrap();
    let mut consumer = remote.consumer(64).await.unwrap();
    let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let complete = expected.iter().all(|k| seen.contains_key(k));
        if complete && remote.stats().await.is_ok_and(|s| s.depth == 0) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} keys consumed; missing e.g. {:?}",
            seen.len(),
            expected.len(),
            expected.iter().find(|k| !seen.contains_key(*k))
        );
        match tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            Ok(Ok(delivery)) => {
                let key = String::from_utf8(delivery.payload().to_vec()).unwrap();
                seen.entry(key).or_default().insert(delivery.id());
                // Refused only if a failover took the delivery back; it
                // then comes again.
                let _ = delivery.ack().await;
            }
            Ok(Err(_)) => {
                consumer = remote.consumer(64).await.unwrap();
            }
            Err(_) => {}
        }
    }
}

#[test]
fn killing_a_replicated_queues_leader_loses_no_confirmed_message() {
    let seed = std::env::var("COURIER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let rounds: usize = std::env::var("COURIER_QUEUE_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    println!("seed {seed} (COURIER_SEED={seed} replays it), {rounds} rounds");
    let mut rng = Rng(seed);
    // In network namespaces where the machine allows it (as root), on
    // loopback where it does not.
    let extra = "replicated_queues = [\"jobs.*\"]\n";
    let spaces = Bridged::create();
    let (mut cluster, runtime) = match &spaces {
        Ok(spaces) => {
            println!("in network namespaces");
            let runtime = spaces.client_runtime().unwrap();
            (spaces.cluster("cluster-queue", extra), runtime)
        }
        Err(reason) => {
            println!("on loopback: cannot create network namespaces ({reason})");
            let runtime = support::netns::runtime_in(None).unwrap();
            (Cluster::on_loopback("cluster-queue", extra), runtime)
        }
    };
    cluster.wait_ready(&cluster.url());
    let addresses = addresses(&cluster);
    // On the runtime's threads, which are in the clients' namespace.
    let run = |future| runtime.block_on(runtime.spawn(future)).unwrap();
    for round in 0..rounds {
        let queue = format!("jobs.{round}");
        let kill_at = 20 + rng.index(MESSAGES / 2);
        let restart_after = Duration::from_millis(rng.below(1_000));
        let confirmed = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let producer = runtime.spawn(produce(
            addresses.clone(),
            queue.clone(),
            confirmed.clone(),
            in_flight.clone(),
        ));
        // Kill the leader once `kill_at` enqueues are confirmed.
        let deadline = Instant::now() + Duration::from_secs(60);
        while confirmed.load(Ordering::SeqCst) < kill_at {
            assert!(
                Instant::now() < deadline && !producer.is_finished(),
                "round {round}: only {} confirmed",
                confirmed.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let leader = run_leader(&runtime, &addresses, &queue)
            .expect("a leader while enqueues are confirmed");
        let unconfirmed_at_kill = in_flight.load(Ordering::SeqCst);
        cluster.kill(leader);
        let confirmed_at_kill = confirmed.load(Ordering::SeqCst);
        std::thread::sleep(restart_after);
        cluster.start_node(leader);
        let produced = runtime.block_on(producer).unwrap();
        assert_eq!(produced.confirmed.len(), MESSAGES);

        let expected: BTreeSet<String> = produced.confirmed.keys().cloned().collect();
        let seen = {
            let (addresses, queue, expected) = (addresses.clone(), queue.clone(), expected.clone());
            run(async move { drain(&addresses, &queue, &expected).await })
        };
        let lost: Vec<&String> = expected.iter().filter(|k| !seen.contains_key(*k)).collect();
        let duplicates: usize = seen.values().map(|ids| ids.len() - 1).sum();
        println!(
            "round {round}: killed node {leader} after {confirmed_at_kill} confirmed ({unconfirmed_at_kill} in flight), restarted after {restart_after:?}; {} resent, {} consumed, {duplicates} duplicates, {} lost",
            produced.resent,
            seen.len(),
            lost.len()
        );
        assert!(lost.is_empty(), "round {round}: lost {lost:?}");
        assert!(
            duplicates <= unconfirmed_at_kill,
            "round {round}: {duplicates} duplicates, {unconfirmed_at_kill} unconfirmed at the kill"
        );
        // And since every resend carried its message's idempotency key,
        // the queue stored none of them twice.
        assert_eq!(duplicates, 0, "round {round}: a resend was stored twice");
        // Each confirmed key names the one message consumed for it.
        for (key, id) in &produced.confirmed {
            assert!(
                seen[key].contains(id),
                "{key}: confirmed as {id}, consumed as {:?}",
                seen[key]
            );
        }
    }
}

/// `leader_of`, on `runtime`'s threads.
fn run_leader(
    runtime: &tokio::runtime::Runtime,
    addresses: &[Address],
    queue: &str,
) -> Option<u64> {
    let (addresses, queue) = (addresses.to_vec(), queue.to_owned());
    runtime
        .block_on(runtime.spawn(async move { leader_of(&addresses, &queue).await }))
        .unwrap()
}

/// SIGTERM: the broker shuts down gracefully.
fn terminate(cluster: &mut Cluster, id: u64) {
    let mut node = cluster.nodes[Cluster::index(id)]
        .take()
        .expect("the node runs");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "node {id} did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the leader of `queue` sees every replica within `lag` entries.
async fn caught_up(addresses: &[Address], queue: &str, lag: u64) -> bool {
    let Some(leader) = leader_of(addresses, queue).await else {
        return false;
    };
    let address = &addresses[Cluster::index(leader)];
    let Ok(client) = courier_rpc::Client::connect(address, ClientConfig::default()).await else {
        return false;
    };
    let Ok(stats) = BrokerServiceClient::new(client).stats().await else {
        return false;
    };
    stats
        .cluster
        .and_then(|c| c.queues.into_iter().find(|q| q.name == queue))
        .is_some_and(|q| {
            q.role == "leader" && q.replicas.iter().all(|r| r.lag.is_some_and(|l| l <= lag))
        })
}

#[test]
fn a_rolling_restart_under_load_loses_nothing() {
    let mut cluster =
        Cluster::on_loopback("cluster-queue-roll", "replicated_queues = [\"jobs\"]\n");
    cluster.wait_ready(&cluster.url());
    let addresses = addresses(&cluster);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let confirmed = Arc::new(AtomicUsize::new(0));
    // Producers: 8 in flight, each resending with its key until confirmed.
    let producer = {
        let (addresses, stop, confirmed) = (addresses.clone(), stop.clone(), confirmed.clone());
        runtime.spawn(async move {
            let remote = RemoteQueue::connect_any(&addresses, "jobs", ClientConfig::default())
                .await
                .unwrap();
            let mut tasks = tokio::task::JoinSet::new();
            for producer in 0..8 {
                let (remote, stop, confirmed) = (remote.clone(), stop.clone(), confirmed.clone());
                tasks.spawn(async move {
                    let mut keys = BTreeSet::new();
                    for n in (producer..).step_by(8) {
                        if stop.load(Ordering::SeqCst) {
                            return keys;
                        }
                        let key = format!("r{n}");
                        let deadline = Instant::now() + Duration::from_secs(60);
                        loop {
                            let message = Message::new(key.clone()).with_key(key.clone());
                            match remote.enqueue(message).await {
                                Ok(_) => break,
                                Err(e) => {
                                    assert!(Instant::now() < deadline, "{key}: {e}");
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                        keys.insert(key);
                        confirmed.fetch_add(1, Ordering::SeqCst);
                    }
                    keys
                });
            }
            let mut all = BTreeSet::new();
            while let Some(keys) = tasks.join_next().await {
                all.extend(keys.unwrap());
            }
            all
        })
    };
    // A consumer acking everything; the longest wait between deliveries
    // is printed (not asserted: a wall-clock figure).
    let seen: Arc<std::sync::Mutex<BTreeMap<String, BTreeSet<u64>>>> = Arc::default();
    let longest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let consumer = {
        let (addresses, seen, longest) = (addresses.clone(), seen.clone(), longest.clone());
        runtime.spawn(async move {
            let remote = RemoteQueue::connect_any(&addresses, "jobs", ClientConfig::default())
                .await
                .unwrap();
            let mut consumer = remote.consumer(32).await.unwrap();
            let mut last = Instant::now();
            loop {
                match tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
                    Ok(Ok(delivery)) => {
                        let gap = last.elapsed();
                        last = Instant::now();
                        {
                            let mut longest = longest.lock().unwrap();
                            *longest = (*longest).max(gap);
                        }
                        let key = String::from_utf8(delivery.payload().to_vec()).unwrap();
                        seen.lock()
                            .unwrap()
                            .entry(key)
                            .or_default()
                            .insert(delivery.id());
                        let _ = delivery.ack().await;
                    }
                    Ok(Err(_)) => consumer = remote.consumer(32).await.unwrap(),
                    Err(_) => {}
                }
            }
        })
    };
    let wait_for = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while confirmed.load(Ordering::SeqCst) < count {
            assert!(
                Instant::now() < deadline,
                "only {} confirmed",
                confirmed.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(100);
    for id in IDS {
        terminate(&mut cluster, id);
        wait_for(confirmed.load(Ordering::SeqCst) + 50);
        cluster.start_node(id);
        retry(
            "every replica caught up",
            600,
            Duration::from_secs(60),
            || {
                if runtime.block_on(caught_up(&addresses, "jobs", 200)) {
                    Ok(())
                } else {
                    Err(format!("node {id}'s log:\n{}", cluster.log(id)))
                }
            },
        );
        wait_for(confirmed.load(Ordering::SeqCst) + 50);
    }
    stop.store(true, Ordering::SeqCst);
    let produced = runtime.block_on(producer).unwrap();
    // Everything confirmed is consumed, once.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let missing = {
            let seen = seen.lock().unwrap();
            produced.iter().filter(|k| !seen.contains_key(*k)).count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} confirmed never consumed",
            produced.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    consumer.abort();
    let seen = seen.lock().unwrap();
    let duplicates: usize = seen.values().map(|ids| ids.len() - 1).sum();
    println!(
        "rolling restart: {} confirmed, {} consumed, {duplicates} stored twice, longest wait between deliveries {:?}",
        produced.len(),
        seen.len(),
        *longest.lock().unwrap()
    );
    assert_eq!(duplicates, 0, "a resend was stored twice");
    // Producers resend until confirmed, so nothing stored went unconfirmed.
    let unconfirmed: Vec<&String> = seen.keys().filter(|k| !produced.contains(*k)).collect();
    assert!(
        unconfirmed.is_empty(),
        "consumed but never confirmed: {unconfirmed:?}"
    );
}

/// `queue push QUEUE DATA --key DATA` through `url`, sent again until the
/// broker confirms it (the key makes a resend store nothing twice).
fn push_until_done(cluster: &Cluster, url: &str, queue: &str, data: &str) {
    retry(
        &format!("queue push {queue} {data}"),
        300,
        Duration::from_secs(60),
        || {
            let output = cluster.courier(url, &["queue", "push", queue, data, "--key", data]);
            let said = stderr(&output);
            if output.status.success()
                && (said.contains("stored as") || said.contains("duplicate of"))
            {
                Ok(())
            } else {
                Err(show(&output))
            }
        },
    );
}

/// The leader of `queue`'s group as `queue stats` through `url` reports it.
fn queue_leader(cluster: &Cluster, url: &str, queue: &str) -> u64 {
    retry("the queue's leader", 300, Duration::from_secs(60), || {
        let output = cluster.courier(url, &["--json", "queue", "stats", queue]);
        if !output.status.success() {
            return Err(show(&output));
        }
        let stats: serde_json::Value =
            serde_json::from_str(stdout(&output).trim()).map_err(|e| e.to_string())?;
        let replication = &stats["replication"];
        match (replication["role"].as_str(), replication["leader"].as_u64()) {
            (Some("leader"), Some(leader)) => Ok(leader),
            _ => Err(format!("not from the leader: {stats}")),
        }
    })
}

#[test]
fn in_network_namespaces_a_cut_off_queue_leader_confirms_nothing_and_healing_loses_nothing() {
    let spaces = match Bridged::create() {
        Ok(spaces) => spaces,
        Err(reason) => {
            println!("skipped: cannot create network namespaces ({reason})");
            return;
        }
    };
    let queue = "jobs.cut";
    let cluster = spaces.cluster("cluster-queue-netns", "replicated_queues = [\"jobs.*\"]\n");
    let url = cluster.url();
    cluster.wait_ready(&url);
    for n in 0..4 {
        push_until_done(&cluster, &url, queue, &format!("before-{n}"));
    }
    let old = queue_leader(&cluster, &url, queue);
    let majority = cluster.url_without(old);

    // Cut the queue's leader off, and send it an enqueue from its own
    // namespace: it cannot reach a majority, so it must never confirm it.
    spaces.link(old, false);
    let refused = spaces.start_at(
        &cluster,
        old,
        &[
            "queue",
            "push",
            queue,
            "split-brain",
            "--key",
            "split-brain",
        ],
    );

    // The other two elect a leader of the queue that takes enqueues...
    for n in 0..4 {
        push_until_done(&cluster, &majority, queue, &format!("majority-{n}"));
    }
    let new = queue_leader(&cluster, &majority, queue);
    assert_ne!(new, old, "the cut-off node still leads the queue");
    // ...and serves a consumer, oldest first, the ack committed.
    let first = ok(cluster.courier(&majority, &["queue", "pop", queue, "--wait", "10s"]));
    assert!(first.ends_with(": before-0\n"), "{first}");

    let refused = refused.finish("queue push (cut off)");
    assert!(!refused.status.success(), "split brain: {}", show(&refused));
    assert!(
        !stderr(&refused).contains("stored as"),
        "{}",
        show(&refused)
    );
    // It reached the broker and was refused for want of a majority; an
    // unreachable broker (exit 3) would prove nothing.
    assert_ne!(refused.status.code(), Some(3), "{}", show(&refused));
    println!("the cut-off leader answered: {}", stderr(&refused).trim());

    // Heal. The old leader follows the new one; through it, everything
    // confirmed is consumed once, and the enqueue it took while cut off
    // was never committed anywhere.
    spaces.link(old, true);
    retry(
        "the healed node following",
        300,
        Duration::from_secs(60),
        || {
            let output =
                cluster.courier(cluster.address(old), &["--json", "queue", "stats", queue]);
            let stats: serde_json::Value =
                serde_json::from_str(stdout(&output).trim()).map_err(|_| show(&output))?;
            let leader = stats["replication"]["leader"].as_u64();
            if leader.is_some_and(|l| l != old) && stats["depth"].as_u64() == Some(7) {
                Ok(())
            } else {
                Err(format!("{stats}"))
            }
        },
    );
    let rest = cluster.courier(
        cluster.address(old),
        &["queue", "pop", queue, "--count", "8", "--wait", "3s"],
    );
    // Seven messages, then none within 3 s: exit 4.
    assert_eq!(rest.status.code(), Some(4), "{}", show(&rest));
    // In any order: a message leased to the first `pop` beyond the one it
    // took went back to the queue's tail when it left.
    let mut got: Vec<String> = stdout(&rest)
        .lines()
        .map(|line| line.split_once(": ").unwrap().1.to_owned())
        .collect();
    got.sort();
    let want: Vec<String> = (1..4)
        .map(|n| format!("before-{n}"))
        .chain((0..4).map(|n| format!("majority-{n}")))
        .collect();
    assert_eq!(got, want, "{}", show(&rest));
    drop(cluster);
    drop(spaces);
}
