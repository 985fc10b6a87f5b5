//! One browser connection: the `connect` handshake, then a reader (the
//! browser's operations) and a writer (the only one who writes to the
//! socket) in one task, with each subscription and request forwarding into
//! the writer's bounded queue from a task the connection owns.
//!
//! Dropping the connection's future (the socket closed, shutdown's grace
//! ran out) drops its `JoinSet`s, which abort every subscription's
//! forwarder (dropping the subscription: it leaves the bus) and every
//! request still waiting.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use bytes::Bytes;
use courier_pubsub::remote::{PubSubService, LATENCY_BUCKETS_US};
use courier_pubsub::{Event, Filter, Headers, SlowConsumer, Subject, SubscribeOptions};
use courier_rpc::Secret;
use courier_wire::ErrorKind;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

use crate::config::MAX_NAME_LEN;
use crate::frames::{self, Body, Id, Inbound, Outbound, Refusal};
use crate::gateway::{ConnectionSlot, Shared};

/// Close codes (RFC 6455).
const NORMAL: u16 = 1000;
const GOING_AWAY: u16 = 1001;
const POLICY: u16 = 1008;
const TOO_BIG: u16 = 1009;
const TRY_AGAIN_LATER: u16 = 1013;

/// Runs one upgraded WebSocket to its end.
pub(crate) async fn run(mut socket: WebSocket, shared: Arc<Shared>) {
    let write_timeout = shared.config.write_timeout;
    let Some(_slot) = ConnectionSlot::take(&shared.live, shared.config.max_connections) else {
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
    let mut abort = shared.live.abort.subscribe();
    let mut closing = shared.live.closing.subscribe();
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
    // semaphore panic (both refuse capacities past their maximum).
    let frames = shared.config.outbound_messages.clamp(1, u32::MAX as usize);
    let max_bytes = shared.config.outbound_bytes.clamp(1, u32::MAX as usize);
    let (tx, rx) = mpsc::channel(frames);
    let out = Out {
        tx,
        bytes: Arc::new(Semaphore::new(max_bytes)),
        max_bytes,
    };
    let mut session = Session {
        publisher: shared.live.next_publisher.fetch_add(1, Ordering::Relaxed),
        shared: shared.clone(),
        identity,
        out: out.clone(),
        subscriptions: HashMap::new(),
        forwarders: JoinSet::new(),
        requests: JoinSet::new(),
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
        _ = crate::gateway::raised(&mut abort) => {}
    }
    // `session` (its subscriptions and requests) goes with this frame.
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
    let deadline = tokio::time::Instant::now() + shared.config.connect_timeout;
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

/// What the writer is given.
enum Frame {
    /// A text frame, holding its share of the byte bound until written.
    Text(String, OwnedSemaphorePermit),
    /// The last frame.
    Close(u16, String),
}

/// The writer's queue, bounded by frames and by bytes.
#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<Frame>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

impl Out {
    /// Queues `text`, waiting for room; `false` once the writer is gone.
    async fn send(&self, text: String) -> bool {
        // `max_bytes` fits a u32 (see `run`).
        let cost = text.len().clamp(1, self.max_bytes) as u32;
        let Ok(permit) = self.bytes.clone().acquire_many_owned(cost).await else {
            return false;
        };
        self.tx.send(Frame::Text(text, permit)).await.is_ok()
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
        let (message, last) = match frame {
            Frame::Text(text, _permit) => (WsMessage::Text(text.into()), false),
            Frame::Close(code, reason) => (close(code, &reason), true),
        };
        let written = tokio::time::timeout(write_timeout, async {
            sink.feed(message).await?;
            if last || rx.is_empty() {
                sink.flush().await?;
            }
            Ok::<_, axum::Error>(())
        })
        .await;
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
    publisher: u64,
    out: Out,
    /// sid → its forwarder.
    subscriptions: HashMap<String, AbortHandle>,
    forwarders: JoinSet<()>,
    requests: JoinSet<()>,
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
            // is live (requests count against their bound by this).
            while self.forwarders.try_join_next().is_some() {}
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
            match next {
                Some(Ok(WsMessage::Text(text))) => {
                    if !self.handle(text.as_str()).await {
                        return None;
                    }
                }
                Some(Ok(WsMessage::Binary(_))) => {
                    let refusal = Refusal::invalid("binary frames are not part of the protocol");
                    if !self.out.send(frames::error(&refusal, None, None)).await {
                        return None;
                    }
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                Some(Ok(WsMessage::Close(_))) | None => return Some((NORMAL, String::new())),
                Some(Err(err)) if is_too_large(&err) => {
                    let refusal = too_large_frame(self.shared.config.max_frame);
                    let _ = self.out.send(frames::error(&refusal, None, None)).await;
                    return Some((TOO_BIG, refusal.message));
                }
                Some(Err(err)) => {
                    tracing::debug!("reading from a browser: {err}");
                    return None;
                }
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
    /// an `id`), or an error (with the `sid`, for a subscription's).
    async fn operate(
        &mut self,
        id: Option<&Id>,
        frame: Inbound,
    ) -> Result<Option<String>, (Refusal, Option<String>)> {
        let ok = || Ok(id.map(|id| Outbound::Ok { id: Some(id) }.text()));
        match frame.op.as_str() {
            "sub" => {
                let sid = frame.sid.clone();
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
                self.request(id.clone(), frame).map_err(|r| (r, None))?;
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
        let forwarder =
            self.forwarders
                .spawn(forward(subscription, sid.to_string(), self.out.clone()));
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

    /// Stores a message in the durable subscriptions it matches, as the
    /// remote host does before delivering.
    async fn store(
        &self,
        message: &(Subject, Option<Subject>, Headers, Bytes),
    ) -> Result<(), Refusal> {
        let Some(durable) = &self.shared.durable else {
            return Ok(());
        };
        let counters = &self.shared.counters;
        match durable.store(std::slice::from_ref(message)).await {
            Ok(stored) => {
                counters.stored.fetch_add(stored as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(err) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::new(err.kind(), err.to_string()))
            }
        }
    }

    async fn publish(&mut self, frame: Inbound) -> Result<(), Refusal> {
        let started = Instant::now();
        let message = self.prepare(&frame, false)?;
        self.store(&message).await?;
        let (subject, reply, headers, payload) = message;
        let delivered = PubSubService::publish(
            &self.shared.host,
            self.publisher,
            subject.as_str().to_string(),
            reply.map(|r| r.as_str().to_string()),
            payload,
            headers,
        )
        .await
        .map_err(|err| Refusal::new(err.kind(), err.to_string()))?;
        let counters = &self.shared.counters;
        counters.published.fetch_add(1, Ordering::Relaxed);
        counters.delivered.fetch_add(delivered, Ordering::Relaxed);
        record(counters, started.elapsed());
        Ok(())
    }

    fn request(&mut self, id: Id, frame: Inbound) -> Result<(), Refusal> {
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
        let (subject, _, headers, payload) = self.prepare(&frame, true)?;
        let timeout = frame
            .timeout_ms
            .map_or(config.default_request_timeout, Duration::from_millis)
            .clamp(Duration::from_millis(1), config.max_request_timeout);
        let shared = self.shared.clone();
        let out = self.out.clone();
        self.requests.spawn(async move {
            let started = Instant::now();
            let message = (subject, None, headers, payload);
            // Stored as the host stores a request: with the inbox it goes
            // to (here the bus's own, chosen inside `request`), so without.
            if let Some(durable) = &shared.durable {
                match durable.store(std::slice::from_ref(&message)).await {
                    Ok(stored) => {
                        shared
                            .counters
                            .stored
                            .fetch_add(stored as u64, Ordering::Relaxed);
                    }
                    Err(err) => {
                        shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                        let refusal = Refusal::new(err.kind(), err.to_string());
                        out.send(frames::error(&refusal, Some(&id), None)).await;
                        return;
                    }
                }
            }
            let (subject, _, headers, payload) = message;
            let answer = shared
                .bus
                .request_with_headers(subject.as_str(), headers, payload, timeout)
                .await;
            let counters = &shared.counters;
            counters.published.fetch_add(1, Ordering::Relaxed);
            let text = match &answer {
                Ok(reply) => {
                    // The bus says only that someone answered: one delivery.
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                    Outbound::Reply {
                        id: &id,
                        subject: reply.subject.as_str(),
                        body: Body::of(reply),
                    }
                    .text()
                }
                Err(err) => {
                    if !matches!(err, courier_pubsub::BusError::NoResponders(_)) {
                        counters.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    let refusal = Refusal::new(err.kind(), err.to_string());
                    frames::error(&refusal, Some(&id), None)
                }
            };
            record(counters, started.elapsed());
            out.send(text).await;
        });
        Ok(())
    }
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

/// Moves a subscription's messages into the writer's queue. While the
/// queue is full it takes nothing, so the bus's buffer fills and its
/// slow-consumer policy (drop the oldest) drops and counts; the first
/// gap after a delivered message is told to the browser as one `Busy`
/// error with the `sid`.
async fn forward(mut subscription: courier_pubsub::Subscription, sid: String, out: Out) {
    let mut reported = false;
    while let Some(Ok(event)) = subscription.recv().await {
        let text = match event {
            Event::Message(message) => {
                reported = false;
                Outbound::Msg {
                    sid: &sid,
                    subject: message.subject.as_str(),
                    body: Body::of(&message),
                    reply: message.reply_to.as_ref().map(Subject::as_str),
                }
                .text()
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
                frames::error(&refusal, None, Some(&sid))
            }
            _ => continue,
        };
        if !out.send(text).await {
            return;
        }
    }
}
