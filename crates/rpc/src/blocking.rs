//! Blocking clients, for programs without an async runtime.
//!
//! `#[courier_rpc::service]` generates a `<Trait>BlockingClient` beside the
//! async `<Trait>Client`, with the same methods returning their results
//! directly (a streaming method returns a [`BlockingItems`] iterator). It
//! is `Clone` (clones share the connection and the runtime), has
//! `with_timeout` like the async client, and is built in one of three
//! ways:
//!
//! - `<Trait>BlockingClient::connect(address, config)` connects on a
//!   runtime of its own (a [`Runtime::new`]: one worker thread);
//! - `<Trait>BlockingClient::connect_on(&runtime, address, config)`
//!   connects on a [`Runtime`] the caller shares between many clients,
//!   rather than one runtime per connection;
//! - `<Trait>BlockingClient::new(client, runtime)` wraps an existing async
//!   [`Client`](crate::Client) (so the blocking and async faces share one
//!   connection), with a [`Runtime`] that is either shared or made with
//!   [`Runtime::from_handle`] from the caller's tokio runtime.
//!
//! Every call blocks the calling thread until it is answered: never call
//! one from async code (a task on a runtime's worker), where tokio panics
//! rather than block a worker; use the async client there, or
//! `tokio::task::spawn_blocking`.
//!
//! ```
//! use courier_rpc::blocking::Runtime;
//! use courier_rpc::{Client, ClientConfig, Server, ServerConfig};
//!
//! #[courier_rpc::service]
//! trait Greeter {
//!     async fn greet(&self, name: String) -> String;
//! }
//!
//! struct English;
//! impl Greeter for English {
//!     async fn greet(&self, name: String) -> String {
//!         format!("hello, {name}")
//!     }
//! }
//!
//! // A program with a tokio runtime of its own (here it also runs the server).
//! let tokio = tokio::runtime::Runtime::new().unwrap();
//! let server = tokio.block_on(async {
//!     let listener = courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
//!         .await
//!         .unwrap();
//!     Server::new(ServerConfig::default()).service(GreeterServer::new(English)).spawn(listener)
//! });
//!
//! // One runtime of its own per connection:
//! let greeter = GreeterBlockingClient::connect(server.local_addr(), ClientConfig::default()).unwrap();
//! assert_eq!(greeter.greet("Ada".into()).unwrap(), "hello, Ada");
//!
//! // Or on the program's runtime, wrapping a client its async code also uses:
//! let client = tokio.block_on(Client::connect(server.local_addr(), ClientConfig::default())).unwrap();
//! let shared = GreeterBlockingClient::new(client, Runtime::from_handle(tokio.handle().clone()));
//! let patient = shared.with_timeout(std::time::Duration::from_secs(30));
//! assert_eq!(patient.greet("Grace".into()).unwrap(), "hello, Grace");
//! # drop((greeter, shared, patient, server));
//! ```

use std::future::Future;
use std::sync::Arc;

use crate::RpcError;

/// The runtime a blocking client runs its calls on: one it owns (shared
/// by its clones), or a handle to the caller's. Cloning it is cheap and
/// shares the runtime, so many blocking clients can run on one.
#[derive(Clone, Debug)]
pub struct Runtime {
    inner: Inner,
}

#[derive(Clone, Debug)]
enum Inner {
    /// Started by [`Runtime::new`]; stopped when the last clone goes.
    Owned(Arc<tokio::runtime::Runtime>),
    /// The caller's runtime.
    Handle(tokio::runtime::Handle),
}

impl Runtime {
    /// Starts a runtime of its own: one worker thread, I/O and timers.
    /// It stops when the last clone is dropped (which must not happen in
    /// async code: drop blocking clients outside the runtime's tasks).
    pub fn new() -> Result<Runtime, RpcError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("courier-rpc-client")
            .enable_all()
            .build()
            .map_err(|err| RpcError::Unavailable(format!("cannot start a runtime: {err}")))?;
        Ok(Runtime {
            inner: Inner::Owned(Arc::new(runtime)),
        })
    }

    /// Runs calls on the caller's runtime, through `handle`
    /// (`tokio::runtime::Handle::current()` inside it, or
    /// `runtime.handle().clone()`). The runtime must have I/O and timers
    /// enabled and be a multi-thread one, or a current-thread one that
    /// another thread is driving with `block_on`: a current-thread runtime
    /// runs its drivers only inside its own `block_on`, so a call would
    /// otherwise never be answered.
    pub fn from_handle(handle: tokio::runtime::Handle) -> Runtime {
        Runtime {
            inner: Inner::Handle(handle),
        }
    }

    /// The handle of the runtime calls run on (to spawn on it, or to hand
    /// to [`Runtime::from_handle`] elsewhere).
    pub fn handle(&self) -> &tokio::runtime::Handle {
        match &self.inner {
            Inner::Owned(runtime) => runtime.handle(),
            Inner::Handle(handle) => handle,
        }
    }

    /// Runs `future` to completion on this runtime, blocking the thread.
    /// Panics if called from async code (a task on any tokio runtime).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        match &self.inner {
            Inner::Owned(runtime) => runtime.block_on(future),
            Inner::Handle(handle) => handle.block_on(future),
        }
    }
}

/// The items of a streaming call, for code without a runtime: an iterator
/// that blocks for each item. Dropping it cancels the call.
pub struct BlockingItems<'a, T> {
    stream: crate::ItemStream<T>,
    runtime: &'a Runtime,
}

impl<T> std::fmt::Debug for BlockingItems<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.stream.fmt(f)
    }
}

impl<'a, T> BlockingItems<'a, T> {
    #[doc(hidden)]
    pub fn new(stream: crate::ItemStream<T>, runtime: &'a Runtime) -> Self {
        BlockingItems { stream, runtime }
    }
}

impl<T: serde::de::DeserializeOwned> Iterator for BlockingItems<'_, T> {
    type Item = Result<T, crate::RpcError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.runtime.block_on(self.stream.next())
    }
}
