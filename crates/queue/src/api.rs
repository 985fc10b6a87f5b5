//! One API over both faces: code written against these traits runs
//! unchanged on an embedded [`Queue`] and on a [`RemoteQueue`].

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::core::{MessageId, QueueStats};
use crate::remote::{RemoteConsumer, RemoteDelivery, RemoteQueue, RemoteQueueError};
use crate::{Consumer, Delivery, Enqueued, Message, Queue, QueueError};

/// A queue, embedded or remote.
pub trait QueueHandle: Send + Sync {
    /// What its operations fail with.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Its consumers.
    type Consumer: ConsumerHandle<Error = Self::Error>;
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
}

/// Takes messages from a queue.
pub trait ConsumerHandle: Send {
    /// What receiving fails with.
    type Error: std::error::Error + Send + Sync + 'static;
    /// One delivery.
    type Delivery: DeliveryHandle<Error = Self::Error>;
    /// Waits for the next delivery.
    fn next(&mut self) -> impl Future<Output = Result<Self::Delivery, Self::Error>> + Send;
}

/// One delivery, to acknowledge after processing or give back.
pub trait DeliveryHandle: Send {
    /// What answering fails with.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The message.
    fn id(&self) -> MessageId;
    /// 1 for the first delivery, then 2, …
    fn delivery_count(&self) -> u32;
    /// Its bytes.
    fn payload(&self) -> &Bytes;
    /// Done with it.
    fn ack(self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Give it back, to come again after `delay`.
    fn nack(self, delay: Duration) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

impl QueueHandle for Queue {
    type Error = QueueError;
    type Consumer = Consumer;

    async fn enqueue_batch(&self, messages: Vec<Message>) -> Result<Vec<Enqueued>, QueueError> {
        Queue::enqueue_batch(self, messages).await
    }

    async fn consumer(&self, prefetch: u32) -> Result<Consumer, QueueError> {
        Ok(Queue::consumer(self, prefetch as usize))
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        Ok(Queue::stats(self))
    }
}

impl ConsumerHandle for Consumer {
    type Error = QueueError;
    type Delivery = Delivery;

    async fn next(&mut self) -> Result<Delivery, QueueError> {
        Ok(self.recv().await)
    }
}

impl DeliveryHandle for Delivery {
    type Error = QueueError;

    fn id(&self) -> MessageId {
        self.id
    }

    fn delivery_count(&self) -> u32 {
        self.delivery
    }

    fn payload(&self) -> &Bytes {
        &self.payload
    }

    async fn ack(self) -> Result<(), QueueError> {
        Delivery::ack(self).await
    }

    async fn nack(self, delay: Duration) -> Result<(), QueueError> {
        Delivery::nack(self, delay).await
    }
}

impl QueueHandle for RemoteQueue {
    type Error = RemoteQueueError;
    type Consumer = RemoteConsumer;

    async fn enqueue_batch(
        &self,
        messages: Vec<Message>,
    ) -> Result<Vec<Enqueued>, RemoteQueueError> {
        RemoteQueue::enqueue_batch(self, messages).await
    }

    async fn consumer(&self, prefetch: u32) -> Result<RemoteConsumer, RemoteQueueError> {
        RemoteQueue::consumer(self, prefetch).await
    }

    async fn stats(&self) -> Result<QueueStats, RemoteQueueError> {
        RemoteQueue::stats(self).await
    }
}

impl ConsumerHandle for RemoteConsumer {
    type Error = RemoteQueueError;
    type Delivery = RemoteDelivery;

    async fn next(&mut self) -> Result<RemoteDelivery, RemoteQueueError> {
        match self.recv().await {
            Some(outcome) => outcome,
            None => Err(RemoteQueueError::Rpc(courier_rpc::RpcError::Unavailable(
                "the queue host ended the stream".into(),
            ))),
        }
    }
}

impl DeliveryHandle for RemoteDelivery {
    type Error = RemoteQueueError;

    fn id(&self) -> MessageId {
        self.id
    }

    fn delivery_count(&self) -> u32 {
        self.delivery
    }

    fn payload(&self) -> &Bytes {
        &self.payload
    }

    async fn ack(self) -> Result<(), RemoteQueueError> {
        RemoteDelivery::ack(self).await
    }

    async fn nack(self, delay: Duration) -> Result<(), RemoteQueueError> {
        RemoteDelivery::nack(self, delay).await
    }
}
