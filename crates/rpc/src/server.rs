//! The server: accepts connections, runs calls concurrently (bounded per
//! connection), enforces deadlines and honours cancellation.
//!
//! Each connection's reader polls a unary call's handler once, inline: a
//! handler that completes then is answered without a task of its own, and
//! the answers to everything one read brought in go out in one write. A
//! handler still pending moves to a task (taking a `max_in_flight` slot),
//! where its deadline and a `Cancel` stop it, so it never holds up the
//! reader. Streaming calls always get a task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_wire::shared::Sharing;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use courier_transport::{
    Address, Connection, Frame, FrameKind, FrameReceiver, FrameSender, Listener, RecvError,
    SendError,
};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use courier_transport::trace::{self, TraceContext};
use tokio::sync::mpsc;

use crate::inbound::Inbound;
use crate::protocol::{
    decode_ext, limit_from_wire, split_request, HelloExt, RequestHeader, WelcomeExt, ABANDONED,
    EXTENDED, FEATURE_REQUEST_EXT, FEATURE_TRACE,
};
use crate::stream::ItemSink;
use crate::{RpcFault, Service};

/// May this identity (`None`: anonymous) call this service?
pub type ServiceAccess = Arc<dyn Fn(Option<&str>, &str) -> bool + Send + Sync>;

/// Decides which identities may use the connections held back for
/// operators ([`ServerConfig::reserved_connections`]).
pub type Privileged = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Server settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Unary calls running at once per connection. When reached, the server
    /// stops reading that connection until one finishes: backpressure, not
    /// an unbounded pile of tasks. A call whose handler completes at its
    /// first poll (run inline by the connection's reader) never holds a
    /// place. Default 256.
    pub max_in_flight: usize,
    /// Streaming calls open at once per connection. Streams may live for
    /// the connection's lifetime (subscriptions, consumers), so they do not
    /// count against `max_in_flight` (which would stall the connection for
    /// good); one past this limit is refused with
    /// [`crate::RpcError::TooManyStreams`]. Client-streaming and
    /// bidirectional calls count here too. Default 10,000.
    pub max_streams: usize,
    /// Items a client may send ahead of the handler on a client-streaming
    /// or bidirectional call: what the server buffers per such stream at
    /// most (announced in the welcome; more only as the handler reads).
    /// 0 turns client streaming off (such calls then fail at the client
    /// with [`crate::RpcError::NotSupported`]). Default 32.
    pub inbound_window: u32,
    /// Bytes of client-stream items one connection may have buffered,
    /// unread by their handlers, across all its streams. Each stream is
    /// already held to `inbound_window` items; this bounds what many slow
    /// streams of large items can make the server hold. An item past it
    /// ends its call ([`crate::RpcError::InboundBufferFull`] at the
    /// client). Default 16 MiB.
    pub inbound_buffer_bytes: usize,
    /// Connections served at once; one more is refused
    /// ([`crate::RpcError::TooManyConnections`]). Default 10,000.
    pub max_connections: usize,
    /// Of `max_connections`, how many only [`privileged`](Self::privileged)
    /// identities may take, so that an operator can still connect (to see
    /// stats, say) to a server that others have filled, as PostgreSQL keeps
    /// connections for superusers. Default 8, held back only once a
    /// `privileged` predicate is set (without one nobody could use them).
    pub reserved_connections: usize,
    /// Which identities may use the reserved connections. Default none.
    pub privileged: Option<Privileged>,
    /// Connections at once per authenticated identity. Default 1,000.
    pub max_connections_per_identity: usize,
    /// How long a new connection has to say hello. Default 5 s. It holds
    /// whatever the client sends meanwhile (pings included): a connection
    /// without a hello in time is refused and closed.
    pub hello_timeout: Duration,
    /// A connection with no call running and no frame from its client for
    /// this long is closed (its client reconnects on its next call).
    /// Default none.
    pub idle_timeout: Option<Duration>,
    /// Turns tokens into identities. Default none: tokens are ignored.
    pub authenticator: Option<Arc<dyn crate::auth::Authenticator>>,
    /// Refuse connections that prove no identity (by token or client
    /// certificate). Default false.
    pub require_identity: bool,
    /// Decides which identity may call which service. Default: anyone.
    pub service_access: Option<ServiceAccess>,
    /// How long the server waits for a client to take its last frames (a
    /// refusal, the `Cancelled` reports at shutdown, an idle close) before
    /// it drops the connection without them. Default 1 s. A client that
    /// does not read (frozen, half-open, hostile) holds nothing up for
    /// longer than this: [`ServerHandle::shutdown`] returns within its
    /// grace period plus this.
    pub close_timeout: Duration,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("max_in_flight", &self.max_in_flight)
            .field("max_streams", &self.max_streams)
            .field("inbound_window", &self.inbound_window)
            .field("inbound_buffer_bytes", &self.inbound_buffer_bytes)
            .field("max_connections", &self.max_connections)
            .field("reserved_connections", &self.reserved_connections)
            .field("privileged", &self.privileged.is_some())
            .field(
                "max_connections_per_identity",
                &self.max_connections_per_identity,
            )
            .field("hello_timeout", &self.hello_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("authenticator", &self.authenticator.is_some())
            .field("require_identity", &self.require_identity)
            .field("service_access", &self.service_access.is_some())
            .field("close_timeout", &self.close_timeout)
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 256,
            max_streams: 10_000,
            inbound_window: crate::stream::WINDOW,
            inbound_buffer_bytes: 16 << 20,
            max_connections: 10_000,
            reserved_connections: 8,
            privileged: None,
            max_connections_per_identity: 1_000,
            hello_timeout: Duration::from_secs(5),
            idle_timeout: None,
            authenticator: None,
            require_identity: false,
            service_access: None,
            close_timeout: Duration::from_secs(1),
        }
    }
}

impl ServerConfig {
    /// The same settings with another per-connection limit.
    pub fn with_max_in_flight(mut self, limit: usize) -> ServerConfig {
        self.max_in_flight = limit;
        self
    }

    /// The same settings with another per-connection stream limit.
    pub fn with_max_streams(mut self, limit: usize) -> ServerConfig {
        self.max_streams = limit;
        self
    }

    /// The same settings with another window for the items clients send
    /// on client-streaming and bidirectional calls (0: none accepted).
    pub fn with_inbound_window(mut self, items: u32) -> ServerConfig {
        self.inbound_window = items;
        self
    }

    /// The same settings with another per-connection budget of buffered
    /// client-stream bytes (see [`ServerConfig::inbound_buffer_bytes`]).
    pub fn with_inbound_buffer_bytes(mut self, bytes: usize) -> ServerConfig {
        self.inbound_buffer_bytes = bytes;
        self
    }

    /// The same settings with other connection limits (total, per identity).
    pub fn with_max_connections(mut self, total: usize, per_identity: usize) -> ServerConfig {
        self.max_connections = total;
        self.max_connections_per_identity = per_identity;
        self
    }

    /// The same settings keeping `reserved` of the connections for the
    /// identities `privileged` accepts.
    pub fn with_reserved_connections(
        mut self,
        reserved: usize,
        privileged: Privileged,
    ) -> ServerConfig {
        self.reserved_connections = reserved;
        self.privileged = Some(privileged);
        self
    }

    /// The same settings with an idle timeout.
    pub fn with_idle_timeout(mut self, idle: Duration) -> ServerConfig {
        self.idle_timeout = Some(idle);
        self
    }

    /// The same settings authenticating tokens with `authenticator`, and
    /// refusing anonymous connections if `required`.
    pub fn with_authenticator(
        mut self,
        authenticator: Arc<dyn crate::auth::Authenticator>,
        required: bool,
    ) -> ServerConfig {
        self.authenticator = Some(authenticator);
        self.require_identity = required;
        self
    }

    /// The same settings deciding service access with `access`.
    pub fn with_service_access(mut self, access: ServiceAccess) -> ServerConfig {
        self.service_access = Some(access);
        self
    }
}

/// A set of services to serve.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> anyhow::Result<()> {
/// use courier_rpc::{Client, ClientConfig, Server, ServerConfig};
///
/// #[courier_rpc::service]
/// trait Greeter {
///     async fn greet(&self, name: String) -> String;
/// }
///
/// struct English;
/// impl Greeter for English {
///     async fn greet(&self, name: String) -> String {
///         format!("hello, {name}")
///     }
/// }
///
/// let listener = courier_transport::bind(&"mem://greeter-doc".parse()?, &Default::default()).await?;
/// let server = Server::new(ServerConfig::default()).service(GreeterServer::new(English)).spawn(listener);
///
/// let greeter = GreeterClient::new(Client::connect(server.local_addr(), ClientConfig::default()).await?);
/// assert_eq!(greeter.greet("ada".into()).await?, "hello, ada");
/// server.shutdown(std::time::Duration::from_secs(1)).await;
/// # Ok(()) }
/// ```
pub struct Server {
    services: HashMap<&'static str, Arc<dyn Service>>,
    config: ServerConfig,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server with no services yet.
    pub fn new(config: ServerConfig) -> Server {
        Server {
            services: HashMap::new(),
            config,
        }
    }

    /// Adds a service (a generated `<Service>Server`). A second service of
    /// the same name replaces the first.
    pub fn service(mut self, service: impl Service) -> Server {
        self.services.insert(service.name(), Arc::new(service));
        self
    }

    /// Serves every connection `listener` accepts, in the background.
    pub fn spawn(self, listener: Listener) -> ServerHandle {
        self.spawn_all(vec![listener])
    }

    /// Serves every connection any of `listeners` accepts (say tcp and unix
    /// at once), with the same services, in the background.
    pub fn spawn_all(self, listeners: Vec<Listener>) -> ServerHandle {
        let local: Vec<Address> = listeners.iter().map(|l| l.local_addr().clone()).collect();
        let (stop, stopped) = watch::channel(None);
        assert!(
            !listeners.is_empty(),
            "a server needs at least one listener"
        );
        let close_timeout = self.config.close_timeout;
        let open_streams = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            services: self.services,
            config: self.config,
            admitted: Mutex::default(),
            open_streams: open_streams.clone(),
        });
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = listeners
            .into_iter()
            .map(|mut listener| {
                let (connections, shared, stopped) =
                    (connections.clone(), shared.clone(), stopped.clone());
                tokio::spawn(async move {
                    while let Ok(connection) = listener.accept().await {
                        let task = tokio::spawn(serve(shared.clone(), connection, stopped.clone()));
                        let mut all = lock(&connections);
                        all.retain(|t| !t.is_finished());
                        all.push(task);
                    }
                })
            })
            .collect();
        ServerHandle {
            local,
            close_timeout,
            stop,
            accept,
            connections,
            open_streams,
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local: Vec<Address>,
    close_timeout: Duration,
    stop: watch::Sender<Option<Instant>>,
    accept: Vec<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Streaming calls (of every shape) running, over all connections.
    open_streams: Arc<AtomicUsize>,
}

impl ServerHandle {
    /// Streaming calls (server, client or bidirectional) running now, over
    /// every connection: each holds a task and a place in its connection's
    /// `max_streams` until its handler ends, however it ends (the client
    /// dropped its end, the deadline passed, the connection closed).
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Acquire)
    }

    /// The address it listens on (the first, if several).
    pub fn local_addr(&self) -> &Address {
        &self.local[0]
    }

    /// Every address it listens on.
    pub fn local_addrs(&self) -> &[Address] {
        &self.local
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        let mut all = lock(&self.connections);
        all.retain(|t| !t.is_finished());
        all.len()
    }

    /// Stops accepting, lets calls in flight finish within `grace`, then
    /// cancels the rest (their clients get [`crate::RpcError::Cancelled`])
    /// and closes every connection.
    ///
    /// When it returns, every call has ended and dropped what it held.
    ///
    /// Every write gives up with the grace period: a client that stopped
    /// reading (frozen, half-open) gets at most
    /// [`ServerConfig::close_timeout`] more to take the `Cancelled` reports,
    /// then its connection is dropped. So this returns within `grace` plus
    /// `close_timeout` (and a little scheduling), whatever the clients do.
    pub async fn shutdown(mut self, grace: Duration) {
        for accept in &mut self.accept {
            accept.abort();
            let _ = accept.await;
        }
        let grace_ends = Instant::now() + grace;
        let _ = self.stop.send(Some(grace_ends));
        // The connection tasks bound their own writes; this is the backstop
        // for a call task that never yields, so shutdown cannot hang on it.
        let hard_stop = grace_ends + self.close_timeout + Duration::from_secs(1);
        let connections: Vec<_> = lock(&self.connections).drain(..).collect();
        for mut connection in connections {
            if tokio::time::timeout_at(hard_stop, &mut connection)
                .await
                .is_err()
            {
                tracing::warn!("a connection did not stop within its grace period; aborting it");
                connection.abort();
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        for accept in &self.accept {
            accept.abort();
        }
        for connection in lock(&self.connections).drain(..) {
            connection.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

struct Shared {
    services: HashMap<&'static str, Arc<dyn Service>>,
    config: ServerConfig,
    /// Connections admitted, in total and per identity.
    admitted: Mutex<Admitted>,
    /// Streaming calls running ([`ServerHandle::open_streams`]).
    open_streams: Arc<AtomicUsize>,
}

/// Counts a streaming call among those open while it lives.
struct OpenStream(Arc<AtomicUsize>);

impl OpenStream {
    fn new(count: &Arc<AtomicUsize>) -> OpenStream {
        count.fetch_add(1, Ordering::AcqRel);
        OpenStream(count.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct Admitted {
    total: usize,
    per_identity: HashMap<Arc<str>, usize>,
}

/// A connection's place in the limits; given back when dropped.
struct Admission<'a> {
    shared: &'a Shared,
    identity: Option<Arc<str>>,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let mut admitted = lock(&self.shared.admitted);
        admitted.total -= 1;
        if let Some(identity) = &self.identity {
            if let Some(count) = admitted.per_identity.get_mut(identity) {
                *count -= 1;
                if *count == 0 {
                    admitted.per_identity.remove(identity);
                }
            }
        }
    }
}

impl Shared {
    fn admit(&self, identity: Option<Arc<str>>) -> Result<Admission<'_>, RpcFault> {
        let mut admitted = lock(&self.admitted);
        let limit = |n: usize| n.min(u32::MAX as usize) as u32;
        let privileged = match (&identity, &self.config.privileged) {
            (Some(identity), Some(privileged)) => privileged(identity),
            _ => false,
        };
        // Everyone else stops short of the reserved connections.
        let reserved = match self.config.privileged {
            Some(_) => self.config.reserved_connections,
            None => 0,
        };
        let open_to_all = self.config.max_connections.saturating_sub(reserved);
        let ceiling = if privileged {
            self.config.max_connections
        } else {
            open_to_all
        };
        if admitted.total >= ceiling {
            return Err(RpcFault::TooManyConnections {
                limit: limit(ceiling),
                scope: String::new(),
            });
        }
        if let Some(identity) = &identity {
            let count = admitted.per_identity.entry(identity.clone()).or_default();
            if *count >= self.config.max_connections_per_identity {
                return Err(RpcFault::TooManyConnections {
                    limit: limit(self.config.max_connections_per_identity),
                    scope: " per identity".into(),
                });
            }
            *count += 1;
        }
        admitted.total += 1;
        Ok(Admission {
            shared: self,
            identity,
        })
    }

    /// Reads the client's hello and decides who it is. Also returns the
    /// client's hello extension, if it sent one.
    ///
    /// The hello timeout bounds the whole wait, whatever arrives meanwhile:
    /// pings are absorbed by the transport (and their pongs bounded by its
    /// send buffer), so they cannot keep a connection that never says hello.
    async fn greet(
        &self,
        receiver: &mut courier_transport::FrameReceiver,
    ) -> Result<(Option<Arc<str>>, Option<HelloExt>), RpcFault> {
        let refused = |reason: &str| RpcFault::Unauthenticated {
            reason: reason.to_string(),
        };
        let frame = match tokio::time::timeout(self.config.hello_timeout, receiver.recv()).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(_) => return Err(refused("the connection ended before its hello")),
            Err(_) => return Err(refused("no hello in time")),
        };
        if frame.kind != FrameKind::Hello {
            return Err(refused("the first frame must be a hello"));
        }
        let (hello, rest) = postcard::take_from_bytes::<crate::auth::Hello>(&frame.payload)
            .map_err(|_| refused("malformed hello"))?;
        let ext = decode_ext::<HelloExt>(rest);
        // A verified client certificate speaks for itself.
        if let Some(identity) = receiver.peer_identity() {
            return Ok((Some(Arc::from(identity)), ext));
        }
        let identity = match (&self.config.authenticator, &hello.token) {
            (Some(authenticator), Some(token)) => match authenticator.authenticate(token) {
                Some(identity) => Some(Arc::from(identity.as_str())),
                None => return Err(refused("invalid token")),
            },
            _ => None,
        };
        if identity.is_none() && self.config.require_identity {
            return Err(refused(
                "this server requires a token or a client certificate",
            ));
        }
        Ok((identity, ext))
    }
}

/// A call running on a connection.
struct RunningCall {
    task: JoinHandle<()>,
    /// A streaming call's credit.
    credit: Option<Arc<Semaphore>>,
    /// Where the client's items go, for a client-streaming call.
    inbound: Option<mpsc::Sender<Inbound>>,
    /// Tells the handler (and whatever it handed the context to) to stop.
    cancel: Arc<CancelSignal>,
}

impl RunningCall {
    /// Signals cancellation, then stops the handler where it stands.
    fn stop(&self) {
        self.cancel.trigger();
        self.task.abort();
    }
}

/// Calls running on a connection, by call id.
type Running = Arc<Mutex<HashMap<u64, RunningCall>>>;

/// How often a connection that stopped reading because it is at
/// `max_in_flight` tells its client it is alive. Well under the client's
/// default heartbeat timeout ([`crate::DEFAULT_HEARTBEAT`]): such a client
/// hears nothing else from a server that is busy, not dead.
const KEEPALIVE: Duration = Duration::from_millis(200);

/// Writes `last` (if any) and closes the connection within `limit`; past
/// it, gives up on the client (it is not reading) and drops what is queued.
async fn close_within(sender: &FrameSender, last: Vec<Frame>, limit: Duration) {
    let close = async {
        for frame in last {
            sender.feed(frame).await?;
        }
        sender.close().await
    };
    if tokio::time::timeout(limit, close).await.is_err() {
        tracing::debug!(?limit, "the client did not take our last frames in time");
        sender.abort();
    }
}

/// Resolves once the server is shutting down, with the end of the grace
/// period; with `None` when the server handle is gone.
async fn stopping(stop: &mut watch::Receiver<Option<Instant>>) -> Option<Instant> {
    loop {
        if let Some(at) = *stop.borrow_and_update() {
            return Some(at);
        }
        if stop.changed().await.is_err() {
            return None;
        }
    }
}

async fn serve(
    shared: Arc<Shared>,
    connection: Connection,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let (sender, mut receiver) = connection.split();
    let close_timeout = shared.config.close_timeout;
    // Nothing but a hello is read until the client is known and admitted.
    let admitted = match shared.greet(&mut receiver).await {
        Ok((identity, ext)) => shared.admit(identity).map(|admission| (admission, ext)),
        Err(fault) => Err(fault),
    };
    let (admission, ext) = match admitted {
        Ok(admitted) => admitted,
        Err(fault) => {
            tracing::debug!(%fault, "connection refused");
            // A refused client may not be reading (it may be flooding us):
            // the refusal gets `close_timeout`, not forever.
            close_within(&sender, vec![fault_frame(0, &fault)], close_timeout).await;
            return;
        }
    };
    let identity = admission.identity.clone();
    let welcome = crate::auth::Welcome {
        identity: identity.as_deref().map(str::to_string),
    };
    let sent = match ext {
        // Replies too large for the client are refused here rather than
        // ending the connection at the client; and only a client that sent
        // an extension understands one after the welcome.
        Some(ext) => {
            sender.limit_frame_size(limit_from_wire(ext.max_frame_size));
            let ours = WelcomeExt {
                max_frame_size: sender.max_frame_size() as u64,
                features: FEATURE_REQUEST_EXT | FEATURE_TRACE,
                inbound_window: shared.config.inbound_window,
            };
            sender
                .send_message(FrameKind::Hello, 0, &(welcome, ours))
                .await
        }
        None => sender.send_message(FrameKind::Hello, 0, &welcome).await,
    };
    if sent.is_err() {
        return;
    }
    let slots = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    let streams = Arc::new(Semaphore::new(shared.config.max_streams.max(1)));
    let inbound_bytes = Arc::new(Semaphore::new(
        shared
            .config
            .inbound_buffer_bytes
            .min(Semaphore::MAX_PERMITS),
    ));
    let running: Running = Arc::default();
    let idle = shared.config.idle_timeout;
    let mut last_heard = Instant::now();
    // A reader working through a long backlog (one-way calls, say) reads
    // the client's pings late, and one-way calls get no answers: so it
    // tells the client it is alive at least every `KEEPALIVE` meanwhile.
    let mut last_keepalive = last_heard;
    let conn = Conn {
        shared: &shared,
        identity: &identity,
        sender: &sender,
        slots: &slots,
        streams: &streams,
        inbound_bytes: &inbound_bytes,
        running: &running,
    };
    // Replies of calls answered inline, written together once the frames
    // the last read brought in are handled.
    let mut replies = Replies::default();
    // What `try_recv` returned that is not a frame, for the next turn.
    let mut held: Option<Result<Option<Frame>, RecvError>> = None;
    // Made once, not per frame: each would register a timer, or a waiter
    // on the shutdown signal, and take it back again.
    let stop = stopping(&mut stop);
    tokio::pin!(stop);
    let idle_check = tokio::time::sleep_until(last_heard + idle.unwrap_or(Duration::ZERO));
    tokio::pin!(idle_check);
    let shutdown_at = loop {
        tokio::select! {
            frame = next_frame(&mut receiver, &mut held) => match frame {
                Ok(Some(frame)) => {
                    // `handle` may wait (for a call slot, or for a client
                    // that does not read to take an error report): a
                    // shutdown must not wait for it.
                    let handled = async {
                        let mut frame = frame;
                        loop {
                            last_heard = Instant::now();
                            if last_heard.duration_since(last_keepalive) >= KEEPALIVE {
                                sender.keepalive();
                                last_keepalive = last_heard;
                            }
                            handle(&conn, frame, last_heard, &mut replies).await;
                            // Everything the last read brought in, before
                            // the replies are written.
                            frame = match receiver.try_recv() {
                                Some(Ok(Some(frame))) => frame,
                                None => break,
                                Some(other) => {
                                    held = Some(other);
                                    break;
                                }
                            };
                        }
                        replies.flush(&sender).await;
                    };
                    tokio::select! {
                        () = handled => {}
                        at = &mut stop => match at {
                            Some(at) => break at,
                            None => return,
                        },
                    }
                }
                // The client is gone: nobody is waiting for these calls.
                _ => {
                    let calls: Vec<_> = lock(&running).drain().collect();
                    for (_, call) in calls {
                        call.stop();
                        // Awaited, so the call's state is dropped when the
                        // connection task ends.
                        let _ = call.task.await;
                    }
                    return;
                }
            },
            // Armed for when the connection would be idle if nothing more
            // came since it was armed; pushed back when something did.
            () = &mut idle_check, if idle.is_some() => {
                let idle_at = last_heard + idle.unwrap_or(Duration::ZERO);
                if idle_at > Instant::now() {
                    idle_check.as_mut().reset(idle_at);
                } else if lock(&running).is_empty() {
                    tracing::debug!(?idle, "closing an idle connection");
                    close_within(&sender, Vec::new(), close_timeout).await;
                    return;
                } else {
                    // Calls (streams, say) are running: not idle.
                    last_heard = Instant::now();
                    idle_check.as_mut().reset(last_heard + idle.unwrap_or(Duration::ZERO));
                }
            }
            at = &mut stop => match at {
                Some(at) => break at,
                None => return,
            },
        }
    };
    // Shutting down: no new calls are read; give those running until the
    // grace period ends, then cancel the rest.
    while !lock(&running).is_empty() && Instant::now() < shutdown_at {
        tokio::time::sleep(Duration::from_millis(5).min(shutdown_at - Instant::now())).await;
    }
    let cancelled: Vec<_> = lock(&running).drain().collect();
    // An answer held back when the shutdown came goes first.
    let mut reports: Vec<Frame> = replies.take().into_iter().collect();
    reports.reserve(cancelled.len());
    for (id, call) in cancelled {
        call.stop();
        let _ = call.task.await;
        reports.push(fault_frame(id, &RpcFault::Cancelled));
    }
    // The grace period is over: a client that does not read gets
    // `close_timeout` to take the reports, then is dropped.
    close_within(&sender, reports, close_timeout).await;
}

fn fault_frame(id: u64, fault: &RpcFault) -> Frame {
    Frame::new(
        FrameKind::Error,
        id,
        postcard::to_stdvec(fault).unwrap_or_default(),
    )
}

/// What the reader of one connection works with.
struct Conn<'a> {
    shared: &'a Shared,
    identity: &'a Option<Arc<str>>,
    sender: &'a FrameSender,
    /// Unary calls running in tasks of their own (`max_in_flight`).
    slots: &'a Arc<Semaphore>,
    /// Streaming calls open (`max_streams`).
    streams: &'a Arc<Semaphore>,
    /// Bytes of client-stream items buffered and not yet read
    /// (`inbound_buffer_bytes`).
    inbound_bytes: &'a Arc<Semaphore>,
    running: &'a Running,
}

/// The next frame: the outcome `try_recv` held back, else the next read.
async fn next_frame(
    receiver: &mut FrameReceiver,
    held: &mut Option<Result<Option<Frame>, RecvError>>,
) -> Result<Option<Frame>, RecvError> {
    match held.take() {
        Some(next) => next,
        None => receiver.recv().await,
    }
}

/// An answer, and for a handler's reply, what to say instead if it turns
/// out too large for the connection.
struct Answer {
    frame: Frame,
    /// The service and the request, to name them in that report.
    call: Option<(&'static str, Bytes)>,
}

/// Answers of calls handled inline, written together: each is queued when
/// the next one is ready, and the last is sent (writing the queued ones with
/// it) once the frames at hand are handled, or before the reader waits for
/// anything else.
#[derive(Default)]
struct Replies {
    held: Option<Answer>,
    /// The cancellation signal of a call answered inline that nobody kept:
    /// never triggered, so as good as new for the next call.
    spare: Option<Arc<CancelSignal>>,
}

impl Replies {
    /// A cancellation signal for a new call.
    fn signal(&mut self) -> Arc<CancelSignal> {
        self.spare.take().unwrap_or_default()
    }

    /// Takes back the signal of a call answered inline, if nobody kept it.
    fn recycle(&mut self, mut signal: Arc<CancelSignal>) {
        if Arc::get_mut(&mut signal).is_some() {
            self.spare = Some(signal);
        }
    }

    async fn push(&mut self, sender: &FrameSender, answer: Answer) {
        if let Some(previous) = self.held.replace(answer) {
            deliver(sender, previous, Urgency::Later).await;
        }
    }

    async fn flush(&mut self, sender: &FrameSender) {
        if let Some(last) = self.held.take() {
            deliver(sender, last, Urgency::Now).await;
        }
    }

    /// The answer held back, if any.
    fn take(&mut self) -> Option<Frame> {
        self.held.take().map(|answer| answer.frame)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Urgency {
    /// Queued, to be written with the next frame sent now.
    Later,
    /// Written now, with whatever is queued.
    Now,
}

/// Sends an answer. A reply the client could not accept (over its frame
/// limit, or ours) is replaced by a report, so the client still gets an
/// answer now, not at its deadline.
async fn deliver(sender: &FrameSender, answer: Answer, urgency: Urgency) {
    let id = answer.frame.id;
    let send = |frame: Frame| async move {
        match urgency {
            Urgency::Later => sender.feed(frame).await,
            Urgency::Now => sender.send(frame).await,
        }
    };
    let sent = send(answer.frame).await;
    if let (Err(SendError::FrameTooLarge { size, limit }), Some((service, request))) =
        (sent, answer.call)
    {
        let method = method_name(&request);
        let reason = format!("the reply of {service}.{method} ({size} bytes)");
        let fault = RpcFault::Internal {
            reason: format!("{reason} exceeds the frame limit of {limit} bytes"),
        };
        let _ = send(fault_frame(id, &fault)).await;
    }
}

/// What a handler's future gives: its reply or fault, or its panic.
type Outcome = Result<Result<Bytes, RpcFault>, Box<dyn std::any::Any + Send>>;

/// The answer to call `id` given what its handler did (`None`: it ran
/// past its deadline).
fn answer(
    id: u64,
    streaming: bool,
    outcome: Option<Outcome>,
    service: &'static str,
    request: Bytes,
) -> Answer {
    let frame = match outcome {
        Some(Ok(Ok(_))) if streaming => Frame::new(FrameKind::StreamEnd, id, Bytes::new()),
        Some(Ok(Ok(bytes))) => Frame::new(FrameKind::Response, id, bytes),
        Some(Ok(Err(fault))) => fault_frame(id, &fault),
        Some(Err(panic)) => {
            let method = method_name(&request);
            tracing::error!(
                service,
                method,
                panic = panic_message(panic.as_ref()),
                "a handler panicked; the caller gets an internal error"
            );
            fault_frame(
                id,
                &RpcFault::Internal {
                    reason: format!("the handler of {service}.{method} panicked"),
                },
            )
        }
        None => fault_frame(id, &RpcFault::DeadlineExceeded),
    };
    Answer {
        frame,
        call: Some((service, request)),
    }
}

/// Handles one frame from the client, `now` being when it was read.
async fn handle(conn: &Conn<'_>, frame: Frame, now: Instant, replies: &mut Replies) {
    let Conn {
        shared,
        identity,
        sender,
        slots,
        streams,
        inbound_bytes,
        running,
    } = *conn;
    match frame.kind {
        FrameKind::Request => {}
        FrameKind::Cancel => {
            if let Some(call) = lock(running).remove(&frame.id) {
                call.stop();
            }
            return;
        }
        FrameKind::StreamItem | FrameKind::StreamEnd => {
            // An item holds its bytes of the connection's budget until its
            // handler reads it (or the call goes).
            let budget = match frame.kind {
                FrameKind::StreamItem => {
                    let bytes = u32::try_from(frame.payload.len().max(1)).unwrap_or(u32::MAX);
                    Some(inbound_bytes.clone().try_acquire_many_owned(bytes).ok())
                }
                _ => None,
            };
            let over_budget = matches!(budget, Some(None));
            let item = match frame.kind {
                FrameKind::StreamItem => Inbound::Item(frame.payload, budget.flatten()),
                _ if frame.flags.contains(ABANDONED) => Inbound::Abandoned,
                _ => Inbound::End,
            };
            let overrun = {
                let mut calls = lock(running);
                let overrun = match calls.get(&frame.id).and_then(|c| c.inbound.as_ref()) {
                    Some(_) if over_budget => true,
                    // A handler that dropped its end was told so (`Cancel`),
                    // and what was in flight meanwhile is dropped.
                    Some(inbound) => matches!(
                        inbound.try_send(item),
                        Err(mpsc::error::TrySendError::Full(_))
                    ),
                    // Not a client-streaming call, or one that ended:
                    // nobody takes it.
                    None => false,
                };
                if overrun {
                    // The channel holds the whole window: the client sent
                    // more than it had credit for, so the call ends here,
                    // and nothing past the window is ever buffered.
                    if let Some(call) = calls.remove(&frame.id) {
                        call.stop();
                    }
                }
                overrun
            };
            if overrun {
                let fault = match over_budget {
                    true => RpcFault::InboundBufferFull {
                        limit: shared.config.inbound_buffer_bytes as u64,
                    },
                    false => RpcFault::Malformed {
                        reason: "the client sent more items than it had credit for".into(),
                    },
                };
                let report = Answer {
                    frame: fault_frame(frame.id, &fault),
                    call: None,
                };
                replies.push(sender, report).await;
            }
            return;
        }
        FrameKind::Credit => {
            let granted = frame
                .payload
                .get(..4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")));
            if let (
                Some(granted),
                Some(RunningCall {
                    credit: Some(credit),
                    ..
                }),
            ) = (granted, lock(running).get(&frame.id))
            {
                // Bounded by what a semaphore can count; a lying client only
                // hurts its own stream (its channel overflows and it fails).
                credit.add_permits(
                    (granted as usize).min(Semaphore::MAX_PERMITS - credit.available_permits()),
                );
            }
            return;
        }
        _ => return,
    }
    if frame.flags.contains(crate::protocol::ONEWAY) {
        // It may run for a while: what was answered goes out first.
        replies.flush(sender).await;
        // Boxed: its state would otherwise swell every connection's future
        // (and, in debug builds, the stack frame that polls it).
        return Box::pin(run_oneway(shared, identity, frame, sender)).await;
    }
    let id = frame.id;
    let extended = frame.flags.contains(EXTENDED);
    let started = match start(
        shared,
        identity.as_deref(),
        (&frame.payload, extended),
        id,
        now,
        sender,
    ) {
        Ok(started) => started,
        Err(fault) => {
            let report = Answer {
                frame: fault_frame(id, &fault),
                call: None,
            };
            replies.push(sender, report).await;
            return;
        }
    };
    let Started {
        reply,
        deadline,
        credit,
        inbound,
        service,
        trace,
    } = started;
    let mut handler = Handler {
        reply,
        context: CallContext {
            cancel: replies.signal(),
            deadline,
            caller: identity.clone(),
        },
        trace,
    };
    let request = frame.payload;
    let slot = if credit.is_some() || inbound.is_some() {
        // A stream may never end: refuse one too many instead of waiting.
        match streams.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let limit = shared.config.max_streams.min(u32::MAX as usize) as u32;
                let report = Answer {
                    frame: fault_frame(id, &RpcFault::TooManyStreams { limit }),
                    call: None,
                };
                replies.push(sender, report).await;
                return;
            }
        }
    } else {
        // Bounded concurrency: at the limit, wait for a slot before reading
        // further frames. A slot is taken only by a call that goes on
        // running after its first poll: one answered at once never holds
        // one (only this reader takes slots, so one free now is still free
        // after the poll).
        let slot = if slots.available_permits() > 0 {
            None
        } else {
            replies.flush(sender).await;
            match wait_for_slot(slots, sender).await {
                Some(slot) => Some(slot),
                None => return,
            }
        };
        // Polled here first: a handler that completes at once is answered
        // without a task of its own (and its answer written with the
        // others the same read brought in).
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut handler).poll(cx))).await;
        if let Poll::Ready(outcome) = first {
            drop(slot);
            // Dropped first: what it held may hold the context too.
            let Handler { reply, context, .. } = handler;
            drop(reply);
            replies.recycle(context.cancel);
            replies
                .push(sender, answer(id, false, Some(outcome), service, request))
                .await;
            return;
        }
        match slot {
            Some(slot) => slot,
            None => match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => match wait_for_slot(slots, sender).await {
                    Some(slot) => slot,
                    None => return,
                },
            },
        }
    };
    // Still running: it goes on in a task of its own, so that it never
    // holds up the connection's reader.
    let streaming = credit.is_some();
    let open = (streaming || inbound.is_some()).then(|| OpenStream::new(&shared.open_streams));
    let cancel = handler.context.cancel.clone();
    let stop = cancel.clone();
    let task_sender = sender.clone();
    let task_running = running.clone();
    // Registered under the lock, so the task cannot finish and deregister
    // before it is registered.
    let mut calls = lock(running);
    let task = tokio::spawn(async move {
        let outcome = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, handler).await.ok(),
            // A call without a deadline lives until it ends, is cancelled
            // or its connection closes.
            None => Some(handler.await),
        };
        if outcome.is_none() {
            cancel.trigger();
        }
        let answer = answer(id, streaming, outcome, service, request);
        lock(&task_running).remove(&id);
        drop(slot);
        drop(open);
        deliver(&task_sender, answer, Urgency::Now).await;
    });
    calls.insert(
        id,
        RunningCall {
            task,
            credit,
            inbound,
            cancel: stop,
        },
    );
}

/// Waits for a call slot. Not reading means not answering the client's
/// pings, so it says we are alive meanwhile: a busy server is not a dead
/// one. `None` if the connection is closing.
async fn wait_for_slot(
    slots: &Arc<Semaphore>,
    sender: &FrameSender,
) -> Option<OwnedSemaphorePermit> {
    let acquire = slots.clone().acquire_owned();
    tokio::pin!(acquire);
    loop {
        tokio::select! {
            slot = &mut acquire => return slot.ok(),
            () = tokio::time::sleep(KEEPALIVE) => sender.keepalive(),
        }
    }
}

/// Runs a one-way call to its end before the connection's next frame is
/// read, so one-way calls take effect in the order they were sent and
/// before any later call on the connection; it is never answered. Its
/// deadline and panics are handled as for any call, and reported only in
/// the log. A one-way call to a streaming method is refused (logged).
/// The deadline of a one-way call whose client sent none (this crate's
/// clients always send one; see [`crate::Client::notify`]).
const ONEWAY_WITHOUT_DEADLINE: Duration = Duration::from_secs(30);

async fn run_oneway(
    shared: &Shared,
    identity: &Option<Arc<str>>,
    frame: Frame,
    sender: &FrameSender,
) {
    let extended = frame.flags.contains(EXTENDED);
    let started = match start(
        shared,
        identity.as_deref(),
        (&frame.payload, extended),
        0,
        Instant::now(),
        sender,
    ) {
        Ok(started) if started.credit.is_none() && started.inbound.is_none() => started,
        Ok(started) => {
            tracing::debug!(
                service = started.service,
                "a one-way call to a streaming method was ignored"
            );
            return;
        }
        Err(fault) => {
            tracing::debug!(%fault, "a one-way call was refused");
            return;
        }
    };
    // A one-way call runs inline, holding up the connection's reader, and
    // cannot be cancelled: it always gets a deadline, at most
    // `ONEWAY_WITHOUT_DEADLINE` when its client sent none.
    let deadline = started
        .deadline
        .unwrap_or_else(|| Instant::now() + ONEWAY_WITHOUT_DEADLINE);
    let reply = Handler {
        reply: started.reply,
        context: CallContext {
            cancel: Arc::new(CancelSignal::default()),
            deadline: Some(deadline),
            caller: identity.clone(),
        },
        trace: started.trace,
    };
    let run = tokio::time::timeout_at(deadline, reply);
    tokio::pin!(run);
    // The reader waits for this call: say we are alive meanwhile, as while
    // waiting for a call slot.
    let outcome = loop {
        tokio::select! {
            outcome = &mut run => break outcome,
            () = tokio::time::sleep(KEEPALIVE) => sender.keepalive(),
        }
    };
    match outcome {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(fault))) => tracing::debug!(%fault, "a one-way call failed"),
        Ok(Err(panic)) => tracing::error!(
            service = started.service,
            method = method_name(&frame.payload),
            panic = panic_message(panic.as_ref()),
            "a one-way handler panicked"
        ),
        Err(_) => tracing::debug!(
            service = started.service,
            "a one-way call passed its deadline"
        ),
    }
}

/// A call, decoded and ready to run.
struct Started {
    reply: crate::__private::Reply,
    /// `None`: the call has none.
    deadline: Option<Instant>,
    credit: Option<Arc<Semaphore>>,
    /// Where the client's items go, for a client-streaming call.
    inbound: Option<mpsc::Sender<Inbound>>,
    /// The service's name, for logs.
    service: &'static str,
    /// The caller's trace, continued by the handler.
    trace: Option<Traced>,
}

/// The trace a call continues: the handler's own place in it (the
/// caller's trace, with a fresh span id), and its `rpc` span.
struct Traced {
    context: TraceContext,
    span: tracing::Span,
}

/// Finds the service and method, decodes the arguments, and sets up the
/// stream credit of a streaming call.
fn start(
    shared: &Shared,
    identity: Option<&str>,
    (payload, extended): (&Bytes, bool),
    id: u64,
    now: Instant,
    sender: &FrameSender,
) -> Result<Started, RpcFault> {
    let (header, ext, args) =
        split_request(payload, extended).map_err(|reason| RpcFault::Malformed { reason })?;
    let service = shared
        .services
        .get(header.service)
        .ok_or_else(|| RpcFault::UnknownService {
            service: header.service.to_string(),
        })?;
    if let Some(access) = &shared.config.service_access {
        if !access(identity, header.service) {
            return Err(RpcFault::PermissionDenied {
                what: format!("calling service {}", header.service),
            });
        }
    }
    // Each method is checked on its own: adding a method, or changing
    // another, leaves the clients of this one working.
    match service.method_fingerprint(header.method) {
        None => {
            return Err(RpcFault::UnknownMethod {
                service: header.service.to_string(),
                method: header.method.to_string(),
            })
        }
        Some(fingerprint) if fingerprint != header.fingerprint => {
            return Err(RpcFault::Mismatch {
                service: header.service.to_string(),
                method: header.method.to_string(),
            })
        }
        Some(_) => {}
    }
    // The client's window, clamped to what a semaphore can count (on a
    // 32-bit target a huge announced window would otherwise panic).
    let credit = (header.window > 0).then(|| {
        Arc::new(Semaphore::new(
            usize::try_from(header.window)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS),
        ))
    });
    let window = shared.config.inbound_window;
    if ext.inbound && window == 0 {
        // We announced no window: a client that sends one anyway is told.
        return Err(RpcFault::Malformed {
            reason: "this server does not take client streams".into(),
        });
    }
    // As large as the window plus the end: a client within its credit
    // never finds it full.
    let (inbound, source) = match ext.inbound {
        true => {
            let (tx, rx) = mpsc::channel(
                usize::try_from(window)
                    .unwrap_or(usize::MAX)
                    .saturating_add(1),
            );
            (Some(tx), Some((rx, window)))
        }
        false => (None, None),
    };
    let items = ItemSink {
        id,
        sender: (credit.is_some() || inbound.is_some()).then(|| sender.clone()),
        credit: credit.clone(),
        inbound: source,
    };
    // The handler may keep its arguments (a broker holds payloads for slow
    // subscribers under a memory bound): only large payloads share the
    // request's frame, the rest are copied (see `Sharing::Large`).
    let reply = courier_wire::shared::with_source(payload, Sharing::Large, || {
        service.call(header.method, args, items)
    })?;
    // A deadline too far to represent is as good as none (and must not
    // overflow the clock).
    let deadline = match ext.no_deadline {
        true => None,
        false => now.checked_add(Duration::from_millis(header.timeout_ms)),
    };
    let trace = ext.traceparent.and_then(TraceContext::parse).map(|parent| {
        let context = parent.child();
        let span = tracing::info_span!(
            "rpc",
            service = header.service,
            method = header.method,
            trace_id = %parent.trace_id_hex(),
            parent_id = %parent.span_id_hex(),
            span_id = %context.span_id_hex(),
        );
        #[cfg(feature = "otel")]
        crate::otel::set_parent(&span, &parent);
        Traced { context, span }
    });
    Ok(Started {
        reply,
        deadline,
        credit,
        inbound,
        service: service.name(),
        trace,
    })
}

/// The method a request names, for logs (decoded again only when needed, so
/// a call costs no copy of it).
fn method_name(request: &Bytes) -> String {
    postcard::take_from_bytes::<RequestHeader<'_>>(request)
        .map(|(header, _)| header.method.to_string())
        .unwrap_or_default()
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// A handler's future, run as its caller with its call's context (see
/// [`crate::caller`], [`CallContext::current`]). A panic inside it becomes an
/// `Err` with the panic's payload, so the caller can be answered at once.
///
/// The connection's reader polls it first; one still pending then moves to
/// a task of its own (it is `Unpin`: the handler's state is boxed).
struct Handler {
    reply: crate::__private::Reply,
    context: CallContext,
    /// The caller's trace, if it sent one: current (and its span entered)
    /// while the handler runs, so calls the handler makes carry it on.
    trace: Option<Traced>,
}

impl Future for Handler {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Outcome> {
        let Handler {
            reply,
            context,
            trace,
        } = &mut *self;
        // Unwind safety: after a panic the future is never polled again
        // (Ready is returned and the caller drops it), so no broken state
        // is observed.
        let mut run = || {
            CONTEXT.sync_scope(context.clone(), || {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    reply.as_mut().poll(cx)
                })) {
                    Ok(poll) => poll.map(Ok),
                    Err(panic) => Poll::Ready(Err(panic)),
                }
            })
        };
        match trace {
            Some(Traced { context, span }) => {
                let _entered = span.enter();
                trace::sync_scope(*context, run)
            }
            None => run(),
        }
    }
}

/// Set when a call is cancelled: by its client, by the server's shutdown,
/// or because its deadline passed.
#[derive(Debug, Default)]
struct CancelSignal {
    cancelled: AtomicBool,
    notify: Notify,
}

impl CancelSignal {
    fn trigger(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

tokio::task_local! {
    static CONTEXT: CallContext;
}

/// What a handler can know about the call it is handling: its deadline (if
/// it has one), who made it, and whether it was cancelled. See the crate
/// docs, "Handler context", for an example.
///
/// A call ends when its client cancels it (drops the call, or its stream),
/// when its deadline passes, or when the server shuts down; the server then
/// stops the handler's future where it stands. Work the handler handed
/// elsewhere (a spawned task, a blocking thread) is not stopped by that:
/// give it a clone of the context and let it check
/// [`is_cancelled`](CallContext::is_cancelled) or await
/// [`cancelled`](CallContext::cancelled) to stop early.
///
/// ```
/// # async fn handler() {
/// if let Some(call) = courier_rpc::CallContext::current() {
///     let work = tokio::task::spawn_blocking(move || {
///         while !call.is_cancelled() {
///             // one step of long work
/// #           break;
///         }
///     });
/// #   let _ = work.await;
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct CallContext {
    cancel: Arc<CancelSignal>,
    /// `None`: the call has no deadline (a stream meant to live as long as
    /// its connection).
    deadline: Option<Instant>,
    /// Who made the call (see [`crate::caller`]).
    caller: Option<Arc<str>>,
}

/// The identity of whoever made the call being handled (see
/// [`crate::caller`]).
pub(crate) fn caller() -> Option<Arc<str>> {
    CONTEXT.try_with(|call| call.caller.clone()).ok().flatten()
}

impl CallContext {
    /// The context of the call being handled; `None` outside a handler (and
    /// in tasks a handler spawned: pass them a clone).
    pub fn current() -> Option<CallContext> {
        CONTEXT.try_with(Clone::clone).ok()
    }

    /// When the caller stops waiting (the server's view of the caller's
    /// deadline, which travels as the time remaining); `None` for a call
    /// made without one ([`crate::Client::without_deadline`]), which runs
    /// until it ends, is cancelled, or its connection closes.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left before the deadline (zero once it passed); `None` for a
    /// call without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// The identity of whoever made the call (as [`crate::caller`] gives
    /// it): the token's identity or the client certificate's; `None` for
    /// an anonymous caller.
    pub fn caller(&self) -> Option<&str> {
        self.caller.as_deref()
    }

    /// Whether the call was cancelled or its deadline passed: nobody waits
    /// for its result any more.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.cancelled.load(Ordering::Acquire)
            || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Resolves when the call is cancelled or its deadline passes.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.cancel.notify.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so no trigger is missed.
            notified.as_mut().enable();
            if self.cancel.cancelled.load(Ordering::Acquire) {
                return;
            }
            let deadline = async {
                match self.deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut notified => {}
                () = deadline => return,
            }
        }
    }
}

/// Resolves when the call being handled is cancelled by its client, stopped
/// by the server's shutdown, or reaches its deadline; never, outside a
/// handler. See [`CallContext`].
pub async fn cancelled() {
    match CallContext::current() {
        Some(call) => call.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Time left before the deadline of the call being handled; `None` outside
/// a handler, and for a call without a deadline.
pub fn remaining() -> Option<Duration> {
    CallContext::current().and_then(|call| call.remaining())
}
