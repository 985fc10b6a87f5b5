//! One browser connection: the `connect` handshake, then a reader (the
//! browser's operations) and a writer (the only one who writes to the
//! socket) in one task, with each subscription and request forwarding into
//! the writer's bounded queue from a task the connection owns.
//!
//! Every frame's room in that queue (by count and by bytes) is reserved
//! from the most its text can take before the text is built, so what a
//! connection holds in frames is bounded by `outbound_bytes` (plus one
//! frame larger than it, sent alone), however many subscriptions wait.
//!
//! Requests go out inline, under the connection's own publisher identity
//! (so in order with its publishes), to an inbox of the connection's own:
//! `_inbox.<conn>.<req>`, with `<conn>` random per connection and `<req>`
//! random per request (a service that saw one request cannot name the next
//! one's inbox), one bus subscription (`_inbox.<conn>.*`) for all its
//! requests. No browser may subscribe to an `_inbox` subject, and a
//! subscription whose first token is a wildcard is never given one, so
//! replies reach only the request that asked.
//!
//! Three tokens, not four under the bus's inbox prefix
//! (`_inbox.<nonce>.<conn>.<req>`, which would spare routes one interest
//! change per connection): the broker's access policy lets anyone answer
//! only into `_inbox.<id>` and `_inbox.<id>.<n>`, so a service under it
//! could not answer a four-token inbox.
//!
//! Dropping the connection's future (the socket closed, shutdown's grace
//! ran out) drops its `JoinSet`s, which abort every subscription's
//! forwarder (dropping the subscription: it leaves the bus) and every
//! request still waiting, and its inbox.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use bytes::Bytes;
use courier_pubsub::remote::LATENCY_BUCKETS_US;
use courier_pubsub::subject::Token;
use courier_pubsub::{
    Event, Filter, Headers, Message, Publisher, SlowConsumer, Subject, SubscribeOptions,
};
use courier_rpc::Secret;
use courier_wire::ErrorKind;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

use crate::config::MAX_NAME_LEN;
use crate::frames::{self, json_len, Body, Id, Inbound, Outbound, Refusal};
use crate::gateway::{ConnectionSlot, Live, Shared};

/// Close codes (RFC 6455).
const NORMAL: u16 = 1000;
const GOING_AWAY: u16 = 1001;
const POLICY: u16 = 1008;
const TOO_BIG: u16 = 1009;
const TRY_AGAIN_LATER: u16 = 1013;

/// Runs one upgraded WebSocket to its end, or until shutdown's grace
/// runs out (every step, refusals and handshake included, stops then).
pub(crate) async fn run(socket: WebSocket, shared: Arc<Shared>) {
    let mut abort = shared.scope.abort.subscribe();
    tokio::select! {
        _ = serve(socket, shared.clone()) => {}
        _ = crate::gateway::raised(&mut abort) => {}
    }
}

async fn serve(mut socket: WebSocket, shared: Arc<Shared>) {
    let write_timeout = shared.config.write_timeout;
    let Some(_slot) =
        ConnectionSlot::take(&shared.live, &shared.scope, shared.config.max_connections)
    else {
        let refusal = Refusal::new(
            ErrorKind::Busy,
            format!(
                "the broker has as many browser connections as it allows ({})",
                shared.config.max_connections
            ),
        );
        refuse(&mut socket, &refusal, TRY_AGAIN_LATER, write_timeout).await;
        return;
    };
    let mut closing = shared.scope.closing.subscribe();
    let identity = tokio::select! {
        identity = handshake(&mut socket, &shared) => identity,
        _ = crate::gateway::raised(&mut closing) => {
            let _ = tokio::time::timeout(write_timeout, socket.send(close(GOING_AWAY, "shutting down"))).await;
            return;
        }
    };
    let Some(identity) = identity else {
        return;
    };
    let connected = Outbound::Connected {
        server: &shared.config.server_name,
        identity: identity.as_deref(),
        max_payload: shared.config.max_payload,
    }
    .text();
    match tokio::time::timeout(
        write_timeout,
        socket.send(WsMessage::Text(connected.into())),
    )
    .await
    {
        Ok(Ok(())) => {}
        _ => return,
    }
    let (sink, stream) = socket.split();
    // Clamped so that no configured value can make the channel or the
    // semaphore panic (both refuse capacities past their maximum; the
    // semaphore's is below u32::MAX on 32-bit targets), and so that a
    // reservation fits `acquire_many_owned`'s u32.
    let frames = shared.config.outbound_messages.clamp(1, u32::MAX as usize);
    let max_bytes = shared
        .config
        .outbound_bytes
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let (tx, rx) = mpsc::channel(frames);
    let out = Out {
        tx,
        bytes: Arc::new(Semaphore::new(max_bytes)),
        max_bytes,
        live: shared.live.clone(),
    };
    let mut session = Session {
        publisher: shared.bus.publisher(),
        shared: shared.clone(),
        identity,
        out: out.clone(),
        subscriptions: HashMap::new(),
        forwarders: JoinSet::new(),
        requests: JoinSet::new(),
        inbox: None,
        pending: Arc::default(),
    };
    let reader = async {
        // Without a close to send (the browser went), the connection ends
        // here; with one, the writer ends it once it has written what is
        // queued and the close (or failed to, within its timeout).
        if let Some((code, reason)) = session.read(stream, &mut closing).await {
            out.close(code, reason).await;
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = write(sink, rx, write_timeout) => {}
        _ = reader => {}
    }
    // `session` (its subscriptions, requests and inbox) goes with this
    // frame.
}

/// Waits for `connect` and decides who the browser is: `Some(identity)`
/// (`None` inside for anonymous), or `None` after refusing it.
async fn handshake(socket: &mut WebSocket, shared: &Shared) -> Option<Option<String>> {
    let (identity, name) = connect_frame(socket, shared).await?;
    tracing::debug!(?identity, ?name, "browser connected");
    Some(identity)
}

/// [`handshake`]'s work: the identity and the browser's `name`.
async fn connect_frame(
    socket: &mut WebSocket,
    shared: &Shared,
) -> Option<(Option<String>, Option<String>)> {
    let write_timeout = shared.config.write_timeout;
    let deadline = deadline_after(shared.config.connect_timeout);
    let text = loop {
        let next = match tokio::time::timeout_at(deadline, socket.recv()).await {
            Ok(next) => next,
            Err(_) => {
                let refusal = Refusal::new(
                    ErrorKind::TimedOut,
                    format!(
                        "no connect frame within {:?}",
                        shared.config.connect_timeout
                    ),
                );
                refuse(socket, &refusal, POLICY, write_timeout).await;
                return None;
            }
        };
        match next {
            Some(Ok(WsMessage::Text(text))) => break text,
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            Some(Ok(WsMessage::Binary(_))) => {
                let refusal = Refusal::invalid("the first frame must be a connect text frame");
                refuse(socket, &refusal, POLICY, write_timeout).await;
                return None;
            }
            Some(Err(err)) if is_too_large(&err) => {
                let refusal = too_large_frame(shared.config.max_frame);
                refuse(socket, &refusal, TOO_BIG, write_timeout).await;
                return None;
            }
            Some(Ok(WsMessage::Close(_)) | Err(_)) | None => return None,
        }
    };
    let (_, frame) = frames::parse(&text);
    let frame = match frame {
        Ok(frame) if frame.op == "connect" => frame,
        Ok(frame) => {
            let refusal = Refusal::invalid(format!(
                "the first frame must be connect, not {:?}",
                truncated(&frame.op)
            ));
            refuse(socket, &refusal, POLICY, write_timeout).await;
            return None;
        }
        Err(refusal) => {
            refuse(socket, &refusal, POLICY, write_timeout).await;
            return None;
        }
    };
    if frame.name.as_ref().is_some_and(|n| n.len() > MAX_NAME_LEN) {
        let refusal = Refusal::invalid(format!("name: at most {MAX_NAME_LEN} bytes"));
        refuse(socket, &refusal, POLICY, write_timeout).await;
        return None;
    }
    let identity = match (&frame.token, &shared.authenticator) {
        (Some(token), Some(authenticator)) => {
            match authenticator.authenticate(&Secret::new(token.clone())) {
                Some(identity) => Some(identity),
                None => {
                    tracing::info!(name = ?frame.name, "browser refused: unknown token");
                    let refusal = Refusal::new(ErrorKind::Refused, "the token proves no identity");
                    refuse(socket, &refusal, POLICY, write_timeout).await;
                    return None;
                }
            }
        }
        // Without an authenticator nobody has an identity; a token is
        // ignored, as an open broker ignores a Rust client's.
        (Some(_), None) => None,
        (None, _) => None,
    };
    if identity.is_none() && shared.auth_required {
        tracing::info!(name = ?frame.name, "browser refused: no identity");
        let refusal = Refusal::new(
            ErrorKind::Refused,
            "this broker requires a token that proves an identity",
        );
        refuse(socket, &refusal, POLICY, write_timeout).await;
        return None;
    }
    Some((identity, frame.name))
}

/// Sends an error and closes, each within the write timeout.
async fn refuse(socket: &mut WebSocket, refusal: &Refusal, code: u16, write_timeout: Duration) {
    let text = frames::error(refusal, None, None);
    let _ = tokio::time::timeout(write_timeout, async {
        socket.send(WsMessage::Text(text.into())).await?;
        socket.send(close(code, &refusal.message)).await
    })
    .await;
}

fn close(code: u16, reason: &str) -> WsMessage {
    // A close frame's reason is at most 123 bytes.
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: reason[..end].into(),
    }))
}

fn truncated(text: &str) -> &str {
    let mut end = text.len().min(MAX_NAME_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Whether a read failed because a frame or message passed the limit.
fn is_too_large(err: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = err.source();
    while let Some(err) = source {
        if let Some(tokio_tungstenite::tungstenite::Error::Capacity(_)) =
            err.downcast_ref::<tokio_tungstenite::tungstenite::Error>()
        {
            return true;
        }
        source = err.source();
    }
    false
}

fn too_large_frame(limit: usize) -> Refusal {
    Refusal::new(
        ErrorKind::LimitExceeded,
        format!("a frame over the frame limit ({limit} bytes)"),
    )
}

/// `now + after`, or a year from now if that overflows (a configured
/// timeout of `Duration::MAX` means "never", not a panic).
fn deadline_after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// What the writer is given.
enum Frame {
    /// A text frame, holding its share of the byte bound until written.
    Text(Queued, OwnedSemaphorePermit),
    /// The last frame.
    Close(u16, String),
}

/// A frame's text while it waits for the writer: counted in the gateway's
/// queued bytes (its peak is what the tests hold to the bound).
struct Queued {
    text: String,
    len: usize,
    live: Arc<Live>,
}

impl Queued {
    fn new(text: String, live: Arc<Live>) -> Queued {
        let len = text.len();
        let now = live.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        live.queued_peak.fetch_max(now, Ordering::Relaxed);
        Queued { text, len, live }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.live
            .queued_bytes
            .fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// The writer's queue, bounded by frames and by bytes.
#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<Frame>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    live: Arc<Live>,
}

/// Room reserved in the writer's queue for one frame of at most the size
/// it was reserved for.
struct Room {
    bytes: OwnedSemaphorePermit,
    slot: mpsc::OwnedPermit<Frame>,
    live: Arc<Live>,
}

impl Room {
    fn send(self, text: String) {
        let queued = Queued::new(text, self.live);
        self.slot.send(Frame::Text(queued, self.bytes));
    }
}

impl Out {
    /// Waits for room for a frame of at most `len` bytes (a larger one
    /// takes the whole bound, so it is sent alone); `None` once the writer
    /// is gone.
    async fn reserve(&self, len: usize) -> Option<Room> {
        // `max_bytes` fits a u32 (see `serve`).
        let cost = len.clamp(1, self.max_bytes) as u32;
        let bytes = self.bytes.clone().acquire_many_owned(cost).await.ok()?;
        let slot = self.tx.clone().reserve_owned().await.ok()?;
        Some(Room {
            bytes,
            slot,
            live: self.live.clone(),
        })
    }

    /// Queues a small frame already built (answers and errors), waiting for
    /// room; `false` once the writer is gone.
    async fn send(&self, text: String) -> bool {
        match self.reserve(text.len()).await {
            Some(room) => {
                room.send(text);
                true
            }
            None => false,
        }
    }

    async fn close(&self, code: u16, reason: String) {
        let _ = self.tx.send(Frame::Close(code, reason)).await;
    }
}

/// The one writer of the socket: frames in queue order, flushed when the
/// queue is empty; ends after a close, a failed write, or a write that
/// takes longer than `write_timeout` (the browser stopped reading).
async fn write(
    mut sink: SplitSink<WebSocket, WsMessage>,
    mut rx: mpsc::Receiver<Frame>,
    write_timeout: Duration,
) {
    while let Some(frame) = rx.recv().await {
        let (message, held) = match frame {
            // The frame stays counted (and its room held) until written.
            Frame::Text(mut queued, permit) => (
                WsMessage::Text(std::mem::take(&mut queued.text).into()),
                Some((queued, permit)),
            ),
            Frame::Close(code, reason) => (close(code, &reason), None),
        };
        let last = held.is_none();
        let written = tokio::time::timeout(write_timeout, async {
            sink.feed(message).await?;
            if last || rx.is_empty() {
                sink.flush().await?;
            }
            Ok::<_, axum::Error>(())
        })
        .await;
        drop(held);
        match written {
            Ok(Ok(())) if !last => {}
            Ok(Ok(())) => return,
            Ok(Err(err)) => {
                tracing::debug!("writing to a browser: {err}");
                return;
            }
            Err(_) => {
                tracing::info!(?write_timeout, "a browser stopped reading; closing it");
                return;
            }
        }
    }
}

/// A connected browser's state.
struct Session {
    shared: Arc<Shared>,
    identity: Option<String>,
    /// The connection's publisher identity: its publishes and requests
    /// reach each subscriber in the order the browser sent them.
    publisher: Publisher,
    out: Out,
    /// sid → its forwarder.
    subscriptions: HashMap<String, AbortHandle>,
    /// Each ends with its sid (when its subscription ended by itself).
    forwarders: JoinSet<String>,
    requests: JoinSet<()>,
    /// Made at the first request.
    inbox: Option<Inbox>,
    /// Requests awaiting their reply, by the inbox subject's last token
    /// (random per request; at most `max_requests_in_flight`: each request
    /// task removes its own entry as it ends).
    pending: Pending,
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Message>>>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The connection's inbox: `<prefix>.*` on the bus (`prefix` is
/// `_inbox.<conn>`), its replies handed to the waiting requests by
/// a task of its own. Dropped with the session: the task stops (its
/// subscription leaves the bus).
struct Inbox {
    prefix: String,
    task: AbortHandle,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes a waiting request's entry out of [`Pending`] when it ends, however.
struct Forget(Pending, String);

impl Drop for Forget {
    fn drop(&mut self) {
        lock(&self.0).remove(&self.1);
    }
}

/// 128 unpredictable bits as hex (32 digits), for an inbox's tokens:
/// SipHash keyed by std's `RandomState` (seeded from the operating
/// system's randomness) of a counter and the time. The workspace has no random-number crate; a
/// keyed PRF of distinct inputs is as good for an unguessable name.
fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let word = || {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.finish()
    };
    format!("{:016x}{:016x}", word(), word())
}

/// How reading ended: a close to send, or `None` when the browser went.
type End = Option<(u16, String)>;

impl Session {
    async fn read(
        &mut self,
        mut stream: SplitStream<WebSocket>,
        closing: &mut tokio::sync::watch::Receiver<bool>,
    ) -> End {
        let idle = self.shared.config.idle_timeout;
        loop {
            // Finished tasks leave their sets, so the sets hold only what
            // is live (requests count against their bound by this); a
            // subscription that ended by itself frees its sid.
            while let Some(done) = self.forwarders.try_join_next_with_id() {
                if let Ok((task, sid)) = done {
                    if self
                        .subscriptions
                        .get(&sid)
                        .is_some_and(|forwarder| forwarder.id() == task)
                    {
                        self.subscriptions.remove(&sid);
                    }
                }
            }
            while self.requests.try_join_next().is_some() {}
            let next = tokio::select! {
                biased;
                _ = crate::gateway::raised(closing) => {
                    return Some((GOING_AWAY, "the broker is shutting down".into()));
                }
                next = async {
                    match idle {
                        Some(idle) => tokio::time::timeout(idle, stream.next()).await.ok(),
                        None => Some(stream.next().await),
                    }
                } => next,
            };
            let Some(next) = next else {
                return Some((GOING_AWAY, "idle".into()));
            };
            // An operation may wait for room in the writer's queue (a
            // browser that does not read): shutdown must not wait for it.
            let step = tokio::select! {
                biased;
                _ = crate::gateway::raised(closing) => {
                    return Some((GOING_AWAY, "the broker is shutting down".into()));
                }
                step = self.take(next) => step,
            };
            if let Some(end) = step {
                return end;
            }
        }
    }

    /// Acts on one thing read from the socket: `Some(end)` ends reading.
    async fn take(&mut self, next: Option<Result<WsMessage, axum::Error>>) -> Option<End> {
        match next {
            Some(Ok(WsMessage::Text(text))) => {
                if !self.handle(text.as_str()).await {
                    return Some(None);
                }
                None
            }
            Some(Ok(WsMessage::Binary(_))) => {
                let refusal = Refusal::invalid("binary frames are not part of the protocol");
                if !self.out.send(frames::error(&refusal, None, None)).await {
                    return Some(None);
                }
                None
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => None,
            Some(Ok(WsMessage::Close(_))) | None => Some(Some((NORMAL, String::new()))),
            Some(Err(err)) if is_too_large(&err) => {
                let refusal = too_large_frame(self.shared.config.max_frame);
                let _ = self.out.send(frames::error(&refusal, None, None)).await;
                Some(Some((TOO_BIG, refusal.message)))
            }
            Some(Err(err)) => {
                tracing::debug!("reading from a browser: {err}");
                Some(None)
            }
        }
    }

    /// Handles one text frame; `false` once the writer is gone.
    async fn handle(&mut self, text: &str) -> bool {
        let (id, frame) = frames::parse(text);
        let outcome = match frame {
            Ok(frame) => self.operate(id.as_ref(), frame).await,
            Err(refusal) => Err((refusal, None)),
        };
        let answer = match outcome {
            Ok(Some(answer)) => answer,
            Ok(None) => return true,
            Err((refusal, sid)) => frames::error(&refusal, id.as_ref(), sid.as_deref()),
        };
        self.out.send(answer).await
    }

    /// One operation: its answer frame, if it has one now (`ok` only with
    /// an `id`), or an error (with the `sid`, for a subscription's; one
    /// over the length limit is not echoed).
    async fn operate(
        &mut self,
        id: Option<&Id>,
        frame: Inbound,
    ) -> Result<Option<String>, (Refusal, Option<String>)> {
        let ok = || Ok(id.map(|id| Outbound::Ok { id: Some(id) }.text()));
        match frame.op.as_str() {
            "sub" => {
                let sid = frame.sid.clone().filter(|sid| sid.len() <= MAX_NAME_LEN);
                self.subscribe(id, frame).await.map_err(|r| (r, sid))?;
                Ok(None)
            }
            "unsub" => {
                let sid = required(&frame.sid, "sid").map_err(|r| (r, None))?;
                if let Some(forwarder) = self.subscriptions.remove(sid) {
                    forwarder.abort();
                }
                ok()
            }
            "pub" => {
                self.publish(frame).await.map_err(|r| (r, None))?;
                ok()
            }
            "req" => {
                let Some(id) = id else {
                    return Err((Refusal::invalid("req needs an id"), None));
                };
                self.request(id.clone(), frame)
                    .await
                    .map_err(|r| (r, None))?;
                Ok(None)
            }
            "ping" => Ok(Some(Outbound::Pong { id }.text())),
            "connect" => Err((Refusal::invalid("already connected"), None)),
            other => Err((
                Refusal::invalid(format!("unknown op {:?}", truncated(other))),
                None,
            )),
        }
    }

    /// `sub`: the `ok` (if asked for) is queued before the forwarder
    /// starts, so it comes before the subscription's first `msg`.
    async fn subscribe(&mut self, id: Option<&Id>, frame: Inbound) -> Result<(), Refusal> {
        let config = &self.shared.config;
        let sid = required(&frame.sid, "sid")?;
        if sid.len() > MAX_NAME_LEN {
            return Err(Refusal::invalid(format!(
                "sid: at most {MAX_NAME_LEN} bytes"
            )));
        }
        if self.subscriptions.contains_key(sid) {
            return Err(Refusal::new(
                ErrorKind::Conflict,
                format!("sid {sid:?} is in use on this connection"),
            ));
        }
        if self.subscriptions.len() >= config.max_subscriptions {
            return Err(Refusal::new(
                ErrorKind::LimitExceeded,
                format!(
                    "a connection may have {} subscriptions",
                    config.max_subscriptions
                ),
            ));
        }
        let subject = required(&frame.subject, "subject")?;
        let filter = Filter::new(subject).map_err(|err| Refusal::invalid(err.to_string()))?;
        // A browser never needs an inbox (its requests use the gateway's);
        // refusing them all leaves no id, wildcard or node to get around.
        if matches!(filter.tokens().first(), Some(Token::Literal(first)) if &**first == "_inbox") {
            return Err(Refusal::new(
                ErrorKind::Refused,
                "subscribing to _inbox subjects is not permitted (a req's reply comes as a reply frame)",
            ));
        }
        // Such a filter matches inboxes too: its forwarder skips them.
        let skip_inboxes = matches!(filter.tokens().first(), Some(Token::One | Token::Rest));
        if let Some(access) = &self.shared.access {
            if !access.may_subscribe(self.identity.as_deref(), &filter) {
                return Err(Refusal::new(
                    ErrorKind::Refused,
                    format!("subscribing to {filter} is not permitted"),
                ));
            }
        }
        let mut options = SubscribeOptions::default()
            .buffer(config.subscription_buffer)
            .policy(SlowConsumer::DropOldest);
        if let Some(group) = &frame.queue {
            options = options.group(group.clone());
        }
        let subscription = self
            .shared
            .bus
            .subscribe(subject, options)
            .await
            .map_err(|err| Refusal::invalid(err.to_string()))?;
        if let Some(id) = id {
            if !self.out.send(Outbound::Ok { id: Some(id) }.text()).await {
                // The writer is gone; the reader learns it at its next send.
                return Ok(());
            }
        }
        let forwarder = self.forwarders.spawn(forward(
            subscription,
            sid.to_string(),
            skip_inboxes,
            self.out.clone(),
        ));
        self.subscriptions.insert(sid.to_string(), forwarder);
        Ok(())
    }

    /// The checks a `pub` and a `req` share: subject, payload, headers and
    /// permission (a publish asking for a reply is a request).
    fn prepare(
        &self,
        frame: &Inbound,
        request: bool,
    ) -> Result<(Subject, Option<Subject>, Headers, Bytes), Refusal> {
        let subject = required(&frame.subject, "subject")?;
        let subject = Subject::new(subject).map_err(|err| Refusal::invalid(err.to_string()))?;
        let reply = match &frame.reply {
            Some(reply) if !request => {
                Some(Subject::new(reply).map_err(|err| Refusal::invalid(format!("reply: {err}")))?)
            }
            _ => None,
        };
        let payload = frames::payload(frame, self.shared.config.max_payload)?;
        let headers = frames::headers(frame)?;
        if let Some(access) = &self.shared.access {
            let who = self.identity.as_deref();
            let asks = request || reply.is_some();
            let allowed = if asks {
                access.may_request(who, &subject)
            } else {
                access.may_publish(who, &subject)
            };
            if !allowed {
                let what = if asks { "requests" } else { "publishing" };
                return Err(Refusal::new(
                    ErrorKind::Refused,
                    format!("{what} to {subject} is not permitted"),
                ));
            }
        }
        Ok((subject, reply, headers, payload))
    }

    /// Stores a message in the durable subscriptions it matches, then
    /// delivers it under the connection's publisher identity, as the
    /// remote host does; counts it. Returns how many took it: live
    /// deliveries and stored copies (a durable subscriber answers later).
    async fn send(
        &self,
        message: (Subject, Option<Subject>, Headers, Bytes),
    ) -> Result<u64, Refusal> {
        let started = Instant::now();
        let counters = &self.shared.counters;
        let mut stored = 0;
        if let Some(durable) = &self.shared.durable {
            match durable.store(std::slice::from_ref(&message)).await {
                Ok(n) => {
                    stored = n as u64;
                    counters.stored.fetch_add(stored, Ordering::Relaxed);
                }
                Err(err) => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(Refusal::new(err.kind(), err.to_string()));
                }
            }
        }
        let (subject, reply, headers, payload) = message;
        let delivered = self
            .publisher
            .publish_with_reply(
                subject.as_str(),
                reply.as_ref().map(Subject::as_str),
                headers,
                payload,
            )
            .await
            .map_err(|err| Refusal::new(err.kind(), err.to_string()))?;
        counters.published.fetch_add(1, Ordering::Relaxed);
        counters.delivered.fetch_add(delivered, Ordering::Relaxed);
        record(counters, started.elapsed());
        Ok(delivered.saturating_add(stored))
    }

    async fn publish(&mut self, frame: Inbound) -> Result<(), Refusal> {
        let message = self.prepare(&frame, false)?;
        self.send(message).await.map(drop)
    }

    /// The connection's inbox prefix (`_inbox.<conn>`), subscribing
    /// `<prefix>.*` at the first request.
    async fn inbox(&mut self) -> Result<String, Refusal> {
        if let Some(inbox) = &self.inbox {
            return Ok(inbox.prefix.clone());
        }
        let prefix = format!("_inbox.{}", random_id());
        // Room for every request's reply at once; more (duplicates, or
        // someone flooding it) drop the oldest, and the dispatcher drops
        // what no request waits for.
        let buffer = self.shared.config.max_requests_in_flight.clamp(1, 4096);
        let subscription = self
            .shared
            .bus
            .subscribe(
                &format!("{prefix}.*"),
                SubscribeOptions::default()
                    .buffer(buffer)
                    .policy(SlowConsumer::DropOldest),
            )
            .await
            .map_err(|err| Refusal::new(ErrorKind::Internal, format!("inbox: {err}")))?;
        let task = tokio::spawn(dispatch(subscription, self.pending.clone())).abort_handle();
        self.inbox = Some(Inbox {
            prefix: prefix.clone(),
            task,
        });
        Ok(prefix)
    }

    /// `req`: published here, in order with the connection's publishes;
    /// only the wait for the reply runs in a task.
    async fn request(&mut self, id: Id, frame: Inbound) -> Result<(), Refusal> {
        let config = &self.shared.config;
        if self.requests.len() >= config.max_requests_in_flight {
            return Err(Refusal::new(
                ErrorKind::Busy,
                format!(
                    "a connection may have {} requests waiting",
                    config.max_requests_in_flight
                ),
            ));
        }
        // `min` then `max`: no configured ceiling (even zero) can panic.
        let timeout = frame
            .timeout_ms
            .map_or(config.default_request_timeout, Duration::from_millis)
            .min(config.max_request_timeout)
            .max(Duration::from_millis(1));
        let (subject, _, headers, payload) = self.prepare(&frame, true)?;
        let inbox = self.inbox().await?;
        // Random, not counted: a service that saw this request's inbox
        // cannot answer the next one before its real answer.
        let token = random_id();
        let reply_to = Subject::new(&format!("{inbox}.{token}"))
            .map_err(|err| Refusal::new(ErrorKind::Internal, format!("inbox: {err}")))?;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(token.clone(), tx);
        let forget = Forget(self.pending.clone(), token);
        let heard = self
            .send((subject.clone(), Some(reply_to), headers, payload))
            .await?;
        if heard == 0 {
            return Err(Refusal::new(
                ErrorKind::TimedOut,
                format!("no responders for {subject}"),
            ));
        }
        let out = self.out.clone();
        self.requests.spawn(async move {
            let _forget = forget;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(reply)) => {
                    let body = Body::of(&reply);
                    let Some(room) = out.reserve(reply_len(&id, &body)).await else {
                        return;
                    };
                    room.send(Outbound::Reply { id: &id, body }.text());
                }
                // Timed out, or the inbox went (the connection is ending).
                _ => {
                    let refusal = Refusal::new(
                        ErrorKind::TimedOut,
                        format!("no reply to {subject} within {timeout:?}"),
                    );
                    out.send(frames::error(&refusal, Some(&id), None)).await;
                }
            }
        });
        Ok(())
    }
}

/// The most a `reply` frame's text takes: `{"op":"reply","id":`, the id
/// as JSON (a string of control characters escapes to six bytes each) and
/// `}`; the body counts its own comma.
fn reply_len(id: &Id, body: &Body<'_>) -> usize {
    let id_len = serde_json::to_string(id).map_or(0, |text| text.len());
    20 + id_len + body.len()
}

fn required<'a>(field: &'a Option<String>, name: &str) -> Result<&'a str, Refusal> {
    field
        .as_deref()
        .ok_or_else(|| Refusal::invalid(format!("missing field {name}")))
}

/// Counts a publish's latency as the remote host does.
fn record(counters: &courier_pubsub::remote::HostCounters, took: Duration) {
    let us = took.as_micros() as u64;
    let bucket = LATENCY_BUCKETS_US
        .iter()
        .position(|bound| us <= *bound)
        .unwrap_or(LATENCY_BUCKETS_US.len());
    counters.latency[bucket].fetch_add(1, Ordering::Relaxed);
    counters.latency_sum_us.fetch_add(us, Ordering::Relaxed);
}

/// Hands each reply on the connection's inbox to the request waiting for
/// it (the first reply wins; later ones, and any to a request no longer
/// waiting, are dropped).
async fn dispatch(mut inbox: courier_pubsub::Subscription, pending: Pending) {
    while let Some(Ok(event)) = inbox.recv().await {
        let Event::Message(reply) = event else {
            continue;
        };
        let token = reply.subject.as_str().rsplit('.').next().unwrap_or("");
        let waiting = lock(&pending).remove(token);
        if let Some(waiting) = waiting {
            let _ = waiting.send(reply);
        }
    }
}

/// Moves a subscription's messages into the writer's queue, reserving
/// each frame's room before building it. While the queue is full it takes
/// nothing, so the bus's buffer fills and its slow-consumer policy (drop
/// the oldest) drops and counts; the first gap after a delivered message
/// is told to the browser as one `Busy` error with the `sid`. Returns the
/// sid when the subscription ends by itself. With `skip_inboxes` (a
/// filter whose first token is a wildcard) messages to `_inbox.` subjects,
/// other requests' replies, are dropped, never given to the browser.
async fn forward(
    mut subscription: courier_pubsub::Subscription,
    sid: String,
    skip_inboxes: bool,
    out: Out,
) -> String {
    let mut reported = false;
    while let Some(Ok(event)) = subscription.recv().await {
        match event {
            Event::Message(message)
                if skip_inboxes && message.subject.as_str().starts_with("_inbox.") => {}
            Event::Message(message) => {
                reported = false;
                let body = Body::of(&message);
                let reply = message.reply_to.as_ref().map(Subject::as_str);
                // `{"op":"msg","sid":`, `,"subject":`, `,"reply":`, `}`.
                let len = 48
                    + json_len(&sid)
                    + json_len(message.subject.as_str())
                    + reply.map_or(0, json_len)
                    + body.len();
                let Some(room) = out.reserve(len).await else {
                    break;
                };
                room.send(
                    Outbound::Msg {
                        sid: &sid,
                        subject: message.subject.as_str(),
                        body,
                        reply,
                    }
                    .text(),
                );
            }
            Event::Gap { .. } | Event::Dropped { .. } if !reported => {
                reported = true;
                let refusal = Refusal::new(
                    ErrorKind::Busy,
                    format!(
                        "messages dropped: the browser reads too slowly ({} dropped so far)",
                        subscription.dropped()
                    ),
                );
                if !out.send(frames::error(&refusal, None, Some(&sid))).await {
                    break;
                }
            }
            _ => {}
        }
    }
    sid
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Second review: the reply frame's room was `96 + body`, too little
    /// for an id of 64 control characters (386 bytes of JSON).
    #[test]
    fn a_reply_is_never_longer_than_its_room() {
        let message = Message {
            subject: Subject::new("_inbox.a.b").unwrap(),
            payload: Bytes::from_static(b"tea"),
            publisher: 1,
            seq: 0,
            reply_to: None,
            headers: Headers::new(),
        };
        let ids = [
            Id::from("\u{1}".repeat(MAX_NAME_LEN)),
            Id::from("\"".repeat(MAX_NAME_LEN)),
            Id::from(u64::MAX),
            Id::from(i64::MIN),
            Id::from(""),
        ];
        for id in ids {
            let body = Body::of(&message);
            let room = reply_len(&id, &body);
            let text = Outbound::Reply { id: &id, body }.text();
            assert!(text.len() <= room, "{} > {room}: {text}", text.len());
        }
    }
}
