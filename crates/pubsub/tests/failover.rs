//! A remote bus over a client that knows two hosts: when the host its
//! subscription lives on dies, the subscription restores itself on the
//! other, and receives what is published there afterwards.
//!
//! The two hosts serve two separate buses, so what arrives after the
//! restore can only have come through the second host.

use std::time::Duration;

use courier_pubsub::remote::{
    PubSubHost, PubSubServiceServer, RemotePubSub, RemotePubSubError, RemoteSubscription,
};
use courier_pubsub::{Bus, Event, SubscribeOptions};
use courier_rpc::{Client, ClientConfig, Server, ServerConfig, ServerHandle};
use courier_transport::Address;

/// A bound for waits that only a bug would make long.
const PATIENCE: Duration = Duration::from_secs(30);

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

async fn next(sub: &mut RemoteSubscription) -> Event {
    tokio::time::timeout(PATIENCE, sub.recv())
        .await
        .expect("an event in time")
        .expect("the subscription is open")
        .unwrap()
}

async fn message(sub: &mut RemoteSubscription) -> String {
    match next(sub).await {
        Event::Message(m) => String::from_utf8(m.payload.to_vec()).unwrap(),
        other => panic!("{other:?}"),
    }
}

/// Waits (at most 3,000 turns of 10 ms) until `bus` has `count`
/// subscriptions: the host subscribes before the client hears it did, but
/// a bus seen from outside may lag by a turn.
async fn until_subscribed(bus: &Bus, count: usize) {
    for _ in 0..3_000 {
        if bus.subscriptions() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the subscription never reached the bus");
}

#[tokio::test]
async fn a_subscription_restores_itself_on_the_next_host_when_its_host_dies() {
    let (bus_a, bus_b) = (Bus::new(), Bus::new());
    let (server_a, a) = host(&bus_a).await;
    let (_server_b, b) = host(&bus_b).await;
    let client = Client::lazy_any(&[a.clone(), b.clone()], ClientConfig::default()).unwrap();
    let remote = RemotePubSub::with_client(client.clone());

    let mut sub = remote
        .subscribe("fail.>", SubscribeOptions::default())
        .await
        .unwrap();
    assert_eq!(client.address(), a);
    until_subscribed(&bus_a, 1).await;
    assert_eq!(bus_b.subscriptions(), 0);
    let publisher = remote.publisher();
    assert_eq!(
        publisher
            .publish_confirmed("fail.one", "on a")
            .await
            .unwrap(),
        1
    );
    assert_eq!(message(&mut sub).await, "on a");

    // A goes: the subscription comes back on B by itself.
    server_a.shutdown(Duration::ZERO).await;
    assert_eq!(next(&mut sub).await, Event::Restored);
    assert_eq!(sub.restored(), 1);
    assert_eq!(client.address(), b);
    until_subscribed(&bus_b, 1).await;

    // Published on B's bus, in process: it can only arrive through B.
    bus_b.publisher().publish("fail.two", "on b").await.unwrap();
    assert_eq!(message(&mut sub).await, "on b");

    // The publishers' own connection (a separate client over the same
    // list) moves to B as well. Its connection to A died with A: a publish
    // sent before it noticed fails (it is never resent), the next goes to B.
    let mut delivered = None;
    for _ in 0..100 {
        match publisher.publish_confirmed("fail.three", "via b").await {
            Ok(count) => {
                delivered = Some(count);
                break;
            }
            Err(err) => {
                let retryable = matches!(&err, RemotePubSubError::Rpc(e) if e.is_retryable());
                assert!(retryable, "{err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    assert_eq!(
        delivered,
        Some(1),
        "delivered on B to the restored subscription"
    );
    assert_eq!(message(&mut sub).await, "via b");
}
