//! # courier-queue
//!
//! Durable message queues: a message stays stored until a consumer has
//! processed and acknowledged it.
//!
//! - [`Queue`]: embedded, in this process, no broker. [`Queue::enqueue`]
//!   returns once the message is durable under the fsync policy; consumers
//!   take messages under leases, `ack` after processing, `nack` (with an
//!   optional delay) or `extend`; expired leases and departed consumers give
//!   messages back; after `max_deliveries` a message goes to the
//!   `<name>.dlq` queue with its delivery history (a dead-letter queue is
//!   a queue like any other, except that it never dead-letters: a dead
//!   letter stays until acknowledged or [`Queue::purge`]d); a look at the
//!   next ready messages without taking them ([`Queue::peek`]); per-message
//!   time-to-live, delayed delivery, and idempotency keys answered with an
//!   explicit [`Enqueued::Duplicate`].
//! - [`remote`]: the same queues served as a courier-rpc service
//!   ([`remote::QueueHost`]) and used from other processes
//!   ([`remote::RemoteQueue`]); deliveries stream under credit, acks (and
//!   single enqueues) made while earlier ones are in flight travel in one
//!   call and share one log write. A consumer whose connection dies gives
//!   its messages back at once.
//! - [`QueueHandle`] and friends: one API over both faces.
//! - [`core`]: the lease, redelivery, dead-letter and de-duplication rules
//!   as a pure state machine driven by explicit time.
//! - [`log`]: the storage engine — CRC-checked records in segment files,
//!   recovery of torn writes, group commit under an explicit
//!   [`log::FsyncPolicy`] (whose docs say what a crash can lose), deletion
//!   of consumed segments — behind the [`storage::Storage`] trait.
//!
//! Delivery counts and leases live in memory: after a restart, every
//! unacknowledged message is ready again with its count starting over.
//! Payloads of stored messages are kept in memory too, so memory follows
//! the backlog.
//!
//! Two processes sharing a queue (a producer hosting it, a consumer taking
//! it over the network, one job redelivered after a nack):
//! `crates/queue/examples/jobs.rs` (`cargo run -p courier-queue --example jobs`).

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
mod coalesce;
pub mod core;
pub mod log;
mod queue;
pub mod remote;
pub mod storage;

pub use api::{ConsumerHandle, DeliveryHandle, QueueHandle};
/// What kind of failure an error is (every error's `kind()`), shared by
/// every Courier crate.
pub use courier_transport::ErrorKind;
pub use queue::{
    parse_dead_letter, Consumer, Delivery, Enqueued, Message, Peeked, Queue, QueueError,
    QueueOptions,
};
