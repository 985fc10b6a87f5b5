//! Reconnection: capped, jittered, reproducible, and it gets there.

use std::time::Duration;

use courier_transport::*;
use tokio::time::Instant;

#[test]
fn delays_grow_exponentially_within_the_cap_and_replay_from_a_seed() {
    let base = Duration::from_millis(100);
    let cap = Duration::from_secs(2);
    let mut a = Backoff::new(base, cap, 7);
    let mut b = Backoff::new(base, cap, 7);
    let delays: Vec<_> = (0..12).map(|_| a.next_delay()).collect();
    assert_eq!(delays, (0..12).map(|_| b.next_delay()).collect::<Vec<_>>());
    for (attempt, delay) in delays.iter().enumerate() {
        let step = (base * 2u32.pow(attempt as u32)).min(cap);
        assert!(
            *delay >= step / 2 && *delay <= step,
            "attempt {attempt}: {delay:?}"
        );
    }
    let mut other = Backoff::new(base, cap, 8);
    assert_ne!(
        delays,
        (0..12).map(|_| other.next_delay()).collect::<Vec<_>>()
    );
    a.reset();
    assert!(a.next_delay() <= base);
}

#[tokio::test(start_paused = true)]
async fn connect_with_backoff_waits_for_a_listener_that_comes_later() {
    let address: Address = "mem://backoff-later".parse().unwrap();
    let config = TransportConfig::default();
    let late = {
        let address = address.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut listener = bind(&address, &TransportConfig::default()).await.unwrap();
            listener.accept().await.unwrap()
        })
    };
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = connect_with_backoff(&address, &config, &mut backoff, deadline)
        .await
        .unwrap();
    client.send(Frame::data(1, &b"made it"[..])).await.unwrap();
    let mut server = late.await.unwrap();
    assert_eq!(
        &server.recv().await.unwrap().unwrap().payload[..],
        b"made it"
    );
}

#[tokio::test(start_paused = true)]
async fn connect_with_backoff_gives_up_at_the_deadline_with_the_last_error() {
    let address: Address = "mem://backoff-never".parse().unwrap();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 1);
    let start = Instant::now();
    let err = connect_with_backoff(
        &address,
        &TransportConfig::default(),
        &mut backoff,
        start + Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ConnectError::NoListener { .. }));
    assert!(start.elapsed() <= Duration::from_secs(5));
}
