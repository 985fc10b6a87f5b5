//! One-way publishing: each publisher's messages reach subscribers in the
//! order its publish calls were made, however many are in flight and from
//! however many tasks, over tcp, unix and shm; `flush` reports what the
//! host refused and connections lost on the way.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use courier_pubsub::remote::{
    PubSubAccess, PubSubHost, PubSubServiceServer, RemoteError, RemotePubSub, RemotePubSubError,
};
use courier_pubsub::{Bus, Event, Filter, SlowConsumer, Subject, SubscribeOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};
use courier_transport::Address;

async fn host_at(address: &Address, access: Option<Arc<dyn PubSubAccess>>) -> ServerHandle {
    let listener = courier_transport::bind(address, &Default::default())
        .await
        .unwrap();
    let mut host = PubSubHost::new(Bus::new());
    if let Some(access) = access {
        host = host.with_access(access);
    }
    Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(host))
        .spawn(listener)
}

async fn connect(address: &Address) -> RemotePubSub {
    RemotePubSub::connect(address, ClientConfig::default())
        .await
        .unwrap()
}

fn unix(name: &str) -> Address {
    let path = std::env::temp_dir().join(format!("courier-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    format!("unix://{}", path.display()).parse().unwrap()
}

/// Polls every future in turn, in order, until all are done: many calls in
/// flight from one task.
async fn join_all<T>(mut futures: Vec<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut outputs: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}

/// The next event, within a liveness bound (a lost message fails the
/// test instead of hanging it).
async fn next_event(sub: &mut courier_pubsub::remote::RemoteSubscription) -> Event {
    tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .expect("an event within 30 s")
        .expect("the subscription goes on")
        .expect("no error")
}

/// Messages numbered 0..count (little-endian u32 payloads), in order.
async fn expect_numbered(sub: &mut courier_pubsub::remote::RemoteSubscription, count: u32) {
    for n in 0..count {
        match next_event(sub).await {
            Event::Message(m) => assert_eq!(m.payload[..], n.to_le_bytes()),
            other => panic!("{other:?}"),
        }
    }
}

fn body(task: u32, n: u32) -> Vec<u8> {
    let mut body = task.to_le_bytes().to_vec();
    body.extend_from_slice(&n.to_le_bytes());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_publisher_is_received_in_call_order_however_many_are_in_flight() {
    let addresses = [
        "tcp://127.0.0.1:0".parse().unwrap(),
        unix("order"),
        Address::Shm(format!("order-{}", std::process::id())),
    ];
    for address in addresses {
        let server = host_at(&address, None).await;
        let address = server.local_addr().clone();
        let subscriber = connect(&address).await;
        // Backpressure, so nothing is dropped: every message must arrive.
        let mut sub = subscriber
            .subscribe(
                "order.>",
                SubscribeOptions::default()
                    .buffer(4096)
                    .policy(SlowConsumer::Backpressure),
            )
            .await
            .unwrap();
        let (tasks, each) = (4u32, 3_000u32);
        let (rounds, in_flight) = (4u32, 256u32);
        let total = tasks * each + rounds * in_flight;
        // Read while they publish: under backpressure the host waits for us.
        let reader = tokio::spawn({
            let address = address.clone();
            async move {
                let mut next = vec![0u32; tasks as usize + 1];
                for _ in 0..total {
                    let event = tokio::time::timeout(Duration::from_secs(30), sub.recv())
                        .await
                        .expect("a message within 30 s")
                        .unwrap()
                        .unwrap();
                    let Event::Message(message) = event else {
                        panic!("{address}: {event:?}")
                    };
                    let task = u32::from_le_bytes(message.payload[..4].try_into().unwrap());
                    let n = u32::from_le_bytes(message.payload[4..8].try_into().unwrap());
                    assert_eq!(
                        n, next[task as usize],
                        "{address}: caller {task} out of order"
                    );
                    next[task as usize] += 1;
                }
            }
        });
        let publisher = connect(&address).await.publisher();
        let mut senders = Vec::new();
        for task in 0..tasks {
            let publisher = publisher.clone();
            senders.push(tokio::spawn(async move {
                for n in 0..each {
                    publisher.publish("order.x", body(task, n)).await.unwrap();
                }
            }));
        }
        // And from this task, rounds of 256 publishes in flight at once.
        for round in 0..rounds {
            type Call<'a> =
                Pin<Box<dyn Future<Output = Result<(), RemotePubSubError>> + Send + 'a>>;
            let calls: Vec<Call<'_>> = (0..in_flight)
                .map(|i| {
                    let n = round * in_flight + i;
                    Box::pin(publisher.publish("order.y", body(tasks, n))) as Call<'_>
                })
                .collect();
            for outcome in join_all(calls).await {
                outcome.unwrap();
            }
        }
        for sender in senders {
            sender.await.unwrap();
        }
        publisher.flush().await.unwrap();
        reader.await.unwrap();
        drop(subscriber);
        server.shutdown(Duration::from_millis(200)).await;
    }
}

/// Refuses publishing to `secret.>`.
struct NoSecrets;

impl PubSubAccess for NoSecrets {
    fn may_publish(&self, _: Option<&str>, subject: &Subject) -> bool {
        !subject.as_str().starts_with("secret.")
    }
    fn may_request(&self, _: Option<&str>, _: &Subject) -> bool {
        true
    }
    fn may_subscribe(&self, _: Option<&str>, _: &Filter) -> bool {
        true
    }
}

#[tokio::test]
async fn flush_reports_what_the_host_refused_once() {
    let server = host_at(
        &"tcp://127.0.0.1:0".parse().unwrap(),
        Some(Arc::new(NoSecrets)),
    )
    .await;
    let bus = connect(server.local_addr()).await;
    let mut sub = bus
        .subscribe("open.>", SubscribeOptions::default())
        .await
        .unwrap();
    let publisher = bus.publisher();
    // One way: the refusals are the host's to report, later.
    publisher.publish("secret.a", "x").await.unwrap();
    publisher.publish("open.b", "y").await.unwrap();
    publisher.publish("secret.c", "z").await.unwrap();
    let err = publisher.flush().await.unwrap_err();
    match err {
        RemotePubSubError::Remote(RemoteError::Refused { count, first }) => {
            assert_eq!(count, 2);
            assert!(
                matches!(*first, RemoteError::PermissionDenied(_)),
                "{first}"
            );
        }
        other => panic!("{other:?}"),
    }
    publisher.flush().await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(event, Event::Message(m) if &m.payload[..] == b"y"));
    // What can be checked locally fails the call itself.
    assert!(matches!(
        publisher.publish("bad..subject", "x").await,
        Err(RemotePubSubError::Remote(RemoteError::Invalid(_)))
    ));
    server.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn flush_says_when_the_connection_was_lost_under_publishes() {
    let address = unix("lost");
    let server = host_at(&address, None).await;
    let publisher = connect(&address).await.publisher();
    publisher.publish("lost.a", "1").await.unwrap();
    publisher.flush().await.unwrap();
    publisher.publish("lost.b", "2").await.unwrap();
    // The host goes away with the connection; a new one takes its place.
    server.shutdown(Duration::from_millis(100)).await;
    let server = host_at(&address, None).await;
    let mut outcome = publisher.publish("lost.c", "3").await;
    for _ in 0..100 {
        if outcome.is_ok() {
            break;
        }
        // The first publish after the loss may find the dead connection.
        tokio::time::sleep(Duration::from_millis(20)).await;
        outcome = publisher.publish("lost.c", "3").await;
    }
    outcome.unwrap();
    assert_eq!(
        publisher.flush().await.unwrap_err(),
        RemotePubSubError::PublishesLost
    );
    publisher.flush().await.unwrap();
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_frame_older_than_one_applied_is_dropped_so_order_holds_across_reconnects() {
    use courier_pubsub::remote::PubSubService;
    let bus = Bus::new();
    let host = PubSubHost::new(bus.clone());
    let mut sub = bus
        .subscribe("re.>", SubscribeOptions::default())
        .await
        .unwrap();
    // The new connection's frames (2, 3) arrive while the old connection's
    // reader still holds frame 1: it must not land after them.
    host.publish_oneway(7, 2, "re.a".into(), None, "two".into(), Default::default())
        .await;
    host.publish_oneway(
        7,
        3,
        "re.a".into(),
        None,
        "three".into(),
        Default::default(),
    )
    .await;
    host.publish_oneway(7, 1, "re.a".into(), None, "one".into(), Default::default())
        .await;
    host.publish_batch_oneway(7, 2, Vec::new()).await;
    let mut got = Vec::new();
    while let Some(event) = sub.try_recv() {
        if let Event::Message(m) = event {
            got.push(String::from_utf8(m.payload.to_vec()).unwrap());
        }
    }
    assert_eq!(got, ["two", "three"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_publishing_into_its_own_backpressure_subscription_does_not_stall() {
    let server = host_at(&"tcp://127.0.0.1:0".parse().unwrap(), None).await;
    let bus = connect(server.local_addr()).await;
    // A small buffer that makes the publisher wait for this very
    // subscriber: its room comes from credit on the subscription's stream.
    let mut sub = bus
        .subscribe(
            "self.>",
            SubscribeOptions::default()
                .buffer(16)
                .policy(SlowConsumer::Backpressure),
        )
        .await
        .unwrap();
    let total = 2_000u32;
    let reader = tokio::spawn(async move {
        for n in 0..total {
            let event = tokio::time::timeout(Duration::from_secs(20), sub.recv())
                .await
                .expect("a message within 20 s: the bus stalled itself")
                .unwrap()
                .unwrap();
            let Event::Message(m) = event else {
                panic!("{event:?}")
            };
            assert_eq!(&m.payload[..], &n.to_le_bytes());
            if n % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let publisher = bus.publisher();
    for n in 0..total {
        publisher
            .publish("self.x", n.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    reader.await.unwrap();
    server.shutdown(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_one_way_publish_cut_short_at_the_host_is_reported_by_flush() {
    use courier_pubsub::remote::PubSubService;
    let bus = Bus::new();
    let host = PubSubHost::new(bus.clone());
    let _full = bus
        .subscribe(
            "cut.>",
            SubscribeOptions::default()
                .buffer(1)
                .policy(SlowConsumer::Backpressure),
        )
        .await
        .unwrap();
    host.publish_oneway(
        9,
        1,
        "cut.a".into(),
        None,
        "fits".into(),
        Default::default(),
    )
    .await;
    // The buffer is full: this one waits, and its call is dropped, as its
    // deadline or a shutdown would drop it.
    let waiting = tokio::time::timeout(
        Duration::from_millis(20),
        host.publish_oneway(
            9,
            2,
            "cut.a".into(),
            None,
            "waits".into(),
            Default::default(),
        ),
    )
    .await;
    assert!(waiting.is_err(), "the publish waited for room");
    match host.flush_applied(9).await {
        Err(RemoteError::Refused { count: 1, first }) => {
            assert!(matches!(*first, RemoteError::Interrupted(_)), "{first}")
        }
        other => panic!("{other:?}"),
    }
    host.flush_applied(9).await.unwrap();
}

/// A loop of plain `publish` calls is sent in batches by the publisher's
/// sender task: the host applies far fewer frames than messages (its
/// latency histogram counts one entry per applied frame), and every
/// message still arrives, in order.
#[tokio::test]
async fn a_loop_of_publishes_goes_out_in_batches() {
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    let host = PubSubHost::new(Bus::new());
    let counters = host.counters();
    let server = Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(host))
        .spawn(listener);
    let bus = connect(server.local_addr()).await;
    let mut sub = bus
        .subscribe(
            "batched",
            SubscribeOptions::default()
                .buffer(8192)
                .policy(SlowConsumer::Backpressure),
        )
        .await
        .unwrap();
    let publisher = bus.publisher();
    let count = 5_000u32;
    for n in 0..count {
        publisher
            .publish("batched", n.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    expect_numbered(&mut sub, count).await;
    let frames: u64 = counters
        .latency
        .iter()
        .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let published = counters
        .published
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(published, u64::from(count));
    assert!(
        frames * 4 < u64::from(count),
        "{frames} frames applied for {count} publishes"
    );
    server.shutdown(Duration::from_millis(200)).await;
}

/// Dropping a publisher (and its bus) right after publishing loses
/// nothing: its sender task sends what was queued, then ends.
#[tokio::test]
async fn publishes_queued_when_the_publisher_is_dropped_are_still_sent() {
    let server = host_at(&"tcp://127.0.0.1:0".parse().unwrap(), None).await;
    let subscriber = connect(server.local_addr()).await;
    let mut sub = subscriber
        .subscribe(
            "dropped.>",
            SubscribeOptions::default()
                .buffer(4096)
                .policy(SlowConsumer::Backpressure),
        )
        .await
        .unwrap();
    let count = 2_000u32;
    {
        let bus = connect(server.local_addr()).await;
        let publisher = bus.publisher();
        for n in 0..count {
            publisher
                .publish("dropped.x", n.to_le_bytes().to_vec())
                .await
                .unwrap();
        }
        // No flush: the publisher, its clones and the bus go here.
    }
    expect_numbered(&mut sub, count).await;
    server.shutdown(Duration::from_millis(200)).await;
}

/// Once the connection's frame limit is known, a message no frame can
/// carry fails its own `publish` call; the publisher goes on working.
#[tokio::test]
async fn a_message_past_the_frame_limit_fails_its_publish_call() {
    let server = host_at(&"tcp://127.0.0.1:0".parse().unwrap(), None).await;
    let mut config = ClientConfig::default();
    config.transport.max_frame_size = 64 * 1024;
    let bus = RemotePubSub::connect(server.local_addr(), config)
        .await
        .unwrap();
    let mut sub = bus
        .subscribe("limit", SubscribeOptions::default())
        .await
        .unwrap();
    let publisher = bus.publisher();
    // The first publish and flush make the publishers' connection.
    publisher.publish("limit", "first").await.unwrap();
    publisher.flush().await.unwrap();
    let err = publisher
        .publish("limit", vec![0u8; 100 * 1024])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RemotePubSubError::Rpc(courier_rpc::RpcError::TooLarge { .. })
        ),
        "{err:?}"
    );
    publisher.publish("limit", "after").await.unwrap();
    publisher.flush().await.unwrap();
    for expected in [&b"first"[..], b"after"] {
        let event = next_event(&mut sub).await;
        assert!(matches!(event, Event::Message(m) if m.payload[..] == *expected));
    }
    server.shutdown(Duration::from_millis(200)).await;
}

/// A batch to one subject is routed once for plain subscriptions, but each
/// of its messages still goes to one member of a queue group, in turn.
#[tokio::test]
async fn a_batch_shares_out_among_a_queue_group_message_by_message() {
    let server = host_at(&"tcp://127.0.0.1:0".parse().unwrap(), None).await;
    let bus = connect(server.local_addr()).await;
    let options = || {
        SubscribeOptions::default()
            .buffer(1024)
            .policy(SlowConsumer::Backpressure)
    };
    let mut plain = bus.subscribe("jobs.new", options()).await.unwrap();
    let mut first = bus
        .subscribe("jobs.new", options().group("workers"))
        .await
        .unwrap();
    let mut second = bus
        .subscribe("jobs.new", options().group("workers"))
        .await
        .unwrap();
    let publisher = bus.publisher();
    let count = 100u32;
    publisher
        .publish_batch((0..count).map(|n| ("jobs.new", n.to_le_bytes().to_vec())))
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    async fn take(sub: &mut courier_pubsub::remote::RemoteSubscription, n: u32) -> Vec<u32> {
        let mut got = Vec::new();
        while got.len() < n as usize {
            if let Event::Message(m) = next_event(sub).await {
                got.push(u32::from_le_bytes(m.payload[..4].try_into().unwrap()));
            }
        }
        got
    }
    assert_eq!(
        take(&mut plain, count).await,
        (0..count).collect::<Vec<_>>()
    );
    let mut shared = take(&mut first, count / 2).await;
    shared.extend(take(&mut second, count / 2).await);
    shared.sort_unstable();
    assert_eq!(shared, (0..count).collect::<Vec<_>>());
    server.shutdown(Duration::from_millis(200)).await;
}

/// The host answers a request nobody takes only into an inbox the caller
/// may listen on: a request whose `reply_to` names someone else's subject
/// makes the host publish nothing there.
#[tokio::test]
async fn the_host_never_answers_a_request_into_a_subject_that_is_not_an_inbox() {
    let server = host_at(&"tcp://127.0.0.1:0".parse().unwrap(), None).await;
    let bus = connect(server.local_addr()).await;
    let mut victim = bus
        .subscribe("orders.created", SubscribeOptions::default())
        .await
        .unwrap();
    let client = courier_rpc::Client::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap();
    client
        .notify(
            "PubSubService",
            "request_oneway",
            courier_pubsub::remote::PubSubServiceClient::method_fingerprint("request_oneway")
                .expect("a method of PubSubService"),
            &(
                7u64,
                "nobody.listens",
                "orders.created",
                bytes::Bytes::from_static(b"?"),
            ),
        )
        .await
        .unwrap();
    // One-way calls are applied before any later call on their
    // connection: once this is answered, the forged request was handled.
    courier_pubsub::remote::PubSubServiceClient::new(client)
        .flush_applied(7)
        .await
        .unwrap()
        .unwrap();
    // A real request is still answered in its inbox.
    let err = bus
        .request("nobody.listens", "?", Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, RemotePubSubError::NoResponders(_)), "{err:?}");
    let publisher = bus.publisher();
    publisher.publish("orders.created", "real").await.unwrap();
    publisher.flush().await.unwrap();
    let event = next_event(&mut victim).await;
    assert!(
        matches!(&event, Event::Message(m) if &m.payload[..] == b"real"),
        "{event:?}"
    );
    server.shutdown(Duration::from_millis(200)).await;
}
