//! Buses on different nodes joined by routes over TCP: a subscriber on one
//! node gets what another publishes, once and in order; queue groups and
//! request-reply span nodes; interest survives a cut; a stalled node
//! delays nobody else.

use std::collections::HashMap;
use std::time::Duration;

use courier_pubsub::remote::{PubSubHost, PubSubServiceServer, RemotePubSub};
use courier_pubsub::route::{RouteConfig, RouteServiceServer, Routes};
use courier_pubsub::{Bus, Event, Interest, RequestError, SlowConsumer, SubscribeOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};
use courier_transport::Address;

struct Node {
    id: u64,
    bus: Bus,
    routes: Routes,
    server: Option<ServerHandle>,
    address: Address,
}

async fn serve(routes: &Routes, address: &Address) -> ServerHandle {
    let listener = courier_transport::bind(address, &Default::default())
        .await
        .unwrap();
    Server::new(ServerConfig::default())
        .service(RouteServiceServer::new(routes.host()))
        .service(PubSubServiceServer::new(PubSubHost::new(
            routes.bus().clone(),
        )))
        .spawn(listener)
}

/// `n` nodes, every one routed to every other.
async fn mesh(n: u64, config: RouteConfig) -> Vec<Node> {
    let mut nodes = Vec::new();
    for id in 1..=n {
        let bus = Bus::new();
        let mut client = ClientConfig::default();
        client.timeout = Duration::from_secs(5);
        let routes = Routes::new(bus.clone(), id, client, config.clone());
        let server = serve(&routes, &"tcp://127.0.0.1:0".parse().unwrap()).await;
        let address = server.local_addr().clone();
        nodes.push(Node {
            id,
            bus,
            routes,
            server: Some(server),
            address,
        });
    }
    let peers: Vec<(u64, Address)> = nodes.iter().map(|n| (n.id, n.address.clone())).collect();
    for node in &nodes {
        node.routes.set_peers(peers.clone());
    }
    nodes
}

/// Waits until every node knows every other's whole interest.
async fn settled(nodes: &[Node]) {
    for _ in 0..2000 {
        let done = nodes.iter().all(|a| {
            let truth = a.bus.local_interest();
            nodes
                .iter()
                .filter(|b| b.id != a.id)
                .all(|b| b.bus.remote_interest(a.id) == truth)
        });
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("interest did not settle within 20 s");
}

async fn next(sub: &mut courier_pubsub::Subscription) -> courier_pubsub::Message {
    match tokio::time::timeout(Duration::from_secs(20), sub.recv()).await {
        Ok(Some(Ok(Event::Message(m)))) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn number(message: &courier_pubsub::Message) -> u32 {
    u32::from_le_bytes(message.payload[..4].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_what_another_node_publishes_once_and_in_order() {
    let nodes = mesh(3, RouteConfig::default()).await;
    let mut on_a = nodes[0]
        .bus
        .subscribe("orders.>", SubscribeOptions::default().buffer(20_000))
        .await
        .unwrap();
    // Another wildcard on B: each node gets its copy once, none comes back.
    let mut on_b = nodes[1]
        .bus
        .subscribe("orders.*", SubscribeOptions::default().buffer(20_000))
        .await
        .unwrap();
    settled(&nodes).await;
    let publisher = nodes[2].bus.publisher();
    let count = 10_000u32;
    for i in 0..count {
        let reached = publisher
            .publish_confirmed("orders.created", i.to_le_bytes().to_vec())
            .await
            .unwrap();
        assert_eq!(reached, 2, "one route to each interested node");
    }
    for sub in [&mut on_a, &mut on_b] {
        for i in 0..count {
            let m = next(sub).await;
            assert_eq!(
                (number(&m), m.seq),
                (i, u64::from(i)),
                "in order, nothing missing"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        on_a.try_recv().is_none() && on_b.try_recv().is_none(),
        "no duplicates"
    );
    let to_a = &nodes[2].routes.stats()[0];
    assert_eq!(
        (to_a.node, to_a.messages_out, to_a.dropped),
        (1, u64::from(count), 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_reaches_a_subscriber_on_every_node() {
    let nodes = mesh(3, RouteConfig::default()).await;
    let mut subs: Vec<_> = nodes
        .iter()
        .map(|n| {
            n.bus
                .blocking_subscribe("prices.>", SubscribeOptions::default().buffer(2000))
                .unwrap()
        })
        .collect();
    settled(&nodes).await;
    for (from, node) in nodes.iter().enumerate() {
        let publisher = node.bus.publisher();
        for i in 0..500u32 {
            let reached = publisher
                .publish_confirmed(&format!("prices.n{from}"), i.to_le_bytes().to_vec())
                .await
                .unwrap();
            assert_eq!(reached, 3);
        }
    }
    for sub in &mut subs {
        let mut seen: HashMap<String, u32> = HashMap::new();
        for _ in 0..1500 {
            let m = next(sub).await;
            let expected = seen.entry(m.subject.to_string()).or_default();
            assert_eq!(
                number(&m),
                *expected,
                "per-publisher order on {}",
                m.subject
            );
            *expected += 1;
        }
        assert!(seen.values().all(|n| *n == 500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_over_nodes_delivers_each_message_once_preferring_a_local_member() {
    let nodes = mesh(3, RouteConfig::default()).await;
    let group = || SubscribeOptions::default().group("workers").buffer(5000);
    // Members on A and B only: C's messages are shared between them.
    let mut members: Vec<(usize, courier_pubsub::Subscription)> = Vec::new();
    for node in [0, 0, 1] {
        members.push((
            node,
            nodes[node].bus.subscribe("jobs.>", group()).await.unwrap(),
        ));
    }
    settled(&nodes).await;
    let publisher = nodes[2].bus.publisher();
    for i in 0..600u32 {
        assert_eq!(
            publisher
                .publish_confirmed("jobs.run", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
            1
        );
    }
    let taken = drain(&mut members, 600).await;
    assert_eq!(taken.len(), 600, "each message exactly once");
    let per_node = |node| taken.iter().filter(|(n, _)| *n == node).count();
    assert_eq!(per_node(0) + per_node(1), 600);
    assert!(
        per_node(0) > 0 && per_node(1) > 0,
        "both nodes take a share: {taken:?}"
    );

    // A member on C now: C's messages stay on C.
    members.push((2, nodes[2].bus.subscribe("jobs.>", group()).await.unwrap()));
    settled(&nodes).await;
    for i in 0..300u32 {
        publisher
            .publish_confirmed("jobs.run", i.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    let taken = drain(&mut members, 300).await;
    assert!(
        taken.iter().all(|(node, _)| *node == 2),
        "a local member is preferred"
    );

    // Publishers on every node: still each message once.
    for node in &nodes {
        let publisher = node.bus.publisher();
        for i in 0..100u32 {
            publisher
                .publish("jobs.all", i.to_le_bytes().to_vec())
                .await
                .unwrap();
        }
    }
    assert_eq!(drain(&mut members, 300).await.len(), 300);
}

/// Takes `count` messages from the members, then checks nothing more came.
async fn drain(
    members: &mut [(usize, courier_pubsub::Subscription)],
    count: usize,
) -> Vec<(usize, u32)> {
    let mut taken = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while taken.len() < count && tokio::time::Instant::now() < deadline {
        let mut any = false;
        for (node, sub) in members.iter_mut() {
            while let Some(event) = sub.try_recv() {
                if let Event::Message(m) = event {
                    taken.push((*node, number(&m)));
                    any = true;
                }
            }
        }
        if !any {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (_, sub) in members.iter_mut() {
        assert!(sub.try_recv().is_none(), "a message delivered twice");
    }
    taken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_crosses_nodes_and_no_responders_is_immediate() {
    let nodes = mesh(3, RouteConfig::default()).await;
    let mut service = nodes[1]
        .bus
        .subscribe("svc.echo", SubscribeOptions::default().group("svc"))
        .await
        .unwrap();
    let responder = nodes[1].bus.publisher();
    tokio::spawn(async move {
        while let Some(Ok(Event::Message(request))) = service.recv().await {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&request.payload);
            responder.reply(&request, reply).await.unwrap();
        }
    });
    settled(&nodes).await;
    for node in [&nodes[0], &nodes[2]] {
        for i in 0..50 {
            let reply = node
                .bus
                .request("svc.echo", format!("{i}"), Duration::from_secs(20))
                .await
                .unwrap();
            assert_eq!(reply.payload, format!("echo:{i}").into_bytes());
        }
    }
    // Nobody anywhere: the answer comes from the interest tables, not a timeout.
    let err = nodes[0]
        .bus
        .request("svc.nobody", "x", Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::NoResponders(_)), "{err:?}");
    // (Had it waited for the timeout, this test would hang for ten minutes.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interest_of_5000_subscriptions_is_complete_again_after_the_route_is_cut() {
    let config = RouteConfig::default()
        .with_check_every(Duration::from_millis(100))
        .with_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let mut nodes = mesh(2, config).await;
    let mut subs: Vec<_> = (0..5000)
        .map(|i| {
            let options = if i % 10 == 0 {
                SubscribeOptions::default().group("g")
            } else {
                SubscribeOptions::default()
            };
            nodes[0]
                .bus
                .blocking_subscribe(&format!("s.{i}.>"), options)
                .unwrap()
        })
        .collect();
    // A thousand subscribers to one filter are one interest.
    let same: Vec<_> = (0..1000)
        .map(|_| {
            nodes[0]
                .bus
                .blocking_subscribe("s.same", SubscribeOptions::default())
                .unwrap()
        })
        .collect();
    settled(&nodes).await;
    // 5,000 filters, one for the thousand alike, one for the bus's inboxes.
    assert_eq!(nodes[1].bus.remote_interest_count(1), 5002);

    // Cut: B stops serving. A's route to B fails; meanwhile A's interest changes.
    let b_address = nodes[1].address.clone();
    nodes[1]
        .server
        .take()
        .unwrap()
        .shutdown(Duration::ZERO)
        .await;
    for _ in 0..50 {
        if nodes[0].routes.stats()[0].state != "up" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    subs.drain(..1000);
    drop(same);
    for i in 0..500 {
        subs.push(
            nodes[0]
                .bus
                .subscribe(&format!("t.{i}"), SubscribeOptions::default())
                .await
                .unwrap(),
        );
    }
    // Restored: B serves again on the same address.
    nodes[1].server = Some(serve(&nodes[1].routes, &b_address).await);
    settled(&nodes).await;
    let view = nodes[1].bus.remote_interest(1);
    assert_eq!(view.len(), 4501);
    assert!(view.contains(&Interest::plain("t.499")) && !view.contains(&Interest::plain("s.same")));
    assert!(nodes[0].routes.stats()[0].reconnects >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_delays_nobody_else_and_its_drops_are_counted() {
    let config = RouteConfig::default().with_buffer(1000, 1 << 20);
    let nodes = mesh(3, config).await;
    // B's only subscriber never reads and holds back its publishers: B's
    // route intake stalls, as if B were stopped.
    let stalled = nodes[1]
        .bus
        .subscribe(
            "feed.>",
            SubscribeOptions::default()
                .buffer(10)
                .policy(SlowConsumer::Backpressure),
        )
        .await
        .unwrap();
    let mut on_c = nodes[2]
        .bus
        .subscribe("feed.>", SubscribeOptions::default().buffer(100_000))
        .await
        .unwrap();
    settled(&nodes).await;
    let publisher = nodes[0].bus.publisher();
    let count = 50_000u32;
    let payload = vec![7u8; 256];
    // Paced by C, which keeps up: its route never fills, B's does.
    for chunk in 0..count / 500 {
        for i in chunk * 500..(chunk + 1) * 500 {
            let mut body = i.to_le_bytes().to_vec();
            body.extend_from_slice(&payload);
            publisher.publish("feed.tick", body).await.unwrap();
        }
        for i in chunk * 500..(chunk + 1) * 500 {
            assert_eq!(
                number(&next(&mut on_c).await),
                i,
                "C gets everything, in order"
            );
        }
    }
    let to_b = nodes[0]
        .routes
        .stats()
        .into_iter()
        .find(|r| r.node == 2)
        .unwrap();
    assert!(
        to_b.dropped > 0,
        "the stalled route drops and counts: {to_b:?}"
    );
    let to_c = nodes[0]
        .routes
        .stats()
        .into_iter()
        .find(|r| r.node == 3)
        .unwrap();
    assert_eq!(to_c.dropped, 0);

    // B recovers: later messages reach it again.
    drop(stalled);
    let mut on_b = nodes[1]
        .bus
        .subscribe("feed.>", SubscribeOptions::default())
        .await
        .unwrap();
    settled(&nodes).await;
    let mut received = false;
    for i in 0..200u32 {
        publisher
            .publish("feed.tick", i.to_le_bytes().to_vec())
            .await
            .unwrap();
        if let Ok(Some(Ok(Event::Message(_)))) =
            tokio::time::timeout(Duration::from_millis(100), on_b.recv()).await
        {
            received = true;
            break;
        }
    }
    assert!(received, "the route recovered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_and_a_group_interest_of_one_node_get_one_copy_each() {
    let nodes = mesh(2, RouteConfig::default()).await;
    let mut plain = nodes[0]
        .bus
        .subscribe("both.>", SubscribeOptions::default())
        .await
        .unwrap();
    let mut member = nodes[0]
        .bus
        .subscribe("both.*", SubscribeOptions::default().group("g"))
        .await
        .unwrap();
    settled(&nodes).await;
    let publisher = nodes[1].bus.publisher();
    for i in 0..100u32 {
        // One route carries it, once, naming the group.
        assert_eq!(
            publisher
                .publish_confirmed("both.x", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
            1
        );
    }
    for i in 0..100 {
        assert_eq!(number(&next(&mut plain).await), i);
        assert_eq!(number(&next(&mut member).await), i);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(plain.try_recv().is_none() && member.try_recv().is_none());
    assert_eq!(nodes[1].routes.stats()[0].messages_out, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_skips_a_node_whose_route_is_down_and_no_responders_comes_at_once() {
    let config = RouteConfig::default()
        .with_check_every(Duration::from_millis(100))
        .with_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let mut nodes = mesh(3, config).await;
    // A service on B and on C; requests from A.
    let mut serving = Vec::new();
    for node in &nodes[1..] {
        let mut requests = node
            .bus
            .subscribe("svc.who", SubscribeOptions::default().group("svc"))
            .await
            .unwrap();
        let responder = node.bus.publisher();
        let id = node.id;
        serving.push(tokio::spawn(async move {
            while let Some(Ok(Event::Message(request))) = requests.recv().await {
                responder
                    .reply(&request, id.to_le_bytes().to_vec())
                    .await
                    .unwrap();
            }
        }));
    }
    settled(&nodes).await;
    let ask = |bus: Bus| async move { bus.request("svc.who", "?", Duration::from_secs(20)).await };
    let mut answered_by = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let reply = ask(nodes[0].bus.clone()).await.unwrap();
        answered_by.insert(u64::from_le_bytes(reply.payload[..8].try_into().unwrap()));
    }
    assert_eq!(answered_by, [2, 3].into(), "both nodes serve in turn");

    // C stops serving routes: A's route to C goes down, and every request
    // goes to B, none is lost to the dead route.
    nodes[2]
        .server
        .take()
        .unwrap()
        .shutdown(Duration::ZERO)
        .await;
    for _ in 0..200 {
        let to_c = nodes[0]
            .routes
            .stats()
            .into_iter()
            .find(|r| r.node == 3)
            .unwrap();
        if to_c.state != "up" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped_before = nodes[0].routes.stats()[1].dropped;
    for _ in 0..20 {
        let reply = ask(nodes[0].bus.clone()).await.unwrap();
        assert_eq!(reply.payload[..8], 2u64.to_le_bytes());
    }
    assert_eq!(nodes[0].routes.stats()[1].dropped, dropped_before);

    // B's service goes too (its route stays up, its interest goes): C is
    // the only holder left and its route is down, so A answers "no
    // responders" at once instead of sending into the dead route.
    let b_service = serving.remove(0);
    b_service.abort();
    // Gone once the task is: its subscription goes with it.
    let _ = b_service.await;
    settled_without(&nodes, 3).await;
    let err = ask(nodes[0].bus.clone()).await.unwrap_err();
    assert!(
        matches!(err, RequestError::NoResponders(_)),
        "{err:?}; routes {:?}; A knows of C {:?}",
        nodes[0].routes.stats(),
        nodes[0].bus.remote_interest(3)
    );
}

/// Like [`settled`], among the nodes other than `cut`.
async fn settled_without(nodes: &[Node], cut: u64) {
    for _ in 0..2000 {
        let done = nodes.iter().filter(|a| a.id != cut).all(|a| {
            let truth = a.bus.local_interest();
            nodes
                .iter()
                .filter(|b| b.id != a.id && b.id != cut)
                .all(|b| b.bus.remote_interest(a.id) == truth)
        });
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("interest did not settle within 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_across_nodes_under_load_all_get_their_replies() {
    let nodes = mesh(2, RouteConfig::default()).await;
    let mut requests = nodes[1]
        .bus
        .subscribe(
            "svc.echo",
            SubscribeOptions::default().group("svc").buffer(10_000),
        )
        .await
        .unwrap();
    let responder = nodes[1].bus.publisher();
    tokio::spawn(async move {
        while let Some(Ok(Event::Message(request))) = requests.recv().await {
            responder
                .reply(&request, request.payload.clone())
                .await
                .unwrap();
        }
    });
    // Interest churns on A meanwhile (a subscriber coming and going), and
    // other traffic crosses the same route.
    let mut noise_sub = nodes[1]
        .bus
        .subscribe("noise.>", SubscribeOptions::default())
        .await
        .unwrap();
    tokio::spawn(async move { while noise_sub.recv().await.is_some() {} });
    settled(&nodes).await;
    let bus_a = nodes[0].bus.clone();
    let churn = tokio::spawn(async move {
        for i in 0..2000 {
            let sub = bus_a
                .subscribe(&format!("churn.{i}"), SubscribeOptions::default())
                .await;
            let noise = bus_a.publisher();
            noise.publish("noise.tick", "n").await.unwrap();
            drop(sub);
            tokio::task::yield_now().await;
        }
    });
    let mut askers = Vec::new();
    for task in 0..4u32 {
        let bus = nodes[0].bus.clone();
        askers.push(tokio::spawn(async move {
            for i in 0..250u32 {
                let body = (task << 16 | i).to_le_bytes().to_vec();
                let reply = bus
                    .request("svc.echo", body.clone(), Duration::from_secs(20))
                    .await
                    .expect("every request is answered");
                assert_eq!(reply.payload, body);
            }
        }));
    }
    // Clients of A each asking once: a client's inbox is subscribed just
    // before its first request, so its interest must reach B first.
    let address = nodes[0].address.clone();
    for wave in 0..5u32 {
        let mut clients = Vec::new();
        for n in 0..20u32 {
            let address = address.clone();
            clients.push(tokio::spawn(async move {
                let client = RemotePubSub::connect(&address, ClientConfig::default())
                    .await
                    .unwrap();
                let body = (wave << 16 | n).to_le_bytes().to_vec();
                let reply = client
                    .request("svc.echo", body.clone(), Duration::from_secs(20))
                    .await
                    .expect("a new client's first request is answered");
                assert_eq!(reply.payload, body);
            }));
        }
        for client in clients {
            client.await.unwrap();
        }
    }
    for asker in askers {
        asker.await.unwrap();
    }
    churn.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_cross_a_route_unchanged() {
    let nodes = mesh(2, RouteConfig::default()).await;
    let mut sub = nodes[1]
        .bus
        .subscribe("hdr.>", SubscribeOptions::default())
        .await
        .unwrap();
    settled(&nodes).await;
    let mut headers = courier_pubsub::Headers::new();
    headers.insert("x-tenant", "blue").unwrap();
    nodes[0]
        .bus
        .publisher()
        .publish_with_headers("hdr.a", headers.clone(), "x")
        .await
        .unwrap();
    let m = next(&mut sub).await;
    assert_eq!(m.headers, headers);
}
