//! Queue semantics as a pure state machine: no storage, no clock, no tasks.
//! Time is a [`Duration`] since an epoch the caller picks.
//!
//! # Rules
//!
//! - A message is *ready* once its delay has passed, and is delivered to
//!   one consumer at a time under a *lease* (visibility timeout). Ready
//!   messages go out oldest first.
//! - Each consumer holds at most `prefetch` leased messages (its credit).
//! - `ack` removes the message. `nack` makes it ready again, after an
//!   optional delay. A lease that expires, or a consumer that goes away,
//!   makes its messages ready again at once.
//! - Each delivery has a number (1, 2, …). `ack`, `nack` and `extend` name
//!   the delivery they answer; one for an earlier delivery of a message
//!   that has since been redelivered is refused, so a slow consumer can
//!   never acknowledge another consumer's delivery.
//! - A lease covers `[delivered, lease_until)`: an answer given at or after
//!   its end is refused even if [`QueueCore::handle_timeout`] has not run
//!   yet, since the message may already be with someone else.
//! - A message that has been delivered `max_deliveries` times and comes back
//!   is dead-lettered instead, with its delivery history — unless
//!   dead-lettering is off ([`QueueConfig::dead_lettering`], as in a
//!   dead-letter queue itself: nothing dead-letters a dead letter).
//! - `reject` dead-letters a message at once, whatever deliveries it has
//!   left (a poison message a consumer recognises).
//! - A message whose time-to-live passes before it is acknowledged is
//!   dropped (reported as expired).
//! - An enqueue with an idempotency key seen among the last
//!   `dedup_window` keys is a duplicate: it is not stored again, and the
//!   caller is told which message it duplicates.
//!
//! # Driving it
//!
//! After any input, drain [`QueueCore::poll_event`] (the storage layer
//! persists removals) and arm a timer for [`QueueCore::poll_timeout`],
//! calling [`QueueCore::handle_timeout`] when it fires.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

/// A message's identity: the log position of its enqueue.
pub type MessageId = u64;

/// A consumer's identity, chosen by the caller.
pub type ConsumerId = u64;

/// Queue settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct QueueConfig {
    /// How long a delivery is leased before it is given to someone else. Default 30 s.
    pub visibility_timeout: Duration,
    /// Deliveries after which a returning message is dead-lettered. Default 5.
    pub max_deliveries: u32,
    /// Idempotency keys remembered (the most recent ones). Default 100,000.
    pub dedup_window: usize,
    /// Messages stored (ready, delayed or leased) at most; an enqueue that
    /// would go past it is refused ([`crate::QueueError::Full`]). Payloads
    /// are held in memory, so this also bounds a queue's memory. Default
    /// 1,000,000. Dead-letter queues are not limited (dead-lettering must not
    /// fail).
    pub max_depth: u64,
    /// Whether a message that has had `max_deliveries` deliveries is
    /// dead-lettered when it comes back. Off in a dead-letter queue: a dead
    /// letter stays until it is acknowledged or purged. Default on.
    pub dead_lettering: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            visibility_timeout: Duration::from_secs(30),
            max_deliveries: 5,
            dedup_window: 100_000,
            max_depth: 1_000_000,
            dead_lettering: true,
        }
    }
}

impl QueueConfig {
    /// The same settings with another visibility timeout.
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> QueueConfig {
        self.visibility_timeout = timeout;
        self
    }

    /// The same settings with another depth limit.
    pub fn with_max_depth(mut self, limit: u64) -> QueueConfig {
        self.max_depth = limit;
        self
    }

    /// The same settings with dead-lettering on or off.
    pub fn with_dead_lettering(mut self, on: bool) -> QueueConfig {
        self.dead_lettering = on;
        self
    }

    /// The same settings with another delivery limit.
    pub fn with_max_deliveries(mut self, limit: u32) -> QueueConfig {
        self.max_deliveries = limit.max(1);
        self
    }
}

/// One delivery of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The message.
    pub id: MessageId,
    /// 1 for the first delivery, then 2, …
    pub delivery: u32,
    /// When the lease runs out.
    pub lease_until: Duration,
}

/// A past delivery, kept for the dead-letter record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryRecord {
    /// Who got it.
    pub consumer: ConsumerId,
    /// When.
    pub at: Duration,
    /// How it ended.
    pub outcome: DeliveryOutcome,
}

/// How a delivery ended without an acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeliveryOutcome {
    /// The consumer refused it.
    Nacked,
    /// The lease expired.
    LeaseExpired,
    /// The consumer went away.
    ConsumerGone,
    /// The consumer rejected it as unprocessable: dead-lettered at once.
    Rejected,
}

/// Something the storage layer must make durable or act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueEvent {
    /// Acknowledged: remove it for good.
    Acked(MessageId),
    /// Its time-to-live passed: remove it.
    Expired(MessageId),
    /// Delivered `max_deliveries` times: move it to the dead-letter queue.
    DeadLettered {
        /// The message.
        id: MessageId,
        /// Its deliveries, in order: all of them, or the latest
        /// [`MAX_HISTORY`] of a message delivered more often.
        history: Vec<DeliveryRecord>,
    },
}

/// Why `ack`, `nack` or `extend` was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The message is not leased to this consumer under this delivery
    /// number: the lease expired and the message went elsewhere, or it was
    /// already acknowledged.
    #[error("message {id} delivery {delivery} is not leased to this consumer (the lease may have expired)")]
    NotLeased {
        /// The message.
        id: MessageId,
        /// The delivery named.
        delivery: u32,
    },
}

impl LeaseError {
    /// [`ErrorKind::Conflict`](crate::ErrorKind::Conflict): the
    /// delivery was answered already, or its lease went to someone else.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            LeaseError::NotLeased { .. } => crate::ErrorKind::Conflict,
        }
    }
}

/// Delivery records kept per message (the latest ones): what a dead
/// letter's history holds at most.
pub const MAX_HISTORY: usize = 1000;

/// A queue's gauges (`depth`, `in_flight`, `consumers`, `bytes_on_disk`:
/// as they are now) and counters (from 0 when the queue opens).
///
/// Serialized (postcard) in the queue and broker stats RPCs: fields are
/// only added, at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct QueueStats {
    /// Messages stored and not leased (ready or delayed).
    pub depth: u64,
    /// Messages leased to consumers.
    pub in_flight: u64,
    /// Deliveries made.
    pub delivered: u64,
    /// Messages acknowledged.
    pub acknowledged: u64,
    /// Deliveries after the first.
    pub redelivered: u64,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Messages dropped at the end of their time-to-live.
    pub expired: u64,
    /// Enqueues refused as duplicates.
    pub duplicates: u64,
    /// Bytes on disk (filled in by the storage layer; 0 from the core).
    pub bytes_on_disk: u64,
    /// Messages accepted since the queue was opened, by this process:
    /// every enqueue stored, dead letters moved in included (in a
    /// dead-letter queue), duplicates not (they count in `duplicates`).
    /// Messages found in storage when the queue opened are not counted
    /// ([`QueueCore::handle_recovered`]), so, like the other counters, it
    /// starts from 0 at each open and its rate is the rate of arrivals.
    pub enqueued: u64,
    /// Consumers attached now (a gauge, not a counter): embedded ones and,
    /// on a host, one per remote consumer, until it goes away.
    pub consumers: u64,
}

#[derive(Clone, Debug)]
enum State {
    /// Waiting in `ready` from this time on.
    Ready(Duration),
    Leased {
        consumer: ConsumerId,
        until: Duration,
    },
}

#[derive(Clone, Debug)]
struct Entry {
    state: State,
    deliveries: u32,
    expires_at: Option<Duration>,
    history: Vec<DeliveryRecord>,
}

#[derive(Clone, Debug, Default)]
struct Consumer {
    prefetch: usize,
    /// Ordered, so releasing them all (the consumer went) emits events in
    /// the same order on every replica of a replicated queue.
    leased: BTreeSet<MessageId>,
}

/// The state machine. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct QueueCore {
    config: QueueConfig,
    messages: BTreeMap<MessageId, Entry>,
    /// (available from, id) of every ready message.
    ready: BTreeSet<(Duration, MessageId)>,
    /// (lease end, id) of every leased message.
    leases: BTreeSet<(Duration, MessageId)>,
    /// (expiry, id) of every message with a time-to-live.
    expiries: BTreeSet<(Duration, MessageId)>,
    consumers: HashMap<ConsumerId, Consumer>,
    keys: HashMap<String, MessageId>,
    key_order: VecDeque<String>,
    events: VecDeque<QueueEvent>,
    stats: QueueStats,
}

impl QueueCore {
    /// The settings it runs with.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// An empty queue.
    pub fn new(config: QueueConfig) -> QueueCore {
        QueueCore {
            config,
            messages: BTreeMap::new(),
            ready: BTreeSet::new(),
            leases: BTreeSet::new(),
            expiries: BTreeSet::new(),
            consumers: HashMap::new(),
            keys: HashMap::new(),
            key_order: VecDeque::new(),
            events: VecDeque::new(),
            stats: QueueStats::default(),
        }
    }

    /// Whether an idempotency key is in the window, without counting a
    /// duplicate (for a caller deciding whether a batch fits).
    pub fn knows_key(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// The message an idempotency key already names, if it is in the window.
    pub fn duplicate_of(&mut self, key: &str) -> Option<MessageId> {
        let id = self.keys.get(key).copied();
        if id.is_some() {
            self.stats.duplicates += 1;
        }
        id
    }

    /// Adds a stored message: ready at `available_at`, gone at `expires_at`.
    /// Counted in [`QueueStats::enqueued`].
    pub fn handle_enqueue(
        &mut self,
        id: MessageId,
        key: Option<String>,
        available_at: Duration,
        expires_at: Option<Duration>,
    ) {
        self.insert(id, key, available_at, expires_at);
        self.stats.enqueued += 1;
    }

    /// Adds a message found in storage while the queue opens (replay): as
    /// [`QueueCore::handle_enqueue`], but not counted in
    /// [`QueueStats::enqueued`], which counts what this process accepted.
    pub fn handle_recovered(
        &mut self,
        id: MessageId,
        key: Option<String>,
        available_at: Duration,
        expires_at: Option<Duration>,
    ) {
        self.insert(id, key, available_at, expires_at);
    }

    fn insert(
        &mut self,
        id: MessageId,
        key: Option<String>,
        available_at: Duration,
        expires_at: Option<Duration>,
    ) {
        if let Some(key) = key {
            if self.keys.insert(key.clone(), id).is_none() {
                self.key_order.push_back(key);
                while self.key_order.len() > self.config.dedup_window {
                    if let Some(old) = self.key_order.pop_front() {
                        self.keys.remove(&old);
                    }
                }
            }
        }
        if let Some(expiry) = expires_at {
            self.expiries.insert((expiry, id));
        }
        self.ready.insert((available_at, id));
        self.messages.insert(
            id,
            Entry {
                state: State::Ready(available_at),
                deliveries: 0,
                expires_at,
                history: Vec::new(),
            },
        );
    }

    /// Removes a message that storage says was already acknowledged (during replay).
    pub fn forget(&mut self, id: MessageId) {
        if let Some(entry) = self.messages.remove(&id) {
            self.unindex(id, &entry);
        }
    }

    fn unindex(&mut self, id: MessageId, entry: &Entry) {
        match entry.state {
            State::Ready(at) => {
                self.ready.remove(&(at, id));
            }
            State::Leased { consumer, until } => {
                self.leases.remove(&(until, id));
                if let Some(c) = self.consumers.get_mut(&consumer) {
                    c.leased.remove(&id);
                }
            }
        }
        if let Some(expiry) = entry.expires_at {
            self.expiries.remove(&(expiry, id));
        }
    }

    /// Adds a consumer holding at most `prefetch` messages at a time.
    pub fn add_consumer(&mut self, consumer: ConsumerId, prefetch: usize) {
        self.consumers.insert(
            consumer,
            Consumer {
                prefetch: prefetch.max(1),
                leased: BTreeSet::new(),
            },
        );
    }

    /// Removes a consumer; its leased messages are ready again at once.
    pub fn remove_consumer(&mut self, consumer: ConsumerId, now: Duration) {
        let Some(gone) = self.consumers.remove(&consumer) else {
            return;
        };
        for id in gone.leased {
            self.release(id, now, now, DeliveryOutcome::ConsumerGone);
        }
    }

    /// Leases the next ready message to `consumer`, if its credit allows.
    pub fn poll_delivery(&mut self, consumer: ConsumerId, now: Duration) -> Option<Delivery> {
        let credit = self
            .consumers
            .get(&consumer)
            .map(|c| c.leased.len() < c.prefetch)?;
        if !credit {
            return None;
        }
        let &(available, id) = self.ready.first()?;
        if available > now {
            return None;
        }
        self.ready.remove(&(available, id));
        let until = now + self.config.visibility_timeout;
        let entry = self
            .messages
            .get_mut(&id)
            .expect("ready messages are stored");
        // Saturating: in a queue that never dead-letters, a message may be
        // delivered any number of times.
        entry.deliveries = entry.deliveries.saturating_add(1);
        entry.state = State::Leased { consumer, until };
        // Bounded: in a queue that never dead-letters, a message may come
        // back for ever; only the latest deliveries are kept.
        if entry.history.len() >= MAX_HISTORY {
            entry.history.remove(0);
        }
        entry.history.push(DeliveryRecord {
            consumer,
            at: now,
            outcome: DeliveryOutcome::LeaseExpired,
        });
        let delivery = entry.deliveries;
        self.leases.insert((until, id));
        self.consumers
            .get_mut(&consumer)
            .expect("checked above")
            .leased
            .insert(id);
        self.stats.delivered += 1;
        if delivery > 1 {
            self.stats.redelivered += 1;
        }
        Some(Delivery {
            id,
            delivery,
            lease_until: until,
        })
    }

    /// The lease's end, if `consumer` holds delivery `delivery` of `id`
    /// and (when `now` is known) the lease has not run out by `now`.
    fn check_lease(
        &self,
        consumer: ConsumerId,
        id: MessageId,
        delivery: u32,
        now: Option<Duration>,
    ) -> Result<Duration, LeaseError> {
        match self.messages.get(&id) {
            Some(Entry {
                state:
                    State::Leased {
                        consumer: holder,
                        until,
                    },
                deliveries,
                ..
            }) if *holder == consumer
                && *deliveries == delivery
                && now.is_none_or(|now| now < *until) =>
            {
                Ok(*until)
            }
            _ => Err(LeaseError::NotLeased { id, delivery }),
        }
    }

    /// The consumer processed the message: it is removed. Does not look at
    /// the clock; prefer [`QueueCore::ack_at`], which refuses an ack that
    /// comes after the lease ended.
    pub fn ack(
        &mut self,
        consumer: ConsumerId,
        id: MessageId,
        delivery: u32,
    ) -> Result<(), LeaseError> {
        self.ack_checked(consumer, id, delivery, None)
    }

    /// The consumer processed the message at `now`: it is removed, unless
    /// the lease ended by `now` (refused, whether or not
    /// [`QueueCore::handle_timeout`] has released it yet).
    pub fn ack_at(
        &mut self,
        consumer: ConsumerId,
        id: MessageId,
        delivery: u32,
        now: Duration,
    ) -> Result<(), LeaseError> {
        self.ack_checked(consumer, id, delivery, Some(now))
    }

    fn ack_checked(
        &mut self,
        consumer: ConsumerId,
        id: MessageId,
        delivery: u32,
        now: Option<Duration>,
    ) -> Result<(), LeaseError> {
        self.check_lease(consumer, id, delivery, now)?;
        let entry = self.messages.remove(&id).expect("checked");
        self.unindex(id, &entry);
        self.stats.acknowledged += 1;
        self.events.push_back(QueueEvent::Acked(id));
        Ok(())
    }

    /// The consumer gives the message back; it is ready again after `delay`.
    /// Refused if the lease ended by `now`.
    pub fn nack(
        &mut self,
        consumer: ConsumerId,
        id: MessageId,
        delivery: u32,
        delay: Duration,
        now: Duration,
    ) -> Result<(), LeaseError> {
        self.check_lease(consumer, id, delivery, Some(now))?;
        self.release(id, now + delay, now, DeliveryOutcome::Nacked);
        Ok(())
    }

    /// The consumer refuses the message for good (a poison message): it is
    /// dead-lettered at once with its delivery history, however many
    /// deliveries it had left, and whether or not dead-lettering after
    /// `max_deliveries` is on (that setting governs messages that keep
    /// coming back, not one a consumer names). Storage without a
    /// dead-letter queue drops it. Refused if the lease ended by `now`.
    pub fn reject(
        &mut self,
        consumer: ConsumerId,
        id: MessageId,
        delivery: u32,
        now: Duration,
    ) -> Result<(), LeaseError> {
        self.check_lease(consumer, id, delivery, Some(now))?;
        let mut entry = self.messages.remove(&id).expect("checked");
        self.unindex(id, &entry);
        if let Some(last) = entry.history.last_mut() {
            last.outcome = DeliveryOutcome::Rejected;
        }
        self.stats.dead_lettered += 1;
        self.events.push_back(QueueEvent::DeadLettered {
            id,
            history: entry.history,
        });
        Ok(())
    }

    /// Extends the lease by `by` from now; returns its new end. Refused if
    /// the lease ended by `now`.
    pub fn extend(
        &mut self,
        consumer: ConsumerId,
        id: MessageId,
        delivery: u32,
        by: Duration,
        now: Duration,
    ) -> Result<Duration, LeaseError> {
        let until = self.check_lease(consumer, id, delivery, Some(now))?;
        let extended = now + by;
        self.leases.remove(&(until, id));
        self.leases.insert((extended, id));
        let entry = self.messages.get_mut(&id).expect("checked");
        entry.state = State::Leased {
            consumer,
            until: extended,
        };
        Ok(extended)
    }

    /// Ends a lease: the message is ready again at `ready_at`, or
    /// dead-lettered if it has had all its deliveries.
    fn release(
        &mut self,
        id: MessageId,
        ready_at: Duration,
        _now: Duration,
        outcome: DeliveryOutcome,
    ) {
        let Some(entry) = self.messages.get_mut(&id) else {
            return;
        };
        let State::Leased { consumer, until } = entry.state else {
            return;
        };
        self.leases.remove(&(until, id));
        if let Some(c) = self.consumers.get_mut(&consumer) {
            c.leased.remove(&id);
        }
        if let Some(last) = entry.history.last_mut() {
            last.outcome = outcome;
        }
        if self.config.dead_lettering && entry.deliveries >= self.config.max_deliveries {
            let entry = self.messages.remove(&id).expect("present");
            if let Some(expiry) = entry.expires_at {
                self.expiries.remove(&(expiry, id));
            }
            self.stats.dead_lettered += 1;
            self.events.push_back(QueueEvent::DeadLettered {
                id,
                history: entry.history,
            });
            return;
        }
        entry.state = State::Ready(ready_at);
        self.ready.insert((ready_at, id));
    }

    /// Ends leases that ran out and drops messages whose time-to-live passed.
    pub fn handle_timeout(&mut self, now: Duration) {
        while let Some(&(until, id)) = self.leases.first() {
            if until > now {
                break;
            }
            self.release(id, now, now, DeliveryOutcome::LeaseExpired);
        }
        while let Some(&(expiry, id)) = self.expiries.first() {
            if expiry > now {
                break;
            }
            let entry = self
                .messages
                .remove(&id)
                .expect("expiries track stored messages");
            self.unindex(id, &entry);
            self.stats.expired += 1;
            self.events.push_back(QueueEvent::Expired(id));
        }
    }

    /// The next time after `now` that something changes on its own: a lease
    /// ends, a delayed message becomes ready, or a time-to-live passes.
    /// Messages already ready need no timer, so they do not count.
    pub fn poll_timeout(&self, now: Duration) -> Option<Duration> {
        let next_ready = self
            .ready
            .range((now + Duration::from_nanos(1), 0)..)
            .next()
            .map(|(t, _)| *t);
        [
            self.leases.first().map(|(t, _)| *t),
            next_ready,
            self.expiries.first().map(|(t, _)| *t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Removes every message that is not leased (ready or delayed) and
    /// returns their ids, for storage to record as removed. Leased messages
    /// stay with their consumers, whose answers still count.
    pub fn purge(&mut self) -> Vec<MessageId> {
        let ids: Vec<MessageId> = self.ready.iter().map(|&(_, id)| id).collect();
        for &id in &ids {
            if let Some(entry) = self.messages.remove(&id) {
                self.unindex(id, &entry);
            }
        }
        ids
    }

    /// The next `limit` messages a consumer would be given at `now`, in the
    /// order it would get them, with how many times each was delivered
    /// before. Nothing changes: no lease, no delivery counted. Delayed
    /// messages (not ready until later) and leased ones are not shown.
    pub fn peek(&self, now: Duration, limit: usize) -> Vec<(MessageId, u32)> {
        self.ready
            .iter()
            .take_while(|&&(available, _)| available <= now)
            .take(limit)
            .map(|&(_, id)| (id, self.messages.get(&id).map_or(0, |e| e.deliveries)))
            .collect()
    }

    /// The next change storage must record.
    pub fn poll_event(&mut self) -> Option<QueueEvent> {
        self.events.pop_front()
    }

    /// The oldest message still stored (storage may delete everything before it).
    pub fn oldest(&self) -> Option<MessageId> {
        self.messages.keys().next().copied()
    }

    /// Whether [`QueueCore::poll_delivery`] would lease something to
    /// `consumer` at `now` (changing nothing).
    pub fn can_deliver(&self, consumer: ConsumerId, now: Duration) -> bool {
        self.consumers
            .get(&consumer)
            .is_some_and(|c| c.leased.len() < c.prefetch)
            && self.ready.first().is_some_and(|&(at, _)| at <= now)
    }

    /// The ids of every stored message, in increasing order.
    pub fn message_ids(&self) -> Vec<MessageId> {
        self.messages.keys().copied().collect()
    }

    /// The attached consumers, in increasing order.
    pub fn consumer_ids(&self) -> Vec<ConsumerId> {
        let mut ids: Vec<ConsumerId> = self.consumers.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            depth: self.ready.len() as u64,
            in_flight: self.leases.len() as u64,
            consumers: self.consumers.len() as u64,
            ..self.stats
        }
    }
}

/// A queue core's whole state as plain data, for a replicated queue's
/// snapshot: [`QueueCore::image`] takes it, [`QueueCore::from_image`] checks
/// it and builds the same core again. Events not yet drained are not part
/// of it (take it between inputs, after draining [`QueueCore::poll_event`]).
///
/// Postcard in snapshots: fields are only added, at the end.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoreImage {
    /// Every stored message, by increasing id.
    messages: Vec<ImageMessage>,
    /// (consumer, prefetch), by increasing consumer.
    consumers: Vec<(ConsumerId, u64)>,
    /// The idempotency window, oldest key first.
    keys: Vec<(String, MessageId)>,
    stats: QueueStats,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ImageMessage {
    id: MessageId,
    /// Leased to (consumer, until), or ready from `ready_at`.
    leased: Option<(ConsumerId, Duration)>,
    ready_at: Duration,
    deliveries: u32,
    expires_at: Option<Duration>,
    history: Vec<DeliveryRecord>,
}

/// Why a [`CoreImage`] cannot be a queue (a damaged or forged snapshot).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue image: {0}")]
pub struct ImageError(String);

impl QueueCore {
    /// The state as plain data (see [`CoreImage`]).
    pub fn image(&self) -> CoreImage {
        let messages = self
            .messages
            .iter()
            .map(|(&id, entry)| {
                let (leased, ready_at) = match entry.state {
                    State::Ready(at) => (None, at),
                    State::Leased { consumer, until } => (Some((consumer, until)), Duration::ZERO),
                };
                ImageMessage {
                    id,
                    leased,
                    ready_at,
                    deliveries: entry.deliveries,
                    expires_at: entry.expires_at,
                    history: entry.history.clone(),
                }
            })
            .collect();
        let mut consumers: Vec<(ConsumerId, u64)> = self
            .consumers
            .iter()
            .map(|(&id, c)| (id, c.prefetch as u64))
            .collect();
        consumers.sort_unstable();
        let keys = self
            .key_order
            .iter()
            .filter_map(|key| self.keys.get(key).map(|&id| (key.clone(), id)))
            .collect();
        CoreImage {
            messages,
            consumers,
            keys,
            stats: self.stats,
        }
    }

    /// The core an image describes, under `config`. Everything is checked,
    /// so a damaged image is an error, never a panic or a core whose
    /// indexes disagree: ids must increase, a lease must name an attached
    /// consumer that has credit for it, histories stay within
    /// [`MAX_HISTORY`], keys are unique (a window longer than `config`'s
    /// keeps its newest keys).
    pub fn from_image(config: QueueConfig, image: CoreImage) -> Result<QueueCore, ImageError> {
        let mut core = QueueCore::new(config);
        for (id, prefetch) in image.consumers {
            let prefetch = usize::try_from(prefetch)
                .ok()
                .filter(|p| *p >= 1)
                .ok_or_else(|| ImageError(format!("consumer {id} has prefetch {prefetch}")))?;
            if core.consumers.contains_key(&id) {
                return Err(ImageError(format!("consumer {id} appears twice")));
            }
            core.add_consumer(id, prefetch);
        }
        let mut last = None;
        for m in image.messages {
            if last.is_some_and(|last| m.id <= last) {
                return Err(ImageError(format!("message {} out of order", m.id)));
            }
            last = Some(m.id);
            if m.history.len() > MAX_HISTORY {
                return Err(ImageError(format!(
                    "message {} has {} records",
                    m.id,
                    m.history.len()
                )));
            }
            let state = match m.leased {
                Some((consumer, until)) => {
                    let c = core.consumers.get_mut(&consumer).ok_or_else(|| {
                        ImageError(format!(
                            "message {} leased to unknown consumer {consumer}",
                            m.id
                        ))
                    })?;
                    if c.leased.len() >= c.prefetch || m.deliveries == 0 {
                        return Err(ImageError(format!("message {} leased beyond credit", m.id)));
                    }
                    c.leased.insert(m.id);
                    core.leases.insert((until, m.id));
                    State::Leased { consumer, until }
                }
                None => {
                    core.ready.insert((m.ready_at, m.id));
                    State::Ready(m.ready_at)
                }
            };
            if let Some(expiry) = m.expires_at {
                core.expiries.insert((expiry, m.id));
            }
            core.messages.insert(
                m.id,
                Entry {
                    state,
                    deliveries: m.deliveries,
                    expires_at: m.expires_at,
                    history: m.history,
                },
            );
        }
        let skip = image.keys.len().saturating_sub(core.config.dedup_window);
        for (key, id) in image.keys.into_iter().skip(skip) {
            if core.keys.insert(key.clone(), id).is_some() {
                return Err(ImageError(format!("key {key:?} appears twice")));
            }
            core.key_order.push_back(key);
        }
        core.stats = image.stats;
        Ok(core)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::ZERO;

    #[test]
    fn the_consumer_count_follows_attach_and_detach() {
        let mut core = QueueCore::new(QueueConfig::default());
        assert_eq!(core.stats().consumers, 0);
        core.add_consumer(1, 4);
        core.add_consumer(2, 4);
        assert_eq!(core.stats().consumers, 2);
        core.remove_consumer(1, T0);
        assert_eq!(core.stats().consumers, 1);
        // Removing one that is not there changes nothing.
        core.remove_consumer(1, T0);
        core.remove_consumer(99, T0);
        assert_eq!(core.stats().consumers, 1);
        core.remove_consumer(2, T0);
        assert_eq!(core.stats().consumers, 0);
    }

    #[test]
    fn a_consumer_that_goes_holding_leases_is_no_longer_counted() {
        let mut core = QueueCore::new(QueueConfig::default());
        core.handle_enqueue(0, None, T0, None);
        core.add_consumer(1, 1);
        assert!(core.poll_delivery(1, T0).is_some());
        assert_eq!((core.stats().consumers, core.stats().in_flight), (1, 1));
        core.remove_consumer(1, T0);
        let stats = core.stats();
        assert_eq!((stats.consumers, stats.in_flight, stats.depth), (0, 0, 1));
    }

    #[test]
    fn enqueued_counts_messages_accepted_not_duplicates_or_recovered_ones() {
        let mut core = QueueCore::new(QueueConfig::default());
        // Found in storage at open: there already, not accepted now.
        core.handle_recovered(0, Some("old".into()), T0, None);
        assert_eq!(core.stats().enqueued, 0);
        assert_eq!(core.stats().depth, 1);
        // A recovered key still catches duplicates.
        assert_eq!(core.duplicate_of("old"), Some(0));

        core.handle_enqueue(1, Some("a".into()), T0, None);
        core.handle_enqueue(2, None, T0, None);
        assert_eq!(core.duplicate_of("a"), Some(1));
        let stats = core.stats();
        assert_eq!(stats.enqueued, 2, "{stats:?}");
        assert_eq!(stats.duplicates, 2, "{stats:?}");

        // A counter: messages leaving do not take it back.
        core.add_consumer(1, 10);
        while let Some(d) = core.poll_delivery(1, T0) {
            core.ack(1, d.id, d.delivery).unwrap();
        }
        let stats = core.stats();
        assert_eq!((stats.enqueued, stats.depth, stats.acknowledged), (2, 0, 3));
    }

    #[test]
    fn an_image_builds_a_core_that_behaves_the_same() {
        let config = QueueConfig::default()
            .with_max_deliveries(2)
            .with_visibility_timeout(Duration::from_secs(10));
        let mut core = QueueCore::new(config.clone());
        let t = Duration::from_secs;
        core.handle_enqueue(1, Some("a".into()), T0, None);
        core.handle_enqueue(2, None, t(5), Some(t(100)));
        core.handle_enqueue(3, Some("c".into()), t(50), None);
        core.add_consumer(7, 1);
        core.add_consumer(8, 3);
        let first = core.poll_delivery(7, T0).unwrap();
        core.nack(7, first.id, first.delivery, Duration::ZERO, t(1))
            .unwrap();
        let again = core.poll_delivery(8, t(1)).unwrap();
        while core.poll_event().is_some() {}

        let image = core.image();
        let mut copy = QueueCore::from_image(config, image.clone()).unwrap();
        assert_eq!(copy.image(), image);
        assert_eq!(copy.stats(), core.stats());
        assert_eq!(copy.duplicate_of("c"), Some(3));
        assert_eq!(core.duplicate_of("c"), Some(3));
        // The lease, its delivery number and the history all came across:
        // the second delivery coming back dead-letters it in both.
        for c in [&mut core, &mut copy] {
            c.handle_timeout(t(20));
            let events: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
            assert!(
                matches!(&events[..], [QueueEvent::DeadLettered { id, history }] if *id == again.id && history.len() == 2),
                "{events:?}"
            );
            assert_eq!(c.poll_timeout(t(20)), Some(t(50)));
        }
        assert_eq!(copy.image(), core.image());
    }

    #[test]
    fn a_damaged_image_is_an_error() {
        let mut core = QueueCore::new(QueueConfig::default());
        core.handle_enqueue(1, None, T0, None);
        core.handle_enqueue(2, None, T0, None);
        core.add_consumer(7, 1);
        core.poll_delivery(7, T0).unwrap();
        let good = core.image();

        let mut unknown = good.clone();
        unknown.consumers.clear();
        let mut twice = good.clone();
        twice.messages.swap(0, 1);
        let mut over = good.clone();
        over.messages[1].leased = Some((7, T0));
        over.messages[1].deliveries = 1;
        for bad in [unknown, twice, over] {
            assert!(QueueCore::from_image(QueueConfig::default(), bad).is_err());
        }
    }
}
