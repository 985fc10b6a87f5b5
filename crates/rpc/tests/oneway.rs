//! One-way calls: no reply, applied in the order each task sent them, and
//! all applied before a later ordinary call on the connection is answered;
//! over every stream transport and in process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_rpc::{Client, ClientConfig, Server, ServerConfig, ServerHandle};
use courier_transport::{bind, Address, TransportConfig};

#[courier_rpc::service]
pub trait Log {
    /// Appends `(task, n)`.
    #[oneway]
    async fn append(&self, task: u32, n: u32);
    /// Panics: a one-way handler that fails must not end the connection.
    #[oneway]
    async fn explode(&self);
    /// Takes 5 ms.
    #[oneway]
    async fn slow(&self);
    /// Everything appended so far, in order.
    async fn entries(&self) -> Vec<(u32, u32)>;
}

#[derive(Clone, Default)]
struct Entries(Arc<Mutex<Vec<(u32, u32)>>>);

impl Log for Entries {
    async fn append(&self, task: u32, n: u32) {
        // Yield first, so a server that ran calls concurrently would mix
        // them up.
        tokio::task::yield_now().await;
        self.0.lock().unwrap().push((task, n));
    }
    async fn explode(&self) {
        panic!("boom");
    }
    async fn slow(&self) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    async fn entries(&self) -> Vec<(u32, u32)> {
        self.0.lock().unwrap().clone()
    }
}

async fn serve(address: Address) -> ServerHandle {
    let listener = bind(&address, &TransportConfig::default()).await.unwrap();
    Server::new(ServerConfig::default())
        .service(LogServer::new(Entries::default()))
        .spawn(listener)
}

fn addresses() -> Vec<Address> {
    let unix = std::env::temp_dir().join(format!("courier-oneway-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&unix);
    vec![
        "tcp://127.0.0.1:0".parse().unwrap(),
        format!("unix://{}", unix.display()).parse().unwrap(),
        Address::mem(format!("oneway-{}", std::process::id())),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_calls_apply_in_each_tasks_order_before_a_later_call() {
    for address in addresses() {
        let server = serve(address.clone()).await;
        let log = LogClient::new(
            Client::connect(server.local_addr(), ClientConfig::default())
                .await
                .unwrap(),
        );
        let (tasks, each) = (4u32, 5_000u32);
        let mut senders = Vec::new();
        for task in 0..tasks {
            let log = log.clone();
            senders.push(tokio::spawn(async move {
                for n in 0..each {
                    log.append(task, n).await.unwrap();
                }
            }));
        }
        for sender in senders {
            sender.await.unwrap();
        }
        // A panicking one-way handler is logged; the connection serves on.
        log.explode().await.unwrap();
        // Answered only after every earlier one-way call has run.
        let entries = log.entries().await.unwrap();
        assert_eq!(entries.len(), (tasks * each) as usize, "{address}");
        let mut next = vec![0u32; tasks as usize];
        for (task, n) in entries {
            assert_eq!(
                n, next[task as usize],
                "{address}: task {task} out of order"
            );
            next[task as usize] += 1;
        }
        server.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn a_backlog_of_one_way_calls_longer_than_the_heartbeat_keeps_the_connection() {
    let server = serve("tcp://127.0.0.1:0".parse().unwrap()).await;
    // Default heartbeats: the client gives up on a server silent for 1 s.
    let log = LogClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    );
    // About 2 s of work queued at once: the client's pings wait behind it
    // and no one-way call is answered, yet the server is alive.
    for _ in 0..400 {
        log.slow().await.unwrap();
    }
    assert!(
        log.entries().await.is_ok(),
        "the connection survived the backlog"
    );
    server.shutdown(Duration::from_secs(1)).await;
}
