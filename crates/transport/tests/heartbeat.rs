//! Liveness: a silent peer is detected; a live one is not. Driven by tokio's
//! paused clock, so "three seconds of silence" takes no real time.

mod common;

use std::time::Duration;

use common::pair;
use courier_transport::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn heartbeat_config() -> TransportConfig {
    TransportConfig::default().with_heartbeat(Heartbeat {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(3),
    })
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_detected_within_the_timeout() {
    let config = heartbeat_config();
    let mut listener = bind(
        &"mem://heartbeat-silent".parse().unwrap(),
        &TransportConfig::default(),
    )
    .await
    .unwrap();
    let mut client = connect(listener.local_addr(), &config).await.unwrap();
    // The server side exists but never reads or writes: a frozen process.
    let _frozen = listener.accept().await.unwrap();

    let started = tokio::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(60), client.recv())
        .await
        .expect("detected well within a minute")
        .unwrap_err();
    assert!(
        matches!(err, RecvError::PeerSilent { after } if after == Duration::from_secs(3)),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn a_live_peer_answers_pings_even_without_heartbeats_of_its_own() {
    let mut listener = bind(
        &"mem://heartbeat-live".parse().unwrap(),
        &TransportConfig::default(),
    )
    .await
    .unwrap();
    let mut client = connect(listener.local_addr(), &heartbeat_config())
        .await
        .unwrap();
    let mut server = listener.accept().await.unwrap();
    // The server only reads, which is enough for it to answer pings.
    tokio::spawn(async move { while let Ok(Some(_)) = server.recv().await {} });

    // A minute of idleness: no PeerSilent, the recv is simply still waiting.
    let waited = tokio::time::timeout(Duration::from_secs(60), client.recv()).await;
    assert!(waited.is_err(), "still alive after a minute: {waited:?}");
}

#[tokio::test(start_paused = true)]
async fn pings_are_invisible_to_the_application() {
    let config = heartbeat_config();
    let (_listener, client, mut server) = pair("mem", &config).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    client.send(Frame::data(42, &b"real"[..])).await.unwrap();
    let frame = server.recv().await.unwrap().unwrap();
    assert_eq!((frame.kind, frame.id), (FrameKind::Data, 42));
    drop(client);
    assert!(server.recv().await.unwrap().is_none());
}

#[tokio::test]
async fn a_frozen_tcp_peer_is_detected() {
    let config = heartbeat_config();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = Address::tcp(listener.local_addr().unwrap());
    // A peer that completes the handshake, then freezes: it keeps the socket
    // open but never sends another byte.
    let frozen = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut theirs = [0u8; 8];
        socket.read_exact(&mut theirs).await.unwrap();
        socket
            .write_all(&courier_wire::preamble::preamble())
            .await
            .unwrap();
        std::future::pending::<()>().await;
        drop(socket);
    });
    let mut client = connect(&address, &config).await.unwrap();
    // From here on, time is simulated: the runtime jumps ahead whenever it
    // has nothing else to do, so the three seconds pass at once.
    tokio::time::pause();
    let err = tokio::time::timeout(Duration::from_secs(60), client.recv())
        .await
        .expect("detected well within a minute")
        .unwrap_err();
    assert!(matches!(err, RecvError::PeerSilent { .. }), "{err:?}");
    frozen.abort();
}
