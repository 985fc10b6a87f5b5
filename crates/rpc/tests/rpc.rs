//! RPC at its own boundary: transports, concurrency, deadlines,
//! cancellation, limits, faults and versioning.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_rpc::{Client, ClientConfig, RpcError, Server, ServerConfig, ServerHandle};
use courier_transport::{bind, Address, TransportConfig};

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
pub enum LabError {
    Negative(i64),
}

#[courier_rpc::service]
pub trait Lab {
    async fn add(&self, a: i64, b: i64) -> i64;
    async fn sqrt(&self, x: i64) -> Result<u64, LabError>;
    async fn sleep(&self, ms: u64) -> u64;
    /// Sleeps, counting how many calls are inside at once.
    async fn crowd(&self, ms: u64) -> usize;
    /// Every 500th call never answers: a lost reply.
    async fn flaky(&self, n: u64) -> u64;
    async fn ping(&self);
    /// Yields to the runtime once, then answers: pending at its first poll.
    async fn yield_once(&self, n: u64) -> u64;
}

#[derive(Default)]
struct LabImpl {
    inside: AtomicUsize,
    most_inside: AtomicUsize,
    dropped: Arc<AtomicUsize>,
    started: Arc<tokio::sync::Notify>,
}

/// Counts handlers stopped before they finished.
struct DropFlag(Arc<AtomicUsize>, bool);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Lab for LabImpl {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }
    async fn sqrt(&self, x: i64) -> Result<u64, LabError> {
        if x < 0 {
            Err(LabError::Negative(x))
        } else {
            Ok((x as f64).sqrt() as u64)
        }
    }
    async fn sleep(&self, ms: u64) -> u64 {
        let mut flag = DropFlag(self.dropped.clone(), false);
        self.started.notify_one();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        flag.1 = true;
        ms
    }
    async fn crowd(&self, ms: u64) -> usize {
        let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_inside.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.inside.fetch_sub(1, Ordering::SeqCst);
        now
    }
    async fn flaky(&self, n: u64) -> u64 {
        if n % 500 == 499 {
            std::future::pending::<()>().await;
        }
        n
    }
    async fn ping(&self) {}
    async fn yield_once(&self, n: u64) -> u64 {
        tokio::task::yield_now().await;
        n
    }
}

/// Sends `sleep(ms)` as a raw request frame, as a client that never sends
/// `Cancel` would, with the given deadline.
async fn raw_sleep_request(
    conn: &courier_transport::Connection,
    id: u64,
    ms: u64,
    timeout_ms: u64,
) {
    #[derive(serde::Serialize)]
    struct Header<'a> {
        service: &'a str,
        method: &'a str,
        fingerprint: u64,
        timeout_ms: u64,
        window: u32,
    }
    let header = Header {
        service: "Lab",
        method: "sleep",
        fingerprint: LabClient::method_fingerprint("sleep").unwrap(),
        timeout_ms,
        window: 0,
    };
    conn.send_message(courier_transport::FrameKind::Request, id, &(header, (ms,)))
        .await
        .unwrap();
}

fn mem() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "rpc-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn serve(address: Address, config: ServerConfig) -> (ServerHandle, Arc<LabImpl>) {
    let lab = Arc::new(LabImpl::default());
    struct Shared(Arc<LabImpl>);
    impl Lab for Shared {
        async fn add(&self, a: i64, b: i64) -> i64 {
            self.0.add(a, b).await
        }
        async fn sqrt(&self, x: i64) -> Result<u64, LabError> {
            self.0.sqrt(x).await
        }
        async fn sleep(&self, ms: u64) -> u64 {
            self.0.sleep(ms).await
        }
        async fn crowd(&self, ms: u64) -> usize {
            self.0.crowd(ms).await
        }
        async fn flaky(&self, n: u64) -> u64 {
            self.0.flaky(n).await
        }
        async fn ping(&self) {}
        async fn yield_once(&self, n: u64) -> u64 {
            self.0.yield_once(n).await
        }
    }
    let listener = bind(&address, &TransportConfig::default()).await.unwrap();
    let handle = Server::new(config)
        .service(LabServer::new(Shared(lab.clone())))
        .spawn(listener);
    (handle, lab)
}

async fn client(server: &ServerHandle) -> LabClient {
    LabClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    )
}

#[tokio::test]
async fn calls_work_over_tcp_unix_mem_and_shm() {
    let unix = Address::unix(
        std::env::temp_dir().join(format!("courier-rpc-{}.sock", std::process::id())),
    );
    let mut addresses = vec!["tcp://127.0.0.1:0".parse().unwrap(), unix, mem()];
    if cfg!(target_os = "linux") {
        addresses.push(Address::Shm(format!("rpc-{}", std::process::id())));
    }
    for address in addresses {
        let (server, _) = serve(address, ServerConfig::default()).await;
        let lab = client(&server).await;
        assert_eq!(lab.add(40, 2).await.unwrap(), 42);
        assert_eq!(lab.sqrt(81).await.unwrap(), Ok(9));
        assert_eq!(
            lab.sqrt(-4).await.unwrap(),
            Err(LabError::Negative(-4)),
            "the service's own error"
        );
        lab.ping().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_calls_on_one_connection() {
    let (server, _) = serve(
        "tcp://127.0.0.1:0".parse().unwrap(),
        ServerConfig::default(),
    )
    .await;
    let lab = client(&server).await.with_timeout(Duration::from_secs(60));
    let calls: Vec<_> = (0..10_000i64)
        .map(|n| {
            let lab = lab.clone();
            tokio::spawn(async move { lab.add(n, n).await })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), 2 * n as i64);
    }
}

#[tokio::test]
async fn unknown_services_and_methods_are_named_in_the_error() {
    let (server, _) = serve(mem(), ServerConfig::default()).await;
    let raw = Client::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap();
    // A method the service lacks has no fingerprint; whatever the request
    // carries, the answer is that the method is unknown.
    assert_eq!(LabClient::method_fingerprint("fly"), None);
    let err = raw.call::<(), ()>("Lab", "fly", 0, &()).await.unwrap_err();
    assert_eq!(
        err,
        RpcError::UnknownMethod {
            service: "Lab".into(),
            method: "fly".into()
        }
    );
    assert!(err.to_string().contains("fly") && !err.is_retryable());
    let err = raw
        .call::<(), ()>("Garden", "grow", 0, &())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        RpcError::UnknownService {
            service: "Garden".into()
        }
    );
}

mod changed {
    // The same service name, with `add` taking other types and `ping`
    // unchanged: a client built from this definition must not call `add`
    // on a server built from the other, and can still call `ping`.
    #[courier_rpc::service]
    pub trait Lab {
        async fn add(&self, a: i32, b: i32) -> i32;
        async fn ping(&self);
    }
}

#[tokio::test]
async fn a_client_of_a_changed_method_gets_a_mismatch_naming_it() {
    let (server, _) = serve(mem(), ServerConfig::default()).await;
    let stale = changed::LabClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    );
    assert_ne!(
        changed::LabClient::method_fingerprint("add"),
        LabClient::method_fingerprint("add")
    );
    assert_eq!(
        changed::LabClient::method_fingerprint("ping"),
        LabClient::method_fingerprint("ping")
    );
    let err = stale.add(1, 2).await.unwrap_err();
    assert_eq!(
        err,
        RpcError::ProtocolMismatch {
            service: "Lab".into(),
            method: "add".into()
        }
    );
    assert!(err.to_string().contains("\"add\"") && !err.is_retryable());
    // The method that did not change still works on the same connection.
    stale.ping().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_client_gives_up_at_the_deadline_and_the_server_stops_the_handler() {
    let (server, lab) = serve(mem(), ServerConfig::default()).await;
    let client = client(&server).await.with_timeout(Duration::from_secs(1));
    let started = tokio::time::Instant::now();
    assert_eq!(
        client.sleep(60_000).await.unwrap_err(),
        RpcError::DeadlineExceeded
    );
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    // The handler was stopped, not left running for a minute.
    for _ in 0..100 {
        if lab.dropped.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(lab.dropped.load(Ordering::SeqCst), 1);
    assert_eq!(
        client.sleep(10).await.unwrap(),
        10,
        "the connection is still good"
    );
}

#[tokio::test(start_paused = true)]
async fn the_server_enforces_the_deadline_it_was_given_even_without_a_cancel() {
    // A client that never cancels: raw frames, deadline 100 ms.
    let (server, lab) = serve(mem(), ServerConfig::default()).await;
    let mut conn = raw_connection(&server).await;
    raw_sleep_request(&conn, 7, 60_000, 100).await;
    let reply = conn.recv().await.unwrap().unwrap();
    assert_eq!(
        (reply.kind, reply.id),
        (courier_transport::FrameKind::Error, 7)
    );
    let fault: courier_rpc::RpcFault = postcard::from_bytes(&reply.payload).unwrap();
    assert_eq!(fault, courier_rpc::RpcFault::DeadlineExceeded);
    assert_eq!(
        lab.dropped.load(Ordering::SeqCst),
        1,
        "the handler was stopped"
    );
}

#[tokio::test]
async fn dropping_a_call_cancels_it_on_the_server() {
    let (server, lab) = serve(mem(), ServerConfig::default()).await;
    let client = client(&server).await;
    let started = lab.started.notified();
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.sleep(3_600_000).await }
    });
    started.await;
    call.abort();
    let _ = call.await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while lab.dropped.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the server's handler was dropped");
}

#[tokio::test(start_paused = true)]
async fn the_server_runs_at_most_max_in_flight_calls_per_connection() {
    let (server, lab) = serve(mem(), ServerConfig::default().with_max_in_flight(4)).await;
    let client = client(&server).await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.crowd(50).await })
        })
        .collect();
    for call in calls {
        assert!(call.await.unwrap().unwrap() <= 4);
    }
    assert_eq!(lab.most_inside.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_lost_reply_times_out_that_call_and_the_rest_succeed() {
    let (server, _) = serve(mem(), ServerConfig::default()).await;
    let client = client(&server).await.with_timeout(Duration::from_secs(1));
    let mut timeouts = Vec::new();
    for n in 0..1000u64 {
        match client.flaky(n).await {
            Ok(value) => assert_eq!(value, n),
            Err(RpcError::DeadlineExceeded) => timeouts.push(n),
            Err(other) => panic!("call {n}: {other}"),
        }
    }
    assert_eq!(timeouts, [499, 999]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_calls_finish_within_grace_and_cancels_the_rest() {
    let (server, _) = serve(mem(), ServerConfig::default()).await;
    let client = client(&server)
        .await
        .with_timeout(Duration::from_secs(3600));
    let short = tokio::spawn({
        let client = client.clone();
        async move { client.sleep(100).await }
    });
    let long = tokio::spawn({
        let client = client.clone();
        async move { client.sleep(60_000).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    server.shutdown(Duration::from_secs(1)).await;
    assert_eq!(short.await.unwrap().unwrap(), 100);
    assert_eq!(long.await.unwrap().unwrap_err(), RpcError::Cancelled);
    let err = client.add(1, 1).await.unwrap_err();
    assert!(matches!(err, RpcError::Unavailable(_)), "{err:?}");
}

#[test]
fn the_blocking_client_needs_no_runtime() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (server, _) = runtime.block_on(serve(
        "tcp://127.0.0.1:0".parse().unwrap(),
        ServerConfig::default(),
    ));
    let lab = LabBlockingClient::connect(server.local_addr(), ClientConfig::default()).unwrap();
    assert_eq!(lab.add(1, 2).unwrap(), 3);
    assert_eq!(lab.sqrt(-1).unwrap(), Err(LabError::Negative(-1)));
    drop(lab);
    drop(server);
    drop(runtime);
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_retryable_error() {
    let err = Client::connect(&mem(), ClientConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RpcError::Unavailable(reason) if reason.contains("no listener")),
        "{err:?}"
    );
    assert!(err.is_retryable());
    let lazy = LabClient::new(Client::lazy(&mem(), ClientConfig::default()));
    assert!(matches!(
        lazy.add(1, 1).await,
        Err(RpcError::Unavailable(_))
    ));
}

/// A transport connection that has said hello, for sending raw frames.
async fn raw_connection(server: &ServerHandle) -> courier_transport::Connection {
    let mut conn = courier_transport::connect(server.local_addr(), &TransportConfig::default())
        .await
        .unwrap();
    conn.send_message(
        courier_transport::FrameKind::Hello,
        0,
        &courier_rpc::auth::Hello { token: None },
    )
    .await
    .unwrap();
    let welcome = conn.recv().await.unwrap().unwrap();
    assert_eq!(welcome.kind, courier_transport::FrameKind::Hello);
    conn
}

#[tokio::test]
async fn a_closed_connection_cancels_its_calls_on_the_server() {
    // A raw connection that sends a request and then simply goes away: no
    // Cancel frame, only the connection closing.
    let (server, lab) = serve(mem(), ServerConfig::default()).await;
    let conn = raw_connection(&server).await;
    let started = lab.started.notified();
    raw_sleep_request(&conn, 1, 3_600_000, 3_600_000).await;
    started.await;
    drop(conn);
    tokio::time::timeout(Duration::from_secs(10), async {
        while lab.dropped.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the server dropped the handler when the connection closed");
}

#[tokio::test]
async fn calls_answered_at_once_are_not_held_up_by_a_pending_one_on_the_same_connection() {
    let (server, lab) = serve(mem(), ServerConfig::default()).await;
    let client = client(&server).await;
    let started = lab.started.notified();
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.sleep(300).await }
    });
    started.await;
    // Answered by the connection's reader while the sleep runs in its task.
    for n in 0..100 {
        assert_eq!(client.add(n, 1).await.unwrap(), n + 1);
    }
    assert!(!slow.is_finished(), "the sleep is still running");
    assert_eq!(slow.await.unwrap().unwrap(), 300);
    assert_eq!(lab.dropped.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn handlers_pending_at_their_first_poll_go_on_in_a_task_and_answer() {
    let (server, _) = serve(mem(), ServerConfig::default().with_max_in_flight(8)).await;
    let client = client(&server).await;
    let calls: Vec<_> = (0..200u64)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                if n % 2 == 0 {
                    client.yield_once(n).await
                } else {
                    client.add(n as i64, 0).await.map(|sum| sum as u64)
                }
            })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), n as u64);
    }
}

#[tokio::test]
async fn a_cancel_stops_a_handler_that_went_on_in_a_task_and_the_connection_goes_on() {
    let (server, lab) = serve(mem(), ServerConfig::default().with_max_in_flight(1)).await;
    let client = client(&server).await;
    for round in 1..=3 {
        let started = lab.started.notified();
        let call = tokio::spawn({
            let client = client.clone();
            async move { client.sleep(3_600_000).await }
        });
        started.await;
        call.abort();
        let _ = call.await;
        // Its slot (the only one) comes back with the cancel: later calls
        // that go pending are served.
        tokio::time::timeout(Duration::from_secs(10), async {
            while lab.dropped.load(Ordering::SeqCst) < round {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the server's handler was dropped");
        assert_eq!(client.yield_once(7).await.unwrap(), 7);
        assert_eq!(client.add(2, 2).await.unwrap(), 4);
    }
}
