//! A message enqueued inside a trace carries it to its consumer, on both
//! faces, and one enqueued outside any trace carries none.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use courier_queue::remote::{QueueHost, QueueServiceServer, RemoteQueue};
use courier_queue::{ConsumerHandle, DeliveryHandle, Message, Queue, QueueHandle, QueueOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig};
use courier_test_support::TempDir;
use courier_transport::trace::{self, TraceContext};

static NEXT: AtomicU64 = AtomicU64::new(0);

async fn carries_the_trace<Q: QueueHandle>(queue: &Q) {
    let root = TraceContext::root();
    trace::scope(root, async {
        queue.enqueue(Message::new("traced")).await.unwrap();
        queue
            .enqueue_batch(vec![Message::new("traced too")])
            .await
            .unwrap();
    })
    .await;
    queue.enqueue(Message::new("untraced")).await.unwrap();

    let mut consumer = queue.consumer(3).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a delivery within 30 s")
            .unwrap();
        seen.push((delivery.payload().clone(), delivery.trace_context()));
        delivery.ack().await.unwrap();
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        [
            ("traced".into(), Some(root)),
            ("traced too".into(), Some(root)),
            ("untraced".into(), None),
        ]
    );
}

#[tokio::test]
async fn an_embedded_queue_carries_the_producers_trace() {
    let dir = TempDir::new("queue-trace-embedded");
    let queue = Queue::open(dir.path(), "jobs", QueueOptions::default())
        .await
        .unwrap();
    carries_the_trace(&queue).await;
}

#[tokio::test]
async fn a_remote_queue_carries_the_producers_trace() {
    let dir = TempDir::new("queue-trace-remote");
    let address = format!(
        "mem://queue-trace-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let listener = courier_transport::bind(&address.parse().unwrap(), &Default::default())
        .await
        .unwrap();
    let server = Server::new(ServerConfig::default())
        .service(QueueServiceServer::new(QueueHost::new(
            dir.path(),
            QueueOptions::default(),
        )))
        .spawn(listener);
    let queue = RemoteQueue::connect(&address.parse().unwrap(), "jobs", ClientConfig::default())
        .await
        .unwrap();
    carries_the_trace(&queue).await;
    server.shutdown(Duration::from_secs(1)).await;
}
