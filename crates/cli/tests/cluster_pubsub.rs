//! Publish–subscribe across three real `courier serve` processes joined by
//! routes: a subscriber on one node gets what another publishes, once and
//! in order; fan-out and queue groups span the nodes; `courier request` on
//! one node is answered by a service on another; a stalled node (SIGSTOP)
//! delays nobody and counts its drops; a killed node's clients carry on
//! elsewhere with their subscriptions; 5,000 subscriptions' interest is
//! complete again after a node restarts.
//!
//! Clients are this test's own (`RemotePubSub`) plus the `courier` binary.
//! Every wait is bounded; no assertion is about how long something took.

mod support;
use support::cluster::*;
use support::{stderr, stdout};

use std::time::Duration;

use courier_pubsub::remote::{RemotePubSub, RemoteSubscription};
use courier_pubsub::{Event, Message, SubscribeOptions};
use courier_rpc::ClientConfig;
use courier_transport::Address;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn address(cluster: &Cluster, id: u64) -> Address {
    cluster.address(id).parse().unwrap()
}

async fn client(cluster: &Cluster, ids: &[u64]) -> RemotePubSub {
    let addresses: Vec<Address> = ids.iter().map(|&id| address(cluster, id)).collect();
    RemotePubSub::connect_any(&addresses, ClientConfig::default())
        .await
        .unwrap()
}

async fn next(sub: &mut RemoteSubscription) -> Message {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), sub.recv()).await {
            Ok(Some(Ok(Event::Message(m)))) if m.subject.as_str().ends_with(".probe") => {}
            Ok(Some(Ok(Event::Message(m)))) => return m,
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Publishes `count` messages through `publisher` and takes them from the
/// group's `members`: each exactly once (none twice, none missing, within
/// a minute). Returns how many each member took.
async fn take_group(
    members: &mut [RemoteSubscription],
    publisher: &courier_pubsub::remote::RemotePublisher,
    count: u32,
) -> Vec<usize> {
    for i in 0..count {
        publisher
            .publish("jobs.run", i.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut shares = vec![0usize; members.len()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < count as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} arrived",
            seen.len()
        );
        for (i, member) in members.iter_mut().enumerate() {
            if let Ok(Some(Ok(Event::Message(m)))) =
                tokio::time::timeout(Duration::from_millis(20), member.recv()).await
            {
                if m.subject.as_str() != "jobs.run" {
                    continue;
                }
                assert!(seen.insert(number(&m)), "delivered twice: {}", number(&m));
                shares[i] += 1;
            }
        }
    }
    // Nothing more comes (no message twice).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for member in members.iter_mut() {
        while let Ok(Some(Ok(event))) =
            tokio::time::timeout(Duration::from_millis(20), member.recv()).await
        {
            if let Event::Message(m) = event {
                assert_ne!(
                    m.subject.as_str(),
                    "jobs.run",
                    "delivered twice: {}",
                    number(&m)
                );
            }
        }
    }
    shares
}

fn number(message: &Message) -> u32 {
    u32::from_le_bytes(message.payload[..4].try_into().unwrap())
}

/// Publishes `subject` (a `.probe`, which `next` skips) through `bus`,
/// confirmed, until `want` subscriptions cluster-wide take it: then every
/// node that should know about them does.
async fn wait_routed(bus: &RemotePubSub, subject: &str, want: u64) {
    let publisher = bus.publisher();
    for _ in 0..400 {
        if publisher
            .publish_confirmed(subject, "probe")
            .await
            .is_ok_and(|n| n >= want)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{subject} did not reach {want} subscriptions within 20 s");
}

/// This node's routes, from `courier --json stats`.
fn routes(cluster: &Cluster, id: u64) -> Vec<serde_json::Value> {
    let output = cluster.courier(cluster.address(id), &["--json", "stats"]);
    let text = ok(output);
    let stats: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    stats["cluster"]["status"]["routes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn route_to(cluster: &Cluster, from: u64, to: u64) -> serde_json::Value {
    routes(cluster, from)
        .into_iter()
        .find(|r| r["node"] == to)
        .unwrap_or_else(|| panic!("node {from} has no route to {to}"))
}

#[test]
fn subscribers_services_and_queue_groups_span_three_broker_processes() {
    let cluster = Cluster::on_loopback("routes-flow", "");
    cluster.wait_ready(&cluster.url());
    let rt = runtime();
    let mut dropped_before = 0;
    rt.block_on(async {
        let (a, b, c) = (
            client(&cluster, &[1]).await,
            client(&cluster, &[2]).await,
            client(&cluster, &[3]).await,
        );

        // Subscribe on A, publish on C: each message once, in order.
        let options = || SubscribeOptions::default().buffer(20_000);
        let mut on_a = a.subscribe("orders.>", options()).await.unwrap();
        wait_routed(&c, "orders.probe", 1).await;
        // Probes sent while the route came up may have been dropped.
        dropped_before = route_to(&cluster, 3, 1)["dropped"].as_u64().unwrap();
        let publisher = c.publisher();
        let count = 5000u32;
        for i in 0..count {
            publisher
                .publish("orders.created", i.to_le_bytes().to_vec())
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
        for i in 0..count {
            let m = next(&mut on_a).await;
            assert_eq!(number(&m), i, "in order, once, nothing missing");
        }

        // Fan-out to a subscriber on every node.
        let mut fans = Vec::new();
        for bus in [&a, &b, &c] {
            fans.push(bus.subscribe("fan.>", options()).await.unwrap());
        }
        wait_routed(&a, "fan.probe", 3).await;
        let publisher = a.publisher();
        for i in 0..1000u32 {
            publisher
                .publish("fan.out", i.to_le_bytes().to_vec())
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
        for sub in &mut fans {
            for i in 0..1000 {
                assert_eq!(number(&next(sub).await), i);
            }
        }

        // A queue group with members on A and B, published to from C (no
        // member there): each message exactly once, both nodes a share.
        let group = || SubscribeOptions::default().group("workers").buffer(5000);
        let mut members = Vec::new();
        for bus in [&a, &b] {
            members.push(bus.subscribe("jobs.>", group()).await.unwrap());
        }
        let publisher = c.publisher();
        // Probes until both nodes' members have had one: C knows both.
        let mut probed = [false; 2];
        for _ in 0..400 {
            if probed.iter().all(|p| *p) {
                break;
            }
            publisher
                .publish_confirmed("jobs.probe", "p")
                .await
                .unwrap();
            for (i, member) in members.iter_mut().enumerate() {
                if let Ok(Some(Ok(Event::Message(_)))) =
                    tokio::time::timeout(Duration::from_millis(20), member.recv()).await
                {
                    probed[i] = true;
                }
            }
        }
        assert!(
            probed.iter().all(|p| *p),
            "C learned both members' interest"
        );
        let shares = take_group(&mut members, &publisher, 600).await;
        assert!(
            shares.iter().all(|&s| s > 0),
            "both nodes take a share: {shares:?}"
        );

        // A member on C as well, and a publisher on A: still each message
        // once, all to A's own member (a local member is preferred).
        members.push(c.subscribe("jobs.>", group()).await.unwrap());
        let shares = take_group(&mut members, &a.publisher(), 300).await;
        assert_eq!(shares[0], 300, "a local member is preferred: {shares:?}");

        // `courier request` on A, answered by a service connected to B.
        let mut service = b
            .subscribe("svc.echo", SubscribeOptions::default().group("svc"))
            .await
            .unwrap();
        let responder = b.publisher();
        tokio::spawn(async move {
            while let Some(Ok(event)) = service.recv().await {
                if let Event::Message(request) = event {
                    let mut reply = b"echo:".to_vec();
                    reply.extend_from_slice(&request.payload);
                    let _ = responder.reply(&request, reply).await;
                }
            }
        });
        wait_routed(&a, "svc.echo", 1).await;
        let answered = ok(cluster.courier(
            cluster.address(1),
            &["request", "svc.echo", "hello", "--timeout", "20s"],
        ));
        assert_eq!(answered, "echo:hello\n");
        // Nobody anywhere: said at once, not after the minute.
        let nobody = cluster.courier(
            cluster.address(1),
            &["request", "svc.nobody", "x", "--timeout", "60s"],
        );
        assert!(!nobody.status.success());
        assert!(
            stderr(&nobody).contains("no responders"),
            "{}",
            show(&nobody)
        );
    });

    // `courier reply` on node 2 answers `courier request` on node 1.
    let replier = Background::start(
        &[],
        cluster.address(2),
        &[
            "reply",
            "svc.shell",
            "--command",
            "tr a-z A-Z",
            "--count",
            "1",
        ],
        "",
    );
    let answered = retry(
        "courier request svc.shell",
        200,
        Duration::from_secs(40),
        || {
            let output = cluster.courier(
                cluster.address(1),
                &["request", "svc.shell", "hello", "--timeout", "10s"],
            );
            if output.status.success() {
                Ok(stdout(&output))
            } else {
                Err(show(&output))
            }
        },
    );
    assert_eq!(answered, "HELLO\n");
    let replied = replier.finish("reply");
    assert!(replied.status.success(), "{}", show(&replied));

    // The routes as `courier cluster status` shows them.
    let status = ok(cluster.courier(&cluster.url(), &["cluster", "status"]));
    assert!(status.contains("routes of node"), "{status}");
    let to_a = route_to(&cluster, 3, 1);
    assert_eq!(to_a["state"], "up");
    assert!(to_a["messages_out"].as_u64().unwrap() >= 5000, "{to_a}");
    assert_eq!(to_a["dropped"].as_u64().unwrap(), dropped_before);
}

#[test]
fn a_stalled_node_delays_nobody_and_a_killed_nodes_clients_carry_on_elsewhere() {
    let mut cluster = Cluster::on_loopback("routes-faults", "route_buffer = 2000\n");
    cluster.wait_ready(&cluster.url());
    let rt = runtime();
    let pid_b = cluster.nodes[1].as_ref().unwrap().child.id().to_string();
    rt.block_on(async {
        let (a, b, c) = (
            client(&cluster, &[1]).await,
            client(&cluster, &[2]).await,
            client(&cluster, &[3]).await,
        );
        let mut on_b = b
            .subscribe("feed.>", SubscribeOptions::default().buffer(100_000))
            .await
            .unwrap();
        let mut on_c = c
            .subscribe("feed.>", SubscribeOptions::default().buffer(100_000))
            .await
            .unwrap();
        wait_routed(&a, "feed.probe", 2).await;
        // Probes published while the routes were still coming up may have
        // been dropped (counted): what B's stall must not add to is C's
        // count from here on.
        let dropped_to_c = route_to(&cluster, 1, 3)["dropped"].as_u64().unwrap();

        // B stops (SIGSTOP). C keeps getting everything A publishes.
        let stopped = std::process::Command::new("kill")
            .args(["-STOP", &pid_b])
            .status()
            .unwrap();
        assert!(stopped.success());
        let publisher = a.publisher();
        let body = vec![7u8; 512];
        for chunk in 0..40u32 {
            for i in chunk * 500..(chunk + 1) * 500 {
                let mut payload = i.to_le_bytes().to_vec();
                payload.extend_from_slice(&body);
                publisher.publish("feed.tick", payload).await.unwrap();
            }
            publisher.flush().await.unwrap();
            for i in chunk * 500..(chunk + 1) * 500 {
                assert_eq!(number(&next(&mut on_c).await), i, "C is not held up by B");
            }
        }
        let to_b = route_to(&cluster, 1, 2);
        assert!(
            to_b["dropped"].as_u64().unwrap() > 0,
            "the stalled route counts drops: {to_b}"
        );
        assert_eq!(
            route_to(&cluster, 1, 3)["dropped"].as_u64().unwrap(),
            dropped_to_c,
            "nothing for C was dropped while B stalled"
        );

        // B resumes: the route recovers and B's subscriber gets new messages.
        let resumed = std::process::Command::new("kill")
            .args(["-CONT", &pid_b])
            .status()
            .unwrap();
        assert!(resumed.success());
        // (B first works through what reached it before it stopped.)
        let mut got = false;
        'publish: for i in 0..300u32 {
            publisher
                .publish_confirmed("feed.after", i.to_le_bytes().to_vec())
                .await
                .ok();
            loop {
                match tokio::time::timeout(Duration::from_millis(100), on_b.recv()).await {
                    Ok(Some(Ok(Event::Message(m)))) if m.subject.as_str() == "feed.after" => {
                        got = true;
                        break 'publish;
                    }
                    Ok(None) | Ok(Some(Err(_))) => panic!("B's subscription ended"),
                    Ok(Some(Ok(_))) => {}
                    Err(_) => break,
                }
            }
        }
        assert!(got, "B receives again after SIGCONT");
    });

    // A client of node 1 (knowing 2 as well) keeps its subscription when
    // node 1 is killed: it moves to node 2 and hears from node 3 again.
    rt.block_on(async {
        let roaming = client(&cluster, &[1, 2]).await;
        let mut sub = roaming
            .subscribe("roam.>", SubscribeOptions::default())
            .await
            .unwrap();
        let c = client(&cluster, &[3]).await;
        wait_routed(&c, "roam.probe", 1).await;
        let confirming = client(&cluster, &[1, 2]).await.publisher();
        confirming
            .publish_confirmed("roam.before", "x")
            .await
            .unwrap();
        assert_eq!(next(&mut sub).await.subject.as_str(), "roam.before");
        cluster.kill(1);
        // The publisher on node 1 sees an error or a confirmation, then
        // confirmations through node 2.
        let mut confirmed_after = 0;
        for _ in 0..200 {
            if confirming
                .publish_confirmed("roam.probe", "x")
                .await
                .is_ok()
            {
                confirmed_after += 1;
                if confirmed_after > 3 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(confirmed_after > 3, "the publisher moved to another node");
        let mut restored = false;
        for _ in 0..600 {
            match tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
                Ok(Some(Ok(Event::Restored))) => restored = true,
                Ok(Some(Ok(Event::Message(m)))) if m.subject.as_str() == "roam.after" => {
                    assert!(restored, "the loss was reported before new messages");
                    return;
                }
                Ok(None) => panic!("the subscription ended"),
                _ => {}
            }
            c.publisher()
                .publish_confirmed("roam.after", "y")
                .await
                .ok();
        }
        panic!("the subscription was not restored on another node");
    });
}

#[test]
fn the_interest_of_5000_subscriptions_is_complete_again_after_a_node_restarts() {
    let mut cluster = Cluster::on_loopback("routes-interest", "");
    cluster.wait_ready(&cluster.url());
    let rt = runtime();
    let subscriptions = rt.block_on(async {
        let mut held = Vec::new();
        for batch in 0..5 {
            let bus = client(&cluster, &[1]).await;
            for i in 0..1000 {
                let filter = format!("many.{batch}.{i}.>");
                held.push(
                    bus.subscribe(&filter, SubscribeOptions::default().buffer(1))
                        .await
                        .unwrap(),
                );
            }
            held.push(
                bus.subscribe("many.same", SubscribeOptions::default())
                    .await
                    .unwrap(),
            );
        }
        held
    });
    let interest_of_1 = |cluster: &Cluster, at: u64| {
        retry("node 1's interest", 400, Duration::from_secs(40), || {
            let n = route_to(cluster, at, 1)["interest"].as_u64().unwrap_or(0);
            // 5,000 filters, one for the five alike, one for the broker's
            // own request inboxes.
            if n == 5002 {
                Ok(())
            } else {
                Err(format!("node {at} knows {n} of 5002"))
            }
        })
    };
    interest_of_1(&cluster, 2);
    interest_of_1(&cluster, 3);
    // Node 3 restarts (its routes and everything it knew are gone), then
    // learns node 1's interest again, complete.
    cluster.kill(3);
    cluster.start_node(3);
    interest_of_1(&cluster, 3);
    drop(subscriptions);
}
