//! Byte-stream links (TCP, Unix sockets): the preamble exchange, a writer
//! that coalesces frames from many tasks, and a bounded reader.

use std::io;
use std::sync::Mutex as SyncMutex;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use courier_wire::preamble::{self, PREAMBLE_LEN};
use courier_wire::{EncodeError, FrameCodec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex as AsyncMutex, MutexGuard};

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

struct Pending {
    buf: BytesMut,
    state: LinkState,
}

pub(crate) struct Writer {
    io: BoxWrite,
    /// Bytes taken from `pending` but not yet accepted by the socket. Kept
    /// here, not on a task's stack, so a cancelled send leaves the stream
    /// intact for the next writer.
    inflight: Bytes,
}

/// The sending side of a stream link.
///
/// Senders encode straight into one shared `pending` buffer (a short,
/// synchronous critical section). Whoever finds the socket free writes
/// everything pending in one `write` call and keeps going until `pending` is
/// empty; a sender that finds the socket busy returns at once and its frame
/// goes out with the current writer's next write. So one lone frame is
/// written immediately, and frames queued by many tasks at once share
/// syscalls. `pending` is bounded: past `high_water` bytes a sender waits for
/// the socket itself.
pub(crate) struct StreamWriter {
    codec: FrameCodec,
    high_water: usize,
    pending: SyncMutex<Pending>,
    writer: AsyncMutex<Writer>,
}

/// What a sender must still do after [`StreamWriter::push`].
pub(crate) enum Flush<'a> {
    /// It holds the socket: write everything pending.
    Locked(MutexGuard<'a, Writer>),
    /// The buffer is full and another task is writing: wait for the socket.
    Wait,
}

/// When an enqueued frame must reach the socket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Urgency {
    /// Before `send` returns, unless another task is writing (then with its next write).
    Now,
    /// Whenever the buffer fills or someone flushes.
    Later,
}

impl StreamWriter {
    pub(crate) fn new(io: BoxWrite, codec: FrameCodec, high_water: usize) -> StreamWriter {
        StreamWriter {
            codec,
            high_water: high_water.max(1),
            pending: SyncMutex::new(Pending {
                buf: BytesMut::with_capacity(8 * 1024),
                state: LinkState::Open,
            }),
            writer: AsyncMutex::new(Writer {
                io,
                inflight: Bytes::new(),
            }),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave `Pending` half-updated
        // in a way that matters (at worst a partly encoded frame, which the
        // codec never leaves behind), so a poisoned lock is still usable.
        self.pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Encodes a frame into the pending buffer with `encode`. Synchronous and
    /// cheap; returns what the caller must still do, if anything, to honour
    /// `urgency`: nothing (the frame waits for a flush, or a task already
    /// writing will take it), or [`StreamWriter::complete`] the returned
    /// [`Flush`].
    pub(crate) fn push(
        &self,
        urgency: Urgency,
        encode: impl FnOnce(&FrameCodec, &mut BytesMut) -> Result<(), EncodeError>,
    ) -> Result<Option<Flush<'_>>, SendError> {
        let over_high_water = {
            let mut pending = self.pending();
            pending.state.check()?;
            encode(&self.codec, &mut pending.buf)?;
            pending.buf.len() >= self.high_water
        };
        if urgency == Urgency::Later && !over_high_water {
            return Ok(None);
        }
        match self.writer.try_lock() {
            Ok(guard) => Ok(Some(Flush::Locked(guard))),
            // Another task is writing and will take our bytes before it lets go.
            Err(_) if !over_high_water => Ok(None),
            Err(_) => Ok(Some(Flush::Wait)),
        }
    }

    /// Does the I/O that [`StreamWriter::push`] asked for.
    pub(crate) async fn complete(&self, flush: Flush<'_>) -> Result<(), SendError> {
        let guard = match flush {
            Flush::Locked(guard) => guard,
            Flush::Wait => self.writer.lock().await,
        };
        self.drain(guard).await
    }

    #[cfg(test)]
    async fn enqueue(
        &self,
        urgency: Urgency,
        encode: impl FnOnce(&FrameCodec, &mut BytesMut) -> Result<(), EncodeError>,
    ) -> Result<(), SendError> {
        match self.push(urgency, encode)? {
            Some(flush) => self.complete(flush).await,
            None => Ok(()),
        }
    }

    /// Enqueues without waiting: for control frames sent from places that
    /// must not block (pong replies). Returns whether a flush is needed.
    pub(crate) fn enqueue_nowait(
        &self,
        encode: impl FnOnce(&FrameCodec, &mut BytesMut) -> Result<(), EncodeError>,
    ) -> Result<(), SendError> {
        let mut pending = self.pending();
        pending.state.check()?;
        encode(&self.codec, &mut pending.buf)?;
        Ok(())
    }

    /// Writes everything pending.
    pub(crate) async fn flush(&self) -> Result<(), SendError> {
        let guard = self.writer.lock().await;
        self.drain(guard).await
    }

    /// Refuses further frames, writes everything pending, then shuts the
    /// write direction down so the peer sees a clean end of stream.
    pub(crate) async fn close(&self) -> Result<(), SendError> {
        {
            let mut pending = self.pending();
            if let LinkState::Open = pending.state {
                pending.state = LinkState::Closed;
            }
        }
        let mut guard = self.writer.lock().await;
        self.write_pending(&mut guard).await?;
        guard.io.shutdown().await.map_err(|err| self.fail(err))
    }

    /// Writes until `pending` is empty, releases the socket, and takes it back
    /// if frames arrived in between and nobody else took it.
    async fn drain(&self, mut guard: MutexGuard<'_, Writer>) -> Result<(), SendError> {
        loop {
            self.write_pending(&mut guard).await?;
            drop(guard);
            if self.pending().buf.is_empty() {
                return Ok(());
            }
            match self.writer.try_lock() {
                Ok(next) => guard = next,
                Err(_) => return Ok(()),
            }
        }
    }

    async fn write_pending(&self, writer: &mut Writer) -> Result<(), SendError> {
        loop {
            if writer.inflight.is_empty() {
                let mut pending = self.pending();
                if pending.buf.is_empty() {
                    break;
                }
                writer.inflight = pending.buf.split().freeze();
            }
            while !writer.inflight.is_empty() {
                match writer.io.write(&writer.inflight).await {
                    Ok(0) => return Err(self.fail(io::ErrorKind::WriteZero.into())),
                    Ok(n) => writer.inflight.advance(n),
                    Err(err) => return Err(self.fail(err)),
                }
            }
            // Let go of the written buffer, so `pending` can reuse its
            // allocation instead of allocating a new one for every batch.
            writer.inflight = Bytes::new();
        }
        writer.io.flush().await.map_err(|err| self.fail(err))
    }

    /// Refuses every later send with `kind` and `reason` and drops what is
    /// queued: for a peer that broke the protocol. Follow with
    /// [`StreamWriter::shutdown`] so the peer sees the end.
    pub(crate) fn refuse(&self, kind: io::ErrorKind, reason: &str) {
        let mut pending = self.pending();
        pending.state = LinkState::Failed(kind, reason.to_string());
        pending.buf.clear();
    }

    /// Shuts the write direction down without writing anything more.
    pub(crate) async fn shutdown(&self) {
        let mut writer = self.writer.lock().await;
        writer.inflight = Bytes::new();
        let _ = writer.io.shutdown().await;
    }

    /// Marks the link broken so every later send reports why.
    fn fail(&self, err: io::Error) -> SendError {
        let mut pending = self.pending();
        pending.state = LinkState::Failed(err.kind(), err.to_string());
        pending.buf.clear();
        SendError::Io(err)
    }
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
        Ok(self.codec.decode_frame(&mut self.buf)?)
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

    #[tokio::test]
    async fn frames_queued_while_the_socket_is_busy_share_one_write() {
        let writes = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Gate::default());
        let data = Arc::new(SyncMutex::new(Vec::new()));
        let sink = CountingSink {
            writes: writes.clone(),
            gate: gate.clone(),
            data: data.clone(),
        };
        let codec = FrameCodec::new();
        let writer = Arc::new(StreamWriter::new(Box::new(sink), codec, 1 << 20));

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
}
