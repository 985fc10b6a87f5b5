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
