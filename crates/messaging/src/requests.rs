//! Request/response correlation as a pure state machine: ids, deadlines,
//! and replies matched in any order.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// Requests awaiting replies. `W` is whatever the caller uses to hand a
/// reply to its waiter (a oneshot sender, in the async shell).
///
/// Ids are unique for the life of the table. A reply whose id is unknown
/// (late, after a timeout, or forged) is reported as such and delivered to
/// nobody.
#[derive(Debug)]
pub struct Requests<W> {
    next_id: u64,
    capacity: usize,
    pending: HashMap<u64, (W, Duration)>,
    deadlines: BTreeSet<(Duration, u64)>,
}

impl<W> Requests<W> {
    /// A table of at most `capacity` requests in flight.
    pub fn new(capacity: usize) -> Requests<W> {
        Requests {
            next_id: 1,
            capacity: capacity.max(1),
            pending: HashMap::new(),
            deadlines: BTreeSet::new(),
        }
    }

    /// Registers a request that times out at `deadline`, returning its id.
    /// When `capacity` requests are in flight the waiter is handed back.
    pub fn start(&mut self, waiter: W, deadline: Duration) -> Result<u64, W> {
        if self.pending.len() >= self.capacity {
            return Err(waiter);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, (waiter, deadline));
        self.deadlines.insert((deadline, id));
        Ok(id)
    }

    /// The waiter for a reply to `id`, if the request is still pending.
    pub fn complete(&mut self, id: u64) -> Option<W> {
        let (waiter, deadline) = self.pending.remove(&id)?;
        self.deadlines.remove(&(deadline, id));
        Some(waiter)
    }

    /// Removes a request the caller gave up on (its future was dropped).
    pub fn cancel(&mut self, id: u64) -> Option<W> {
        self.complete(id)
    }

    /// The next request whose deadline is at or before `now`.
    pub fn poll_expired(&mut self, now: Duration) -> Option<(u64, W)> {
        let &(deadline, id) = self.deadlines.first()?;
        if deadline > now {
            return None;
        }
        self.deadlines.remove(&(deadline, id));
        let (waiter, _) = self
            .pending
            .remove(&id)
            .expect("deadlines track pending requests");
        Some((id, waiter))
    }

    /// The earliest deadline.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Every pending request, removed: for when the peer is gone.
    pub fn drain(&mut self) -> impl Iterator<Item = (u64, W)> + '_ {
        self.deadlines.clear();
        self.pending.drain().map(|(id, (waiter, _))| (id, waiter))
    }

    /// Whether `id` is still pending (not answered, cancelled or expired).
    pub fn contains(&self, id: u64) -> bool {
        self.pending.contains_key(&id)
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none are in flight.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}
