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
