//! The client: one multiplexed connection, calls written from the caller's
//! task (or, while others are in flight, queued for the connection's
//! flusher to write together), replies routed by a reader task. Finding the
//! connection and registering a call take one lock, never held across an
//! `.await`; only a caller that finds no live connection waits, for the one
//! attempt to make it that every such caller shares.
//!
//! A client may know several addresses of equivalent servers (the nodes of
//! a cluster): an attempt to connect goes round them, starting past the
//! node whose connection died last, until one answers (see
//! [`Client::lazy_any`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use courier_transport::{
    connect, Address, Frame, FrameKind, FrameReceiver, FrameSender, Heartbeat, RecvError,
    SendError, TransportConfig,
};
use courier_wire::shared::Sharing;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::inbound::{ClientStream, ItemSender};
use crate::protocol::{
    limit_from_wire, HelloExt, RequestExt, RequestHeader, WelcomeExt, EXTENDED,
    FEATURE_REQUEST_EXT, FEATURE_TRACE,
};
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

/// Client settings: `ClientConfig::default()` and its `with_*` builders
/// (or field assignment); `#[non_exhaustive]`, so no struct literal.
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

/// Builders in the style of [`crate::ServerConfig`]'s, one per field (and
/// one for the heartbeat inside `transport`); each returns the same
/// settings with that one changed, so a config reads as a chain from
/// `ClientConfig::default()`. The fields stay public: assigning them works
/// as well.
///
/// ```
/// use std::time::Duration;
/// use courier_rpc::{ClientConfig, Secret};
///
/// let config = ClientConfig::default()
///     .with_timeout(Duration::from_secs(30))
///     .with_token(Secret::new("s3cret"))
///     .with_heartbeat(None);
/// assert_eq!(config.timeout, Duration::from_secs(30));
/// assert!(config.transport.heartbeat.is_none());
/// ```
impl ClientConfig {
    /// The same settings over `transport` (limits, TLS, heartbeats). It
    /// replaces the whole transport config, heartbeat included: a
    /// `TransportConfig::default()` has none, so add
    /// [`DEFAULT_HEARTBEAT`] (or use [`with_heartbeat`](Self::with_heartbeat)
    /// after this) to keep them.
    pub fn with_transport(mut self, transport: TransportConfig) -> ClientConfig {
        self.transport = transport;
        self
    }

    /// The same settings with another heartbeat (`None`: none), leaving
    /// the rest of `transport` as it is.
    pub fn with_heartbeat(mut self, heartbeat: Option<Heartbeat>) -> ClientConfig {
        self.transport.heartbeat = heartbeat;
        self
    }

    /// The same settings with another deadline for each call (which
    /// [`Client::with_timeout`] can still change per client).
    pub fn with_timeout(mut self, timeout: Duration) -> ClientConfig {
        self.timeout = timeout;
        self
    }

    /// The same settings with another limit of calls in flight on the
    /// connection.
    pub fn with_max_in_flight(mut self, limit: usize) -> ClientConfig {
        self.max_in_flight = limit;
        self
    }

    /// The same settings sending `token` in the hello, for servers that
    /// authenticate.
    pub fn with_token(mut self, token: crate::Secret) -> ClientConfig {
        self.token = Some(token);
        self
    }
}

type Reply = Result<Bytes, RpcError>;

/// A unary call's outcome, handed over once the table's lock is released.
type Ready = (oneshot::Sender<Reply>, Reply);

/// Who waits for what a call brings back.
pub(crate) enum Waiter {
    Unary(oneshot::Sender<Reply>),
    /// A client-streaming call's one reply. Not counted in
    /// `max_in_flight`: like a stream, it may live long (it is bounded by
    /// the server's `max_streams` instead).
    Upload(oneshot::Sender<Reply>),
    /// Items, then `Ok(None)` at the end. The channel holds the whole
    /// window, so the server, bound by credit, can never overrun it.
    Stream(mpsc::Sender<Result<Option<Bytes>, RpcError>>),
}

impl Waiter {
    fn fail(self, err: RpcError) {
        match self {
            Waiter::Unary(waiter) | Waiter::Upload(waiter) => {
                let _ = waiter.send(Err(err));
            }
            Waiter::Stream(items) => {
                let _ = items.try_send(Err(err));
            }
        }
    }
}

/// A registered call: the connection it went out on, and who waits for it.
struct Entry {
    epoch: u64,
    waiter: Waiter,
    /// For a client-streaming call: the credit its sender spends, granted
    /// by the server; closed when the entry goes (the call ended).
    outbound: Option<Arc<Semaphore>>,
}

/// A client's calls in flight, on whichever of its connections they went
/// out, and its current connection, under one lock: a call takes it once to
/// find the connection and register itself, the reader once per batch of
/// replies. It is never held across an `.await`.
pub(crate) struct Calls {
    table: Mutex<Table>,
    /// Wakes calls waiting for room under `max_in_flight`.
    room: Notify,
    max_in_flight: usize,
}

/// Hashes call ids (consecutive numbers this client picked, not a peer's)
/// with one multiplication, which spreads them over the high bits the
/// table also uses.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Ids = std::hash::BuildHasherDefault<IdHasher>;

#[derive(Default)]
struct Table {
    /// The connection in use (or the last one, once closed).
    link: Option<Arc<Link>>,
    /// A connection being made; callers that find no live link wait for it.
    connecting: Option<Arc<Attempt>>,
    waiters: HashMap<u64, Entry, Ids>,
    /// Call ids, unique across the client's connections.
    next_id: u64,
    /// Unary calls registered (what `max_in_flight` bounds).
    unary: usize,
    /// Calls waiting for room.
    waiting_for_room: usize,
    /// Where the next attempt to connect starts: an index into the
    /// client's addresses, reduced modulo their number when used (so a
    /// dying link can say "the one after mine" without knowing how many
    /// there are).
    next_address: usize,
    /// The index of the address of the connection in use, or of the last
    /// one made; before any, the address the first attempt starts with.
    current_address: usize,
}

impl Table {
    fn live_link(&self) -> Option<&Arc<Link>> {
        self.link
            .as_ref()
            .filter(|link| !link.closed.load(Ordering::Acquire))
    }

    /// Takes the entry of call `id` if it went out on connection `epoch`,
    /// giving back its room.
    fn remove(&mut self, id: u64, epoch: u64, room: &Notify) -> Option<Waiter> {
        match self.waiters.entry(id) {
            std::collections::hash_map::Entry::Occupied(entry) if entry.get().epoch == epoch => {
                let Entry {
                    waiter, outbound, ..
                } = entry.remove();
                if let Some(outbound) = outbound {
                    // The call is over: its sender sends no more.
                    outbound.close();
                }
                if matches!(waiter, Waiter::Unary(_)) {
                    self.unary -= 1;
                    if self.waiting_for_room > 0 {
                        room.notify_one();
                    }
                }
                Some(waiter)
            }
            _ => None,
        }
    }
}

impl Calls {
    fn new(max_in_flight: usize) -> Arc<Calls> {
        Arc::new(Calls {
            table: Mutex::new(Table {
                next_id: 1,
                ..Table::default()
            }),
            room: Notify::new(),
            max_in_flight: max_in_flight.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        lock(&self.table)
    }
}

/// One attempt to connect, shared by every caller that finds no live link
/// meanwhile. The caller that started it makes the connection; the others
/// wait for its outcome. An attempt whose maker is dropped halfway is
/// abandoned: its waiters wake without an outcome, and one of them starts
/// another.
#[derive(Default)]
struct Attempt {
    failed: OnceLock<RpcError>,
    done: Notify,
}

/// Held by the caller making a connection: if its future is dropped
/// halfway, the attempt is withdrawn and its waiters woken.
struct Connecting<'a> {
    calls: &'a Calls,
    attempt: &'a Arc<Attempt>,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        let mut table = self.calls.lock();
        if table
            .connecting
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, self.attempt))
        {
            table.connecting = None;
        }
        drop(table);
        self.attempt.done.notify_waiters();
    }
}

/// One live connection. Its calls are registered in the client's [`Calls`].
pub(crate) struct Link {
    pub(crate) sender: FrameSender,
    /// What the server announced in its welcome (zero: nothing, an older
    /// server).
    peer: Peer,
    /// Which of the client's connections this is (1, 2, ...).
    epoch: u64,
    /// The index, among the client's addresses, of the server it reaches.
    address: usize,
    calls: Arc<Calls>,
    closed: AtomicBool,
    /// Asks the link's flusher to write what calls queued without writing.
    flush: Arc<Notify>,
    /// The reader and the flusher, stopped with the link.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// What a server said it supports, in its welcome.
#[derive(Clone, Copy, Debug, Default)]
struct Peer {
    features: u64,
    inbound_window: u32,
}

impl Peer {
    fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }
}

impl Link {
    fn new(
        sender: FrameSender,
        peer: Peer,
        epoch: u64,
        address: usize,
        calls: Arc<Calls>,
    ) -> Arc<Link> {
        Arc::new(Link {
            sender,
            peer,
            epoch,
            address,
            calls,
            closed: AtomicBool::new(false),
            flush: Arc::new(Notify::new()),
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// A link over `sender` with no reader task, for unit tests that feed
    /// a call's channel themselves.
    #[cfg(test)]
    pub(crate) fn for_test(sender: FrameSender) -> Arc<Link> {
        Link::new(sender, Peer::default(), 1, 0, Calls::new(1))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Link {
    /// Routes one frame from the server to whoever waits for it. Unary
    /// replies are handed over after the lock is released (`ready`).
    fn complete(&self, table: &mut Table, frame: Frame, ready: &mut Vec<Ready>) {
        let room = &self.calls.room;
        match frame.kind {
            FrameKind::Response => {
                // A reply to a call that was cancelled or timed out finds nobody.
                match table.remove(frame.id, self.epoch, room) {
                    Some(Waiter::Unary(waiter) | Waiter::Upload(waiter)) => {
                        ready.push((waiter, Ok(frame.payload)))
                    }
                    Some(stream @ Waiter::Stream(_)) => {
                        stream.fail(RpcError::Decode("a unary reply to a stream".into()));
                    }
                    None => {}
                }
            }
            FrameKind::StreamItem => {
                let overrun = match table.waiters.get(&frame.id) {
                    Some(Entry {
                        epoch,
                        waiter: Waiter::Stream(items),
                        ..
                    }) if *epoch == self.epoch => items.try_send(Ok(Some(frame.payload))).is_err(),
                    _ => false,
                };
                if overrun {
                    // More items than credit: the server broke the protocol.
                    if let Some(waiter) = table.remove(frame.id, self.epoch, room) {
                        waiter.fail(RpcError::Decode(
                            "server sent more items than it had credit for".into(),
                        ));
                    }
                }
            }
            FrameKind::StreamEnd => match table.remove(frame.id, self.epoch, room) {
                Some(Waiter::Stream(items)) => {
                    let _ = items.try_send(Ok(None));
                }
                Some(unary @ (Waiter::Unary(_) | Waiter::Upload(_))) => {
                    unary.fail(RpcError::Decode("a stream's end for a unary call".into()));
                }
                None => {}
            },
            FrameKind::Error => {
                let err = match crate::__private::decode::<RpcFault>(&frame.payload) {
                    Ok(fault) => fault.into(),
                    Err(err) => RpcError::Decode(format!("undecodable error report: {err}")),
                };
                match table.remove(frame.id, self.epoch, room) {
                    Some(Waiter::Unary(waiter) | Waiter::Upload(waiter)) => {
                        ready.push((waiter, Err(err)))
                    }
                    Some(waiter) => waiter.fail(err),
                    None => {}
                }
            }
            // Credit for a client-streaming call's items.
            FrameKind::Credit => {
                let granted = frame
                    .payload
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_le_bytes);
                if let (Some(granted), Some(entry)) = (granted, table.waiters.get(&frame.id)) {
                    if let (true, Some(credit)) = (entry.epoch == self.epoch, &entry.outbound) {
                        // Bounded by half of what a semaphore can count: a
                        // lying server only overruns its own window (and is
                        // refused there), and the sender's own give-backs
                        // (`add_permits(1)` when a send fails, outside
                        // this lock) keep the other half to land in.
                        credit.add_permits((granted as usize).min(
                            (Semaphore::MAX_PERMITS / 2).saturating_sub(credit.available_permits()),
                        ));
                    }
                }
            }
            // The handler stopped reading this call's items: its sender
            // sends no more (the call itself goes on to its answer).
            FrameKind::Cancel => {
                if let Some(Entry {
                    epoch,
                    outbound: Some(credit),
                    ..
                }) = table.waiters.get(&frame.id)
                {
                    if *epoch == self.epoch {
                        credit.close();
                    }
                }
            }
            _ => {}
        }
    }

    /// Fails every call waiting on this connection: it is gone.
    fn fail(&self, reason: &str) {
        let was_open = !self.closed.swap(true, Ordering::AcqRel);
        let mut failed = Vec::new();
        {
            let mut table = self.calls.lock();
            // The client's newest connection died: the next attempt starts
            // with the address after this one, so a node that just went
            // down is tried last, not first. Only the first report counts
            // (the reader and a failed send may both report one death), and
            // never one from an older connection, which would undo where a
            // later attempt got to.
            if was_open && table.link.as_ref().is_none_or(|l| l.epoch <= self.epoch) {
                table.next_address = self.address + 1;
            }
            let ids: Vec<u64> = table
                .waiters
                .iter()
                .filter(|(_, entry)| entry.epoch == self.epoch)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                failed.extend(table.remove(id, self.epoch, &self.calls.room));
            }
        }
        for waiter in failed {
            waiter.fail(RpcError::Unavailable(reason.to_string()));
        }
    }

    /// Has the flusher write what was queued with `feed`, once the tasks
    /// running now have queued theirs: many calls, one write.
    fn flush_soon(&self) {
        self.flush.notify_one();
    }
}

async fn read_replies(link: Weak<Link>, mut receiver: FrameReceiver) {
    let mut ready = Vec::new();
    // What `try_recv` returned that is not a frame, for the next turn.
    let mut held: Option<Result<Option<Frame>, RecvError>> = None;
    let reason = loop {
        let next = match held.take() {
            Some(next) => next,
            None => receiver.recv().await,
        };
        match next {
            Ok(Some(frame)) => {
                let Some(link) = link.upgrade() else { return };
                {
                    // Everything the last read brought in, under one lock.
                    let mut table = link.calls.lock();
                    link.complete(&mut table, frame, &mut ready);
                    loop {
                        match receiver.try_recv() {
                            Some(Ok(Some(frame))) => link.complete(&mut table, frame, &mut ready),
                            None => break,
                            Some(other) => {
                                held = Some(other);
                                break;
                            }
                        }
                    }
                }
                for (waiter, reply) in ready.drain(..) {
                    let _ = waiter.send(reply);
                }
            }
            Ok(None) => break "the server closed the connection".to_string(),
            Err(err) => break err.to_string(),
        }
    };
    if let Some(link) = link.upgrade() {
        link.fail(&reason);
    }
}

/// Writes what calls queued on the link whenever one of them asks.
async fn flush_when_asked(sender: FrameSender, asked: Arc<Notify>) {
    loop {
        asked.notified().await;
        if sender.flush().await.is_err() {
            // The link failed; its reader fails the calls.
            return;
        }
    }
}

/// Says hello with the configured token and waits for the server's answer.
async fn hello(
    sender: &FrameSender,
    receiver: &mut FrameReceiver,
    config: &ClientConfig,
) -> Result<Peer, RpcError> {
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
            match WelcomeExt::decode(rest) {
                Some(ext) => {
                    sender.limit_frame_size(limit_from_wire(ext.max_frame_size));
                    Ok(Peer {
                        features: ext.features,
                        inbound_window: ext.inbound_window,
                    })
                }
                None => Ok(Peer::default()),
            }
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
    /// Equivalent servers, at least one and at most [`Address::MAX_LIST`],
    /// each once; shared with the clients [`Client::separate`] makes.
    addresses: Arc<[Address]>,
    config: ClientConfig,
    calls: Arc<Calls>,
    /// Connections made so far: the epoch of the next one.
    links_made: AtomicU64,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // The table holds the link and the link the table: let go of the
        // link, so that it closes once no call holds it.
        let link = self.calls.lock().link.take();
        drop(link);
    }
}

/// An RPC client for one server, or for one of several equivalent servers
/// ([`Client::lazy_any`]). Cheap to clone; clones share the connection. It
/// connects on first use, and again on the next call after the connection
/// dies (to the next address, when it knows several). Generated clients
/// (`<Service>Client`) wrap it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
    /// Each call's deadline, from when it starts; `None`: no deadline
    /// ([`Client::without_deadline`]).
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.address())
            .field("addresses", &self.addresses())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Removes the call's entry when the call ends, however it ends, and tells
/// the server to stop working on it unless it already answered.
pub(crate) struct CallGuard {
    pub(crate) link: Arc<Link>,
    pub(crate) id: u64,
    /// Set once the call's entry is gone (its answer came, or it was taken
    /// out): nothing is left to remove and nothing to cancel.
    pub(crate) answered: bool,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let link = &self.link;
        let outstanding = link
            .calls
            .lock()
            .remove(self.id, link.epoch, &link.calls.room)
            .is_some();
        if !outstanding || link.closed.load(Ordering::Acquire) {
            return;
        }
        // Dropped mid-call (cancelled) or timed out: stop the server's work.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (sender, id) = (link.sender.clone(), self.id);
            runtime.spawn(async move {
                let _ = sender
                    .send(Frame::new(FrameKind::Cancel, id, Bytes::new()))
                    .await;
            });
        }
    }
}

/// What a failed request means for the call (and the link).
fn send_error(link: &Link, err: SendError) -> RpcError {
    match err {
        SendError::FrameTooLarge { size, limit } => RpcError::TooLarge { size, limit },
        SendError::Serialize(_) => RpcError::Serialize(err.to_string()),
        other => {
            link.fail(&other.to_string());
            RpcError::Unavailable(other.to_string())
        }
    }
}

/// Where [`Client::register`] got to.
enum Registered {
    /// The call is in the table, on this link, with this id; `batch`: other
    /// calls are in flight, so its request may wait for theirs to share a
    /// write.
    Yes {
        link: Arc<Link>,
        id: u64,
        batch: bool,
        /// A client-streaming call's credit.
        outbound: Option<Arc<Semaphore>>,
    },
    /// No live connection.
    NoLink,
    /// `max_in_flight` calls are in flight already.
    Full,
}

/// How an attempt to connect ended.
enum Dialled {
    /// Connected.
    Made(Arc<Link>),
    /// Every address failed (the error is the last one's), or one refused
    /// what every one would: the attempt's waiters get the error too.
    Failed(RpcError),
    /// The deadline of the caller making the attempt passed before every
    /// address was tried: the error is of the last one tried, for that
    /// caller only; the attempt is withdrawn as if the caller had gone.
    GaveUp(RpcError),
}

/// Counts a call among those waiting for room while it waits.
struct WaitingForRoom<'a>(&'a Calls);

impl Drop for WaitingForRoom<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting_for_room -= 1;
    }
}

/// Whether a failed attempt to connect to one address should go on to the
/// next. Credentials refused by one node are refused by all of them (the
/// nodes of a cluster share their configuration): trying the others would
/// only delay the error and multiply failed logins in their logs and rate
/// limits, so the attempt fails there. Everything else is about that node:
/// down, unreachable, too slow to answer the hello, not speaking Courier,
/// or full ([`RpcError::TooManyConnections`] counts one node's
/// connections, so another may well have room).
fn tries_the_next(err: &RpcError) -> bool {
    !matches!(
        err,
        RpcError::Unauthenticated(_) | RpcError::PermissionDenied(_)
    )
}

impl Client {
    /// Connects now, so that a wrong address fails here.
    pub async fn connect(address: &Address, config: ClientConfig) -> Result<Client, RpcError> {
        let client = Client::lazy(address, config);
        client.link(None).await?;
        Ok(client)
    }

    /// A client that connects on its first call.
    pub fn lazy(address: &Address, config: ClientConfig) -> Client {
        Client::over(Arc::from([address.clone()]), config, 0)
    }

    /// Connects now to the first of `addresses` that answers, trying them
    /// in order, so that a list with no live server fails here (with the
    /// error of the last address tried). Otherwise as [`Client::lazy_any`].
    pub async fn connect_any(
        addresses: &[Address],
        config: ClientConfig,
    ) -> Result<Client, RpcError> {
        let client = Client::lazy_any(addresses, config)?;
        client.link(None).await?;
        Ok(client)
    }

    /// A client for several equivalent servers (the nodes of a cluster),
    /// that connects on its first call, to the first of `addresses` that
    /// answers. Addresses given twice are kept once, where they first
    /// appear. Fails with [`RpcError::Unavailable`] (not worth retrying:
    /// the list will not change) if `addresses` is empty or holds more than
    /// [`Address::MAX_LIST`] distinct addresses.
    ///
    /// **Which server.** One connection at a time, as with one address. An
    /// attempt to connect tries the addresses in turn, going round the list
    /// at most once: when connecting to one fails (refused, unreachable,
    /// the transport's `connect_timeout` or the hello's deadline passed,
    /// not a Courier server, [`RpcError::TooManyConnections`]) it goes on
    /// at once to the next, and when every one has failed the call fails
    /// with the last one's error. There is no delay between addresses and
    /// none between attempts: as with one address, each call that finds no
    /// live connection makes (or shares) one attempt, and backing off after
    /// repeated failures is the caller's business (the remote faces of
    /// pub/sub and queues do it when restoring subscriptions and
    /// consumers). The whole attempt runs within the deadline of the call
    /// that made it.
    ///
    /// After a live connection dies, the next attempt starts with the
    /// address after the one that died, so a node that just went down is
    /// tried last; an address an abandoned attempt was waiting on (its call
    /// reached its deadline or was dropped) counts as failed too, so a node
    /// that accepts connections and never answers cannot hold every call:
    /// the next attempt starts past it. A node that swallows connection
    /// attempts without refusing them (its host vanished) costs each attempt
    /// up to the transport's `connect_timeout`; with several addresses, keep
    /// it below the call deadline ([`ClientConfig::timeout`]) so an attempt
    /// can reach the next. [`Client::address`] tells which server is in use.
    ///
    /// **Credentials.** A refused token ([`RpcError::Unauthenticated`],
    /// [`RpcError::PermissionDenied`]) fails the call at once without
    /// trying the other addresses: the nodes of one cluster share their
    /// credentials, so the others would refuse it too, and trying them
    /// would only delay the error and multiply failed logins. A full node
    /// ([`RpcError::TooManyConnections`]) is another matter: its limit
    /// counts its own connections, so the next address is tried.
    ///
    /// **Calls in flight are never resent.** When the connection dies,
    /// every call in flight on it fails with [`RpcError::Unavailable`]
    /// ([`RpcError::Cancelled`] if the server shut down; a stream ends with
    /// the same error), exactly as with one address: the server may have
    /// run it, and only the caller knows whether running it twice is safe.
    /// One-way requests queued on it are lost without a word (see
    /// [`Client::notify`]). Only calls made afterwards go to the next
    /// server; what lived on the dead connection (subscriptions, consumers)
    /// is restored by whoever made it, as after any reconnect.
    pub fn lazy_any(addresses: &[Address], config: ClientConfig) -> Result<Client, RpcError> {
        let mut distinct: Vec<Address> = Vec::new();
        for address in addresses {
            // A linear search: the list never holds more than MAX_LIST.
            if distinct.contains(address) {
                continue;
            }
            if distinct.len() == Address::MAX_LIST {
                return Err(RpcError::Unavailable(format!(
                    "a client takes at most {} server addresses",
                    Address::MAX_LIST
                )));
            }
            distinct.push(address.clone());
        }
        if distinct.is_empty() {
            return Err(RpcError::Unavailable("no server address given".into()));
        }
        Ok(Client::over(distinct.into(), config, 0))
    }

    /// A client over `addresses` (not empty) whose first attempt starts
    /// with the one at `start`.
    fn over(addresses: Arc<[Address]>, config: ClientConfig, start: usize) -> Client {
        let timeout = Some(config.timeout);
        let calls = Calls::new(config.max_in_flight);
        {
            let mut table = calls.lock();
            table.next_address = start;
            table.current_address = start;
        }
        Client {
            inner: Arc::new(ClientInner {
                addresses,
                config,
                calls,
                links_made: AtomicU64::new(0),
            }),
            timeout,
        }
    }

    /// A client to the same server, with the same settings, but a
    /// connection of its own (made on its first call): for traffic that
    /// must not share this one's ordering or flow control, such as one-way
    /// calls that may wait on something this connection carries.
    ///
    /// It keeps the list of addresses, and its first attempt starts with
    /// the one this client is using, so both reach the same node while it
    /// lives; afterwards each fails over on its own.
    pub fn separate(&self) -> Client {
        let start = self.inner.calls.lock().current_address;
        let mut separate = Client::over(
            self.inner.addresses.clone(),
            self.inner.config.clone(),
            start,
        );
        separate.timeout = self.timeout;
        separate
    }

    /// The address of the server in use: that of the live connection, or,
    /// while there is none, of the last one made (before the first, the
    /// address the first attempt starts with). With several addresses it
    /// changes when the client fails over.
    pub fn address(&self) -> Address {
        let current = self.inner.calls.lock().current_address;
        self.address_at(current).clone()
    }

    /// Every address this client may connect to, in the order it tries
    /// them (each once).
    pub fn addresses(&self) -> &[Address] {
        &self.inner.addresses
    }

    /// The address at `index`, reduced modulo their number.
    fn address_at(&self, index: usize) -> &Address {
        let addresses = &self.inner.addresses;
        // Never empty (the constructors see to it), so never a division by
        // zero and never out of range.
        &addresses[index % addresses.len()]
    }

    /// The same client (same connection) with another deadline per call.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            inner: self.inner.clone(),
            timeout: Some(timeout),
        }
    }

    /// The same client (same connection) making calls without a deadline:
    /// for streams meant to live as long as the connection (subscriptions,
    /// consumers, watches). Such a call ends when either side ends it
    /// (drops its end, or the handler returns), when the server shuts
    /// down, or when the connection dies (heartbeats find a dead one); on
    /// the server its [`crate::CallContext::deadline`] is `None`.
    ///
    /// No deadline goes on the wire, only a flag saying there is none. A
    /// server from before the flag gets the longest timeout there used to
    /// be (ten years) instead, as it always did from such callers.
    /// Connecting (when there is no live connection) is bounded by the
    /// transport's connect timeout and the hello timeout for each address,
    /// not by [`ClientConfig::timeout`]; a call made while the connection
    /// is at `max_in_flight` waits for room as long as it takes. One-way
    /// calls keep the configured deadline (see [`Client::notify`]).
    pub fn without_deadline(&self) -> Client {
        Client {
            inner: self.inner.clone(),
            timeout: None,
        }
    }

    /// The deadline of each call, from when it starts; `None` for a client
    /// made by [`without_deadline`](Self::without_deadline).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// When a call starting at `now` must end; `None`: never (no
    /// deadline, or one too far to represent).
    fn deadline_from(&self, now: Instant) -> Option<Instant> {
        self.timeout.and_then(|timeout| now.checked_add(timeout))
    }

    /// The largest request frame this client sends on its current
    /// connection: its own `max_frame_size`, or the server's if that is
    /// lower (servers announce theirs in the welcome). `None` before the
    /// first connection.
    pub async fn max_frame_size(&self) -> Option<usize> {
        let table = self.inner.calls.lock();
        table.link.as_ref().map(|link| link.sender.max_frame_size())
    }

    /// Returns once this client has a live connection, making one if it
    /// has none (within its timeout). Nothing is sent: a caller that must
    /// not send a call twice (a write that is not idempotent) can tell a
    /// server it never reached — this fails — from a call that may have
    /// run — the call itself fails after this succeeded.
    pub async fn ready(&self) -> Result<(), RpcError> {
        // Bounded even for a client without a deadline: by the config's.
        let deadline = Instant::now() + self.timeout.unwrap_or(self.inner.config.timeout);
        match tokio::time::timeout_at(deadline, self.connected(Some(deadline))).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::DeadlineExceeded),
        }
    }

    /// The live connection, connecting if there is none (within the
    /// caller's `deadline`, if it has one; see [`Client::connected`]).
    async fn link(&self, deadline: Option<Instant>) -> Result<Arc<Link>, RpcError> {
        loop {
            if let Some(link) = self.inner.calls.lock().live_link() {
                return Ok(link.clone());
            }
            self.connected(deadline).await?;
        }
    }

    /// Returns once there is a live connection, making one if nobody else
    /// is; every caller waiting on a failed attempt gets its error.
    ///
    /// `deadline` is the caller's, which the caller also enforces by
    /// dropping this future; an attempt this caller makes does not start on
    /// another address once it has passed (see [`Dialled::GaveUp`]).
    async fn connected(&self, deadline: Option<Instant>) -> Result<(), RpcError> {
        let calls = &*self.inner.calls;
        loop {
            let (attempt, mine) = {
                let mut table = calls.lock();
                if table.live_link().is_some() {
                    return Ok(());
                }
                match &table.connecting {
                    Some(attempt) => (attempt.clone(), false),
                    None => {
                        let attempt = Arc::new(Attempt::default());
                        table.connecting = Some(attempt.clone());
                        (attempt, true)
                    }
                }
            };
            if mine {
                let connecting = Connecting {
                    calls,
                    attempt: &attempt,
                };
                let made = self.dial(deadline).await;
                let mut table = calls.lock();
                table.connecting = None;
                match made {
                    Dialled::Made(link) => {
                        table.link = Some(link);
                        drop(table);
                        drop(connecting);
                        return Ok(());
                    }
                    Dialled::GaveUp(err) => {
                        // As if this caller's future had been dropped: the
                        // attempt is withdrawn, its waiters (whose
                        // deadlines may be later) wake without an outcome,
                        // and one of them makes the next attempt.
                        drop(table);
                        drop(connecting);
                        return Err(err);
                    }
                    Dialled::Failed(err) => {
                        drop(table);
                        let _ = attempt.failed.set(err.clone());
                        drop(connecting);
                        return Err(err);
                    }
                }
            }
            let done = attempt.done.notified();
            tokio::pin!(done);
            // Registered before the outcome is read, so no wake-up is missed.
            done.as_mut().enable();
            if let Some(err) = attempt.failed.get() {
                return Err(err.clone());
            }
            let pending = calls
                .lock()
                .connecting
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, &attempt));
            if pending {
                done.await;
                if let Some(err) = attempt.failed.get() {
                    return Err(err.clone());
                }
            }
            // Made, or abandoned by its maker: look again.
        }
    }

    /// Makes a connection to the first address that answers, going round
    /// the list at most once from where the last attempt left off, and
    /// starting on no other address once `deadline` has passed.
    async fn dial(&self, deadline: Option<Instant>) -> Dialled {
        let count = self.inner.addresses.len();
        let start = self.inner.calls.lock().next_address % count;
        let mut last = None;
        for step in 0..count {
            let index = (start + step) % count;
            // Presumed down until it answers: if this attempt is abandoned
            // while waiting on it (the call's deadline passed, or the call
            // was dropped), the next attempt starts past it.
            self.inner.calls.lock().next_address = index + 1;
            match self.dial_one(index).await {
                Ok(link) => {
                    if step > 0 {
                        let address = self.address_at(index);
                        tracing::info!(%address, failed = step, "connected to another server");
                    }
                    return Dialled::Made(link);
                }
                Err(err) if tries_the_next(&err) => {
                    let address = self.address_at(index);
                    tracing::debug!(%address, %err, "cannot connect; trying the next address");
                    // The caller's deadline passed with this address (the
                    // hello's own timeout fires with it, and timers share a
                    // tick): starting on the next one would only see that
                    // attempt dropped at once and count it as failed.
                    if step + 1 < count && deadline.is_some_and(|d| Instant::now() >= d) {
                        return Dialled::GaveUp(err);
                    }
                    last = Some(err);
                }
                Err(err) => return Dialled::Failed(err),
            }
        }
        // `count` is at least one, so `last` is set; the fallback is never used.
        Dialled::Failed(last.unwrap_or_else(|| RpcError::Unavailable("no server address".into())))
    }

    /// Makes a connection to the address at `index`: transport, hello,
    /// reader and flusher.
    async fn dial_one(&self, index: usize) -> Result<Arc<Link>, RpcError> {
        let address = self.address_at(index);
        let connection = connect(address, &self.inner.config.transport)
            .await
            .map_err(|err| RpcError::Unavailable(err.to_string()))?;
        let (sender, mut receiver) = connection.split();
        let peer = hello(&sender, &mut receiver, &self.inner.config).await?;
        let epoch = self.inner.links_made.fetch_add(1, Ordering::Relaxed) + 1;
        {
            // Before the reader starts: if the connection dies at once, its
            // reader moves `next_address` past it, and nothing undoes that.
            let mut table = self.inner.calls.lock();
            table.next_address = index;
            table.current_address = index;
        }
        let link = Link::new(sender, peer, epoch, index, self.inner.calls.clone());
        let reader = tokio::spawn(read_replies(Arc::downgrade(&link), receiver));
        let flusher = tokio::spawn(flush_when_asked(link.sender.clone(), link.flush.clone()));
        lock(&link.tasks).extend([reader, flusher]);
        Ok(link)
    }

    /// Finds the live link and registers the call on it, under one lock.
    fn register(&self, waiter: &mut Option<Waiter>, outbound: bool) -> Registered {
        let calls = &*self.inner.calls;
        let mut table = calls.lock();
        let Some(link) = table.live_link().cloned() else {
            return Registered::NoLink;
        };
        let unary = matches!(waiter, Some(Waiter::Unary(_)));
        if unary && table.unary >= calls.max_in_flight {
            return Registered::Full;
        }
        let batch = table.unary > 0;
        let id = table.next_id;
        table.next_id += 1;
        if unary {
            table.unary += 1;
        }
        let waiter = waiter.take().expect("registered once");
        // The server's whole window, to begin with.
        // (Bounded by what a semaphore can count: the window is the peer's.)
        let window = (link.peer.inbound_window as usize).min(Semaphore::MAX_PERMITS);
        let outbound = outbound.then(|| Arc::new(Semaphore::new(window)));
        table.waiters.insert(
            id,
            Entry {
                epoch: link.epoch,
                waiter,
                outbound: outbound.clone(),
            },
        );
        Registered::Yes {
            link,
            id,
            batch,
            outbound,
        }
    }

    /// Waits until a unary call may be registered under `max_in_flight`
    /// (or may look again), or `deadline` passes.
    async fn room(&self, deadline: Option<Instant>) -> Result<(), RpcError> {
        let calls = &*self.inner.calls;
        let room = calls.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        {
            let mut table = calls.lock();
            if table.unary < calls.max_in_flight {
                return Ok(());
            }
            table.waiting_for_room += 1;
        }
        let _waiting = WaitingForRoom(calls);
        within(deadline, room)
            .await
            .map_err(|_| RpcError::Overloaded)
    }

    /// Registers a call and sends its request; the guard cancels it if it
    /// is dropped unanswered. For a client-streaming call (`outbound`), also
    /// the credit its sender spends.
    #[allow(clippy::too_many_arguments)]
    async fn start<A: Serialize>(
        &self,
        service: &str,
        method: &str,
        fingerprint: u64,
        args: &A,
        (now, deadline): (Instant, Option<Instant>),
        waiter: Waiter,
        outbound: bool,
    ) -> Result<(CallGuard, Option<Arc<Semaphore>>), RpcError> {
        let window = match waiter {
            Waiter::Stream(_) => WINDOW,
            Waiter::Unary(_) | Waiter::Upload(_) => 0,
        };
        let mut waiter = Some(waiter);
        // When the request goes out: `now`, unless it had to wait.
        let mut sent_at = now;
        let (link, id, batch, credit) = loop {
            match self.register(&mut waiter, outbound) {
                Registered::Yes {
                    link,
                    id,
                    batch,
                    outbound,
                } => break (link, id, batch, outbound),
                Registered::NoLink => within(deadline, self.connected(deadline)).await??,
                Registered::Full => self.room(deadline).await?,
            }
            sent_at = Instant::now();
        };
        let mut guard = CallGuard {
            link,
            id,
            answered: false,
        };
        let link = &guard.link;
        if outbound && (link.peer.inbound_window == 0 || !link.peer.has(FEATURE_REQUEST_EXT)) {
            drop(link.calls.lock().remove(id, link.epoch, &link.calls.room));
            guard.answered = true;
            return Err(RpcError::NotSupported(format!(
                "the server does not take client streams (calling {service}.{method}): \
                 it is older than client streaming, or has it turned off"
            )));
        }
        let traceparent = trace_for(&link.peer);
        let (header, ext) = request_header(
            &link.peer,
            (service, method, fingerprint),
            deadline.map(|d| d.saturating_duration_since(sent_at)),
            window,
            RequestExt {
                inbound: outbound,
                no_deadline: deadline.is_none(),
                traceparent: traceparent.as_deref(),
            },
        );
        let flags = courier_transport::Flags::from_bits(if ext.is_some() { EXTENDED } else { 0 });
        let request = match &ext {
            Some(ext) => crate::__private::encode(&(header, ext.as_slice(), args)),
            None => crate::__private::encode(&(header, args)),
        };
        let sent = match request {
            Ok(request) => {
                let frame = Frame::new(FrameKind::Request, id, request).with_flags(flags);
                if batch {
                    // Other calls are in flight: queue the request without
                    // writing it, and let the flusher write it with
                    // whatever the tasks running now queue too.
                    let fed = link.sender.feed(frame).await;
                    if fed.is_ok() {
                        link.flush_soon();
                    }
                    fed.map_err(|err| send_error(link, err))
                } else {
                    link.sender
                        .send(frame)
                        .await
                        .map_err(|err| send_error(link, err))
                }
            }
            Err(err) => Err(RpcError::Serialize(format!(
                "message could not be serialized: payload could not be serialized: {err}"
            ))),
        };
        if let Err(err) = sent {
            drop(link.calls.lock().remove(id, link.epoch, &link.calls.room));
            guard.answered = true;
            return Err(err);
        }
        Ok((guard, credit))
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
        let now = Instant::now();
        let deadline = self.deadline_from(now);
        let (waiter, reply) = oneshot::channel();
        let (mut guard, _) = self
            .start(
                service,
                method,
                fingerprint,
                args,
                (now, deadline),
                Waiter::Unary(waiter),
                false,
            )
            .await?;
        match within(deadline, reply).await {
            Ok(Ok(outcome)) => {
                guard.answered = true;
                let bytes = outcome?;
                crate::__private::decode_shared(&bytes, Sharing::Always)
                    .map_err(|err| RpcError::Decode(err.to_string()))
            }
            Ok(Err(_)) => {
                guard.answered = true;
                Err(RpcError::Unavailable("connection closed".into()))
            }
            // The guard tells the server to stop.
            Err(err) => Err(err),
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
        // A one-way call always has a deadline, even from a client made
        // `without_deadline`: the server runs it inline, before the
        // connection's next frame, and nobody could cancel it, so one that
        // never returned would stop the connection for good.
        let bound = self.timeout.unwrap_or(self.inner.config.timeout);
        let deadline = Some(Instant::now() + bound);
        let link = within(deadline, self.link(deadline)).await??;
        let traceparent = trace_for(&link.peer);
        let (header, ext) = request_header(
            &link.peer,
            (service, method, fingerprint),
            // Bounds the handler's run on the server.
            Some(bound),
            0,
            RequestExt {
                inbound: false,
                no_deadline: false,
                traceparent: traceparent.as_deref(),
            },
        );
        let mut flags = crate::protocol::ONEWAY;
        let sent = match &ext {
            Some(ext) => {
                flags |= EXTENDED;
                let flags = courier_transport::Flags::from_bits(flags);
                link.sender
                    .send_message_with_flags(
                        FrameKind::Request,
                        flags,
                        0,
                        &(header, ext.as_slice(), args),
                    )
                    .await
            }
            None => {
                let flags = courier_transport::Flags::from_bits(flags);
                link.sender
                    .send_message_with_flags(FrameKind::Request, flags, 0, &(header, args))
                    .await
            }
        };
        sent.map(|()| link.epoch)
            .map_err(|err| send_error(&link, err))
    }

    /// The epoch of the connection in use: 1 for the first this client
    /// made, 2 for the next, and so on; 0 before the first.
    pub async fn epoch(&self) -> u64 {
        self.inner.calls.lock().live_link().map_or(0, |l| l.epoch)
    }

    /// Calls a streaming method: the items arrive through the returned
    /// [`ItemStream`], within this client's deadline for the whole stream
    /// (none for a client made by [`without_deadline`](Self::without_deadline)).
    pub async fn call_stream<A: Serialize, T: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        fingerprint: u64,
        args: &A,
    ) -> Result<ItemStream<T>, RpcError> {
        let now = Instant::now();
        let deadline = self.deadline_from(now);
        // Room for the whole window, plus the end or an error.
        let (items, receiver) = mpsc::channel(WINDOW as usize + 2);
        let (guard, _) = self
            .start(
                service,
                method,
                fingerprint,
                args,
                (now, deadline),
                Waiter::Stream(items),
                false,
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

    /// Calls a client-streaming method: send its items through the
    /// returned [`ClientStream`], then `finish` it for the one reply, all
    /// within this client's deadline. Generated clients call this for a
    /// method taking an [`Incoming<T>`](crate::Incoming).
    ///
    /// Fails with [`RpcError::NotSupported`], before anything is sent, if
    /// the server does not take client streams (it is older, or has
    /// [`crate::ServerConfig::inbound_window`] at 0).
    pub async fn call_client_stream<A: Serialize, In: Serialize, R: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        fingerprint: u64,
        args: &A,
    ) -> Result<ClientStream<In, R>, RpcError> {
        let now = Instant::now();
        let deadline = self.deadline_from(now);
        let (waiter, reply) = oneshot::channel();
        let (guard, credit) = self
            .start(
                service,
                method,
                fingerprint,
                args,
                (now, deadline),
                Waiter::Upload(waiter),
                true,
            )
            .await?;
        let credit = credit.unwrap_or_else(|| Arc::new(Semaphore::new(0)));
        Ok(ClientStream {
            items: ItemSender {
                link: guard.link.clone(),
                id: guard.id,
                credit,
                deadline,
                finished: false,
                _type: std::marker::PhantomData,
            },
            reply,
            guard,
            early: None,
            _type: std::marker::PhantomData,
        })
    }

    /// Calls a bidirectional streaming method: send items through the
    /// returned [`ItemSender`] while the handler's arrive through the
    /// [`ItemStream`], each at its own pace, within this client's deadline
    /// for the whole call. Dropping the stream cancels the call; dropping
    /// the sender without `finish` tells the handler its input was
    /// abandoned. Generated clients call this for a method taking an
    /// [`Incoming<In>`](crate::Incoming) and an [`Items<Out>`](crate::Items).
    ///
    /// Fails with [`RpcError::NotSupported`] as
    /// [`call_client_stream`](Self::call_client_stream) does.
    pub async fn call_bidi<A: Serialize, In: Serialize, Out: DeserializeOwned>(
        &self,
        service: &str,
        method: &str,
        fingerprint: u64,
        args: &A,
    ) -> Result<(ItemSender<In>, ItemStream<Out>), RpcError> {
        let now = Instant::now();
        let deadline = self.deadline_from(now);
        let (items, receiver) = mpsc::channel(WINDOW as usize + 2);
        let (guard, credit) = self
            .start(
                service,
                method,
                fingerprint,
                args,
                (now, deadline),
                Waiter::Stream(items),
                true,
            )
            .await?;
        let sender = ItemSender {
            link: guard.link.clone(),
            id: guard.id,
            credit: credit.unwrap_or_else(|| Arc::new(Semaphore::new(0))),
            deadline,
            finished: false,
            _type: std::marker::PhantomData,
        };
        let stream = ItemStream {
            items: receiver,
            link: guard.link.clone(),
            guard,
            deadline,
            consumed: 0,
            finished: false,
            _type: std::marker::PhantomData,
        };
        Ok((sender, stream))
    }
}

/// `future`, given up at `deadline` (never, without one).
async fn within<F: std::future::Future>(
    deadline: Option<Instant>,
    future: F,
) -> Result<F::Output, RpcError> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future)
            .await
            .map_err(|_| RpcError::DeadlineExceeded),
        None => Ok(future.await),
    }
}

/// The timeout sent to a server too old to know "no deadline": the longest
/// callers used to ask for, so such a server treats the call as it did.
const LEGACY_NO_DEADLINE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The `traceparent` to send, if the server takes one and the caller runs
/// inside a trace (see the crate docs, "Tracing"): only a trace the caller
/// has is carried on; none is started here.
fn trace_for(peer: &Peer) -> Option<String> {
    if !peer.has(FEATURE_TRACE) {
        return None;
    }
    // With OpenTelemetry, the span the caller is in is the precise parent
    // (inside a handler, its `rpc` span, itself the child of its caller).
    #[cfg(feature = "otel")]
    if let Some(context) = crate::otel::current() {
        return Some(context.to_traceparent());
    }
    courier_transport::trace::current().map(|context| context.to_traceparent())
}

/// A request's header and, when it needs one and the server reads one, its
/// extension's bytes. `remaining`: the time left (`None`: no deadline).
fn request_header<'a>(
    peer: &Peer,
    (service, method, fingerprint): (&'a str, &'a str, u64),
    remaining: Option<Duration>,
    window: u32,
    ext: RequestExt<'_>,
) -> (RequestHeader<'a>, Option<Vec<u8>>) {
    let extended = peer.has(FEATURE_REQUEST_EXT) && ext.is_needed();
    let timeout = match remaining {
        Some(remaining) => remaining,
        // Without the extension, an older server still needs a number.
        None if !extended => LEGACY_NO_DEADLINE,
        None => Duration::ZERO,
    };
    let header = RequestHeader {
        service,
        method,
        fingerprint,
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        window,
    };
    let ext = extended.then(|| postcard::to_stdvec(&ext).unwrap_or_default());
    (header, ext)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use courier_transport::{bind, Connection};
    use tokio::sync::Semaphore;

    use super::*;

    fn mem() -> Address {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Address::mem(format!(
            "client-unit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// A server that answers each hello once `gate` opens (or refuses it,
    /// if `refuse`), then answers each request's `u32` argument plus one
    /// (and a call to `never`, never).
    /// Counts the connections it accepted. `close` ends every connection
    /// it serves from then on.
    struct Fake {
        address: Address,
        accepted: Arc<AtomicUsize>,
        gate: Arc<tokio::sync::Semaphore>,
        close: Arc<Notify>,
    }

    async fn fake(refuse: bool) -> Fake {
        let fault = refuse.then(|| RpcFault::Unauthenticated {
            reason: "refused".into(),
        });
        fake_refusing(fault).await
    }

    /// A fake that refuses every hello with `fault`, if there is one.
    async fn fake_refusing(fault: Option<RpcFault>) -> Fake {
        let address = mem();
        let mut listener = bind(&address, &TransportConfig::default()).await.unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let close = Arc::new(Notify::new());
        tokio::spawn({
            let (accepted, gate, close) = (accepted.clone(), gate.clone(), close.clone());
            async move {
                while let Ok(connection) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let fault = fault.clone();
                    tokio::spawn(serve_fake(connection, gate.clone(), close.clone(), fault));
                }
            }
        });
        Fake {
            address,
            accepted,
            gate,
            close,
        }
    }

    async fn serve_fake(
        mut connection: Connection,
        gate: Arc<tokio::sync::Semaphore>,
        close: Arc<Notify>,
        fault: Option<RpcFault>,
    ) {
        let Ok(Some(_hello)) = connection.recv().await else {
            return;
        };
        // Held open for good once opened.
        let Ok(permit) = gate.acquire().await else {
            return;
        };
        drop(permit);
        if let Some(fault) = fault {
            let _ = connection.send_message(FrameKind::Error, 0, &fault).await;
            return;
        }
        let welcome = crate::auth::Welcome { identity: None };
        if connection
            .send_message(FrameKind::Hello, 0, &welcome)
            .await
            .is_err()
        {
            return;
        }
        let closing = close.notified();
        tokio::pin!(closing);
        loop {
            tokio::select! {
                frame = connection.recv() => {
                    let Ok(Some(frame)) = frame else { return };
                    if frame.kind != FrameKind::Request {
                        continue;
                    }
                    let (header, args): (RequestHeader<'_>, &[u8]) =
                        postcard::take_from_bytes(&frame.payload).unwrap();
                    if header.method == "never" {
                        continue;
                    }
                    let (n,): (u32,) = postcard::from_bytes(args).unwrap();
                    let _ = connection
                        .send_message(FrameKind::Response, frame.id, &(n + 1))
                        .await;
                }
                () = &mut closing => return,
            }
        }
    }

    async fn add_one(client: &Client, n: u32) -> Result<u32, RpcError> {
        client.call("Fake", "add_one", 0, &(n,)).await
    }

    /// Calls registered, unary calls counted, and whether a connection is
    /// being made.
    fn table_state(client: &Client) -> (usize, usize, bool) {
        let table = client.inner.calls.lock();
        (table.waiters.len(), table.unary, table.connecting.is_some())
    }

    #[tokio::test]
    async fn calls_dropped_while_the_link_is_being_made_leave_nothing_behind() {
        let server = fake(false).await;
        let client = Client::lazy(&server.address, ClientConfig::default());
        // The first call makes the connection; the second waits for it.
        let maker = tokio::spawn({
            let client = client.clone();
            async move { add_one(&client, 1).await }
        });
        let waiter = tokio::spawn({
            let client = client.clone();
            async move { add_one(&client, 2).await }
        });
        while server.accepted.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            table_state(&client),
            (0, 0, true),
            "connecting, nothing registered"
        );
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_eq!(table_state(&client), (0, 0, true), "the maker goes on");
        maker.abort();
        assert!(maker.await.unwrap_err().is_cancelled());
        assert_eq!(
            table_state(&client),
            (0, 0, false),
            "the attempt is withdrawn with its maker"
        );
        assert_eq!(client.epoch().await, 0);
        // The next call makes a connection of its own and is answered.
        server.gate.add_permits(Semaphore::MAX_PERMITS);
        assert_eq!(add_one(&client, 41).await, Ok(42));
        assert_eq!(table_state(&client), (0, 0, false));
        assert_eq!(client.epoch().await, 1);
    }

    #[tokio::test]
    async fn a_waiter_whose_maker_is_dropped_makes_the_connection_itself() {
        let server = fake(false).await;
        let client = Client::lazy(&server.address, ClientConfig::default());
        let maker = tokio::spawn({
            let client = client.clone();
            async move { add_one(&client, 1).await }
        });
        while server.accepted.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let waiter = tokio::spawn({
            let client = client.clone();
            async move { add_one(&client, 2).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        maker.abort();
        let _ = maker.await;
        server.gate.add_permits(Semaphore::MAX_PERMITS);
        assert_eq!(waiter.await.unwrap(), Ok(3));
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(table_state(&client), (0, 0, false));
    }

    #[tokio::test]
    async fn concurrent_callers_during_a_connect_or_reconnect_share_one_connection() {
        let server = fake(false).await;
        let client = Client::lazy(&server.address, ClientConfig::default());
        let burst = |base: u32| {
            (0..50u32)
                .map(|n| {
                    let client = client.clone();
                    tokio::spawn(async move { add_one(&client, base + n).await })
                })
                .collect::<Vec<_>>()
        };
        let calls = burst(0);
        while server.accepted.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        server.gate.add_permits(Semaphore::MAX_PERMITS);
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Ok(n as u32 + 1));
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(client.epoch().await, 1);

        // The server drops the connection: the next burst makes one more.
        server.close.notify_waiters();
        while client.epoch().await != 0 {
            tokio::task::yield_now().await;
        }
        let calls = burst(100);
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Ok(n as u32 + 101));
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(client.epoch().await, 2);
        assert_eq!(table_state(&client), (0, 0, false));
    }

    #[tokio::test]
    async fn every_caller_waiting_on_a_refused_connection_gets_its_error() {
        let server = fake(true).await;
        let client = Client::lazy(&server.address, ClientConfig::default());
        let calls: Vec<_> = (0..20u32)
            .map(|n| {
                let client = client.clone();
                tokio::spawn(async move { add_one(&client, n).await })
            })
            .collect();
        while server.accepted.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        server.gate.add_permits(Semaphore::MAX_PERMITS);
        for call in calls {
            assert!(
                matches!(call.await.unwrap(), Err(RpcError::Unauthenticated(_))),
                "a typed error"
            );
        }
        assert_eq!(
            server.accepted.load(Ordering::SeqCst),
            1,
            "one attempt, shared"
        );
        assert_eq!(table_state(&client), (0, 0, false));

        // Nothing listens: every caller gets a retryable error, none hangs.
        let nowhere = Client::lazy(&mem(), ClientConfig::default());
        let calls: Vec<_> = (0..20u32)
            .map(|n| {
                let client = nowhere.clone();
                tokio::spawn(async move { add_one(&client, n).await })
            })
            .collect();
        for call in calls {
            assert!(matches!(call.await.unwrap(), Err(RpcError::Unavailable(_))));
        }
    }

    #[tokio::test]
    async fn calls_over_max_in_flight_wait_for_room_and_give_up_at_their_deadline() {
        let server = fake(false).await;
        server.gate.add_permits(Semaphore::MAX_PERMITS);
        let config = ClientConfig {
            max_in_flight: 2,
            ..ClientConfig::default()
        };
        let client = Client::connect(&server.address, config).await.unwrap();
        // Many at once: never more than two registered, all answered.
        let calls: Vec<_> = (0..40u32)
            .map(|n| {
                let client = client.clone();
                tokio::spawn(async move { add_one(&client, n).await })
            })
            .collect();
        let mut most = 0;
        let mut calls = calls.into_iter().enumerate();
        for (n, call) in calls.by_ref() {
            most = most.max(table_state(&client).1);
            assert_eq!(call.await.unwrap(), Ok(n as u32 + 1));
        }
        assert!(most <= 2, "{most} unary calls registered");
        assert_eq!(table_state(&client), (0, 0, false));

        // A call that is never answered fills it: the next gives up.
        let config = ClientConfig {
            max_in_flight: 1,
            ..ClientConfig::default()
        };
        let stuck = Client::lazy(&server.address, config);
        let blocker = tokio::spawn({
            let stuck = stuck.clone();
            async move { stuck.call::<_, u32>("Fake", "never", 0, &(0u32,)).await }
        });
        while table_state(&stuck).1 == 0 {
            tokio::task::yield_now().await;
        }
        let short = stuck.with_timeout(Duration::from_millis(20));
        assert_eq!(add_one(&short, 1).await, Err(RpcError::Overloaded));
        blocker.abort();
        let _ = blocker.await;
        assert_eq!(table_state(&stuck), (0, 0, false));
    }

    /// A fake whose hellos are answered at once.
    async fn open_fake() -> Fake {
        let server = fake(false).await;
        server.gate.add_permits(Semaphore::MAX_PERMITS);
        server
    }

    fn accepted(server: &Fake) -> usize {
        server.accepted.load(Ordering::SeqCst)
    }

    /// Waits (yielding, at most 10,000 turns and 10 s) until the client
    /// has noticed that its connection died.
    async fn until_disconnected(client: &Client) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..10_000 {
            if client.epoch().await == 0 {
                return;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the client never noticed its connection died");
    }

    #[test]
    fn an_address_list_must_hold_one_to_max_list_distinct_addresses() {
        let config = ClientConfig::default;
        assert!(matches!(
            Client::lazy_any(&[], config()),
            Err(RpcError::Unavailable(reason)) if reason.contains("no server address")
        ));
        let many: Vec<Address> = (0..=Address::MAX_LIST)
            .map(|n| Address::mem(format!("list-{n}")))
            .collect();
        assert!(matches!(
            Client::lazy_any(&many, config()),
            Err(RpcError::Unavailable(reason)) if reason.contains("at most 64")
        ));
        let client = Client::lazy_any(&many[..Address::MAX_LIST], config()).unwrap();
        assert_eq!(client.addresses(), &many[..Address::MAX_LIST]);
        // Repeats are kept once, where they first appear, and do not count.
        let (a, b) = (many[0].clone(), many[1].clone());
        let mut repeated = vec![b.clone(), a.clone(), b.clone(), a.clone()];
        repeated.extend(std::iter::repeat_n(a.clone(), 100));
        let client = Client::lazy_any(&repeated, config()).unwrap();
        assert_eq!(client.addresses(), &[b.clone(), a]);
        assert_eq!(client.address(), b, "the first, before any connection");
        // One address is a list of one.
        let single = Client::lazy(&b, config());
        assert_eq!(single.addresses(), std::slice::from_ref(&b));
        assert_eq!(single.address(), b);
    }

    #[tokio::test]
    async fn after_a_connection_dies_the_next_attempt_starts_with_the_next_address() {
        let (a, b) = (open_fake().await, open_fake().await);
        let client = Client::lazy_any(
            &[a.address.clone(), b.address.clone()],
            ClientConfig::default(),
        )
        .unwrap();
        assert_eq!(add_one(&client, 1).await, Ok(2));
        assert_eq!(client.address(), a.address);
        assert_eq!((accepted(&a), accepted(&b)), (1, 0));

        // A drops the connection but still listens: the client goes to B
        // all the same, not back to the node that just cut it off.
        a.close.notify_waiters();
        until_disconnected(&client).await;
        assert_eq!(client.address(), a.address, "the last one made");
        assert_eq!(add_one(&client, 2).await, Ok(3));
        assert_eq!(client.address(), b.address);
        assert_eq!((accepted(&a), accepted(&b)), (1, 1));

        // And round the list: from B back to A.
        b.close.notify_waiters();
        until_disconnected(&client).await;
        assert_eq!(add_one(&client, 3).await, Ok(4));
        assert_eq!(client.address(), a.address);
        assert_eq!((accepted(&a), accepted(&b)), (2, 1));
        assert_eq!(client.epoch().await, 3);
    }

    #[tokio::test]
    async fn a_failed_attempt_goes_round_the_list_once_and_reports_the_last_error() {
        let (dead, live) = (mem(), open_fake().await);
        let client = Client::lazy_any(
            &[dead.clone(), live.address.clone()],
            ClientConfig::default(),
        )
        .unwrap();
        assert_eq!(
            add_one(&client, 1).await,
            Ok(2),
            "past the dead one at once"
        );
        assert_eq!(client.address(), live.address);

        let (first, last) = (mem(), mem());
        let nowhere = Client::lazy_any(&[first, last.clone()], ClientConfig::default()).unwrap();
        match add_one(&nowhere, 1).await {
            Err(RpcError::Unavailable(reason)) => {
                assert!(reason.contains(&last.to_string()), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // The next attempt goes round again, and again fails.
        assert!(matches!(
            add_one(&nowhere, 1).await,
            Err(RpcError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn refused_credentials_fail_the_call_without_trying_the_other_addresses() {
        let refusing = fake(true).await;
        refusing.gate.add_permits(Semaphore::MAX_PERMITS);
        let other = open_fake().await;
        let addresses = [refusing.address.clone(), other.address.clone()];
        let client = Client::lazy_any(&addresses, ClientConfig::default()).unwrap();
        assert!(matches!(
            add_one(&client, 1).await,
            Err(RpcError::Unauthenticated(_))
        ));
        assert_eq!(accepted(&other), 0, "the same token would be refused there");
        // As with `connect_any`.
        let err = Client::connect_any(&addresses, ClientConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(err, RpcError::Unauthenticated(_)), "{err}");
        assert_eq!(accepted(&other), 0);
    }

    #[tokio::test]
    async fn a_full_node_is_passed_over_for_the_next() {
        let full = fake_refusing(Some(RpcFault::TooManyConnections {
            limit: 1,
            scope: String::new(),
        }))
        .await;
        full.gate.add_permits(Semaphore::MAX_PERMITS);
        let other = open_fake().await;
        let client = Client::connect_any(
            &[full.address.clone(), other.address.clone()],
            ClientConfig::default(),
        )
        .await
        .unwrap();
        assert_eq!(client.address(), other.address);
        assert_eq!(add_one(&client, 1).await, Ok(2));
        assert_eq!((accepted(&full), accepted(&other)), (1, 1));

        // Full everywhere: the last node's refusal.
        let only =
            Client::connect_any(std::slice::from_ref(&full.address), ClientConfig::default()).await;
        assert!(matches!(
            only,
            Err(RpcError::TooManyConnections { limit: 1, .. })
        ));
    }

    #[tokio::test]
    async fn a_node_that_never_answers_the_hello_is_passed_over_once_a_call_gives_up_on_it() {
        // Its gate never opens: it accepts connections and says nothing.
        let silent = fake(false).await;
        let live = open_fake().await;
        let config = ClientConfig {
            timeout: Duration::from_millis(100),
            ..ClientConfig::default()
        };
        let client =
            Client::lazy_any(&[silent.address.clone(), live.address.clone()], config).unwrap();
        assert_eq!(add_one(&client, 1).await, Err(RpcError::DeadlineExceeded));
        assert_eq!((accepted(&silent), accepted(&live)), (1, 0));
        // The abandoned attempt counted against it: the next starts past it.
        assert_eq!(add_one(&client, 2).await, Ok(3));
        assert_eq!(client.address(), live.address);
        assert_eq!((accepted(&silent), accepted(&live)), (1, 1));
    }

    #[tokio::test]
    async fn a_separate_client_keeps_the_list_and_starts_where_this_one_is() {
        let (a, b) = (open_fake().await, open_fake().await);
        let client = Client::lazy_any(
            &[a.address.clone(), b.address.clone()],
            ClientConfig::default(),
        )
        .unwrap();
        assert_eq!(add_one(&client, 1).await, Ok(2));
        a.close.notify_waiters();
        until_disconnected(&client).await;
        assert_eq!(add_one(&client, 1).await, Ok(2));
        assert_eq!(client.address(), b.address);

        let separate = client.with_timeout(Duration::from_secs(5)).separate();
        assert_eq!(separate.addresses(), client.addresses());
        assert_eq!(separate.address(), b.address, "before its first call");
        assert_eq!(separate.timeout(), Some(Duration::from_secs(5)));
        assert_eq!(add_one(&separate, 5).await, Ok(6));
        assert_eq!(separate.address(), b.address);
        assert_eq!(
            (accepted(&a), accepted(&b)),
            (1, 2),
            "a connection of its own"
        );
        assert_eq!(separate.epoch().await, 1);
    }
}
