//! Client streaming and bidirectional streaming: round trips, flow control
//! both ways, cancellation from either side, deadlines, stream limits, and
//! a clear refusal from a server that does not take client streams.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_rpc::{
    Client, ClientConfig, Incoming, IncomingError, Items, RpcError, Server, ServerConfig,
    ServerHandle,
};
use courier_transport::{bind, Address, TransportConfig};
use tokio::sync::Semaphore;

#[courier_rpc::service]
pub trait Uploads {
    /// Sums what the client sends.
    async fn sum(&self, numbers: Incoming<u64>) -> u64;
    /// Reads one item per permit of the gate, then sums the rest once the
    /// gate is closed.
    async fn gated(&self, numbers: Incoming<u64>) -> u64;
    /// Reads `take` items, then answers without reading the rest.
    async fn first(&self, take: u32, numbers: Incoming<u64>) -> Vec<u64>;
    /// Reads until the stream ends; says how it ended.
    async fn outcome(&self, numbers: Incoming<u64>) -> String;
    /// The same, as the one item of a bidirectional call.
    async fn told(&self, numbers: Incoming<u64>, outcome: Items<String>);
    /// Echoes each item doubled.
    async fn double(&self, numbers: Incoming<u64>, doubled: Items<u64>);
    /// Stops reading at once, then sends `count` items.
    async fn deaf(&self, count: u64, numbers: Incoming<u64>, out: Items<u64>);
    /// Reads forever, never answering.
    async fn forever(&self, numbers: Incoming<u64>) -> u64;
    async fn plain(&self) -> u8;
}

#[derive(Clone)]
struct Host {
    gate: Arc<Semaphore>,
    /// Handlers whose state was dropped (finished, cancelled or aborted).
    ended: Arc<AtomicUsize>,
    read: Arc<AtomicUsize>,
}

impl Default for Host {
    fn default() -> Host {
        Host {
            gate: Arc::new(Semaphore::new(0)),
            ended: Arc::default(),
            read: Arc::default(),
        }
    }
}

struct OnDrop(Arc<AtomicUsize>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Uploads for Host {
    async fn sum(&self, mut numbers: Incoming<u64>) -> u64 {
        let mut sum = 0;
        while let Some(n) = numbers.next().await {
            sum += n.unwrap();
        }
        sum
    }
    async fn gated(&self, mut numbers: Incoming<u64>) -> u64 {
        let mut sum = 0;
        loop {
            match self.gate.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
            match numbers.next().await {
                Some(n) => {
                    sum += n.unwrap();
                    self.read.fetch_add(1, Ordering::SeqCst);
                }
                None => return sum,
            }
        }
        while let Some(n) = numbers.next().await {
            sum += n.unwrap();
        }
        sum
    }
    async fn first(&self, take: u32, mut numbers: Incoming<u64>) -> Vec<u64> {
        let mut first = Vec::new();
        for _ in 0..take {
            match numbers.next().await {
                Some(n) => first.push(n.unwrap()),
                None => break,
            }
        }
        first
    }
    async fn outcome(&self, mut numbers: Incoming<u64>) -> String {
        let _ended = OnDrop(self.ended.clone());
        let mut count = 0;
        loop {
            match numbers.next().await {
                Some(Ok(_)) => count += 1,
                Some(Err(IncomingError::Abandoned)) => return format!("abandoned after {count}"),
                Some(Err(err)) => return format!("error {err}"),
                None => return format!("finished after {count}"),
            }
        }
    }
    async fn told(&self, numbers: Incoming<u64>, outcome: Items<String>) {
        let said = self.outcome(numbers).await;
        let _ = outcome.send(said).await;
    }
    async fn double(&self, mut numbers: Incoming<u64>, doubled: Items<u64>) {
        let _ended = OnDrop(self.ended.clone());
        // An abandoned input ends the output too.
        while let Some(Ok(n)) = numbers.next().await {
            if doubled.send(n * 2).await.is_err() {
                return;
            }
        }
    }
    async fn deaf(&self, count: u64, numbers: Incoming<u64>, out: Items<u64>) {
        drop(numbers);
        for n in 0..count {
            if out.send(n).await.is_err() {
                return;
            }
        }
    }
    async fn forever(&self, mut numbers: Incoming<u64>) -> u64 {
        let _ended = OnDrop(self.ended.clone());
        while numbers.next().await.is_some() {}
        std::future::pending().await
    }
    async fn plain(&self) -> u8 {
        7
    }
}

fn mem() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "client-stream-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn serve_with(address: Address, config: ServerConfig) -> (ServerHandle, Host) {
    let host = Host::default();
    let listener = bind(&address, &TransportConfig::default()).await.unwrap();
    let server = Server::new(config)
        .service(UploadsServer::new(host.clone()))
        .spawn(listener);
    (server, host)
}

async fn client(server: &ServerHandle) -> UploadsClient {
    UploadsClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    )
}

/// Yields until `done` holds, at most 100,000 turns (and 10 s, for tcp).
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    for _ in 0..100_000 {
        if done() {
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never happened: {what}");
}

fn addresses() -> [Address; 2] {
    ["tcp://127.0.0.1:0".parse().unwrap(), mem()]
}

#[tokio::test]
async fn a_client_stream_round_trips_over_tcp_and_mem() {
    for address in addresses() {
        let (server, _) = serve_with(address, ServerConfig::default()).await;
        let uploads = client(&server).await;
        let mut sum = uploads.sum().await.unwrap();
        for n in 1..=1_000 {
            sum.send(n).await.unwrap();
        }
        assert_eq!(sum.finish().await.unwrap(), 500_500);
        // Nothing sent is a stream too.
        assert_eq!(uploads.sum().await.unwrap().finish().await.unwrap(), 0);
        assert_eq!(
            uploads.plain().await.unwrap(),
            7,
            "the connection is shared"
        );
        until("every stream closed", || server.open_streams() == 0).await;
    }
}

#[tokio::test]
async fn a_bidirectional_stream_round_trips_over_tcp_and_mem() {
    for address in addresses() {
        let (server, _) = serve_with(address, ServerConfig::default()).await;
        let uploads = client(&server).await;
        let (sender, mut doubled) = uploads.double().await.unwrap();
        // Each side at its own pace, more than a window each way.
        let feeding = tokio::spawn(async move {
            for n in 0..500 {
                sender.send(n).await.unwrap();
            }
            sender.finish().await.unwrap();
        });
        for n in 0..500 {
            assert_eq!(doubled.next().await.unwrap().unwrap(), n * 2);
        }
        assert!(doubled.next().await.is_none(), "ends when the handler does");
        feeding.await.unwrap();
        until("every stream closed", || server.open_streams() == 0).await;
    }
}

#[tokio::test]
async fn a_handler_that_does_not_read_holds_the_client_to_its_window() {
    for address in addresses() {
        let window = 8;
        let (server, host) =
            serve_with(address, ServerConfig::default().with_inbound_window(window)).await;
        let uploads = client(&server).await;
        let mut upload = uploads.gated().await.unwrap();
        assert_eq!(upload.credit(), window as usize, "the server's window");
        let mut sent = 0u64;
        for n in 0..window as u64 {
            upload.send(n).await.unwrap();
            sent += 1;
        }
        // The window is spent and the handler reads nothing: the next
        // send waits, however often it is tried.
        for _ in 0..100 {
            assert!(
                tokio::time::timeout(Duration::ZERO, upload.send(99))
                    .await
                    .is_err(),
                "sent past the window"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(upload.credit(), 0);
        // Reading half the window grants that much again, no more (granted
        // as the handler asks for the next item).
        host.gate.add_permits(window as usize / 2 + 1);
        until("the handler read half and one", || {
            host.read.load(Ordering::SeqCst) == window as usize / 2 + 1
        })
        .await;
        until("credit for what was read", || {
            upload.credit() == window as usize / 2
        })
        .await;
        for n in 0..(window / 2) as u64 {
            upload.send(100 + n).await.unwrap();
            sent += 1;
        }
        assert!(tokio::time::timeout(Duration::ZERO, upload.send(99))
            .await
            .is_err());
        assert_eq!(sent, window as u64 + window as u64 / 2);
        // Let it read everything.
        host.gate.close();
        let expected: u64 = (0..window as u64).sum::<u64>()
            + (0..(window / 2) as u64).map(|n| 100 + n).sum::<u64>();
        assert_eq!(upload.finish().await.unwrap(), expected);
    }
}

/// Paused time: the 200 ms below pass only once every task is idle, that
/// is, once the send is truly held (not because the machine is slow).
#[tokio::test(start_paused = true)]
async fn a_slow_client_holds_a_bidirectional_handler_to_the_client_window() {
    let (server, host) = serve_with(mem(), ServerConfig::default()).await;
    let uploads = client(&server).await;
    let (sender, doubled) = uploads.double().await.unwrap();
    // The client sends and never reads the doubles: the handler blocks on
    // its sends, stops reading, and the client in turn is held to the
    // server's window. Everything sent is bounded by the two windows.
    let mut sent = 0;
    while let Ok(result) = tokio::time::timeout(Duration::from_millis(200), sender.send(sent)).await
    {
        result.unwrap();
        sent += 1;
        assert!(sent <= 32 * 2 + 2, "sent {sent} into a stalled stream");
    }
    assert!(sent >= 32, "only {sent} sent");
    drop(doubled);
    until("the handler was stopped", || {
        host.ended.load(Ordering::SeqCst) == 1
    })
    .await;
    until("every stream closed", || server.open_streams() == 0).await;
    assert_eq!(
        sender.send(1).await,
        Err(RpcError::InputClosed),
        "the call is gone"
    );
}

#[tokio::test]
async fn dropping_a_client_stream_cancels_the_handler_and_frees_its_stream() {
    for address in addresses() {
        let (server, host) = serve_with(address, ServerConfig::default().with_max_streams(1)).await;
        let uploads = client(&server).await;
        let mut stream = uploads.forever().await.unwrap();
        stream.send(1).await.unwrap();
        until("the stream opened", || server.open_streams() == 1).await;
        drop(stream);
        until("the handler was stopped", || {
            host.ended.load(Ordering::SeqCst) == 1
        })
        .await;
        until("every stream closed", || server.open_streams() == 0).await;
        // Its place under max_streams is free again.
        let mut sum = uploads.sum().await.unwrap();
        sum.send(2).await.unwrap();
        assert_eq!(sum.finish().await.unwrap(), 2);
    }
}

#[tokio::test]
async fn dropping_the_sender_without_finishing_is_an_abandoned_stream() {
    for address in addresses() {
        let (server, host) = serve_with(address, ServerConfig::default()).await;
        let uploads = client(&server).await;
        // In a bidirectional call, dropping the sender is how the client
        // says "no more", and not finishing says "and that was not all".
        let (sender, mut out) = uploads.double().await.unwrap();
        sender.send(1).await.unwrap();
        drop(sender);
        assert_eq!(out.next().await.unwrap().unwrap(), 2);
        assert!(out.next().await.is_none());
        until("the handler ended", || {
            host.ended.load(Ordering::SeqCst) == 1
        })
        .await;

        // The handler sees the difference.
        let mut finished = uploads.outcome().await.unwrap();
        finished.send(1).await.unwrap();
        finished.send(2).await.unwrap();
        assert_eq!(finished.finish().await.unwrap(), "finished after 2");
        let (abandoning, mut told) = uploads.told().await.unwrap();
        abandoning.send(1).await.unwrap();
        drop(abandoning);
        assert_eq!(told.next().await.unwrap().unwrap(), "abandoned after 1");
        assert!(told.next().await.is_none());
        let (finishing, mut told) = uploads.told().await.unwrap();
        finishing.send(1).await.unwrap();
        finishing.finish().await.unwrap();
        assert_eq!(told.next().await.unwrap().unwrap(), "finished after 1");
        until("every stream closed", || server.open_streams() == 0).await;
    }
}

#[tokio::test]
async fn a_handler_that_stops_reading_stops_the_client_sending() {
    for address in addresses() {
        let (server, _) = serve_with(address, ServerConfig::default()).await;
        let uploads = client(&server).await;
        // It answers after two items: the client's further sends fail
        // promptly with a typed error, and the answer is still there.
        let mut first = uploads.first(2).await.unwrap();
        let mut closed = None;
        for n in 0..10_000 {
            if let Err(err) = first.send(n).await {
                closed = Some(err);
                break;
            }
        }
        assert_eq!(closed, Some(RpcError::InputClosed));
        assert_eq!(first.finish().await.unwrap(), vec![0, 1]);

        // A bidirectional handler drops its input and goes on sending.
        let (sender, mut out) = uploads.deaf(3).await.unwrap();
        let mut closed = None;
        for n in 0..10_000 {
            if let Err(err) = sender.send(n).await {
                closed = Some(err);
                break;
            }
        }
        assert_eq!(closed, Some(RpcError::InputClosed));
        for n in 0..3 {
            assert_eq!(out.next().await.unwrap().unwrap(), n);
        }
        assert!(out.next().await.is_none());
        until("every stream closed", || server.open_streams() == 0).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_stream_is_bounded_by_its_deadline() {
    let (server, host) = serve_with(mem(), ServerConfig::default()).await;
    let uploads = client(&server).await.with_timeout(Duration::from_secs(5));
    let mut stream = uploads.forever().await.unwrap();
    let mut failed = None;
    for n in 0..1_000 {
        if let Err(err) = stream.send(n).await {
            failed = Some(err);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(failed, Some(RpcError::DeadlineExceeded));
    assert_eq!(stream.finish().await, Err(RpcError::DeadlineExceeded));
    until("the handler was stopped", || {
        host.ended.load(Ordering::SeqCst) == 1
    })
    .await;
    until("every stream closed", || server.open_streams() == 0).await;
}

#[tokio::test(start_paused = true)]
async fn a_bidirectional_stream_is_bounded_by_its_deadline() {
    let (server, host) = serve_with(mem(), ServerConfig::default()).await;
    let uploads = client(&server).await.with_timeout(Duration::from_secs(5));
    let (sender, mut out) = uploads.double().await.unwrap();
    let mut outcome = None;
    for n in 0..1_000 {
        if sender.send(n).await.is_err() {
            break;
        }
        match out.next().await {
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                outcome = Some(err);
                break;
            }
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(outcome, Some(RpcError::DeadlineExceeded));
    until("the handler was stopped", || {
        host.ended.load(Ordering::SeqCst) == 1
    })
    .await;
    until("every stream closed", || server.open_streams() == 0).await;
}

#[tokio::test]
async fn client_streams_count_against_the_stream_limit() {
    let (server, _) = serve_with(mem(), ServerConfig::default().with_max_streams(2)).await;
    let uploads = client(&server).await;
    let a = uploads.forever().await.unwrap();
    let (b, b_out) = uploads.double().await.unwrap();
    b.send(1).await.unwrap();
    until("two streams open", || server.open_streams() == 2).await;
    let refused = uploads.sum().await.unwrap();
    assert_eq!(
        refused.finish().await,
        Err(RpcError::TooManyStreams { limit: 2 })
    );
    assert_eq!(uploads.plain().await.unwrap(), 7, "unary calls still run");
    drop((a, b, b_out));
    until("every stream closed", || server.open_streams() == 0).await;
}

#[tokio::test]
async fn a_server_without_client_streams_refuses_them_at_the_client() {
    let (server, _) = serve_with(mem(), ServerConfig::default().with_inbound_window(0)).await;
    let uploads = client(&server).await;
    match uploads.sum().await {
        Err(err @ RpcError::NotSupported(_)) => {
            assert_eq!(err.kind(), courier_rpc::ErrorKind::Unsupported);
            assert!(err.to_string().contains("Uploads.sum"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        uploads.double().await,
        Err(RpcError::NotSupported(_))
    ));
    assert_eq!(uploads.plain().await.unwrap(), 7);
}

/// A client that sends past its credit (by hand: the real client cannot)
/// has its call ended with a report, and the server buffers no more than
/// the window.
#[tokio::test]
async fn a_client_that_sends_past_its_credit_is_refused() {
    use courier_transport::{Flags, Frame, FrameKind};
    let window = 4;
    let (server, _) = serve_with(mem(), ServerConfig::default().with_inbound_window(window)).await;
    let mut raw = courier_transport::connect(server.local_addr(), &TransportConfig::default())
        .await
        .unwrap();
    raw.send_message(
        FrameKind::Hello,
        0,
        &courier_rpc::auth::Hello { token: None },
    )
    .await
    .unwrap();
    assert_eq!(raw.recv().await.unwrap().unwrap().kind, FrameKind::Hello);
    let fingerprint = UploadsClient::method_fingerprint("gated").unwrap();
    // The extension says "inbound"; then no arguments.
    let ext = postcard::to_stdvec(&(true,)).unwrap();
    let request = postcard::to_stdvec(&(
        ("Uploads", "gated", fingerprint, 60_000u64, 0u32),
        ext.as_slice(),
    ))
    .unwrap();
    raw.send(Frame::new(FrameKind::Request, 1, request).with_flags(Flags::from_bits(0b100)))
        .await
        .unwrap();
    // The handler reads nothing: the window, the end's place, then one
    // too many.
    for n in 0..window as u64 + 2 {
        let item = postcard::to_stdvec(&n).unwrap();
        raw.send(Frame::new(FrameKind::StreamItem, 1, item))
            .await
            .unwrap();
    }
    // (The handler's end, dropped with it, may say "stop sending" first.)
    let report = loop {
        let frame = raw.recv().await.unwrap().unwrap();
        if frame.kind != FrameKind::Cancel {
            break frame;
        }
    };
    assert_eq!((report.kind, report.id), (FrameKind::Error, 1));
    let fault: courier_rpc::RpcFault = postcard::from_bytes(&report.payload).unwrap();
    assert!(
        fault
            .to_string()
            .contains("more items than it had credit for"),
        "{fault}"
    );
    until("every stream closed", || server.open_streams() == 0).await;
}

/// Items within every stream's credit still count against the connection's
/// byte budget while unread: many slow streams of large items cannot make
/// the server hold more than `inbound_buffer_bytes`, and the budget comes
/// back as handlers read.
#[tokio::test]
async fn unread_items_past_the_connections_byte_budget_end_their_call() {
    // u64::MAX is ten bytes in postcard: one item fills the budget.
    let config = ServerConfig::default().with_inbound_buffer_bytes(10);
    let (server, host) = serve_with(mem(), config).await;
    let uploads = client(&server).await;
    let mut first = uploads.gated().await.unwrap();
    first.send(u64::MAX).await.unwrap();
    // A second stream on the same connection, within its own credit, but
    // the first item's bytes are still unread.
    let mut second = uploads.gated().await.unwrap();
    second.send(u64::MAX).await.unwrap();
    match second.finish().await {
        Err(RpcError::InboundBufferFull { limit: 10 }) => {}
        other => panic!("expected the budget's refusal, got {other:?}"),
    }
    // The first call is unharmed: once read, its bytes are given back and
    // a third stream's item fits again.
    host.gate.close();
    assert_eq!(first.finish().await.unwrap(), u64::MAX);
    let mut third = uploads.sum().await.unwrap();
    third.send(u64::MAX - 1).await.unwrap();
    assert_eq!(third.finish().await.unwrap(), u64::MAX - 1);
    until("every stream closed", || server.open_streams() == 0).await;
}
