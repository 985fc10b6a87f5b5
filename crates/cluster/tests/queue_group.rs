//! Replicated queues over real connections: three nodes, each a
//! courier-rpc server on loopback TCP hosting a replica of several queue
//! groups on one `RaftHost` and one `Peers` (one connection per pair of
//! nodes for every group). Followers send callers to the leader; killing
//! a queue's leader under a producer that retries with its idempotency
//! keys loses nothing and stores nothing twice; a consumer on the new
//! leader receives every message exactly as often as it was counted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use courier_cluster::network::{Peers, RaftHost, RaftTransportServer};
use courier_cluster::node::{ClusterError, Timing};
use courier_cluster::queue_group::{GroupStatus, QueueGroup, QueueGroupConfig, QueueGroupError};
use courier_cluster::queue_state::{EnqueueOutcome, Part};
use courier_cluster::types::{GroupId, NodeId};
use courier_queue::Message;
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};
use courier_test_support::TempDir;

/// Queue groups every node hosts a replica of.
const GROUPS: std::ops::RangeInclusive<GroupId> = 1..=3;

struct Node {
    groups: BTreeMap<GroupId, QueueGroup>,
    server: ServerHandle,
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    addresses: BTreeMap<NodeId, String>,
    _dirs: Vec<TempDir>,
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster::start_founded(|_| None, &[]).await
    }

    /// Each group founded by `founder_of(group)` (`None`: the default),
    /// with the nodes in `absent` never started.
    async fn start_founded(
        founder_of: impl Fn(GroupId) -> Option<NodeId>,
        absent: &[NodeId],
    ) -> Cluster {
        let transport = Default::default();
        let mut listeners = BTreeMap::new();
        for id in 1..=3 {
            let listener =
                courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &transport)
                    .await
                    .unwrap();
            listeners.insert(id, listener);
        }
        let addresses: BTreeMap<NodeId, String> = listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().to_string()))
            .collect();
        let mut nodes = BTreeMap::new();
        let mut dirs = Vec::new();
        for (id, listener) in listeners {
            if absent.contains(&id) {
                continue;
            }
            let dir = TempDir::new(&format!("queue-group-{id}"));
            let peers = Peers::new(ClientConfig::default());
            let host = RaftHost::default();
            let mut groups = BTreeMap::new();
            for group in GROUPS {
                let config = QueueGroupConfig::new(
                    id,
                    group,
                    format!("jobs-{group}"),
                    addresses.clone(),
                    dir.path().join(format!("group-{group}")),
                )
                .with_timing(Timing::fast());
                let config = match founder_of(group) {
                    Some(founder) => config.founded_by(founder),
                    None => config,
                };
                let queue = QueueGroup::start(config, peers.network(group))
                    .await
                    .unwrap();
                host.insert(group, queue.raft().clone());
                groups.insert(group, queue);
            }
            let server = Server::new(ServerConfig::default())
                .service(RaftTransportServer::new(host))
                .spawn(listener);
            nodes.insert(id, Node { groups, server });
            dirs.push(dir);
        }
        Cluster {
            nodes,
            addresses,
            _dirs: dirs,
        }
    }

    /// The live node leading `group`, waiting for one (at most 15 s).
    async fn leader(&self, group: GroupId) -> NodeId {
        for _ in 0..600 {
            for (id, node) in &self.nodes {
                if node.groups[&group].status().leader == Some(*id) {
                    return *id;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("group {group} has no leader within 15 s");
    }

    fn queue(&self, node: NodeId, group: GroupId) -> &QueueGroup {
        &self.nodes[&node].groups[&group]
    }

    /// The node dies: its server stops answering and its groups stop.
    async fn kill(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).expect("a live node");
        node.server.shutdown(Duration::ZERO).await;
        for group in node.groups.values() {
            group.shutdown().await;
        }
    }

    async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id).await;
        }
    }
}

fn keyed(key: &str) -> Message {
    Message::new(Bytes::from(format!("body of {key}"))).with_key(key)
}

/// Enqueues `keys` on the group's current leader, retrying the same batch
/// (same keys) after any failure until it is confirmed; its ids by key.
async fn enqueue_until_confirmed(
    cluster: &Cluster,
    group: GroupId,
    keys: &[String],
) -> BTreeMap<String, u64> {
    for _ in 0..400 {
        let leader = cluster.leader(group).await;
        let batch = keys.iter().map(|k| keyed(k)).collect();
        match cluster.queue(leader, group).enqueue(batch).await {
            Ok(outcomes) => {
                return keys
                    .iter()
                    .zip(outcomes)
                    .map(|(key, outcome)| match outcome {
                        EnqueueOutcome::Stored(id) | EnqueueOutcome::Duplicate(id) => {
                            (key.clone(), id)
                        }
                        other => panic!("{key}: {other:?}"),
                    })
                    .collect();
            }
            Err(QueueGroupError::Cluster(_)) => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => panic!("enqueue refused: {e}"),
        }
    }
    panic!("a batch of group {group} never confirmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sends_callers_to_the_leader_of_each_queue() {
    let cluster = Cluster::start().await;
    for group in GROUPS {
        let leader = cluster.leader(group).await;
        let follower = *cluster.addresses.keys().find(|id| **id != leader).unwrap();
        // Wait until the follower has heard of this leader.
        let mut answer = None;
        for _ in 0..200 {
            match cluster
                .queue(follower, group)
                .enqueue(vec![keyed("k")])
                .await
            {
                Err(QueueGroupError::Cluster(ClusterError::NotLeader {
                    leader: Some(l),
                    address,
                })) => {
                    answer = Some((l, address));
                    break;
                }
                Err(QueueGroupError::Cluster(ClusterError::NotLeader { leader: None, .. })) => {
                    tokio::time::sleep(Duration::from_millis(25)).await
                }
                other => panic!("a follower of group {group} answered {other:?}"),
            }
        }
        let (named, address) = answer.expect("the follower names the leader");
        assert_eq!(named, leader);
        assert_eq!(
            address.as_deref(),
            Some(cluster.addresses[&leader].as_str())
        );
        // Nothing reached the queue through the follower.
        assert_eq!(cluster.queue(leader, group).stats().queue.depth, 0);
    }
    cluster.shutdown().await;
}

/// Only the founder founds a new group, so it wins the first election
/// (term 1) instead of every replica standing at once and splitting the
/// vote (which left each new queue leaderless for an election timeout:
/// 10 queues took 18 s to declare in the bench). Each group's first
/// leader is the founder it was given, so placement spreads leaders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_is_led_first_by_its_founder_in_the_first_term() {
    let cluster = Cluster::start_founded(|group| Some(4 - NodeId::from(group)), &[]).await;
    for group in GROUPS {
        let leader = cluster.leader(group).await;
        assert_eq!(leader, 4 - NodeId::from(group), "group {group}");
        assert_eq!(
            cluster.queue(leader, group).status().term,
            1,
            "group {group}"
        );
    }
    cluster.shutdown().await;
}

/// `changed` wakes a caller waiting for a leader when the group's state
/// moves (here: the two replicas found the group after their founder's
/// silence and elect one), not when its patience runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_waiting_for_a_change_wakes_when_the_group_moves() {
    let cluster = Cluster::start_founded(|_| Some(1), &[1]).await;
    let group = 1;
    let replica = cluster.queue(2, group);
    let seen = |s: GroupStatus| (s.role, s.leader, s.term, s.applied_index);
    let before = seen(replica.status());
    assert_eq!(before.1, None, "no leader yet");
    // Each wake must follow a change: a `changed` that returned at once
    // would spin through these tries long before the group is founded.
    let mut moved = false;
    for _ in 0..20 {
        let woke = tokio::time::timeout(
            Duration::from_secs(60),
            replica.changed(Duration::from_secs(3600)),
        )
        .await;
        assert!(woke.is_ok(), "changed() slept through the group's founding");
        if seen(replica.status()) != before {
            moved = true;
            break;
        }
    }
    assert!(moved, "changed() woke 20 times with nothing changed");
    cluster.shutdown().await;
}

/// A founder that never comes up does not leave the group without a
/// leader: the others found it after an election timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_founder_is_down_is_founded_by_the_others() {
    let cluster = Cluster::start_founded(|_| Some(1), &[1]).await;
    for group in GROUPS {
        let leader = cluster.leader(group).await;
        assert_ne!(leader, 1);
        let keys = vec![format!("after-{group}")];
        let ids = enqueue_until_confirmed(&cluster, group, &keys).await;
        assert_eq!(ids.len(), 1);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_queues_leader_loses_and_duplicates_nothing() {
    let mut cluster = Cluster::start().await;
    let group = 2;
    let mut confirmed: BTreeMap<String, u64> = BTreeMap::new();
    let batches: Vec<Vec<String>> = (0..40)
        .map(|b| (0..8).map(|i| format!("m-{b}-{i}")).collect())
        .collect();
    let killed_at = 17;
    let mut killed = None;
    for (b, keys) in batches.iter().enumerate() {
        if b == killed_at {
            // Send the next batch to the leader and kill it at once: the
            // enqueue may or may not have been committed.
            let leader = cluster.leader(group).await;
            let batch = keys.iter().map(|k| keyed(k)).collect();
            let queue = cluster.queue(leader, group);
            let _ = tokio::time::timeout(Duration::from_millis(2), queue.enqueue(batch)).await;
            cluster.kill(leader).await;
            killed = Some(leader);
        }
        // Resending is what a producer whose answer was lost does.
        confirmed.extend(enqueue_until_confirmed(&cluster, group, keys).await);
    }
    let killed = killed.unwrap();
    let ids: BTreeSet<u64> = confirmed.values().copied().collect();
    assert_eq!(confirmed.len(), 320);
    assert_eq!(ids.len(), 320, "two keys were stored under one id");

    // Every replica left holds each message once.
    let leader = cluster.leader(group).await;
    assert_ne!(leader, killed);
    let stats = cluster.queue(leader, group).stats();
    assert_eq!(stats.queue.depth, 320, "{stats:?}");

    // A consumer on the new leader gets every confirmed message, once,
    // as its first delivery (none was delivered before the kill).
    let mut consumer = cluster
        .queue(leader, group)
        .consumer(64, Part::Main)
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < ids.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
            .await
            .expect("a delivery within 10 s")
            .expect("a delivery");
        assert_eq!(delivery.delivery, 1);
        assert!(ids.contains(&delivery.id), "unconfirmed {}", delivery.id);
        assert!(seen.insert(delivery.id), "{} delivered twice", delivery.id);
        consumer.ack(&delivery).await.unwrap();
    }
    assert_eq!(cluster.queue(leader, group).stats().queue.depth, 0);

    // The other groups, whose leaders may have died too, still serve.
    for other in GROUPS.filter(|g| *g != group) {
        let ids = enqueue_until_confirmed(&cluster, other, &["after".to_string()]).await;
        assert_eq!(ids.len(), 1);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumers_lease_survives_a_failover_counted() {
    let mut cluster = Cluster::start().await;
    let group = 1;
    let ids = enqueue_until_confirmed(&cluster, group, &["only".to_string()]).await;
    let id = ids["only"];
    let leader = cluster.leader(group).await;
    let mut consumer = cluster
        .queue(leader, group)
        .consumer(1, Part::Main)
        .await
        .unwrap();
    let first = consumer.recv().await.unwrap();
    assert_eq!((first.id, first.delivery), (id, 1));
    drop(consumer);
    // The leader dies holding the lease (its detach may not be committed).
    cluster.kill(leader).await;

    // The new leader takes over: the message is ready again, its first
    // delivery counted, whatever became of the detach.
    let leader = cluster.leader(group).await;
    let mut consumer = loop {
        match cluster.queue(leader, group).consumer(1, Part::Main).await {
            Ok(c) => break c,
            Err(QueueGroupError::Cluster(_)) => tokio::time::sleep(Duration::from_millis(25)).await,
            Err(e) => panic!("{e}"),
        }
    };
    let again = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
        .await
        .expect("redelivered within 10 s")
        .unwrap();
    assert_eq!((again.id, again.delivery), (id, 2));
    consumer.ack(&again).await.unwrap();
    let stats = cluster.queue(leader, group).stats();
    assert_eq!(stats.queue.depth, 0, "{stats:?}");
    cluster.shutdown().await;
}

/// An enqueue too large for one log entry to replicate in a frame is
/// refused before it is proposed, and the queue keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_too_large_for_an_entry_is_refused_whole() {
    let cluster = Cluster::start().await;
    let group = *GROUPS.start();
    let keys: Vec<String> = vec!["before".into()];
    enqueue_until_confirmed(&cluster, group, &keys).await;
    let leader = cluster.leader(group).await;
    // Each payload is allowed; together they are over a quarter of the
    // 4 MiB frame limit.
    let big: Vec<Message> = (0..3)
        .map(|i| Message::new(Bytes::from(vec![i as u8; 512 * 1024])))
        .collect();
    match cluster.queue(leader, group).enqueue(big).await {
        Err(QueueGroupError::Refused(why)) => assert!(why.contains("fewer or smaller"), "{why}"),
        other => panic!("an oversized enqueue answered {other:?}"),
    }
    assert_eq!(cluster.queue(leader, group).stats().queue.depth, 1);
    let keys: Vec<String> = vec!["after".into()];
    enqueue_until_confirmed(&cluster, group, &keys).await;
    assert_eq!(cluster.queue(leader, group).stats().queue.depth, 2);
    cluster.shutdown().await;
}
