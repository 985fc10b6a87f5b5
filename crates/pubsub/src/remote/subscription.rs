//! A remote subscription: its stream of events, and how it restores
//! itself when its host goes away.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_rpc::{ItemStream, RpcError};
use courier_transport::Backoff;

use crate::{Event, Message, Subject, SubscribeOptions};

use super::error::RemotePubSubError;
use super::id::fresh_id;
use super::wire::*;

// Subscriptions' streams have no deadline: they end when dropped or when
// the connection dies, not at a time.

async fn open_subscription(
    client: &PubSubServiceClient,
    filter: &str,
    options: &SubscribeOptions,
) -> Result<ItemStream<Result<Vec<WireEvent>, RemoteError>>, RemotePubSubError> {
    let mut stream = client
        .without_deadline()
        .subscribe(
            filter.to_string(),
            options.buffer as u32,
            policy_code(options.policy),
            options.group.clone(),
        )
        .await?;
    match stream.next().await {
        Some(Ok(Ok(first))) if first == [WireEvent::Active] => Ok(stream),
        Some(Ok(Err(err))) => Err(err.into()),
        Some(Err(err)) => Err(err.into()),
        other => Err(RemotePubSubError::Protocol(format!(
            "expected [Active], got {other:?}"
        ))),
    }
}

/// A subscription on a remote bus. Dropping it unsubscribes; the host
/// tears the subscription down when the cancellation reaches it, so a
/// message published in that moment may still be counted for it.
///
/// Receive with [`recv`](Self::recv) or as a [`futures_core::Stream`] of
/// the same items. Both are cancel-safe (in `tokio::select!`, say): a
/// receive dropped at any await, even while the subscription is restoring
/// itself after losing its host, loses no event and abandons no restore;
/// the next receive carries on where it stopped.
pub struct RemoteSubscription {
    /// The state, while no receive is under way.
    state: Option<Box<SubscriptionState>>,
    /// A receive under way (the state moved into it), kept across dropped
    /// `recv` futures: that is what makes receiving cancel-safe.
    in_flight: Option<InFlight>,
    counts: Arc<SubscriptionCounts>,
}

type InFlight = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    Box<SubscriptionState>,
                    Option<Result<Event, RemotePubSubError>>,
                ),
            > + Send
            + Sync,
    >,
>;

impl std::fmt::Debug for RemoteSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSubscription")
            .field("receiving", &self.in_flight.is_some())
            .field("restored", &self.restored())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

/// What a subscription counts, readable while a receive is under way.
#[derive(Debug, Default)]
struct SubscriptionCounts {
    restored: AtomicU64,
    /// Drops the host reported for the subscriptions before the last restore.
    dropped_before: AtomicU64,
    /// Drops the host reported for the current one.
    dropped_now: AtomicU64,
}

/// Everything a receive needs, moved into the receive while it waits.
struct SubscriptionState {
    stream: ItemStream<Result<Vec<WireEvent>, RemoteError>>,
    pending: VecDeque<WireEvent>,
    /// The last subject parsed: consecutive messages often share it.
    last_subject: Option<Subject>,
    client: PubSubServiceClient,
    filter: String,
    options: SubscribeOptions,
    restore_window: Duration,
    counts: Arc<SubscriptionCounts>,
}

/// Errors after which the host may come back: subscribe again.
fn host_lost(err: &RpcError) -> bool {
    matches!(err, RpcError::Unavailable(_) | RpcError::Cancelled)
}

impl RemoteSubscription {
    /// Subscribes through `client`; returns once the subscription is
    /// active at the host.
    pub(super) async fn open(
        client: PubSubServiceClient,
        filter: &str,
        options: SubscribeOptions,
        restore_window: Duration,
    ) -> Result<RemoteSubscription, RemotePubSubError> {
        let stream = open_subscription(&client, filter, &options).await?;
        let counts = Arc::new(SubscriptionCounts::default());
        Ok(RemoteSubscription {
            state: Some(Box::new(SubscriptionState {
                stream,
                pending: VecDeque::new(),
                last_subject: None,
                client,
                filter: filter.to_string(),
                options,
                restore_window,
                counts: counts.clone(),
            })),
            in_flight: None,
            counts,
        })
    }

    /// The next event; `None` when the subscription ended (the host
    /// disconnected it as a slow consumer). Cancel-safe (see the type's
    /// docs).
    pub async fn recv(&mut self) -> Option<Result<Event, RemotePubSubError>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// How many times this subscription restored itself.
    pub fn restored(&self) -> u64 {
        self.counts.restored.load(Ordering::Relaxed)
    }

    /// Messages the host dropped for this subscription (slow-consumer
    /// policy, byte caps, too large to send), over every restore, as far
    /// as the host reported them: the count travels with the events, so it
    /// is exact up to the last event received. Gaps and
    /// [`Event::Dropped`] say which, at the latest once the host's buffer
    /// has drained. Not counted (not knowable): what a lost connection or
    /// host took with it; see [`Event::Restored`].
    pub fn dropped(&self) -> u64 {
        self.counts.dropped_before.load(Ordering::Relaxed)
            + self.counts.dropped_now.load(Ordering::Relaxed)
    }

    /// Events already received take no allocation and no await; only a
    /// receive that has to wait moves the state into a boxed future, which
    /// stays here until it is done, however often its caller gives up.
    fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Event, RemotePubSubError>>> {
        if self.in_flight.is_none() {
            let Some(mut state) = self.state.take() else {
                return std::task::Poll::Ready(None);
            };
            if let Some(event) = state.ready_event() {
                self.state = Some(state);
                return std::task::Poll::Ready(Some(event));
            }
            self.in_flight = Some(Box::pin(async move {
                let event = state.next_event().await;
                (state, event)
            }));
        }
        let Some(in_flight) = self.in_flight.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        match std::future::Future::poll(in_flight.as_mut(), cx) {
            std::task::Poll::Ready((state, event)) => {
                self.in_flight = None;
                self.state = Some(state);
                std::task::Poll::Ready(event)
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl futures_core::Stream for RemoteSubscription {
    type Item = Result<Event, RemotePubSubError>;

    /// [`RemoteSubscription::recv`] as a stream: the same items, as
    /// cancel-safe.
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

impl SubscriptionState {
    /// An event already received, if there is one.
    fn ready_event(&mut self) -> Option<Result<Event, RemotePubSubError>> {
        while let Some(wire) = self.pending.pop_front() {
            if let WireEvent::DropCount { total } = wire {
                self.counts.dropped_now.store(total, Ordering::Relaxed);
                continue;
            }
            return Some(event_from(wire, &mut self.last_subject));
        }
        None
    }

    /// The next event, waiting for the host (and restoring the
    /// subscription if the host went away).
    async fn next_event(&mut self) -> Option<Result<Event, RemotePubSubError>> {
        loop {
            if let Some(event) = self.ready_event() {
                return Some(event);
            }
            match self.stream.next().await? {
                Ok(Ok(batch)) => self.pending.extend(batch),
                Ok(Err(err)) => return Some(Err(err.into())),
                Err(err) if host_lost(&err) => {
                    return Some(match self.restore(err).await {
                        Ok(()) => Ok(Event::Restored),
                        Err(err) => Err(err),
                    })
                }
                Err(err) => return Some(Err(err.into())),
            }
        }
    }

    /// Subscribes again, with backoff, until the host takes it or the
    /// restore window closes.
    async fn restore(&mut self, lost: RpcError) -> Result<(), RemotePubSubError> {
        let give_up = tokio::time::Instant::now() + self.restore_window;
        let mut backoff = Backoff::new(
            Duration::from_millis(20),
            Duration::from_secs(2),
            fresh_id(),
        );
        let mut last = RemotePubSubError::Rpc(lost);
        loop {
            let delay = backoff.next_delay();
            if tokio::time::Instant::now() + delay > give_up {
                return Err(last);
            }
            tokio::time::sleep(delay).await;
            match open_subscription(&self.client, &self.filter, &self.options).await {
                Ok(stream) => {
                    self.stream = stream;
                    self.pending.clear();
                    let now = self.counts.dropped_now.swap(0, Ordering::Relaxed);
                    self.counts.dropped_before.fetch_add(now, Ordering::Relaxed);
                    self.counts.restored.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(RemotePubSubError::Rpc(err)) if host_lost(&err) => last = err.into(),
                Err(err) => return Err(err),
            }
        }
    }
}

/// Parses `subject`, reusing `last` when it is the same.
fn parse_subject(
    subject: &str,
    last: &mut Option<Subject>,
) -> Result<Subject, crate::SubjectError> {
    if let Some(same) = last.as_ref().filter(|l| l.as_str() == subject) {
        return Ok(same.clone());
    }
    let parsed = Subject::new(subject)?;
    *last = Some(parsed.clone());
    Ok(parsed)
}

fn event_from(wire: WireEvent, last: &mut Option<Subject>) -> Result<Event, RemotePubSubError> {
    match wire {
        WireEvent::Message {
            subject,
            payload,
            publisher,
            seq,
            reply_to,
            headers,
        } => match parse_subject(subject.as_str(), last) {
            Ok(subject) => Ok(Event::Message(Message {
                subject,
                payload,
                publisher,
                seq,
                reply_to: reply_to.and_then(|r| Subject::new(r.as_str()).ok()),
                headers,
            })),
            Err(err) => Err(RemotePubSubError::Protocol(err.to_string())),
        },
        WireEvent::Gap {
            publisher,
            from,
            to,
        } => Ok(Event::Gap {
            publisher,
            from,
            to,
        }),
        WireEvent::Dropped { count } => Ok(Event::Dropped { count }),
        WireEvent::Active => Err(RemotePubSubError::Protocol("a second Active".into())),
        WireEvent::DropCount { .. } => {
            Err(RemotePubSubError::Protocol("a misplaced drop count".into()))
        }
    }
}
