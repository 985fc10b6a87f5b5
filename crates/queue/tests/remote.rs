//! Queues served over TCP: the remote face keeps the embedded semantics.

use std::time::Duration;

use courier_queue::log::{FsyncPolicy, LogOptions};
use courier_queue::remote::{
    QueueHost, QueueServiceServer, RemoteError, RemoteQueue, RemoteQueueError,
};
use courier_queue::{Enqueued, Message, QueueOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};

async fn host(name: &str) -> (ServerHandle, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("courier-remote-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = QueueOptions::new(
        LogOptions::default().with_fsync(FsyncPolicy::Never),
        Default::default(),
    );
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
        let delivery = within("delivery", consumer.recv()).await.unwrap().unwrap();
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
        held.push(within("delivery", first.recv()).await.unwrap().unwrap());
    }
    drop(first);
    let stale = held.pop().unwrap();
    let mut second = queue.consumer(4).await.unwrap();
    for _ in 0..4 {
        let again = within("redelivery", second.recv()).await.unwrap().unwrap();
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
    let first = within("first", consumer.next()).await.unwrap();
    assert_eq!((first.payload()[0], first.delivery_count()), (0, 1));
    first.nack(Duration::ZERO).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let delivery = within("delivery", consumer.next()).await.unwrap();
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
