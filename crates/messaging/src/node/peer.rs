//! The client side: one [`PeerDriver`] task per peer, owning the
//! connection to it (made lazily, remade with backoff), the [`Outbox`] of
//! unacknowledged messages and the [`Requests`] table, fed by a bounded
//! queue of [`Command`]s from the node's senders.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier_transport::{
    connect, Address, Backoff, Frame, FrameKind, FrameReceiver, FrameSender, TransportConfig,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::config::NodeConfig;
use super::delivery::Progress;
use crate::error::{RequestError, SendErrorKind};
use crate::protocol::{self, Hello, Rejection, ABOUT_REQUEST};
use crate::{NodeId, Outbox, OutboxEvent, Requests};

pub(super) enum Command {
    Send {
        rest: Bytes,
        reliable: bool,
        deadline: Instant,
        done: Option<oneshot::Sender<Result<Progress, SendErrorKind>>>,
    },
    Request {
        payload: Bytes,
        deadline: Instant,
        reply: oneshot::Sender<Result<Bytes, RequestError>>,
    },
    Drain(oneshot::Sender<()>),
}

type AckWaiter = Option<oneshot::Sender<Result<Progress, SendErrorKind>>>;

/// A connection attempt (connect and hello) under way, polled by the
/// driver's loop beside everything else so that deadlines, drains and
/// incoming commands are served while it lasts.
type Connecting =
    Pin<Box<dyn Future<Output = Result<(FrameSender, FrameReceiver), String>> + Send>>;

/// Work that needs a connection, held while one is being made.
enum Unsent {
    /// A request already in the `Requests` table (so its deadline runs).
    Request { id: u64, payload: Bytes },
    /// An at-most-once message.
    Unreliable { payload: Bytes, done: AckWaiter },
}

/// Owns everything about one peer: the connection (made lazily, remade
/// after failures with backoff), the outbox of unacknowledged messages and
/// the table of requests awaiting replies.
pub(super) struct PeerDriver {
    address: Address,
    config: NodeConfig,
    hello: Hello,
    epoch: Instant,
    outbox: Outbox,
    waiting: HashMap<u64, AckWaiter>,
    /// Why the peer refused a message, until its outcome is reported.
    rejections: HashMap<u64, Rejection>,
    requests: Requests<oneshot::Sender<Result<Bytes, RequestError>>>,
    connection: Option<(FrameSender, FrameReceiver)>,
    connecting: Option<Connecting>,
    /// Requests and at-most-once messages waiting for `connecting`; bounded
    /// by `max_in_flight` (commands are not read while it is full).
    unsent: Vec<Unsent>,
    backoff: Backoff,
    next_attempt: Instant,
    last_error: String,
    drains: Vec<oneshot::Sender<()>>,
    unfinished: Arc<AtomicUsize>,
    /// At-most-once messages fed but not yet flushed.
    unflushed: Vec<AckWaiter>,
}

impl PeerDriver {
    pub(super) fn new(
        address: Address,
        config: NodeConfig,
        hello: Hello,
        unfinished: Arc<AtomicUsize>,
    ) -> PeerDriver {
        let now = Instant::now();
        PeerDriver {
            outbox: Outbox::new(config.max_in_flight, config.retry),
            requests: Requests::new(config.max_requests),
            backoff: Backoff::new(config.reconnect.0, config.reconnect.1, hello.incarnation),
            waiting: HashMap::new(),
            rejections: HashMap::new(),
            connection: None,
            connecting: None,
            unsent: Vec::new(),
            next_attempt: now,
            last_error: String::new(),
            drains: Vec::new(),
            unfinished,
            unflushed: Vec::new(),
            epoch: now,
            address,
            config,
            hello,
        }
    }

    fn clock(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.epoch)
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            if self.outbox.in_flight() > 0 {
                self.start_connecting();
            }
            self.transmit().await;
            self.settle();
            let wake = self.next_wake();
            tokio::select! {
                command = commands.recv(), if self.has_room() => match command {
                    Some(command) => {
                        self.handle(command).await;
                        // Take everything else already queued in the same
                        // turn, so its frames share one flush.
                        while self.has_room() {
                            let Ok(command) = commands.try_recv() else { break };
                            self.handle(command).await;
                        }
                        self.flush_unreliable().await;
                    }
                    None => return,
                },
                frame = recv(&mut self.connection) => {
                    self.receive(frame);
                    while let Some(frame) = self.connection.as_mut().and_then(|(_, receiver)| receiver.try_recv()) {
                        self.receive(frame);
                    }
                }
                outcome = connecting(&mut self.connecting) => {
                    self.connecting = None;
                    self.connected(outcome).await;
                }
                _ = sleep_until(wake) => {}
            }
            let now = self.clock(Instant::now());
            self.outbox.handle_timeout(now);
        }
    }

    /// Whether another command may be taken: the outbox, the request table
    /// and the work waiting for a connection all have room.
    fn has_room(&self) -> bool {
        self.outbox.has_room()
            && self.requests.len() < self.config.max_requests
            && self.unsent.len() < self.config.max_in_flight.max(1)
    }

    /// The next time a timer needs attention. Without a connection,
    /// retransmission timers do not count (there is nothing to send on):
    /// only deadlines and the next reconnection attempt do.
    fn next_wake(&self) -> Option<Instant> {
        let outbox = match self.connection {
            Some(_) => self.outbox.poll_timeout(),
            None => self.outbox.next_deadline(),
        };
        let mut wake = [outbox, self.requests.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .map(|t| self.epoch + t);
        if self.connection.is_none() && self.connecting.is_none() && self.outbox.in_flight() > 0 {
            wake = Some(wake.map_or(self.next_attempt, |w| w.min(self.next_attempt)));
        }
        wake
    }

    /// Starts a connection attempt unless one is open or under way, or the
    /// backoff says not yet. Returns whether a connection is open or coming.
    fn start_connecting(&mut self) -> bool {
        if self.connection.is_some() || self.connecting.is_some() {
            return true;
        }
        if Instant::now() < self.next_attempt {
            return false;
        }
        let (address, config, hello) = (
            self.address.clone(),
            self.config.transport.clone(),
            self.hello,
        );
        self.connecting = Some(Box::pin(
            async move { open(&address, &config, hello).await },
        ));
        true
    }

    /// The end of a connection attempt: on success everything waiting for
    /// it is written; on failure it is refused and the backoff grows.
    async fn connected(&mut self, outcome: Result<(FrameSender, FrameReceiver), String>) {
        match outcome {
            Ok(connection) => {
                let sender = connection.0.clone();
                self.connection = Some(connection);
                self.backoff.reset();
                let now = self.clock(Instant::now());
                self.outbox.retransmit_all(now);
                let mut failed = None;
                for unsent in std::mem::take(&mut self.unsent) {
                    match unsent {
                        // Skip requests that expired while we waited.
                        Unsent::Request { id, payload } if self.requests.contains(id) => {
                            if let Err(err) = sender
                                .feed(Frame::new(FrameKind::Request, id, payload))
                                .await
                            {
                                failed = Some(err.to_string());
                                break;
                            }
                        }
                        Unsent::Request { .. } => {}
                        Unsent::Unreliable { payload, done } => {
                            let frame =
                                Frame::new(FrameKind::Data, 0, protocol::data_payload(0, &payload));
                            if let Err(err) = sender.feed(frame).await {
                                if let Some(done) = done {
                                    let _ =
                                        done.send(Err(SendErrorKind::Unavailable(err.to_string())));
                                }
                                failed = Some(err.to_string());
                                break;
                            }
                            self.unflushed.push(done);
                        }
                    }
                }
                if failed.is_none() {
                    if let Err(err) = sender.flush().await {
                        failed = Some(err.to_string());
                    }
                }
                if let Some(reason) = failed {
                    self.fail_unsent(&reason);
                    self.disconnect(reason);
                }
                self.flush_unreliable().await;
            }
            Err(reason) => {
                tracing::debug!(peer = %self.address, %reason, "connect failed");
                self.fail_unsent(&reason);
                self.last_error = reason;
                self.next_attempt = Instant::now() + self.backoff.next_delay();
            }
        }
    }

    /// Refuses everything that was waiting for a connection.
    fn fail_unsent(&mut self, reason: &str) {
        for unsent in std::mem::take(&mut self.unsent) {
            match unsent {
                Unsent::Request { id, .. } => {
                    if let Some(reply) = self.requests.complete(id) {
                        let _ = reply.send(Err(RequestError::Unavailable(reason.to_string())));
                    }
                }
                Unsent::Unreliable { done, .. } => {
                    if let Some(done) = done {
                        let _ = done.send(Err(SendErrorKind::Unavailable(reason.to_string())));
                    }
                }
            }
        }
    }

    fn disconnect(&mut self, reason: String) {
        tracing::debug!(peer = %self.address, %reason, "connection lost");
        self.connection = None;
        self.last_error = reason.clone();
        // Replies to requests in flight can no longer arrive.
        for (_, reply) in self.requests.drain() {
            let _ = reply.send(Err(RequestError::PeerDead(reason.clone())));
        }
        self.next_attempt = Instant::now();
    }

    /// Puts every due message on the wire.
    async fn transmit(&mut self) {
        let Some((sender, _)) = &self.connection else {
            return;
        };
        let sender = sender.clone();
        let now = self.clock(Instant::now());
        let mut wrote = false;
        while let Some(t) = self.outbox.poll_transmit(now) {
            let frame = Frame::new(
                FrameKind::Data,
                t.seq,
                protocol::data_payload(t.low_water, &t.payload),
            );
            if let Err(err) = sender.feed(frame).await {
                self.disconnect(err.to_string());
                return;
            }
            wrote = true;
        }
        if wrote {
            if let Err(err) = sender.flush().await {
                self.disconnect(err.to_string());
            }
        }
    }

    /// Reports outcomes and expiries, and answers drains that are complete.
    fn settle(&mut self) {
        while let Some(event) = self.outbox.poll_event() {
            let (seq, outcome) = match event {
                OutboxEvent::Acked { seq, .. } => (seq, Ok(Progress::Acknowledged)),
                OutboxEvent::Rejected { seq, .. } => {
                    (seq, Err(SendErrorKind::Rejected(self.rejection(seq))))
                }
                OutboxEvent::Expired { seq, .. } => {
                    (seq, Err(SendErrorKind::Expired(self.last_error.clone())))
                }
            };
            if let Some(Some(done)) = self.waiting.remove(&seq) {
                let _ = done.send(outcome);
            }
        }
        let now = self.clock(Instant::now());
        while let Some((_, reply)) = self.requests.poll_expired(now) {
            let _ = reply.send(Err(RequestError::Timeout));
        }
        let unfinished = self.outbox.in_flight() + self.requests.len() + self.unsent.len();
        self.unfinished.store(unfinished, Ordering::Relaxed);
        if unfinished == 0 {
            for drain in self.drains.drain(..) {
                let _ = drain.send(());
            }
        }
    }

    fn rejection(&mut self, seq: u64) -> Rejection {
        self.rejections
            .remove(&seq)
            .unwrap_or(Rejection::Malformed {
                reason: "refused".into(),
            })
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Send {
                rest,
                reliable: true,
                deadline,
                done,
            } => {
                let now = self.clock(Instant::now());
                match self.outbox.push(rest, now, self.clock(deadline)) {
                    Ok(seq) => {
                        self.waiting.insert(seq, done);
                    }
                    // Not reached: commands are read only while there is room.
                    Err(_) => {
                        if let Some(done) = done {
                            let _ = done.send(Err(SendErrorKind::Full));
                        }
                    }
                }
            }
            Command::Send {
                rest,
                reliable: false,
                done,
                ..
            } => {
                let Some((sender, _)) = &self.connection else {
                    if self.start_connecting() {
                        self.unsent.push(Unsent::Unreliable {
                            payload: rest,
                            done,
                        });
                    } else if let Some(done) = done {
                        let _ = done.send(Err(SendErrorKind::Unavailable(self.last_error.clone())));
                    }
                    return;
                };
                let frame = Frame::new(FrameKind::Data, 0, protocol::data_payload(0, &rest));
                match sender.feed(frame).await {
                    // Reported as written once the batch is flushed.
                    Ok(()) => self.unflushed.push(done),
                    Err(err) => {
                        let reason = err.to_string();
                        self.disconnect(reason.clone());
                        if let Some(done) = done {
                            let _ = done.send(Err(SendErrorKind::Unavailable(reason)));
                        }
                    }
                }
            }
            Command::Request {
                payload,
                deadline,
                reply,
            } => {
                if !self.start_connecting() {
                    let _ = reply.send(Err(RequestError::Unavailable(self.last_error.clone())));
                    return;
                }
                let id = match self.requests.start(reply, self.clock(deadline)) {
                    Ok(id) => id,
                    Err(reply) => {
                        let _ = reply.send(Err(RequestError::Full));
                        return;
                    }
                };
                let Some((sender, _)) = &self.connection else {
                    // Sent once the connection is made; the deadline runs.
                    self.unsent.push(Unsent::Request { id, payload });
                    return;
                };
                if let Err(err) = sender
                    .send(Frame::new(FrameKind::Request, id, payload))
                    .await
                {
                    if let Some(reply) = self.requests.complete(id) {
                        let _ = reply.send(Err(RequestError::Unavailable(err.to_string())));
                    }
                    self.disconnect(err.to_string());
                }
            }
            Command::Drain(done) => self.drains.push(done),
        }
    }

    /// Flushes at-most-once messages fed this turn and reports them written.
    async fn flush_unreliable(&mut self) {
        if self.unflushed.is_empty() {
            return;
        }
        let outcome = match &self.connection {
            Some((sender, _)) => sender
                .flush()
                .await
                .map(|()| Progress::Written)
                .map_err(|err| SendErrorKind::Unavailable(err.to_string())),
            None => Err(SendErrorKind::Unavailable(self.last_error.clone())),
        };
        if let (Err(SendErrorKind::Unavailable(reason)), Some(_)) = (&outcome, &self.connection) {
            let reason = reason.clone();
            self.disconnect(reason);
        }
        for done in self.unflushed.drain(..).flatten() {
            let _ = done.send(outcome.clone());
        }
    }

    fn receive(&mut self, frame: Result<Option<Frame>, courier_transport::RecvError>) {
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return self.disconnect("peer closed the connection".into()),
            Err(err) => return self.disconnect(err.to_string()),
        };
        match frame.kind {
            FrameKind::Ack => self.outbox.handle_ack(frame.id),
            FrameKind::Response => {
                if let Some(reply) = self.requests.complete(frame.id) {
                    let _ = reply.send(Ok(frame.payload));
                }
            }
            FrameKind::Error => {
                let rejection =
                    protocol::decode_body::<Rejection>(&frame.payload).unwrap_or_else(|err| {
                        Rejection::Malformed {
                            reason: format!("undecodable refusal: {err}"),
                        }
                    });
                if frame.flags.contains(ABOUT_REQUEST) {
                    if let Some(reply) = self.requests.complete(frame.id) {
                        let _ = reply.send(Err(RequestError::Rejected(rejection)));
                    }
                } else {
                    self.rejections.insert(frame.id, rejection);
                    self.outbox.handle_reject(frame.id);
                }
            }
            _ => {}
        }
    }
}

async fn recv(
    connection: &mut Option<(FrameSender, FrameReceiver)>,
) -> Result<Option<Frame>, courier_transport::RecvError> {
    match connection {
        Some((_, receiver)) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// The outcome of the connection attempt under way; pending without one.
/// Cancel-safe: the attempt lives in the driver, not in this future.
async fn connecting(
    attempt: &mut Option<Connecting>,
) -> Result<(FrameSender, FrameReceiver), String> {
    match attempt {
        Some(attempt) => attempt.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Connects and exchanges hellos.
async fn open(
    address: &Address,
    config: &TransportConfig,
    hello: Hello,
) -> Result<(FrameSender, FrameReceiver), String> {
    let connection = connect(address, config)
        .await
        .map_err(|err| err.to_string())?;
    let (sender, mut receiver) = connection.split();
    sender
        .send_message(FrameKind::Hello, 0, &hello)
        .await
        .map_err(|err| err.to_string())?;
    let reply = tokio::time::timeout(config.handshake_timeout, receiver.recv())
        .await
        .map_err(|_| {
            format!(
                "{address} did not answer the hello within {:?}",
                config.handshake_timeout
            )
        })?
        .map_err(|err| err.to_string())?
        .ok_or_else(|| format!("{address} closed the connection during the hello"))?;
    match reply.kind {
        FrameKind::Hello => {
            let theirs: Hello = protocol::decode_body(&reply.payload)
                .map_err(|err| format!("bad hello from {address}: {err}"))?;
            if theirs.node == hello.node {
                return Err(format!(
                    "{address} has this node's own id {}",
                    NodeId::from_u128(hello.node)
                ));
            }
            Ok((sender, receiver))
        }
        FrameKind::Error => {
            let rejection: Rejection =
                protocol::decode_body(&reply.payload).map_err(|err| err.to_string())?;
            Err(format!("{address} refused the connection: {rejection}"))
        }
        other => Err(format!(
            "{address} answered the hello with a {other:?} frame"
        )),
    }
}
