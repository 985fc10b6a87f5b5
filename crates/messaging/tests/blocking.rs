//! The blocking face from plain threads, with no runtime of the caller's.

use std::time::Duration;

use courier_messaging::blocking::BlockingNode;
use courier_messaging::{Delivery, NodeConfig, Progress};

#[test]
fn plain_threads_send_receive_and_request() {
    let server =
        BlockingNode::start(NodeConfig::listening("tcp://127.0.0.1:0".parse().unwrap())).unwrap();
    let mut inbox = server.mailbox::<(u32, String)>("inbox").unwrap();
    server
        .respond("len", |s: String| async move { s.len() as u64 })
        .unwrap();
    let at = server.addresses()[0].clone();

    let client = BlockingNode::start(NodeConfig::default()).unwrap();
    let to = client.sender::<(u32, String)>(&at, "inbox", Delivery::EffectivelyOnce);
    let producer = std::thread::spawn(move || {
        for n in 0..50 {
            assert_eq!(
                to.send((n, "x".repeat(n as usize))).unwrap(),
                Progress::Acknowledged
            );
        }
    });
    for n in 0..50 {
        let envelope = inbox
            .recv_timeout(Duration::from_secs(30))
            .expect("a message");
        assert_eq!(envelope.body, (n, "x".repeat(n as usize)));
        assert_eq!(envelope.from, client.id());
    }
    producer.join().unwrap();
    assert!(inbox.try_recv().is_none());

    let length: u64 = client
        .request(&at, "len", &"hello".to_string(), Duration::from_secs(10))
        .unwrap();
    assert_eq!(length, 5);
    assert_eq!(client.shutdown(Duration::from_secs(1)).unfinished, 0);
    assert!(inbox.recv_timeout(Duration::from_millis(10)).is_none());
}
