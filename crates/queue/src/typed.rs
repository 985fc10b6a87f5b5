//! Typed queues: values of one serde type in, the same type out, on either
//! face.
//!
//! A [`TypedQueue`] encodes each value with postcard and names its type in
//! the message's [`TYPE`](courier_wire::headers::TYPE) header: the type's
//! schema fingerprint ([`Schema::of`], stable across builds) and its name.
//! A [`TypedConsumer`] checks that header before decoding, so a message of
//! another type (or one enqueued through a byte face, with no type) is a
//! [`TypeError`] for that delivery alone, naming both types — never a
//! value decoded from another type's bytes, and never a closed consumer.
//! The delivery can still be acknowledged, given back or rejected.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use courier_queue::{Queue, TypedQueue};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! struct Order { id: u64, item: String }
//!
//! let dir = std::env::temp_dir().join(format!("courier-typed-doc-{}", std::process::id()));
//! let orders = TypedQueue::<_, Order>::new(Queue::open(&dir, "orders", Default::default()).await?);
//! orders.enqueue(&Order { id: 1, item: "tea".into() }).await?;
//!
//! let mut consumer = orders.consumer(10).await?;
//! let delivery = consumer.recv().await?;
//! assert_eq!(delivery.value(), Ok(&Order { id: 1, item: "tea".into() }));
//! delivery.ack().await?;
//! # drop(consumer); drop(orders);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

use std::marker::PhantomData;
use std::time::Duration;

use bytes::BytesMut;
use courier_wire::headers::{Headers, TypeTag};
use courier_wire::schema::Schema;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{ConsumerHandle, DeliveryHandle, Enqueued, ErrorKind, Message, QueueHandle};

/// Encoded values larger than this are refused before anything is sent
/// (the log refuses records past its own, smaller, limit anyway).
const MAX_VALUE_BYTES: usize = 1 << 30;

/// Why a delivery's bytes are not a value of the consumer's type. Per
/// message: the consumer goes on, and the delivery can still be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TypeError {
    /// The message says it carries another type.
    #[error("a message of type {found} where {expected} was expected")]
    Mismatch {
        /// The consumer's type.
        expected: TypeTag,
        /// The type the message carries.
        found: TypeTag,
    },
    /// The message names no type (it was enqueued through a byte face:
    /// the CLI, another language); its bytes are not guessed at.
    #[error("a message with no type where {expected} was expected")]
    Untyped {
        /// The consumer's type.
        expected: TypeTag,
    },
    /// The message names the consumer's type but its bytes do not decode
    /// as it (damaged, or a producer that lied about its type).
    #[error("a message of type {expected} that does not decode: {reason}")]
    Decode {
        /// The consumer's type.
        expected: TypeTag,
        /// What the decoder said.
        reason: String,
    },
}

impl TypeError {
    /// [`ErrorKind::InvalidInput`]: the message is not what this consumer
    /// takes; receiving it again will not change that.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidInput
    }
}

/// What a typed enqueue fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TypedError<E> {
    /// The value could not be encoded (a type serde cannot encode, or
    /// larger than a message may be); nothing was sent.
    #[error("cannot encode the value: {0}")]
    Encode(String),
    /// The queue failed the enqueue.
    #[error(transparent)]
    Queue(E),
}

/// The tag of `T`: its schema fingerprint and name.
fn tag_of<T: DeserializeOwned>() -> TypeTag {
    let schema = Schema::of::<T>();
    TypeTag::new(schema.fingerprint, schema.type_name)
}

/// A queue of `T`s over any face (`Queue`, `RemoteQueue`). The byte face
/// stays reachable through [`TypedQueue::inner`].
#[derive(Debug, Clone)]
pub struct TypedQueue<Q, T> {
    queue: Q,
    tag: TypeTag,
    _type: PhantomData<fn(T) -> T>,
}

impl<Q: QueueHandle, T: Serialize + DeserializeOwned> TypedQueue<Q, T> {
    /// `queue`, taking and giving `T`s (its type traced once, here).
    pub fn new(queue: Q) -> TypedQueue<Q, T> {
        TypedQueue {
            queue,
            tag: tag_of::<T>(),
            _type: PhantomData,
        }
    }

    /// The type tag its messages carry.
    pub fn tag(&self) -> &TypeTag {
        &self.tag
    }

    /// The queue underneath, for bytes, stats, purging and the rest.
    pub fn inner(&self) -> &Q {
        &self.queue
    }

    /// `value` as a message (encoded, its type in its headers), to add a
    /// key, a delay or a lifetime to before [`QueueHandle::enqueue`].
    pub fn message(&self, value: &T) -> Result<Message, TypedError<Q::Error>> {
        let mut bytes = BytesMut::new();
        courier_wire::payload::encode_into(value, &mut bytes, MAX_VALUE_BYTES)
            .map_err(|err| TypedError::Encode(err.to_string()))?;
        let mut headers = Headers::new();
        headers
            .set_type(&self.tag)
            .map_err(|err| TypedError::Encode(err.to_string()))?;
        Ok(Message::new(bytes.freeze()).with_headers(headers))
    }

    /// Stores one value; returns once it is durable.
    pub async fn enqueue(&self, value: &T) -> Result<Enqueued, TypedError<Q::Error>> {
        let message = self.message(value)?;
        self.queue.enqueue(message).await.map_err(TypedError::Queue)
    }

    /// A consumer of `T`s holding at most `prefetch` unacknowledged.
    pub async fn consumer(&self, prefetch: u32) -> Result<TypedConsumer<Q::Consumer, T>, Q::Error> {
        Ok(TypedConsumer {
            consumer: self.queue.consumer(prefetch).await?,
            tag: self.tag.clone(),
            _type: PhantomData,
        })
    }
}

/// Takes `T`s from a queue. Receiving is as cancel-safe as the consumer
/// underneath (both faces' are).
#[derive(Debug)]
pub struct TypedConsumer<C, T> {
    consumer: C,
    tag: TypeTag,
    _type: PhantomData<fn() -> T>,
}

impl<C: ConsumerHandle, T: DeserializeOwned> TypedConsumer<C, T> {
    /// The next delivery, its value decoded — or, for that delivery alone,
    /// a [`TypeError`]. Fails only as the consumer underneath does.
    pub async fn recv(&mut self) -> Result<TypedDelivery<C::Delivery, T>, C::Error> {
        let delivery = self.consumer.recv().await?;
        let value = decode(&self.tag, delivery.headers(), delivery.payload());
        Ok(TypedDelivery { delivery, value })
    }

    /// The consumer underneath.
    pub fn inner_mut(&mut self) -> &mut C {
        &mut self.consumer
    }
}

/// The value in `payload`, if `headers` say it is a `T` (tagged `expected`).
fn decode<T: DeserializeOwned>(
    expected: &TypeTag,
    headers: &Headers,
    payload: &[u8],
) -> Result<T, TypeError> {
    let Some(found) = headers.type_tag() else {
        return Err(TypeError::Untyped {
            expected: expected.clone(),
        });
    };
    if found.fingerprint != expected.fingerprint {
        return Err(TypeError::Mismatch {
            expected: expected.clone(),
            found,
        });
    }
    courier_wire::payload::decode(payload).map_err(|err| TypeError::Decode {
        expected: expected.clone(),
        reason: err.to_string(),
    })
}

/// One delivery of a typed queue: its value (or why it has none), and the
/// delivery to answer.
#[derive(Debug)]
pub struct TypedDelivery<D, T> {
    delivery: D,
    value: Result<T, TypeError>,
}

impl<D: DeliveryHandle, T> TypedDelivery<D, T> {
    /// The value, or why this message is not one.
    pub fn value(&self) -> Result<&T, &TypeError> {
        self.value.as_ref()
    }

    /// The delivery underneath (id, delivery count, bytes, headers).
    pub fn delivery(&self) -> &D {
        &self.delivery
    }

    /// The value and the delivery, to answer later.
    pub fn into_parts(self) -> (Result<T, TypeError>, D) {
        (self.value, self.delivery)
    }

    /// Done with it.
    pub async fn ack(self) -> Result<(), D::Error> {
        self.delivery.ack().await
    }

    /// Give it back, to come again after `delay`.
    pub async fn nack(self, delay: Duration) -> Result<(), D::Error> {
        self.delivery.nack(delay).await
    }

    /// To the dead-letter queue at once (what to do with a message of
    /// another type, usually).
    pub async fn reject(self) -> Result<(), D::Error> {
        self.delivery.reject().await
    }
}
