//! # courier-queue
//!
//! Durable message queues: a message stays stored until a consumer has
//! processed and acknowledged it.
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use courier_queue::{Message, Queue, QueueOptions};
//!
//! let dir = std::env::temp_dir().join(format!("courier-queue-lib-doc-{}", std::process::id()));
//! let jobs = Queue::open(&dir, "jobs", QueueOptions::default()).await?;
//! jobs.enqueue(Message::new("resize photo 1")).await?; // durable when this returns
//! jobs.enqueue(Message::new("resize photo 2")).await?;
//!
//! let mut consumer = jobs.consumer(10).await?; // holds at most 10 unacknowledged
//! let first = consumer.recv().await?;
//! first.ack().await?; // processed: gone for good
//! let second = consumer.recv().await?;
//! second.nack(Duration::ZERO).await?; // failed: it comes back
//! let again = consumer.recv().await?;
//! assert_eq!((&again.payload[..], again.delivery), (&b"resize photo 2"[..], 2));
//! again.reject().await?; // a poison message: to `jobs.dlq` at once
//! assert_eq!(jobs.stats().await?.dead_lettered, 1);
//! # drop(consumer); drop(jobs);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```
//!
//! ## One API, embedded or remote
//!
//! - [`Queue`]: embedded, in this process, no broker. [`Queue::enqueue`]
//!   returns once the message is durable under the fsync policy; consumers
//!   take messages under leases, `ack` after processing, `nack` (with an
//!   optional delay), `reject` (a poison message, dead-lettered at once)
//!   or `extend`; expired leases and departed consumers give messages
//!   back; after `max_deliveries` a message goes to the `<name>.dlq` queue
//!   with its delivery history (a dead-letter queue is a queue like any
//!   other, except that it never dead-letters: a dead letter stays until
//!   acknowledged or [`Queue::purge`]d); a look at the next ready messages
//!   without taking them ([`Queue::peek`]); per-message time-to-live,
//!   delayed delivery, and idempotency keys answered with an explicit
//!   [`Enqueued::Duplicate`].
//! - `remote` (feature `remote`, on by default): the same queues served as
//!   a courier-rpc service (`remote::QueueHost`) and used from other
//!   processes (`remote::RemoteQueue`); deliveries stream under credit,
//!   acks (and single enqueues) made while earlier ones are in flight
//!   travel in one call and share one log write. A consumer whose
//!   connection dies gives its messages back at once.
//! - [`QueueHandle`], [`ConsumerHandle`], [`DeliveryHandle`]: the API both
//!   faces share. `Queue` and `RemoteQueue` (and their consumers and
//!   deliveries) have the same methods with the same arguments and return
//!   shapes — async and returning a `Result` wherever the remote face
//!   needs it — so a program written against the traits runs on either,
//!   and switching a concrete program is one line (`Queue::open` for
//!   `RemoteQueue::connect`). Both consumers are also a
//!   `futures_core::Stream` of the same items.
//! - [`QueueDeclaration`]: per-queue options — max deliveries, lease
//!   (visibility timeout), dead-lettering on or off — set by a client when
//!   it declares the queue ([`Queue::open_declared`],
//!   `RemoteQueue::declare`), validated, stored with the queue (so a
//!   restart keeps them) and never changed by a later declaration (a
//!   different one is a `Conflict`). What a declaration leaves unset is
//!   the host's [`core::QueueConfig`] (the broker's config file).
//! - [`TypedQueue`]: values of one serde type in and out, on either face,
//!   the type's schema fingerprint carried in each message's headers; a
//!   message of another type is a per-delivery [`TypeError`] naming both
//!   types, never a wrongly decoded value. Messages carry bounded text
//!   [`Message::headers`] (stored in the log; logs written before headers
//!   existed read as before).
//! - [`QueueSet`]: the queues under one directory, each opened once and
//!   shared (what a host serves).
//! - [`blocking`]: the same operations from plain threads, for programs
//!   without a runtime: [`blocking::BlockingQueue`] over either face, on a
//!   runtime it owns or the caller's.
//!
//! ## Cancellation
//!
//! Any of these futures may be dropped at any await (in `tokio::select!`,
//! under a timeout):
//!
//! - `recv` on [`Consumer`], `RemoteConsumer` and [`TypedConsumer`], and
//!   polling either consumer as a `Stream`, are **cancel-safe**: a
//!   delivery is taken and returned in one poll, and what the host has
//!   sent waits in the consumer, so a dropped `recv` loses nothing and the
//!   next one returns it.
//! - `ack`, `nack` and `reject` are applied once first polled (the record
//!   is written by a task of its own); dropped before their first poll,
//!   the delivery is given back as any unanswered one is.
//! - `enqueue` dropped after its first poll may still store the message
//!   (as any call whose request went out may); use an idempotency key to
//!   retry safely.
//!
//! ## Compatibility
//!
//! - **On disk:** logs written before messages had headers are read as
//!   before, and a message without headers is still written in the old
//!   layout. A message with headers (every typed or traced one) is a
//!   record kind older versions do not know and skip: **do not downgrade**
//!   a queue directory that holds such messages.
//! - **On the wire:** the queue protocol's methods changed with headers,
//!   reject and declarations, so a client and a host from before and after
//!   this change refuse each other's calls with
//!   `RpcError::ProtocolMismatch` naming the method (per-method
//!   fingerprints: nothing is misread). Upgrade hosts and clients
//!   together.
//!
//! ## Underneath
//!
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
//!
//! ## The log by itself
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
//! ## Feature flags
//!
//! - `remote` (default): the `remote` module (host and client over
//!   courier-rpc). Without it the crate depends on no RPC or macro crates.
//!
//! ## Dependencies
//!
//! `crc32c` (hardware CRC32C), as in courier-wire.

#![warn(missing_docs)]

mod api;
pub mod blocking;
#[cfg(feature = "remote")]
mod coalesce;
pub mod core;
mod declare;
pub mod log;
mod queue;
#[cfg(feature = "remote")]
pub mod remote;
mod set;
pub mod storage;
mod typed;

pub use api::{ConsumerHandle, DeliveryHandle, QueueHandle};
/// What kind of failure an error is (every error's `kind()`), shared by
/// every Courier crate.
pub use courier_wire::ErrorKind;
pub use declare::{QueueDeclaration, MAX_DELIVERIES_LIMIT, MAX_LEASE, MIN_LEASE};
pub use queue::{
    parse_dead_letter, Consumer, Delivery, Enqueued, Message, Peeked, Queue, QueueError,
    QueueOptions, DEAD_LETTER_TYPE,
};
pub use set::QueueSet;
pub use typed::{TypeError, TypedConsumer, TypedDelivery, TypedError, TypedQueue};
