//! The bus served over TCP: no slow joiners, wildcards and groups, gaps.

use courier_test_support::TempDir;
use std::time::Duration;

use courier_pubsub::remote::{HostConfig, PubSubHost, PubSubServiceServer, RemotePubSub};
use courier_pubsub::{Bus, Event, SlowConsumer, SubscribeOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};

async fn host() -> ServerHandle {
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(Bus::new())))
        .spawn(listener)
}

async fn connect(server: &ServerHandle) -> RemotePubSub {
    RemotePubSub::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap()
}

async fn next(sub: &mut courier_pubsub::remote::RemoteSubscription) -> Event {
    tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .expect("an event within 30 s")
        .expect("the subscription is open")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_right_after_subscribe_returns_is_delivered() {
    let server = host().await;
    // Publisher connected before the subscriber, and after it.
    let early = connect(&server).await.publisher();
    for round in 0..1000u32 {
        let subscriber = connect(&server).await;
        let mut sub = subscriber
            .subscribe("race.>", SubscribeOptions::default())
            .await
            .unwrap();
        let publisher = if round % 2 == 0 {
            early.clone()
        } else {
            connect(&server).await.publisher()
        };
        // At least this subscription (earlier rounds' may still be closing).
        assert!(
            publisher
                .publish_confirmed("race.now", round.to_le_bytes().to_vec())
                .await
                .unwrap()
                >= 1
        );
        let Event::Message(m) = next(&mut sub).await else {
            panic!("a message")
        };
        assert_eq!(&m.payload[..], &round.to_le_bytes());
    }
}

#[tokio::test]
async fn wildcards_and_queue_groups_work_through_the_host() {
    let server = host().await;
    let bus = connect(&server).await;
    let mut all = bus
        .subscribe("orders.>", SubscribeOptions::default())
        .await
        .unwrap();
    let mut eu = bus
        .subscribe("orders.eu.*", SubscribeOptions::default())
        .await
        .unwrap();
    let mut a = bus
        .subscribe("jobs", SubscribeOptions::default().group("g"))
        .await
        .unwrap();
    let mut b = bus
        .subscribe("jobs", SubscribeOptions::default().group("g"))
        .await
        .unwrap();
    let publisher = bus.publisher();
    assert_eq!(
        publisher
            .publish_confirmed("orders.eu.created", "1")
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        publisher
            .publish_confirmed("orders.us.created", "2")
            .await
            .unwrap(),
        1
    );
    for _ in 0..10 {
        assert_eq!(
            publisher.publish_confirmed("jobs", "j").await.unwrap(),
            1,
            "one group member each time"
        );
    }
    let Event::Message(m) = next(&mut eu).await else {
        panic!()
    };
    assert_eq!(m.subject.as_str(), "orders.eu.created");
    for expected in ["orders.eu.created", "orders.us.created"] {
        let Event::Message(m) = next(&mut all).await else {
            panic!()
        };
        assert_eq!(m.subject.as_str(), expected);
    }
    for _ in 0..5 {
        assert!(matches!(next(&mut a).await, Event::Message(_)));
        assert!(matches!(next(&mut b).await, Event::Message(_)));
    }
}

#[tokio::test]
async fn a_stalled_remote_subscriber_is_told_what_it_missed() {
    let server = host().await;
    let bus = connect(&server).await;
    let mut slow = bus
        .subscribe(
            "flood",
            SubscribeOptions::default()
                .buffer(4)
                .policy(SlowConsumer::DropOldest),
        )
        .await
        .unwrap();
    let publisher = bus.publisher();
    for n in 0..200u32 {
        publisher
            .publish("flood", n.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.publish("flood", "marker").await.unwrap();
    // Every message is either delivered or counted in a reported gap.
    let (mut delivered, mut missed) = (0u64, 0u64);
    loop {
        match next(&mut slow).await {
            Event::Message(m) if &m.payload[..] == b"marker" => {
                delivered += 1;
                break;
            }
            Event::Message(_) => delivered += 1,
            Event::Gap { from, to, .. } => missed += to - from,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        missed > 0,
        "the host dropped some for the stalled subscriber"
    );
    assert_eq!(delivered + missed, 201);
}

#[tokio::test]
async fn a_remote_service_answers_requests_by_subject() {
    let server = host().await;
    let service = connect(&server).await;
    let mut requests = service
        .subscribe("svc.echo", SubscribeOptions::default().group("echo"))
        .await
        .unwrap();
    let replier = service.publisher();
    tokio::spawn(async move {
        while let Some(Ok(Event::Message(request))) = requests.recv().await {
            replier
                .reply(&request, request.payload.clone())
                .await
                .unwrap();
        }
    });
    let client = connect(&server).await;
    for n in 0..20u32 {
        let reply = client
            .request(
                "svc.echo",
                n.to_le_bytes().to_vec(),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(&reply.payload[..], &n.to_le_bytes());
    }
    let err = client
        .request("svc.nobody", "x", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            courier_pubsub::remote::RemotePubSubError::NoResponders(_)
        ),
        "{err:?}"
    );
}

/// A host with durable subscriptions and the queue protocol for their
/// queues, on `address`.
async fn durable_host(
    address: &courier_transport::Address,
    data: &std::path::Path,
) -> ServerHandle {
    use courier_pubsub::durable::Durable;
    use courier_queue::remote::{QueueHost, QueueServiceServer, QueueSet};
    let listener = courier_transport::bind(address, &Default::default())
        .await
        .unwrap();
    let queues = QueueSet::new(data, Default::default());
    let durable = Durable::open(queues.clone()).await.unwrap();
    Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::with_durable(
            Bus::new(),
            durable,
        )))
        .service(QueueServiceServer::new(QueueHost::serving(queues)))
        .spawn(listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_group_memberships_come_back_after_a_host_restart() {
    let dir = TempDir::new("restore");
    let address: courier_transport::Address =
        format!("unix://{}", dir.0.join("host.sock").display())
            .parse()
            .unwrap();
    let server = durable_host(&address, &dir.0.join("data")).await;
    let bus = connect(&server).await;
    let mut plain = Vec::new();
    for n in 0..50 {
        plain.push(
            bus.subscribe(&format!("restore.{n}"), SubscribeOptions::default())
                .await
                .unwrap(),
        );
    }
    let mut members = Vec::new();
    for _ in 0..2 {
        members.push(
            bus.subscribe("restore.work", SubscribeOptions::default().group("workers"))
                .await
                .unwrap(),
        );
    }
    server.shutdown(Duration::from_millis(100)).await;
    let server = durable_host(&address, &dir.0.join("data")).await;
    // Each subscription notices, subscribes again and says so.
    for sub in plain.iter_mut().chain(members.iter_mut()) {
        assert_eq!(next(sub).await, Event::Restored);
        assert_eq!(sub.restored(), 1);
    }
    let publisher = bus.publisher();
    for n in 0..50 {
        assert_eq!(
            publisher
                .publish_confirmed(&format!("restore.{n}"), format!("{n}"))
                .await
                .unwrap(),
            1
        );
    }
    for (n, sub) in plain.iter_mut().enumerate() {
        let Event::Message(m) = next(sub).await else {
            panic!("a message")
        };
        assert_eq!(m.payload, format!("{n}").as_bytes());
    }
    // The group membership is back too: one member each.
    for _ in 0..10 {
        assert_eq!(
            publisher
                .publish_confirmed("restore.work", "job")
                .await
                .unwrap(),
            1
        );
    }
    let mut got = 0;
    for member in &mut members {
        while let Ok(Some(Ok(Event::Message(_)))) =
            tokio::time::timeout(Duration::from_millis(200), member.recv()).await
        {
            got += 1;
        }
    }
    assert_eq!(got, 10);
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_keeps_what_was_published_across_subscriber_and_host_restarts() {
    use courier_pubsub::durable::DurableMessage;
    use std::collections::BTreeSet;
    let dir = TempDir::new("durable");
    let address: courier_transport::Address =
        format!("unix://{}", dir.0.join("host.sock").display())
            .parse()
            .unwrap();
    let data = dir.0.join("data");
    let server = durable_host(&address, &data).await;
    let publisher = connect(&server).await.publisher();
    let expected: BTreeSet<String> = (0..150).map(|n| format!("order {n}")).collect();

    // Subscriber one: registers, takes 50 and acknowledges them, goes away.
    let subscriber = connect(&server).await;
    let audit = subscriber.durable("audit", "orders.>").await.unwrap();
    // Also matches a batch and a single publish; other subjects do not.
    publisher
        .publish_batch((0..100).map(|n| (format!("orders.eu.{n}"), format!("order {n}"))))
        .await
        .unwrap();
    publisher
        .publish("payments.eu", "not for audit")
        .await
        .unwrap();
    let mut acknowledged = BTreeSet::new();
    {
        let mut consumer = audit.consumer(10).await.unwrap();
        while acknowledged.len() < 50 {
            let delivery = consumer.recv().await.unwrap();
            let message = DurableMessage::decode(&delivery.payload).unwrap();
            assert!(message.subject.as_str().starts_with("orders.eu."));
            acknowledged.insert(String::from_utf8(message.payload.to_vec()).unwrap());
            delivery.ack().await.unwrap();
        }
    }
    drop(subscriber);
    // Published while no subscriber is connected, one way, then flushed:
    // once the flush returns, the host has stored each, so each must
    // survive what follows.
    for n in 100..150 {
        publisher
            .publish(&format!("orders.us.{n}"), format!("order {n}"))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    server.shutdown(Duration::from_millis(100)).await;
    let server = durable_host(&address, &data).await;

    // Subscriber two, after the host restart: the durable subscription is
    // still registered and holds everything not acknowledged.
    let subscriber = connect(&server).await;
    assert_eq!(
        subscriber.durable_list().await.unwrap(),
        vec![("audit".to_string(), "orders.>".to_string())]
    );
    let audit = subscriber.durable("audit", "orders.>").await.unwrap();
    let mut consumer = audit.consumer(10).await.unwrap();
    let mut rest = BTreeSet::new();
    while acknowledged.len() + rest.len() < expected.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a delivery within 30 s")
            .unwrap();
        let message = DurableMessage::decode(&delivery.payload).unwrap();
        let body = String::from_utf8(message.payload.to_vec()).unwrap();
        assert!(
            !acknowledged.contains(&body),
            "{body} came back after its ack"
        );
        rest.insert(body);
        delivery.ack().await.unwrap();
    }
    let all: BTreeSet<String> = acknowledged.union(&rest).cloned().collect();
    assert_eq!(all, expected);
    // The same name with another filter is refused, with both filters named.
    let err = subscriber.durable("audit", "payments.>").await.unwrap_err();
    assert!(
        err.to_string().contains("orders.>") && err.to_string().contains("payments.>"),
        "{err}"
    );
    assert!(subscriber.durable_unsubscribe("audit").await.unwrap());
    assert!(subscriber.durable_list().await.unwrap().is_empty());
    server.shutdown(Duration::from_millis(100)).await;
}

#[test]
fn the_blocking_face_publishes_subscribes_and_requests() {
    use courier_pubsub::blocking::BlockingPubSub;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(host());
    let address = server.local_addr().clone();
    let bus = BlockingPubSub::connect(&address, ClientConfig::default()).unwrap();
    let mut sub = bus
        .subscribe("blocking.>", SubscribeOptions::default())
        .unwrap();
    let publisher = bus.publisher();
    assert_eq!(
        publisher
            .publish_batch_confirmed((0..10).map(|n| (format!("blocking.{n}"), vec![n as u8])))
            .unwrap(),
        10
    );
    for n in 0..10u8 {
        let Some(Ok(Event::Message(m))) = sub.recv_timeout(Duration::from_secs(30)) else {
            panic!("a message")
        };
        assert_eq!(
            (m.subject.as_str(), &m.payload[..]),
            (&*format!("blocking.{n}"), &[n][..])
        );
    }
    // Nothing more: the timeout says so.
    assert!(matches!(
        sub.recv_timeout(Duration::from_millis(50)),
        Some(Err(_))
    ));
    // A responder on its own thread, reached by subject.
    let mut requests = bus
        .subscribe(
            "blocking-svc.upper",
            SubscribeOptions::default().group("upper"),
        )
        .unwrap();
    let replier = bus.publisher();
    let responder = std::thread::spawn(move || {
        let Some(Ok(Event::Message(request))) = requests.recv() else {
            panic!("a request")
        };
        replier
            .reply(&request, request.payload.to_ascii_uppercase())
            .unwrap();
    });
    let reply = bus
        .request("blocking-svc.upper", "shout", Duration::from_secs(30))
        .unwrap();
    assert_eq!(&reply.payload[..], b"SHOUT");
    responder.join().unwrap();
    drop(sub);
    drop(bus);
    runtime.block_on(server.shutdown(Duration::from_millis(100)));
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_is_served_over_shared_memory_too() {
    let address = courier_transport::Address::Shm(format!("pubsub-{}", std::process::id()));
    let listener = courier_transport::bind(&address, &Default::default())
        .await
        .unwrap();
    let server = Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(Bus::new())))
        .spawn(listener);
    let bus = connect(&server).await;
    let mut sub = bus
        .subscribe("shm.>", SubscribeOptions::default())
        .await
        .unwrap();
    let publisher = bus.publisher();
    publisher
        .publish_batch((0..1000u32).map(|n| ("shm.n", n.to_le_bytes().to_vec())))
        .await
        .unwrap();
    for n in 0..1000u32 {
        let Event::Message(m) = next(&mut sub).await else {
            panic!("a message")
        };
        assert_eq!(&m.payload[..], &n.to_le_bytes());
    }
    drop(sub);
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_inbox_and_each_gets_its_own_reply() {
    let server = host().await;
    let service = connect(&server).await;
    let mut requests = service
        .subscribe("svc.echo", SubscribeOptions::default().group("echo"))
        .await
        .unwrap();
    let replier = service.publisher();
    tokio::spawn(async move {
        while let Some(Ok(Event::Message(request))) = requests.recv().await {
            let replier = replier.clone();
            // Answer out of order, to show replies are matched, not queued.
            tokio::spawn(async move {
                let delay = request.payload[0] as u64 % 7;
                tokio::time::sleep(Duration::from_millis(delay)).await;
                replier
                    .reply(&request, request.payload.clone())
                    .await
                    .unwrap();
            });
        }
    });
    let client = connect(&server).await;
    let calls: Vec<_> = (0..50u8)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                let reply = client
                    .request("svc.echo", vec![n], Duration::from_secs(30))
                    .await
                    .unwrap();
                assert_eq!(&reply.payload[..], &[n]);
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
}

/// Issue 12, item 3: 512 KiB messages once ended the stream silently (a
/// batch of 256 of them is far past the 4 MiB frame limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_to_a_slow_subscriber_are_all_received_or_counted() {
    const COUNT: u64 = 100;
    let server = host().await;
    let bus = connect(&server).await;
    let mut slow = bus
        .subscribe("big", SubscribeOptions::default().buffer(16))
        .await
        .unwrap();
    let publisher = connect(&server).await.publisher();
    let payload = bytes::Bytes::from(vec![7u8; 512 * 1024]);
    // The subscriber reads nothing while all of them are published.
    for _ in 0..COUNT {
        publisher.publish("big", payload.clone()).await.unwrap();
    }
    publisher.publish("big", "marker").await.unwrap();
    let (mut received, mut missed) = (0u64, 0u64);
    loop {
        match next(&mut slow).await {
            Event::Message(m) if &m.payload[..] == b"marker" => break,
            Event::Message(m) => {
                assert_eq!(m.payload.len(), payload.len());
                received += 1;
            }
            Event::Gap { from, to, .. } => missed += to - from,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(received > 0);
    assert_eq!(
        received + missed,
        COUNT,
        "received {received}, missed {missed}"
    );
    assert_eq!(slow.dropped(), missed, "the drop count says the same");
}

/// A batch past the connection's frame limit is split; a message that does
/// not fit a frame alone becomes a counted gap, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_past_the_frame_limit_are_split_and_an_unsendable_message_is_a_gap() {
    let bus = Bus::new();
    let config = courier_transport::TransportConfig::default().with_max_frame_size(256 * 1024);
    let listener = courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &config)
        .await
        .unwrap();
    // Batches allowed far past the frame limit, so the host must learn it.
    let host = PubSubHost::new(bus.clone())
        .with_config(HostConfig::default().with_max_batch_bytes(64 << 20));
    let server = Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(host))
        .spawn(listener);
    let mut sub = connect(&server)
        .await
        .subscribe("big", SubscribeOptions::default())
        .await
        .unwrap();
    let publisher = bus.publisher();
    for n in 0..20u8 {
        publisher.publish("big", vec![n; 100 * 1024]).await.unwrap();
    }
    publisher.publish("big", vec![0; 1 << 20]).await.unwrap(); // never fits
    publisher.publish("big", "marker").await.unwrap();
    let mut received = Vec::new();
    let mut gaps = Vec::new();
    loop {
        match next(&mut sub).await {
            Event::Message(m) if &m.payload[..] == b"marker" => break,
            Event::Message(m) => received.push(m.payload[0]),
            Event::Gap { from, to, .. } => gaps.push((from, to)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        received,
        (0..20).collect::<Vec<u8>>(),
        "in order, none lost"
    );
    assert_eq!(gaps, [(20, 21)], "the one too large");
    assert_eq!(sub.dropped(), 1);
}

/// Issue 12, item 7: client-chosen publisher ids once grew the host's map
/// (and every subscription's) by one entry per id, for good.
#[tokio::test]
async fn client_chosen_publisher_ids_keep_host_state_bounded() {
    use courier_pubsub::remote::PubSubService;
    const IDS: u64 = 200_000;
    let bus = Bus::with_config(
        courier_pubsub::BusConfig::default().with_max_publishers_per_subscription(256),
    );
    let host =
        PubSubHost::new(bus.clone()).with_config(HostConfig::default().with_max_publishers(1024));
    let mut responder = bus
        .subscribe("svc", SubscribeOptions::default())
        .await
        .unwrap();
    let _stalled = bus
        .subscribe("svc", SubscribeOptions::default().buffer(8))
        .await
        .unwrap();
    let payload = bytes::Bytes::from_static(b"x");
    let mut most = (0, 0);
    // A hostile client: a fresh id on every call, as fast as it can.
    for id in 0..IDS {
        let reached = host
            .publish(id, "svc".into(), None, payload.clone(), Default::default())
            .await
            .unwrap();
        assert_eq!(reached, 2);
        assert!(matches!(responder.try_recv(), Some(Event::Message(_))));
        most.0 = most.0.max(host.tracked_publishers());
        most.1 = most.1.max(bus.most_tracked_publishers());
    }
    assert!(most.0 <= 1024, "host kept {} publishers", most.0);
    assert!(most.1 <= 256, "a subscription kept {} publishers", most.1);
    // A forgotten id publishing again is a new publisher: nothing breaks.
    host.publish(0, "svc".into(), None, payload, Default::default())
        .await
        .unwrap();
    let Some(Event::Message(m)) = responder.try_recv() else {
        panic!("delivered")
    };
    assert_eq!(m.seq, 0);
}

/// Requests from one client share one publisher identity, so a responder's
/// subscription does not track one publisher per request.
#[tokio::test]
async fn requests_from_one_client_use_one_publisher_identity() {
    let bus = Bus::new();
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    let server = Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(bus.clone())))
        .spawn(listener);
    let mut service = bus
        .subscribe("echo", SubscribeOptions::default())
        .await
        .unwrap();
    let replier = bus.publisher();
    tokio::spawn(async move {
        while let Some(Ok(Event::Message(request))) = service.recv().await {
            replier
                .reply(&request, request.payload.clone())
                .await
                .unwrap();
        }
    });
    let client = connect(&server).await;
    for n in 0..200u32 {
        let reply = client
            .request("echo", n.to_le_bytes().to_vec(), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(&reply.payload[..], &n.to_le_bytes());
    }
    assert_eq!(
        bus.most_tracked_publishers(),
        1,
        "one requester, one replier"
    );
}

/// Issue 12, E4 remotely: drops at the end of a run reach the subscriber as
/// a gap, and its drop count is the host's.
#[tokio::test]
async fn a_remote_subscriber_learns_of_trailing_drops_and_its_drop_count() {
    let server = host().await;
    let bus = connect(&server).await;
    let mut slow = bus
        .subscribe(
            "tail",
            SubscribeOptions::default()
                .buffer(4)
                .policy(SlowConsumer::DropNewest),
        )
        .await
        .unwrap();
    let publisher = bus.publisher();
    // One batch reaches the host's buffer of 4 at once: most are dropped,
    // and no marker follows the drops.
    publisher
        .publish_batch((0..100u32).map(|n| ("tail", n.to_le_bytes().to_vec())))
        .await
        .unwrap();
    let (mut received, mut missed) = (0u64, 0u64);
    while received + missed < 100 {
        match next(&mut slow).await {
            Event::Message(_) => received += 1,
            Event::Gap { from, to, .. } => missed += to - from,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received + missed, 100);
    assert!(missed > 0);
    assert_eq!(slow.dropped(), missed);
}
