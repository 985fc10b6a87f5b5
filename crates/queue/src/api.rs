//! One API over both faces: code written against these traits runs
//! unchanged on an embedded [`Queue`] and on a
//! [`RemoteQueue`](crate::remote::RemoteQueue).
//!
//! The inherent methods of the two faces have the same names, arguments
//! and return shapes (async, returning a `Result`, wherever a remote call
//! is needed), so switching a concrete program is one line too; these
//! traits let it be generic instead.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use courier_wire::headers::Headers;

use crate::core::{MessageId, QueueStats};
use crate::{Consumer, Delivery, Enqueued, Message, Peeked, Queue, QueueDeclaration, QueueError};

/// A queue, embedded or remote.
///
/// ```
/// use courier_queue::{ConsumerHandle, DeliveryHandle, Message, QueueHandle};
///
/// /// Written once; runs on a `Queue` and on a `RemoteQueue`.
/// async fn work<Q: QueueHandle>(queue: &Q) -> Result<(), Q::Error> {
///     queue.enqueue(Message::new("job")).await?;
///     let mut consumer = queue.consumer(1).await?;
///     let delivery = consumer.recv().await?;
///     assert_eq!(&delivery.payload()[..], b"job");
///     delivery.ack().await
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = std::env::temp_dir().join(format!("courier-handle-doc-{}", std::process::id()));
/// let queue = courier_queue::Queue::open(&dir, "jobs", Default::default()).await?;
/// work(&queue).await?;
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
pub trait QueueHandle: Send + Sync + Sized {
    /// What its operations fail with.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Its consumers.
    type Consumer: ConsumerHandle<Error = Self::Error>;
    /// The queue's name.
    fn name(&self) -> &str;
    /// Stores one message; returns once it is durable.
    fn enqueue(
        &self,
        message: Message,
    ) -> impl Future<Output = Result<Enqueued, Self::Error>> + Send;
    /// Stores messages together; one outcome each.
    fn enqueue_batch(
        &self,
        messages: Vec<Message>,
    ) -> impl Future<Output = Result<Vec<Enqueued>, Self::Error>> + Send;
    /// A consumer holding at most `prefetch` unacknowledged messages.
    fn consumer(
        &self,
        prefetch: u32,
    ) -> impl Future<Output = Result<Self::Consumer, Self::Error>> + Send;
    /// Counters.
    fn stats(&self) -> impl Future<Output = Result<QueueStats, Self::Error>> + Send;
    /// Discards every message not leased to a consumer; how many.
    fn purge(&self) -> impl Future<Output = Result<u64, Self::Error>> + Send;
    /// The next `count` ready messages, without taking them.
    fn peek(&self, count: u32) -> impl Future<Output = Result<Vec<Peeked>, Self::Error>> + Send;
    /// Its dead-letter queue, a queue like any other (`None` for a
    /// dead-letter queue itself).
    fn dead_letters(&self) -> Option<Self>;
    /// Makes sure the queue has these per-queue options (a remote queue
    /// that is new is created with them); a conflict if it has others.
    fn declare(
        &self,
        options: QueueDeclaration,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Takes messages from a queue. Both consumers are also a
/// `futures_core::Stream` of the same items.
pub trait ConsumerHandle: Send {
    /// What receiving fails with.
    type Error: std::error::Error + Send + Sync + 'static;
    /// One delivery.
    type Delivery: DeliveryHandle<Error = Self::Error>;
    /// Waits for the next delivery. Cancel-safe on both faces: dropping
    /// the future (in `tokio::select!`) loses no delivery.
    fn recv(&mut self) -> impl Future<Output = Result<Self::Delivery, Self::Error>> + Send;
}

/// One delivery, to acknowledge after processing, give back, or reject.
pub trait DeliveryHandle: Send {
    /// What answering fails with.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The message.
    fn id(&self) -> MessageId;
    /// 1 for the first delivery, then 2, …
    fn delivery_count(&self) -> u32;
    /// Its bytes.
    fn payload(&self) -> &Bytes;
    /// Its headers, as enqueued.
    fn headers(&self) -> &Headers;
    /// The trace context the message was enqueued in, if any: make its
    /// `child()` current (`courier_transport::trace::scope`) while
    /// processing to continue the producer's trace.
    fn trace_context(&self) -> Option<courier_wire::trace::TraceContext> {
        crate::queue::trace_of(self.headers())
    }
    /// Done with it.
    fn ack(self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Give it back, to come again after `delay`.
    fn nack(self, delay: Duration) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// A poison message: to the dead-letter queue at once.
    fn reject(self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Keep the lease for `by` from now.
    fn extend(&self, by: Duration) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The trait's methods are the inherent ones, which the two faces share
/// by name and shape; one macro says so for both.
macro_rules! handles {
    ($queue:ty, $consumer:ty, $delivery:ty, $error:ty) => {
        impl QueueHandle for $queue {
            type Error = $error;
            type Consumer = $consumer;

            fn name(&self) -> &str {
                <$queue>::name(self)
            }

            async fn enqueue(&self, message: Message) -> Result<Enqueued, $error> {
                <$queue>::enqueue(self, message).await
            }

            async fn enqueue_batch(&self, messages: Vec<Message>) -> Result<Vec<Enqueued>, $error> {
                <$queue>::enqueue_batch(self, messages).await
            }

            async fn consumer(&self, prefetch: u32) -> Result<$consumer, $error> {
                <$queue>::consumer(self, prefetch).await
            }

            async fn stats(&self) -> Result<QueueStats, $error> {
                <$queue>::stats(self).await
            }

            async fn purge(&self) -> Result<u64, $error> {
                <$queue>::purge(self).await
            }

            async fn peek(&self, count: u32) -> Result<Vec<Peeked>, $error> {
                <$queue>::peek(self, count).await
            }

            fn dead_letters(&self) -> Option<$queue> {
                <$queue>::dead_letters(self)
            }

            async fn declare(&self, options: QueueDeclaration) -> Result<(), $error> {
                <$queue>::declare(self, options).await
            }
        }

        impl ConsumerHandle for $consumer {
            type Error = $error;
            type Delivery = $delivery;

            async fn recv(&mut self) -> Result<$delivery, $error> {
                <$consumer>::recv(self).await
            }
        }

        impl DeliveryHandle for $delivery {
            type Error = $error;

            fn id(&self) -> MessageId {
                <$delivery>::id(self)
            }

            fn delivery_count(&self) -> u32 {
                <$delivery>::delivery_count(self)
            }

            fn payload(&self) -> &Bytes {
                <$delivery>::payload(self)
            }

            fn headers(&self) -> &Headers {
                <$delivery>::headers(self)
            }

            async fn ack(self) -> Result<(), $error> {
                <$delivery>::ack(self).await
            }

            async fn nack(self, delay: Duration) -> Result<(), $error> {
                <$delivery>::nack(self, delay).await
            }

            async fn reject(self) -> Result<(), $error> {
                <$delivery>::reject(self).await
            }

            async fn extend(&self, by: Duration) -> Result<(), $error> {
                <$delivery>::extend(self, by).await
            }
        }
    };
}

handles!(Queue, Consumer, Delivery, QueueError);

#[cfg(feature = "remote")]
handles!(
    crate::remote::RemoteQueue,
    crate::remote::RemoteConsumer,
    crate::remote::RemoteDelivery,
    crate::remote::RemoteQueueError
);
