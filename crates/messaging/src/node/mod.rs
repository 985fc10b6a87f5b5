//! The tokio shell: a [`Node`] with listeners, typed mailboxes and
//! responders, and one driver task per peer that runs the [`Outbox`] and
//! [`Requests`] cores over a `courier-transport` connection.
//!
//! [`Outbox`]: crate::Outbox
//! [`Requests`]: crate::Requests
//!
//! By role, each file depending only on the ones before it: `delivery` and
//! `config` (plain types), `peer` (the client side: one driver task per
//! peer), `registry` (the state the node shares with its tasks), `serve`
//! (the server side), and here the public handles.

mod config;
mod delivery;
mod peer;
mod registry;
mod serve;

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use courier_transport::{bind, Address};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use config::NodeConfig;
pub use delivery::{Delivery, Envelope, Progress};

use crate::error::{EndpointError, RequestError, SendError, SendErrorKind, StartError};
use crate::protocol::{self, DataHeader, Hello, Rejection, RequestHeader};
use crate::{Inbox, NodeId, Schema};
use peer::{Command, PeerDriver};
use registry::{lock, Endpoint, Handler, Incoming, NodeInner, PeerEntry};
use serve::accept_loop;

/// What [`Node::shutdown`] left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Messages not acknowledged and requests not answered when the grace
    /// period ended. Each of their callers got a `NodeShutdown` error.
    pub unfinished: usize,
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
