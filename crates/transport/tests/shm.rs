//! `shm://`: round trips, frames larger than a ring, split halves under
//! concurrent use, backpressure from a full ring, a peer killed with
//! SIGKILL, and a peer that scribbles on the rings.
#![cfg(target_os = "linux")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use courier_transport::{bind, connect, Address, Frame, FrameKind, TransportConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

fn shm() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::Shm(format!(
        "test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn small_rings() -> TransportConfig {
    let mut config = TransportConfig::default();
    config.shm_ring_size = 64 * 1024;
    config
}

/// Ring files of this process's listeners still in /dev/shm.
fn leftover_rings(name: &str) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("courier-{name}-")))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_every_size_round_trip_even_larger_than_the_ring() {
    let address = shm();
    let config = small_rings();
    let mut listener = bind(&address, &config).await.unwrap();
    let mut client = connect(&address, &config).await.unwrap();
    let mut server = listener.accept().await.unwrap();
    for size in [0usize, 1, 100, 60_000, 1 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
        // Both ends read while they write: a frame larger than the ring
        // needs the reader to make room as it goes.
        let (echoed, _) = tokio::join!(
            async {
                client
                    .send(Frame::new(FrameKind::Data, size as u64, payload.clone()))
                    .await
                    .unwrap();
                client.recv().await.unwrap().unwrap()
            },
            async {
                let frame = server.recv().await.unwrap().unwrap();
                assert_eq!((frame.id, &frame.payload[..]), (size as u64, &payload[..]));
                server.send(frame).await.unwrap();
            }
        );
        assert_eq!(echoed.payload.len(), size);
    }
    let Address::Shm(name) = &address else {
        panic!()
    };
    assert!(
        leftover_rings(name).is_empty(),
        "ring files are unlinked once mapped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_halves_keep_per_task_order_under_concurrent_use() {
    let address = shm();
    let config = small_rings();
    let mut listener = bind(&address, &config).await.unwrap();
    let client = connect(&address, &config).await.unwrap();
    let server = listener.accept().await.unwrap();
    let (client_tx, mut client_rx) = client.split();
    let (server_tx, mut server_rx) = server.split();
    const TASKS: u64 = 4;
    const EACH: u64 = 2000;
    let mut senders = Vec::new();
    for task in 0..TASKS {
        let tx = client_tx.clone();
        senders.push(tokio::spawn(async move {
            for n in 0..EACH {
                tx.send(Frame::new(
                    FrameKind::Data,
                    task << 32 | n,
                    vec![task as u8; 100],
                ))
                .await
                .unwrap();
            }
        }));
    }
    // The server echoes everything back on its own half.
    let echo = tokio::spawn(async move {
        for _ in 0..TASKS * EACH {
            let frame = server_rx.recv().await.unwrap().unwrap();
            server_tx.send(frame).await.unwrap();
        }
    });
    let mut next = [0u64; TASKS as usize];
    for _ in 0..TASKS * EACH {
        let frame = client_rx.recv().await.unwrap().unwrap();
        let (task, n) = ((frame.id >> 32) as usize, frame.id & 0xFFFF_FFFF);
        assert_eq!(n, next[task], "task {task} out of order");
        next[task] += 1;
    }
    for sender in senders {
        sender.await.unwrap();
    }
    echo.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ring_makes_the_sender_wait_and_loses_nothing() {
    let address = shm();
    let mut config = TransportConfig::default();
    config.shm_ring_size = 4096;
    config.send_buffer = 4096;
    let mut listener = bind(&address, &config).await.unwrap();
    let client = connect(&address, &config).await.unwrap();
    let mut server = listener.accept().await.unwrap();
    let sent = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let sender = tokio::spawn(async move {
        for n in 0..500u64 {
            client
                .send(Frame::new(FrameKind::Data, n, vec![7u8; 1000]))
                .await
                .unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
        }
        client
    });
    // Nobody reads: the sender gets stuck well before 500 frames.
    let mut stuck_at = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = sent.load(Ordering::SeqCst);
        if now == stuck_at && now > 0 {
            break;
        }
        stuck_at = now;
    }
    assert!(
        stuck_at < 500,
        "a full ring stops the sender ({stuck_at} sent)"
    );
    for n in 0..500u64 {
        let frame = server.recv().await.unwrap().unwrap();
        assert_eq!((frame.id, frame.payload.len()), (n, 1000));
    }
    sender.await.unwrap();
}

const CHILD: &str = "COURIER_SHM_TEST_CHILD";

/// Run as a child process by the test below: connects and waits to die.
#[tokio::test]
async fn child_process_peer() {
    let Ok(name) = std::env::var(CHILD) else {
        return; // Only meaningful as the child.
    };
    let address = Address::Shm(name);
    let connection = connect(&address, &TransportConfig::default())
        .await
        .unwrap();
    connection
        .send(Frame::new(FrameKind::Data, 1, "alive"))
        .await
        .unwrap();
    println!("connected");
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_with_sigkill_is_noticed_and_leaves_nothing_behind() {
    let address = shm();
    let Address::Shm(name) = &address else {
        panic!()
    };
    let mut listener = bind(&address, &TransportConfig::default()).await.unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_peer",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, name)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut server = listener.accept().await.unwrap();
    assert_eq!(&server.recv().await.unwrap().unwrap().payload[..], b"alive");
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.contains("connected") {
            break;
        }
    }
    child.kill().await.unwrap(); // SIGKILL
    let outcome = tokio::time::timeout(Duration::from_secs(30), server.recv())
        .await
        .expect("noticed within 30 s");
    assert!(matches!(outcome, Ok(None) | Err(_)), "{outcome:?}");
    drop(server);
    drop(listener);
    assert!(
        leftover_rings(name).is_empty(),
        "{:?}",
        leftover_rings(name)
    );
    assert!(!courier_transport::shm::control_path(name).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_scribbles_on_the_rings_gets_an_error_not_a_crash() {
    // A hand-made client: follows the rendezvous, maps the rings itself,
    // completes the preamble, then corrupts its write index.
    let address = shm();
    let Address::Shm(name) = &address else {
        panic!()
    };
    let mut listener = bind(&address, &TransportConfig::default()).await.unwrap();
    let mut control = tokio::net::UnixStream::connect(courier_transport::shm::control_path(name))
        .await
        .unwrap();
    let mut header = Vec::new();
    while header.iter().filter(|b| **b == b'\n').count() < 3 {
        header.push(control.read_u8().await.unwrap());
    }
    let header = String::from_utf8(header).unwrap();
    let mut lines = header.lines();
    let capacity: usize = lines.next().unwrap().parse().unwrap();
    let (to_client, to_server) = (lines.next().unwrap(), lines.next().unwrap());
    let map = |path: &str| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        // SAFETY (test): the listener made this file for us; we only write
        // plain bytes into it.
        #[allow(unsafe_code)]
        unsafe {
            memmap2::MmapMut::map_mut(&file).unwrap()
        }
    };
    let mut ours = map(to_server);
    let _theirs = map(to_client);
    control.write_all(b"+").await.unwrap();
    // Our preamble, as the real client would write it.
    let preamble = courier_wire::preamble::preamble();
    ours[4096..4096 + preamble.len()].copy_from_slice(&preamble);
    ours[0..8].copy_from_slice(&(preamble.len() as u64).to_le_bytes());
    control.write_all(b"D").await.unwrap();
    let mut server = listener.accept().await.unwrap();
    // Now the write index jumps far past the ring.
    ours[0..8].copy_from_slice(&((capacity as u64) * 1000).to_le_bytes());
    control.write_all(b"D").await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(30), server.recv())
        .await
        .expect("an answer within 30 s");
    let err = outcome.unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
}
