//! The broker in process: configuration, several listeners, metrics over
//! HTTP, restart with the same data directory, one broker per directory.

use courier_test_support::TempDir;
use std::time::Duration;

use courier_broker::{Broker, BrokerConfig, BrokerServiceClient};
use courier_pubsub::remote::RemotePubSub;
use courier_pubsub::{Event, SubscribeOptions};
use courier_queue::remote::RemoteQueue;
use courier_rpc::{Client, ClientConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(dir: &TempDir) -> BrokerConfig {
    let mut config = BrokerConfig::default();
    config.listen = vec![
        "tcp://127.0.0.1:0".into(),
        format!("unix://{}", dir.0.join("broker.sock").display()),
    ];
    config.data_dir = dir.0.join("data");
    config.metrics = "127.0.0.1:0".into();
    config.shutdown_grace_ms = 500;
    config
}

async fn client(address: &courier_transport::Address) -> Client {
    Client::connect(address, ClientConfig::default())
        .await
        .unwrap()
}

async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: courier\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[test]
fn the_defaults_work_without_a_file_and_mistakes_in_a_file_are_named() {
    let defaults = BrokerConfig::default();
    assert_eq!(defaults.addresses().unwrap().len(), 1);
    assert!(defaults.metrics_address().unwrap().is_some());
    assert_eq!(BrokerConfig::parse("").unwrap(), defaults);

    let config = BrokerConfig::parse(
        "listen = [\"tcp://127.0.0.1:9000\", \"unix:///tmp/c.sock\"]\nfsync = \"never\"\nmetrics = \"\"",
    )
    .unwrap();
    assert_eq!(config.addresses().unwrap().len(), 2);
    assert_eq!(config.metrics_address().unwrap(), None);

    let typo = BrokerConfig::parse("lisen = []").unwrap_err();
    assert!(typo.contains("lisen"), "{typo}");
    let wrong = BrokerConfig::parse("fsync = \"sometimes\"").unwrap_err();
    assert!(wrong.contains("sometimes"), "{wrong}");
    let mut bad = BrokerConfig::default();
    bad.listen = vec!["http://x".into()];
    assert!(bad.addresses().unwrap_err().to_string().contains("listen"));
    bad.metrics = "nowhere".into();
    assert!(bad
        .metrics_address()
        .unwrap_err()
        .to_string()
        .contains("nowhere"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broker_serves_tcp_and_unix_and_reports_metrics() {
    let dir = TempDir::new("serve");
    let broker = Broker::start(config(&dir)).await.unwrap();
    let [tcp, unix] = broker.addresses() else {
        panic!("two addresses")
    };
    // A subscriber on the unix socket hears a publisher on tcp.
    let subscriber = RemotePubSub::with_client(client(unix).await);
    let mut sub = subscriber
        .subscribe("metrics.>", SubscribeOptions::default())
        .await
        .unwrap();
    let publisher = RemotePubSub::with_client(client(tcp).await).publisher();
    assert_eq!(
        publisher
            .publish_confirmed("metrics.test", "hi")
            .await
            .unwrap(),
        1
    );
    let Some(Ok(Event::Message(m))) = sub.recv().await else {
        panic!("a message")
    };
    assert_eq!(&m.payload[..], b"hi");
    let queue = RemoteQueue::with_client(client(tcp).await, "metered");
    queue
        .enqueue(courier_queue::Message::new("job"))
        .await
        .unwrap();

    // The same counters over RPC and over HTTP.
    let stats = BrokerServiceClient::new(client(tcp).await)
        .stats()
        .await
        .unwrap();
    assert_eq!((stats.published, stats.delivered), (1, 1));
    assert!(stats.connections >= 3, "{stats:?}");
    assert_eq!(stats.publish_latency.iter().sum::<u64>(), 1);
    let metered = stats.queues.iter().find(|q| q.name == "metered").unwrap();
    assert_eq!(metered.stats.depth, 1);

    let metrics = broker.metrics_address().unwrap();
    let page = http_get(metrics, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    for line in [
        "courier_published_total 1",
        "courier_delivered_total 1",
        "courier_queue_depth{queue=\"metered\"} 1",
        "courier_publish_seconds_count 1",
        "# TYPE courier_publish_seconds histogram",
    ] {
        assert!(page.contains(line), "missing {line:?} in\n{page}");
    }
    assert!(http_get(metrics, "/other")
        .await
        .starts_with("HTTP/1.1 404"));
    // Not HTTP at all: refused, and the endpoint keeps serving.
    let mut junk = tokio::net::TcpStream::connect(metrics).await.unwrap();
    junk.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    junk.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(http_get(metrics, "/metrics")
        .await
        .contains("courier_connections"));
    drop(sub);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_brings_back_queues_durable_subscriptions_and_unacknowledged_messages() {
    let dir = TempDir::new("restart");
    let broker = Broker::start(config(&dir)).await.unwrap();
    let tcp = broker.addresses()[0].clone();
    let queue = RemoteQueue::with_client(client(&tcp).await, "orders");
    for n in 0..10 {
        queue
            .enqueue(courier_queue::Message::new(format!("order {n}")))
            .await
            .unwrap();
    }
    // Three taken and acknowledged, two taken and left unacknowledged.
    {
        let mut consumer = queue.consumer(5).await.unwrap();
        for n in 0..5 {
            let delivery = consumer.recv().await.unwrap();
            if n < 3 {
                delivery.ack().await.unwrap();
            } else {
                std::mem::forget(delivery);
            }
        }
    }
    let bus = RemotePubSub::with_client(client(&tcp).await);
    bus.durable("audit", "orders.>").await.unwrap();
    let publisher = bus.publisher();
    publisher
        .publish("orders.kept", "while nobody listens")
        .await
        .unwrap();
    // One way: flush to know the broker has it before it stops.
    publisher.flush().await.unwrap();
    broker.shutdown().await;

    // A second broker on the same directory while the first runs: refused.
    let broker = Broker::start(config(&dir)).await.unwrap();
    let mut twin = config(&dir);
    twin.listen = vec!["tcp://127.0.0.1:0".into()];
    twin.metrics = String::new();
    let refused = Broker::start(twin).await.unwrap_err().to_string();
    assert!(refused.contains("in use"), "{refused}");

    let stats = broker.stats().await;
    let orders = stats.queues.iter().find(|q| q.name == "orders").unwrap();
    assert_eq!(orders.stats.depth, 7, "{stats:?}");
    assert_eq!(
        stats.durable,
        vec![("audit".to_string(), "orders.>".to_string())]
    );
    let tcp = broker.addresses()[0].clone();
    let bus = RemotePubSub::with_client(client(&tcp).await);
    let audit = bus.durable("audit", "orders.>").await.unwrap();
    let mut consumer = audit.consumer(1).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .unwrap()
        .unwrap();
    let message = courier_pubsub::durable::DurableMessage::decode(&delivery.payload).unwrap();
    assert_eq!(&message.payload[..], b"while nobody listens");
    delivery.ack().await.unwrap();
    drop(consumer);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_remote_subscriber_accounts_for_every_message_through_the_broker() {
    let dir = TempDir::new("slow-accounting");
    let broker = Broker::start(config(&dir)).await.unwrap();
    let tcp = &broker.addresses()[0];
    let mut slow = RemotePubSub::with_client(client(tcp).await)
        .subscribe(
            "acct.>",
            SubscribeOptions::default()
                .buffer(16)
                .policy(courier_pubsub::SlowConsumer::DropNewest),
        )
        .await
        .unwrap();
    let publisher = RemotePubSub::with_client(client(tcp).await).publisher();
    let total = 5_000u64;
    for n in 0..total {
        publisher
            .publish("acct.x", n.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    // Read everything there is, slowly at first, until the broker has been
    // quiet for a while.
    let (mut received, mut missed) = (0u64, 0u64);
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(2), slow.recv()).await {
        match event.unwrap() {
            Event::Message(_) => {
                received += 1;
                if received < 50 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Event::Gap { from, to, .. } => missed += to - from,
            Event::Dropped { count } => missed += count,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        received + missed,
        total,
        "received {received}, missed {missed}"
    );
    assert_eq!(slow.dropped(), missed);
    broker.shutdown().await;
}
