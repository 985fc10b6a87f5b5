//! Queues served over TCP: the remote face keeps the embedded semantics.

use std::time::Duration;

use courier_queue::core::QueueConfig;
use courier_queue::log::{FsyncPolicy, LogOptions};
use courier_queue::remote::{
    QueueHost, QueueServiceServer, RemoteError, RemoteQueue, RemoteQueueError,
};
use courier_queue::{parse_dead_letter, Enqueued, Message, QueueOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};

async fn host(name: &str) -> (ServerHandle, std::path::PathBuf) {
    host_with(name, QueueConfig::default()).await
}

async fn host_with(name: &str, config: QueueConfig) -> (ServerHandle, std::path::PathBuf) {
    host_synced(name, config, FsyncPolicy::Never).await
}

async fn host_synced(
    name: &str,
    config: QueueConfig,
    fsync: FsyncPolicy,
) -> (ServerHandle, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("courier-remote-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = QueueOptions::new(LogOptions::default().with_fsync(fsync), config);
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    let server = Server::new(ServerConfig::default())
        .service(QueueServiceServer::new(QueueHost::new(&dir, options)))
        .spawn(listener);
    (server, dir)
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 30 s"))
}

#[tokio::test]
async fn enqueue_consume_and_ack_over_the_network() {
    let (server, dir) = host("basic").await;
    let queue = RemoteQueue::connect(server.local_addr(), "orders", ClientConfig::default())
        .await
        .unwrap();
    let stored = queue
        .enqueue_batch((0..20u8).map(|n| Message::new(vec![n])).collect())
        .await
        .unwrap();
    assert!(stored.iter().all(|e| matches!(e, Enqueued::Stored(_))));
    assert!(matches!(
        queue
            .enqueue(Message::new("x").with_key("k"))
            .await
            .unwrap(),
        Enqueued::Stored(_)
    ));
    assert!(matches!(
        queue
            .enqueue(Message::new("x").with_key("k"))
            .await
            .unwrap(),
        Enqueued::Duplicate(_)
    ));

    let mut consumer = queue.consumer(5).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..21 {
        let delivery = within("delivery", consumer.recv()).await.unwrap();
        seen.push(delivery.payload[0]);
        delivery.ack().await.unwrap();
    }
    assert_eq!(&seen[..20], &(0..20).collect::<Vec<u8>>()[..]);
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (
            stats.acknowledged,
            stats.depth,
            stats.in_flight,
            stats.duplicates
        ),
        (21, 0, 0, 1)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_dropped_remote_consumer_gives_its_messages_to_another() {
    let (server, dir) = host("handover").await;
    let queue = RemoteQueue::connect(server.local_addr(), "work", ClientConfig::default())
        .await
        .unwrap();
    queue
        .enqueue_batch((0..4u8).map(|n| Message::new(vec![n])).collect())
        .await
        .unwrap();
    let mut first = queue.consumer(4).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(within("delivery", first.recv()).await.unwrap());
    }
    drop(first);
    let stale = held.pop().unwrap();
    let mut second = queue.consumer(4).await.unwrap();
    for _ in 0..4 {
        let again = within("redelivery", second.recv()).await.unwrap();
        assert_eq!(again.delivery, 2);
        again.ack().await.unwrap();
    }
    // The first consumer's deliveries can no longer be answered.
    assert_eq!(
        stale.ack().await,
        Err(RemoteQueueError::Queue(RemoteError::UnknownDelivery))
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Written once against the shared traits, run on both faces below.
async fn exercise<Q: courier_queue::QueueHandle>(queue: &Q) {
    use courier_queue::{ConsumerHandle, DeliveryHandle};
    queue
        .enqueue_batch((0..3u8).map(|n| Message::new(vec![n])).collect())
        .await
        .unwrap();
    let mut consumer = queue.consumer(3).await.unwrap();
    let first = within("first", consumer.recv()).await.unwrap();
    assert_eq!((first.payload()[0], first.delivery_count()), (0, 1));
    first.nack(Duration::ZERO).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let delivery = within("delivery", consumer.recv()).await.unwrap();
        seen.push((delivery.payload()[0], delivery.delivery_count()));
        delivery.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(seen, [(0, 2), (1, 1), (2, 1)]);
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.acknowledged, stats.redelivered), (3, 1));
}

#[tokio::test]
async fn embedded_and_remote_queues_share_one_api() {
    let (server, dir) = host("one-api").await;
    let remote = RemoteQueue::connect(server.local_addr(), "shared", ClientConfig::default())
        .await
        .unwrap();
    exercise(&remote).await;
    let embedded_dir = dir.join("embedded");
    let embedded = courier_queue::Queue::open(&embedded_dir, "shared", QueueOptions::default())
        .await
        .unwrap();
    exercise(&embedded).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits (bounded) until the queue's counters satisfy `done`.
async fn until_stats(
    queue: &RemoteQueue,
    what: &str,
    done: impl Fn(&courier_queue::core::QueueStats) -> bool,
) {
    within(what, async {
        while !done(&queue.stats().await.unwrap()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Whether the consumer receives nothing for a while (a bound on a
/// negative, not a measurement: anything that arrives fails the test).
async fn receives_nothing(consumer: &mut courier_queue::remote::RemoteConsumer) -> bool {
    tokio::time::timeout(Duration::from_millis(600), consumer.recv())
        .await
        .is_err()
}

#[tokio::test]
async fn a_remote_lease_expires_on_an_idle_queue_and_the_late_ack_is_refused() {
    let config = QueueConfig::default().with_visibility_timeout(Duration::from_millis(300));
    let (server, dir) = host_with("idle-lease", config).await;
    let queue = RemoteQueue::connect(server.local_addr(), "idle", ClientConfig::default())
        .await
        .unwrap();
    queue.enqueue(Message::new("m")).await.unwrap();
    // The queue's timer goes idle before the consumer comes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut hung = queue.consumer(1).await.unwrap();
    let held = within("delivery", hung.recv()).await.unwrap();
    until_stats(&queue, "the lease to expire", |s| s.in_flight == 0).await;
    assert!(
        matches!(
            held.ack().await,
            Err(RemoteQueueError::Queue(RemoteError::Queue { .. }))
        ),
        "the late ack is refused"
    );
    // (The refused answer gave the hung consumer its credit back, so it may
    // have taken the message again before it went.)
    drop(hung);
    let mut other = queue.consumer(1).await.unwrap();
    let again = within("redelivery", other.recv()).await.unwrap();
    assert!(again.delivery >= 2);
    again.ack().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_remote_consumer_never_holds_more_than_its_prefetch_whatever_expires() {
    let config = QueueConfig::default().with_visibility_timeout(Duration::from_millis(200));
    let (server, dir) = host_with("prefetch", config).await;
    let queue = RemoteQueue::connect(server.local_addr(), "work", ClientConfig::default())
        .await
        .unwrap();
    queue
        .enqueue_batch((0..10u8).map(|n| Message::new(vec![n])).collect())
        .await
        .unwrap();
    // A consumer that never acknowledges.
    let mut greedy = queue.consumer(2).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(within("delivery", greedy.recv()).await.unwrap());
    }
    // Its leases expire; its credit stays spent: it still holds both.
    until_stats(&queue, "the leases to expire", |s| {
        s.in_flight == 0 || s.delivered > 2
    })
    .await;
    assert!(receives_nothing(&mut greedy).await, "held more than 2");
    assert_eq!(queue.stats().await.unwrap().delivered, 2);
    // Answering one, even too late to count, gives one delivery's credit back.
    assert!(held.pop().unwrap().ack().await.is_err(), "late ack refused");
    held.push(within("one more", greedy.recv()).await.unwrap());
    assert!(receives_nothing(&mut greedy).await, "held more than 2");
    assert_eq!(queue.stats().await.unwrap().delivered, 3);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_dead_letter_queue_is_a_queue_over_the_network() {
    let config = QueueConfig::default().with_max_deliveries(1);
    let (server, dir) = host_with("dlq", config).await;
    let jobs = RemoteQueue::connect(server.local_addr(), "jobs", ClientConfig::default())
        .await
        .unwrap();
    jobs.enqueue(Message::new("poison")).await.unwrap();
    let mut consumer = jobs.consumer(1).await.unwrap();
    let poison = within("delivery", consumer.recv()).await.unwrap();
    poison.nack(Duration::ZERO).await.unwrap();
    drop(consumer);

    let dlq = RemoteQueue::connect(server.local_addr(), "jobs.dlq", ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(dlq.stats().await.unwrap().depth, 1);
    let mut dead = dlq.consumer(1).await.unwrap();
    // Nacked from the dead-letter queue past max_deliveries: it stays.
    for round in 1..=3 {
        let letter = within("dead letter", dead.recv()).await.unwrap();
        assert_eq!(letter.delivery, round);
        let (history, payload) = parse_dead_letter(letter.payload.clone()).unwrap();
        assert_eq!((&payload[..], history.len()), (&b"poison"[..], 1));
        letter.nack(Duration::ZERO).await.unwrap();
    }
    drop(dead);
    until_stats(&dlq, "the consumer to go", |s| s.in_flight == 0).await;
    assert_eq!(dlq.purge().await.unwrap(), 1);
    assert_eq!(dlq.stats().await.unwrap().depth, 0);
    // The queue itself still takes messages, and nothing was made for the
    // dead-letter queue's own sake.
    jobs.enqueue(Message::new("fine")).await.unwrap();
    assert!(!dir.join("jobs.dlq.dlq").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_stats_of_a_missing_queue_are_not_found_and_create_nothing() {
    let (server, dir) = host("missing").await;
    let connect = |name: &'static str| {
        RemoteQueue::connect(server.local_addr(), name, ClientConfig::default())
    };
    for name in ["orders.dlq", "orders", "orders.dlq.dlq"] {
        let queue = connect(name).await.unwrap();
        assert!(
            matches!(
                queue.stats().await,
                Err(RemoteQueueError::Queue(RemoteError::NotFound(_)))
            ),
            "{name}"
        );
        assert!(matches!(
            queue.purge().await,
            Err(RemoteQueueError::Queue(RemoteError::NotFound(_)))
        ));
        assert!(matches!(
            queue.peek(1).await,
            Err(RemoteQueueError::Queue(RemoteError::NotFound(_)))
        ));
    }
    assert!(!dir.join("orders").exists() && !dir.join("orders.dlq").exists());
    // Asking did not break the queue.
    let orders = connect("orders").await.unwrap();
    orders.enqueue(Message::new("o")).await.unwrap();
    assert_eq!(
        connect("orders.dlq")
            .await
            .unwrap()
            .stats()
            .await
            .unwrap()
            .depth,
        0
    );
    assert_eq!(orders.stats().await.unwrap().depth, 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn errors_sent_to_clients_do_not_reveal_server_paths() {
    let (server, dir) = host("paths").await;
    // A file where the queue's directory should be: its log cannot open.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("broken"), b"not a directory").unwrap();
    let queue = RemoteQueue::connect(server.local_addr(), "broken", ClientConfig::default())
        .await
        .unwrap();
    let err = queue.enqueue(Message::new("m")).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        matches!(err, RemoteQueueError::Queue(RemoteError::Queue { .. })),
        "{text}"
    );
    let root = std::env::temp_dir();
    assert!(
        !text.contains(root.to_str().unwrap()) && !text.contains("broken/"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Enqueues jobs numbered `0..total`.
async fn enqueue_numbered(queue: &RemoteQueue, total: u32) {
    queue
        .enqueue_batch(
            (0..total)
                .map(|n| Message::new(n.to_le_bytes().to_vec()))
                .collect(),
        )
        .await
        .unwrap();
}

/// A job's number.
fn number(payload: &[u8]) -> u32 {
    u32::from_le_bytes(payload[..4].try_into().unwrap())
}

/// What the workers acknowledged, sorted.
async fn acked_by(workers: Vec<tokio::task::JoinHandle<Vec<u32>>>) -> Vec<u32> {
    let mut acked = Vec::new();
    for worker in workers {
        acked.extend(within("worker", worker).await.unwrap());
    }
    acked.sort_unstable();
    acked
}

#[tokio::test]
async fn competing_consumers_that_nack_poison_and_ack_the_rest_drain_the_queue() {
    let mut config = QueueConfig::default();
    config.max_deliveries = 4;
    // `always`, as a broker runs: dead letters are written to the
    // dead-letter queue's own log inside the parent's settle.
    let (server, dir) = host_synced("poison", config, FsyncPolicy::Always).await;
    let queue = RemoteQueue::connect(server.local_addr(), "jobs", ClientConfig::default())
        .await
        .unwrap();
    let total = 400u32;
    enqueue_numbered(&queue, total).await;
    let poison = |n: u32| n.is_multiple_of(7);
    let mut workers = Vec::new();
    for _ in 0..3 {
        let mut consumer = queue.consumer(8).await.unwrap();
        workers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            while let Ok(Ok(delivery)) =
                tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await
            {
                let n = number(&delivery.payload);
                if poison(n) {
                    delivery.nack(Duration::ZERO).await.unwrap();
                } else {
                    delivery.ack().await.unwrap();
                    acked.push(n);
                }
            }
            acked
        }));
    }
    let acked = acked_by(workers).await;
    let expected: Vec<u32> = (0..total).filter(|n| !poison(*n)).collect();
    assert_eq!(acked, expected);
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.depth, stats.in_flight), (0, 0), "{stats:?}");
    assert_eq!(
        stats.dead_lettered,
        (0..total).filter(|n| poison(*n)).count() as u64
    );
    server.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_that_hold_some_deliveries_past_their_lease_still_drain_the_queue() {
    let mut config = QueueConfig::default();
    config.max_deliveries = 4;
    config.visibility_timeout = Duration::from_millis(300);
    let (server, dir) = host_with("held", config).await;
    let queue = RemoteQueue::connect(server.local_addr(), "jobs", ClientConfig::default())
        .await
        .unwrap();
    let total = 300u32;
    enqueue_numbered(&queue, total).await;
    let mut workers = Vec::new();
    for w in 0..3u32 {
        let mut consumer = queue.consumer(8).await.unwrap();
        workers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut held = Vec::new();
            let mut turn = w;
            loop {
                // Answer what was held once its lease has surely ended.
                while held
                    .first()
                    .is_some_and(|(at, _): &(tokio::time::Instant, _)| {
                        at.elapsed() > Duration::from_millis(900)
                    })
                {
                    let (_, delivery): (_, courier_queue::remote::RemoteDelivery) = held.remove(0);
                    assert!(delivery.ack().await.is_err(), "a late ack was accepted");
                }
                let next = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
                let delivery = match next {
                    Err(_) if held.is_empty() && turn > 100 => break,
                    Err(_) => {
                        turn += 1;
                        continue;
                    }
                    Ok(Ok(delivery)) => delivery,
                    Ok(other) => panic!("consumer ended: {other:?}"),
                };
                turn += 1;
                let n = number(&delivery.payload);
                if turn % 10 == 0 {
                    held.push((tokio::time::Instant::now(), delivery));
                } else {
                    delivery.ack().await.unwrap();
                    acked.push(n);
                }
            }
            acked
        }));
    }
    let mut acked = acked_by(workers).await;
    acked.dedup();
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.depth, stats.in_flight), (0, 0), "{stats:?}");
    assert_eq!(
        acked.len() as u64 + stats.dead_lettered,
        total as u64,
        "{stats:?}"
    );
    server.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_remote_delivery_dropped_unanswered_is_given_back_and_frees_its_place() {
    let (server, dir) = host("dropped").await;
    let queue = RemoteQueue::connect(server.local_addr(), "work", ClientConfig::default())
        .await
        .unwrap();
    queue.enqueue(Message::new("only")).await.unwrap();
    let mut consumer = queue.consumer(1).await.unwrap();
    let first = within("a delivery", consumer.recv()).await.unwrap();
    assert_eq!(first.delivery, 1);
    // A handler that returns early: the delivery is dropped, not answered.
    // With a prefetch of 1 (and the default 30 s lease) the consumer would
    // otherwise wait for good.
    drop(first);
    let again = within("the same message again", consumer.recv())
        .await
        .unwrap();
    assert_eq!((again.delivery, &again.payload[..]), (2, &b"only"[..]));
    again.ack().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Polls a future once, then drops it.
async fn poll_once_then_drop<F: std::future::Future>(future: F) {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        let _ = future.as_mut().poll(cx);
        std::task::Poll::Ready(())
    })
    .await;
}

/// Cancellation of an ack: once its future has been polled, the ack is on
/// its way and the message ends acknowledged (never also given back);
/// dropped before its first poll, the delivery is given back (never also
/// acknowledged). Never both, never neither.
#[tokio::test]
async fn an_ack_dropped_after_its_first_poll_acks_and_one_dropped_before_gives_back() {
    let (server, dir) = host("ack-cancel").await;
    let queue = RemoteQueue::connect(server.local_addr(), "work", ClientConfig::default())
        .await
        .unwrap();
    queue.enqueue(Message::new("acked")).await.unwrap();
    queue.enqueue(Message::new("given back")).await.unwrap();
    let mut consumer = queue.consumer(2).await.unwrap();
    let first = within("a delivery", consumer.recv()).await.unwrap();
    let second = within("a delivery", consumer.recv()).await.unwrap();
    assert_eq!(&first.payload[..], b"acked");
    // Polled once, then dropped while its answer is in flight.
    poll_once_then_drop(first.ack()).await;
    // Never polled: dropping the future drops the delivery unanswered.
    drop(second.ack());
    until_stats(&queue, "the first acked", |s| s.acknowledged == 1).await;
    let again = within("the given-back message", consumer.recv())
        .await
        .unwrap();
    assert_eq!(
        (&again.payload[..], again.delivery),
        (&b"given back"[..], 2)
    );
    again.ack().await.unwrap();
    // The acknowledged one never comes back.
    assert!(receives_nothing(&mut consumer).await);
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (stats.acknowledged, stats.depth, stats.in_flight),
        (2, 0, 0)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A list of answers longer than the host takes is refused whole, with
/// nothing in it applied.
#[tokio::test]
async fn too_many_answers_in_one_call_are_refused_whole() {
    use courier_queue::remote::{QueueServiceClient, WireAnswer, MAX_ANSWER_BATCH};
    let (server, dir) = host("answer-limit").await;
    let client = courier_rpc::Client::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap();
    let queue = RemoteQueue::with_client(client.clone(), "work");
    queue.enqueue(Message::new("m")).await.unwrap();
    let mut consumer = queue.consumer(1).await.unwrap();
    let delivery = within("a delivery", consumer.recv()).await.unwrap();
    let raw = QueueServiceClient::new(client);
    // Tokens are handed out from 1: the delivery's is among these.
    let answers = (1..=MAX_ANSWER_BATCH as u64 + 1)
        .map(|token| WireAnswer::Ack { token })
        .collect();
    assert!(matches!(
        raw.answer_batch(answers).await.unwrap(),
        Err(RemoteError::Queue {
            retryable: false,
            ..
        })
    ));
    assert_eq!(queue.stats().await.unwrap().acknowledged, 0);
    delivery.ack().await.unwrap();
    assert_eq!(queue.stats().await.unwrap().acknowledged, 1);
    let _ = std::fs::remove_dir_all(dir);
}

/// Deliveries ready together share a stream item only while the item stays
/// within its byte bound: a large message after a small one starts the
/// next item, so neither is refused by the frame limit (and redelivered,
/// and in the end dead-lettered, without ever arriving).
#[tokio::test]
async fn a_large_delivery_after_a_small_one_travels_in_an_item_of_its_own() {
    let (server, dir) = host("grouping").await;
    let mut config = ClientConfig::default();
    config.transport.max_frame_size = 1024 * 1024;
    let queue = RemoteQueue::connect(server.local_addr(), "sizes", config)
        .await
        .unwrap();
    queue
        .enqueue(Message::new(vec![1u8; 200 * 1024]))
        .await
        .unwrap();
    queue
        .enqueue(Message::new(vec![2u8; 900 * 1024]))
        .await
        .unwrap();
    let mut consumer = queue.consumer(2).await.unwrap();
    for (byte, len) in [(1u8, 200 * 1024), (2, 900 * 1024)] {
        let delivery = within("delivery", consumer.recv()).await.unwrap();
        assert_eq!((delivery.payload[0], delivery.payload.len()), (byte, len));
        assert_eq!(delivery.delivery, 1, "delivered once, not redelivered");
        delivery.ack().await.unwrap();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Enqueues coalesced into one call that the connection's frame limit
/// refuses (each would fit alone) are sent one by one: all are stored.
#[tokio::test]
async fn coalesced_enqueues_too_large_together_are_stored_one_by_one() {
    let (server, dir) = host("coalesced-limit").await;
    let mut config = ClientConfig::default();
    config.transport.max_frame_size = 512 * 1024;
    let queue = RemoteQueue::connect(server.local_addr(), "big", config)
        .await
        .unwrap();
    let (first, second, third) = tokio::join!(
        queue.enqueue(Message::new(vec![1u8; 300 * 1024])),
        queue.enqueue(Message::new(vec![2u8; 300 * 1024])),
        queue.enqueue(Message::new(vec![3u8; 300 * 1024])),
    );
    for outcome in [first, second, third] {
        assert!(matches!(outcome.unwrap(), Enqueued::Stored(_)));
    }
    assert_eq!(queue.stats().await.unwrap().depth, 3);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn peek_shows_ready_messages_without_taking_them_and_purge_keeps_leased_ones() {
    let (server, dir) = host("peek-purge").await;
    let queue = RemoteQueue::connect(server.local_addr(), "work", ClientConfig::default())
        .await
        .unwrap();
    queue
        .enqueue_batch((0..5u8).map(|n| Message::new(vec![n])).collect())
        .await
        .unwrap();
    let mut consumer = queue.consumer(1).await.unwrap();
    let leased = within("a delivery", consumer.recv()).await.unwrap();
    assert_eq!(leased.payload[0], 0);
    until_stats(&queue, "the lease", |s| s.in_flight == 1).await;
    let peeked = queue.peek(3).await.unwrap();
    let shown: Vec<u8> = peeked.iter().map(|p| p.payload[0]).collect();
    assert_eq!(shown, [1, 2, 3]);
    assert_eq!(queue.peek(100).await.unwrap().len(), 4);
    assert_eq!(queue.peek(0).await.unwrap(), []);
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.depth, stats.in_flight, stats.delivered), (4, 1, 1));

    assert_eq!(queue.purge().await.unwrap(), 4);
    assert!(queue.peek(10).await.unwrap().is_empty());
    // The leased one was not purged: given back, it is there to take.
    leased.nack(Duration::ZERO).await.unwrap();
    let again = within("redelivery", consumer.recv()).await.unwrap();
    assert_eq!((again.payload[0], again.delivery), (0, 2));
    again.ack().await.unwrap();
    assert_eq!(queue.stats().await.unwrap().acknowledged, 1);

    // One answer carries at most PEEK_BYTES of payload (and always one).
    use courier_queue::remote::PEEK_BYTES;
    let large = RemoteQueue::connect(server.local_addr(), "large", ClientConfig::default())
        .await
        .unwrap();
    let big = vec![b'x'; PEEK_BYTES * 3 / 5];
    large
        .enqueue_batch(vec![Message::new(big.clone()), Message::new(big)])
        .await
        .unwrap();
    assert_eq!(large.peek(10).await.unwrap().len(), 1);
    assert_eq!(large.purge().await.unwrap(), 2);
    let _ = std::fs::remove_dir_all(dir);
}

/// Anyone may produce, nobody may consume.
struct ProduceOnly;

impl courier_queue::remote::QueueAccess for ProduceOnly {
    fn may_produce(&self, _: Option<&str>, _: &str) -> bool {
        true
    }
    fn may_consume(&self, _: Option<&str>, _: &str) -> bool {
        false
    }
}

#[tokio::test]
async fn peek_and_purge_need_the_permission_to_consume() {
    let dir = std::env::temp_dir().join(format!("courier-remote-access-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    let host =
        QueueHost::new(&dir, QueueOptions::default()).with_access(std::sync::Arc::new(ProduceOnly));
    let server = Server::new(ServerConfig::default())
        .service(QueueServiceServer::new(host))
        .spawn(listener);
    let queue = RemoteQueue::connect(server.local_addr(), "locked", ClientConfig::default())
        .await
        .unwrap();
    queue.enqueue(Message::new("kept")).await.unwrap();
    assert!(matches!(
        queue.peek(1).await,
        Err(RemoteQueueError::Queue(RemoteError::PermissionDenied(_)))
    ));
    assert!(matches!(
        queue.purge().await,
        Err(RemoteQueueError::Queue(RemoteError::PermissionDenied(_)))
    ));
    let _ = std::fs::remove_dir_all(dir);
}

/// A host serving `dir` as it is (not emptied first), so a test can
/// restart one on the same queues.
async fn host_on(dir: &std::path::Path) -> ServerHandle {
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    Server::new(ServerConfig::default())
        .service(QueueServiceServer::new(QueueHost::new(
            dir,
            QueueOptions::default(),
        )))
        .spawn(listener)
}

#[tokio::test]
async fn a_client_declares_options_that_survive_a_restart_and_cannot_be_changed() {
    use courier_queue::{ErrorKind, QueueDeclaration};
    let dir = courier_test_support::TempDir::new("remote-declare");
    let strict = QueueDeclaration::new().with_max_deliveries(1);
    let server = host_on(dir.path()).await;
    let queue = RemoteQueue::connect(server.local_addr(), "strict", ClientConfig::default())
        .await
        .unwrap();
    queue.declare(strict.clone()).await.unwrap();
    queue.declare(strict.clone()).await.unwrap();
    let err = queue
        .declare(QueueDeclaration::new().with_max_deliveries(3))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    let err = queue
        .declare(QueueDeclaration::new().with_lease(Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("lease"), "{err}");
    // A queue created by an enqueue is declared with nothing.
    let plain = RemoteQueue::connect(server.local_addr(), "plain", ClientConfig::default())
        .await
        .unwrap();
    plain.enqueue(Message::new("x")).await.unwrap();
    let err = plain.declare(strict.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");

    // One delivery allowed (the host's default is 5): a nack dead-letters,
    // before and after a restart of the host.
    nack_dead_letters(&queue, 1).await;
    server.shutdown(Duration::from_millis(100)).await;
    let server = host_on(dir.path()).await;
    let queue = RemoteQueue::connect(server.local_addr(), "strict", ClientConfig::default())
        .await
        .unwrap();
    // Stored with the queue: the same declaration still holds, another
    // still conflicts.
    queue.declare(strict).await.unwrap();
    let err = queue.declare(QueueDeclaration::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    nack_dead_letters(&queue, 2).await;
}

/// Enqueues a message and nacks its first delivery; the dead-letter queue
/// must then hold `dead` messages.
async fn nack_dead_letters(queue: &RemoteQueue, dead: u64) {
    queue.enqueue(Message::new("once")).await.unwrap();
    let mut consumer = queue.consumer(1).await.unwrap();
    let delivery = within("delivery", consumer.recv()).await.unwrap();
    assert_eq!(delivery.delivery, 1);
    delivery.nack(Duration::ZERO).await.unwrap();
    let letters = queue.dead_letters().unwrap().stats().await.unwrap().depth;
    assert_eq!(letters, dead, "the declared delivery limit did not apply");
}
