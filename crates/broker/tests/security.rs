//! The broker behind TLS with tokens and client certificates: who gets in,
//! what each identity may do (every permission kind, allowed and denied),
//! and that a denial leaves the connection usable.

use courier_test_support::TempDir;
use std::time::Duration;

use courier_broker::auth::{AuthConfig, UserConfig};
use courier_broker::{Broker, BrokerConfig, BrokerServiceClient};
use courier_pubsub::remote::{RemoteError, RemotePubSub, RemotePubSubError};
use courier_pubsub::{Event, SubscribeOptions};
use courier_queue::remote::{RemoteQueue, RemoteQueueError};
use courier_rpc::{Client, ClientConfig, RpcError, Secret};
use courier_transport::tls::{generate_dev_certs, DevCerts, Validity};
use courier_transport::{TlsClient, TransportConfig};

fn user(name: &str, token: Option<&str>) -> UserConfig {
    UserConfig {
        name: name.into(),
        token: token.map(Secret::new),
        ..Default::default()
    }
}

/// Development certificates for a loopback server, and client ones.
fn server_certs(dir: &TempDir, clients: &[String]) -> DevCerts {
    generate_dev_certs(
        &dir.0.join("certs"),
        &["localhost".into(), "127.0.0.1".into()],
        clients,
        Validity::default(),
    )
    .unwrap()
}

fn secured(dir: &TempDir, certs: &DevCerts, mutual: bool) -> BrokerConfig {
    let mut config = BrokerConfig::default();
    config.listen = vec!["tls://127.0.0.1:0".into()];
    config.data_dir = dir.0.join("data");
    config.metrics = String::new();
    config.shutdown_grace_ms = 100;
    config.tls_cert = Some(certs.server_cert.clone());
    config.tls_key = Some(certs.server_key.clone());
    if mutual {
        config.tls_client_ca = Some(certs.ca_cert.clone());
    }
    let mut alice = user("alice", Some("alice-secret-token"));
    alice.publish = vec!["orders.>".into()];
    alice.subscribe = vec!["orders.>".into()];
    alice.request = vec!["svc.tax".into()];
    alice.produce = vec!["jobs".into()];
    alice.consume = vec!["jobs".into()];
    let mut ops = user("ops", Some("ops-secret-token"));
    ops.admin = true;
    // The tax service answers requests: it subscribes to its subject.
    let mut tax = user("tax", Some("tax-secret-token"));
    tax.subscribe = vec!["svc.tax".into()];
    config.auth = AuthConfig {
        required: true,
        users: vec![alice, ops, tax],
    };
    config
}

fn client_config(certs: &DevCerts, token: Option<&str>) -> ClientConfig {
    let mut config = ClientConfig::default();
    config.transport =
        TransportConfig::default().with_tls_client(TlsClient::trusting(&certs.ca_cert).unwrap());
    config.token = token.map(Secret::new);
    config.timeout = Duration::from_secs(30);
    config
}

fn denied_pubsub(err: &RemotePubSubError) -> bool {
    matches!(
        err,
        RemotePubSubError::Remote(RemoteError::PermissionDenied(_))
    )
}

fn denied_queue(err: &RemoteQueueError) -> bool {
    matches!(
        err,
        RemoteQueueError::Queue(courier_queue::remote::RemoteError::PermissionDenied(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_permission_is_enforced_and_a_denial_leaves_the_connection_usable() {
    let dir = TempDir::new("perms");
    let certs = server_certs(&dir, &[]);
    let config = secured(&dir, &certs, false);
    assert!(
        !format!("{config:?}").contains("alice-secret-token"),
        "tokens never appear in the configuration's Debug form"
    );
    let broker = Broker::start(config).await.unwrap();
    let address = broker.addresses()[0].clone();
    assert_eq!(address.scheme(), "tls");

    // Wrong, missing and right tokens.
    let err = Client::connect(&address, client_config(&certs, Some("guess")))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Unauthenticated(_)), "{err}");
    assert!(!err.to_string().contains("guess"));
    let err = Client::connect(&address, client_config(&certs, None))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Unauthenticated(_)), "{err}");
    let alice = Client::connect(&address, client_config(&certs, Some("alice-secret-token")))
        .await
        .unwrap();

    // Publish and subscribe.
    let bus = RemotePubSub::with_client(alice.clone());
    let mut orders = bus
        .subscribe("orders.eu.*", SubscribeOptions::default())
        .await
        .unwrap();
    let err = bus
        .subscribe("payments.>", SubscribeOptions::default())
        .await
        .unwrap_err();
    assert!(denied_pubsub(&err), "{err}");
    let err = bus
        .subscribe(">", SubscribeOptions::default())
        .await
        .unwrap_err();
    assert!(denied_pubsub(&err), "wider than allowed: {err}");
    let publisher = bus.publisher();
    let err = publisher
        .publish_confirmed("payments.eu", "x")
        .await
        .unwrap_err();
    assert!(denied_pubsub(&err), "{err}");
    // One way, the denial comes with the next flush.
    publisher.publish("payments.eu", "x").await.unwrap();
    let err = publisher.flush().await.unwrap_err();
    assert!(
        matches!(&err, RemotePubSubError::Remote(RemoteError::Refused { count: 1, first })
            if matches!(**first, RemoteError::PermissionDenied(_))),
        "{err}"
    );
    assert_eq!(
        publisher
            .publish_confirmed("orders.eu.created", "ok")
            .await
            .unwrap(),
        1
    );
    let Some(Ok(Event::Message(m))) = orders.recv().await else {
        panic!("a message")
    };
    assert_eq!(&m.payload[..], b"ok");

    // Requests: the tax service answers; alice may ask it, not others.
    let tax = RemotePubSub::with_client(
        Client::connect(&address, client_config(&certs, Some("tax-secret-token")))
            .await
            .unwrap(),
    );
    let mut questions = tax
        .subscribe("svc.tax", SubscribeOptions::default().group("tax"))
        .await
        .unwrap();
    let answers = tax.publisher();
    tokio::spawn(async move {
        while let Some(Ok(Event::Message(q))) = questions.recv().await {
            answers.reply(&q, "19%").await.unwrap();
        }
    });
    let reply = bus
        .request("svc.tax", "rate?", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"19%");
    let err = bus
        .request("svc.payroll", "?", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(denied_pubsub(&err), "{err}");

    // Produce and consume.
    let jobs = RemoteQueue::with_client(alice.clone(), "jobs");
    jobs.enqueue(courier_queue::Message::new("job"))
        .await
        .unwrap();
    let secrets = RemoteQueue::with_client(alice.clone(), "secrets");
    let err = secrets
        .enqueue(courier_queue::Message::new("x"))
        .await
        .unwrap_err();
    assert!(denied_queue(&err), "{err}");
    let mut denied = secrets.consumer(1).await.unwrap();
    let err = denied.recv().await.unwrap_err();
    assert!(denied_queue(&err), "{err}");
    let mut consumer = jobs.consumer(1).await.unwrap();
    let delivery = consumer.recv().await.unwrap();
    assert_eq!(&delivery.payload[..], b"job");
    delivery.ack().await.unwrap();

    // Broker stats: for admins only.
    let err = BrokerServiceClient::new(alice.clone())
        .stats()
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::PermissionDenied(_)), "{err}");
    let ops = Client::connect(&address, client_config(&certs, Some("ops-secret-token")))
        .await
        .unwrap();
    let stats = BrokerServiceClient::new(ops).stats().await.unwrap();
    assert!(stats.published >= 1);

    // After all those denials, alice's connection still works.
    assert_eq!(
        publisher
            .publish_confirmed("orders.eu.created", "still")
            .await
            .unwrap(),
        1
    );
    drop((orders, consumer, denied));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_an_identity_and_no_certificate_gets_nowhere() {
    let dir = TempDir::new("mtls");
    let certs = server_certs(&dir, &["alice".into(), "mallory".into()]);
    let broker = Broker::start(secured(&dir, &certs, true)).await.unwrap();
    let address = broker.addresses()[0].clone();
    let with_cert = |name: &str| {
        let (_, cert, key) = certs.clients.iter().find(|(n, _, _)| n == name).unwrap();
        let mut config = ClientConfig::default();
        config.transport = TransportConfig::default()
            .with_tls_client(TlsClient::with_identity(&certs.ca_cert, cert, key).unwrap());
        config
    };
    // alice's certificate carries her identity: no token needed.
    let alice = RemotePubSub::connect(&address, with_cert("alice"))
        .await
        .unwrap();
    assert_eq!(
        alice
            .publisher()
            .publish_confirmed("orders.eu.x", "hi")
            .await
            .unwrap(),
        0
    );
    // mallory is a valid certificate but not a configured user: nothing.
    let mallory = RemotePubSub::connect(&address, with_cert("mallory"))
        .await
        .unwrap();
    let err = mallory
        .publisher()
        .publish_confirmed("orders.eu.x", "hi")
        .await
        .unwrap_err();
    assert!(denied_pubsub(&err), "{err}");
    // No certificate at all: refused during the TLS handshake.
    assert!(
        RemotePubSub::connect(&address, client_config(&certs, Some("alice-secret-token")))
            .await
            .is_err()
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_broker_keeps_connections_for_its_admins() {
    let dir = TempDir::new("reserved");
    let certs = server_certs(&dir, &[]);
    let mut config = secured(&dir, &certs, false);
    config.max_connections = 3;
    config.reserved_admin_connections = 1;
    let broker = Broker::start(config).await.unwrap();
    let address = broker.addresses()[0].clone();
    let alice = || Client::connect(&address, client_config(&certs, Some("alice-secret-token")));
    let _a1 = alice().await.unwrap();
    let _a2 = alice().await.unwrap();
    let err = alice().await.unwrap_err();
    assert!(
        matches!(err, RpcError::TooManyConnections { limit: 2, .. }),
        "{err}"
    );
    // The operator still gets in, and sees the broker full.
    let ops = Client::connect(&address, client_config(&certs, Some("ops-secret-token")))
        .await
        .unwrap();
    let stats = BrokerServiceClient::new(ops).stats().await.unwrap();
    assert_eq!(stats.connections, 3);
    broker.shutdown().await;
}
