//! Issue 12: what a server does with panicking handlers, clients that do not
//! read, frozen servers, cancellation a handler can see, and frame limits
//! announced in the handshake.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_rpc::{
    CallContext, Client, ClientConfig, Items, RpcError, Server, ServerConfig, ServerHandle,
};
use courier_transport::{bind, Address, FrameKind, TransportConfig};
use tokio::io::AsyncWriteExt;

#[courier_rpc::service]
pub trait Probe {
    async fn panic_now(&self) -> u32;
    async fn panic_stream(&self, items: Items<u32>);
    /// Items of `size` bytes, for ever.
    async fn flood(&self, size: u32, items: Items<Vec<u8>>);
    /// Hands its context to a task that reports the cancellation; sleeps.
    async fn watch_cancel(&self, ms: u64) -> u64;
    async fn echo(&self, data: Vec<u8>) -> usize;
    async fn make(&self, size: u32) -> Vec<u8>;
    /// One item after `ms`.
    async fn later(&self, ms: u64, items: Items<u32>);
    async fn sleep(&self, ms: u64) -> u64;
}

#[derive(Default)]
struct ProbeImpl {
    sent: AtomicUsize,
    remaining_ms: AtomicU64,
    started: tokio::sync::Notify,
    cancel_seen: Arc<tokio::sync::Notify>,
}

struct Shared(Arc<ProbeImpl>);

impl Probe for Shared {
    async fn panic_now(&self) -> u32 {
        panic!("the handler broke")
    }
    async fn panic_stream(&self, items: Items<u32>) {
        let _ = items.send(1).await;
        panic!("the stream broke")
    }
    async fn flood(&self, size: u32, items: Items<Vec<u8>>) {
        while items.send(vec![7; size as usize]).await.is_ok() {
            self.0.sent.fetch_add(1, Ordering::SeqCst);
        }
    }
    async fn watch_cancel(&self, ms: u64) -> u64 {
        let call = CallContext::current().expect("inside a handler");
        assert!(!call.is_cancelled());
        self.0.remaining_ms.store(
            call.remaining().unwrap().as_millis() as u64,
            Ordering::SeqCst,
        );
        let seen = self.0.cancel_seen.clone();
        tokio::spawn(async move {
            call.cancelled().await;
            assert!(call.is_cancelled());
            seen.notify_one();
        });
        self.0.started.notify_one();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
    async fn echo(&self, data: Vec<u8>) -> usize {
        data.len()
    }
    async fn make(&self, size: u32) -> Vec<u8> {
        vec![1; size as usize]
    }
    async fn later(&self, ms: u64, items: Items<u32>) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let _ = items.send(1).await;
    }
    async fn sleep(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
}

fn mem() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "robust-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn serve_on(
    address: Address,
    transport: &TransportConfig,
    config: ServerConfig,
) -> (ServerHandle, Arc<ProbeImpl>) {
    let probe = Arc::new(ProbeImpl::default());
    let listener = bind(&address, transport).await.unwrap();
    let server = Server::new(config)
        .service(ProbeServer::new(Shared(probe.clone())))
        .spawn(listener);
    (server, probe)
}

async fn client(server: &ServerHandle, config: ClientConfig) -> ProbeClient {
    ProbeClient::new(Client::connect(server.local_addr(), config).await.unwrap())
}

/// Records the events logged on this thread (the tests run on a
/// current-thread runtime, so the server's tasks log here too).
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Recorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={:?} ", field.name(), value));
            }
        }
        let mut fields = Fields(format!("{} ", event.metadata().level()));
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_is_answered_at_once_with_an_internal_error() {
    let recorder = Recorder::default();
    let _logs = tracing::subscriber::set_default(recorder.clone());
    let (server, _) = serve_on(mem(), &TransportConfig::default(), ServerConfig::default()).await;
    let mut config = ClientConfig::default();
    config.timeout = Duration::from_secs(60);
    let probe = client(&server, config).await;

    let started = tokio::time::Instant::now();
    let err = probe.panic_now().await.unwrap_err();
    assert!(matches!(err, RpcError::Internal(_)), "{err:?}");
    assert!(!err.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered at once, not at the deadline"
    );
    let logs = recorder.0.lock().unwrap().join("\n");
    assert!(
        logs.contains("ERROR") && logs.contains("Probe") && logs.contains("panic_now"),
        "{logs}"
    );
    assert!(logs.contains("the handler broke"), "{logs}");

    // A streaming handler that panics ends its stream with the same error.
    let mut items = probe.panic_stream().await.unwrap();
    assert_eq!(items.next().await.unwrap().unwrap(), 1);
    let err = items.next().await.unwrap().unwrap_err();
    assert!(matches!(err, RpcError::Internal(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // The connection is still good.
    assert_eq!(probe.echo(vec![1, 2, 3]).await.unwrap(), 3);
    assert_eq!(server.connections(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_handler_sees_its_deadline_and_its_cancellation() {
    assert!(courier_rpc::remaining().is_none());
    assert!(
        tokio::time::timeout(Duration::from_secs(1), courier_rpc::cancelled())
            .await
            .is_err(),
        "outside a handler nothing is ever cancelled"
    );
    let (server, probe_impl) =
        serve_on(mem(), &TransportConfig::default(), ServerConfig::default()).await;
    let mut config = ClientConfig::default();
    config.timeout = Duration::from_secs(30);
    let probe = client(&server, config).await;

    // The caller gives up (drops the call): the handler's context says so.
    let started = probe_impl.started.notified();
    let call = tokio::spawn({
        let probe = probe.clone();
        async move { probe.watch_cancel(3_600_000).await }
    });
    started.await;
    let remaining = probe_impl.remaining_ms.load(Ordering::SeqCst);
    assert!(
        remaining > 29_000 && remaining <= 30_000,
        "{remaining} ms left of 30 s"
    );
    let seen = probe_impl.cancel_seen.notified();
    call.abort();
    tokio::time::timeout(Duration::from_secs(5), seen)
        .await
        .expect("the cancellation reached the handler's task");

    // The deadline passes: the same.
    let seen = probe_impl.cancel_seen.notified();
    let err = probe
        .with_timeout(Duration::from_secs(2))
        .watch_cancel(3_600_000)
        .await
        .unwrap_err();
    assert_eq!(err, RpcError::DeadlineExceeded);
    tokio::time::timeout(Duration::from_secs(5), seen)
        .await
        .expect("the deadline reached the handler's task");
}

#[tokio::test(start_paused = true)]
async fn a_call_to_a_frozen_server_fails_in_about_a_second() {
    // A "server" that answers the hello, then never reads or writes again.
    let mut listener = bind(&mem(), &TransportConfig::default()).await.unwrap();
    let address = listener.local_addr().clone();
    let frozen = tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        let hello = conn.recv().await.unwrap().unwrap();
        assert_eq!(hello.kind, FrameKind::Hello);
        conn.send_message(
            FrameKind::Hello,
            0,
            &courier_rpc::auth::Welcome { identity: None },
        )
        .await
        .unwrap();
        std::future::pending::<()>().await;
        drop(conn);
    });
    let mut config = ClientConfig::default();
    config.timeout = Duration::from_secs(5);
    let probe = ProbeClient::new(Client::connect(&address, config).await.unwrap());
    let started = tokio::time::Instant::now();
    let err = probe.sleep(1).await.unwrap_err();
    assert!(matches!(err, RpcError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() <= Duration::from_millis(1_500),
        "failed after {:?}, not at the 5 s deadline",
        started.elapsed()
    );
    frozen.abort();
}

#[tokio::test(start_paused = true)]
async fn heartbeats_on_by_default_keep_idle_and_busy_connections_to_a_live_server() {
    let (server, _) = serve_on(
        mem(),
        &TransportConfig::default(),
        ServerConfig::default().with_max_in_flight(1),
    )
    .await;
    let mut config = ClientConfig::default();
    config.timeout = Duration::from_secs(120);
    assert!(config.transport.heartbeat.is_some(), "on by default");
    let probe = client(&server, config).await;

    // Idle for a minute, a stream open: the connection lives.
    let mut item = probe.later(60_000).await.unwrap();
    assert_eq!(item.next().await.unwrap().unwrap(), 1);
    assert!(item.next().await.is_none());

    // Busy: at its limit of one call, the server stops reading (and so
    // answering pings) for ten seconds; its keepalives say it is alive.
    let first = tokio::spawn({
        let probe = probe.clone();
        async move { probe.sleep(10_000).await }
    });
    tokio::task::yield_now().await;
    let second = probe.sleep(1).await;
    assert_eq!(second.unwrap(), 1);
    assert_eq!(first.await.unwrap().unwrap(), 10_000);
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn the_servers_frame_limit_is_learned_in_the_handshake() {
    // The server takes frames of up to 64 KiB; the client would send 4 MiB.
    let small = TransportConfig::default().with_max_frame_size(64 * 1024);
    let (server, _) = serve_on(
        "tcp://127.0.0.1:0".parse().unwrap(),
        &small,
        ServerConfig::default(),
    )
    .await;
    let probe = client(&server, ClientConfig::default()).await;
    assert_eq!(probe.client().max_frame_size().await, Some(64 * 1024));
    let err = probe.echo(vec![0; 100_000]).await.unwrap_err();
    assert!(
        matches!(err, RpcError::TooLarge { size, limit } if size > 100_000 && limit == 64 * 1024),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    // Refused before any I/O: the connection is still good.
    assert_eq!(probe.echo(vec![0; 1000]).await.unwrap(), 1000);
    assert_eq!(server.connections(), 1);

    // And the other way: a reply too large for the client is refused by the
    // server, which answers at once instead of breaking the connection.
    let (server, _) = serve_on(
        "tcp://127.0.0.1:0".parse().unwrap(),
        &TransportConfig::default(),
        ServerConfig::default(),
    )
    .await;
    let mut config = ClientConfig::default();
    config.transport = config.transport.with_max_frame_size(64 * 1024);
    let probe = client(&server, config).await;
    let err = probe.make(100_000).await.unwrap_err();
    assert!(matches!(err, RpcError::Internal(_)), "{err:?}");
    assert_eq!(probe.make(1000).await.unwrap().len(), 1000);
}

/// A raw TCP client that sends its preamble, then pings and nothing else,
/// and never reads: refused at the hello timeout, and the connection closed
/// although its pongs cannot be delivered.
#[tokio::test]
async fn pings_do_not_keep_a_connection_that_never_says_hello() {
    let mut config = ServerConfig::default();
    config.hello_timeout = Duration::from_millis(300);
    let (server, _) = serve_on(
        "tcp://127.0.0.1:0".parse().unwrap(),
        &TransportConfig::default(),
        config,
    )
    .await;
    let Address::Tcp { port, .. } = server.local_addr().clone() else {
        unreachable!()
    };
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    raw.write_all(&courier_wire_preamble()).await.unwrap();
    let mut pings = Vec::new();
    for id in 0..4096u64 {
        // length (12: the header), version 1, kind Ping, flags 0, id
        pings.extend_from_slice(&12u32.to_le_bytes());
        pings.extend_from_slice(&[1, FrameKind::Ping as u8, 0, 0]);
        pings.extend_from_slice(&id.to_le_bytes());
    }
    let flood = async {
        for chunk in 0..100_000 {
            if raw.write_all(&pings).await.is_err() {
                return chunk;
            }
        }
        panic!("the server never closed the connection");
    };
    let chunks = tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("closed by the hello timeout");
    // Valid pings, read for a while, not a connection refused at once for
    // garbage.
    assert!(chunks >= 10, "closed after {chunks} chunks of pings");
    tokio::time::timeout(Duration::from_secs(30), async {
        while server.connections() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the connection task ended");
}

fn courier_wire_preamble() -> [u8; 8] {
    let mut preamble = *b"COURIER\0";
    preamble[7] = 1;
    preamble
}

/// A client that stops reading a streaming call while the handler floods
/// it: shutdown gives up the writes after the grace period and returns.
#[tokio::test]
async fn shutdown_returns_although_a_client_stopped_reading_a_stream() {
    let (server, probe) = serve_on(
        "tcp://127.0.0.1:0".parse().unwrap(),
        &TransportConfig::default(),
        ServerConfig::default(),
    )
    .await;
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
    #[derive(serde::Serialize)]
    struct Header<'a> {
        service: &'a str,
        method: &'a str,
        fingerprint: u64,
        timeout_ms: u64,
        window: u32,
    }
    let header = Header {
        service: "Probe",
        method: "flood",
        fingerprint: ProbeClient::method_fingerprint("flood").unwrap(),
        timeout_ms: 3_600_000,
        // Credit for ever: only the socket holds the handler back.
        window: u32::MAX,
    };
    raw.send_message(FrameKind::Request, 1, &(header, (64 * 1024u32,)))
        .await
        .unwrap();
    // Never read again; wait until the handler is stuck on the full socket.
    let mut last = usize::MAX;
    let mut steady = 0;
    for _ in 0..1000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = probe.sent.load(Ordering::SeqCst);
        steady = if sent == last { steady + 1 } else { 0 };
        last = sent;
        if steady == 10 {
            break;
        }
    }
    assert!(last > 0 && steady == 10, "the stream filled the socket");

    tokio::time::timeout(
        Duration::from_secs(30),
        server.shutdown(Duration::from_millis(200)),
    )
    .await
    .expect("shutdown returned although the client does not read");
    drop(raw);
}
