//! Receiving is cancel-safe on both faces: a `select!` loop that keeps
//! dropping receive futures (the losing branch) still gets every message,
//! in order, and a subscription whose host dies restores itself even when
//! every receive is dropped long before the restore is done.

use std::pin::Pin;
use std::time::Duration;

use courier_pubsub::remote::{PubSubHost, PubSubServiceServer, RemotePubSub};
use courier_pubsub::{Bus, Event, PubSub, SubscribeOptions, Subscriber};
use courier_rpc::{Client, ClientConfig, Server, ServerConfig, ServerHandle};
use courier_transport::Address;

const MESSAGES: u32 = 2_000;

async fn host(bus: &Bus) -> (ServerHandle, Address) {
    let any: Address = "tcp://127.0.0.1:0".parse().unwrap();
    let listener = courier_transport::bind(&any, &Default::default())
        .await
        .unwrap();
    let server = Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(bus.clone())))
        .spawn(listener);
    let address = server.local_addr().clone();
    (server, address)
}

/// The next item of a subscription's stream face.
async fn next<S: Subscriber>(sub: &mut S) -> Option<Result<Event, S::Error>> {
    std::future::poll_fn(|cx| Pin::new(&mut *sub).poll_next(cx)).await
}

/// Publishes `MESSAGES` numbered messages on `bus` from a task of its own,
/// and receives them through `sub` in a loop whose other `select!` branch
/// wins whenever the receive has to wait, dropping it. Returns how many
/// receives were dropped.
async fn receive_all_while_dropping<P: PubSub>(
    bus: &P,
    mut sub: P::Subscription,
    stream: bool,
) -> u64 {
    let publisher = bus.publisher();
    let publishing = tokio::spawn(async move {
        use courier_pubsub::Publish;
        for n in 0..MESSAGES {
            publisher
                .publish("cancel.n", n.to_le_bytes().to_vec())
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
    });
    let mut expected = 0u32;
    let mut dropped = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while expected < MESSAGES {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stuck at {expected}"
        );
        let event = tokio::select! {
            biased;
            // Pending on its first poll, ready on the next: it wins every
            // time the receive did not complete at once.
            () = tokio::task::yield_now() => {
                dropped += 1;
                continue;
            }
            event = async { if stream { next(&mut sub).await } else { sub.recv().await } } => event,
        };
        match event {
            Some(Ok(Event::Message(m))) => {
                let n = u32::from_le_bytes(m.payload[..].try_into().unwrap());
                assert_eq!(n, expected, "a message lost or out of order");
                expected += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    publishing.await.unwrap();
    dropped
}

fn options() -> SubscribeOptions {
    SubscribeOptions::default().buffer(MESSAGES as usize)
}

#[tokio::test]
async fn dropped_receives_lose_nothing_in_process() {
    for stream in [false, true] {
        let bus = Bus::new();
        let sub = bus.subscribe("cancel.>", options()).await.unwrap();
        let dropped = receive_all_while_dropping(&bus, sub, stream).await;
        assert!(
            dropped > 0,
            "no receive was ever dropped (stream: {stream})"
        );
    }
}

#[tokio::test]
async fn dropped_receives_lose_nothing_over_a_host() {
    let bus = Bus::new();
    let (_server, address) = host(&bus).await;
    for stream in [false, true] {
        let remote = RemotePubSub::connect(&address, ClientConfig::default())
            .await
            .unwrap();
        let sub = remote.subscribe("cancel.>", options()).await.unwrap();
        let dropped = receive_all_while_dropping(&remote, sub, stream).await;
        assert!(
            dropped > 0,
            "no receive was ever dropped (stream: {stream})"
        );
    }
}

#[tokio::test]
async fn a_restore_carries_on_across_dropped_receives() {
    let (bus_a, bus_b) = (Bus::new(), Bus::new());
    let (server_a, a) = host(&bus_a).await;
    let (_server_b, b) = host(&bus_b).await;
    let client = Client::lazy_any(&[a, b], ClientConfig::default()).unwrap();
    let remote = RemotePubSub::with_client(client);
    let mut sub = remote
        .subscribe("fail.>", SubscribeOptions::default())
        .await
        .unwrap();
    server_a.shutdown(Duration::ZERO).await;
    // Every receive is dropped after 1 ms; the restore's first backoff
    // alone is longer, so only a restore that survives its receive being
    // dropped ever completes.
    let mut dropped = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let event = loop {
        assert!(tokio::time::Instant::now() < deadline, "never restored");
        tokio::select! {
            event = sub.recv() => break event,
            () = tokio::time::sleep(Duration::from_millis(1)) => dropped += 1,
        }
    };
    assert!(matches!(event, Some(Ok(Event::Restored))), "{event:?}");
    assert!(dropped > 0);
    assert_eq!(sub.restored(), 1);
    // Restored on B: what is published there arrives.
    for _ in 0..3_000 {
        if bus_b.subscriptions() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bus_b.publish("fail.after", "on b").await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .unwrap();
    let Some(Ok(Event::Message(m))) = event else {
        panic!("{event:?}")
    };
    assert_eq!(&m.payload[..], b"on b");
}

/// A stream poll that gave up (its `select!` branch lost) and a later
/// `recv` share one wait: the message published next wakes the `recv`,
/// not a waiter nobody polls any more.
#[tokio::test]
async fn a_recv_after_an_abandoned_stream_poll_is_woken() {
    let bus = Bus::new();
    let mut sub = bus
        .subscribe("mixed.>", SubscribeOptions::default())
        .await
        .unwrap();
    tokio::select! {
        _ = next(&mut sub) => panic!("nothing was published"),
        () = tokio::task::yield_now() => {}
    }
    let publisher = bus.publisher();
    let receive = tokio::spawn(async move {
        match sub.recv().await {
            Some(Ok(Event::Message(message))) => message.payload,
            other => panic!("{other:?}"),
        }
    });
    tokio::task::yield_now().await;
    publisher.publish("mixed.one", "once").await.unwrap();
    let payload = tokio::time::timeout(Duration::from_secs(30), receive)
        .await
        .expect("the recv was woken by the one message")
        .unwrap();
    assert_eq!(&payload[..], b"once");
}

#[test]
fn subscriptions_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<courier_pubsub::Subscription>();
    send_sync::<courier_pubsub::remote::RemoteSubscription>();
}
