//! `shm://` never holds a runtime's thread while it waits (issue 13).
//!
//! Each test runs one side on a current-thread runtime, gives it an shm
//! wait that cannot end (a receive from a silent peer, a send into a full
//! ring nobody drains) with a spin budget of an hour, and checks that other
//! tasks of the same runtime still finish their work. A wait that spun or
//! yielded inside its poll would hold the thread for that hour; the test
//! thread, outside the runtime, gives up after a generous liveness bound so
//! such a regression fails instead of hanging. The bound is not a
//! performance threshold: the work takes milliseconds.
//!
//! Both placements are covered where the machine has two CPUs: the peer on
//! the same CPU (a wait must sleep at once) and on another (a wait may spin,
//! but only cooperatively).
#![cfg(target_os = "linux")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use courier_transport::{bind, connect, Address, Connection, Frame, FrameKind, TransportConfig};

/// How long the test thread waits for a side to finish before declaring it
/// stuck. Only a liveness bound.
const LIVENESS: Duration = Duration::from_secs(120);

/// Round trips between two plain tasks that must get to run.
const PING_PONGS: usize = 2_000;

fn shm() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::Shm(format!(
        "wait-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A spin budget no test could sit out: a wait that spins inside its poll
/// holds the thread for an hour.
fn spinning() -> TransportConfig {
    let mut config = TransportConfig::default();
    config.shm_spin = Duration::from_secs(3600);
    config.shm_ring_size = 4096;
    config.send_buffer = 4096;
    config
}

/// (client CPU, server CPU) pairs this machine can run: same, and split
/// when there are two CPUs.
fn placements() -> Vec<(usize, usize)> {
    let cpus = core_affinity::get_core_ids().unwrap_or_default();
    let mut placements = Vec::new();
    if let Some(first) = cpus.first() {
        placements.push((first.id, first.id));
    }
    if let [first, second, ..] = cpus.as_slice() {
        placements.push((first.id, second.id));
    }
    placements
}

fn pin(cpu: usize) {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Two tasks bouncing a counter through channels: finishes only if the
/// runtime keeps scheduling them.
async fn ping_pong() -> usize {
    let (to_pong, mut pongs_in) = tokio::sync::mpsc::channel::<usize>(1);
    let (to_ping, mut pings_in) = tokio::sync::mpsc::channel::<usize>(1);
    let pong = tokio::spawn(async move {
        while let Some(n) = pongs_in.recv().await {
            if to_ping.send(n + 1).await.is_err() {
                break;
            }
        }
    });
    let mut n = 0;
    for _ in 0..PING_PONGS {
        to_pong.send(n).await.expect("pong task alive");
        n = pings_in.recv().await.expect("pong task answers");
    }
    drop(to_pong);
    pong.await.expect("pong task");
    n
}

/// Runs the server side on its own pinned thread and runtime: accepts one
/// connection, hands it to `serve`, and keeps it open until `stop` fires.
fn server_thread<F, Fut>(
    cpu: usize,
    address: Address,
    config: TransportConfig,
    serve: F,
) -> (
    std::thread::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
)
where
    F: FnOnce(Connection) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Connection>,
{
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = std::thread::spawn(move || {
        pin(cpu);
        current_thread().block_on(async move {
            let mut listener = bind(&address, &config).await.expect("bind");
            ready_tx.send(()).expect("test waits");
            let connection = listener.accept().await.expect("accept");
            let _connection = serve(connection).await;
            let _ = stop_rx.await;
        });
    });
    ready_rx.recv_timeout(LIVENESS).expect("server bound");
    (handle, stop_tx)
}

/// Runs `client` on a pinned thread with a current-thread runtime and waits
/// (outside that runtime) for its answer within the liveness bound.
fn run_client<F, Fut, T>(cpu: usize, client: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let (done_tx, done_rx) = std_mpsc::channel();
    let thread = std::thread::spawn(move || {
        pin(cpu);
        let outcome = current_thread().block_on(client());
        let _ = done_tx.send(outcome);
    });
    match done_rx.recv_timeout(LIVENESS) {
        Ok(outcome) => {
            thread.join().expect("client thread");
            outcome
        }
        // The thread is stuck in a poll; leaving it behind is all we can do.
        Err(_) => panic!("the client's runtime made no progress within {LIVENESS:?}"),
    }
}

#[test]
fn a_receive_from_a_silent_peer_leaves_the_runtime_to_other_tasks() {
    for (client_cpu, server_cpu) in placements() {
        let address = shm();
        let config = spinning();
        // The server says nothing at all after the handshake.
        let (server, stop) =
            server_thread(server_cpu, address.clone(), config.clone(), |c| async { c });
        let bounced = run_client(client_cpu, move || async move {
            let mut connection = connect(&address, &config).await.expect("connect");
            let receiving = tokio::spawn(async move {
                let _ = connection.recv().await;
            });
            // Let the receive start waiting before the other work begins.
            tokio::task::yield_now().await;
            let bounced = ping_pong().await;
            assert!(!receiving.is_finished(), "nothing was sent");
            receiving.abort();
            bounced
        });
        assert_eq!(
            bounced, PING_PONGS,
            "placement ({client_cpu}, {server_cpu})"
        );
        let _ = stop.send(());
        server.join().expect("server thread");
    }
}

#[test]
fn a_send_into_a_full_ring_leaves_the_runtime_to_other_tasks() {
    for (client_cpu, server_cpu) in placements() {
        let address = shm();
        let config = spinning();
        // The server never reads: the client's ring fills and stays full.
        let (server, stop) =
            server_thread(server_cpu, address.clone(), config.clone(), |c| async { c });
        let bounced = run_client(client_cpu, move || async move {
            let connection = connect(&address, &config).await.expect("connect");
            let sent = std::sync::Arc::new(AtomicUsize::new(0));
            let counter = sent.clone();
            let sending = tokio::spawn(async move {
                // Far more than the 4 KiB ring and 4 KiB send buffer hold.
                for n in 0..1_000u64 {
                    if connection
                        .send(Frame::new(FrameKind::Data, n, vec![7u8; 1000]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
            // Let the sender fill the ring and start waiting for room.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let bounced = ping_pong().await;
            assert!(
                sent.load(Ordering::SeqCst) < 1_000,
                "the ring was full, so the sender is still waiting"
            );
            sending.abort();
            bounced
        });
        assert_eq!(
            bounced, PING_PONGS,
            "placement ({client_cpu}, {server_cpu})"
        );
        let _ = stop.send(());
        server.join().expect("server thread");
    }
}

#[test]
fn round_trips_complete_in_every_placement_without_a_lost_wake_up() {
    // Every round trip ends in a sleep on one side and a wake-up from the
    // other (same CPU: always; split: whenever a spin runs out), so a lost
    // wake-up would stop this dead.
    for spin in [Duration::ZERO, Duration::from_micros(20)] {
        for (client_cpu, server_cpu) in placements() {
            let address = shm();
            let mut config = TransportConfig::default();
            config.shm_spin = spin;
            let (server, stop) = server_thread(
                server_cpu,
                address.clone(),
                config.clone(),
                |mut c| async move {
                    while let Ok(Some(frame)) = c.recv().await {
                        if c.send(frame).await.is_err() {
                            break;
                        }
                    }
                    c
                },
            );
            let echoed = run_client(client_cpu, move || async move {
                let mut connection = connect(&address, &config).await.expect("connect");
                let mut echoed = 0u64;
                for n in 0..5_000u64 {
                    connection
                        .send(Frame::new(FrameKind::Data, n, vec![0xA5; 64]))
                        .await
                        .expect("send");
                    let frame = connection.recv().await.expect("recv").expect("a reply");
                    assert_eq!(frame.id, n);
                    echoed += 1;
                }
                echoed
            });
            assert_eq!(
                echoed, 5_000,
                "spin {spin:?}, placement ({client_cpu}, {server_cpu})"
            );
            let _ = stop.send(());
            server.join().expect("server thread");
        }
    }
}

/// Counts how often the future inside is polled.
struct Counted<F> {
    inner: std::pin::Pin<Box<F>>,
    polls: std::sync::Arc<AtomicUsize>,
}

impl<F: std::future::Future> std::future::Future for Counted<F> {
    type Output = F::Output;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.inner.as_mut().poll(cx)
    }
}

/// A receive that a wake-up should never disturb, polled how often while
/// `ping_pong` runs beside it. Sleeping, it is polled once or twice; a
/// receive that kept looking (spinning, even cooperatively) would be polled
/// every time the runtime ran out of other work, thousands of times.
async fn polls_of_an_idle_receive(mut connection: Connection) -> usize {
    let polls = std::sync::Arc::new(AtomicUsize::new(0));
    let receiving = tokio::spawn(Counted {
        inner: Box::pin(async move {
            let _ = connection.recv().await;
        }),
        polls: polls.clone(),
    });
    tokio::task::yield_now().await;
    assert_eq!(ping_pong().await, PING_PONGS);
    assert!(!receiving.is_finished(), "nothing was sent");
    receiving.abort();
    polls.load(Ordering::SeqCst)
}

/// A bound far above what sleeping costs (one or two polls) and far below
/// what looking again on every turn of the runtime costs.
const SLEEPING_POLLS: usize = 10;

#[test]
fn a_receive_waiting_for_a_peer_on_the_same_cpu_sleeps_instead_of_spinning() {
    let (cpu, _) = placements()[0];
    // Both ends on one pinned thread: the peer is on the same CPU, so even
    // an hour's spin budget must not be used.
    let polls = run_client(cpu, || async {
        let address = shm();
        let config = spinning();
        let mut listener = bind(&address, &config).await.expect("bind");
        let client = connect(&address, &config).await.expect("connect");
        let _server = listener.accept().await.expect("accept");
        polls_of_an_idle_receive(client).await
    });
    assert!(polls <= SLEEPING_POLLS, "polled {polls} times");
}

#[test]
#[allow(unsafe_code)]
fn a_peer_without_doorbell_pipes_is_rung_over_the_control_socket() {
    // A hand-made client that drops the listener's doorbell pipes and sends
    // none: the listener must neither spin on the dead pipes nor miss the
    // doorbells that come over the control socket instead.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cpu, _) = placements()[0];
    let (polls, frame) = run_client(cpu, || async {
        let address = shm();
        let Address::Shm(name) = &address else {
            unreachable!()
        };
        let mut listener = bind(&address, &spinning()).await.expect("bind");
        let path = courier_transport::shm::control_path(name);
        let mut control = tokio::net::UnixStream::connect(path).await.unwrap();
        let mut header = Vec::new();
        while header.iter().filter(|b| **b == b'\n').count() < 3 {
            header.push(control.read_u8().await.unwrap());
        }
        // The doorbell byte, read without room for the descriptors it
        // carries: the kernel closes them.
        assert_eq!(control.read_u8().await.unwrap(), b'B');
        let header = String::from_utf8(header).unwrap();
        let mut lines = header.lines();
        lines.next().unwrap();
        let (_to_client, to_server) = (lines.next().unwrap(), lines.next().unwrap());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(to_server)
            .unwrap();
        // SAFETY (test): the listener made this file for us; we only write
        // plain bytes into it.
        let mut ours = unsafe { memmap2::MmapMut::map_mut(&file).unwrap() };
        control.write_all(b"+").await.unwrap();
        let mut bytes = courier_wire::preamble::preamble().to_vec();
        let at = bytes.len();
        ours[4096..4096 + at].copy_from_slice(&bytes);
        ours[0..8].copy_from_slice(&(at as u64).to_le_bytes());
        control.write_all(b"D").await.unwrap();
        let mut server = listener.accept().await.expect("accept");

        // Idle: the listener's receive sleeps.
        let polls = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = polls.clone();
        let receiving = tokio::spawn(async move {
            let frame = Counted {
                inner: Box::pin(server.recv()),
                polls: counter,
            }
            .await;
            frame.expect("recv").expect("a frame")
        });
        tokio::task::yield_now().await;
        assert_eq!(ping_pong().await, PING_PONGS);
        let polls = polls.load(Ordering::SeqCst);

        // One frame, rung over the control socket, wakes it.
        let mut frame = bytes::BytesMut::new();
        courier_wire::FrameCodec::new()
            .encode_frame(&Frame::new(FrameKind::Data, 7, "hello"), &mut frame)
            .unwrap();
        bytes.extend_from_slice(&frame);
        ours[4096 + at..4096 + bytes.len()].copy_from_slice(&frame);
        ours[0..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        control.write_all(b"D").await.unwrap();
        let frame = receiving.await.expect("receiving task");
        (polls, frame)
    });
    assert!(polls <= SLEEPING_POLLS, "polled {polls} times while idle");
    assert_eq!((frame.id, &frame.payload[..]), (7, &b"hello"[..]));
}
