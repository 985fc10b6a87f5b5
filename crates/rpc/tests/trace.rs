//! Trace context across processes: a `traceparent` travels with each call
//! (only to servers that said they read one), the handler runs as a child
//! of it (current in `courier_transport::trace`, and as the parent of its
//! `rpc` span), so a call the handler makes continues the same trace.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use courier_rpc::{Client, ClientConfig, Server, ServerConfig, ServerHandle};
use courier_transport::trace::{self, TraceContext};
use courier_transport::{bind, Address, Flags, Frame, FrameKind, TransportConfig};

/// What one hop saw: the current trace context's trace and span ids, as hex
/// (empty when none was current).
type Seen = (String, String);

#[courier_rpc::service]
pub trait Hop {
    /// Says what it sees, then (with a next hop) asks that one too.
    async fn hop(&self) -> Vec<Seen>;
}

#[derive(Clone, Default)]
struct Hopper {
    next: Option<HopClient>,
}

impl Hop for Hopper {
    async fn hop(&self) -> Vec<Seen> {
        let here = trace::current()
            .map(|ctx| (ctx.trace_id_hex(), ctx.span_id_hex()))
            .unwrap_or_default();
        let mut seen = vec![here];
        if let Some(next) = &self.next {
            seen.extend(next.hop().await.unwrap());
        }
        seen
    }
}

fn mem() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "trace-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn serve(address: Address, hopper: Hopper) -> ServerHandle {
    let listener = bind(&address, &TransportConfig::default()).await.unwrap();
    Server::new(ServerConfig::default())
        .service(HopServer::new(hopper))
        .spawn(listener)
}

async fn client(server: &ServerHandle) -> HopClient {
    HopClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    )
}

/// Each span made: its name and fields.
type SpanLog = Vec<(String, HashMap<String, String>)>;

/// Records every span's name and fields.
#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<SpanLog>>,
    next: Arc<AtomicU64>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = HashMap::new();
        span.record(&mut Fields(&mut fields));
        self.spans
            .lock()
            .unwrap()
            .push((span.metadata().name().to_string(), fields));
        tracing::span::Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

std::thread_local! {
    /// The recorder of the test running on this thread.
    static CURRENT: std::cell::RefCell<Option<Recorder>> = const { std::cell::RefCell::new(None) };
}

/// The global subscriber of this test binary: it hands each span to the
/// recorder of the thread that made it (every test here runs on one
/// thread). A scoped `set_default` per test is not enough: a test on
/// another thread that reaches a callsite first, with no recorder alive,
/// can cache that callsite as never enabled and the recorder misses its
/// spans (seen under load).
struct Forward;

impl tracing::Subscriber for Forward {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        CURRENT.with(|current| current.borrow().is_some())
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        CURRENT.with(|current| match &*current.borrow() {
            Some(recorder) => recorder.new_span(span),
            None => tracing::span::Id::from_u64(u64::MAX),
        })
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Stops the thread's recording when dropped.
struct Recording;

impl Drop for Recording {
    fn drop(&mut self) {
        CURRENT.with(|current| *current.borrow_mut() = None);
    }
}

impl Recorder {
    /// Records the spans made on this thread until the guard is dropped.
    fn record_here(&self) -> Recording {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            tracing::subscriber::set_global_default(Forward).expect("no other global subscriber")
        });
        CURRENT.with(|current| *current.borrow_mut() = Some(self.clone()));
        Recording
    }

    /// The `rpc` spans, in the order they were made.
    fn rpc_spans(&self) -> Vec<HashMap<String, String>> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| name == "rpc")
            .map(|(_, fields)| fields.clone())
            .collect()
    }
}

#[tokio::test]
async fn a_client_server_server_chain_shares_one_trace() {
    let recorder = Recorder::default();
    let _recording = recorder.record_here();
    for address in [mem(), "tcp://127.0.0.1:0".parse().unwrap()] {
        recorder.spans.lock().unwrap().clear();
        let last = serve(mem(), Hopper::default()).await;
        let middle = serve(
            address,
            Hopper {
                next: Some(client(&last).await),
            },
        )
        .await;
        let first = client(&middle).await;
        let root = TraceContext::root();
        let seen = trace::scope(root, first.hop()).await.unwrap();
        assert_eq!(seen.len(), 2);
        let root_trace = root.trace_id_hex();
        for (trace_id, _) in &seen {
            assert_eq!(trace_id, &root_trace, "one trace across every hop");
        }
        let (middle_span, last_span) = (&seen[0].1, &seen[1].1);
        assert_ne!(middle_span, &root.span_id_hex(), "a child span id");
        assert_ne!(middle_span, last_span);
        // Each handler's `rpc` span names its parent: the caller's span.
        let spans = recorder.rpc_spans();
        assert_eq!(spans.len(), 2, "{spans:?}");
        let (a, b) = (&spans[0], &spans[1]);
        assert_eq!(a["trace_id"], root_trace);
        assert_eq!(a["parent_id"], root.span_id_hex());
        assert_eq!(&a["span_id"], middle_span);
        assert_eq!(b["trace_id"], root_trace);
        assert_eq!(&b["parent_id"], middle_span);
        assert_eq!(&b["span_id"], last_span);
        assert_eq!(a["service"], "Hop");
        assert_eq!(a["method"], "hop");
    }
}

#[tokio::test]
async fn without_a_trace_context_none_is_sent_or_made() {
    let recorder = Recorder::default();
    let _recording = recorder.record_here();
    let last = serve(mem(), Hopper::default()).await;
    let middle = serve(
        mem(),
        Hopper {
            next: Some(client(&last).await),
        },
    )
    .await;
    let seen = client(&middle).await.hop().await.unwrap();
    assert_eq!(seen, vec![Seen::default(), Seen::default()]);
    assert!(recorder.rpc_spans().is_empty());
}

/// The request layouts by hand: the old one (no extension flag) still
/// decodes and is answered, and one with an extension carrying a
/// `traceparent` makes it current in the handler.
#[tokio::test]
async fn requests_in_the_old_layout_and_with_a_trace_extension_both_decode() {
    let server = serve(mem(), Hopper::default()).await;
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
    let fingerprint = HopClient::method_fingerprint("hop").unwrap();
    // service, method, fingerprint, timeout_ms, window; then the arguments
    // (none: an empty tuple is no bytes).
    let old = postcard::to_stdvec(&("Hop", "hop", fingerprint, 5_000u64, 0u32)).unwrap();
    raw.send(Frame::new(FrameKind::Request, 1, old))
        .await
        .unwrap();
    let reply = raw.recv().await.unwrap().unwrap();
    assert_eq!((reply.kind, reply.id), (FrameKind::Response, 1));
    let seen: Vec<Seen> = postcard::from_bytes(&reply.payload).unwrap();
    assert_eq!(seen, vec![Seen::default()]);

    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    // The extension: inbound, no_deadline, traceparent.
    let ext = postcard::to_stdvec(&(false, false, Some(parent))).unwrap();
    let new = postcard::to_stdvec(&(("Hop", "hop", fingerprint, 5_000u64, 0u32), ext.as_slice()))
        .unwrap();
    let extended = Frame::new(FrameKind::Request, 2, new).with_flags(Flags::from_bits(0b100));
    raw.send(extended).await.unwrap();
    let reply = raw.recv().await.unwrap().unwrap();
    assert_eq!((reply.kind, reply.id), (FrameKind::Response, 2));
    let seen: Vec<Seen> = postcard::from_bytes(&reply.payload).unwrap();
    assert_eq!(seen[0].0, "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(seen[0].1, "b7ad6b7169203331", "the handler's own span id");
}

/// A server whose welcome does not say it reads trace context gets
/// requests exactly as before, even from inside a trace.
#[tokio::test]
async fn an_older_server_gets_no_traceparent() {
    let mut listener = bind(&mem(), &TransportConfig::default()).await.unwrap();
    let address = listener.local_addr().clone();
    let old = tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        conn.recv().await.unwrap().unwrap();
        conn.send_message(
            FrameKind::Hello,
            0,
            &courier_rpc::auth::Welcome { identity: None },
        )
        .await
        .unwrap();
        let request = conn.recv().await.unwrap().unwrap();
        assert_eq!(request.flags.bits(), 0, "no extension");
        let (_header, ()): ((String, String, u64, u64, u32), ()) =
            postcard::from_bytes(&request.payload).expect("the old layout, nothing after it");
        let reply: Vec<Seen> = Vec::new();
        conn.send_message(FrameKind::Response, request.id, &reply)
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
    let hop = HopClient::new(
        Client::connect(&address, ClientConfig::default())
            .await
            .unwrap(),
    );
    let seen = trace::scope(TraceContext::root(), hop.hop()).await.unwrap();
    assert!(seen.is_empty());
    old.abort();
}
