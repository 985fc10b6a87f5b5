//! The in-process bus: publishers and subscribers in one process, no
//! sockets, no serialization (payloads are shared `Bytes`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;
use tokio::sync::Notify;

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
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            buffer: 1024,
            policy: SlowConsumer::default(),
            group: None,
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
}

/// Why a request got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The subject is invalid.
    #[error(transparent)]
    Subject(#[from] crate::SubjectError),
    /// Nobody subscribes to the subject: the request went nowhere.
    #[error("no responders for {0}")]
    NoResponders(String),
    /// No reply within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
}

/// What a subscription receives.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message.
    Message(Message),
    /// Messages from `publisher` with sequence numbers `from..to` were
    /// dropped (slow-consumer policy) before the next one.
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
    /// numbers may start again from 1.
    Restored,
}

struct Buffer {
    queue: VecDeque<Message>,
    next_seq: HashMap<u64, u64>,
    dropped: u64,
    closed: bool,
}

struct Sub {
    filter: Filter,
    options: SubscribeOptions,
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
struct Inner {
    registry: RwLock<Registry>,
    /// Round-robin position per (filter, group); touched only when a
    /// message matches a queue group.
    turns: Mutex<HashMap<(String, String), usize>>,
    next_id: AtomicU64,
    next_publisher: AtomicU64,
    /// Messages dropped by slow-consumer policies, over all subscriptions.
    dropped: AtomicU64,
}

/// An in-process publish–subscribe bus. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use courier_pubsub::{Bus, Event, SubscribeOptions};
///
/// let bus = Bus::new();
/// let mut eu = bus.subscribe("orders.eu.>", SubscribeOptions::default())?;
/// let publisher = bus.publisher();
/// publisher.publish("orders.eu.created", "tea").await?;
/// publisher.publish("orders.us.created", "coffee").await?; // not for `eu`
///
/// let Some(Event::Message(message)) = eu.recv().await else { panic!() };
/// assert_eq!((message.subject.as_str(), &message.payload[..]), ("orders.eu.created", &b"tea"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Subscribes to `filter`. The subscription is active when this
    /// returns: a message published afterwards is delivered.
    pub fn subscribe(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, crate::SubjectError> {
        let filter = Filter::new(filter)?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let sub = Arc::new(Sub {
            filter: filter.clone(),
            options,
            buffer: Mutex::new(Buffer {
                queue: VecDeque::new(),
                next_seq: HashMap::new(),
                dropped: 0,
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
        Ok(Subscription {
            id,
            sub,
            bus: Arc::downgrade(&self.inner),
            last_seen: HashMap::new(),
            pending_gap: None,
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

    /// Messages dropped by slow-consumer policies so far, over every
    /// subscription (including those gone).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// How many subscriptions are open.
    pub fn subscriptions(&self) -> usize {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .subs
            .len()
    }

    /// The subscriptions a message on `subject` goes to: every plain one,
    /// and one member of each queue group (in turn). Matching holds only a
    /// read lock, so publishers do not exclude each other.
    fn targets(&self, subject: &Subject) -> Vec<Arc<Sub>> {
        let mut ids = Vec::new();
        let registry = self
            .inner
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner());
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
            let turn = turns.entry(key).or_default();
            targets.push(members[*turn % members.len()].clone());
            *turn = turn.wrapping_add(1);
        }
        targets
    }

    fn remove(&self, id: SubscriptionId, filter: &Filter) {
        let mut registry = self
            .inner
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner());
        registry.router.remove(filter, id);
        registry.subs.remove(&id);
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

    /// Delivers `payload` to every subscription matching `subject`. Returns
    /// how many it was delivered (or dropped) to. Waits only for
    /// subscriptions with [`SlowConsumer::Backpressure`].
    pub async fn publish(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> Result<usize, crate::SubjectError> {
        Ok(self.publish_to(&Subject::new(subject)?, payload).await)
    }

    /// [`publish`](Self::publish) to a subject parsed once, for publishers
    /// that send many messages to the same subject.
    pub async fn publish_to(&self, subject: &Subject, payload: impl Into<Bytes>) -> usize {
        self.send(subject, None, payload.into()).await
    }

    /// Answers `request` by publishing `payload` to its `reply_to` subject.
    /// Returns 0 if the request asked for no reply.
    pub async fn reply(&self, request: &Message, payload: impl Into<Bytes>) -> usize {
        match &request.reply_to {
            Some(inbox) => self.send(inbox, None, payload.into()).await,
            None => 0,
        }
    }

    pub(crate) async fn send(
        &self,
        subject: &Subject,
        reply_to: Option<Subject>,
        payload: Bytes,
    ) -> usize {
        let targets = self.bus.targets(subject);
        for sub in &targets {
            let message = Message {
                subject: subject.clone(),
                payload: payload.clone(),
                publisher: self.id,
                seq: 0,
                reply_to: reply_to.clone(),
            };
            deliver(sub, message, &self.bus.inner.dropped).await;
        }
        targets.len()
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
    ) -> Result<Message, RequestError> {
        let subject = Subject::new(subject)?;
        let inbox = Subject::new(&format!(
            "_inbox.{}",
            self.inner.next_id.fetch_add(1, Ordering::Relaxed)
        ))?;
        let mut replies = self.subscribe(inbox.as_str(), SubscribeOptions::default().buffer(1))?;
        let requester = self.publisher();
        if requester.send(&subject, Some(inbox), payload.into()).await == 0 {
            return Err(RequestError::NoResponders(subject.to_string()));
        }
        match tokio::time::timeout(timeout, replies.recv()).await {
            Ok(Some(Event::Message(reply))) => Ok(reply),
            Ok(_) => Err(RequestError::NoResponders(subject.to_string())),
            Err(_) => Err(RequestError::Timeout(timeout)),
        }
    }
}

/// What `deliver` decided under the buffer's lock.
enum Step {
    /// Full, under backpressure: wait for room and try again.
    Wait,
    /// Buffered: wake the reader.
    Buffered,
    /// Disconnected: wake every reader to see the end.
    Ended,
    /// Nothing more to do (dropped, or the subscription is gone).
    Done,
}

async fn deliver(sub: &Sub, mut message: Message, dropped_total: &AtomicU64) {
    loop {
        let room = sub.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        // The guard lives only in this block, never across an await.
        let (step, lost) = {
            let mut buffer = lock(&sub.buffer);
            let before = buffer.dropped;
            let full = buffer.queue.len() >= sub.options.buffer;
            let step = if buffer.closed {
                Step::Done
            } else if full && sub.options.policy == SlowConsumer::Backpressure {
                Step::Wait
            } else {
                // Numbered before any drop, so the subscriber sees what it missed.
                let seq = buffer.next_seq.entry(message.publisher).or_default();
                message.seq = *seq;
                *seq += 1;
                match (full, sub.options.policy) {
                    (false, _) | (true, SlowConsumer::DropOldest) => {
                        if full {
                            buffer.queue.pop_front();
                            buffer.dropped += 1;
                        }
                        buffer.queue.push_back(message.clone());
                        Step::Buffered
                    }
                    (true, SlowConsumer::DropNewest) => {
                        buffer.dropped += 1;
                        Step::Done
                    }
                    (true, _) => {
                        // Disconnect (backpressure was handled above).
                        buffer.dropped += buffer.queue.len() as u64 + 1;
                        buffer.queue.clear();
                        buffer.closed = true;
                        Step::Ended
                    }
                }
            };
            (step, buffer.dropped - before)
        };
        if lost > 0 {
            dropped_total.fetch_add(lost, Ordering::Relaxed);
        }
        match step {
            Step::Wait => room.await,
            Step::Buffered => return sub.readable.notify_one(),
            Step::Ended => return sub.readable.notify_waiters(),
            Step::Done => return,
        }
    }
}

/// One subscription. Dropping it unsubscribes.
pub struct Subscription {
    id: SubscriptionId,
    sub: Arc<Sub>,
    bus: Weak<Inner>,
    last_seen: HashMap<u64, u64>,
    pending_gap: Option<Message>,
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
    /// policy is [`SlowConsumer::Disconnect`] and it fell behind).
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.try_recv() {
                return Some(event);
            }
            let sub = self.sub.clone();
            let readable = sub.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            if let Some(event) = self.try_recv() {
                return Some(event);
            }
            if lock(&self.sub.buffer).closed {
                return None;
            }
            readable.await;
        }
    }

    /// An event that is already there.
    pub fn try_recv(&mut self) -> Option<Event> {
        let message = match self.pending_gap.take() {
            Some(message) => message,
            None => {
                let message = lock(&self.sub.buffer).queue.pop_front()?;
                self.sub.room.notify_one();
                let expected = self
                    .last_seen
                    .get(&message.publisher)
                    .map_or(0, |last| last + 1);
                if message.seq > expected {
                    let gap = Event::Gap {
                        publisher: message.publisher,
                        from: expected,
                        to: message.seq,
                    };
                    self.pending_gap = Some(message);
                    return Some(gap);
                }
                message
            }
        };
        self.last_seen.insert(message.publisher, message.seq);
        Some(Event::Message(message))
    }

    /// Messages dropped by this subscription's slow-consumer policy.
    pub fn dropped(&self) -> u64 {
        lock(&self.sub.buffer).dropped
    }

    /// Messages waiting in its buffer (at most the buffer size).
    pub fn buffered(&self) -> usize {
        lock(&self.sub.buffer).queue.len()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            Bus { inner }.remove(self.id, &self.sub.filter);
        }
        // Publishers waiting for room must not wait on a subscription that is gone.
        lock(&self.sub.buffer).closed = true;
        self.sub.room.notify_waiters();
    }
}
