//! The tokio shell: a [`Node`] with listeners, typed mailboxes and
//! responders, and one driver task per peer that runs the [`Outbox`] and
//! [`Requests`] cores over a `courier-transport` connection.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use courier_transport::{
    bind, connect, Address, Backoff, Connection, Flags, Frame, FrameKind, FrameReceiver,
    FrameSender, TransportConfig,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{EndpointError, RequestError, SendError, SendErrorKind, StartError};
use crate::protocol::{self, DataHeader, Hello, Rejection, RequestHeader};
use crate::schema::SchemaCache;
use crate::{Inbox, NodeId, Outbox, OutboxEvent, Requests, RetryPolicy, Schema};

/// Flag on an `Error` frame: it refuses a request, not a data message.
const ABOUT_REQUEST: u8 = 0b0000_0010;

/// What a send promises. Each mode's `send` returns only once its promise
/// is kept, and its `Ok` never claims more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Fire and forget: `send` returns [`Progress::Written`] once the message
    /// is handed to the connection. It may be lost, and is never retried.
    AtMostOnce,
    /// Retransmitted until the receiving node acknowledges it (it is in the
    /// endpoint's mailbox) or the send deadline passes: `send` returns
    /// [`Progress::Acknowledged`]. The handler may see it more than once.
    AtLeastOnce,
    /// At-least-once, and the receiver drops duplicates by (sender,
    /// sequence number) within a bounded window, so the handler sees each
    /// message once. Across a receiver restart, duplicates are possible again.
    EffectivelyOnce,
}

/// How far a message got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Progress {
    /// In this node's bounded queue for the peer ([`Sender::try_send`]).
    Queued,
    /// Written to the connection (at-most-once).
    Written,
    /// Acknowledged by the receiving node (at-least-once, effectively-once).
    Acknowledged,
}

/// A message received by a [`Mailbox`].
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<T> {
    /// The node that sent it.
    pub from: NodeId,
    /// The message.
    pub body: T,
}

/// Settings of a node. `Default` suits tests and small deployments.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NodeConfig {
    /// Addresses to listen on. Empty: the node only sends.
    pub listen: Vec<Address>,
    /// Transport limits and heartbeats for every connection.
    pub transport: TransportConfig,
    /// Messages a mailbox holds before the connection delivering to it waits.
    pub mailbox_capacity: usize,
    /// Sends queued per peer before `send` waits and `try_send` says `Full`.
    pub peer_queue: usize,
    /// Unacknowledged messages per peer.
    pub max_in_flight: usize,
    /// Requests in flight per peer.
    pub max_requests: usize,
    /// Retransmission backoff.
    pub retry: RetryPolicy,
    /// How long an at-least-once send is retried before it fails as expired.
    pub send_timeout: Duration,
    /// De-duplication window per sender stream (sequence numbers).
    pub dedup_window: u64,
    /// Sender streams remembered for de-duplication.
    pub max_streams: usize,
    /// Request handlers running at once per incoming connection.
    pub max_handlers: usize,
    /// First and longest wait between reconnection attempts.
    pub reconnect: (Duration, Duration),
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: Vec::new(),
            transport: TransportConfig::default(),
            mailbox_capacity: 1024,
            peer_queue: 1024,
            max_in_flight: 1024,
            max_requests: 10_000,
            retry: RetryPolicy::default(),
            send_timeout: Duration::from_secs(30),
            dedup_window: 4096,
            max_streams: 1024,
            max_handlers: 256,
            reconnect: (Duration::from_millis(50), Duration::from_secs(5)),
        }
    }
}

impl NodeConfig {
    /// A configuration listening on `address`.
    pub fn listening(address: Address) -> NodeConfig {
        NodeConfig {
            listen: vec![address],
            ..NodeConfig::default()
        }
    }
}

type Handler = Arc<
    dyn Fn(&[u8]) -> Result<Pin<Box<dyn Future<Output = Bytes> + Send>>, Rejection> + Send + Sync,
>;
type Decoder = fn(&[u8]) -> Result<Box<dyn Any + Send>, String>;

struct Incoming {
    from: NodeId,
    body: Box<dyn Any + Send>,
}

enum Endpoint {
    Mailbox {
        schema: Schema,
        decode: Decoder,
        tx: mpsc::Sender<Incoming>,
    },
    Responder {
        schema: Schema,
        reply_schema: Schema,
        handler: Handler,
    },
}

struct PeerEntry {
    commands: mpsc::Sender<Command>,
    /// Messages and requests the driver holds unfinished, kept current by it.
    unfinished: Arc<AtomicUsize>,
}

impl PeerEntry {
    /// Unfinished work, counting commands still queued for the driver.
    fn unfinished(&self) -> usize {
        let queued = self.commands.max_capacity() - self.commands.capacity();
        self.unfinished.load(Ordering::Relaxed) + queued
    }
}

/// What [`Node::shutdown`] left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Messages not acknowledged and requests not answered when the grace
    /// period ended. Each of their callers got a `NodeShutdown` error.
    pub unfinished: usize,
}

struct NodeInner {
    id: NodeId,
    incarnation: u64,
    config: NodeConfig,
    addresses: Vec<Address>,
    endpoints: Mutex<HashMap<String, Endpoint>>,
    peers: Mutex<HashMap<Address, PeerEntry>>,
    inbox: Mutex<Inbox<(NodeId, u64)>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Fingerprints traced once per type: tracing walks the whole type, and
    /// `request` would otherwise pay for it on every call.
    schemas: Mutex<SchemaCache>,
}

impl NodeInner {
    fn fingerprint<T: DeserializeOwned + 'static>(&self) -> u64 {
        lock(&self.schemas).get::<T>().fingerprint
    }
}

impl Drop for NodeInner {
    /// Dropping the last `Node` without [`Node::shutdown`] stops everything
    /// at once; what was unfinished is at least counted in the log.
    fn drop(&mut self) {
        let unfinished: usize = lock(&self.peers).values().map(PeerEntry::unfinished).sum();
        if unfinished > 0 {
            tracing::warn!(
                node = %self.id,
                unfinished,
                "node dropped without shutdown(): messages unacknowledged or requests unanswered were abandoned"
            );
        }
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// A Courier node: an identity, listeners, named endpoints, and managed
/// connections to peers. Cheap to clone; the node stops when every clone is
/// dropped or [`Node::shutdown`] is called.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> anyhow::Result<()> {
/// use courier_messaging::{Delivery, Node, NodeConfig};
///
/// let receiver = Node::start(NodeConfig::listening("mem://doc-receiver".parse()?)).await?;
/// let mut greetings = receiver.mailbox::<String>("greetings")?;
///
/// let sender = Node::start(NodeConfig::default()).await?;
/// let to = sender.sender::<String>(&receiver.addresses()[0], "greetings", Delivery::EffectivelyOnce);
/// to.send("hello".to_string()).await?;
///
/// let envelope = greetings.recv().await.expect("a message");
/// assert_eq!((envelope.from, envelope.body.as_str()), (sender.id(), "hello"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.inner.id)
            .field("addresses", &self.inner.addresses)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts a node with a fresh random id, listening on `config.listen`.
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        Node::start_with_id(NodeId::random(), config).await
    }

    /// Starts a node with a given id (a persisted identity, or a test's).
    pub async fn start_with_id(id: NodeId, config: NodeConfig) -> Result<Node, StartError> {
        let mut listeners = Vec::new();
        for address in &config.listen {
            listeners.push(
                bind(address, &config.transport)
                    .await
                    .map_err(StartError::Bind)?,
            );
        }
        let inner = Arc::new(NodeInner {
            id,
            incarnation: NodeId::random().as_u128() as u64,
            addresses: listeners.iter().map(|l| l.local_addr().clone()).collect(),
            endpoints: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            inbox: Mutex::new(Inbox::new(config.dedup_window, config.max_streams)),
            tasks: Mutex::new(Vec::new()),
            schemas: Mutex::default(),
            config,
        });
        for listener in listeners {
            let task = tokio::spawn(accept_loop(Arc::downgrade(&inner), listener));
            lock(&inner.tasks).push(task);
        }
        Ok(Node { inner })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The addresses this node listens on (with ports chosen by the system).
    pub fn addresses(&self) -> &[Address] {
        &self.inner.addresses
    }

    /// Opens the mailbox `name` for messages of type `T`.
    pub fn mailbox<T: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
    ) -> Result<Mailbox<T>, EndpointError> {
        let (tx, rx) = mpsc::channel(self.inner.config.mailbox_capacity.max(1));
        fn decode<T: DeserializeOwned + Send + 'static>(
            body: &[u8],
        ) -> Result<Box<dyn Any + Send>, String> {
            protocol::decode_body::<T>(body)
                .map(|value| Box::new(value) as Box<dyn Any + Send>)
                .map_err(|err| err.to_string())
        }
        self.register(
            name,
            Endpoint::Mailbox {
                schema: Schema::of::<T>(),
                decode: decode::<T>,
                tx,
            },
        )?;
        Ok(Mailbox {
            rx,
            name: name.to_string(),
            node: Arc::downgrade(&self.inner),
            _type: PhantomData,
        })
    }

    /// Answers requests to `name` with `handler`. Requests from one
    /// connection run concurrently, at most `max_handlers` at a time.
    pub fn respond<Req, Resp, F, Fut>(&self, name: &str, handler: F) -> Result<(), EndpointError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Resp> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |body: &[u8]| {
            let request =
                protocol::decode_body::<Req>(body).map_err(|err| Rejection::Malformed {
                    reason: err.to_string(),
                })?;
            let reply = handler(request);
            Ok(Box::pin(async move {
                let reply = reply.await;
                // A reply that cannot be serialized is a bug in its type's
                // Serialize impl; answer with an empty body, which the
                // requester reports as undecodable.
                Bytes::from(postcard::to_stdvec(&reply).unwrap_or_default())
            })
                as Pin<Box<dyn Future<Output = Bytes> + Send>>)
        });
        self.register(
            name,
            Endpoint::Responder {
                schema: Schema::of::<Req>(),
                reply_schema: Schema::of::<Resp>(),
                handler,
            },
        )
    }

    fn register(&self, name: &str, endpoint: Endpoint) -> Result<(), EndpointError> {
        if name.is_empty() || name.len() > 255 {
            return Err(EndpointError::InvalidName(name.to_string()));
        }
        let mut endpoints = lock(&self.inner.endpoints);
        if endpoints.contains_key(name) {
            return Err(EndpointError::InUse(name.to_string()));
        }
        endpoints.insert(name.to_string(), endpoint);
        Ok(())
    }

    /// A typed handle for sending to the endpoint `endpoint` of the node at
    /// `to`. The connection is made on first use and remade after failures.
    pub fn sender<T: Serialize + DeserializeOwned + 'static>(
        &self,
        to: &Address,
        endpoint: &str,
        delivery: Delivery,
    ) -> Sender<T> {
        Sender {
            peer: self.peer(to),
            endpoint: endpoint.into(),
            fingerprint: self.inner.fingerprint::<T>(),
            delivery,
            send_timeout: self.inner.config.send_timeout,
            _type: PhantomData,
        }
    }

    /// Sends `request` to the responder `endpoint` at `to` and waits at most
    /// `timeout` for its reply. Many requests may be in flight on one
    /// connection; replies are matched to requests whatever their order.
    pub async fn request<Req, Resp>(
        &self,
        to: &Address,
        endpoint: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RequestError>
    where
        Req: Serialize + DeserializeOwned + 'static,
        Resp: DeserializeOwned + 'static,
    {
        let header = RequestHeader {
            endpoint,
            fingerprint: self.inner.fingerprint::<Req>(),
            reply_fingerprint: self.inner.fingerprint::<Resp>(),
        };
        let payload = postcard::to_stdvec(&(&header, request))
            .map_err(|err| RequestError::Serialize(err.to_string()))?;
        let (reply, answer) = oneshot::channel();
        let command = Command::Request {
            payload: payload.into(),
            deadline: Instant::now() + timeout,
            reply,
        };
        self.peer(to)
            .send(command)
            .await
            .map_err(|_| RequestError::NodeShutdown)?;
        let body = answer.await.map_err(|_| RequestError::NodeShutdown)??;
        protocol::decode_body(&body).map_err(|err| RequestError::Decode(err.to_string()))
    }

    fn peer(&self, to: &Address) -> mpsc::Sender<Command> {
        let mut peers = lock(&self.inner.peers);
        if let Some(peer) = peers.get(to).filter(|p| !p.commands.is_closed()) {
            return peer.commands.clone();
        }
        let (tx, rx) = mpsc::channel(self.inner.config.peer_queue.max(1));
        let hello = Hello {
            node: self.inner.id.as_u128(),
            incarnation: self.inner.incarnation,
        };
        let unfinished = Arc::new(AtomicUsize::new(0));
        let driver = PeerDriver::new(
            to.clone(),
            self.inner.config.clone(),
            hello,
            unfinished.clone(),
        );
        let task = tokio::spawn(driver.run(rx));
        lock(&self.inner.tasks).push(task);
        peers.insert(
            to.clone(),
            PeerEntry {
                commands: tx.clone(),
                unfinished,
            },
        );
        tx
    }

    /// Stops the node: it waits until every peer has had its unacknowledged
    /// messages acknowledged and its requests answered, or until `grace` has
    /// passed, whichever is first; then everything still running is stopped
    /// (listeners included) and its callers get
    /// [`SendErrorKind::NodeShutdown`] or [`RequestError::NodeShutdown`].
    /// The report says how much was left unfinished: nothing is dropped
    /// without being counted.
    pub async fn shutdown(self, grace: Duration) -> ShutdownReport {
        let peers: Vec<_> = lock(&self.inner.peers)
            .values()
            .map(|p| p.commands.clone())
            .collect();
        let mut drained = Vec::new();
        for peer in peers {
            let (done, wait) = oneshot::channel();
            if peer.send(Command::Drain(done)).await.is_ok() {
                drained.push(wait);
            }
        }
        let _ = tokio::time::timeout(grace, async {
            for wait in drained {
                let _ = wait.await;
            }
        })
        .await;
        let unfinished = lock(&self.inner.peers)
            .values()
            .map(PeerEntry::unfinished)
            .sum();
        for task in lock(&self.inner.tasks).drain(..) {
            task.abort();
        }
        if unfinished > 0 {
            tracing::warn!(
                unfinished,
                "node stopped with messages unacknowledged or requests unanswered"
            );
        }
        ShutdownReport { unfinished }
    }
}

/// Receives messages of type `T` sent to one endpoint. Dropping it closes
/// the endpoint: later messages are refused with `NoSuchEndpoint`.
pub struct Mailbox<T> {
    rx: mpsc::Receiver<Incoming>,
    name: String,
    node: Weak<NodeInner>,
    _type: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Mailbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T: 'static> Mailbox<T> {
    /// The next message; `None` once the node has stopped.
    pub async fn recv(&mut self) -> Option<Envelope<T>> {
        let incoming = self.rx.recv().await?;
        let body = *incoming
            .body
            .downcast::<T>()
            .expect("a mailbox only receives its own type");
        Some(Envelope {
            from: incoming.from,
            body,
        })
    }

    /// A message that has already arrived, if any.
    pub fn try_recv(&mut self) -> Option<Envelope<T>> {
        let incoming = self.rx.try_recv().ok()?;
        let body = *incoming
            .body
            .downcast::<T>()
            .expect("a mailbox only receives its own type");
        Some(Envelope {
            from: incoming.from,
            body,
        })
    }
}

impl<T> Drop for Mailbox<T> {
    fn drop(&mut self) {
        if let Some(node) = self.node.upgrade() {
            lock(&node.endpoints).remove(&self.name);
        }
    }
}

/// Sends messages of type `T` to one remote endpoint. Cheap to clone.
pub struct Sender<T> {
    peer: mpsc::Sender<Command>,
    endpoint: Arc<str>,
    fingerprint: u64,
    delivery: Delivery,
    send_timeout: Duration,
    _type: PhantomData<fn(T)>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            peer: self.peer.clone(),
            endpoint: self.endpoint.clone(),
            fingerprint: self.fingerprint,
            delivery: self.delivery,
            send_timeout: self.send_timeout,
            _type: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("endpoint", &self.endpoint)
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

impl<T: Serialize> Sender<T> {
    fn command(
        &self,
        message: &T,
        done: Option<oneshot::Sender<Result<Progress, SendErrorKind>>>,
    ) -> Result<Command, SendErrorKind> {
        let header = DataHeader {
            endpoint: &self.endpoint,
            fingerprint: self.fingerprint,
            reliable: self.delivery != Delivery::AtMostOnce,
            dedup: self.delivery == Delivery::EffectivelyOnce,
        };
        let rest = protocol::data_rest(&header, message)
            .map_err(|err| SendErrorKind::Serialize(err.to_string()))?;
        Ok(Command::Send {
            rest,
            reliable: header.reliable,
            deadline: Instant::now() + self.send_timeout,
            done,
        })
    }

    /// Sends `message` and waits until its delivery mode's promise is kept
    /// (see [`Delivery`]), or fails with the message handed back. Waits while
    /// the peer's queue is full.
    pub async fn send(&self, message: T) -> Result<Progress, SendError<T>> {
        let (done, outcome) = oneshot::channel();
        let command = match self.command(&message, Some(done)) {
            Ok(command) => command,
            Err(kind) => return Err(SendError { kind, message }),
        };
        if self.peer.send(command).await.is_err() {
            return Err(SendError {
                kind: SendErrorKind::NodeShutdown,
                message,
            });
        }
        match outcome.await {
            Ok(Ok(progress)) => Ok(progress),
            Ok(Err(kind)) => Err(SendError { kind, message }),
            Err(_) => Err(SendError {
                kind: SendErrorKind::NodeShutdown,
                message,
            }),
        }
    }

    /// Queues `message` without waiting: `Ok(Progress::Queued)`, or `Full`
    /// with the message handed back. Its outcome is not reported; use
    /// [`send`](Self::send) to learn it.
    pub fn try_send(&self, message: T) -> Result<Progress, SendError<T>> {
        let command = match self.command(&message, None) {
            Ok(command) => command,
            Err(kind) => return Err(SendError { kind, message }),
        };
        match self.peer.try_send(command) {
            Ok(()) => Ok(Progress::Queued),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SendError {
                kind: SendErrorKind::Full,
                message,
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError {
                kind: SendErrorKind::NodeShutdown,
                message,
            }),
        }
    }
}

enum Command {
    Send {
        rest: Bytes,
        reliable: bool,
        deadline: Instant,
        done: Option<oneshot::Sender<Result<Progress, SendErrorKind>>>,
    },
    Request {
        payload: Bytes,
        deadline: Instant,
        reply: oneshot::Sender<Result<Bytes, RequestError>>,
    },
    Drain(oneshot::Sender<()>),
}

type AckWaiter = Option<oneshot::Sender<Result<Progress, SendErrorKind>>>;

/// A connection attempt (connect and hello) under way, polled by the
/// driver's loop beside everything else so that deadlines, drains and
/// incoming commands are served while it lasts.
type Connecting =
    Pin<Box<dyn Future<Output = Result<(FrameSender, FrameReceiver), String>> + Send>>;

/// Work that needs a connection, held while one is being made.
enum Unsent {
    /// A request already in the `Requests` table (so its deadline runs).
    Request { id: u64, payload: Bytes },
    /// An at-most-once message.
    Unreliable { payload: Bytes, done: AckWaiter },
}

/// Owns everything about one peer: the connection (made lazily, remade
/// after failures with backoff), the outbox of unacknowledged messages and
/// the table of requests awaiting replies.
struct PeerDriver {
    address: Address,
    config: NodeConfig,
    hello: Hello,
    epoch: Instant,
    outbox: Outbox,
    waiting: HashMap<u64, AckWaiter>,
    /// Why the peer refused a message, until its outcome is reported.
    rejections: HashMap<u64, Rejection>,
    requests: Requests<oneshot::Sender<Result<Bytes, RequestError>>>,
    connection: Option<(FrameSender, FrameReceiver)>,
    connecting: Option<Connecting>,
    /// Requests and at-most-once messages waiting for `connecting`; bounded
    /// by `max_in_flight` (commands are not read while it is full).
    unsent: Vec<Unsent>,
    backoff: Backoff,
    next_attempt: Instant,
    last_error: String,
    drains: Vec<oneshot::Sender<()>>,
    unfinished: Arc<AtomicUsize>,
    /// At-most-once messages fed but not yet flushed.
    unflushed: Vec<AckWaiter>,
}

impl PeerDriver {
    fn new(
        address: Address,
        config: NodeConfig,
        hello: Hello,
        unfinished: Arc<AtomicUsize>,
    ) -> PeerDriver {
        let now = Instant::now();
        PeerDriver {
            outbox: Outbox::new(config.max_in_flight, config.retry),
            requests: Requests::new(config.max_requests),
            backoff: Backoff::new(config.reconnect.0, config.reconnect.1, hello.incarnation),
            waiting: HashMap::new(),
            rejections: HashMap::new(),
            connection: None,
            connecting: None,
            unsent: Vec::new(),
            next_attempt: now,
            last_error: String::new(),
            drains: Vec::new(),
            unfinished,
            unflushed: Vec::new(),
            epoch: now,
            address,
            config,
            hello,
        }
    }

    fn clock(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.epoch)
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            if self.outbox.in_flight() > 0 {
                self.start_connecting();
            }
            self.transmit().await;
            self.settle();
            let wake = self.next_wake();
            tokio::select! {
                command = commands.recv(), if self.has_room() => match command {
                    Some(command) => {
                        self.handle(command).await;
                        // Take everything else already queued in the same
                        // turn, so its frames share one flush.
                        while self.has_room() {
                            let Ok(command) = commands.try_recv() else { break };
                            self.handle(command).await;
                        }
                        self.flush_unreliable().await;
                    }
                    None => return,
                },
                frame = recv(&mut self.connection) => {
                    self.receive(frame);
                    while let Some(frame) = self.connection.as_mut().and_then(|(_, receiver)| receiver.try_recv()) {
                        self.receive(frame);
                    }
                }
                outcome = connecting(&mut self.connecting) => {
                    self.connecting = None;
                    self.connected(outcome).await;
                }
                _ = sleep_until(wake) => {}
            }
            let now = self.clock(Instant::now());
            self.outbox.handle_timeout(now);
        }
    }

    /// Whether another command may be taken: the outbox, the request table
    /// and the work waiting for a connection all have room.
    fn has_room(&self) -> bool {
        self.outbox.has_room()
            && self.requests.len() < self.config.max_requests
            && self.unsent.len() < self.config.max_in_flight.max(1)
    }

    /// The next time a timer needs attention. Without a connection,
    /// retransmission timers do not count (there is nothing to send on):
    /// only deadlines and the next reconnection attempt do.
    fn next_wake(&self) -> Option<Instant> {
        let outbox = match self.connection {
            Some(_) => self.outbox.poll_timeout(),
            None => self.outbox.next_deadline(),
        };
        let mut wake = [outbox, self.requests.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .map(|t| self.epoch + t);
        if self.connection.is_none() && self.connecting.is_none() && self.outbox.in_flight() > 0 {
            wake = Some(wake.map_or(self.next_attempt, |w| w.min(self.next_attempt)));
        }
        wake
    }

    /// Starts a connection attempt unless one is open or under way, or the
    /// backoff says not yet. Returns whether a connection is open or coming.
    fn start_connecting(&mut self) -> bool {
        if self.connection.is_some() || self.connecting.is_some() {
            return true;
        }
        if Instant::now() < self.next_attempt {
            return false;
        }
        let (address, config, hello) = (
            self.address.clone(),
            self.config.transport.clone(),
            self.hello,
        );
        self.connecting = Some(Box::pin(
            async move { open(&address, &config, hello).await },
        ));
        true
    }

    /// The end of a connection attempt: on success everything waiting for
    /// it is written; on failure it is refused and the backoff grows.
    async fn connected(&mut self, outcome: Result<(FrameSender, FrameReceiver), String>) {
        match outcome {
            Ok(connection) => {
                let sender = connection.0.clone();
                self.connection = Some(connection);
                self.backoff.reset();
                let now = self.clock(Instant::now());
                self.outbox.retransmit_all(now);
                let mut failed = None;
                for unsent in std::mem::take(&mut self.unsent) {
                    match unsent {
                        // Skip requests that expired while we waited.
                        Unsent::Request { id, payload } if self.requests.contains(id) => {
                            if let Err(err) = sender
                                .feed(Frame::new(FrameKind::Request, id, payload))
                                .await
                            {
                                failed = Some(err.to_string());
                                break;
                            }
                        }
                        Unsent::Request { .. } => {}
                        Unsent::Unreliable { payload, done } => {
                            let frame =
                                Frame::new(FrameKind::Data, 0, protocol::data_payload(0, &payload));
                            if let Err(err) = sender.feed(frame).await {
                                if let Some(done) = done {
                                    let _ =
                                        done.send(Err(SendErrorKind::Unavailable(err.to_string())));
                                }
                                failed = Some(err.to_string());
                                break;
                            }
                            self.unflushed.push(done);
                        }
                    }
                }
                if failed.is_none() {
                    if let Err(err) = sender.flush().await {
                        failed = Some(err.to_string());
                    }
                }
                if let Some(reason) = failed {
                    self.fail_unsent(&reason);
                    self.disconnect(reason);
                }
                self.flush_unreliable().await;
            }
            Err(reason) => {
                tracing::debug!(peer = %self.address, %reason, "connect failed");
                self.fail_unsent(&reason);
                self.last_error = reason;
                self.next_attempt = Instant::now() + self.backoff.next_delay();
            }
        }
    }

    /// Refuses everything that was waiting for a connection.
    fn fail_unsent(&mut self, reason: &str) {
        for unsent in std::mem::take(&mut self.unsent) {
            match unsent {
                Unsent::Request { id, .. } => {
                    if let Some(reply) = self.requests.complete(id) {
                        let _ = reply.send(Err(RequestError::Unavailable(reason.to_string())));
                    }
                }
                Unsent::Unreliable { done, .. } => {
                    if let Some(done) = done {
                        let _ = done.send(Err(SendErrorKind::Unavailable(reason.to_string())));
                    }
                }
            }
        }
    }

    fn disconnect(&mut self, reason: String) {
        tracing::debug!(peer = %self.address, %reason, "connection lost");
        self.connection = None;
        self.last_error = reason.clone();
        // Replies to requests in flight can no longer arrive.
        for (_, reply) in self.requests.drain() {
            let _ = reply.send(Err(RequestError::PeerDead(reason.clone())));
        }
        self.next_attempt = Instant::now();
    }

    /// Puts every due message on the wire.
    async fn transmit(&mut self) {
        let Some((sender, _)) = &self.connection else {
            return;
        };
        let sender = sender.clone();
        let now = self.clock(Instant::now());
        let mut wrote = false;
        while let Some(t) = self.outbox.poll_transmit(now) {
            let frame = Frame::new(
                FrameKind::Data,
                t.seq,
                protocol::data_payload(t.low_water, &t.payload),
            );
            if let Err(err) = sender.feed(frame).await {
                self.disconnect(err.to_string());
                return;
            }
            wrote = true;
        }
        if wrote {
            if let Err(err) = sender.flush().await {
                self.disconnect(err.to_string());
            }
        }
    }

    /// Reports outcomes and expiries, and answers drains that are complete.
    fn settle(&mut self) {
        while let Some(event) = self.outbox.poll_event() {
            let (seq, outcome) = match event {
                OutboxEvent::Acked { seq, .. } => (seq, Ok(Progress::Acknowledged)),
                OutboxEvent::Rejected { seq, .. } => {
                    (seq, Err(SendErrorKind::Rejected(self.rejection(seq))))
                }
                OutboxEvent::Expired { seq, .. } => {
                    (seq, Err(SendErrorKind::Expired(self.last_error.clone())))
                }
            };
            if let Some(Some(done)) = self.waiting.remove(&seq) {
                let _ = done.send(outcome);
            }
        }
        let now = self.clock(Instant::now());
        while let Some((_, reply)) = self.requests.poll_expired(now) {
            let _ = reply.send(Err(RequestError::Timeout));
        }
        let unfinished = self.outbox.in_flight() + self.requests.len() + self.unsent.len();
        self.unfinished.store(unfinished, Ordering::Relaxed);
        if unfinished == 0 {
            for drain in self.drains.drain(..) {
                let _ = drain.send(());
            }
        }
    }

    fn rejection(&mut self, seq: u64) -> Rejection {
        self.rejections
            .remove(&seq)
            .unwrap_or(Rejection::Malformed {
                reason: "refused".into(),
            })
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Send {
                rest,
                reliable: true,
                deadline,
                done,
            } => {
                let now = self.clock(Instant::now());
                match self.outbox.push(rest, now, self.clock(deadline)) {
                    Ok(seq) => {
                        self.waiting.insert(seq, done);
                    }
                    // Not reached: commands are read only while there is room.
                    Err(_) => {
                        if let Some(done) = done {
                            let _ = done.send(Err(SendErrorKind::Full));
                        }
                    }
                }
            }
            Command::Send {
                rest,
                reliable: false,
                done,
                ..
            } => {
                let Some((sender, _)) = &self.connection else {
                    if self.start_connecting() {
                        self.unsent.push(Unsent::Unreliable {
                            payload: rest,
                            done,
                        });
                    } else if let Some(done) = done {
                        let _ = done.send(Err(SendErrorKind::Unavailable(self.last_error.clone())));
                    }
                    return;
                };
                let frame = Frame::new(FrameKind::Data, 0, protocol::data_payload(0, &rest));
                match sender.feed(frame).await {
                    // Reported as written once the batch is flushed.
                    Ok(()) => self.unflushed.push(done),
                    Err(err) => {
                        let reason = err.to_string();
                        self.disconnect(reason.clone());
                        if let Some(done) = done {
                            let _ = done.send(Err(SendErrorKind::Unavailable(reason)));
                        }
                    }
                }
            }
            Command::Request {
                payload,
                deadline,
                reply,
            } => {
                if !self.start_connecting() {
                    let _ = reply.send(Err(RequestError::Unavailable(self.last_error.clone())));
                    return;
                }
                let id = match self.requests.start(reply, self.clock(deadline)) {
                    Ok(id) => id,
                    Err(reply) => {
                        let _ = reply.send(Err(RequestError::Full));
                        return;
                    }
                };
                let Some((sender, _)) = &self.connection else {
                    // Sent once the connection is made; the deadline runs.
                    self.unsent.push(Unsent::Request { id, payload });
                    return;
                };
                if let Err(err) = sender
                    .send(Frame::new(FrameKind::Request, id, payload))
                    .await
                {
                    if let Some(reply) = self.requests.complete(id) {
                        let _ = reply.send(Err(RequestError::Unavailable(err.to_string())));
                    }
                    self.disconnect(err.to_string());
                }
            }
            Command::Drain(done) => self.drains.push(done),
        }
    }

    /// Flushes at-most-once messages fed this turn and reports them written.
    async fn flush_unreliable(&mut self) {
        if self.unflushed.is_empty() {
            return;
        }
        let outcome = match &self.connection {
            Some((sender, _)) => sender
                .flush()
                .await
                .map(|()| Progress::Written)
                .map_err(|err| SendErrorKind::Unavailable(err.to_string())),
            None => Err(SendErrorKind::Unavailable(self.last_error.clone())),
        };
        if let (Err(SendErrorKind::Unavailable(reason)), Some(_)) = (&outcome, &self.connection) {
            let reason = reason.clone();
            self.disconnect(reason);
        }
        for done in self.unflushed.drain(..).flatten() {
            let _ = done.send(outcome.clone());
        }
    }

    fn receive(&mut self, frame: Result<Option<Frame>, courier_transport::RecvError>) {
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return self.disconnect("peer closed the connection".into()),
            Err(err) => return self.disconnect(err.to_string()),
        };
        match frame.kind {
            FrameKind::Ack => self.outbox.handle_ack(frame.id),
            FrameKind::Response => {
                if let Some(reply) = self.requests.complete(frame.id) {
                    let _ = reply.send(Ok(frame.payload));
                }
            }
            FrameKind::Error => {
                let rejection =
                    protocol::decode_body::<Rejection>(&frame.payload).unwrap_or_else(|err| {
                        Rejection::Malformed {
                            reason: format!("undecodable refusal: {err}"),
                        }
                    });
                if frame.flags.contains(ABOUT_REQUEST) {
                    if let Some(reply) = self.requests.complete(frame.id) {
                        let _ = reply.send(Err(RequestError::Rejected(rejection)));
                    }
                } else {
                    self.rejections.insert(frame.id, rejection);
                    self.outbox.handle_reject(frame.id);
                }
            }
            _ => {}
        }
    }
}

async fn recv(
    connection: &mut Option<(FrameSender, FrameReceiver)>,
) -> Result<Option<Frame>, courier_transport::RecvError> {
    match connection {
        Some((_, receiver)) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// The outcome of the connection attempt under way; pending without one.
/// Cancel-safe: the attempt lives in the driver, not in this future.
async fn connecting(
    attempt: &mut Option<Connecting>,
) -> Result<(FrameSender, FrameReceiver), String> {
    match attempt {
        Some(attempt) => attempt.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Connects and exchanges hellos.
async fn open(
    address: &Address,
    config: &TransportConfig,
    hello: Hello,
) -> Result<(FrameSender, FrameReceiver), String> {
    let connection = connect(address, config)
        .await
        .map_err(|err| err.to_string())?;
    let (sender, mut receiver) = connection.split();
    sender
        .send_message(FrameKind::Hello, 0, &hello)
        .await
        .map_err(|err| err.to_string())?;
    let reply = tokio::time::timeout(config.handshake_timeout, receiver.recv())
        .await
        .map_err(|_| {
            format!(
                "{address} did not answer the hello within {:?}",
                config.handshake_timeout
            )
        })?
        .map_err(|err| err.to_string())?
        .ok_or_else(|| format!("{address} closed the connection during the hello"))?;
    match reply.kind {
        FrameKind::Hello => {
            let theirs: Hello = protocol::decode_body(&reply.payload)
                .map_err(|err| format!("bad hello from {address}: {err}"))?;
            if theirs.node == hello.node {
                return Err(format!(
                    "{address} has this node's own id {}",
                    NodeId::from_u128(hello.node)
                ));
            }
            Ok((sender, receiver))
        }
        FrameKind::Error => {
            let rejection: Rejection =
                protocol::decode_body(&reply.payload).map_err(|err| err.to_string())?;
            Err(format!("{address} refused the connection: {rejection}"))
        }
        other => Err(format!(
            "{address} answered the hello with a {other:?} frame"
        )),
    }
}

async fn accept_loop(node: Weak<NodeInner>, mut listener: courier_transport::Listener) {
    while let Ok(connection) = listener.accept().await {
        let Some(inner) = node.upgrade() else { return };
        let task = tokio::spawn(serve(Arc::downgrade(&inner), connection));
        let mut tasks = lock(&inner.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

/// Serves one incoming connection: delivers data to mailboxes (acknowledging
/// and de-duplicating as each message asks) and runs request handlers.
async fn serve(node: Weak<NodeInner>, connection: Connection) {
    let (sender, mut receiver) = connection.split();
    let Some((me, handshake_timeout, max_handlers)) = node.upgrade().map(|n| {
        (
            Hello {
                node: n.id.as_u128(),
                incarnation: n.incarnation,
            },
            n.config.transport.handshake_timeout,
            n.config.max_handlers,
        )
    }) else {
        return;
    };
    let peer = match tokio::time::timeout(handshake_timeout, receiver.recv()).await {
        Ok(Ok(Some(frame))) if frame.kind == FrameKind::Hello => {
            match protocol::decode_body::<Hello>(&frame.payload) {
                Ok(hello) => hello,
                Err(_) => return,
            }
        }
        _ => return,
    };
    if peer.node == me.node {
        let _ = sender
            .send_message(FrameKind::Error, 0, &Rejection::DuplicateNodeId)
            .await;
        let _ = sender.close().await;
        return;
    }
    if sender.send_message(FrameKind::Hello, 0, &me).await.is_err() {
        return;
    }
    let from = NodeId::from_u128(peer.node);
    let stream = (from, peer.incarnation);
    let handlers = Arc::new(Semaphore::new(max_handlers.max(1)));
    loop {
        // Handle everything a read brought in, then flush the acks once.
        let next = match receiver.try_recv() {
            Some(next) => next,
            None => {
                if sender.flush().await.is_err() {
                    return;
                }
                receiver.recv().await
            }
        };
        let Ok(Some(frame)) = next else { return };
        let Some(inner) = node.upgrade() else { return };
        match frame.kind {
            FrameKind::Data => {
                if let Err(rejection) = deliver(&inner, from, stream, &frame, &sender).await {
                    let refusal = Frame::new(
                        FrameKind::Error,
                        frame.id,
                        postcard::to_stdvec(&rejection).unwrap_or_default(),
                    );
                    let _ = sender.feed(refusal).await;
                }
            }
            FrameKind::Request => {
                let Ok(permit) = handlers.clone().acquire_owned().await else {
                    return;
                };
                let sender = sender.clone();
                match start_request(&inner, &frame.payload) {
                    Ok(work) => {
                        tokio::spawn(async move {
                            let reply = work.await;
                            let _ = sender
                                .send(Frame::new(FrameKind::Response, frame.id, reply))
                                .await;
                            drop(permit);
                        });
                    }
                    Err(rejection) => {
                        let refusal = Frame::new(
                            FrameKind::Error,
                            frame.id,
                            postcard::to_stdvec(&rejection).unwrap_or_default(),
                        )
                        .with_flags(Flags::from_bits(ABOUT_REQUEST));
                        let _ = sender.send(refusal).await;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Delivers one data frame; `Err` is the refusal to send back.
async fn deliver(
    inner: &NodeInner,
    from: NodeId,
    stream: (NodeId, u64),
    frame: &Frame,
    sender: &FrameSender,
) -> Result<(), Rejection> {
    let (low_water, header, body) =
        protocol::parse_data(&frame.payload).map_err(|err| Rejection::Malformed {
            reason: err.to_string(),
        })?;
    let fresh = if header.dedup {
        match lock(&inner.inbox).handle_data(&stream, frame.id, low_water) {
            crate::Verdict::Deliver => true,
            crate::Verdict::Duplicate => false,
            crate::Verdict::Refuse => return Ok(()),
        }
    } else {
        true
    };
    if fresh {
        let (tx, value) = {
            let endpoints = lock(&inner.endpoints);
            match endpoints.get(header.endpoint) {
                Some(Endpoint::Mailbox { schema, decode, tx }) => {
                    if schema.fingerprint != header.fingerprint {
                        return Err(Rejection::SchemaMismatch {
                            endpoint: header.endpoint.to_string(),
                            expected_type: schema.type_name.to_string(),
                        });
                    }
                    (
                        tx.clone(),
                        decode(body).map_err(|reason| Rejection::Malformed { reason })?,
                    )
                }
                _ => {
                    return Err(Rejection::NoSuchEndpoint {
                        endpoint: header.endpoint.to_string(),
                    })
                }
            }
        };
        // A full mailbox makes this connection wait: backpressure, not loss.
        // Acks already fed go out first, so the sender does not retransmit
        // what was delivered.
        let incoming = Incoming { from, body: value };
        let sent = match tx.try_send(incoming) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(incoming)) => {
                let _ = sender.flush().await;
                tx.send(incoming).await.map_err(|_| ())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        };
        if sent.is_err() {
            return Err(Rejection::NoSuchEndpoint {
                endpoint: header.endpoint.to_string(),
            });
        }
    }
    if header.reliable {
        // Fed, not sent: the serving loop flushes acks once it has handled
        // everything already received.
        let _ = sender
            .feed(Frame::new(FrameKind::Ack, frame.id, Bytes::new()))
            .await;
    }
    Ok(())
}

fn start_request(
    inner: &NodeInner,
    payload: &[u8],
) -> Result<Pin<Box<dyn Future<Output = Bytes> + Send>>, Rejection> {
    let (header, body) = protocol::parse_request(payload).map_err(|err| Rejection::Malformed {
        reason: err.to_string(),
    })?;
    let endpoints = lock(&inner.endpoints);
    match endpoints.get(header.endpoint) {
        Some(Endpoint::Responder {
            schema,
            reply_schema,
            handler,
        }) => {
            if schema.fingerprint != header.fingerprint
                || reply_schema.fingerprint != header.reply_fingerprint
            {
                return Err(Rejection::SchemaMismatch {
                    endpoint: header.endpoint.to_string(),
                    expected_type: format!("{} -> {}", schema.type_name, reply_schema.type_name),
                });
            }
            handler(body)
        }
        _ => Err(Rejection::NoSuchEndpoint {
            endpoint: header.endpoint.to_string(),
        }),
    }
}
