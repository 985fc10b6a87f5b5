//! The in-process bus: publishers and subscribers in one process, no
//! sockets, no serialization (payloads are shared `Bytes`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;
use courier_wire::headers::Headers;
use tokio::sync::Notify;

use crate::interest::{GroupKey, Interest, LocalInterest, NodeId, RemoteInterest, RemoteTargets};
use crate::router::{Router, SubscriptionId};
use crate::subject::{Filter, Subject};

/// What a subscription does when its buffer is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Drop the oldest buffered message to make room (default).
    #[default]
    DropOldest,
    /// Drop the new message.
    DropNewest,
    /// End the subscription: it is removed, and its receiver sees the end.
    Disconnect,
    /// Make publishers wait for room. Only this policy ever slows publishers
    /// (and through them, other subscribers): choose it deliberately.
    Backpressure,
}

/// How to subscribe.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Messages buffered before the policy applies. Default 1024.
    pub buffer: usize,
    /// What happens when the buffer is full.
    pub policy: SlowConsumer,
    /// Queue group: subscribers with the same filter and group share the
    /// messages, each going to one of them.
    pub group: Option<String>,
    /// Bytes buffered before the policy applies, if lower than the bus's
    /// [`BusConfig::max_subscription_bytes`] (which is also the default and
    /// the ceiling). In process only: a remote subscription gets the host's.
    pub max_bytes: Option<usize>,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            buffer: 1024,
            policy: SlowConsumer::default(),
            group: None,
            max_bytes: None,
        }
    }
}

impl SubscribeOptions {
    /// With another buffer size.
    pub fn buffer(mut self, messages: usize) -> SubscribeOptions {
        self.buffer = messages.max(1);
        self
    }

    /// With another slow-consumer policy.
    pub fn policy(mut self, policy: SlowConsumer) -> SubscribeOptions {
        self.policy = policy;
        self
    }

    /// As a member of queue group `group`.
    pub fn group(mut self, group: impl Into<String>) -> SubscribeOptions {
        self.group = Some(group.into());
        self
    }

    /// With a lower byte cap than the bus's (see [`SubscribeOptions::max_bytes`]).
    pub fn max_bytes(mut self, bytes: usize) -> SubscribeOptions {
        self.max_bytes = Some(bytes);
        self
    }
}

/// What a subscription's buffered message is counted as, against the byte
/// caps: its payload, subject and reply subject plus this much for the
/// rest. Payloads are shared between subscriptions but counted for each, so
/// the caps bound memory from above rather than measure it.
pub const MESSAGE_OVERHEAD: usize = 64;

/// Limits of a [`Bus`], beside each subscription's message-count buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusConfig {
    /// Bytes buffered for all subscriptions together. When a message would
    /// pass it, the subscription it is for applies its [`SlowConsumer`]
    /// policy, as if its own buffer were full (backpressure waits for any
    /// subscription to make room). Concurrent publishers may pass it by a
    /// message each. Default 1 GiB.
    pub max_buffered_bytes: usize,
    /// Bytes buffered for one subscription, the same way. Default 64 MiB.
    pub max_subscription_bytes: usize,
    /// Publishers whose sequence numbers one subscription keeps. Past this,
    /// publishers with nothing buffered and nothing unreported are forgotten
    /// (one that publishes again starts again from 0, like a new one); if
    /// that is not enough, publishers whose drops are not yet reported are
    /// forgotten too and their drops reported as [`Event::Dropped`].
    /// Publishers with messages in the buffer are never forgotten, so the
    /// bound is about the larger of this and the buffer size (plus a
    /// quarter of this). Default 4096.
    pub max_publishers_per_subscription: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            max_buffered_bytes: 1 << 30,
            max_subscription_bytes: 64 << 20,
            max_publishers_per_subscription: 4096,
        }
    }
}

impl BusConfig {
    /// With another total byte cap.
    pub fn with_max_buffered_bytes(mut self, bytes: usize) -> BusConfig {
        self.max_buffered_bytes = bytes;
        self
    }

    /// With another per-subscription byte cap.
    pub fn with_max_subscription_bytes(mut self, bytes: usize) -> BusConfig {
        self.max_subscription_bytes = bytes;
        self
    }

    /// With another per-subscription publisher bound (at least 1).
    pub fn with_max_publishers_per_subscription(mut self, publishers: usize) -> BusConfig {
        self.max_publishers_per_subscription = publishers.max(1);
        self
    }
}

/// A published message, as a subscriber receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its subject.
    pub subject: Subject,
    /// Its bytes, shared with every other subscriber.
    pub payload: Bytes,
    /// The publisher that sent it.
    pub publisher: u64,
    /// This subscription's count of messages from that publisher: 0, 1, 2,
    /// … with no gaps unless messages were dropped.
    pub seq: u64,
    /// Where the publisher wants a reply, for request-reply.
    pub reply_to: Option<Subject>,
    /// Its headers (at most [`courier_wire::headers::MAX_ENTRIES`] short
    /// text pairs): the publisher's own, the payload's type for typed
    /// publishes ([`courier_wire::headers::TYPE`]), the trace it was
    /// published in ([`courier_wire::headers::TRACEPARENT`]). Carried
    /// unchanged through hosts, routes and durable subscriptions.
    pub headers: Headers,
}

impl Message {
    /// The W3C trace context the message was published in (its
    /// `traceparent` header), if it has a well-formed one.
    pub fn trace_context(&self) -> Option<courier_wire::trace::TraceContext> {
        self.headers
            .get(courier_wire::headers::TRACEPARENT)
            .and_then(courier_wire::trace::TraceContext::parse)
    }
}

/// A message on its way: subject, reply subject, headers, payload.
pub(crate) type Outgoing = (Subject, Option<Subject>, Headers, Bytes);

/// `headers`, with the current trace context (if any, and if the publisher
/// set none) as its `traceparent`, so a receiver can follow the request.
///
/// Without the `remote` feature there is no current trace context to read
/// (the task-local lives in courier-transport), and `headers` are left as
/// they are.
#[cfg(not(feature = "remote"))]
pub(crate) fn traced(headers: Headers) -> Headers {
    headers
}

/// See the other `traced`.
#[cfg(feature = "remote")]
pub(crate) fn traced(mut headers: Headers) -> Headers {
    if headers.get(courier_wire::headers::TRACEPARENT).is_none() {
        if let Some(context) = courier_transport::trace::current() {
            // A traceparent is 55 bytes: refused only if the publisher's
            // own headers already fill the bound, and then it is left out.
            let _ = headers.insert(courier_wire::headers::TRACEPARENT, context.to_traceparent());
        }
    }
    headers
}

/// What can go wrong using the in-process bus: the one error of the
/// embedded face, as [`RemotePubSubError`](crate::remote::RemotePubSubError)
/// is the remote face's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The subject, filter or queue group is invalid. Not retryable.
    #[error(transparent)]
    Subject(#[from] crate::SubjectError),
    /// A request found nobody subscribed to its subject: it went nowhere.
    #[error("no responders for {0}")]
    NoResponders(String),
    /// A request got no reply within its timeout.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// A typed publish's value could not be encoded. Not retryable.
    #[error(transparent)]
    Encode(#[from] crate::typed::EncodeError),
}

impl BusError {
    /// What kind of failure this is: an invalid subject is
    /// [`ErrorKind::InvalidInput`](courier_wire::ErrorKind::InvalidInput);
    /// a request that got no reply, or found nobody to answer it,
    /// [`ErrorKind::TimedOut`](courier_wire::ErrorKind::TimedOut), as
    /// on the remote face.
    pub fn kind(&self) -> courier_wire::ErrorKind {
        match self {
            BusError::Subject(err) => err.kind(),
            BusError::Encode(err) => err.kind(),
            BusError::NoResponders(_) | BusError::Timeout(_) => courier_wire::ErrorKind::TimedOut,
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// The name [`BusError`] had when only requests returned it.
pub type RequestError = BusError;

/// What a subscription receives.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message.
    Message(Message),
    /// Messages from `publisher` with sequence numbers `from..to` were
    /// dropped (slow-consumer policy). Reported before the publisher's next
    /// message, or, if none follows, once the buffer is empty: when the
    /// buffer has drained, the gaps (and [`Event::Dropped`]) reported add
    /// up to the subscription's drop count.
    Gap {
        /// The publisher.
        publisher: u64,
        /// First missing sequence number.
        from: u64,
        /// One past the last missing.
        to: u64,
    },
    /// Remote subscriptions only: the connection to the host was lost and
    /// the subscription made again. Messages published in between were
    /// missed (use a durable subscription to keep them), and sequence
    /// numbers may start again from 0.
    ///
    /// How many were missed is not knowable: the old subscription's buffer
    /// at the host (and anything in flight) went with the connection or
    /// the host, and nobody counts what is published while no subscription
    /// exists. What is known is in
    /// [`RemoteSubscription::dropped`](crate::remote::RemoteSubscription::dropped):
    /// every drop the host reported before the loss.
    Restored,
    /// `count` messages were dropped whose publisher this subscription no
    /// longer tracks (see [`BusConfig::max_publishers_per_subscription`]),
    /// so no [`Event::Gap`] names them. Reported once the buffer is empty.
    Dropped {
        /// How many.
        count: u64,
    },
}

/// What a subscription knows about one publisher.
#[derive(Default)]
struct PubState {
    /// The next sequence number to assign.
    next: u64,
    /// The next sequence number the subscriber expects: everything below
    /// was received or reported in a gap.
    delivered: u64,
    /// Messages from this publisher in the buffer (it is not forgotten
    /// while any are, so their gaps stay exact).
    queued: usize,
}

impl PubState {
    /// Nothing buffered and nothing unreported: forgetting it loses nothing
    /// but the numbering.
    fn settled(&self) -> bool {
        self.queued == 0 && self.delivered == self.next
    }
}

struct Buffer {
    queue: VecDeque<Message>,
    /// Bytes of `queue`, as [`cost`] counts them.
    bytes: usize,
    publishers: HashMap<u64, PubState>,
    dropped: u64,
    /// Drops not yet reported to the subscriber in a gap or `Dropped`.
    unreported: u64,
    /// Drops of forgotten publishers, reported as `Event::Dropped`.
    unattributed: u64,
    /// How many publishers the next sweep waits for.
    sweep_at: usize,
    closed: bool,
}

impl Buffer {
    fn pop_front(&mut self) -> Option<Message> {
        let message = self.queue.pop_front()?;
        self.bytes -= cost(&message);
        if let Some(state) = self.publishers.get_mut(&message.publisher) {
            state.queued -= 1;
        }
        Some(message)
    }

    /// Room for one more publisher, forgetting others if at the bound:
    /// settled ones first (lossless), then ones with unreported drops only
    /// (their drops move to `unattributed`), never ones with messages
    /// buffered. The next sweep waits for a quarter of the bound more
    /// publishers than this one left, so the cost per publisher stays
    /// constant even when most have messages buffered (a buffer larger than
    /// the bound); the map then holds at most those plus a quarter bound.
    fn make_room_for_publisher(&mut self, bound: usize) {
        if self.publishers.len() < bound.max(self.sweep_at) {
            return;
        }
        self.sweep_at = self.sweep(bound) + (bound / 4).max(1);
    }

    /// Forgets publishers down to three quarters of `bound` if it can;
    /// returns how many are left.
    fn sweep(&mut self, bound: usize) -> usize {
        self.publishers.retain(|_, state| !state.settled());
        let target = bound - bound / 4;
        if self.publishers.len() <= target {
            return self.publishers.len();
        }
        let mut excess = self.publishers.len() - target;
        let mut moved = 0;
        self.publishers.retain(|_, state| {
            if excess == 0 || state.queued > 0 {
                return true;
            }
            excess -= 1;
            moved += state.next - state.delivered;
            false
        });
        self.unattributed += moved;
        self.publishers.len()
    }

    fn number(&mut self, message: &mut Message, bound: usize) {
        if !self.publishers.contains_key(&message.publisher) {
            self.make_room_for_publisher(bound);
        }
        let state = self.publishers.entry(message.publisher).or_default();
        message.seq = state.next;
        state.next += 1;
    }

    fn push_back(&mut self, message: Message) {
        self.bytes += cost(&message);
        if let Some(state) = self.publishers.get_mut(&message.publisher) {
            state.queued += 1;
        }
        self.queue.push_back(message);
    }

    fn count_dropped(&mut self, count: u64) {
        self.dropped += count;
        self.unreported += count;
    }
}

/// What a message counts against the byte caps.
fn cost(message: &Message) -> usize {
    message.payload.len()
        + message.subject.as_str().len()
        + message.reply_to.as_ref().map_or(0, |r| r.as_str().len())
        + message.headers.memory_cost()
        + MESSAGE_OVERHEAD
}

struct Sub {
    filter: Filter,
    options: SubscribeOptions,
    /// The effective per-subscription byte cap.
    max_bytes: usize,
    buffer: Mutex<Buffer>,
    readable: Notify,
    room: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

#[derive(Default)]
struct Registry {
    router: Router,
    subs: HashMap<SubscriptionId, Arc<Sub>>,
}

#[derive(Default)]
struct GroupTurn {
    next: usize,
    members: usize,
}

#[derive(Default)]
struct Inner {
    config: BusConfig,
    registry: RwLock<Registry>,
    /// This bus's subscriptions as (filter, group) pairs, for routes.
    interest: Mutex<LocalInterest>,
    /// Woken when `interest` changes.
    interest_changed: Notify,
    /// Other nodes' interest and the routes to them (empty without a
    /// cluster); `remote_entries` lets a publish skip it when empty.
    remote: RwLock<RemoteInterest>,
    remote_entries: AtomicUsize,
    /// Makes this bus's request inboxes unlike any other node's.
    nonce: Nonce,
    /// Per (filter, group): the round-robin position and how many members
    /// it has. An entry lives exactly as long as its group has a member, so
    /// group names a client makes up cost nothing once their subscriptions
    /// are gone.
    turns: Mutex<HashMap<(String, String), GroupTurn>>,
    next_id: AtomicU64,
    next_publisher: AtomicU64,
    /// Messages dropped by slow-consumer policies, over all subscriptions.
    dropped: AtomicU64,
    /// Bytes buffered over all subscriptions (see [`cost`]).
    buffered_bytes: AtomicUsize,
    /// Backpressured publishers waiting for the total to fall; only while
    /// there are any do readers pay for waking them.
    total_waiters: AtomicUsize,
    total_room: Notify,
}

/// A random number per bus.
struct Nonce(u64);

impl Nonce {
    /// `_inbox.<nonce>.`: every request inbox of this bus starts so, and
    /// one permanent interest (`_inbox.<nonce>.>`) stands for all of them,
    /// so requests cause no interest changes for routes to carry.
    fn inbox_prefix(&self) -> String {
        format!("_inbox.{:x}.", self.0)
    }
}

impl Default for Nonce {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Nonce(hasher.finish())
    }
}

/// Where a message comes from, which decides where it may go.
#[derive(Clone, Copy)]
pub(crate) enum Origin<'a> {
    /// Published on this node: to local subscribers and to every node with
    /// interest.
    Local,
    /// Forwarded by another node: to local subscribers only (never on
    /// again, so a message crosses at most one route), and to a member of
    /// only the queue groups that node chose this one for.
    Route(&'a [GroupKey]),
}

/// Where one message goes.
#[derive(Default)]
pub(crate) struct Targets {
    local: Vec<Arc<Sub>>,
    remote: RemoteTargets,
    /// Whether a queue group took part (the next message to the same
    /// subject may go elsewhere).
    grouped: bool,
    /// Queue groups served by a member here.
    served_groups: usize,
}

impl Inner {
    /// `bytes` left the buffers: wake publishers waiting on the total.
    fn released(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        // SeqCst pairs with the waiter's increment-then-load in `deliver`:
        // either it sees the lower total or this sees it waiting.
        self.buffered_bytes.fetch_sub(bytes, Ordering::SeqCst);
        if self.total_waiters.load(Ordering::SeqCst) > 0 {
            self.total_room.notify_waiters();
        }
    }
}

/// An in-process publish–subscribe bus. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use courier_pubsub::{Bus, Event, SubscribeOptions};
///
/// let bus = Bus::new();
/// let mut eu = bus.subscribe("orders.eu.>", SubscribeOptions::default()).await?;
/// let publisher = bus.publisher();
/// publisher.publish("orders.eu.created", "tea").await?;
/// publisher.publish("orders.us.created", "coffee").await?; // not for `eu`
///
/// let Some(Ok(Event::Message(message))) = eu.recv().await else { panic!() };
/// assert_eq!((message.subject.as_str(), &message.payload[..]), ("orders.eu.created", &b"tea"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl Default for Bus {
    fn default() -> Self {
        Bus::with_config(BusConfig::default())
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

impl Bus {
    /// An empty bus with the default [`BusConfig`].
    pub fn new() -> Bus {
        Bus::default()
    }

    /// An empty bus with these limits.
    pub fn with_config(config: BusConfig) -> Bus {
        let inner = Inner {
            config,
            ..Inner::default()
        };
        let inbox = Interest::plain(format!("{}>", inner.nonce.inbox_prefix()));
        lock(&inner.interest).add(inbox);
        Bus {
            inner: Arc::new(inner),
        }
    }

    /// Its limits.
    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    /// Subscribes to `filter` (in the queue group `options.group`, if
    /// given). The subscription is active when this returns: a message
    /// published afterwards is delivered. Async (though it never waits) so
    /// that it has the same signature as
    /// [`RemotePubSub::subscribe`](crate::remote::RemotePubSub::subscribe).
    pub async fn subscribe(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        Ok(self.subscribe_now(filter, options)?)
    }

    /// [`subscribe`](Self::subscribe), for callers that are not async.
    pub(crate) fn subscribe_now(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, crate::SubjectError> {
        let filter = Filter::new(filter)?;
        if let Some(group) = &options.group {
            crate::subject::check_group(group)?;
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let max_bytes = options
            .max_bytes
            .unwrap_or(usize::MAX)
            .min(self.inner.config.max_subscription_bytes);
        let sub = Arc::new(Sub {
            filter: filter.clone(),
            options,
            max_bytes,
            buffer: Mutex::new(Buffer {
                queue: VecDeque::new(),
                bytes: 0,
                publishers: HashMap::new(),
                dropped: 0,
                unreported: 0,
                unattributed: 0,
                sweep_at: 0,
                closed: false,
            }),
            readable: Notify::new(),
            room: Notify::new(),
        });
        let mut registry = self
            .inner
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner());
        registry.router.insert(&filter, id);
        registry.subs.insert(id, sub.clone());
        if let Some(group) = &sub.options.group {
            let key = (filter.as_str().to_string(), group.clone());
            lock(&self.inner.turns).entry(key).or_default().members += 1;
        }
        drop(registry);
        if !self.own_inbox(&filter) {
            lock(&self.inner.interest).add(Interest {
                filter: filter.as_str().to_string(),
                group: sub.options.group.clone(),
            });
            self.inner.interest_changed.notify_waiters();
        }
        Ok(Subscription {
            id,
            sub,
            bus: Arc::downgrade(&self.inner),
            pending_gap: None,
            trailing: VecDeque::new(),
            waiting: None,
        })
    }

    /// A publisher, with its own identity (messages from one publisher reach
    /// each subscriber in the order they were published).
    pub fn publisher(&self) -> Publisher {
        Publisher {
            bus: self.clone(),
            id: self.inner.next_publisher.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Publishes under the bus's own publisher identity (one for every
    /// call, so subscribers see these in the order they were made); see
    /// [`Publisher::publish`]. The same signature as
    /// [`RemotePubSub::publish`](crate::remote::RemotePubSub::publish).
    pub async fn publish(&self, subject: &str, payload: impl Into<Bytes>) -> Result<(), BusError> {
        self.own_publisher().publish(subject, payload).await
    }

    /// [`publish`](Self::publish) with headers; see
    /// [`Publisher::publish_with_headers`].
    pub async fn publish_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<(), BusError> {
        self.own_publisher()
            .publish_with_headers(subject, headers, payload)
            .await
    }

    /// Publishes many messages in order under the bus's own publisher
    /// identity; see [`Publisher::publish_batch`].
    pub async fn publish_batch<S: Into<String>, P: Into<Bytes>>(
        &self,
        messages: impl IntoIterator<Item = (S, P)>,
    ) -> Result<(), BusError> {
        self.own_publisher().publish_batch(messages).await
    }

    /// The identity [`publish`](Self::publish) uses: the top of the range,
    /// which [`publisher`](Self::publisher) never reaches.
    fn own_publisher(&self) -> Publisher {
        Publisher {
            bus: self.clone(),
            id: u64::MAX,
        }
    }

    /// Messages dropped by slow-consumer policies so far, over every
    /// subscription (including those gone).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Bytes buffered for subscribers now, as the caps count them (see
    /// [`MESSAGE_OVERHEAD`]).
    pub fn buffered_bytes(&self) -> usize {
        self.inner.buffered_bytes.load(Ordering::Relaxed)
    }

    /// How many subscriptions are open.
    pub fn subscriptions(&self) -> usize {
        self.registry().subs.len()
    }

    /// The most publishers any one subscription tracks now (for tests of
    /// the bound).
    #[doc(hidden)]
    pub fn most_tracked_publishers(&self) -> usize {
        self.registry()
            .subs
            .values()
            .map(|sub| lock(&sub.buffer).publishers.len())
            .max()
            .unwrap_or(0)
    }

    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The subscriptions a message on `subject` goes to: every plain one,
    /// and one member of each queue group (in turn). Matching holds only a
    /// read lock, so publishers do not exclude each other.
    fn targets(&self, subject: &Subject) -> Targets {
        self.routes(subject, Origin::Local)
    }

    /// Where a message on `subject` from `origin` goes: local
    /// subscriptions (one member of each queue group), then, for a local
    /// message, the routes to other nodes that want it. A queue group with
    /// a member here is served here; only a group with none here goes to
    /// another node (see [`RemoteInterest::targets`]).
    pub(crate) fn routes(&self, subject: &Subject, origin: Origin<'_>) -> Targets {
        let mut local_groups = Vec::new();
        let mut targets = Targets {
            local: self.local_routes(subject, origin, &mut local_groups),
            ..Targets::default()
        };
        targets.grouped = !local_groups.is_empty();
        targets.served_groups = local_groups.len();
        if matches!(origin, Origin::Local) && self.inner.remote_entries.load(Ordering::Relaxed) > 0
        {
            // The groups served here are the ones this very lookup found a
            // member of: a member subscribing in between cannot make a
            // message go nowhere.
            let remote = self.inner.remote.read().unwrap_or_else(|p| p.into_inner());
            let grouped = remote.targets(
                subject,
                |key| local_groups.contains(key),
                &mut targets.remote,
            );
            targets.grouped |= grouped;
        }
        targets
    }

    /// Local subscriptions a message goes to; `served` gets the queue
    /// groups (as keys) that matched with a member here.
    fn local_routes(
        &self,
        subject: &Subject,
        origin: Origin<'_>,
        served: &mut Vec<GroupKey>,
    ) -> Vec<Arc<Sub>> {
        let mut ids = Vec::new();
        let registry = self.registry();
        registry.router.matches(subject, &mut ids);
        let mut targets = Vec::with_capacity(ids.len());
        let mut grouped = Vec::new();
        for id in ids {
            let Some(sub) = registry.subs.get(&id) else {
                continue;
            };
            match &sub.options.group {
                None => targets.push(sub.clone()),
                Some(_) => grouped.push((id, sub.clone())),
            }
        }
        drop(registry);
        if grouped.is_empty() {
            return targets;
        }
        // Members in a stable order, so turns go round fairly.
        grouped.sort_unstable_by_key(|(id, _)| *id);
        let mut groups: HashMap<(String, String), Vec<Arc<Sub>>> = HashMap::new();
        for (_, sub) in grouped {
            let key = (
                sub.filter.as_str().to_string(),
                sub.options.group.clone().unwrap_or_default(),
            );
            groups.entry(key).or_default().push(sub);
        }
        let mut turns = lock(&self.inner.turns);
        for (key, members) in groups {
            if let Origin::Route(chosen) = origin {
                if !chosen.contains(&key) {
                    continue;
                }
            }
            served.push(key.clone());
            // A member leaving between the match and here may have taken
            // the entry with it: start from 0 then (nothing is kept).
            let turn = turns.get_mut(&key).map_or(0, |turn| {
                let next = turn.next;
                turn.next = next.wrapping_add(1);
                next
            });
            targets.push(members[turn % members.len()].clone());
        }
        targets
    }

    fn remove(&self, id: SubscriptionId, filter: &Filter, group: Option<&str>) {
        let mut registry = self
            .inner
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner());
        registry.router.remove(filter, id);
        registry.subs.remove(&id);
        drop(registry);
        if !self.own_inbox(filter) {
            lock(&self.inner.interest).remove(&Interest {
                filter: filter.as_str().to_string(),
                group: group.map(str::to_string),
            });
            self.inner.interest_changed.notify_waiters();
        }
        if let Some(group) = group {
            let mut turns = lock(&self.inner.turns);
            let key = (filter.as_str().to_string(), group.to_string());
            if let Some(turn) = turns.get_mut(&key) {
                turn.members = turn.members.saturating_sub(1);
                if turn.members == 0 {
                    turns.remove(&key);
                }
            }
        }
    }

    /// Queue groups with at least one member (each holds a round-robin
    /// position). For tests that check the bound.
    #[doc(hidden)]
    pub fn groups(&self) -> usize {
        lock(&self.inner.turns).len()
    }

    /// `_inbox.<nonce>.`, this bus's own inbox prefix: one permanent
    /// interest (`_inbox.<nonce>.>`) stands for everything under it, so
    /// routes carry no interest change when a subscription to
    /// `<prefix><id>` or `<prefix><id>.*` comes or goes. A component that
    /// makes many inboxes of its own (a gateway's connections) puts them
    /// under it, as `<prefix><id>.*`, with an `<id>` no one can guess; the
    /// bus's own request inboxes are `<prefix><n>` (one token fewer), so
    /// the two never meet.
    pub fn inbox_prefix(&self) -> String {
        self.inner.nonce.inbox_prefix()
    }

    /// Whether `filter` is an inbox under this bus's prefix, `<id>` or
    /// `<id>.*` (covered by its permanent inbox interest). Wildcards in
    /// the id's place are not: such a filter is interest like any other.
    fn own_inbox(&self, filter: &Filter) -> bool {
        let Some(rest) = filter
            .as_str()
            .strip_prefix(&self.inner.nonce.inbox_prefix())
        else {
            return false;
        };
        let id = rest.strip_suffix(".*").unwrap_or(rest);
        !id.is_empty() && !id.contains('.') && id != ">" && id != "*"
    }

    /// This bus's own interest: the distinct (filter, queue group) pairs
    /// of its subscriptions, sorted. What its routes tell other nodes.
    pub fn local_interest(&self) -> Vec<Interest> {
        lock(&self.inner.interest).snapshot().1
    }

    /// What node `node` has told this bus it wants, sorted.
    pub fn remote_interest(&self, node: NodeId) -> Vec<Interest> {
        self.remote().of(node)
    }

    /// How many interests `node` has told this bus of.
    pub fn remote_interest_count(&self, node: NodeId) -> usize {
        self.remote().count_of(node)
    }

    fn remote(&self) -> std::sync::RwLockReadGuard<'_, RemoteInterest> {
        self.inner.remote.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the remote interest table, keeping its entry count current.
    pub(crate) fn with_remote<R>(&self, change: impl FnOnce(&mut RemoteInterest) -> R) -> R {
        let mut remote = self.inner.remote.write().unwrap_or_else(|p| p.into_inner());
        let result = change(&mut remote);
        self.inner
            .remote_entries
            .store(remote.len(), Ordering::Relaxed);
        result
    }

    /// The local interest's version and every interest.
    pub(crate) fn interest_snapshot(&self) -> (u64, Vec<Interest>) {
        lock(&self.inner.interest).snapshot()
    }

    /// The local interest's changes after `cursor` (see
    /// [`LocalInterest::since`]).
    pub(crate) fn interest_since(
        &self,
        cursor: u64,
        limit: usize,
    ) -> Option<(u64, Vec<crate::interest::Change>)> {
        lock(&self.inner.interest).since(cursor, limit)
    }

    pub(crate) fn interest_version(&self) -> u64 {
        lock(&self.inner.interest).version()
    }

    /// Resolves at the next change of the local interest (enable it before
    /// looking, so a change in between is not missed).
    pub(crate) fn interest_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.interest_changed.notified()
    }
}
/// Publishes messages under one publisher identity.
#[derive(Clone, Debug)]
pub struct Publisher {
    bus: Bus,
    id: u64,
}

impl Publisher {
    /// This publisher's identity, as subscribers see it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Delivers `payload` to every subscription matching `subject`. Waits
    /// only for subscriptions with [`SlowConsumer::Backpressure`]. The same
    /// signature as
    /// [`RemotePublisher::publish`](crate::remote::RemotePublisher::publish);
    /// [`publish_confirmed`](Self::publish_confirmed) says how many it
    /// reached.
    pub async fn publish(&self, subject: &str, payload: impl Into<Bytes>) -> Result<(), BusError> {
        self.publish_confirmed(subject, payload).await.map(drop)
    }

    /// [`publish`](Self::publish), returning how many live subscriptions it
    /// was delivered (or dropped) to.
    pub async fn publish_confirmed(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u64, BusError> {
        let subject = Subject::new(subject)?;
        Ok(self.publish_to(&subject, payload).await as u64)
    }

    /// [`publish`](Self::publish) with headers (the current trace context
    /// is added as `traceparent` unless `headers` has one).
    pub async fn publish_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<(), BusError> {
        let subject = Subject::new(subject)?;
        self.send(&subject, None, headers, payload.into()).await;
        Ok(())
    }

    /// [`publish_with_headers`](Self::publish_with_headers) asking for a
    /// reply at `reply_to` (a request whose answers the caller collects
    /// itself, say on an inbox it subscribed to first); `None` asks for
    /// none. Returns how many live subscriptions it was delivered (or
    /// dropped) to: 0 means nobody will answer.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use courier_pubsub::{Bus, Event, Headers, SubscribeOptions};
    ///
    /// let bus = Bus::new();
    /// let mut service = bus.subscribe("svc.time", SubscribeOptions::default()).await?;
    /// let mut inbox = bus.subscribe("_inbox.mine.*", SubscribeOptions::default()).await?;
    /// let publisher = bus.publisher();
    /// let reached = publisher
    ///     .publish_with_reply("svc.time", Some("_inbox.mine.1"), Headers::new(), "now?")
    ///     .await?;
    /// assert_eq!(reached, 1);
    /// let Some(Ok(Event::Message(request))) = service.recv().await else { unreachable!() };
    /// bus.publisher().reply(&request, "noon").await?;
    /// let Some(Ok(Event::Message(answer))) = inbox.recv().await else { unreachable!() };
    /// assert_eq!(answer.subject.as_str(), "_inbox.mine.1");
    /// assert_eq!(&answer.payload[..], b"noon");
    /// # Ok(()) }
    /// ```
    pub async fn publish_with_reply(
        &self,
        subject: &str,
        reply_to: Option<&str>,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<u64, BusError> {
        let subject = Subject::new(subject)?;
        let reply_to = reply_to.map(Subject::new).transpose()?;
        Ok(self.send(&subject, reply_to, headers, payload.into()).await as u64)
    }

    /// Publishes many messages in order. Every subject is checked first:
    /// one invalid subject fails the call and publishes nothing.
    pub async fn publish_batch<S: Into<String>, P: Into<Bytes>>(
        &self,
        messages: impl IntoIterator<Item = (S, P)>,
    ) -> Result<(), BusError> {
        self.publish_batch_confirmed(messages).await.map(drop)
    }

    /// [`publish_batch`](Self::publish_batch), returning the deliveries in
    /// total.
    pub async fn publish_batch_confirmed<S: Into<String>, P: Into<Bytes>>(
        &self,
        messages: impl IntoIterator<Item = (S, P)>,
    ) -> Result<u64, BusError> {
        let batch = messages
            .into_iter()
            .map(|(subject, payload)| {
                Ok((
                    Subject::new(&subject.into())?,
                    None,
                    traced(Headers::new()),
                    payload.into(),
                ))
            })
            .collect::<Result<Vec<_>, crate::SubjectError>>()?;
        Ok(self.send_all(batch).await as u64)
    }

    /// Returns once every publish made before it has been delivered: at
    /// once, since in process a publish is delivered when it returns. For
    /// the same code to run on the remote face, where
    /// [`RemotePublisher::flush`](crate::remote::RemotePublisher::flush)
    /// waits for the host.
    pub async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// [`publish`](Self::publish) to a subject parsed once, for publishers
    /// that send many messages to the same subject. Returns how many
    /// subscriptions it was delivered (or dropped) to.
    pub async fn publish_to(&self, subject: &Subject, payload: impl Into<Bytes>) -> usize {
        self.send(subject, None, Headers::new(), payload.into())
            .await
    }

    /// Answers `request` by publishing `payload` to its `reply_to` subject;
    /// nothing if it asked for no reply.
    pub async fn reply(
        &self,
        request: &Message,
        payload: impl Into<Bytes>,
    ) -> Result<(), BusError> {
        if let Some(inbox) = &request.reply_to {
            self.send(inbox, None, Headers::new(), payload.into()).await;
        }
        Ok(())
    }

    /// Sends messages in order; returns the deliveries in total. A run of
    /// messages to one subject is routed once, unless a queue group takes
    /// part (each message then picks its member in turn).
    pub(crate) async fn send_all(&self, messages: impl IntoIterator<Item = Outgoing>) -> usize {
        self.send_all_from(messages, Origin::Local).await
    }

    /// [`send_routed`](Self::send_routed) for many messages that name no
    /// queue group, routed once per run of one subject.
    pub(crate) async fn send_all_routed(
        &self,
        messages: impl IntoIterator<Item = Outgoing>,
    ) -> usize {
        self.send_all_from(messages, Origin::Route(&[])).await
    }

    async fn send_all_from(
        &self,
        messages: impl IntoIterator<Item = Outgoing>,
        origin: Origin<'_>,
    ) -> usize {
        let mut delivered = 0;
        let mut routed: Option<(Subject, Targets)> = None;
        for (subject, reply_to, headers, payload) in messages {
            let reuse = matches!(&routed, Some((last, _)) if *last == subject);
            if !reuse {
                let targets = self.bus.routes(&subject, origin);
                if targets.grouped {
                    routed = None;
                    delivered += self
                        .deliver_to(&targets, &subject, reply_to, headers, payload)
                        .await;
                    continue;
                }
                routed = Some((subject.clone(), targets));
            }
            if let Some((_, targets)) = &routed {
                delivered += self
                    .deliver_to(targets, &subject, reply_to, headers, payload)
                    .await;
            }
        }
        delivered
    }

    /// Delivers a message another node forwarded: to local subscriptions,
    /// and to one member of each queue group in `groups` (the groups that
    /// node chose this one for). Never forwarded on. Returns how many of
    /// `groups` had no member here any more (the message is lost to them).
    pub(crate) async fn send_routed(
        &self,
        subject: &Subject,
        reply_to: Option<Subject>,
        headers: Headers,
        payload: Bytes,
        groups: &[GroupKey],
    ) -> usize {
        let targets = self.bus.routes(subject, Origin::Route(groups));
        let unserved = groups.len().saturating_sub(targets.served_groups);
        self.deliver_to(&targets, subject, reply_to, headers, payload)
            .await;
        unserved
    }

    async fn deliver_to(
        &self,
        targets: &Targets,
        subject: &Subject,
        reply_to: Option<Subject>,
        headers: Headers,
        payload: Bytes,
    ) -> usize {
        // Routes first: a backpressured local subscriber must not hold up
        // other nodes. Only a route that took the message counts (so a
        // request whose only responders are behind a route that is down
        // gets "no responders" at once).
        #[cfg_attr(not(feature = "remote"), allow(unused_mut))]
        let mut routed = 0;
        #[cfg(feature = "remote")]
        for (route, groups) in &targets.remote {
            let offered = route
                .offer(crate::route::Routed {
                    subject: subject.clone(),
                    reply_to: reply_to.clone(),
                    headers: headers.clone(),
                    payload: payload.clone(),
                    publisher: self.id,
                    groups: groups.clone(),
                })
                .await;
            routed += usize::from(offered);
        }
        #[cfg(not(feature = "remote"))]
        if let Some((route, _)) = targets.remote.first() {
            match **route {}
        }
        for sub in &targets.local {
            let message = Message {
                subject: subject.clone(),
                payload: payload.clone(),
                publisher: self.id,
                seq: 0,
                reply_to: reply_to.clone(),
                headers: headers.clone(),
            };
            deliver(sub, message, &self.bus.inner).await;
        }
        targets.local.len() + routed
    }

    pub(crate) async fn send(
        &self,
        subject: &Subject,
        reply_to: Option<Subject>,
        headers: Headers,
        payload: Bytes,
    ) -> usize {
        let targets = self.bus.targets(subject);
        self.deliver_to(&targets, subject, reply_to, traced(headers), payload)
            .await
    }
}

impl Bus {
    /// Sends a request to `subject` and waits at most `timeout` for the
    /// first reply. Services answer with [`Publisher::reply`]; several
    /// instances in one queue group share the requests. The reply inbox is
    /// subscribed before the request goes out, so no reply can be missed.
    pub async fn request(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
        timeout: std::time::Duration,
    ) -> Result<Message, BusError> {
        self.request_with_headers(subject, Headers::new(), payload, timeout)
            .await
    }

    /// [`request`](Self::request) with headers on the request (the current
    /// trace context is added as `traceparent` unless `headers` has one).
    pub async fn request_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
        timeout: std::time::Duration,
    ) -> Result<Message, BusError> {
        let subject = Subject::new(subject)?;
        // Unique across nodes too (a reply may cross a route), and under
        // the one interest every route knows for this bus's inboxes.
        let inbox = Subject::new(&format!(
            "{}{}",
            self.inner.nonce.inbox_prefix(),
            self.inner.next_id.fetch_add(1, Ordering::Relaxed)
        ))?;
        let mut replies =
            self.subscribe_now(inbox.as_str(), SubscribeOptions::default().buffer(1))?;
        let requester = self.publisher();
        if requester
            .send(&subject, Some(inbox), headers, payload.into())
            .await
            == 0
        {
            return Err(BusError::NoResponders(subject.to_string()));
        }
        match tokio::time::timeout(timeout, replies.recv()).await {
            Ok(Some(Ok(Event::Message(reply)))) => Ok(reply),
            Ok(_) => Err(BusError::NoResponders(subject.to_string())),
            Err(_) => Err(BusError::Timeout(timeout)),
        }
    }
}

/// What `deliver` decided under the buffer's lock.
enum Step {
    /// Full, under backpressure: wait for room in this buffer and try again.
    Wait,
    /// Under backpressure, the bus's total is full: wait for any room.
    WaitTotal,
    /// Buffered: wake the reader.
    Buffered,
    /// Disconnected: wake every reader to see the end.
    Ended,
    /// Dropped: wake the reader, which reports the drop once it has drained
    /// the buffer.
    Dropped,
    /// Nothing more to do (the subscription is gone).
    Done,
}

async fn deliver(sub: &Sub, mut message: Message, inner: &Inner) {
    let size = cost(&message);
    let config = &inner.config;
    let backpressure = sub.options.policy == SlowConsumer::Backpressure;
    // Registering for a wake-up costs a lock in each `Notify`: done only
    // once a first look found no room, and then the look is made again
    // (registered first, so a release in between is not missed).
    let mut armed = false;
    loop {
        let room = sub.room.notified();
        tokio::pin!(room);
        let total_room = inner.total_room.notified();
        tokio::pin!(total_room);
        let registered = armed && backpressure;
        if armed {
            room.as_mut().enable();
        }
        if registered {
            total_room.as_mut().enable();
            // Before reading the total; see `Inner::released`.
            inner.total_waiters.fetch_add(1, Ordering::SeqCst);
        }
        // Whether `size` more bytes pass the total, once `freed` bytes this
        // buffer just dropped (not yet subtracted from the total) are gone.
        let total_full_after = |freed: usize| {
            inner.buffered_bytes.load(Ordering::SeqCst) + size
                > config.max_buffered_bytes.saturating_add(freed)
        };
        let total_full = || total_full_after(0);
        // The guard lives only in this block, never across an await.
        let (step, lost, released) = {
            let mut buffer = lock(&sub.buffer);
            let before = (buffer.dropped, buffer.bytes);
            let own_full = |buffer: &Buffer| {
                buffer.queue.len() >= sub.options.buffer || buffer.bytes + size > sub.max_bytes
            };
            let step = if buffer.closed {
                Step::Done
            } else if backpressure && own_full(&buffer) && size <= sub.max_bytes {
                Step::Wait
            } else if backpressure && total_full() && size <= config.max_buffered_bytes {
                Step::WaitTotal
            } else {
                // Numbered before any drop, so the subscriber sees what it missed.
                buffer.number(&mut message, config.max_publishers_per_subscription);
                if size > sub.max_bytes || size > config.max_buffered_bytes {
                    // No amount of room would fit it: drop it whatever the
                    // policy (emptying the buffer or waiting would not help).
                    buffer.count_dropped(1);
                    Step::Dropped
                } else if !own_full(&buffer) && !total_full() {
                    buffer.push_back(message.clone());
                    Step::Buffered
                } else {
                    match sub.options.policy {
                        SlowConsumer::DropOldest => {
                            // Make room from this subscription's own buffer;
                            // if the total is full with others' messages,
                            // emptying it may not be enough.
                            let over = |buffer: &Buffer| {
                                own_full(buffer) || total_full_after(before.1 - buffer.bytes)
                            };
                            while over(&buffer) && buffer.pop_front().is_some() {
                                buffer.count_dropped(1);
                            }
                            if over(&buffer) {
                                buffer.count_dropped(1);
                                Step::Dropped
                            } else {
                                buffer.push_back(message.clone());
                                Step::Buffered
                            }
                        }
                        SlowConsumer::DropNewest | SlowConsumer::Backpressure => {
                            buffer.count_dropped(1);
                            Step::Dropped
                        }
                        SlowConsumer::Disconnect => {
                            while buffer.pop_front().is_some() {
                                buffer.count_dropped(1);
                            }
                            buffer.count_dropped(1);
                            buffer.closed = true;
                            Step::Ended
                        }
                    }
                }
            };
            // Bytes this buffer gained (`push_back`) or released (drops).
            let (added, released) = if buffer.bytes >= before.1 {
                (buffer.bytes - before.1, 0)
            } else {
                (0, before.1 - buffer.bytes)
            };
            if added > 0 {
                // Counted while the guard is held, so a reader that pops it
                // right after cannot subtract before it was added.
                inner.buffered_bytes.fetch_add(added, Ordering::SeqCst);
            }
            (step, buffer.dropped - before.0, released)
        };
        if registered {
            inner.total_waiters.fetch_sub(1, Ordering::SeqCst);
        }
        inner.released(released);
        if lost > 0 {
            inner.dropped.fetch_add(lost, Ordering::Relaxed);
        }
        match step {
            // Nothing was changed: look again, registered this time.
            Step::Wait | Step::WaitTotal if !armed => armed = true,
            Step::Wait => room.await,
            Step::WaitTotal => {
                // Counted until this wait ends, even if the publish is
                // dropped at it (else every release would keep paying to
                // wake nobody).
                struct Waiting<'a>(&'a AtomicUsize);
                impl Drop for Waiting<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                inner.total_waiters.fetch_add(1, Ordering::SeqCst);
                let _waiting = Waiting(&inner.total_waiters);
                // Re-checked after registering: a release in between is seen.
                if total_full() {
                    total_room.await;
                }
            }
            Step::Buffered | Step::Dropped => return sub.readable.notify_one(),
            Step::Ended => return sub.readable.notify_waiters(),
            Step::Done => return,
        }
    }
}

/// One subscription. Dropping it unsubscribes.
///
/// Receive with [`recv`](Self::recv), [`try_recv`](Self::try_recv) or as a
/// [`futures_core::Stream`] of the same items. All are cancel-safe (in
/// `tokio::select!`, say): an event leaves the buffer only in the
/// synchronous step that returns it, so a receive dropped while it waits
/// loses nothing.
pub struct Subscription {
    id: SubscriptionId,
    sub: Arc<Sub>,
    bus: Weak<Inner>,
    /// A message held back while the gap before it is reported.
    pending_gap: Option<Message>,
    /// Reports of trailing drops, found when the buffer ran empty.
    trailing: VecDeque<Event>,
    /// The wait for the next event (of `recv` and of the stream face alike,
    /// so that mixing them never leaves a stale waiter to take a wake-up),
    /// registered before the buffer is looked at again (so a wake-up in
    /// between is not missed).
    waiting: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>>,
}

impl futures_core::Stream for Subscription {
    type Item = Result<Event, std::convert::Infallible>;

    /// [`Subscription::recv`] as a stream: the same items, as cancel-safe.
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx).map(|event| event.map(Ok))
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("filter", &self.sub.filter)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next event; `None` once the subscription was disconnected (its
    /// policy is [`SlowConsumer::Disconnect`] and it fell behind), after
    /// the gaps that say what was dropped. Cancel-safe (see the type's
    /// docs). Never an error in process: the
    /// `Result` gives it the same signature as
    /// [`RemoteSubscription::recv`](crate::remote::RemoteSubscription::recv).
    pub async fn recv(&mut self) -> Option<Result<Event, std::convert::Infallible>> {
        self.next_event().await.map(Ok)
    }

    pub(crate) async fn next_event(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The one wait behind `recv`, `blocking_recv` and the stream face.
    fn poll_event(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        use std::task::Poll;
        loop {
            if let Some(event) = self.try_recv() {
                self.waiting = None;
                return Poll::Ready(Some(event));
            }
            if lock(&self.sub.buffer).closed {
                self.waiting = None;
                return Poll::Ready(None);
            }
            let fresh = self.waiting.is_none();
            let waiting = self.waiting.get_or_insert_with(|| {
                let sub = self.sub.clone();
                Box::pin(async move { sub.readable.notified().await })
            });
            match std::future::Future::poll(waiting.as_mut(), cx) {
                Poll::Ready(()) => self.waiting = None,
                // Registered only now: look at the buffer once more.
                Poll::Pending if fresh => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// An event that is already there.
    pub fn try_recv(&mut self) -> Option<Event> {
        if let Some(message) = self.pending_gap.take() {
            return Some(Event::Message(message));
        }
        if let Some(event) = self.trailing.pop_front() {
            return Some(event);
        }
        let (message, released) = {
            let mut buffer = lock(&self.sub.buffer);
            let before = buffer.bytes;
            match buffer.pop_front() {
                Some(message) => {
                    let state = buffer.publishers.entry(message.publisher).or_default();
                    let expected = state.delivered;
                    state.delivered = state.delivered.max(message.seq + 1);
                    let gap = message.seq.saturating_sub(expected);
                    buffer.unreported = buffer.unreported.saturating_sub(gap);
                    let released = before - buffer.bytes;
                    if gap > 0 {
                        self.trailing.push_back(Event::Gap {
                            publisher: message.publisher,
                            from: expected,
                            to: message.seq,
                        });
                    }
                    (Some(message), released)
                }
                None => {
                    collect_trailing(&mut buffer, &mut self.trailing);
                    (None, 0)
                }
            }
        };
        if let Some(inner) = self.bus.upgrade() {
            inner.released(released);
        }
        let Some(message) = message else {
            return self.trailing.pop_front();
        };
        self.sub.room.notify_one();
        match self.trailing.pop_front() {
            Some(gap) => {
                self.pending_gap = Some(message);
                Some(gap)
            }
            None => Some(Event::Message(message)),
        }
    }

    /// Messages dropped by this subscription's slow-consumer policy and
    /// byte caps. Exact at any time; [`Event::Gap`] and [`Event::Dropped`]
    /// say which, at the latest once the buffer has drained.
    pub fn dropped(&self) -> u64 {
        lock(&self.sub.buffer).dropped
    }

    /// Messages waiting in its buffer (at most the buffer size).
    pub fn buffered(&self) -> usize {
        lock(&self.sub.buffer).queue.len()
    }

    /// Bytes waiting in its buffer, as the byte caps count them.
    pub fn buffered_bytes(&self) -> usize {
        lock(&self.sub.buffer).bytes
    }

    /// Publishers whose numbering it tracks now (for tests of the bound).
    #[doc(hidden)]
    pub fn tracked_publishers(&self) -> usize {
        lock(&self.sub.buffer).publishers.len()
    }

    /// Counts `count` messages taken from this subscription as dropped after
    /// all (a remote host could not send them). The caller reports them to
    /// the subscriber itself, as gaps.
    pub(crate) fn count_undeliverable(&self, count: u64) {
        lock(&self.sub.buffer).dropped += count;
        if let Some(inner) = self.bus.upgrade() {
            inner.dropped.fetch_add(count, Ordering::Relaxed);
        }
    }
}

/// The buffer is empty: whatever was dropped and not yet reported (no later
/// message from its publisher revealed it) is reported now. At most one
/// report per tracked publisher, so `trailing` stays bounded too.
fn collect_trailing(buffer: &mut Buffer, trailing: &mut VecDeque<Event>) {
    if buffer.unreported == 0 {
        return;
    }
    for (&publisher, state) in buffer.publishers.iter_mut() {
        if state.delivered < state.next {
            trailing.push_back(Event::Gap {
                publisher,
                from: state.delivered,
                to: state.next,
            });
            state.delivered = state.next;
        }
    }
    if buffer.unattributed > 0 {
        trailing.push_back(Event::Dropped {
            count: buffer.unattributed,
        });
        buffer.unattributed = 0;
    }
    buffer.unreported = 0;
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            Bus { inner }.remove(self.id, &self.sub.filter, self.sub.options.group.as_deref());
        }
        // Publishers waiting for room must not wait on a subscription that is gone.
        let released = {
            let mut buffer = lock(&self.sub.buffer);
            buffer.closed = true;
            let released = buffer.bytes;
            buffer.queue.clear();
            buffer.bytes = 0;
            released
        };
        if let Some(inner) = self.bus.upgrade() {
            inner.released(released);
        }
        self.sub.room.notify_waiters();
    }
}
