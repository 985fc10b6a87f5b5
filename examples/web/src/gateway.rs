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

use std::future::IntoFuture;
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
/// The largest request body accepted (a ticket's JSON is well below).
pub const MAX_REQUEST_BODY: usize = 16 * 1024;
/// How long connections in flight get once shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    shutdown.wait().await;
    let _ = stop.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(result)) => result.context("the HTTP server failed")?,
        Ok(Err(err)) => return Err(anyhow::Error::new(err).context("the HTTP server task failed")),
        Err(_) => tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them"),
    }
    Ok(())
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
