//! A blocking face, for programs without an async runtime: produce, consume
//! and answer on an embedded [`Queue`] or (with the `remote` feature) a
//! `RemoteQueue`, from plain threads.
//!
//! [`BlockingQueue`] wraps any [`QueueHandle`] and a runtime: one it owns
//! ([`BlockingQueue::open`], `BlockingQueue::connect`: a single worker
//! thread, shared by the queue's consumers) or the caller's
//! ([`BlockingQueue::new`] with a `Handle`). Each call blocks the calling
//! thread until the async call it wraps returns, so do not call these from
//! async code.
//!
//! ```
//! use std::time::Duration;
//! use courier_queue::blocking::BlockingQueue;
//! use courier_queue::{Message, QueueOptions};
//!
//! # let dir = std::env::temp_dir().join(format!("courier-blocking-doc-{}", std::process::id()));
//! let queue = BlockingQueue::open(&dir, "jobs", QueueOptions::default())?;
//! queue.enqueue(Message::new("resize photo 1"))?;
//!
//! let mut consumer = queue.consumer(8)?;
//! let delivery = consumer.recv_timeout(Duration::from_secs(5))?.expect("a job");
//! assert_eq!(&delivery.payload()[..], b"resize photo 1");
//! delivery.ack()?;
//! # drop((consumer, queue));
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier_wire::headers::Headers;

use crate::core::{MessageId, QueueStats};
use crate::{
    ConsumerHandle, DeliveryHandle, Enqueued, Message, Peeked, Queue, QueueDeclaration, QueueError,
    QueueHandle, QueueOptions,
};

/// Where blocking calls run: a runtime this face owns, or the caller's.
#[derive(Clone, Debug)]
struct Runner {
    handle: tokio::runtime::Handle,
    /// Kept alive for as long as any clone of the face is.
    _owned: Option<Arc<tokio::runtime::Runtime>>,
}

impl Runner {
    fn owned() -> std::io::Result<Runner> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("courier-queue")
            .enable_all()
            .build()?;
        Ok(Runner {
            handle: runtime.handle().clone(),
            _owned: Some(Arc::new(runtime)),
        })
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.handle.block_on(future)
    }
}

/// Why a blocking queue could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockingError<E> {
    /// Its runtime could not be started (threads or timers unavailable).
    #[error("cannot start the queue's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Opening or connecting failed.
    #[error(transparent)]
    Queue(E),
}

impl BlockingError<QueueError> {
    /// What kind of failure this is, as for every Courier error.
    pub fn kind(&self) -> courier_wire::ErrorKind {
        match self {
            BlockingError::Runtime(err) => courier_wire::ErrorKind::of_io(err),
            BlockingError::Queue(err) => err.kind(),
        }
    }
}

#[cfg(feature = "remote")]
impl BlockingError<crate::remote::RemoteQueueError> {
    /// What kind of failure this is, as for every Courier error.
    pub fn kind(&self) -> courier_wire::ErrorKind {
        match self {
            BlockingError::Runtime(err) => courier_wire::ErrorKind::of_io(err),
            BlockingError::Queue(err) => err.kind(),
        }
    }
}

/// A queue (embedded or remote) with blocking methods. Cloning shares the
/// queue and its runtime.
#[derive(Clone, Debug)]
pub struct BlockingQueue<Q> {
    queue: Q,
    runner: Runner,
}

impl BlockingQueue<Queue> {
    /// Opens (or creates) the embedded queue `name` under `dir`, on a
    /// runtime of its own.
    pub fn open(
        dir: impl AsRef<Path>,
        name: &str,
        options: QueueOptions,
    ) -> Result<BlockingQueue<Queue>, BlockingError<QueueError>> {
        let runner = Runner::owned().map_err(BlockingError::Runtime)?;
        let queue = runner
            .block_on(Queue::open(dir, name, options))
            .map_err(BlockingError::Queue)?;
        Ok(BlockingQueue { queue, runner })
    }
}

#[cfg(feature = "remote")]
impl BlockingQueue<crate::remote::RemoteQueue> {
    /// Connects to the queue `name` on the host at `address`, on a runtime
    /// of its own.
    pub fn connect(
        address: &courier_transport::Address,
        name: &str,
        config: courier_rpc::ClientConfig,
    ) -> Result<
        BlockingQueue<crate::remote::RemoteQueue>,
        BlockingError<crate::remote::RemoteQueueError>,
    > {
        let runner = Runner::owned().map_err(BlockingError::Runtime)?;
        let queue = runner
            .block_on(crate::remote::RemoteQueue::connect(address, name, config))
            .map_err(BlockingError::Queue)?;
        Ok(BlockingQueue { queue, runner })
    }
}

impl<Q: QueueHandle> BlockingQueue<Q> {
    /// Wraps a queue made on the runtime `handle` points at. That runtime
    /// must keep running (a multi-thread runtime, or a current-thread one
    /// driven by another thread): blocking calls wait for work done there.
    pub fn new(queue: Q, handle: tokio::runtime::Handle) -> BlockingQueue<Q> {
        BlockingQueue {
            queue,
            runner: Runner {
                handle,
                _owned: None,
            },
        }
    }

    /// The async queue inside, for code that has a runtime after all.
    pub fn inner(&self) -> &Q {
        &self.queue
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        self.queue.name()
    }

    /// Stores one message; returns once it is stored under the queue's
    /// fsync policy.
    pub fn enqueue(&self, message: Message) -> Result<Enqueued, Q::Error> {
        self.runner.block_on(self.queue.enqueue(message))
    }

    /// Stores messages together; one outcome each.
    pub fn enqueue_batch(&self, messages: Vec<Message>) -> Result<Vec<Enqueued>, Q::Error> {
        self.runner.block_on(self.queue.enqueue_batch(messages))
    }

    /// A consumer holding at most `prefetch` unanswered deliveries.
    pub fn consumer(&self, prefetch: u32) -> Result<BlockingConsumer<Q::Consumer>, Q::Error> {
        let consumer = self.runner.block_on(self.queue.consumer(prefetch))?;
        Ok(BlockingConsumer {
            consumer,
            runner: self.runner.clone(),
        })
    }

    /// Counters.
    pub fn stats(&self) -> Result<QueueStats, Q::Error> {
        self.runner.block_on(self.queue.stats())
    }

    /// Removes every message not under a lease; how many went.
    pub fn purge(&self) -> Result<u64, Q::Error> {
        self.runner.block_on(self.queue.purge())
    }

    /// The next ready messages, changing nothing.
    pub fn peek(&self, count: u32) -> Result<Vec<Peeked>, Q::Error> {
        self.runner.block_on(self.queue.peek(count))
    }

    /// Sets this queue's own options (see [`QueueDeclaration`]).
    pub fn declare(&self, options: QueueDeclaration) -> Result<(), Q::Error> {
        self.runner.block_on(self.queue.declare(options))
    }

    /// The queue's dead letters, as a blocking queue on the same runtime.
    pub fn dead_letters(&self) -> Option<BlockingQueue<Q>> {
        Some(BlockingQueue {
            queue: self.queue.dead_letters()?,
            runner: self.runner.clone(),
        })
    }
}

/// Takes deliveries from a queue, blocking.
#[derive(Debug)]
pub struct BlockingConsumer<C> {
    consumer: C,
    runner: Runner,
}

impl<C: ConsumerHandle> BlockingConsumer<C> {
    /// Waits for the next delivery.
    pub fn recv(&mut self) -> Result<BlockingDelivery<C::Delivery>, C::Error> {
        let delivery = self.runner.block_on(self.consumer.recv())?;
        Ok(BlockingDelivery {
            delivery,
            runner: self.runner.clone(),
        })
    }

    /// Waits at most `timeout` for the next delivery; `Ok(None)` when none
    /// came. A delivery that arrives as the wait ends is kept for the next
    /// call, never lost (the consumer's `recv` is cancel-safe).
    pub fn recv_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<BlockingDelivery<C::Delivery>>, C::Error> {
        let outcome = self
            .runner
            .block_on(async { tokio::time::timeout(timeout, self.consumer.recv()).await });
        match outcome {
            Ok(delivery) => Ok(Some(BlockingDelivery {
                delivery: delivery?,
                runner: self.runner.clone(),
            })),
            Err(_elapsed) => Ok(None),
        }
    }
}

/// One delivery, answered by blocking calls.
#[derive(Debug)]
pub struct BlockingDelivery<D> {
    delivery: D,
    runner: Runner,
}

impl<D: DeliveryHandle> BlockingDelivery<D> {
    /// The message's id.
    pub fn id(&self) -> MessageId {
        self.delivery.id()
    }

    /// 1 for the first delivery, then 2, …
    pub fn delivery_count(&self) -> u32 {
        self.delivery.delivery_count()
    }

    /// Its bytes.
    pub fn payload(&self) -> &Bytes {
        self.delivery.payload()
    }

    /// Its headers.
    pub fn headers(&self) -> &Headers {
        self.delivery.headers()
    }

    /// The trace context the message was enqueued in, if any.
    pub fn trace_context(&self) -> Option<courier_wire::trace::TraceContext> {
        self.delivery.trace_context()
    }

    /// Done with it: it is removed once that is durable.
    pub fn ack(self) -> Result<(), D::Error> {
        self.runner.block_on(self.delivery.ack())
    }

    /// Give it back, to come again after `delay`.
    pub fn nack(self, delay: Duration) -> Result<(), D::Error> {
        self.runner.block_on(self.delivery.nack(delay))
    }

    /// A poison message: to the dead-letter queue at once.
    pub fn reject(self) -> Result<(), D::Error> {
        self.runner.block_on(self.delivery.reject())
    }

    /// Keep the lease `by` longer.
    pub fn extend(&self, by: Duration) -> Result<(), D::Error> {
        self.runner.block_on(self.delivery.extend(by))
    }

    /// The async delivery inside.
    pub fn into_inner(self) -> D {
        self.delivery
    }
}
