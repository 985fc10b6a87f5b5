//! The HTTP gateway: the page and its JSON API. Reads become requests to
//! the service group `svc.tickets`; writes become messages on the durable
//! queue `tickets.writes`, answered 202 once the broker has stored them.
//!
//! | route | answer |
//! |---|---|
//! | `GET /`, `/app.js`, `/style.css` | the page (embedded) |
//! | `GET /courier.js` | the browser client, [`courier_web::COURIER_JS`] |
//! | `GET /api/config` | `{"ws": "<broker's WebSocket URL>"}` |
//! | `GET /api/tickets?q=text` | `{"tickets": [...], "count": n, "served_by": "service-<pid>"}` |
//! | `GET /api/tickets/{id}` | `{"ticket": {...}, "served_by": ...}`, 404 if none |
//! | `POST /api/tickets` `{title, body}` | 202 `{"id": ..., "status": "queued"}` |
//!
//! Errors are JSON too: `{"error": "..."}` with 400, 404, 413, 503 or 500.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use courier_pubsub::remote::{Address, ClientConfig, RemotePubSub, RemotePubSubError};
use courier_pubsub::typed::TypeError;
use courier_pubsub::PubSub;
use courier_queue::remote::RemoteQueue;
use courier_queue::TypedQueue;
use serde::Deserialize;
use serde_json::json;

use crate::model::{
    validate_id, validate_query, NewTicket, ReadOutcome, ReadReply, ReadRequest, Ticket,
    TicketWrite, MAX_RESULTS, SERVICE_SUBJECT, WRITES_QUEUE,
};
use crate::Shutdown;

/// How long one read waits for a service instance by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before the one retry of a read (lets the broker notice an
/// instance that died).
pub const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// The largest request body accepted: a ticket at its limits in 4-byte
/// characters (4 × 4200 bytes) and its JSON fit.
pub const MAX_REQUEST_BODY: usize = 32 * 1024;
/// How long connections in flight get once shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Connections served at once by default; past that a new connection is
/// closed as soon as it is accepted (a browser opens about six per page).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// How long a client has to send a request's head by default, including
/// an idle keep-alive connection's next one: a slow or silent client
/// (slowloris) cannot hold a connection slot longer.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_JS: &str = include_str!("../static/app.js");
const STYLE_CSS: &str = include_str!("../static/style.css");

/// What the gateway is told at start.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The broker's Courier address.
    pub broker: Address,
    /// The broker's WebSocket URL, for the page.
    pub ws_url: String,
    /// Where to listen for HTTP.
    pub listen: SocketAddr,
    /// One read's timeout.
    pub request_timeout: Duration,
    /// Connections served at once ([`DEFAULT_MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// Time to receive a request head ([`DEFAULT_HEADER_TIMEOUT`]).
    pub header_timeout: Duration,
}

/// Shared by every handler.
#[derive(Debug)]
struct AppState {
    bus: RemotePubSub,
    writes: TypedQueue<RemoteQueue, TicketWrite>,
    ws_url: String,
    request_timeout: Duration,
    next_id: AtomicU64,
}

/// Serves until SIGINT/SIGTERM, then lets requests in flight finish.
pub async fn run(config: GatewayConfig, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let bus = RemotePubSub::connect(&config.broker, ClientConfig::default())
        .await
        .with_context(|| format!("cannot reach the broker at {}", config.broker))?;
    let queue = RemoteQueue::with_client(bus.client().clone(), WRITES_QUEUE);
    crate::worker::declare(&queue).await?;
    let state = Arc::new(AppState {
        bus,
        writes: TypedQueue::new(queue),
        ws_url: config.ws_url.clone(),
        request_timeout: config.request_timeout,
        next_id: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(broker = %config.broker, ws = %config.ws_url, "serving the tickets page");
    crate::announce(&format!("gateway listening on http://{address}"));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let limits = ServeLimits {
        max_connections: config.max_connections.max(1),
        header_timeout: config.header_timeout,
    };
    let server = tokio::spawn(serve(listener, router(state), limits, stopped));
    shutdown.wait().await;
    let _ = stop.send(true);
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(anyhow::Error::new(err).context("the HTTP server task failed")),
        Err(_) => tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them"),
    }
    Ok(())
}

/// The HTTP server's limits.
#[derive(Clone, Copy, Debug)]
struct ServeLimits {
    max_connections: usize,
    header_timeout: Duration,
}

/// Accepts until `stop` turns true, at most `limits.max_connections` at
/// once, then lets each connection finish its request in flight.
async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ServeLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let mut http = http1::Builder::new();
    http.header_read_timeout(limits.header_timeout)
        .timer(TokioTimer::new());
    let http = Arc::new(http);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => accepted,
            // Reaped as they end, so the set is as small as what is open.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors, say: do not spin.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                "{} connections open; closing a new one",
                limits.max_connections
            );
            continue; // Closed by the drop.
        };
        let (http, service, mut stop) = (
            http.clone(),
            TowerToHyperService::new(router.clone()),
            stop.clone(),
        );
        connections.spawn(async move {
            let _ = stream.set_nodelay(true);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let outcome = tokio::select! {
                outcome = connection.as_mut() => outcome,
                () = stopped(&mut stop) => {
                    // Finish the request in flight, take no other.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = outcome {
                tracing::debug!(%err, "HTTP connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Returns once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

fn router(state: Arc<AppState>) -> Router {
    let csp = format!(
        "default-src 'self'; connect-src 'self' {}; img-src 'self' data:; base-uri 'none'; form-action 'self'",
        state.ws_url
    );
    let csp = HeaderValue::from_str(&csp).unwrap_or(HeaderValue::from_static("default-src 'self'"));
    Router::new()
        .route(
            "/",
            get(move || async move {
                (
                    [
                        (
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("text/html; charset=utf-8"),
                        ),
                        (header::CONTENT_SECURITY_POLICY, csp),
                    ],
                    INDEX_HTML,
                )
            }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route(
            "/courier.js",
            get(|| async { asset("text/javascript; charset=utf-8", courier_web::COURIER_JS) }),
        )
        .route("/api/config", get(config))
        .route("/api/tickets", get(search).post(create))
        .route("/api/tickets/{id}", get(one))
        .fallback(|| async { ApiError::NotFound("no such page".into()) })
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn config(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({ "ws": state.ws_url }))
}

#[derive(Debug, Deserialize)]
struct SearchParams {
    #[serde(default)]
    q: String,
}

async fn search(
    State(state): State<Arc<AppState>>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let query = validate_query(&params.q).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let reply = state
        .read(ReadRequest::Search {
            query,
            limit: MAX_RESULTS,
        })
        .await?;
    match reply.outcome {
        ReadOutcome::Tickets(tickets) => Ok(Json(json!({
            "count": tickets.len(),
            "tickets": tickets,
            "served_by": reply.served_by,
        }))),
        other => Err(ApiError::from_outcome(other, &reply.served_by)),
    }
}

async fn one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    validate_id(&id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let reply = state.read(ReadRequest::Get { id: id.clone() }).await?;
    match reply.outcome {
        ReadOutcome::Ticket(Some(ticket)) => Ok(Json(json!({
            "ticket": ticket,
            "served_by": reply.served_by,
        }))),
        ReadOutcome::Ticket(None) => Err(ApiError::NotFoundBy {
            message: format!("no ticket {id}"),
            served_by: reply.served_by,
        }),
        other => Err(ApiError::from_outcome(other, &reply.served_by)),
    }
}

async fn create(
    State(state): State<Arc<AppState>>,
    body: Result<Json<NewTicket>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(new) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge,
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    let new = new
        .validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let ticket = Ticket {
        id: state.fresh_id(),
        title: new.title,
        body: new.body,
        created_at: crate::now_ms(),
    };
    // Enqueued again once if the first try fails in a retryable way: the
    // worker stores by id, so a write that went through twice is one row.
    let mut tried = false;
    loop {
        match state.writes.enqueue(&ticket).await {
            Ok(_) => break,
            Err(err) if !tried && err_retryable(&err) => {
                tracing::warn!(%err, "enqueue failed; trying once more");
                tried = true;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(err) => {
                tracing::error!(%err, "enqueue failed");
                return Err(ApiError::Unavailable(
                    "the write queue is unavailable; try again".into(),
                ));
            }
        }
    }
    tracing::info!(id = %ticket.id, "queued");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": ticket.id, "status": "queued" })),
    )
        .into_response())
}

fn err_retryable(err: &courier_queue::TypedError<courier_queue::remote::RemoteQueueError>) -> bool {
    matches!(err, courier_queue::TypedError::Queue(inner) if inner.is_retryable())
}

impl AppState {
    /// One read, retried once if it timed out or the broker was
    /// unavailable: reads change nothing, so a service that died holding
    /// the request costs a retry, not an error page.
    async fn read(&self, request: ReadRequest) -> Result<ReadReply, ApiError> {
        let mut retried = false;
        loop {
            let outcome = self
                .bus
                .request_typed::<ReadRequest, ReadReply>(
                    SERVICE_SUBJECT,
                    &request,
                    self.request_timeout,
                )
                .await;
            match outcome {
                Ok(reply) => return Ok(reply.value),
                Err(TypeError::Receive(err)) if !retried && err.is_retryable() => {
                    tracing::warn!(%err, "read failed; trying once more");
                    retried = true;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(TypeError::Receive(err)) => return Err(unavailable(&err)),
                Err(err) => {
                    tracing::error!(%err, "a reply of the wrong shape");
                    return Err(ApiError::Internal(
                        "the service answered something unreadable".into(),
                    ));
                }
            }
        }
    }

    /// A ticket id no other gateway process makes: the time, this
    /// process, and a counter.
    fn fresh_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("t-{:x}-{:x}-{n:x}", crate::now_ms(), std::process::id())
    }
}

fn unavailable(err: &RemotePubSubError) -> ApiError {
    tracing::warn!(%err, "read failed");
    match err {
        RemotePubSubError::NoResponders(_) => {
            ApiError::Unavailable("no ticket service is running".into())
        }
        RemotePubSubError::Timeout(_) => {
            ApiError::Unavailable("the ticket service did not answer in time".into())
        }
        _ => ApiError::Unavailable("the broker is unavailable".into()),
    }
}

/// What a handler fails with, as JSON.
#[derive(Debug)]
enum ApiError {
    BadRequest(String),
    NotFound(String),
    /// Not found, by the service instance named.
    NotFoundBy {
        message: String,
        served_by: String,
    },
    TooLarge,
    Unavailable(String),
    Internal(String),
}

impl ApiError {
    fn from_outcome(outcome: ReadOutcome, served_by: &str) -> ApiError {
        match outcome {
            ReadOutcome::Invalid(reason) => ApiError::BadRequest(reason),
            ReadOutcome::Failed(reason) => {
                tracing::error!(%reason, %served_by, "the service's database failed");
                ApiError::Internal("the ticket database failed".into())
            }
            ReadOutcome::Tickets(_) | ReadOutcome::Ticket(_) => {
                ApiError::Internal("the service answered another question".into())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::NotFoundBy { message, served_by } => {
                let body = json!({ "error": message, "served_by": served_by });
                return (StatusCode::NOT_FOUND, Json(body)).into_response();
            }
            ApiError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request is over {MAX_REQUEST_BODY} bytes"),
            ),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            ApiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WAIT: Duration = Duration::from_secs(10);

    /// Serves a one-route router with `limits`; the address and the stop.
    async fn start(limits: ServeLimits) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let router = Router::new().route("/", get(|| async { "ok" }));
        tokio::spawn(serve(listener, router, limits, stopped));
        (address, stop)
    }

    /// Reads until the server closes the connection; what it sent.
    async fn read_to_close(stream: &mut tokio::net::TcpStream) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
            .await
            .expect("the server kept the connection open")
            .ok();
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_after_the_header_timeout() {
        let (address, _stop) = start(ServeLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
        })
        .await;
        let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
        // Half a head, then nothing.
        silent
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        read_to_close(&mut silent).await;
        // And the server still answers others.
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once() {
        let (address, stop) = start(ServeLimits {
            max_connections: 1,
            header_timeout: Duration::from_secs(30),
        })
        .await;
        let _held = tokio::net::TcpStream::connect(address).await.unwrap();
        // Accepted in order: the first holds the one slot.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut over = tokio::net::TcpStream::connect(address).await.unwrap();
        let _ = over
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let answer = read_to_close(&mut over).await;
        assert!(answer.is_empty(), "answered past the cap: {answer}");
        // Stopping ends the held connection too (it had no request).
        stop.send(true).unwrap();
    }
}
