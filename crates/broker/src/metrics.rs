//! Metrics as Prometheus text, over a minimal HTTP/1.1 endpoint.
//!
//! `GET /metrics` answers with the [text exposition format]; anything else
//! gets 404 (or 400 if it is not HTTP). The endpoint is deliberately small:
//! one request per connection, a request head of at most 8 KiB read within
//! 5 s, at most 32 connections at once (more are closed at accept), so a
//! scraper gone wrong cannot hurt the broker.
//!
//! [text exposition format]: https://prometheus.io/docs/instrumenting/exposition_formats/

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use courier_pubsub::remote::LATENCY_BUCKETS_US;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::{BrokerStats, State};

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 32;

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
    let queue_metrics: [(&str, &str, &str, Field); 8] = [
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
    pub(crate) async fn start(address: SocketAddr, state: Arc<State>) -> std::io::Result<Endpoint> {
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue; // Too many at once: closed by the drop.
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &state)).await;
                    drop(slot);
                });
            }
        });
        Ok(Endpoint { address, task })
    }

    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn answer(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(b"GET"), Some(b"/metrics"), Some(version)) if version.starts_with(b"HTTP/1.") => {
            let body = render(&state.stats().await);
            respond(&mut stream, "200 OK", &body).await
        }
        (Some(_), Some(_), Some(version)) if version.starts_with(b"HTTP/1.") => {
            respond(&mut stream, "404 Not Found", "try /metrics\n").await
        }
        _ => respond(&mut stream, "400 Bad Request", "").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
