//! Competing queue consumers in separate processes: one is killed mid-batch
//! and its unacknowledged messages go to another.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use courier_integration_tests::Peer;
use courier_queue::remote::RemoteQueue;
use courier_queue::Message;
use courier_rpc::ClientConfig;

const PEER: &str = env!("CARGO_BIN_EXE_courier-queue-peer");

#[tokio::test]
async fn a_consumer_process_killed_mid_batch_hands_its_messages_to_another() {
    let dir = std::env::temp_dir().join(format!("courier-queue-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let host = Peer::start(PEER, &["host", dir.to_str().unwrap()]).unwrap();
    let queue = RemoteQueue::connect(&host.address, "jobs", ClientConfig::default())
        .await
        .unwrap();
    queue
        .enqueue_batch((0..10u8).map(|n| Message::new(vec![n])).collect())
        .await
        .unwrap();

    // A consumer process takes five messages and holds them.
    let address = host.address.to_string();
    let mut victim = Command::new(PEER)
        .args(["consume", &address, "jobs", "5"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(victim.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "consuming");
    let held: HashSet<u64> = (0..5)
        .map(|_| lines.next().unwrap().unwrap().parse().unwrap())
        .collect();
    assert_eq!(queue.stats().await.unwrap().in_flight, 5);

    victim.kill().unwrap(); // kill -9, mid-batch
    victim.wait().unwrap();

    // Another consumer gets all ten: the victim's five as second deliveries.
    let mut survivor = queue.consumer(10).await.unwrap();
    let mut redelivered = HashSet::new();
    let mut total = 0;
    while total < 10 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), survivor.recv())
            .await
            .expect("the victim's messages came back")
            .unwrap();
        if delivery.delivery == 2 {
            redelivered.insert(delivery.id);
        }
        delivery.ack().await.unwrap();
        total += 1;
    }
    assert_eq!(redelivered, held);
    assert_eq!(queue.stats().await.unwrap().acknowledged, 10);
    let _ = std::fs::remove_dir_all(&dir);
}
