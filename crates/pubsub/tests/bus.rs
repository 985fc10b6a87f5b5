//! The in-process bus: delivery, fan-out, groups, order, gaps and every
//! slow-consumer policy.

use std::collections::HashMap;
use std::time::Duration;

use courier_pubsub::{Bus, BusConfig, Event, SlowConsumer, SubscribeOptions, Subscription};

fn message(event: Option<Event>) -> courier_pubsub::Message {
    match event {
        Some(Event::Message(message)) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 30 s"))
}

#[tokio::test]
async fn a_message_published_right_after_subscribe_is_always_delivered() {
    let bus = Bus::new();
    let publisher = bus.publisher();
    for round in 0..5_000u32 {
        // Both orders: subscribe first, or the publisher existing first.
        let mut sub = bus
            .subscribe("race.test", SubscribeOptions::default())
            .await
            .unwrap();
        publisher
            .publish("race.test", round.to_le_bytes().to_vec())
            .await
            .unwrap();
        let got = message(sub.try_recv());
        assert_eq!(&got.payload[..], &round.to_le_bytes());
    }
    assert_eq!(bus.subscriptions(), 0, "dropped subscriptions are gone");
}

#[tokio::test]
async fn fan_out_to_a_hundred_subscribers() {
    let bus = Bus::new();
    let mut subs: Vec<Subscription> = (0..100)
        .map(|i| {
            bus.blocking_subscribe(
                if i % 2 == 0 { "fan.>" } else { "fan.*" },
                SubscribeOptions::default(),
            )
            .unwrap()
        })
        .collect();
    let publisher = bus.publisher();
    for n in 0..50u8 {
        assert_eq!(
            publisher
                .publish_confirmed("fan.out", vec![n])
                .await
                .unwrap(),
            100
        );
    }
    for sub in &mut subs {
        for n in 0..50u8 {
            let got = message(sub.try_recv());
            assert_eq!((got.payload[0], got.seq), (n, n as u64));
        }
        assert!(sub.try_recv().is_none());
    }
}

#[tokio::test]
async fn a_queue_group_shares_messages_while_plain_subscribers_get_all() {
    let bus = Bus::new();
    let mut workers: Vec<_> = (0..3)
        .map(|_| {
            bus.blocking_subscribe("jobs.>", SubscribeOptions::default().group("workers"))
                .unwrap()
        })
        .collect();
    let mut auditor = bus
        .subscribe("jobs.>", SubscribeOptions::default())
        .await
        .unwrap();
    let publisher = bus.publisher();
    for n in 0..300u32 {
        assert_eq!(
            publisher
                .publish_confirmed("jobs.new", n.to_le_bytes().to_vec())
                .await
                .unwrap(),
            2
        );
    }
    let mut counts = Vec::new();
    let mut all = Vec::new();
    for worker in &mut workers {
        let mut count = 0;
        while let Some(Event::Message(m)) = worker.try_recv() {
            all.push(u32::from_le_bytes(m.payload[..].try_into().unwrap()));
            count += 1;
        }
        counts.push(count);
    }
    all.sort();
    assert_eq!(
        all,
        (0..300).collect::<Vec<_>>(),
        "each job to exactly one worker"
    );
    assert_eq!(counts, [100, 100, 100], "in turn");
    let mut audited = 0;
    while auditor.try_recv().is_some() {
        audited += 1;
    }
    assert_eq!(audited, 300);
}

#[tokio::test]
async fn subscribers_join_and_leave_mid_stream() {
    let bus = Bus::new();
    let publisher = bus.publisher();
    let mut early = bus
        .subscribe("s", SubscribeOptions::default())
        .await
        .unwrap();
    publisher.publish("s", "1").await.unwrap();
    let mut late = bus
        .subscribe("s", SubscribeOptions::default())
        .await
        .unwrap();
    publisher.publish("s", "2").await.unwrap();
    drop(early.try_recv());
    drop(early);
    assert_eq!(
        publisher.publish_confirmed("s", "3").await.unwrap(),
        1,
        "only the late one is left"
    );
    let payloads: Vec<_> = std::iter::from_fn(|| late.try_recv())
        .map(|e| message(Some(e)).payload)
        .collect();
    assert_eq!(payloads, ["2", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_publisher_order_is_kept_for_every_subscriber() {
    let bus = Bus::new();
    let mut subs: Vec<_> = (0..4)
        .map(|_| {
            bus.blocking_subscribe("ordered.>", SubscribeOptions::default().buffer(100_000))
                .unwrap()
        })
        .collect();
    let publishers: Vec<_> = (0..3)
        .map(|p| {
            let publisher = bus.publisher();
            tokio::spawn(async move {
                for n in 0..2000u32 {
                    publisher
                        .publish(&format!("ordered.p{p}"), n.to_le_bytes().to_vec())
                        .await
                        .unwrap();
                }
                publisher.id()
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    for sub in &mut subs {
        let mut next: HashMap<u64, u32> = HashMap::new();
        while let Some(event) = sub.try_recv() {
            let m = message(Some(event));
            let expected = next.entry(m.publisher).or_default();
            assert_eq!(
                u32::from_le_bytes(m.payload[..].try_into().unwrap()),
                *expected
            );
            assert_eq!(m.seq, *expected as u64);
            *expected += 1;
        }
        assert!(next.values().all(|n| *n == 2000));
    }
}

#[tokio::test]
async fn dropped_messages_are_reported_as_a_gap() {
    let bus = Bus::new();
    let mut sub = bus
        .subscribe(
            "g",
            SubscribeOptions::default()
                .buffer(2)
                .policy(SlowConsumer::DropNewest),
        )
        .await
        .unwrap();
    let publisher = bus.publisher();
    for n in 0..5u8 {
        publisher.publish("g", vec![n]).await.unwrap();
    }
    assert_eq!(sub.dropped(), 3);
    assert_eq!(message(sub.try_recv()).seq, 0);
    assert_eq!(message(sub.try_recv()).seq, 1);
    publisher.publish("g", vec![5]).await.unwrap();
    assert_eq!(
        sub.try_recv(),
        Some(Event::Gap {
            publisher: publisher.id(),
            from: 2,
            to: 5
        })
    );
    let after = message(sub.try_recv());
    assert_eq!((after.seq, after.payload[0]), (5, 5));
}

#[tokio::test]
async fn a_stalled_subscriber_stays_bounded_and_does_not_slow_a_healthy_one() {
    const MESSAGES: u64 = 1_000_000;
    const BUFFER: usize = 1024;
    let bus = Bus::new();
    let stalled = bus
        .subscribe(
            "firehose",
            SubscribeOptions::default()
                .buffer(BUFFER)
                .policy(SlowConsumer::DropOldest),
        )
        .await
        .unwrap();
    // The healthy subscriber chose backpressure, so it provably gets everything.
    let mut healthy = bus
        .subscribe(
            "firehose",
            SubscribeOptions::default()
                .buffer(BUFFER)
                .policy(SlowConsumer::Backpressure),
        )
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut received = 0u64;
        while received < MESSAGES {
            match healthy.recv().await {
                Some(Ok(Event::Message(m))) => {
                    assert_eq!(m.seq, received);
                    received += 1;
                }
                other => panic!("healthy subscriber got {other:?}"),
            }
        }
        received
    });
    let publisher = bus.publisher();
    let payload = bytes::Bytes::from_static(&[7u8; 16]);
    for _ in 0..MESSAGES {
        publisher
            .publish("firehose", payload.clone())
            .await
            .unwrap();
        assert!(
            stalled.buffered() <= BUFFER,
            "the stalled buffer is bounded"
        );
    }
    assert_eq!(within("healthy reader", reader).await.unwrap(), MESSAGES);
    assert_eq!(stalled.buffered(), BUFFER);
    assert_eq!(
        stalled.dropped(),
        MESSAGES - BUFFER as u64,
        "every drop counted"
    );
    assert_eq!(bus.dropped(), stalled.dropped(), "and in the bus total");
}

#[tokio::test]
async fn a_disconnecting_subscriber_ends_when_it_falls_behind() {
    let bus = Bus::new();
    let mut sub = bus
        .subscribe(
            "d",
            SubscribeOptions::default()
                .buffer(2)
                .policy(SlowConsumer::Disconnect),
        )
        .await
        .unwrap();
    let publisher = bus.publisher();
    for n in 0..3u8 {
        publisher.publish("d", vec![n]).await.unwrap();
    }
    assert_eq!(sub.dropped(), 3);
    assert_eq!(
        within("gap", sub.recv()).await,
        Some(Ok(Event::Gap {
            publisher: publisher.id(),
            from: 0,
            to: 3
        })),
        "told what it lost first"
    );
    assert_eq!(
        within("end", sub.recv()).await,
        None,
        "the subscription ended"
    );
}

#[tokio::test]
async fn backpressure_makes_the_publisher_wait_for_room() {
    let bus = Bus::new();
    let mut sub = bus
        .subscribe(
            "b",
            SubscribeOptions::default()
                .buffer(1)
                .policy(SlowConsumer::Backpressure),
        )
        .await
        .unwrap();
    let publisher = bus.publisher();
    publisher.publish("b", "first").await.unwrap();
    let second = tokio::spawn({
        let publisher = publisher.clone();
        async move { publisher.publish("b", "second").await }
    });
    tokio::task::yield_now().await;
    assert!(!second.is_finished(), "waits while the buffer is full");
    assert_eq!(message(sub.try_recv()).payload, "first");
    within("publish", second).await.unwrap().unwrap();
    assert_eq!(
        message(sub.recv().await.transpose().unwrap()).payload,
        "second"
    );
    assert_eq!(sub.dropped(), 0);
}

/// A service answering requests on `subject`: replies with the payload
/// upper-cased and tagged with its name.
fn spawn_service(bus: &Bus, subject: &str, name: &'static str) {
    let mut requests = bus
        .blocking_subscribe(subject, SubscribeOptions::default().group("upper"))
        .unwrap();
    let publisher = bus.publisher();
    tokio::spawn(async move {
        while let Some(Ok(Event::Message(request))) = requests.recv().await {
            let answer = format!(
                "{}:{}",
                name,
                String::from_utf8_lossy(&request.payload).to_uppercase()
            );
            publisher.reply(&request, answer).await.unwrap();
        }
    });
}

#[tokio::test]
async fn requests_reach_a_service_by_subject_load_balanced_over_its_group() {
    let bus = Bus::new();
    spawn_service(&bus, "svc.upper", "a");
    spawn_service(&bus, "svc.upper", "b");
    let mut answered_by = HashMap::new();
    for n in 0..10 {
        let reply = within(
            "reply",
            bus.request("svc.upper", format!("hi{n}"), Duration::from_secs(5)),
        )
        .await
        .unwrap();
        let text = String::from_utf8(reply.payload.to_vec()).unwrap();
        let (name, upper) = text.split_once(':').unwrap();
        assert_eq!(upper, format!("HI{n}"));
        *answered_by.entry(name.to_string()).or_insert(0) += 1;
    }
    assert_eq!(answered_by.get("a"), Some(&5));
    assert_eq!(answered_by.get("b"), Some(&5));
}

#[tokio::test(start_paused = true)]
async fn a_request_nobody_answers_fails_clearly() {
    let bus = Bus::new();
    let err = bus
        .request("svc.none", "x", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        courier_pubsub::RequestError::NoResponders("svc.none".into())
    );
    // A subscriber that never replies: the request times out.
    let _silent = bus
        .subscribe("svc.silent", SubscribeOptions::default())
        .await
        .unwrap();
    let err = bus
        .request("svc.silent", "x", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        courier_pubsub::RequestError::Timeout(Duration::from_secs(1))
    );
}

/// Drains what is buffered: (messages, missed by gaps, missed by `Dropped`).
fn drain(sub: &mut Subscription) -> (u64, u64, u64) {
    let (mut messages, mut gaps, mut unattributed) = (0, 0, 0);
    while let Some(event) = sub.try_recv() {
        match event {
            Event::Message(_) => messages += 1,
            Event::Gap { from, to, .. } => gaps += to - from,
            Event::Dropped { count } => unattributed += count,
            other => panic!("unexpected {other:?}"),
        }
    }
    (messages, gaps, unattributed)
}

/// Issue 12, E4: drops at the end of a publisher's run were never reported.
#[tokio::test]
async fn drops_at_the_end_of_a_run_are_reported_once_the_buffer_drains() {
    for policy in [SlowConsumer::DropNewest, SlowConsumer::DropOldest] {
        let bus = Bus::new();
        let mut sub = bus
            .subscribe("t", SubscribeOptions::default().buffer(2).policy(policy))
            .await
            .unwrap();
        let publisher = bus.publisher();
        for n in 0..5u8 {
            publisher.publish("t", vec![n]).await.unwrap();
        }
        assert_eq!(sub.dropped(), 3);
        let mut events = Vec::new();
        while let Some(event) = sub.try_recv() {
            events.push(event);
        }
        let gap = |from, to| Event::Gap {
            publisher: publisher.id(),
            from,
            to,
        };
        match policy {
            // 0 and 1 kept, 2..5 dropped: reported after the last message.
            SlowConsumer::DropNewest => assert_eq!(events[2], gap(2, 5), "{events:?}"),
            // 3 and 4 kept: the gap comes first, as before.
            _ => assert_eq!(events[0], gap(0, 3), "{events:?}"),
        }
        assert_eq!(events.len(), 3, "{events:?}");
        // Nothing is reported twice.
        publisher.publish("t", "again").await.unwrap();
        assert!(matches!(sub.try_recv(), Some(Event::Message(_))));
        assert_eq!(sub.try_recv(), None);
    }
}

/// Issue 12, item 7 on the bus: a subscription tracks a bounded number of
/// publishers, and what it forgets is still reported.
#[tokio::test]
async fn a_subscription_tracks_a_bounded_number_of_publishers() {
    const PUBLISHERS: u64 = 100_000;
    let bus = Bus::with_config(BusConfig::default().with_max_publishers_per_subscription(64));
    // One that keeps up (every publisher settles), one stalled (every
    // publisher but the last few leaves a drop behind).
    let mut quick = bus
        .subscribe("t", SubscribeOptions::default())
        .await
        .unwrap();
    let mut stalled = bus
        .subscribe("t", SubscribeOptions::default().buffer(16))
        .await
        .unwrap();
    let (mut got, mut most) = (0, 0);
    for _ in 0..PUBLISHERS {
        bus.publisher().publish("t", "x").await.unwrap();
        got += drain(&mut quick).0;
        most = most
            .max(quick.tracked_publishers())
            .max(stalled.tracked_publishers());
    }
    assert_eq!(got, PUBLISHERS);
    assert!(most <= 64, "tracked at most {most}");
    let (messages, gaps, unattributed) = drain(&mut stalled);
    assert_eq!(messages, 16);
    assert_eq!(
        messages + gaps + unattributed,
        PUBLISHERS,
        "all accounted for"
    );
    assert_eq!(stalled.dropped(), gaps + unattributed);
    assert!(
        unattributed > 0,
        "forgotten publishers' drops are reported too"
    );
}

/// Issue 12, E5: bytes are capped per subscription and in total, besides
/// the message count.
#[tokio::test]
async fn byte_caps_apply_the_slow_consumer_policy() {
    let size = 1000 + 1 + courier_pubsub::MESSAGE_OVERHEAD; // payload, subject "t", overhead
    let bus = Bus::with_config(
        BusConfig::default()
            .with_max_subscription_bytes(10 * size)
            .with_max_buffered_bytes(15 * size),
    );
    let mut oldest = bus
        .subscribe("t", SubscribeOptions::default())
        .await
        .unwrap();
    let mut newest = bus
        .subscribe(
            "t",
            SubscribeOptions::default().policy(SlowConsumer::DropNewest),
        )
        .await
        .unwrap();
    let publisher = bus.publisher();
    for _ in 0..50 {
        publisher.publish("t", vec![0u8; 1000]).await.unwrap();
    }
    // Each at most 10 by its own cap, both together at most 15.
    assert!(oldest.buffered_bytes() <= 10 * size);
    assert!(
        bus.buffered_bytes() <= 15 * size,
        "{}",
        bus.buffered_bytes()
    );
    assert_eq!(
        bus.buffered_bytes(),
        oldest.buffered_bytes() + newest.buffered_bytes()
    );
    for sub in [&mut oldest, &mut newest] {
        let buffered = sub.buffered() as u64;
        assert_eq!(sub.dropped(), 50 - buffered);
        let (messages, gaps, _) = drain(sub);
        assert_eq!((messages, messages + gaps), (buffered, 50));
    }
    assert_eq!(bus.buffered_bytes(), 0);
    // A message larger than the cap on its own is dropped and counted.
    let before = oldest.dropped();
    publisher.publish("t", vec![0u8; 20 * size]).await.unwrap();
    assert_eq!(oldest.dropped(), before + 1);
    assert!(matches!(oldest.try_recv(), Some(Event::Gap { .. })));
    // Dropping a subscription gives its bytes back.
    publisher.publish("t", vec![0u8; 1000]).await.unwrap();
    drop(oldest);
    drop(newest);
    assert_eq!(bus.buffered_bytes(), 0);
}

/// Under backpressure, a full total makes the publisher wait until some
/// subscription makes room.
#[tokio::test(start_paused = true)]
async fn backpressure_waits_for_room_in_the_total() {
    let size = 1000 + 1 + courier_pubsub::MESSAGE_OVERHEAD;
    let bus = Bus::with_config(BusConfig::default().with_max_buffered_bytes(3 * size));
    let mut other = bus
        .subscribe("t", SubscribeOptions::default())
        .await
        .unwrap();
    let mut waiting = bus
        .subscribe(
            "u",
            SubscribeOptions::default().policy(SlowConsumer::Backpressure),
        )
        .await
        .unwrap();
    let publisher = bus.publisher();
    for _ in 0..3 {
        publisher.publish("t", vec![0u8; 1000]).await.unwrap();
    }
    let blocked = tokio::spawn({
        let publisher = publisher.clone();
        async move { publisher.publish("u", vec![0u8; 1000]).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!blocked.is_finished(), "waits while the total is full");
    assert!(matches!(other.try_recv(), Some(Event::Message(_))));
    within("room", blocked).await.unwrap();
    assert!(matches!(waiting.try_recv(), Some(Event::Message(_))));
    assert_eq!(waiting.dropped(), 0);
}

#[tokio::test]
async fn queue_groups_cost_nothing_once_their_members_are_gone() {
    let bus = Bus::new();
    // A client inventing group names: each one's position is forgotten with
    // its last member.
    for n in 0..10_000 {
        let member = bus
            .subscribe("jobs", SubscribeOptions::default().group(format!("g{n}")))
            .await
            .unwrap();
        bus.publisher().publish("jobs", "j").await.unwrap();
        drop(member);
    }
    assert_eq!(bus.groups(), 0);
    // A live group still goes round its members.
    let a = bus
        .subscribe("jobs", SubscribeOptions::default().group("workers"))
        .await
        .unwrap();
    let b = bus
        .subscribe("jobs", SubscribeOptions::default().group("workers"))
        .await
        .unwrap();
    let publisher = bus.publisher();
    for _ in 0..4 {
        publisher.publish("jobs", "j").await.unwrap();
    }
    assert_eq!((a.buffered(), b.buffered()), (2, 2));
    assert_eq!(bus.groups(), 1);
    drop(a);
    assert_eq!(bus.groups(), 1, "b is still a member");
    drop(b);
    assert_eq!(bus.groups(), 0);
}
