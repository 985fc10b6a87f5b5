//! Generated blocking clients: their own runtime, a shared one, or the
//! caller's; clones and `with_timeout` sharing one connection.

use std::time::{Duration, Instant};

use courier_rpc::blocking::Runtime;
use courier_rpc::{Client, ClientConfig, RpcError, Server, ServerConfig, ServerHandle};

#[courier_rpc::service]
trait Desk {
    async fn echo(&self, text: String) -> String;
    async fn sleep(&self, ms: u64) -> u64;
}

struct DeskImpl;

impl Desk for DeskImpl {
    async fn echo(&self, text: String) -> String {
        text
    }
    async fn sleep(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
}

/// A server on `tokio` (a multi-thread runtime the test keeps).
fn serve(tokio: &tokio::runtime::Runtime) -> ServerHandle {
    tokio.block_on(async {
        let listener =
            courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
                .await
                .unwrap();
        Server::new(ServerConfig::default())
            .service(DeskServer::new(DeskImpl))
            .spawn(listener)
    })
}

/// Waits (a little) for the server to count `expected` connections.
fn assert_connections(server: &ServerHandle, expected: usize) {
    let until = Instant::now() + Duration::from_secs(5);
    while server.connections() != expected && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(server.connections(), expected);
}

#[test]
fn clones_share_the_connection_and_work_from_other_threads() {
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let server = serve(&tokio);
    let desk = DeskBlockingClient::connect(server.local_addr(), ClientConfig::default()).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|n| {
            let desk = desk.clone();
            std::thread::spawn(move || desk.echo(format!("thread {n}")).unwrap())
        })
        .collect();
    for (n, thread) in threads.into_iter().enumerate() {
        assert_eq!(thread.join().unwrap(), format!("thread {n}"));
    }
    assert_connections(&server, 1);
    drop(desk);
    assert_connections(&server, 0);
}

#[test]
fn with_timeout_changes_the_deadline_of_that_client_only() {
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let server = serve(&tokio);
    let desk = DeskBlockingClient::connect(server.local_addr(), ClientConfig::default()).unwrap();
    let hasty = desk.with_timeout(Duration::from_millis(50));
    assert_eq!(
        hasty.client().client().timeout(),
        Some(Duration::from_millis(50))
    );
    assert_eq!(hasty.sleep(5_000).unwrap_err(), RpcError::DeadlineExceeded);
    assert_eq!(
        desk.client().client().timeout(),
        Some(Duration::from_secs(10))
    );
    assert_eq!(desk.sleep(100).unwrap(), 100);
    assert_eq!(hasty.echo("still usable".into()).unwrap(), "still usable");
    let patient = hasty.without_deadline();
    assert_eq!(patient.client().client().timeout(), None);
    assert_eq!(patient.sleep(100).unwrap(), 100);
    assert_connections(&server, 1);
}

#[test]
fn many_clients_share_one_runtime() {
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let server = serve(&tokio);
    let runtime = Runtime::new().unwrap();
    let first =
        DeskBlockingClient::connect_on(&runtime, server.local_addr(), ClientConfig::default())
            .unwrap();
    let second =
        DeskBlockingClient::connect_on(&runtime, server.local_addr(), ClientConfig::default())
            .unwrap();
    assert_eq!(first.echo("one".into()).unwrap(), "one");
    assert_eq!(second.echo("two".into()).unwrap(), "two");
    assert_connections(&server, 2);
    // The runtime outlives the handle the test holds: the clients keep it.
    drop(runtime);
    assert_eq!(first.sleep(10).unwrap(), 10);
    drop((first, second));
    assert_connections(&server, 0);
}

#[test]
fn an_existing_async_client_is_wrapped_on_the_callers_runtime() {
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let server = serve(&tokio);
    let client = tokio
        .block_on(Client::connect(
            server.local_addr(),
            ClientConfig::default(),
        ))
        .unwrap();
    let runtime = Runtime::from_handle(tokio.handle().clone());
    let desk = DeskBlockingClient::new(client.clone(), runtime);
    assert_eq!(desk.echo("blocking".into()).unwrap(), "blocking");
    // Async code goes on using the same connection meanwhile.
    let async_desk = DeskClient::new(client);
    let background = tokio.spawn(async move { async_desk.sleep(200).await });
    assert_eq!(desk.sleep(50).unwrap(), 50);
    assert_eq!(tokio.block_on(background).unwrap().unwrap(), 200);
    assert_eq!(desk.runtime().handle().block_on(async { 7 }), 7);
    assert_connections(&server, 1);
}

#[test]
fn a_streaming_call_iterates_on_a_shared_runtime() {
    #[courier_rpc::service]
    trait Ticker {
        async fn ticks(&self, count: u32, items: courier_rpc::Items<u32>);
    }
    struct Ticking;
    impl Ticker for Ticking {
        async fn ticks(&self, count: u32, items: courier_rpc::Items<u32>) {
            for n in 0..count {
                if items.send(n).await.is_err() {
                    return;
                }
            }
        }
    }
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let server = tokio.block_on(async {
        let listener = courier_transport::bind(
            &"mem://blocking-ticker".parse().unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        Server::new(ServerConfig::default())
            .service(TickerServer::new(Ticking))
            .spawn(listener)
    });
    let ticker = TickerBlockingClient::connect_on(
        &Runtime::from_handle(tokio.handle().clone()),
        server.local_addr(),
        ClientConfig::default(),
    )
    .unwrap();
    let ticks: Vec<u32> = ticker.ticks(50).unwrap().map(Result::unwrap).collect();
    assert_eq!(ticks, (0..50).collect::<Vec<_>>());
}
