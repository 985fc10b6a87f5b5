//! Public types can be shared and moved across tasks as users expect.

use courier_transport::*;

fn send_sync<T: Send + Sync>() {}
fn send<T: Send>() {}

#[test]
fn public_types_are_send_and_sync() {
    send_sync::<Connection>();
    send_sync::<FrameSender>();
    send_sync::<FrameReceiver>();
    send_sync::<Listener>();
    send_sync::<Address>();
    send_sync::<TransportConfig>();
    send_sync::<Backoff>();
    send_sync::<SendError>();
    send_sync::<RecvError>();
    send_sync::<ConnectError>();
    send_sync::<BindError>();
    send_sync::<AcceptError>();
}

#[test]
fn futures_are_send() {
    fn check<F: std::future::Future + Send>(_: F) {}
    let config = TransportConfig::default();
    let address: Address = "mem://x".parse().unwrap();
    check(connect(&address, &config));
    check(bind(&address, &config));
    send::<Frame>();
}
