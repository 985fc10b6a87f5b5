//! The gateway itself: its shared state, its HTTP routes, and its own
//! listener ([`Gateway::serve`], plain or TLS).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{State, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use courier_pubsub::durable::Durable;
use courier_pubsub::remote::{HostCounters, PubSubAccess, PubSubHost};
use courier_pubsub::Bus;
use courier_rpc::Authenticator;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

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

/// Counts and signals shared by every connection of one gateway, however
/// they arrived (its own listener or a router served by someone else).
#[derive(Debug)]
pub(crate) struct Live {
    /// WebSocket connections open (past the connection limit check).
    pub connections: AtomicUsize,
    /// TCP connections accepted by `serve` not yet upgraded.
    pub handshakes: AtomicUsize,
    /// Publisher identities, one per connection, for the internal host.
    pub next_publisher: AtomicU64,
    /// `true` once shutdown began: connections close with 1001.
    pub closing: watch::Sender<bool>,
    /// `true` once the grace period is over: connections are dropped.
    pub abort: watch::Sender<bool>,
    /// Notified whenever a connection ends.
    pub gone: Notify,
}

/// Everything a connection needs.
pub(crate) struct Shared {
    pub config: GatewayConfig,
    pub bus: Bus,
    /// Publishes for browsers. The bus's public face has no publish with a
    /// reply subject; the host's has, with the delivery count the counters
    /// want. Its own access checks and counters are unused (the gateway
    /// checks and counts itself, with the browser's identity).
    pub host: PubSubHost,
    pub access: Option<Arc<dyn PubSubAccess>>,
    pub authenticator: Option<Arc<dyn Authenticator>>,
    pub auth_required: bool,
    pub counters: Arc<HostCounters>,
    pub durable: Option<Durable>,
    pub live: Arc<Live>,
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
            live: Arc::new(Live {
                connections: AtomicUsize::new(0),
                handshakes: AtomicUsize::new(0),
                next_publisher: AtomicU64::new(1),
                closing: watch::channel(false).0,
                abort: watch::channel(false).0,
                gone: Notify::new(),
            }),
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

    fn shared(&self) -> Arc<Shared> {
        Arc::new(Shared {
            config: self.config.clone(),
            bus: self.bus.clone(),
            host: PubSubHost::new(self.bus.clone()),
            access: self.access.clone(),
            authenticator: self.authenticator.clone(),
            auth_required: self.auth_required,
            counters: self.counters.clone(),
            durable: self.durable.clone(),
            live: self.live.clone(),
        })
    }

    /// The HTTP face: `GET /` upgrades to the WebSocket protocol, `GET
    /// /courier.js` is the JavaScript client ([`COURIER_JS`](crate::COURIER_JS)),
    /// anything else is 404.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(upgrade))
            .route("/courier.js", get(javascript))
            .with_state(self.shared())
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
        let router = self.router();
        let live = self.live.clone();
        let config = self.config.clone();
        let accept = tokio::spawn(accept_loop(
            listener,
            tls.map(tokio_rustls::TlsAcceptor::from),
            router,
            live.clone(),
            config,
        ));
        Ok(WebServer {
            local_addr,
            tls: tls_on,
            live,
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

    /// Stops accepting, closes every browser connection with 1001 (going
    /// away), and waits up to `grace` for them to end; those still open
    /// then are dropped. Returns when every connection has ended or been
    /// dropped.
    pub async fn shutdown(self, grace: Duration) {
        self.live.closing.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let gone = self.live.gone.notified();
            if self.live.connections.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, gone).await.is_err() {
                tracing::warn!(
                    open = self.live.connections.load(Ordering::SeqCst),
                    "browser connections did not close within the grace period; dropping them"
                );
                self.live.abort.send_replace(true);
                // Dropped at their next poll; bounded so a wedged task
                // cannot hold shutdown.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while self.live.connections.load(Ordering::SeqCst) > 0 {
                        let gone = self.live.gone.notified();
                        if self.live.connections.load(Ordering::SeqCst) == 0 {
                            break;
                        }
                        gone.await;
                    }
                })
                .await;
                break;
            }
        }
        self.accept.abort();
        let _ = self.accept.await;
    }
}

async fn upgrade(State(shared): State<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    let limit = shared.config.max_frame;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| crate::conn::run(socket, shared))
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
    config: GatewayConfig,
) {
    let mut closing = live.closing.subscribe();
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
        let timeout = config.connect_timeout;
        let lifetime = config.connect_timeout + config.write_timeout;
        tokio::spawn(async move {
            let _slot = Slot(&live.handshakes);
            let mut closing = live.closing.subscribe();
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

/// Holds a place among the gateway's open connections; gives it back (and
/// tells a waiting shutdown) on drop.
pub(crate) struct ConnectionSlot(Arc<Live>);

impl ConnectionSlot {
    /// A place, if fewer than `max` are taken.
    pub fn take(live: &Arc<Live>, max: usize) -> Option<ConnectionSlot> {
        if live.connections.fetch_add(1, Ordering::SeqCst) >= max {
            live.connections.fetch_sub(1, Ordering::SeqCst);
            live.gone.notify_waiters();
            return None;
        }
        Some(ConnectionSlot(live.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
        self.0.gone.notify_waiters();
    }
}

/// Returns once `flag` is `true` (never, if its sender is gone).
pub(crate) async fn raised(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|raised| *raised).await.is_err() {
        std::future::pending::<()>().await;
    }
}
