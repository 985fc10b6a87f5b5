//! The gateway through real WebSockets on 127.0.0.1: every operation of
//! PROTOCOL.md, its errors and limits.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use courier_pubsub::remote::{HostCounters, PubSubAccess};
use courier_pubsub::{Bus, Event, Filter, Subject, SubscribeOptions};
use courier_rpc::{Authenticator, Secret};
use courier_web::{Gateway, GatewayConfig, WebServer};
use futures_util::SinkExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;

async fn serve(gateway: Gateway) -> Result<WebServer> {
    Ok(gateway.bind("127.0.0.1:0", None).await?)
}

async fn open_gateway(config: GatewayConfig) -> Result<(Bus, WebServer)> {
    let bus = Bus::new();
    let server = serve(Gateway::new(bus.clone(), config)).await?;
    Ok((bus, server))
}

/// Answers every request on `subject` with `re: <payload>`.
async fn echo(bus: &Bus, subject: &str) -> Result<tokio::task::JoinHandle<()>> {
    let mut sub = bus.subscribe(subject, SubscribeOptions::default()).await?;
    let publisher = bus.publisher();
    Ok(tokio::spawn(async move {
        while let Some(Ok(event)) = sub.recv().await {
            if let Event::Message(request) = event {
                let mut answer = b"re: ".to_vec();
                answer.extend_from_slice(&request.payload);
                let _ = publisher.reply(&request, answer).await;
            }
        }
    }))
}

#[tokio::test]
async fn connect_subscribe_with_wildcards_and_publish_text_bytes_and_headers() -> Result<()> {
    let (bus, server) = open_gateway(GatewayConfig::default().with_max_payload(4096)).await?;
    let (mut alice, hello) = connect(&server.url(), None).await?;
    assert_eq!(hello["op"], "connected");
    assert_eq!(hello["identity"], serde_json::Value::Null);
    assert_eq!(hello["max_payload"], 4096);
    assert!(hello["server"].as_str().unwrap().starts_with("courier "));
    alice.subscribe("orders", "orders.*.created", None).await?;

    // From the bus.
    bus.publish("orders.eu.created", "tea").await?;
    let msg = alice.frame().await?;
    assert_eq!(msg["op"], "msg");
    assert_eq!(msg["sid"], "orders");
    assert_eq!(msg["subject"], "orders.eu.created");
    assert_eq!(msg["data"], "tea");
    assert!(msg.get("reply").is_none() && msg.get("headers").is_none());

    // From another browser: text with headers and an id, then bytes.
    let mut bob = connected(&server.url()).await?;
    bob.send(json!({"op": "pub", "id": 7, "subject": "orders.us.created", "data": "coffee", "headers": {"order-id": "42"}}))
        .await?;
    assert_eq!(bob.frame().await?, json!({"op": "ok", "id": 7}));
    bob.send(json!({"op": "pub", "subject": "orders.us.created", "data64": "/wABAg=="}))
        .await?;
    let msg = alice.frame().await?;
    assert_eq!(msg["data"], "coffee");
    assert_eq!(msg["headers"], json!({"order-id": "42"}));
    let msg = alice.frame().await?;
    assert_eq!(msg["data64"], "/wABAg==", "not UTF-8: base64");
    assert!(msg.get("data").is_none());
    // Not matching the filter: nothing (the next frame is the pong).
    bob.send(json!({"op": "pub", "subject": "orders.us.shipped", "data": "x"}))
        .await?;
    bob.still_open().await?;
    alice.still_open().await?;
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

#[tokio::test]
async fn a_queue_group_of_two_shares_the_messages() -> Result<()> {
    let (bus, server) = open_gateway(GatewayConfig::default()).await?;
    let mut one = connected(&server.url()).await?;
    let mut two = connected(&server.url()).await?;
    one.subscribe("w", "jobs.>", Some("workers")).await?;
    two.subscribe("w", "jobs.>", Some("workers")).await?;
    for i in 0..20 {
        bus.publish("jobs.resize", format!("job {i}")).await?;
    }
    // Each message goes to one member: ping both and count what came first.
    let mut counts = [0, 0];
    for (n, client) in [&mut one, &mut two].into_iter().enumerate() {
        client.send(json!({"op": "ping", "id": "end"})).await?;
        loop {
            let frame = client.frame().await?;
            if frame["op"] == "pong" {
                break;
            }
            assert_eq!(frame["op"], "msg");
            counts[n] += 1;
        }
    }
    assert_eq!(counts[0] + counts[1], 20, "{counts:?}");
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "both members served: {counts:?}"
    );
    Ok(())
}

#[tokio::test]
async fn unsubscribing_leaves_the_bus_and_an_unknown_sid_is_ok() -> Result<()> {
    let (bus, server) = open_gateway(GatewayConfig::default()).await?;
    let mut client = connected(&server.url()).await?;
    client.subscribe("a", "news.>", None).await?;
    assert_eq!(bus.subscriptions(), 1);
    client
        .send(json!({"op": "unsub", "id": "u", "sid": "a"}))
        .await?;
    assert_eq!(client.frame().await?, json!({"op": "ok", "id": "u"}));
    eventually(|| bus.subscriptions() == 0, "the subscription to leave").await?;
    client
        .send(json!({"op": "unsub", "id": "v", "sid": "never"}))
        .await?;
    assert_eq!(client.frame().await?, json!({"op": "ok", "id": "v"}));
    // The sid may be used again.
    client.subscribe("a", "news.>", None).await?;
    bus.publish("news.today", "hi").await?;
    assert_eq!(client.frame().await?["data"], "hi");
    // A dropped connection takes its subscriptions with it.
    drop(client);
    eventually(
        || bus.subscriptions() == 0,
        "the closed connection's subscription to leave",
    )
    .await?;
    eventually(
        || server.connections() == 0,
        "the connection to be counted gone",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_message_carries_its_reply_subject() -> Result<()> {
    let (bus, server) = open_gateway(GatewayConfig::default()).await?;
    let mut sub = bus.subscribe("svc.>", SubscribeOptions::default()).await?;
    let mut browser = connected(&server.url()).await?;
    browser.subscribe("s", "svc.>", None).await?;
    browser
        .send(json!({"op": "pub", "id": 1, "subject": "svc.time", "reply": "_inbox.abc", "data": "now?"}))
        .await?;
    let mut saw = Vec::new();
    for _ in 0..2 {
        saw.push(browser.frame().await?);
    }
    let msg = saw.iter().find(|f| f["op"] == "msg").expect("the msg");
    assert_eq!(msg["reply"], "_inbox.abc");
    assert!(saw.iter().any(|f| *f == json!({"op": "ok", "id": 1})));
    let Some(Ok(Event::Message(m))) = tokio::time::timeout(WAIT, sub.recv()).await? else {
        anyhow::bail!("the bus subscriber got nothing");
    };
    assert_eq!(m.reply_to.as_ref().map(Subject::as_str), Some("_inbox.abc"));
    Ok(())
}

#[tokio::test]
async fn requests_are_answered_by_a_bus_subscriber_and_by_another_browser() -> Result<()> {
    let (bus, server) = open_gateway(GatewayConfig::default()).await?;
    let _echo = echo(&bus, "svc.echo").await?;
    let mut asker = connected(&server.url()).await?;
    asker
        .send(json!({"op": "req", "id": "r1", "subject": "svc.echo", "data": "hi", "timeout_ms": 5000}))
        .await?;
    let reply = asker.frame().await?;
    assert_eq!(reply["op"], "reply");
    assert_eq!(reply["id"], "r1");
    assert_eq!(reply["data"], "re: hi");

    // A browser service: it sees the request's reply subject and answers.
    let mut service = connected(&server.url()).await?;
    service.subscribe("svc", "svc.browser", None).await?;
    asker
        .send(json!({"op": "req", "id": 2, "subject": "svc.browser", "data64": "/wE=", "headers": {"h": "v"}}))
        .await?;
    let request = service.frame().await?;
    assert_eq!(request["op"], "msg");
    assert_eq!(request["data64"], "/wE=");
    assert_eq!(request["headers"], json!({"h": "v"}));
    let inbox = request["reply"]
        .as_str()
        .expect("a reply subject")
        .to_string();
    service
        .send(
            json!({"op": "pub", "subject": inbox, "data": "from a browser", "headers": {"x": "y"}}),
        )
        .await?;
    let reply = asker.frame().await?;
    assert_eq!(reply["op"], "reply");
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["data"], "from a browser");
    assert_eq!(reply["headers"], json!({"x": "y"}));
    Ok(())
}

#[tokio::test]
async fn a_request_without_responders_or_answer_times_out() -> Result<()> {
    let (bus, server) = open_gateway(GatewayConfig::default()).await?;
    let mut client = connected(&server.url()).await?;
    client
        .send(json!({"op": "req", "id": "nobody", "subject": "svc.none", "data": "?"}))
        .await?;
    let err = client.error("TimedOut").await?;
    assert_eq!(err["id"], "nobody");
    // A subscriber that never answers.
    let _silent = bus
        .subscribe("svc.silent", SubscribeOptions::default())
        .await?;
    client
        .send(json!({"op": "req", "id": "slow", "subject": "svc.silent", "timeout_ms": 50}))
        .await?;
    let err = client.error("TimedOut").await?;
    assert_eq!(err["id"], "slow");
    // Without an id a request cannot be answered.
    client
        .send(json!({"op": "req", "subject": "svc.silent"}))
        .await?;
    client.error("InvalidInput").await?;
    client.still_open().await?;
    Ok(())
}

#[tokio::test]
async fn ping_is_answered_with_pong() -> Result<()> {
    let (_bus, server) = open_gateway(GatewayConfig::default()).await?;
    let mut client = connected(&server.url()).await?;
    client.send(json!({"op": "ping"})).await?;
    assert_eq!(client.frame().await?, json!({"op": "pong"}));
    client.send(json!({"op": "ping", "id": 3})).await?;
    assert_eq!(client.frame().await?, json!({"op": "pong", "id": 3}));
    // Protocol-level pings are answered by the WebSocket layer.
    client.ws.send(Message::Ping(b"x".to_vec().into())).await?;
    client.still_open().await?;
    Ok(())
}

/// Knows one token: `alice-secret` proves `alice`.
struct OneToken;

impl Authenticator for OneToken {
    fn authenticate(&self, token: &Secret) -> Option<String> {
        token
            .matches(&Secret::new("alice-secret"))
            .then(|| "alice".to_string())
    }
}

/// `alice` may publish and subscribe under `allowed.>` and request
/// `svc.ok`; replies to inboxes are allowed to all.
struct Rules;

impl PubSubAccess for Rules {
    fn may_publish(&self, who: Option<&str>, subject: &Subject) -> bool {
        subject.as_str().starts_with("_inbox.")
            || (who == Some("alice") && Filter::new("allowed.>").unwrap().matches(subject))
    }
    fn may_request(&self, who: Option<&str>, subject: &Subject) -> bool {
        who == Some("alice") && subject.as_str() == "svc.ok"
    }
    fn may_subscribe(&self, who: Option<&str>, filter: &Filter) -> bool {
        who == Some("alice") && filter.is_within(&Filter::new("allowed.>").unwrap())
    }
}

#[tokio::test]
async fn tokens_prove_identities_and_a_wrong_or_missing_one_is_refused() -> Result<()> {
    let bus = Bus::new();
    let server = serve(
        Gateway::new(bus.clone(), GatewayConfig::default())
            .with_authenticator(Arc::new(OneToken), true),
    )
    .await?;
    let (_alice, hello) = connect(&server.url(), Some("alice-secret")).await?;
    assert_eq!(hello["op"], "connected");
    assert_eq!(hello["identity"], "alice");

    let (mut wrong, answer) = connect(&server.url(), Some("guess")).await?;
    assert_eq!(answer["op"], "error");
    assert_eq!(answer["kind"], "Refused");
    wrong.closed_with(1008).await?;

    let (mut anonymous, answer) = connect(&server.url(), None).await?;
    assert_eq!(
        answer["kind"], "Refused",
        "anonymous where a token is required"
    );
    anonymous.closed_with(1008).await?;

    // Not required: anonymous is fine, a wrong token still is not.
    let optional = serve(
        Gateway::new(bus.clone(), GatewayConfig::default())
            .with_authenticator(Arc::new(OneToken), false),
    )
    .await?;
    let (_anonymous, hello) = connect(&optional.url(), None).await?;
    assert_eq!(hello["op"], "connected");
    let (mut wrong, answer) = connect(&optional.url(), Some("guess")).await?;
    assert_eq!(answer["kind"], "Refused");
    wrong.closed_with(1008).await?;

    // Anything but connect first: InvalidInput, then 1008.
    let mut early = open(&server.url()).await?;
    early.send(json!({"op": "ping"})).await?;
    early.error("InvalidInput").await?;
    early.closed_with(1008).await?;
    Ok(())
}

#[tokio::test]
async fn what_is_not_permitted_is_refused_and_the_connection_stays_usable() -> Result<()> {
    let bus = Bus::new();
    let server = serve(
        Gateway::new(bus.clone(), GatewayConfig::default())
            .with_authenticator(Arc::new(OneToken), true)
            .with_access(Arc::new(Rules)),
    )
    .await?;
    let _echo = echo(&bus, "svc.>").await?;
    let (mut alice, _) = connect(&server.url(), Some("alice-secret")).await?;
    alice
        .send(json!({"op": "pub", "id": 1, "subject": "secret.plans", "data": "x"}))
        .await?;
    let err = alice.error("Refused").await?;
    assert_eq!(err["id"], 1);
    alice
        .send(json!({"op": "sub", "id": 2, "sid": "s", "subject": "secret.>"}))
        .await?;
    let err = alice.error("Refused").await?;
    assert_eq!(
        (err["id"].clone(), err["sid"].clone()),
        (json!(2), json!("s"))
    );
    alice
        .send(json!({"op": "sub", "id": 3, "sid": "wide", "subject": ">"}))
        .await?;
    alice.error("Refused").await?;
    alice
        .send(json!({"op": "req", "id": 4, "subject": "svc.payroll"}))
        .await?;
    assert_eq!(alice.error("Refused").await?["id"], 4);
    // A publish asking for a reply is a request.
    alice
        .send(json!({"op": "pub", "id": 5, "subject": "allowed.x", "reply": "_inbox.me"}))
        .await?;
    assert_eq!(alice.error("Refused").await?["id"], 5);
    assert_eq!(bus.subscriptions(), 1, "only the echo service");
    // What is permitted still works.
    alice.subscribe("ok", "allowed.>", None).await?;
    alice
        .send(json!({"op": "pub", "subject": "allowed.news", "data": "fine"}))
        .await?;
    assert_eq!(alice.frame().await?["data"], "fine");
    alice
        .send(json!({"op": "req", "id": 6, "subject": "svc.ok", "data": "q"}))
        .await?;
    assert_eq!(alice.frame().await?["data"], "re: q");
    Ok(())
}

#[tokio::test]
async fn an_oversize_payload_is_refused_and_an_oversize_frame_closes_with_1009() -> Result<()> {
    let config = GatewayConfig::default()
        .with_max_payload(1000)
        .with_max_frame(8 * 1024);
    let (_bus, server) = open_gateway(config).await?;
    let mut client = connected(&server.url()).await?;
    client
        .send(json!({"op": "pub", "id": "big", "subject": "a.b", "data": "x".repeat(1001)}))
        .await?;
    let err = client.error("LimitExceeded").await?;
    assert_eq!(err["id"], "big");
    client
        .send(json!({"op": "req", "id": "big64", "subject": "a.b", "data64": "QUFB".repeat(400)}))
        .await?;
    assert_eq!(client.error("LimitExceeded").await?["id"], "big64");
    client.still_open().await?;
    client
        .send(json!({"op": "pub", "subject": "a.b", "data": "y".repeat(9 * 1024)}))
        .await?;
    let frames = client.closed_with(1009).await?;
    assert!(
        frames.iter().any(|f| f["kind"] == "LimitExceeded"),
        "the error before the close: {frames:?}"
    );
    eventually(|| server.connections() == 0, "the connection to end").await?;
    Ok(())
}

#[tokio::test]
async fn garbage_unknown_ops_bad_fields_and_binary_frames_are_invalid_input() -> Result<()> {
    let (_bus, server) = open_gateway(GatewayConfig::default()).await?;
    let mut client = connected(&server.url()).await?;
    client.send_text("this is not json".into()).await?;
    client.error("InvalidInput").await?;
    client.send(json!({"op": "teleport", "id": 1})).await?;
    assert_eq!(client.error("InvalidInput").await?["id"], 1);
    client.send(json!({"no": "op"})).await?;
    client.error("InvalidInput").await?;
    client
        .ws
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await?;
    client.error("InvalidInput").await?;
    for bad in [
        json!({"op": "sub", "id": 2, "sid": "a", "subject": "bad..filter"}),
        json!({"op": "sub", "id": 3, "subject": "a.b"}),
        json!({"op": "sub", "id": 4, "sid": "x".repeat(65), "subject": "a.b"}),
        json!({"op": "sub", "id": 5, "sid": "q", "subject": "a.b", "queue": "no spaces"}),
        json!({"op": "pub", "id": 6, "subject": "a.*", "data": "wildcards are for filters"}),
        json!({"op": "pub", "id": 7, "data": "no subject"}),
        json!({"op": "pub", "id": 8, "subject": "a.b", "data64": "!!!"}),
        json!({"op": "pub", "id": 9, "subject": "a.b", "headers": {"BAD NAME": "v"}}),
        json!({"op": "pub", "id": 10, "subject": "a.b", "headers": "not an object"}),
        json!({"op": "connect"}),
    ] {
        client.send(bad.clone()).await?;
        let err = client.error("InvalidInput").await?;
        assert_eq!(
            err["id"],
            bad.get("id").cloned().unwrap_or_default(),
            "{bad}"
        );
    }
    // Unknown fields are ignored.
    client
        .send(json!({"op": "ping", "id": "new", "from_the_future": [1, 2]}))
        .await?;
    assert_eq!(client.frame().await?, json!({"op": "pong", "id": "new"}));
    Ok(())
}

#[tokio::test]
async fn subscriptions_are_bounded_and_a_sid_in_use_is_a_conflict() -> Result<()> {
    let (_bus, server) = open_gateway(GatewayConfig::default().with_max_subscriptions(2)).await?;
    let mut client = connected(&server.url()).await?;
    client.subscribe("a", "a.>", None).await?;
    client
        .send(json!({"op": "sub", "id": "again", "sid": "a", "subject": "b.>"}))
        .await?;
    let err = client.error("Conflict").await?;
    assert_eq!(
        (err["id"].clone(), err["sid"].clone()),
        (json!("again"), json!("a"))
    );
    client.subscribe("b", "b.>", None).await?;
    client
        .send(json!({"op": "sub", "id": "third", "sid": "c", "subject": "c.>"}))
        .await?;
    let err = client.error("LimitExceeded").await?;
    assert_eq!(err["sid"], "c");
    // Room again after an unsubscribe.
    client.send(json!({"op": "unsub", "sid": "a"})).await?;
    client.subscribe("c", "c.>", None).await?;
    Ok(())
}

#[tokio::test]
async fn requests_in_flight_are_bounded() -> Result<()> {
    let (bus, server) =
        open_gateway(GatewayConfig::default().with_max_requests_in_flight(2)).await?;
    let _silent = bus
        .subscribe("svc.silent", SubscribeOptions::default())
        .await?;
    let mut client = connected(&server.url()).await?;
    for id in 0..3 {
        client
            .send(json!({"op": "req", "id": id, "subject": "svc.silent", "timeout_ms": 60000}))
            .await?;
    }
    let err = client.error("Busy").await?;
    assert_eq!(err["id"], 2);
    client.still_open().await?;
    Ok(())
}

#[tokio::test]
async fn past_max_connections_a_browser_is_told_busy_and_closed_with_1013() -> Result<()> {
    let (_bus, server) = open_gateway(GatewayConfig::default().with_max_connections(1)).await?;
    let mut first = connected(&server.url()).await?;
    let mut second = open(&server.url()).await?;
    let frames = second.closed_with(1013).await?;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["kind"], "Busy");
    first.still_open().await?;
    assert_eq!(server.connections(), 1);
    drop(first);
    eventually(|| server.connections() == 0, "the first to close").await?;
    let _third = connected(&server.url()).await?;
    Ok(())
}

/// A browser that reads too slowly loses messages to the bus's policy and
/// is told once, with the sid. One thread: the publishes below run without
/// yielding, so the forwarder takes nothing until they are done and all but
/// the buffer's one message are dropped.
#[tokio::test(flavor = "current_thread")]
async fn a_slow_browser_loses_messages_counted_and_is_told_busy_once() -> Result<()> {
    let (bus, server) = open_gateway(GatewayConfig::default().with_subscription_buffer(1)).await?;
    let mut client = connected(&server.url()).await?;
    client.subscribe("s", "ticks", None).await?;
    for i in 0..10 {
        bus.publish("ticks", format!("{i}")).await?;
    }
    let err = client.error("Busy").await?;
    assert_eq!(err["sid"], "s");
    let msg = client.frame().await?;
    assert_eq!(msg["data"], "9", "the newest is kept");
    assert_eq!(bus.dropped(), 9);
    bus.publish("ticks", "10").await?;
    assert_eq!(
        client.frame().await?["data"],
        "10",
        "no second error without new drops"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1001_and_idle_ones_close_too() -> Result<()> {
    let (_bus, server) = open_gateway(GatewayConfig::default()).await?;
    let mut a = connected(&server.url()).await?;
    let mut b = open(&server.url()).await?; // not yet connected
    eventually(|| server.connections() == 2, "both connections").await?;
    let url = server.url();
    let shutdown = tokio::spawn(server.shutdown(Duration::from_secs(5)));
    a.closed_with(1001).await?;
    b.closed_with(1001).await?;
    tokio::time::timeout(WAIT, shutdown).await??;
    assert!(open(&url).await.is_err(), "no longer listening");

    let (_bus, server) =
        open_gateway(GatewayConfig::default().with_idle_timeout(Some(Duration::from_millis(200))))
            .await?;
    let mut idle = connected(&server.url()).await?;
    idle.closed_with(1001).await?;
    Ok(())
}

#[tokio::test]
async fn a_browser_that_never_says_connect_is_closed() -> Result<()> {
    let (_bus, server) =
        open_gateway(GatewayConfig::default().with_connect_timeout(Duration::from_millis(100)))
            .await?;
    let mut silent = open(&server.url()).await?;
    let frames = silent.closed_with(1008).await?;
    assert_eq!(frames[0]["kind"], "TimedOut");
    Ok(())
}

#[tokio::test]
async fn the_javascript_client_is_served_and_other_paths_are_not_found() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_bus, server) = open_gateway(GatewayConfig::default()).await?;
    let address = server.local_addr();
    let get = |path: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await?;
        let mut response = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await??;
        anyhow::Ok(response)
    };
    let script = get("/courier.js").await?;
    assert!(script.starts_with("HTTP/1.1 200"), "{script}");
    assert!(script
        .to_ascii_lowercase()
        .contains("content-type: text/javascript; charset=utf-8"));
    assert!(script.ends_with(courier_web::COURIER_JS));
    let missing = get("/nothing").await?;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    Ok(())
}

#[tokio::test]
async fn publishes_and_deliveries_are_counted() -> Result<()> {
    let bus = Bus::new();
    let counters = Arc::new(HostCounters::default());
    let server =
        serve(Gateway::new(bus.clone(), GatewayConfig::default()).with_counters(counters.clone()))
            .await?;
    let _a = bus.subscribe("c.>", SubscribeOptions::default()).await?;
    let _b = bus.subscribe("c.*", SubscribeOptions::default()).await?;
    let mut client = connected(&server.url()).await?;
    client
        .send(json!({"op": "pub", "id": 1, "subject": "c.d", "data": "x"}))
        .await?;
    client.frame().await?;
    assert_eq!(counters.published.load(Ordering::Relaxed), 1);
    assert_eq!(counters.delivered.load(Ordering::Relaxed), 2);
    Ok(())
}

/// Many idle browsers at once cost the others nothing: 1,000 connections
/// stay open while one more publishes to itself and hears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_browsers_and_one_busy_one() -> Result<()> {
    const IDLE: usize = 1_000;
    // Each connection is two descriptors here (client and server side).
    let needed = (2 * IDLE + 200) as u64;
    if !fd_limit_at_least(needed) {
        println!("skipped: the open-file limit is below {needed} (see `ulimit -n`)");
        return Ok(());
    }
    let (bus, server) = open_gateway(GatewayConfig::default()).await?;
    let url = server.url();
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..IDLE {
        let url = url.clone();
        opening.spawn(async move { connected(&url).await });
    }
    let mut idle = Vec::with_capacity(IDLE);
    while let Some(client) = opening.join_next().await {
        idle.push(client??);
    }
    assert_eq!(server.connections(), IDLE);
    let mut busy = connected(&url).await?;
    busy.subscribe("me", "echo.me", None).await?;
    for i in 0..100 {
        busy.send(json!({"op": "pub", "subject": "echo.me", "data": format!("{i}")}))
            .await?;
    }
    for i in 0..100 {
        assert_eq!(busy.frame().await?["data"], format!("{i}"));
    }
    bus.publish("echo.me", "from the bus").await?;
    assert_eq!(busy.frame().await?["data"], "from the bus");
    assert_eq!(server.connections(), IDLE + 1);
    drop(idle);
    server.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// Whether the soft open-file limit is at least `needed`. Raising it would
/// take `setrlimit`, an unsafe call the workspace's lints deny; the soft
/// limit is read from /proc instead (Linux; elsewhere the test is skipped).
fn fd_limit_at_least(needed: u64) -> bool {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<u64>().ok()
        })
        .is_some_and(|soft| soft >= needed)
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Gateway>();
    send_sync::<WebServer>();
    send_sync::<GatewayConfig>();
    send_sync::<courier_web::WebError>();
}

/// A TCP connection that never finishes its HTTP request is closed after
/// the connect timeout, and past `max_handshakes` one is closed at once.
#[tokio::test]
async fn connections_stuck_in_their_handshake_are_bounded() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = GatewayConfig::default()
        .with_connect_timeout(Duration::from_secs(1))
        .with_max_handshakes(1);
    let (_bus, server) = open_gateway(config).await?;
    // Accepted first, it holds the one place until its timeout.
    let mut stuck = tokio::net::TcpStream::connect(server.local_addr()).await?;
    stuck.write_all(b"GET / HTTP/1.1\r\n").await?;
    let mut turned_away = tokio::net::TcpStream::connect(server.local_addr()).await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, turned_away.read(&mut buf)).await?;
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "closed without an answer: {n:?}"
    );
    // The stuck one is closed by the timeout (hyper may answer 408 first).
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stuck.read_to_end(&mut rest)).await??;
    // Its place comes free as its task ends: then a browser gets in.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match connected(&server.url()).await {
            Ok(_browser) => break,
            Err(err) if tokio::time::Instant::now() > deadline => return Err(err),
            Err(_) => tokio::task::yield_now().await,
        }
    }
    Ok(())
}

/// The broker's rules for request-reply plumbing (courier-broker's
/// `auth::Policy` with users): anyone may publish to an inbox subject
/// (`_inbox.<id>` or `_inbox.<id>.<n>`) and subscribe to an inbox whose id
/// it writes out. Here everyone may also use `svc.>`.
struct BrokerLike;

impl PubSubAccess for BrokerLike {
    fn may_publish(&self, _: Option<&str>, subject: &Subject) -> bool {
        let tokens = subject.tokens();
        (matches!(tokens.len(), 2 | 3) && &*tokens[0] == "_inbox")
            || Filter::new("svc.>").unwrap().matches(subject)
    }
    fn may_request(&self, _: Option<&str>, subject: &Subject) -> bool {
        Filter::new("svc.>").unwrap().matches(subject)
    }
    fn may_subscribe(&self, _: Option<&str>, filter: &Filter) -> bool {
        use courier_pubsub::subject::Token;
        matches!(
            filter.tokens(),
            [Token::Literal(first), Token::Literal(_)]
                | [Token::Literal(first), Token::Literal(_), Token::One]
                if &**first == "_inbox"
        ) || filter.is_within(&Filter::new("svc.>").unwrap())
    }
}

/// Review finding: requests used the bus's one inbox prefix, and `reply`
/// frames showed it, so any browser could listen to (and race to answer)
/// every other browser's requests. Now each connection has an inbox of its
/// own, shown to no one but the services it asks, and no other browser may
/// subscribe to it.
#[tokio::test]
async fn each_connection_has_its_own_inbox_that_no_other_browser_can_use() -> Result<()> {
    let bus = Bus::new();
    let server = serve(
        Gateway::new(bus.clone(), GatewayConfig::default()).with_access(Arc::new(BrokerLike)),
    )
    .await?;
    let _echo = echo(&bus, "svc.echo").await?;
    let mut watch = bus
        .subscribe("svc.watch", SubscribeOptions::default())
        .await?;
    let baseline = bus.subscriptions();
    let mut a = connected(&server.url()).await?;
    let mut b = connected(&server.url()).await?;

    // A reply frame names no inbox.
    for client in [&mut a, &mut b] {
        client
            .send(json!({"op": "req", "id": 1, "subject": "svc.echo", "data": "hi"}))
            .await?;
        let reply = client.frame().await?;
        assert_eq!(reply["op"], "reply");
        assert_eq!(reply["data"], "re: hi");
        assert!(reply.get("subject").is_none(), "{reply}");
        assert!(!reply.to_string().contains("_inbox"), "{reply}");
    }

    // Each connection's inbox is random and its own (not the bus's one).
    let mut inbox_ids = Vec::new();
    for client in [&mut a, &mut b] {
        client
            .send(json!({"op": "req", "id": 2, "subject": "svc.watch", "timeout_ms": 100}))
            .await?;
        let Some(Ok(Event::Message(request))) = tokio::time::timeout(WAIT, watch.recv()).await?
        else {
            anyhow::bail!("the request did not reach the bus");
        };
        let reply_to = request.reply_to.expect("a reply subject");
        let tokens = reply_to.tokens();
        // The connection's and the request's own random tokens.
        assert_eq!((tokens.len(), &*tokens[0]), (3, "_inbox"), "{reply_to}");
        assert_eq!(tokens[1].len(), 32, "128 random bits: {reply_to}");
        assert_eq!(tokens[2].len(), 32, "128 random bits: {reply_to}");
        inbox_ids.push(tokens[1].to_string());
        assert_eq!(client.error("TimedOut").await?["id"], 2);
    }
    assert_ne!(inbox_ids[0], inbox_ids[1], "one inbox per connection");

    // B, as a service, sees A's inbox; it may answer that request, but not
    // listen to A's inbox (or forge by subscribing first).
    b.subscribe("svc", "svc.browser", None).await?;
    a.send(json!({"op": "req", "id": 3, "subject": "svc.browser", "data": "q"}))
        .await?;
    let request = b.frame().await?;
    let inbox = request["reply"]
        .as_str()
        .expect("a reply subject")
        .to_string();
    let prefix = inbox.rsplit_once('.').unwrap().0.to_string();
    assert_eq!(prefix.rsplit('.').next().unwrap(), inbox_ids[0]);
    for filter in [
        format!("{prefix}.*"),
        inbox.clone(),
        prefix.clone(),
        "_inbox.>".to_string(),
        "_inbox.*.*.*".to_string(),
        "_inbox.*.*".to_string(),
        "_inbox".to_string(),
    ] {
        b.send(json!({"op": "sub", "id": "spy", "sid": "spy", "subject": filter}))
            .await?;
        let err = b.error("Refused").await?;
        assert_eq!(err["sid"], "spy", "{filter}");
    }
    b.send(json!({"op": "pub", "subject": inbox, "data": "answer"}))
        .await?;
    let reply = a.frame().await?;
    assert_eq!(
        (reply["op"].clone(), reply["id"].clone()),
        (json!("reply"), json!(3))
    );
    assert_eq!(reply["data"], "answer");
    // A second answer to the same request is dropped.
    b.send(json!({"op": "pub", "subject": inbox, "data": "again"}))
        .await?;
    a.still_open().await?;

    // A's connection gone (a request still waiting), its inbox leaves the
    // bus and may be subscribed to by nobody's mistake.
    a.send(json!({"op": "req", "id": 4, "subject": "svc.watch", "timeout_ms": 60000}))
        .await?;
    tokio::time::timeout(WAIT, watch.recv()).await?;
    drop(a);
    eventually(
        || bus.subscriptions() == baseline + 2,
        "A's inbox to leave the bus (B's inbox and sub stay)",
    )
    .await?;
    Ok(())
}

/// Second review: a request's inbox ended in a counter, so a service that
/// saw one request could answer the connection's next ones before their
/// real answers (the first reply wins). Now the last token is random per
/// request: guesses from the one seen inbox reach no request.
#[tokio::test]
async fn a_service_that_saw_one_request_cannot_answer_the_next_first() -> Result<()> {
    let bus = Bus::new();
    let server = serve(
        Gateway::new(bus.clone(), GatewayConfig::default()).with_access(Arc::new(BrokerLike)),
    )
    .await?;
    let mut slow = bus
        .subscribe("svc.slow", SubscribeOptions::default())
        .await?;
    let publisher = bus.publisher();
    let mut a = connected(&server.url()).await?;
    let mut b = connected(&server.url()).await?;
    b.subscribe("svc", "svc.browser", None).await?;
    a.send(json!({"op": "req", "id": 1, "subject": "svc.browser", "data": "q"}))
        .await?;
    let seen = b.frame().await?["reply"]
        .as_str()
        .expect("a reply subject")
        .to_string();
    b.send(json!({"op": "pub", "subject": seen, "data": "real 1"}))
        .await?;
    assert_eq!(a.frame().await?["data"], "real 1");
    let (prefix, last) = seen.rsplit_once('.').unwrap();
    // The seen inbox itself, and its last token counted on (as decimal or
    // hex, padded or not).
    let mut guesses = vec![seen.clone()];
    for step in 1..=4u128 {
        if let Ok(n) = last.parse::<u128>() {
            guesses.push(format!("{prefix}.{}", n.wrapping_add(step)));
        }
        if let Ok(n) = u128::from_str_radix(last, 16) {
            guesses.push(format!("{prefix}.{:x}", n.wrapping_add(step)));
            guesses.push(format!("{prefix}.{:032x}", n.wrapping_add(step)));
        }
    }
    for k in 2..5 {
        a.send(json!({"op": "req", "id": k, "subject": "svc.slow", "data": "q"}))
            .await?;
        let Some(Ok(Event::Message(request))) = tokio::time::timeout(WAIT, slow.recv()).await?
        else {
            anyhow::bail!("request {k} did not reach the bus");
        };
        let reply_to = request.reply_to.clone().expect("a reply subject");
        assert!(
            reply_to.as_str().starts_with(&format!("{prefix}.")),
            "{reply_to}"
        );
        assert!(!guesses.contains(&reply_to.to_string()), "{reply_to}");
        // B's forgeries are delivered (its `ok`) before the real answer.
        for (i, guess) in guesses.iter().enumerate() {
            b.send(json!({"op": "pub", "id": i, "subject": guess, "data": "forged"}))
                .await?;
            assert_eq!(b.frame().await?, json!({"op": "ok", "id": i}));
        }
        publisher.reply(&request, format!("real {k}")).await?;
        let reply = a.frame().await?;
        assert_eq!(
            (
                reply["op"].clone(),
                reply["id"].clone(),
                reply["data"].clone()
            ),
            (json!("reply"), json!(k), json!(format!("real {k}")))
        );
    }
    a.still_open().await?;
    Ok(())
}

/// Second review: the inbox check named one connection's id on one node;
/// wildcards (`>`, `_inbox.>`) and other nodes got around it. Now no
/// browser subscribes to `_inbox` subjects at all, and a filter starting
/// with a wildcard is never given one.
#[tokio::test]
async fn wildcard_subscribers_never_see_replies_and_inbox_filters_are_refused() -> Result<()> {
    let (bus, server) = open_gateway(GatewayConfig::default()).await?;
    let _echo = echo(&bus, "svc.echo").await?;
    let mut a = connected(&server.url()).await?;
    let mut spy = connected(&server.url()).await?;
    for filter in [
        "_inbox.>",
        "_inbox.*.*.*",
        "_inbox.*.*",
        "_inbox.*",
        "_inbox",
    ] {
        spy.send(json!({"op": "sub", "id": "spy", "sid": "spy", "subject": filter}))
            .await?;
        assert_eq!(spy.error("Refused").await?["sid"], "spy", "{filter}");
    }
    let sids = ["all", "some", "three"];
    spy.subscribe("all", ">", None).await?;
    spy.subscribe("some", "*.>", None).await?;
    spy.subscribe("three", "*.*.*", None).await?;
    for i in 0..3 {
        a.send(json!({"op": "req", "id": i, "subject": "svc.echo", "data": "hi"}))
            .await?;
        let reply = a.frame().await?;
        assert_eq!(
            (reply["op"].clone(), reply["id"].clone()),
            (json!("reply"), json!(i))
        );
    }
    // After the replies, a marker each subscription matches: a forwarder
    // keeps the bus's order, so a reply given to the spy comes before it.
    bus.publish("end.x.y", "end").await?;
    let mut ended = Vec::new();
    let mut requests = 0;
    while ended.len() < sids.len() {
        let frame = spy.frame().await?;
        assert_eq!(frame["op"], "msg", "{frame}");
        let subject = frame["subject"].as_str().unwrap_or_default();
        assert!(
            !subject.starts_with("_inbox"),
            "a reply reached the spy: {frame}"
        );
        match subject {
            "end.x.y" => ended.push(frame["sid"].to_string()),
            "svc.echo" => requests += 1,
            _ => anyhow::bail!("unexpected {frame}"),
        }
    }
    assert_eq!(requests, 6, "the requests themselves (`>` and `*.>`)");
    spy.still_open().await?;
    Ok(())
}

/// Review finding: a request was published from a task of its own, so a
/// publish sent after it could reach subscribers first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_and_the_publish_after_it_arrive_in_order() -> Result<()> {
    let (bus, server) = open_gateway(GatewayConfig::default()).await?;
    let mut seen = bus
        .subscribe("order.>", SubscribeOptions::default())
        .await?;
    let mut client = connected(&server.url()).await?;
    for i in 0..50 {
        client
            .send(json!({"op": "req", "id": i, "subject": "order.req", "data": format!("{i}"), "timeout_ms": 1}))
            .await?;
        client
            .send(json!({"op": "pub", "subject": "order.pub", "data": format!("{i}")}))
            .await?;
    }
    for i in 0..50 {
        for subject in ["order.req", "order.pub"] {
            let Some(Ok(Event::Message(m))) = tokio::time::timeout(WAIT, seen.recv()).await? else {
                anyhow::bail!("nothing on the bus");
            };
            assert_eq!(
                (m.subject.as_str(), &m.payload[..]),
                (subject, format!("{i}").as_bytes()),
                "in the order sent"
            );
        }
    }
    Ok(())
}

/// Review finding: each subscription built its frame before waiting for
/// room, and control characters escaped to six bytes each; so one browser
/// with many subscriptions that stopped reading held many times its bound.
/// Now room is reserved first, and such text goes as data64 (4/3).
#[tokio::test]
async fn a_browser_that_stops_reading_holds_at_most_its_outbound_bytes() -> Result<()> {
    const BOUND: usize = 64 << 10;
    const PAYLOAD: usize = 32 << 10;
    let config = GatewayConfig::default()
        .with_max_payload(PAYLOAD)
        .with_outbound(1_000, BOUND)
        .with_subscription_buffer(4);
    let (bus, server) = open_gateway(config).await?;
    let mut client = connected(&server.url()).await?;
    for i in 0..100 {
        client.subscribe(&format!("s{i}"), "flood", None).await?;
    }
    // Control characters: valid UTF-8 whose JSON text is six times as long.
    let payload = vec![1u8; PAYLOAD];
    for _ in 0..40 {
        bus.publish("flood", payload.clone()).await?;
        tokio::task::yield_now().await;
    }
    // The browser reads nothing meanwhile; once the socket's buffers are
    // full, every forwarder waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let peak = server.queued_bytes_peak();
    // What is queued is at most the bound: room is taken from an upper
    // bound of each frame's size before the frame exists.
    assert!(peak <= BOUND, "{peak} bytes queued, over {BOUND}");
    assert!(peak > 0, "something was queued");
    // And the browser, reading again, gets the payload as base64.
    let msg = client.frame_with_op("msg").await?;
    use base64::Engine as _;
    let expected = base64::engine::general_purpose::STANDARD.encode(&payload);
    assert_eq!(msg["data64"], expected.as_str());
    assert!(msg.get("data").is_none());
    Ok(())
}

#[tokio::test]
async fn an_upgrade_from_an_origin_not_allowed_gets_403() -> Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let config = GatewayConfig::default().with_allowed_origins(["https://app.example.com"]);
    let (_bus, server) = open_gateway(config).await?;
    let with_origin = |origin: &str| -> Result<_> {
        let mut request = server.url().into_client_request()?;
        request.headers_mut().insert("origin", origin.parse()?);
        Ok(request)
    };
    let refused = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(with_origin("https://evil.example.com")?),
    )
    .await?;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => anyhow::bail!("expected 403, got {other:?}"),
    }
    assert_eq!(server.connections(), 0);
    // The listed origin (in any case), and a client that sends none.
    for origin in ["https://app.example.com", "HTTPS://APP.example.com"] {
        let (mut ws, _) =
            tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(with_origin(origin)?))
                .await??;
        ws.send(Message::text(r#"{"op":"connect"}"#)).await?;
        let mut client = Client { ws };
        assert_eq!(client.frame().await?["op"], "connected");
    }
    connected(&server.url()).await?.still_open().await?;

    // Without a list, any origin.
    let (_bus, open) = open_gateway(GatewayConfig::default()).await?;
    let mut request = open.url().into_client_request()?;
    request
        .headers_mut()
        .insert("origin", "https://anywhere.example".parse()?);
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request)).await??;
    Ok(())
}

/// Two listeners of one gateway: shutting one down leaves the other's
/// connections (and accepting) alone.
#[tokio::test]
async fn shutting_down_one_listener_leaves_the_others_running() -> Result<()> {
    let bus = Bus::new();
    let gateway = Gateway::new(bus.clone(), GatewayConfig::default());
    let first = serve_same(&gateway).await?;
    let second = serve_same(&gateway).await?;
    let mut on_first = connected(&first.url()).await?;
    let mut on_second = connected(&second.url()).await?;
    on_second.subscribe("s", "news", None).await?;
    let url = first.url();
    tokio::time::timeout(WAIT, first.shutdown(Duration::from_secs(5))).await?;
    on_first.closed_with(1001).await?;
    assert!(open(&url).await.is_err(), "the first stopped listening");
    on_second.still_open().await?;
    bus.publish("news", "still here").await?;
    assert_eq!(on_second.frame().await?["data"], "still here");
    connected(&second.url()).await?.still_open().await?;
    assert_eq!(second.connections(), 2);
    Ok(())
}

async fn serve_same(gateway: &Gateway) -> Result<WebServer> {
    Ok(gateway.bind("127.0.0.1:0", None).await?)
}

/// A frame that is not valid as a whole still has its id read for the
/// error; deep nesting in an unknown field is skipped, not built; an
/// over-long sid is not echoed.
#[tokio::test]
async fn bad_frames_keep_their_id_and_nesting_costs_nothing() -> Result<()> {
    let (_bus, server) = open_gateway(GatewayConfig::default()).await?;
    let mut client = connected(&server.url()).await?;
    client
        .send_text(r#"{"op":"pub","id":5,"subject":"a.b","data":"\ud800"}"#.into())
        .await?;
    assert_eq!(
        client.error("InvalidInput").await?["id"],
        5,
        "a lone surrogate"
    );
    let deep = format!(
        r#"{{"op":"ping","id":6,"x":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    client.send_text(deep).await?;
    // Skipped (serde_json skips without recursing or building anything).
    assert_eq!(client.frame().await?, json!({"op": "pong", "id": 6}));
    client
        .send(json!({"op": "sub", "id": 7, "sid": "x".repeat(65), "subject": "a.b"}))
        .await?;
    let err = client.error("InvalidInput").await?;
    assert_eq!(err["id"], 7);
    assert!(err.get("sid").is_none(), "{err}");
    client.still_open().await?;
    Ok(())
}

#[test]
fn no_configured_value_panics() {
    let config = GatewayConfig::default()
        .with_request_timeouts(Duration::ZERO, Duration::ZERO)
        .with_outbound(usize::MAX, usize::MAX);
    assert_eq!(config.max_request_timeout, Duration::from_millis(1));
    assert_eq!(config.default_request_timeout, Duration::from_millis(1));
}

/// Timeouts that overflow an `Instant` and a zero request ceiling set on
/// the public fields directly still work.
#[tokio::test]
async fn huge_timeouts_and_a_zero_request_ceiling_do_not_panic() -> Result<()> {
    let mut config = GatewayConfig::default()
        .with_connect_timeout(Duration::MAX)
        .with_write_timeout(Duration::MAX);
    config.max_request_timeout = Duration::ZERO;
    config.outbound_bytes = usize::MAX;
    let (bus, server) = open_gateway(config).await?;
    let _silent = bus
        .subscribe("svc.silent", SubscribeOptions::default())
        .await?;
    let mut client = connected(&server.url()).await?;
    client
        .send(json!({"op": "req", "id": 1, "subject": "svc.silent"}))
        .await?;
    client.error("TimedOut").await?;
    client.still_open().await?;
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Fills a browser's socket: it subscribes, then reads nothing while the
/// bus sends it far more than the socket's buffers hold.
async fn stalled(
    bus: &Bus,
    server: &WebServer,
) -> Result<Client<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    let mut client = connected(&server.url()).await?;
    client.subscribe("s", "flood", None).await?;
    let payload = vec![b'x'; 64 << 10];
    for _ in 0..1_000 {
        bus.publish("flood", payload.clone()).await?;
        tokio::task::yield_now().await;
    }
    Ok(client)
}

/// A browser that stopped reading is dropped after the write timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_that_stops_reading_is_dropped_after_the_write_timeout() -> Result<()> {
    let config = GatewayConfig::default()
        .with_max_payload(64 << 10)
        .with_write_timeout(Duration::from_millis(300));
    let (bus, server) = open_gateway(config).await?;
    let _client = stalled(&bus, &server).await?;
    eventually(
        || server.connections() == 0,
        "the stalled browser to be dropped",
    )
    .await?;
    eventually(|| bus.subscriptions() == 0, "its subscription to leave").await?;
    Ok(())
}

/// Shutdown's grace runs out on a browser whose close cannot be written
/// (it reads nothing): it is dropped, and shutdown returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drops_what_does_not_close_within_the_grace() -> Result<()> {
    let config = GatewayConfig::default().with_max_payload(64 << 10);
    let (bus, server) = open_gateway(config).await?;
    let _client = stalled(&bus, &server).await?;
    assert_eq!(server.connections(), 1);
    tokio::time::timeout(WAIT, server.shutdown(Duration::from_millis(200))).await?;
    eventually(
        || bus.subscriptions() == 0,
        "the dropped browser's subscription to leave",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn too_many_headers_and_an_over_long_name_are_refused() -> Result<()> {
    let (_bus, server) = open_gateway(GatewayConfig::default()).await?;
    let mut client = connected(&server.url()).await?;
    let many: serde_json::Map<String, serde_json::Value> =
        (0..10_000).map(|i| (format!("h{i}"), json!("v"))).collect();
    client
        .send(json!({"op": "pub", "id": 1, "subject": "a.b", "headers": many}))
        .await?;
    assert_eq!(client.error("LimitExceeded").await?["id"], 1);
    client
        .send(json!({"op": "pub", "id": 2, "subject": "a.b", "headers": (0..8).map(|i| (format!("k{i}"), json!("v".repeat(1000)))).collect::<serde_json::Map<_, _>>()}))
        .await?;
    assert_eq!(client.error("LimitExceeded").await?["id"], 2);
    client.still_open().await?;

    let mut named = open(&server.url()).await?;
    named
        .send(json!({"op": "connect", "name": "n".repeat(65)}))
        .await?;
    named.error("InvalidInput").await?;
    named.closed_with(1008).await?;
    Ok(())
}
