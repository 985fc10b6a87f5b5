//! Public types can be shared and moved across tasks and threads.

use courier_messaging::blocking::{BlockingMailbox, BlockingNode, BlockingSender};
use courier_messaging::*;

fn send_sync<T: Send + Sync>() {}
fn send<T: Send>() {}

#[test]
fn public_types_are_send_and_sync() {
    send_sync::<Node>();
    send_sync::<Sender<String>>();
    send::<Mailbox<String>>();
    send_sync::<BlockingNode>();
    send_sync::<BlockingSender<String>>();
    send::<BlockingMailbox<String>>();
    send_sync::<SendError<String>>();
    send_sync::<RequestError>();
    send_sync::<NodeId>();
    send_sync::<Outbox>();
    send_sync::<Inbox<u64>>();
}

#[test]
fn send_and_request_futures_are_send() {
    fn check<F: std::future::Future + Send>(_: F) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let node = Node::start(NodeConfig::default()).await.unwrap();
        let address: courier_transport::Address = "mem://nowhere".parse().unwrap();
        let sender = node.sender::<String>(&address, "x", Delivery::AtMostOnce);
        check(sender.send(String::new()));
        check(node.request::<u8, u8>(&address, "x", &1, std::time::Duration::from_secs(1)));
    });
}
