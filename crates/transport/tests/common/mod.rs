//! Helpers shared by the transport tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

use courier_transport::{bind, connect, Address, Connection, Listener, TransportConfig};

/// A fresh address of each kind: port 0, a unique socket path, a unique name.
pub fn fresh(kind: &str) -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    match kind {
        "tcp" => "tcp://127.0.0.1:0".parse().unwrap(),
        "udp" => "udp://127.0.0.1:0".parse().unwrap(),
        "unix" => Address::unix(std::env::temp_dir().join(format!("courier-test-{pid}-{n}.sock"))),
        "mem" => Address::mem(format!("test-{pid}-{n}")),
        other => panic!("unknown kind {other}"),
    }
}

pub const ALL: [&str; 4] = ["tcp", "unix", "udp", "mem"];
pub const STREAMS: [&str; 3] = ["tcp", "unix", "mem"];

/// A listener, a client connection, and the server's side of it.
///
/// UDP has no handshake: the server side appears when the first frame
/// arrives, so the client sends one `Hello` frame first and the server
/// consumes it.
pub async fn pair(kind: &str, config: &TransportConfig) -> (Listener, Connection, Connection) {
    let mut listener = bind(&fresh(kind), config).await.unwrap();
    let client = connect(listener.local_addr(), config).await.unwrap();
    if kind == "udp" {
        client
            .send(courier_transport::Frame::new(
                courier_transport::FrameKind::Hello,
                0,
                bytes::Bytes::new(),
            ))
            .await
            .unwrap();
    }
    let mut server = listener.accept().await.unwrap();
    if kind == "udp" {
        let hello = server.recv().await.unwrap().unwrap();
        assert_eq!(hello.kind, courier_transport::FrameKind::Hello);
    }
    (listener, client, server)
}
