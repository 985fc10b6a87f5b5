//! Durable subscriptions: a named subscription whose messages are stored
//! in a courier-queue until its subscriber acknowledges them, so a
//! subscriber that was offline gets what was published meanwhile.
//!
//! Publishing through [`Durable::publish`] stores the message in every
//! matching durable subscription's queue (and waits for that to be durable,
//! per the queue's fsync policy) before delivering it to live subscribers;
//! a publish that returned `Ok` is never lost by a crash. The set of
//! durable subscriptions is itself kept in a small file next to the queues,
//! written atomically, so a restarted host has them all back.
//!
//! Consumers read a durable subscription's queue like any other queue:
//! competing consumers share it, unacknowledged messages come back, and
//! poison messages go to its dead-letter queue. [`DurableMessage::decode`]
//! turns a delivery's payload back into subject and bytes.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use courier_pubsub::durable::{Durable, DurableMessage};
//! use courier_pubsub::Bus;
//! use courier_queue::QueueSet;
//!
//! # let dir = std::env::temp_dir().join(format!("courier-durable-doc-{}", std::process::id()));
//! let durable = Durable::open(QueueSet::new(&dir, Default::default())).await?;
//! let audit = durable.subscribe("audit", "orders.>").await?;
//! let bus = Bus::new();
//! durable.publish(&bus.publisher(), "orders.eu.created", "tea").await?;
//!
//! let mut consumer = audit.consumer(1).await?;
//! let delivery = consumer.recv().await?;
//! let message = DurableMessage::decode(&delivery.payload)?;
//! assert_eq!((message.subject.as_str(), &message.payload[..]), ("orders.eu.created", &b"tea"[..]));
//! delivery.ack().await?;
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use courier_queue::QueueSet;
use courier_queue::{Enqueued, Message as QueueMessage, Queue, QueueError};
use courier_wire::headers::Headers;

use crate::{Filter, Publisher, Router, Subject, SubjectError, SubscriptionId};

/// The file, beside the queues, that lists the durable subscriptions.
const REGISTRY_FILE: &str = "durable-subscriptions";
/// Durable subscription `name` keeps its messages in queue `durable.<name>`
/// ([`queue_name`]).
pub const QUEUE_PREFIX: &str = "durable.";
/// The registry is small; a bigger file is damage, not data.
const MAX_REGISTRY_BYTES: u64 = 16 << 20;

/// What can go wrong with a durable subscription.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DurableError {
    /// The subject or filter is invalid.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The name is not valid: 1 to 180 of `[A-Za-z0-9_-]`.
    #[error("invalid durable subscription name {0:?}: expected 1 to 180 of [A-Za-z0-9_-]")]
    InvalidName(String),
    /// The name is taken by a subscription with another filter.
    #[error("durable subscription {name:?} exists with filter {existing:?}, not {requested:?}")]
    FilterConflict {
        /// The subscription.
        name: String,
        /// Its filter.
        existing: String,
        /// The filter asked for.
        requested: String,
    },
    /// Storing a message, or opening a queue, failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// A stored message could not be stored because its queue refused it
    /// (full, or a duplicate key).
    #[error("durable subscription {name:?} refused the message: {outcome:?}")]
    Refused {
        /// The subscription.
        name: String,
        /// What its queue said.
        outcome: Enqueued,
    },
    /// The registry file could not be read or written.
    #[error("durable subscription registry {path}: {reason}")]
    Registry {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A stored message is not one this module wrote.
    #[error("not a durable subscription message: {0}")]
    Malformed(String),
}

impl DurableError {
    /// What kind of failure this is, as an
    /// [`ErrorKind`](courier_wire::ErrorKind) shared by every Courier
    /// mechanism: an invalid subject or name is `InvalidInput`, a name
    /// taken with another filter `Conflict`, a message its queue refused
    /// (full, or a duplicate key) `Busy`, the queue's own failures their
    /// [`QueueError::kind`], a damaged registry or message `Internal`.
    pub fn kind(&self) -> courier_wire::ErrorKind {
        use courier_wire::ErrorKind;
        match self {
            DurableError::Subject(err) => err.kind(),
            DurableError::InvalidName(_) => ErrorKind::InvalidInput,
            DurableError::FilterConflict { .. } => ErrorKind::Conflict,
            DurableError::Queue(err) => err.kind(),
            DurableError::Refused { .. } => ErrorKind::Busy,
            DurableError::Registry { .. } | DurableError::Malformed(_) => ErrorKind::Internal,
        }
    }

    /// Whether trying again may succeed: whether its
    /// [`kind`](Self::kind) is retryable.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// A message as a durable subscription stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableMessage {
    /// The subject it was published to.
    pub subject: Subject,
    /// Where to reply, if it was a request.
    pub reply_to: Option<Subject>,
    /// Its bytes.
    pub payload: Bytes,
    /// Its headers, as published (empty for messages stored before
    /// headers existed).
    pub headers: Headers,
}

/// The stored form, postcard:
///
/// ```text
/// subject (str) | reply_to (option<str>) | payload (bytes) [| headers]
/// ```
///
/// The first three are the whole of the form before headers existed, and
/// still the whole of a message without headers, so what either version
/// wrote the other reads (an older reader ignores the trailing headers).
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored<'a> {
    subject: &'a str,
    reply_to: Option<&'a str>,
    payload: &'a [u8],
}

impl DurableMessage {
    fn encode(
        subject: &Subject,
        reply_to: Option<&Subject>,
        headers: &Headers,
        payload: &[u8],
    ) -> Bytes {
        let stored = Stored {
            subject: subject.as_str(),
            reply_to: reply_to.map(Subject::as_str),
            payload,
        };
        // Serializing borrowed strings, bytes and bounded headers into a
        // Vec cannot fail.
        let mut bytes = postcard::to_stdvec(&stored).unwrap_or_default();
        if !headers.is_empty() {
            bytes.extend(postcard::to_stdvec(headers).unwrap_or_default());
        }
        Bytes::from(bytes)
    }

    /// Decodes a delivery's payload from a durable subscription's queue,
    /// in either stored form (with headers or from before them).
    pub fn decode(bytes: &Bytes) -> Result<DurableMessage, DurableError> {
        let malformed = |e: &dyn std::fmt::Display| DurableError::Malformed(e.to_string());
        let (stored, rest): (Stored<'_>, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| malformed(&e))?;
        let headers = if rest.is_empty() {
            Headers::new()
        } else {
            // Decoding enforces the headers' bounds; nothing may follow.
            let (headers, rest): (Headers, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| malformed(&e))?;
            if !rest.is_empty() {
                return Err(DurableError::Malformed(format!(
                    "{} bytes after the headers",
                    rest.len()
                )));
            }
            headers
        };
        Ok(DurableMessage {
            subject: Subject::new(stored.subject)?,
            reply_to: stored.reply_to.map(Subject::new).transpose()?,
            payload: bytes.slice_ref(stored.payload),
            headers,
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RegistryEntry {
    name: String,
    filter: String,
}

struct Entry {
    name: String,
    filter: Filter,
    queue: Queue,
}

#[derive(Default)]
struct Table {
    router: Router,
    by_id: HashMap<SubscriptionId, Entry>,
    by_name: HashMap<String, SubscriptionId>,
    next_id: SubscriptionId,
}

struct Inner {
    queues: QueueSet,
    table: RwLock<Table>,
    /// Serializes changes, so the registry file is written in order.
    changes: tokio::sync::Mutex<()>,
}

/// The durable subscriptions of one host. Cheap to clone.
#[derive(Clone)]
pub struct Durable {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("queues", &self.inner.queues)
            .field("subscriptions", &self.len())
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    (1..=180).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// The queue that holds durable subscription `name`'s messages.
pub fn queue_name(name: &str) -> String {
    format!("{QUEUE_PREFIX}{name}")
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poison| poison.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poison| poison.into_inner())
}

impl Durable {
    /// The durable subscriptions kept with `queues`: those registered
    /// before come back, with every message they had not acknowledged.
    pub async fn open(queues: QueueSet) -> Result<Durable, DurableError> {
        let durable = Durable {
            inner: Arc::new(Inner {
                queues,
                table: RwLock::new(Table::default()),
                changes: tokio::sync::Mutex::new(()),
            }),
        };
        for entry in durable.read_registry()? {
            let filter = Filter::new(&entry.filter)?;
            let queue = durable.inner.queues.open(&queue_name(&entry.name)).await?;
            durable.insert(entry.name, filter, queue);
        }
        Ok(durable)
    }

    fn registry_path(&self) -> PathBuf {
        self.inner.queues.dir().join(REGISTRY_FILE)
    }

    fn registry_error(&self, reason: impl std::fmt::Display) -> DurableError {
        DurableError::Registry {
            path: self.registry_path(),
            reason: reason.to_string(),
        }
    }

    fn read_registry(&self) -> Result<Vec<RegistryEntry>, DurableError> {
        let path = self.registry_path();
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(self.registry_error(err)),
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_REGISTRY_BYTES + 1),
            &mut bytes,
        )
        .map_err(|err| self.registry_error(err))?;
        if bytes.len() as u64 > MAX_REGISTRY_BYTES {
            return Err(self.registry_error("larger than 16 MiB"));
        }
        postcard::from_bytes(&bytes).map_err(|err| self.registry_error(err))
    }

    /// Writes the registry to a temporary file, syncs it and renames it over
    /// the old one, then syncs the directory: a crash leaves the old or the
    /// new registry, never a torn one.
    fn write_registry(&self) -> Result<(), DurableError> {
        let entries: Vec<RegistryEntry> = {
            let table = read_lock(&self.inner.table);
            let mut entries: Vec<RegistryEntry> = table
                .by_id
                .values()
                .map(|e| RegistryEntry {
                    name: e.name.clone(),
                    filter: e.filter.as_str().to_string(),
                })
                .collect();
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries
        };
        let bytes = postcard::to_stdvec(&entries).map_err(|err| self.registry_error(err))?;
        let path = self.registry_path();
        let temporary = path.with_extension("tmp");
        let io = |err: std::io::Error| self.registry_error(err);
        std::fs::create_dir_all(self.inner.queues.dir()).map_err(io)?;
        let mut file = std::fs::File::create(&temporary).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&temporary, &path).map_err(io)?;
        std::fs::File::open(self.inner.queues.dir())
            .and_then(|dir| dir.sync_all())
            .map_err(io)
    }

    fn insert(&self, name: String, filter: Filter, queue: Queue) {
        let mut table = write_lock(&self.inner.table);
        let id = table.next_id;
        table.next_id += 1;
        table.router.insert(&filter, id);
        table.by_name.insert(name.clone(), id);
        table.by_id.insert(
            id,
            Entry {
                name,
                filter,
                queue,
            },
        );
    }

    /// Creates the durable subscription `name` on `filter`, or finds it if
    /// it exists with the same filter; returns its queue. It is registered
    /// durably before this returns.
    pub async fn subscribe(&self, name: &str, filter: &str) -> Result<Queue, DurableError> {
        if !valid_name(name) {
            return Err(DurableError::InvalidName(name.to_string()));
        }
        let filter = Filter::new(filter)?;
        let _change = self.inner.changes.lock().await;
        {
            let table = read_lock(&self.inner.table);
            if let Some(entry) = table.by_name.get(name).and_then(|id| table.by_id.get(id)) {
                if entry.filter.as_str() != filter.as_str() {
                    return Err(DurableError::FilterConflict {
                        name: name.to_string(),
                        existing: entry.filter.as_str().to_string(),
                        requested: filter.as_str().to_string(),
                    });
                }
                return Ok(entry.queue.clone());
            }
        }
        let queue = self.inner.queues.open(&queue_name(name)).await?;
        self.insert(name.to_string(), filter, queue.clone());
        if let Err(err) = self.write_registry() {
            self.remove(name);
            return Err(err);
        }
        Ok(queue)
    }

    fn remove(&self, name: &str) -> bool {
        let mut table = write_lock(&self.inner.table);
        let Some(id) = table.by_name.remove(name) else {
            return false;
        };
        if let Some(entry) = table.by_id.remove(&id) {
            table.router.remove(&entry.filter, id);
        }
        true
    }

    /// Ends the durable subscription `name`: nothing more is stored for it.
    /// Messages already stored stay in its queue until consumed. Returns
    /// whether it existed.
    pub async fn unsubscribe(&self, name: &str) -> Result<bool, DurableError> {
        let _change = self.inner.changes.lock().await;
        if !self.remove(name) {
            return Ok(false);
        }
        self.write_registry()?;
        Ok(true)
    }

    /// The durable subscriptions, as (name, filter), by name.
    pub fn list(&self) -> Vec<(String, String)> {
        let table = read_lock(&self.inner.table);
        let mut list: Vec<(String, String)> = table
            .by_id
            .values()
            .map(|e| (e.name.clone(), e.filter.as_str().to_string()))
            .collect();
        list.sort();
        list
    }

    /// How many durable subscriptions there are.
    pub fn len(&self) -> usize {
        read_lock(&self.inner.table).by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores a batch of messages in every durable subscription each one
    /// matches, one queue append per subscription. Returns how many copies
    /// were stored. When it returns `Ok`, they survive a crash.
    pub async fn store(&self, messages: &[crate::bus::Outgoing]) -> Result<usize, DurableError> {
        let mut batches: HashMap<SubscriptionId, (Queue, String, Vec<QueueMessage>)> =
            HashMap::new();
        {
            let table = read_lock(&self.inner.table);
            if table.by_id.is_empty() {
                return Ok(0);
            }
            let mut matched = Vec::new();
            for (subject, reply_to, headers, payload) in messages {
                matched.clear();
                table.router.matches(subject, &mut matched);
                for id in &matched {
                    if let Some(entry) = table.by_id.get(id) {
                        batches
                            .entry(*id)
                            .or_insert_with(|| {
                                (entry.queue.clone(), entry.name.clone(), Vec::new())
                            })
                            .2
                            .push(QueueMessage::new(DurableMessage::encode(
                                subject,
                                reply_to.as_ref(),
                                headers,
                                payload,
                            )));
                    }
                }
            }
        }
        let mut stored = 0;
        for (_, (queue, name, batch)) in batches {
            for outcome in queue.enqueue_batch(batch).await? {
                match outcome {
                    Enqueued::Stored(_) => stored += 1,
                    outcome => return Err(DurableError::Refused { name, outcome }),
                }
            }
        }
        Ok(stored)
    }

    /// Stores `payload` in every matching durable subscription, then
    /// delivers it to live subscribers through `publisher`. Returns how
    /// many live subscriptions it reached.
    pub async fn publish(
        &self,
        publisher: &Publisher,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> Result<usize, DurableError> {
        self.publish_with_headers(publisher, subject, Headers::new(), payload)
            .await
    }

    /// [`publish`](Self::publish) with headers: the durable copies and the
    /// live deliveries carry the same ones, the current trace's
    /// `traceparent` included.
    pub async fn publish_with_headers(
        &self,
        publisher: &Publisher,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<usize, DurableError> {
        let subject = Subject::new(subject)?;
        let payload = payload.into();
        // Traced once, here, so the stored copy gets what the live one gets.
        let headers = crate::bus::traced(headers);
        self.store(&[(subject.clone(), None, headers.clone(), payload.clone())])
            .await?;
        Ok(publisher.send(&subject, None, headers, payload).await)
    }
}

#[cfg(test)]
mod stored_form_tests {
    use super::*;

    /// A message as the version before headers stored it: postcard of
    /// (subject "orders.eu", reply_to Some("_inbox.1"), payload "tea"),
    /// written out byte for byte so a change to the encoder cannot hide a
    /// change to what is read.
    const BEFORE_HEADERS: &[u8] = &[
        9, b'o', b'r', b'd', b'e', b'r', b's', b'.', b'e', b'u', //
        1, 8, b'_', b'i', b'n', b'b', b'o', b'x', b'.', b'1', //
        3, b't', b'e', b'a',
    ];

    #[test]
    fn a_message_stored_before_headers_existed_is_still_read() {
        let message = DurableMessage::decode(&Bytes::from_static(BEFORE_HEADERS)).unwrap();
        assert_eq!(message.subject.as_str(), "orders.eu");
        assert_eq!(message.reply_to.unwrap().as_str(), "_inbox.1");
        assert_eq!(&message.payload[..], b"tea");
        assert!(message.headers.is_empty());
    }

    #[test]
    fn a_message_without_headers_is_stored_in_the_old_form() {
        let subject = Subject::new("orders.eu").unwrap();
        let reply_to = Subject::new("_inbox.1").unwrap();
        let bytes = DurableMessage::encode(&subject, Some(&reply_to), &Headers::new(), b"tea");
        assert_eq!(&bytes[..], BEFORE_HEADERS);
    }

    #[test]
    fn headers_round_trip_and_trailing_bytes_are_refused() {
        let subject = Subject::new("orders.eu").unwrap();
        let mut headers = Headers::new();
        headers.insert("x-tenant", "blue").unwrap();
        let bytes = DurableMessage::encode(&subject, None, &headers, b"tea");
        let message = DurableMessage::decode(&bytes).unwrap();
        assert_eq!(
            (message.headers, &message.payload[..]),
            (headers, &b"tea"[..])
        );
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(matches!(
            DurableMessage::decode(&Bytes::from(longer)),
            Err(DurableError::Malformed(_))
        ));
    }
}
