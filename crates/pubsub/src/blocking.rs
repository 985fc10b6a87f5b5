//! Blocking faces, for programs without an async runtime: the in-process
//! bus through [`Subscription::blocking_recv`] and
//! [`Publisher::blocking_publish`], and a remote bus through
//! [`BlockingPubSub`], which owns a small runtime. Do not call these from
//! async code: they block the thread.
//!
//! ```
//! use courier_pubsub::{Bus, Event, SubscribeOptions};
//!
//! let bus = Bus::new();
//! let mut subscription = bus.blocking_subscribe("greetings.*", SubscribeOptions::default()).unwrap();
//! let publisher = bus.publisher();
//! std::thread::spawn(move || publisher.blocking_publish("greetings.en", "hello").unwrap());
//! let Some(Event::Message(message)) = subscription.blocking_recv() else { panic!() };
//! assert_eq!(&message.payload[..], b"hello");
//! ```

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;

use crate::{Bus, Event, Publisher, SubjectError, SubscribeOptions, Subscription};

/// Wakes a parked thread.
struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future that needs no runtime (the in-process bus waits only on
/// its own notifications) on the calling thread.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

impl Subscription {
    /// [`recv`](Subscription::recv), blocking the thread (without the
    /// `Result`, which in process is never an error).
    pub fn blocking_recv(&mut self) -> Option<Event> {
        block_on(self.next_event())
    }
}

impl Bus {
    /// [`subscribe`](Bus::subscribe), for code without a runtime (it never
    /// waits).
    pub fn blocking_subscribe(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, SubjectError> {
        self.subscribe_now(filter, options)
    }
}

impl Publisher {
    /// [`publish`](Publisher::publish), blocking the thread (only under
    /// [`crate::SlowConsumer::Backpressure`] does it wait).
    pub fn blocking_publish(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> Result<usize, SubjectError> {
        let subject = crate::Subject::new(subject)?;
        Ok(block_on(self.publish_to(&subject, payload)))
    }
}

#[cfg(feature = "remote")]
pub use remote_face::{BlockingPubSub, BlockingPublisher, BlockingSubscription};

/// The remote face's blocking handles.
#[cfg(feature = "remote")]
mod remote_face {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use courier_rpc::blocking::Runtime;
    use courier_rpc::{ClientConfig, RpcError};
    use courier_transport::Address;

    use crate::remote::{RemotePubSub, RemotePubSubError, RemotePublisher, RemoteSubscription};
    use crate::{Event, Message, SubscribeOptions};

    /// A remote bus for code without a runtime.
    #[derive(Debug, Clone)]
    pub struct BlockingPubSub {
        runtime: Arc<Runtime>,
        bus: RemotePubSub,
    }

    impl BlockingPubSub {
        /// Connects to the host at `address`.
        pub fn connect(
            address: &Address,
            config: ClientConfig,
        ) -> Result<BlockingPubSub, RemotePubSubError> {
            let runtime = Arc::new(Runtime::new()?);
            let bus = runtime.block_on(RemotePubSub::connect(address, config))?;
            Ok(BlockingPubSub { runtime, bus })
        }

        /// A publisher with a fresh identity.
        pub fn publisher(&self) -> BlockingPublisher {
            BlockingPublisher {
                runtime: self.runtime.clone(),
                publisher: self.bus.publisher(),
            }
        }

        /// Subscribes; returns once the subscription is active at the host.
        pub fn subscribe(
            &self,
            filter: &str,
            options: SubscribeOptions,
        ) -> Result<BlockingSubscription, RemotePubSubError> {
            let subscription = self.runtime.block_on(self.bus.subscribe(filter, options))?;
            Ok(BlockingSubscription {
                runtime: self.runtime.clone(),
                subscription,
            })
        }

        /// Sends a request to `subject` and waits at most `timeout` for a reply.
        pub fn request(
            &self,
            subject: &str,
            payload: impl Into<Bytes>,
            timeout: Duration,
        ) -> Result<Message, RemotePubSubError> {
            self.runtime
                .block_on(self.bus.request(subject, payload, timeout))
        }
    }

    /// Publishes to a remote bus, blocking.
    #[derive(Debug, Clone)]
    pub struct BlockingPublisher {
        runtime: Arc<Runtime>,
        publisher: RemotePublisher,
    }

    impl BlockingPublisher {
        /// See [`RemotePublisher::publish`] (one way, in order).
        pub fn publish(
            &self,
            subject: &str,
            payload: impl Into<Bytes>,
        ) -> Result<(), RemotePubSubError> {
            self.runtime
                .block_on(self.publisher.publish(subject, payload))
        }

        /// See [`RemotePublisher::publish_confirmed`].
        pub fn publish_confirmed(
            &self,
            subject: &str,
            payload: impl Into<Bytes>,
        ) -> Result<u64, RemotePubSubError> {
            self.runtime
                .block_on(self.publisher.publish_confirmed(subject, payload))
        }

        /// See [`RemotePublisher::flush`].
        pub fn flush(&self) -> Result<(), RemotePubSubError> {
            self.runtime.block_on(self.publisher.flush())
        }

        /// See [`RemotePublisher::publish_batch`] (one way, in order).
        pub fn publish_batch<S: Into<String>, P: Into<Bytes>>(
            &self,
            messages: impl IntoIterator<Item = (S, P)>,
        ) -> Result<(), RemotePubSubError> {
            self.runtime
                .block_on(self.publisher.publish_batch(messages))
        }

        /// See [`RemotePublisher::publish_batch_confirmed`].
        pub fn publish_batch_confirmed<S: Into<String>, P: Into<Bytes>>(
            &self,
            messages: impl IntoIterator<Item = (S, P)>,
        ) -> Result<u64, RemotePubSubError> {
            self.runtime
                .block_on(self.publisher.publish_batch_confirmed(messages))
        }

        /// See [`RemotePublisher::reply`].
        pub fn reply(
            &self,
            request: &Message,
            payload: impl Into<Bytes>,
        ) -> Result<(), RemotePubSubError> {
            self.runtime
                .block_on(self.publisher.reply(request, payload))
        }
    }

    /// A remote subscription, blocking.
    #[derive(Debug)]
    pub struct BlockingSubscription {
        runtime: Arc<Runtime>,
        subscription: RemoteSubscription,
    }

    impl BlockingSubscription {
        /// See [`RemoteSubscription::recv`].
        pub fn recv(&mut self) -> Option<Result<Event, RemotePubSubError>> {
            self.runtime.block_on(self.subscription.recv())
        }

        /// [`recv`](Self::recv), giving up after `timeout` with
        /// [`RpcError::DeadlineExceeded`].
        pub fn recv_timeout(
            &mut self,
            timeout: Duration,
        ) -> Option<Result<Event, RemotePubSubError>> {
            self.runtime
                .block_on(async { tokio::time::timeout(timeout, self.subscription.recv()).await })
                .unwrap_or(Some(Err(RemotePubSubError::Rpc(
                    RpcError::DeadlineExceeded,
                ))))
        }

        /// See [`RemoteSubscription::dropped`].
        pub fn dropped(&self) -> u64 {
            self.subscription.dropped()
        }
    }
}
