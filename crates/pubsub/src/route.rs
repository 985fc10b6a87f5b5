//! Routes: publish–subscribe across the nodes of a cluster.
//!
//! Live pub/sub needs no consensus. As NATS does, every node keeps a route
//! to every other member, tells each which subjects its subscribers want
//! (its *interest*: the distinct filter and queue-group pairs, see
//! [`crate::interest`]) and forwards a message only to nodes that want it,
//! at most one hop: a message that arrived over a route is delivered to
//! local subscribers and never forwarded again. With every node routed to
//! every other, that is enough for each subscriber to get each message once.
//!
//! ## The protocol ([`RouteService`])
//!
//! A route is one direction: node A's route to node B carries A's interest
//! and the messages B wants from A's publishers (B has its own route to A
//! for the other direction). It runs in *sessions*:
//!
//! 1. A opens a session with a fresh random id (`open`); B forgets whatever
//!    an earlier session of A told it.
//! 2. A sends its whole interest, then changes as they happen, and messages,
//!    in one-way batches numbered 1, 2, 3, … (`items`). courier-rpc runs a
//!    connection's one-way calls in order, so B applies them in order; an
//!    interest change is always sent before any message queued after it,
//!    so a reply inbox subscribed before a request is known to the node
//!    that serves the request before the request arrives there.
//! 3. B applies a batch only if it is the next of the current session; a
//!    gap (frames lost with a connection) breaks the session. Once a second
//!    (`check`), or on any error, A asks whether B has applied everything it
//!    sent; if not, or if the connection under the route changed, A starts a
//!    new session, with the whole interest again. So after any loss, once
//!    the network heals, every node's view of another's interest is exact
//!    again (the simulation in `tests/route_sim.rs` checks this).
//!
//! ## Queue groups
//!
//! Each message goes to one member of a queue group, cluster-wide. The
//! rule: **a member on the publisher's node is preferred**; only if the
//! group has none there does the message go to another node holding the
//! group (one node per message, in turn, among those whose route is up),
//! which gives it to one of its members (in turn). A message forwarded for a group names the groups it
//! was forwarded for, so the receiving node serves exactly those.
//!
//! ## Slowness and loss
//!
//! Messages for a peer wait in a bounded buffer
//! ([`RouteConfig::buffer_messages`], [`RouteConfig::buffer_bytes`]). A
//! publisher that finds it full waits for room, at most
//! [`RouteConfig::max_wait`]: a peer that is merely slower than the
//! publisher slows it down, losing nothing (as TCP would). If the wait runs
//! out, the route is marked slow and from then on drops, without waiting,
//! every message for that peer (counted, [`RouteStats::dropped`]) until
//! half its buffer has drained; a route that is down drops at once. So a
//! stalled node delays the others' publishers once, by `max_wait`, and
//! then not at all. What a node missed is counted on the route, not
//! reported to its subscribers as gaps (they cannot know which subjects
//! they missed), and its sequence numbers ([`crate::Message::seq`]) count
//! what it received. On the receiving node a forwarded message meets each
//! subscription's own slow-consumer policy; a backpressured subscriber
//! there holds up that node's intake from the route, as it would hold up a
//! local publisher. Durable subscriptions are not routed: they store what
//! is published on their own node.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_rpc::{Client, ClientConfig, RpcError};
use courier_transport::Address;
use courier_wire::headers::Headers;
use tokio::sync::Notify;

use crate::bus::Publisher;
use crate::interest::{Change, GroupKey, Interest, NodeId};
use crate::remote::WireText;
use crate::{Bus, Subject};

/// Limits and timers of a node's routes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteConfig {
    /// Messages one route buffers for a peer. Default 65,536.
    pub buffer_messages: usize,
    /// Bytes one route buffers (payload, subject and 64 bytes each).
    /// Default 64 MiB.
    pub buffer_bytes: usize,
    /// How long a publisher waits for room in a full route's buffer before
    /// the route is marked slow: from then on messages for it are dropped
    /// (and counted) at once, without waiting, until half its buffer has
    /// drained. So a route that is merely slower than the publisher slows
    /// the publisher (nothing lost), and a stalled one delays it by this
    /// much once. Zero: never wait. Default 250 ms.
    pub max_wait: Duration,
    /// Bytes of messages sent in one frame. Default 256 KiB.
    pub batch_bytes: usize,
    /// How often a route confirms its peer has applied everything sent.
    /// Default 1 s.
    pub check_every: Duration,
    /// Backoff between attempts to reach a peer: from `backoff_min`,
    /// doubling, to `backoff_max`, with jitter. Defaults 100 ms and 5 s.
    pub backoff_min: Duration,
    /// See `backoff_min`.
    pub backoff_max: Duration,
    /// Interests one peer may register here. Past it, further interest is
    /// refused and counted ([`RouteStats::refused_interest`]). With filters
    /// and group names of at most 256 bytes, that bounds one peer's interest
    /// here to a few hundred MB at worst. Default 250,000.
    pub max_interest_per_peer: usize,
    /// Peers with a route into this node. Default 256.
    pub max_peers: usize,
    /// Remote publishers one peer's messages are numbered for here. Default 65,536.
    pub max_publishers_per_peer: usize,
    /// Seeds the backoff jitter (simulations replay with it); `None`: a
    /// random seed per route.
    #[doc(hidden)]
    pub jitter_seed: Option<u64>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            buffer_messages: 65_536,
            buffer_bytes: 64 << 20,
            max_wait: Duration::from_millis(250),
            batch_bytes: 256 << 10,
            check_every: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            max_interest_per_peer: 250_000,
            max_peers: 256,
            max_publishers_per_peer: 65_536,
            jitter_seed: None,
        }
    }
}

impl RouteConfig {
    /// With other buffer bounds.
    pub fn with_buffer(mut self, messages: usize, bytes: usize) -> RouteConfig {
        self.buffer_messages = messages.max(1);
        self.buffer_bytes = bytes.max(1);
        self
    }

    /// With another wait for a full route (see [`RouteConfig::max_wait`]).
    pub fn with_max_wait(mut self, wait: Duration) -> RouteConfig {
        self.max_wait = wait;
        self
    }

    /// With another check period.
    pub fn with_check_every(mut self, every: Duration) -> RouteConfig {
        self.check_every = every.max(Duration::from_millis(1));
        self
    }

    /// With another backoff range.
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> RouteConfig {
        self.backoff_min = min.max(Duration::from_millis(1));
        self.backoff_max = max.max(self.backoff_min);
        self
    }

    /// With another bound on each peer's interest here.
    pub fn with_max_interest_per_peer(mut self, interests: usize) -> RouteConfig {
        self.max_interest_per_peer = interests;
        self
    }
}

/// One item of a route batch.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum RouteItem {
    /// The sender's subscribers want this.
    Subscribe(Interest),
    /// They no longer do.
    Unsubscribe(Interest),
    /// A message for the receiver's subscribers.
    Message {
        /// Its subject.
        subject: WireText,
        /// Where the publisher wants replies.
        reply_to: Option<WireText>,
        /// The publisher, as the sending node numbers them.
        publisher: u64,
        /// Its bytes (a large payload is a slice of the received frame:
        /// see [`courier_wire::shared`]).
        #[serde(deserialize_with = "courier_wire::shared::deserialize")]
        payload: Bytes,
        /// The queue groups, as (filter, group), the receiver is to give
        /// it to one member of.
        groups: Vec<(String, String)>,
        /// Its headers, as published (bounded when decoded).
        headers: Headers,
    },
}

/// Why a route call was refused.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The receiver does not know the session (it restarted, another
    /// session replaced it, or a gap broke it): open a new one.
    #[error("route session unknown here; open a new one")]
    UnknownSession,
    /// The receiver has routes from as many peers as it allows.
    #[error("this node accepts routes from at most {limit} peers")]
    TooManyPeers {
        /// The limit.
        limit: usize,
    },
    /// The caller is not a member this node knows (yet): it retries.
    #[error("node {0} is not a member of this node's cluster")]
    NotAMember(u64),
}

/// The route protocol (see the module docs). Served on every cluster
/// member; only cluster peers may call it.
#[courier_rpc::service]
pub trait RouteService {
    /// Starts session `session` of the route from `node`: whatever an
    /// earlier session said is forgotten.
    async fn open(&self, node: u64, session: u64) -> Result<(), RouteError>;
    /// Batch `seq` (1, 2, …) of a session, applied in order.
    #[oneway]
    async fn items(&self, node: u64, session: u64, seq: u64, items: Vec<RouteItem>);
    /// The last batch applied in the session (answered after every one-way
    /// batch sent before it on the connection).
    async fn check(&self, node: u64, session: u64) -> Result<u64, RouteError>;
}

const SERVICE: &str = "RouteService";

/// A message waiting in a route's buffer.
#[derive(Debug)]
pub(crate) struct Routed {
    pub(crate) subject: Subject,
    pub(crate) reply_to: Option<Subject>,
    pub(crate) headers: Headers,
    pub(crate) payload: Bytes,
    pub(crate) publisher: u64,
    pub(crate) groups: Vec<GroupKey>,
}

fn routed_cost(message: &Routed) -> usize {
    message.payload.len()
        + message.subject.as_str().len()
        + message.reply_to.as_ref().map_or(0, |r| r.as_str().len())
        + message.headers.memory_cost()
        + crate::MESSAGE_OVERHEAD
}

/// A route's state, as [`RouteStats::state`] names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum State {
    Connecting = 0,
    Up = 1,
    Down = 2,
}

impl State {
    fn name(code: u8) -> &'static str {
        match code {
            1 => "up",
            2 => "down",
            _ => "connecting",
        }
    }
}

#[derive(Debug, Default)]
struct Buffered {
    queue: VecDeque<Routed>,
    bytes: usize,
}

/// The sending half of the route to one peer: its buffer, counters and
/// state. The bus offers it messages; [`Outbound::run`] sends them.
#[derive(Debug)]
pub struct Outbound {
    node: NodeId,
    config: RouteConfig,
    buffer: Mutex<Buffered>,
    readable: Notify,
    /// Woken when a batch is taken from a full buffer.
    room: Notify,
    /// Marked slow: a publisher waited `max_wait` in vain; cleared once
    /// half the buffer has drained.
    slow: std::sync::atomic::AtomicBool,
    state: AtomicU8,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
    dropped: AtomicU64,
    reconnects: AtomicU64,
    sessions: AtomicU64,
    /// The backoff jitter's generator state.
    jitter: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Interest items sent in one batch at most.
const INTEREST_PER_BATCH: usize = 4096;
/// Messages sent in one batch at most.
const MESSAGES_PER_BATCH: usize = 4096;

/// How a session ended.
#[derive(Debug)]
enum Ended {
    /// A call failed.
    Failed(String),
    /// The peer lost (or never had) what was sent: start again whole.
    Resync(&'static str),
}

impl Outbound {
    fn new(node: NodeId, config: RouteConfig) -> Outbound {
        Outbound {
            node,
            buffer: Mutex::default(),
            readable: Notify::new(),
            room: Notify::new(),
            slow: std::sync::atomic::AtomicBool::new(false),
            state: AtomicU8::new(State::Connecting as u8),
            messages_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            jitter: AtomicU64::new(
                config
                    .jitter_seed
                    .unwrap_or_else(crate::remote::fresh_id)
                    .max(1),
            ),
            config,
        }
    }

    /// Buffers a message for the peer; returns whether it did. A message
    /// that does not fit waits for room, at most [`RouteConfig::max_wait`],
    /// unless the route is marked slow; it is dropped and counted if the
    /// route is not up, is slow, or the wait runs out (which marks it
    /// slow). Dropping this future while it waits drops the message
    /// (uncounted: the publisher was cancelled, not the route).
    pub(crate) async fn offer(&self, message: Routed) -> bool {
        let size = routed_cost(&message);
        let mut message = Some(message);
        let mut deadline = None;
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the look, so room made in between is seen.
            if deadline.is_some() {
                room.as_mut().enable();
            }
            if self.state.load(Ordering::Relaxed) != State::Up as u8 {
                return self.drop_one();
            }
            {
                let mut buffer = lock(&self.buffer);
                let fits = buffer.queue.len() < self.config.buffer_messages
                    && buffer.bytes + size <= self.config.buffer_bytes;
                if fits {
                    buffer.bytes += size;
                    buffer.queue.extend(message.take());
                    drop(buffer);
                    self.readable.notify_one();
                    return true;
                }
            }
            if self.slow.load(Ordering::Relaxed) || self.config.max_wait.is_zero() {
                return self.drop_one();
            }
            match deadline {
                // Look again, registered this time.
                None => deadline = Some(tokio::time::Instant::now() + self.config.max_wait),
                Some(at) => {
                    if tokio::time::timeout_at(at, room).await.is_err() {
                        if !self.slow.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                peer = self.node,
                                wait = ?self.config.max_wait,
                                "route is slow: dropping messages for it until it catches up"
                            );
                        }
                        return self.drop_one();
                    }
                }
            }
        }
    }

    fn drop_one(&self) -> bool {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Drops (and counts) whatever is buffered: the session it was meant
    /// for is over. Publishers waiting for room see the route down.
    fn discard(&self) {
        let lost = {
            let mut buffer = lock(&self.buffer);
            buffer.bytes = 0;
            std::mem::take(&mut buffer.queue).len()
        };
        self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        self.slow.store(false, Ordering::Relaxed);
        self.room.notify_waiters();
    }

    /// Takes buffered messages for one batch.
    fn take_batch(&self, items: &mut Vec<RouteItem>) {
        let mut buffer = lock(&self.buffer);
        let mut bytes = 0;
        let mut taken = 0;
        while taken < MESSAGES_PER_BATCH && bytes < self.config.batch_bytes {
            let Some(message) = buffer.queue.pop_front() else {
                break;
            };
            let size = routed_cost(&message);
            buffer.bytes -= size;
            bytes += size;
            taken += 1;
            items.push(RouteItem::Message {
                subject: WireText(message.subject.shared_text()),
                reply_to: message.reply_to.map(|r| WireText(r.shared_text())),
                publisher: message.publisher,
                payload: message.payload,
                groups: message.groups,
                headers: message.headers,
            });
        }
        if self.slow.load(Ordering::Relaxed)
            && buffer.queue.len() <= self.config.buffer_messages / 2
        {
            self.slow.store(false, Ordering::Relaxed);
        }
        drop(buffer);
        if taken > 0 {
            self.room.notify_waiters();
        }
    }

    /// Runs the route over `link` until the task is aborted: sessions one
    /// after another. Between them it backs off, from the shortest pause
    /// after a session that got through a check to the longest after
    /// attempts that keep failing (or sessions that keep needing to start
    /// again: a link whose connection changed at every call would
    /// otherwise reopen in a tight loop).
    pub async fn run<L: Link>(self: Arc<Self>, bus: Bus, link: L) {
        let mut backoff = self.config.backoff_min;
        let mut first = true;
        loop {
            // The session id comes from the jitter generator too, so a
            // seeded simulation replays exactly.
            let session = self.next_random();
            match link.open(session).await {
                Ok(epoch) => {
                    if !first {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    first = false;
                    self.sessions.fetch_add(1, Ordering::Relaxed);
                    let (ended, confirmed) = self.session(&bus, &link, session, epoch).await;
                    self.set_state(State::Down);
                    self.discard();
                    if confirmed {
                        backoff = self.config.backoff_min;
                    }
                    match ended {
                        Ended::Resync(why) => {
                            tracing::debug!(peer = self.node, why, "route starts a new session");
                        }
                        Ended::Failed(why) => {
                            tracing::debug!(peer = self.node, %why, "route lost");
                        }
                    }
                }
                Err(err) => {
                    self.set_state(State::Down);
                    tracing::debug!(peer = self.node, %err, "route cannot open a session");
                }
            }
            tokio::time::sleep(self.jitter(backoff)).await;
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    /// The next number of the route's generator (xorshift64).
    fn next_random(&self) -> u64 {
        let mut x = self.jitter.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter.store(x, Ordering::Relaxed);
        x
    }

    /// From half to all of `base`, so peers that lost each other do not
    /// all come back at the same instant.
    fn jitter(&self, base: Duration) -> Duration {
        let fraction = (self.next_random() % 1000) as u32;
        base / 2 + base / 2 * fraction / 1000
    }

    /// One session: the whole interest, then changes and messages, until
    /// something is lost. Says whether any check confirmed it.
    async fn session<L: Link>(
        &self,
        bus: &Bus,
        link: &L,
        session: u64,
        epoch: u64,
    ) -> (Ended, bool) {
        let mut confirmed = false;
        let ended = self
            .session_until_lost(bus, link, session, epoch, &mut confirmed)
            .await;
        (ended, confirmed)
    }

    async fn session_until_lost<L: Link>(
        &self,
        bus: &Bus,
        link: &L,
        session: u64,
        epoch: u64,
        confirmed: &mut bool,
    ) -> Ended {
        let (mut cursor, snapshot) = bus.interest_snapshot();
        let mut pending: VecDeque<Interest> = snapshot.into();
        let mut seq = 0u64;
        // Messages buffered before the session opened were chosen by
        // interest the peer may since have dropped: they go.
        self.discard();
        self.set_state(State::Up);
        let mut checked = tokio::time::Instant::now();
        loop {
            let changed = bus.interest_changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let readable = self.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();

            let mut items = Vec::new();
            while items.len() < INTEREST_PER_BATCH {
                let Some(interest) = pending.pop_front() else {
                    break;
                };
                items.push(RouteItem::Subscribe(interest));
            }
            if pending.is_empty() {
                let room = INTEREST_PER_BATCH.saturating_sub(items.len());
                match bus.interest_since(cursor, room) {
                    Some((to, changes)) => {
                        cursor = to;
                        items.extend(changes.into_iter().map(|change| match change {
                            Change::Added(i) => RouteItem::Subscribe(i),
                            Change::Removed(i) => RouteItem::Unsubscribe(i),
                        }));
                    }
                    None => return Ended::Resync("fell behind the interest change log"),
                }
            }
            // Messages only once the peer will know all interest that came
            // before them. They are taken first and the changes read again
            // after: whatever subscribed before a message was offered is
            // then in that second read (the interest lock orders them), and
            // goes in front of it.
            if pending.is_empty() && bus.interest_version() == cursor {
                let mut messages = Vec::new();
                self.take_batch(&mut messages);
                if !messages.is_empty() {
                    match bus.interest_since(cursor, crate::interest::CHANGE_LOG) {
                        Some((to, changes)) => {
                            cursor = to;
                            items.extend(changes.into_iter().map(|change| match change {
                                Change::Added(i) => RouteItem::Subscribe(i),
                                Change::Removed(i) => RouteItem::Unsubscribe(i),
                            }));
                        }
                        None => return Ended::Resync("fell behind the interest change log"),
                    }
                    items.extend(messages);
                }
            }
            if !items.is_empty() {
                match self.send(link, session, &mut seq, items).await {
                    Ok(Some(now)) if now != epoch => {
                        return Ended::Resync("the connection under the route changed")
                    }
                    Ok(_) => {}
                    Err(ended) => return ended,
                }
                if checked.elapsed() < self.config.check_every {
                    continue;
                }
            } else {
                let at = checked + self.config.check_every;
                tokio::select! {
                    biased;
                    () = &mut changed => continue,
                    () = &mut readable => continue,
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            match link.check(session).await {
                Ok((applied, now)) if applied == seq && now == epoch => {
                    checked = tokio::time::Instant::now();
                    *confirmed = true;
                }
                Ok(_) => return Ended::Resync("the peer missed part of the session"),
                Err(LinkError::Refused(RouteError::UnknownSession)) => {
                    return Ended::Resync("the peer does not know the session")
                }
                Err(err) => return Ended::Failed(err.to_string()),
            }
        }
    }

    /// Sends one batch, split while the connection's frame limit refuses
    /// it; a message no frame can hold is dropped and counted. Returns the
    /// connection's epoch (`None` if nothing could be sent).
    async fn send<L: Link>(
        &self,
        link: &L,
        session: u64,
        seq: &mut u64,
        items: Vec<RouteItem>,
    ) -> Result<Option<u64>, Ended> {
        let mut pending = vec![items];
        let mut epoch = None;
        while let Some(batch) = pending.pop() {
            *seq += 1;
            let (messages, bytes) = message_totals(&batch);
            match link.send(session, *seq, &batch).await {
                Ok(now) => {
                    epoch = Some(now);
                    self.messages_out.fetch_add(messages, Ordering::Relaxed);
                    self.bytes_out.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(LinkError::TooLarge) if batch.len() > 1 => {
                    // Not sent: the number is reused.
                    *seq -= 1;
                    let mut first = batch;
                    let second = first.split_off(first.len() / 2);
                    pending.push(second);
                    pending.push(first);
                }
                Err(LinkError::TooLarge) => {
                    *seq -= 1;
                    match batch.into_iter().next() {
                        Some(RouteItem::Message { .. }) => {
                            self.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        // An interest that cannot be sent would leave the
                        // peer's view wrong for good: give the route up.
                        _ => {
                            return Err(Ended::Failed("an interest exceeds the frame limit".into()))
                        }
                    }
                }
                Err(err) => {
                    let lost: u64 = pending.iter().map(|b| message_totals(b).0).sum();
                    self.dropped.fetch_add(messages + lost, Ordering::Relaxed);
                    return Err(Ended::Failed(err.to_string()));
                }
            }
        }
        Ok(epoch)
    }

    fn stats(&self) -> (u8, u64, u64, u64, u64, usize) {
        (
            self.state.load(Ordering::Relaxed),
            self.messages_out.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.reconnects.load(Ordering::Relaxed),
            lock(&self.buffer).queue.len(),
        )
    }
}

/// Messages and payload bytes in a batch.
fn message_totals(items: &[RouteItem]) -> (u64, u64) {
    items.iter().fold((0, 0), |(n, b), item| match item {
        RouteItem::Message { payload, .. } => (n + 1, b + payload.len() as u64),
        _ => (n, b),
    })
}

/// Why a route call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The peer refused it.
    #[error(transparent)]
    Refused(RouteError),
    /// The frame is larger than the connection allows.
    #[error("route batch exceeds the frame limit")]
    TooLarge,
    /// The call did not get through.
    #[error("{0}")]
    Unreachable(String),
}

impl From<RpcError> for LinkError {
    fn from(err: RpcError) -> LinkError {
        match err {
            RpcError::TooLarge { .. } => LinkError::TooLarge,
            other => LinkError::Unreachable(other.to_string()),
        }
    }
}

/// What a route sends through: the RPC client of a real route
/// ([`RpcLink`]), or a test's simulated network. Each call returns the
/// *epoch* of the connection it went over; a change means frames sent
/// before it may have been lost.
pub trait Link: Send + Sync + 'static {
    /// Opens session `session`.
    fn open(
        &self,
        session: u64,
    ) -> impl std::future::Future<Output = Result<u64, LinkError>> + Send;
    /// Sends batch `seq` one way.
    fn send(
        &self,
        session: u64,
        seq: u64,
        items: &[RouteItem],
    ) -> impl std::future::Future<Output = Result<u64, LinkError>> + Send;
    /// The last batch the peer applied in `session`.
    fn check(
        &self,
        session: u64,
    ) -> impl std::future::Future<Output = Result<(u64, u64), LinkError>> + Send;
}

/// A route over courier-rpc.
#[derive(Debug, Clone)]
pub struct RpcLink {
    client: RouteServiceClient,
    node: NodeId,
}

impl RpcLink {
    /// Calls `client`'s server as node `node`.
    pub fn new(client: Client, node: NodeId) -> RpcLink {
        RpcLink {
            client: RouteServiceClient::new(client),
            node,
        }
    }
}

impl Link for RpcLink {
    async fn open(&self, session: u64) -> Result<u64, LinkError> {
        self.client
            .open(self.node, session)
            .await?
            .map_err(LinkError::Refused)?;
        Ok(self.client.client().epoch().await)
    }

    async fn send(&self, session: u64, seq: u64, items: &[RouteItem]) -> Result<u64, LinkError> {
        Ok(self
            .client
            .client()
            .notify(
                SERVICE,
                "items",
                RouteServiceClient::method_fingerprint("items").expect("a method of RouteService"),
                &(self.node, session, seq, items),
            )
            .await?)
    }

    async fn check(&self, session: u64) -> Result<(u64, u64), LinkError> {
        let applied = self
            .client
            .check(self.node, session)
            .await?
            .map_err(LinkError::Refused)?;
        Ok((applied, self.client.client().epoch().await))
    }
}

/// The receiving half of routes: what each peer's current session has
/// applied, and the counters of what came in.
#[derive(Debug, Default)]
struct Inbound {
    session: u64,
    /// The last batch applied.
    applied: u64,
    broken: bool,
    messages_in: u64,
    bytes_in: u64,
    refused_interest: u64,
    /// Messages forwarded for a queue group with no member here any more.
    unserved: u64,
    /// The peer's publishers, as this bus's publishers (numbered per
    /// subscriber like any other), in two generations so the least
    /// recently used go first and at most the bound are kept.
    publishers: HashMap<u64, Publisher>,
    previous: HashMap<u64, Publisher>,
}

impl Inbound {
    fn publisher(&mut self, id: u64, bound: usize, bus: &Bus) -> Publisher {
        if let Some(publisher) = self.publishers.get(&id) {
            return publisher.clone();
        }
        let publisher = self.previous.remove(&id).unwrap_or_else(|| bus.publisher());
        if self.publishers.len() >= (bound / 2).max(1) {
            self.previous = std::mem::take(&mut self.publishers);
        }
        self.publishers.insert(id, publisher.clone());
        publisher
    }
}

/// Serves [`RouteService`]: applies what peers' routes send to this bus.
#[derive(Debug, Clone)]
pub struct RouteHost {
    bus: Bus,
    config: RouteConfig,
    /// Lock order: `inbound`, then the bus's remote interest.
    inbound: Arc<Mutex<HashMap<NodeId, Inbound>>>,
    /// The nodes allowed to route here (`None`: any, up to `max_peers`).
    members: Arc<Mutex<Option<std::collections::HashSet<NodeId>>>>,
    /// This node's own id, which no peer may use.
    own: Option<NodeId>,
}

/// Queue groups one forwarded message may name; more are ignored.
const MAX_GROUPS_PER_MESSAGE: usize = 256;

impl RouteHost {
    /// Applies routes into `bus`.
    pub fn new(bus: Bus, config: RouteConfig) -> RouteHost {
        RouteHost {
            bus,
            config,
            inbound: Arc::default(),
            members: Arc::default(),
            own: None,
        }
    }

    /// The same, for node `own`: a route claiming to come from `own` is
    /// refused.
    pub fn for_node(mut self, own: NodeId) -> RouteHost {
        self.own = Some(own);
        self
    }

    /// Accepts routes only from `members` from now on, and forgets every
    /// other node: its session and its interest.
    pub fn set_members(&self, members: std::collections::HashSet<NodeId>) {
        let mut inbound = lock(&self.inbound);
        let gone: Vec<NodeId> = inbound
            .keys()
            .copied()
            .filter(|node| !members.contains(node))
            .collect();
        for node in gone {
            inbound.remove(&node);
            self.bus.with_remote(|remote| remote.forget_node(node));
        }
        *lock(&self.members) = Some(members);
    }

    /// Forgets `node` (it left the cluster): its session, its interest.
    pub fn forget(&self, node: NodeId) {
        let mut inbound = lock(&self.inbound);
        inbound.remove(&node);
        self.bus.with_remote(|remote| remote.forget_node(node));
    }

    /// Whether `session` is still `node`'s current one.
    fn current(&self, node: NodeId, session: u64) -> bool {
        lock(&self.inbound)
            .get(&node)
            .is_some_and(|i| i.session == session && !i.broken)
    }

    /// Applies one batch of session `session`. Interest changes carry the
    /// session into the bus's table, which ignores them once another
    /// session opened. Delivering a message may wait (a backpressured
    /// subscriber); if a new session opens meanwhile, the rest of the batch
    /// is not applied, and if the call is cut short (its deadline) the
    /// session is broken, so the sender's next check starts a new one
    /// instead of believing everything arrived.
    async fn apply(&self, node: NodeId, session: u64, items: Vec<RouteItem>) {
        struct Unfinished<'a> {
            host: &'a RouteHost,
            node: NodeId,
            session: u64,
            done: bool,
        }
        impl Drop for Unfinished<'_> {
            fn drop(&mut self) {
                if self.done {
                    return;
                }
                if let Some(entry) = lock(&self.host.inbound).get_mut(&self.node) {
                    if entry.session == self.session {
                        entry.broken = true;
                    }
                }
            }
        }
        let mut unfinished = Unfinished {
            host: self,
            node,
            session,
            done: false,
        };
        let mut last: Option<Subject> = None;
        let mut items = items.into_iter().peekable();
        while let Some(item) = items.next() {
            match item {
                RouteItem::Subscribe(_) | RouteItem::Unsubscribe(_) => {
                    // A run of changes goes in under one lock.
                    let mut run = vec![item];
                    while let Some(next) =
                        items.next_if(|i| !matches!(i, RouteItem::Message { .. }))
                    {
                        run.push(next);
                    }
                    let limit = self.config.max_interest_per_peer;
                    let refused = self.bus.with_remote(|remote| {
                        let mut refused = 0u64;
                        for change in run {
                            match change {
                                RouteItem::Subscribe(interest) => {
                                    if !matches!(
                                        remote.add(node, session, interest, limit),
                                        Ok(true)
                                    ) {
                                        refused += 1;
                                    }
                                }
                                RouteItem::Unsubscribe(interest) => {
                                    remote.remove(node, session, &interest)
                                }
                                RouteItem::Message { .. } => {}
                            }
                        }
                        refused
                    });
                    if refused > 0 {
                        if let Some(inbound) = lock(&self.inbound).get_mut(&node) {
                            inbound.refused_interest += refused;
                        }
                    }
                }
                message @ RouteItem::Message { .. } => {
                    // A run of messages is counted, numbered and routed
                    // together.
                    let mut run = vec![message];
                    while let Some(next) = items.next_if(|i| matches!(i, RouteItem::Message { .. }))
                    {
                        run.push(next);
                    }
                    if !self.current(node, session) {
                        break;
                    }
                    if !self.deliver_run(node, run, &mut last).await {
                        break;
                    }
                }
            }
        }
        unfinished.done = true;
    }

    /// Delivers a run of forwarded messages: messages that fail to parse
    /// are skipped, the rest counted under one lock, and consecutive ones
    /// of one publisher that name no queue group delivered as one batch
    /// (routed once per subject). `false` if `node` is gone.
    async fn deliver_run(
        &self,
        node: NodeId,
        run: Vec<RouteItem>,
        last: &mut Option<Subject>,
    ) -> bool {
        struct Parsed {
            publisher: u64,
            subject: Subject,
            reply_to: Option<Subject>,
            headers: Headers,
            payload: Bytes,
            groups: Vec<GroupKey>,
        }
        let mut parsed = Vec::with_capacity(run.len());
        let mut bytes = 0u64;
        for item in run {
            let RouteItem::Message {
                subject,
                reply_to,
                publisher,
                payload,
                mut groups,
                headers,
            } = item
            else {
                continue;
            };
            let subject = match last.as_ref() {
                Some(last) if last.as_str() == subject.as_str() => last.clone(),
                _ => match Subject::new(subject.as_str()) {
                    Ok(subject) => subject,
                    Err(_) => continue,
                },
            };
            let Ok(reply_to) = reply_to.map(|r| Subject::new(r.as_str())).transpose() else {
                continue;
            };
            *last = Some(subject.clone());
            groups.truncate(MAX_GROUPS_PER_MESSAGE);
            bytes += payload.len() as u64;
            parsed.push(Parsed {
                publisher,
                subject,
                reply_to,
                headers,
                payload,
                groups,
            });
        }
        // This node's publisher for each of the peer's, resolved once.
        let mut publishers: Vec<(u64, Publisher)> = Vec::new();
        {
            let mut inbound = lock(&self.inbound);
            let Some(entry) = inbound.get_mut(&node) else {
                return false;
            };
            entry.messages_in += parsed.len() as u64;
            entry.bytes_in += bytes;
            for message in &parsed {
                if !publishers.iter().any(|(id, _)| *id == message.publisher) {
                    let local = entry.publisher(
                        message.publisher,
                        self.config.max_publishers_per_peer,
                        &self.bus,
                    );
                    publishers.push((message.publisher, local));
                }
            }
        }
        let local_of = |id: u64| {
            publishers
                .iter()
                .find(|(known, _)| *known == id)
                .map(|(_, local)| local.clone())
        };
        let mut parsed = parsed.into_iter().peekable();
        while let Some(first) = parsed.next() {
            let Some(local) = local_of(first.publisher) else {
                continue;
            };
            if !first.groups.is_empty() {
                let unserved = local
                    .send_routed(
                        &first.subject,
                        first.reply_to,
                        first.headers,
                        first.payload,
                        &first.groups,
                    )
                    .await;
                if unserved > 0 {
                    // The member left after the sender chose this node:
                    // counted, never silently gone.
                    if let Some(entry) = lock(&self.inbound).get_mut(&node) {
                        entry.unserved += unserved as u64;
                    }
                }
                continue;
            }
            let publisher = first.publisher;
            let mut batch = vec![(first.subject, first.reply_to, first.headers, first.payload)];
            while let Some(next) =
                parsed.next_if(|m| m.publisher == publisher && m.groups.is_empty())
            {
                batch.push((next.subject, next.reply_to, next.headers, next.payload));
            }
            local.send_all_routed(batch).await;
        }
        true
    }

    /// The peer's publishers numbered here now (for tests of the bound).
    #[doc(hidden)]
    pub fn tracked_publishers(&self, node: NodeId) -> usize {
        lock(&self.inbound)
            .get(&node)
            .map_or(0, |i| i.publishers.len() + i.previous.len())
    }

    fn inbound_stats(&self, node: NodeId) -> (u64, u64, u64, u64) {
        lock(&self.inbound).get(&node).map_or((0, 0, 0, 0), |i| {
            (i.messages_in, i.bytes_in, i.refused_interest, i.unserved)
        })
    }
}

impl RouteService for RouteHost {
    async fn open(&self, node: u64, session: u64) -> Result<(), RouteError> {
        let member = lock(&self.members)
            .as_ref()
            .is_none_or(|members| members.contains(&node));
        if !member || self.own == Some(node) {
            return Err(RouteError::NotAMember(node));
        }
        let mut inbound = lock(&self.inbound);
        if !inbound.contains_key(&node) && inbound.len() >= self.config.max_peers {
            return Err(RouteError::TooManyPeers {
                limit: self.config.max_peers,
            });
        }
        let entry = inbound.entry(node).or_default();
        entry.session = session;
        entry.applied = 0;
        entry.broken = false;
        // Under the inbound lock, so two opens racing leave the table on
        // the session the inbound entry names.
        self.bus.with_remote(|remote| remote.open(node, session));
        Ok(())
    }

    async fn items(&self, node: u64, session: u64, seq: u64, items: Vec<RouteItem>) {
        {
            let mut inbound = lock(&self.inbound);
            let Some(entry) = inbound.get_mut(&node) else {
                return;
            };
            if entry.session != session || entry.broken {
                return;
            }
            if seq != entry.applied + 1 {
                // Something in between was lost: nothing more of this
                // session can be trusted. The sender's check finds out.
                entry.broken = true;
                return;
            }
            entry.applied = seq;
        }
        self.apply(node, session, items).await;
    }

    async fn check(&self, node: u64, session: u64) -> Result<u64, RouteError> {
        match lock(&self.inbound).get(&node) {
            Some(entry) if entry.session == session && !entry.broken => Ok(entry.applied),
            _ => Err(RouteError::UnknownSession),
        }
    }
}

/// One route as `courier cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteStats {
    /// The peer.
    pub node: NodeId,
    /// The address routed to.
    pub address: String,
    /// "up", "connecting" or "down".
    pub state: String,
    /// Messages sent to the peer.
    pub messages_out: u64,
    /// Their payload bytes.
    pub bytes_out: u64,
    /// Messages for the peer dropped: its buffer was full, or the route
    /// was down, or a session ended with them unsent.
    pub dropped: u64,
    /// Sessions opened after the first.
    pub reconnects: u64,
    /// Messages buffered for the peer now.
    pub queued: usize,
    /// Messages received from the peer.
    pub messages_in: u64,
    /// Their payload bytes.
    pub bytes_in: u64,
    /// Interests the peer has registered here.
    pub interest: usize,
    /// Interests of the peer refused (past the limit, or invalid).
    pub refused_interest: u64,
    /// Messages from the peer for a queue group that had no member here
    /// any more when they arrived (the member left after the peer chose
    /// this node): lost, and counted here.
    pub unserved: u64,
}

struct Running {
    address: Address,
    outbound: Arc<Outbound>,
    task: tokio::task::JoinHandle<()>,
}

/// A node's routes: one to every other member, kept to the membership it
/// is given, and the host that receives theirs.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use courier_pubsub::route::{RouteConfig, RouteServiceServer, Routes};
/// use courier_pubsub::{Bus, Event, SubscribeOptions};
/// use courier_rpc::{ClientConfig, Server, ServerConfig};
///
/// // Two nodes, each serving its routes' receiving end.
/// let (a, b) = (Bus::new(), Bus::new());
/// let routes_a = Routes::new(a.clone(), 1, ClientConfig::default(), RouteConfig::default());
/// let routes_b = Routes::new(b.clone(), 2, ClientConfig::default(), RouteConfig::default());
/// let mut addresses = Vec::new();
/// let mut servers = Vec::new();
/// for routes in [&routes_a, &routes_b] {
///     let listener = courier_transport::bind(&"tcp://127.0.0.1:0".parse()?, &Default::default()).await?;
///     addresses.push(listener.local_addr().clone());
///     servers.push(Server::new(ServerConfig::default()).service(RouteServiceServer::new(routes.host())).spawn(listener));
/// }
/// routes_a.set_peers([(2, addresses[1].clone())]);
/// routes_b.set_peers([(1, addresses[0].clone())]);
///
/// let mut orders = a.subscribe("orders.>", SubscribeOptions::default()).await?;
/// while !b.remote_interest(1).contains(&courier_pubsub::Interest::plain("orders.>")) {
///     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
/// }
/// b.publisher().publish("orders.created", "tea").await?;
/// let Some(Ok(Event::Message(message))) = orders.recv().await else { panic!() };
/// assert_eq!(&message.payload[..], b"tea");
/// # Ok(()) }
/// ```
pub struct Routes {
    bus: Bus,
    node: NodeId,
    client: ClientConfig,
    config: RouteConfig,
    host: RouteHost,
    running: Mutex<HashMap<NodeId, Running>>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Routes {
    /// Routes for node `node`'s `bus`, dialling peers with `client` (its
    /// token, TLS and timeouts).
    pub fn new(bus: Bus, node: NodeId, client: ClientConfig, config: RouteConfig) -> Routes {
        let host = RouteHost::new(bus.clone(), config.clone()).for_node(node);
        Routes {
            bus,
            node,
            client,
            config,
            host,
            running: Mutex::default(),
        }
    }

    /// The bus it routes for.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The receiving end, to serve as [`RouteServiceServer`].
    pub fn host(&self) -> RouteHost {
        self.host.clone()
    }

    /// Keeps a route to exactly these peers (this node's own id is
    /// skipped): new ones are dialled, gone ones closed and forgotten, one
    /// whose address changed redialled. Must be called within a Tokio
    /// runtime.
    pub fn set_peers(&self, peers: impl IntoIterator<Item = (NodeId, Address)>) {
        let wanted: HashMap<NodeId, Address> = peers
            .into_iter()
            .filter(|(id, _)| *id != self.node)
            .collect();
        let mut running = lock(&self.running);
        let gone: Vec<NodeId> = running
            .iter()
            .filter(|(id, r)| wanted.get(id) != Some(&r.address))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(route) = running.remove(&id) {
                route.task.abort();
                self.bus.with_remote(|remote| remote.set_route(id, None));
            }
        }
        self.host.set_members(wanted.keys().copied().collect());
        for (id, address) in wanted {
            if running.contains_key(&id) {
                continue;
            }
            let outbound = Arc::new(Outbound::new(id, self.config.clone()));
            let client = Client::lazy(&address, self.client.clone());
            let link = RpcLink::new(client, self.node);
            let task = tokio::spawn(outbound.clone().run(self.bus.clone(), link));
            self.bus
                .with_remote(|remote| remote.set_route(id, Some(outbound.clone())));
            running.insert(
                id,
                Running {
                    address,
                    outbound,
                    task,
                },
            );
        }
    }

    /// Every route, by peer.
    pub fn stats(&self) -> Vec<RouteStats> {
        let running = lock(&self.running);
        let mut all: Vec<RouteStats> = running
            .iter()
            .map(|(&node, route)| {
                let (state, messages_out, bytes_out, dropped, reconnects, queued) =
                    route.outbound.stats();
                let (messages_in, bytes_in, refused_interest, unserved) =
                    self.host.inbound_stats(node);
                RouteStats {
                    node,
                    address: route.address.to_string(),
                    state: State::name(state).to_string(),
                    messages_out,
                    bytes_out,
                    dropped,
                    reconnects,
                    queued,
                    messages_in,
                    bytes_in,
                    interest: self.bus.remote_interest_count(node),
                    refused_interest,
                    unserved,
                }
            })
            .collect();
        all.sort_by_key(|r| r.node);
        all
    }

    /// Closes every route.
    pub fn close(&self) {
        let mut running = lock(&self.running);
        for (id, route) in running.drain() {
            route.task.abort();
            self.bus.with_remote(|remote| remote.set_route(id, None));
        }
    }
}

impl Drop for Routes {
    fn drop(&mut self) {
        self.close();
    }
}

/// Starts a route to `node` over any [`Link`] (for simulations and tests):
/// registers it with `bus` and returns its task and its sending half.
#[doc(hidden)]
pub fn spawn_route<L: Link>(
    bus: &Bus,
    node: NodeId,
    config: RouteConfig,
    link: L,
) -> (tokio::task::JoinHandle<()>, Arc<Outbound>) {
    let outbound = Arc::new(Outbound::new(node, config));
    bus.with_remote(|remote| remote.set_route(node, Some(outbound.clone())));
    let task = tokio::spawn(outbound.clone().run(bus.clone(), link));
    (task, outbound)
}

impl Outbound {
    /// Messages dropped on this route so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sessions opened so far.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Whether the route is up now.
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == State::Up as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(publisher: u64) -> RouteItem {
        RouteItem::Message {
            subject: WireText(Arc::from("a.b")),
            reply_to: None,
            publisher,
            payload: Bytes::from_static(b"x"),
            groups: Vec::new(),
            headers: Headers::new(),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn peers_their_ids_and_their_publishers_are_bounded() {
        let config = RouteConfig {
            max_peers: 2,
            max_publishers_per_peer: 100,
            ..RouteConfig::default()
        };
        let bus = Bus::new();
        let mut sub = bus
            .subscribe("a.>", crate::SubscribeOptions::default().buffer(100_000))
            .await
            .unwrap();
        let host = RouteHost::new(bus.clone(), config).for_node(9);
        assert_eq!(
            host.open(9, 1).await,
            Err(RouteError::NotAMember(9)),
            "our own id"
        );
        host.open(1, 11).await.unwrap();
        host.open(2, 22).await.unwrap();
        assert_eq!(
            host.open(3, 33).await,
            Err(RouteError::TooManyPeers { limit: 2 })
        );
        host.open(1, 12).await.unwrap(); // a known peer may always start again

        // 10,000 publishers the peer made up: at most the bound are kept.
        let items: Vec<RouteItem> = (0..10_000).map(message).collect();
        host.items(1, 12, 1, items).await;
        assert!(
            host.tracked_publishers(1) <= 100,
            "{}",
            host.tracked_publishers(1)
        );
        let mut delivered = 0;
        while let Some(crate::Event::Message(_)) = sub.try_recv() {
            delivered += 1;
        }
        assert_eq!(delivered, 10_000);

        // Members only, once told; the others are forgotten.
        host.set_members([2].into());
        assert_eq!(host.open(1, 13).await, Err(RouteError::NotAMember(1)));
        assert_eq!(host.check(1, 12).await, Err(RouteError::UnknownSession));
        assert_eq!(host.check(2, 22).await, Ok(0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_message_for_a_group_gone_from_here_is_counted() {
        let bus = Bus::new();
        let mut member = bus
            .subscribe("a.>", crate::SubscribeOptions::default().group("g"))
            .await
            .unwrap();
        let host = RouteHost::new(bus.clone(), RouteConfig::default());
        host.open(1, 11).await.unwrap();
        let for_group = |n: u8| RouteItem::Message {
            subject: WireText(Arc::from("a.b")),
            reply_to: None,
            publisher: 7,
            payload: Bytes::from(vec![n]),
            groups: vec![("a.>".to_string(), "g".to_string())],
            headers: Headers::new(),
        };
        host.items(1, 11, 1, vec![for_group(1)]).await;
        assert!(matches!(member.try_recv(), Some(crate::Event::Message(_))));
        drop(member);
        host.items(1, 11, 2, vec![for_group(2)]).await;
        assert_eq!(
            host.inbound_stats(1),
            (2, 2, 0, 1),
            "one in, one for nobody"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_gap_breaks_the_session_and_a_stale_session_changes_nothing() {
        let bus = Bus::new();
        let host = RouteHost::new(bus.clone(), RouteConfig::default());
        host.open(1, 11).await.unwrap();
        host.items(1, 11, 1, vec![RouteItem::Subscribe(Interest::plain("x.>"))])
            .await;
        assert_eq!(host.check(1, 11).await, Ok(1));
        // An older session's frame, late: ignored.
        host.items(1, 10, 2, vec![RouteItem::Subscribe(Interest::plain("old"))])
            .await;
        assert_eq!(bus.remote_interest(1), vec![Interest::plain("x.>")]);
        // Batch 3 without 2: the session cannot be trusted any more.
        host.items(
            1,
            11,
            3,
            vec![RouteItem::Unsubscribe(Interest::plain("x.>"))],
        )
        .await;
        assert_eq!(host.check(1, 11).await, Err(RouteError::UnknownSession));
        assert_eq!(
            bus.remote_interest(1),
            vec![Interest::plain("x.>")],
            "nothing applied"
        );
        // A new session starts from nothing.
        host.open(1, 12).await.unwrap();
        assert!(bus.remote_interest(1).is_empty());
    }
}
