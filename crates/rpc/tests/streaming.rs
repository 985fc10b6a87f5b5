//! Server streaming: order, flow control, cancellation, the blocking face.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_rpc::{
    Client, ClientConfig, ItemError, Items, RpcError, Server, ServerConfig, ServerHandle,
};
use courier_transport::{bind, Address, TransportConfig};

#[courier_rpc::service]
pub trait Feed {
    /// Sends 0..count.
    async fn numbers(&self, count: u64, items: Items<u64>);
    /// Sends forever, counting what it managed to send.
    async fn endless(&self, items: Items<Vec<u8>>);
    async fn plain(&self) -> u8;
    /// Sends items of these sizes; with `checked`, an item too large for a
    /// frame is replaced by an empty one and the stream goes on.
    async fn sized(&self, sizes: Vec<u32>, checked: bool, items: Items<Vec<u8>>);
}

#[derive(Default, Clone)]
struct FeedImpl {
    sent: Arc<AtomicU64>,
    stopped: Arc<AtomicUsize>,
}

struct OnDrop(Arc<AtomicUsize>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Feed for FeedImpl {
    async fn numbers(&self, count: u64, items: Items<u64>) {
        for n in 0..count {
            items.send(n).await.unwrap();
        }
    }
    async fn endless(&self, items: Items<Vec<u8>>) {
        let _stopped = OnDrop(self.stopped.clone());
        loop {
            if items.send(vec![0u8; 1024]).await.is_err() {
                return;
            }
            self.sent.fetch_add(1, Ordering::SeqCst);
        }
    }
    async fn plain(&self) -> u8 {
        7
    }
    async fn sized(&self, sizes: Vec<u32>, checked: bool, items: Items<Vec<u8>>) {
        for size in sizes {
            let item = vec![1u8; size as usize];
            if !checked {
                if items.send(item).await.is_err() {
                    return;
                }
                continue;
            }
            match items.send_checked(&item).await {
                Ok(()) => {}
                Err(ItemError::TooLarge { size, limit }) => {
                    assert!(size > limit);
                    items.send(Vec::new()).await.unwrap();
                }
                Err(err) => panic!("{err}"),
            }
        }
    }
}

fn mem() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "stream-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn serve(address: Address) -> (ServerHandle, FeedImpl) {
    let feed = FeedImpl::default();
    let listener = bind(&address, &TransportConfig::default()).await.unwrap();
    let server = Server::new(ServerConfig::default())
        .service(FeedServer::new(feed.clone()))
        .spawn(listener);
    (server, feed)
}

#[tokio::test]
async fn items_arrive_in_order_and_the_stream_ends() {
    for address in ["tcp://127.0.0.1:0".parse().unwrap(), mem()] {
        let (server, _) = serve(address).await;
        let feed = FeedClient::new(
            Client::connect(server.local_addr(), ClientConfig::default())
                .await
                .unwrap(),
        );
        let mut numbers = feed.numbers(10_000).await.unwrap();
        for expected in 0..10_000 {
            assert_eq!(numbers.next().await.unwrap().unwrap(), expected);
        }
        assert!(numbers.next().await.is_none());
        assert!(numbers.next().await.is_none(), "stays ended");
        assert_eq!(
            feed.plain().await.unwrap(),
            7,
            "unary calls share the connection"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_client_bounds_what_the_server_produces() {
    let (server, feed_impl) = serve(mem()).await;
    let feed = FeedClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    )
    .with_timeout(Duration::from_secs(3600));
    let mut items = feed.endless().await.unwrap();
    for _ in 0..100 {
        items.next().await.unwrap().unwrap();
    }
    // The client stops reading. A minute later the server has produced at
    // most one window beyond what was consumed, not gigabytes.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let sent = feed_impl.sent.load(Ordering::SeqCst);
    assert!(
        (100..=100 + 32).contains(&sent),
        "server produced {sent} items for a client that took 100"
    );
    // Reading resumes where it stopped.
    for _ in 0..1000 {
        items.next().await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn dropping_the_stream_stops_the_handler() {
    let (server, feed_impl) = serve(mem()).await;
    let feed = FeedClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    );
    let mut items = feed.endless().await.unwrap();
    items.next().await.unwrap().unwrap();
    drop(items);
    tokio::time::timeout(Duration::from_secs(10), async {
        while feed_impl.stopped.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the handler stopped");
    assert_eq!(
        feed.plain().await.unwrap(),
        7,
        "the connection is still good"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_bounded_by_its_deadline() {
    let (server, _) = serve(mem()).await;
    let feed = FeedClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    )
    .with_timeout(Duration::from_secs(5));
    let mut items = feed.endless().await.unwrap();
    let mut outcome = None;
    while let Some(item) = items.next().await {
        if let Err(err) = item {
            outcome = Some(err);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(outcome, Some(RpcError::DeadlineExceeded));
}

#[test]
fn the_blocking_client_iterates_a_stream() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (server, _) = runtime.block_on(serve("tcp://127.0.0.1:0".parse().unwrap()));
    let feed = FeedBlockingClient::connect(server.local_addr(), ClientConfig::default()).unwrap();
    let numbers: Vec<u64> = feed.numbers(100).unwrap().map(Result::unwrap).collect();
    assert_eq!(numbers, (0..100).collect::<Vec<_>>());
    assert_eq!(feed.plain().unwrap(), 7);
    drop(feed);
    drop(server);
}

#[tokio::test]
async fn streams_past_the_limit_are_refused_and_never_stall_unary_calls() {
    let feed = FeedImpl::default();
    let listener = bind(&mem(), &TransportConfig::default()).await.unwrap();
    let server = Server::new(
        ServerConfig::default()
            .with_max_in_flight(1)
            .with_max_streams(3),
    )
    .service(FeedServer::new(feed.clone()))
    .spawn(listener);
    let client = FeedClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    );
    // More open streams than unary slots: streams do not take those slots.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = client
            .with_timeout(Duration::from_secs(3600))
            .endless()
            .await
            .unwrap();
        assert!(stream.next().await.unwrap().is_ok());
        open.push(stream);
    }
    let mut refused = client.numbers(1).await.unwrap();
    assert_eq!(
        refused.next().await.unwrap().unwrap_err(),
        RpcError::TooManyStreams { limit: 3 }
    );
    assert_eq!(
        client.plain().await.unwrap(),
        7,
        "the connection still serves"
    );
    // Closing one makes room for another.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut numbers = client.numbers(2).await.unwrap();
        match numbers.next().await.unwrap() {
            Ok(0) => break,
            Err(RpcError::TooManyStreams { .. }) => {
                // The cancellation is still on its way to the server.
                assert!(tokio::time::Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Issue 12, item 3: an item too large for a frame once ended the stream
/// as if the handler had finished.
#[tokio::test]
async fn an_item_that_cannot_be_sent_ends_the_stream_with_an_error() {
    let (server, _) = serve("tcp://127.0.0.1:0".parse().unwrap()).await;
    let feed = FeedClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    );
    let too_large = 8 << 20; // past the default 4 MiB frame limit
    let mut items = feed.sized(vec![10, too_large, 10], false).await.unwrap();
    assert_eq!(items.next().await.unwrap().unwrap().len(), 10);
    match items.next().await {
        Some(Err(RpcError::ItemNotSent(reason))) => assert!(reason.contains("exceeds")),
        other => panic!("expected ItemNotSent, got {other:?}"),
    }
    assert!(items.next().await.is_none(), "ended after the error");
    assert_eq!(feed.plain().await.unwrap(), 7, "the connection is fine");

    // send_checked refuses the item and the stream goes on.
    let mut items = feed.sized(vec![10, too_large, 10], true).await.unwrap();
    let mut sizes = Vec::new();
    while let Some(item) = items.next().await {
        sizes.push(item.unwrap().len());
    }
    assert_eq!(sizes, [10, 0, 10]);
}
