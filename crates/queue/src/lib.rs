//! # courier-queue
//!
//! Durable message queues. **Status:** the storage engine is here — the
//! [`log`] of CRC-checked records in segment files, with recovery of torn
//! writes, group commit under an explicit fsync policy, and deletion of
//! consumed segments. Queue semantics (leases, redelivery, dead letters,
//! competing consumers) and the remote face come next, on top of it.
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use bytes::Bytes;
//! use courier_queue::log::{FsyncPolicy, Log, LogOptions};
//!
//! let dir = std::env::temp_dir().join(format!("courier-log-doc-{}", std::process::id()));
//! let options = LogOptions::default().with_fsync(FsyncPolicy::Always);
//! let (log, _) = Log::open(&dir, options.clone(), |_| {})?;
//! let seq = log.append(1, Bytes::from_static(b"hello")).await?; // durable when this returns
//! log.close();
//!
//! let mut replayed = Vec::new();
//! let (_log, recovery) = Log::open(&dir, options, |record| replayed.push(record))?;
//! assert_eq!((replayed[0].seq, &replayed[0].payload[..]), (seq, &b"hello"[..]));
//! assert_eq!(recovery.truncated_bytes, 0);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```
//!
//! ## Dependencies
//!
//! `crc32c` (hardware CRC32C), as in courier-wire.

#![warn(missing_docs)]

mod api;
pub mod core;
pub mod log;
mod queue;
pub mod remote;
pub mod storage;

pub use api::{ConsumerHandle, DeliveryHandle, QueueHandle};
pub use queue::{
    parse_dead_letter, Consumer, Delivery, Enqueued, Message, Queue, QueueError, QueueOptions,
};
