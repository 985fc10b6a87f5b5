//! The broker's HTTP endpoint through a real broker: the dashboard and its
//! assets, `/api/stats` following publishes, enqueues and consumers, the
//! Prometheus text, and the limits (head size, methods, connections at
//! once).

use std::net::SocketAddr;
use std::time::Duration;

use courier_broker::{Broker, BrokerConfig};
use courier_pubsub::remote::RemotePubSub;
use courier_queue::remote::RemoteQueue;
use courier_rpc::{Client, ClientConfig};
use courier_test_support::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every wait here: generous, since it only matters on failure.
const WAIT: Duration = Duration::from_secs(20);

async fn broker(dir: &TempDir) -> Broker {
    let mut config = BrokerConfig::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.0.join("data");
    config.metrics = "127.0.0.1:0".into();
    config.shutdown_grace_ms = 200;
    Broker::start(config).await.unwrap()
}

async fn client(broker: &Broker) -> Client {
    Client::connect(&broker.addresses()[0], ClientConfig::default())
        .await
        .unwrap()
}

/// One HTTP exchange.
struct Answer {
    status: u16,
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Writes `request` as it is and reads until the server closes; `None` if
/// it closed (or reset) without an answer.
async fn exchange(address: SocketAddr, request: &[u8]) -> Option<Answer> {
    let mut stream = tokio::time::timeout(WAIT, TcpStream::connect(address))
        .await
        .expect("connect in time")
        .unwrap();
    // A server that refuses may close before all of it is written.
    let _ = stream.write_all(request).await;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("the server closes the connection in time");
    if read.is_err() && raw.is_empty() {
        return None; // Reset.
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> Option<Answer> {
    if raw.is_empty() {
        return None;
    }
    let text = String::from_utf8(raw.to_vec()).expect("a text answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap();
    assert!(status.starts_with("HTTP/1.1 "), "{status}");
    let status = status[9..12].parse().unwrap();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("a header line");
            (name.to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    Some(Answer {
        status,
        headers,
        body: body.to_string(),
    })
}

async fn get(address: SocketAddr, path: &str) -> Answer {
    exchange(
        address,
        format!("GET {path} HTTP/1.1\r\nHost: courier\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap_or_else(|| panic!("an answer to GET {path}"))
}

async fn stats(address: SocketAddr) -> serde_json::Value {
    let answer = get(address, "/api/stats").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    serde_json::from_str(&answer.body).expect("JSON")
}

/// The named queue's entry in `/api/stats`, if it is open.
fn queue_entry(stats: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    stats["queues"]
        .as_array()?
        .iter()
        .find(|q| q["name"] == name)
        .cloned()
}

/// Polls `/api/stats` until `name`'s `field` is `want`, within [`WAIT`]
/// (a remote consumer attaches, and goes, a moment after the client side
/// says so). Returns the queue's entry then.
async fn until_queue(address: SocketAddr, name: &str, field: &str, want: u64) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = stats(address).await;
        let entry = queue_entry(&stats, name);
        if let Some(entry) = &entry {
            if entry[field].as_u64() == Some(want) {
                return entry.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}'s {field} not {want} after {WAIT:?}: {entry:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_its_assets_are_served_with_their_types() {
    let dir = TempDir::new("dashboard-page");
    let broker = broker(&dir).await;
    let http = broker.metrics_address().unwrap();

    let page = get(http, "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(
        page.body.contains("<script src=\"dashboard.js\""),
        "{}",
        page.body
    );
    assert!(page.body.contains("dashboard.css"));
    for metric in [
        "published-rate",
        "delivered-rate",
        "connections",
        "published-total",
    ] {
        assert!(
            page.body.contains(&format!("data-metric=\"{metric}\"")),
            "no {metric} on the page"
        );
    }
    // Nothing from elsewhere: the policy says so to the browser too.
    let policy = page.header("content-security-policy").unwrap();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(!page.body.contains("http://") && !page.body.contains("https://"));
    assert_eq!(page.header("connection"), Some("close"));

    let script = get(http, "/dashboard.js").await;
    assert_eq!(script.status, 200);
    assert_eq!(
        script.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(script.body.contains("api/stats"));
    assert!(
        !script.body.contains("https://"),
        "the script loads nothing"
    );

    let style = get(http, "/dashboard.css").await;
    assert_eq!(style.status, 200);
    assert_eq!(
        style.header("content-type"),
        Some("text/css; charset=utf-8")
    );

    let module = get(http, "/courier.js").await;
    assert_eq!(module.status, 200);
    assert_eq!(
        module.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(module.body, courier_web::COURIER_JS);

    // HEAD where GET is: the head alone.
    let head = exchange(http, b"HEAD / HTTP/1.1\r\nHost: courier\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_stats_follows_publishes_queues_and_durable_subscriptions() {
    let dir = TempDir::new("dashboard-api");
    let broker = broker(&dir).await;
    let http = broker.metrics_address().unwrap();

    let answer = get(http, "/api/stats").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    let before: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(before["published"], 0);
    assert_eq!(before["web_connections"], 0);
    assert_eq!(before["version"], env!("CARGO_PKG_VERSION"));
    assert!(before["cluster"].is_null());
    assert!(before["queues"].as_array().unwrap().is_empty());
    let bounds = before["publish_latency"]["bounds_us"].as_array().unwrap();
    let counts = before["publish_latency"]["counts"].as_array().unwrap();
    assert_eq!(bounds.len() + 1, counts.len());

    let bus = RemotePubSub::with_client(client(&broker).await);
    bus.durable("audit", "dash.>").await.unwrap();
    let publisher = bus.publisher();
    for n in 0..5 {
        publisher
            .publish_confirmed("dash.tick", format!("tick {n}"))
            .await
            .unwrap();
    }
    let queue = RemoteQueue::with_client(client(&broker).await, "dash-jobs");
    queue
        .enqueue(courier_queue::Message::new("job"))
        .await
        .unwrap();

    let after = stats(http).await;
    assert_eq!(after["published"], 5, "{after}");
    assert_eq!(after["stored"], 5, "{after}");
    assert!(after["connections"].as_u64().unwrap() >= 2, "{after}");
    assert!(after["uptime_ms"].as_u64() >= before["uptime_ms"].as_u64());
    let counted: u64 = after["publish_latency"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(counted, 5);
    let queues = after["queues"].as_array().unwrap();
    let jobs = queues
        .iter()
        .find(|q| q["name"] == "dash-jobs")
        .unwrap_or_else(|| panic!("dash-jobs in {queues:?}"));
    assert_eq!(jobs["depth"], 1);
    assert_eq!(jobs["in_flight"], 0);
    assert_eq!(jobs["enqueued"], 1);
    assert_eq!(jobs["consumers"], 0);
    assert_eq!(
        after["durable"],
        serde_json::json!([{"name": "audit", "filter": "dash.>"}])
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_stats_counts_consumers_while_attached_and_enqueues_but_not_duplicates() {
    let dir = TempDir::new("dashboard-consumers");
    let broker = broker(&dir).await;
    let http = broker.metrics_address().unwrap();
    let queue = RemoteQueue::with_client(client(&broker).await, "dash-work");
    for key in ["a", "b", "a"] {
        queue
            .enqueue(courier_queue::Message::new("job").with_key(key))
            .await
            .unwrap();
    }
    let work = until_queue(http, "dash-work", "enqueued", 2).await;
    assert_eq!(work["duplicates"], 1, "{work}");
    assert_eq!(work["consumers"], 0, "{work}");

    // Two remote consumers, one over a connection of its own.
    let other = RemoteQueue::with_client(client(&broker).await, "dash-work");
    let first = queue.consumer(1).await.unwrap();
    let second = other.consumer(1).await.unwrap();
    until_queue(http, "dash-work", "consumers", 2).await;
    let metrics = get(http, "/metrics").await;
    for line in [
        "# TYPE courier_queue_consumers gauge",
        "courier_queue_consumers{queue=\"dash-work\"} 2",
        "# TYPE courier_queue_enqueued_total counter",
        "courier_queue_enqueued_total{queue=\"dash-work\"} 2",
        // Its dead-letter queue is open beside it, with nobody on it.
        "courier_queue_consumers{queue=\"dash-work.dlq\"} 0",
    ] {
        assert!(
            metrics.body.contains(line),
            "no {line:?} in\n{}",
            metrics.body
        );
    }

    // Gone: the host's consumer goes with the call.
    drop(first);
    until_queue(http, "dash-work", "consumers", 1).await;
    drop(second);
    let work = until_queue(http, "dash-work", "consumers", 0).await;
    assert_eq!(work["enqueued"], 2, "a counter, not a gauge: {work}");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueued_counts_from_each_start_while_recovered_messages_stay_in_depth() {
    let dir = TempDir::new("dashboard-restart");
    let first = broker(&dir).await;
    let queue = RemoteQueue::with_client(client(&first).await, "dash-kept");
    for _ in 0..3 {
        queue
            .enqueue(courier_queue::Message::new("kept"))
            .await
            .unwrap();
    }
    assert_eq!(queue.stats().await.unwrap().enqueued, 3);
    drop(queue);
    first.shutdown().await;

    let second = broker(&dir).await;
    let http = second.metrics_address().unwrap();
    let queue = RemoteQueue::with_client(client(&second).await, "dash-kept");
    // Opens it (nothing has since the start).
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.depth, stats.enqueued), (3, 0), "{stats:?}");
    queue
        .enqueue(courier_queue::Message::new("new"))
        .await
        .unwrap();
    let kept = until_queue(http, "dash-kept", "enqueued", 1).await;
    assert_eq!(kept["depth"], 4, "{kept}");
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_stay_prometheus_text_with_browser_connections_counted_apart() {
    let dir = TempDir::new("dashboard-metrics");
    let broker = broker(&dir).await;
    let http = broker.metrics_address().unwrap();
    let bus = RemotePubSub::with_client(client(&broker).await);
    bus.publisher()
        .publish_confirmed("dash.one", "x")
        .await
        .unwrap();

    let metrics = get(http, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(metrics.header("cache-control"), Some("no-store"));
    for line in [
        "# TYPE courier_published_total counter",
        "courier_published_total 1",
        "# TYPE courier_web_connections gauge",
        "courier_web_connections 0",
        "courier_publish_seconds_count 1",
    ] {
        assert!(
            metrics.body.contains(line),
            "no {line:?} in\n{}",
            metrics.body
        );
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_are_404_with_the_routes_and_other_methods_405() {
    let dir = TempDir::new("dashboard-routes");
    let broker = broker(&dir).await;
    let http = broker.metrics_address().unwrap();

    let missing = get(http, "/nothing/here").await;
    assert_eq!(missing.status, 404);
    for route in ["/api/stats", "/metrics", "/courier.js"] {
        assert!(missing.body.contains(route), "{}", missing.body);
    }

    for request in [
        "POST /api/stats HTTP/1.1\r\nHost: courier\r\nContent-Length: 2\r\n\r\n{}".to_string(),
        "DELETE / HTTP/1.1\r\nHost: courier\r\n\r\n".to_string(),
        "PUT /metrics HTTP/1.1\r\nHost: courier\r\nContent-Length: 0\r\n\r\n".to_string(),
    ] {
        let answer = exchange(http, request.as_bytes()).await.unwrap();
        assert_eq!(answer.status, 405, "{request}");
        assert!(answer.header("allow").unwrap().contains("GET"), "{request}");
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_limit_is_refused() {
    let dir = TempDir::new("dashboard-head");
    let broker = broker(&dir).await;
    let http = broker.metrics_address().unwrap();

    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: courier\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    match exchange(http, big.as_bytes()).await {
        // Refused before it was all read: the kernel may reset instead.
        None => {}
        Some(answer) => assert_eq!(answer.status, 431, "{}", answer.body),
    }
    // Just under the limit is fine.
    let fits = format!(
        "GET /metrics HTTP/1.1\r\nHost: courier\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(6 * 1024)
    );
    assert_eq!(exchange(http, fits.as_bytes()).await.unwrap().status, 200);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_and_idle_ones_time_out() {
    let dir = TempDir::new("dashboard-limit");
    let broker = broker(&dir).await;
    let http = broker.metrics_address().unwrap();
    let limit = courier_broker::metrics::MAX_CONNECTIONS;

    // More idle connections than the endpoint serves at once: the first
    // `limit` hold every slot (until the head timeout), so one more asking
    // for something is closed unanswered.
    let mut idle = Vec::new();
    for _ in 0..limit + 8 {
        idle.push(TcpStream::connect(http).await.unwrap());
    }
    assert!(
        exchange(http, b"GET /api/stats HTTP/1.1\r\nHost: courier\r\n\r\n")
            .await
            .is_none(),
        "served past the limit"
    );

    // Every idle one is closed: those past the limit at once, the others
    // when their head does not come within the timeout.
    let closed = futures_util::future::join_all(idle.into_iter().map(|mut stream| async move {
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, stream.read(&mut byte)).await
    }))
    .await;
    for (n, read) in closed.into_iter().enumerate() {
        match read {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(_)) => panic!("connection {n} got an answer to nothing"),
            Err(_) => panic!("connection {n} still open after {WAIT:?}"),
        }
    }

    // And the endpoint serves again once they are gone (a slot is freed
    // just after its socket closes: allow a moment).
    let mut served = None;
    for _ in 0..100 {
        if let Some(answer) =
            exchange(http, b"GET /api/stats HTTP/1.1\r\nHost: courier\r\n\r\n").await
        {
            served = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served.expect("served again").status, 200);
    broker.shutdown().await;
}

const PAGE: &str = include_str!("../web/index.html");
const SCRIPT: &str = include_str!("../web/dashboard.js");

/// Every `getElementById('…')` of the script names an element of the page:
/// a renamed id would otherwise fail only in a browser, silently.
#[test]
fn the_script_finds_every_element_it_looks_for() {
    let mut checked = 0;
    for piece in SCRIPT.split("getElementById(").skip(1) {
        let Some(quoted) = piece.strip_prefix('\'') else {
            continue; // By a variable (chart.id): checked below.
        };
        let id = &quoted[..quoted.find('\'').unwrap()];
        assert!(
            PAGE.contains(&format!("id=\"{id}\"")),
            "no #{id} on the page"
        );
        checked += 1;
    }
    for chart in ["chart-messages", "chart-drops", "chart-connections"] {
        assert!(SCRIPT.contains(&format!("id: '{chart}'")), "{chart}");
        assert!(PAGE.contains(&format!("id=\"{chart}\"")), "{chart}");
    }
    assert!(
        checked >= 10,
        "only {checked} ids found: has the script changed shape?"
    );
}

/// The queues table's head has one column per cell the script puts in a
/// row, and the consumers column is among them: a cell added without its
/// header (or the reverse) would shift every column after it.
#[test]
fn the_queue_table_has_a_header_for_every_cell_of_a_row() {
    let section = &PAGE[PAGE.find("id=\"queues\"").expect("the queues panel")..];
    let head = &section[..section.find("</thead>").expect("its head")];
    let headers = head.matches("<th ").count();
    assert!(head.contains(">consumers</th>"), "{head}");

    let start = SCRIPT
        .find("function queueCells(")
        .expect("the row builder");
    let body = &SCRIPT[start..];
    let body = &body[..body.find("\n  }\n").expect("its end")];
    // Every counter cell, plus the name and the depth bar.
    let cells = body.matches("cell('").count() + 2;
    assert_eq!(headers, cells, "{head}\n{body}");
    // `data-metric="queue-consumers-<name>"`, for scripts and tests.
    assert!(body.contains("cell('consumers')"), "{body}");
    assert!(body.contains("'queue-' + key + '-' + name"), "{body}");
    assert!(SCRIPT.contains("x.enqueued"), "enqueued/s from the counter");
}

/// The script parses, where Node is installed (CI installs it and sets
/// `CI_REQUIRE_NODE`, so there it cannot skip).
#[test]
fn the_script_is_valid_javascript() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/web/dashboard.js");
    match std::process::Command::new("node")
        .arg("--check")
        .arg(path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(err) if std::env::var_os("CI_REQUIRE_NODE").is_none() => {
            eprintln!("skipped: node not found ({err})");
        }
        Err(err) => panic!("node is required (CI_REQUIRE_NODE) but: {err}"),
    }
}
