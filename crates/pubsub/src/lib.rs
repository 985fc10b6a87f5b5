//! # courier-pubsub
//!
//! Publish–subscribe on subjects with wildcards.
//!
//! - [`subject`]: subjects (`orders.eu.created`) and filters with `*` (one
//!   token) and `>` (the rest), validated with errors that point at the bad
//!   token.
//! - [`router`]: a token trie; matching costs follow the subject's depth.
//! - [`Bus`]: the in-process bus. Every matching subscription gets each
//!   message (queue groups share theirs, one member each); a subscription's
//!   buffer is bounded and its [`SlowConsumer`] policy decides what happens
//!   when it is full, with a drop counter; each subscriber gets per-publisher
//!   sequence numbers and an [`Event::Gap`] for anything it missed;
//!   `subscribe` returns with the subscription already active.
//!
//! **Status:** serving the bus to other processes (through the broker),
//! durable subscriptions on courier-queue, and request-reply over subjects
//! come next.

#![warn(missing_docs)]

mod bus;
pub mod router;
pub mod subject;

pub use bus::{Bus, Event, Message, Publisher, SlowConsumer, SubscribeOptions, Subscription};
pub use router::{Router, SubscriptionId};
pub use subject::{Filter, Subject, SubjectError};
