//! Typed queues on the embedded face, and messages with headers in the log
//! beside records written before headers existed.

use std::time::Duration;

use courier_queue::log::{FsyncPolicy, Log, LogOptions};
use courier_queue::{
    parse_dead_letter, Enqueued, Message, Queue, QueueOptions, TypeError, TypedQueue,
    DEAD_LETTER_TYPE,
};
use courier_wire::headers::{Headers, TRACEPARENT, TYPE};

mod common;

use common::TempDir;

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
struct Order {
    id: u64,
    item: String,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
struct Invoice {
    number: u32,
    total_cents: i64,
    paid: bool,
}

fn options() -> QueueOptions {
    QueueOptions::new(
        LogOptions::default().with_fsync(FsyncPolicy::Never),
        Default::default(),
    )
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 30 s"))
}

#[tokio::test]
async fn another_type_or_no_type_is_a_per_message_error_naming_both_and_the_consumer_goes_on() {
    let dir = TempDir::new("typed");
    let queue = Queue::open(&dir.0, "orders", options()).await.unwrap();
    let orders = TypedQueue::<_, Order>::new(queue.clone());
    let invoices = TypedQueue::<_, Invoice>::new(queue.clone());
    let tea = Order {
        id: 1,
        item: "tea".into(),
    };
    orders.enqueue(&tea).await.unwrap();
    invoices
        .enqueue(&Invoice {
            number: 7,
            total_cents: 450,
            paid: false,
        })
        .await
        .unwrap();
    // The byte face, as the CLI or another language would.
    queue.enqueue(Message::new("just bytes")).await.unwrap();
    let scone = Order {
        id: 2,
        item: "scone".into(),
    };
    orders.enqueue(&scone).await.unwrap();
    assert_ne!(orders.tag().fingerprint, invoices.tag().fingerprint);

    let mut consumer = orders.consumer(10).await.unwrap();
    let first = within("order", consumer.recv()).await.unwrap();
    assert_eq!(first.value(), Ok(&tea));
    first.ack().await.unwrap();

    let second = within("invoice", consumer.recv()).await.unwrap();
    let err = second.value().unwrap_err().clone();
    match &err {
        TypeError::Mismatch { expected, found } => {
            assert_eq!(expected, orders.tag());
            assert_eq!(found, invoices.tag());
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("Order") && text.contains("Invoice"), "{text}");
    assert_eq!(err.kind(), courier_queue::ErrorKind::InvalidInput);
    // Still a delivery like any other: rejected to the dead-letter queue.
    second.reject().await.unwrap();

    let third = within("bytes", consumer.recv()).await.unwrap();
    assert!(
        matches!(third.value(), Err(TypeError::Untyped { .. })),
        "{:?}",
        third.value()
    );
    assert_eq!(&third.delivery().payload[..], b"just bytes");
    third.ack().await.unwrap();

    let fourth = within("order after the others", consumer.recv())
        .await
        .unwrap();
    assert_eq!(fourth.value(), Ok(&scone));
    fourth.ack().await.unwrap();

    // The rejected invoice's dead letter says what it was, under a header
    // a typed consumer of the dead-letter queue does not take for its type.
    let dead = queue.dead_letters().unwrap();
    let mut letters = TypedQueue::<_, Invoice>::new(dead.clone())
        .consumer(1)
        .await
        .unwrap();
    let letter = within("dead letter", letters.recv()).await.unwrap();
    assert!(matches!(letter.value(), Err(TypeError::Untyped { .. })));
    let (value, delivery) = letter.into_parts();
    assert!(value.is_err());
    assert_eq!(
        delivery.headers.get(DEAD_LETTER_TYPE),
        Some(invoices.tag().to_value().as_str())
    );
    assert_eq!(delivery.headers.get(TYPE), None);
    let (_, original) = parse_dead_letter(delivery.payload.clone()).unwrap();
    let invoice: Invoice = courier_wire::payload::decode(&original).unwrap();
    assert_eq!(invoice.number, 7);
    delivery.ack().await.unwrap();
}

#[tokio::test]
async fn a_log_written_before_headers_is_read_and_headers_survive_a_restart() {
    let dir = TempDir::new("typed-old-log");
    // The segment an earlier version wrote: "first", "keyed" (key k1),
    // "third", then the removal of "first".
    let segment = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-orders.log"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.0.join("orders")).unwrap();
    std::fs::write(
        dir.0.join("orders").join("00000000000000000000.log"),
        &segment,
    )
    .unwrap();

    let mut traced = Headers::new();
    traced
        .insert(
            TRACEPARENT,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .unwrap();
    {
        let queue = Queue::open(&dir.0, "orders", options()).await.unwrap();
        assert_eq!(queue.stats_now().depth, 2, "two of the three stay");
        // The old record's idempotency key is remembered.
        assert!(matches!(
            queue
                .enqueue(Message::new("again").with_key("k1"))
                .await
                .unwrap(),
            Enqueued::Duplicate(_)
        ));
        queue
            .enqueue(Message::new("with headers").with_headers(traced.clone()))
            .await
            .unwrap();
        queue.enqueue(Message::new("without")).await.unwrap();
    }
    let queue = Queue::open(&dir.0, "orders", options()).await.unwrap();
    let mut consumer = queue.consumer(10).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        let delivery = within("delivery", consumer.recv()).await.unwrap();
        got.push((
            String::from_utf8(delivery.payload.to_vec()).unwrap(),
            delivery.headers.clone(),
        ));
    }
    assert_eq!(
        got,
        [
            ("keyed".to_string(), Headers::new()),
            ("third".to_string(), Headers::new()),
            ("with headers".to_string(), traced),
            ("without".to_string(), Headers::new()),
        ]
    );
    drop((consumer, queue));

    // A message without headers is still written in the old layout (kind
    // 1), so an earlier version can read what this one writes unless it
    // uses headers (kind 3).
    let mut kinds = Vec::new();
    let (_log, _) = Log::open(dir.0.join("orders"), LogOptions::default(), |record| {
        kinds.push(record.kind)
    })
    .unwrap();
    assert_eq!(kinds, [1, 1, 1, 2, 3, 1]);
}
