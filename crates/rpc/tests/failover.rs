//! A client over several equivalent servers (the nodes of a cluster), on
//! real TCP sockets: it connects to the first that answers, moves to the
//! next when the one in use goes away, fails what was in flight there, and
//! reports the last error when none answers.

use std::sync::Arc;
use std::time::Duration;

use courier_rpc::{Client, ClientConfig, Items, RpcError, Server, ServerConfig, ServerHandle};
use courier_transport::{bind, Address, TransportConfig};
use tokio::sync::Notify;

#[courier_rpc::service]
pub trait Node {
    /// Which node answered.
    async fn name(&self) -> String;
    /// Sleeps `ms`, after telling the test it started.
    async fn hold(&self, ms: u64) -> u64;
    /// Sends 0, 1, 2, ... one item every `ms`, for ever.
    async fn ticks(&self, ms: u64, items: Items<u64>);
}

#[derive(Clone)]
struct NodeImpl {
    name: &'static str,
    started: Arc<Notify>,
}

impl Node for NodeImpl {
    async fn name(&self) -> String {
        self.name.to_string()
    }
    async fn hold(&self, ms: u64) -> u64 {
        self.started.notify_one();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
    async fn ticks(&self, ms: u64, items: Items<u64>) {
        for n in 0.. {
            if items.send(n).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

struct Running {
    server: ServerHandle,
    address: Address,
    started: Arc<Notify>,
}

/// Serves one node on `address` (port 0 for a free one).
async fn serve_on(name: &'static str, address: &Address) -> Result<Running, String> {
    let listener = bind(address, &TransportConfig::default())
        .await
        .map_err(|err| err.to_string())?;
    let started = Arc::new(Notify::new());
    let server = Server::new(ServerConfig::default())
        .service(NodeServer::new(NodeImpl {
            name,
            started: started.clone(),
        }))
        .spawn(listener);
    let address = server.local_addr().clone();
    Ok(Running {
        server,
        address,
        started,
    })
}

async fn serve(name: &'static str) -> Running {
    let any: Address = "tcp://127.0.0.1:0".parse().unwrap();
    serve_on(name, &any).await.unwrap()
}

/// An address nothing listens on: a port the system handed out and that
/// was let go at once.
fn dead_address() -> Address {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Address::tcp(listener.local_addr().unwrap())
}

/// A bound for waits that only a bug would make long.
const PATIENCE: Duration = Duration::from_secs(30);

/// Waits (at most 3,000 turns of 10 ms) until the client has noticed that
/// its connection died.
async fn until_disconnected(client: &Client) {
    for _ in 0..3_000 {
        if client.epoch().await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the client never noticed its connection died");
}

async fn name(node: &NodeClient) -> Result<String, RpcError> {
    tokio::time::timeout(PATIENCE, node.name())
        .await
        .expect("a call ends within its deadline")
}

#[tokio::test]
async fn calls_move_to_the_next_server_when_the_one_in_use_shuts_down() {
    let (a, b) = (serve("a").await, serve("b").await);
    let addresses = [a.address.clone(), b.address.clone()];
    let client = Client::connect_any(&addresses, ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(client.addresses(), &addresses);
    assert_eq!(client.address(), a.address);
    let node = NodeClient::new(client.clone());
    for _ in 0..3 {
        assert_eq!(name(&node).await.unwrap(), "a");
    }

    // A call and a stream in flight on A when it shuts down fail: they are
    // never resent to B, since A may have run them.
    let held = tokio::spawn({
        let node = node.clone();
        async move { node.hold(60_000).await }
    });
    tokio::time::timeout(PATIENCE, a.started.notified())
        .await
        .expect("the held call reached A");
    let mut ticks = node.ticks(1).await.unwrap();
    assert_eq!(ticks.next().await.unwrap(), Ok(0));
    a.server.shutdown(Duration::ZERO).await;
    let err = held.await.unwrap().unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let ended = tokio::time::timeout(PATIENCE, async {
        // Items already on their way may come first; the stream then ends
        // with an error, not quietly.
        for _ in 0..100_000 {
            match ticks.next().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
        panic!("the stream went on after its server shut down");
    })
    .await
    .expect("the stream ends");
    assert!(matches!(ended, Some(Err(err)) if err.is_retryable()));

    // The next calls go to B, at once.
    until_disconnected(&client).await;
    assert_eq!(name(&node).await.unwrap(), "b");
    assert_eq!(client.address(), b.address);
    let mut ticks = node.ticks(1).await.unwrap();
    assert_eq!(ticks.next().await.unwrap(), Ok(0), "streams too");
    drop(ticks);

    // A node back on the first address takes over when B goes: round the
    // list. (If another process took the port meanwhile, that part cannot
    // run here; it says so rather than failing for something else's sake.)
    let again = match serve_on("a again", &a.address).await {
        Ok(again) => again,
        Err(err) => {
            eprintln!("skipping the return to {}: {err}", a.address);
            return;
        }
    };
    b.server.shutdown(Duration::ZERO).await;
    until_disconnected(&client).await;
    assert_eq!(name(&node).await.unwrap(), "a again");
    assert_eq!(client.address(), again.address);
    assert_eq!(client.epoch().await, 3);
}

#[tokio::test]
async fn a_dead_first_address_is_passed_over_at_once() {
    let b = serve("b").await;
    let addresses = [dead_address(), b.address.clone()];
    let client = Client::connect_any(&addresses, ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(client.address(), b.address);
    assert_eq!(client.epoch().await, 1, "one connection, to B");
    assert_eq!(name(&NodeClient::new(client)).await.unwrap(), "b");

    // The same on a lazy client's first call.
    let lazy = Client::lazy_any(&addresses, ClientConfig::default()).unwrap();
    assert_eq!(lazy.address(), addresses[0], "nothing tried yet");
    assert_eq!(name(&NodeClient::new(lazy.clone())).await.unwrap(), "b");
    assert_eq!(lazy.address(), b.address);
}

#[tokio::test]
async fn when_every_address_is_dead_the_error_is_the_last_ones() {
    let (first, last) = (dead_address(), dead_address());
    let addresses = [first, last.clone()];
    let err = tokio::time::timeout(
        PATIENCE,
        Client::connect_any(&addresses, ClientConfig::default()),
    )
    .await
    .expect("bounded")
    .unwrap_err();
    match &err {
        RpcError::Unavailable(reason) => {
            assert!(reason.contains(&last.to_string()), "{reason}")
        }
        other => panic!("{other:?}"),
    }

    // A lazy client's calls each go round once and fail the same way.
    let node = NodeClient::new(Client::lazy_any(&addresses, ClientConfig::default()).unwrap());
    for _ in 0..3 {
        assert!(matches!(name(&node).await, Err(RpcError::Unavailable(_))));
    }
    // And an empty list is refused before anything is tried.
    assert!(Client::connect_any(&[], ClientConfig::default())
        .await
        .is_err());
}
