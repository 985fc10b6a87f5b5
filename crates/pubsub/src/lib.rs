//! # courier-pubsub
//!
//! Publish–subscribe on subjects with wildcards, in process or across
//! processes, behind one face.
//!
//! - [`PubSub`], [`Publish`] and [`Subscriber`] ([`face`]): the traits a
//!   program is written against. The in-process [`Bus`] and the remote
//!   [`remote::RemotePubSub`] implement them with the same inherent
//!   signatures (async, a `Result` with each face's own error:
//!   [`BusError`], [`remote::RemotePubSubError`]), so moving a program from
//!   one to the other changes the line that makes the bus.
//! - [`subject`]: subjects (`orders.eu.created`) and filters with `*` (one
//!   token) and `>` (the rest), validated with errors that point at the bad
//!   token.
//! - [`router`]: a token trie; matching costs follow the subject's depth.
//! - [`Bus`]: the in-process bus. Every matching subscription gets each
//!   message (queue groups share theirs, one member each); a subscription's
//!   buffer is bounded and its [`SlowConsumer`] policy decides what happens
//!   when it is full, with a drop counter; each subscriber gets per-publisher
//!   sequence numbers and an [`Event::Gap`] for anything it missed (at the
//!   latest once its buffer drains, so gaps add up to the drop count);
//!   `subscribe` returns with the subscription already active. Buffers are
//!   bounded in bytes too, per subscription and in total ([`BusConfig`]),
//!   and so is the per-publisher state each subscription keeps.
//!
//! - [`remote`]: the bus served to other processes as a courier-rpc service
//!   ([`remote::PubSubHost`], [`remote::RemotePubSub`]); a subscription is
//!   active at the host before `subscribe` returns.
//!
//!   Subscriptions restore themselves when the host comes back
//!   ([`Event::Restored`]); publishing and delivery travel in batches.
//! - [`durable`]: named subscriptions backed by a courier-queue, so a
//!   subscriber that was away gets what was published meanwhile, with acks.
//! - Headers: every [`Message`] carries [`Headers`] (a bounded list of text
//!   pairs) end to end — in process, through hosts, across routes and in
//!   durable subscriptions; `publish_with_headers` on every publisher. A
//!   publish made inside a `courier_transport::trace::scope` (feature
//!   `remote`, which brings the task-local) carries the trace's
//!   `traceparent`, which [`Message::trace_context`] reads back on any
//!   build.
//! - [`typed`]: publish any serde type (`publish_typed`, tagged with its
//!   schema fingerprint), subscribe for one (`subscribe_typed`); a message
//!   of another type is a [`typed::TypeError`] for that message alone,
//!   naming both types.
//! - Request-reply: [`Bus::request`] and [`Publisher::reply`], services
//!   reached by subject, load-balanced over a queue group.
//! - [`blocking`]: the same, for code without an async runtime.
//! - [`route`]: pub/sub across a cluster's nodes. Each node tells the
//!   others its subscribers' [`interest`] and forwards a message, at most
//!   one hop, only to nodes that want it; queue groups prefer a member on
//!   the publisher's node.
//!
//! Two processes (a host serving a bus, a subscriber with wildcards, a queue
//! group and a request-reply service): `crates/pubsub/examples/events.rs`
//! (`cargo run -p courier-pubsub --example events`).
//!
//! Dependencies beyond the workspace's usual ones: courier-queue (durable
//! subscriptions), postcard (their stored form and registry),
//! futures-core (subscriptions are `Stream`s) and tracing (routes log what
//! they lose).
//!
//! ## Feature flags
//!
//! - `remote` (on by default): the remote face ([`remote`]: the host, the
//!   client, their blocking handles) and routes between cluster nodes
//!   ([`route`]), over courier-rpc, and courier-queue's own remote face.
//!   Off, the crate is the in-process bus, its durable subscriptions and
//!   the traits, without courier-rpc, TLS or the service macro:
//!   `courier-pubsub = { version = "0.1", default-features = false }`.

#![warn(missing_docs)]
// Without the remote face, the bus's plumbing for routes and hosts (interest
// logs, routed sends, undeliverable counts) has no caller; it stays compiled
// so the two builds share one bus.
#![cfg_attr(not(feature = "remote"), allow(dead_code))]

pub mod blocking;
mod bus;
pub mod durable;
pub mod face;
pub mod interest;
#[cfg(feature = "remote")]
pub mod remote;
#[cfg(feature = "remote")]
pub mod route;
pub mod router;
pub mod subject;
pub mod typed;

pub use bus::{
    Bus, BusConfig, BusError, Event, Message, Publisher, RequestError, SlowConsumer,
    SubscribeOptions, Subscription, MESSAGE_OVERHEAD,
};
/// Message headers and the payload type tag, re-exported from courier-wire
/// so publishers need no other crate.
pub use courier_wire::headers::{HeaderError, Headers, TypeTag};
/// What kind of failure an error is (every error's `kind()`), shared by
/// every Courier crate.
pub use courier_wire::ErrorKind;
pub use face::{PubSub, Publish, Subscriber};
pub use interest::{Interest, NodeId};
pub use router::{Router, SubscriptionId};
pub use subject::{Filter, Subject, SubjectError};
