//! Transports between real processes: round trips, a peer killed with
//! SIGKILL, and a restart on the same address.

use std::time::Duration;

use courier_integration_tests::Peer;
use courier_transport::{
    connect, connect_with_backoff, Address, Backoff, Frame, RecvError, TransportConfig,
};

const PEER: &str = env!("CARGO_BIN_EXE_courier-peer");

fn socket_path(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("courier-it-{}-{name}.sock", std::process::id()))
        .display()
        .to_string()
}

/// Every test is bounded: a hang is a failure, not a stuck CI run.
async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 60 s"))
}

#[tokio::test]
async fn frames_round_trip_between_processes_over_tcp_and_unix() {
    let unix = format!("unix://{}", socket_path("echo"));
    for address in ["tcp://127.0.0.1:0", unix.as_str()] {
        let peer = Peer::start(PEER, &["echo", address]).unwrap();
        let mut conn = connect(&peer.address, &TransportConfig::default())
            .await
            .unwrap();
        bounded("round trips", async {
            for id in 0..1000u64 {
                conn.send(Frame::data(id, id.to_le_bytes().to_vec()))
                    .await
                    .unwrap();
                let echo = conn.recv().await.unwrap().unwrap();
                assert_eq!(echo.id, id);
            }
            let large = Frame::data(7, vec![3u8; 2 << 20]);
            let sender = conn.sender();
            let (sent, echo) = tokio::join!(sender.send(large.clone()), conn.recv());
            sent.unwrap();
            assert_eq!(echo.unwrap().unwrap(), large);
        })
        .await;
    }
}

#[tokio::test]
async fn a_killed_peer_ends_the_connection_and_a_restarted_one_is_reached_again() {
    let path = socket_path("restart");
    let address = format!("unix://{path}");
    let mut peer = Peer::start(PEER, &["echo", &address]).unwrap();
    let config = TransportConfig::default();
    let mut conn = connect(&peer.address, &config).await.unwrap();
    conn.send(Frame::data(1, &b"before"[..])).await.unwrap();
    assert_eq!(conn.recv().await.unwrap().unwrap().id, 1);

    peer.kill();
    // The kernel closes the dead process's socket: recv ends, promptly.
    let ended = bounded("noticing the death", conn.recv()).await;
    assert!(
        matches!(ended, Ok(None) | Err(RecvError::Io(_))),
        "{ended:?}"
    );

    // A new process on the same path: the stale socket file left by the
    // killed one is replaced, and the client reconnects with backoff.
    let restarted = Peer::start(PEER, &["echo", &address]).unwrap();
    assert_ne!(restarted.pid(), peer.pid());
    let target: Address = address.parse().unwrap();
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500), 3);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut conn = connect_with_backoff(&target, &config, &mut backoff, deadline)
        .await
        .unwrap();
    conn.send(Frame::data(2, &b"after"[..])).await.unwrap();
    assert_eq!(
        bounded("echo after restart", conn.recv())
            .await
            .unwrap()
            .unwrap()
            .id,
        2
    );
}

#[tokio::test]
async fn a_peer_killed_mid_frame_yields_unexpected_eof_never_a_partial_frame() {
    let mut peer = Peer::start(PEER, &["half-frame"]).unwrap();
    let mut conn = connect(&peer.address, &TransportConfig::default())
        .await
        .unwrap();
    // Let the half frame arrive, then kill the writer.
    let early = tokio::time::timeout(Duration::from_millis(200), conn.recv()).await;
    assert!(
        early.is_err(),
        "half a frame must not be delivered: {early:?}"
    );
    peer.kill();
    let err = bounded("noticing the death", conn.recv())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RecvError::UnexpectedEof { buffered } if buffered > 0),
        "{err:?}"
    );
}
