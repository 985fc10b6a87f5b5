//! Byte-stream links (TCP, Unix sockets): the preamble exchange, a writer
//! that coalesces frames from many tasks, and a bounded reader.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex as SyncMutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use courier_wire::preamble::{self, PREAMBLE_LEN};
use courier_wire::{EncodeError, FrameCodec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::{HandshakeError, RecvError, SendError};

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Sync + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Smallest read the receiver asks the socket for.
const READ_CHUNK: usize = 64 * 1024;

/// Sends our preamble and checks the peer's, within `limit`. Both sides write
/// first, so neither waits for the other.
pub(crate) async fn exchange_preamble<S>(
    stream: &mut S,
    limit: Duration,
) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        stream.write_all(&preamble::preamble()).await?;
        stream.flush().await?;
        let mut theirs = [0u8; PREAMBLE_LEN];
        stream.read_exact(&mut theirs).await?;
        preamble::check(&theirs)?;
        Ok(())
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(limit))?
}

/// When an enqueued frame must reach the socket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Urgency {
    /// Before `send` returns if the socket takes it at once; otherwise the
    /// writer's driver writes it as soon as the socket has room.
    Now,
    /// Whenever the buffer fills or someone flushes.
    Later,
}

/// Whether the link still takes frames.
#[derive(Debug)]
enum LinkState {
    Open,
    Closed,
    Failed(io::ErrorKind, String),
}

impl LinkState {
    fn check(&self) -> Result<(), SendError> {
        match self {
            LinkState::Open => Ok(()),
            LinkState::Closed => Err(SendError::Closed),
            LinkState::Failed(kind, message) => {
                Err(SendError::Io(io::Error::new(*kind, message.clone())))
            }
        }
    }
}

/// What senders share, under a short synchronous lock.
struct Pending {
    buf: BytesMut,
    state: LinkState,
    /// Bytes ever appended to `buf`: the position a sender waits for.
    enqueued: u64,
    /// `close` was called: write what is queued, then shut the socket down.
    close: bool,
    /// Drop everything and close the socket now (`abort`, a protocol breach).
    abort: bool,
    /// Every handle is gone: finish what is queued within the linger, then close.
    gone: bool,
    /// Pongs not queued because the peer was not reading (see `try_control`).
    dropped_control: u64,
}

/// The socket, locked only synchronously (never across an `.await`), so no
/// task's cancellation can leave it half-written.
struct Socket {
    /// `None` once the driver has ended: the socket is closed.
    io: Option<BoxWrite>,
    /// Bytes taken from `pending` but not yet accepted by the socket.
    inflight: Bytes,
    /// Bytes taken from `pending` so far (`inflight` included).
    taken: u64,
    /// Written bytes the socket has not been asked to flush yet.
    unflushed: bool,
    /// The driver task is waiting for the socket to become writable: only it
    /// may poll the socket then, or the socket would wake another task's
    /// waker and the driver would never hear of it.
    driver_waiting: bool,
}

/// How far the writer has got, for tasks waiting on it.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    /// Bytes written and flushed (a position in `Pending::enqueued`).
    done: u64,
    /// The writer has stopped: shut down cleanly, failed or aborted.
    ended: bool,
}

struct WriterShared {
    codec: FrameCodec,
    high_water: usize,
    linger: Duration,
    pending: SyncMutex<Pending>,
    socket: SyncMutex<Socket>,
    /// Wakes the driver: new bytes a sender could not write itself, a close,
    /// an abort, the last handle dropped.
    wake: Notify,
    progress: watch::Sender<Progress>,
}

/// The sending side of a stream link.
///
/// One owner writes the socket: a driver task, spawned with the link, that
/// holds it until the link closes. Senders encode straight into one shared
/// `pending` buffer (a short, synchronous critical section) and, on the fast
/// path, write it to the socket themselves without waiting, as long as the
/// socket takes it at once (one `write` for everything pending, so frames
/// queued by many tasks share syscalls). Whatever the socket does not take
/// at once is the driver's to write. Since no sender ever holds the socket
/// across an `.await`, a cancelled send cannot strand anyone's frame: every
/// byte in `pending` is either written by the fast path of a later sender or
/// by the driver, which nothing cancels but an abort, the link failing, or
/// the linger after the last handle is dropped.
///
/// `pending` is bounded: past `high_water` bytes a sender waits until its own
/// frame has been written. Control frames (pongs, pings) are never waited
/// for: past `high_water` they are not queued at all.
pub(crate) struct StreamWriter {
    shared: Arc<WriterShared>,
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        self.shared.lock_pending().gone = true;
        self.shared.wake.notify_one();
    }
}

impl StreamWriter {
    /// A writer for `io`, with its driver task (so must be called within a
    /// tokio runtime).
    pub(crate) fn new(
        io: BoxWrite,
        codec: FrameCodec,
        high_water: usize,
        linger: Duration,
    ) -> StreamWriter {
        let shared = Arc::new(WriterShared {
            codec,
            high_water: high_water.max(1),
            linger,
            pending: SyncMutex::new(Pending {
                buf: BytesMut::with_capacity(8 * 1024),
                state: LinkState::Open,
                enqueued: 0,
                close: false,
                abort: false,
                gone: false,
                dropped_control: 0,
            }),
            socket: SyncMutex::new(Socket {
                io: Some(io),
                inflight: Bytes::new(),
                taken: 0,
                unflushed: false,
                driver_waiting: false,
            }),
            wake: Notify::new(),
            progress: watch::Sender::new(Progress::default()),
        });
        tokio::spawn(drive(shared.clone()));
        StreamWriter { shared }
    }

    /// Encodes a frame into the pending buffer with `encode` and, when
    /// `urgency` says so, writes what is pending if the socket takes it at
    /// once. Synchronous. Returns a position to
    /// [`wait_written`](Self::wait_written) for when the buffer is past its
    /// high-water mark (the sender must wait for the socket), else `None`:
    /// the frame is written, or will be, with no further help from the caller.
    pub(crate) fn push(
        &self,
        urgency: Urgency,
        encode: impl FnOnce(&FrameCodec, &mut BytesMut) -> Result<(), EncodeError>,
    ) -> Result<Option<u64>, SendError> {
        let shared = &*self.shared;
        let (end, over_high_water) = {
            let mut pending = shared.lock_pending();
            pending.state.check()?;
            let before = pending.buf.len();
            encode(&shared.codec, &mut pending.buf)?;
            pending.enqueued += (pending.buf.len() - before) as u64;
            (pending.enqueued, pending.buf.len() >= shared.high_water)
        };
        if urgency == Urgency::Later && !over_high_water {
            return Ok(None);
        }
        shared.write_now();
        if over_high_water && shared.progress.borrow().done < end {
            return Ok(Some(end));
        }
        Ok(None)
    }

    #[cfg(test)]
    async fn enqueue(
        &self,
        urgency: Urgency,
        encode: impl FnOnce(&FrameCodec, &mut BytesMut) -> Result<(), EncodeError>,
    ) -> Result<(), SendError> {
        match self.push(urgency, encode)? {
            Some(position) => self.wait_written(position).await,
            None => Ok(()),
        }
    }

    /// Waits until everything up to `position` is written, or the link ends.
    pub(crate) async fn wait_written(&self, position: u64) -> Result<(), SendError> {
        let mut progress = self.shared.progress.subscribe();
        let reached = match progress.wait_for(|p| p.done >= position || p.ended).await {
            Ok(p) => p.done >= position,
            Err(_) => false,
        };
        if reached {
            Ok(())
        } else {
            self.shared.lock_pending().state.check()?;
            Err(SendError::Closed)
        }
    }

    /// Queues a control frame (a pong or a ping) without ever waiting: when
    /// the peer is not reading and the buffer is past its high-water mark,
    /// the frame is dropped (and counted) instead. A peer that does not read
    /// is a slow consumer; answering each of its pings would let it grow our
    /// memory without bound, and a ping it never reads the answer to needs
    /// no answer.
    pub(crate) fn try_control(
        &self,
        encode: impl FnOnce(&FrameCodec, &mut BytesMut) -> Result<(), EncodeError>,
    ) -> bool {
        let shared = &*self.shared;
        {
            let mut pending = shared.lock_pending();
            if pending.state.check().is_err() {
                return false;
            }
            // Counting what the socket has not taken yet, not only what is
            // still in `pending`, so the bound is the send buffer itself.
            let unwritten = pending.enqueued - shared.progress.borrow().done;
            if unwritten >= shared.high_water as u64 {
                pending.dropped_control += 1;
                return false;
            }
            let before = pending.buf.len();
            if encode(&shared.codec, &mut pending.buf).is_err() {
                return false;
            }
            pending.enqueued += (pending.buf.len() - before) as u64;
        }
        shared.write_now();
        true
    }

    /// Writes everything pending.
    pub(crate) async fn flush(&self) -> Result<(), SendError> {
        let target = {
            let pending = self.shared.lock_pending();
            pending.state.check()?;
            pending.enqueued
        };
        self.shared.write_now();
        self.wait_written(target).await
    }

    /// Refuses further frames, writes everything pending, then shuts the
    /// write direction down so the peer sees a clean end of stream.
    pub(crate) async fn close(&self) -> Result<(), SendError> {
        {
            let mut pending = self.shared.lock_pending();
            if let LinkState::Open = pending.state {
                pending.state = LinkState::Closed;
            }
            pending.close = true;
        }
        self.shared.wake.notify_one();
        let mut progress = self.shared.progress.subscribe();
        let _ = progress.wait_for(|p| p.ended).await;
        match &self.shared.lock_pending().state {
            LinkState::Failed(kind, message) => {
                Err(SendError::Io(io::Error::new(*kind, message.clone())))
            }
            _ => Ok(()),
        }
    }

    /// Refuses every later send with `kind` and `reason`, drops what is
    /// queued and closes the socket without writing anything more: for a
    /// peer that broke the protocol, or a peer given up on.
    pub(crate) fn abort(&self, kind: io::ErrorKind, reason: &str) {
        {
            let mut pending = self.shared.lock_pending();
            if !matches!(pending.state, LinkState::Failed(..)) {
                pending.state = LinkState::Failed(kind, reason.to_string());
            }
            pending.buf.clear();
            pending.abort = true;
        }
        self.shared.wake.notify_one();
    }

    /// The codec's frame limit.
    pub(crate) fn codec_limit(&self) -> usize {
        self.shared.codec.limit()
    }

    /// Bytes queued and not yet written and flushed to the socket.
    pub(crate) fn buffered(&self) -> usize {
        let enqueued = self.shared.lock_pending().enqueued;
        let done = self.shared.progress.borrow().done;
        enqueued.saturating_sub(done) as usize
    }

    /// Control frames (pongs, pings) dropped because the peer was not reading.
    pub(crate) fn dropped_control(&self) -> u64 {
        self.shared.lock_pending().dropped_control
    }
}

impl WriterShared {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave `Pending` half-updated
        // in a way that matters (at worst a partly encoded frame, which the
        // codec never leaves behind), so a poisoned lock is still usable.
        self.pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The fast path: writes what is pending from the caller's task if the
    /// socket is free and takes it at once; otherwise leaves it to the driver.
    fn write_now(&self) {
        let mut cx = Context::from_waker(Waker::noop());
        let handed_over = match self.socket.try_lock() {
            Ok(mut socket) if !socket.driver_waiting => {
                match self.poll_write_pending(&mut socket, &mut cx) {
                    Poll::Ready(_) => false,
                    Poll::Pending => {
                        // Polled with a waker nobody listens to: the driver
                        // must poll again with its own.
                        socket.driver_waiting = true;
                        true
                    }
                }
            }
            // The driver is waiting on the socket, or someone is writing
            // right now and may already have looked at `pending`.
            _ => true,
        };
        if handed_over {
            self.wake.notify_one();
        }
    }

    /// Writes `pending` until it is empty (and flushed) or the socket is full.
    fn poll_write_pending(
        &self,
        socket: &mut Socket,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ()>> {
        if socket.io.is_none() {
            // The driver has ended; the link's state already says why.
            self.lock_pending().buf.clear();
            return Poll::Ready(Err(()));
        }
        loop {
            if socket.inflight.is_empty() {
                let mut pending = self.lock_pending();
                if pending.buf.is_empty() {
                    break;
                }
                socket.inflight = pending.buf.split().freeze();
                socket.taken += socket.inflight.len() as u64;
            }
            while !socket.inflight.is_empty() {
                let io = socket.io.as_mut().expect("checked above");
                match Pin::new(io).poll_write(cx, &socket.inflight) {
                    Poll::Ready(Ok(0)) => return self.fail(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => {
                        socket.inflight.advance(n);
                        socket.unflushed = true;
                    }
                    Poll::Ready(Err(err)) => return self.fail(err),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // Let go of the written buffer, so `pending` can reuse its
            // allocation instead of allocating a new one for every batch.
            socket.inflight = Bytes::new();
            if let Poll::Ready(Err(err)) = self.poll_flush(socket, cx) {
                return self.fail(err);
            }
        }
        match self.poll_flush(socket, cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(err)) => self.fail(err),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Flushes what was written and, once flushed, publishes the progress.
    fn poll_flush(&self, socket: &mut Socket, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let (true, Some(io)) = (socket.unflushed, socket.io.as_mut()) {
            std::task::ready!(Pin::new(io).poll_flush(cx))?;
            socket.unflushed = false;
        }
        let done = socket.taken - socket.inflight.len() as u64;
        self.progress.send_if_modified(|p| {
            let changed = p.done != done;
            p.done = done;
            changed
        });
        Poll::Ready(Ok(()))
    }

    /// Marks the link broken so every later send reports why.
    fn fail(&self, err: io::Error) -> Poll<Result<(), ()>> {
        {
            let mut pending = self.lock_pending();
            if !matches!(pending.state, LinkState::Failed(..)) {
                pending.state = LinkState::Failed(err.kind(), err.to_string());
            }
            pending.buf.clear();
        }
        self.end();
        Poll::Ready(Err(()))
    }

    fn end(&self) {
        self.progress.send_modify(|p| p.ended = true);
    }
}

/// The writer's driver: owns the socket's write side for the life of the
/// link, writing what senders could not write at once.
async fn drive(shared: Arc<WriterShared>) {
    let mut linger_until: Option<Instant> = None;
    loop {
        let notified = shared.wake.notified();
        tokio::pin!(notified);
        // Registered before the flags are read, so a wake-up in between is kept.
        notified.as_mut().enable();
        let (abort, close, gone) = {
            let pending = shared.lock_pending();
            (pending.abort, pending.close, pending.gone)
        };
        if abort {
            // Dropping the socket closes it; nothing more is written.
            break;
        }
        if gone && linger_until.is_none() {
            linger_until = Some(Instant::now() + shared.linger);
        }
        let write = std::future::poll_fn(|cx| {
            let mut socket = lock(&shared.socket);
            let outcome = shared.poll_write_pending(&mut socket, cx);
            socket.driver_waiting = outcome.is_pending();
            outcome
        });
        tokio::select! {
            written = write => match written {
                Ok(()) if close || gone => {
                    // Everything queued is written: end the stream cleanly,
                    // within the linger if nobody is left to wait for it.
                    let shutdown = std::future::poll_fn(|cx| match &mut lock(&shared.socket).io {
                        Some(io) => Pin::new(io).poll_shutdown(cx),
                        None => Poll::Ready(Ok(())),
                    });
                    let limit = linger_until.unwrap_or_else(|| Instant::now() + shared.linger);
                    if let Ok(Err(err)) = tokio::time::timeout_at(limit, shutdown).await {
                        let _ = shared.fail(err);
                    }
                    break;
                }
                // Idle until there is more to do.
                Ok(()) => notified.await,
                Err(()) => break,
            },
            () = &mut notified => {}
            () = sleep_until_some(linger_until) => {
                tracing::debug!(linger = ?shared.linger, "the peer did not take queued bytes in time; closing");
                let _ = shared.fail(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "queued bytes were not written within the linger",
                ));
                break;
            }
        }
    }
    {
        let mut pending = shared.lock_pending();
        pending.buf.clear();
        if let LinkState::Open = pending.state {
            pending.state = LinkState::Closed;
        }
    }
    shared.end();
    // Closes the socket now, whoever still holds a handle.
    let io = {
        let mut socket = lock(&shared.socket);
        socket.inflight = Bytes::new();
        socket.io.take()
    };
    drop(io);
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(mutex: &SyncMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// The receiving side of a stream link.
pub(crate) struct StreamReader {
    io: BoxRead,
    buf: BytesMut,
    codec: FrameCodec,
}

impl StreamReader {
    pub(crate) fn new(io: BoxRead, codec: FrameCodec) -> StreamReader {
        StreamReader {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            codec,
        }
    }

    /// A frame already buffered, if there is one. Synchronous, so the common
    /// case of a read that brought many frames costs no async machinery.
    pub(crate) fn try_recv(&mut self) -> Result<Option<courier_wire::Frame>, RecvError> {
        let frame = self.codec.decode_frame(&mut self.buf)?;
        if let Some(frame) = &frame {
            // Frames are slices of the read buffer, and payloads decoded
            // from them may be slices too (`courier_wire::shared`): a
            // small frame read into the tail of a buffer grown for a large
            // one would keep that whole allocation alive. So after a large
            // frame, or once the buffer has grown, what follows moves to a
            // buffer of the usual size (at most one read's worth copied).
            if frame.payload.len() > READ_CHUNK || self.buf.capacity() > 2 * READ_CHUNK {
                self.rehome();
            }
        }
        Ok(frame)
    }

    /// Moves the buffered bytes to a fresh buffer of [`READ_CHUNK`].
    fn rehome(&mut self) {
        let mut fresh = BytesMut::with_capacity(READ_CHUNK.max(self.buf.len()));
        fresh.extend_from_slice(&self.buf);
        self.buf = fresh;
    }

    /// The next frame, `None` at a clean end of stream. Cancel-safe: bytes
    /// read before a cancellation stay buffered.
    pub(crate) async fn recv(&mut self) -> Result<Option<courier_wire::Frame>, RecvError> {
        loop {
            if let Some(frame) = self.try_recv()? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(RecvError::UnexpectedEof {
                        buffered: self.buf.len(),
                    })
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use courier_wire::Frame;

    use super::*;

    /// A gate that holds writes until opened.
    #[derive(Default)]
    struct Gate {
        open: std::sync::atomic::AtomicBool,
        waker: SyncMutex<Option<std::task::Waker>>,
    }

    impl Gate {
        fn open(&self) {
            self.open.store(true, Ordering::SeqCst);
            if let Some(waker) = self.waker.lock().unwrap().take() {
                waker.wake();
            }
        }
    }

    /// A sink that counts write calls and blocks until its gate opens.
    struct CountingSink {
        writes: Arc<AtomicUsize>,
        gate: Arc<Gate>,
        data: Arc<SyncMutex<Vec<u8>>>,
    }

    impl AsyncWrite for CountingSink {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if !self.gate.open.load(Ordering::SeqCst) {
                *self.gate.waker.lock().unwrap() = Some(cx.waker().clone());
                if !self.gate.open.load(Ordering::SeqCst) {
                    return Poll::Pending;
                }
            }
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.data.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A writer over a sink that counts its writes, keeps what it is given
    /// and blocks in `write` until its gate opens.
    #[allow(clippy::type_complexity)]
    fn gated_writer(
        high_water: usize,
    ) -> (
        Arc<StreamWriter>,
        Arc<AtomicUsize>,
        Arc<Gate>,
        Arc<SyncMutex<Vec<u8>>>,
    ) {
        let writes = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Gate::default());
        let data = Arc::new(SyncMutex::new(Vec::new()));
        let sink = CountingSink {
            writes: writes.clone(),
            gate: gate.clone(),
            data: data.clone(),
        };
        let writer = StreamWriter::new(
            Box::new(sink),
            FrameCodec::new(),
            high_water,
            Duration::from_secs(5),
        );
        (Arc::new(writer), writes, gate, data)
    }

    #[tokio::test]
    async fn frames_queued_while_the_socket_is_busy_share_one_write() {
        let (writer, writes, gate, data) = gated_writer(1 << 20);
        let codec = FrameCodec::new();

        // The first sender takes the socket and blocks in `write`.
        let first = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .enqueue(Urgency::Now, |c, b| {
                        c.encode_frame(&Frame::data(0, &b"x"[..]), b)
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        // 100 more senders find it busy and return at once, frames queued.
        for id in 1..=100u64 {
            writer
                .enqueue(Urgency::Now, |c, b| {
                    c.encode_frame(&Frame::data(id, &b"x"[..]), b)
                })
                .await
                .unwrap();
        }
        gate.open();
        first.await.unwrap().unwrap();
        writer.flush().await.unwrap();

        assert!(
            writes.load(Ordering::SeqCst) <= 2,
            "{} writes",
            writes.load(Ordering::SeqCst)
        );
        let mut bytes = BytesMut::from(&data.lock().unwrap()[..]);
        let mut ids = Vec::new();
        while let Some(frame) = codec.decode_frame(&mut bytes).unwrap() {
            ids.push(frame.id);
        }
        assert_eq!(ids, (0..=100).collect::<Vec<_>>(), "all frames, in order");
    }

    #[tokio::test]
    async fn small_frames_after_a_large_one_do_not_share_its_allocation() {
        let codec = FrameCodec::new().max_frame_size(4 << 20);
        let mut wire = BytesMut::new();
        let big = Frame::data(1, Bytes::from(vec![7u8; READ_CHUNK * 3 / 2]));
        codec.encode_frame(&big, &mut wire).unwrap();
        for id in 2..100 {
            codec
                .encode_frame(&Frame::data(id, &b"small"[..]), &mut wire)
                .unwrap();
        }
        let mut reader = StreamReader::new(Box::new(std::io::Cursor::new(wire.to_vec())), codec);
        let large = reader.recv().await.unwrap().unwrap();
        assert_eq!(large.payload.len(), READ_CHUNK * 3 / 2);
        let span =
            large.payload.as_ptr() as usize..large.payload.as_ptr() as usize + large.payload.len();
        // Held, like a payload a subscriber keeps: every later frame lives
        // in a buffer of the usual size, not in the large frame's.
        for id in 2..100 {
            let small = reader.recv().await.unwrap().unwrap();
            assert_eq!((small.id, &small.payload[..]), (id, &b"small"[..]));
            // Without the move they would sit right after it in memory.
            let at = small.payload.as_ptr() as usize;
            assert!(
                !(span.end..span.end + 2 * READ_CHUNK).contains(&at),
                "frame {id}"
            );
            assert!(
                reader.buf.capacity() <= 2 * READ_CHUNK,
                "{}",
                reader.buf.capacity()
            );
        }
        assert!(reader.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_sender_cancelled_mid_write_strands_no_frame() {
        // A small buffer, so the first sender waits for the socket itself.
        let (writer, _writes, gate, data) = gated_writer(100);
        let codec = FrameCodec::new();
        let big = Frame::data(1, vec![7u8; 1000]);
        let first = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .enqueue(Urgency::Now, |c, b| c.encode_frame(&big, b))
                    .await
            }
        });
        tokio::task::yield_now().await;
        // The second sender finds the socket busy; its frame is queued.
        writer
            .enqueue(Urgency::Now, |c, b| {
                c.encode_frame(&Frame::data(2, &b"small"[..]), b)
            })
            .await
            .unwrap();
        // The first sender is cancelled mid-write.
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        gate.open();
        // Nobody sends or flushes again: both frames still arrive.
        let mut ids = Vec::new();
        for _ in 0..1000 {
            let mut bytes = BytesMut::from(&data.lock().unwrap()[..]);
            ids.clear();
            while let Some(frame) = codec.decode_frame(&mut bytes).unwrap() {
                ids.push(frame.id);
            }
            if ids.len() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(ids, vec![1, 2]);
    }
}
