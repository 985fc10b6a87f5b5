//! The runtime behind generated `<Service>BlockingClient`s: a small tokio
//! runtime (one worker thread) owned by the client, for programs that have
//! none. Calls block the calling thread; do not use them inside async code.

use std::future::Future;

use crate::RpcError;

/// A runtime owned by a blocking client.
#[derive(Debug)]
pub struct Runtime {
    runtime: tokio::runtime::Runtime,
}

impl Runtime {
    /// Starts the runtime.
    pub fn new() -> Result<Runtime, RpcError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("courier-rpc-client")
            .enable_all()
            .build()
            .map_err(|err| RpcError::Unavailable(format!("cannot start a runtime: {err}")))?;
        Ok(Runtime { runtime })
    }

    /// Runs `future` to completion on this runtime, blocking the thread.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
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
