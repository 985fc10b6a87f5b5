//! One program, written once against the shared traits, run unchanged on
//! the embedded queue and on a remote queue over a real in-process host.

use std::collections::BTreeSet;
use std::pin::Pin;

use futures_core::Stream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use courier_queue::core::DeliveryOutcome;
use courier_queue::remote::{QueueHost, QueueServiceServer, RemoteQueue};
use courier_queue::{
    parse_dead_letter, ConsumerHandle, DeliveryHandle, Message, Queue, QueueHandle, QueueOptions,
};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};
use courier_test_support::TempDir;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A queue host under `dir` on a fresh mem:// address.
async fn host(dir: &std::path::Path) -> ServerHandle {
    let address = format!(
        "mem://queue-faces-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let listener = courier_transport::bind(&address.parse().unwrap(), &Default::default())
        .await
        .unwrap();
    Server::new(ServerConfig::default())
        .service(QueueServiceServer::new(QueueHost::new(
            dir,
            QueueOptions::default(),
        )))
        .spawn(listener)
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 30 s"))
}

/// Enqueue, competing consumers, ack, nack, reject, stats and the
/// dead-letter queue, through nothing but the traits.
async fn program<Q: QueueHandle>(queue: &Q) -> Result<(), Q::Error> {
    queue
        .enqueue_batch((0..6u8).map(|n| Message::new(vec![n])).collect())
        .await?;
    // Two competing consumers of two each: four different messages.
    let mut one = queue.consumer(2).await?;
    let mut two = queue.consumer(2).await?;
    let (a, b) = (
        within("a", one.recv()).await?,
        within("b", one.recv()).await?,
    );
    let (c, d) = (
        within("c", two.recv()).await?,
        within("d", two.recv()).await?,
    );
    let taken: BTreeSet<u8> = [&a, &b, &c, &d].iter().map(|x| x.payload()[0]).collect();
    assert_eq!(taken.len(), 4, "competing consumers got the same message");
    assert!([&a, &b, &c, &d].iter().all(|x| x.delivery_count() == 1));

    let nacked = b.payload()[0];
    let rejected = c.payload()[0];
    a.ack().await?;
    b.nack(Duration::ZERO).await?;
    c.reject().await?;
    d.ack().await?;

    // The two never delivered and the nacked one, which comes again.
    let mut rest = Vec::new();
    for _ in 0..2 {
        rest.push(within("rest", one.recv()).await?);
    }
    rest.push(within("rest", two.recv()).await?);
    let mut counts: Vec<(u8, u32)> = rest
        .iter()
        .map(|x| (x.payload()[0], x.delivery_count()))
        .collect();
    counts.sort();
    assert!(counts.contains(&(nacked, 2)), "{counts:?}");
    assert!(!counts.iter().any(|&(n, _)| n == rejected), "{counts:?}");
    for delivery in rest {
        delivery.ack().await?;
    }

    let stats = queue.stats().await?;
    assert_eq!(
        (
            stats.acknowledged,
            stats.redelivered,
            stats.dead_lettered,
            stats.depth,
            stats.in_flight
        ),
        (5, 1, 1, 0, 0),
        "{stats:?}"
    );

    // The rejected message, in the dead-letter queue with its history.
    let dead = queue
        .dead_letters()
        .expect("a queue has a dead-letter queue");
    assert!(
        dead.dead_letters().is_none(),
        "a dead letter is not dead-lettered again"
    );
    assert_eq!(dead.name(), format!("{}.dlq", queue.name()));
    let mut letters = dead.consumer(1).await?;
    let letter = within("dead letter", letters.recv()).await?;
    let (history, payload) = parse_dead_letter(letter.payload().clone()).expect("a dead letter");
    assert_eq!(&payload[..], &[rejected]);
    assert_eq!(history.len(), 1, "rejected on its first delivery");
    assert_eq!(history[0].outcome, DeliveryOutcome::Rejected);
    letter.ack().await?;
    assert_eq!(dead.stats().await?.acknowledged, 1);
    Ok(())
}

/// Messages a producer task adds one at a time while the consumer takes
/// them with `recv` futures that a `select!` drops whenever they are not
/// ready at their first poll; then the same through the consumer as a
/// `Stream`. A delivery lost with a dropped future would stay leased (for
/// the 30 s default lease, past the test's bound) and come back
/// redelivered: every message must arrive, once, on its first delivery.
async fn dropped_receives_lose_nothing<Q>(queue: Q)
where
    Q: QueueHandle + Clone + 'static,
    Q::Consumer: futures_core::Stream<Item = Result<<Q::Consumer as ConsumerHandle>::Delivery, Q::Error>>
        + Unpin,
{
    const MESSAGES: u32 = 200;
    let producer = {
        let queue = queue.clone();
        tokio::spawn(async move {
            for n in 0..MESSAGES {
                queue
                    .enqueue(Message::new(n.to_le_bytes().to_vec()))
                    .await
                    .ok();
                tokio::task::yield_now().await;
            }
        })
    };
    let mut consumer = queue.consumer(8).await.unwrap();
    let mut seen = BTreeSet::new();
    let mut dropped = 0u64;
    let bound = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < (MESSAGES / 2) as usize {
        assert!(
            tokio::time::Instant::now() < bound,
            "{} of {MESSAGES} arrived",
            seen.len()
        );
        tokio::select! {
            biased;
            // Ready on its second poll: the `recv` below is polled once,
            // then dropped unless it had a delivery at once.
            _ = tokio::task::yield_now() => dropped += 1,
            delivery = consumer.recv() => {
                let delivery = delivery.unwrap();
                assert_eq!(delivery.delivery_count(), 1, "redelivered: a delivery was lost");
                assert!(seen.insert(delivery.payload().to_vec()), "delivered twice");
                delivery.ack().await.unwrap();
            }
        }
    }
    while seen.len() < MESSAGES as usize {
        assert!(
            tokio::time::Instant::now() < bound,
            "{} of {MESSAGES} arrived",
            seen.len()
        );
        let next = std::future::poll_fn(|cx| {
            match Pin::new(&mut consumer).poll_next(cx) {
                // Pending: also give the select's other branch a turn, so
                // that polls of the stream are abandoned too.
                std::task::Poll::Pending => std::task::Poll::Ready(None),
                ready => ready.map(Some),
            }
        })
        .await;
        match next {
            None => {
                dropped += 1;
                tokio::task::yield_now().await;
            }
            Some(item) => {
                let delivery = item.expect("the stream does not end").unwrap();
                assert_eq!(
                    delivery.delivery_count(),
                    1,
                    "redelivered: a delivery was lost"
                );
                assert!(seen.insert(delivery.payload().to_vec()), "delivered twice");
                delivery.ack().await.unwrap();
            }
        }
    }
    producer.await.unwrap();
    assert!(
        dropped > 0,
        "no receive was ever abandoned: the test proves nothing"
    );
    let stats = queue.stats().await.unwrap();
    assert_eq!(
        (
            stats.acknowledged,
            stats.redelivered,
            stats.depth,
            stats.in_flight
        ),
        (u64::from(MESSAGES), 0, 0, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn receives_dropped_in_select_lose_no_delivery_on_either_face() {
    let dir = TempDir::new("faces-cancel");
    let embedded = Queue::open(dir.path().join("embedded"), "jobs", QueueOptions::default())
        .await
        .unwrap();
    dropped_receives_lose_nothing(embedded).await;
    let server = host(&dir.path().join("hosted")).await;
    let remote = RemoteQueue::connect(server.local_addr(), "jobs", ClientConfig::default())
        .await
        .unwrap();
    dropped_receives_lose_nothing(remote).await;
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Order {
    id: u64,
    item: String,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Refund(i64, String);

/// Typed values across a face: the right type decodes, another type is an
/// error for its delivery alone, and the consumer (and its connection)
/// goes on.
async fn typed_program<Q: QueueHandle + Clone>(queue: &Q) {
    use courier_queue::{TypeError, TypedQueue};
    let orders = TypedQueue::<Q, Order>::new(queue.clone());
    let refunds = TypedQueue::<Q, Refund>::new(queue.clone());
    refunds
        .enqueue(&Refund(-450, "cold tea".into()))
        .await
        .unwrap();
    let tea = Order {
        id: 9,
        item: "tea".into(),
    };
    orders.enqueue(&tea).await.unwrap();
    let mut consumer = orders.consumer(2).await.unwrap();
    let wrong = within("refund", consumer.recv()).await.unwrap();
    let err = wrong.value().unwrap_err();
    assert!(matches!(err, TypeError::Mismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("Order") && err.to_string().contains("Refund"),
        "{err}"
    );
    wrong.ack().await.unwrap();
    let right = within("order", consumer.recv()).await.unwrap();
    assert_eq!(right.value(), Ok(&tea));
    right.ack().await.unwrap();
}

#[tokio::test]
async fn typed_queues_check_the_type_on_both_faces() {
    let dir = TempDir::new("faces-typed");
    let embedded = Queue::open(
        dir.path().join("embedded"),
        "typed",
        QueueOptions::default(),
    )
    .await
    .unwrap();
    typed_program(&embedded).await;
    let server = host(&dir.path().join("hosted")).await;
    let remote = RemoteQueue::connect(server.local_addr(), "typed", ClientConfig::default())
        .await
        .unwrap();
    typed_program(&remote).await;
}

#[tokio::test]
async fn one_program_runs_unchanged_on_the_embedded_and_the_remote_face() {
    let dir = TempDir::new("faces");
    let embedded = Queue::open(dir.path().join("embedded"), "jobs", QueueOptions::default())
        .await
        .unwrap();
    program(&embedded).await.unwrap();

    let server = host(&dir.path().join("hosted")).await;
    // The only line that changes between the faces.
    let remote = RemoteQueue::connect(server.local_addr(), "jobs", ClientConfig::default())
        .await
        .unwrap();
    program(&remote).await.unwrap();
}

#[tokio::test]
async fn a_remote_consumer_whose_stream_ended_says_closed() {
    let dir = TempDir::new("faces-closed");
    let server = host(dir.path()).await;
    let remote = RemoteQueue::connect(server.local_addr(), "jobs", ClientConfig::default())
        .await
        .unwrap();
    let mut consumer = remote.consumer(1).await.unwrap();
    server.shutdown(Duration::from_millis(100)).await;
    // Whatever error ended the stream comes first; then it is closed, and
    // stays so.
    let mut errors = Vec::new();
    for _ in 0..3 {
        errors.push(within("an end", consumer.recv()).await.unwrap_err());
    }
    assert!(
        errors[1..]
            .iter()
            .all(|e| matches!(e, courier_queue::remote::RemoteQueueError::Closed)),
        "{errors:?}"
    );
    assert_eq!(errors[2].kind(), courier_queue::ErrorKind::Unavailable);
}

/// The public types are `Send` (and `Sync` where shared), so they cross
/// tasks; a field that broke it would fail to compile here.
#[test]
fn public_types_are_send_and_sync_where_they_should_be() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Queue>();
    send_sync::<courier_queue::Consumer>();
    send_sync::<courier_queue::Delivery>();
    send_sync::<courier_queue::QueueSet>();
    send_sync::<RemoteQueue>();
    send::<courier_queue::remote::RemoteConsumer>();
    send_sync::<courier_queue::remote::RemoteDelivery>();
    send_sync::<QueueHost>();
    send_sync::<courier_queue::TypedQueue<RemoteQueue, Order>>();
    send::<courier_queue::TypedConsumer<courier_queue::remote::RemoteConsumer, Order>>();
}
