//! With the `otel` feature, a call's spans are exported as one
//! OpenTelemetry trace: the caller's span, the first server's `rpc` span as
//! its child, and the `rpc` span of a call that handler made as the child
//! of that. Run with `cargo test -p courier-rpc --features otel --test otel`.

use std::sync::atomic::{AtomicUsize, Ordering};

use courier_rpc::{Client, ClientConfig, Server, ServerConfig, ServerHandle};
use courier_transport::{bind, Address, TransportConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[courier_rpc::service]
pub trait Hop {
    /// Answers, after asking the next hop if there is one.
    async fn hop(&self) -> u32;
}

#[derive(Clone, Default)]
struct Hopper {
    next: Option<HopClient>,
}

impl Hop for Hopper {
    async fn hop(&self) -> u32 {
        match &self.next {
            Some(next) => next.hop().await.unwrap() + 1,
            None => 1,
        }
    }
}

fn mem() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "otel-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn serve(hopper: Hopper) -> ServerHandle {
    let listener = bind(&mem(), &TransportConfig::default()).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_calls_is_exported_as_one_trace_of_parents_and_children() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("courier-rpc-test")));
    // Global: the servers' spans are made on the runtime's worker threads.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let last = serve(Hopper::default()).await;
    let first = serve(Hopper {
        next: Some(client(&last).await),
    })
    .await;
    let hop = client(&first).await;
    let answer = hop
        .hop()
        .instrument(tracing::info_span!("checkout"))
        .await
        .unwrap();
    assert_eq!(answer, 2);
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let named = |name: &str| -> Vec<_> { spans.iter().filter(|s| s.name == name).collect() };
    let checkout = named("checkout");
    let rpc = named("rpc");
    assert_eq!((checkout.len(), rpc.len()), (1, 2), "{spans:#?}");
    let checkout = checkout[0];
    let trace_id = checkout.span_context.trace_id();
    assert!(
        spans.iter().all(|s| s.span_context.trace_id() == trace_id),
        "one trace: {spans:#?}"
    );
    // The first server's span is the child of the caller's, the second's
    // the child of the first server's.
    let outer = rpc
        .iter()
        .find(|s| s.parent_span_id == checkout.span_context.span_id())
        .expect("an rpc span whose parent is the caller's");
    let inner = rpc
        .iter()
        .find(|s| s.parent_span_id == outer.span_context.span_id())
        .expect("an rpc span whose parent is the first server's");
    assert_ne!(inner.span_context.span_id(), outer.span_context.span_id());

    first.shutdown(std::time::Duration::from_secs(1)).await;
    last.shutdown(std::time::Duration::from_secs(1)).await;
}
