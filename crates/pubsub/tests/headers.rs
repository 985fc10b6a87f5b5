//! Headers travel end to end: in process, through a host both ways, and
//! through a durable subscription's store.

use std::time::Duration;

use courier_pubsub::durable::DurableMessage;
use courier_pubsub::remote::{PubSubHost, PubSubServiceServer, RemotePubSub};
use courier_pubsub::{Bus, Event, Headers, Message, SubscribeOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};
use courier_test_support::TempDir;

fn tenant(name: &str) -> Headers {
    let mut headers = Headers::new();
    headers.insert("x-tenant", name).unwrap();
    headers.insert("x-attempt", "2").unwrap();
    headers
}

async fn message<E: std::fmt::Debug>(
    recv: impl std::future::Future<Output = Option<Result<Event, E>>>,
) -> Message {
    match tokio::time::timeout(Duration::from_secs(30), recv).await {
        Ok(Some(Ok(Event::Message(m)))) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn headers_reach_an_in_process_subscriber() {
    let bus = Bus::new();
    let mut sub = bus
        .subscribe("h.>", SubscribeOptions::default())
        .await
        .unwrap();
    bus.publisher()
        .publish_with_headers("h.a", tenant("blue"), "x")
        .await
        .unwrap();
    bus.publish("h.b", "plain").await.unwrap();
    assert_eq!(message(sub.recv()).await.headers, tenant("blue"));
    assert!(message(sub.recv()).await.headers.is_empty());
}

async fn host(bus: Bus) -> ServerHandle {
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(bus)))
        .spawn(listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_cross_a_host_both_ways() {
    let bus = Bus::new();
    let server = host(bus.clone()).await;
    let remote = RemotePubSub::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap();
    let mut far = remote
        .subscribe("h.>", SubscribeOptions::default())
        .await
        .unwrap();
    let mut near = bus
        .subscribe("h.>", SubscribeOptions::default())
        .await
        .unwrap();
    // Remote publisher to both subscribers, one way and confirmed.
    let publisher = remote.publisher();
    publisher
        .publish_with_headers("h.remote", tenant("green"), "x")
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(message(near.recv()).await.headers, tenant("green"));
    assert_eq!(message(far.recv()).await.headers, tenant("green"));
    // In-process publisher to the remote subscriber.
    bus.publisher()
        .publish_with_headers("h.local", tenant("red"), "y")
        .await
        .unwrap();
    assert_eq!(message(far.recv()).await.headers, tenant("red"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_survive_a_durable_subscription() {
    use courier_pubsub::durable::Durable;
    use courier_queue::remote::{QueueHost, QueueServiceServer};
    use courier_queue::QueueSet;
    let dir = TempDir::new("headers-durable");
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    let queues = QueueSet::new(dir.path(), Default::default());
    let durable = Durable::open(queues.clone()).await.unwrap();
    let server = Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::with_durable(
            Bus::new(),
            durable,
        )))
        .service(QueueServiceServer::new(QueueHost::serving(queues)))
        .spawn(listener);
    let remote = RemotePubSub::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap();
    let audit = remote.durable("audit", "h.>").await.unwrap();
    let publisher = remote.publisher();
    publisher
        .publish_with_headers("h.kept", tenant("amber"), "stored")
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    let mut consumer = audit.consumer(1).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .unwrap()
        .unwrap();
    let stored = DurableMessage::decode(&delivery.payload).unwrap();
    assert_eq!(stored.headers, tenant("amber"));
    assert_eq!(&stored.payload[..], b"stored");
}

/// In process too, a durable subscription stores the headers the live
/// subscribers get, the publish's trace included.
#[tokio::test]
async fn an_in_process_durable_publish_stores_the_live_headers_and_trace() {
    use courier_pubsub::durable::Durable;
    use courier_queue::QueueSet;
    use courier_transport::trace::{self, TraceContext};
    let dir = TempDir::new("headers-durable-local");
    let durable = Durable::open(QueueSet::new(dir.path(), Default::default()))
        .await
        .unwrap();
    let audit = durable.subscribe("audit", "h.>").await.unwrap();
    let bus = Bus::new();
    let mut live = bus
        .subscribe("h.>", SubscribeOptions::default())
        .await
        .unwrap();
    let root = TraceContext::root();
    trace::scope(
        root,
        durable.publish_with_headers(&bus.publisher(), "h.kept", tenant("amber"), "stored"),
    )
    .await
    .unwrap();
    let Some(Ok(Event::Message(message))) = live.recv().await else {
        panic!("the live subscriber got nothing")
    };
    let mut consumer = audit.consumer(1).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .unwrap()
        .unwrap();
    let stored = DurableMessage::decode(&delivery.payload).unwrap();
    assert_eq!(stored.headers, message.headers);
    assert_eq!(stored.headers.get("x-tenant"), Some("amber"));
    assert_eq!(message.trace_context(), Some(root));
}
