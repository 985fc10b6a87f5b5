//! Client-side coalescing: many callers' small requests (acks, single
//! enqueues) travel together, one call carrying what was asked while the
//! previous calls were in flight, and each caller still gets its own
//! outcome.
//!
//! A request handed to a coalescer is sent whatever happens to its caller
//! afterwards: the sending runs in a task of its own, so a caller's future
//! dropped while it waits cannot take other callers' requests down with it
//! or leave its own half sent.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// How requests of one kind are sent together.
pub(crate) trait Batcher: Send + Sync + 'static {
    /// One caller's request.
    type Item: Send + 'static;
    /// What the caller gets for it.
    type Outcome: Send + 'static;
    /// What a request fails with.
    type Error: Clone + Send + 'static;
    /// What an item weighs against [`Limits::weight_per_call`] (bytes).
    fn weight(item: &Self::Item) -> usize;
    /// Sends items in one call: one outcome each, in order.
    fn send(
        &self,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Vec<Result<Self::Outcome, Self::Error>>> + Send;
    /// The outcome of an item the other side gave no answer for.
    fn no_outcome() -> Self::Error;
}

/// Bounds of a coalescer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Items in one call at most.
    pub per_call: usize,
    /// Their weight in one call at most (one heavier item goes alone).
    pub weight_per_call: usize,
    /// Calls in flight at once.
    pub calls_in_flight: usize,
    /// Items waiting to be sent at most; further callers wait for room.
    pub pending: usize,
}

/// One item's outcome.
type Outcome<B> = Result<<B as Batcher>::Outcome, <B as Batcher>::Error>;

type Waiter<B> = oneshot::Sender<Outcome<B>>;

struct Entry<B: Batcher> {
    item: B::Item,
    /// `None`: nobody waits for the outcome.
    waiter: Option<Waiter<B>>,
    /// Its place among the pending items, given back with its outcome
    /// (`None`: items bounded otherwise).
    _room: Option<OwnedSemaphorePermit>,
}

struct Pending<B: Batcher> {
    queue: VecDeque<Entry<B>>,
    /// Sending tasks running; each takes whatever is queued before it stops.
    sending: usize,
}

/// Requests of one kind on their way, sent together. See the module docs.
pub(crate) struct Coalescer<B: Batcher> {
    batcher: B,
    limits: Limits,
    pending: Mutex<Pending<B>>,
    room: Arc<Semaphore>,
}

impl<B: Batcher> std::fmt::Debug for Coalescer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Why a request could not be handed over.
#[derive(Debug)]
pub(crate) struct NotSent;

impl<B: Batcher> Coalescer<B> {
    pub(crate) fn new(batcher: B, limits: Limits) -> Arc<Coalescer<B>> {
        Arc::new(Coalescer {
            batcher,
            limits,
            pending: Mutex::new(Pending {
                queue: VecDeque::new(),
                sending: 0,
            }),
            room: Arc::new(Semaphore::new(limits.pending.max(1))),
        })
    }

    /// Sends `item` with others and waits for its outcome. Waits first for
    /// room among the pending items (dropped then, nothing was handed
    /// over); once handed over, the item is sent whatever happens to this
    /// future.
    pub(crate) async fn call(self: &Arc<Self>, item: B::Item) -> Result<B::Outcome, CallError<B>> {
        let room = self
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| CallError::NotSent(NotSent))?;
        let (waiter, outcome) = oneshot::channel();
        self.hand_over(item, Some(waiter), Some(room))
            .map_err(CallError::NotSent)?;
        match outcome.await {
            Ok(outcome) => outcome.map_err(CallError::Failed),
            Err(_) => Err(CallError::NotSent(NotSent)),
        }
    }

    /// Hands `item` over at once, without waiting for room (for items
    /// whose number is bounded otherwise, as answers are by the deliveries
    /// held), and waits for nothing. `Err` if it cannot be sent: no
    /// runtime to send it from.
    pub(crate) fn send_later(self: &Arc<Self>, item: B::Item) -> Result<(), NotSent> {
        self.hand_over(item, None, None)
    }

    /// Hands `item` over at once, as [`Coalescer::send_later`] does, for a
    /// caller that marks its request as sent in the same step (no await
    /// in between); the outcome comes on the receiver.
    pub(crate) fn hand_over_now(
        self: &Arc<Self>,
        item: B::Item,
    ) -> Result<oneshot::Receiver<Outcome<B>>, NotSent> {
        let (waiter, outcome) = oneshot::channel();
        self.hand_over(item, Some(waiter), None)?;
        Ok(outcome)
    }

    fn hand_over(
        self: &Arc<Self>,
        item: B::Item,
        waiter: Option<Waiter<B>>,
        room: Option<OwnedSemaphorePermit>,
    ) -> Result<(), NotSent> {
        let mut pending = lock(&self.pending);
        if pending.sending < self.limits.calls_in_flight.max(1) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    pending.sending += 1;
                    runtime.spawn(self.clone().run());
                }
                // A task already sending takes it; with none, nobody would.
                Err(_) if pending.sending == 0 => return Err(NotSent),
                Err(_) => {}
            }
        }
        pending.queue.push_back(Entry {
            item,
            waiter,
            _room: room,
        });
        Ok(())
    }

    /// Sends what is queued, call after call, until nothing is left.
    async fn run(self: Arc<Self>) {
        // Counted out however this task ends, a panic included, so that the
        // next item handed over starts a sender again.
        let mut running = Running {
            pending: &self.pending,
            counted: true,
        };
        loop {
            let entries: Vec<Entry<B>> = {
                let mut pending = lock(&self.pending);
                if pending.queue.is_empty() {
                    pending.sending -= 1;
                    running.counted = false;
                    return;
                }
                let mut weight = 0;
                let mut taken = 0;
                for entry in &pending.queue {
                    let w = B::weight(&entry.item);
                    if taken > 0
                        && (taken == self.limits.per_call
                            || weight + w > self.limits.weight_per_call)
                    {
                        break;
                    }
                    weight += w;
                    taken += 1;
                }
                pending.queue.drain(..taken).collect()
            };
            let mut items = Vec::with_capacity(entries.len());
            let mut rest = Vec::with_capacity(entries.len());
            for Entry {
                item,
                waiter,
                _room,
            } in entries
            {
                items.push(item);
                rest.push((waiter, _room));
            }
            let mut outcomes = self.batcher.send(items).await.into_iter();
            for (waiter, _room) in rest {
                // An answer short of outcomes is the other side's bug;
                // whoever has none gets an error, not a hang.
                let outcome = outcomes.next().unwrap_or_else(|| Err(B::no_outcome()));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(outcome);
                }
            }
        }
    }
}

/// A sending task, counted in [`Pending::sending`] while it runs.
struct Running<'a, B: Batcher> {
    pending: &'a Mutex<Pending<B>>,
    counted: bool,
}

impl<B: Batcher> Drop for Running<'_, B> {
    fn drop(&mut self) {
        if self.counted {
            lock(self.pending).sending -= 1;
        }
    }
}

/// Why a coalesced call failed.
pub(crate) enum CallError<B: Batcher> {
    /// It was never handed over (no runtime), or its sender went with the
    /// runtime.
    NotSent(NotSent),
    /// It was sent and failed.
    Failed(B::Error),
}
