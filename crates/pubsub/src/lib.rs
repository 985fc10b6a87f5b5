//! # courier-pubsub
//!
//! Publish–subscribe on subjects with wildcards.
//!
//! **Status:** subjects and filters ([`subject`]), the trie router
//! ([`router`]) and the in-process [`Bus`] are here. Serving the bus through
//! the broker to other processes, durable subscriptions on courier-queue,
//! and request-reply over subjects come next.

#![warn(missing_docs)]

mod bus;
pub mod router;
pub mod subject;

pub use bus::{Bus, Event, Message, Publisher, SlowConsumer, SubscribeOptions, Subscription};
pub use router::{Router, SubscriptionId};
pub use subject::{Filter, Subject, SubjectError};
