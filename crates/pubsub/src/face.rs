//! One face, embedded or remote: the traits a program is written against,
//! implemented by the in-process [`Bus`] and by
//! [`RemotePubSub`](crate::remote::RemotePubSub), so switching between them
//! changes the one line that makes the bus.
//!
//! The inherent methods of both faces have the same names, arguments and
//! return shapes (async, and a `Result` with the face's own error); these
//! traits only name them, so code that holds a concrete bus needs no
//! import:
//!
//! - [`PubSub`]: a bus — [`subscribe`](PubSub::subscribe) (in a queue group
//!   with [`subscribe_group`](PubSub::subscribe_group)),
//!   [`publish`](PubSub::publish) under the bus's own identity,
//!   [`publisher`](PubSub::publisher) for one of its own,
//!   [`request`](PubSub::request).
//! - [`Publish`]: a publisher — publish, publish confirmed (how many live
//!   subscriptions it reached), batches, flush, reply.
//! - [`Subscriber`]: a subscription — [`recv`](Subscriber::recv), or as a
//!   [`futures_core::Stream`]; both cancel-safe. Dropping it unsubscribes.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use courier_pubsub::{Bus, Event, PubSub, SubscribeOptions, Subscriber};
//!
//! /// Written once: runs against a `Bus` or a `RemotePubSub`.
//! async fn first_order<P: PubSub>(bus: &P) -> Result<String, P::Error> {
//!     let mut orders = bus.subscribe("orders.>", SubscribeOptions::default()).await?;
//!     bus.publish("orders.eu", "tea").await?;
//!     match orders.recv().await {
//!         Some(Ok(Event::Message(m))) => Ok(String::from_utf8_lossy(&m.payload).into_owned()),
//!         _ => Ok(String::new()),
//!     }
//! }
//!
//! assert_eq!(first_order(&Bus::new()).await?, "tea");
//! # Ok(()) }
//! ```

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use courier_wire::headers::Headers;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::typed::{EncodeError, TypeError, TypedMessage, TypedSubscription};
use crate::{Bus, BusError, Event, Message, Publisher, SubscribeOptions, Subscription};

/// A bus: the in-process [`Bus`] or a
/// [`RemotePubSub`](crate::remote::RemotePubSub). See the [module
/// docs](self).
pub trait PubSub: Clone + Send + Sync + 'static {
    /// What its calls fail with.
    type Error: std::error::Error + From<EncodeError> + Send + Sync + 'static;
    /// What [`publisher`](Self::publisher) gives.
    type Publisher: Publish<Error = Self::Error>;
    /// What [`subscribe`](Self::subscribe) gives.
    type Subscription: Subscriber;

    /// Subscribes to `filter` (in the queue group `options.group`, if
    /// given); returns once the subscription is active, so a message
    /// published afterwards is delivered.
    fn subscribe(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> impl Future<Output = Result<Self::Subscription, Self::Error>> + Send;

    /// Subscribes to `filter` as a member of the queue group `group`: each
    /// message goes to one member of each group.
    fn subscribe_group(
        &self,
        filter: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> impl Future<Output = Result<Self::Subscription, Self::Error>> + Send {
        self.subscribe(filter, options.group(group))
    }

    /// A publisher with a fresh identity.
    fn publisher(&self) -> Self::Publisher;

    /// Publishes under the bus's own publisher identity.
    fn publish(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Publishes many messages in order under the bus's own identity; one
    /// invalid subject fails the call and publishes nothing.
    fn publish_batch<S: Into<String>, P: Into<Bytes>>(
        &self,
        messages: impl IntoIterator<Item = (S, P)>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// [`publish`](Self::publish) with headers.
    fn publish_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Publishes `value`, encoded with postcard and tagged with its type
    /// (see [`crate::typed`]), under the bus's own identity.
    fn publish_typed<T: Serialize + DeserializeOwned + 'static>(
        &self,
        subject: &str,
        value: &T,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let encoded = crate::typed::encode(value);
        async move {
            let (headers, payload) = encoded?;
            self.publish_with_headers(subject, headers, payload).await
        }
    }

    /// Subscribes for values of `T`: each message is decoded, and one of
    /// another type is an error for that message alone (see
    /// [`crate::typed`]).
    fn subscribe_typed<T: DeserializeOwned + 'static>(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> impl Future<Output = Result<TypedSubscription<Self::Subscription, T>, Self::Error>> + Send
    {
        async move {
            Ok(TypedSubscription::new(
                self.subscribe(filter, options).await?,
            ))
        }
    }

    /// Sends a request to `subject` and waits at most `timeout` for the
    /// first reply (answered with [`Publish::reply`]).
    fn request(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, Self::Error>> + Send;

    /// [`request`](Self::request) with headers on the request.
    fn request_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, Self::Error>> + Send;

    /// A typed request: `request` published as
    /// [`publish_typed`](Self::publish_typed) does, the first reply decoded
    /// as a `Resp` (answered with [`Publish::reply_typed`]). A reply of
    /// another type is a [`TypeError`] naming both; the request itself
    /// failing (no responders, timeout, encoding) is
    /// [`TypeError::Receive`].
    fn request_typed<Req, Resp>(
        &self,
        subject: &str,
        request: &Req,
        timeout: Duration,
    ) -> impl Future<Output = Result<TypedMessage<Resp>, TypeError<Self::Error>>> + Send
    where
        Req: Serialize + DeserializeOwned + 'static,
        Resp: DeserializeOwned + 'static,
    {
        let encoded = crate::typed::encode(request);
        async move {
            let (headers, payload) = encoded.map_err(|e| TypeError::Receive(e.into()))?;
            let reply = self
                .request_with_headers(subject, headers, payload, timeout)
                .await
                .map_err(TypeError::Receive)?;
            crate::typed::decode(reply)
        }
    }
}

/// A publisher: [`Publisher`] or
/// [`RemotePublisher`](crate::remote::RemotePublisher). Messages from one
/// publisher reach each subscriber in the order they were published.
pub trait Publish: Clone + Send + Sync + 'static {
    /// What its calls fail with.
    type Error: std::error::Error + From<EncodeError> + Send + Sync + 'static;

    /// Its identity. In process it is what subscribers see as
    /// [`Message::publisher`]; a remote publisher's is its own, which the
    /// host maps to one number of its bus (the same one for every message
    /// of this publisher, so order and gaps still hold per publisher).
    fn id(&self) -> u64;

    /// Publishes `payload` on `subject`.
    fn publish(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Publishes and returns how many live subscriptions it was delivered
    /// (or dropped) to.
    fn publish_confirmed(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Publishes many messages in order.
    fn publish_batch<S: Into<String>, P: Into<Bytes>>(
        &self,
        messages: impl IntoIterator<Item = (S, P)>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// [`publish`](Self::publish) with headers; the current trace context
    /// is added as `traceparent` unless `headers` has one.
    fn publish_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Publishes `value`, encoded with postcard and tagged with its type
    /// (see [`crate::typed`]).
    fn publish_typed<T: Serialize + DeserializeOwned + 'static>(
        &self,
        subject: &str,
        value: &T,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let encoded = crate::typed::encode(value);
        async move {
            let (headers, payload) = encoded?;
            self.publish_with_headers(subject, headers, payload).await
        }
    }

    /// Answers `request` with `value`, typed as
    /// [`publish_typed`](Self::publish_typed) does; nothing if it asked for
    /// no reply.
    fn reply_typed<T: Serialize + DeserializeOwned + 'static>(
        &self,
        request: &Message,
        value: &T,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let encoded = crate::typed::encode(value);
        let inbox = request.reply_to.clone();
        async move {
            let (headers, payload) = encoded?;
            match inbox {
                Some(inbox) => {
                    self.publish_with_headers(inbox.as_str(), headers, payload)
                        .await
                }
                None => Ok(()),
            }
        }
    }

    /// Returns once every publish made before it has been applied, and
    /// reports what was refused meanwhile.
    fn flush(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Answers `request` on its `reply_to` subject; nothing if it asked for
    /// no reply.
    fn reply(
        &self,
        request: &Message,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// A subscription: [`Subscription`] or
/// [`RemoteSubscription`](crate::remote::RemoteSubscription). Dropping it
/// unsubscribes. Also a [`futures_core::Stream`] of what `recv` returns;
/// both are cancel-safe: a receive dropped at an await (a losing branch of
/// `tokio::select!`) loses no event.
pub trait Subscriber:
    futures_core::Stream<Item = Result<Event, Self::Error>> + Unpin + Send + 'static
{
    /// What receiving can fail with ([`std::convert::Infallible`] in
    /// process).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The next event; `None` once the subscription has ended.
    fn recv(&mut self) -> impl Future<Output = Option<Result<Event, Self::Error>>> + Send;
}

/// The messages of a batch, converted before any await, so the futures
/// hold nothing of the caller's types.
fn owned_batch<S: Into<String>, P: Into<Bytes>>(
    messages: impl IntoIterator<Item = (S, P)>,
) -> Vec<(String, Bytes)> {
    messages
        .into_iter()
        .map(|(subject, payload)| (subject.into(), payload.into()))
        .collect()
}

impl PubSub for Bus {
    type Error = BusError;
    type Publisher = Publisher;
    type Subscription = Subscription;

    fn subscribe(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> impl Future<Output = Result<Subscription, BusError>> + Send {
        Bus::subscribe(self, filter, options)
    }

    fn publisher(&self) -> Publisher {
        Bus::publisher(self)
    }

    fn publish(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), BusError>> + Send {
        Bus::publish(self, subject, payload.into())
    }

    fn publish_batch<S: Into<String>, P: Into<Bytes>>(
        &self,
        messages: impl IntoIterator<Item = (S, P)>,
    ) -> impl Future<Output = Result<(), BusError>> + Send {
        Bus::publish_batch(self, owned_batch(messages))
    }

    fn publish_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), BusError>> + Send {
        Bus::publish_with_headers(self, subject, headers, payload.into())
    }

    fn request(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, BusError>> + Send {
        Bus::request(self, subject, payload.into(), timeout)
    }

    fn request_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, BusError>> + Send {
        Bus::request_with_headers(self, subject, headers, payload.into(), timeout)
    }
}

impl Publish for Publisher {
    type Error = BusError;

    fn id(&self) -> u64 {
        Publisher::id(self)
    }

    fn publish(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), BusError>> + Send {
        Publisher::publish(self, subject, payload.into())
    }

    fn publish_confirmed(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<u64, BusError>> + Send {
        Publisher::publish_confirmed(self, subject, payload.into())
    }

    fn publish_batch<S: Into<String>, P: Into<Bytes>>(
        &self,
        messages: impl IntoIterator<Item = (S, P)>,
    ) -> impl Future<Output = Result<(), BusError>> + Send {
        Publisher::publish_batch(self, owned_batch(messages))
    }

    fn publish_with_headers(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), BusError>> + Send {
        Publisher::publish_with_headers(self, subject, headers, payload.into())
    }

    fn flush(&self) -> impl Future<Output = Result<(), BusError>> + Send {
        Publisher::flush(self)
    }

    fn reply(
        &self,
        request: &Message,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), BusError>> + Send {
        Publisher::reply(self, request, payload.into())
    }
}

impl Subscriber for Subscription {
    type Error = std::convert::Infallible;

    fn recv(
        &mut self,
    ) -> impl Future<Output = Option<Result<Event, std::convert::Infallible>>> + Send {
        Subscription::recv(self)
    }
}

#[cfg(feature = "remote")]
mod remote_face {
    use super::*;
    use crate::remote::{RemotePubSub, RemotePubSubError, RemotePublisher, RemoteSubscription};

    impl PubSub for RemotePubSub {
        type Error = RemotePubSubError;
        type Publisher = RemotePublisher;
        type Subscription = RemoteSubscription;

        fn subscribe(
            &self,
            filter: &str,
            options: SubscribeOptions,
        ) -> impl Future<Output = Result<RemoteSubscription, RemotePubSubError>> + Send {
            RemotePubSub::subscribe(self, filter, options)
        }

        fn publisher(&self) -> RemotePublisher {
            RemotePubSub::publisher(self)
        }

        fn publish(
            &self,
            subject: &str,
            payload: impl Into<Bytes>,
        ) -> impl Future<Output = Result<(), RemotePubSubError>> + Send {
            RemotePubSub::publish(self, subject, payload.into())
        }

        fn publish_batch<S: Into<String>, P: Into<Bytes>>(
            &self,
            messages: impl IntoIterator<Item = (S, P)>,
        ) -> impl Future<Output = Result<(), RemotePubSubError>> + Send {
            RemotePubSub::publish_batch(self, owned_batch(messages))
        }

        fn publish_with_headers(
            &self,
            subject: &str,
            headers: Headers,
            payload: impl Into<Bytes>,
        ) -> impl Future<Output = Result<(), RemotePubSubError>> + Send {
            RemotePubSub::publish_with_headers(self, subject, headers, payload.into())
        }

        fn request(
            &self,
            subject: &str,
            payload: impl Into<Bytes>,
            timeout: Duration,
        ) -> impl Future<Output = Result<Message, RemotePubSubError>> + Send {
            RemotePubSub::request(self, subject, payload.into(), timeout)
        }

        fn request_with_headers(
            &self,
            subject: &str,
            headers: Headers,
            payload: impl Into<Bytes>,
            timeout: Duration,
        ) -> impl Future<Output = Result<Message, RemotePubSubError>> + Send {
            RemotePubSub::request_with_headers(self, subject, headers, payload.into(), timeout)
        }
    }

    impl Publish for RemotePublisher {
        type Error = RemotePubSubError;

        fn id(&self) -> u64 {
            RemotePublisher::id(self)
        }

        fn publish(
            &self,
            subject: &str,
            payload: impl Into<Bytes>,
        ) -> impl Future<Output = Result<(), RemotePubSubError>> + Send {
            RemotePublisher::publish(self, subject, payload.into())
        }

        fn publish_confirmed(
            &self,
            subject: &str,
            payload: impl Into<Bytes>,
        ) -> impl Future<Output = Result<u64, RemotePubSubError>> + Send {
            RemotePublisher::publish_confirmed(self, subject, payload.into())
        }

        fn publish_batch<S: Into<String>, P: Into<Bytes>>(
            &self,
            messages: impl IntoIterator<Item = (S, P)>,
        ) -> impl Future<Output = Result<(), RemotePubSubError>> + Send {
            RemotePublisher::publish_batch(self, owned_batch(messages))
        }

        fn publish_with_headers(
            &self,
            subject: &str,
            headers: Headers,
            payload: impl Into<Bytes>,
        ) -> impl Future<Output = Result<(), RemotePubSubError>> + Send {
            RemotePublisher::publish_with_headers(self, subject, headers, payload.into())
        }

        fn flush(&self) -> impl Future<Output = Result<(), RemotePubSubError>> + Send {
            RemotePublisher::flush(self)
        }

        fn reply(
            &self,
            request: &Message,
            payload: impl Into<Bytes>,
        ) -> impl Future<Output = Result<(), RemotePubSubError>> + Send {
            RemotePublisher::reply(self, request, payload.into())
        }
    }

    impl Subscriber for RemoteSubscription {
        type Error = RemotePubSubError;

        fn recv(
            &mut self,
        ) -> impl Future<Output = Option<Result<Event, RemotePubSubError>>> + Send {
            RemoteSubscription::recv(self)
        }
    }
}
