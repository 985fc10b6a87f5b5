//! The embedded queue: [`QueueCore`]'s rules over a durable [`Log`], in
//! process, with no broker.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ErrorKind;
use courier_wire::headers::Headers;

use crate::core::{
    ConsumerId, DeliveryOutcome, DeliveryRecord, LeaseError, MessageId, QueueConfig, QueueCore,
    QueueEvent, QueueStats,
};
use crate::declare::{self, QueueDeclaration};
use crate::log::{AppendError, Log, LogOptions, OpenError, Recovery, Seq};
use crate::storage::Storage;

/// A stored message without headers: the layout every version reads.
const ENQUEUE: u8 = 1;
const REMOVE: u8 = 2;
/// A stored message with headers (a later kind, so a log whose messages
/// carry none is written exactly as before).
const ENQUEUE_WITH_HEADERS: u8 = 3;
/// Removals between attempts to delete consumed segments.
const COMPACT_EVERY: u64 = 256;

/// Settings of a queue.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct QueueOptions {
    /// Storage: fsync policy, segment size, record limit.
    pub log: LogOptions,
    /// Semantics: visibility timeout, delivery limit, idempotency window.
    pub queue: QueueConfig,
}

impl QueueOptions {
    /// Options with these storage and queue settings.
    pub fn new(log: LogOptions, queue: QueueConfig) -> QueueOptions {
        QueueOptions { log, queue }
    }
}

/// A message to enqueue.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// Its bytes (decoded from the network as a slice of the received
    /// frame where the decoder allows: see [`courier_wire::shared`]).
    #[serde(deserialize_with = "courier_wire::shared::deserialize")]
    pub payload: Bytes,
    /// Idempotency key: an enqueue with a key seen recently is a duplicate.
    pub key: Option<String>,
    /// Not delivered before this much time has passed.
    pub delay: Option<Duration>,
    /// Dropped if not acknowledged within this much time.
    pub ttl: Option<Duration>,
    /// Text headers stored and delivered with it (bounded; see
    /// [`Headers`]): the type of a typed message, a trace context.
    pub headers: Headers,
}

impl Message {
    /// A plain message.
    pub fn new(payload: impl Into<Bytes>) -> Message {
        Message {
            payload: payload.into(),
            ..Message::default()
        }
    }

    /// With an idempotency key.
    pub fn with_key(mut self, key: impl Into<String>) -> Message {
        self.key = Some(key.into());
        self
    }

    /// Delivered only after `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Message {
        self.delay = Some(delay);
        self
    }

    /// Dropped unless acknowledged within `ttl`.
    pub fn with_ttl(mut self, ttl: Duration) -> Message {
        self.ttl = Some(ttl);
        self
    }

    /// With these headers.
    pub fn with_headers(mut self, headers: Headers) -> Message {
        self.headers = headers;
        self
    }

    /// The trace context it was enqueued in (its `traceparent` header), if
    /// any.
    pub fn trace_context(&self) -> Option<courier_wire::trace::TraceContext> {
        trace_of(&self.headers)
    }

    /// Adds the `traceparent` of the trace current in this task
    /// (`courier_transport::trace`) unless the message has one, so a
    /// consumer can continue the producer's trace. Only with the `remote`
    /// feature, which brings the task-local; a full set of headers is left
    /// as it is (tracing never refuses a message).
    pub(crate) fn stamp_trace(&mut self) {
        #[cfg(feature = "remote")]
        if let Some(ctx) = courier_transport::trace::current() {
            if self
                .headers
                .get(courier_wire::headers::TRACEPARENT)
                .is_none()
            {
                let _ = self
                    .headers
                    .insert(courier_wire::headers::TRACEPARENT, ctx.to_traceparent());
            }
        }
    }
}

/// The trace context in a message's headers, if well formed.
pub(crate) fn trace_of(headers: &Headers) -> Option<courier_wire::trace::TraceContext> {
    headers
        .get(courier_wire::headers::TRACEPARENT)
        .and_then(courier_wire::trace::TraceContext::parse)
}

/// What an enqueue did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Enqueued {
    /// Stored durably (under the log's fsync policy) as this message.
    Stored(MessageId),
    /// Its idempotency key names an earlier message, which it duplicates;
    /// nothing new was stored.
    Duplicate(MessageId),
}

/// A message as [`Queue::peek`] shows it: still in the queue, neither
/// taken nor leased.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct Peeked {
    /// The message.
    pub id: MessageId,
    /// How many times it was delivered before (0: never; it was given back
    /// or its lease ran out since).
    pub deliveries: u32,
    /// Its bytes.
    pub payload: Bytes,
    /// Its headers.
    pub headers: Headers,
}

impl Peeked {
    /// A message as a peek shows it (for hosts of queues kept elsewhere,
    /// such as a replicated queue's state).
    pub fn new(id: MessageId, deliveries: u32, payload: Bytes, headers: Headers) -> Peeked {
        Peeked {
            id,
            deliveries,
            payload,
            headers,
        }
    }
}

/// What went wrong with a queue operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The queue name is not valid.
    #[error("invalid queue name {0:?}: expected 1 to 200 of [A-Za-z0-9._-], not . or ..")]
    InvalidName(String),
    /// The queue's log could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Storing failed (disk full, I/O error, oversized message). Nothing
    /// already stored or acknowledged is affected. Retryable when the log
    /// says so.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// The delivery is no longer leased to this consumer (its lease expired).
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The queue holds as many messages as it may
    /// ([`crate::core::QueueConfig::max_depth`]); nothing was stored.
    /// Retryable once consumers catch up.
    #[error("queue {queue} is full ({limit} messages); nothing was stored")]
    Full {
        /// The queue.
        queue: String,
        /// Its limit.
        limit: u64,
    },
    /// No queue of this name exists (and asking did not create one).
    #[error("no queue named {0:?}")]
    NotFound(String),
    /// A declared option is out of its bounds (see [`QueueDeclaration`]);
    /// nothing was stored or changed.
    #[error("invalid queue option {option}: {reason}")]
    InvalidOption {
        /// The option.
        option: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// The queue exists with other declared options: options cannot change
    /// under a queue. Nothing was changed.
    #[error("queue {queue} was declared with {declared:?}, not {requested:?}")]
    OptionsConflict {
        /// The queue.
        queue: String,
        /// What it was declared with (empty: declared with nothing).
        declared: QueueDeclaration,
        /// What was asked for now.
        requested: QueueDeclaration,
    },
    /// The options stored with the queue could not be read; the queue is
    /// not opened rather than opened with options nobody declared.
    #[error("the stored options of queue {queue} are damaged: {reason}")]
    StoredOptions {
        /// The queue.
        queue: String,
        /// What is wrong.
        reason: String,
    },
}

impl QueueError {
    /// What kind of failure this is, as an [`ErrorKind`] shared by every
    /// Courier mechanism: an invalid name is [`ErrorKind::InvalidInput`],
    /// no such queue [`ErrorKind::NotFound`], a full queue
    /// [`ErrorKind::Busy`], a lost lease or a declaration with other
    /// options [`ErrorKind::Conflict`], a bad option
    /// [`ErrorKind::InvalidInput`], damaged stored options
    /// [`ErrorKind::Internal`], storage
    /// that failed its own kind ([`AppendError::kind`], [`OpenError::kind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            QueueError::InvalidName(_) => ErrorKind::InvalidInput,
            QueueError::Open(err) => err.kind(),
            QueueError::Append(err) => err.kind(),
            QueueError::Lease(err) => err.kind(),
            QueueError::Full { .. } => ErrorKind::Busy,
            QueueError::NotFound(_) => ErrorKind::NotFound,
            QueueError::InvalidOption { .. } => ErrorKind::InvalidInput,
            QueueError::OptionsConflict { .. } => ErrorKind::Conflict,
            QueueError::StoredOptions { .. } => ErrorKind::Internal,
        }
    }

    /// Whether trying again may succeed: whether its
    /// [`kind`](Self::kind) is retryable.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

struct State {
    core: QueueCore,
    payloads: HashMap<MessageId, Stored>,
    next_consumer: ConsumerId,
    removals: u64,
    /// When the timer task will next wake by itself (`None`: only when
    /// told). A new lease ending earlier than this must wake it, or the
    /// lease would never expire on an otherwise idle queue.
    timer_at: Option<Duration>,
    /// Dead letters taken from the core and not yet stored in the
    /// dead-letter queue (kept for the next [`Queue::settle`] if storing
    /// fails). Bounded by the messages stored.
    pending_dead: Vec<Message>,
    /// Removal records taken from the core and not yet durable (kept for
    /// the next settle if appending fails). Bounded by the messages stored.
    pending_removals: Vec<(u8, Bytes)>,
    /// The sequence number after every record this queue knows is in the
    /// log (replayed, or returned by an append). A record appended later,
    /// by an append sent after this was read, comes at or after it.
    known_next: Seq,
    /// Enqueues whose records are (or are about to be) in the log but not
    /// yet in the core, as how many start from each floor: the `known_next`
    /// when they began, which their records cannot come before. Compaction
    /// keeps everything from the lowest floor on, or it could delete the
    /// segment of a message about to be answered as stored.
    enqueuing: BTreeMap<Seq, usize>,
}

impl State {
    /// Where compaction may delete up to: nothing a message still stored,
    /// an enqueue in flight, or an append this queue has not seen returned
    /// may need.
    fn keep_from(&self) -> Seq {
        let mut keep = self.known_next;
        if let Some(oldest) = self.core.oldest() {
            keep = keep.min(oldest);
        }
        if let Some((&floor, _)) = self.enqueuing.first_key_value() {
            keep = keep.min(floor);
        }
        keep
    }

    fn appended(&mut self, first: Seq, count: usize) {
        self.known_next = self.known_next.max(first + count as u64);
    }
}

/// An enqueue's place in [`State::enqueuing`], given up when it is dropped
/// (also when the enqueue's future is dropped halfway: nobody was told the
/// message is stored, so its segment need not be kept for it).
struct Enqueuing<'a> {
    state: &'a Mutex<State>,
    floor: Option<Seq>,
}

impl Enqueuing<'_> {
    fn register(state: &mut State) -> Seq {
        let floor = state.known_next;
        *state.enqueuing.entry(floor).or_default() += 1;
        floor
    }

    fn release(state: &mut State, floor: Seq) {
        if let Some(count) = state.enqueuing.get_mut(&floor) {
            *count -= 1;
            if *count == 0 {
                state.enqueuing.remove(&floor);
            }
        }
    }

    /// Gives the place up under a lock the caller already holds.
    fn done(&mut self, state: &mut State) {
        if let Some(floor) = self.floor.take() {
            Enqueuing::release(state, floor);
        }
    }
}

impl Drop for Enqueuing<'_> {
    fn drop(&mut self) {
        if let Some(floor) = self.floor.take() {
            Enqueuing::release(&mut lock(self.state), floor);
        }
    }
}

struct Inner {
    name: String,
    storage: Box<dyn Storage>,
    state: Mutex<State>,
    changed: Arc<Notify>,
    /// Wakes the timer task to look again at the next deadline.
    timer_wake: Arc<Notify>,
    epoch: Instant,
    keyed: tokio::sync::Mutex<()>,
    /// Held while removals are written: a settle that finds nothing left
    /// to write may return only once the settle that took its events has
    /// made them durable (or failed and put them back).
    settling: tokio::sync::Mutex<()>,
    dead_letters: Option<Queue>,
    /// What a client declared for this queue (empty: nothing).
    declared: QueueDeclaration,
    timer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(timer) = lock(&self.timer).take() {
            timer.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A stored message's bytes and headers, kept in memory until it is gone.
#[derive(Clone, Default)]
struct Stored {
    payload: Bytes,
    headers: Headers,
}

/// What a queue starts from: the state replayed from its storage.
struct Recovered {
    core: QueueCore,
    payloads: HashMap<MessageId, Stored>,
    /// Replayed delays and lifetimes are measured from here.
    epoch: Instant,
    /// The sequence number after the last record replayed.
    known_next: Seq,
}

/// A durable queue, embedded in this process. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use courier_queue::{Message, Queue, QueueOptions};
///
/// let dir = std::env::temp_dir().join(format!("courier-queue-doc-{}", std::process::id()));
/// let orders = Queue::open(&dir, "orders", QueueOptions::default()).await?;
/// orders.enqueue(Message::new("tea")).await?; // durable when this returns
///
/// let mut consumer = orders.consumer(10).await?;
/// let delivery = consumer.recv().await?;
/// assert_eq!(&delivery.payload[..], b"tea");
/// delivery.ack().await?; // after processing; unacknowledged messages come back
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

/// An enqueue record: its kind and bytes.
///
/// ```text
/// ENQUEUE:              at u64 | delay ms u64 | ttl ms u64 (MAX: none) | key len u16 | key | payload
/// ENQUEUE_WITH_HEADERS: at u64 | delay ms u64 | ttl ms u64 | key len u16 | key | headers len u16 | headers (postcard) | payload
/// ```
fn encode_enqueue(message: &Message) -> (u8, Bytes) {
    let key = message.key.as_deref().unwrap_or("");
    let key = &key.as_bytes()[..key.len().min(u16::MAX as usize)];
    let mut buf = BytesMut::with_capacity(29 + key.len() + message.payload.len());
    buf.put_u64_le(wall_ms());
    buf.put_u64_le(message.delay.map_or(0, |d| d.as_millis() as u64));
    buf.put_u64_le(message.ttl.map_or(u64::MAX, |d| d.as_millis() as u64));
    buf.put_u16_le(key.len() as u16);
    buf.put_slice(key);
    let mut kind = ENQUEUE;
    if !message.headers.is_empty() {
        let at = buf.len();
        buf.put_u16_le(0);
        // Headers are bounded (4 KiB of text), far below the u16 limit
        // given here; an encoding failure (none is possible for text)
        // stores the message without them rather than failing it.
        match courier_wire::payload::encode_into(&message.headers, &mut buf, u16::MAX as usize) {
            Ok(written) => {
                buf[at..at + 2].copy_from_slice(&(written as u16).to_le_bytes());
                kind = ENQUEUE_WITH_HEADERS;
            }
            Err(err) => {
                tracing::warn!(%err, "message headers could not be stored; storing it without them");
                buf.truncate(at);
            }
        }
    }
    buf.put_slice(&message.payload);
    (kind, buf.freeze())
}

/// A replayed enqueue record.
struct Replayed {
    at: u64,
    delay: u64,
    ttl: u64,
    key: Option<String>,
    headers: Headers,
    payload: Bytes,
}

/// Reads an enqueue record of either kind; `None` if it is damaged (its
/// headers are checked against their limits as they are decoded, and ones
/// that fail them are dropped, not the message).
fn decode_enqueue(kind: u8, mut record: Bytes) -> Option<Replayed> {
    if record.len() < 26 {
        return None;
    }
    let at = record.get_u64_le();
    let delay = record.get_u64_le();
    let ttl = record.get_u64_le();
    let key_len = record.get_u16_le() as usize;
    if record.len() < key_len {
        return None;
    }
    let key = String::from_utf8(record.split_to(key_len).to_vec()).ok()?;
    let headers = if kind == ENQUEUE_WITH_HEADERS {
        if record.len() < 2 {
            return None;
        }
        let len = record.get_u16_le() as usize;
        if record.len() < len {
            return None;
        }
        // The record passed its checksum, so headers that do not decode
        // were written under other limits: the message is kept without
        // them rather than lost.
        courier_wire::payload::decode(&record.split_to(len)).unwrap_or_else(|err| {
            tracing::warn!(%err, "a stored message's headers do not decode; kept without them");
            Headers::new()
        })
    } else {
        Headers::new()
    };
    Some(Replayed {
        at,
        delay,
        ttl,
        key: (!key.is_empty()).then_some(key),
        headers,
        payload: record,
    })
}

/// A dead-lettered message: its delivery history, then the original payload.
fn encode_dead_letter(history: &[DeliveryRecord], payload: &Bytes) -> Bytes {
    let mut buf = BytesMut::new();
    // The count written is the count of records that follow, whatever the
    // history's length (the core keeps at most `MAX_HISTORY`).
    let history = &history[history.len().saturating_sub(usize::from(u16::MAX))..];
    buf.put_u16_le(history.len() as u16);
    for record in history {
        buf.put_u64_le(record.consumer);
        buf.put_u64_le(record.at.as_millis() as u64);
        buf.put_u8(match record.outcome {
            DeliveryOutcome::Nacked => 0,
            DeliveryOutcome::LeaseExpired => 1,
            DeliveryOutcome::ConsumerGone => 2,
            DeliveryOutcome::Rejected => 3,
        });
    }
    buf.put_slice(payload);
    buf.freeze()
}

/// The header that carries a dead letter's original type (its
/// [`courier_wire::headers::TYPE`] header, moved): a dead letter's bytes
/// are its history and then the original's, so they are not a value of
/// that type, and a typed consumer of the dead-letter queue must say so
/// ([`crate::TypeError::Untyped`]) rather than decode them as one.
pub const DEAD_LETTER_TYPE: &str = "courier-dead-letter-type";

/// A dead letter's headers: the original's, its type moved to
/// [`DEAD_LETTER_TYPE`].
fn dead_letter_headers(original: &Headers) -> Headers {
    let mut headers = original.clone();
    if let Some(tag) = headers.remove(courier_wire::headers::TYPE) {
        // A longer name: on headers already at their byte bound it does
        // not fit, and the dead letter goes without it (dead-lettering
        // must not fail).
        let _ = headers.insert(DEAD_LETTER_TYPE, tag);
    }
    headers
}

/// Splits a message of a dead-letter queue into the delivery history of
/// the original and its payload. `None` if it is not a dead letter.
pub fn parse_dead_letter(mut payload: Bytes) -> Option<(Vec<DeliveryRecord>, Bytes)> {
    if payload.len() < 2 {
        return None;
    }
    let count = payload.get_u16_le() as usize;
    if payload.len() < count * 17 {
        return None;
    }
    let history = (0..count)
        .map(|_| DeliveryRecord {
            consumer: payload.get_u64_le(),
            at: Duration::from_millis(payload.get_u64_le()),
            outcome: match payload.get_u8() {
                0 => DeliveryOutcome::Nacked,
                1 => DeliveryOutcome::LeaseExpired,
                3 => DeliveryOutcome::Rejected,
                // 2, and anything a later version may add.
                _ => DeliveryOutcome::ConsumerGone,
            },
        })
        .collect();
    Some((history, payload))
}

/// The suffix that names a queue's dead-letter queue.
const DLQ_SUFFIX: &str = ".dlq";

/// Settings of a dead-letter queue made from its queue's: never full
/// (dead-lettering must not fail) and never dead-lettering (nothing
/// dead-letters a dead letter: it stays until acknowledged or purged).
fn dead_letter_options(options: &QueueOptions) -> QueueOptions {
    let mut options = options.clone();
    options.queue.max_depth = u64::MAX;
    options.queue.dead_lettering = false;
    options
}

impl Queue {
    /// Whether `name` may name a queue (and so a directory).
    pub(crate) fn valid_name(name: &str) -> bool {
        valid_name(name)
    }

    /// Checks a queue name as a host would, so a client can refuse a bad
    /// one itself (a host reports it only as an opaque failure).
    pub fn check_name(name: &str) -> Result<(), QueueError> {
        if valid_name(name) {
            Ok(())
        } else {
            Err(QueueError::InvalidName(name.to_string()))
        }
    }
}

fn valid_name(name: &str) -> bool {
    // `.` and `..` are directories already: a queue so named would escape
    // the queue directory.
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Queue {
    /// Opens (or creates) the queue `name` under `dir`, and its dead-letter
    /// queue `name.dlq`. Every message stored and not acknowledged before is
    /// back, ready for delivery (delivery counts start again from zero).
    ///
    /// A name ending in `.dlq` opens that dead-letter queue by itself (with
    /// no dead-letter queue of its own, never full, never dead-lettering);
    /// while its queue is open, use [`Queue::dead_letters`] instead, since a
    /// queue's log can be open only once.
    pub async fn open(
        dir: impl AsRef<Path>,
        name: &str,
        options: QueueOptions,
    ) -> Result<Queue, QueueError> {
        Queue::open_inner(dir.as_ref(), name, options, None).await
    }

    /// Opens (or creates) the queue `name` under `dir` with the options a
    /// client declares for it, over the host's `options` (see
    /// [`QueueDeclaration`]). A new queue stores the declaration with it,
    /// so [`Queue::open`] after a restart opens it with the same options.
    /// An existing queue must have been declared with the same options:
    /// otherwise [`QueueError::OptionsConflict`] (a queue created without
    /// a declaration counts as declared with none). Values out of bounds
    /// are [`QueueError::InvalidOption`]. A dead-letter queue takes the
    /// host's options and cannot be declared.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use courier_queue::{ErrorKind, Queue, QueueDeclaration};
    ///
    /// let dir = std::env::temp_dir().join(format!("courier-declare-doc-{}", std::process::id()));
    /// let strict = QueueDeclaration::new().with_max_deliveries(1);
    /// let payments = Queue::open_declared(&dir, "payments", Default::default(), strict.clone()).await?;
    /// assert_eq!(payments.declared(), &strict);
    /// // The same options again are fine; others are refused.
    /// payments.declare(strict).await?;
    /// let err = payments.declare(QueueDeclaration::new().with_max_deliveries(9)).await.unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Conflict);
    /// # drop(payments);
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(()) }
    /// ```
    pub async fn open_declared(
        dir: impl AsRef<Path>,
        name: &str,
        options: QueueOptions,
        declared: QueueDeclaration,
    ) -> Result<Queue, QueueError> {
        Queue::open_inner(dir.as_ref(), name, options, Some(declared)).await
    }

    async fn open_inner(
        dir: &Path,
        name: &str,
        options: QueueOptions,
        requested: Option<QueueDeclaration>,
    ) -> Result<Queue, QueueError> {
        if name.ends_with(DLQ_SUFFIX) {
            if requested.as_ref().is_some_and(|r| !r.is_empty()) {
                return Err(QueueError::InvalidOption {
                    option: "queue",
                    reason: format!(
                        "{name} is a dead-letter queue, which takes its queue's host's options"
                    ),
                });
            }
            let options = dead_letter_options(&options);
            return Queue::open_one(dir, name, options, None, QueueDeclaration::default()).await;
        }
        if !valid_name(name) {
            return Err(QueueError::InvalidName(name.to_string()));
        }
        if let Some(requested) = &requested {
            requested.validate()?;
        }
        let stored = declare::load(name, &dir.join(name))?;
        let declared = match (stored, requested) {
            (Some(stored), Some(requested)) if stored != requested => {
                return Err(QueueError::OptionsConflict {
                    queue: name.to_string(),
                    declared: stored,
                    requested,
                })
            }
            (Some(stored), _) => stored,
            (None, Some(requested)) => {
                // Stored before the queue exists: a crash between the two
                // leaves a declared queue with nothing in it, never a
                // queue that forgot its options.
                if !requested.is_empty() {
                    declare::store(&dir.join(name), &requested)?;
                }
                requested
            }
            (None, None) => QueueDeclaration::default(),
        };
        let dead_letters = Queue::open_one(
            dir,
            &format!("{name}{DLQ_SUFFIX}"),
            dead_letter_options(&options),
            None,
            QueueDeclaration::default(),
        )
        .await?;
        let mut options = options;
        options.queue = declared.apply(options.queue);
        Queue::open_one(dir, name, options, Some(dead_letters), declared).await
    }

    /// What a client declared for this queue (empty if nothing).
    pub fn declared(&self) -> &QueueDeclaration {
        &self.inner.declared
    }

    /// Checks that the queue has these declared options: `Ok` if it was
    /// declared with exactly these, [`QueueError::OptionsConflict`] if not
    /// (an open queue's options never change), [`QueueError::InvalidOption`]
    /// if they are out of bounds. Never waits on an embedded queue; the
    /// remote face's `declare` creates the queue with them if it is new.
    pub async fn declare(&self, declared: QueueDeclaration) -> Result<(), QueueError> {
        self.check_declared(declared)
    }

    pub(crate) fn check_declared(&self, requested: QueueDeclaration) -> Result<(), QueueError> {
        requested.validate()?;
        if requested == self.inner.declared {
            Ok(())
        } else {
            Err(QueueError::OptionsConflict {
                queue: self.inner.name.clone(),
                declared: self.inner.declared.clone(),
                requested,
            })
        }
    }

    /// Whether `name` names a dead-letter queue (`<queue>.dlq`); if so, the
    /// queue it belongs to.
    pub fn dead_letter_parent(name: &str) -> Option<&str> {
        name.strip_suffix(DLQ_SUFFIX)
            .filter(|parent| !parent.is_empty())
    }

    /// A queue over `storage`, which holds nothing yet (records written
    /// through it are not replayed here), with no dead-letter queue, so
    /// with dead-lettering off. For storage backends other than the local
    /// [`Log`], and for tests that watch what the queue writes.
    pub fn with_storage(
        name: &str,
        storage: Box<dyn Storage>,
        config: QueueConfig,
    ) -> Result<Queue, QueueError> {
        if !valid_name(name) {
            return Err(QueueError::InvalidName(name.to_string()));
        }
        let config = QueueConfig {
            dead_lettering: false,
            ..config
        };
        Ok(Queue::build(
            name,
            storage,
            Recovered {
                core: QueueCore::new(config),
                payloads: HashMap::new(),
                epoch: Instant::now(),
                known_next: 0,
            },
            None,
            QueueDeclaration::default(),
        ))
    }

    fn build(
        name: &str,
        storage: Box<dyn Storage>,
        recovered: Recovered,
        dead_letters: Option<Queue>,
        declared: QueueDeclaration,
    ) -> Queue {
        let Recovered {
            core,
            payloads,
            epoch,
            known_next,
        } = recovered;
        let inner = Arc::new(Inner {
            name: name.to_string(),
            storage,
            state: Mutex::new(State {
                core,
                payloads,
                next_consumer: 0,
                removals: 0,
                timer_at: None,
                pending_dead: Vec::new(),
                pending_removals: Vec::new(),
                known_next,
                enqueuing: BTreeMap::new(),
            }),
            changed: Arc::new(Notify::new()),
            timer_wake: Arc::new(Notify::new()),
            epoch,
            keyed: tokio::sync::Mutex::new(()),
            settling: tokio::sync::Mutex::new(()),
            dead_letters,
            declared,
            timer: Mutex::new(None),
        });
        let timer = tokio::spawn(run_timers(
            Arc::downgrade(&inner),
            inner.changed.clone(),
            inner.timer_wake.clone(),
        ));
        *lock(&inner.timer) = Some(timer);
        Queue { inner }
    }

    async fn open_one(
        dir: &Path,
        name: &str,
        options: QueueOptions,
        dead_letters: Option<Queue>,
        declared: QueueDeclaration,
    ) -> Result<Queue, QueueError> {
        if !valid_name(name) {
            return Err(QueueError::InvalidName(name.to_string()));
        }
        // Replayed delays and lifetimes are measured from here.
        let epoch = Instant::now();
        let now_wall = wall_ms();
        let mut core = QueueCore::new(options.queue.clone());
        let mut payloads = HashMap::new();
        let mut known_next = 0;
        let (log, recovery): (Log, Recovery) =
            Log::open(dir.join(name), options.log.clone(), |record| {
                known_next = record.seq + 1;
                match record.kind {
                    ENQUEUE | ENQUEUE_WITH_HEADERS => {
                        if let Some(Replayed {
                            at,
                            delay,
                            ttl,
                            key,
                            headers,
                            payload,
                        }) = decode_enqueue(record.kind, record.payload)
                        {
                            // Delays and lifetimes run on from when the message was stored.
                            let remaining = |ms: u64| {
                                Duration::from_millis(
                                    (at.saturating_add(ms)).saturating_sub(now_wall),
                                )
                            };
                            let expires = (ttl != u64::MAX).then(|| remaining(ttl));
                            // Recovered, not accepted now: not counted as enqueued.
                            core.handle_recovered(record.seq, key, remaining(delay), expires);
                            // A copy: the record is a slice of the whole
                            // segment as read, which would stay in memory
                            // (up to a segment's size) as long as any one of
                            // its messages does. Memory follows the backlog.
                            payloads.insert(
                                record.seq,
                                Stored {
                                    payload: Bytes::copy_from_slice(&payload),
                                    headers,
                                },
                            );
                        }
                    }
                    REMOVE if record.payload.len() == 8 => {
                        let id =
                            u64::from_le_bytes(record.payload[..].try_into().expect("8 bytes"));
                        core.forget(id);
                        payloads.remove(&id);
                    }
                    _ => {}
                }
            })?;
        if recovery.truncated_bytes > 0 || !recovery.corruption.is_empty() {
            tracing::warn!(queue = name, ?recovery, "queue recovered with damage");
        }
        let queue = Queue::build(
            name,
            Box::new(log),
            Recovered {
                core,
                payloads,
                epoch,
                known_next,
            },
            dead_letters,
            declared,
        );
        // Anything that expired while the queue was closed goes now.
        queue.settle().await?;
        Ok(queue)
    }

    fn now(&self) -> Duration {
        self.inner.epoch.elapsed()
    }

    /// Whether both handles are the same queue.
    #[cfg(feature = "remote")]
    pub(crate) fn same(&self, other: &Queue) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its dead-letter queue (messages delivered `max_deliveries` times,
    /// and rejected ones; see [`parse_dead_letter`]); `None` for a queue
    /// that has none (a dead-letter queue itself).
    pub fn dead_letters(&self) -> Option<Queue> {
        self.inner.dead_letters.clone()
    }

    /// Stores one message; returns once it is durable under the fsync policy.
    pub async fn enqueue(&self, message: Message) -> Result<Enqueued, QueueError> {
        Ok(self.enqueue_batch(vec![message]).await?[0])
    }

    /// Stores messages together (one write, one fsync); all or none are stored.
    pub async fn enqueue_batch(
        &self,
        mut messages: Vec<Message>,
    ) -> Result<Vec<Enqueued>, QueueError> {
        messages.iter_mut().for_each(Message::stamp_trace);
        // Keyed enqueues are serialized, so two of them with the same key
        // cannot both pass the duplicate check.
        let _keyed = if messages.iter().any(|m| m.key.is_some()) {
            Some(self.inner.keyed.lock().await)
        } else {
            None
        };
        let mut outcomes = vec![None; messages.len()];
        let mut fresh = Vec::new();
        let mut enqueuing = Enqueuing {
            state: &self.inner.state,
            floor: None,
        };
        {
            let mut state = lock(&self.inner.state);
            // Checked here, not reserved: concurrent batches may overshoot
            // the limit by at most what they carry.
            let limit = state.core.config().max_depth;
            if state.payloads.len() as u64 + messages.len() as u64 > limit {
                return Err(QueueError::Full {
                    queue: self.inner.name.clone(),
                    limit,
                });
            }
            let mut seen_in_batch = HashMap::new();
            for (index, message) in messages.iter().enumerate() {
                if let Some(key) = &message.key {
                    if let Some(id) = state.core.duplicate_of(key) {
                        outcomes[index] = Some(Enqueued::Duplicate(id));
                        continue;
                    }
                    if seen_in_batch.insert(key.clone(), index).is_some() {
                        continue; // resolved below, after the first is stored
                    }
                }
                fresh.push(index);
            }
            if !fresh.is_empty() {
                // Before the append is sent, so that its records come at or
                // after the floor.
                enqueuing.floor = Some(Enqueuing::register(&mut state));
            }
        }
        if !fresh.is_empty() {
            let records = fresh
                .iter()
                .map(|&i| encode_enqueue(&messages[i]))
                .collect();
            let first = self.inner.storage.append_batch(records).await?;
            let now = self.now();
            let mut state = lock(&self.inner.state);
            state.appended(first, fresh.len());
            for (offset, &index) in fresh.iter().enumerate() {
                let id = first + offset as u64;
                let message = &messages[index];
                state.core.handle_enqueue(
                    id,
                    message.key.clone(),
                    now + message.delay.unwrap_or_default(),
                    message.ttl.map(|ttl| now + ttl),
                );
                state.payloads.insert(
                    id,
                    Stored {
                        payload: message.payload.clone(),
                        headers: message.headers.clone(),
                    },
                );
                outcomes[index] = Some(Enqueued::Stored(id));
            }
            // In the core now, which compaction looks at.
            enqueuing.done(&mut state);
            // Later copies of a key within this batch duplicate the first.
            for (index, message) in messages.iter().enumerate() {
                if outcomes[index].is_none() {
                    let key = message
                        .key
                        .as_deref()
                        .expect("only keyed messages are left");
                    outcomes[index] = state.core.duplicate_of(key).map(Enqueued::Duplicate);
                }
            }
        }
        self.inner.changed.notify_waiters();
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every message has an outcome"))
            .collect())
    }

    /// A consumer holding at most `prefetch` unacknowledged messages: a
    /// delivery counts until it is acked, nacked, rejected or dropped, even
    /// after its lease has expired. Never fails on an embedded queue (the
    /// `Result` is the remote face's shape, see [`crate::QueueHandle`]).
    pub async fn consumer(&self, prefetch: u32) -> Result<Consumer, QueueError> {
        Ok(self.consumer_now(prefetch as usize))
    }

    /// [`Queue::consumer`] without the await, for callers in this crate
    /// that cannot await where they make one.
    pub(crate) fn consumer_now(&self, prefetch: usize) -> Consumer {
        let mut state = lock(&self.inner.state);
        let id = state.next_consumer;
        state.next_consumer += 1;
        state.core.add_consumer(id, prefetch);
        Consumer {
            queue: self.clone(),
            id,
            prefetch: prefetch.max(1),
            holding: Arc::new(AtomicUsize::new(0)),
            waiter: None,
        }
    }

    /// Counters, and the bytes the queue occupies on disk. Never fails on
    /// an embedded queue; [`Queue::stats_now`] is the same without the
    /// await.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        Ok(self.stats_now())
    }

    /// [`Queue::stats`], synchronously (for metrics read under a lock).
    pub fn stats_now(&self) -> QueueStats {
        let mut stats = lock(&self.inner.state).core.stats();
        stats.bytes_on_disk = self.inner.storage.bytes_on_disk();
        stats
    }

    /// The next `count` ready messages, in the order consumers would get
    /// them, without taking or leasing them: nothing changes (no delivery
    /// is counted, and a consumer may take them the moment after). Delayed
    /// messages not yet due and messages leased to consumers are not shown.
    /// Never fails on an embedded queue; [`Queue::peek_now`] is the same
    /// without the await.
    pub async fn peek(&self, count: u32) -> Result<Vec<Peeked>, QueueError> {
        Ok(self.peek_now(count as usize))
    }

    /// [`Queue::peek`], synchronously.
    pub fn peek_now(&self, limit: usize) -> Vec<Peeked> {
        let now = self.now();
        let state = lock(&self.inner.state);
        state
            .core
            .peek(now, limit)
            .into_iter()
            .filter_map(|(id, deliveries)| {
                let stored = state.payloads.get(&id)?;
                Some(Peeked {
                    id,
                    deliveries,
                    payload: stored.payload.clone(),
                    headers: stored.headers.clone(),
                })
            })
            .collect()
    }

    /// Removes every message not leased to a consumer (ready or delayed);
    /// returns how many, once their removal is durable. Leased messages stay
    /// until answered. On a dead-letter queue this is how dead letters are
    /// discarded.
    pub async fn purge(&self) -> Result<u64, QueueError> {
        let purged = {
            let mut state = lock(&self.inner.state);
            let state = &mut *state;
            let ids = state.core.purge();
            for id in &ids {
                state.payloads.remove(id);
                state
                    .pending_removals
                    .push((REMOVE, Bytes::copy_from_slice(&id.to_le_bytes())));
            }
            ids.len() as u64
        };
        self.inner.changed.notify_waiters();
        self.settle().await?;
        Ok(purged)
    }

    /// Makes removals durable, moves dead letters, deletes consumed segments.
    ///
    /// Returns once every removal the core reported before the call is
    /// durable (under the fsync policy), including removals another
    /// concurrent settle took: settles run one at a time, so one that
    /// finds nothing left waits for the one that took its events. A failed
    /// write puts its records back for the next settle, and fails every
    /// call that was waiting on it.
    ///
    /// It runs in a task of its own: the records it takes out of the state
    /// are written, or put back, whatever happens to the caller's future (a
    /// remote ack is an RPC handler, which a client's cancel or a deadline
    /// aborts; dropped halfway, a settle would otherwise lose what it took,
    /// a dead letter included).
    pub(crate) async fn settle(&self) -> Result<(), QueueError> {
        self.start_settle().await
    }

    /// A [`Queue::settle`] started now, not when first polled: a caller
    /// settling several queues starts them all before it awaits any, so
    /// being dropped at the first await leaves none of them unstarted.
    pub(crate) fn start_settle(
        &self,
    ) -> impl std::future::Future<Output = Result<(), QueueError>> + Send + 'static {
        let queue = self.clone();
        let task = tokio::spawn(async move { queue.settle_now().await });
        async move {
            match task.await {
                Ok(outcome) => outcome,
                // Only a panic (a bug) or a runtime shutting down gets here.
                Err(err) => Err(QueueError::Append(AppendError::Io(format!(
                    "recording removals was interrupted: {err}"
                )))),
            }
        }
    }

    async fn settle_now(&self) -> Result<(), QueueError> {
        let _settling = self.inner.settling.lock().await;
        let (removals, dead, compact) = {
            let mut state = lock(&self.inner.state);
            let state = &mut *state;
            while let Some(event) = state.core.poll_event() {
                let id = match event {
                    QueueEvent::Acked(id) | QueueEvent::Expired(id) => id,
                    QueueEvent::DeadLettered { id, history } => {
                        if let Some(stored) = state.payloads.get(&id) {
                            state.pending_dead.push(
                                Message::new(encode_dead_letter(&history, &stored.payload))
                                    .with_headers(dead_letter_headers(&stored.headers)),
                            );
                        }
                        id
                    }
                };
                state.payloads.remove(&id);
                state
                    .pending_removals
                    .push((REMOVE, Bytes::copy_from_slice(&id.to_le_bytes())));
            }
            let removals = std::mem::take(&mut state.pending_removals);
            let dead = std::mem::take(&mut state.pending_dead);
            let before = state.removals;
            state.removals += removals.len() as u64;
            let compact = before / COMPACT_EVERY != state.removals / COMPACT_EVERY;
            (removals, dead, compact)
        };
        if let (false, Some(dlq)) = (dead.is_empty(), &self.inner.dead_letters) {
            // Into the dead-letter queue first: a crash between the two
            // leaves a copy in both, never in neither.
            if let Err(err) = dlq.enqueue_batch(dead.clone()).await {
                self.put_back(removals, dead);
                return Err(err);
            }
        }
        if !removals.is_empty() {
            match self.inner.storage.append_batch(removals.clone()).await {
                Ok(first) => lock(&self.inner.state).appended(first, removals.len()),
                Err(err) => {
                    self.put_back(removals, Vec::new());
                    return Err(err.into());
                }
            }
        }
        if compact {
            // Looked at now, not when the events were taken: an enqueue
            // may have been written since (before a segment rolled) and not
            // yet be in the core. Everything it or a later append needs is
            // at or after this.
            let keep_from = lock(&self.inner.state).keep_from();
            self.inner.storage.remove_before(keep_from).await?;
        }
        Ok(())
    }

    /// Returns records a failed settle took, ahead of any taken since.
    fn put_back(&self, mut removals: Vec<(u8, Bytes)>, mut dead: Vec<Message>) {
        let mut state = lock(&self.inner.state);
        state.removals -= removals.len() as u64;
        removals.append(&mut state.pending_removals);
        state.pending_removals = removals;
        dead.append(&mut state.pending_dead);
        state.pending_dead = dead;
    }

    /// Wakes the timer task if a deadline at `at` is earlier than the one
    /// it sleeps towards.
    fn arm(&self, state: &mut State, at: Duration) {
        if state.timer_at.is_none_or(|armed| at < armed) {
            state.timer_at = Some(at);
            // A stored permit if the task is not waiting yet, so the wake-up
            // cannot be lost between its look at the deadline and its wait.
            self.inner.timer_wake.notify_one();
        }
    }
}

/// Runs lease expiries, delays and TTLs for a queue. Holds the queue only
/// while it works, so dropping every handle stops it.
async fn run_timers(queue: Weak<Inner>, changed: Arc<Notify>, wake_up: Arc<Notify>) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let wake = {
            let Some(inner) = queue.upgrade() else { return };
            let now = inner.epoch.elapsed();
            let mut state = lock(&inner.state);
            let next = state.core.poll_timeout(now);
            // Anything due earlier than this must wake the task (see `arm`).
            state.timer_at = next;
            next.map(|t| inner.epoch + t)
        };
        match wake {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = &mut notified => continue,
                    _ = wake_up.notified() => continue,
                }
            }
            None => {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = wake_up.notified() => {}
                }
                continue;
            }
        }
        let Some(inner) = queue.upgrade() else { return };
        let now = inner.epoch.elapsed();
        lock(&inner.state).core.handle_timeout(now);
        let queue = Queue { inner };
        if let Err(err) = queue.settle().await {
            tracing::error!(queue = queue.name(), %err, "could not record expired messages");
        }
        queue.inner.changed.notify_waiters();
    }
}

/// Takes messages from a queue. Dropping it makes every message it holds
/// deliverable again at once.
pub struct Consumer {
    queue: Queue,
    id: ConsumerId,
    prefetch: usize,
    /// Deliveries handed out and not yet answered or dropped. The core's
    /// credit comes back when a lease expires; this does not, so a
    /// consumer sitting on expired deliveries cannot take more than it
    /// asked for.
    holding: Arc<AtomicUsize>,
    /// Registered for the queue's next change while a receive waits. Kept
    /// here, not in the `recv` future, so a dropped `recv` loses nothing
    /// and the next one resumes the same wait.
    waiter: Option<Pin<Box<OwnedNotified>>>,
}

/// A delivery's place in its consumer's prefetch, given back on drop (so
/// also by `ack` and `nack`, which consume the delivery).
struct Slot {
    holding: Arc<AtomicUsize>,
    changed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.holding.fetch_sub(1, Ordering::AcqRel);
        // The consumer may wait in `recv` for this very slot.
        self.changed.notify_waiters();
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue.inner.name)
            .field("id", &self.id)
            .finish()
    }
}

impl Consumer {
    /// Waits for the next message this consumer may take. Never fails on
    /// an embedded queue (the `Result` is the remote face's shape).
    ///
    /// Cancel-safe: a delivery is taken from the queue and returned in the
    /// same poll, so a `recv` dropped in `tokio::select!` (or under a
    /// timeout) has taken nothing, and the next call waits on.
    pub async fn recv(&mut self) -> Result<Delivery, QueueError> {
        Ok(std::future::poll_fn(|cx| self.poll_recv(cx)).await)
    }

    /// The next delivery, or `Pending` with `cx` woken on the queue's next
    /// change. Takes nothing unless it returns it.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Delivery> {
        loop {
            let mut waiter = self
                .waiter
                .take()
                .unwrap_or_else(|| Box::pin(self.queue.inner.changed.clone().notified_owned()));
            // Registered before looking: a change between the look and the
            // wait wakes it.
            waiter.as_mut().enable();
            if let Some(delivery) = self.try_recv() {
                return Poll::Ready(delivery);
            }
            match waiter.as_mut().poll(cx) {
                Poll::Ready(()) => continue,
                Poll::Pending => {
                    self.waiter = Some(waiter);
                    return Poll::Pending;
                }
            }
        }
    }

    /// The next message, if one is deliverable now and this consumer holds
    /// fewer than its prefetch (a delivery counts until it is answered or
    /// dropped, whether or not its lease has expired).
    pub fn try_recv(&self) -> Option<Delivery> {
        let now = self.queue.now();
        let mut state = lock(&self.queue.inner.state);
        // Checked, and counted below, under the state lock: callers sharing
        // this consumer cannot pass the bound between the two.
        if self.holding.load(Ordering::Acquire) >= self.prefetch {
            return None;
        }
        let delivery = state.core.poll_delivery(self.id, now)?;
        // The lease must end by itself, even if nothing else happens on
        // this queue.
        self.queue.arm(&mut state, delivery.lease_until);
        let Stored { payload, headers } = state
            .payloads
            .get(&delivery.id)
            .cloned()
            .unwrap_or_default();
        self.holding.fetch_add(1, Ordering::AcqRel);
        Some(Delivery {
            id: delivery.id,
            delivery: delivery.delivery,
            payload,
            headers,
            queue: self.queue.clone(),
            consumer: self.id,
            _slot: Slot {
                holding: self.holding.clone(),
                changed: self.queue.inner.changed.clone(),
            },
        })
    }

    /// Processes the next message with `handler`: acknowledged if it
    /// returns `Ok`, given back for redelivery at once if it returns `Err`.
    pub async fn process<F, Fut, E>(&mut self, handler: F) -> Result<Result<(), E>, QueueError>
    where
        F: FnOnce(Bytes) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let delivery = self.recv().await?;
        match handler(delivery.payload.clone()).await {
            Ok(()) => delivery.ack().await.map(|()| Ok(())),
            Err(err) => delivery.nack(Duration::ZERO).await.map(|()| Err(err)),
        }
    }
}

/// The consumer's deliveries, as [`Consumer::recv`] gives them (it never
/// ends: an embedded queue does not go away under its consumer). Polling
/// it and dropping the poll's caller is as cancel-safe as `recv`.
impl futures_core::Stream for Consumer {
    type Item = Result<Delivery, QueueError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .poll_recv(cx)
            .map(|delivery| Some(Ok(delivery)))
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let now = self.queue.now();
        lock(&self.queue.inner.state)
            .core
            .remove_consumer(self.id, now);
        self.queue.inner.changed.notify_waiters();
    }
}

/// How a delivery is answered, for [`Delivery::answer_now`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Done with it.
    Ack,
    /// Give it back, to come again after the delay.
    Nack(Duration),
    /// Dead-letter it at once.
    Reject,
}

/// One delivery of a message. Acknowledge it after processing; dropping it
/// unacknowledged lets its lease run out, and the message comes back.
pub struct Delivery {
    /// The message.
    pub id: MessageId,
    /// 1 for the first delivery, then 2, …
    pub delivery: u32,
    /// Its bytes.
    pub payload: Bytes,
    /// Its headers, as enqueued.
    pub headers: Headers,
    queue: Queue,
    consumer: ConsumerId,
    _slot: Slot,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.id)
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Done with it: removed for good (durably, under the fsync policy,
    /// when this returns). Refused once the lease has ended, even if the
    /// message has not been given to anyone else yet.
    pub async fn ack(self) -> Result<(), QueueError> {
        // The consumer has credit again (`answer_now` wakes it if it waits
        // in `recv`).
        self.answer_now(Answer::Ack)?.settle().await
    }

    /// Give it back, to be delivered again after `delay`.
    pub async fn nack(self, delay: Duration) -> Result<(), QueueError> {
        self.answer_now(Answer::Nack(delay))?.settle().await
    }

    /// A poison message: moved to the dead-letter queue at once with its
    /// delivery history (see [`parse_dead_letter`]), however many
    /// deliveries it had left — RabbitMQ's `basic.reject` without requeue.
    /// Returns once it is durable there and removed here. On a queue
    /// without a dead-letter queue (a dead-letter queue itself) the
    /// message is discarded. Refused once the lease has ended.
    pub async fn reject(self) -> Result<(), QueueError> {
        self.answer_now(Answer::Reject)?.settle().await
    }

    /// The message.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// 1 for the first delivery, then 2, …
    pub fn delivery_count(&self) -> u32 {
        self.delivery
    }

    /// Its bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Its headers, as enqueued.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Applies an answer to the queue's state at once, without waiting for
    /// its records: the caller makes them durable with one
    /// [`Queue::settle`] for many answers (one log batch, one fsync), and
    /// answers none of them before that returns. Nothing here awaits, so a
    /// caller dropped afterwards leaves the answer applied, and the settle
    /// it skipped is done by the next one (see `settle_now`).
    pub(crate) fn answer_now(self, answer: Answer) -> Result<Queue, QueueError> {
        let now = self.queue.now();
        let mut state = lock(&self.queue.inner.state);
        match answer {
            Answer::Ack => state
                .core
                .ack_at(self.consumer, self.id, self.delivery, now)?,
            Answer::Nack(delay) => {
                state
                    .core
                    .nack(self.consumer, self.id, self.delivery, delay, now)?
            }
            Answer::Reject => state
                .core
                .reject(self.consumer, self.id, self.delivery, now)?,
        }
        drop(state);
        self.queue.inner.changed.notify_waiters();
        Ok(self.queue.clone())
    }

    /// Keep the lease for `by` from now (refused once it has ended). Never
    /// waits on an embedded queue; [`Delivery::extend_now`] is the same
    /// without the await.
    pub async fn extend(&self, by: Duration) -> Result<(), QueueError> {
        self.extend_now(by)
    }

    /// [`Delivery::extend`], synchronously.
    pub fn extend_now(&self, by: Duration) -> Result<(), QueueError> {
        let now = self.queue.now();
        let mut state = lock(&self.queue.inner.state);
        let until = state
            .core
            .extend(self.consumer, self.id, self.delivery, by, now)?;
        self.queue.arm(&mut state, until);
        drop(state);
        self.queue.inner.changed.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Replay reads records from disk: whatever their bytes, decoding
        /// an enqueue record answers (a message or `None`), never panics.
        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            for kind in [ENQUEUE, ENQUEUE_WITH_HEADERS] {
                let _ = decode_enqueue(kind, Bytes::from(bytes.clone()));
            }
            let _ = parse_dead_letter(Bytes::from(bytes));
        }

        /// What is encoded decodes to the same message, with or without
        /// headers and key.
        #[test]
        fn enqueue_records_round_trip(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            key in proptest::option::of("[a-z]{1,12}"),
            header in proptest::option::of("[ -~]{0,40}"),
        ) {
            let mut message = Message::new(payload.clone());
            message.key = key.clone();
            if let Some(value) = &header {
                let mut headers = Headers::new();
                headers.insert("x-test", value.clone()).unwrap();
                message = message.with_headers(headers);
            }
            let (kind, record) = encode_enqueue(&message);
            prop_assert_eq!(kind, if header.is_some() { ENQUEUE_WITH_HEADERS } else { ENQUEUE });
            let replayed = decode_enqueue(kind, record).expect("decodes");
            prop_assert_eq!(&replayed.payload[..], &payload[..]);
            prop_assert_eq!(replayed.key, key);
            prop_assert_eq!(replayed.headers, message.headers);
        }
    }

    /// Headers past today's limits (written under others) cost the message
    /// its headers, never the message.
    #[test]
    fn a_message_whose_headers_do_not_decode_is_kept_without_them() {
        let mut headers = Headers::new();
        headers.insert("x-test", "value").unwrap();
        let message = Message::new("payload").with_headers(headers);
        let (kind, record) = encode_enqueue(&message);
        assert_eq!(kind, ENQUEUE_WITH_HEADERS);
        let mut damaged = record.to_vec();
        // No key: 26 bytes of times and key length, 2 of header length,
        // then the headers, whose first byte is their count.
        damaged[28] = 0x7f;
        let replayed = decode_enqueue(kind, Bytes::from(damaged)).expect("the message is kept");
        assert!(replayed.headers.is_empty());
        assert_eq!(&replayed.payload[..], b"payload");
    }
}
