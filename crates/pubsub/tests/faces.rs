//! One program, written once against the traits, run unchanged on the
//! in-process bus and on a remote bus over a real host.

use std::time::Duration;

use courier_pubsub::remote::{PubSubHost, PubSubServiceServer, RemotePubSub};
use courier_pubsub::{Bus, Event, Message, PubSub, Publish, SubscribeOptions, Subscriber};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};

async fn host(bus: Bus) -> ServerHandle {
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(bus)))
        .spawn(listener)
}

/// The next message, skipping nothing else (any other event fails).
async fn message<S: Subscriber>(sub: &mut S) -> Message {
    match tokio::time::timeout(Duration::from_secs(30), sub.recv()).await {
        Ok(Some(Ok(Event::Message(m)))) => m,
        Ok(Some(Ok(other))) => panic!("expected a message, got {other:?}"),
        Ok(Some(Err(err))) => panic!("recv failed: {err}"),
        Ok(None) => panic!("the subscription ended"),
        Err(_) => panic!("no message within 30 s"),
    }
}

/// Whether anything arrives within a short while (used only to show that
/// nothing does; a message that came late would still fail a later check).
async fn quiet<S: Subscriber>(sub: &mut S) -> bool {
    tokio::time::timeout(Duration::from_millis(200), sub.recv())
        .await
        .is_err()
}

/// The program: wildcard subscriptions, a queue group, publishing (one at a
/// time and in a batch), request-reply through a group-served responder,
/// and unsubscribing by dropping.
async fn program<P: PubSub>(bus: P) {
    let mut all = bus
        .subscribe("orders.>", SubscribeOptions::default())
        .await
        .unwrap();
    let mut eu = bus
        .subscribe("orders.eu.*", SubscribeOptions::default())
        .await
        .unwrap();
    let mut first = bus
        .subscribe_group("jobs", "workers", SubscribeOptions::default())
        .await
        .unwrap();
    let mut second = bus
        .subscribe_group("jobs", "workers", SubscribeOptions::default())
        .await
        .unwrap();

    let publisher = bus.publisher();
    publisher.publish("orders.eu.created", "tea").await.unwrap();
    publisher
        .publish("orders.us.created", "coffee")
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    let (tea, coffee) = (message(&mut all).await, message(&mut all).await);
    assert_eq!(
        (&tea.payload[..], &coffee.payload[..]),
        (&b"tea"[..], &b"coffee"[..])
    );
    assert_eq!(
        (tea.seq, coffee.seq),
        (0, 1),
        "one publisher, numbered in order"
    );
    assert_eq!(tea.publisher, coffee.publisher);
    let m = message(&mut eu).await;
    assert_eq!(m.subject.as_str(), "orders.eu.created");

    // A queue group: each job to exactly one member.
    bus.publish_batch((0..10u8).map(|n| ("jobs", vec![n])))
        .await
        .unwrap();
    let mut jobs = Vec::new();
    for _ in 0..10 {
        tokio::select! {
            Some(Ok(Event::Message(m))) = first.recv() => jobs.push(m.payload[0]),
            Some(Ok(Event::Message(m))) = second.recv() => jobs.push(m.payload[0]),
        }
    }
    jobs.sort_unstable();
    assert_eq!(jobs, (0..10).collect::<Vec<_>>());
    assert!(quiet(&mut first).await && quiet(&mut second).await);

    // Request-reply, the responder in a queue group of its own.
    let mut requests = bus
        .subscribe_group("svc.upper", "svc", SubscribeOptions::default())
        .await
        .unwrap();
    let responder = bus.publisher();
    let service = tokio::spawn(async move {
        while let Some(Ok(Event::Message(request))) = requests.recv().await {
            let answer = String::from_utf8_lossy(&request.payload).to_uppercase();
            responder.reply(&request, answer).await.unwrap();
        }
    });
    let reply = bus
        .request("svc.upper", "hello", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"HELLO");
    service.abort();

    // Unsubscribe by drop: `eu` goes, `all` still gets what `eu` would have.
    drop(eu);
    let confirmed = bus.publisher();
    // Until the host has torn `eu` down it may still count; after that
    // exactly one live subscription matches.
    let mut reached = u64::MAX;
    for _ in 0..3000 {
        reached = confirmed
            .publish_confirmed("orders.eu.deleted", "gone")
            .await
            .unwrap();
        assert_eq!(&message(&mut all).await.payload[..], b"gone");
        if reached == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reached, 1, "the dropped subscription was never removed");
}

#[tokio::test]
async fn one_program_runs_on_the_in_process_bus() {
    program(Bus::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_program_runs_on_a_remote_bus() {
    let server = host(Bus::new()).await;
    let remote = RemotePubSub::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap();
    program(remote).await;
}
