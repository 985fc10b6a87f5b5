//! At-least-once delivery with receiver-side de-duplication, as pure state
//! machines: no sockets, no clock, no tasks. Time is a [`Duration`] since an
//! epoch the caller chooses, passed into every call.
//!
//! # The protocol
//!
//! A sender numbers its messages 0, 1, 2, … within a *stream*: one sender
//! incarnation talking to one receiver. Every data message carries its
//! sequence number and the sender's *low-water mark*: the oldest sequence
//! number it may still send, so everything below it is either acknowledged
//! or abandoned. The receiver acknowledges every message it accepts or
//! recognises as a duplicate, individually. The sender retransmits an
//! unacknowledged message with exponential backoff until it is acknowledged
//! or its deadline passes.
//!
//! # What each side promises
//!
//! - [`Outbox`]: every message pushed is transmitted, and retransmitted
//!   until acknowledged, refused or expired; it then reports exactly one of
//!   [`OutboxEvent::Acked`], [`OutboxEvent::Rejected`] or
//!   [`OutboxEvent::Expired`]. At most `capacity`
//!   messages are in flight; `push` refuses more and hands the message back.
//! - [`Inbox`]: within a stream, a message is accepted ([`Verdict::Deliver`])
//!   at most once, as long as its stream's window is remembered. Windows are
//!   bounded (`window` sequence numbers ahead of the low-water mark, at most
//!   `max_streams` streams, least recently used forgotten first). A receiver
//!   that restarts, or forgets a stream, may accept a redelivery of a message
//!   it accepted before: at-least-once still holds, exactly-once does not.
//!
//! # Driving them
//!
//! Sender: [`Outbox::push`] messages; after any input, drain
//! [`Outbox::poll_transmit`] and put each on the wire, drain
//! [`Outbox::poll_event`], and arm a timer for [`Outbox::poll_timeout`]; when
//! it fires, call [`Outbox::handle_timeout`]. Feed acknowledgements to
//! [`Outbox::handle_ack`].
//!
//! Receiver: pass each data message to [`Inbox::handle_data`]; deliver it on
//! [`Verdict::Deliver`], acknowledge it on `Deliver` and `Duplicate`, drop it
//! silently on `Refuse` (the sender will retry once the window has moved).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::time::Duration;

use bytes::Bytes;

/// A message's position in its stream.
pub type Seq = u64;

/// How retransmissions back off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the first retransmission.
    pub initial: Duration,
    /// Longest wait between retransmissions.
    pub max: Duration,
}

impl Default for RetryPolicy {
    /// 200 ms, doubling, at most 5 s.
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

/// A message to put on the wire now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Its sequence number.
    pub seq: Seq,
    /// The sender's low-water mark, to send along.
    pub low_water: Seq,
    /// The message.
    pub payload: Bytes,
    /// 1 for the first transmission, 2 for the first retransmission, …
    pub attempt: u32,
}

/// What became of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboxEvent {
    /// The receiver acknowledged it.
    Acked {
        /// Its sequence number.
        seq: Seq,
        /// Transmissions it took.
        attempts: u32,
    },
    /// The receiver refused it (no such endpoint, wrong schema): it was not
    /// delivered and will not be sent again.
    Rejected {
        /// Its sequence number.
        seq: Seq,
        /// The message, handed back.
        payload: Bytes,
    },
    /// Its deadline passed unacknowledged. It may or may not have been
    /// delivered; it will not be sent again.
    Expired {
        /// Its sequence number.
        seq: Seq,
        /// The message, handed back.
        payload: Bytes,
        /// Transmissions made.
        attempts: u32,
    },
}

#[derive(Debug)]
struct InFlight {
    payload: Bytes,
    attempts: u32,
    /// When it is next due for transmission.
    due: Duration,
    deadline: Duration,
    backoff: Duration,
}

/// The sending side of one stream. See the [module docs](self).
#[derive(Debug)]
pub struct Outbox {
    next_seq: Seq,
    capacity: usize,
    policy: RetryPolicy,
    in_flight: BTreeMap<Seq, InFlight>,
    /// (due, seq) for every message in flight.
    transmit_queue: BTreeSet<(Duration, Seq)>,
    /// (deadline, seq) for every message in flight.
    deadlines: BTreeSet<(Duration, Seq)>,
    events: std::collections::VecDeque<OutboxEvent>,
}

impl Outbox {
    /// An outbox holding at most `capacity` unacknowledged messages.
    pub fn new(capacity: usize, policy: RetryPolicy) -> Outbox {
        Outbox {
            next_seq: 0,
            capacity: capacity.max(1),
            policy,
            in_flight: BTreeMap::new(),
            transmit_queue: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            events: Default::default(),
        }
    }

    /// Queues a message for transmission now, to be retried until
    /// acknowledged or `deadline`. When `capacity` messages are already in
    /// flight the message is handed back.
    pub fn push(
        &mut self,
        payload: Bytes,
        now: Duration,
        deadline: Duration,
    ) -> Result<Seq, Bytes> {
        if self.in_flight.len() >= self.capacity {
            return Err(payload);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.insert(
            seq,
            InFlight {
                payload,
                attempts: 0,
                due: now,
                deadline,
                backoff: self.policy.initial,
            },
        );
        self.transmit_queue.insert((now, seq));
        self.deadlines.insert((deadline, seq));
        Ok(seq)
    }

    /// The oldest sequence number that may still be sent: everything below
    /// it is acknowledged or abandoned.
    pub fn low_water(&self) -> Seq {
        self.in_flight
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_seq)
    }

    /// The next message due at `now`, oldest due first. Its next
    /// retransmission is scheduled as it is returned.
    pub fn poll_transmit(&mut self, now: Duration) -> Option<Transmit> {
        let &(due, seq) = self.transmit_queue.first()?;
        if due > now {
            return None;
        }
        self.transmit_queue.remove(&(due, seq));
        let low_water = self.low_water();
        let entry = self
            .in_flight
            .get_mut(&seq)
            .expect("queued messages are in flight");
        entry.attempts += 1;
        if entry.attempts > 1 {
            entry.backoff = (entry.backoff * 2).min(self.policy.max);
        }
        entry.due = now + entry.backoff;
        // No retransmission is scheduled past the deadline: expiry comes first.
        if entry.due < entry.deadline {
            self.transmit_queue.insert((entry.due, seq));
        }
        Some(Transmit {
            seq,
            low_water,
            payload: entry.payload.clone(),
            attempt: entry.attempts,
        })
    }

    /// The receiver acknowledged `seq`. Acks for unknown, already
    /// acknowledged or expired messages are ignored.
    pub fn handle_ack(&mut self, seq: Seq) {
        if let Some(entry) = self.in_flight.remove(&seq) {
            self.forget_timers(seq, &entry);
            self.events.push_back(OutboxEvent::Acked {
                seq,
                attempts: entry.attempts,
            });
        }
    }

    /// The receiver refused `seq`. Refusals of messages no longer in flight
    /// are ignored.
    pub fn handle_reject(&mut self, seq: Seq) {
        if let Some(entry) = self.in_flight.remove(&seq) {
            self.forget_timers(seq, &entry);
            self.events.push_back(OutboxEvent::Rejected {
                seq,
                payload: entry.payload,
            });
        }
    }

    /// Expires every message whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Duration) {
        while let Some(&(deadline, seq)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            let entry = self
                .in_flight
                .remove(&seq)
                .expect("deadlines track messages in flight");
            self.forget_timers(seq, &entry);
            self.events.push_back(OutboxEvent::Expired {
                seq,
                payload: entry.payload,
                attempts: entry.attempts,
            });
        }
    }

    fn forget_timers(&mut self, seq: Seq, entry: &InFlight) {
        self.transmit_queue.remove(&(entry.due, seq));
        self.deadlines.remove(&(entry.deadline, seq));
    }

    /// When the outbox next needs [`handle_timeout`](Self::handle_timeout)
    /// or [`poll_transmit`](Self::poll_transmit): the earliest due
    /// transmission or deadline.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let due = self.transmit_queue.first().map(|(t, _)| *t);
        let deadline = self.deadlines.first().map(|(t, _)| *t);
        match (due, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The earliest deadline of a message in flight: all that needs a timer
    /// while there is no connection to transmit on.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// The next outcome to report.
    pub fn poll_event(&mut self) -> Option<OutboxEvent> {
        self.events.pop_front()
    }

    /// Makes every unacknowledged message due at `now`, with its backoff
    /// reset: after reconnecting, the peer should not wait for timers that
    /// were set against a dead connection.
    pub fn retransmit_all(&mut self, now: Duration) {
        self.transmit_queue.clear();
        for (&seq, entry) in &mut self.in_flight {
            entry.due = now;
            entry.backoff = self.policy.initial;
            self.transmit_queue.insert((now, seq));
        }
    }

    /// Messages sent and not yet acknowledged or expired.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether another message can be pushed.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.capacity
    }
}

/// What the receiver should do with a data message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// New: deliver it, and acknowledge it.
    Deliver,
    /// Seen before: acknowledge it again (the first ack may have been lost),
    /// do not deliver it.
    Duplicate,
    /// Too far ahead of the window: drop it without acknowledging; the
    /// sender will retransmit once earlier messages have been acknowledged.
    Refuse,
}

/// The sequence numbers seen in one stream: everything below `floor`, and a
/// bounded set above it.
#[derive(Clone, Debug)]
pub struct DedupWindow {
    floor: Seq,
    above: BTreeSet<Seq>,
    window: u64,
}

impl DedupWindow {
    /// A window accepting sequence numbers up to `window` ahead of its floor.
    pub fn new(window: u64) -> DedupWindow {
        DedupWindow {
            floor: 0,
            above: BTreeSet::new(),
            window: window.max(1),
        }
    }

    /// Classifies `seq`, given the sender's low-water mark, and records it.
    pub fn observe(&mut self, seq: Seq, low_water: Seq) -> Verdict {
        if low_water > self.floor {
            // The sender will never send anything below its low-water mark
            // again, so there is nothing left to remember there.
            self.floor = low_water;
            self.above = self.above.split_off(&low_water);
            self.advance();
        }
        if seq < self.floor || self.above.contains(&seq) {
            return Verdict::Duplicate;
        }
        if seq - self.floor >= self.window {
            return Verdict::Refuse;
        }
        self.above.insert(seq);
        self.advance();
        Verdict::Deliver
    }

    fn advance(&mut self) {
        while self.above.first() == Some(&self.floor) {
            self.above.pop_first();
            self.floor += 1;
        }
    }

    /// Every sequence number below this has been seen (or given up on by the sender).
    pub fn floor(&self) -> Seq {
        self.floor
    }

    /// Sequence numbers remembered above the floor (at most `window`).
    pub fn remembered(&self) -> usize {
        self.above.len()
    }
}

/// The receiving side: one [`DedupWindow`] per stream, at most
/// `max_streams` of them, the least recently used forgotten first.
#[derive(Debug)]
pub struct Inbox<K> {
    window: u64,
    max_streams: usize,
    streams: HashMap<K, (DedupWindow, u64)>,
    clock: u64,
}

impl<K: Hash + Eq + Clone> Inbox<K> {
    /// An inbox remembering `window` sequence numbers for each of at most
    /// `max_streams` streams.
    pub fn new(window: u64, max_streams: usize) -> Inbox<K> {
        Inbox {
            window,
            max_streams: max_streams.max(1),
            streams: HashMap::new(),
            clock: 0,
        }
    }

    /// Classifies a data message of `stream`.
    pub fn handle_data(&mut self, stream: &K, seq: Seq, low_water: Seq) -> Verdict {
        self.clock += 1;
        if !self.streams.contains_key(stream) && self.streams.len() >= self.max_streams {
            let oldest = self
                .streams
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| key.clone())
                .expect("at least one stream");
            self.streams.remove(&oldest);
        }
        let window = self.window;
        let (dedup, used) = self
            .streams
            .entry(stream.clone())
            .or_insert_with(|| (DedupWindow::new(window), 0));
        *used = self.clock;
        dedup.observe(seq, low_water)
    }

    /// Streams remembered.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}
