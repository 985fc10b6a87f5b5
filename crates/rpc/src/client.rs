//! The client: one multiplexed connection, calls written straight from the
//! caller's task, replies routed by a reader task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use courier_transport::{
    connect, Address, Frame, FrameKind, FrameReceiver, FrameSender, Heartbeat, SendError,
    TransportConfig,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::protocol::{decode_ext, limit_from_wire, HelloExt, RequestHeader, WelcomeExt};
use crate::stream::{ItemStream, WINDOW};
use crate::{RpcError, RpcFault};

/// The heartbeat a [`ClientConfig`] has by default: a ping after 250 ms
/// without sending anything, the server declared dead after 1 s without
/// hearing anything from it. So a call to a frozen (SIGSTOP'd) server, or one
/// whose host vanished without closing its sockets, fails with
/// [`RpcError::Unavailable`] in about a second instead of at its deadline,
/// and the next call connects again. A live server answers pings whenever
/// it reads the connection, and sends keepalives while its per-connection
/// call limit keeps it from reading, so idle or busy connections to a live
/// server are never dropped.
pub const DEFAULT_HEARTBEAT: Heartbeat = Heartbeat {
    interval: Duration::from_millis(250),
    timeout: Duration::from_secs(1),
};

/// Client settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Transport limits and heartbeats. Default: the transport's defaults
    /// with [`DEFAULT_HEARTBEAT`] (heartbeats make a dead server fail calls
    /// promptly even when its host vanishes without closing sockets). Set
    /// `transport.heartbeat = None` to turn them off, or another
    /// [`Heartbeat`] for other timings; a replaced `transport` keeps only
    /// the heartbeat it has itself.
    pub transport: TransportConfig,
    /// Deadline of each call unless changed with `with_timeout`. Default 10 s.
    pub timeout: Duration,
    /// Calls in flight on the connection; further calls wait. Default 10,000.
    pub max_in_flight: usize,
    /// The bearer token sent in the hello, for servers that authenticate.
    /// Default none.
    pub token: Option<crate::Secret>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            transport: TransportConfig::default().with_heartbeat(DEFAULT_HEARTBEAT),
            timeout: Duration::from_secs(10),
            max_in_flight: 10_000,
            token: None,
        }
    }
}

/// Who waits for what a call brings back.
pub(crate) enum Waiter {
    Unary(oneshot::Sender<Result<Bytes, RpcError>>),
    /// Items, then `Ok(None)` at the end. The channel holds the whole
    /// window, so the server, bound by credit, can never overrun it.
    Stream(mpsc::Sender<Result<Option<Bytes>, RpcError>>),
}

impl Waiter {
    fn fail(self, err: RpcError) {
        match self {
            Waiter::Unary(waiter) => {
                let _ = waiter.send(Err(err));
            }
            Waiter::Stream(items) => {
                let _ = items.try_send(Err(err));
            }
        }
    }
}

type Pending = Mutex<HashMap<u64, Waiter>>;

/// One live connection and the calls waiting on it.
pub(crate) struct Link {
    pub(crate) sender: FrameSender,
    /// Which of the client's connections this is (1, 2, ...).
    epoch: u64,
    pending: Pending,
    next_id: AtomicU64,
    closed: AtomicBool,
    slots: Arc<Semaphore>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Link {
    /// A link over `sender` with no reader task, for unit tests that feed
    /// a call's channel themselves.
    #[cfg(test)]
    pub(crate) fn for_test(sender: FrameSender) -> Arc<Link> {
        Arc::new(Link {
            sender,
            epoch: 1,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            slots: Arc::new(Semaphore::new(1)),
            reader: Mutex::new(None),
        })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(reader) = lock(&self.reader).take() {
            reader.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Link {
    fn complete(&self, frame: Frame) {
        let mut pending = lock(&self.pending);
        match frame.kind {
            FrameKind::Response => {
                // A reply to a call that was cancelled or timed out finds nobody.
                if let Some(Waiter::Unary(waiter)) = pending.remove(&frame.id) {
                    let _ = waiter.send(Ok(frame.payload));
                }
            }
            FrameKind::StreamItem => {
                if let Some(Waiter::Stream(items)) = pending.get(&frame.id) {
                    if items.try_send(Ok(Some(frame.payload))).is_err() {
                        // More items than credit: the server broke the protocol.
                        if let Some(waiter) = pending.remove(&frame.id) {
                            waiter.fail(RpcError::Decode(
                                "server sent more items than it had credit for".into(),
                            ));
                        }
                    }
                }
            }
            FrameKind::StreamEnd => {
                if let Some(Waiter::Stream(items)) = pending.remove(&frame.id) {
                    let _ = items.try_send(Ok(None));
                }
            }
            FrameKind::Error => {
                let err = match crate::__private::decode::<RpcFault>(&frame.payload) {
                    Ok(fault) => fault.into(),
                    Err(err) => RpcError::Decode(format!("undecodable error report: {err}")),
                };
                if let Some(waiter) = pending.remove(&frame.id) {
                    waiter.fail(err);
                }
            }
            _ => {}
        }
    }

    /// Fails every waiting call: the connection is gone.
    fn fail(&self, reason: &str) {
        self.closed.store(true, Ordering::Release);
        for (_, waiter) in lock(&self.pending).drain() {
            waiter.fail(RpcError::Unavailable(reason.to_string()));
        }
    }
}

async fn read_replies(link: Weak<Link>, mut receiver: FrameReceiver) {
    let reason = loop {
        match receiver.recv().await {
            Ok(Some(frame)) => match link.upgrade() {
                Some(link) => link.complete(frame),
                None => return,
            },
            Ok(None) => break "the server closed the connection".to_string(),
            Err(err) => break err.to_string(),
        }
    };
    if let Some(link) = link.upgrade() {
        link.fail(&reason);
    }
}

/// Says hello with the configured token and waits for the server's answer.
async fn hello(
    sender: &FrameSender,
    receiver: &mut FrameReceiver,
    config: &ClientConfig,
) -> Result<(), RpcError> {
    let unavailable = |reason: String| RpcError::Unavailable(reason);
    let hello = crate::auth::Hello {
        token: config.token.clone(),
    };
    // Servers of every version ignore what follows the hello; see
    // `protocol` for how the extensions stay compatible.
    let ext = HelloExt {
        max_frame_size: sender.max_frame_size() as u64,
    };
    sender
        .send_message(FrameKind::Hello, 0, &(hello, ext))
        .await
        .map_err(|err| unavailable(err.to_string()))?;
    let answer = tokio::time::timeout(config.timeout, receiver.recv())
        .await
        .map_err(|_| RpcError::DeadlineExceeded)?
        .map_err(|err| unavailable(err.to_string()))?
        .ok_or_else(|| unavailable("the server closed the connection during hello".into()))?;
    match answer.kind {
        FrameKind::Hello => {
            let (_welcome, rest) =
                postcard::take_from_bytes::<crate::auth::Welcome>(&answer.payload)
                    .map_err(|err| RpcError::Decode(format!("undecodable welcome: {err}")))?;
            // A server that announces its frame limit: requests it would
            // refuse (by ending the connection) are refused here, before
            // any I/O, with its limit.
            if let Some(ext) = decode_ext::<WelcomeExt>(rest) {
                sender.limit_frame_size(limit_from_wire(ext.max_frame_size));
            }
            Ok(())
        }
        FrameKind::Error => Err(
            match crate::__private::decode::<RpcFault>(&answer.payload) {
                Ok(fault) => fault.into(),
                Err(err) => RpcError::Decode(format!("undecodable refusal: {err}")),
            },
        ),
        other => Err(RpcError::Decode(format!(
            "expected the server's hello, got {other:?}"
        ))),
    }
}

struct ClientInner {
    address: Address,
    config: ClientConfig,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// Connections made so far: the epoch of the next one.
    links_made: AtomicU64,
}

/// An RPC client for one server address. Cheap to clone; clones share the
/// connection. It connects on first use, and again on the next call after
/// the connection dies. Generated clients (`<Service>Client`) wrap it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.inner.address)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Removes the call's entry when the call ends, however it ends, and tells
/// the server to stop working on it unless it already answered.
pub(crate) struct CallGuard {
    pub(crate) link: Arc<Link>,
    pub(crate) id: u64,
    pub(crate) answered: bool,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        lock(&self.link.pending).remove(&self.id);
        if self.answered || self.link.closed.load(Ordering::Acquire) {
            return;
        }
        // Dropped mid-call (cancelled) or timed out: stop the server's work.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (sender, id) = (self.link.sender.clone(), self.id);
            runtime.spawn(async move {
                let _ = sender
                    .send(Frame::new(FrameKind::Cancel, id, Bytes::new()))
                    .await;
            });
        }
    }
}

impl Client {
    /// Connects now, so that a wrong address fails here.
    pub async fn connect(address: &Address, config: ClientConfig) -> Result<Client, RpcError> {
        let client = Client::lazy(address, config);
        client.link().await?;
        Ok(client)
    }

    /// A client that connects on its first call.
    pub fn lazy(address: &Address, config: ClientConfig) -> Client {
        let timeout = config.timeout;
        Client {
            inner: Arc::new(ClientInner {
                address: address.clone(),
                config,
                link: tokio::sync::Mutex::new(None),
                links_made: AtomicU64::new(0),
            }),
            timeout,
        }
    }

    /// A client to the same server, with the same settings, but a
    /// connection of its own (made on its first call): for traffic that
    /// must not share this one's ordering or flow control, such as one-way
    /// calls that may wait on something this connection carries.
    pub fn separate(&self) -> Client {
        Client::lazy(&self.inner.address, self.inner.config.clone()).with_timeout(self.timeout)
    }

    /// The same client (same connection) with another deadline per call.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            inner: self.inner.clone(),
            timeout,
        }
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The largest request frame this client sends on its current
    /// connection: its own `max_frame_size`, or the server's if that is
    /// lower (servers announce theirs in the welcome). `None` before the
    /// first connection.
    pub async fn max_frame_size(&self) -> Option<usize> {
        let link = self.inner.link.lock().await;
        link.as_ref().map(|link| link.sender.max_frame_size())
    }

    async fn link(&self) -> Result<Arc<Link>, RpcError> {
        let mut current = self.inner.link.lock().await;
        if let Some(link) = current
            .as_ref()
            .filter(|l| !l.closed.load(Ordering::Acquire))
        {
            return Ok(link.clone());
        }
        let connection = connect(&self.inner.address, &self.inner.config.transport)
            .await
            .map_err(|err| RpcError::Unavailable(err.to_string()))?;
        let (sender, mut receiver) = connection.split();
        hello(&sender, &mut receiver, &self.inner.config).await?;
        let link = Arc::new(Link {
            sender,
            epoch: self.inner.links_made.fetch_add(1, Ordering::Relaxed) + 1,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            slots: Arc::new(Semaphore::new(self.inner.config.max_in_flight.max(1))),
            reader: Mutex::new(None),
        });
        let reader = tokio::spawn(read_replies(Arc::downgrade(&link), receiver));
        *lock(&link.reader) = Some(reader);
        *current = Some(link.clone());
        Ok(link)
    }

    /// Registers a call and sends its request; the guard cancels it if it
    /// is dropped unanswered.
    async fn start<A: Serialize>(
        &self,
        service: &str,
        method: &str,
        fingerprint: u64,
        args: &A,
        deadline: Instant,
        waiter: Waiter,
    ) -> Result<CallGuard, RpcError> {
        let window = match waiter {
            Waiter::Unary(_) => 0,
            Waiter::Stream(_) => WINDOW,
        };
        let link = tokio::time::timeout_at(deadline, self.link())
            .await
            .map_err(|_| RpcError::DeadlineExceeded)??;
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&link.pending).insert(id, waiter);
        let mut guard = CallGuard {
            link: link.clone(),
            id,
            answered: false,
        };
        let header = RequestHeader {
            service,
            method,
            fingerprint,
            timeout_ms: deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
            window,
        };
        if let Err(err) = link
            .sender
            .send_message(FrameKind::Request, id, &(header, args))
            .await
        {
            guard.answered = true;
            return Err(match err {
                SendError::FrameTooLarge { size, limit } => RpcError::TooLarge { size, limit },
                SendError::Serialize(_) => RpcError::Serialize(err.to_string()),
                other => {
                    link.fail(&other.to_string());
                    RpcError::Unavailable(other.to_string())
                }
            });
        }
        Ok(guard)
    }

    /// Calls `service.method(args)`. Generated clients call this; use it
    /// directly only for services without a Rust definition.
    ///
    /// Dropping the returned future cancels the call on the server.
    pub async fn call<A: Serialize, R: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        fingerprint: u64,
        args: &A,
    ) -> Result<R, RpcError> {
        let deadline = Instant::now() + self.timeout;
        let link = tokio::time::timeout_at(deadline, self.link())
            .await
            .map_err(|_| RpcError::DeadlineExceeded)??;
        let _slot = tokio::time::timeout_at(deadline, link.slots.clone().acquire_owned())
            .await
            .map_err(|_| RpcError::Overloaded)?
            .map_err(|_| RpcError::Unavailable("client closed".into()))?;
        let (waiter, reply) = oneshot::channel();
        let mut guard = self
            .start(
                service,
                method,
                fingerprint,
                args,
                deadline,
                Waiter::Unary(waiter),
            )
            .await?;
        match tokio::time::timeout_at(deadline, reply).await {
            Ok(Ok(outcome)) => {
                guard.answered = true;
                let bytes = outcome?;
                crate::__private::decode(&bytes).map_err(|err| RpcError::Decode(err.to_string()))
            }
            Ok(Err(_)) => {
                guard.answered = true;
                Err(RpcError::Unavailable("connection closed".into()))
            }
            // The guard tells the server to stop.
            Err(_) => Err(RpcError::DeadlineExceeded),
        }
    }

    /// Sends `service.method(args)` one way: no reply comes, and this returns
    /// once the request is queued on the connection (waiting only while the
    /// connection's send buffer is full: that is the flow control). The
    /// server runs one-way requests in the order they arrive, before it
    /// reads anything after them, so requests sent one after another over
    /// one connection take effect in that order, and a later ordinary call
    /// is answered only after they have run. Generated clients call this
    /// for `#[oneway]` methods.
    ///
    /// Returns the connection's epoch (see [`Client::epoch`]): requests
    /// queued on a connection that then dies are lost without a word, so a
    /// caller that must know compares it with the epoch after a later call.
    pub async fn notify<A: Serialize>(
        &self,
        service: &str,
        method: &str,
        fingerprint: u64,
        args: &A,
    ) -> Result<u64, RpcError> {
        let deadline = Instant::now() + self.timeout;
        let link = tokio::time::timeout_at(deadline, self.link())
            .await
            .map_err(|_| RpcError::DeadlineExceeded)??;
        let header = RequestHeader {
            service,
            method,
            fingerprint,
            // Bounds the handler's run on the server.
            timeout_ms: self.timeout.as_millis() as u64,
            window: 0,
        };
        let flags = courier_transport::Flags::from_bits(crate::protocol::ONEWAY);
        match link
            .sender
            .send_message_with_flags(FrameKind::Request, flags, 0, &(header, args))
            .await
        {
            Ok(()) => Ok(link.epoch),
            Err(SendError::FrameTooLarge { size, limit }) => {
                Err(RpcError::TooLarge { size, limit })
            }
            Err(err @ SendError::Serialize(_)) => Err(RpcError::Serialize(err.to_string())),
            Err(other) => {
                link.fail(&other.to_string());
                Err(RpcError::Unavailable(other.to_string()))
            }
        }
    }

    /// The epoch of the connection in use: 1 for the first this client
    /// made, 2 for the next, and so on; 0 before the first.
    pub async fn epoch(&self) -> u64 {
        let current = self.inner.link.lock().await;
        current
            .as_ref()
            .filter(|l| !l.closed.load(Ordering::Acquire))
            .map_or(0, |l| l.epoch)
    }

    /// Calls a streaming method: the items arrive through the returned
    /// [`ItemStream`], within this client's deadline for the whole stream.
    pub async fn call_stream<A: Serialize, T: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        fingerprint: u64,
        args: &A,
    ) -> Result<ItemStream<T>, RpcError> {
        let deadline = Instant::now() + self.timeout;
        // Room for the whole window, plus the end or an error.
        let (items, receiver) = mpsc::channel(WINDOW as usize + 2);
        let guard = self
            .start(
                service,
                method,
                fingerprint,
                args,
                deadline,
                Waiter::Stream(items),
            )
            .await?;
        Ok(ItemStream {
            items: receiver,
            link: guard.link.clone(),
            guard,
            deadline,
            consumed: 0,
            finished: false,
            _type: std::marker::PhantomData,
        })
    }
}
