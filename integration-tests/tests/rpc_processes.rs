//! RPC against a server in another process that is killed and restarted.

use std::time::Duration;

use courier_integration_tests::rpc_service::SlowClient;
use courier_integration_tests::Peer;
use courier_rpc::{Client, ClientConfig, RpcError};

const PEER: &str = env!("CARGO_BIN_EXE_courier-rpc-peer");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_fail_promptly_when_the_server_is_killed_and_succeed_after_restart() {
    let path = std::env::temp_dir().join(format!("courier-rpc-it-{}.sock", std::process::id()));
    let address = format!("unix://{}", path.display());
    let mut server = Peer::start(PEER, &[&address]).unwrap();
    let config = ClientConfig::default();
    let slow = SlowClient::new(Client::connect(&server.address, config).await.unwrap())
        .with_timeout(Duration::from_secs(600));
    assert_eq!(slow.echo(1).await.unwrap(), 1);

    let calls: Vec<_> = (0..100)
        .map(|_| {
            let slow = slow.clone();
            tokio::spawn(async move { slow.wait(300_000).await })
        })
        .collect();
    // Let the requests reach the server (a call not yet sent when the server
    // dies fails the same way, so this is not a timing assumption).
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill();

    let started = std::time::Instant::now();
    for call in calls {
        let outcome = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("a call in flight hung after the server died")
            .unwrap();
        assert!(
            matches!(outcome, Err(RpcError::Unavailable(_))),
            "{outcome:?}"
        );
    }
    println!("100 calls failed {:?} after the kill", started.elapsed());

    // The same client works again once a server is back on the address.
    let _restarted = Peer::start(PEER, &[&address]).unwrap();
    assert_eq!(slow.echo(2).await.unwrap(), 2);
}
