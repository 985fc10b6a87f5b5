//! A replicated durable queue: what one queue group's Raft log builds.
//!
//! The state machine is courier-queue's own [`QueueCore`], the same rules a
//! queue on one broker follows, applied to *commands* in log order rather
//! than to storage records: enqueue, attach and detach a consumer, deliver
//! under a lease, answer (ack, nack with a delay, extend, reject), and the
//! leader's clock ticks. Every replica applies the same commands to the
//! same core, so delivery counts, dead-letter histories and the
//! idempotency-key window are replicated state: none resets when another
//! node takes over.
//!
//! Time enters only through the log. A command that needs the time carries
//! the proposing leader's clock (`now_ms`); applying never reads a clock,
//! and uses the latest time the log has carried so far, so a new leader
//! whose clock is behind the old one's cannot move the queue's time back.
//!
//! A delivery is a command too: a message is leased to a consumer only
//! once the lease is committed, so two consumers can never hold the same
//! delivery (message and delivery number), whatever fails. When a new
//! leader takes over it proposes [`QueueCommand::Takeover`], which detaches
//! every consumer (they were connected to the old leader): their messages
//! are ready again at once, their delivery counted, as a consumer that
//! goes away gives its messages back on one broker.
//!
//! Dead letters stay in the same group, in a second core that never
//! dead-letters (a dead-letter queue's rules): moving a message there and
//! out of the queue is one command, so it is never in both or neither.
//!
//! Every command is bounded ([`MAX_BATCH`] messages, [`MAX_PAYLOAD`]
//! bytes each, at most [`MAX_CONSUMERS`] consumers): a command outside
//! the bounds is answered [`QueueResponse::Refused`] and changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use courier_queue::core::{
    ConsumerId, CoreImage, DeliveryRecord, MessageId, QueueConfig, QueueCore, QueueEvent,
    QueueStats,
};
use courier_queue::{Message, Peeked, MAX_DELIVERIES_LIMIT, MAX_LEASE, MIN_LEASE};
use serde::{Deserialize, Serialize};

use crate::state::SnapshotError;
use crate::storage::GroupState;
use crate::types::{Command, Response};

/// Messages in one enqueue command, deliveries in one deliver command.
pub const MAX_BATCH: usize = 1024;
/// Answers in one answer command.
pub const MAX_ANSWERS: usize = 4096;
/// Bytes of one message's payload.
pub const MAX_PAYLOAD: usize = crate::state::MAX_VALUE_LEN;
/// Bytes of an idempotency key.
pub const MAX_KEY_LEN: usize = 1024;
/// Consumers attached to one queue at once.
pub const MAX_CONSUMERS: usize = 4096;
/// Credit one consumer may ask for.
pub const MAX_PREFETCH: u32 = 10_000;
/// Idempotency keys a queue may remember.
pub const MAX_DEDUP_WINDOW: u64 = 1_000_000;
/// Snapshot format this build writes and reads.
const FORMAT: u32 = 1;

/// A queue's settings, fixed when it is declared (the first command of its
/// log) and the same on every replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSettings {
    /// Deliveries after which a returning message is dead-lettered.
    pub max_deliveries: u32,
    /// The lease (visibility timeout) of a delivery, in milliseconds.
    pub lease_ms: u64,
    /// Whether a message that used its deliveries is dead-lettered.
    pub dead_lettering: bool,
    /// Idempotency keys remembered.
    pub dedup_window: u64,
    /// Messages stored at most (ready, delayed or leased).
    pub max_depth: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings::from(&QueueConfig::default())
    }
}

impl From<&QueueConfig> for QueueSettings {
    fn from(config: &QueueConfig) -> Self {
        QueueSettings {
            max_deliveries: config.max_deliveries,
            lease_ms: config.visibility_timeout.as_millis() as u64,
            dead_lettering: config.dead_lettering,
            dedup_window: config.dedup_window as u64,
            max_depth: config.max_depth,
        }
    }
}

impl QueueSettings {
    /// Checks every setting's bounds.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_DELIVERIES_LIMIT).contains(&self.max_deliveries) {
            return Err(format!(
                "max_deliveries {} is not within 1..={MAX_DELIVERIES_LIMIT}",
                self.max_deliveries
            ));
        }
        let lease = Duration::from_millis(self.lease_ms);
        if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
            return Err(format!(
                "a lease of {lease:?} is not within {MIN_LEASE:?}..={MAX_LEASE:?}"
            ));
        }
        if self.dedup_window > MAX_DEDUP_WINDOW {
            return Err(format!(
                "dedup_window {} is over {MAX_DEDUP_WINDOW}",
                self.dedup_window
            ));
        }
        if self.max_depth == 0 {
            return Err("max_depth must be at least 1".into());
        }
        Ok(())
    }

    fn config(&self, dead_letters: bool) -> QueueConfig {
        let config = QueueConfig::default()
            .with_visibility_timeout(Duration::from_millis(self.lease_ms))
            .with_max_deliveries(self.max_deliveries)
            .with_max_depth(self.max_depth)
            .with_dead_lettering(self.dead_lettering && !dead_letters);
        let mut config = config;
        config.dedup_window = self.dedup_window as usize;
        config
    }
}

/// Which part of the queue a consumer takes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Part {
    /// The queue itself.
    Main,
    /// Its dead letters.
    DeadLetters,
}

/// What a consumer says about one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Processed: remove it.
    Ack,
    /// Give it back, ready again after this many milliseconds.
    Nack {
        /// The delay.
        delay_ms: u64,
    },
    /// Extend the lease to this many milliseconds from now.
    Extend {
        /// The extension.
        by_ms: u64,
    },
    /// A poison message: dead-letter it at once (discard it, in the dead letters).
    Reject,
}

/// An answer to delivery `delivery` of message `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The message.
    pub id: MessageId,
    /// The delivery answered.
    pub delivery: u32,
    /// What to do.
    pub action: Action,
}

/// One entry of a queue group's log (carried in [`Command::Queue`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueCommand {
    /// Fix the queue's settings. The first command of a queue's log; again
    /// with the same settings it changes nothing, with others it is refused.
    Declare {
        /// The queue's name (for humans: the group id names it in the log).
        name: String,
        /// Its settings.
        settings: QueueSettings,
    },
    /// Store messages.
    Enqueue {
        /// The leader's clock (milliseconds since the Unix epoch).
        now_ms: u64,
        /// At most [`MAX_BATCH`].
        messages: Vec<Message>,
    },
    /// Attach a consumer holding at most `prefetch` deliveries.
    Attach {
        /// Its id, chosen by the node that serves it.
        consumer: ConsumerId,
        /// Its credit (1 to [`MAX_PREFETCH`]).
        prefetch: u32,
        /// What it consumes.
        part: Part,
    },
    /// Detach a consumer: its deliveries are ready again at once.
    Detach {
        /// The consumer.
        consumer: ConsumerId,
        /// The leader's clock.
        now_ms: u64,
    },
    /// Lease up to `max` ready messages to a consumer (its credit allowing).
    Deliver {
        /// The consumer.
        consumer: ConsumerId,
        /// At most [`MAX_BATCH`].
        max: u32,
        /// The leader's clock.
        now_ms: u64,
    },
    /// A consumer's answers, applied in order.
    Answer {
        /// The consumer.
        consumer: ConsumerId,
        /// The leader's clock.
        now_ms: u64,
        /// At most [`MAX_ANSWERS`].
        answers: Vec<Answer>,
    },
    /// The leader's timer: end leases that ran out, drop messages whose
    /// time-to-live passed.
    Tick {
        /// The leader's clock.
        now_ms: u64,
    },
    /// A new leader took over: every consumer is detached.
    Takeover {
        /// The new leader's clock.
        now_ms: u64,
    },
    /// Remove every message of `part` not leased to a consumer (ready or
    /// delayed); leased ones stay until answered.
    Purge {
        /// The queue or its dead letters.
        part: Part,
    },
}

impl QueueCommand {
    /// Roughly the bytes the command holds.
    pub fn size(&self) -> u64 {
        match self {
            QueueCommand::Enqueue { messages, .. } => messages
                .iter()
                .map(|m| {
                    (m.payload.len()
                        + m.key.as_ref().map_or(0, String::len)
                        + m.headers.total_len()
                        + 32) as u64
                })
                .sum(),
            QueueCommand::Answer { answers, .. } => 16 * answers.len() as u64,
            _ => 32,
        }
    }
}

/// What an enqueue did with one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnqueueOutcome {
    /// Stored under this id.
    Stored(MessageId),
    /// Its idempotency key names this message, stored before: not stored again.
    Duplicate(MessageId),
    /// The queue holds `max_depth` messages: not stored.
    Full,
    /// Refused: why.
    Invalid(String),
}

/// A message leased to a consumer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDelivery {
    /// The message.
    pub id: MessageId,
    /// 1 for the first delivery, then 2, …, counted across failovers.
    pub delivery: u32,
    /// When the lease ends (the leader's clock, ms since the Unix epoch).
    pub lease_until_ms: u64,
    /// The message as it was enqueued.
    pub message: Message,
    /// For a dead letter: its deliveries in the queue, in order.
    pub history: Vec<DeliveryRecord>,
}

/// Why an answer was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AnswerError {
    /// The delivery is not leased to this consumer any more (its lease
    /// ended, or it was answered already).
    #[error("message {id} delivery {delivery} is not leased to this consumer")]
    NotLeased {
        /// The message.
        id: MessageId,
        /// The delivery named.
        delivery: u32,
    },
}

/// What applying a queue command answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueResponse {
    /// Done; nothing to report.
    Done,
    /// One outcome per enqueued message, in order.
    Enqueued(Vec<EnqueueOutcome>),
    /// The deliveries made (possibly none).
    Delivered(Vec<GroupDelivery>),
    /// One result per answer: for an extension, the lease's new end.
    Answered(Vec<Result<Option<u64>, AnswerError>>),
    /// Refused without changing anything: why.
    Refused(String),
    /// How many messages a purge removed.
    Purged(u64),
}

/// A queue group's counters: the queue's and its dead letters'.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStats {
    /// The queue.
    pub queue: QueueStats,
    /// Its dead letters.
    pub dead_letters: QueueStats,
}

#[derive(Clone, Debug)]
struct Declared {
    name: String,
    settings: QueueSettings,
    main: QueueCore,
    dead: QueueCore,
    messages: BTreeMap<MessageId, Message>,
    dead_letters: BTreeMap<MessageId, (Message, Vec<DeliveryRecord>)>,
    consumers: BTreeMap<ConsumerId, Part>,
}

/// The replicated state of one queue (see the [module docs](self)).
#[derive(Clone, Debug, Default)]
pub struct QueueGroupState {
    /// Moves by one for every queue command applied.
    revision: u64,
    /// The latest time the log has carried.
    clock_ms: u64,
    /// The next message id.
    next_id: MessageId,
    queue: Option<Declared>,
}

#[derive(Serialize, Deserialize)]
struct Image {
    format: u32,
    revision: u64,
    clock_ms: u64,
    next_id: MessageId,
    queue: Option<DeclaredImage>,
}

#[derive(Serialize, Deserialize)]
struct DeclaredImage {
    name: String,
    settings: QueueSettings,
    main: CoreImage,
    dead: CoreImage,
    messages: Vec<(MessageId, Message)>,
    dead_letters: Vec<(MessageId, Message, Vec<DeliveryRecord>)>,
    consumers: Vec<(ConsumerId, Part)>,
}

fn refused(why: impl Into<String>) -> QueueResponse {
    QueueResponse::Refused(why.into())
}

impl QueueGroupState {
    /// The queue's name and settings, once declared.
    pub fn declared(&self) -> Option<(&str, &QueueSettings)> {
        self.queue.as_ref().map(|q| (q.name.as_str(), &q.settings))
    }

    /// Counters of the queue and its dead letters.
    pub fn stats(&self) -> GroupStats {
        self.queue
            .as_ref()
            .map_or_else(GroupStats::default, |q| GroupStats {
                queue: q.main.stats(),
                dead_letters: q.dead.stats(),
            })
    }

    /// The latest time the log has carried (ms since the Unix epoch).
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// Whether a consumer is attached.
    pub fn is_attached(&self, consumer: ConsumerId) -> bool {
        self.queue
            .as_ref()
            .is_some_and(|q| q.consumers.contains_key(&consumer))
    }

    /// Whether `consumer` would be given something by a deliver at `now_ms`.
    pub fn has_delivery_for(&self, consumer: ConsumerId, now_ms: u64) -> bool {
        let Some(q) = &self.queue else { return false };
        let Some(part) = q.consumers.get(&consumer) else {
            return false;
        };
        let core = match part {
            Part::Main => &q.main,
            Part::DeadLetters => &q.dead,
        };
        let now = Duration::from_millis(now_ms.max(self.clock_ms));
        core.can_deliver(consumer, now)
    }

    /// The next `limit` ready messages of `part` at `now_ms` (or the log's
    /// latest time, if later), in the order consumers would get them,
    /// changing nothing. Delayed and leased messages are not shown.
    pub fn peek(&self, part: Part, now_ms: u64, limit: usize) -> Vec<Peeked> {
        let Some(q) = &self.queue else {
            return Vec::new();
        };
        let now = Duration::from_millis(now_ms.max(self.clock_ms));
        let core = match part {
            Part::Main => &q.main,
            Part::DeadLetters => &q.dead,
        };
        core.peek(now, limit)
            .into_iter()
            .filter_map(|(id, deliveries)| {
                let message = match part {
                    Part::Main => q.messages.get(&id)?,
                    Part::DeadLetters => &q.dead_letters.get(&id)?.0,
                };
                Some(Peeked::new(
                    id,
                    deliveries,
                    message.payload.clone(),
                    message.headers.clone(),
                ))
            })
            .collect()
    }

    /// When the leader must next propose a [`QueueCommand::Tick`] (ms since
    /// the Unix epoch): a lease ends, a delay or a time-to-live passes.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let q = self.queue.as_ref()?;
        let now = Duration::from_millis(self.clock_ms);
        [q.main.poll_timeout(now), q.dead.poll_timeout(now)]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.as_millis() as u64)
    }

    /// Applies one queue command (see [`QueueCommand`]).
    pub fn apply_queue(&mut self, command: &QueueCommand) -> QueueResponse {
        self.revision += 1;
        if let QueueCommand::Declare { name, settings } = command {
            return self.declare(name, settings);
        }
        let now_ms = match command {
            QueueCommand::Enqueue { now_ms, .. }
            | QueueCommand::Detach { now_ms, .. }
            | QueueCommand::Deliver { now_ms, .. }
            | QueueCommand::Answer { now_ms, .. }
            | QueueCommand::Tick { now_ms }
            | QueueCommand::Takeover { now_ms } => Some(*now_ms),
            QueueCommand::Attach { .. }
            | QueueCommand::Declare { .. }
            | QueueCommand::Purge { .. } => None,
        };
        if let Some(now_ms) = now_ms {
            // Time never goes back, whoever's clock stamped the command.
            self.clock_ms = self.clock_ms.max(now_ms);
        }
        let now = Duration::from_millis(self.clock_ms);
        let Some(q) = self.queue.as_mut() else {
            return refused("the queue is not declared yet");
        };
        let response = match command {
            // Answered above, before the time moved.
            QueueCommand::Declare { .. } => QueueResponse::Done,
            QueueCommand::Enqueue { messages, .. } => {
                if messages.len() > MAX_BATCH {
                    refused(format!(
                        "{} messages in one enqueue (at most {MAX_BATCH})",
                        messages.len()
                    ))
                } else if let Some(refusal) = q.refusal(messages) {
                    QueueResponse::Enqueued(refusal)
                } else {
                    let outcomes = messages
                        .iter()
                        .map(|m| q.enqueue(m, now, &mut self.next_id))
                        .collect();
                    QueueResponse::Enqueued(outcomes)
                }
            }
            QueueCommand::Attach {
                consumer,
                prefetch,
                part,
            } => q.attach(*consumer, *prefetch, *part),
            QueueCommand::Detach { consumer, .. } => {
                if let Some(part) = q.consumers.remove(consumer) {
                    q.core(part).remove_consumer(*consumer, now);
                }
                QueueResponse::Done
            }
            QueueCommand::Deliver { consumer, max, .. } => q.deliver(*consumer, *max, now),
            QueueCommand::Answer {
                consumer, answers, ..
            } => q.answer(*consumer, answers, now),
            QueueCommand::Tick { .. } => {
                q.main.handle_timeout(now);
                q.dead.handle_timeout(now);
                QueueResponse::Done
            }
            QueueCommand::Takeover { .. } => {
                for (consumer, part) in std::mem::take(&mut q.consumers) {
                    q.core(part).remove_consumer(consumer, now);
                }
                QueueResponse::Done
            }
            QueueCommand::Purge { part } => {
                let purged = q.core(*part).purge();
                for id in &purged {
                    match part {
                        Part::Main => {
                            q.messages.remove(id);
                        }
                        Part::DeadLetters => {
                            q.dead_letters.remove(id);
                        }
                    }
                }
                QueueResponse::Purged(purged.len() as u64)
            }
        };
        q.settle();
        response
    }

    fn declare(&mut self, name: &str, settings: &QueueSettings) -> QueueResponse {
        if let Some(q) = &self.queue {
            return if q.settings == *settings && q.name == name {
                QueueResponse::Done
            } else {
                refused(format!(
                    "queue {:?} was declared with {:?}, not {name:?} with {settings:?}",
                    q.name, q.settings
                ))
            };
        }
        if let Err(e) = settings.validate() {
            return refused(e);
        }
        if name.is_empty() || name.len() > 200 {
            return refused("a queue name has 1 to 200 bytes");
        }
        self.queue = Some(Declared {
            name: name.to_string(),
            settings: settings.clone(),
            main: QueueCore::new(settings.config(false)),
            dead: QueueCore::new(settings.config(true)),
            messages: BTreeMap::new(),
            dead_letters: BTreeMap::new(),
            consumers: BTreeMap::new(),
        });
        QueueResponse::Done
    }
}

impl Declared {
    fn core(&mut self, part: Part) -> &mut QueueCore {
        match part {
            Part::Main => &mut self.main,
            Part::DeadLetters => &mut self.dead,
        }
    }

    /// Why none of `messages` may be stored, one outcome each, if any of
    /// them is refused: an enqueue is all or nothing, so a caller that
    /// sends the batch again never stores part of it twice.
    fn refusal(&self, messages: &[Message]) -> Option<Vec<EnqueueOutcome>> {
        let invalid = messages.iter().enumerate().find_map(|(i, m)| {
            if m.payload.len() > MAX_PAYLOAD {
                Some((
                    i,
                    format!(
                        "a payload of {} bytes is over {MAX_PAYLOAD}",
                        m.payload.len()
                    ),
                ))
            } else if m.key.as_ref().is_some_and(|k| k.len() > MAX_KEY_LEN) {
                Some((
                    i,
                    format!("an idempotency key is at most {MAX_KEY_LEN} bytes"),
                ))
            } else {
                None
            }
        });
        if let Some((bad, why)) = invalid {
            return Some(
                (0..messages.len())
                    .map(|i| {
                        EnqueueOutcome::Invalid(if i == bad {
                            why.clone()
                        } else {
                            format!(
                                "not stored: message {bad} of the same enqueue was refused ({why})"
                            )
                        })
                    })
                    .collect(),
            );
        }
        // What would be new: neither a known key nor one earlier in the batch.
        let mut keys = BTreeSet::new();
        let new = messages
            .iter()
            .filter(|m| match &m.key {
                Some(key) => !self.main.knows_key(key) && keys.insert(key.as_str()),
                None => true,
            })
            .count() as u64;
        let stats = self.main.stats();
        (stats.depth + stats.in_flight + new > self.settings.max_depth)
            .then(|| vec![EnqueueOutcome::Full; messages.len()])
    }

    fn enqueue(
        &mut self,
        message: &Message,
        now: Duration,
        next_id: &mut MessageId,
    ) -> EnqueueOutcome {
        if message.payload.len() > MAX_PAYLOAD {
            return EnqueueOutcome::Invalid(format!(
                "a payload of {} bytes is over {MAX_PAYLOAD}",
                message.payload.len()
            ));
        }
        if message.key.as_ref().is_some_and(|k| k.len() > MAX_KEY_LEN) {
            return EnqueueOutcome::Invalid(format!(
                "an idempotency key is at most {MAX_KEY_LEN} bytes"
            ));
        }
        if let Some(key) = &message.key {
            if let Some(id) = self.main.duplicate_of(key) {
                return EnqueueOutcome::Duplicate(id);
            }
        }
        let stats = self.main.stats();
        if stats.depth + stats.in_flight >= self.settings.max_depth {
            return EnqueueOutcome::Full;
        }
        let id = *next_id;
        *next_id += 1;
        let available = now + message.delay.unwrap_or_default();
        let expires = message.ttl.map(|ttl| now + ttl);
        self.main
            .handle_enqueue(id, message.key.clone(), available, expires);
        self.messages.insert(id, message.clone());
        EnqueueOutcome::Stored(id)
    }

    fn attach(&mut self, consumer: ConsumerId, prefetch: u32, part: Part) -> QueueResponse {
        if !(1..=MAX_PREFETCH).contains(&prefetch) {
            return refused(format!(
                "a prefetch of {prefetch} is not within 1..={MAX_PREFETCH}"
            ));
        }
        if self.consumers.contains_key(&consumer) {
            return refused(format!("consumer {consumer} is attached already"));
        }
        if self.consumers.len() >= MAX_CONSUMERS {
            return refused(format!("{MAX_CONSUMERS} consumers are attached already"));
        }
        self.consumers.insert(consumer, part);
        self.core(part).add_consumer(consumer, prefetch as usize);
        QueueResponse::Done
    }

    fn deliver(&mut self, consumer: ConsumerId, max: u32, now: Duration) -> QueueResponse {
        let Some(&part) = self.consumers.get(&consumer) else {
            return refused(format!("consumer {consumer} is not attached"));
        };
        let mut deliveries = Vec::new();
        while deliveries.len() < (max as usize).min(MAX_BATCH) {
            let Some(d) = self.core(part).poll_delivery(consumer, now) else {
                break;
            };
            let (message, history) = match part {
                Part::Main => (self.messages.get(&d.id).cloned(), Vec::new()),
                Part::DeadLetters => match self.dead_letters.get(&d.id) {
                    Some((m, h)) => (Some(m.clone()), h.clone()),
                    None => (None, Vec::new()),
                },
            };
            // The core and the payloads are kept together; a message
            // without its payload would be a bug, not a delivery.
            let Some(message) = message else { continue };
            deliveries.push(GroupDelivery {
                id: d.id,
                delivery: d.delivery,
                lease_until_ms: d.lease_until.as_millis() as u64,
                message,
                history,
            });
        }
        QueueResponse::Delivered(deliveries)
    }

    fn answer(&mut self, consumer: ConsumerId, answers: &[Answer], now: Duration) -> QueueResponse {
        if answers.len() > MAX_ANSWERS {
            return refused(format!(
                "{} answers in one command (at most {MAX_ANSWERS})",
                answers.len()
            ));
        }
        let Some(&part) = self.consumers.get(&consumer) else {
            return refused(format!("consumer {consumer} is not attached"));
        };
        let core = self.core(part);
        let results = answers
            .iter()
            .map(|a| {
                let result = match a.action {
                    Action::Ack => core.ack_at(consumer, a.id, a.delivery, now).map(|()| None),
                    Action::Nack { delay_ms } => core
                        .nack(
                            consumer,
                            a.id,
                            a.delivery,
                            Duration::from_millis(delay_ms),
                            now,
                        )
                        .map(|()| None),
                    Action::Extend { by_ms } => core
                        .extend(
                            consumer,
                            a.id,
                            a.delivery,
                            Duration::from_millis(by_ms),
                            now,
                        )
                        .map(|until| Some(until.as_millis() as u64)),
                    Action::Reject => core.reject(consumer, a.id, a.delivery, now).map(|()| None),
                };
                result.map_err(|_| AnswerError::NotLeased {
                    id: a.id,
                    delivery: a.delivery,
                })
            })
            .collect();
        QueueResponse::Answered(results)
    }

    /// Carries out what the cores decided: payloads of removed messages go,
    /// dead letters move to the dead-letter core with their history.
    fn settle(&mut self) {
        while let Some(event) = self.main.poll_event() {
            match event {
                QueueEvent::Acked(id) | QueueEvent::Expired(id) => {
                    self.messages.remove(&id);
                }
                QueueEvent::DeadLettered { id, history } => {
                    if let Some(message) = self.messages.remove(&id) {
                        self.dead.handle_enqueue(id, None, Duration::ZERO, None);
                        self.dead_letters.insert(id, (message, history));
                    }
                }
            }
        }
        // A dead letter is never dead-lettered again: rejecting one discards it.
        while let Some(event) = self.dead.poll_event() {
            match event {
                QueueEvent::Acked(id)
                | QueueEvent::Expired(id)
                | QueueEvent::DeadLettered { id, .. } => {
                    self.dead_letters.remove(&id);
                }
            }
        }
    }
}

impl GroupState for QueueGroupState {
    fn empty() -> Self {
        QueueGroupState::default()
    }

    fn apply(&mut self, command: &Command) -> Response {
        match command {
            Command::Queue(commands) => {
                Response::Queue(commands.iter().map(|c| self.apply_queue(c)).collect())
            }
            _ => Response::Queue(vec![refused("not a queue command")]),
        }
    }

    fn to_snapshot(&self) -> Vec<u8> {
        let image = Image {
            format: FORMAT,
            revision: self.revision,
            clock_ms: self.clock_ms,
            next_id: self.next_id,
            queue: self.queue.as_ref().map(|q| DeclaredImage {
                name: q.name.clone(),
                settings: q.settings.clone(),
                main: q.main.image(),
                dead: q.dead.image(),
                messages: q.messages.iter().map(|(id, m)| (*id, m.clone())).collect(),
                dead_letters: q
                    .dead_letters
                    .iter()
                    .map(|(id, (m, h))| (*id, m.clone(), h.clone()))
                    .collect(),
                consumers: q.consumers.iter().map(|(c, p)| (*c, *p)).collect(),
            }),
        };
        // Cannot fail (every sequence has a known length); were it to, the
        // empty result fails to read back rather than passing for a state.
        postcard::to_allocvec(&image).unwrap_or_default()
    }

    fn from_snapshot(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let bad = |why: String| SnapshotError(format!("queue snapshot: {why}"));
        let (image, rest) =
            postcard::take_from_bytes::<Image>(bytes).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the state", rest.len())));
        }
        if image.format != FORMAT {
            return Err(bad(format!(
                "format {} (this build reads {FORMAT})",
                image.format
            )));
        }
        let queue = match image.queue {
            None => None,
            Some(q) => {
                q.settings.validate().map_err(bad)?;
                let main = QueueCore::from_image(q.settings.config(false), q.main)
                    .map_err(|e| bad(e.to_string()))?;
                let dead = QueueCore::from_image(q.settings.config(true), q.dead)
                    .map_err(|e| bad(e.to_string()))?;
                let messages: BTreeMap<_, _> = q.messages.into_iter().collect();
                let dead_letters: BTreeMap<_, _> = q
                    .dead_letters
                    .into_iter()
                    .map(|(id, m, h)| (id, (m, h)))
                    .collect();
                let consumers: BTreeMap<_, _> = q.consumers.into_iter().collect();
                let ids = |core: &QueueCore| core.message_ids();
                if ids(&main) != messages.keys().copied().collect::<Vec<_>>()
                    || ids(&dead) != dead_letters.keys().copied().collect::<Vec<_>>()
                {
                    return Err(bad("stored messages and the queue disagree".into()));
                }
                if messages
                    .keys()
                    .chain(dead_letters.keys())
                    .any(|id| *id >= image.next_id)
                {
                    return Err(bad("a message id at or past the next id".into()));
                }
                let attached = |part: Part| -> Vec<ConsumerId> {
                    consumers
                        .iter()
                        .filter(|(_, p)| **p == part)
                        .map(|(c, _)| *c)
                        .collect()
                };
                if main.consumer_ids() != attached(Part::Main)
                    || dead.consumer_ids() != attached(Part::DeadLetters)
                    || consumers.len() > MAX_CONSUMERS
                {
                    return Err(bad("attached consumers and the queue disagree".into()));
                }
                Some(Declared {
                    name: q.name,
                    settings: q.settings,
                    main,
                    dead,
                    messages,
                    dead_letters,
                    consumers,
                })
            }
        };
        Ok(QueueGroupState {
            revision: image.revision,
            clock_ms: image.clock_ms,
            next_id: image.next_id,
            queue,
        })
    }

    fn revision(&self) -> u64 {
        self.revision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn declared(max_deliveries: u32) -> QueueGroupState {
        let mut state = QueueGroupState::default();
        let settings = QueueSettings {
            max_deliveries,
            lease_ms: 1000,
            ..QueueSettings::default()
        };
        let declare = QueueCommand::Declare {
            name: "jobs".into(),
            settings,
        };
        assert_eq!(state.apply_queue(&declare), QueueResponse::Done);
        state
    }

    fn enqueue(
        state: &mut QueueGroupState,
        now_ms: u64,
        messages: Vec<Message>,
    ) -> Vec<EnqueueOutcome> {
        match state.apply_queue(&QueueCommand::Enqueue { now_ms, messages }) {
            QueueResponse::Enqueued(outcomes) => outcomes,
            other => panic!("{other:?}"),
        }
    }

    fn deliver(
        state: &mut QueueGroupState,
        consumer: ConsumerId,
        now_ms: u64,
    ) -> Vec<GroupDelivery> {
        match state.apply_queue(&QueueCommand::Deliver {
            consumer,
            max: 100,
            now_ms,
        }) {
            QueueResponse::Delivered(d) => d,
            other => panic!("{other:?}"),
        }
    }

    fn attach(state: &mut QueueGroupState, consumer: ConsumerId, part: Part) {
        let attach = QueueCommand::Attach {
            consumer,
            prefetch: 10,
            part,
        };
        assert_eq!(state.apply_queue(&attach), QueueResponse::Done);
    }

    #[test]
    fn purge_removes_what_is_not_leased_and_peek_shows_what_is_ready() {
        let mut state = declared(3);
        let messages = ["a", "b", "c", "d"].map(Message::new).to_vec();
        enqueue(&mut state, 10, messages);
        attach(&mut state, 1, Part::Main);
        let got = match state.apply_queue(&QueueCommand::Deliver {
            consumer: 1,
            max: 2,
            now_ms: 11,
        }) {
            QueueResponse::Delivered(d) => d,
            other => panic!("{other:?}"),
        };
        assert_eq!(got.len(), 2);
        // a and b are leased: peek shows c and d, oldest first.
        let peeked: Vec<Bytes> = state
            .peek(Part::Main, 12, 10)
            .into_iter()
            .map(|p| p.payload)
            .collect();
        assert_eq!(peeked, [Bytes::from("c"), Bytes::from("d")]);
        assert_eq!(state.peek(Part::Main, 12, 1).len(), 1);
        // b goes to the dead letters.
        state.apply_queue(&QueueCommand::Answer {
            consumer: 1,
            now_ms: 13,
            answers: vec![Answer {
                id: got[1].id,
                delivery: 1,
                action: Action::Reject,
            }],
        });
        let dead = state.peek(Part::DeadLetters, 14, 10);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].payload, Bytes::from("b"));
        // Purging the queue takes c and d, not the leased a.
        let purge = |part| QueueCommand::Purge { part };
        assert_eq!(
            state.apply_queue(&purge(Part::Main)),
            QueueResponse::Purged(2)
        );
        assert!(state.peek(Part::Main, 15, 10).is_empty());
        assert_eq!(state.stats().queue.in_flight, 1);
        assert_eq!(
            state.apply_queue(&purge(Part::Main)),
            QueueResponse::Purged(0)
        );
        // a is still answered as usual.
        let acked = state.apply_queue(&QueueCommand::Answer {
            consumer: 1,
            now_ms: 16,
            answers: vec![Answer {
                id: got[0].id,
                delivery: 1,
                action: Action::Ack,
            }],
        });
        assert_eq!(acked, QueueResponse::Answered(vec![Ok(None)]));
        assert_eq!(
            state.apply_queue(&purge(Part::DeadLetters)),
            QueueResponse::Purged(1)
        );
        let copy = QueueGroupState::from_snapshot(&state.to_snapshot()).unwrap();
        assert_eq!(copy.stats(), state.stats());
        assert_eq!(state.stats().queue.depth, 0);
        assert_eq!(state.stats().dead_letters.depth, 0);
    }

    #[test]
    fn nothing_happens_before_the_queue_is_declared() {
        let mut state = QueueGroupState::default();
        let enqueue = QueueCommand::Enqueue {
            now_ms: 1,
            messages: vec![Message::new("x")],
        };
        assert!(matches!(
            state.apply_queue(&enqueue),
            QueueResponse::Refused(_)
        ));
        assert_eq!(state.stats(), GroupStats::default());
    }

    #[test]
    fn a_declaration_is_fixed_and_bounded() {
        let mut state = declared(3);
        let same = QueueCommand::Declare {
            name: "jobs".into(),
            settings: state.declared().unwrap().1.clone(),
        };
        assert_eq!(state.apply_queue(&same), QueueResponse::Done);
        let other = QueueCommand::Declare {
            name: "jobs".into(),
            settings: QueueSettings::default(),
        };
        assert!(matches!(
            state.apply_queue(&other),
            QueueResponse::Refused(_)
        ));
        let mut fresh = QueueGroupState::default();
        for settings in [
            QueueSettings {
                max_deliveries: 0,
                ..QueueSettings::default()
            },
            QueueSettings {
                lease_ms: 1,
                ..QueueSettings::default()
            },
            QueueSettings {
                dedup_window: u64::MAX,
                ..QueueSettings::default()
            },
        ] {
            let declare = QueueCommand::Declare {
                name: "q".into(),
                settings,
            };
            assert!(matches!(
                fresh.apply_queue(&declare),
                QueueResponse::Refused(_)
            ));
        }
        assert!(fresh.declared().is_none());
    }

    #[test]
    fn messages_flow_with_keys_deliveries_and_acks() {
        let mut state = declared(3);
        let outcomes = enqueue(
            &mut state,
            10,
            vec![
                Message::new("a").with_key("k1"),
                Message::new("b"),
                Message::new("c").with_key("k1"),
            ],
        );
        assert_eq!(
            outcomes,
            [
                EnqueueOutcome::Stored(0),
                EnqueueOutcome::Stored(1),
                EnqueueOutcome::Duplicate(0)
            ]
        );
        attach(&mut state, 7, Part::Main);
        let got = deliver(&mut state, 7, 20);
        assert_eq!(
            got.iter().map(|d| (d.id, d.delivery)).collect::<Vec<_>>(),
            [(0, 1), (1, 1)]
        );
        assert_eq!(got[0].lease_until_ms, 1020);
        assert_eq!(&got[1].message.payload[..], b"b");
        let answers = QueueCommand::Answer {
            consumer: 7,
            now_ms: 30,
            answers: vec![
                Answer {
                    id: 0,
                    delivery: 1,
                    action: Action::Ack,
                },
                Answer {
                    id: 0,
                    delivery: 1,
                    action: Action::Ack,
                },
                Answer {
                    id: 1,
                    delivery: 1,
                    action: Action::Extend { by_ms: 5000 },
                },
            ],
        };
        assert_eq!(
            state.apply_queue(&answers),
            QueueResponse::Answered(vec![
                Ok(None),
                Err(AnswerError::NotLeased { id: 0, delivery: 1 }),
                Ok(Some(5030)),
            ])
        );
        let stats = state.stats().queue;
        assert_eq!(
            (stats.acknowledged, stats.in_flight, stats.depth),
            (1, 1, 0)
        );
        assert_eq!(state.next_deadline_ms(), Some(5030));
    }

    #[test]
    fn time_never_goes_back_whoever_stamps_it() {
        let mut state = declared(3);
        enqueue(&mut state, 10_000, vec![Message::new("a")]);
        attach(&mut state, 1, Part::Main);
        let got = deliver(&mut state, 1, 10_000);
        // A leader whose clock is behind: the lease still ends at 11 000.
        state.apply_queue(&QueueCommand::Tick { now_ms: 5 });
        assert_eq!(state.clock_ms(), 10_000);
        assert_eq!(state.stats().queue.in_flight, 1);
        let ack = QueueCommand::Answer {
            consumer: 1,
            now_ms: 0,
            answers: vec![Answer {
                id: got[0].id,
                delivery: 1,
                action: Action::Ack,
            }],
        };
        assert_eq!(
            state.apply_queue(&ack),
            QueueResponse::Answered(vec![Ok(None)])
        );
    }

    #[test]
    fn dead_lettering_counts_deliveries_across_takeovers() {
        let mut state = declared(2);
        enqueue(&mut state, 0, vec![Message::new("poison")]);
        attach(&mut state, 1, Part::Main);
        assert_eq!(deliver(&mut state, 1, 1)[0].delivery, 1);
        // A new leader: the consumer is gone, its delivery counted.
        state.apply_queue(&QueueCommand::Takeover { now_ms: 2 });
        assert!(!state.is_attached(1));
        attach(&mut state, 2, Part::Main);
        assert_eq!(deliver(&mut state, 2, 3)[0].delivery, 2);
        // The second lease runs out: that was the last delivery.
        state.apply_queue(&QueueCommand::Tick { now_ms: 2000 });
        let stats = state.stats();
        assert_eq!(
            (
                stats.queue.dead_lettered,
                stats.queue.depth,
                stats.dead_letters.depth
            ),
            (1, 0, 1)
        );
        attach(&mut state, 3, Part::DeadLetters);
        let dead = deliver(&mut state, 3, 2001);
        assert_eq!(&dead[0].message.payload[..], b"poison");
        assert_eq!(
            dead[0]
                .history
                .iter()
                .map(|r| r.consumer)
                .collect::<Vec<_>>(),
            [1, 2],
            "{:?}",
            dead[0].history
        );
        // Rejecting a dead letter discards it.
        let reject = QueueCommand::Answer {
            consumer: 3,
            now_ms: 2002,
            answers: vec![Answer {
                id: dead[0].id,
                delivery: 1,
                action: Action::Reject,
            }],
        };
        state.apply_queue(&reject);
        assert_eq!(
            state.stats().dead_letters.depth + state.stats().dead_letters.in_flight,
            0
        );
    }

    #[test]
    fn out_of_bounds_commands_change_nothing() {
        let mut state = declared(3);
        let big = vec![Message::new("x"); MAX_BATCH + 1];
        let revision = state.revision;
        assert!(matches!(
            state.apply_queue(&QueueCommand::Enqueue {
                now_ms: 0,
                messages: big
            }),
            QueueResponse::Refused(_)
        ));
        assert_eq!(state.revision, revision + 1);
        let outcomes = enqueue(
            &mut state,
            0,
            vec![
                Message::new(vec![0u8; MAX_PAYLOAD + 1]),
                Message::new("x").with_key("k".repeat(MAX_KEY_LEN + 1)),
            ],
        );
        assert!(outcomes
            .iter()
            .all(|o| matches!(o, EnqueueOutcome::Invalid(_))));
        for prefetch in [0, MAX_PREFETCH + 1] {
            let attach = QueueCommand::Attach {
                consumer: 1,
                prefetch,
                part: Part::Main,
            };
            assert!(matches!(
                state.apply_queue(&attach),
                QueueResponse::Refused(_)
            ));
        }
        for consumer in 0..MAX_CONSUMERS as u64 {
            attach(&mut state, consumer, Part::Main);
        }
        let one_more = QueueCommand::Attach {
            consumer: u64::MAX,
            prefetch: 1,
            part: Part::Main,
        };
        assert!(matches!(
            state.apply_queue(&one_more),
            QueueResponse::Refused(_)
        ));
        assert!(matches!(
            state.apply_queue(&QueueCommand::Deliver {
                consumer: u64::MAX,
                max: 1,
                now_ms: 0
            }),
            QueueResponse::Refused(_)
        ));
        assert_eq!(state.stats().queue.depth, 0);
    }

    #[test]
    fn a_full_queue_refuses_more() {
        let mut state = QueueGroupState::default();
        let settings = QueueSettings {
            max_depth: 2,
            ..QueueSettings::default()
        };
        state.apply_queue(&QueueCommand::Declare {
            name: "q".into(),
            settings,
        });
        let outcomes = enqueue(
            &mut state,
            0,
            vec![Message::new("1"), Message::new("2"), Message::new("3")],
        );
        // All or nothing: none of the three is stored.
        assert_eq!(outcomes, vec![EnqueueOutcome::Full; 3]);
        assert_eq!(state.stats().queue.depth, 0);
        let outcomes = enqueue(&mut state, 0, vec![Message::new("1"), Message::new("2")]);
        assert!(matches!(
            outcomes[..],
            [EnqueueOutcome::Stored(_), EnqueueOutcome::Stored(_)]
        ));
        // A new key needs room like any message.
        let keyed = enqueue(&mut state, 0, vec![Message::new("k").with_key("k")]);
        assert_eq!(keyed, vec![EnqueueOutcome::Full]);
    }

    #[test]
    fn an_invalid_message_refuses_its_whole_enqueue() {
        let mut state = declared(3);
        let long_key = "k".repeat(MAX_KEY_LEN + 1);
        let outcomes = enqueue(
            &mut state,
            0,
            vec![Message::new("fine"), Message::new("bad").with_key(long_key)],
        );
        assert!(
            matches!(&outcomes[0], EnqueueOutcome::Invalid(why) if why.starts_with("not stored"))
        );
        assert!(matches!(&outcomes[1], EnqueueOutcome::Invalid(why) if why.contains("key")));
        assert_eq!(state.stats().queue.depth, 0);
    }

    /// The state a snapshot gives back is the same state: it answers every
    /// later command as the original does.
    #[test]
    fn a_snapshot_gives_back_the_same_state() {
        let mut state = declared(2);
        enqueue(
            &mut state,
            100,
            vec![
                Message::new("a").with_key("k"),
                Message::new("b"),
                Message::new("c"),
            ],
        );
        attach(&mut state, 1, Part::Main);
        let got = deliver(&mut state, 1, 100);
        state.apply_queue(&QueueCommand::Answer {
            consumer: 1,
            now_ms: 101,
            answers: vec![Answer {
                id: got[1].id,
                delivery: 1,
                action: Action::Reject,
            }],
        });
        attach(&mut state, 2, Part::DeadLetters);

        let bytes = state.to_snapshot();
        let mut copy = QueueGroupState::from_snapshot(&bytes).unwrap();
        assert_eq!(copy.to_snapshot(), bytes);
        let later = [
            QueueCommand::Enqueue {
                now_ms: 200,
                messages: vec![Message::new("again").with_key("k")],
            },
            QueueCommand::Deliver {
                consumer: 2,
                max: 10,
                now_ms: 200,
            },
            QueueCommand::Tick { now_ms: 5000 },
            QueueCommand::Deliver {
                consumer: 1,
                max: 10,
                now_ms: 5000,
            },
            QueueCommand::Takeover { now_ms: 5001 },
        ];
        for command in &later {
            assert_eq!(
                state.apply_queue(command),
                copy.apply_queue(command),
                "{command:?}"
            );
        }
        assert_eq!(state.to_snapshot(), copy.to_snapshot());
        assert_eq!(state.stats(), copy.stats());
    }

    #[test]
    fn a_damaged_snapshot_is_an_error_never_a_panic() {
        let mut state = declared(2);
        enqueue(&mut state, 0, vec![Message::new("a"), Message::new("b")]);
        attach(&mut state, 1, Part::Main);
        deliver(&mut state, 1, 0);
        let bytes = state.to_snapshot();
        for cut in 0..bytes.len() {
            assert!(
                QueueGroupState::from_snapshot(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut flipped = bytes.clone();
        for i in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                flipped[i] ^= bit;
                // Must not panic; may or may not decode.
                let _ = QueueGroupState::from_snapshot(&flipped);
                flipped[i] ^= bit;
            }
        }
        let mut extra = bytes;
        extra.push(0);
        assert!(QueueGroupState::from_snapshot(&extra).is_err());
    }

    #[test]
    fn other_groups_commands_are_refused() {
        let mut state = declared(2);
        let kv = Command::KvBatch(Vec::new());
        assert!(matches!(
            GroupState::apply(&mut state, &kv),
            Response::Queue(answers) if matches!(&answers[..], [QueueResponse::Refused(_)])
        ));
    }
}
