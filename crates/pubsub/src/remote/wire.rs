//! What crosses the network: the service definition, its wire types and
//! the host's error as the client receives it.

use std::sync::Arc;

use bytes::Bytes;
use courier_rpc::Items;
use courier_transport::ErrorKind;
use courier_wire::headers::Headers;

use crate::durable::DurableError;
use crate::SlowConsumer;

/// A pub/sub error as it crosses the network.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The subject or filter is invalid (the message names the token).
    #[error("{0}")]
    Invalid(String),
    /// A durable subscription refused or failed.
    #[error("{reason}")]
    Durable {
        /// What went wrong, as the host says it.
        reason: String,
        /// Whether trying again may succeed.
        retryable: bool,
    },
    /// The host keeps no durable subscriptions.
    #[error("this host has no durable subscriptions")]
    NoDurable,
    /// The caller may not do this (nothing else about the connection changes).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The host could not send the subscription's events; the subscription
    /// ended there (what it held is lost, beyond the drop count).
    #[error("the host could not send events: {0}")]
    Undeliverable(String),
    /// A one-way publish was cut short at the host (its deadline passed, or
    /// the host shut down) before it reached every subscriber: some may have
    /// it. Reported by [`RemotePublisher::flush`](super::RemotePublisher::flush) inside [`RemoteError::Refused`].
    #[error("a publish was cut short at the host: {0}")]
    Interrupted(String),
    /// [`RemotePublisher::flush`](super::RemotePublisher::flush): the host refused `count` of the one-way
    /// publishes since the last flush; `first` says why it refused the
    /// first of them.
    #[error("{count} publish(es) refused since the last flush; the first: {first}")]
    Refused {
        /// How many were refused.
        count: u64,
        /// Why the first was.
        #[serde(deserialize_with = "shallow_refusal")]
        first: Box<RemoteError>,
    },
}

/// How deeply refusals may nest when decoded: the host never nests them
/// (the first refusal of a flush is never itself a flush's), so this only
/// stops a peer from sending a refusal nested a million deep to overflow
/// the decoder's stack (postcard has no depth limit of its own).
const MAX_REFUSAL_DEPTH: u8 = 4;

fn shallow_refusal<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Box<RemoteError>, D::Error> {
    use std::cell::Cell;
    thread_local! {
        static DEPTH: Cell<u8> = const { Cell::new(0) };
    }
    let depth = DEPTH.with(Cell::get);
    if depth >= MAX_REFUSAL_DEPTH {
        return Err(serde::de::Error::custom("refusals nested too deeply"));
    }
    DEPTH.with(|d| d.set(depth + 1));
    // Decoding is synchronous: the count is this decode's alone.
    let decoded = <RemoteError as serde::Deserialize>::deserialize(deserializer);
    DEPTH.with(|d| d.set(depth));
    decoded.map(Box::new)
}

impl RemoteError {
    /// What kind of failure this is, as an [`ErrorKind`] shared by every
    /// Courier mechanism: a permission denial is [`ErrorKind::Refused`],
    /// an invalid subject or filter [`ErrorKind::InvalidInput`], a host
    /// without durable subscriptions [`ErrorKind::Unsupported`], a publish
    /// cut short [`ErrorKind::Unavailable`], refused publishes the kind of
    /// the first. A durable subscription's failure crosses the network as
    /// text and a retryable flag only: [`ErrorKind::Busy`] when retryable,
    /// otherwise [`ErrorKind::Internal`], as are events the host could not
    /// send.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RemoteError::Invalid(_) => ErrorKind::InvalidInput,
            RemoteError::Durable { retryable, .. } => match retryable {
                true => ErrorKind::Busy,
                false => ErrorKind::Internal,
            },
            RemoteError::NoDurable => ErrorKind::Unsupported,
            RemoteError::PermissionDenied(_) => ErrorKind::Refused,
            RemoteError::Undeliverable(_) => ErrorKind::Internal,
            RemoteError::Interrupted(_) => ErrorKind::Unavailable,
            RemoteError::Refused { first, .. } => first.kind(),
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

impl From<crate::SubjectError> for RemoteError {
    fn from(err: crate::SubjectError) -> RemoteError {
        RemoteError::Invalid(err.to_string())
    }
}

impl From<DurableError> for RemoteError {
    fn from(err: DurableError) -> RemoteError {
        match err {
            DurableError::Subject(err) => err.into(),
            err => RemoteError::Durable {
                retryable: err.is_retryable(),
                reason: err.to_string(),
            },
        }
    }
}

/// The most events one subscription stream item carries.
pub const MAX_EVENTS_PER_ITEM: usize = 256;

/// One message of a [`PubSubService::publish_batch`].
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WirePublish {
    /// Its subject.
    pub subject: String,
    /// Where to reply, for request-reply.
    pub reply_to: Option<String>,
    /// Its bytes (a slice of the received frame where the decoder allows:
    /// see [`courier_wire::shared`]).
    #[serde(deserialize_with = "courier_wire::shared::deserialize")]
    pub payload: Bytes,
    /// Its headers (bounded when decoded).
    pub headers: Headers,
}

/// A subject on the wire: text, encoded as a string, shared rather than
/// copied where it comes from (the host sends each delivery's subject
/// without allocating; a subscriber decoding one allocates it once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireText(pub Arc<str>);

impl WireText {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for WireText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

std::thread_local! {
    /// The text the last [`WireText`] decoded on this thread: a stream of
    /// messages on one subject shares one allocation for all of them.
    static LAST_TEXT: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
}

impl<'de> serde::Deserialize<'de> for WireText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = WireText;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a subject")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<WireText, E> {
                Ok(WireText(LAST_TEXT.with(|last| {
                    let mut last = last.borrow_mut();
                    match &*last {
                        Some(known) if **known == *text => known.clone(),
                        _ => {
                            let fresh: Arc<str> = Arc::from(text);
                            *last = Some(fresh.clone());
                            fresh
                        }
                    }
                })))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// One item of a subscription stream.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WireEvent {
    /// The subscription is active at the host.
    Active,
    /// A message.
    Message {
        /// Its subject.
        subject: WireText,
        /// Its bytes (a slice of the received frame: see
        /// [`courier_wire::shared`]).
        #[serde(deserialize_with = "courier_wire::shared::deserialize")]
        payload: Bytes,
        /// The publisher.
        publisher: u64,
        /// Per-publisher sequence number, for this subscription.
        seq: u64,
        /// Where to reply, for request-reply.
        reply_to: Option<WireText>,
        /// Its headers, as published.
        headers: Headers,
    },
    /// Messages `from..to` of `publisher` were dropped.
    Gap {
        /// The publisher.
        publisher: u64,
        /// First missing.
        from: u64,
        /// One past the last missing.
        to: u64,
    },
    /// [`Event::Dropped`](crate::Event::Dropped): drops of publishers no longer tracked.
    Dropped {
        /// How many.
        count: u64,
    },
    /// The host's drop count for this subscription so far; sent with the
    /// next batch whenever it changed. Not an event for the subscriber.
    DropCount {
        /// Dropped in total.
        total: u64,
    },
}

/// The pub/sub protocol.
// Payload arguments are written `bytes::Bytes` (the path) so that the
// host decodes large ones as slices of the request (courier-rpc's docs,
// "Payloads without copies").
#[courier_rpc::service]
pub trait PubSubService {
    /// Publishes under the client-chosen publisher identity `publisher`,
    /// asking for replies on `reply_to` if given. Returns how many live
    /// subscriptions it reached, after storing it in every matching durable
    /// subscription.
    async fn publish(
        &self,
        publisher: u64,
        subject: String,
        reply_to: Option<String>,
        payload: bytes::Bytes,
        headers: Headers,
    ) -> Result<u64, RemoteError>;
    /// Publishes one way: nothing comes back. The host applies one-way
    /// publishes in the order they arrive on the connection; a refused one
    /// is remembered for [`flush_applied`](Self::flush_applied).
    #[oneway]
    ///
    /// `seq` is the publisher's own count of its one-way publishes (1, 2,
    /// ...): a frame older than one already applied is dropped, so order
    /// holds across the client's reconnects.
    async fn publish_oneway(
        &self,
        publisher: u64,
        seq: u64,
        subject: String,
        reply_to: Option<String>,
        payload: bytes::Bytes,
        headers: Headers,
    );
    /// A request, one way: published to `subject` with `reply_to` as
    /// [`publish`](Self::publish) does. When no live subscription takes it,
    /// or it is refused, the host itself answers on `reply_to` with a
    /// status message (see [`STATUS_NO_RESPONDERS`]), so the requester
    /// learns at once without waiting for an answer to this call.
    #[oneway]
    async fn request_oneway(
        &self,
        requester: u64,
        subject: String,
        reply_to: String,
        payload: bytes::Bytes,
        headers: Headers,
    );
    /// Many publishes, one way (one `seq` for the frame), each judged
    /// alone: a refused message is counted for [`flush_applied`](Self::flush_applied) and
    /// the others are published. A durable store that fails refuses every
    /// message it was to store.
    #[oneway]
    async fn publish_batch_oneway(&self, publisher: u64, seq: u64, messages: Vec<WirePublish>);
    /// Answered once every one-way publish sent before it on the
    /// connection has been applied; reports the one-way publishes of
    /// `publisher` refused since its last flush.
    ///
    /// Named apart from the `flush` of the protocol before headers: a
    /// client from then, whose one-way publishes (without headers) this
    /// host cannot read and drops, gets `UnknownMethod` from its flush
    /// instead of an `Ok` that would say they arrived.
    async fn flush_applied(&self, publisher: u64) -> Result<(), RemoteError>;
    /// Publishes many messages in order, as [`publish`](Self::publish)
    /// each; returns the live deliveries in total. All are checked before
    /// any is published: one invalid subject refuses the whole batch.
    async fn publish_batch(
        &self,
        publisher: u64,
        messages: Vec<WirePublish>,
    ) -> Result<u64, RemoteError>;
    /// Subscribes; the stream starts with `[Active]`, then carries batches
    /// of events. `policy`: 0 drop oldest, 1 drop newest, 2 disconnect, 3
    /// backpressure.
    async fn subscribe(
        &self,
        filter: String,
        buffer: u32,
        policy: u8,
        group: Option<String>,
        items: Items<Result<Vec<WireEvent>, RemoteError>>,
    );
    /// Creates (or finds, if the filter is the same) the durable
    /// subscription `name`; returns the queue that holds its messages.
    async fn durable_subscribe(&self, name: String, filter: String) -> Result<String, RemoteError>;
    /// Ends the durable subscription `name`; returns whether it existed.
    async fn durable_unsubscribe(&self, name: String) -> Result<bool, RemoteError>;
    /// The durable subscriptions, as (name, filter).
    async fn durable_list(&self) -> Result<Vec<(String, String)>, RemoteError>;
}

pub(super) fn policy_code(policy: SlowConsumer) -> u8 {
    match policy {
        SlowConsumer::DropOldest => 0,
        SlowConsumer::DropNewest => 1,
        SlowConsumer::Disconnect => 2,
        SlowConsumer::Backpressure => 3,
    }
}

pub(super) fn policy_from(code: u8) -> SlowConsumer {
    match code {
        1 => SlowConsumer::DropNewest,
        2 => SlowConsumer::Disconnect,
        3 => SlowConsumer::Backpressure,
        _ => SlowConsumer::DropOldest,
    }
}

/// The service's name on the wire, for one-way calls made directly.
pub(super) const SERVICE: &str = "PubSubService";

/// The `reply_to` of the host's answer to a request that no live
/// subscription took (its payload is empty). Replies from responders never
/// carry a `reply_to` of their own, so a requester tells the two apart;
/// NATS answers such a request with a 503 status message the same way.
pub const STATUS_NO_RESPONDERS: &str = "_courier.status.no_responders";

/// The `reply_to` of the host's answer to a request it refused; the payload
/// is the [`RemoteError`], postcard-encoded.
pub const STATUS_REFUSED: &str = "_courier.status.refused";

#[cfg(test)]
mod refusal_tests {
    use super::RemoteError;

    fn nested(depth: usize) -> RemoteError {
        let mut error = RemoteError::Invalid("bad subject".into());
        for _ in 0..depth {
            error = RemoteError::Refused {
                count: 1,
                first: Box::new(error),
            };
        }
        error
    }

    #[test]
    fn a_refusal_decodes_and_one_nested_without_end_is_an_error_not_a_crash() {
        let one = postcard::to_stdvec(&nested(1)).unwrap();
        assert_eq!(
            postcard::from_bytes::<RemoteError>(&one).unwrap(),
            nested(1)
        );
        // A million levels, two bytes each, as a hostile peer would send
        // them: refused at the fifth, long before the stack runs out.
        let mut deep = Vec::new();
        for _ in 0..1_000_000 {
            deep.extend_from_slice(&[6, 1]); // Refused, count 1
        }
        deep.extend_from_slice(&[0, 0]); // Invalid("")
        assert!(postcard::from_bytes::<RemoteError>(&deep).is_err());
        // The schema tracer (method fingerprints) still sees the whole
        // shape: its own depth cut comes first.
        let schema = courier_wire::schema::Schema::of::<RemoteError>();
        assert!(!schema.shape.contains("untraceable"), "{}", schema.shape);
        // And the guard resets: a normal one decodes after it.
        assert_eq!(
            postcard::from_bytes::<RemoteError>(&one).unwrap(),
            nested(1)
        );
    }
}
