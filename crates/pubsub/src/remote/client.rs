//! The client: a remote bus and its publishers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_queue::remote::RemoteQueue;
use courier_rpc::ClientConfig;
use courier_rpc::{Client, RpcError};
use courier_transport::Address;
use courier_wire::headers::Headers;

use crate::{Event, Message, Subject, SubscribeOptions};

use super::error::RemotePubSubError;
use super::id::fresh_id;
use super::subscription::RemoteSubscription;
use super::wire::*;

/// How long a subscription keeps trying to restore itself after losing its
/// host, unless changed with [`RemotePubSub::with_restore_window`].
pub const DEFAULT_RESTORE_WINDOW: Duration = Duration::from_secs(300);

/// A bus on a [`PubSubHost`](super::PubSubHost) in another process.
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
    /// signature as [`Bus::publish`](crate::Bus::publish).
    pub async fn publish(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), RemotePubSubError> {
        self.own_publisher().publish(subject, payload).await
    }

    /// [`publish`](Self::publish) with headers; see
    /// [`RemotePublisher::publish_with_headers`].
    pub async fn publish_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<(), RemotePubSubError> {
        self.own_publisher()
            .publish_with_headers(subject, headers, payload)
            .await
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
    /// first reply; see [`Bus::request`](crate::Bus::request). Requests share one inbox
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
        self.request_with_headers(subject, Headers::new(), payload, timeout)
            .await
    }

    /// [`request`](Self::request) with headers on the request (the current
    /// trace context is added as `traceparent` unless `headers` has one).
    pub async fn request_with_headers(
        &self,
        subject: &str,
        headers: Headers,
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
                    crate::bus::traced(headers),
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
        RemoteSubscription::open(self.client.clone(), filter, options, self.restore_window).await
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
        + message.headers.total_len()
        + 2 * message.headers.len()
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
    headers: Headers,
}

impl serde::Serialize for Queued {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut fields = serializer.serialize_struct("WirePublish", 4)?;
        fields.serialize_field("subject", &*self.subject)?;
        fields.serialize_field("reply_to", &self.reply_to.as_deref())?;
        fields.serialize_field("payload", &self.payload)?;
        fields.serialize_field("headers", &self.headers)?;
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
            headers: crate::bus::traced(Headers::new()),
        });
    }
    Ok(batch)
}

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
        self.publish_one_way(subject, None, Headers::new(), payload.into())
            .await
    }

    /// [`publish`](Self::publish) with headers (the current trace context
    /// is added as `traceparent` unless `headers` has one).
    pub async fn publish_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<(), RemotePubSubError> {
        self.publish_one_way(subject, None, headers, payload.into())
            .await
    }

    async fn publish_one_way(
        &self,
        subject: &str,
        reply_to: Option<&str>,
        headers: Headers,
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
            headers: crate::bus::traced(headers),
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
        let answered = self.client.flush_applied(self.id).await;
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
            .publish(
                self.id,
                subject.to_string(),
                None,
                payload.into(),
                crate::bus::traced(Headers::new()),
            )
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
                headers: m.headers,
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
        let mut tagged = Headers::new();
        tagged.insert("x-tenant", "blue").unwrap();
        for (reply_to, headers) in [(None, Headers::new()), (Some("_inbox.1.2"), tagged)] {
            let queued = Queued {
                subject: Arc::from("orders.eu"),
                reply_to: reply_to.map(Arc::from),
                payload: Bytes::from_static(b"\x00payload\xff"),
                headers: headers.clone(),
            };
            let wire = WirePublish {
                subject: "orders.eu".into(),
                reply_to: reply_to.map(str::to_string),
                payload: Bytes::from_static(b"\x00payload\xff"),
                headers: headers.clone(),
            };
            assert_eq!(
                postcard::to_allocvec(&(7u64, 9u64, vec![&queued])).unwrap(),
                postcard::to_allocvec(&(7u64, 9u64, vec![wire])).unwrap()
            );
        }
    }
}
