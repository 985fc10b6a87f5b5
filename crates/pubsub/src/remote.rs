//! The bus served to other processes: a courier-rpc service whose
//! subscriptions are server streams under credit.
//!
//! A subscription is active at the host before [`RemotePubSub::subscribe`]
//! returns (the stream opens with an `Active` marker sent after the host
//! subscribed), so a message published after that is delivered: no slow
//! joiner loss. Slow-consumer policies apply at the host, per
//! subscription, exactly as in process.
//!
//! Messages travel in batches both ways: [`RemotePublisher::publish_batch`]
//! sends many in one call, and a subscription stream carries whatever the
//! host has buffered for it (up to [`MAX_EVENTS_PER_ITEM`] events and
//! [`HostConfig::max_batch_bytes`]) in one frame. A message too large to
//! travel in a frame of its own is dropped, counted and reported as a gap;
//! every message is either received or counted.
//!
//! The host's per-subscription drop count travels with the events, so
//! [`RemoteSubscription::dropped`] is what the host counted, and gaps
//! (including those at the end of a publisher's run) arrive as in process.
//!
//! Client-chosen publisher identities cost the host a bounded map
//! ([`HostConfig::max_publishers`]), and each subscription a bounded one
//! ([`crate::BusConfig::max_publishers_per_subscription`]).
//!
//! A [`RemoteSubscription`] whose host goes away (restart, crash, cut
//! connection) subscribes again by itself, with backoff, and reports
//! [`Event::Restored`] so the subscriber knows it may have missed messages.
//! Durable subscriptions ([`crate::durable`]) keep what a subscriber misses.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_queue::remote::RemoteQueue;
use courier_rpc::{Client, ItemStream, Items, RpcError};
use courier_transport::{Backoff, ErrorKind};

/// Re-exported: what [`RemotePubSub::connect`] takes, so a client needs no
/// other Courier crate.
pub use courier_rpc::ClientConfig;
/// Re-exported, as [`ClientConfig`].
pub use courier_transport::Address;

use crate::durable::{Durable, DurableError};
use crate::{Bus, Event, Message, Publisher, SlowConsumer, Subject, SubscribeOptions};

/// A pub/sub error as it crosses the network.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The subject or filter is invalid (the message names the token).
    #[error("{0}")]
    Invalid(String),
    /// A durable subscription refused or failed.
    #[error("{reason}")]
    Durable {
        /// What went wrong, as the host says it.
        reason: String,
        /// Whether trying again may succeed.
        retryable: bool,
    },
    /// The host keeps no durable subscriptions.
    #[error("this host has no durable subscriptions")]
    NoDurable,
    /// The caller may not do this (nothing else about the connection changes).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The host could not send the subscription's events; the subscription
    /// ended there (what it held is lost, beyond the drop count).
    #[error("the host could not send events: {0}")]
    Undeliverable(String),
    /// A one-way publish was cut short at the host (its deadline passed, or
    /// the host shut down) before it reached every subscriber: some may have
    /// it. Reported by [`RemotePublisher::flush`] inside [`RemoteError::Refused`].
    #[error("a publish was cut short at the host: {0}")]
    Interrupted(String),
    /// [`RemotePublisher::flush`]: the host refused `count` of the one-way
    /// publishes since the last flush; `first` says why it refused the
    /// first of them.
    #[error("{count} publish(es) refused since the last flush; the first: {first}")]
    Refused {
        /// How many were refused.
        count: u64,
        /// Why the first was.
        first: Box<RemoteError>,
    },
}

impl RemoteError {
    /// What kind of failure this is, as an [`ErrorKind`] shared by every
    /// Courier mechanism: a permission denial is [`ErrorKind::Refused`],
    /// an invalid subject or filter [`ErrorKind::InvalidInput`], a host
    /// without durable subscriptions [`ErrorKind::Unsupported`], a publish
    /// cut short [`ErrorKind::Unavailable`], refused publishes the kind of
    /// the first. A durable subscription's failure crosses the network as
    /// text and a retryable flag only: [`ErrorKind::Busy`] when retryable,
    /// otherwise [`ErrorKind::Internal`], as are events the host could not
    /// send.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RemoteError::Invalid(_) => ErrorKind::InvalidInput,
            RemoteError::Durable { retryable, .. } => match retryable {
                true => ErrorKind::Busy,
                false => ErrorKind::Internal,
            },
            RemoteError::NoDurable => ErrorKind::Unsupported,
            RemoteError::PermissionDenied(_) => ErrorKind::Refused,
            RemoteError::Undeliverable(_) => ErrorKind::Internal,
            RemoteError::Interrupted(_) => ErrorKind::Unavailable,
            RemoteError::Refused { first, .. } => first.kind(),
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// Decides what each caller may do on a [`PubSubHost`]. `who` is the
/// caller's identity ([`courier_rpc::caller`]); `None` is anonymous.
pub trait PubSubAccess: Send + Sync + 'static {
    /// May `who` publish to `subject`?
    fn may_publish(&self, who: Option<&str>, subject: &Subject) -> bool;
    /// May `who` send a request (a publish asking for a reply) to `subject`?
    fn may_request(&self, who: Option<&str>, subject: &Subject) -> bool;
    /// May `who` subscribe to `filter` (live or durable)?
    fn may_subscribe(&self, who: Option<&str>, filter: &crate::Filter) -> bool;
}

impl From<crate::SubjectError> for RemoteError {
    fn from(err: crate::SubjectError) -> RemoteError {
        RemoteError::Invalid(err.to_string())
    }
}

impl From<DurableError> for RemoteError {
    fn from(err: DurableError) -> RemoteError {
        match err {
            DurableError::Subject(err) => err.into(),
            err => RemoteError::Durable {
                retryable: err.is_retryable(),
                reason: err.to_string(),
            },
        }
    }
}

/// The most events one subscription stream item carries.
pub const MAX_EVENTS_PER_ITEM: usize = 256;

/// What a subscription stream item may hold, by default: a quarter of the
/// transport's default 4 MiB frame limit, so a batch never nears it.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1 << 20;

/// Client-chosen publisher identities a host remembers, by default.
pub const DEFAULT_MAX_PUBLISHERS: usize = 65_536;

/// Limits of a [`PubSubHost`]; the bus's own are in [`crate::BusConfig`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostConfig {
    /// Client-chosen publisher identities mapped to the host's own. Past
    /// this the least recently used are forgotten: a forgotten client
    /// publisher that publishes again is a new publisher to subscribers
    /// (its sequence numbers start again from 0). Default
    /// [`DEFAULT_MAX_PUBLISHERS`].
    pub max_publishers: usize,
    /// Bytes of events (payloads, subjects and a little more) in one
    /// subscription stream item. Keep it well under the connection's
    /// `max_frame_size`; if a batch still does not fit, the host halves the
    /// frame limit it learns from the refusal and sends smaller ones.
    /// Default [`DEFAULT_MAX_BATCH_BYTES`].
    pub max_batch_bytes: usize,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            max_publishers: DEFAULT_MAX_PUBLISHERS,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
        }
    }
}

impl HostConfig {
    /// With another bound on remembered publisher identities (at least 2).
    pub fn with_max_publishers(mut self, publishers: usize) -> HostConfig {
        self.max_publishers = publishers.max(2);
        self
    }

    /// With another byte bound per stream item (at least 1).
    pub fn with_max_batch_bytes(mut self, bytes: usize) -> HostConfig {
        self.max_batch_bytes = bytes.max(1);
        self
    }
}

/// Client publisher identities and the bus publishers they map to, in two
/// generations: lookups promote from the old to the new, and when the new
/// is full it becomes the old (the old one dropped). So at most `bound`
/// are kept, the least recently used go first, and each step is O(1).
///
/// Each remembers the one-way publishes refused since its last flush, for
/// [`PubSubService::flush`] to report; forgetting a publisher (only when
/// `bound` others publish after it) forgets those too.
#[derive(Debug, Default)]
struct Publishers {
    current: HashMap<u64, Known>,
    previous: HashMap<u64, Known>,
}

#[derive(Debug, Clone)]
struct Known {
    publisher: Publisher,
    /// One-way publishes refused since the last flush: how many, and why
    /// the first was.
    refused: Option<(u64, RemoteError)>,
    /// One-way publishes are applied one at a time per publisher, in the
    /// order of the sequence numbers the client gave them.
    turn: Arc<tokio::sync::Mutex<OneWay>>,
}

/// A publisher's one-way progress at the host.
#[derive(Debug, Default)]
struct OneWay {
    /// The highest client sequence number applied. A frame at or below it
    /// is stale: it comes from a connection the client has since replaced
    /// (its reader still working through what it had buffered) and would
    /// otherwise land after newer messages. It is dropped; the client's
    /// `flush` reports such losses (`PublishesLost`).
    applied: u64,
    /// Frames dropped as stale.
    stale: u64,
}

impl Publishers {
    fn entry(&mut self, id: u64, bound: usize, bus: &Bus) -> &mut Known {
        if !self.current.contains_key(&id) {
            let known = self.previous.remove(&id).unwrap_or_else(|| Known {
                publisher: bus.publisher(),
                refused: None,
                turn: Arc::default(),
            });
            if self.current.len() >= (bound / 2).max(1) {
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(id, known);
        }
        self.current.get_mut(&id).expect("just inserted")
    }

    fn get(&mut self, id: u64, bound: usize, bus: &Bus) -> Publisher {
        self.entry(id, bound, bus).publisher.clone()
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// One message of a [`PubSubService::publish_batch`].
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WirePublish {
    /// Its subject.
    pub subject: String,
    /// Where to reply, for request-reply.
    pub reply_to: Option<String>,
    /// Its bytes.
    pub payload: Bytes,
}

/// A subject on the wire: text, encoded as a string, shared rather than
/// copied where it comes from (the host sends each delivery's subject
/// without allocating; a subscriber decoding one allocates it once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireText(pub Arc<str>);

impl WireText {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for WireText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

std::thread_local! {
    /// The text the last [`WireText`] decoded on this thread: a stream of
    /// messages on one subject shares one allocation for all of them.
    static LAST_TEXT: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
}

impl<'de> serde::Deserialize<'de> for WireText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = WireText;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a subject")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<WireText, E> {
                Ok(WireText(LAST_TEXT.with(|last| {
                    let mut last = last.borrow_mut();
                    match &*last {
                        Some(known) if **known == *text => known.clone(),
                        _ => {
                            let fresh: Arc<str> = Arc::from(text);
                            *last = Some(fresh.clone());
                            fresh
                        }
                    }
                })))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// One item of a subscription stream.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WireEvent {
    /// The subscription is active at the host.
    Active,
    /// A message.
    Message {
        /// Its subject.
        subject: WireText,
        /// Its bytes.
        payload: Bytes,
        /// The publisher.
        publisher: u64,
        /// Per-publisher sequence number, for this subscription.
        seq: u64,
        /// Where to reply, for request-reply.
        reply_to: Option<WireText>,
    },
    /// Messages `from..to` of `publisher` were dropped.
    Gap {
        /// The publisher.
        publisher: u64,
        /// First missing.
        from: u64,
        /// One past the last missing.
        to: u64,
    },
    /// [`Event::Dropped`]: drops of publishers no longer tracked.
    Dropped {
        /// How many.
        count: u64,
    },
    /// The host's drop count for this subscription so far; sent with the
    /// next batch whenever it changed. Not an event for the subscriber.
    DropCount {
        /// Dropped in total.
        total: u64,
    },
}

/// The pub/sub protocol.
#[courier_rpc::service]
pub trait PubSubService {
    /// Publishes under the client-chosen publisher identity `publisher`,
    /// asking for replies on `reply_to` if given. Returns how many live
    /// subscriptions it reached, after storing it in every matching durable
    /// subscription.
    async fn publish(
        &self,
        publisher: u64,
        subject: String,
        reply_to: Option<String>,
        payload: Bytes,
    ) -> Result<u64, RemoteError>;
    /// Publishes one way: nothing comes back. The host applies one-way
    /// publishes in the order they arrive on the connection; a refused one
    /// is remembered for [`flush`](Self::flush).
    #[oneway]
    ///
    /// `seq` is the publisher's own count of its one-way publishes (1, 2,
    /// ...): a frame older than one already applied is dropped, so order
    /// holds across the client's reconnects.
    async fn publish_oneway(
        &self,
        publisher: u64,
        seq: u64,
        subject: String,
        reply_to: Option<String>,
        payload: Bytes,
    );
    /// A request, one way: published to `subject` with `reply_to` as
    /// [`publish`](Self::publish) does. When no live subscription takes it,
    /// or it is refused, the host itself answers on `reply_to` with a
    /// status message (see [`STATUS_NO_RESPONDERS`]), so the requester
    /// learns at once without waiting for an answer to this call.
    #[oneway]
    async fn request_oneway(
        &self,
        requester: u64,
        subject: String,
        reply_to: String,
        payload: Bytes,
    );
    /// Many publishes, one way (one `seq` for the frame), each judged
    /// alone: a refused message is counted for [`flush`](Self::flush) and
    /// the others are published. A durable store that fails refuses every
    /// message it was to store.
    #[oneway]
    async fn publish_batch_oneway(&self, publisher: u64, seq: u64, messages: Vec<WirePublish>);
    /// Answered once every one-way publish sent before it on the
    /// connection has been applied; reports the one-way publishes of
    /// `publisher` refused since its last flush.
    async fn flush(&self, publisher: u64) -> Result<(), RemoteError>;
    /// Publishes many messages in order, as [`publish`](Self::publish)
    /// each; returns the live deliveries in total. All are checked before
    /// any is published: one invalid subject refuses the whole batch.
    async fn publish_batch(
        &self,
        publisher: u64,
        messages: Vec<WirePublish>,
    ) -> Result<u64, RemoteError>;
    /// Subscribes; the stream starts with `[Active]`, then carries batches
    /// of events. `policy`: 0 drop oldest, 1 drop newest, 2 disconnect, 3
    /// backpressure.
    async fn subscribe(
        &self,
        filter: String,
        buffer: u32,
        policy: u8,
        group: Option<String>,
        items: Items<Result<Vec<WireEvent>, RemoteError>>,
    );
    /// Creates (or finds, if the filter is the same) the durable
    /// subscription `name`; returns the queue that holds its messages.
    async fn durable_subscribe(&self, name: String, filter: String) -> Result<String, RemoteError>;
    /// Ends the durable subscription `name`; returns whether it existed.
    async fn durable_unsubscribe(&self, name: String) -> Result<bool, RemoteError>;
    /// The durable subscriptions, as (name, filter).
    async fn durable_list(&self) -> Result<Vec<(String, String)>, RemoteError>;
}

/// Serves a [`Bus`] to other processes.
#[derive(Debug)]
pub struct PubSubHost {
    bus: Bus,
    durable: Option<Durable>,
    config: HostConfig,
    publishers: Mutex<Publishers>,
    counters: Arc<HostCounters>,
    access: Option<Arc<dyn PubSubAccess>>,
    /// Publishes the host's own status answers to requests (one identity
    /// for all, so inboxes track one publisher for them).
    status: Publisher,
}

impl Default for PubSubHost {
    fn default() -> Self {
        PubSubHost::new(Bus::new())
    }
}

impl std::fmt::Debug for dyn PubSubAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PubSubAccess")
    }
}

/// Upper bounds, in microseconds, of the publish latency buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000,
];

/// What a host has done, for metrics. Counters only grow.
#[derive(Debug, Default)]
pub struct HostCounters {
    /// Messages published.
    pub published: AtomicU64,
    /// Live deliveries (each message counts once per subscription it reached).
    pub delivered: AtomicU64,
    /// Copies stored in durable subscriptions.
    pub stored: AtomicU64,
    /// Publish calls refused because a durable subscription could not store them.
    pub refused: AtomicU64,
    /// Publish calls by how long the host took (store and deliver), per
    /// [`LATENCY_BUCKETS_US`] bound, plus one for anything slower.
    pub latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    /// Sum of those latencies, in microseconds.
    pub latency_sum_us: AtomicU64,
}

impl HostCounters {
    fn record(&self, took: Duration) {
        let us = took.as_micros() as u64;
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|bound| us <= *bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

impl PubSubHost {
    /// A host for `bus` (which local publishers and subscribers may share),
    /// without durable subscriptions.
    pub fn new(bus: Bus) -> PubSubHost {
        PubSubHost {
            status: bus.publisher(),
            bus,
            durable: None,
            config: HostConfig::default(),
            publishers: Mutex::default(),
            counters: Arc::default(),
            access: None,
        }
    }

    /// The same host with these limits.
    pub fn with_config(mut self, config: HostConfig) -> PubSubHost {
        self.config = config;
        self
    }

    /// Client publisher identities remembered now (for tests of the bound).
    #[doc(hidden)]
    pub fn tracked_publishers(&self) -> usize {
        self.publishers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The same host, asking `access` before every publish and subscribe.
    pub fn with_access(mut self, access: Arc<dyn PubSubAccess>) -> PubSubHost {
        self.access = Some(access);
        self
    }

    fn check_publish(&self, subject: &Subject, request: bool) -> Result<(), RemoteError> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let who = courier_rpc::caller();
        let allowed = if request {
            access.may_request(who.as_deref(), subject)
        } else {
            access.may_publish(who.as_deref(), subject)
        };
        if allowed {
            Ok(())
        } else {
            Err(RemoteError::PermissionDenied(format!(
                "{} to {subject}",
                if request { "requests" } else { "publishing" }
            )))
        }
    }

    fn check_subscribe(&self, filter: &str) -> Result<(), RemoteError> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let filter = crate::Filter::new(filter)?;
        if access.may_subscribe(courier_rpc::caller().as_deref(), &filter) {
            Ok(())
        } else {
            Err(RemoteError::PermissionDenied(format!(
                "subscribing to {filter}"
            )))
        }
    }

    /// The host's counters (keep this before handing the host to a server).
    pub fn counters(&self) -> Arc<HostCounters> {
        self.counters.clone()
    }

    /// A host for `bus` that keeps `durable` subscriptions. Serve their
    /// queues (the same `QueueSet`) with a `courier_queue::remote::QueueHost`
    /// on the same server so that subscribers can consume them.
    pub fn with_durable(bus: Bus, durable: Durable) -> PubSubHost {
        PubSubHost {
            durable: Some(durable),
            ..PubSubHost::new(bus)
        }
    }

    fn publisher(&self, id: u64) -> Publisher {
        let mut publishers = self.publishers.lock().unwrap_or_else(|p| p.into_inner());
        publishers.get(id, self.config.max_publishers, &self.bus)
    }

    /// Applies a one-way publish of `count` messages numbered `seq` by its
    /// publisher: one at a time per publisher, dropping a frame older than
    /// one already applied, and remembering a refusal (or a cut-short run)
    /// for the publisher's next flush.
    async fn apply_one_way(
        &self,
        publisher: u64,
        seq: u64,
        count: u64,
        publish: impl std::future::Future<Output = Result<(), (u64, RemoteError)>>,
    ) {
        let turn = self.turn_of(publisher);
        let mut progress = turn.lock().await;
        if seq <= progress.applied {
            progress.stale += count;
            return;
        }
        progress.applied = seq;
        let mut pending = Unapplied::new(self, publisher, count);
        if let Err((refused, err)) = publish.await {
            self.refused(publisher, refused, err);
        }
        pending.done();
    }

    /// Checks one message of a batch: its subjects and the caller's right
    /// to publish there. Batches often repeat a subject, so one equal to
    /// the previous message's (`last`, already checked) is not parsed again.
    fn parse_publish(
        &self,
        last: Option<&Subject>,
        m: WirePublish,
    ) -> Result<(Subject, Option<Subject>, Bytes), RemoteError> {
        let subject = match last {
            Some(last) if last.as_str() == m.subject => last.clone(),
            _ => Subject::new(&m.subject)?,
        };
        let reply_to = m.reply_to.map(|r| Subject::new(&r)).transpose()?;
        self.check_publish(&subject, reply_to.is_some())?;
        Ok((subject, reply_to, m.payload))
    }

    /// The lock that orders `publisher`'s one-way publishes.
    fn turn_of(&self, publisher: u64) -> Arc<tokio::sync::Mutex<OneWay>> {
        let mut publishers = self.publishers.lock().unwrap_or_else(|p| p.into_inner());
        publishers
            .entry(publisher, self.config.max_publishers, &self.bus)
            .turn
            .clone()
    }

    /// Remembers `count` one-way publishes of `publisher` refused with
    /// `err`, for its next flush.
    fn refused(&self, publisher: u64, count: u64, err: RemoteError) {
        let mut publishers = self.publishers.lock().unwrap_or_else(|p| p.into_inner());
        let known = publishers.entry(publisher, self.config.max_publishers, &self.bus);
        match &mut known.refused {
            Some((refused, _)) => *refused += count,
            None => known.refused = Some((count, err)),
        }
    }

    fn durable(&self) -> Result<&Durable, RemoteError> {
        self.durable.as_ref().ok_or(RemoteError::NoDurable)
    }

    /// Stores in durable subscriptions, then delivers live.
    async fn publish_all(
        &self,
        publisher: u64,
        messages: Vec<(Subject, Option<Subject>, Bytes)>,
    ) -> Result<u64, RemoteError> {
        let started = std::time::Instant::now();
        let counters = &self.counters;
        if let Some(durable) = &self.durable {
            match durable.store(&messages).await {
                Ok(stored) => counters.stored.fetch_add(stored as u64, Ordering::Relaxed),
                Err(err) => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(err.into());
                }
            };
        }
        let local = self.publisher(publisher);
        let count = messages.len() as u64;
        let delivered = local.send_all(messages).await as u64;
        counters.published.fetch_add(count, Ordering::Relaxed);
        counters.delivered.fetch_add(delivered, Ordering::Relaxed);
        counters.record(started.elapsed());
        Ok(delivered)
    }
}

/// A one-way publish under way at the host. Dropped before [`done`]
/// (the call was cut short: its deadline, a shutdown), it is recorded as
/// interrupted, so the publisher's next flush reports it.
///
/// [`done`]: Unapplied::done
struct Unapplied<'a> {
    host: &'a PubSubHost,
    publisher: u64,
    count: u64,
    done: bool,
}

impl<'a> Unapplied<'a> {
    fn new(host: &'a PubSubHost, publisher: u64, count: u64) -> Unapplied<'a> {
        Unapplied {
            host,
            publisher,
            count,
            done: false,
        }
    }

    fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for Unapplied<'_> {
    fn drop(&mut self) {
        if !self.done {
            let reason = "cut short before it reached every subscriber".to_string();
            self.host
                .refused(self.publisher, self.count, RemoteError::Interrupted(reason));
        }
    }
}

fn wire_event(event: Event) -> Option<WireEvent> {
    Some(match event {
        Event::Message(m) => WireEvent::Message {
            subject: WireText(m.subject.shared_text()),
            payload: m.payload,
            publisher: m.publisher,
            seq: m.seq,
            reply_to: m.reply_to.map(|r| WireText(r.shared_text())),
        },
        Event::Gap {
            publisher,
            from,
            to,
        } => WireEvent::Gap {
            publisher,
            from,
            to,
        },
        Event::Dropped { count } => WireEvent::Dropped { count },
        _ => return None,
    })
}

/// What a wire event counts against [`HostConfig::max_batch_bytes`]: its
/// variable parts plus a margin for the fixed ones (postcard varints).
fn wire_size(event: &WireEvent) -> usize {
    const FIXED: usize = 32;
    match event {
        WireEvent::Message {
            subject,
            payload,
            reply_to,
            ..
        } => FIXED + subject.0.len() + payload.len() + reply_to.as_ref().map_or(0, |r| r.0.len()),
        _ => FIXED,
    }
}

fn policy_code(policy: SlowConsumer) -> u8 {
    match policy {
        SlowConsumer::DropOldest => 0,
        SlowConsumer::DropNewest => 1,
        SlowConsumer::Disconnect => 2,
        SlowConsumer::Backpressure => 3,
    }
}

fn policy_from(code: u8) -> SlowConsumer {
    match code {
        1 => SlowConsumer::DropNewest,
        2 => SlowConsumer::Disconnect,
        3 => SlowConsumer::Backpressure,
        _ => SlowConsumer::DropOldest,
    }
}

impl PubSubService for PubSubHost {
    async fn publish(
        &self,
        publisher: u64,
        subject: String,
        reply_to: Option<String>,
        payload: Bytes,
    ) -> Result<u64, RemoteError> {
        let subject = Subject::new(&subject)?;
        let reply_to = reply_to.map(|r| Subject::new(&r)).transpose()?;
        self.check_publish(&subject, reply_to.is_some())?;
        self.publish_all(publisher, vec![(subject, reply_to, payload)])
            .await
    }

    async fn publish_oneway(
        &self,
        publisher: u64,
        seq: u64,
        subject: String,
        reply_to: Option<String>,
        payload: Bytes,
    ) {
        let publish = async {
            match self.publish(publisher, subject, reply_to, payload).await {
                Ok(_) => Ok(()),
                Err(err) => Err((1, err)),
            }
        };
        self.apply_one_way(publisher, seq, 1, publish).await;
    }

    async fn request_oneway(
        &self,
        requester: u64,
        subject: String,
        reply_to: String,
        payload: Bytes,
    ) {
        // The host answers only into an inbox the caller itself may
        // listen on (`_inbox.<id>`, or `_inbox.<id>.<n>` under
        // `_inbox.<id>.*`), never into a subject of someone else's.
        let inbox = Subject::new(&reply_to).ok().filter(|inbox| {
            let listens_on = match inbox.tokens() {
                [first, id] if &**first == "_inbox" => format!("_inbox.{id}"),
                [first, id, _] if &**first == "_inbox" => format!("_inbox.{id}.*"),
                _ => return false,
            };
            self.check_subscribe(&listens_on).is_ok()
        });
        let outcome = self
            .publish(requester, subject, Some(reply_to), payload)
            .await;
        let Some(inbox) = inbox else {
            return;
        };
        let (status, body) = match outcome {
            Ok(0) => (STATUS_NO_RESPONDERS, Bytes::new()),
            Ok(_) => return,
            Err(err) => (
                STATUS_REFUSED,
                postcard::to_allocvec(&err).map_or_else(|_| Bytes::new(), Bytes::from),
            ),
        };
        let status = Subject::new(status).expect("a valid status subject");
        // From the host itself: never stored.
        self.status.send(&inbox, Some(status), body).await;
    }

    /// Unlike the confirmed `publish_batch`, each message is judged alone:
    /// a publisher's sender task puts separate `publish` calls into one
    /// frame, and one refused call must not take the others with it.
    async fn publish_batch_oneway(&self, publisher: u64, seq: u64, messages: Vec<WirePublish>) {
        let count = messages.len() as u64;
        let publish = async {
            let mut parsed: Vec<(Subject, Option<Subject>, Bytes)> =
                Vec::with_capacity(messages.len());
            let mut refused: Option<(u64, RemoteError)> = None;
            for m in messages {
                match self.parse_publish(parsed.last().map(|p| &p.0), m) {
                    Ok(message) => parsed.push(message),
                    Err(err) => match &mut refused {
                        Some((n, _)) => *n += 1,
                        None => refused = Some((1, err)),
                    },
                }
            }
            if let Some((n, err)) = refused {
                self.refused(publisher, n, err);
            }
            let stored = parsed.len() as u64;
            if stored == 0 {
                return Ok(());
            }
            match self.publish_all(publisher, parsed).await {
                Ok(_) => Ok(()),
                Err(err) => Err((stored, err)),
            }
        };
        self.apply_one_way(publisher, seq, count, publish).await;
    }

    async fn flush(&self, publisher: u64) -> Result<(), RemoteError> {
        let refused = {
            let mut publishers = self.publishers.lock().unwrap_or_else(|p| p.into_inner());
            publishers
                .entry(publisher, self.config.max_publishers, &self.bus)
                .refused
                .take()
        };
        match refused {
            Some((count, first)) => Err(RemoteError::Refused {
                count,
                first: Box::new(first),
            }),
            None => Ok(()),
        }
    }

    async fn publish_batch(
        &self,
        publisher: u64,
        messages: Vec<WirePublish>,
    ) -> Result<u64, RemoteError> {
        let mut parsed: Vec<(Subject, Option<Subject>, Bytes)> = Vec::with_capacity(messages.len());
        for m in messages {
            let message = self.parse_publish(parsed.last().map(|p| &p.0), m)?;
            parsed.push(message);
        }
        self.publish_all(publisher, parsed).await
    }

    async fn subscribe(
        &self,
        filter: String,
        buffer: u32,
        policy: u8,
        group: Option<String>,
        items: Items<Result<Vec<WireEvent>, RemoteError>>,
    ) {
        if let Err(err) = self.check_subscribe(&filter) {
            let _ = items.send(Err(err)).await;
            return;
        }
        let mut options = SubscribeOptions::default()
            .buffer(buffer as usize)
            .policy(policy_from(policy));
        if let Some(group) = group {
            options = options.group(group);
        }
        let mut subscription = match self.bus.subscribe_now(&filter, options) {
            Ok(subscription) => subscription,
            Err(err) => {
                let _ = items.send(Err(err.into())).await;
                return;
            }
        };
        if items.send(Ok(vec![WireEvent::Active])).await.is_err() {
            return;
        }
        forward(&mut subscription, &items, self.config.max_batch_bytes).await;
    }

    async fn durable_subscribe(&self, name: String, filter: String) -> Result<String, RemoteError> {
        self.check_subscribe(&filter)?;
        self.durable()?.subscribe(&name, &filter).await?;
        Ok(crate::durable::queue_name(&name))
    }

    async fn durable_unsubscribe(&self, name: String) -> Result<bool, RemoteError> {
        let durable = self.durable()?;
        // Only someone who could subscribe to its filter may end it.
        if let Some((_, filter)) = durable.list().into_iter().find(|(n, _)| *n == name) {
            self.check_subscribe(&filter)?;
        }
        Ok(durable.unsubscribe(&name).await?)
    }

    async fn durable_list(&self) -> Result<Vec<(String, String)>, RemoteError> {
        Ok(self.durable()?.list())
    }
}

/// Sends a subscription's events until the client goes away (the call is
/// cancelled and the subscription dropped) or the subscription is
/// disconnected. Events are taken from the subscription only into a bounded
/// batch, and none is ever lost without a count: a batch the connection
/// refuses as too large is split, a single message that still does not fit
/// becomes a counted gap, and anything else that cannot be sent ends the
/// stream with an error the subscriber sees.
async fn forward(
    subscription: &mut crate::Subscription,
    items: &Items<Result<Vec<WireEvent>, RemoteError>>,
    max_batch_bytes: usize,
) {
    let mut budget = max_batch_bytes.max(1);
    // Events taken but not yet sent: at most one batch, put back by a split.
    let mut carry: VecDeque<WireEvent> = VecDeque::new();
    let mut reported_drops = 0;
    loop {
        if carry.is_empty() {
            match subscription.next_event().await {
                Some(event) => carry.extend(wire_event(event)),
                None => {
                    // Disconnected as a slow consumer: say how many, then end.
                    let total = subscription.dropped();
                    if total != reported_drops {
                        let _ = items.send(Ok(vec![WireEvent::DropCount { total }])).await;
                    }
                    return;
                }
            }
        }
        // Whatever else is buffered goes in the same frame, within bounds;
        // the first event always goes, however large.
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < MAX_EVENTS_PER_ITEM {
            let next = match carry.pop_front() {
                Some(event) => event,
                None => match subscription.try_recv() {
                    Some(event) => match wire_event(event) {
                        Some(event) => event,
                        None => continue,
                    },
                    None => break,
                },
            };
            let size = wire_size(&next);
            if !batch.is_empty() && bytes + size > budget {
                carry.push_front(next);
                break;
            }
            bytes += size;
            batch.push(next);
        }
        let total = subscription.dropped();
        if total != reported_drops {
            // First, so the count is current when the events are read.
            batch.insert(0, WireEvent::DropCount { total });
        }
        let batch = Ok(batch);
        match items.send_checked(&batch).await {
            Ok(()) => {
                reported_drops = total;
                continue;
            }
            Err(courier_rpc::ItemError::Closed(_)) => return,
            Err(courier_rpc::ItemError::TooLarge { limit, .. }) => {
                let Ok(mut batch) = batch else { return };
                batch.retain(|e| !matches!(e, WireEvent::DropCount { .. }));
                if batch.len() > 1 {
                    // Smaller batches from now on; these go back in front.
                    budget = budget.min(limit / 2).max(1);
                    for event in batch.into_iter().rev() {
                        carry.push_front(event);
                    }
                    continue;
                }
                // One message alone is too large for the connection: it is
                // dropped, counted, and reported as a gap.
                if let Some(WireEvent::Message { publisher, seq, .. }) = batch.pop() {
                    subscription.count_undeliverable(1);
                    carry.push_front(WireEvent::Gap {
                        publisher,
                        from: seq,
                        to: seq + 1,
                    });
                } else {
                    let reason = format!("an event exceeds the frame limit of {limit} bytes");
                    let _ = items.send(Err(RemoteError::Undeliverable(reason))).await;
                    return;
                }
            }
            Err(err) => {
                let _ = items
                    .send(Err(RemoteError::Undeliverable(err.to_string())))
                    .await;
                return;
            }
        }
    }
}

/// What can go wrong using a remote bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemotePubSubError {
    /// The call failed (host unreachable, deadline, ...).
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The host refused.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The host broke the protocol (a stream that did not start with `Active`).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A request found nobody subscribed to its subject.
    #[error("no responders for {0}")]
    NoResponders(String),
    /// A request got no reply within its timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// [`RemotePublisher::flush`]: the connection was lost after one-way
    /// publishes since the last flush were sent, so some may never have
    /// reached the host. Retryable (publish them again if they matter, or
    /// use [`RemotePublisher::publish_confirmed`]).
    #[error(
        "the connection to the host was lost after publishes were sent; some may not have arrived"
    )]
    PublishesLost,
}

impl RemotePubSubError {
    /// What kind of failure this is: the call's ([`RpcError::kind`]) or
    /// the host's ([`RemoteError::kind`]), so a permission denial is
    /// [`ErrorKind::Refused`] either way; a request that got no reply, or
    /// found nobody to answer it, is [`ErrorKind::TimedOut`]; publishes
    /// lost with the connection [`ErrorKind::Unavailable`]; a host that
    /// broke the protocol [`ErrorKind::Unsupported`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            RemotePubSubError::Rpc(err) => err.kind(),
            RemotePubSubError::Remote(err) => err.kind(),
            RemotePubSubError::Protocol(_) => ErrorKind::Unsupported,
            RemotePubSubError::NoResponders(_) | RemotePubSubError::Timeout(_) => {
                ErrorKind::TimedOut
            }
            RemotePubSubError::PublishesLost => ErrorKind::Unavailable,
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

// Subscriptions' streams have no deadline: they end when dropped or when
// the connection dies, not at a time.

/// How long a subscription keeps trying to restore itself after losing its
/// host, unless changed with [`RemotePubSub::with_restore_window`].
pub const DEFAULT_RESTORE_WINDOW: Duration = Duration::from_secs(300);

/// A bus on a [`PubSubHost`] in another process.
#[derive(Clone, Debug)]
pub struct RemotePubSub {
    client: PubSubServiceClient,
    /// The publishers' connection, made when the first publisher is: one
    /// of its own, because the host applies one-way publishes inline and a
    /// publish waiting on a `Backpressure` subscription would otherwise
    /// hold up the credit that the same connection's subscriptions need
    /// to make room. Shared by every publisher of this bus (and its clones).
    publishing: Arc<std::sync::OnceLock<PubSubServiceClient>>,
    restore_window: Duration,
    inbox: Arc<tokio::sync::Mutex<Option<Arc<Inbox>>>>,
    /// The publisher [`RemotePubSub::publish`] uses, made on first use.
    own: Arc<std::sync::OnceLock<RemotePublisher>>,
}

type Waiting = Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Message>>>;

/// One subscription, `_inbox.<id>.*`, shared by every request a
/// [`RemotePubSub`] sends: each request waits for the reply to its own
/// `_inbox.<id>.<n>`, so a request costs one publish, not a subscription.
struct Inbox {
    prefix: String,
    /// The publisher identity every request from this client uses: a fresh
    /// one per request would cost the host and every responder's
    /// subscription an entry per request.
    requester: u64,
    next: AtomicU64,
    waiting: Arc<Waiting>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Hands each reply to the request waiting for it.
async fn route_replies(mut replies: RemoteSubscription, waiting: Arc<Waiting>) {
    while let Some(event) = replies.recv().await {
        let Ok(Event::Message(reply)) = event else {
            continue; // Restored (requests in flight time out), or an error.
        };
        let n = reply
            .subject
            .tokens()
            .last()
            .and_then(|t| t.parse::<u64>().ok());
        let waiter = n.and_then(|n| lock_waiting(&waiting).remove(&n));
        if let Some(waiter) = waiter {
            let _ = waiter.send(reply);
        }
    }
}

fn lock_waiting(
    waiting: &Waiting,
) -> std::sync::MutexGuard<'_, HashMap<u64, tokio::sync::oneshot::Sender<Message>>> {
    waiting.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn fresh_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

impl RemotePubSub {
    /// Connects to the host at `address`.
    pub async fn connect(
        address: &Address,
        config: ClientConfig,
    ) -> Result<RemotePubSub, RemotePubSubError> {
        Ok(RemotePubSub::with_client(
            Client::connect(address, config).await?,
        ))
    }

    /// Connects to whichever of `addresses` answers first; when that host
    /// goes, the client moves to the next and subscriptions restore
    /// themselves there (see [`Client::connect_any`]).
    pub async fn connect_any(
        addresses: &[Address],
        config: ClientConfig,
    ) -> Result<RemotePubSub, RemotePubSubError> {
        Ok(RemotePubSub::with_client(
            Client::connect_any(addresses, config).await?,
        ))
    }

    /// Uses an existing client (and its connection).
    pub fn with_client(client: Client) -> RemotePubSub {
        RemotePubSub {
            client: PubSubServiceClient::new(client),
            publishing: Arc::default(),
            restore_window: DEFAULT_RESTORE_WINDOW,
            inbox: Arc::default(),
            own: Arc::default(),
        }
    }

    /// The client underneath, to reach other services on the same host.
    pub fn client(&self) -> &Client {
        self.client.client()
    }

    /// The same bus, whose subscriptions give up restoring themselves after
    /// `window` without a host (and then return the error).
    pub fn with_restore_window(mut self, window: Duration) -> RemotePubSub {
        self.restore_window = window;
        self
    }

    /// A publisher with a fresh identity.
    ///
    /// Publishers use a connection of their own (one per bus, made on the
    /// first publish), apart from the bus's subscriptions and requests.
    pub fn publisher(&self) -> RemotePublisher {
        let client = self.publishing().clone();
        RemotePublisher {
            client,
            id: fresh_id(),
            shared: Arc::new(PublisherShared::default()),
        }
    }

    /// Publishes one way under this bus's own publisher identity (one for
    /// every call and every clone, so subscribers see these in the order
    /// they were made); see [`RemotePublisher::publish`]. The same
    /// signature as [`Bus::publish`].
    pub async fn publish(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), RemotePubSubError> {
        self.own_publisher().publish(subject, payload).await
    }

    /// Publishes many messages one way, in order, under this bus's own
    /// publisher identity; see [`RemotePublisher::publish_batch`].
    pub async fn publish_batch<S: Into<String>, P: Into<Bytes>>(
        &self,
        messages: impl IntoIterator<Item = (S, P)>,
    ) -> Result<(), RemotePubSubError> {
        self.own_publisher().publish_batch(messages).await
    }

    fn own_publisher(&self) -> &RemotePublisher {
        self.own.get_or_init(|| self.publisher())
    }

    /// The publishers' connection (see [`publisher`](Self::publisher)).
    fn publishing(&self) -> &PubSubServiceClient {
        self.publishing
            .get_or_init(|| PubSubServiceClient::new(self.client.client().separate()))
    }

    /// Sends a request to `subject` and waits at most `timeout` for the
    /// first reply; see [`Bus::request`]. Requests share one inbox
    /// subscription, made on the first. A request is one way and shares
    /// the publishers' connection, where the host applies it inline: one
    /// waiting for room in a full `Backpressure` subscription holds up this
    /// bus's publishes until there is room, so a responder on the same bus
    /// should answer with [`RemotePublisher::reply`] (queued, never
    /// waiting on the host), not with a confirmed publish.
    pub async fn request(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Message, RemotePubSubError> {
        let inbox = self.inbox().await?;
        let n = inbox.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock_waiting(&inbox.waiting).insert(n, tx);
        // Forgets the request however this ends.
        struct Forget<'a>(&'a Waiting, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                lock_waiting(self.0).remove(&self.1);
            }
        }
        let _forget = Forget(&inbox.waiting, n);
        Subject::validate(subject).map_err(RemoteError::from)?;
        // One way, so a request costs one frame each way plus the reply:
        // the host answers one nobody takes (or that it refuses) on the
        // inbox itself. It goes on the publishers' connection, because the
        // host applies it inline, and one waiting on a full `Backpressure`
        // subscription must not hold up the subscriptions' own connection.
        self.publishing()
            .client()
            .notify(
                SERVICE,
                "request_oneway",
                PubSubServiceClient::method_fingerprint("request_oneway")
                    .expect("a method of PubSubService"),
                &(
                    inbox.requester,
                    subject,
                    format!("{}.{n}", inbox.prefix),
                    payload.into(),
                ),
            )
            .await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => match reply.reply_to.as_ref().map(Subject::as_str) {
                Some(STATUS_NO_RESPONDERS) => {
                    Err(RemotePubSubError::NoResponders(subject.to_string()))
                }
                Some(STATUS_REFUSED) => Err(postcard::from_bytes::<RemoteError>(&reply.payload)
                    .map_or_else(
                        |err| RemotePubSubError::Protocol(format!("an unreadable refusal: {err}")),
                        RemotePubSubError::Remote,
                    )),
                _ => Ok(reply),
            },
            Ok(Err(_)) => Err(RemotePubSubError::NoResponders(subject.to_string())),
            Err(_) => Err(RemotePubSubError::Timeout(timeout)),
        }
    }

    /// The shared inbox, subscribed on first use.
    async fn inbox(&self) -> Result<Arc<Inbox>, RemotePubSubError> {
        let mut slot = self.inbox.lock().await;
        if let Some(inbox) = slot.as_ref().filter(|i| !i.task.is_finished()) {
            return Ok(inbox.clone());
        }
        let prefix = format!("_inbox.{}", fresh_id());
        let replies = self
            .subscribe(
                &format!("{prefix}.*"),
                SubscribeOptions::default().buffer(4096),
            )
            .await?;
        let waiting: Arc<Waiting> = Arc::default();
        let task = tokio::spawn(route_replies(replies, waiting.clone()));
        let inbox = Arc::new(Inbox {
            prefix,
            requester: fresh_id(),
            next: AtomicU64::new(0),
            waiting,
            task,
        });
        *slot = Some(inbox.clone());
        Ok(inbox)
    }

    /// Subscribes; returns once the subscription is active at the host.
    /// If the host goes away, the subscription restores itself (see
    /// [`Event::Restored`]).
    pub async fn subscribe(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> Result<RemoteSubscription, RemotePubSubError> {
        let stream = open_subscription(&self.client, filter, &options).await?;
        let counts = Arc::new(SubscriptionCounts::default());
        Ok(RemoteSubscription {
            state: Some(Box::new(SubscriptionState {
                stream,
                pending: VecDeque::new(),
                last_subject: None,
                client: self.client.clone(),
                filter: filter.to_string(),
                options,
                restore_window: self.restore_window,
                counts: counts.clone(),
            })),
            in_flight: None,
            counts,
        })
    }

    /// Creates (or finds, if its filter is the same) the durable
    /// subscription `name` on `filter`, and returns its queue on the same
    /// host: consume it like any queue, and decode each delivery with
    /// [`DurableMessage::decode`](crate::durable::DurableMessage::decode).
    pub async fn durable(
        &self,
        name: &str,
        filter: &str,
    ) -> Result<RemoteQueue, RemotePubSubError> {
        let queue = self
            .client
            .durable_subscribe(name.to_string(), filter.to_string())
            .await??;
        Ok(RemoteQueue::with_client(self.client().clone(), &queue))
    }

    /// Ends the durable subscription `name`; returns whether it existed.
    pub async fn durable_unsubscribe(&self, name: &str) -> Result<bool, RemotePubSubError> {
        Ok(self.client.durable_unsubscribe(name.to_string()).await??)
    }

    /// The host's durable subscriptions, as (name, filter).
    pub async fn durable_list(&self) -> Result<Vec<(String, String)>, RemotePubSubError> {
        Ok(self.client.durable_list().await??)
    }
}

async fn open_subscription(
    client: &PubSubServiceClient,
    filter: &str,
    options: &SubscribeOptions,
) -> Result<ItemStream<Result<Vec<WireEvent>, RemoteError>>, RemotePubSubError> {
    let mut stream = client
        .without_deadline()
        .subscribe(
            filter.to_string(),
            options.buffer as u32,
            policy_code(options.policy),
            options.group.clone(),
        )
        .await?;
    match stream.next().await {
        Some(Ok(Ok(first))) if first == [WireEvent::Active] => Ok(stream),
        Some(Ok(Err(err))) => Err(err.into()),
        Some(Err(err)) => Err(err.into()),
        other => Err(RemotePubSubError::Protocol(format!(
            "expected [Active], got {other:?}"
        ))),
    }
}

/// Publishes to a remote bus under one identity. Clones share it.
///
/// # Order, errors and flow control
///
/// [`publish`](Self::publish) is one way: it returns once the message is
/// queued for the publisher's sender task, without waiting for the host.
/// That task (one per publisher, started by its first publish) takes
/// everything queued since its last frame and sends it as one batch, so a
/// loop of `publish` calls costs about what `publish_batch` does, while a
/// lone publish still goes out at once. Every subscriber receives one
/// publisher's messages in the order its `publish` calls were made,
/// however many are in flight: calls from one task in that task's order,
/// and for clones used by several tasks, each task's in its own order. A
/// publisher faster than the host is slowed: at most
/// [`PUBLISH_QUEUE_BYTES`] are queued, after which `publish` waits for
/// the task, which itself waits while the connection's send buffer is
/// full, so nothing is buffered without bound. Dropping every clone lets
/// the task send what is queued, then end.
///
/// What the host refuses (a permission, a durable store that failed) is
/// reported by the next [`flush`](Self::flush), which also says whether the
/// connection was lost while publishes since the previous flush were on
/// their way. What can be checked here (the subject, the size against the
/// host's frame limit) fails the `publish` call itself.
/// [`publish_confirmed`](Self::publish_confirmed) waits for the host and
/// answers each message on its own.
#[derive(Clone, Debug)]
pub struct RemotePublisher {
    client: PubSubServiceClient,
    id: u64,
    shared: Arc<PublisherShared>,
}

/// How many bytes of one-way publishes a publisher queues for its sender
/// task before `publish` waits (each message counts its subject, reply
/// subject and payload, plus 64 bytes, so many tiny messages are bounded too).
pub const PUBLISH_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// What a queued message counts beyond its bytes, so that many tiny
/// messages are bounded too.
const QUEUED_OVERHEAD: usize = 64;

/// The most a sender task puts in one frame: batches stay well below any
/// frame limit and short enough to interleave with other traffic.
const SEND_BATCH_BYTES: usize = 256 * 1024;

/// Room a frame needs beyond its messages (header, service and method
/// names, ids, per-message lengths).
const FRAME_MARGIN: usize = 512;

#[derive(Debug)]
struct PublisherShared {
    /// Taken by `flush` and the confirmed publishes: a fair (first come,
    /// first served) lock, so they are ordered among themselves.
    turn: tokio::sync::Mutex<()>,
    /// Where one-way publishes queue, in call order; made with the sender
    /// task on the first. Only the publisher holds it: dropping the last
    /// clone closes the queue, and the task ends once it has sent it all.
    queue: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Outgoing>>,
    /// Bytes of queued publishes (see [`PUBLISH_QUEUE_BYTES`]).
    room: Arc<tokio::sync::Semaphore>,
    /// The subject of the last one-way `publish`, checked and shared.
    last_subject: std::sync::Mutex<Option<Arc<str>>>,
    /// Shared with the sender task.
    sending: Arc<Sending>,
}

impl Default for PublisherShared {
    fn default() -> Self {
        PublisherShared {
            turn: tokio::sync::Mutex::new(()),
            queue: std::sync::OnceLock::new(),
            room: Arc::new(tokio::sync::Semaphore::new(PUBLISH_QUEUE_BYTES)),
            last_subject: std::sync::Mutex::new(None),
            sending: Arc::default(),
        }
    }
}

/// What the sender task and the publisher share.
#[derive(Debug, Default)]
struct Sending {
    /// The connection epoch of the first frame sent since the last flush
    /// (0: none), and whether a later one went out on another connection
    /// or could not be sent at all.
    unflushed: std::sync::Mutex<(u64, bool)>,
    /// The last sequence number given to a one-way frame (only the sender
    /// task gives them, so they follow the queue's order).
    seq: AtomicU64,
    /// The frame limit of the connection last used (0: not known yet), so
    /// `publish` refuses a message that can never be sent.
    limit: std::sync::atomic::AtomicUsize,
    /// Messages the task could not send because no frame could hold them
    /// (the connection's limit fell after `publish` checked), and the first
    /// one's error: reported by the next flush.
    unsendable: std::sync::Mutex<Option<(u64, RemoteError)>>,
}

impl Sending {
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Notes that a one-way frame went out on connection `epoch`.
    fn sent_on(&self, epoch: u64) {
        let mut unflushed = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
        match unflushed.0 {
            0 => unflushed.0 = epoch,
            first if first != epoch => unflushed.1 = true,
            _ => {}
        }
    }

    /// Notes that a frame was lost before the host could have it.
    fn lost(&self) {
        self.unflushed.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
    }
}

/// One entry of a publisher's queue.
#[derive(Debug)]
enum Outgoing {
    /// Messages to publish, holding their share of the queue's room.
    Publish(Vec<Queued>, tokio::sync::OwnedSemaphorePermit),
    /// One message (most `publish` calls: no `Vec` for it).
    One(Queued, tokio::sync::OwnedSemaphorePermit),
    /// Answered once everything queued before it has been handed to the
    /// connection.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// What a message costs in the queue and in a frame (about).
fn queued_size(message: &Queued) -> usize {
    message.subject.len()
        + message.reply_to.as_ref().map_or(0, |r| r.len())
        + message.payload.len()
        + QUEUED_OVERHEAD
}

/// A publisher's sender task: takes everything queued, sends it in as few
/// frames as fit, answers barriers in order. Ends when the queue closes
/// (every clone of the publisher dropped) and is empty.
async fn send_publishes(
    client: PubSubServiceClient,
    id: u64,
    sending: Arc<Sending>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut taken = Vec::with_capacity(256);
    let mut permits = Vec::new();
    while queue.recv_many(&mut taken, 256).await > 0 {
        let budget = match client.client().max_frame_size().await {
            Some(limit) => {
                sending.limit.store(limit, Ordering::Relaxed);
                limit.saturating_sub(FRAME_MARGIN).min(SEND_BATCH_BYTES)
            }
            None => SEND_BATCH_BYTES,
        };
        let mut framer = Framer {
            batch: Vec::new(),
            bytes: 0,
            budget,
        };
        for item in taken.drain(..) {
            match item {
                Outgoing::One(message, permit) => {
                    permits.push(permit);
                    if let Some(full) = framer.push(message) {
                        send_frame(&client, id, &sending, full).await;
                    }
                }
                Outgoing::Publish(messages, permit) => {
                    permits.push(permit);
                    for message in messages {
                        if let Some(full) = framer.push(message) {
                            send_frame(&client, id, &sending, full).await;
                        }
                    }
                }
                Outgoing::Barrier(done) => {
                    if let Some(batch) = framer.take() {
                        send_frame(&client, id, &sending, batch).await;
                    }
                    permits.clear();
                    let _ = done.send(());
                }
            }
        }
        if let Some(batch) = framer.take() {
            send_frame(&client, id, &sending, batch).await;
        }
        // Room comes back once the bytes are on the connection.
        permits.clear();
    }
}

/// Gathers queued messages into frames of at most `budget` bytes.
struct Framer {
    batch: Vec<Queued>,
    bytes: usize,
    budget: usize,
}

impl Framer {
    /// Adds a message; returns the batch before it when it does not fit.
    fn push(&mut self, message: Queued) -> Option<Vec<Queued>> {
        let size = queued_size(&message);
        let full = if !self.batch.is_empty() && self.bytes + size > self.budget {
            self.take()
        } else {
            None
        };
        self.bytes += size;
        self.batch.push(message);
        full
    }

    /// The batch so far, if any.
    fn take(&mut self) -> Option<Vec<Queued>> {
        self.bytes = 0;
        (!self.batch.is_empty()).then(|| std::mem::take(&mut self.batch))
    }
}

/// Sends one batch as one-way frames: split in halves while the frame
/// limit refuses it; a single message no frame can hold is counted as
/// unsendable (reported by the next flush).
async fn send_frame(client: &PubSubServiceClient, id: u64, sending: &Sending, batch: Vec<Queued>) {
    let mut pending = vec![batch];
    while let Some(batch) = pending.pop() {
        let seq = sending.next_seq();
        let sent = client
            .client()
            .notify(
                SERVICE,
                "publish_batch_oneway",
                PubSubServiceClient::method_fingerprint("publish_batch_oneway")
                    .expect("a method of PubSubService"),
                &(id, seq, &batch),
            )
            .await;
        match sent {
            Ok(epoch) => {
                sending.sent_on(epoch);
                // The connection exists now: `publish` can check sizes.
                if let Some(limit) = client.client().max_frame_size().await {
                    sending.limit.store(limit, Ordering::Relaxed);
                }
            }
            Err(RpcError::TooLarge { .. }) if batch.len() > 1 => {
                let mut first = batch;
                let second = first.split_off(first.len() / 2);
                // Popped next: the first half goes first.
                pending.push(second);
                pending.push(first);
            }
            Err(err @ RpcError::TooLarge { .. }) => {
                let mut unsendable = sending.unsendable.lock().unwrap_or_else(|p| p.into_inner());
                let entry =
                    unsendable.get_or_insert_with(|| (0, RemoteError::Invalid(err.to_string())));
                entry.0 += 1;
            }
            // The connection failed: flush reports the loss.
            Err(_) => sending.lost(),
        }
    }
}

/// A message in a publisher's queue: a [`WirePublish`] on the wire (it
/// serializes field for field the same), with its subject shared, so a
/// publisher sending to one subject again and again allocates nothing for it.
#[derive(Debug)]
struct Queued {
    subject: Arc<str>,
    reply_to: Option<Arc<str>>,
    payload: Bytes,
}

impl serde::Serialize for Queued {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut fields = serializer.serialize_struct("WirePublish", 3)?;
        fields.serialize_field("subject", &*self.subject)?;
        fields.serialize_field("reply_to", &self.reply_to.as_deref())?;
        fields.serialize_field("payload", &self.payload)?;
        fields.end()
    }
}

/// A batch for the queue, every subject checked first.
fn wire_batch<S: Into<String>, P: Into<Bytes>>(
    messages: impl IntoIterator<Item = (S, P)>,
) -> Result<Vec<Queued>, RemotePubSubError> {
    let mut batch: Vec<Queued> = Vec::new();
    for (subject, payload) in messages {
        let subject = subject.into();
        // Batches often repeat a subject: check and store it once.
        let subject = match batch.last() {
            Some(last) if *last.subject == *subject => last.subject.clone(),
            _ => {
                Subject::validate(&subject).map_err(RemoteError::from)?;
                Arc::from(subject)
            }
        };
        batch.push(Queued {
            subject,
            reply_to: None,
            payload: payload.into(),
        });
    }
    Ok(batch)
}

/// The service's name on the wire, for one-way calls made directly.
const SERVICE: &str = "PubSubService";

/// The `reply_to` of the host's answer to a request that no live
/// subscription took (its payload is empty). Replies from responders never
/// carry a `reply_to` of their own, so a requester tells the two apart;
/// NATS answers such a request with a 503 status message the same way.
pub const STATUS_NO_RESPONDERS: &str = "_courier.status.no_responders";

/// The `reply_to` of the host's answer to a request it refused; the payload
/// is the [`RemoteError`], postcard-encoded.
pub const STATUS_REFUSED: &str = "_courier.status.refused";

impl RemotePublisher {
    /// This publisher's identity, as subscribers see it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Publishes one way, in order (see the type's docs): returns once the
    /// message is queued for the host. An invalid subject or a message
    /// larger than the host accepts fails here; what the host refuses is
    /// reported by [`flush`](Self::flush).
    pub async fn publish(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), RemotePubSubError> {
        self.publish_one_way(subject, None, payload.into()).await
    }

    async fn publish_one_way(
        &self,
        subject: &str,
        reply_to: Option<&str>,
        payload: Bytes,
    ) -> Result<(), RemotePubSubError> {
        let subject = {
            let mut last = self
                .shared
                .last_subject
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match &*last {
                Some(known) if **known == *subject => known.clone(),
                _ => {
                    Subject::validate(subject).map_err(RemoteError::from)?;
                    let fresh: Arc<str> = Arc::from(subject);
                    *last = Some(fresh.clone());
                    fresh
                }
            }
        };
        let message = Queued {
            subject,
            reply_to: reply_to.map(Arc::from),
            payload,
        };
        let permit = self.room_for(std::slice::from_ref(&message)).await?;
        self.queue()
            .send(Outgoing::One(message, permit))
            .map_err(|_| RemotePubSubError::Protocol("the publisher's sender task ended".into()))
    }

    /// Queues messages for the sender task, waiting for room: a message
    /// the connection's frame limit can never carry fails here.
    async fn enqueue(&self, messages: Vec<Queued>) -> Result<(), RemotePubSubError> {
        let permit = self.room_for(&messages).await?;
        self.queue()
            .send(Outgoing::Publish(messages, permit))
            .map_err(|_| RemotePubSubError::Protocol("the publisher's sender task ended".into()))
    }

    /// Waits for the queue's room for `messages`; a message the
    /// connection's frame limit can never carry fails here.
    async fn room_for(
        &self,
        messages: &[Queued],
    ) -> Result<tokio::sync::OwnedSemaphorePermit, RemotePubSubError> {
        let limit = self.shared.sending.limit.load(Ordering::Relaxed);
        let mut bytes = 0;
        for message in messages {
            let size = queued_size(message);
            if limit != 0 && size + FRAME_MARGIN > limit {
                return Err(RpcError::TooLarge {
                    size: size + FRAME_MARGIN,
                    limit,
                }
                .into());
            }
            bytes += size;
        }
        // A batch larger than the whole queue waits for all of its room.
        let wanted = bytes.min(PUBLISH_QUEUE_BYTES) as u32;
        self.shared
            .room
            .clone()
            .acquire_many_owned(wanted)
            .await
            .map_err(|_| RemotePubSubError::Protocol("the publisher's queue is closed".into()))
    }

    /// The queue, starting the sender task on first use.
    fn queue(&self) -> &tokio::sync::mpsc::UnboundedSender<Outgoing> {
        self.shared.queue.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(send_publishes(
                self.client.clone(),
                self.id,
                self.shared.sending.clone(),
                rx,
            ));
            tx
        })
    }

    /// Returns once everything queued before the call has been handed to
    /// the connection (at once if nothing ever was).
    async fn barrier(&self) -> Result<(), RemotePubSubError> {
        let Some(queue) = self.shared.queue.get() else {
            return Ok(());
        };
        let (done, sent) = tokio::sync::oneshot::channel();
        queue
            .send(Outgoing::Barrier(done))
            .map_err(|_| RemotePubSubError::Protocol("the publisher's sender task ended".into()))?;
        sent.await
            .map_err(|_| RemotePubSubError::Protocol("the publisher's sender task ended".into()))
    }

    /// Returns once the host has applied every publish this publisher (and
    /// its clones) made before the call, as NATS's flush does. Fails with
    /// [`RemoteError::Refused`] if the host refused any of them, and with
    /// [`RemotePubSubError::PublishesLost`] if the connection was lost
    /// while some were on their way; either way, each is reported once.
    pub async fn flush(&self) -> Result<(), RemotePubSubError> {
        let _turn = self.shared.turn.lock().await;
        self.barrier().await?;
        let answered = self.client.flush(self.id).await;
        let now = self.client.client().epoch().await;
        let sending = &self.shared.sending;
        let (first, crossed) =
            std::mem::take(&mut *sending.unflushed.lock().unwrap_or_else(|p| p.into_inner()));
        let unsendable = sending
            .unsendable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // What could not be sent counts with what the host refused.
        let answered = match (answered, unsendable) {
            (answered, None) => answered,
            (Ok(Ok(())), Some((count, first))) => Ok(Err(RemoteError::Refused {
                count,
                first: Box::new(first),
            })),
            (Ok(Err(RemoteError::Refused { count, first })), Some((more, _))) => {
                Ok(Err(RemoteError::Refused {
                    count: count + more,
                    first,
                }))
            }
            (answered, Some(_)) => answered,
        };
        let lost = crossed || (first != 0 && first != now);
        match answered {
            // The flush found the connection dead: so did what it follows.
            Err(RpcError::Unavailable(_)) if first != 0 => Err(RemotePubSubError::PublishesLost),
            Ok(Ok(())) if lost => Err(RemotePubSubError::PublishesLost),
            Ok(Ok(())) => Ok(()),
            // Reported now; a loss with it is left for the next flush.
            Ok(Err(err)) => {
                if lost {
                    sending.lost();
                }
                Err(err.into())
            }
            Err(err) => {
                if lost {
                    sending.lost();
                }
                Err(err.into())
            }
        }
    }

    /// Publishes and waits for the host: returns how many live
    /// subscriptions it was delivered (or dropped) to, once the host has
    /// done so and stored it in every matching durable subscription. A
    /// round trip per message; [`publish`](Self::publish) is the fast path.
    /// Ordered with this publisher's other publishes on the same
    /// connection; after a reconnect, [`flush`](Self::flush) first if it
    /// must follow one-way publishes sent before.
    pub async fn publish_confirmed(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u64, RemotePubSubError> {
        // Held for the whole call, so it is ordered after every earlier
        // publish and before every later one. Concurrent confirmed publishes
        // from one publisher therefore wait for each other: use several
        // publishers for those.
        let _turn = self.shared.turn.lock().await;
        self.barrier().await?;
        let outcome = self
            .client
            .publish(self.id, subject.to_string(), None, payload.into())
            .await;
        Ok(outcome??)
    }

    /// Publishes many messages one way, in order with this publisher's
    /// other publishes (see the type's docs), queued together: one call
    /// instead of one per message. Every subject is checked here first (one
    /// invalid subject fails the call and queues nothing); each message the
    /// host refuses is refused alone, and the next [`flush`](Self::flush)
    /// reports them.
    pub async fn publish_batch<S: Into<String>, P: Into<Bytes>>(
        &self,
        messages: impl IntoIterator<Item = (S, P)>,
    ) -> Result<(), RemotePubSubError> {
        self.enqueue(wire_batch(messages)?).await
    }

    /// Publishes many messages in one call and waits for the host: returns
    /// the live deliveries in total. One invalid subject refuses the whole
    /// batch. Ordered as [`publish_confirmed`](Self::publish_confirmed).
    pub async fn publish_batch_confirmed<S: Into<String>, P: Into<Bytes>>(
        &self,
        messages: impl IntoIterator<Item = (S, P)>,
    ) -> Result<u64, RemotePubSubError> {
        let messages = wire_batch(messages)?;
        let _turn = self.shared.turn.lock().await;
        self.barrier().await?;
        let messages = messages
            .into_iter()
            .map(|m| WirePublish {
                subject: m.subject.to_string(),
                reply_to: m.reply_to.map(|r| r.to_string()),
                payload: m.payload,
            })
            .collect();
        Ok(self.client.publish_batch(self.id, messages).await??)
    }

    /// Answers `request` on its `reply_to` subject, one way (as
    /// [`publish`](Self::publish)); nothing if it wants no reply.
    pub async fn reply(
        &self,
        request: &Message,
        payload: impl Into<Bytes>,
    ) -> Result<(), RemotePubSubError> {
        match &request.reply_to {
            Some(inbox) => self.publish(inbox.as_str(), payload).await,
            None => Ok(()),
        }
    }
}

/// A subscription on a remote bus. Dropping it unsubscribes; the host
/// tears the subscription down when the cancellation reaches it, so a
/// message published in that moment may still be counted for it.
///
/// Receive with [`recv`](Self::recv) or as a [`futures_core::Stream`] of
/// the same items. Both are cancel-safe (in `tokio::select!`, say): a
/// receive dropped at any await, even while the subscription is restoring
/// itself after losing its host, loses no event and abandons no restore;
/// the next receive carries on where it stopped.
pub struct RemoteSubscription {
    /// The state, while no receive is under way.
    state: Option<Box<SubscriptionState>>,
    /// A receive under way (the state moved into it), kept across dropped
    /// `recv` futures: that is what makes receiving cancel-safe.
    in_flight: Option<InFlight>,
    counts: Arc<SubscriptionCounts>,
}

type InFlight = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    Box<SubscriptionState>,
                    Option<Result<Event, RemotePubSubError>>,
                ),
            > + Send,
    >,
>;

impl std::fmt::Debug for RemoteSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSubscription")
            .field("receiving", &self.in_flight.is_some())
            .field("restored", &self.restored())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

/// What a subscription counts, readable while a receive is under way.
#[derive(Debug, Default)]
struct SubscriptionCounts {
    restored: AtomicU64,
    /// Drops the host reported for the subscriptions before the last restore.
    dropped_before: AtomicU64,
    /// Drops the host reported for the current one.
    dropped_now: AtomicU64,
}

/// Everything a receive needs, moved into the receive while it waits.
struct SubscriptionState {
    stream: ItemStream<Result<Vec<WireEvent>, RemoteError>>,
    pending: VecDeque<WireEvent>,
    /// The last subject parsed: consecutive messages often share it.
    last_subject: Option<Subject>,
    client: PubSubServiceClient,
    filter: String,
    options: SubscribeOptions,
    restore_window: Duration,
    counts: Arc<SubscriptionCounts>,
}

/// Errors after which the host may come back: subscribe again.
fn host_lost(err: &RpcError) -> bool {
    matches!(err, RpcError::Unavailable(_) | RpcError::Cancelled)
}

impl RemoteSubscription {
    /// The next event; `None` when the subscription ended (the host
    /// disconnected it as a slow consumer). Cancel-safe (see the type's
    /// docs).
    pub async fn recv(&mut self) -> Option<Result<Event, RemotePubSubError>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// How many times this subscription restored itself.
    pub fn restored(&self) -> u64 {
        self.counts.restored.load(Ordering::Relaxed)
    }

    /// Messages the host dropped for this subscription (slow-consumer
    /// policy, byte caps, too large to send), over every restore, as far
    /// as the host reported them: the count travels with the events, so it
    /// is exact up to the last event received. Gaps and
    /// [`Event::Dropped`] say which, at the latest once the host's buffer
    /// has drained. Not counted (not knowable): what a lost connection or
    /// host took with it; see [`Event::Restored`].
    pub fn dropped(&self) -> u64 {
        self.counts.dropped_before.load(Ordering::Relaxed)
            + self.counts.dropped_now.load(Ordering::Relaxed)
    }

    /// Events already received take no allocation and no await; only a
    /// receive that has to wait moves the state into a boxed future, which
    /// stays here until it is done, however often its caller gives up.
    fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Event, RemotePubSubError>>> {
        if self.in_flight.is_none() {
            let Some(mut state) = self.state.take() else {
                return std::task::Poll::Ready(None);
            };
            if let Some(event) = state.ready_event() {
                self.state = Some(state);
                return std::task::Poll::Ready(Some(event));
            }
            self.in_flight = Some(Box::pin(async move {
                let event = state.next_event().await;
                (state, event)
            }));
        }
        let Some(in_flight) = self.in_flight.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        match std::future::Future::poll(in_flight.as_mut(), cx) {
            std::task::Poll::Ready((state, event)) => {
                self.in_flight = None;
                self.state = Some(state);
                std::task::Poll::Ready(event)
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl futures_core::Stream for RemoteSubscription {
    type Item = Result<Event, RemotePubSubError>;

    /// [`RemoteSubscription::recv`] as a stream: the same items, as
    /// cancel-safe.
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

impl SubscriptionState {
    /// An event already received, if there is one.
    fn ready_event(&mut self) -> Option<Result<Event, RemotePubSubError>> {
        while let Some(wire) = self.pending.pop_front() {
            if let WireEvent::DropCount { total } = wire {
                self.counts.dropped_now.store(total, Ordering::Relaxed);
                continue;
            }
            return Some(event_from(wire, &mut self.last_subject));
        }
        None
    }

    /// The next event, waiting for the host (and restoring the
    /// subscription if the host went away).
    async fn next_event(&mut self) -> Option<Result<Event, RemotePubSubError>> {
        loop {
            if let Some(event) = self.ready_event() {
                return Some(event);
            }
            match self.stream.next().await? {
                Ok(Ok(batch)) => self.pending.extend(batch),
                Ok(Err(err)) => return Some(Err(err.into())),
                Err(err) if host_lost(&err) => {
                    return Some(match self.restore(err).await {
                        Ok(()) => Ok(Event::Restored),
                        Err(err) => Err(err),
                    })
                }
                Err(err) => return Some(Err(err.into())),
            }
        }
    }

    /// Subscribes again, with backoff, until the host takes it or the
    /// restore window closes.
    async fn restore(&mut self, lost: RpcError) -> Result<(), RemotePubSubError> {
        let give_up = tokio::time::Instant::now() + self.restore_window;
        let mut backoff = Backoff::new(
            Duration::from_millis(20),
            Duration::from_secs(2),
            fresh_id(),
        );
        let mut last = RemotePubSubError::Rpc(lost);
        loop {
            let delay = backoff.next_delay();
            if tokio::time::Instant::now() + delay > give_up {
                return Err(last);
            }
            tokio::time::sleep(delay).await;
            match open_subscription(&self.client, &self.filter, &self.options).await {
                Ok(stream) => {
                    self.stream = stream;
                    self.pending.clear();
                    let now = self.counts.dropped_now.swap(0, Ordering::Relaxed);
                    self.counts.dropped_before.fetch_add(now, Ordering::Relaxed);
                    self.counts.restored.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(RemotePubSubError::Rpc(err)) if host_lost(&err) => last = err.into(),
                Err(err) => return Err(err),
            }
        }
    }
}

/// Parses `subject`, reusing `last` when it is the same.
fn parse_subject(
    subject: &str,
    last: &mut Option<Subject>,
) -> Result<Subject, crate::SubjectError> {
    if let Some(same) = last.as_ref().filter(|l| l.as_str() == subject) {
        return Ok(same.clone());
    }
    let parsed = Subject::new(subject)?;
    *last = Some(parsed.clone());
    Ok(parsed)
}

fn event_from(wire: WireEvent, last: &mut Option<Subject>) -> Result<Event, RemotePubSubError> {
    match wire {
        WireEvent::Message {
            subject,
            payload,
            publisher,
            seq,
            reply_to,
        } => match parse_subject(subject.as_str(), last) {
            Ok(subject) => Ok(Event::Message(Message {
                subject,
                payload,
                publisher,
                seq,
                reply_to: reply_to.and_then(|r| Subject::new(r.as_str()).ok()),
            })),
            Err(err) => Err(RemotePubSubError::Protocol(err.to_string())),
        },
        WireEvent::Gap {
            publisher,
            from,
            to,
        } => Ok(Event::Gap {
            publisher,
            from,
            to,
        }),
        WireEvent::Dropped { count } => Ok(Event::Dropped { count }),
        WireEvent::Active => Err(RemotePubSubError::Protocol("a second Active".into())),
        WireEvent::DropCount { .. } => {
            Err(RemotePubSubError::Protocol("a misplaced drop count".into()))
        }
    }
}

#[cfg(test)]
mod queued_tests {
    use super::*;

    /// A subject decodes to the text it was, and a run of messages on one
    /// subject shares one allocation for it.
    #[test]
    fn wire_text_round_trips_and_shares_a_repeated_subject() {
        let encode = |text: &str| postcard::to_allocvec(&WireText(Arc::from(text))).unwrap();
        // The same bytes as a plain string.
        assert_eq!(
            encode("orders.eu"),
            postcard::to_allocvec("orders.eu").unwrap()
        );
        let decode = |bytes: &[u8]| postcard::from_bytes::<WireText>(bytes).unwrap();
        let first = decode(&encode("orders.eu"));
        let second = decode(&encode("orders.eu"));
        assert_eq!(first.as_str(), "orders.eu");
        assert!(Arc::ptr_eq(&first.0, &second.0));
        let other = decode(&encode("orders.us"));
        assert_eq!(other.as_str(), "orders.us");
        assert!(!Arc::ptr_eq(&first.0, &other.0));
    }

    /// The publisher's queue entry and the host's wire type are the same
    /// bytes, so the host decodes what the sender task encodes.
    #[test]
    fn a_queued_message_is_encoded_as_a_wire_publish() {
        for reply_to in [None, Some("_inbox.1.2")] {
            let queued = Queued {
                subject: Arc::from("orders.eu"),
                reply_to: reply_to.map(Arc::from),
                payload: Bytes::from_static(b"\x00payload\xff"),
            };
            let wire = WirePublish {
                subject: "orders.eu".into(),
                reply_to: reply_to.map(str::to_string),
                payload: Bytes::from_static(b"\x00payload\xff"),
            };
            assert_eq!(
                postcard::to_allocvec(&(7u64, 9u64, vec![&queued])).unwrap(),
                postcard::to_allocvec(&(7u64, 9u64, vec![wire])).unwrap()
            );
        }
    }
}

#[cfg(test)]
mod kind_tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use courier_rpc::{Server, ServerConfig};

    use super::*;
    use crate::Filter;

    static NEXT: AtomicU64 = AtomicU64::new(0);

    struct NobodyMay;

    impl PubSubAccess for NobodyMay {
        fn may_publish(&self, _who: Option<&str>, _subject: &Subject) -> bool {
            false
        }
        fn may_request(&self, _who: Option<&str>, _subject: &Subject) -> bool {
            false
        }
        fn may_subscribe(&self, _who: Option<&str>, _filter: &Filter) -> bool {
            false
        }
    }

    async fn serve(host: PubSubHost) -> (courier_rpc::ServerHandle, RemotePubSub) {
        let address: Address = format!(
            "mem://pubsub-kind-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
        .parse()
        .unwrap();
        let listener = courier_transport::bind(&address, &Default::default())
            .await
            .unwrap();
        let server = Server::new(ServerConfig::default())
            .service(PubSubServiceServer::new(host))
            .spawn(listener);
        let bus = RemotePubSub::connect(&address, ClientConfig::default())
            .await
            .unwrap();
        (server, bus)
    }

    #[tokio::test]
    async fn denied_publishes_and_subscriptions_are_refused() {
        let (_server, bus) =
            serve(PubSubHost::new(Bus::new()).with_access(Arc::new(NobodyMay))).await;
        let err = bus
            .publisher()
            .publish_confirmed("orders.new", "x")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
        let err = bus
            .subscribe("orders.*", SubscribeOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn no_responders_is_timed_out_and_a_bad_subject_invalid_input() {
        let (_server, bus) = serve(PubSubHost::new(Bus::new())).await;
        let err = bus
            .request("nobody.home", "?", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        assert!(err.is_retryable());
        let err = bus
            .publisher()
            .publish_confirmed("bad..subject", "x")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }

    #[test]
    fn kinds_follow_the_variants() {
        let refused = RemoteError::Refused {
            count: 2,
            first: Box::new(RemoteError::PermissionDenied("orders.new".into())),
        };
        assert_eq!(refused.kind(), ErrorKind::Refused);
        assert_eq!(
            RemotePubSubError::Timeout(Duration::from_secs(1)).kind(),
            ErrorKind::TimedOut
        );
        let down = RemotePubSubError::Rpc(RpcError::Unavailable("connection refused".into()));
        assert_eq!(down.kind(), ErrorKind::Unavailable);
        assert!(down.is_retryable());
        assert_eq!(RemoteError::NoDurable.kind(), ErrorKind::Unsupported);
        let conflict = DurableError::FilterConflict {
            name: "d".into(),
            existing: "a".into(),
            requested: "b".into(),
        };
        assert_eq!(conflict.kind(), ErrorKind::Conflict);
        // Crossing the network keeps only whether it is retryable.
        assert_eq!(RemoteError::from(conflict).kind(), ErrorKind::Internal);
        let invalid = DurableError::InvalidName("no spaces".into());
        assert_eq!(invalid.kind(), ErrorKind::InvalidInput);
    }
}
