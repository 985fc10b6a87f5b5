//! The messaging shell between real nodes, over in-process and TCP links.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use courier_messaging::*;
use courier_transport::{Address, Heartbeat, TransportConfig};

fn mem(name: &str) -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "node-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn receiver_at(address: Address) -> Node {
    Node::start(NodeConfig::listening(address)).await.unwrap()
}

async fn sender_node() -> Node {
    Node::start(NodeConfig::default()).await.unwrap()
}

/// Bounds every wait: a hang fails the test instead of stalling CI.
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within 30 s"))
}

#[tokio::test]
async fn every_delivery_mode_delivers_over_mem_and_tcp() {
    for address in [mem("modes"), "tcp://127.0.0.1:0".parse().unwrap()] {
        let receiver = receiver_at(address).await;
        let sender = sender_node().await;
        for (i, (mode, progress)) in [
            (Delivery::AtMostOnce, Progress::Written),
            (Delivery::AtLeastOnce, Progress::Acknowledged),
            (Delivery::EffectivelyOnce, Progress::Acknowledged),
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("box{i}");
            let mut mailbox = receiver.mailbox::<(u32, String)>(&name).unwrap();
            let to = sender.sender::<(u32, String)>(&receiver.addresses()[0], &name, mode);
            for n in 0..100u32 {
                assert_eq!(
                    to.send((n, format!("m{n}"))).await.unwrap(),
                    progress,
                    "{mode:?}"
                );
            }
            for n in 0..100u32 {
                let envelope = within("receive", mailbox.recv()).await.unwrap();
                assert_eq!(envelope.body, (n, format!("m{n}")), "{mode:?}: in order");
                assert_eq!(envelope.from, sender.id());
            }
            assert!(mailbox.try_recv().is_none(), "{mode:?}: nothing extra");
        }
    }
}

#[tokio::test]
async fn a_different_message_type_is_refused_by_name_and_handed_back() {
    let receiver = receiver_at(mem("schema")).await;
    let _orders = receiver.mailbox::<String>("orders").unwrap();
    let sender = sender_node().await;
    let wrong = sender.sender::<u64>(&receiver.addresses()[0], "orders", Delivery::AtLeastOnce);
    let err = within("send", wrong.send(42)).await.unwrap_err();
    let SendErrorKind::Rejected(Rejection::SchemaMismatch {
        endpoint,
        expected_type,
    }) = &err.kind
    else {
        panic!("{err:?}");
    };
    assert_eq!(endpoint, "orders");
    assert!(expected_type.contains("String"), "{expected_type}");
    assert!(
        err.to_string().contains("String"),
        "the error names the type: {err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(err.into_inner(), 42);
}

#[tokio::test]
async fn a_missing_endpoint_is_refused() {
    let receiver = receiver_at(mem("missing")).await;
    let sender = sender_node().await;
    let to = sender.sender::<String>(
        &receiver.addresses()[0],
        "nobody",
        Delivery::EffectivelyOnce,
    );
    let err = within("send", to.send("hi".into())).await.unwrap_err();
    assert!(
        matches!(&err.kind, SendErrorKind::Rejected(Rejection::NoSuchEndpoint { endpoint }) if endpoint == "nobody"),
        "{err:?}"
    );

    // A mailbox that is dropped closes its endpoint.
    let mailbox = receiver.mailbox::<String>("brief").unwrap();
    drop(mailbox);
    let to = sender.sender::<String>(&receiver.addresses()[0], "brief", Delivery::AtLeastOnce);
    let err = within("send", to.send("late".into())).await.unwrap_err();
    assert!(
        matches!(
            err.kind,
            SendErrorKind::Rejected(Rejection::NoSuchEndpoint { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn endpoint_names_are_unique_per_node() {
    let node = sender_node().await;
    let _a = node.mailbox::<u8>("a").unwrap();
    assert_eq!(
        node.mailbox::<u8>("a").unwrap_err(),
        EndpointError::InUse("a".into())
    );
    assert!(matches!(
        node.mailbox::<u8>(""),
        Err(EndpointError::InvalidName(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_on_one_connection_get_their_own_replies() {
    let server = receiver_at("tcp://127.0.0.1:0".parse().unwrap()).await;
    server
        .respond("square", |n: u64| async move {
            // Later requests often finish first.
            tokio::time::sleep(Duration::from_micros((n * 7919) % 3000)).await;
            n * n
        })
        .unwrap();
    let client = sender_node().await;
    let address = server.addresses()[0].clone();
    let calls: Vec<_> = (0..200u64)
        .map(|n| {
            let (client, address) = (client.clone(), address.clone());
            tokio::spawn(async move {
                client
                    .request::<u64, u64>(&address, "square", &n, Duration::from_secs(20))
                    .await
            })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        let n = n as u64;
        assert_eq!(within("reply", call).await.unwrap().unwrap(), n * n);
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_reply_times_out_and_later_requests_still_work() {
    let server = receiver_at(mem("slow")).await;
    server
        .respond("sleep", |ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ms
        })
        .unwrap();
    let client = sender_node().await;
    let at = &server.addresses()[0];
    let err = client
        .request::<u64, u64>(at, "sleep", &5_000, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err, RequestError::Timeout);
    assert!(err.is_retryable());
    assert_eq!(
        client
            .request::<u64, u64>(at, "sleep", &10, Duration::from_secs(1))
            .await
            .unwrap(),
        10
    );
}

#[tokio::test]
async fn refused_requests_say_why() {
    let server = receiver_at(mem("refuse")).await;
    server
        .respond("echo", |s: String| async move { s })
        .unwrap();
    let client = sender_node().await;
    let at = &server.addresses()[0];
    let timeout = Duration::from_secs(10);
    let err = client
        .request::<String, String>(at, "nobody", &"x".into(), timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RequestError::Rejected(Rejection::NoSuchEndpoint { .. })
        ),
        "{err:?}"
    );
    let err = client
        .request::<u32, String>(at, "echo", &1, timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RequestError::Rejected(Rejection::SchemaMismatch { expected_type, .. }) if expected_type.contains("String")),
        "{err:?}"
    );
    assert_eq!(
        client
            .request::<String, String>(at, "echo", &"ok".into(), timeout)
            .await
            .unwrap(),
        "ok"
    );
}

#[tokio::test(start_paused = true)]
async fn a_frozen_peer_fails_waiting_requests_within_the_heartbeat_timeout() {
    let heartbeat = Heartbeat {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(3),
    };
    // The server's handler never answers, and its node does not send
    // heartbeats: from the client's side it looks frozen once the
    // connection goes quiet... except that it still answers pings. To model
    // a frozen process, its transport listener is a raw one that completes
    // the hello and then never reads again.
    let address = mem("frozen");
    let mut listener = courier_transport::bind(&address, &TransportConfig::default())
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        let hello = conn.recv().await.unwrap().unwrap();
        // Answer the hello as a node would, with a different id.
        let mut reply = hello.clone();
        let mut payload = reply.payload.to_vec();
        payload[0] ^= 0x01;
        reply.payload = payload.into();
        conn.send(reply).await.unwrap();
        std::future::pending::<()>().await;
        drop(conn);
    });
    let mut config = NodeConfig::default();
    config.transport = TransportConfig::default().with_heartbeat(heartbeat);
    let client = Node::start(config).await.unwrap();
    let started = tokio::time::Instant::now();
    let err = client
        .request::<u64, u64>(&address, "anything", &1, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::PeerDead(_)), "{err:?}");
    assert!(
        started.elapsed() <= Duration::from_secs(4),
        "failed after {:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn at_least_once_messages_reach_a_receiver_that_restarts() {
    let address = mem("restart");
    let receiver = receiver_at(address.clone()).await;
    let mut mailbox = receiver.mailbox::<u32>("in").unwrap();
    let sender = sender_node().await;
    let to = sender.sender::<u32>(&address, "in", Delivery::EffectivelyOnce);
    to.send(1).await.unwrap();
    assert_eq!(mailbox.recv().await.unwrap().body, 1);

    // The receiver goes away; a message sent meanwhile waits in the outbox.
    drop(mailbox);
    assert_eq!(receiver.shutdown(Duration::ZERO).await.unfinished, 0);
    let pending = tokio::spawn({
        let to = to.clone();
        async move { to.send(2).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !pending.is_finished(),
        "not acknowledged while the receiver is down"
    );

    let restarted = receiver_at(address).await;
    let mut mailbox = restarted.mailbox::<u32>("in").unwrap();
    assert_eq!(within("redelivery", mailbox.recv()).await.unwrap().body, 2);
    assert_eq!(pending.await.unwrap().unwrap(), Progress::Acknowledged);
}

#[tokio::test]
async fn two_nodes_with_one_id_refuse_each_other() {
    let id = NodeId::random();
    let receiver = Node::start_with_id(id, NodeConfig::listening(mem("twin")))
        .await
        .unwrap();
    let _box = receiver.mailbox::<u8>("x").unwrap();
    let twin = Node::start_with_id(id, NodeConfig::default())
        .await
        .unwrap();
    let to = twin.sender::<u8>(&receiver.addresses()[0], "x", Delivery::AtMostOnce);
    let err = within("send", to.send(1)).await.unwrap_err();
    assert!(
        matches!(&err.kind, SendErrorKind::Unavailable(reason) if reason.contains("own id")),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn try_send_reports_full_and_hands_the_message_back() {
    let mut config = NodeConfig::default();
    config.peer_queue = 1;
    config.max_in_flight = 1;
    let node = Node::start(config).await.unwrap();
    // Nobody listens there: messages stay unacknowledged.
    let to = node.sender::<u32>(&mem("void"), "x", Delivery::AtLeastOnce);
    let mut full = None;
    for n in 0..10 {
        match to.try_send(n) {
            Ok(progress) => assert_eq!(progress, Progress::Queued),
            Err(err) => {
                assert_eq!(err.kind, SendErrorKind::Full);
                full = Some(err.into_inner());
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    assert!(matches!(full, Some(n) if n >= 2), "{full:?}");
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_out_its_grace_then_fails_what_is_left() {
    let node = sender_node().await;
    let to = node.sender::<u32>(&mem("unreachable"), "x", Delivery::AtLeastOnce);
    let pending = tokio::spawn(async move { to.send(7).await });
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    let report = node.shutdown(Duration::from_secs(2)).await;
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(
        report.unfinished, 1,
        "the one unacknowledged message is counted"
    );
    let err = pending.await.unwrap().unwrap_err();
    assert_eq!(err.kind, SendErrorKind::NodeShutdown);
    assert_eq!(err.into_inner(), 7);
}

#[tokio::test]
async fn shutdown_returns_as_soon_as_everything_is_acknowledged() {
    let receiver = receiver_at(mem("drain")).await;
    let mut mailbox = receiver.mailbox::<u32>("in").unwrap();
    let sender = sender_node().await;
    let to = sender.sender::<u32>(&receiver.addresses()[0], "in", Delivery::AtLeastOnce);
    for n in 0..10 {
        to.try_send(n).unwrap();
    }
    let report = within("shutdown", sender.shutdown(Duration::from_secs(3600))).await;
    assert_eq!(report.unfinished, 0);
    for n in 0..10 {
        assert_eq!(mailbox.recv().await.unwrap().body, n);
    }
}

/// A TCP listener that accepts and then says nothing: every connection to
/// it hangs in the handshake until the handshake timeout.
async fn silent_listener() -> (Address, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: Address = format!("tcp://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (address, task)
}

#[tokio::test(start_paused = true)]
async fn a_request_times_out_on_its_own_deadline_while_the_connection_hangs() {
    let (address, _listener) = silent_listener().await;
    let mut config = NodeConfig::default();
    config.transport.handshake_timeout = Duration::from_secs(15);
    let node = Node::start(config).await.unwrap();
    let started = tokio::time::Instant::now();
    let outcome = node
        .request::<u32, u32>(&address, "echo", &1, Duration::from_millis(200))
        .await;
    // Before, the driver awaited the connect inline, so the request failed
    // only when the 15 s handshake timeout ended it, as Unavailable.
    assert!(matches!(outcome, Err(RequestError::Timeout)), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_answered_while_a_connection_attempt_hangs() {
    let (address, _listener) = silent_listener().await;
    let mut config = NodeConfig::default();
    config.transport.handshake_timeout = Duration::from_secs(15);
    config.send_timeout = Duration::from_millis(200);
    let node = Node::start(config).await.unwrap();
    let to = node.sender::<u32>(&address, "box", Delivery::AtLeastOnce);
    let waiting = tokio::spawn(async move { to.send(7).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = tokio::time::Instant::now();
    // The message expires at its 200 ms deadline, so the drain completes
    // then. Before, the driver sat in the 15 s connect and the drain waited
    // out the whole grace period.
    let report = node.shutdown(Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the drain waited for the connect"
    );
    assert_eq!(report.unfinished, 0);
    assert!(waiting.await.unwrap().is_err());
}
