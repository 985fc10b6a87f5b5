//! The server: accepts connections, runs calls concurrently (bounded per
//! connection), enforces deadlines and honours cancellation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_transport::{Address, Connection, Frame, FrameKind, FrameSender, Listener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::protocol::RequestHeader;
use crate::stream::ItemSink;
use crate::{RpcFault, Service};

/// May this identity (`None`: anonymous) call this service?
pub type ServiceAccess = Arc<dyn Fn(Option<&str>, &str) -> bool + Send + Sync>;

/// Server settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Unary calls running at once per connection. When reached, the server
    /// stops reading that connection until one finishes: backpressure, not
    /// an unbounded pile of tasks. Default 256.
    pub max_in_flight: usize,
    /// Streaming calls open at once per connection. Streams may live for
    /// the connection's lifetime (subscriptions, consumers), so they do not
    /// count against `max_in_flight` (which would stall the connection for
    /// good); one past this limit is refused with
    /// [`crate::RpcError::TooManyStreams`]. Default 10,000.
    pub max_streams: usize,
    /// Connections served at once; one more is refused
    /// ([`crate::RpcError::TooManyConnections`]). Default 10,000.
    pub max_connections: usize,
    /// Connections at once per authenticated identity. Default 1,000.
    pub max_connections_per_identity: usize,
    /// How long a new connection has to say hello. Default 5 s.
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
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("max_in_flight", &self.max_in_flight)
            .field("max_streams", &self.max_streams)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_identity",
                &self.max_connections_per_identity,
            )
            .field("hello_timeout", &self.hello_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("authenticator", &self.authenticator.is_some())
            .field("require_identity", &self.require_identity)
            .field("service_access", &self.service_access.is_some())
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 256,
            max_streams: 10_000,
            max_connections: 10_000,
            max_connections_per_identity: 1_000,
            hello_timeout: Duration::from_secs(5),
            idle_timeout: None,
            authenticator: None,
            require_identity: false,
            service_access: None,
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

    /// The same settings with other connection limits (total, per identity).
    pub fn with_max_connections(mut self, total: usize, per_identity: usize) -> ServerConfig {
        self.max_connections = total;
        self.max_connections_per_identity = per_identity;
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
        let shared = Arc::new(Shared {
            services: self.services,
            config: self.config,
            admitted: Mutex::default(),
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
            stop,
            accept,
            connections,
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local: Vec<Address>,
    stop: watch::Sender<Option<Instant>>,
    accept: Vec<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ServerHandle {
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
    pub async fn shutdown(mut self, grace: Duration) {
        for accept in &mut self.accept {
            accept.abort();
            let _ = accept.await;
        }
        let _ = self.stop.send(Some(Instant::now() + grace));
        let connections: Vec<_> = lock(&self.connections).drain(..).collect();
        for connection in connections {
            let _ = connection.await;
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
        if admitted.total >= self.config.max_connections {
            return Err(RpcFault::TooManyConnections {
                limit: limit(self.config.max_connections),
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

    /// Reads the client's hello and decides who it is.
    async fn greet(
        &self,
        receiver: &mut courier_transport::FrameReceiver,
    ) -> Result<Option<Arc<str>>, RpcFault> {
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
        let hello =
            crate::auth::decode_hello(&frame.payload).map_err(|_| refused("malformed hello"))?;
        // A verified client certificate speaks for itself.
        if let Some(identity) = receiver.peer_identity() {
            return Ok(Some(Arc::from(identity)));
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
        Ok(identity)
    }
}

/// Calls running on a connection: how to stop each, and its stream credit.
type Running = Arc<Mutex<HashMap<u64, (JoinHandle<()>, Option<Arc<Semaphore>>)>>>;

async fn serve(
    shared: Arc<Shared>,
    connection: Connection,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let (sender, mut receiver) = connection.split();
    // Nothing but a hello is read until the client is known and admitted.
    let admitted = match shared.greet(&mut receiver).await {
        Ok(identity) => shared.admit(identity),
        Err(fault) => Err(fault),
    };
    let admission = match admitted {
        Ok(admission) => admission,
        Err(fault) => {
            tracing::debug!(%fault, "connection refused");
            let _ = sender.feed(fault_frame(0, &fault)).await;
            let _ = sender.close().await;
            return;
        }
    };
    let identity = admission.identity.clone();
    let welcome = crate::auth::Welcome {
        identity: identity.as_deref().map(str::to_string),
    };
    if sender
        .send_message(FrameKind::Hello, 0, &welcome)
        .await
        .is_err()
    {
        return;
    }
    let slots = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    let streams = Arc::new(Semaphore::new(shared.config.max_streams.max(1)));
    let running: Running = Arc::default();
    let idle = shared.config.idle_timeout;
    let mut last_heard = Instant::now();
    let shutdown_at = loop {
        // Far in the future when there is no idle timeout.
        let idle_at = last_heard + idle.unwrap_or(Duration::from_secs(365 * 24 * 3600));
        tokio::select! {
            frame = receiver.recv() => match frame {
                Ok(Some(frame)) => {
                    last_heard = Instant::now();
                    handle(&shared, &identity, frame, &sender, (&slots, &streams), &running).await
                }
                // The client is gone: nobody is waiting for these calls.
                _ => {
                    let calls: Vec<_> = lock(&running).drain().collect();
                    for (_, (call, _)) in calls {
                        call.abort();
                        // Awaited, so the call's state is dropped when the
                        // connection task ends.
                        let _ = call.await;
                    }
                    return;
                }
            },
            () = tokio::time::sleep_until(idle_at) => {
                if lock(&running).is_empty() {
                    tracing::debug!(?idle, "closing an idle connection");
                    let _ = sender.close().await;
                    return;
                }
                // Calls (streams, say) are running: not idle.
                last_heard = Instant::now();
            }
            changed = stop.changed() => {
                if changed.is_err() {
                    return;
                }
                if let Some(at) = *stop.borrow() {
                    break at;
                }
            }
        }
    };
    // Shutting down: no new calls are read; give those running until the
    // grace period ends, then cancel the rest.
    while !lock(&running).is_empty() && Instant::now() < shutdown_at {
        tokio::time::sleep(Duration::from_millis(5).min(shutdown_at - Instant::now())).await;
    }
    let cancelled: Vec<_> = lock(&running).drain().collect();
    for (id, (call, _)) in cancelled {
        call.abort();
        let _ = call.await;
        let _ = sender.feed(fault_frame(id, &RpcFault::Cancelled)).await;
    }
    let _ = sender.close().await;
}

fn fault_frame(id: u64, fault: &RpcFault) -> Frame {
    Frame::new(
        FrameKind::Error,
        id,
        postcard::to_stdvec(fault).unwrap_or_default(),
    )
}

async fn handle(
    shared: &Shared,
    identity: &Option<Arc<str>>,
    frame: Frame,
    sender: &FrameSender,
    (slots, streams): (&Arc<Semaphore>, &Arc<Semaphore>),
    running: &Running,
) {
    match frame.kind {
        FrameKind::Request => {}
        FrameKind::Cancel => {
            if let Some((call, _)) = lock(running).remove(&frame.id) {
                call.abort();
            }
            return;
        }
        FrameKind::Credit => {
            let granted = frame
                .payload
                .get(..4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")));
            if let (Some(granted), Some((_, Some(credit)))) =
                (granted, lock(running).get(&frame.id))
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
    let id = frame.id;
    let started = match start(shared, identity.as_deref(), &frame.payload, id, sender) {
        Ok(started) => started,
        Err(fault) => {
            let _ = sender.send(fault_frame(id, &fault)).await;
            return;
        }
    };
    let (reply, deadline, credit) = started;
    let streaming = credit.is_some();
    let slot = if streaming {
        // A stream may never end: refuse one too many instead of waiting.
        match streams.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let limit = shared.config.max_streams.min(u32::MAX as usize) as u32;
                let _ = sender
                    .send(fault_frame(id, &RpcFault::TooManyStreams { limit }))
                    .await;
                return;
            }
        }
    } else {
        // Bounded concurrency: wait for a slot before reading further frames.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        slot
    };
    let task_sender = sender.clone();
    let task_running = running.clone();
    // Registered under the lock, so the task cannot finish and deregister
    // before it is registered.
    let mut calls = lock(running);
    let caller = identity.clone();
    let task = tokio::spawn(async move {
        let reply = crate::auth::as_caller(caller, reply);
        let frame = match tokio::time::timeout_at(deadline, reply).await {
            Ok(Ok(_)) if streaming => Frame::new(FrameKind::StreamEnd, id, Bytes::new()),
            Ok(Ok(bytes)) => Frame::new(FrameKind::Response, id, bytes),
            Ok(Err(fault)) => fault_frame(id, &fault),
            Err(_) => fault_frame(id, &RpcFault::DeadlineExceeded),
        };
        lock(&task_running).remove(&id);
        drop(slot);
        let _ = task_sender.send(frame).await;
    });
    calls.insert(id, (task, credit));
}

/// Finds the service and method, decodes the arguments, and sets up the
/// stream credit of a streaming call.
fn start(
    shared: &Shared,
    identity: Option<&str>,
    payload: &Bytes,
    id: u64,
    sender: &FrameSender,
) -> Result<(crate::__private::Reply, Instant, Option<Arc<Semaphore>>), RpcFault> {
    let (header, args): (RequestHeader<'_>, &[u8]) =
        postcard::take_from_bytes(payload).map_err(|err| RpcFault::Malformed {
            reason: err.to_string(),
        })?;
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
    if service.fingerprint() != header.fingerprint {
        return Err(RpcFault::Mismatch {
            service: header.service.to_string(),
        });
    }
    let credit = (header.window > 0).then(|| Arc::new(Semaphore::new(header.window as usize)));
    let items = ItemSink {
        id,
        sender: sender.clone(),
        credit: credit.clone(),
    };
    let reply = service.call(header.method, args, items)?;
    Ok((
        reply,
        Instant::now() + Duration::from_millis(header.timeout_ms),
        credit,
    ))
}
