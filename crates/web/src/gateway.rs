//! The gateway itself: its shared state, its HTTP routes, and its own
//! listener ([`Gateway::serve`], plain or TLS).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{State, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use courier_pubsub::durable::Durable;
use courier_pubsub::remote::{HostCounters, PubSubAccess};
use courier_pubsub::Bus;
use courier_rpc::Authenticator;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::config::LONGEST_TIMEOUT;
use crate::GatewayConfig;

/// What the library's own operations fail with (browsers' errors are
/// frames, never these).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebError {
    /// The listen address could not be bound or read back. Retrying helps
    /// only if whatever holds the port lets go of it.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address asked for.
        address: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be read or used. Not
    /// retryable until the files are fixed.
    #[error("tls: {0}")]
    Tls(String),
}

/// Counts shared by every connection of one gateway, however they arrived
/// (its own listeners or a router served by someone else).
#[derive(Debug, Default)]
pub(crate) struct Live {
    /// WebSocket connections open (past the connection limit check).
    pub connections: AtomicUsize,
    /// TCP connections accepted by `serve` not yet upgraded.
    pub handshakes: AtomicUsize,
    /// Bytes of frames built and not yet written, over every connection.
    pub queued_bytes: AtomicUsize,
    /// The most `queued_bytes` has been.
    pub queued_peak: AtomicUsize,
}

/// The connections of one [`WebServer`] (or of one [`Gateway::router`]):
/// what its shutdown closes and waits for, apart from the gateway's other
/// listeners.
#[derive(Debug)]
pub(crate) struct Scope {
    /// `true` once shutdown began: connections close with 1001.
    pub closing: watch::Sender<bool>,
    /// `true` once the grace period is over: connections are dropped.
    pub abort: watch::Sender<bool>,
    /// Connections open in this scope.
    pub connections: AtomicUsize,
    /// Notified whenever one of them ends.
    pub gone: Notify,
}

impl Scope {
    fn new() -> Arc<Scope> {
        Arc::new(Scope {
            closing: watch::channel(false).0,
            abort: watch::channel(false).0,
            connections: AtomicUsize::new(0),
            gone: Notify::new(),
        })
    }
}

/// Everything a connection needs.
pub(crate) struct Shared {
    pub config: GatewayConfig,
    pub bus: Bus,
    pub access: Option<Arc<dyn PubSubAccess>>,
    pub authenticator: Option<Arc<dyn Authenticator>>,
    pub auth_required: bool,
    pub counters: Arc<HostCounters>,
    pub durable: Option<Durable>,
    pub live: Arc<Live>,
    pub scope: Arc<Scope>,
}

/// Browsers on a [`Bus`]: a WebSocket JSON gateway speaking PROTOCOL.md.
///
/// Build it with [`Gateway::new`] and the `with_*` methods, then either
/// serve it on a listener of its own ([`Gateway::serve`]) or take its
/// [`router`](Gateway::router) into an axum application. Connections from
/// both count against one [`GatewayConfig::max_connections`] and close
/// together on [`WebServer::shutdown`].
pub struct Gateway {
    config: GatewayConfig,
    bus: Bus,
    access: Option<Arc<dyn PubSubAccess>>,
    authenticator: Option<Arc<dyn Authenticator>>,
    auth_required: bool,
    counters: Arc<HostCounters>,
    durable: Option<Durable>,
    live: Arc<Live>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .field("access", &self.access.is_some())
            .field("authenticator", &self.authenticator.is_some())
            .field("auth_required", &self.auth_required)
            .field("durable", &self.durable.is_some())
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway to `bus` with these limits: open to anyone (no
    /// authenticator, no access checks) until told otherwise. Without an
    /// authenticator every browser is anonymous; a `connect` token is
    /// ignored.
    pub fn new(bus: Bus, config: GatewayConfig) -> Gateway {
        Gateway {
            config,
            bus,
            access: None,
            authenticator: None,
            auth_required: false,
            counters: Arc::default(),
            durable: None,
            live: Arc::default(),
        }
    }

    /// Asks `access` before every publish, request and subscription, with
    /// the browser's identity (as a `PubSubHost` does for Rust clients).
    pub fn with_access(mut self, access: Arc<dyn PubSubAccess>) -> Gateway {
        self.access = Some(access);
        self
    }

    /// Proves `connect` tokens with `authenticator`; with `required`, a
    /// browser without a token is refused (1008).
    pub fn with_authenticator(
        mut self,
        authenticator: Arc<dyn Authenticator>,
        required: bool,
    ) -> Gateway {
        self.authenticator = Some(authenticator);
        self.auth_required = required;
        self
    }

    /// Counts publishes, deliveries and stored copies into `counters`
    /// (share a broker's host's, so its stats include browsers).
    pub fn with_counters(mut self, counters: Arc<HostCounters>) -> Gateway {
        self.counters = counters;
        self
    }

    /// Stores browsers' publishes in the matching durable subscriptions
    /// first, as a `PubSubHost` with durable subscriptions does.
    pub fn with_durable(mut self, durable: Durable) -> Gateway {
        self.durable = Some(durable);
        self
    }

    /// Its limits.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Browser connections open now, over every router and listener of
    /// this gateway.
    pub fn connections(&self) -> usize {
        self.live.connections.load(Ordering::Relaxed)
    }

    /// Bytes of frames built for browsers and not yet written to them,
    /// over every connection: each connection's share is bounded by
    /// [`GatewayConfig::outbound_bytes`] (plus one larger frame, alone).
    pub fn queued_bytes(&self) -> usize {
        self.live.queued_bytes.load(Ordering::Relaxed)
    }

    /// The most [`queued_bytes`](Self::queued_bytes) has been; for tests of
    /// the bound.
    #[doc(hidden)]
    pub fn queued_bytes_peak(&self) -> usize {
        self.live.queued_peak.load(Ordering::Relaxed)
    }

    fn shared(&self, scope: Arc<Scope>) -> Arc<Shared> {
        Arc::new(Shared {
            config: self.config.clone(),
            bus: self.bus.clone(),
            access: self.access.clone(),
            authenticator: self.authenticator.clone(),
            auth_required: self.auth_required,
            counters: self.counters.clone(),
            durable: self.durable.clone(),
            live: self.live.clone(),
            scope,
        })
    }

    /// The HTTP face: `GET /` upgrades to the WebSocket protocol (from an
    /// allowed `Origin`, see [`GatewayConfig::allowed_origins`]), `GET
    /// /courier.js` is the JavaScript client ([`COURIER_JS`](crate::COURIER_JS)),
    /// anything else is 404. Its connections count against the gateway's
    /// limits; no [`WebServer::shutdown`] closes them (the application
    /// serving the router ends them as it ends).
    pub fn router(&self) -> Router {
        self.router_in(Scope::new())
    }

    fn router_in(&self, scope: Arc<Scope>) -> Router {
        Router::new()
            .route("/", get(upgrade))
            .route("/courier.js", get(javascript))
            .with_state(self.shared(scope))
    }

    /// Serves the gateway on `listener`, over TLS if `tls` is given (its
    /// ALPN should offer `http/1.1`; [`tls_config_from_pem`] sets it). Each
    /// connection's TLS handshake and HTTP upgrade request must each end
    /// within [`GatewayConfig::connect_timeout`], and at most
    /// [`GatewayConfig::max_handshakes`] may be under way.
    pub fn serve(
        &self,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<WebServer, WebError> {
        let local_addr = listener.local_addr().map_err(|source| WebError::Bind {
            address: "the given listener".into(),
            source,
        })?;
        let tls_on = tls.is_some();
        let scope = Scope::new();
        let router = self.router_in(scope.clone());
        let live = self.live.clone();
        let config = self.config.clone();
        let accept = tokio::spawn(accept_loop(
            listener,
            tls.map(tokio_rustls::TlsAcceptor::from),
            router,
            live.clone(),
            scope.clone(),
            config,
        ));
        Ok(WebServer {
            local_addr,
            tls: tls_on,
            live,
            scope,
            accept,
        })
    }

    /// Binds `address` (`host:port`) and [`serve`](Self::serve)s there.
    pub async fn bind(
        &self,
        address: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<WebServer, WebError> {
        let bind_error = |source| WebError::Bind {
            address: address.to_string(),
            source,
        };
        let listener = TcpListener::bind(address).await.map_err(bind_error)?;
        self.serve(listener, tls).map_err(|err| match err {
            WebError::Bind { source, .. } => bind_error(source),
            other => other,
        })
    }
}

/// A TLS configuration for `wss://` from a PEM certificate chain (leaf
/// first) and private key, with the *ring* provider and ALPN `http/1.1`.
pub fn tls_config_from_pem(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, WebError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|err| WebError::Tls(format!("{}: {err}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| WebError::Tls(format!("{}: {err}", cert.display())))?;
    if certs.is_empty() {
        return Err(WebError::Tls(format!(
            "{}: no CERTIFICATE section",
            cert.display()
        )));
    }
    // The error never includes the key's bytes.
    let key = PrivateKeyDer::from_pem_file(key).map_err(|err| {
        WebError::Tls(format!("{}: no usable private key ({err})", key.display()))
    })?;
    tls_config(certs, key)
}

/// A TLS configuration for `wss://` from a parsed chain and key, as
/// [`tls_config_from_pem`] makes it.
pub fn tls_config(
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, WebError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| WebError::Tls(err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| WebError::Tls(err.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A gateway on a listener of its own. Dropping it leaves it running;
/// [`shutdown`](Self::shutdown) stops it.
#[derive(Debug)]
pub struct WebServer {
    local_addr: SocketAddr,
    tls: bool,
    live: Arc<Live>,
    scope: Arc<Scope>,
    accept: tokio::task::JoinHandle<()>,
}

impl WebServer {
    /// The address it listens on (with the port chosen, if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Its URL: `ws://HOST:PORT`, or `wss://HOST:PORT` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}", self.local_addr)
    }

    /// Browser connections open now (over the gateway's every router).
    pub fn connections(&self) -> usize {
        self.live.connections.load(Ordering::Relaxed)
    }

    /// [`Gateway::queued_bytes`], over the gateway's every router.
    pub fn queued_bytes(&self) -> usize {
        self.live.queued_bytes.load(Ordering::Relaxed)
    }

    /// [`Gateway::queued_bytes_peak`].
    #[doc(hidden)]
    pub fn queued_bytes_peak(&self) -> usize {
        self.live.queued_peak.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes every browser connection that came through
    /// this listener with 1001 (going away), and waits up to `grace` for
    /// them to end; those still open then are dropped. Returns when every
    /// one has ended or been dropped. The gateway's other listeners go on.
    pub async fn shutdown(self, grace: Duration) {
        let scope = &self.scope;
        scope.closing.send_replace(true);
        let deadline = tokio::time::Instant::now()
            .checked_add(grace)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600));
        loop {
            let gone = scope.gone.notified();
            if scope.connections.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, gone).await.is_err() {
                tracing::warn!(
                    open = scope.connections.load(Ordering::SeqCst),
                    "browser connections did not close within the grace period; dropping them"
                );
                scope.abort.send_replace(true);
                // Dropped at their next poll; bounded so a wedged task
                // cannot hold shutdown.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while scope.connections.load(Ordering::SeqCst) > 0 {
                        let gone = scope.gone.notified();
                        if scope.connections.load(Ordering::SeqCst) == 0 {
                            break;
                        }
                        gone.await;
                    }
                })
                .await;
                break;
            }
        }
        // Whatever is still in its handshake, or being refused, stops too.
        scope.abort.send_replace(true);
        self.accept.abort();
        let _ = self.accept.await;
    }
}

/// The tungstenite buffers of each socket. Its defaults (128 KiB to read,
/// 128 KiB to write) would be 2.5 GiB for 10,000 idle browsers; frames are
/// mostly small, and a larger one is read and written in several steps,
/// not refused (the message limits are `max_frame`'s).
const SOCKET_BUFFER: usize = 8 << 10;

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(origin) = headers.get(axum::http::header::ORIGIN) {
        if !origin_allowed(&shared.config.allowed_origins, origin.as_bytes()) {
            tracing::info!(origin = ?origin, "browser refused: origin not allowed");
            return (
                axum::http::StatusCode::FORBIDDEN,
                "this origin may not open a WebSocket here\n",
            )
                .into_response();
        }
    }
    let limit = shared.config.max_frame;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .on_upgrade(move |socket| crate::conn::run(socket, shared))
}

/// Whether a browser's `Origin` is in the list (any, if it is empty):
/// compared without ASCII case, as origins are (RFC 6454), and without a
/// trailing `/`.
fn origin_allowed(allowed: &[String], origin: &[u8]) -> bool {
    allowed.is_empty()
        || allowed.iter().any(|ok| {
            ok.trim_end_matches('/')
                .as_bytes()
                .eq_ignore_ascii_case(origin)
        })
}

async fn javascript() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/javascript; charset=utf-8",
        )],
        crate::COURIER_JS,
    )
        .into_response()
}

/// Holds one of `count`'s places; gives it back on drop.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    live: Arc<Live>,
    scope: Arc<Scope>,
    config: GatewayConfig,
) {
    let mut closing = scope.closing.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = crate::gateway::raised(&mut closing) => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                // Out of file descriptors (EMFILE) and the like: they pass
                // only as connections close, so wait instead of spinning.
                tracing::warn!("accepting a browser connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if live.handshakes.fetch_add(1, Ordering::SeqCst) >= config.max_handshakes {
            live.handshakes.fetch_sub(1, Ordering::SeqCst);
            tracing::debug!("too many browser connections in their handshake; closing one");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let tls = tls.clone();
        let router = router.clone();
        let live = live.clone();
        // Cut, as the fields may have been set directly: hyper adds the
        // header timeout to the clock, and would panic on overflow.
        let timeout = config
            .connect_timeout
            .clamp(Duration::from_millis(1), LONGEST_TIMEOUT);
        let lifetime = timeout.saturating_add(config.write_timeout.min(LONGEST_TIMEOUT));
        let mut closing = scope.closing.subscribe();
        tokio::spawn(async move {
            let _slot = Slot(&live.handshakes);
            let serve = async {
                match tls {
                    None => serve_http(stream, router, timeout, lifetime).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => serve_http(stream, router, timeout, lifetime).await,
                            Ok(Err(err)) => tracing::debug!("browser TLS handshake: {err}"),
                            Err(_) => tracing::debug!("browser TLS handshake timed out"),
                        }
                    }
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = crate::gateway::raised(&mut closing) => {}
            }
        });
    }
}

/// One HTTP/1.1 connection, until it has upgraded (the WebSocket then runs
/// in a task of its own) or ended.
///
/// The whole connection is bounded by `lifetime`, so idle keep-alive
/// connections cannot hold handshake places for ever (and `keep_alive(false)`
/// would not do: hyper then answers `connection: close`, which breaks the
/// upgrade).
async fn serve_http<IO>(io: IO, router: Router, timeout: Duration, lifetime: Duration)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    match tokio::time::timeout(lifetime, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!("browser HTTP connection: {err}"),
        Err(_) => tracing::debug!("browser HTTP connection open too long before an upgrade"),
    }
}

/// Holds a place among the gateway's open connections and its scope's;
/// gives both back (and tells a waiting shutdown) on drop.
pub(crate) struct ConnectionSlot(Arc<Live>, Arc<Scope>);

impl ConnectionSlot {
    /// A place, if fewer than `max` are taken.
    pub fn take(live: &Arc<Live>, scope: &Arc<Scope>, max: usize) -> Option<ConnectionSlot> {
        if live.connections.fetch_add(1, Ordering::SeqCst) >= max {
            live.connections.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        scope.connections.fetch_add(1, Ordering::SeqCst);
        Some(ConnectionSlot(live.clone(), scope.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
        self.1.connections.fetch_sub(1, Ordering::SeqCst);
        self.1.gone.notify_waiters();
    }
}

/// Returns once `flag` is `true` (never, if its sender is gone).
pub(crate) async fn raised(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|raised| *raised).await.is_err() {
        std::future::pending::<()>().await;
    }
}
