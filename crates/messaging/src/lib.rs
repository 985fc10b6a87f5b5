//! # courier-messaging
//!
//! Message passing between Courier nodes: typed messages between uniquely
//! identified endpoints, with acknowledgements, retries and
//! de-duplication, plus request/response.
//!
//! - [`Node`]: a process's identity ([`NodeId`]), its listeners, its named
//!   endpoints, and managed connections to peers (made on first use, remade
//!   with backoff after failures, unacknowledged messages resent).
//! - [`Mailbox`] / [`Sender`]: typed receive and send, in one of three
//!   [`Delivery`] modes, each documented with exactly what its `Ok` means
//!   ([`Progress`]). Failed sends hand the message back ([`SendError`]).
//! - [`Node::respond`] / [`Node::request`]: request/response with
//!   correlation ids, a timeout per request, many in flight per connection,
//!   replies matched in any order.
//! - [`blocking`]: the same node for programs without a runtime.
//! - Schema checks: every message carries its type's [`Schema`]
//!   fingerprint; a receiver built with another version of the type refuses
//!   it, naming its own type, instead of decoding garbage.
//!
//! The protocol logic is pure state machines with no sockets and no clock,
//! tested deterministically under a simulated lossy network:
//! [`reliable`] ([`Outbox`], [`Inbox`]) and [`requests`] ([`Requests`]).
//! The node is the thin tokio shell that drives them.
//!
//! Two processes exchanging typed messages (at-least-once both ways, then a
//! request): `crates/messaging/examples/orders.rs`
//! (`cargo run -p courier-messaging --example orders`).
//!
//! ## Delivery semantics
//!
//! | mode | `send` returns `Ok` when | the handler sees a message |
//! |---|---|---|
//! | [`Delivery::AtMostOnce`] | it is written to the connection | at most once |
//! | [`Delivery::AtLeastOnce`] | the receiving node acknowledged it (it is in the mailbox) | at least once |
//! | [`Delivery::EffectivelyOnce`] | as at-least-once | once, while the receiver remembers the sender's stream (a bounded window; not across a receiver restart) |
//!
//! At-least-once messages are retried, with exponential backoff and across
//! reconnections, until acknowledged, refused by the receiver
//! ([`SendErrorKind::Rejected`]) or [`NodeConfig::send_timeout`] passes
//! ([`SendErrorKind::Expired`]: delivery unknown). Each send gets exactly one
//! of these outcomes. A full mailbox slows the sending connection down; it
//! never drops a message.

//! ## Example
//!
//! A sender and a receiver exchanging one message over a "network" that
//! loses the first transmission:
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use courier_messaging::{Inbox, Outbox, OutboxEvent, RetryPolicy, Verdict};
//!
//! let mut outbox = Outbox::new(16, RetryPolicy::default());
//! let mut inbox: Inbox<u64> = Inbox::new(1024, 64);
//! let start = Duration::ZERO;
//! let seq = outbox.push(Bytes::from_static(b"hello"), start, Duration::from_secs(10)).unwrap();
//!
//! let lost = outbox.poll_transmit(start).unwrap(); // dropped by the network
//! assert_eq!(lost.attempt, 1);
//!
//! // The retransmission timer fires.
//! let later = outbox.poll_timeout().unwrap();
//! let retry = outbox.poll_transmit(later).unwrap();
//! assert_eq!((retry.seq, retry.attempt), (seq, 2));
//! assert_eq!(inbox.handle_data(&7, retry.seq, retry.low_water), Verdict::Deliver);
//!
//! // The ack comes back; a duplicate of the message would now be recognised.
//! outbox.handle_ack(retry.seq);
//! assert_eq!(outbox.poll_event(), Some(OutboxEvent::Acked { seq, attempts: 2 }));
//! assert_eq!(inbox.handle_data(&7, retry.seq, retry.low_water), Verdict::Duplicate);
//! ```

#![warn(missing_docs)]

pub mod blocking;
mod error;
mod id;
mod node;
mod protocol;
pub mod reliable;
pub mod requests;
/// Schema fingerprints; defined in courier-wire (so that RPC, pub/sub and
/// queues share them without depending on messaging) and re-exported here.
pub use courier_wire::schema;

/// What kind of failure an error is (every error's `kind()`), shared by
/// every Courier crate.
pub use courier_transport::ErrorKind;
pub use error::{EndpointError, RequestError, SendError, SendErrorKind, StartError};
pub use id::{NodeId, NodeIdError};
pub use node::{Delivery, Envelope, Mailbox, Node, NodeConfig, Progress, Sender, ShutdownReport};
pub use protocol::Rejection;
pub use reliable::{DedupWindow, Inbox, Outbox, OutboxEvent, RetryPolicy, Seq, Transmit, Verdict};
pub use requests::Requests;
pub use schema::Schema;
