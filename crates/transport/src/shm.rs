//! `shm://name`: processes on one machine exchange frames through shared
//! memory instead of the kernel's socket path.
//!
//! **Rendezvous.** A listener binds a Unix socket (the control socket) at
//! [`control_path`]. For each connection the listener creates two ring
//! files under `/dev/shm` (one per direction, mode 0600, `O_EXCL`), tells
//! the client their names over the control socket, then a byte carrying
//! the write ends of its two doorbell pipes (below); the client maps the
//! rings and answers with a byte carrying its own two. The listener then
//! unlinks the ring files: from then on the memory lives exactly as long
//! as the two processes keep it mapped, and nothing is left behind however
//! either side ends. (Both sides must run this version of the handshake.)
//!
//! **Rings.** Each ring is a single-producer, single-consumer byte pipe: a
//! header page (the producer's `tail`, the consumer's `head`, a "reader
//! sleeping" and a "writer waiting" flag, and the CPU each half was last
//! polled on, each on its own cache line) and a power-of-two data area.
//! Frames go through it as the same length-prefixed bytes as on TCP, so the
//! codec, the coalescing writer, heartbeats and every limit are shared with
//! the stream transports; a frame larger than the ring simply passes in
//! pieces. A full ring makes the writer wait
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
//! **Doorbells.** The other side, seeing the flag after it moved data,
//! writes one byte into the sleeper's doorbell pipe: one pipe per half,
//! created by the side that sleeps on it, which keeps the read end to
//! itself, registers it with its runtime and drains it in its own poll (no
//! task in between). Writes use `RWF_NOWAIT`, so they never block, whatever
//! the peer does to the pipe's flags. Where that is refused (kernels before
//! 6.4), where SIGPIPE is not ignored, or when the peer sent no pipes, the
//! doorbell is a byte on the control socket instead, read by a small task;
//! a waiting half always listens to both. Raising the flag and then
//! looking again, while the other side publishes its index and then looks
//! at the flag (both sequentially consistent), means one of them always
//! sees the other: no wake-up is lost. An idle connection costs no CPU.
//!
//! The CPU slots are hints written by the peer: any value in them only
//! chooses between two correct ways of waiting. `sched_getcpu`, `pipe2`,
//! `pwritev2` and descriptor passing come from `libc` (already in the build
//! through tokio); this module is its only direct user.
//!
//! **Cost on one CPU.** There, every round trip is two sleeps and two
//! wake-ups through the kernel, as on a Unix socket: a thread parked in its
//! runtime's `epoll_wait` can only be woken by an event on a descriptor.
//! The ring saves the socket buffers and copies, a pipe byte costs less
//! than a socket message, and the woken half reads it itself, so the round
//! trip is about half a Unix socket's, not a third. An eventfd would be
//! cheaper still, but it cannot be written with `RWF_NOWAIT` and its one
//! file is shared with the peer, which could make it block our thread.
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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
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
/// Sent by the listener, after the ring names, with its doorbell pipes.
const BELLS: u8 = b'B';

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

/// Counts one doorbell heard within a poll; true past the few a poll may
/// act on, so a peer that rings without moving data cannot keep us in it
/// (the poll then ends as one turn of a cooperative spin).
fn rung_too_often(rung: &mut u32) -> bool {
    *rung += 1;
    *rung > 2
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

/// What both halves of one side share: the control socket, the doorbells
/// its reader task hands out, and the peer's doorbell pipes.
struct Control {
    socket: Arc<UnixStream>,
    /// Write ends of the peer's doorbell pipes (data, space), when it sent
    /// them and this process may use them (see [`may_write_pipes`]).
    pipes: Option<[OwnedFd; 2]>,
    /// Cleared for good when the kernel refuses a non-blocking pipe write.
    pipes_work: AtomicBool,
}

impl Control {
    fn ring(&self, doorbell: u8) {
        if let (Some(pipes), true) = (&self.pipes, self.pipes_work.load(Ordering::Relaxed)) {
            let pipe = &pipes[usize::from(doorbell != DATA)];
            if ring_pipe(pipe, doorbell) {
                return;
            }
            self.pipes_work.store(false, Ordering::Relaxed);
        }
        // A full socket buffer means the peer has doorbells waiting anyway.
        let _ = self.socket.try_write(&[doorbell]);
    }
}

/// A new pipe, both ends non-blocking: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: `pipe2` writes two new descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and belong to nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Writes one doorbell byte into a peer's pipe without ever blocking;
/// false if the kernel cannot promise that (before Linux 6.4 pipes refuse
/// `RWF_NOWAIT`), and the caller must use the control socket instead.
fn ring_pipe(pipe: &OwnedFd, doorbell: u8) -> bool {
    let byte = [doorbell];
    let iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: one iovec over a live one-byte buffer; offset -1 is "no
    // offset", the only one a pipe takes. `RWF_NOWAIT` makes this one call
    // non-blocking whatever flags the peer, which shares the pipe's file,
    // set on it.
    let n = unsafe { libc::pwritev2(pipe.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
    if n >= 0 {
        return true;
    }
    // EAGAIN: the pipe is full, so the peer has doorbells waiting.
    // EPIPE: the peer is gone, which the control socket reports. Anything
    // else (ENOMEM, a kernel without RWF_NOWAIT on pipes) may have lost the
    // wake-up: the caller rings the control socket instead.
    matches!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::EAGAIN | libc::EPIPE)
    )
}

/// Whether this process may write into the peer's pipes: a write to a pipe
/// whose reader is gone raises SIGPIPE, which must not kill us, so only
/// when it is ignored (as Rust programs do by default). Otherwise the
/// doorbells go over the control socket, as before pipes.
fn may_write_pipes() -> bool {
    // SAFETY: a zeroed sigaction is a valid out-parameter; a null `act`
    // only queries the disposition.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

/// Whether `fd` is a pipe: the only kind of descriptor a peer's doorbell
/// may be (anything else is dropped and the control socket used).
fn is_pipe(fd: &OwnedFd) -> bool {
    // SAFETY: a zeroed stat is a valid out-parameter for fstat.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        libc::fstat(fd.as_raw_fd(), &mut stat) == 0 && stat.st_mode & libc::S_IFMT == libc::S_IFIFO
    }
}

/// The read end of one half's doorbell pipe: the peer writes a byte into
/// it to wake that half, which drains it itself, with no task in between.
struct Bell {
    pipe: AsyncFd<OwnedFd>,
    /// Every write end is closed (the peer dropped them, or is gone): the
    /// pipe reads as end-of-file, and readable, for ever, so it is no
    /// longer looked at; the control socket carries the doorbells instead.
    closed: bool,
}

impl Bell {
    fn new(read_end: OwnedFd) -> io::Result<Bell> {
        // SAFETY: the descriptor is owned by the `AsyncFd` from now on, so
        // it stays open and the same for its whole life.
        let pipe = unsafe { AsyncFd::register(read_end) }?;
        Ok(Bell {
            pipe,
            closed: false,
        })
    }

    /// Ready once the peer rang since the last look (the pipe is then
    /// drained, or read as far as one poll may); `Pending`, with the waker
    /// registered, otherwise.
    fn poll_rung(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Each turn reads or clears a stale readiness, so a few suffice.
        for _ in 0..4 {
            if self.closed {
                return Poll::Pending;
            }
            let mut guard = std::task::ready!(self.pipe.poll_read_ready(cx))?;
            let mut bytes = [0u8; 64];
            let read = guard.try_io(|pipe| {
                // SAFETY: reads into a buffer of ours, at most its length.
                let n =
                    unsafe { libc::read(pipe.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len()) };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match read {
                Ok(Ok(0)) => self.closed = true,
                Ok(Ok(n)) => {
                    if n < bytes.len() {
                        // A short read emptied the pipe; the next byte is
                        // a new edge, which the runtime reports.
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => {}
            }
        }
        // Only a peer writing as fast as we read gets here: look again
        // after the runtime's other tasks.
        spin_turn(cx)
    }
}

/// Sends one byte with descriptors attached, over a Unix socket.
fn send_with_fds(socket: RawFd, byte: u8, fds: &[RawFd]) -> io::Result<()> {
    // Room for the control message: its header and up to 8 descriptors,
    // 8-byte aligned as cmsghdr requires.
    let mut space = [0u64; 8];
    let payload = std::mem::size_of_val(fds) as u32;
    let iov = libc::iovec {
        iov_base: &byte as *const u8 as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers). The
    // control buffer is ours and large enough for CMSG_SPACE(payload) (at
    // most 8 descriptors, 16 + 32 bytes), so the header and data written
    // through CMSG_FIRSTHDR / CMSG_DATA stay inside it.
    let sent = unsafe {
        if fds.len() > 8 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &iov as *const libc::iovec as *mut libc::iovec;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(payload) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
    };
    match sent {
        1 => Ok(()),
        0 => Err(io::ErrorKind::WriteZero.into()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Receives one byte and whatever descriptors the peer attached to it (all
/// owned, so none leaks whatever is done with them).
fn recv_with_fds(socket: RawFd) -> io::Result<(u8, Vec<OwnedFd>)> {
    let mut byte = 0u8;
    let mut space = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: &mut byte as *mut u8 as *mut libc::c_void,
        iov_len: 1,
    };
    let mut fds = Vec::new();
    // SAFETY: an all-zero msghdr is valid; the kernel writes at most
    // `msg_controllen` bytes of control messages into our buffer (and
    // closes descriptors that do not fit). CMSG_FIRSTHDR / CMSG_NXTHDR only
    // return headers lying inside it, and each header's length, set by the
    // kernel, bounds its data.
    let received = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&space) as _;
        let received = libc::recvmsg(
            socket,
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        );
        if received > 0 {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let len =
                        ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        received
    };
    match received {
        1 => Ok((byte, fds)),
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// This side's two doorbell pipes: the read ends it waits on, and the
/// write ends it hands to the peer (and then closes, so that only the peer
/// writes into them).
struct Bells {
    data: OwnedFd,
    space: OwnedFd,
    handed: [OwnedFd; 2],
}

impl Bells {
    fn new() -> io::Result<Bells> {
        let (data, data_w) = pipe()?;
        let (space, space_w) = pipe()?;
        Ok(Bells {
            data,
            space,
            handed: [data_w, space_w],
        })
    }

    /// Sends the write ends to the peer with `byte`.
    async fn hand_over(&self, control: &UnixStream, byte: u8) -> io::Result<()> {
        let fds = [self.handed[0].as_raw_fd(), self.handed[1].as_raw_fd()];
        control
            .async_io(Interest::WRITABLE, || {
                send_with_fds(control.as_raw_fd(), byte, &fds)
            })
            .await
    }
}

/// Receives the byte the peer sends with its doorbells, and the doorbells
/// if they are two pipes this process may write into.
async fn take_over(control: &UnixStream) -> io::Result<(u8, Option<[OwnedFd; 2]>)> {
    let (byte, fds) = control
        .async_io(Interest::READABLE, || recv_with_fds(control.as_raw_fd()))
        .await?;
    let pipes = <[OwnedFd; 2]>::try_from(fds)
        .ok()
        .filter(|pipes| pipes.iter().all(is_pipe) && may_write_pipes());
    Ok((byte, pipes))
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
    bell: Bell,
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
    bell: Bell,
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
        let mut rung = 0u32;
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
            // Rung through the pipe: look again.
            if this.bell.poll_rung(cx)?.is_ready() {
                if rung_too_often(&mut rung) {
                    return spin_turn(cx);
                }
                continue;
            }
            // Rung over the control socket (by a peer without pipes), or
            // the end of the peer.
            match this.data.poll_recv(cx) {
                Poll::Ready(Some(())) if rung_too_often(&mut rung) => return spin_turn(cx),
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
        let mut rung = 0u32;
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
            if this.bell.poll_rung(cx)?.is_ready() {
                if rung_too_often(&mut rung) {
                    return spin_turn(cx);
                }
                continue;
            }
            match this.space.poll_recv(cx) {
                Poll::Ready(Some(())) if rung_too_often(&mut rung) => return spin_turn(cx),
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
    bells: Bells,
    peer_pipes: Option<[OwnedFd; 2]>,
) -> io::Result<(ShmReader, ShmWriter)> {
    let Bells {
        data,
        space,
        handed,
        ..
    } = bells;
    // The peer has its own copies now; ours would let a dead peer's pipes
    // look alive (no end of file) and are not needed.
    drop(handed);
    let (data_bell, space_bell) = (Bell::new(data)?, Bell::new(space)?);
    let socket = Arc::new(control);
    let (data_tx, data_rx) = mpsc::channel(1);
    let (space_tx, space_rx) = mpsc::channel(1);
    let task = Arc::new(TaskGuard(tokio::spawn(doorbells(
        socket.clone(),
        data_tx,
        space_tx,
    ))));
    let control = Arc::new(Control {
        socket,
        pipes: peer_pipes,
        pipes_work: AtomicBool::new(true),
    });
    Ok((
        ShmReader {
            ring: inbound,
            head: 0,
            seen_tail: 0,
            control: control.clone(),
            data: data_rx,
            bell: data_bell,
            wait: Wait::new(spin),
            _doorbells: task.clone(),
        },
        ShmWriter {
            ring: outbound,
            tail: 0,
            seen_head: 0,
            control,
            space: space_rx,
            bell: space_bell,
            wait: Wait::new(spin),
            _doorbells: task,
        },
    ))
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
    // Our doorbells go with a byte of their own, which a client reading the
    // names one byte at a time never swallows by accident.
    let bells = Bells::new()?;
    bells.hand_over(&control, BELLS).await?;
    // The client's answer carries its doorbells, or none (then it is rung
    // over the control socket).
    let (answer, peer_pipes) = take_over(&control).await?;
    if answer != b'+' {
        return Err(corrupt("the client did not map the rings"));
    }
    halves(control, inbound, outbound, spin, bells, peer_pipes)
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
    let (byte, peer_pipes) = take_over(&control).await?;
    if byte != BELLS {
        return Err(corrupt("no doorbells after the ring names"));
    }
    for path in [&inbound_path, &outbound_path] {
        if !path.starts_with("/dev/shm/courier-") || path.contains("..") {
            return Err(corrupt("ring file outside /dev/shm/courier-*"));
        }
    }
    let inbound = map(inbound_path.as_ref(), capacity, false)?;
    let outbound = map(outbound_path.as_ref(), capacity, false)?;
    let bells = Bells::new()?;
    bells.hand_over(&control, b'+').await?;
    halves(control, inbound, outbound, spin, bells, peer_pipes)
}
