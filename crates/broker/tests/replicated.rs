//! Replicated queues on three brokers in one process: a queue of
//! `[cluster] replicated_queues` is placed on every member, served through
//! any of them, and keeps what it confirmed when its leader's broker stops;
//! a consumer attached through a member that stays keeps its stream across
//! the failover.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use courier_broker::config::ClusterSection;
use courier_broker::{Broker, BrokerConfig};
use courier_queue::remote::{RemoteQueue, RemoteQueueError};
use courier_queue::{Enqueued, Message};
use courier_rpc::ClientConfig;
use courier_test_support::TempDir;
use courier_transport::Address;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The queues these tests replicate, unless a test says otherwise.
const PATTERNS: &[&str] = &["jobs", "orders.*"];

fn config(
    dir: &TempDir,
    id: u64,
    addresses: &[String],
    replicas: usize,
    patterns: &[&str],
) -> BrokerConfig {
    let mut config = BrokerConfig::default();
    config.listen = vec![addresses[(id - 1) as usize].clone()];
    config.data_dir = dir.path().join(format!("node-{id}"));
    config.metrics = String::new();
    config.shutdown_grace_ms = 200;
    let mut section = ClusterSection::default();
    section.node = id;
    section.heartbeat_ms = 50;
    section.election_min_ms = 300;
    section.election_max_ms = 600;
    section.replicated_queues = patterns.iter().map(|p| p.to_string()).collect();
    section.queue_replicas = replicas;
    for (i, address) in addresses.iter().enumerate() {
        let peer = i as u64 + 1;
        if peer != id {
            section.peers.insert(peer.to_string(), address.clone());
        }
    }
    config.cluster = Some(section);
    config
}

struct Nodes {
    brokers: Vec<Option<Broker>>,
    addresses: Vec<String>,
    dir: TempDir,
}

impl Nodes {
    async fn start(label: &str) -> Nodes {
        Nodes::start_with(label, 3, 3).await
    }

    /// `count` brokers, each queue on `replicas` of them.
    ///
    /// Every member's address is picked before any starts (each is given
    /// the others'), so a port may be taken in between, by another test
    /// or by the outgoing connection of a member already running: then the
    /// whole set starts again on fresh ports, in a fresh directory.
    async fn start_with(label: &str, count: u64, replicas: usize) -> Nodes {
        Nodes::start_replicating(label, count, replicas, PATTERNS).await
    }

    /// As [`Nodes::start_with`], replicating the queues `patterns` name.
    async fn start_replicating(
        label: &str,
        count: u64,
        replicas: usize,
        patterns: &[&str],
    ) -> Nodes {
        for attempt in 1.. {
            let dir = TempDir::new(label);
            let addresses: Vec<String> = (0..count)
                .map(|_| format!("tcp://127.0.0.1:{}", free_port()))
                .collect();
            let mut nodes = Nodes {
                brokers: Vec::new(),
                addresses,
                dir,
            };
            let mut taken = false;
            for id in 1..=count {
                let config = config(&nodes.dir, id, &nodes.addresses, replicas, patterns);
                match Broker::start(config).await {
                    Ok(broker) => nodes.brokers.push(Some(broker)),
                    Err(courier_broker::BrokerError::Bind { address, reason }) if attempt < 5 => {
                        println!("attempt {attempt}: {address} was taken ({reason}); again");
                        taken = true;
                        break;
                    }
                    Err(e) => panic!("broker {id} did not start: {e}"),
                }
            }
            if !taken {
                return nodes;
            }
            nodes.shutdown().await;
        }
        unreachable!("the loop returns or panics")
    }

    fn broker(&self, id: u64) -> &Broker {
        self.brokers[(id - 1) as usize].as_ref().unwrap()
    }

    fn address(&self, id: u64) -> Address {
        self.addresses[(id - 1) as usize].parse().unwrap()
    }

    async fn queue(&self, id: u64, name: &str) -> RemoteQueue {
        RemoteQueue::connect(&self.address(id), name, ClientConfig::default())
            .await
            .unwrap()
    }

    /// The node whose stats say it leads `queue`'s group, once one does.
    async fn leader_of(&self, queue: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, broker) in self.brokers.iter().enumerate() {
                let Some(broker) = broker else { continue };
                let stats = broker.stats().await;
                let leads = stats.cluster.as_ref().is_some_and(|c| {
                    c.queues
                        .iter()
                        .any(|q| q.name == queue && q.role == "leader")
                });
                if leads {
                    return i as u64 + 1;
                }
            }
            assert!(Instant::now() < deadline, "no leader for {queue}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn shutdown(mut self) {
        for broker in self.brokers.iter_mut() {
            if let Some(broker) = broker.take() {
                broker.shutdown().await;
            }
        }
    }
}

/// Enqueues `message`, retried (same key) while the queue has no leader.
async fn enqueue(queue: &RemoteQueue, message: Message) -> Enqueued {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match queue.enqueue(message.clone()).await {
            Ok(outcome) => return outcome,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("enqueue: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_queue_is_served_by_every_member_and_placed_on_all_three() {
    let nodes = Nodes::start("replicated-any").await;
    // Produced through one member, consumed through another, counted by
    // the third.
    let producer = nodes.queue(2, "jobs").await;
    for n in 0..20 {
        let message = Message::new(format!("job {n}")).with_key(format!("job-{n}"));
        assert!(matches!(
            enqueue(&producer, message).await,
            Enqueued::Stored(_)
        ));
    }
    // The same key again is a duplicate, not a second message.
    let again = Message::new("job 3").with_key("job-3");
    assert!(matches!(
        enqueue(&producer, again).await,
        Enqueued::Duplicate(_)
    ));
    let counter = nodes.queue(3, "jobs").await;
    assert_eq!(counter.stats().await.unwrap().depth, 20);

    let consuming = nodes.queue(1, "jobs").await;
    let mut consumer = consuming.consumer(8).await.unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
            .await
            .expect("a delivery within 10 s")
            .unwrap();
        assert_eq!(delivery.delivery_count(), 1);
        assert!(seen.insert(delivery.payload().clone()));
        delivery.ack().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter.stats().await.unwrap().depth != 0 {
        assert!(Instant::now() < deadline, "acks applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Every member holds a replica and reports it.
    for broker in nodes.brokers.iter().flatten() {
        let stats = broker.stats().await;
        let cluster = stats.cluster.unwrap();
        let jobs = cluster.queues.iter().find(|q| q.name == "jobs").unwrap();
        assert_eq!(jobs.replicas.len(), 3, "{jobs:?}");
        assert!(stats.queues.iter().any(|q| q.name == "jobs"));
    }
    // Each member keeps the queue's entries in its one shared log (not a
    // log of the queue's own), and the log holds them.
    for id in 1..=3u64 {
        let cluster = nodes.dir.path().join(format!("node-{id}")).join(".cluster");
        let groups: Vec<_> = std::fs::read_dir(cluster.join("queues"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        assert_eq!(groups.len(), 1, "{groups:?}");
        assert!(courier_cluster::storage::in_node_wal(&groups[0]));
        assert!(!groups[0].join("log").exists());
        let segments = std::fs::read_dir(cluster.join("queue-log"))
            .unwrap()
            .count();
        assert!(segments > 0, "node {id} has no shared log");
    }
    // A queue the patterns do not name stays local to its broker.
    let local = nodes.queue(1, "scratch").await;
    local.enqueue(Message::new("here only")).await.unwrap();
    let elsewhere = nodes.queue(2, "scratch").await;
    assert!(matches!(
        elsewhere.stats().await,
        Err(RemoteQueueError::Queue(
            courier_queue::remote::RemoteError::NotFound(_)
        ))
    ));
    // Peek and purge go through the leader too, from any member (once the
    // consumer is gone, so that nothing is leased).
    drop(consumer);
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter.stats().await.unwrap().consumers != 0 {
        assert!(Instant::now() < deadline, "the consumer detached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 0..3 {
        let message = Message::new(format!("late {n}")).with_key(format!("late-{n}"));
        enqueue(&producer, message).await;
    }
    let peeked = counter.peek(10).await.unwrap();
    let shown: Vec<_> = peeked.iter().map(|p| p.payload.clone()).collect();
    assert_eq!(
        shown,
        ["late 0", "late 1", "late 2"].map(bytes::Bytes::from)
    );
    assert_eq!(
        counter.stats().await.unwrap().depth,
        3,
        "peek takes nothing"
    );
    assert_eq!(consuming.purge().await.unwrap(), 3);
    assert_eq!(producer.stats().await.unwrap().depth, 0);
    assert!(counter.peek(10).await.unwrap().is_empty());
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_leaders_broker_loses_nothing_confirmed_and_a_consumer_follows() {
    let mut nodes = Nodes::start("replicated-failover").await;
    let name = "orders.eu";
    // Declared by its first use; wait for its leader.
    let first = nodes.queue(1, name).await;
    enqueue(&first, Message::new("m0").with_key("m0")).await;
    let leader = nodes.leader_of(name).await;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let producer = nodes.queue(others[0], name).await;
    let consuming = nodes.queue(others[1], name).await;
    let mut consumer = consuming.consumer(4).await.unwrap();
    for n in 1..40 {
        let message = Message::new(format!("m{n}")).with_key(format!("m{n}"));
        enqueue(&producer, message).await;
    }
    // The leader's broker goes; the member serving the consumer stays.
    nodes.brokers[(leader - 1) as usize]
        .take()
        .unwrap()
        .shutdown()
        .await;
    for n in 40..60 {
        let message = Message::new(format!("m{n}")).with_key(format!("m{n}"));
        enqueue(&producer, message).await;
    }
    // Every message, each acknowledged once it is seen; a delivery the
    // old leader had given out comes again, counted.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while seen.len() < 60 {
        assert!(Instant::now() < deadline, "{} of 60 seen", seen.len());
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a delivery within 30 s")
            .unwrap();
        let text = String::from_utf8(delivery.payload().to_vec()).unwrap();
        seen.insert(text);
        // An ack whose delivery the failover took back is refused; the
        // message comes again.
        let _ = delivery.ack().await;
    }
    let expected: BTreeSet<String> = (0..60).map(|n| format!("m{n}")).collect();
    assert_eq!(seen, expected);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let depth = producer.stats().await.unwrap().depth;
        if depth == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "depth {depth} left");
        // Redelivered ones still to ack.
        if let Ok(Ok(delivery)) =
            tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
        {
            let _ = delivery.ack().await;
        }
    }
    nodes.shutdown().await;
}

/// The replicas of `queue` as the leader of its group reports them, once
/// they are exactly `want` (voters all); panics after 60 s.
async fn wait_for_replicas(nodes: &Nodes, queue: &str, want: &BTreeSet<u64>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    loop {
        for broker in nodes.brokers.iter().flatten() {
            let stats = broker.stats().await;
            let Some(status) = stats
                .cluster
                .and_then(|c| c.queues.into_iter().find(|q| q.name == queue))
            else {
                continue;
            };
            if status.role != "leader" {
                continue;
            }
            let held: BTreeSet<u64> = status.replicas.iter().map(|r| r.id).collect();
            if &held == want && status.replicas.iter().all(|r| r.lag.is_some_and(|l| l < 5)) {
                return;
            }
            last = format!("{status:?}");
        }
        assert!(
            Instant::now() < deadline,
            "replicas never became {want:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_members_replicas_are_handed_to_another_and_keep_every_message() {
    // Four brokers, each queue on three of them.
    let mut nodes = Nodes::start_with("replicated-handoff", 4, 3).await;
    let name = "jobs";
    let producer = nodes.queue(1, name).await;
    for n in 0..30 {
        let message = Message::new(format!("m{n}")).with_key(format!("m{n}"));
        enqueue(&producer, message).await;
    }
    let leader = nodes.leader_of(name).await;
    let stats = nodes.brokers[(leader - 1) as usize]
        .as_ref()
        .unwrap()
        .stats()
        .await;
    let replicas: BTreeSet<u64> = stats
        .cluster
        .unwrap()
        .queues
        .iter()
        .find(|q| q.name == name)
        .unwrap()
        .replicas
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(replicas.len(), 3);
    let spare = (1..=4u64).find(|id| !replicas.contains(id)).unwrap();

    // The queue's leader dies, and is removed from the cluster through a
    // member that stays: its replica goes to the spare, which catches up
    // from the group's leader.
    nodes.brokers[(leader - 1) as usize]
        .take()
        .unwrap()
        .shutdown()
        .await;
    let survivor = *replicas.iter().find(|id| **id != leader).unwrap();
    let admin =
        courier_cluster::client::KvClient::new(&[nodes.address(survivor)], ClientConfig::default())
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = admin.remove_member(leader).await {
        assert!(Instant::now() < deadline, "remove_member: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut want = replicas.clone();
    want.remove(&leader);
    want.insert(spare);
    wait_for_replicas(&nodes, name, &want).await;
    for n in 30..40 {
        let message = Message::new(format!("m{n}")).with_key(format!("m{n}"));
        enqueue(&nodes.queue(survivor, name).await, message).await;
    }

    // Now another of the original replicas goes: the group has its
    // majority only because the spare took over, with every message.
    let other = *want
        .iter()
        .find(|id| **id != spare && **id != survivor)
        .unwrap();
    let keep = survivor;
    nodes.brokers[(other - 1) as usize]
        .take()
        .unwrap()
        .shutdown()
        .await;
    let consuming = nodes.queue(keep, name).await;
    let mut consumer = consuming.consumer(8).await.unwrap();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 40 {
        assert!(
            Instant::now() < deadline,
            "{} of 40 seen: {seen:?}",
            seen.len()
        );
        let Ok(delivery) = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await
        else {
            continue;
        };
        let delivery = delivery.unwrap();
        seen.insert(String::from_utf8(delivery.payload().to_vec()).unwrap());
        let _ = delivery.ack().await;
    }
    let expected: BTreeSet<String> = (0..40).map(|n| format!("m{n}")).collect();
    assert_eq!(seen, expected);
    nodes.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_leaves_while_running_hands_on_its_replica_then_stops_it() {
    // Three brokers, each queue on two: with two replicas, the group can
    // change its membership only with the leaving replica's vote.
    let mut nodes = Nodes::start_with("replicated-leave", 3, 2).await;
    let name = "orders.us";
    let producer = nodes.queue(1, name).await;
    for n in 0..20 {
        let message = Message::new(format!("m{n}")).with_key(format!("m{n}"));
        enqueue(&producer, message).await;
    }
    let leader = nodes.leader_of(name).await;
    let status = |stats: courier_broker::BrokerStats| {
        stats
            .cluster
            .and_then(|c| c.queues.into_iter().find(|q| q.name == name))
    };
    let replicas: BTreeSet<u64> = status(nodes.broker(leader).stats().await)
        .unwrap()
        .replicas
        .iter()
        .map(|r| r.id)
        .collect();
    let leaving = *replicas.iter().find(|id| **id != leader).unwrap();
    let spare = (1..=3u64).find(|id| !replicas.contains(id)).unwrap();
    let admin =
        courier_cluster::client::KvClient::new(&[nodes.address(leader)], ClientConfig::default())
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = admin.remove_member(leaving).await {
        assert!(Instant::now() < deadline, "remove_member: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_replicas(&nodes, name, &BTreeSet::from([leader, spare])).await;
    // The member that left stops its replica once the group has let it go.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(nodes.broker(leaving).stats().await).is_some() {
        assert!(
            Instant::now() < deadline,
            "node {leaving} still runs its replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And does not start it again (its view of the declarations stopped
    // when it left): watched over three of its once-a-second rounds.
    for _ in 0..30 {
        assert!(status(nodes.broker(leaving).stats().await).is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nodes.brokers[(leaving - 1) as usize]
        .take()
        .unwrap()
        .shutdown()
        .await;
    // Every message is still there, served by the leader and the spare.
    let consuming = nodes.queue(spare, name).await;
    assert_eq!(consuming.stats().await.unwrap().depth, 20);
    let mut consumer = consuming.consumer(8).await.unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < 20 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a delivery within 30 s")
            .unwrap();
        seen.insert(String::from_utf8(delivery.payload().to_vec()).unwrap());
        delivery.ack().await.unwrap();
    }
    nodes.shutdown().await;
}

/// `replicated_queues = ["*"]` replicates every queue but a durable
/// subscription's, which the broker hosting the subscription keeps: what
/// is published to the subscription reaches its consumer (it used to be
/// stored in the broker's own queue while the consumer waited on an empty
/// replicated group of the same name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicating_every_queue_leaves_durable_subscriptions_working() {
    let nodes = Nodes::start_replicating("durable-star", 3, 3, &["*"]).await;
    let client = courier_rpc::Client::connect(&nodes.address(1), ClientConfig::default())
        .await
        .unwrap();
    let bus = courier_pubsub::remote::RemotePubSub::with_client(client);
    let audit = bus.durable("audit", "orders.>").await.unwrap();
    let publisher = bus.publisher();
    publisher.publish("orders.kept", "stored").await.unwrap();
    publisher.flush().await.unwrap();
    let mut consumer = audit.consumer(1).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("the durable subscription's message arrives")
        .unwrap();
    let message = courier_pubsub::durable::DurableMessage::decode(&delivery.payload).unwrap();
    assert_eq!(&message.payload[..], b"stored");
    delivery.ack().await.unwrap();
    drop(consumer);

    // Any other queue is replicated, on all three.
    let queue = nodes.queue(1, "anything").await;
    assert!(matches!(
        enqueue(&queue, Message::new("x")).await,
        Enqueued::Stored(_)
    ));
    let leader = nodes.leader_of("anything").await;
    assert!((1..=3).contains(&leader));
    nodes.shutdown().await;
}
