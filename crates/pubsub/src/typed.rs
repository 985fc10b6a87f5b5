//! Typed faces: publish any serde type, subscribe for one.
//!
//! A typed publish ([`Publish::publish_typed`](crate::Publish::publish_typed),
//! [`PubSub::publish_typed`](crate::PubSub::publish_typed)) encodes the
//! value with postcard and tags the message with the type's schema
//! fingerprint and name (the [`courier_wire::headers::TYPE`] header, a
//! [`TypeTag`]). A [`TypedSubscription`]
//! ([`PubSub::subscribe_typed`](crate::PubSub::subscribe_typed)) checks
//! each message against its own type: one of another type, or untagged
//! bytes that do not decode as its type, is a [`TypeError`] for that
//! message alone, naming both types, and the subscription carries on. No
//! value is ever decoded from a message of another type, and no
//! connection is closed over one.
//!
//! Untagged messages (from the byte faces, the CLI, other languages) are
//! decoded when their bytes are exactly a value of the type.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use courier_pubsub::typed::TypedEvent;
//! use courier_pubsub::{Bus, PubSub, SubscribeOptions};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! struct Order { id: u64, item: String }
//!
//! let bus = Bus::new();
//! let mut orders = bus.subscribe_typed::<Order>("orders.>", SubscribeOptions::default()).await?;
//! bus.publish_typed("orders.eu", &Order { id: 1, item: "tea".into() }).await?;
//! let Some(Ok(TypedEvent::Message(order))) = orders.recv().await else { panic!() };
//! assert_eq!(order.value, Order { id: 1, item: "tea".into() });
//! # Ok(()) }
//! ```

use std::any::TypeId;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use courier_wire::headers::{Headers, TypeTag};
use courier_wire::schema::Schema;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Event, Message, Subscriber};

/// The tag of `T`: its schema fingerprint (traced once per type and
/// cached; the cache holds one entry per type the program uses) and name.
pub fn type_tag<T: DeserializeOwned + 'static>() -> TypeTag {
    static TAGS: OnceLock<Mutex<HashMap<TypeId, TypeTag>>> = OnceLock::new();
    let tags = TAGS.get_or_init(Mutex::default);
    if let Some(tag) = tags
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&TypeId::of::<T>())
    {
        return tag.clone();
    }
    // Traced outside the lock: tracing a large type takes a while.
    let schema = Schema::of::<T>();
    let tag = TypeTag::new(schema.fingerprint, schema.type_name);
    tags.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(TypeId::of::<T>(), tag.clone());
    tag
}

/// A value could not be encoded (postcard refused it: a map or sequence
/// of unknown length, say). Not retryable: the same value fails again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("could not encode a {type_name}: {reason}")]
pub struct EncodeError {
    /// The value's type.
    pub type_name: String,
    /// What postcard said.
    pub reason: String,
}

impl EncodeError {
    /// [`ErrorKind::InvalidInput`](courier_wire::ErrorKind::InvalidInput).
    pub fn kind(&self) -> courier_wire::ErrorKind {
        courier_wire::ErrorKind::InvalidInput
    }
}

/// `value` as a typed message's headers and payload.
pub fn encode<T: Serialize + DeserializeOwned + 'static>(
    value: &T,
) -> Result<(Headers, Bytes), EncodeError> {
    let tag = type_tag::<T>();
    let payload = postcard::to_allocvec(value).map_err(|err| EncodeError {
        type_name: tag.name.clone(),
        reason: err.to_string(),
    })?;
    let mut headers = Headers::new();
    // A tag is 17 bytes plus the name, cut to the value bound: always fits
    // in empty headers.
    headers.set_type(&tag).map_err(|err| EncodeError {
        type_name: tag.name.clone(),
        reason: err.to_string(),
    })?;
    Ok((headers, Bytes::from(payload)))
}

/// A message decoded as `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedMessage<T> {
    /// The decoded value.
    pub value: T,
    /// The message it came in (subject, publisher, sequence number,
    /// reply subject, headers; the payload still holds the encoded bytes).
    pub message: Message,
}

/// What a typed subscription receives: as [`Event`], with messages decoded.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TypedEvent<T> {
    /// A message of the subscription's type.
    Message(TypedMessage<T>),
    /// Anything else the subscription reports ([`Event::Gap`],
    /// [`Event::Dropped`], [`Event::Restored`]), never [`Event::Message`].
    Other(Event),
}

/// A message a typed subscription could not take, or the subscription's
/// own receive error. The subscription carries on after a type error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TypeError<E> {
    /// The message is tagged with another type.
    #[error("a message on {} is a {found}, not a {expected}", .message.subject.as_str())]
    WrongType {
        /// The subscription's type.
        expected: TypeTag,
        /// The message's.
        found: TypeTag,
        /// The message, undecoded.
        message: Box<Message>,
    },
    /// The message's bytes are not a value of the type: untagged bytes
    /// (`found` is `None`) that do not decode, or a tag of the right type
    /// over bytes that do not.
    #[error(
        "a message on {} ({}) does not decode as a {expected}: {reason}",
        .message.subject.as_str(),
        untyped_or(.found)
    )]
    Undecodable {
        /// The subscription's type.
        expected: TypeTag,
        /// The message's tag, if it has one.
        found: Option<TypeTag>,
        /// What the decoder said.
        reason: String,
        /// The message, undecoded.
        message: Box<Message>,
    },
    /// Receiving failed (the subscription's own error).
    #[error(transparent)]
    Receive(E),
}

impl<E> TypeError<E> {
    /// The message this error is about, unless it is a receive error.
    pub fn message(&self) -> Option<&Message> {
        match self {
            TypeError::WrongType { message, .. } | TypeError::Undecodable { message, .. } => {
                Some(message)
            }
            TypeError::Receive(_) => None,
        }
    }
}

/// A tag's text, or "untyped" without one.
fn untyped_or(found: &Option<TypeTag>) -> String {
    found
        .as_ref()
        .map_or_else(|| "untyped".to_string(), TypeTag::to_string)
}

/// Decodes `payload` as exactly one `T` (trailing bytes refused).
fn decode_exact<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    let (value, rest) = postcard::take_from_bytes::<T>(payload).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the value", rest.len()));
    }
    Ok(value)
}

/// Takes `message` as a `T`, if it is one.
pub fn decode<T: DeserializeOwned + 'static, E>(
    message: Message,
) -> Result<TypedMessage<T>, TypeError<E>> {
    let expected = type_tag::<T>();
    let found = message.headers.type_tag();
    if let Some(found) = &found {
        if found.fingerprint != expected.fingerprint {
            return Err(TypeError::WrongType {
                expected,
                found: found.clone(),
                message: Box::new(message),
            });
        }
    }
    match decode_exact::<T>(&message.payload) {
        Ok(value) => Ok(TypedMessage { value, message }),
        Err(reason) => Err(TypeError::Undecodable {
            expected,
            found,
            reason,
            message: Box::new(message),
        }),
    }
}

/// What a typed subscription yields: an event, or an error for one
/// message (or the subscription's own receive error `E`).
pub type TypedItem<T, E> = Result<TypedEvent<T>, TypeError<E>>;

/// A subscription that decodes each message as a `T`; see the [module
/// docs](self). Receive with [`recv`](Self::recv) or as a
/// [`futures_core::Stream`]; both as cancel-safe as the subscription
/// underneath (both faces' are).
pub struct TypedSubscription<S, T> {
    inner: S,
    _type: PhantomData<fn() -> T>,
}

impl<S: std::fmt::Debug, T> std::fmt::Debug for TypedSubscription<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedSubscription")
            .field("type", &std::any::type_name::<T>())
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S: Subscriber, T: DeserializeOwned + 'static> TypedSubscription<S, T> {
    /// Decodes what `inner` receives as `T`.
    pub fn new(inner: S) -> Self {
        TypedSubscription {
            inner,
            _type: PhantomData,
        }
    }

    /// The next event; a message that is not a `T` is an error for that
    /// message alone. `None` once the subscription has ended.
    pub async fn recv(&mut self) -> Option<TypedItem<T, S::Error>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The byte subscription underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The byte subscription underneath, to receive bytes again.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<TypedItem<T, S::Error>>> {
        let item = match futures_core::Stream::poll_next(Pin::new(&mut self.inner), cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        Poll::Ready(item.map(|event| match event {
            Ok(Event::Message(message)) => decode(message).map(TypedEvent::Message),
            Ok(other) => Ok(TypedEvent::Other(other)),
            Err(err) => Err(TypeError::Receive(err)),
        }))
    }
}

impl<S: Subscriber, T: DeserializeOwned + 'static> futures_core::Stream
    for TypedSubscription<S, T>
{
    type Item = TypedItem<T, S::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}
