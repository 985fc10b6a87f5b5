//! The same queues served over the network: a courier-rpc service, with
//! deliveries as a server stream under credit.
//!
//! A [`QueueHost`] serves every queue under one directory; a
//! [`RemoteQueue`] uses one of them from another process. Semantics are the
//! embedded queue's: a consumer whose connection dies (its process was
//! killed, its machine vanished) gives its unacknowledged messages back at
//! once, for other consumers.
//!
//! A consumer holds at most the `prefetch` it asked for: a delivery counts
//! against it from when the host sends it until the consumer answers it
//! (`ack`, `nack`, even one refused because the lease had ended) or goes
//! away, whatever happens to the lease meanwhile.
//!
//! A dead-letter queue (`<queue>.dlq`) is served like any queue, by name:
//! the host hands out the one its queue owns. Errors sent to clients never
//! carry the host's filesystem paths (those are logged on the host).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_rpc::{Client, ClientConfig, ItemStream, Items, RpcError};
use courier_transport::Address;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::core::{MessageId, QueueStats};
use crate::{Delivery, Enqueued, Message, Queue, QueueError, QueueOptions};

/// A queue error as it crosses the network.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The host refused or failed the operation.
    #[error("{reason}")]
    Queue {
        /// What went wrong, as the host says it.
        reason: String,
        /// Whether trying again may succeed.
        retryable: bool,
    },
    /// The delivery is unknown to the host: already answered, or its
    /// consumer went away and it was given to someone else (or it was
    /// delivered to another identity).
    #[error("unknown delivery (already answered, or its consumer went away)")]
    UnknownDelivery,
    /// The caller may not do this (nothing else about the connection changes).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No queue of this name exists on the host (asking for its counters or
    /// purging it does not create it).
    #[error("no queue named {0:?}")]
    NotFound(String),
}

/// Decides what each caller may do on a [`QueueHost`]. `who` is the
/// caller's identity ([`courier_rpc::caller`]); `None` is anonymous.
pub trait QueueAccess: Send + Sync + 'static {
    /// May `who` store messages in `queue`?
    fn may_produce(&self, who: Option<&str>, queue: &str) -> bool;
    /// May `who` take messages from `queue` (and see its counters)?
    fn may_consume(&self, who: Option<&str>, queue: &str) -> bool;
    /// May `who` discard every waiting message of `queue`? By default,
    /// whoever may consume from it.
    fn may_purge(&self, who: Option<&str>, queue: &str) -> bool {
        self.may_consume(who, queue)
    }
}

impl From<QueueError> for RemoteError {
    fn from(err: QueueError) -> RemoteError {
        match err {
            QueueError::NotFound(name) => RemoteError::NotFound(name),
            // Opening errors name files on the host: the path stays in the
            // host's log, the client gets a message without it.
            QueueError::Open(open) => {
                tracing::error!(error = %open, "could not open a queue");
                RemoteError::Queue {
                    reason: "the host could not open the queue's storage (details in its log)"
                        .into(),
                    retryable: false,
                }
            }
            err => RemoteError::Queue {
                retryable: err.is_retryable(),
                reason: err.to_string(),
            },
        }
    }
}

/// One delivery as it crosses the network.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireDelivery {
    /// Names this delivery when answering it.
    pub token: u64,
    /// The message.
    pub id: MessageId,
    /// 1 for the first delivery, then 2, …
    pub delivery: u32,
    /// Its bytes.
    pub payload: Bytes,
}

/// The queue protocol.
#[courier_rpc::service]
pub trait QueueService {
    /// Stores messages in `queue` (created on first use).
    async fn enqueue(
        &self,
        queue: String,
        messages: Vec<Message>,
    ) -> Result<Vec<Enqueued>, RemoteError>;
    /// Streams deliveries to one consumer holding at most `prefetch` of them.
    async fn consume(
        &self,
        queue: String,
        prefetch: u32,
        items: Items<Result<WireDelivery, RemoteError>>,
    );
    /// Acknowledges a delivery.
    async fn ack(&self, token: u64) -> Result<(), RemoteError>;
    /// Gives a delivery back, to come again after `delay_ms`.
    async fn nack(&self, token: u64, delay_ms: u64) -> Result<(), RemoteError>;
    /// Extends a delivery's lease by `by_ms` from now.
    async fn extend(&self, token: u64, by_ms: u64) -> Result<(), RemoteError>;
    /// A queue's counters (`NotFound` if it does not exist).
    async fn stats(&self, queue: String) -> Result<QueueStats, RemoteError>;
    /// Discards every message of `queue` not leased to a consumer; how many.
    async fn purge(&self, queue: String) -> Result<u64, RemoteError>;
}

/// The queues under one directory, each opened once and shared by whoever
/// uses it (the queue protocol, durable subscriptions, a broker's stats).
/// Cheap to clone.
#[derive(Clone)]
pub struct QueueSet {
    inner: Arc<QueueSetInner>,
}

struct QueueSetInner {
    dir: PathBuf,
    options: QueueOptions,
    queues: tokio::sync::Mutex<HashMap<String, Queue>>,
}

impl std::fmt::Debug for QueueSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSet")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl QueueSet {
    /// The queues under `dir`, opened on first use with `options`.
    pub fn new(dir: impl Into<PathBuf>, options: QueueOptions) -> QueueSet {
        QueueSet {
            inner: Arc::new(QueueSetInner {
                dir: dir.into(),
                options,
                queues: tokio::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Where the queues live.
    pub fn dir(&self) -> &std::path::Path {
        &self.inner.dir
    }

    /// The queue `name`, opened (and recovered, or created) on first use.
    ///
    /// `<queue>.dlq` is the dead-letter queue that `<queue>` owns (opening
    /// `<queue>` if needed): the same one, shared, since a queue's log can
    /// be open only once.
    pub async fn open(&self, name: &str) -> Result<Queue, QueueError> {
        self.get(name, true).await
    }

    /// The queue `name` if it is open or stored under the directory;
    /// [`QueueError::NotFound`] otherwise, creating nothing.
    pub async fn open_existing(&self, name: &str) -> Result<Queue, QueueError> {
        self.get(name, false).await
    }

    async fn get(&self, name: &str, create: bool) -> Result<Queue, QueueError> {
        let parent = Queue::dead_letter_parent(name);
        let owner = parent.unwrap_or(name);
        if Queue::dead_letter_parent(owner).is_some() {
            // A dead-letter queue has no dead-letter queue of its own.
            return Err(QueueError::NotFound(name.to_string()));
        }
        let mut queues = self.inner.queues.lock().await;
        let queue = match queues.get(owner) {
            Some(queue) => queue.clone(),
            None => {
                if !create {
                    // Checked before touching the disk: the name becomes a
                    // path below.
                    if !Queue::valid_name(name) {
                        return Err(QueueError::InvalidName(name.to_string()));
                    }
                    let stored = |n: &str| self.inner.dir.join(n).is_dir();
                    if !stored(owner) && !stored(name) {
                        return Err(QueueError::NotFound(name.to_string()));
                    }
                }
                let queue = Queue::open(&self.inner.dir, owner, self.inner.options.clone()).await?;
                queues.insert(owner.to_string(), queue.clone());
                queue
            }
        };
        match parent {
            None => Ok(queue),
            Some(_) => queue
                .dead_letters()
                .cloned()
                .ok_or_else(|| QueueError::NotFound(name.to_string())),
        }
    }

    /// The queues open now, by name (dead-letter queues through their
    /// queue's [`Queue::dead_letters`]).
    pub async fn opened(&self) -> Vec<Queue> {
        let mut queues: Vec<Queue> = self.inner.queues.lock().await.values().cloned().collect();
        queues.sort_by(|a, b| a.name().cmp(b.name()));
        queues
    }

    /// Forgets every open queue. Each closes (its log flushed and fsynced)
    /// when the last handle to it goes, here if nobody else holds one.
    pub async fn close_all(&self) {
        let queues: Vec<Queue> = self
            .inner
            .queues
            .lock()
            .await
            .drain()
            .map(|(_, q)| q)
            .collect();
        drop(queues);
    }

    /// Opens every queue found in the directory (not their `.dlq`s, which
    /// open with them), so that a restarted host serves them at once.
    pub async fn open_all(&self) -> Result<Vec<Queue>, QueueError> {
        let mut names = Vec::new();
        match std::fs::read_dir(&self.inner.dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if entry.path().is_dir() && !name.ends_with(".dlq") {
                        names.push(name);
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(QueueError::Open(crate::log::OpenError::Io {
                    path: self.inner.dir.clone(),
                    source,
                }))
            }
        }
        names.sort();
        for name in names {
            self.open(&name).await?;
        }
        Ok(self.opened().await)
    }
}

/// A delivery waiting for its answer, and who it was delivered to.
struct Held {
    delivery: Delivery,
    owner: Option<Arc<str>>,
    /// The consumer stream it went out on.
    stream: u64,
    /// One of the consumer's `prefetch` permits, returned when this is
    /// dropped: when the delivery is answered or its consumer goes away,
    /// not when its lease expires (the client still holds it then).
    _credit: OwnedSemaphorePermit,
}

/// Every delivery waiting for its answer, by token and by consumer stream,
/// so that each operation costs the same however many a consumer holds.
#[derive(Default)]
struct Table {
    held: HashMap<u64, Held>,
    by_stream: HashMap<u64, HashSet<u64>>,
}

impl Table {
    fn insert(&mut self, token: u64, held: Held) {
        self.by_stream.entry(held.stream).or_default().insert(token);
        self.held.insert(token, held);
    }

    fn get(&self, token: u64, who: &Option<Arc<str>>) -> Option<&Held> {
        self.held.get(&token).filter(|held| held.owner == *who)
    }

    /// The delivery under `token`, if it was delivered to `who`.
    fn take(&mut self, token: u64, who: &Option<Arc<str>>) -> Option<Held> {
        self.get(token, who)?;
        let held = self.held.remove(&token)?;
        if let Some(tokens) = self.by_stream.get_mut(&held.stream) {
            tokens.remove(&token);
        }
        Some(held)
    }

    /// Forgets a stream's deliveries (its consumer went away).
    fn forget_stream(&mut self, stream: u64) {
        for token in self.by_stream.remove(&stream).unwrap_or_default() {
            self.held.remove(&token);
        }
    }

    fn len(&self) -> usize {
        self.held.len()
    }
}

/// Serves every queue of a [`QueueSet`].
pub struct QueueHost {
    queues: QueueSet,
    outstanding: Arc<Mutex<Table>>,
    next_token: AtomicU64,
    next_stream: AtomicU64,
    access: Option<Arc<dyn QueueAccess>>,
}

impl std::fmt::Debug for QueueHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueHost")
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Forgets a consumer's outstanding deliveries when its stream ends, so
/// nobody can answer them after the messages went back to the queue.
struct Outstanding {
    table: Arc<Mutex<Table>>,
    stream: u64,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        lock(&self.table).forget_stream(self.stream);
    }
}

impl QueueHost {
    /// A host for the queues under `dir`; wrap it in
    /// [`QueueServiceServer::new`] and add it to a `courier_rpc::Server`.
    pub fn new(dir: impl Into<PathBuf>, options: QueueOptions) -> QueueHost {
        QueueHost::serving(QueueSet::new(dir, options))
    }

    /// A host for `queues`, which others may share.
    pub fn serving(queues: QueueSet) -> QueueHost {
        QueueHost {
            queues,
            outstanding: Arc::default(),
            next_token: AtomicU64::new(1),
            next_stream: AtomicU64::new(1),
            access: None,
        }
    }

    /// The same host, asking `access` before every enqueue and consume.
    pub fn with_access(mut self, access: Arc<dyn QueueAccess>) -> QueueHost {
        self.access = Some(access);
        self
    }

    /// Deliveries sent to consumers and not answered yet, over all queues.
    pub fn outstanding(&self) -> usize {
        lock(&self.outstanding).len()
    }

    fn check(&self, queue: &str, action: Action) -> Result<(), RemoteError> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let who = courier_rpc::caller();
        let (allowed, doing) = match action {
            Action::Produce => (access.may_produce(who.as_deref(), queue), "producing to"),
            Action::Consume => (access.may_consume(who.as_deref(), queue), "consuming from"),
            Action::Purge => (access.may_purge(who.as_deref(), queue), "purging"),
        };
        if allowed {
            Ok(())
        } else {
            Err(RemoteError::PermissionDenied(format!(
                "{doing} queue {queue}"
            )))
        }
    }

    async fn queue(&self, name: &str) -> Result<Queue, RemoteError> {
        Ok(self.queues.open(name).await?)
    }

    /// The delivery under `token`, if it was delivered to the caller. Taking
    /// it gives the consumer's credit back, whatever the answer's outcome.
    fn take(&self, token: u64) -> Result<Delivery, RemoteError> {
        let held = lock(&self.outstanding)
            .take(token, &courier_rpc::caller())
            .ok_or(RemoteError::UnknownDelivery)?;
        Ok(held.delivery)
    }
}

#[derive(Clone, Copy)]
enum Action {
    Produce,
    Consume,
    Purge,
}

impl QueueService for QueueHost {
    async fn enqueue(
        &self,
        queue: String,
        messages: Vec<Message>,
    ) -> Result<Vec<Enqueued>, RemoteError> {
        self.check(&queue, Action::Produce)?;
        Ok(self.queue(&queue).await?.enqueue_batch(messages).await?)
    }

    async fn consume(
        &self,
        queue: String,
        prefetch: u32,
        items: Items<Result<WireDelivery, RemoteError>>,
    ) {
        if let Err(err) = self.check(&queue, Action::Consume) {
            let _ = items.send(Err(err)).await;
            return;
        }
        let owner = courier_rpc::caller();
        let queue = match self.queue(&queue).await {
            Ok(queue) => queue,
            Err(err) => {
                let _ = items.send(Err(err)).await;
                return;
            }
        };
        // The consumer's credit: one permit per delivery it holds, taken
        // before a message is leased and returned only by its answer or the
        // consumer's end, so it never holds more than it asked for.
        let prefetch = (prefetch.max(1) as usize).min(Semaphore::MAX_PERMITS);
        let credit = Arc::new(Semaphore::new(prefetch));
        // Dropped when the client goes away (the call is cancelled): its
        // messages go back to the queue and its tokens are forgotten.
        let consumer = queue.consumer(prefetch);
        let _outstanding = Outstanding {
            table: self.outstanding.clone(),
            stream: self.next_stream.fetch_add(1, Ordering::Relaxed),
        };
        loop {
            let Ok(permit) = credit.clone().acquire_owned().await else {
                return; // never closed; nothing to serve if it were
            };
            let delivery = consumer.recv().await;
            let token = self.next_token.fetch_add(1, Ordering::Relaxed);
            let wire = WireDelivery {
                token,
                id: delivery.id,
                delivery: delivery.delivery,
                payload: delivery.payload.clone(),
            };
            lock(&self.outstanding).insert(
                token,
                Held {
                    delivery,
                    owner: owner.clone(),
                    stream: _outstanding.stream,
                    _credit: permit,
                },
            );
            if items.send(Ok(wire)).await.is_err() {
                return;
            }
        }
    }

    async fn ack(&self, token: u64) -> Result<(), RemoteError> {
        Ok(self.take(token)?.ack().await?)
    }

    async fn nack(&self, token: u64, delay_ms: u64) -> Result<(), RemoteError> {
        Ok(self
            .take(token)?
            .nack(Duration::from_millis(delay_ms))
            .await?)
    }

    async fn extend(&self, token: u64, by_ms: u64) -> Result<(), RemoteError> {
        let outstanding = lock(&self.outstanding);
        let held = outstanding
            .get(token, &courier_rpc::caller())
            .ok_or(RemoteError::UnknownDelivery)?;
        Ok(held.delivery.extend(Duration::from_millis(by_ms))?)
    }

    async fn stats(&self, queue: String) -> Result<QueueStats, RemoteError> {
        self.check(&queue, Action::Consume)?;
        Ok(self.queues.open_existing(&queue).await?.stats())
    }

    async fn purge(&self, queue: String) -> Result<u64, RemoteError> {
        self.check(&queue, Action::Purge)?;
        Ok(self.queues.open_existing(&queue).await?.purge().await?)
    }
}

/// What can go wrong using a remote queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteQueueError {
    /// The call failed (host unreachable, deadline, ...).
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The host answered with an error.
    #[error(transparent)]
    Queue(#[from] RemoteError),
}

/// A queue on a [`QueueHost`] in another process or on another machine.
#[derive(Clone, Debug)]
pub struct RemoteQueue {
    client: QueueServiceClient,
    name: String,
}

/// Consumers keep their stream open this long (it is cancelled by dropping
/// the consumer, not by a deadline).
const CONSUMER_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl RemoteQueue {
    /// The queue `name` on the host at `address`.
    pub async fn connect(
        address: &Address,
        name: &str,
        config: ClientConfig,
    ) -> Result<RemoteQueue, RemoteQueueError> {
        Ok(RemoteQueue::with_client(
            Client::connect(address, config).await?,
            name,
        ))
    }

    /// The queue `name` on the host `client` is connected to, sharing its
    /// connection.
    pub fn with_client(client: Client, name: &str) -> RemoteQueue {
        RemoteQueue {
            client: QueueServiceClient::new(client),
            name: name.to_string(),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stores one message; see [`Queue::enqueue`].
    pub async fn enqueue(&self, message: Message) -> Result<Enqueued, RemoteQueueError> {
        Ok(self.enqueue_batch(vec![message]).await?[0])
    }

    /// Stores messages together; see [`Queue::enqueue_batch`].
    pub async fn enqueue_batch(
        &self,
        messages: Vec<Message>,
    ) -> Result<Vec<Enqueued>, RemoteQueueError> {
        Ok(self.client.enqueue(self.name.clone(), messages).await??)
    }

    /// A consumer holding at most `prefetch` unacknowledged messages: a
    /// delivery counts until it is acked, nacked or dropped, even after its
    /// lease has expired (dropping one gives it back at once).
    pub async fn consumer(&self, prefetch: u32) -> Result<RemoteConsumer, RemoteQueueError> {
        let stream = self
            .client
            .with_timeout(CONSUMER_LIFETIME)
            .consume(self.name.clone(), prefetch)
            .await?;
        Ok(RemoteConsumer {
            stream,
            client: self.client.clone(),
        })
    }

    /// The queue's counters ([`RemoteError::NotFound`] if it does not exist).
    pub async fn stats(&self) -> Result<QueueStats, RemoteQueueError> {
        Ok(self.client.stats(self.name.clone()).await??)
    }

    /// Discards every message not leased to a consumer; see [`Queue::purge`].
    pub async fn purge(&self) -> Result<u64, RemoteQueueError> {
        Ok(self.client.purge(self.name.clone()).await??)
    }
}

/// Takes messages from a remote queue. Dropping it gives back everything it
/// holds unacknowledged.
#[derive(Debug)]
pub struct RemoteConsumer {
    stream: ItemStream<Result<WireDelivery, RemoteError>>,
    client: QueueServiceClient,
}

impl RemoteConsumer {
    /// The next delivery; `None` if the host went away.
    pub async fn recv(&mut self) -> Option<Result<RemoteDelivery, RemoteQueueError>> {
        let wire = match self.stream.next().await? {
            Ok(Ok(wire)) => wire,
            Ok(Err(err)) => return Some(Err(err.into())),
            Err(err) => return Some(Err(err.into())),
        };
        Some(Ok(RemoteDelivery {
            id: wire.id,
            delivery: wire.delivery,
            payload: wire.payload,
            token: wire.token,
            client: self.client.clone(),
            answered: false,
        }))
    }
}

/// One delivery from a remote queue. Acknowledge it after processing.
#[derive(Debug)]
pub struct RemoteDelivery {
    /// The message.
    pub id: MessageId,
    /// 1 for the first delivery, then 2, …
    pub delivery: u32,
    /// Its bytes.
    pub payload: Bytes,
    token: u64,
    client: QueueServiceClient,
    /// Set once an ack or nack has had its answer: until then, dropping the
    /// delivery gives it back.
    answered: bool,
}

/// Dropped unanswered (a handler that returned early, or an ack whose
/// future was dropped), a delivery is given back at once, as a nack without
/// delay would: the host frees its place in the consumer's prefetch, which
/// it otherwise holds until the consumer goes (an expired lease does not
/// give credit back, see [`RemoteQueue::consumer`]).
impl Drop for RemoteDelivery {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, token) = (self.client.clone(), self.token);
            runtime.spawn(async move {
                // Refused if it was answered after all: nothing to give back.
                let _ = client.nack(token, 0).await;
            });
        }
    }
}

impl RemoteDelivery {
    /// Done with it; see [`Delivery::ack`].
    pub async fn ack(mut self) -> Result<(), RemoteQueueError> {
        let outcome = self.client.ack(self.token).await;
        self.answered = true;
        Ok(outcome??)
    }

    /// Give it back; see [`Delivery::nack`].
    pub async fn nack(mut self, delay: Duration) -> Result<(), RemoteQueueError> {
        let outcome = self.client.nack(self.token, delay.as_millis() as u64).await;
        self.answered = true;
        Ok(outcome??)
    }

    /// Keep the lease longer; see [`Delivery::extend`].
    pub async fn extend(&self, by: Duration) -> Result<(), RemoteQueueError> {
        Ok(self
            .client
            .extend(self.token, by.as_millis() as u64)
            .await??)
    }
}
