//! # courier-messaging
//!
//! Message passing between Courier nodes: identity, reliable delivery and
//! request/response correlation.
//!
//! **Status.** This crate holds the protocol cores so far, written as pure
//! state machines with no sockets and no clock, so that loss, duplication,
//! reordering and restarts can be tested deterministically:
//!
//! - [`NodeId`]: 128-bit node identity, printable and parseable.
//! - [`reliable`]: at-least-once delivery ([`Outbox`]: sequence numbers,
//!   acknowledgements, retransmission with backoff until acknowledged or a
//!   deadline) and receiver-side de-duplication ([`Inbox`], a bounded window
//!   per sender stream), which together give effectively-once delivery to
//!   the handler. The module docs state exactly what each side promises.
//! - [`requests`]: correlation ids, deadlines and out-of-order replies.
//! - [`schema`]: a fingerprint of a message type's serde shape, so nodes
//!   built with different versions of a type refuse each other by name.
//!
//! The tokio shell that drives them over `courier-transport` connections
//! (handshake, typed channels, managed connections, sync face) comes next.
//!
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
pub mod schema;

pub use error::{EndpointError, RequestError, SendError, SendErrorKind, StartError};
pub use id::{NodeId, NodeIdError};
pub use node::{Delivery, Envelope, Mailbox, Node, NodeConfig, Progress, Sender, ShutdownReport};
pub use protocol::Rejection;
pub use reliable::{DedupWindow, Inbox, Outbox, OutboxEvent, RetryPolicy, Seq, Transmit, Verdict};
pub use requests::Requests;
pub use schema::Schema;
