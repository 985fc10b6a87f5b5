//! Browsers on a real broker: a `ws://` listen address serves the gateway
//! over the broker's bus, with its `[auth]` users, and counts in its stats.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use courier_broker::auth::{AuthConfig, UserConfig};
use courier_broker::{Broker, BrokerConfig};
use courier_pubsub::remote::RemotePubSub;
use courier_pubsub::{Event, SubscribeOptions};
use courier_rpc::{ClientConfig, Secret};
use courier_test_support::TempDir;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn user(name: &str, token: &str) -> UserConfig {
    UserConfig {
        name: name.into(),
        token: Some(Secret::new(token)),
        ..Default::default()
    }
}

fn config(dir: &TempDir) -> BrokerConfig {
    let mut config = BrokerConfig::default();
    config.listen = vec!["tcp://127.0.0.1:0".into(), "ws://127.0.0.1:0".into()];
    config.data_dir = dir.0.join("data");
    config.metrics = String::new();
    config.shutdown_grace_ms = 500;
    let mut alice = user("alice", "alice-token");
    alice.publish = vec!["orders.>".into()];
    alice.subscribe = vec!["orders.>".into()];
    alice.request = vec!["svc.tax".into()];
    let mut tax = user("tax", "tax-token");
    tax.subscribe = vec!["svc.tax".into()];
    let mut ops = user("ops", "ops-token");
    ops.admin = true;
    config.auth = AuthConfig {
        required: true,
        users: vec![alice, tax, ops],
    };
    config
}

async fn send(ws: &mut Ws, frame: Value) -> Result<()> {
    tokio::time::timeout(WAIT, ws.send(Message::text(frame.to_string()))).await??;
    Ok(())
}

/// The next text frame, or `{"close": code}` for a close.
async fn next(ws: &mut Ws) -> Result<Value> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .context("nothing from the broker in time")?
        {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(Message::Close(frame))) => {
                return Ok(json!({"close": frame.map_or(1005, |f| u16::from(f.code))}))
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => bail!("{err}"),
            None => bail!("the connection ended"),
        }
    }
}

async fn browser(url: &str, token: Option<&str>) -> Result<(Ws, Value)> {
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await??;
    let mut hello = json!({"op": "connect", "name": "broker test"});
    if let Some(token) = token {
        hello["token"] = json!(token);
    }
    send(&mut ws, hello).await?;
    let answer = next(&mut ws).await?;
    Ok((ws, answer))
}

fn rust_client(token: &str) -> ClientConfig {
    let mut config = ClientConfig::default();
    config.token = Some(Secret::new(token));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_and_rust_clients_share_the_bus_under_the_same_rules() -> Result<()> {
    let dir = TempDir::new("broker-web");
    let broker = Broker::start(config(&dir)).await?;
    let tcp = broker.addresses()[0].clone();
    let [ws_url] = broker.web_addresses() else {
        bail!("one web address: {:?}", broker.web_addresses());
    };
    assert!(
        ws_url.starts_with("ws://127.0.0.1:") && !ws_url.ends_with(":0"),
        "{ws_url}"
    );

    // Who gets in.
    let (mut anonymous, answer) = browser(ws_url, None).await?;
    assert_eq!(answer["kind"], "Refused");
    assert_eq!(next(&mut anonymous).await?, json!({"close": 1008}));
    let (mut wrong, answer) = browser(ws_url, Some("guess")).await?;
    assert_eq!(answer["kind"], "Refused");
    assert_eq!(next(&mut wrong).await?, json!({"close": 1008}));
    let (mut alice, hello) = browser(ws_url, Some("alice-token")).await?;
    assert_eq!(hello["op"], "connected");
    assert_eq!(hello["identity"], "alice");
    assert_eq!(
        hello["max_payload"],
        BrokerConfig::default().max_frame_size / 4,
        "a quarter of the frame limit"
    );

    // A Rust publisher reaches the browser, and the browser it.
    send(
        &mut alice,
        json!({"op": "sub", "id": 1, "sid": "o", "subject": "orders.>"}),
    )
    .await?;
    assert_eq!(next(&mut alice).await?, json!({"op": "ok", "id": 1}));
    let rust = RemotePubSub::connect(&tcp, rust_client("alice-token")).await?;
    let mut from_browsers = rust
        .subscribe("orders.browser", SubscribeOptions::default())
        .await?;
    rust.publisher()
        .publish_confirmed("orders.eu", "from rust")
        .await?;
    let msg = next(&mut alice).await?;
    assert_eq!(
        (msg["sid"].clone(), msg["data"].clone()),
        (json!("o"), json!("from rust"))
    );
    // A durable subscription keeps browsers' messages too.
    rust.durable("audit", "orders.browser").await?;
    let before = broker.stats().await;
    send(
        &mut alice,
        json!({"op": "pub", "id": 2, "subject": "orders.browser", "data": "from a browser"}),
    )
    .await?;
    // The browser's own subscription sees it too; the ok and msg may come
    // in either order.
    let mut frames = [next(&mut alice).await?, next(&mut alice).await?];
    frames.sort_by_key(|f| f["op"].as_str().map(str::to_string));
    assert_eq!(frames[0]["op"], "msg");
    assert_eq!(frames[1], json!({"op": "ok", "id": 2}));
    let Some(Ok(Event::Message(m))) = tokio::time::timeout(WAIT, from_browsers.recv()).await?
    else {
        bail!("the Rust subscriber got nothing");
    };
    assert_eq!(&m.payload[..], b"from a browser");

    // Counted with everyone else's, and the browser connection too.
    let stats = broker.stats().await;
    assert_eq!(
        stats.published,
        before.published + 1,
        "the browser's publish is counted"
    );
    assert_eq!(
        stats.stored,
        before.stored + 1,
        "and stored in the durable subscription"
    );
    assert_eq!(stats.web_connections, 1);

    // A request from the browser, answered by a Rust service.
    let tax = RemotePubSub::connect(&tcp, rust_client("tax-token")).await?;
    let mut questions = tax
        .subscribe("svc.tax", SubscribeOptions::default().group("tax"))
        .await?;
    let answers = tax.publisher();
    let service = tokio::spawn(async move {
        while let Some(Ok(Event::Message(q))) = questions.recv().await {
            let _ = answers.reply(&q, "19%").await;
        }
    });
    send(
        &mut alice,
        json!({"op": "req", "id": "tax", "subject": "svc.tax", "data": "rate?"}),
    )
    .await?;
    let reply = next(&mut alice).await?;
    assert_eq!(
        (reply["op"].clone(), reply["data"].clone()),
        (json!("reply"), json!("19%"))
    );

    // What alice may not do, she may not do from a browser either.
    send(
        &mut alice,
        json!({"op": "pub", "id": 3, "subject": "payments.x", "data": "no"}),
    )
    .await?;
    assert_eq!(next(&mut alice).await?["kind"], "Refused");
    send(
        &mut alice,
        json!({"op": "sub", "id": 4, "sid": "p", "subject": "payments.>"}),
    )
    .await?;
    assert_eq!(next(&mut alice).await?["kind"], "Refused");
    send(
        &mut alice,
        json!({"op": "req", "id": 5, "subject": "svc.payroll"}),
    )
    .await?;
    assert_eq!(next(&mut alice).await?["kind"], "Refused");
    send(&mut alice, json!({"op": "ping", "id": 6})).await?;
    assert_eq!(next(&mut alice).await?, json!({"op": "pong", "id": 6}));

    // Shutdown says goodbye to browsers.
    let stopping = tokio::spawn(broker.shutdown());
    assert_eq!(next(&mut alice).await?, json!({"close": 1001}));
    tokio::time::timeout(WAIT * 2, stopping).await??;
    service.abort();
    Ok(())
}

#[test]
fn browser_addresses_are_checked_and_wss_needs_a_certificate() {
    let mut config = BrokerConfig::default();
    config.listen = vec!["ws://127.0.0.1:7880".into(), "wss://[::1]:7881/".into()];
    let web = config.web_listen().unwrap();
    assert_eq!(web.len(), 2);
    assert_eq!(
        (web[0].address.as_str(), web[0].tls),
        ("127.0.0.1:7880", false)
    );
    assert_eq!((web[1].address.as_str(), web[1].tls), ("[::1]:7881", true));
    assert!(
        config.addresses().unwrap().is_empty(),
        "no Courier-client addresses"
    );
    let err = config.web_tls().unwrap_err();
    assert!(err.to_string().contains("tls_cert"), "{err}");
    for bad in [
        "ws://127.0.0.1",
        "ws://:7880",
        "ws://h:port",
        "ws://h:1/path",
    ] {
        config.listen = vec![bad.into()];
        assert!(config.addresses().is_err(), "{bad} accepted");
    }
}

#[tokio::test]
async fn a_broker_may_serve_browsers_only() -> Result<()> {
    let dir = TempDir::new("broker-web-only");
    let mut config = BrokerConfig::default();
    config.listen = vec!["ws://127.0.0.1:0".into()];
    config.data_dir = dir.0.join("data");
    config.metrics = String::new();
    let broker = Broker::start(config).await?;
    assert!(broker.addresses().is_empty());
    let (mut ws, hello) = browser(&broker.web_addresses()[0], None).await?;
    assert_eq!(hello["identity"], Value::Null, "an open broker: anonymous");
    send(&mut ws, json!({"op": "ping", "id": 1})).await?;
    assert_eq!(next(&mut ws).await?, json!({"op": "pong", "id": 1}));
    assert_eq!(broker.stats().await.web_connections, 1);
    broker.shutdown().await;
    Ok(())
}

/// `web_allowed_origins`: an upgrade from a page of another origin gets
/// HTTP 403; a listed one (and a client without `Origin`) gets in. The
/// comma-separated form (`COURIER_WEB_ALLOWED_ORIGINS`) and a malformed
/// origin are checked too.
#[tokio::test]
async fn only_the_allowed_origins_may_open_a_browser_connection() -> Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = TempDir::new("broker-web-origins");
    let mut config = BrokerConfig::parse(
        r#"
        listen = ["ws://127.0.0.1:0"]
        metrics = "127.0.0.1:0"
        metrics_max_connections = 4
        metrics_request_timeout_ms = 2000
        web_allowed_origins = ["https://app.example.com"]
        "#,
    )
    .map_err(anyhow::Error::msg)?;
    config.data_dir = dir.0.join("data");
    assert_eq!(config.metrics_limits().max_connections, 4);
    assert_eq!(
        config.metrics_limits().request_timeout,
        Duration::from_secs(2)
    );
    let broker = Broker::start(config).await?;
    let url = broker.web_addresses()[0].clone();
    let with_origin = |origin: &str| -> Result<_> {
        let mut request = url.as_str().into_client_request()?;
        request.headers_mut().insert("origin", origin.parse()?);
        Ok(request)
    };
    match tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(with_origin("https://evil.example.com")?),
    )
    .await?
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => bail!("expected 403, got {other:?}"),
    }
    tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(with_origin("https://app.example.com")?),
    )
    .await??;
    let (_ws, hello) = browser(&url, None).await?;
    assert_eq!(hello["op"], "connected", "no Origin: not a browser");
    broker.shutdown().await;

    let listed =
        BrokerConfig::parse(r#"web_allowed_origins = "https://a.example, http://b.example:8080""#)
            .map_err(anyhow::Error::msg)?;
    assert_eq!(
        listed.web_allowed_origins,
        ["https://a.example", "http://b.example:8080"]
    );
    assert_eq!(
        listed.web_config().allowed_origins,
        ["https://a.example", "http://b.example:8080"]
    );
    let mut bad = BrokerConfig::parse(r#"web_allowed_origins = ["https://a.example/app"]"#)
        .map_err(anyhow::Error::msg)?;
    bad.listen = vec!["ws://127.0.0.1:0".into()];
    let err = bad.web_listen().unwrap_err().to_string();
    assert!(err.contains("web_allowed_origins"), "{err}");
    Ok(())
}
