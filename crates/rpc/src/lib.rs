//! # courier-rpc
//!
//! Call a function on another machine as if it were local. A service is a
//! Rust trait of `async fn`s marked `#[courier_rpc::service]`; the
//! attribute generates a typed client (`<Trait>Client`), a blocking client
//! (`<Trait>BlockingClient`) and server dispatch (`<Trait>Server`).
//!
//! - **Many calls in flight** on one connection, replies matched by id in
//!   any order. A call alone on its connection is written straight from
//!   the caller's task; calls made while others are in flight are queued
//!   and written together by the connection's flusher, so many calls share
//!   one write. The client takes one lock per call (its table of calls,
//!   which also holds the live connection) and no async mutex.
//! - **Handlers that complete at once run inline**: the server polls each
//!   handler once on the connection's reader and answers the calls a read
//!   brought in with one write; only a handler still pending after that
//!   poll gets a task of its own (and a place in `max_in_flight`), so a slow
//!   handler never holds up the reader.
//! - **Deadlines** travel with each request as the time remaining (not a
//!   clock reading, which would break under clock skew). The client gives
//!   up at the deadline; the server stops the handler at the same deadline.
//!   A stream meant to live as long as its connection (a subscription, a
//!   consumer, a watch) is opened with no deadline at all
//!   ([`Client::without_deadline`]): the request says so instead of
//!   carrying a timeout, and the handler's [`CallContext::deadline`] is
//!   `None`.
//! - **Cancellation**: dropping a call's future (or its timing out) sends
//!   `Cancel`; the server aborts the handler's task, so the handler's state is
//!   dropped where it stands. Work a handler handed elsewhere (a spawned
//!   task, a blocking thread) can see it through a [`CallContext`]
//!   ([`CallContext::current`], [`cancelled`], [`remaining`]), which also
//!   gives the call's deadline.
//! - **Failures are answered at once**: a handler that panics gets its
//!   caller [`RpcError::Internal`] straight away (and the panic is logged
//!   with the service and method), not a wait until the deadline.
//! - **Failover**: [`Client::lazy_any`] and [`Client::connect_any`] take
//!   several addresses of equivalent servers (`Address::parse_list` reads
//!   `tcp://a:7878,tcp://b:7878`). The client connects to the first that
//!   answers; when the connection dies it goes on to the next address,
//!   never first to the one that died, and [`Client::address`] says which
//!   is in use. Calls in flight when a connection dies fail: they are never
//!   resent, since they may have run. Refused credentials fail at once
//!   instead of being tried on every node.
//! - **Liveness**: clients send heartbeats by default
//!   ([`DEFAULT_HEARTBEAT`]), so a call to a frozen server fails in about a
//!   second.
//! - **Frame limits** are exchanged in the hello: a request larger than the
//!   server accepts fails locally with [`RpcError::TooLarge`], before any
//!   I/O, and the connection stays usable.
//! - **Backpressure**: a server runs at most `max_in_flight` calls per
//!   connection and stops reading the connection while at the limit.
//! - **Errors**: [`RpcError`] says what went wrong in the framework
//!   (deadline, unavailable, cancelled, unknown service or method, protocol
//!   mismatch); the method's own `Result<T, E>` is the service's business
//!   and arrives untouched as `Ok(Err(e))`.
//! - **Versioning, per method**: each request carries the fingerprint of
//!   the method it calls, and the server checks it against that method
//!   alone, so a service can gain methods without breaking old clients (and
//!   new clients still call the old methods of an old server). A method
//!   whose definition changed fails with [`RpcError::ProtocolMismatch`]
//!   naming it; see [Versioning](#versioning) for what counts as a change.
//! - **Owned arguments**: arguments, results and stream items are decoded
//!   into owned values (`serde::de::DeserializeOwned`), so a method takes
//!   `name: String`, not `name: &str`, and `Vec<u8>`, not `&[u8]`. The
//!   attribute refuses a reference, or a lifetime other than `'static`,
//!   anywhere in those types, with an error on it that names the owned type
//!   to use (`arguments are deserialized into owned values: use String
//!   instead of &str`), instead of serde's "`Deserialize` is not general
//!   enough". `tests/compile_fail.rs` checks each of the attribute's common
//!   errors with `trybuild` (a dev-dependency, for that test only).
//! - **Settings**: [`ClientConfig`] and [`ServerConfig`] are
//!   `#[non_exhaustive]` (fields can be added without breaking callers), so
//!   they are built from `default()` with their `with_*` builders
//!   (`ClientConfig::default().with_timeout(..).with_token(..)`), or by
//!   assigning their public fields; not with a struct literal.
//!
//! Transports are whatever `courier-transport` offers: `tcp://`,
//! `unix://`, `mem://` (and `udp://`, though RPC needs no datagrams).
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! use courier_rpc::{Client, ClientConfig, RpcError, Server, ServerConfig};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! enum MathError { DivideByZero }
//!
//! #[courier_rpc::service]
//! trait Calculator {
//!     async fn add(&self, a: i64, b: i64) -> i64;
//!     async fn divide(&self, a: i64, b: i64) -> Result<i64, MathError>;
//! }
//!
//! struct Calc;
//! impl Calculator for Calc {
//!     async fn add(&self, a: i64, b: i64) -> i64 { a + b }
//!     async fn divide(&self, a: i64, b: i64) -> Result<i64, MathError> {
//!         if b == 0 { Err(MathError::DivideByZero) } else { Ok(a / b) }
//!     }
//! }
//!
//! let listener = courier_transport::bind(&"tcp://127.0.0.1:0".parse()?, &Default::default()).await?;
//! let server = Server::new(ServerConfig::default()).service(CalculatorServer::new(Calc)).spawn(listener);
//!
//! let calc = CalculatorClient::new(Client::connect(server.local_addr(), ClientConfig::default()).await?);
//! assert_eq!(calc.add(2, 3).await?, 5);
//! assert_eq!(calc.divide(1, 0).await?, Err(MathError::DivideByZero)); // the service's error
//! let fast = calc.with_timeout(std::time::Duration::from_secs(1));
//! assert_eq!(fast.divide(9, 3).await?, Ok(3));
//! # let _: Option<RpcError> = None;
//! # Ok(()) }
//! ```
//!
//! Two processes talking over loopback: `crates/rpc/examples/server.rs` and
//! `client.rs` (`cargo run -p courier-rpc --example server`, then in
//! another terminal `cargo run -p courier-rpc --example client -- ADDRESS`).
//!
//! ## Handler context
//!
//! A handler sees its call's context, as tarpc's `context::Context` gives
//! it: [`CallContext::current`] returns it inside a handler (`None`
//! elsewhere), with
//!
//! - the **deadline**: [`CallContext::deadline`] and
//!   [`CallContext::remaining`] (`None` for a call made
//!   [`without_deadline`](Client::without_deadline)), the server's view of
//!   the caller's own deadline, which travelled as the time remaining; the
//!   server stops the handler there;
//! - the **caller**: [`CallContext::caller`], the identity its token or
//!   client certificate proved (`None`: anonymous; also [`caller`]);
//! - **cancellation**: [`CallContext::is_cancelled`] and
//!   [`CallContext::cancelled`], set when the client drops the call (or its
//!   stream), the deadline passes, or the server shuts down. The handler's
//!   own future is simply dropped then; the context is for work it handed
//!   elsewhere (a spawned task, a blocking thread), which gets a clone;
//! - the **trace**: [`courier_transport::trace::current`] is the caller's
//!   trace, continued (see [Tracing](#tracing)).
//!
//! The free functions [`cancelled`] and [`remaining`] do the same for the
//! call being handled.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use courier_rpc::{Authenticator, CallContext, Client, ClientConfig, Secret, Server, ServerConfig};
//!
//! #[courier_rpc::service]
//! trait Reports {
//!     /// Who is asking, and how many whole seconds they will wait.
//!     async fn whoami(&self) -> (Option<String>, Option<u64>);
//!     /// Long blocking work that stops when nobody waits for it any more.
//!     async fn crunch(&self, steps: u64) -> Result<u64, String>;
//! }
//!
//! struct Host;
//! impl Reports for Host {
//!     async fn whoami(&self) -> (Option<String>, Option<u64>) {
//!         let call = CallContext::current().expect("inside a handler");
//!         let caller = call.caller().map(str::to_string);
//!         (caller, call.remaining().map(|left| left.as_secs()))
//!     }
//!     async fn crunch(&self, steps: u64) -> Result<u64, String> {
//!         let call = CallContext::current().expect("inside a handler");
//!         // The blocking thread is not stopped with the handler: it
//!         // watches the call itself.
//!         let work = tokio::task::spawn_blocking(move || {
//!             for done in 0..steps {
//!                 if call.is_cancelled() {
//!                     return Err(format!("cancelled after {done} steps"));
//!                 }
//!             }
//!             Ok(steps)
//!         });
//!         work.await.map_err(|err| err.to_string())?
//!     }
//! }
//!
//! struct Tokens;
//! impl Authenticator for Tokens {
//!     fn authenticate(&self, token: &Secret) -> Option<String> {
//!         token.matches(&Secret::new("ada's token")).then(|| "ada".to_string())
//!     }
//! }
//!
//! let listener = courier_transport::bind(&"mem://context-doc".parse()?, &Default::default()).await?;
//! let config = ServerConfig::default().with_authenticator(Arc::new(Tokens), false);
//! let server = Server::new(config).service(ReportsServer::new(Host)).spawn(listener);
//!
//! let config = ClientConfig::default()
//!     .with_token(Secret::new("ada's token"))
//!     .with_timeout(Duration::from_secs(30));
//! let reports = ReportsClient::new(Client::connect(server.local_addr(), config).await?);
//! let (caller, seconds) = reports.whoami().await?;
//! assert_eq!(caller.as_deref(), Some("ada"));
//! assert!(matches!(seconds, Some(29 | 30)), "{seconds:?}");
//! // Without a deadline there is none to see.
//! assert_eq!(reports.without_deadline().whoami().await?.1, None);
//! assert_eq!(reports.crunch(1_000).await?, Ok(1_000));
//! # Ok(()) }
//! ```
//!
//! ## Versioning
//!
//! Every method has a fingerprint: a hash of the service's name, the
//! method's name and kind (unary, `#[oneway]`, server, client or
//! bidirectional streaming), and the serde
//! shapes (`courier_wire::schema::Schema`) of its argument tuple and of its
//! result or item type. The generated client sends the fingerprint of the
//! method being called in each request; the server compares it with its
//! own for that method and refuses a difference with
//! [`RpcError::ProtocolMismatch`] `{ service, method }`, before decoding
//! anything. A method the server does not have is
//! [`RpcError::UnknownMethod`]. Either refusal concerns that call only: the
//! connection and the other methods go on working. A `#[oneway]` call is
//! never answered, so a refused one is dropped (the server logs the fault,
//! naming the method, at debug level).
//!
//! `<Trait>Client::method_fingerprint("name")` gives a method's fingerprint
//! (`None` for a method the definition lacks) and `<Trait>Client::METHODS`
//! lists the methods; pass the former to [`Client::call`],
//! [`Client::call_stream`] or [`Client::notify`] when calling by hand.
//!
//! Compatible changes, with old clients against a new server and new
//! clients against an old one:
//!
//! - adding a method (a client calling it on a server without it gets
//!   [`RpcError::UnknownMethod`]);
//! - removing a method no client calls any more (those that still do get
//!   [`RpcError::UnknownMethod`]);
//! - reordering methods, renaming a method's parameters, changing a
//!   method's body, moving a type to another module (module paths are not
//!   part of a shape).
//!
//! Incompatible changes, which make that method (and only that method)
//! fail with [`RpcError::ProtocolMismatch`]:
//!
//! - any change to a type in the method's arguments or result, however
//!   deep: a field added, removed, reordered, renamed or retyped; a struct,
//!   enum or variant renamed; an enum variant added, **even at the end**
//!   (postcard could still decode the old variants, but the shape traces
//!   every variant, so the fingerprint changes);
//! - a field added with `#[serde(default)]`: postcard is not
//!   self-describing (a struct is its fields in order, with no count or
//!   names), so a reader expecting the field runs out of bytes instead of
//!   taking the default, and an old reader would misread the new field's
//!   bytes; the fingerprint refuses it up front;
//! - adding or removing a parameter, or changing the method's kind
//!   (unary, one-way, server, client or bidirectional streaming).
//!
//! Renaming a method or the service is not a change of a method but a new
//! one: callers of the old name get [`RpcError::UnknownMethod`] (or
//! [`RpcError::UnknownService`]). To change a method's types, add a method
//! with the new ones beside it (`search_v2`) and remove the old one once no
//! client calls it.
//!
//! Whole-service fingerprints came before this: a client and a server
//! built on either side of that change refuse each other's every call
//! (as a mismatch, or as an undecodable report, since the mismatch report
//! now names the method).
//!
//! ## Payloads without copies
//!
//! An argument whose type is written `bytes::Bytes` (the path, not a bare
//! `Bytes`, which could name another type), and any `Bytes` field marked
//! `#[serde(deserialize_with = "courier_wire::shared::deserialize")]` in an
//! argument, reply or item type, is decoded as a slice of the frame it
//! arrived in instead of a copy (the wire form is `Bytes`'s own, so the
//! fingerprint does not change). The client shares every such payload: a
//! reply or item it keeps keeps its frame's buffer alive. The server shares
//! only payloads of 32 KiB or more that are at least a quarter of their
//! frame and copies the rest, so a handler that stores what it receives
//! (a broker holding messages for a slow subscriber) stays within its
//! memory bound; see [`courier_wire::shared::Sharing`].
//!
//! ## Server streaming
//!
//! A method whose last parameter is [`Items<T>`] streams: the handler sends
//! items as it produces them, and the client's stub returns an
//! [`ItemStream<T>`] to pull them from. The client grants credit (32 items
//! ahead) as it consumes, and [`Items::send`] waits when the credit runs
//! out, so a slow client never makes the server buffer more than that.
//! Dropping the stream cancels the handler. Streaming methods return `()`;
//! put per-item failures in the item type (`Result<T, E>`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! use courier_rpc::{Client, ClientConfig, Items, Server, ServerConfig};
//!
//! #[courier_rpc::service]
//! trait Counter {
//!     async fn count(&self, to: u32, items: Items<u32>);
//! }
//!
//! struct Counting;
//! impl Counter for Counting {
//!     async fn count(&self, to: u32, items: Items<u32>) {
//!         for n in 1..=to {
//!             if items.send(n).await.is_err() {
//!                 return; // the client went away
//!             }
//!         }
//!     }
//! }
//!
//! let listener = courier_transport::bind(&"mem://counter-doc".parse()?, &Default::default()).await?;
//! let server = Server::new(ServerConfig::default()).service(CounterServer::new(Counting)).spawn(listener);
//! let counter = CounterClient::new(Client::connect(server.local_addr(), ClientConfig::default()).await?);
//! let mut numbers = counter.count(100).await?;
//! let mut sum = 0;
//! while let Some(n) = numbers.next().await {
//!     sum += n?;
//! }
//! assert_eq!(sum, 5050);
//! # Ok(()) }
//! ```
//!
//! ## Client and bidirectional streaming
//!
//! The other two of gRPC's four shapes. A method whose last parameter is
//! [`Incoming<T>`] takes a stream from the client and returns one reply:
//! the client's stub returns a [`ClientStream<T, R>`] to
//! [`send`](ClientStream::send) items to, then
//! [`finish`](ClientStream::finish) for the reply. A method taking
//! `Incoming<In>` and then `Items<Out>` is bidirectional: the stub returns
//! an [`ItemSender<In>`] and an [`ItemStream<Out>`], each usable at its own
//! pace (from different tasks).
//!
//! - **Flow control both ways.** The server announces a window
//!   ([`ServerConfig::inbound_window`], 32 items) in its welcome; the
//!   client may have that many items unread at the server and
//!   [`ItemSender::send`] waits for the handler to read more, so a handler
//!   that stops reading holds the client to the window and the server never
//!   buffers more than the window per stream.
//! - **Cancellation from either side.** Dropping a [`ClientStream`] before
//!   its reply, or a bidirectional call's [`ItemStream`], cancels the call:
//!   the handler is stopped where it stands. Dropping an [`ItemSender`]
//!   without [`finish`](ItemSender::finish) ends the handler's input with
//!   [`IncomingError::Abandoned`]. A handler that drops its [`Incoming`]
//!   (or answers) makes the client's next send fail with
//!   [`RpcError::InputClosed`] at once.
//! - **Deadlines** bound the whole call, as for server streaming (or none:
//!   [`Client::without_deadline`]).
//! - **Limits.** Such calls count against the server's per-connection
//!   `max_streams`, as server streams do.
//! - **Older servers.** A server from before client streaming announces no
//!   window, and the client refuses such a call locally with
//!   [`RpcError::NotSupported`], sending nothing, instead of a call that
//!   would hang.
//!
//! The blocking client has no methods for these two shapes.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! use courier_rpc::{Client, ClientConfig, Incoming, Items, Server, ServerConfig};
//!
//! #[courier_rpc::service]
//! trait Stats {
//!     /// Client streaming: many numbers in, one sum out.
//!     async fn sum(&self, numbers: Incoming<u64>) -> u64;
//!     /// Bidirectional: a running total for each number.
//!     async fn running(&self, numbers: Incoming<u64>, totals: Items<u64>);
//! }
//!
//! struct Summing;
//! impl Stats for Summing {
//!     async fn sum(&self, mut numbers: Incoming<u64>) -> u64 {
//!         let mut sum = 0;
//!         while let Some(Ok(n)) = numbers.next().await {
//!             sum += n;
//!         }
//!         sum
//!     }
//!     async fn running(&self, mut numbers: Incoming<u64>, totals: Items<u64>) {
//!         let mut total = 0;
//!         while let Some(Ok(n)) = numbers.next().await {
//!             total += n;
//!             if totals.send(total).await.is_err() {
//!                 return; // the client went away
//!             }
//!         }
//!     }
//! }
//!
//! let listener = courier_transport::bind(&"mem://stats-doc".parse()?, &Default::default()).await?;
//! let server = Server::new(ServerConfig::default()).service(StatsServer::new(Summing)).spawn(listener);
//! let stats = StatsClient::new(Client::connect(server.local_addr(), ClientConfig::default()).await?);
//!
//! let mut sum = stats.sum().await?;
//! for n in 1..=100 {
//!     sum.send(n).await?; // waits whenever the server's window is full
//! }
//! assert_eq!(sum.finish().await?, 5050);
//!
//! let (numbers, mut totals) = stats.running().await?;
//! let sending = tokio::spawn(async move {
//!     for n in 1..=3 {
//!         numbers.send(n).await?;
//!     }
//!     numbers.finish().await
//! });
//! let mut seen = Vec::new();
//! while let Some(total) = totals.next().await {
//!     seen.push(total?);
//! }
//! sending.await??;
//! assert_eq!(seen, [1, 3, 6]);
//! # Ok(()) }
//! ```
//!
//! ## Tracing
//!
//! A call carries its caller's W3C trace context, so one request can be
//! followed from client through every server it reaches. The client reads
//! [`courier_transport::trace::current`] when it sends a call (unary,
//! one-way or streaming) and, when there is one, puts its `traceparent` in
//! the request; it starts no trace of its own (run the caller inside
//! [`courier_transport::trace::scope`] with a [`TraceContext::root`], or
//! under whatever started the trace, to have one). The server runs the
//! handler as a child of it: a context with the same trace id and a fresh
//! span id is current while the handler runs (so a call the handler makes
//! continues the trace), and the handler runs inside an `rpc` span (level
//! `INFO`) with fields `service`, `method`, `trace_id`, `parent_id` (the
//! caller's span id) and `span_id` (the handler's), which log lines the
//! handler writes are nested in.
//!
//! The `traceparent` travels in the request's extension, which a client
//! sends only to a server whose welcome says it reads one: an older server
//! gets requests in the layout it knows, with no trace.
//!
//! **OpenTelemetry** (feature `otel`, off by default): with
//! tracing-opentelemetry's layer installed over any `opentelemetry_sdk`
//! tracer (the application picks the exporter), the server's `rpc` span is
//! exported as the child of the caller's span, and a client inside a span
//! that OpenTelemetry tracks sends that span as the parent (it takes
//! precedence over [`courier_transport::trace::current`]), so a chain of
//! calls is one exported trace (`tests/otel.rs`).
//!
//! [`TraceContext::root`]: courier_transport::trace::TraceContext::root
//!
//! ## One-way calls
//!
//! A method marked `#[oneway]` (returning `()`, not streaming) is sent
//! without waiting for an answer: its client method returns once the
//! request is queued on the connection, waiting only while the send buffer
//! is full (flow control). The server runs one-way calls inline, in the
//! order they arrive, before it reads the next frame, so calls sent one
//! after another over one connection take effect in that order, and an
//! ordinary call sent after them is answered only once they have run: that
//! call is how a client learns they are done (see
//! [`Client::notify`] for what is lost with a connection).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! use std::sync::{Arc, Mutex};
//! use courier_rpc::{Client, ClientConfig, Server, ServerConfig};
//!
//! #[courier_rpc::service]
//! trait Tally {
//!     #[oneway]
//!     async fn add(&self, n: u64);
//!     async fn total(&self) -> u64;
//! }
//!
//! #[derive(Default)]
//! struct Sum(Arc<Mutex<u64>>);
//! impl Tally for Sum {
//!     async fn add(&self, n: u64) {
//!         *self.0.lock().unwrap() += n;
//!     }
//!     async fn total(&self) -> u64 {
//!         *self.0.lock().unwrap()
//!     }
//! }
//!
//! let listener = courier_transport::bind(&"mem://tally-doc".parse()?, &Default::default()).await?;
//! let server = Server::new(ServerConfig::default()).service(TallyServer::new(Sum::default())).spawn(listener);
//! let tally = TallyClient::new(Client::connect(server.local_addr(), ClientConfig::default()).await?);
//! for n in 1..=100 {
//!     tally.add(n).await?; // no round trip
//! }
//! assert_eq!(tally.total().await?, 5050); // answered after every add ran
//! # Ok(()) }
//! ```
//!
//! ## Blocking clients
//!
//! For programs without an async runtime, the attribute also generates
//! `<Trait>BlockingClient`: the same methods, blocking the thread until the
//! call is answered (a streaming one returns a [`blocking::BlockingItems`]
//! iterator). It is `Clone` (clones share the connection and the runtime)
//! and has `with_timeout`, like the async client. Build it with
//! `connect(address, config)` (a runtime of its own), `connect_on(&runtime,
//! address, config)` (a [`blocking::Runtime`] shared by many clients,
//! instead of one runtime per connection) or `new(client, runtime)` (an
//! existing async [`Client`], sharing its connection, on a shared runtime
//! or on the caller's own through [`blocking::Runtime::from_handle`]).
//! Never call one from async code. The [`blocking`] module has an example.
//!
//! ```
//! # let tokio = tokio::runtime::Runtime::new().unwrap();
//! # let server = tokio.block_on(async {
//! #     let listener = courier_transport::bind(&"mem://blocking-doc".parse().unwrap(), &Default::default()).await.unwrap();
//! #     courier_rpc::Server::new(Default::default()).service(CounterServer::new(Zero)).spawn(listener)
//! # });
//! # struct Zero;
//! # impl Counter for Zero { async fn next(&self) -> u64 { 0 } }
//! use std::time::Duration;
//! use courier_rpc::{blocking::Runtime, ClientConfig};
//!
//! #[courier_rpc::service]
//! trait Counter {
//!     async fn next(&self) -> u64;
//! }
//!
//! let runtime = Runtime::new()?; // one runtime for every connection below
//! let counter = CounterBlockingClient::connect_on(&runtime, server.local_addr(), ClientConfig::default())?;
//! let patient = counter.with_timeout(Duration::from_secs(60));
//! std::thread::spawn(move || patient.next()).join().unwrap()?;
//! assert_eq!(counter.next()?, 0);
//! # Ok::<(), courier_rpc::RpcError>(())
//! ```

#![warn(missing_docs)]

pub mod auth;
pub mod blocking;
mod client;
mod error;
mod inbound;
#[cfg(feature = "otel")]
mod otel;
mod protocol;
mod server;
mod stream;

use std::future::Future;
use std::pin::Pin;

pub use auth::{caller, Authenticator, Secret};
pub use client::{Client, ClientConfig, DEFAULT_HEARTBEAT};
pub use courier_rpc_macros::service;
pub use courier_transport::Address;
/// What kind of failure an error is ([`RpcError::kind`]), shared by every
/// Courier crate.
pub use courier_transport::ErrorKind;
pub use error::{RpcError, RpcFault};
pub use inbound::{ClientStream, Incoming, IncomingError, ItemSender};
pub use server::{
    cancelled, remaining, CallContext, Privileged, Server, ServerConfig, ServerHandle,
    ServiceAccess,
};
#[doc(hidden)]
pub use stream::ItemSink;
pub use stream::{ItemError, ItemStream, Items, StreamClosed};

/// A service the server can dispatch to. Implemented by the generated
/// `<Trait>Server`; there is rarely a reason to implement it by hand.
pub trait Service: Send + Sync + 'static {
    /// The service's name (the trait's name).
    fn name(&self) -> &'static str;
    /// The fingerprint of `method` (see the crate docs, "Versioning"), or
    /// `None` if the service has no such method. A request's fingerprint
    /// must equal the one of the method it names.
    fn method_fingerprint(&self, method: &str) -> Option<u64>;
    /// Starts `method` with postcard-encoded `args`; a streaming method sends
    /// its items through `items`.
    fn call(
        &self,
        method: &str,
        args: &[u8],
        items: ItemSink,
    ) -> Result<__private::Reply, RpcFault>;
}

/// Support for generated code. Not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde::Serialize;

    /// A running call: its encoded reply, or a fault.
    pub type Reply = Pin<Box<dyn Future<Output = Result<bytes::Bytes, RpcFault>> + Send>>;

    pub fn schema<T: DeserializeOwned>() -> u64 {
        courier_wire::schema::Schema::of::<T>().fingerprint
    }

    /// FNV-1a over the service name and each method's name and schemas. The
    /// generated code calls it with one method at a time: a method's
    /// fingerprint.
    pub fn fingerprint(service: &str, methods: &[(&str, u64, u64)]) -> u64 {
        let mut hash = courier_wire::schema::Fnv1a::new();
        hash.write(service.as_bytes());
        for (name, args, result) in methods {
            hash.write(b"\n");
            hash.write(name.as_bytes());
            hash.write(&args.to_le_bytes());
            hash.write(&result.to_le_bytes());
        }
        hash.finish()
    }

    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
        let (value, rest) = postcard::take_from_bytes(bytes)?;
        if rest.is_empty() {
            Ok(value)
        } else {
            Err(postcard::Error::DeserializeBadEncoding)
        }
    }

    /// Decodes `bytes`, a received frame's payload, with its `Bytes`
    /// fields (those marked with `courier_wire::shared::deserialize`, and
    /// `Bytes` arguments) as slices of it where `sharing` allows.
    pub fn decode_shared<T: DeserializeOwned>(
        bytes: &bytes::Bytes,
        sharing: courier_wire::shared::Sharing,
    ) -> Result<T, postcard::Error> {
        courier_wire::shared::with_source(bytes, sharing, || decode(bytes))
    }

    /// What a `Bytes` argument decodes as (a slice of the request where
    /// the server shares: see `courier_wire::shared`).
    pub use courier_wire::shared::SharedBytes;

    pub fn decode_args<T: DeserializeOwned>(args: &[u8]) -> Result<T, RpcFault> {
        decode(args).map_err(|err| RpcFault::Malformed {
            reason: err.to_string(),
        })
    }

    pub fn encode_reply<T: Serialize>(value: &T) -> Result<bytes::Bytes, RpcFault> {
        encode(value).map_err(|err| RpcFault::Malformed {
            reason: format!("reply could not be serialized: {err}"),
        })
    }

    /// Encodes `value` with postcard. A small value is encoded on the stack
    /// and copied into an allocation of its size: one allocation, where a
    /// growing `Vec` would reallocate several times.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<bytes::Bytes, postcard::Error> {
        let mut small = [0u8; 256];
        match postcard::to_slice(value, &mut small) {
            Ok(encoded) => Ok(bytes::Bytes::copy_from_slice(encoded)),
            Err(postcard::Error::SerializeBufferFull) => {
                postcard::to_stdvec(value).map(bytes::Bytes::from)
            }
            Err(err) => Err(err),
        }
    }

    #[cfg(test)]
    mod tests {
        /// Fingerprints are protocol: every deployed client and server
        /// compares them, so their value must not change by accident (when
        /// the hash moved to courier-wire, for one). Computed independently:
        /// FNV-1a 64 of `"(u32,u32)\n"`, of `"u32\n"`, then of
        /// `"Calculator\nadd"` followed by those two, little-endian.
        #[test]
        fn fingerprints_keep_their_values() {
            let args = super::schema::<(u32, u32)>();
            let result = super::schema::<u32>();
            assert_eq!(args, 0xd03c_05a5_7992_3392);
            assert_eq!(result, 0xa6b2_f2e5_3c41_0621);
            assert_eq!(
                super::fingerprint("Calculator", &[("add", args, result)]),
                0x870a_c4b9_f19a_fdb9
            );
        }
    }
}
