//! What a bus's subscribers want, as other nodes need to know it.
//!
//! A node in a cluster forwards a message to another node only when that
//! node has a subscriber for it. Each node therefore keeps two things:
//!
//! - its **local interest**: the distinct (filter, queue group) pairs of its
//!   own subscriptions, counted so that a thousand subscribers to `orders.>`
//!   are one interest, with a numbered log of the changes so a route can send
//!   deltas and tell when it fell too far behind (then it sends the whole
//!   set again);
//! - the **remote interest** of every peer, in a trie of its own, so that a
//!   publish finds the peers that want a message as it finds local
//!   subscriptions, with the cost following the subject's depth.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::router::{Router, SubscriptionId};

/// The sending end of a route to another node.
#[cfg(feature = "remote")]
pub(crate) use crate::route::Outbound as Route;

/// Without the remote face there are no routes (they run over courier-rpc):
/// nothing of this type can exist, so no message is ever routed.
#[cfg(not(feature = "remote"))]
pub(crate) enum Route {}

#[cfg(not(feature = "remote"))]
impl Route {
    fn is_up(&self) -> bool {
        match *self {}
    }
}
use crate::subject::Filter;

/// Which node a remote interest belongs to.
pub type NodeId = u64;

/// One interest: a filter, and the queue group subscribed to it (if any).
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Interest {
    /// The filter, as subscribed.
    pub filter: String,
    /// The queue group, for group members.
    pub group: Option<String>,
}

impl Interest {
    /// A plain interest in `filter`.
    pub fn plain(filter: impl Into<String>) -> Interest {
        Interest {
            filter: filter.into(),
            group: None,
        }
    }

    /// A queue group's interest in `filter`.
    pub fn group(filter: impl Into<String>, group: impl Into<String>) -> Interest {
        Interest {
            filter: filter.into(),
            group: Some(group.into()),
        }
    }
}

/// A change to a node's local interest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The first subscription with this interest appeared.
    Added(Interest),
    /// The last one went.
    Removed(Interest),
}

/// Changes kept for routes that are behind. A route further behind than
/// this sends the whole set again, which costs no more than the changes.
pub const CHANGE_LOG: usize = 16_384;

/// A node's own interest: counted, versioned, with its recent changes.
#[derive(Debug, Default)]
pub(crate) struct LocalInterest {
    counts: HashMap<Interest, usize>,
    /// Changes ever made; the log holds the last `log.len()` of them.
    version: u64,
    log: VecDeque<Change>,
}

impl LocalInterest {
    pub(crate) fn add(&mut self, interest: Interest) {
        let count = self.counts.entry(interest.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.record(Change::Added(interest));
        }
    }

    pub(crate) fn remove(&mut self, interest: &Interest) {
        let Some(count) = self.counts.get_mut(interest) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.counts.remove(interest);
            self.record(Change::Removed(interest.clone()));
        }
    }

    fn record(&mut self, change: Change) {
        self.version += 1;
        if self.log.len() == CHANGE_LOG {
            self.log.pop_front();
        }
        self.log.push_back(change);
    }

    /// The version now and every interest.
    pub(crate) fn snapshot(&self) -> (u64, Vec<Interest>) {
        let mut all: Vec<Interest> = self.counts.keys().cloned().collect();
        all.sort();
        (self.version, all)
    }

    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// The changes after version `cursor`, at most `limit` of them, and the
    /// version they bring a reader to; `None` if they are no longer kept.
    pub(crate) fn since(&self, cursor: u64, limit: usize) -> Option<(u64, Vec<Change>)> {
        let oldest = self.version - self.log.len() as u64;
        if cursor < oldest || cursor > self.version {
            return None;
        }
        let skip = (cursor - oldest) as usize;
        let changes: Vec<Change> = self.log.iter().skip(skip).take(limit).cloned().collect();
        Some((cursor + changes.len() as u64, changes))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.len()
    }
}

/// A queue group as the bus keys it: (filter, group).
pub(crate) type GroupKey = (String, String);

#[derive(Debug)]
struct RemoteEntry {
    node: NodeId,
    group: Option<GroupKey>,
}

/// Every peer's interest, and where to send what matches it.
#[derive(Default)]
pub(crate) struct RemoteInterest {
    router: Router,
    entries: HashMap<SubscriptionId, RemoteEntry>,
    nodes: HashMap<NodeId, RemoteNode>,
    /// Per queue group held remotely: how many nodes hold it and whose
    /// turn is next. An entry lives as long as one node holds the group.
    turns: HashMap<GroupKey, GroupTurns>,
    next_id: SubscriptionId,
}

#[derive(Default)]
struct GroupTurns {
    holders: usize,
    next: AtomicUsize,
}

#[derive(Default)]
struct RemoteNode {
    route: Option<Arc<Route>>,
    ids: HashMap<Interest, SubscriptionId>,
    /// The route session from this node whose interest `ids` is (0: none).
    /// Kept here, under the same lock as `ids`, so a change from an older
    /// session arriving late never lands after a newer session began.
    session: u64,
}

/// Where one message goes beyond this node: each route, with the queue
/// groups it is to be given to one member of there.
pub(crate) type RemoteTargets = Vec<(Arc<Route>, Vec<GroupKey>)>;

impl RemoteInterest {
    /// Entries held over all nodes.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn set_route(&mut self, node: NodeId, route: Option<Arc<Route>>) {
        match route {
            Some(route) => self.nodes.entry(node).or_default().route = Some(route),
            None => {
                if let Some(entry) = self.nodes.get_mut(&node) {
                    entry.route = None;
                }
            }
        }
        self.prune(node);
    }

    /// Starts session `session` of `node`'s interest: what earlier
    /// sessions said is forgotten.
    pub(crate) fn open(&mut self, node: NodeId, session: u64) {
        self.clear(node);
        self.nodes.entry(node).or_default().session = session;
    }

    /// Forgets `node`'s interest and session.
    pub(crate) fn forget_node(&mut self, node: NodeId) {
        self.clear(node);
        if let Some(entry) = self.nodes.get_mut(&node) {
            entry.session = 0;
        }
        self.prune(node);
    }

    /// Adds `node`'s interest from session `session`; `Ok(false)` if it is
    /// not the node's current session, or the node already has `limit`
    /// interests (then it is not added).
    pub(crate) fn add(
        &mut self,
        node: NodeId,
        session: u64,
        interest: Interest,
        limit: usize,
    ) -> Result<bool, crate::SubjectError> {
        let filter = Filter::new(&interest.filter)?;
        if let Some(group) = &interest.group {
            crate::subject::check_group(group)?;
        }
        let Some(entry) = self.nodes.get_mut(&node).filter(|n| n.session == session) else {
            return Ok(false);
        };
        if entry.ids.contains_key(&interest) {
            return Ok(true);
        }
        if entry.ids.len() >= limit {
            return Ok(false);
        }
        let id = self.next_id;
        self.next_id += 1;
        let group = interest
            .group
            .clone()
            .map(|group| (interest.filter.clone(), group));
        if let Some(key) = &group {
            self.turns.entry(key.clone()).or_default().holders += 1;
        }
        entry.ids.insert(interest, id);
        self.router.insert(&filter, id);
        self.entries.insert(id, RemoteEntry { node, group });
        Ok(true)
    }

    /// Removes `node`'s interest, if `session` is its current session.
    pub(crate) fn remove(&mut self, node: NodeId, session: u64, interest: &Interest) {
        let Some(id) = self
            .nodes
            .get_mut(&node)
            .filter(|n| n.session == session)
            .and_then(|n| n.ids.remove(interest))
        else {
            return;
        };
        self.forget(id, &interest.filter);
        self.prune(node);
    }

    /// Forgets everything `node` said it wants.
    fn clear(&mut self, node: NodeId) {
        let Some(entry) = self.nodes.get_mut(&node) else {
            return;
        };
        let ids = std::mem::take(&mut entry.ids);
        for (interest, id) in ids {
            self.forget(id, &interest.filter);
        }
        self.prune(node);
    }

    fn forget(&mut self, id: SubscriptionId, filter: &str) {
        if let Ok(filter) = Filter::new(filter) {
            self.router.remove(&filter, id);
        }
        if let Some(RemoteEntry {
            group: Some(key), ..
        }) = self.entries.remove(&id)
        {
            if let Some(turn) = self.turns.get_mut(&key) {
                turn.holders -= 1;
                if turn.holders == 0 {
                    self.turns.remove(&key);
                }
            }
        }
    }

    /// Drops a node's entry once it has no interest, no route and no
    /// session.
    fn prune(&mut self, node: NodeId) {
        if self
            .nodes
            .get(&node)
            .is_some_and(|n| n.ids.is_empty() && n.route.is_none() && n.session == 0)
        {
            self.nodes.remove(&node);
        }
    }

    /// `node`'s interest, sorted.
    pub(crate) fn of(&self, node: NodeId) -> Vec<Interest> {
        let mut all: Vec<Interest> = self
            .nodes
            .get(&node)
            .map(|n| n.ids.keys().cloned().collect())
            .unwrap_or_default();
        all.sort();
        all
    }

    pub(crate) fn count_of(&self, node: NodeId) -> usize {
        self.nodes.get(&node).map_or(0, |n| n.ids.len())
    }

    /// The routes a message on `subject` goes to: every node with a plain
    /// interest in it, and, for each queue group that matches and has no
    /// member here (`local_group` says), one node holding it, in turn.
    /// Returns whether a queue group took part (the next message may go
    /// elsewhere).
    pub(crate) fn targets(
        &self,
        subject: &crate::Subject,
        local_group: impl Fn(&GroupKey) -> bool,
        out: &mut RemoteTargets,
    ) -> bool {
        let mut ids = Vec::new();
        self.router.matches(subject, &mut ids);
        if ids.is_empty() {
            return false;
        }
        let mut plain: Vec<NodeId> = Vec::new();
        let mut groups: BTreeMap<&GroupKey, Vec<NodeId>> = BTreeMap::new();
        for id in ids {
            let Some(entry) = self.entries.get(&id) else {
                continue;
            };
            match &entry.group {
                None => plain.push(entry.node),
                Some(key) => groups.entry(key).or_default().push(entry.node),
            }
        }
        let grouped = !groups.is_empty();
        let mut chosen: BTreeMap<NodeId, Vec<GroupKey>> = BTreeMap::new();
        for node in plain {
            chosen.entry(node).or_default();
        }
        for (key, mut nodes) in groups {
            if local_group(key) {
                continue;
            }
            nodes.sort_unstable();
            nodes.dedup();
            // A holder whose route is down (or not there yet) would only
            // drop the message: the turn goes round the others, unless none
            // is up (then the drop is counted on the route chosen).
            let up: Vec<NodeId> = nodes
                .iter()
                .copied()
                .filter(|node| {
                    self.nodes
                        .get(node)
                        .and_then(|n| n.route.as_ref())
                        .is_some_and(|r| r.is_up())
                })
                .collect();
            if !up.is_empty() {
                nodes = up;
            }
            let turn = self.turns.get(key).map_or(0, |t| {
                t.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            });
            let node = nodes[turn % nodes.len()];
            chosen.entry(node).or_default().push(key.clone());
        }
        for (node, groups) in chosen {
            if let Some(route) = self.nodes.get(&node).and_then(|n| n.route.clone()) {
                out.push((route, groups));
            }
        }
        grouped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_interest_counts_subscribers_and_logs_only_first_and_last() {
        let mut local = LocalInterest::default();
        let orders = Interest::plain("orders.>");
        local.add(orders.clone());
        local.add(orders.clone());
        local.add(Interest::group("svc", "workers"));
        assert_eq!(local.len(), 2);
        local.remove(&orders);
        assert_eq!(local.version(), 2, "a second subscriber is no change");
        local.remove(&orders);
        let (version, changes) = local.since(0, 100).unwrap();
        assert_eq!(version, 3);
        assert_eq!(
            changes,
            vec![
                Change::Added(orders.clone()),
                Change::Added(Interest::group("svc", "workers")),
                Change::Removed(orders),
            ]
        );
        assert_eq!(local.since(1, 1).unwrap().1.len(), 1);
        assert!(local.since(4, 10).is_none(), "a cursor from the future");
    }

    #[test]
    fn a_reader_too_far_behind_is_told_to_start_again() {
        let mut local = LocalInterest::default();
        for i in 0..CHANGE_LOG + 10 {
            local.add(Interest::plain(format!("s.{i}")));
        }
        assert!(local.since(0, 10).is_none());
        assert!(local.since(10, 10).is_some());
        let (version, all) = local.snapshot();
        assert_eq!(
            (version as usize, all.len()),
            (CHANGE_LOG + 10, CHANGE_LOG + 10)
        );
    }

    #[test]
    fn remote_interest_is_bounded_per_node_and_kept_per_session() {
        let mut remote = RemoteInterest::default();
        remote.open(1, 11);
        remote.open(2, 22);
        assert!(remote.add(1, 11, Interest::plain("a.>"), 2).unwrap());
        assert!(
            remote.add(1, 11, Interest::plain("a.>"), 2).unwrap(),
            "repeats are free"
        );
        assert!(remote.add(1, 11, Interest::group("b", "g"), 2).unwrap());
        assert!(!remote.add(1, 11, Interest::plain("c"), 2).unwrap());
        assert!(remote.add(2, 22, Interest::group("b", "g"), 2).unwrap());
        assert!(remote
            .add(1, 11, Interest::plain("bad..subject"), 2)
            .is_err());
        assert!(remote
            .add(2, 22, Interest::group("b", "bad group"), 2)
            .is_err());
        assert_eq!((remote.count_of(1), remote.len()), (2, 3));
        remote.open(1, 12);
        assert_eq!(
            (remote.count_of(1), remote.len(), remote.turns.len()),
            (0, 1, 1)
        );
        // A late change of the old session lands nowhere.
        assert!(!remote.add(1, 11, Interest::plain("late"), 2).unwrap());
        remote.remove(2, 21, &Interest::group("b", "g"));
        assert_eq!(remote.count_of(2), 1, "not the current session");
        remote.remove(2, 22, &Interest::group("b", "g"));
        remote.forget_node(1);
        remote.forget_node(2);
        assert_eq!(
            (remote.len(), remote.turns.len(), remote.nodes.len()),
            (0, 0, 0)
        );
        assert!(remote.router.is_empty());
        assert!(
            !remote.add(3, 0, Interest::plain("x"), 2).unwrap(),
            "no session opened"
        );
        assert!(remote.nodes.is_empty());
    }
}
