//! The host: a [`Bus`] served as a [`PubSubService`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_wire::headers::Headers;

use crate::bus::Outgoing;
use courier_rpc::Items;

use crate::durable::Durable;
use crate::{Bus, Event, Publisher, Subject, SubscribeOptions};

use super::wire::*;

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
/// [`PubSubService::flush_applied`] to report; forgetting a publisher (only when
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
    ) -> Result<Outgoing, RemoteError> {
        let subject = match last {
            Some(last) if last.as_str() == m.subject => last.clone(),
            _ => Subject::new(&m.subject)?,
        };
        let reply_to = m.reply_to.map(|r| Subject::new(&r)).transpose()?;
        self.check_publish(&subject, reply_to.is_some())?;
        Ok((subject, reply_to, m.headers, m.payload))
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
        messages: Vec<Outgoing>,
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
            headers: m.headers,
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
            headers,
            ..
        } => {
            FIXED
                + subject.0.len()
                + payload.len()
                + reply_to.as_ref().map_or(0, |r| r.0.len())
                + headers.total_len()
                + 2 * headers.len()
        }
        _ => FIXED,
    }
}

impl PubSubService for PubSubHost {
    async fn publish(
        &self,
        publisher: u64,
        subject: String,
        reply_to: Option<String>,
        payload: Bytes,
        headers: Headers,
    ) -> Result<u64, RemoteError> {
        let subject = Subject::new(&subject)?;
        let reply_to = reply_to.map(|r| Subject::new(&r)).transpose()?;
        self.check_publish(&subject, reply_to.is_some())?;
        self.publish_all(publisher, vec![(subject, reply_to, headers, payload)])
            .await
    }

    async fn publish_oneway(
        &self,
        publisher: u64,
        seq: u64,
        subject: String,
        reply_to: Option<String>,
        payload: Bytes,
        headers: Headers,
    ) {
        let publish = async {
            match self
                .publish(publisher, subject, reply_to, payload, headers)
                .await
            {
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
        headers: Headers,
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
            .publish(requester, subject, Some(reply_to), payload, headers)
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
        self.status
            .send(&inbox, Some(status), Headers::new(), body)
            .await;
    }

    /// Unlike the confirmed `publish_batch`, each message is judged alone:
    /// a publisher's sender task puts separate `publish` calls into one
    /// frame, and one refused call must not take the others with it.
    async fn publish_batch_oneway(&self, publisher: u64, seq: u64, messages: Vec<WirePublish>) {
        let count = messages.len() as u64;
        let publish = async {
            let mut parsed: Vec<Outgoing> = Vec::with_capacity(messages.len());
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

    async fn flush_applied(&self, publisher: u64) -> Result<(), RemoteError> {
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
        let mut parsed: Vec<Outgoing> = Vec::with_capacity(messages.len());
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
