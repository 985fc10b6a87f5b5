//! A fault-injecting TCP proxy between clients and the broker: it can delay,
//! cut and blackhole connections. Clients notice (a cut at once, a
//! blackhole through heartbeats), reconnect and resume.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_broker::{Broker, BrokerConfig};
use courier_pubsub::remote::{RemotePubSub, RemoteSubscription};
use courier_pubsub::{Event, SubscribeOptions};
use courier_rpc::{Client, ClientConfig};
use courier_transport::{Heartbeat, TransportConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASS: u8 = 0;
const DELAY: u8 = 1;

/// Which connections misbehave: each connection is born in a generation;
/// `cut` and `blackhole` start a new one and act on those born before.
#[derive(Default)]
struct Faults {
    mode: AtomicU8,
    generation: AtomicU64,
    cut_before: AtomicU64,
    hole_before: AtomicU64,
}

/// Forwards bytes between clients and `target`, misbehaving on demand:
/// delaying every connection, cutting (closing) the connections open now,
/// or blackholing them (their bytes vanish, their sockets stay open).
struct Proxy {
    address: std::net::SocketAddr,
    faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let born = f.generation.load(Ordering::Acquire);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (from, to) in [
                    (
                        Box::new(client_read) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(server_write) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(server_read), Box::new(client_write)),
                ] {
                    tokio::spawn(pump(from, to, f.clone(), born));
                }
            }
        });
        Proxy {
            address,
            faults,
            task,
        }
    }

    fn set(&self, mode: u8) {
        self.faults.mode.store(mode, Ordering::Release);
    }

    /// Closes every connection open now.
    fn cut(&self) {
        let next = self.faults.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.faults.cut_before.store(next, Ordering::Release);
    }

    /// Silences every connection open now; later ones work.
    fn blackhole(&self) {
        let next = self.faults.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.faults.hole_before.store(next, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    mut to: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    faults: Arc<Faults>,
    born: u64,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // Read with a short timeout so a cut is noticed on idle links too.
        let read = tokio::time::timeout(Duration::from_millis(20), from.read(&mut buffer)).await;
        if born < faults.cut_before.load(Ordering::Acquire) {
            return; // Cut: both halves dropped, both sockets closed.
        }
        let n = match read {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if born < faults.hole_before.load(Ordering::Acquire) {
            continue; // Swallowed: the peer hears nothing.
        }
        if faults.mode.load(Ordering::Acquire) == DELAY {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

async fn next_event(sub: &mut RemoteSubscription) -> Event {
    tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .expect("an event within 30 s")
        .expect("open")
        .expect("no error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_a_misbehaving_network_notice_reconnect_and_resume() {
    let dir = std::env::temp_dir().join(format!("courier-broker-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = BrokerConfig::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.clone();
    config.metrics = String::new();
    config.heartbeat_ms = 100;
    config.shutdown_grace_ms = 100;
    let broker = Broker::start(config).await.unwrap();
    let target = broker.addresses()[0].to_string()["tcp://".len()..]
        .parse()
        .unwrap();
    let proxy = Proxy::start(target).await;

    // The subscriber goes through the proxy, with heartbeats so that a
    // silent link is noticed; the publisher connects directly.
    let mut through = ClientConfig::default();
    through.transport =
        TransportConfig::default().with_heartbeat(Heartbeat::every(Duration::from_millis(100)));
    let proxied: courier_transport::Address = format!("tcp://{}", proxy.address).parse().unwrap();
    let subscriber = RemotePubSub::with_client(Client::connect(&proxied, through).await.unwrap());
    let mut sub = subscriber
        .subscribe("faults.>", SubscribeOptions::default())
        .await
        .unwrap();
    let publisher = RemotePubSub::connect(&broker.addresses()[0], ClientConfig::default())
        .await
        .unwrap()
        .publisher();
    let expect = |payload: &'static str| {
        let publisher = publisher.clone();
        async move {
            publisher.publish("faults.x", payload).await.unwrap();
            payload
        }
    };

    // Delayed: slower, nothing lost.
    proxy.set(DELAY);
    let sent = expect("delayed").await;
    let Event::Message(m) = next_event(&mut sub).await else {
        panic!()
    };
    assert_eq!(&m.payload[..], sent.as_bytes());

    // Cut: the subscription notices at once and restores itself.
    proxy.set(PASS);
    proxy.cut();
    assert_eq!(next_event(&mut sub).await, Event::Restored);
    let sent = expect("after the cut").await;
    let Event::Message(m) = next_event(&mut sub).await else {
        panic!()
    };
    assert_eq!(&m.payload[..], sent.as_bytes());

    // Blackholed: bytes vanish but the socket stays open. Heartbeats go
    // unanswered, the client gives up on the link (after 3 intervals) and
    // makes a new one, which works.
    proxy.blackhole();
    assert_eq!(next_event(&mut sub).await, Event::Restored);
    assert_eq!(sub.restored(), 2);
    let sent = expect("after the blackhole").await;
    let Event::Message(m) = next_event(&mut sub).await else {
        panic!()
    };
    assert_eq!(&m.payload[..], sent.as_bytes());

    drop(sub);
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
