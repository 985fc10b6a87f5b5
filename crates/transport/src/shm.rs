//! `shm://name`: processes on one machine exchange frames through shared
//! memory instead of the kernel's socket path.
//!
//! **Rendezvous.** A listener binds a Unix socket (the control socket) at
//! [`control_path`]. For each connection the listener creates two ring
//! files under `/dev/shm` (one per direction, mode 0600, `O_EXCL`), tells
//! the client their names over the control socket, waits for the client to
//! map them, and unlinks them: from then on the memory lives exactly as long
//! as the two processes keep it mapped, and nothing is left behind however
//! either side ends.
//!
//! **Rings.** Each ring is a single-producer, single-consumer byte pipe: a
//! header page (the producer's `tail`, the consumer's `head`, a "reader
//! sleeping" and a "writer waiting" flag, and the CPU each half was last
//! polled on, each on its own cache line) and a power-of-two data area. Frames go through it as the same length-prefixed
//! bytes as on TCP, so the codec, the coalescing writer, heartbeats and
//! every limit are shared with the stream transports; a frame larger than
//! the ring simply passes in pieces. A full ring makes the writer wait
//! (backpressure); nothing is dropped.
//!
//! **Waiting.** A side that finds nothing to do (an empty ring to read, a
//! full one to write) must never hold its thread: on a current-thread
//! runtime every other task would stall behind it, and a peer on the same
//! CPU could not run to produce what it waits for. So nothing here spins or
//! yields inside a poll. Each half publishes, in its ring's header, the CPU
//! it was last polled on (`sched_getcpu`), and reads where the peer's
//! opposite half was last polled:
//!
//! - **Same CPU, or either CPU unknown:** no spinning at all. The side
//!   raises its flag ("reader sleeping" / "writer waiting"), looks at the
//!   ring once more, and returns `Pending`, so the thread goes back to its
//!   runtime and, if nothing else is ready, the kernel runs the peer.
//! - **Another CPU:** waiting costs the peer nothing, and a busy peer's
//!   reply is usually a microsecond away, far less than a sleep and a
//!   wake-up across CPUs (tens of microseconds on small VMs). The wait is
//!   a *cooperative spin*: the side returns `Pending` and asks to be polled
//!   again after the runtime's other ready tasks and its I/O and timers
//!   (what `tokio::task::yield_now` does), looking at the ring on each poll,
//!   for at most [`crate::TransportConfig::shm_spin`] from the first empty
//!   look. Then it sleeps as above. Any progress resets the budget.
//!
//! The other side, seeing the flag after it moved data, sends a one-byte
//! doorbell over the control socket. Raising the flag and then looking
//! again, while the other side publishes its index and then looks at the
//! flag (both sequentially consistent), means one of them always sees the
//! other: no wake-up is lost. An idle connection costs no CPU.
//!
//! The CPU slots are hints written by the peer: any value in them only
//! chooses between two correct ways of waiting. `sched_getcpu` comes from
//! `libc`, this crate's one direct use of it (tokio already depends on it).
//!
//! **Cost on one CPU.** There, every round trip is two sleeps and two
//! wake-ups through the kernel, as on a Unix socket: a thread parked in its
//! runtime's `epoll_wait` can only be woken by an event on a descriptor, so
//! the ring saves the copies, not the wake-ups, and the round trip stays
//! close to a Unix socket's. An eventfd would be a cheaper doorbell than a
//! byte on the control socket, but it would have to be shared with the
//! peer, and a peer that clears `O_NONBLOCK` on the shared file (and fills
//! its count) could then block our thread in `read` or `write`; a socket
//! end is ours alone, and `try_write` on it never blocks.
//!
//! **Failure.** The control socket is also the liveness signal: a peer that
//! exits or is killed (`kill -9` included) closes it, the reader sees the
//! end of the stream and the writer a broken pipe. Nothing read from shared
//! memory is trusted: each side keeps its own index privately and checks
//! the peer's on every read (it may only move forward, and never by more
//! than the ring holds), so a peer that scribbles on the rings makes the
//! connection fail with an error, never an out-of-bounds read or a hang;
//! scribbled data bytes are caught by the frame decoder like any garbage.
//!
//! Linux only; elsewhere `shm://` is refused with an "unsupported" error.
//!
//! This is the one module of the workspace allowed `unsafe`: mapping a file
//! and touching shared memory cannot be done without it. Each block says
//! why it is sound.

#![allow(unsafe_code)]

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Bytes of each ring's header page.
const HEADER: usize = 4096;
const TAIL: usize = 0;
const HEAD: usize = 64;
const READER_SLEEPING: usize = 128;
const WRITER_WAITING: usize = 192;
/// Set by the writer when it will write no more (a graceful close).
const CLOSED: usize = 256;
/// The CPU each half of the ring was last polled on, plus one (zero, what
/// a new ring file holds, means "not known yet"). Written only when it
/// changes, so a half that stays put does not bounce the cache line.
const READER_CPU: usize = 320;
const WRITER_CPU: usize = 384;
/// Doorbells on the control socket.
const DATA: u8 = b'D';
const SPACE: u8 = b'S';

/// Where the control socket of `shm://name` lives.
pub fn control_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("courier-shm-{name}.sock"))
}

/// One mapped ring file.
struct Ring {
    map: memmap2::MmapMut,
    capacity: u64,
}

impl Ring {
    fn atomic(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: the map is page-aligned and at least HEADER bytes long, the
        // offsets are multiples of 64 inside the header, and AtomicU64 has
        // the size and alignment of u64. Shared memory is only ever accessed
        // through atomics (indices, flags) or copied out of and into the
        // data area, whose bounds are checked below.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU64) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: HEADER is within the map (checked when mapping).
        unsafe { self.map.as_ptr().add(HEADER) as *mut u8 }
    }

    /// Copies `out.len()` bytes starting at ring position `at`.
    fn copy_out(&self, at: u64, out: &mut [u8]) {
        let start = (at % self.capacity) as usize;
        let first = out.len().min(self.capacity as usize - start);
        // SAFETY: `start + first <= capacity` and the rest wraps to the
        // beginning with `out.len() - first <= capacity`; the data area is
        // `capacity` bytes long. The peer may write concurrently: that can
        // only garble bytes, which the frame decoder rejects.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data().add(start), out.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(
                self.data(),
                out.as_mut_ptr().add(first),
                out.len() - first,
            );
        }
    }

    /// Copies `bytes` in starting at ring position `at`.
    fn copy_in(&self, at: u64, bytes: &[u8]) {
        let start = (at % self.capacity) as usize;
        let first = bytes.len().min(self.capacity as usize - start);
        // SAFETY: as in `copy_out`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data().add(start), first);
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr().add(first),
                self.data(),
                bytes.len() - first,
            );
        }
    }
}

/// The CPU the calling thread runs on, plus one; zero if unknown.
fn current_cpu() -> u64 {
    // SAFETY: `sched_getcpu` takes nothing and only reads the thread's
    // state; it fails (returning -1) on kernels without it.
    let cpu = unsafe { libc::sched_getcpu() };
    u64::try_from(cpu).map_or(0, |cpu| cpu + 1)
}

/// How one half waits for its peer: where it last said it runs, and the
/// deadline of the cooperative spin in progress (see "Waiting" above).
struct Wait {
    spin: Duration,
    published: u64,
    spin_until: Option<Instant>,
}

impl Wait {
    fn new(spin: Duration) -> Wait {
        Wait {
            spin,
            published: 0,
            spin_until: None,
        }
    }

    /// Publishes this half's CPU at `mine` in `ring`'s header.
    fn publish(&mut self, ring: &Ring, mine: usize) -> u64 {
        let cpu = current_cpu();
        if cpu != self.published {
            self.published = cpu;
            ring.atomic(mine).store(cpu, Ordering::Relaxed);
        }
        cpu
    }

    /// Progress was made: the next wait gets a whole spin budget again.
    fn progressed(&mut self) {
        self.spin_until = None;
    }

    /// Whether to look at the ring again soon rather than sleep: only while
    /// the peer's half (at `theirs`) runs on another, known CPU, and within
    /// the budget. The peer's slot is untrusted, but any value in it only
    /// picks between two correct ways of waiting.
    fn keep_spinning(&mut self, ring: &Ring, cpu: u64, theirs: usize) -> bool {
        let peer = ring.atomic(theirs).load(Ordering::Relaxed);
        if self.spin.is_zero() || cpu == 0 || peer == 0 || cpu == peer {
            return false;
        }
        let now = Instant::now();
        now < *self.spin_until.get_or_insert(now + self.spin)
    }
}

/// Returns `Pending` having asked the runtime to poll this task again only
/// after its other ready tasks, its I/O and its timers had their turn: one
/// turn of a cooperative spin, never holding the thread.
fn spin_turn<T>(cx: &mut Context<'_>) -> Poll<T> {
    // A fresh `yield_now` hands the waker to the scheduler's deferred list
    // on its first poll (or wakes it at once outside a runtime) and is then
    // done with; dropping it unpolled again is fine.
    let yielded = std::pin::pin!(tokio::task::yield_now());
    let _ = std::future::Future::poll(yielded, cx);
    Poll::Pending
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("shared memory ring corrupted by the peer: {what}"),
    )
}

fn map(path: &std::path::Path, capacity: u64, create: bool) -> io::Result<Ring> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true);
    if create {
        options.create_new(true).mode(0o600);
    }
    let file = options.open(path)?;
    if create {
        file.set_len(HEADER as u64 + capacity)?;
    } else if file.metadata()?.len() != HEADER as u64 + capacity {
        return Err(corrupt("ring file of the wrong size"));
    }
    // SAFETY: the file is ours (0600, created with O_EXCL) or handed to us
    // by the listener over its control socket; its size was checked. The
    // map is only accessed as described in `Ring::atomic` and `copy_*`.
    let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
    Ok(Ring { map, capacity })
}

/// What both halves of one side share: the control socket's write half and
/// the doorbells its reader task hands out.
struct Control {
    socket: Arc<UnixStream>,
}

impl Control {
    fn ring(&self, doorbell: u8) {
        // A full socket buffer means the peer has doorbells waiting anyway.
        let _ = self.socket.try_write(&[doorbell]);
    }
}

/// Reads doorbells until the peer goes away, then closes both channels.
async fn doorbells(socket: Arc<UnixStream>, data: mpsc::Sender<()>, space: mpsc::Sender<()>) {
    let mut bytes = [0u8; 64];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let mut read = None;
        let outcome = socket.try_io(tokio::io::Interest::READABLE, || {
            let n = socket.try_read(&mut bytes)?;
            read = Some(n);
            if n > 0 && n < bytes.len() {
                // A short read emptied the socket. Saying so (as "would
                // block") makes the next `readable` wait for the next
                // doorbell rather than cost a read that finds nothing: one
                // syscall less per wake-up. A doorbell that arrives after
                // the read is a new edge, which tokio keeps.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match (read, outcome) {
            (Some(0), _) => return,
            (Some(n), _) => {
                for byte in &bytes[..n] {
                    match *byte {
                        DATA => drop(data.try_send(())),
                        SPACE => drop(space.try_send(())),
                        _ => return, // Not a doorbell: the peer is broken.
                    }
                }
            }
            (None, Err(err)) if err.kind() == io::ErrorKind::WouldBlock => {}
            (None, _) => return,
        }
    }
}

/// Stops the doorbell task (and so closes the control socket, which the
/// peer sees as the end) once both halves of a side are gone.
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The receiving half: reads what the peer wrote into its ring.
pub(crate) struct ShmReader {
    ring: Ring,
    head: u64,
    seen_tail: u64,
    control: Arc<Control>,
    data: mpsc::Receiver<()>,
    wait: Wait,
    _doorbells: Arc<TaskGuard>,
}

/// The sending half: writes into this side's ring.
pub(crate) struct ShmWriter {
    ring: Ring,
    tail: u64,
    seen_head: u64,
    control: Arc<Control>,
    space: mpsc::Receiver<()>,
    wait: Wait,
    _doorbells: Arc<TaskGuard>,
}

impl ShmReader {
    /// Bytes ready to read, checking what the peer wrote.
    fn available(&mut self) -> io::Result<u64> {
        let tail = self.ring.atomic(TAIL).load(Ordering::Acquire);
        if tail < self.seen_tail || tail.wrapping_sub(self.head) > self.ring.capacity {
            return Err(corrupt("write index moved backwards or past the ring"));
        }
        self.seen_tail = tail;
        Ok(tail - self.head)
    }
}

impl AsyncRead for ShmReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let cpu = this.wait.publish(&this.ring, READER_CPU);
        loop {
            let available = this.available()?;
            if available > 0 {
                let n = (available as usize).min(buf.remaining());
                let out = buf.initialize_unfilled_to(n);
                this.ring.copy_out(this.head, out);
                buf.advance(n);
                this.head += n as u64;
                this.ring.atomic(HEAD).store(this.head, Ordering::SeqCst);
                if this.ring.atomic(WRITER_WAITING).swap(0, Ordering::SeqCst) != 0 {
                    this.control.ring(SPACE);
                }
                this.wait.progressed();
                return Poll::Ready(Ok(()));
            }
            // The writer closed after its last byte: the end of the stream.
            if this.ring.atomic(CLOSED).load(Ordering::SeqCst) != 0 && this.available()? == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.wait.keep_spinning(&this.ring, cpu, WRITER_CPU) {
                return spin_turn(cx);
            }
            // Say we sleep, then look once more: the writer checks the flag
            // after publishing its tail, so one of us sees the other.
            this.ring.atomic(READER_SLEEPING).store(1, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            if this.available()? > 0 {
                this.ring.atomic(READER_SLEEPING).store(0, Ordering::SeqCst);
                continue;
            }
            match this.data.poll_recv(cx) {
                Poll::Ready(Some(())) => continue,
                // The peer is gone, and everything it wrote has been read.
                Poll::Ready(None) => {
                    return if this.available()? > 0 {
                        continue;
                    } else {
                        Poll::Ready(Ok(()))
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl ShmWriter {
    /// Room left, checking what the peer wrote.
    fn room(&mut self) -> io::Result<u64> {
        let head = self.ring.atomic(HEAD).load(Ordering::Acquire);
        if head < self.seen_head || head > self.tail {
            return Err(corrupt("read index moved backwards or past the data"));
        }
        self.seen_head = head;
        Ok(self.ring.capacity - (self.tail - head))
    }
}

impl AsyncWrite for ShmWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if bytes.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let cpu = this.wait.publish(&this.ring, WRITER_CPU);
        loop {
            let room = this.room()?;
            if room > 0 {
                let n = (room as usize).min(bytes.len());
                this.ring.copy_in(this.tail, &bytes[..n]);
                this.tail += n as u64;
                this.ring.atomic(TAIL).store(this.tail, Ordering::SeqCst);
                if this.ring.atomic(READER_SLEEPING).swap(0, Ordering::SeqCst) != 0 {
                    this.control.ring(DATA);
                }
                this.wait.progressed();
                return Poll::Ready(Ok(n));
            }
            if this.wait.keep_spinning(&this.ring, cpu, READER_CPU) {
                return spin_turn(cx);
            }
            this.ring.atomic(WRITER_WAITING).store(1, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            if this.room()? > 0 {
                this.ring.atomic(WRITER_WAITING).store(0, Ordering::SeqCst);
                continue;
            }
            match this.space.poll_recv(cx) {
                Poll::Ready(Some(())) => continue,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the shm peer went away",
                    )))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes are visible to the peer as soon as the tail is stored.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The peer reads everything written so far, then sees the end.
        self.ring.atomic(CLOSED).store(1, Ordering::SeqCst);
        self.control.ring(DATA);
        Poll::Ready(Ok(()))
    }
}

fn halves(
    control: UnixStream,
    inbound: Ring,
    outbound: Ring,
    spin: Duration,
) -> (ShmReader, ShmWriter) {
    let socket = Arc::new(control);
    let (data_tx, data_rx) = mpsc::channel(1);
    let (space_tx, space_rx) = mpsc::channel(1);
    let task = Arc::new(TaskGuard(tokio::spawn(doorbells(
        socket.clone(),
        data_tx,
        space_tx,
    ))));
    let control = Arc::new(Control { socket });
    (
        ShmReader {
            ring: inbound,
            head: 0,
            seen_tail: 0,
            control: control.clone(),
            data: data_rx,
            wait: Wait::new(spin),
            _doorbells: task.clone(),
        },
        ShmWriter {
            ring: outbound,
            tail: 0,
            seen_head: 0,
            control,
            space: space_rx,
            wait: Wait::new(spin),
            _doorbells: task,
        },
    )
}

/// Ring file names are sent as one line each; this bounds what is read.
const MAX_NAME: usize = 256;

async fn read_line(control: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let byte = control.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        if line.len() >= MAX_NAME {
            return Err(corrupt("ring name too long"));
        }
        line.push(byte);
    }
    String::from_utf8(line).map_err(|_| corrupt("ring name is not UTF-8"))
}

/// Listener side: makes the rings for one accepted control connection.
pub(crate) async fn accept(
    mut control: UnixStream,
    name: &str,
    capacity: u64,
    spin: Duration,
) -> io::Result<(ShmReader, ShmWriter)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let stem = format!(
        "/dev/shm/courier-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let (to_client, to_server) = (
        PathBuf::from(format!("{stem}-s2c")),
        PathBuf::from(format!("{stem}-c2s")),
    );
    // Unlinked however this ends: after the client mapped them, or on error.
    struct Unlink(Vec<PathBuf>);
    impl Drop for Unlink {
        fn drop(&mut self) {
            for path in &self.0 {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let _unlink = Unlink(vec![to_client.clone(), to_server.clone()]);
    let outbound = map(&to_client, capacity, true)?;
    let inbound = map(&to_server, capacity, true)?;
    control
        .write_all(
            format!(
                "{capacity}\n{}\n{}\n",
                to_client.display(),
                to_server.display()
            )
            .as_bytes(),
        )
        .await?;
    if control.read_u8().await? != b'+' {
        return Err(corrupt("the client did not map the rings"));
    }
    Ok(halves(control, inbound, outbound, spin))
}

/// Client side: maps the rings the listener made.
pub(crate) async fn connect(
    mut control: UnixStream,
    max_capacity: u64,
    spin: Duration,
) -> io::Result<(ShmReader, ShmWriter)> {
    let capacity: u64 = read_line(&mut control)
        .await?
        .parse()
        .map_err(|_| corrupt("ring size is not a number"))?;
    if !capacity.is_power_of_two() || capacity > max_capacity.max(1 << 30) {
        return Err(corrupt("ring size is not a power of two within limits"));
    }
    let inbound_path = read_line(&mut control).await?;
    let outbound_path = read_line(&mut control).await?;
    for path in [&inbound_path, &outbound_path] {
        if !path.starts_with("/dev/shm/courier-") || path.contains("..") {
            return Err(corrupt("ring file outside /dev/shm/courier-*"));
        }
    }
    let inbound = map(inbound_path.as_ref(), capacity, false)?;
    let outbound = map(outbound_path.as_ref(), capacity, false)?;
    control.write_all(b"+").await?;
    Ok(halves(control, inbound, outbound, spin))
}
