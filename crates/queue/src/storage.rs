//! The storage a queue writes through. [`crate::log::Log`] is the
//! implementation on local disk; a replicated backend implements the same
//! trait without touching the queue's semantics.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::log::{AppendError, Log, Seq};

/// A boxed future, so the trait can be used as `dyn Storage`.
pub type StorageFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, AppendError>> + Send + 'a>>;

/// Durable, ordered storage of records. Records are replayed by whatever
/// opens the storage, before the queue is built on it.
pub trait Storage: Send + Sync + 'static {
    /// Appends records together; the first one's sequence number once durable.
    fn append_batch(&self, records: Vec<(u8, Bytes)>) -> StorageFuture<'_, Seq>;
    /// Forgets everything before `seq` that can be forgotten; how many units went.
    fn remove_before(&self, seq: Seq) -> StorageFuture<'_, usize>;
    /// Bytes held.
    fn bytes_on_disk(&self) -> u64;
}

impl Storage for Log {
    fn append_batch(&self, records: Vec<(u8, Bytes)>) -> StorageFuture<'_, Seq> {
        Box::pin(Log::append_batch(self, records))
    }

    fn remove_before(&self, seq: Seq) -> StorageFuture<'_, usize> {
        Box::pin(Log::remove_before(self, seq))
    }

    fn bytes_on_disk(&self) -> u64 {
        Log::bytes_on_disk(self)
    }
}
