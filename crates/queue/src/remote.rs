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
//! Small requests travel together. A consumer's acks and nacks made while
//! one [`QueueService::answer_batch`] call is in flight go in the next one;
//! the host applies them all at once and writes their records in one log
//! batch (one fsync under `Always`), answering each only once that is
//! durable. Single [`RemoteQueue::enqueue`] calls made while earlier ones
//! are in flight go as one `enqueue` call, each caller still getting its
//! own outcome. A credit comes back as soon as the host has the answer,
//! not when it is durable, so deliveries keep flowing during the fsync.
//!
//! A dead-letter queue (`<queue>.dlq`) is served like any queue, by name:
//! the host hands out the one its queue owns. Errors sent to clients never
//! carry the host's filesystem paths (those are logged on the host).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use courier_rpc::{Client, ItemStream, Items, RpcError};
use courier_transport::ErrorKind;
use courier_wire::headers::Headers;

/// Re-exported: what [`RemoteQueue::connect`] takes, so a client needs no
/// other Courier crate.
pub use courier_rpc::ClientConfig;
/// Re-exported, as [`ClientConfig`].
pub use courier_transport::Address;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::coalesce::{Batcher, CallError, Coalescer, Limits};

use crate::core::{MessageId, QueueStats};
use crate::queue::Answer;
/// Re-exported from the crate root, where it lives (it is a local
/// concept): what a [`QueueHost`] serves.
pub use crate::set::QueueSet;
use crate::{
    Delivery, Enqueued, Message, Peeked, Queue, QueueDeclaration, QueueError, QueueOptions,
};

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
    /// The request is not valid (a declared option out of its bounds);
    /// nothing changed. Not retryable.
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the queue's state (declared with other
    /// options); nothing changed. Not retryable.
    #[error("{0}")]
    Conflict(String),
}

impl RemoteError {
    /// What kind of failure this is, as an [`ErrorKind`] shared by every
    /// Courier mechanism: a permission denial is [`ErrorKind::Refused`],
    /// no such queue [`ErrorKind::NotFound`], an unknown delivery
    /// [`ErrorKind::Conflict`] (answered already, or given to someone
    /// else), a declaration with other options [`ErrorKind::Conflict`], a
    /// bad option [`ErrorKind::InvalidInput`]. Any other refusal or failure of the host crosses the network
    /// as text and a retryable flag only: [`ErrorKind::Busy`] when
    /// retryable (a full queue, storage failing for now), otherwise
    /// [`ErrorKind::Internal`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            RemoteError::Queue { retryable, .. } => match retryable {
                true => ErrorKind::Busy,
                false => ErrorKind::Internal,
            },
            RemoteError::UnknownDelivery => ErrorKind::Conflict,
            RemoteError::PermissionDenied(_) => ErrorKind::Refused,
            RemoteError::NotFound(_) => ErrorKind::NotFound,
            RemoteError::Invalid(_) => ErrorKind::InvalidInput,
            RemoteError::Conflict(_) => ErrorKind::Conflict,
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// Decides what each caller may do on a [`QueueHost`]. `who` is the
/// caller's identity ([`courier_rpc::caller`]); `None` is anonymous.
pub trait QueueAccess: Send + Sync + 'static {
    /// May `who` store messages in `queue`?
    fn may_produce(&self, who: Option<&str>, queue: &str) -> bool;
    /// May `who` take messages from `queue` (and see its counters, and
    /// peek at its ready messages)?
    fn may_consume(&self, who: Option<&str>, queue: &str) -> bool;
    /// May `who` discard every waiting message of `queue`? By default,
    /// whoever may consume from it.
    fn may_purge(&self, who: Option<&str>, queue: &str) -> bool {
        self.may_consume(who, queue)
    }
    /// May `who` declare `queue` with options (creating it)? By default,
    /// whoever may consume from it (consumers are who cares about leases
    /// and delivery limits).
    fn may_declare(&self, who: Option<&str>, queue: &str) -> bool {
        self.may_consume(who, queue)
    }
}

impl From<QueueError> for RemoteError {
    fn from(err: QueueError) -> RemoteError {
        match err {
            QueueError::NotFound(name) => RemoteError::NotFound(name),
            err @ QueueError::InvalidOption { .. } => RemoteError::Invalid(err.to_string()),
            err @ QueueError::OptionsConflict { .. } => RemoteError::Conflict(err.to_string()),
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
    /// Its bytes (a slice of the received frame: see
    /// [`courier_wire::shared`]).
    #[serde(deserialize_with = "courier_wire::shared::deserialize")]
    pub payload: Bytes,
    /// Its headers (bounded as they are decoded).
    pub headers: Headers,
}

/// One answer to a delivery in an [`QueueService::answer_batch`] call.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireAnswer {
    /// Acknowledge the delivery under `token`.
    Ack {
        /// Names the delivery.
        token: u64,
    },
    /// Give the delivery under `token` back, to come again after `delay_ms`.
    Nack {
        /// Names the delivery.
        token: u64,
        /// Milliseconds before it is delivered again.
        delay_ms: u64,
    },
    /// Dead-letter the delivery under `token` at once (a poison message).
    Reject {
        /// Names the delivery.
        token: u64,
    },
}

impl WireAnswer {
    /// The delivery it answers.
    pub fn token(&self) -> u64 {
        match *self {
            WireAnswer::Ack { token }
            | WireAnswer::Nack { token, .. }
            | WireAnswer::Reject { token } => token,
        }
    }
}

/// Answers one [`QueueService::answer_batch`] call carries at most; a
/// longer list is refused whole, before anything in it is applied.
pub const MAX_ANSWER_BATCH: usize = 4096;

/// Deliveries in one item of [`QueueService::consume_batched`] at most.
pub const DELIVERIES_PER_ITEM: usize = 64;

/// Payload bytes in one item of [`QueueService::consume_batched`] at most
/// (a delivery larger than this goes by itself).
pub const DELIVERY_BYTES_PER_ITEM: usize = 256 * 1024;

/// Messages one [`QueueService::peek`] call shows at most (a larger count
/// is cut to this).
pub const MAX_PEEK: u32 = 1000;

/// Payload bytes one [`QueueService::peek`] answer carries at most: it
/// stops before the message that would pass this (but always shows the
/// first, however large).
pub const PEEK_BYTES: usize = 1024 * 1024;

/// Answers a [`RemoteConsumer`] puts in one call (below the host's limit).
const ANSWERS_PER_CALL: usize = 1024;

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
    /// As [`QueueService::consume`], with the deliveries ready at once
    /// sent together (at most [`DELIVERIES_PER_ITEM`] or
    /// [`DELIVERY_BYTES_PER_ITEM`] of payload an item, or one larger
    /// delivery by itself).
    async fn consume_batched(
        &self,
        queue: String,
        prefetch: u32,
        items: Items<Result<Vec<WireDelivery>, RemoteError>>,
    );
    /// Acknowledges a delivery.
    async fn ack(&self, token: u64) -> Result<(), RemoteError>;
    /// Gives a delivery back, to come again after `delay_ms`.
    async fn nack(&self, token: u64, delay_ms: u64) -> Result<(), RemoteError>;
    /// Answers many deliveries at once (at most [`MAX_ANSWER_BATCH`]): one
    /// outcome each, in order. Every answer is applied when the call
    /// arrives, and the records they need share one log batch per queue
    /// (one fsync); the call returns once those are durable.
    async fn answer_batch(
        &self,
        answers: Vec<WireAnswer>,
    ) -> Result<Vec<Result<(), RemoteError>>, RemoteError>;
    /// Extends a delivery's lease by `by_ms` from now.
    async fn extend(&self, token: u64, by_ms: u64) -> Result<(), RemoteError>;
    /// A queue's counters (`NotFound` if it does not exist).
    async fn stats(&self, queue: String) -> Result<QueueStats, RemoteError>;
    /// Discards every message of `queue` not leased to a consumer; how many.
    async fn purge(&self, queue: String) -> Result<u64, RemoteError>;
    /// The next `count` ready messages of `queue` (at most [`MAX_PEEK`]
    /// and [`PEEK_BYTES`]), oldest first, without taking or leasing them
    /// (`NotFound` if the queue does not exist). Needs the permission to
    /// consume.
    async fn peek(&self, queue: String, count: u32) -> Result<Vec<Peeked>, RemoteError>;
    /// Declares `queue` with per-queue options (see
    /// [`QueueDeclaration`]): creates it with them
    /// if it is new; `Conflict` if it exists with others, `Invalid` if one
    /// is out of bounds. Needs the permission to declare.
    async fn declare(&self, queue: String, options: QueueDeclaration) -> Result<(), RemoteError>;
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
    /// Calls answering deliveries (`ack`, `nack`, `answer_batch`) so far.
    answer_calls: AtomicU64,
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
            answer_calls: AtomicU64::new(0),
        }
    }

    /// The same host, asking `access` before every enqueue and consume.
    pub fn with_access(mut self, access: Arc<dyn QueueAccess>) -> QueueHost {
        self.access = Some(access);
        self
    }

    /// Calls that answered deliveries so far (`ack`, `nack`,
    /// `answer_batch`): how well clients coalesce their answers.
    pub fn answer_calls(&self) -> u64 {
        self.answer_calls.load(Ordering::Relaxed)
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
            Action::Declare => (access.may_declare(who.as_deref(), queue), "declaring"),
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

    /// Serves one consumer of `queue`: its deliveries, under credit, go
    /// to `send` in groups of at most `most` (those ready at once; a group
    /// is never waited for). `send` says whether to go on.
    async fn serve_consumer(&self, queue: String, prefetch: u32, most: usize, sink: Sink) {
        if let Err(err) = self.check(&queue, Action::Consume) {
            sink.send(Err(err)).await;
            return;
        }
        let owner = courier_rpc::caller();
        let queue = match self.queue(&queue).await {
            Ok(queue) => queue,
            Err(err) => {
                sink.send(Err(err)).await;
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
        let mut consumer = queue.consumer_now(prefetch);
        let _outstanding = Outstanding {
            table: self.outstanding.clone(),
            stream: self.next_stream.fetch_add(1, Ordering::Relaxed),
        };
        // A delivery that would have taken the last group past its byte
        // bound: it starts the next one (alone, if it is large), so a group
        // never grows past what one frame carries because of its last member.
        let mut held_back = None;
        loop {
            let first = match held_back.take() {
                Some(first) => first,
                None => {
                    let Ok(permit) = credit.clone().acquire_owned().await else {
                        return; // never closed; nothing to serve if it were
                    };
                    let delivery = std::future::poll_fn(|cx| consumer.poll_recv(cx)).await;
                    (delivery, permit)
                }
            };
            let mut bytes = first.0.payload.len() + first.0.headers.total_len();
            let mut taken = vec![first];
            // Whatever else is ready and has credit goes with it.
            while taken.len() < most && bytes < DELIVERY_BYTES_PER_ITEM {
                let Ok(permit) = credit.clone().try_acquire_owned() else {
                    break;
                };
                let Some(delivery) = consumer.try_recv() else {
                    break;
                };
                if bytes + delivery.payload.len() + delivery.headers.total_len()
                    > DELIVERY_BYTES_PER_ITEM
                {
                    held_back = Some((delivery, permit));
                    break;
                }
                bytes += delivery.payload.len() + delivery.headers.total_len();
                taken.push((delivery, permit));
            }
            let mut wire = Vec::with_capacity(taken.len());
            {
                let mut table = lock(&self.outstanding);
                for (delivery, permit) in taken {
                    let token = self.next_token.fetch_add(1, Ordering::Relaxed);
                    wire.push(WireDelivery {
                        token,
                        id: delivery.id,
                        delivery: delivery.delivery,
                        payload: delivery.payload.clone(),
                        headers: delivery.headers.clone(),
                    });
                    table.insert(
                        token,
                        Held {
                            delivery,
                            owner: owner.clone(),
                            stream: _outstanding.stream,
                            _credit: permit,
                        },
                    );
                }
            }
            if !sink.send(Ok(wire)).await {
                return;
            }
        }
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

/// Where a consumer's deliveries go: one stream item each (`consume`), or
/// those sent together in one item (`consume_batched`).
enum Sink {
    Single(Items<Result<WireDelivery, RemoteError>>),
    Batched(Items<Result<Vec<WireDelivery>, RemoteError>>),
}

impl Sink {
    /// Sends a group (or the error that ends the stream); whether to go on.
    async fn send(&self, group: Result<Vec<WireDelivery>, RemoteError>) -> bool {
        match (self, group) {
            (Sink::Single(items), Ok(deliveries)) => {
                for delivery in deliveries {
                    if items.send(Ok(delivery)).await.is_err() {
                        return false;
                    }
                }
                true
            }
            (Sink::Single(items), Err(err)) => {
                let _ = items.send(Err(err)).await;
                false
            }
            (Sink::Batched(items), Ok(deliveries)) => items.send(Ok(deliveries)).await.is_ok(),
            (Sink::Batched(items), Err(err)) => {
                let _ = items.send(Err(err)).await;
                false
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Action {
    Produce,
    Consume,
    Purge,
    Declare,
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
        self.serve_consumer(queue, prefetch, 1, Sink::Single(items))
            .await
    }

    async fn consume_batched(
        &self,
        queue: String,
        prefetch: u32,
        items: Items<Result<Vec<WireDelivery>, RemoteError>>,
    ) {
        self.serve_consumer(queue, prefetch, DELIVERIES_PER_ITEM, Sink::Batched(items))
            .await
    }

    async fn ack(&self, token: u64) -> Result<(), RemoteError> {
        self.answer_calls.fetch_add(1, Ordering::Relaxed);
        Ok(self.take(token)?.ack().await?)
    }

    async fn nack(&self, token: u64, delay_ms: u64) -> Result<(), RemoteError> {
        self.answer_calls.fetch_add(1, Ordering::Relaxed);
        Ok(self
            .take(token)?
            .nack(Duration::from_millis(delay_ms))
            .await?)
    }

    async fn answer_batch(
        &self,
        answers: Vec<WireAnswer>,
    ) -> Result<Vec<Result<(), RemoteError>>, RemoteError> {
        self.answer_calls.fetch_add(1, Ordering::Relaxed);
        if answers.len() > MAX_ANSWER_BATCH {
            return Err(RemoteError::Queue {
                reason: format!(
                    "{} answers in one call; at most {MAX_ANSWER_BATCH}",
                    answers.len()
                ),
                retryable: false,
            });
        }
        let who = courier_rpc::caller();
        // Everything is applied before the first await, so a call cancelled
        // while its records are written leaves every answer applied (and
        // written by the settle, which runs in a task of its own).
        let held: Vec<Option<Held>> = {
            let mut table = lock(&self.outstanding);
            answers
                .iter()
                .map(|answer| table.take(answer.token(), &who))
                .collect()
        };
        // Per answer: refused, or applied to the queue at this index.
        let mut applied: Vec<Result<usize, RemoteError>> = Vec::with_capacity(answers.len());
        let mut queues: Vec<Queue> = Vec::new();
        for (answer, held) in answers.iter().zip(held) {
            let Some(held) = held else {
                applied.push(Err(RemoteError::UnknownDelivery));
                continue;
            };
            let how = match *answer {
                WireAnswer::Ack { .. } => Answer::Ack,
                WireAnswer::Nack { delay_ms, .. } => Answer::Nack(Duration::from_millis(delay_ms)),
                WireAnswer::Reject { .. } => Answer::Reject,
            };
            // Taking it gave the consumer's credit back, whatever the outcome.
            let Held { delivery, .. } = held;
            applied.push(match delivery.answer_now(how) {
                Ok(queue) => Ok(match queues.iter().position(|q| q.same(&queue)) {
                    Some(index) => index,
                    None => {
                        queues.push(queue);
                        queues.len() - 1
                    }
                }),
                Err(err) => Err(err.into()),
            });
        }
        // One settle per queue: the removals of every ack in this call go
        // in one log batch, and none is answered before it is durable. All
        // are started before the first await, so a cancelled call still
        // gets every record written.
        let settles: Vec<_> = queues.iter().map(Queue::start_settle).collect();
        let mut settled = Vec::with_capacity(settles.len());
        for settle in settles {
            settled.push(settle.await.map_err(RemoteError::from));
        }
        Ok(applied
            .into_iter()
            .map(|outcome| outcome.and_then(|index| settled[index].clone()))
            .collect())
    }

    async fn extend(&self, token: u64, by_ms: u64) -> Result<(), RemoteError> {
        let outstanding = lock(&self.outstanding);
        let held = outstanding
            .get(token, &courier_rpc::caller())
            .ok_or(RemoteError::UnknownDelivery)?;
        Ok(held.delivery.extend_now(Duration::from_millis(by_ms))?)
    }

    async fn stats(&self, queue: String) -> Result<QueueStats, RemoteError> {
        self.check(&queue, Action::Consume)?;
        Ok(self.queues.open_existing(&queue).await?.stats_now())
    }

    async fn purge(&self, queue: String) -> Result<u64, RemoteError> {
        self.check(&queue, Action::Purge)?;
        Ok(self.queues.open_existing(&queue).await?.purge().await?)
    }

    async fn declare(&self, queue: String, options: QueueDeclaration) -> Result<(), RemoteError> {
        self.check(&queue, Action::Declare)?;
        self.queues.declare(&queue, options).await?;
        Ok(())
    }

    async fn peek(&self, queue: String, count: u32) -> Result<Vec<Peeked>, RemoteError> {
        self.check(&queue, Action::Consume)?;
        let queue = self.queues.open_existing(&queue).await?;
        let mut bytes = 0;
        let mut shown = Vec::new();
        for peeked in queue.peek_now(count.min(MAX_PEEK) as usize) {
            if !shown.is_empty()
                && bytes + peeked.payload.len() + peeked.headers.total_len() > PEEK_BYTES
            {
                break;
            }
            bytes += peeked.payload.len() + peeked.headers.total_len();
            shown.push(peeked);
        }
        Ok(shown)
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
    /// The consumer's stream has ended (the host finished it, or it ended
    /// with an error returned before): nothing more will come on it.
    /// Make a new consumer. [`ErrorKind::Unavailable`], retryable that way.
    #[error("the consumer's stream has ended")]
    Closed,
}

impl RemoteQueueError {
    /// What kind of failure this is: the call's ([`RpcError::kind`]) or
    /// the host's ([`RemoteError::kind`]). A permission denial is
    /// [`ErrorKind::Refused`] either way.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RemoteQueueError::Rpc(err) => err.kind(),
            RemoteQueueError::Queue(err) => err.kind(),
            RemoteQueueError::Closed => ErrorKind::Unavailable,
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// A queue on a [`QueueHost`] in another process or on another machine.
/// Cheap to clone; clones share one connection and send their single
/// enqueues together.
#[derive(Clone, Debug)]
pub struct RemoteQueue {
    client: QueueServiceClient,
    name: String,
    enqueues: Arc<Enqueues>,
}

// Consumers' streams have no deadline: they end when the consumer is
// dropped or the connection dies, not at a time.

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

    /// The queue `name` on whichever of `addresses` answers first: when
    /// that host goes, the client moves to the next and consumers reattach
    /// by themselves (see [`Client::connect_any`]; each broker has its own
    /// queues until queues are replicated).
    pub async fn connect_any(
        addresses: &[Address],
        name: &str,
        config: ClientConfig,
    ) -> Result<RemoteQueue, RemoteQueueError> {
        Ok(RemoteQueue::with_client(
            Client::connect_any(addresses, config).await?,
            name,
        ))
    }

    /// The queue `name` on the host `client` is connected to, sharing its
    /// connection.
    pub fn with_client(client: Client, name: &str) -> RemoteQueue {
        let client = QueueServiceClient::new(client);
        RemoteQueue {
            enqueues: Coalescer::new(
                EnqueueBatch {
                    client: client.clone(),
                    name: name.to_string(),
                },
                Limits {
                    per_call: ENQUEUES_PER_CALL,
                    weight_per_call: ENQUEUE_BYTES_PER_CALL,
                    calls_in_flight: 2,
                    pending: 4 * ENQUEUES_PER_CALL,
                },
            ),
            client,
            name: name.to_string(),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stores one message; see [`Queue::enqueue`]. Enqueues made while
    /// earlier ones are in flight (from tasks sharing this queue or its
    /// clones) go to the host together, in one call and one log write, and
    /// each returns its own outcome. Dropped after its first poll, the
    /// enqueue may still be stored (as a call whose request went out may).
    pub async fn enqueue(&self, mut message: Message) -> Result<Enqueued, RemoteQueueError> {
        // Stamped here, before coalescing, so each message keeps its own
        // producer's trace even when it travels with others'.
        message.stamp_trace();
        match self.enqueues.call(message).await {
            Ok(enqueued) => Ok(enqueued),
            Err(CallError::Failed(err)) => Err(err),
            Err(CallError::NotSent(_)) => Err(not_sent()),
        }
    }

    /// Stores messages together; see [`Queue::enqueue_batch`].
    pub async fn enqueue_batch(
        &self,
        mut messages: Vec<Message>,
    ) -> Result<Vec<Enqueued>, RemoteQueueError> {
        messages.iter_mut().for_each(Message::stamp_trace);
        Ok(self.client.enqueue(self.name.clone(), messages).await??)
    }

    /// A consumer holding at most `prefetch` unacknowledged messages: a
    /// delivery counts until it is acked, nacked or dropped, even after its
    /// lease has expired (dropping one gives it back at once).
    pub async fn consumer(&self, prefetch: u32) -> Result<RemoteConsumer, RemoteQueueError> {
        let stream = self
            .client
            .without_deadline()
            .consume_batched(self.name.clone(), prefetch)
            .await?;
        Ok(RemoteConsumer {
            feed: Feed::Idle(stream),
            ready: std::collections::VecDeque::new(),
            client: self.client.clone(),
            answers: answers_for(self.client.clone()),
        })
    }

    /// Its dead-letter queue (`<name>.dlq` on the same host, over the same
    /// connection); `None` if this is a dead-letter queue itself. See
    /// [`Queue::dead_letters`].
    pub fn dead_letters(&self) -> Option<RemoteQueue> {
        if Queue::dead_letter_parent(&self.name).is_some() {
            return None;
        }
        Some(RemoteQueue::with_client(
            self.client.client().clone(),
            &format!("{}.dlq", self.name),
        ))
    }

    /// The queue's counters ([`RemoteError::NotFound`] if it does not exist).
    pub async fn stats(&self) -> Result<QueueStats, RemoteQueueError> {
        Ok(self.client.stats(self.name.clone()).await??)
    }

    /// Declares the queue with per-queue options; see
    /// [`QueueService::declare`] and [`Queue::open_declared`]. Declare
    /// before the first enqueue: a queue created by an enqueue counts as
    /// declared with no options, and declaring it with some is then a
    /// conflict.
    pub async fn declare(&self, options: QueueDeclaration) -> Result<(), RemoteQueueError> {
        Ok(self.client.declare(self.name.clone(), options).await??)
    }

    /// Discards every message not leased to a consumer; see [`Queue::purge`].
    pub async fn purge(&self) -> Result<u64, RemoteQueueError> {
        Ok(self.client.purge(self.name.clone()).await??)
    }

    /// The next `count` ready messages without taking them; see
    /// [`Queue::peek`] (the host shows at most [`MAX_PEEK`], and stops
    /// before [`PEEK_BYTES`] of payload).
    pub async fn peek(&self, count: u32) -> Result<Vec<Peeked>, RemoteQueueError> {
        Ok(self.client.peek(self.name.clone(), count).await??)
    }
}

/// Takes messages from a remote queue. Dropping it gives back everything it
/// holds unacknowledged.
pub struct RemoteConsumer {
    feed: Feed,
    /// Deliveries that came together and are not yet taken (at most
    /// [`DELIVERIES_PER_ITEM`], all within the prefetch).
    ready: std::collections::VecDeque<WireDelivery>,
    client: QueueServiceClient,
    answers: Arc<Answers>,
}

impl std::fmt::Debug for RemoteConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConsumer")
            .field("ready", &self.ready.len())
            .field("ended", &matches!(self.feed, Feed::Ended))
            .finish_non_exhaustive()
    }
}

/// What the host streams to a consumer.
type Batch = Result<Vec<WireDelivery>, RemoteError>;
/// One turn of the stream: the stream back, and what it gave.
type Turn = (ItemStream<Batch>, Option<Result<Batch, RpcError>>);

/// A consumer's stream, or the wait for its next item. The wait owns the
/// stream and lives in the consumer, not in a `recv` future: a `recv`
/// dropped halfway leaves it running, and the next `recv` (or poll of the
/// consumer as a `Stream`) picks up what it brings.
enum Feed {
    /// Nothing asked of the stream yet.
    Idle(ItemStream<Batch>),
    /// Waiting for the stream's next item.
    Waiting(Pin<Box<dyn Future<Output = Turn> + Send>>),
    /// The stream finished; nothing more comes.
    Ended,
}

impl RemoteConsumer {
    /// The next delivery; [`RemoteQueueError::Closed`] once the stream has
    /// ended (after the error that ended it, if any, was returned).
    ///
    /// Cancel-safe: what the host sent is kept in the consumer, not in
    /// this future, so a `recv` dropped in `tokio::select!` (or under a
    /// timeout) loses no delivery; the next call returns it.
    pub async fn recv(&mut self) -> Result<RemoteDelivery, RemoteQueueError> {
        std::future::poll_fn(|cx| self.poll_recv(cx))
            .await
            .unwrap_or(Err(RemoteQueueError::Closed))
    }

    /// The next delivery, an error, `None` once the stream has ended, or
    /// `Pending` with `cx` woken when the stream has something.
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<RemoteDelivery, RemoteQueueError>>> {
        loop {
            if let Some(wire) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(self.delivery(wire))));
            }
            match std::mem::replace(&mut self.feed, Feed::Ended) {
                Feed::Ended => return Poll::Ready(None),
                Feed::Idle(mut stream) => {
                    self.feed = Feed::Waiting(Box::pin(async move {
                        let next = stream.next().await;
                        (stream, next)
                    }));
                }
                Feed::Waiting(mut turn) => {
                    let (stream, next) = match turn.as_mut().poll(cx) {
                        Poll::Pending => {
                            self.feed = Feed::Waiting(turn);
                            return Poll::Pending;
                        }
                        Poll::Ready(turn) => turn,
                    };
                    // After an error the stream is finished: its next turn
                    // says so, and the consumer is `Ended` then.
                    match next {
                        None => return Poll::Ready(None),
                        Some(Ok(Ok(wires))) => {
                            self.feed = Feed::Idle(stream);
                            self.ready.extend(wires);
                        }
                        Some(Ok(Err(err))) => {
                            self.feed = Feed::Idle(stream);
                            return Poll::Ready(Some(Err(err.into())));
                        }
                        Some(Err(err)) => {
                            self.feed = Feed::Idle(stream);
                            return Poll::Ready(Some(Err(err.into())));
                        }
                    }
                }
            }
        }
    }

    fn delivery(&self, wire: WireDelivery) -> RemoteDelivery {
        RemoteDelivery {
            id: wire.id,
            delivery: wire.delivery,
            payload: wire.payload,
            headers: wire.headers,
            token: wire.token,
            client: self.client.clone(),
            answers: self.answers.clone(),
            answered: false,
        }
    }
}

/// The consumer's deliveries, as [`RemoteConsumer::recv`] gives them; an
/// error ends it after it is yielded (the stream then yields `None`).
/// Cancel-safe as `recv` is.
impl futures_core::Stream for RemoteConsumer {
    type Item = Result<RemoteDelivery, RemoteQueueError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

/// A consumer's answers on their way to the host: while a call is in
/// flight, later answers wait and go together in the next (at most
/// [`ANSWERS_PER_CALL`] a call), each caller still getting its own outcome.
/// Bounded by the deliveries the consumer holds, each answered once.
type Answers = Coalescer<AnswerBatch>;

/// Sends answers with [`QueueService::answer_batch`].
struct AnswerBatch {
    client: QueueServiceClient,
}

fn answers_for(client: QueueServiceClient) -> Arc<Answers> {
    Coalescer::new(
        AnswerBatch { client },
        Limits {
            per_call: ANSWERS_PER_CALL,
            weight_per_call: usize::MAX,
            calls_in_flight: 1,
            // Answers never wait for room (see `send_later`).
            pending: 1,
        },
    )
}

impl Batcher for AnswerBatch {
    type Item = WireAnswer;
    type Outcome = ();
    type Error = RemoteQueueError;

    fn weight(_: &WireAnswer) -> usize {
        1
    }

    async fn send(&self, answers: Vec<WireAnswer>) -> Vec<Result<(), RemoteQueueError>> {
        let count = answers.len();
        match self.client.answer_batch(answers).await {
            Ok(Ok(outcomes)) => outcomes
                .into_iter()
                .map(|outcome| outcome.map_err(RemoteQueueError::from))
                .collect(),
            Ok(Err(err)) => vec![Err(err.into()); count],
            Err(err) => vec![Err(err.into()); count],
        }
    }

    fn no_outcome() -> RemoteQueueError {
        no_outcome()
    }
}

fn no_outcome() -> RemoteQueueError {
    RemoteQueueError::Queue(RemoteError::Queue {
        reason: "the host gave no outcome for this request".into(),
        retryable: false,
    })
}

fn not_sent() -> RemoteQueueError {
    RemoteQueueError::Rpc(RpcError::Unavailable(
        "no runtime to send the request from (or it shut down)".into(),
    ))
}

/// Single enqueues of a [`RemoteQueue`] (and its clones) on their way: one
/// `enqueue` call carries those made while earlier calls were in flight.
type Enqueues = Coalescer<EnqueueBatch>;

/// Messages in one coalesced enqueue call at most, and their bytes.
const ENQUEUES_PER_CALL: usize = 1024;
const ENQUEUE_BYTES_PER_CALL: usize = 1024 * 1024;

/// Sends single enqueues together as one `enqueue` call. Such a call is
/// all or none, which separate callers did not ask for: when it fails as a
/// whole on the host (a message too large, the queue full for all of them),
/// each message is tried again by itself, so each caller gets the outcome
/// its own enqueue would have had. A failed call (deadline, connection) is
/// not retried: whether it was stored is unknown, as for any call.
struct EnqueueBatch {
    client: QueueServiceClient,
    name: String,
}

impl Batcher for EnqueueBatch {
    type Item = Message;
    type Outcome = Enqueued;
    type Error = RemoteQueueError;

    fn weight(message: &Message) -> usize {
        message.payload.len()
            + message.key.as_ref().map_or(0, String::len)
            + message.headers.total_len()
    }

    async fn send(&self, messages: Vec<Message>) -> Vec<Result<Enqueued, RemoteQueueError>> {
        let count = messages.len();
        let retry = match self
            .client
            .enqueue(self.name.clone(), messages.clone())
            .await
        {
            Ok(Ok(stored)) => return stored.into_iter().map(Ok).collect(),
            Ok(Err(err)) if count > 1 => err.to_string(),
            Ok(Err(err)) => return vec![Err(err.into())],
            // Too large together (a connection with a small frame limit),
            // though each may fit alone: refused before any I/O, so
            // nothing was stored.
            Err(err @ RpcError::TooLarge { .. }) if count > 1 => err.to_string(),
            Err(err) => return vec![Err(err.into()); count],
        };
        tracing::debug!(queue = %self.name, %retry, "a coalesced enqueue failed; trying each message by itself");
        let mut outcomes = Vec::with_capacity(count);
        for message in messages {
            outcomes.push(
                match self.client.enqueue(self.name.clone(), vec![message]).await {
                    Ok(Ok(stored)) => stored.into_iter().next().ok_or_else(no_outcome),
                    Ok(Err(err)) => Err(err.into()),
                    Err(err) => Err(err.into()),
                },
            );
        }
        outcomes
    }

    fn no_outcome() -> RemoteQueueError {
        no_outcome()
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
    /// Its headers, as enqueued.
    pub headers: Headers,
    token: u64,
    client: QueueServiceClient,
    answers: Arc<Answers>,
    /// Set once an ack or nack has been handed to the consumer's answers:
    /// until then, dropping the delivery gives it back.
    answered: bool,
}

/// Dropped unanswered (a handler that returned early, or an `ack` or `nack`
/// future dropped before it was first polled), a delivery is given back at
/// once, as a nack without delay would: the host frees its place in the
/// consumer's prefetch, which it otherwise holds until the consumer goes
/// (an expired lease does not give credit back, see
/// [`RemoteQueue::consumer`]).
impl Drop for RemoteDelivery {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        // Refused if it was answered after all: nothing to give back.
        let _ = self.answers.send_later(WireAnswer::Nack {
            token: self.token,
            delay_ms: 0,
        });
    }
}

impl RemoteDelivery {
    /// Done with it; see [`Delivery::ack`]: returns once its removal is
    /// durable on the host. Acks of one consumer travel together (one call
    /// carries those made while the previous call was in flight), and
    /// their removals share one log write and fsync.
    ///
    /// Cancellation: once this future has been polled, the ack is on its
    /// way whatever happens to the future, and the message ends acked
    /// (unless the host refuses it, as when the lease ended: then it comes
    /// back as any expired delivery does). Dropped before its first poll,
    /// the delivery is given back, as any unanswered delivery is dropped.
    pub async fn ack(self) -> Result<(), RemoteQueueError> {
        let token = self.token;
        self.answer(WireAnswer::Ack { token }).await
    }

    /// Give it back; see [`Delivery::nack`]. Travels with the consumer's
    /// acks, and is cancelled the same way as [`RemoteDelivery::ack`].
    pub async fn nack(self, delay: Duration) -> Result<(), RemoteQueueError> {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let token = self.token;
        self.answer(WireAnswer::Nack { token, delay_ms }).await
    }

    /// A poison message: dead-lettered at once; see [`Delivery::reject`].
    /// Travels with the consumer's acks, and is cancelled the same way as
    /// [`RemoteDelivery::ack`].
    pub async fn reject(self) -> Result<(), RemoteQueueError> {
        let token = self.token;
        self.answer(WireAnswer::Reject { token }).await
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

    async fn answer(mut self, answer: WireAnswer) -> Result<(), RemoteQueueError> {
        // Handed over with no await before it: either the answer is queued
        // and the delivery counts as answered, or neither.
        let outcome = self.answers.hand_over_now(answer).map_err(|_| not_sent())?;
        self.answered = true;
        outcome.await.unwrap_or_else(|_| Err(not_sent()))
    }

    /// Keep the lease longer; see [`Delivery::extend`].
    pub async fn extend(&self, by: Duration) -> Result<(), RemoteQueueError> {
        Ok(self
            .client
            .extend(self.token, by.as_millis() as u64)
            .await??)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};

    use super::*;
    use crate::core::QueueConfig;
    use crate::log::{FsyncPolicy, Log, LogOptions, Seq};
    use crate::storage::{Storage, StorageFuture};

    const REMOVE: u8 = 2;

    /// Storage that counts appends of removals and remembers which
    /// removals it has completed (made durable).
    #[derive(Default)]
    struct Recording {
        next: AtomicU64,
        removal_appends: AtomicU64,
        durable: Mutex<HashSet<u64>>,
    }

    struct Shared(Arc<Recording>);

    impl Storage for Shared {
        fn append_batch(&self, records: Vec<(u8, Bytes)>) -> StorageFuture<'_, Seq> {
            Box::pin(async move {
                // A few turns, so that answers can pile up meanwhile.
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                let first = self
                    .0
                    .next
                    .fetch_add(records.len() as u64, Ordering::SeqCst);
                if records.iter().any(|(kind, _)| *kind == REMOVE) {
                    self.0.removal_appends.fetch_add(1, Ordering::SeqCst);
                }
                let mut durable = self.0.durable.lock().unwrap();
                for (kind, payload) in &records {
                    if *kind == REMOVE {
                        durable.insert(u64::from_le_bytes(payload[..8].try_into().unwrap()));
                    }
                }
                Ok(first)
            })
        }

        fn remove_before(&self, _seq: Seq) -> StorageFuture<'_, usize> {
            Box::pin(async { Ok(0) })
        }

        fn bytes_on_disk(&self) -> u64 {
            0
        }
    }

    /// A real log whose fsyncs the test can count.
    struct Counted(Arc<Log>);

    impl Storage for Counted {
        fn append_batch(&self, records: Vec<(u8, Bytes)>) -> StorageFuture<'_, Seq> {
            Box::pin(self.0.append_batch(records))
        }

        fn remove_before(&self, seq: Seq) -> StorageFuture<'_, usize> {
            Box::pin(self.0.remove_before(seq))
        }

        fn bytes_on_disk(&self) -> u64 {
            self.0.bytes_on_disk()
        }
    }

    static NEXT: AtomicU64 = AtomicU64::new(0);

    /// Serves `queue` (and opens others under `dir`) on a fresh mem:// address.
    async fn serve(queue: Queue, dir: &std::path::Path) -> (ServerHandle, Arc<QueueHost>) {
        let set = QueueSet::new(dir, QueueOptions::default());
        set.adopt(queue).await;
        let host = Arc::new(QueueHost::serving(set));
        let address = format!(
            "mem://queue-unit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let listener = courier_transport::bind(&address.parse().unwrap(), &Default::default())
            .await
            .unwrap();
        let server = Server::new(ServerConfig::default())
            .service(QueueServiceServer::new(SharedHost(host.clone())))
            .spawn(listener);
        (server, host)
    }

    /// The host behind an `Arc`, so the test can read its counters.
    struct SharedHost(Arc<QueueHost>);

    impl QueueService for SharedHost {
        async fn enqueue(
            &self,
            queue: String,
            messages: Vec<Message>,
        ) -> Result<Vec<Enqueued>, RemoteError> {
            self.0.enqueue(queue, messages).await
        }
        async fn consume(
            &self,
            queue: String,
            prefetch: u32,
            items: Items<Result<WireDelivery, RemoteError>>,
        ) {
            self.0.consume(queue, prefetch, items).await
        }
        async fn consume_batched(
            &self,
            queue: String,
            prefetch: u32,
            items: Items<Result<Vec<WireDelivery>, RemoteError>>,
        ) {
            self.0.consume_batched(queue, prefetch, items).await
        }
        async fn ack(&self, token: u64) -> Result<(), RemoteError> {
            self.0.ack(token).await
        }
        async fn nack(&self, token: u64, delay_ms: u64) -> Result<(), RemoteError> {
            self.0.nack(token, delay_ms).await
        }
        async fn answer_batch(
            &self,
            answers: Vec<WireAnswer>,
        ) -> Result<Vec<Result<(), RemoteError>>, RemoteError> {
            self.0.answer_batch(answers).await
        }
        async fn extend(&self, token: u64, by_ms: u64) -> Result<(), RemoteError> {
            self.0.extend(token, by_ms).await
        }
        async fn stats(&self, queue: String) -> Result<QueueStats, RemoteError> {
            self.0.stats(queue).await
        }
        async fn purge(&self, queue: String) -> Result<u64, RemoteError> {
            self.0.purge(queue).await
        }
        async fn peek(&self, queue: String, count: u32) -> Result<Vec<Peeked>, RemoteError> {
            self.0.peek(queue, count).await
        }
        async fn declare(
            &self,
            queue: String,
            options: QueueDeclaration,
        ) -> Result<(), RemoteError> {
            self.0.declare(queue, options).await
        }
    }

    async fn connect(server: &ServerHandle, name: &str) -> RemoteQueue {
        RemoteQueue::connect(server.local_addr(), name, ClientConfig::default())
            .await
            .unwrap()
    }

    /// Acks made while one call is in flight go together; none is answered
    /// before its removal is durable, and their removals share writes.
    #[tokio::test(flavor = "current_thread")]
    async fn many_acks_travel_in_few_calls_and_each_is_answered_once_durable() {
        let dir = courier_test_support::TempDir::new("acks-together");
        let recording = Arc::new(Recording::default());
        let queue = Queue::with_storage(
            "q",
            Box::new(Shared(recording.clone())),
            QueueConfig::default(),
        )
        .unwrap();
        const MESSAGES: usize = 300;
        queue
            .enqueue_batch((0..MESSAGES).map(|_| Message::new("m")).collect())
            .await
            .unwrap();
        let (server, host) = serve(queue.clone(), dir.path()).await;
        let remote = connect(&server, "q").await;
        let mut consumer = remote.consumer(MESSAGES as u32).await.unwrap();
        let mut deliveries = Vec::new();
        for _ in 0..MESSAGES {
            deliveries.push(consumer.recv().await.unwrap());
        }
        let acks: Vec<_> = deliveries
            .into_iter()
            .map(|delivery| {
                let recording = recording.clone();
                tokio::spawn(async move {
                    let id = delivery.id;
                    delivery.ack().await.unwrap();
                    // Answered: its removal must be durable already.
                    recording.durable.lock().unwrap().contains(&id)
                })
            })
            .collect();
        for ack in acks {
            assert!(
                ack.await.unwrap(),
                "an ack was answered before its removal was durable"
            );
        }
        assert_eq!(queue.stats_now().acknowledged, MESSAGES as u64);
        let calls = host.answer_calls();
        let writes = recording.removal_appends.load(Ordering::SeqCst);
        // One call per ack before; now one for those made together.
        assert!(calls <= 2, "{MESSAGES} acks took {calls} calls");
        assert!(writes <= 2, "{MESSAGES} acks took {writes} removal writes");
        assert_eq!(host.outstanding(), 0, "every delivery's credit is back");
    }

    /// Many single enqueues in flight, from two producers on their own
    /// connections, share fsyncs (`Always`); every one answered is there
    /// after the queue is opened again.
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_enqueues_share_fsyncs_and_all_survive_a_reopen() {
        let dir = courier_test_support::TempDir::new("enqueues-together");
        let options = LogOptions::default().with_fsync(FsyncPolicy::Always);
        let (log, _) = Log::open(dir.path().join("q"), options.clone(), |_| {}).unwrap();
        let log = Arc::new(log);
        let queue =
            Queue::with_storage("q", Box::new(Counted(log.clone())), QueueConfig::default())
                .unwrap();
        let (server, host) = serve(queue, dir.path()).await;
        const PER_PRODUCER: usize = 256;
        let mut tasks = Vec::new();
        for producer in 0..2u8 {
            let remote = connect(&server, "q").await;
            for n in 0..PER_PRODUCER {
                let remote = remote.clone();
                tasks.push(tokio::spawn(async move {
                    let payload = vec![producer, (n % 256) as u8, (n / 256) as u8];
                    match remote.enqueue(Message::new(payload)).await.unwrap() {
                        Enqueued::Stored(id) => id,
                        Enqueued::Duplicate(_) => panic!("no keys, no duplicates"),
                    }
                }));
            }
        }
        let mut stored = HashSet::new();
        for task in tasks {
            stored.insert(task.await.unwrap());
        }
        assert_eq!(stored.len(), 2 * PER_PRODUCER);
        let fsyncs = log.fsyncs();
        // One each before (one append per call); now far fewer.
        assert!(
            fsyncs <= (2 * PER_PRODUCER as u64) / 8,
            "{} enqueues took {fsyncs} fsyncs",
            2 * PER_PRODUCER
        );
        server.shutdown(std::time::Duration::from_secs(1)).await;
        drop(host);
        drop(log);
        let reopened = Queue::open(
            dir.path(),
            "q",
            QueueOptions::new(options, Default::default()),
        )
        .await
        .unwrap();
        let consumer = reopened.consumer_now(4 * PER_PRODUCER);
        let mut found = HashSet::new();
        while let Some(delivery) = consumer.try_recv() {
            found.insert(delivery.id);
        }
        assert_eq!(
            found, stored,
            "every answered enqueue is there after a reopen"
        );
    }
}

#[cfg(test)]
mod kind_tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use courier_rpc::{ClientConfig, Server, ServerConfig};

    use super::*;

    static NEXT: AtomicU64 = AtomicU64::new(0);

    struct NobodyMay;

    impl QueueAccess for NobodyMay {
        fn may_produce(&self, _who: Option<&str>, _queue: &str) -> bool {
            false
        }
        fn may_consume(&self, _who: Option<&str>, _queue: &str) -> bool {
            false
        }
    }

    /// A host under `dir` on a fresh mem:// address.
    async fn serve(host: QueueHost) -> (courier_rpc::ServerHandle, Address) {
        let address: Address = format!(
            "mem://queue-kind-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
        .parse()
        .unwrap();
        let listener = courier_transport::bind(&address, &Default::default())
            .await
            .unwrap();
        let server = Server::new(ServerConfig::default())
            .service(QueueServiceServer::new(host))
            .spawn(listener);
        (server, address)
    }

    #[tokio::test]
    async fn a_denied_producer_is_refused_and_an_unknown_queue_not_found() {
        let dir = courier_test_support::TempDir::new("queue-kinds");
        let denying = QueueHost::new(dir.path().join("a"), QueueOptions::default())
            .with_access(Arc::new(NobodyMay));
        let (_server, address) = serve(denying).await;
        let queue = RemoteQueue::connect(&address, "jobs", ClientConfig::default())
            .await
            .unwrap();
        let err = queue.enqueue(Message::new("x")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
        assert!(!err.is_retryable());

        let open = QueueHost::new(dir.path().join("b"), QueueOptions::default());
        let (_server, address) = serve(open).await;
        let missing = RemoteQueue::connect(&address, "nothing", ClientConfig::default())
            .await
            .unwrap();
        let err = missing.stats().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }

    #[test]
    fn kinds_follow_the_variants() {
        let full = QueueError::Full {
            queue: "jobs".into(),
            limit: 1,
        };
        assert_eq!(full.kind(), ErrorKind::Busy);
        assert!(full.is_retryable());
        // Crossing the network keeps the retryable kind.
        assert_eq!(RemoteError::from(full).kind(), ErrorKind::Busy);
        let invalid = QueueError::InvalidName("..".into());
        assert_eq!(invalid.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            QueueError::NotFound("jobs".into()).kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            RemoteError::from(QueueError::NotFound("jobs".into())).kind(),
            ErrorKind::NotFound
        );
        assert_eq!(RemoteError::UnknownDelivery.kind(), ErrorKind::Conflict);
        let denied = RemoteQueueError::Rpc(RpcError::PermissionDenied("jobs".into()));
        assert_eq!(denied.kind(), ErrorKind::Refused);
        let late = RemoteQueueError::Rpc(RpcError::DeadlineExceeded);
        assert_eq!(late.kind(), ErrorKind::TimedOut);
        let down = RemoteQueueError::Rpc(RpcError::Unavailable("connection refused".into()));
        assert_eq!(down.kind(), ErrorKind::Unavailable);
        assert!(down.is_retryable());
    }
}
