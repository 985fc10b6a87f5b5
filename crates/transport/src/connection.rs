//! A framed, full-duplex connection and its two halves.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use courier_wire::{EncodeError, Frame, FrameCodec, FrameKind};
use serde::Serialize;
use tokio::time::Instant;

use crate::mem::{MemReader, MemWriter};
use crate::stream::{StreamReader, StreamWriter, Urgency};
use crate::udp::{UdpReader, UdpWriter};
use crate::{Address, Heartbeat, RecvError, SendError};

pub(crate) enum SendLink {
    Stream(StreamWriter),
    Mem(MemWriter),
    Udp(UdpWriter),
}

pub(crate) enum RecvLink {
    Stream(StreamReader),
    Mem(MemReader),
    Udp(UdpReader),
}

impl RecvLink {
    /// A frame (or the end) that is already buffered; `None` when waiting
    /// is needed. Synchronous, so a buffered frame costs no async machinery.
    fn try_recv(&mut self) -> Option<Result<Option<Frame>, RecvError>> {
        match self {
            RecvLink::Stream(reader) => reader.try_recv().transpose().map(|r| r.map(Some)),
            RecvLink::Mem(reader) => reader.try_recv().map(Ok),
            RecvLink::Udp(_) => None,
        }
    }

    async fn recv(&mut self) -> Result<Option<Frame>, RecvError> {
        match self {
            RecvLink::Stream(reader) => reader.recv().await,
            RecvLink::Mem(reader) => Ok(reader.recv().await),
            RecvLink::Udp(reader) => reader.recv().await,
        }
    }
}

/// State shared by every clone of a [`FrameSender`].
struct SenderShared {
    link: SendLink,
    /// The largest frame the peer accepts, when it said so and it is lower
    /// than our own limit (see [`FrameSender::limit_frame_size`]).
    peer_limit: AtomicUsize,
    /// Set when heartbeats are on: when the last frame went out.
    idle: Option<IdleClock>,
}

/// Tracks the time of the last send, cheaply, for the heartbeat task.
struct IdleClock {
    born: Instant,
    last_send_nanos: AtomicU64,
}

impl IdleClock {
    fn touch(&self) {
        let nanos = self.born.elapsed().as_nanos() as u64;
        self.last_send_nanos.store(nanos, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last_send_nanos.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }
}

impl SenderShared {
    async fn send(&self, frame: Frame, urgency: Urgency) -> Result<(), SendError> {
        match &self.link {
            SendLink::Mem(writer) => {
                let limit = self.peer_limit.load(Ordering::Relaxed);
                if frame.body_len() > limit {
                    return Err(SendError::FrameTooLarge {
                        size: frame.body_len(),
                        limit,
                    });
                }
                if writer.push(frame, urgency)? {
                    Box::pin(writer.flush()).await?;
                }
                self.touch();
                Ok(())
            }
            _ => {
                self.send_encoded(urgency, |codec, buf| codec.encode_frame(&frame, buf))
                    .await
            }
        }
    }

    /// Encodes straight into the link's send buffer. The common case (a
    /// frame appended while no I/O is due) is synchronous; the I/O, when
    /// due, runs in a boxed future, so the future of every send stays small
    /// and cheap to create.
    async fn send_encoded(
        &self,
        urgency: Urgency,
        encode: impl FnOnce(&FrameCodec, &mut BytesMut) -> Result<(), EncodeError>,
    ) -> Result<(), SendError> {
        // The peer's limit, when lower than ours, is checked by the same
        // encoder, so an oversized frame is refused before any I/O.
        let peer_limit = self.peer_limit.load(Ordering::Relaxed);
        let encode = move |codec: &FrameCodec, buf: &mut BytesMut| {
            if peer_limit < codec.limit() {
                encode(&codec.max_frame_size(peer_limit), buf)
            } else {
                encode(codec, buf)
            }
        };
        match &self.link {
            SendLink::Stream(writer) => {
                if let Some(position) = writer.push(urgency, encode)? {
                    Box::pin(writer.wait_written(position)).await?;
                }
            }
            SendLink::Udp(writer) => Box::pin(writer.send(encode)).await?,
            SendLink::Mem(writer) => {
                // In-process frames are values: encode, then take the frame
                // back out of the bytes (no copy of the payload).
                let codec = writer.codec();
                let mut buf = BytesMut::new();
                encode(&codec, &mut buf)?;
                let frame = codec
                    .decode_frame(&mut buf)
                    .map_err(|err| SendError::Io(std::io::Error::other(err)))?
                    .expect("a whole frame was just encoded");
                if writer.push(frame, urgency)? {
                    Box::pin(writer.flush()).await?;
                }
            }
        }
        self.touch();
        Ok(())
    }

    fn touch(&self) {
        if let Some(idle) = &self.idle {
            idle.touch();
        }
    }

    /// Closes a link whose peer broke the protocol: later sends fail, and
    /// the peer sees the connection end. Only stream links can see invalid
    /// frames (UDP discards them; in-process frames are never decoded).
    fn abort_invalid(&self) {
        if let SendLink::Stream(writer) = &self.link {
            writer.abort(
                std::io::ErrorKind::InvalidData,
                "peer sent an invalid frame",
            );
        }
    }

    /// Sends a control frame (a pong, a heartbeat ping) without ever
    /// waiting or spawning: if the link has no room for it right now (the
    /// peer is not reading), it is dropped. What a peer can make us queue
    /// by sending pings is therefore bounded by the send buffer.
    fn send_control(&self, kind: FrameKind, id: u64) {
        let frame = Frame::new(kind, id, Bytes::new());
        match &self.link {
            SendLink::Mem(writer) => writer.try_send(frame),
            SendLink::Stream(writer) => {
                writer.try_control(|codec, buf| codec.encode_frame(&frame, buf));
            }
            SendLink::Udp(writer) => writer.try_send(&frame),
        }
    }
}

/// The sending half of a [`Connection`]. Cheap to clone; clones share one
/// link and may send from different tasks at once.
///
/// Frames from one task arrive in the order that task sent them. `Ok` from
/// [`FrameSender::send`] means the frame was handed to the link: written to
/// the socket, or queued for the link's writer (a task that owns the
/// socket's write side and writes, in order, whatever the socket could not
/// take at once), placed in the in-process channel, or sent as a datagram.
/// It does **not** mean the peer received it; the messaging layer's
/// acknowledgements say that. Cancelling a send (dropping its future) never
/// strands another task's frame: nothing but the writer waits on the socket.
///
/// When every clone is dropped the link is closed: what is still queued is
/// written for up to [`TransportConfig::linger`](crate::TransportConfig::linger),
/// then discarded. [`FrameSender::close`] or [`FrameSender::flush`] wait for
/// it instead; [`FrameSender::abort`] discards it at once.
#[derive(Clone)]
pub struct FrameSender {
    shared: Arc<SenderShared>,
}

impl std::fmt::Debug for FrameSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSender").finish_non_exhaustive()
    }
}

impl FrameSender {
    /// Sends one frame now (see the type's docs for what `Ok` means). Waits
    /// only when the link's buffer is full. An oversized frame is refused
    /// before any I/O and the connection stays usable.
    pub async fn send(&self, frame: Frame) -> Result<(), SendError> {
        self.shared.send(frame, Urgency::Now).await
    }

    /// Queues one frame without writing it yet, so that many frames share
    /// one syscall; it is written when the buffer fills, or by the next
    /// [`send`](Self::send) or [`flush`](Self::flush). For streaming many
    /// frames: `feed` each, then `flush` once. On datagram and in-process
    /// links this is the same as `send`.
    pub async fn feed(&self, frame: Frame) -> Result<(), SendError> {
        self.shared.send(frame, Urgency::Later).await
    }

    /// Sends a frame whose payload is `value` encoded with postcard. On
    /// stream links the value is serialized straight into the send buffer.
    pub async fn send_message<T: Serialize + ?Sized>(
        &self,
        kind: FrameKind,
        id: u64,
        value: &T,
    ) -> Result<(), SendError> {
        self.shared
            .send_encoded(Urgency::Now, |codec, buf| {
                codec.encode_message(kind, id, value, buf)
            })
            .await
    }

    /// [`send_message`](Self::send_message) with flags (the upper layers'
    /// bits, [`Flags::USER_MASK`](courier_wire::Flags::USER_MASK)).
    pub async fn send_message_with_flags<T: Serialize + ?Sized>(
        &self,
        kind: FrameKind,
        flags: courier_wire::Flags,
        id: u64,
        value: &T,
    ) -> Result<(), SendError> {
        self.shared
            .send_encoded(Urgency::Now, |codec, buf| {
                codec.encode_message_with_flags(kind, flags, id, value, buf)
            })
            .await
    }

    /// Writes every queued frame to the link.
    pub async fn flush(&self) -> Result<(), SendError> {
        match &self.shared.link {
            SendLink::Stream(writer) => writer.flush().await,
            SendLink::Mem(writer) => writer.flush().await,
            SendLink::Udp(_) => Ok(()),
        }
    }

    /// Gives up on the peer: refuses further frames, discards everything
    /// queued and closes the sending direction at once, without waiting for
    /// the peer to read anything. For a peer that stopped reading (frozen,
    /// half-open, hostile) when [`close`](Self::close) would wait for it.
    /// The peer sees the connection end, possibly in the middle of a frame.
    pub fn abort(&self) {
        match &self.shared.link {
            SendLink::Stream(writer) => {
                writer.abort(std::io::ErrorKind::ConnectionAborted, "connection aborted")
            }
            SendLink::Mem(writer) => writer.abort(),
            SendLink::Udp(writer) => writer.close(),
        }
    }

    /// Tells the peer we are alive without waiting: sends a pong nobody
    /// asked for (peers absorb pongs, and any frame counts as life for
    /// their heartbeat), or nothing if the send buffer is full. For a side
    /// that stops reading for a while (backpressure), and so stops
    /// answering pings, while it is busy rather than dead.
    pub fn keepalive(&self) {
        self.shared.send_control(FrameKind::Pong, 0);
    }

    /// Bytes queued on this connection and not yet accepted by the socket
    /// (stream links; 0 on other links, which queue frames, not bytes).
    /// Bounded by [`TransportConfig::send_buffer`](crate::TransportConfig::send_buffer)
    /// plus one frame per waiting sender, whatever the peer does.
    pub fn buffered_bytes(&self) -> usize {
        match &self.shared.link {
            SendLink::Stream(writer) => writer.buffered(),
            _ => 0,
        }
    }

    /// Pongs and pings not sent because the send buffer was full: the peer
    /// was not reading what we sent. Always 0 on non-stream links.
    pub fn dropped_control_frames(&self) -> u64 {
        match &self.shared.link {
            SendLink::Stream(writer) => writer.dropped_control(),
            _ => 0,
        }
    }

    /// Lowers the largest frame this connection sends to `limit` (the
    /// peer's, when it announced one): larger frames are then refused with
    /// [`SendError::FrameTooLarge`] before any I/O, naming `limit`, and the
    /// connection stays usable. A `limit` above the configured
    /// [`max_frame_size`](crate::TransportConfig::max_frame_size) changes
    /// nothing.
    pub fn limit_frame_size(&self, limit: usize) {
        self.shared.peer_limit.store(limit, Ordering::Relaxed);
    }

    /// The largest frame this connection sends (header and payload, after
    /// the length prefix): the configured limit, or the peer's if lower.
    pub fn max_frame_size(&self) -> usize {
        let own = match &self.shared.link {
            SendLink::Stream(writer) => writer.codec_limit(),
            SendLink::Mem(writer) => writer.codec().limit(),
            SendLink::Udp(writer) => writer.codec_limit(),
        };
        own.min(self.shared.peer_limit.load(Ordering::Relaxed))
    }

    /// Closes the sending direction gracefully: refuses further frames,
    /// writes everything queued, then signals end of stream to the peer,
    /// which sees `Ok(None)` from `recv` after the last frame. Waits for the
    /// peer to take what is queued; bound it with a timeout and fall back
    /// to [`abort`](Self::abort) for a peer that may have stopped reading.
    pub async fn close(&self) -> Result<(), SendError> {
        match &self.shared.link {
            SendLink::Stream(writer) => writer.close().await,
            SendLink::Mem(writer) => writer.close().await,
            SendLink::Udp(writer) => {
                writer.close();
                Ok(())
            }
        }
    }
}

/// The receiving half of a [`Connection`].
///
/// Pings are answered and pongs absorbed here; neither is returned.
pub struct FrameReceiver {
    link: RecvLink,
    /// For answering pings without keeping the sending half alive.
    pong: Weak<SenderShared>,
    dead_after: Option<Duration>,
    last_heard: Instant,
    peer: Option<Address>,
    identity: Option<Arc<str>>,
}

impl std::fmt::Debug for FrameReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReceiver")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl FrameReceiver {
    /// The next frame; `Ok(None)` when the peer closed the connection cleanly.
    ///
    /// Cancel-safe: if the future is dropped before it completes, no frame is
    /// lost. With heartbeats on, fails with [`RecvError::PeerSilent`] when
    /// nothing arrived for the configured timeout. After an error the
    /// connection should be dropped.
    pub async fn recv(&mut self) -> Result<Option<Frame>, RecvError> {
        loop {
            let next = match self.link.try_recv() {
                Some(next) => next,
                None => Box::pin(self.wait()).await,
            };
            if let Some(outcome) = self.absorb(next) {
                return outcome;
            }
        }
    }

    /// A frame that has already arrived, without waiting: `None` when
    /// nothing is buffered (then [`recv`](Self::recv) would wait), otherwise
    /// what `recv` would return. Lets a consumer process everything a read
    /// brought in, then flush its replies once.
    pub fn try_recv(&mut self) -> Option<Result<Option<Frame>, RecvError>> {
        loop {
            let next = self.link.try_recv()?;
            if let Some(outcome) = self.absorb(next) {
                return Some(outcome);
            }
        }
    }

    /// What both `recv` and `try_recv` do with what the link produced:
    /// close a connection whose peer broke the protocol, note liveness,
    /// answer pings and absorb pongs (`None`: keep reading).
    fn absorb(
        &mut self,
        next: Result<Option<Frame>, RecvError>,
    ) -> Option<Result<Option<Frame>, RecvError>> {
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => return Some(Ok(None)),
            Err(err) => {
                if let RecvError::Decode(reason) = &err {
                    tracing::warn!(peer = ?self.peer, %reason, "peer sent an invalid frame; closing");
                    if let Some(sender) = self.pong.upgrade() {
                        sender.abort_invalid();
                    }
                }
                return Some(Err(err));
            }
        };
        if self.dead_after.is_some() {
            self.last_heard = Instant::now();
        }
        match frame.kind {
            FrameKind::Ping => {
                if let Some(sender) = self.pong.upgrade() {
                    sender.send_control(FrameKind::Pong, frame.id);
                }
                None
            }
            FrameKind::Pong => None,
            _ => Some(Ok(Some(frame))),
        }
    }

    /// Waits for the link, within the heartbeat timeout if there is one.
    async fn wait(&mut self) -> Result<Option<Frame>, RecvError> {
        let Some(after) = self.dead_after else {
            return self.link.recv().await;
        };
        match tokio::time::timeout_at(self.last_heard + after, self.link.recv()).await {
            Ok(next) => next,
            Err(_) => {
                tracing::debug!(peer = ?self.peer, ?after, "peer silent, giving up on it");
                Err(RecvError::PeerSilent { after })
            }
        }
    }

    /// Datagrams discarded on this connection because they failed their
    /// checksum, were malformed or oversized. Always 0 on stream and
    /// in-process links, where such input ends the connection instead.
    pub fn discarded_datagrams(&self) -> u64 {
        match &self.link {
            RecvLink::Udp(reader) => reader.discarded(),
            _ => 0,
        }
    }

    /// The peer's address, where the transport knows it.
    pub fn peer_addr(&self) -> Option<&Address> {
        self.peer.as_ref()
    }

    /// Who the peer proved to be: under mutual TLS, the identity in its
    /// verified certificate; `None` otherwise.
    pub fn peer_identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }
}

/// A framed, full-duplex connection, the same for every transport.
///
/// Use it whole from one task, or [`split`](Connection::split) it into a
/// [`FrameSender`] (cloneable) and a [`FrameReceiver`] for separate tasks.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> anyhow::Result<()> {
/// use courier_transport::{bind, connect, Address, Frame, TransportConfig};
///
/// let config = TransportConfig::default();
/// let mut listener = bind(&"tcp://127.0.0.1:0".parse()?, &config).await?;
/// let address = listener.local_addr().clone();
/// tokio::spawn(async move {
///     let mut conn = listener.accept().await.unwrap();
///     while let Ok(Some(frame)) = conn.recv().await {
///         conn.send(frame).await.unwrap(); // echo
///     }
/// });
///
/// let mut conn = connect(&address, &config).await?;
/// conn.send(Frame::data(1, &b"hello"[..])).await?;
/// let echo = conn.recv().await?.expect("an echo");
/// assert_eq!(&echo.payload[..], b"hello");
/// # Ok(()) }
/// ```
pub struct Connection {
    sender: FrameSender,
    receiver: FrameReceiver,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.receiver.peer)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Assembles a connection from its links; starts the heartbeat task when
    /// configured. Must be called within a tokio runtime.
    pub(crate) fn new(
        send: SendLink,
        recv: RecvLink,
        heartbeat: Option<Heartbeat>,
        peer: Option<Address>,
    ) -> Connection {
        let now = Instant::now();
        let shared = Arc::new(SenderShared {
            link: send,
            peer_limit: AtomicUsize::new(usize::MAX),
            idle: heartbeat.map(|_| IdleClock {
                born: now,
                last_send_nanos: AtomicU64::new(0),
            }),
        });
        if let Some(heartbeat) = heartbeat {
            tokio::spawn(send_pings(Arc::downgrade(&shared), heartbeat.interval));
        }
        let receiver = FrameReceiver {
            link: recv,
            pong: Arc::downgrade(&shared),
            dead_after: heartbeat.map(|h| h.timeout),
            last_heard: now,
            peer,
            identity: None,
        };
        Connection {
            sender: FrameSender { shared },
            receiver,
        }
    }

    /// See [`FrameSender::send`].
    pub async fn send(&self, frame: Frame) -> Result<(), SendError> {
        self.sender.send(frame).await
    }

    /// See [`FrameSender::feed`].
    pub async fn feed(&self, frame: Frame) -> Result<(), SendError> {
        self.sender.feed(frame).await
    }

    /// See [`FrameSender::send_message`].
    pub async fn send_message<T: Serialize + ?Sized>(
        &self,
        kind: FrameKind,
        id: u64,
        value: &T,
    ) -> Result<(), SendError> {
        self.sender.send_message(kind, id, value).await
    }

    /// See [`FrameSender::flush`].
    pub async fn flush(&self) -> Result<(), SendError> {
        self.sender.flush().await
    }

    /// See [`FrameReceiver::recv`].
    pub async fn recv(&mut self) -> Result<Option<Frame>, RecvError> {
        self.receiver.recv().await
    }

    /// See [`FrameReceiver::try_recv`].
    pub fn try_recv(&mut self) -> Option<Result<Option<Frame>, RecvError>> {
        self.receiver.try_recv()
    }

    /// A sending handle that can be moved to another task.
    pub fn sender(&self) -> FrameSender {
        self.sender.clone()
    }

    /// The two halves, for use from different tasks.
    pub fn split(self) -> (FrameSender, FrameReceiver) {
        (self.sender, self.receiver)
    }

    /// The peer's address, where the transport knows it.
    pub fn peer_addr(&self) -> Option<&Address> {
        self.receiver.peer_addr()
    }

    /// See [`FrameReceiver::peer_identity`].
    pub fn peer_identity(&self) -> Option<&str> {
        self.receiver.peer_identity()
    }

    pub(crate) fn set_identity(&mut self, identity: Option<String>) {
        self.receiver.identity = identity.map(Arc::from);
    }

    /// See [`FrameReceiver::discarded_datagrams`].
    pub fn discarded_datagrams(&self) -> u64 {
        self.receiver.discarded_datagrams()
    }

    /// Flushes what is queued, ends the sending direction, and drops the
    /// connection.
    pub async fn close(self) -> Result<(), SendError> {
        self.sender.close().await
    }
}

/// Sends a ping whenever the link has been idle for `interval`. Holds only a
/// weak reference, so it ends when the last sender is dropped.
async fn send_pings(shared: Weak<SenderShared>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let idle = shared
            .idle
            .as_ref()
            .map_or(Duration::MAX, IdleClock::idle_for);
        if idle < interval {
            continue;
        }
        sequence += 1;
        // Never waits: a ping that finds the buffer full is skipped (the
        // link is not idle then, only slow), so no ping is ever cancelled
        // half-written either.
        shared.send_control(FrameKind::Ping, sequence);
        shared.touch();
    }
}
