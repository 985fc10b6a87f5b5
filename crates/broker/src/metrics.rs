//! The broker's HTTP endpoint: Prometheus metrics, stats as JSON, and a
//! live dashboard.
//!
//! One small HTTP/1.1 server (axum on hyper) at the `metrics` address
//! (`127.0.0.1:7879` by default) serves:
//!
//! | route | content | type |
//! |---|---|---|
//! | `GET /` | the dashboard page | `text/html` |
//! | `GET /dashboard.js`, `GET /dashboard.css` | its script and style sheet, built into the binary | `text/javascript`, `text/css` |
//! | `GET /courier.js` | the browser client module ([`courier_web::COURIER_JS`]) | `text/javascript` |
//! | `GET /metrics` | [`render`]: the [text exposition format] | `text/plain; version=0.0.4` |
//! | `GET /api/stats` | the broker's stats as JSON (below) | `application/json` |
//!
//! `HEAD` is answered wherever `GET` is; any other method on those paths
//! gets 405, any other path 404 with the list of routes. Nothing is read
//! from a request but its head, and nothing is ever written: the endpoint
//! is read-only. The API and the metrics are sent with
//! `cache-control: no-store`, the page with a content security policy
//! that allows nothing from elsewhere (the dashboard draws its own charts;
//! it loads no fonts, scripts or styles from the network).
//!
//! # Limits
//!
//! So that a scraper or a browser gone wrong cannot hurt the broker
//! ([`EndpointLimits`], with these defaults):
//!
//! - one request per connection (responses say `connection: close`);
//! - at most [`MAX_CONNECTIONS`] (32) connections at once: past that a new
//!   connection is closed as soon as it is accepted;
//! - a request head of at most [`MAX_REQUEST_HEAD`] (8 KiB; hyper will not
//!   go lower) else 431, and at most 100 header fields;
//! - [`REQUEST_TIMEOUT`] (5 s) both to receive the head and for the whole
//!   exchange, after which the connection is closed.
//!
//! # `GET /api/stats`
//!
//! The page polls it once a second; scripts may too. Fields are only ever
//! added; counters count from the broker's start (so they go back to 0
//! when it restarts: `uptime_ms` going backwards says so).
//!
//! ```json
//! {
//!   "version": "0.1.0",
//!   "uptime_ms": 61234,
//!   "connections": 3, "web_connections": 1, "subscriptions": 4,
//!   "published": 120, "delivered": 240, "dropped": 0, "stored": 12,
//!   "publish_latency": {"bounds_us": [10, 25, …, 250000], "counts": [0, 4, …, 0], "sum_us": 5120},
//!   "queues": [{"name": "orders", "depth": 7, "in_flight": 2, "delivered": 40,
//!               "acknowledged": 31, "redelivered": 1, "dead_lettered": 0,
//!               "expired": 0, "duplicates": 0, "bytes_on_disk": 40960,
//!               "enqueued": 40, "consumers": 2}],
//!   "durable": [{"name": "audit", "filter": "orders.>"}],
//!   "cluster": null
//! }
//! ```
//!
//! - `version`: the broker's crate version.
//! - `uptime_ms`: milliseconds since the broker started.
//! - `connections`: Courier (RPC) client connections open;
//!   `web_connections`: browser (WebSocket) connections open, apart;
//!   `subscriptions`: live subscriptions on the bus.
//! - `published`, `delivered` (one per subscription reached), `dropped`
//!   (by slow-consumer policies), `stored` (copies kept for durable
//!   subscriptions): counters.
//! - `publish_latency`: the publish-time histogram: `counts[i]` calls took
//!   at most `bounds_us[i]` µs (and more than the bound before); the last
//!   count, one past the bounds, is the rest. `sum_us` is their total.
//! - `queues`: every open queue (dead-letter queues included), by name,
//!   with its gauges `depth` (stored, not leased), `in_flight` (leased to
//!   consumers), `consumers` (attached now: one per remote consumer
//!   connected, and any embedded ones) and `bytes_on_disk`, and its
//!   counters `enqueued` (messages stored since the queue opened —
//!   duplicates not, and messages found on disk when it opened not
//!   either, so it starts from 0 at each broker start; in a dead-letter
//!   queue, the dead letters moved in), `delivered`, `acknowledged`,
//!   `redelivered`, `dead_lettered`, `expired` and `duplicates` (enqueues
//!   refused as duplicates). The dashboard's enqueued/s is `enqueued`'s
//!   rate.
//! - `durable`: durable subscriptions, by name, with their subject filter.
//! - `cluster`: `null` outside a cluster; in one, this node's view:
//!   `node` (its id), `role` (`leader`, `follower`, `candidate`, `learner`,
//!   `shutdown`), `leader` (an id, or `null`), `term`, `last_log_index`,
//!   `applied_index`, `revision` (the key-value store's), `leader_changes`,
//!   `raft_rpc_errors`, `members` (`id`, `address`, `voter`, and `lag`:
//!   entries behind the leader, known on the leader only, else `null`),
//!   and `routes`, its pub/sub routes to the others (`node`, `address`,
//!   `state`: `up`, `connecting` or `down`, `messages_out`, `bytes_out`,
//!   `messages_in`, `bytes_in`, `dropped`, `reconnects`, `queued`,
//!   `interest`, `refused_interest`, `unserved`).
//!
//! [text exposition format]: https://prometheus.io/docs/instrumenting/exposition_formats/

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State as Shared;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use courier_pubsub::remote::LATENCY_BUCKETS_US;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::{BrokerStats, State};

/// Connections the endpoint serves at once, by default.
pub const MAX_CONNECTIONS: usize = 32;
/// Bytes a request head may take, by default (hyper's floor, too).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time to receive a request head, and for the whole exchange, by default.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The smallest head limit hyper accepts; lower settings are raised to it.
const MIN_REQUEST_HEAD: usize = 8 * 1024;

/// The HTTP endpoint's limits.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointLimits {
    /// Connections served at once; more are closed as they are accepted.
    pub max_connections: usize,
    /// Bytes a request head may take (at least 8 KiB: hyper's floor).
    pub max_request_head: usize,
    /// Time to receive a request head, and for the whole exchange.
    pub request_timeout: Duration,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        EndpointLimits {
            max_connections: MAX_CONNECTIONS,
            max_request_head: MAX_REQUEST_HEAD,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

impl EndpointLimits {
    /// With at most `n` connections at once (at least 1).
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// With request heads of at most `bytes` (raised to 8 KiB if lower).
    pub fn with_max_request_head(mut self, bytes: usize) -> Self {
        self.max_request_head = bytes.max(MIN_REQUEST_HEAD);
        self
    }

    /// With `timeout` to receive a head and for the whole exchange.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

/// Renders stats in the Prometheus text format.
pub fn render(stats: &BrokerStats) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "courier_uptime_seconds",
        "gauge",
        "Seconds since the broker started.",
        stats.uptime_ms / 1000,
    );
    metric(
        "courier_connections",
        "gauge",
        "Client connections open.",
        stats.connections,
    );
    metric(
        "courier_web_connections",
        "gauge",
        "Browser (WebSocket) connections open.",
        stats.web_connections,
    );
    metric(
        "courier_subscriptions",
        "gauge",
        "Live subscriptions.",
        stats.subscriptions,
    );
    metric(
        "courier_published_total",
        "counter",
        "Messages published.",
        stats.published,
    );
    metric(
        "courier_delivered_total",
        "counter",
        "Live deliveries, one per subscription reached.",
        stats.delivered,
    );
    metric(
        "courier_dropped_total",
        "counter",
        "Messages dropped by slow-consumer policies.",
        stats.dropped,
    );
    metric(
        "courier_durable_stored_total",
        "counter",
        "Copies stored in durable subscriptions.",
        stats.stored,
    );
    metric(
        "courier_durable_subscriptions",
        "gauge",
        "Durable subscriptions.",
        stats.durable.len() as u64,
    );

    let _ = writeln!(
        out,
        "# HELP courier_publish_seconds Time the broker took per publish call (store and deliver).\n# TYPE courier_publish_seconds histogram"
    );
    let mut cumulative = 0;
    for (bound, count) in LATENCY_BUCKETS_US.iter().zip(&stats.publish_latency) {
        cumulative += count;
        let _ = writeln!(
            out,
            "courier_publish_seconds_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    cumulative += stats
        .publish_latency
        .get(LATENCY_BUCKETS_US.len())
        .copied()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "courier_publish_seconds_bucket{{le=\"+Inf\"}} {cumulative}\ncourier_publish_seconds_sum {}\ncourier_publish_seconds_count {cumulative}",
        stats.publish_latency_sum_us as f64 / 1e6
    );

    type Field = fn(&courier_queue::core::QueueStats) -> u64;
    let queue_metrics: [(&str, &str, &str, Field); 10] = [
        (
            "courier_queue_depth",
            "gauge",
            "Messages stored and not leased.",
            |s| s.depth,
        ),
        (
            "courier_queue_in_flight",
            "gauge",
            "Messages leased to consumers.",
            |s| s.in_flight,
        ),
        (
            "courier_queue_consumers",
            "gauge",
            "Consumers attached.",
            |s| s.consumers,
        ),
        (
            "courier_queue_enqueued_total",
            "counter",
            "Messages stored since the queue opened (not duplicates, not those recovered from disk).",
            |s| s.enqueued,
        ),
        (
            "courier_queue_delivered_total",
            "counter",
            "Deliveries made.",
            |s| s.delivered,
        ),
        (
            "courier_queue_acknowledged_total",
            "counter",
            "Messages acknowledged.",
            |s| s.acknowledged,
        ),
        (
            "courier_queue_redelivered_total",
            "counter",
            "Deliveries after the first.",
            |s| s.redelivered,
        ),
        (
            "courier_queue_dead_lettered_total",
            "counter",
            "Messages moved to the dead-letter queue.",
            |s| s.dead_lettered,
        ),
        (
            "courier_queue_expired_total",
            "counter",
            "Messages dropped at the end of their time-to-live.",
            |s| s.expired,
        ),
        (
            "courier_queue_disk_bytes",
            "gauge",
            "Bytes of log on disk.",
            |s| s.bytes_on_disk,
        ),
    ];
    for (name, kind, help, field) in queue_metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        // Queue names are [A-Za-z0-9._-]: nothing to escape.
        for queue in &stats.queues {
            let _ = writeln!(
                out,
                "{name}{{queue=\"{}\"}} {}",
                queue.name,
                field(&queue.stats)
            );
        }
    }
    if let Some(cluster) = &stats.cluster {
        render_cluster(&mut out, cluster);
    }
    out
}

/// The metadata group's Raft metrics (`group="0"`), and per member lag on
/// the leader.
fn render_cluster(out: &mut String, cluster: &crate::ClusterStats) {
    let status = &cluster.status;
    let group: [(&str, &str, &str, u64); 7] = [
        (
            "courier_cluster_term",
            "gauge",
            "The current Raft term.",
            status.term,
        ),
        (
            "courier_cluster_leader",
            "gauge",
            "The leader this node knows of (0: none).",
            status.leader.unwrap_or(0),
        ),
        (
            "courier_cluster_is_leader",
            "gauge",
            "1 if this node leads the group.",
            u64::from(status.leader == Some(status.node)),
        ),
        (
            "courier_cluster_leader_changes_total",
            "counter",
            "Leader changes seen since start.",
            status.leader_changes,
        ),
        (
            "courier_cluster_last_log_index",
            "gauge",
            "Index of the last entry in this node's log.",
            status.last_log_index,
        ),
        (
            "courier_cluster_applied_index",
            "gauge",
            "Index of the last entry applied to the state machine.",
            status.applied_index,
        ),
        (
            "courier_cluster_apply_lag",
            "gauge",
            "Entries in the log not yet applied.",
            status.last_log_index.saturating_sub(status.applied_index),
        ),
    ];
    for (name, kind, help, value) in group {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{group=\"0\"}} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP courier_cluster_raft_rpc_errors_total Raft messages to peers that failed.\n# TYPE courier_cluster_raft_rpc_errors_total counter\ncourier_cluster_raft_rpc_errors_total {}",
        cluster.raft_rpc_errors
    );
    let _ = writeln!(
        out,
        "# HELP courier_cluster_member_lag Entries a member is behind the leader (on the leader).\n# TYPE courier_cluster_member_lag gauge"
    );
    for member in &status.members {
        if let Some(lag) = member.lag {
            let _ = writeln!(
                out,
                "courier_cluster_member_lag{{group=\"0\",node=\"{}\"}} {lag}",
                member.id
            );
        }
    }
    if status.routes.is_empty() {
        return;
    }
    type Field = fn(&courier_pubsub::route::RouteStats) -> u64;
    let routes: [(&str, &str, &str, Field); 11] = [
        (
            "courier_route_up",
            "gauge",
            "Whether the pub/sub route to the peer is up.",
            |r| u64::from(r.state == "up"),
        ),
        (
            "courier_route_messages_out_total",
            "counter",
            "Messages sent to the peer.",
            |r| r.messages_out,
        ),
        (
            "courier_route_bytes_out_total",
            "counter",
            "Payload bytes sent to the peer.",
            |r| r.bytes_out,
        ),
        (
            "courier_route_messages_in_total",
            "counter",
            "Messages received from the peer.",
            |r| r.messages_in,
        ),
        (
            "courier_route_bytes_in_total",
            "counter",
            "Payload bytes received from the peer.",
            |r| r.bytes_in,
        ),
        (
            "courier_route_dropped_total",
            "counter",
            "Messages for the peer dropped (buffer full or route down).",
            |r| r.dropped,
        ),
        (
            "courier_route_reconnects_total",
            "counter",
            "Route sessions opened after the first.",
            |r| r.reconnects,
        ),
        (
            "courier_route_queued",
            "gauge",
            "Messages buffered for the peer.",
            |r| r.queued as u64,
        ),
        (
            "courier_route_interest",
            "gauge",
            "Interests the peer has registered here.",
            |r| r.interest as u64,
        ),
        (
            "courier_route_refused_interest_total",
            "counter",
            "Interests of the peer refused (over the limit, or invalid).",
            |r| r.refused_interest,
        ),
        (
            "courier_route_unserved_total",
            "counter",
            "Messages from the peer for a queue group with no member here any more.",
            |r| r.unserved,
        ),
    ];
    for (name, kind, help, value) in routes {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for route in &status.routes {
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {}", route.node, value(route));
        }
    }
}

/// The running HTTP endpoint.
pub(crate) struct Endpoint {
    address: SocketAddr,
    task: JoinHandle<()>,
}

impl Endpoint {
    /// Binds `address` and serves within `limits`.
    pub(crate) async fn start(
        address: SocketAddr,
        state: Arc<State>,
        limits: EndpointLimits,
    ) -> std::io::Result<Endpoint> {
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let task = tokio::spawn(accept(listener, router(state), limits));
        Ok(Endpoint { address, task })
    }

    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops accepting and closes every connection (the accept task owns
    /// them: they go with it).
    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn accept(listener: TcpListener, router: Router, limits: EndpointLimits) {
    let mut http = http1::Builder::new();
    http.keep_alive(false)
        .max_buf_size(limits.max_request_head.max(MIN_REQUEST_HEAD))
        .header_read_timeout(limits.request_timeout)
        .timer(TokioTimer::new());
    let http = Arc::new(http);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Owned here so that aborting this task (stop) ends every connection.
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Reap finished connections so the set stays as small as the
            // number open (at most max_connections).
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors, say: do not spin.
                tracing::debug!("metrics endpoint: accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // Too many at once: closed by the drop.
        };
        let service = TowerToHyperService::new(router.clone());
        let http = http.clone();
        let timeout = limits.request_timeout;
        connections.spawn(async move {
            serve(stream, &http, service, timeout).await;
            drop(slot);
        });
    }
}

async fn serve(
    stream: TcpStream,
    http: &http1::Builder,
    service: TowerToHyperService<Router>,
    timeout: Duration,
) {
    let _ = stream.set_nodelay(true);
    let connection = http.serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(timeout, connection).await {
        Ok(Ok(())) => {}
        // A client that went away or sent nonsense (hyper answered it).
        Ok(Err(err)) => tracing::trace!("metrics endpoint: {err}"),
        Err(_) => tracing::trace!("metrics endpoint: request timed out"),
    }
}

const INDEX_HTML: &str = include_str!("../web/index.html");
const DASHBOARD_JS: &str = include_str!("../web/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../web/dashboard.css");

/// What a 404 says.
const ROUTES_HINT: &str = "not found: this is the Courier broker's HTTP endpoint; try\n  /            the dashboard\n  /api/stats   stats as JSON\n  /metrics     Prometheus metrics\n  /courier.js  the browser client\n";

/// The page may load only its own script and style sheet and talk only
/// to this endpoint.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/dashboard.js", get(dashboard_js))
        .route("/dashboard.css", get(dashboard_css))
        .route("/courier.js", get(courier_js))
        .route("/metrics", get(prometheus))
        .route("/api/stats", get(api_stats))
        .fallback(not_found)
        .with_state(state)
}

/// A response with a body and the headers every answer here carries.
fn answer(
    status: StatusCode,
    content_type: &'static str,
    cache: &'static str,
    body: impl IntoResponse,
) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Assets are built into the binary, so a new broker brings new ones:
/// revalidate rather than cache.
const ASSET_CACHE: &str = "no-cache";
const TEXT: &str = "text/plain; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";

async fn index() -> Response {
    let mut response = answer(
        StatusCode::OK,
        "text/html; charset=utf-8",
        ASSET_CACHE,
        INDEX_HTML,
    );
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_POLICY),
    );
    response
}

async fn dashboard_js() -> Response {
    answer(StatusCode::OK, JAVASCRIPT, ASSET_CACHE, DASHBOARD_JS)
}

async fn dashboard_css() -> Response {
    answer(
        StatusCode::OK,
        "text/css; charset=utf-8",
        ASSET_CACHE,
        DASHBOARD_CSS,
    )
}

async fn courier_js() -> Response {
    answer(
        StatusCode::OK,
        JAVASCRIPT,
        ASSET_CACHE,
        courier_web::COURIER_JS,
    )
}

async fn prometheus(Shared(state): Shared<Arc<State>>) -> Response {
    let body = render(&state.stats().await);
    answer(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        "no-store",
        body,
    )
}

async fn api_stats(Shared(state): Shared<Arc<State>>) -> Response {
    let stats = state.stats().await;
    match serde_json::to_string(&ApiStats::new(&stats)) {
        Ok(body) => answer(StatusCode::OK, "application/json", "no-store", body),
        // Only plain data is serialized: this cannot happen, but if it
        // did the client should see why.
        Err(err) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            "no-store",
            format!("cannot encode the stats: {err}\n"),
        ),
    }
}

async fn not_found() -> Response {
    answer(StatusCode::NOT_FOUND, TEXT, "no-store", ROUTES_HINT)
}

/// `/api/stats`, as documented in the module docs: its own shape, so the
/// endpoint stays put when [`BrokerStats`] changes for the RPC's sake.
#[derive(serde::Serialize)]
struct ApiStats<'a> {
    version: &'static str,
    uptime_ms: u64,
    connections: u64,
    web_connections: u64,
    subscriptions: u64,
    published: u64,
    delivered: u64,
    dropped: u64,
    stored: u64,
    publish_latency: ApiLatency<'a>,
    queues: Vec<ApiQueue<'a>>,
    durable: Vec<ApiDurable<'a>>,
    cluster: Option<ApiCluster<'a>>,
}

#[derive(serde::Serialize)]
struct ApiLatency<'a> {
    bounds_us: &'static [u64],
    counts: &'a [u64],
    sum_us: u64,
}

#[derive(serde::Serialize)]
struct ApiQueue<'a> {
    name: &'a str,
    #[serde(flatten)]
    stats: &'a courier_queue::core::QueueStats,
}

#[derive(serde::Serialize)]
struct ApiDurable<'a> {
    name: &'a str,
    filter: &'a str,
}

#[derive(serde::Serialize)]
struct ApiCluster<'a> {
    #[serde(flatten)]
    status: &'a courier_cluster::node::Status,
    raft_rpc_errors: u64,
}

impl<'a> ApiStats<'a> {
    fn new(stats: &'a BrokerStats) -> Self {
        ApiStats {
            version: env!("CARGO_PKG_VERSION"),
            uptime_ms: stats.uptime_ms,
            connections: stats.connections,
            web_connections: stats.web_connections,
            subscriptions: stats.subscriptions,
            published: stats.published,
            delivered: stats.delivered,
            dropped: stats.dropped,
            stored: stats.stored,
            publish_latency: ApiLatency {
                bounds_us: &LATENCY_BUCKETS_US,
                counts: &stats.publish_latency,
                sum_us: stats.publish_latency_sum_us,
            },
            queues: stats
                .queues
                .iter()
                .map(|q| ApiQueue {
                    name: &q.name,
                    stats: &q.stats,
                })
                .collect(),
            durable: stats
                .durable
                .iter()
                .map(|(name, filter)| ApiDurable { name, filter })
                .collect(),
            cluster: stats.cluster.as_ref().map(|c| ApiCluster {
                status: &c.status,
                raft_rpc_errors: c.raft_rpc_errors,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_shape_is_the_documented_one() {
        let mut stats = BrokerStats {
            published: 3,
            web_connections: 2,
            publish_latency: vec![0; LATENCY_BUCKETS_US.len() + 1],
            durable: vec![("audit".into(), "orders.>".into())],
            ..BrokerStats::default()
        };
        let mut queue = courier_queue::core::QueueStats::default();
        queue.consumers = 2;
        queue.enqueued = 9;
        stats.queues.push(crate::QueueReport {
            name: "orders".into(),
            stats: queue,
        });
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&ApiStats::new(&stats)).unwrap()).unwrap();
        assert_eq!(json["published"], 3);
        assert_eq!(json["web_connections"], 2);
        assert_eq!(json["queues"][0]["name"], "orders");
        assert_eq!(json["queues"][0]["depth"], 0);
        assert_eq!(json["queues"][0]["in_flight"], 0);
        assert_eq!(json["queues"][0]["consumers"], 2);
        assert_eq!(json["queues"][0]["enqueued"], 9);
        assert_eq!(json["durable"][0]["filter"], "orders.>");
        assert_eq!(
            json["publish_latency"]["bounds_us"]
                .as_array()
                .unwrap()
                .len()
                + 1,
            json["publish_latency"]["counts"].as_array().unwrap().len()
        );
        assert!(json["cluster"].is_null());
        assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn render_counts_browser_connections_apart() {
        let stats = BrokerStats {
            connections: 4,
            web_connections: 7,
            ..BrokerStats::default()
        };
        let text = render(&stats);
        assert!(text.contains("\ncourier_connections 4\n"), "{text}");
        assert!(
            text.contains("# TYPE courier_web_connections gauge\ncourier_web_connections 7\n"),
            "{text}"
        );
    }

    #[test]
    fn render_has_queue_consumers_and_enqueues() {
        let mut queue = courier_queue::core::QueueStats::default();
        queue.consumers = 3;
        queue.enqueued = 41;
        let stats = BrokerStats {
            queues: vec![crate::QueueReport {
                name: "jobs".into(),
                stats: queue,
            }],
            ..BrokerStats::default()
        };
        let text = render(&stats);
        for line in [
            "# TYPE courier_queue_consumers gauge\ncourier_queue_consumers{queue=\"jobs\"} 3\n",
            "# TYPE courier_queue_enqueued_total counter\ncourier_queue_enqueued_total{queue=\"jobs\"} 41\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn head_limits_below_hypers_floor_are_raised() {
        let limits = EndpointLimits::default()
            .with_max_request_head(100)
            .with_max_connections(0);
        assert_eq!(limits.max_request_head, MIN_REQUEST_HEAD);
        assert_eq!(limits.max_connections, 1);
    }
}
