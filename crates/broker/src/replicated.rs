//! Replicated queues on a cluster member.
//!
//! A queue whose name matches `[cluster] replicated_queues` is not kept in
//! this broker's data directory: it is a Raft group of its own
//! (courier-cluster's [`QueueGroup`]) on `queue_replicas` members, placed
//! by the metadata leader where the fewest queues are held. Clients speak
//! the ordinary queue protocol to **any** member:
//!
//! - an operation is served where the queue's leader is. A member that is
//!   not the leader forwards it over [`ReplicaQueue`], the members' own
//!   protocol (only peers may call it under `[auth]`); the receiving
//!   member serves it only if it leads, and never forwards again, so a
//!   call takes at most one hop;
//! - a consumer's stream outlives failovers: when the leader goes, the
//!   member serving the stream finds the new one and attaches there. What
//!   the consumer held on the old leader is given out again by the new one
//!   with its delivery counted (answers to it are `UnknownDelivery`);
//! - an enqueue is answered once committed on a majority of the replicas
//!   (each fsynced its log first). One that fails as retryable after it
//!   was sent may or may not be stored: send it again with the same
//!   idempotency key and the queue answers `Duplicate` instead of storing
//!   it twice.
//!
//! The queue is declared (placed) on first use, as a local queue is
//! created on first use; `<queue>.dlq` names its dead letters, which are
//! part of the same group. A purge is a command in the group's log
//! (answered once committed); a peek reads the leader's applied state. A
//! replicated queue takes the broker's queue settings (per-queue options
//! in a declaration must match them).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_cluster::network::{Peers, RaftHost};
use courier_cluster::node::{ClusterError, ClusterNode, Timing};
use courier_cluster::queue_group::{QueueGroup, QueueGroupConfig, QueueGroupError};
use courier_cluster::queue_state::{
    Action, Answer, EnqueueOutcome, GroupDelivery, Part, QueueSettings, MAX_PREFETCH,
};
use courier_cluster::types::{queue_group_id, NodeId};
use courier_queue::core::{ConsumerId, MessageId, QueueStats};
use courier_queue::remote::{
    RemoteError, WireAnswer, WireDelivery, DELIVERIES_PER_ITEM, DELIVERY_BYTES_PER_ITEM,
};
use courier_queue::{Enqueued, Message, Peeked, QueueDeclaration};
use courier_rpc::{ClientConfig, Items};

/// Tokens of deliveries from replicated queues have this bit set; a local
/// queue's tokens count up from 1 and never reach it.
pub(crate) const REPLICATED_TOKEN: u64 = 1 << 63;

/// Deliveries waiting for an answer one member remembers at most; past
/// this the oldest are forgotten (answering one is `UnknownDelivery`; its
/// lease gives it to someone else).
const MAX_TOKENS: usize = 1 << 20;

/// The suffix naming a queue's dead letters.
const DLQ_SUFFIX: &str = ".dlq";

/// The shortest wait between two tries at routing one operation.
const RETRY_FLOOR: Duration = Duration::from_millis(2);

/// Why a member would not serve a forwarded operation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// This member does not lead the queue's group (or the metadata
    /// group, for a placement); nothing was done. `address`: the leader
    /// it knows of.
    #[error("not the leader{}", address.as_deref().map(|a| format!(" (try {a})")).unwrap_or_default())]
    NotLeader {
        /// Where the leader is, if known.
        address: Option<String>,
    },
    /// This member holds no replica of the queue; nothing was done.
    #[error("no replica of the queue here")]
    NotHere,
    /// The queue answered this.
    #[error(transparent)]
    Queue(#[from] RemoteError),
}

/// What members ask each other about replicated queues: each call is
/// served only by a member that can serve it itself (it leads the group,
/// or the metadata group for [`ReplicaQueue::place`]).
#[courier_rpc::service]
pub trait ReplicaQueue {
    /// Declares where `queue` lives (on the metadata leader); its replicas.
    async fn place(&self, queue: String) -> Result<Vec<NodeId>, ReplicaError>;
    /// Stores messages in the queue; one outcome each, once committed.
    async fn enqueue(
        &self,
        queue: String,
        messages: Vec<Message>,
    ) -> Result<Vec<Enqueued>, ReplicaError>;
    /// Deliveries for one consumer (of the dead letters if
    /// `dead_letters`), under its `prefetch`, until the member stops
    /// leading (the stream's last item is then `NotLeader`).
    async fn consume(
        &self,
        queue: String,
        dead_letters: bool,
        prefetch: u32,
        items: Items<Result<Vec<WireDelivery>, ReplicaError>>,
    );
    /// Answers deliveries this member gave out; one outcome each.
    async fn answer(
        &self,
        answers: Vec<WireAnswer>,
    ) -> Result<Vec<Result<(), RemoteError>>, ReplicaError>;
    /// Extends the lease of a delivery this member gave out.
    async fn extend(&self, token: u64, by_ms: u64) -> Result<(), ReplicaError>;
    /// The queue's (or its dead letters') counters.
    async fn stats(&self, queue: String, dead_letters: bool) -> Result<QueueStats, ReplicaError>;
    /// From the queue's leader in `term`: it has removed this member from
    /// the queue's group, so this member stops its replica and drops its
    /// data. A member taken out of the group never hears that from Raft
    /// itself (the leader stops replicating to it), hence this call.
    async fn retire(&self, queue: String, term: u64) -> Result<(), ReplicaError>;
    /// Removes every message not leased to a consumer from the queue (or
    /// its dead letters), once committed; how many.
    async fn purge(&self, queue: String, dead_letters: bool) -> Result<u64, ReplicaError>;
    /// The next `count` ready messages of the queue (or its dead letters),
    /// at most `MAX_PEEK` and `PEEK_BYTES`, changing nothing.
    async fn peek(
        &self,
        queue: String,
        dead_letters: bool,
        count: u32,
    ) -> Result<Vec<Peeked>, ReplicaError>;
}

/// How this member hosts replicated queues (from `[cluster]`).
#[derive(Clone, Debug)]
pub(crate) struct ReplicatedConfig {
    pub patterns: Vec<String>,
    pub replicas: usize,
    pub max_queues: usize,
    pub settings: QueueSettings,
    pub timing: Timing,
    pub snapshot_after: u64,
    pub max_message: usize,
    pub dir: PathBuf,
    /// The node's shared log for the groups' entries, if it has one.
    pub wal: Option<courier_cluster::wal::NodeWal>,
    /// Whether a group created here from now on goes into `wal` (one
    /// created before keeps the kind of log it has).
    pub new_queues_share_log: bool,
}

/// Whether `name` matches one of `patterns`: a name, or a prefix ending in
/// `*` (`orders.*`, or `*` for every queue).
/// Whether `patterns` make `queue` (or the queue whose dead letters it
/// names) a replicated queue. A durable subscription's queue never is,
/// whatever the patterns: the broker hosting the subscription stores what
/// is published to it in its own queue set, so a replicated group of that
/// name would stay empty while its consumers waited on it.
pub(crate) fn replicates(patterns: &[String], queue: &str) -> bool {
    let (base, _) = split(queue);
    !base.starts_with(courier_pubsub::durable::QUEUE_PREFIX) && matches(patterns, base)
}

pub(crate) fn matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

/// A delivery waiting for its answer, by this member's token.
#[derive(Clone, Debug)]
enum Held {
    /// Given out by this member, the group's leader.
    Local {
        queue: String,
        consumer: ConsumerId,
        id: MessageId,
        delivery: u32,
    },
    /// Relayed from the leader at `address`, where it is `token`.
    Forwarded { address: String, token: u64 },
}

struct Entry {
    held: Held,
    owner: Option<Arc<str>>,
    stream: u64,
}

#[derive(Default)]
struct Tokens {
    held: BTreeMap<u64, Entry>,
    by_stream: HashMap<u64, BTreeSet<u64>>,
}

impl Tokens {
    /// Remembers `token`. Past `per_stream` for its stream (deliveries
    /// whose leases ran out are never answered, and the consumer is given
    /// more), or past [`MAX_TOKENS`] in all, the oldest go first.
    fn insert(&mut self, token: u64, entry: Entry, per_stream: usize) {
        let stream = self.by_stream.entry(entry.stream).or_default();
        while stream.len() >= per_stream.max(1) {
            match stream.pop_first() {
                Some(old) => {
                    self.held.remove(&old);
                }
                None => break,
            }
        }
        if self.held.len() >= MAX_TOKENS {
            if let Some((old, entry)) = self.held.pop_first() {
                self.unlink(old, entry.stream);
            }
        }
        self.restore(token, entry);
    }

    /// Puts back what [`Tokens::take`] took, for an answer that never
    /// reached the queue (so the client may answer again).
    fn restore(&mut self, token: u64, entry: Entry) {
        self.by_stream
            .entry(entry.stream)
            .or_default()
            .insert(token);
        self.held.insert(token, entry);
    }

    fn unlink(&mut self, token: u64, stream: u64) {
        if let Some(tokens) = self.by_stream.get_mut(&stream) {
            tokens.remove(&token);
            if tokens.is_empty() {
                self.by_stream.remove(&stream);
            }
        }
    }

    fn get(&self, token: u64, who: &Option<Arc<str>>) -> Option<Held> {
        self.held
            .get(&token)
            .filter(|e| e.owner == *who)
            .map(|e| e.held.clone())
    }

    fn take(&mut self, token: u64, who: &Option<Arc<str>>) -> Option<Entry> {
        self.get(token, who)?;
        let entry = self.held.remove(&token)?;
        self.unlink(token, entry.stream);
        Some(entry)
    }

    fn forget_stream(&mut self, stream: u64) {
        for token in self.by_stream.remove(&stream).unwrap_or_default() {
            self.held.remove(&token);
        }
    }
}

/// Forgets a consumer stream's tokens when it ends.
struct StreamGuard {
    tokens: Arc<Mutex<Tokens>>,
    stream: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        lock(&self.tokens).forget_stream(self.stream);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Where an operation on a queue goes.
enum Target {
    /// This member leads the queue's group.
    Local(Arc<QueueGroup>),
    /// The member at this address is believed to.
    Remote(String, ReplicaQueueClient),
}

/// Why serving a consumer stopped.
enum Stop {
    /// The stream's client went away.
    Closed,
    /// The leader changed or could not be reached: find it again.
    Reroute,
    /// The queue refused; the stream ends with this.
    Failed(RemoteError),
}

/// Where a consumer's deliveries go.
pub(crate) trait DeliverySink: Send + Sync {
    /// Sends a group of deliveries; whether to go on.
    fn send(&self, group: Vec<WireDelivery>) -> impl std::future::Future<Output = bool> + Send;
    /// Ends the stream with this error.
    fn fail(&self, err: RemoteError) -> impl std::future::Future<Output = ()> + Send;
}

/// A member's replicated queues: the replicas it holds and the way to the
/// others (see the [module docs](self)).
pub(crate) struct Replicated {
    node: Arc<ClusterNode>,
    id: NodeId,
    peers: Peers,
    raft_host: RaftHost,
    config: ReplicatedConfig,
    client_config: ClientConfig,
    /// The replicas held here, by queue name.
    groups: Mutex<HashMap<String, Arc<QueueGroup>>>,
    /// Starting groups one at a time, so none starts twice; `true` once
    /// shut down, so none starts after.
    starting: tokio::sync::Mutex<bool>,
    /// Where each queue's leader was last seen (declared queues only).
    hints: Mutex<HashMap<String, String>>,
    /// Clients of the other members, by address (members only).
    clients: Mutex<HashMap<String, ReplicaQueueClient>>,
    tokens: Arc<Mutex<Tokens>>,
    next_token: AtomicU64,
    next_stream: AtomicU64,
    /// Where a member holding no replica starts asking the replicas, in
    /// turn, so that one unreachable replica does not stall every call.
    next_replica: AtomicUsize,
    /// Queues whose group membership this member, as their leader, is
    /// changing now (one change at a time per queue).
    changing: Arc<Mutex<HashSet<String>>>,
    /// Replicas held here that are no longer declared here, since when:
    /// each keeps running until its group's membership leaves it out (its
    /// vote may be needed to change that membership), or for
    /// [`Replicated::retire_after`] at most.
    retiring: Mutex<HashMap<String, Instant>>,
    /// Replicas stopped on their group's word ([`ReplicaQueue::retire`]),
    /// with the replicas declared here at the time: not started again
    /// while this member's (perhaps stale) view of the declaration is
    /// still that. At most one per queue declared here.
    retired: Mutex<HashMap<String, Vec<NodeId>>>,
}

impl std::fmt::Debug for Replicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicated")
            .field("node", &self.id)
            .field("patterns", &self.config.patterns)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: impl std::fmt::Display) -> RemoteError {
    RemoteError::Queue {
        reason: format!("replicated queue unavailable: {what}"),
        retryable: true,
    }
}

fn group_error(err: QueueGroupError) -> RemoteError {
    match err {
        QueueGroupError::Refused(why) => RemoteError::Invalid(why),
        QueueGroupError::Cluster(e) => unavailable(e),
        other => unavailable(other),
    }
}

fn split(queue: &str) -> (&str, Part) {
    match queue.strip_suffix(DLQ_SUFFIX) {
        Some(base) if !base.is_empty() => (base, Part::DeadLetters),
        _ => (queue, Part::Main),
    }
}

fn enqueued(outcomes: Vec<EnqueueOutcome>) -> Result<Vec<Enqueued>, RemoteError> {
    outcomes
        .into_iter()
        .map(|outcome| match outcome {
            EnqueueOutcome::Stored(id) => Ok(Enqueued::Stored(id)),
            EnqueueOutcome::Duplicate(id) => Ok(Enqueued::Duplicate(id)),
            EnqueueOutcome::Full => Err(RemoteError::Queue {
                reason: "the queue is full".into(),
                retryable: true,
            }),
            EnqueueOutcome::Invalid(why) => Err(RemoteError::Invalid(why)),
        })
        .collect()
}

/// Tokens one consumer stream keeps at most: what it may hold at once,
/// twice over (its leases may run out and more come), and some room.
fn per_stream(prefetch: u32) -> usize {
    2 * prefetch.clamp(1, MAX_PREFETCH) as usize + 64
}

/// Replica changes the metadata leader proposes per round of
/// [`Replicated::converge`] (one round a second, or per metadata change).
const MAX_REPLANS_PER_ROUND: usize = 16;

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((20u64 << attempt.min(5)).min(500))
}

impl Replicated {
    pub(crate) fn new(
        node: Arc<ClusterNode>,
        peers: Peers,
        raft_host: RaftHost,
        config: ReplicatedConfig,
        client_config: ClientConfig,
    ) -> Arc<Replicated> {
        Arc::new(Replicated {
            id: node.id(),
            node,
            peers,
            raft_host,
            config,
            client_config,
            groups: Mutex::default(),
            starting: tokio::sync::Mutex::new(false),
            hints: Mutex::default(),
            clients: Mutex::default(),
            tokens: Arc::default(),
            next_token: AtomicU64::new(1),
            next_stream: AtomicU64::new(1),
            next_replica: AtomicUsize::new(0),
            changing: Arc::default(),
            retiring: Mutex::default(),
            retired: Mutex::default(),
        })
    }

    /// Whether `queue` (or the queue whose dead letters it names) is a
    /// replicated queue.
    pub(crate) fn handles(&self, queue: &str) -> bool {
        replicates(&self.config.patterns, queue)
    }

    /// How long an operation looks for a leader before it gives up: a few
    /// elections.
    fn patience(&self) -> Duration {
        Duration::from_millis(self.config.timing.election_max_ms * 4 + 2_000)
    }

    /// How long a replica no longer declared here keeps running while its
    /// group's leader changes the membership without it: long enough for
    /// a new replica to catch up.
    fn retire_after(&self) -> Duration {
        self.patience() * 6
    }

    fn local(&self, name: &str) -> Option<Arc<QueueGroup>> {
        lock(&self.groups).get(name).cloned()
    }

    fn client(&self, address: &str) -> Result<ReplicaQueueClient, RemoteError> {
        let mut clients = lock(&self.clients);
        if let Some(client) = clients.get(address) {
            return Ok(client.clone());
        }
        let parsed: courier_transport::Address = address
            .parse()
            .map_err(|e| unavailable(format!("member address {address}: {e}")))?;
        let client = ReplicaQueueClient::new(courier_rpc::Client::lazy(
            &parsed,
            self.client_config.clone(),
        ));
        // Only members' addresses come here; forget those that left.
        let members: HashSet<String> = self.node.member_addresses().into_values().collect();
        clients.retain(|a, _| members.contains(a));
        clients.insert(address.to_owned(), client.clone());
        Ok(client)
    }

    fn hint(&self, name: &str, address: Option<String>) {
        let mut hints = lock(&self.hints);
        match address {
            Some(address) => {
                hints.insert(name.to_owned(), address);
            }
            None => {
                hints.remove(name);
            }
        }
    }

    /// The queue's replicas, declaring it (through the metadata leader) if
    /// it is new.
    async fn placement(&self, name: &str, declare: bool) -> Result<Vec<NodeId>, RemoteError> {
        if let Some(replicas) = self.node.declared_queue(name) {
            return Ok(replicas);
        }
        if !declare {
            return Err(RemoteError::NotFound(name.to_owned()));
        }
        let deadline = Instant::now() + self.patience();
        let mut attempt = 0;
        loop {
            let outcome = match self.node.leader() {
                Some((leader, _)) if leader == self.id => self.place_here(name).await,
                Some((_, address)) => match self.client(&address)?.place(name.to_owned()).await {
                    Ok(answer) => answer,
                    Err(e) => Err(ReplicaError::Queue(unavailable(e))),
                },
                None => Err(ReplicaError::NotLeader { address: None }),
            };
            match outcome {
                Ok(replicas) => {
                    self.reconcile().await;
                    return Ok(replicas);
                }
                Err(ReplicaError::Queue(RemoteError::Queue {
                    retryable: false,
                    reason,
                })) => return Err(RemoteError::Invalid(reason)),
                Err(ReplicaError::Queue(e @ RemoteError::Invalid(_))) => return Err(e),
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(unavailable(format!("declaring {name}: {e}")));
                    }
                }
            }
            attempt += 1;
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// On the metadata leader: places a new queue.
    async fn place_here(&self, name: &str) -> Result<Vec<NodeId>, ReplicaError> {
        if !self.handles(name) || name.ends_with(DLQ_SUFFIX) {
            return Err(
                RemoteError::Invalid(format!("{name} is not a replicated queue here")).into(),
            );
        }
        if let Some(replicas) = self.node.declared_queue(name) {
            return Ok(replicas);
        }
        if self.node.declared_queues().len() >= self.config.max_queues {
            return Err(RemoteError::Invalid(format!(
                "too many replicated queues: at most {} (max_replicated_queues)",
                self.config.max_queues
            ))
            .into());
        }
        match self.node.declare_queue(name, self.config.replicas).await {
            Ok(replicas) => Ok(replicas),
            Err(ClusterError::NotLeader { address, .. }) => {
                Err(ReplicaError::NotLeader { address })
            }
            Err(ClusterError::Kv(e)) => Err(RemoteError::Invalid(e.to_string()).into()),
            Err(e) => Err(unavailable(e).into()),
        }
    }

    /// Starts a replica of every declared queue this member holds and has
    /// not started yet (joining, not founding, a group it took over);
    /// [`Replicated::stop_undeclared`] stops those it no longer holds.
    pub(crate) async fn reconcile(&self) {
        let closed = self.starting.lock().await;
        if *closed {
            return;
        }
        let members = self.node.member_addresses();
        let declared = self.node.declared_queues();
        if !members.contains_key(&self.id) {
            return;
        }
        lock(&self.retired).retain(|name, at| declared.get(name) == Some(at));
        for (name, replicas) in declared {
            if !replicas.contains(&self.id)
                || lock(&self.groups).contains_key(&name)
                || lock(&self.retired).contains_key(&name)
            {
                continue;
            }
            let addresses: BTreeMap<NodeId, String> = replicas
                .iter()
                .filter_map(|id| members.get(id).map(|a| (*id, a.clone())))
                .collect();
            if addresses.len() != replicas.len() {
                tracing::warn!(queue = %name, ?replicas, "a replica is not a member; not starting");
                continue;
            }
            let group = queue_group_id(&name);
            let dir = self.config.dir.join(format!("{group:08x}"));
            let wal = self.config.wal.clone().filter(|_| {
                self.config.new_queues_share_log || courier_cluster::storage::in_node_wal(&dir)
            });
            let config = QueueGroupConfig::new(self.id, group, name.clone(), addresses, dir)
                .with_settings(self.config.settings.clone())
                .with_timing(self.config.timing)
                .with_snapshot_after(self.config.snapshot_after)
                .with_max_message(self.config.max_message)
                .with_wal(wal)
                .founded_by(replicas[0])
                .joining(self.node.joined_queue(&name));
            match QueueGroup::start(config, self.peers.network(group)).await {
                Ok(started) => {
                    self.raft_host.insert(group, started.raft().clone());
                    tracing::info!(queue = %name, group, "replica started");
                    lock(&self.groups).insert(name, Arc::new(started));
                }
                Err(e) => tracing::warn!(queue = %name, group, "replica did not start: {e}"),
            }
        }
    }

    /// Stops the replicas held here that are no longer declared here (moved
    /// to another member, or this one left the cluster): each once its
    /// group's membership leaves it out, or after `retire_after`. Only from
    /// `follow_declarations`, never from a call a client could cancel
    /// between taking a group out and stopping it.
    async fn stop_undeclared(&self) {
        let closed = self.starting.lock().await;
        if *closed {
            return;
        }
        let members = self.node.member_addresses();
        let declared = self.node.declared_queues();
        let leaving: Vec<(String, Arc<QueueGroup>)> = {
            let mut groups = lock(&self.groups);
            let mut retiring = lock(&self.retiring);
            let held = |name: &String| {
                members.contains_key(&self.id)
                    && declared.get(name).is_some_and(|r| r.contains(&self.id))
            };
            retiring.retain(|name, _| groups.contains_key(name) && !held(name));
            let gone: Vec<String> = groups
                .iter()
                .filter(|(name, group)| {
                    if held(name) {
                        return false;
                    }
                    let since = *retiring.entry((*name).clone()).or_insert_with(Instant::now);
                    !group.members().contains(&self.id) || since.elapsed() >= self.retire_after()
                })
                .map(|(name, _)| name.clone())
                .collect();
            gone.into_iter()
                .filter_map(|name| {
                    retiring.remove(&name);
                    groups.remove(&name).map(|g| (name, g))
                })
                .collect()
        };
        for (name, group) in leaving {
            // Only a replica moved away gives up its data: a member that
            // merely left may be added back, and then serves what it had.
            self.stop_group(&name, &group, members.contains_key(&self.id))
                .await;
        }
    }

    /// Stops a replica held here (already taken out of `groups`), and
    /// removes its data if `remove_data`.
    async fn stop_group(&self, name: &str, group: &QueueGroup, remove_data: bool) {
        self.raft_host.remove(group.group());
        group.shutdown().await;
        if remove_data {
            // Its entries leave the node's log. Should that fail, a group
            // of the same id created here later still never sees them: it
            // finds no `in-node-wal` file in its fresh directory, and
            // forgets them itself before it opens.
            if let Some(wal) = &self.config.wal {
                if let Err(e) = wal.forget(group.group()).await {
                    tracing::warn!(queue = %name, "cannot drop a moved replica's entries from the node log: {e}");
                }
            }
            let dir = self.config.dir.join(format!("{:08x}", group.group()));
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(queue = %name, dir = %dir.display(), "cannot remove a moved replica's data: {e}");
            }
        }
        tracing::info!(queue = %name, "replica stopped: no longer held here");
    }

    /// Told by the leader of `name`'s group in `term` that this member is
    /// out of the group: stops the replica unless this member has seen a
    /// later term, or leads the group itself.
    async fn retire(&self, name: &str, term: u64) -> Result<(), ReplicaError> {
        let _starting = self.starting.lock().await;
        let group = {
            let mut groups = lock(&self.groups);
            let Some(group) = groups.get(name) else {
                return Ok(());
            };
            let status = group.status();
            if status.term > term || status.leader == Some(self.id) {
                return Err(ReplicaError::Queue(RemoteError::Invalid(format!(
                    "{name}: this member is in term {} (its leader {:?}), not out of the group in term {term}",
                    status.term, status.leader
                ))));
            }
            lock(&self.retiring).remove(name);
            if let Some(declared) = self.node.declared_queue(name) {
                lock(&self.retired).insert(name.to_owned(), declared);
            }
            groups.remove(name)
        };
        if let Some(group) = group {
            self.stop_group(name, &group, true).await;
        }
        Ok(())
    }

    /// Hands replicas on from members that left, and brings the groups
    /// led here to their declared replicas:
    /// - on the metadata leader, every replica held by a node that is no
    ///   longer a voter of the cluster is moved to a voter that holds none
    ///   of that queue, or dropped if there is none; a queue with fewer
    ///   replicas than `queue_replicas` grows when a voter is free
    ///   ([`ClusterNode::queue_plans`]);
    /// - on a queue's leader, a group whose members differ from its
    ///   declaration adds the new replicas and removes the old, through
    ///   openraft's membership changes (never by copying files), in a task
    ///   of its own so one slow replica holds up no other queue.
    async fn converge(self: &Arc<Self>) {
        if self
            .node
            .leader()
            .is_some_and(|(leader, _)| leader == self.id)
        {
            // A few per round (a second at most), so a node leaving a
            // cluster of many queues does not start every catch-up at once.
            let plans = self
                .node
                .queue_plans(self.config.replicas, MAX_REPLANS_PER_ROUND);
            for (name, from, to) in plans {
                match self.node.change_queue_replicas(&name, from, to).await {
                    Ok(replicas) => tracing::info!(queue = %name, ?replicas, "replicas changed"),
                    Err(e) => {
                        tracing::warn!(queue = %name, "cannot change the replicas yet: {e}");
                        break;
                    }
                }
            }
        }
        let members = self.node.member_addresses();
        let groups: Vec<(String, Arc<QueueGroup>)> = lock(&self.groups)
            .iter()
            .map(|(n, g)| (n.clone(), g.clone()))
            .collect();
        for (name, group) in groups {
            let Some(replicas) = self.node.declared_queue(&name) else {
                continue;
            };
            let wanted: BTreeSet<NodeId> = replicas.iter().copied().collect();
            if group.leading().is_err() || group.has_replicas(&wanted) {
                continue;
            }
            let addresses: BTreeMap<NodeId, String> = replicas
                .iter()
                .filter_map(|id| members.get(id).map(|a| (*id, a.clone())))
                .collect();
            if addresses.len() != replicas.len() || !lock(&self.changing).insert(name.clone()) {
                continue;
            }
            let changing = self.changing.clone();
            let catch_up = self.patience() * 4;
            let this = self.clone();
            tokio::spawn(async move {
                let before = group.member_addresses();
                match group.change_replicas(&addresses, catch_up).await {
                    Ok(()) => {
                        tracing::info!(queue = %name, replicas = ?wanted, "group membership changed");
                        let term = group.status().term;
                        for (id, address) in before {
                            if !wanted.contains(&id) {
                                this.tell_retired(&name, id, &address, term).await;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(queue = %name, "group membership not changed yet: {e}")
                    }
                }
                lock(&changing).remove(&name);
            });
        }
    }

    /// Keeps the replicas held here to the declarations, as they apply:
    /// again whenever the metadata group applies an entry or its
    /// membership changes (not on every heartbeat's metrics), and once a
    /// second in case a start failed.
    pub(crate) async fn follow_declarations(self: Arc<Self>) {
        let mut metrics = self.node.raft().metrics();
        // Created once: openraft sends metrics on every heartbeat, which
        // would put off a sleep made afresh each time round.
        let mut every_second = tokio::time::interval(Duration::from_secs(1));
        every_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = None;
        loop {
            let now = {
                let m = metrics.borrow_and_update();
                (m.last_applied, *m.membership_config.log_id())
            };
            if last.as_ref() != Some(&now) {
                self.stop_undeclared().await;
                self.reconcile().await;
                self.converge().await;
                last = Some(now);
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = every_second.tick() => last = None,
            }
        }
    }

    /// Tells member `id` at `address` that the group of `name` let it go in
    /// `term`; a few tries, then it is left to find out (its replica, out
    /// of date, can never win an election in the group).
    async fn tell_retired(&self, name: &str, id: NodeId, address: &str, term: u64) {
        let Ok(parsed) = address.parse::<courier_transport::Address>() else {
            return;
        };
        // Not through `client`: the member may have left the cluster.
        let client = ReplicaQueueClient::new(courier_rpc::Client::lazy(
            &parsed,
            self.client_config.clone(),
        ));
        for attempt in 0..5 {
            match client.retire(name.to_owned(), term).await {
                Ok(Ok(())) => {
                    tracing::info!(queue = %name, node = id, "told a removed replica to stop");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(queue = %name, node = id, "a removed replica refused to stop: {e}");
                    return;
                }
                Err(_) => tokio::time::sleep(backoff(attempt + 4)).await,
            }
        }
    }

    /// Waits before the next try at routing `name`: `patience` at most,
    /// less once its replica here (if it has one) sees a change that may
    /// give it a leader, so an operation waiting out an election or a new
    /// queue's founding goes on as soon as it can, not at its next backoff
    /// tick (up to 500 ms later).
    async fn before_rerouting(&self, name: &str, patience: Duration) {
        match self.local(name) {
            Some(group) => {
                // Not sooner than `RETRY_FLOOR`: a busy group applies
                // entries all the time, and a route failing for another
                // reason (a leader it cannot reach) must not retry at
                // that rate.
                let floor = tokio::time::sleep(patience.min(RETRY_FLOOR));
                group.changed(patience).await;
                floor.await;
            }
            None => tokio::time::sleep(patience).await,
        }
    }

    /// Where to send an operation on `name` now (its `attempt`th try).
    async fn route(
        &self,
        name: &str,
        declare: bool,
        attempt: u32,
    ) -> Result<Option<Target>, RemoteError> {
        let replicas = self.placement(name, declare).await?;
        if let Some(group) = self.local(name) {
            return match group.leading() {
                Ok(()) => Ok(Some(Target::Local(group))),
                Err(ClusterError::NotLeader {
                    address: Some(address),
                    ..
                }) => Ok(Some(Target::Remote(
                    address.clone(),
                    self.client(&address)?,
                ))),
                Err(_) => Ok(None), // an election: wait for it
            };
        }
        let hinted = lock(&self.hints).get(name).cloned();
        let address = match hinted {
            Some(address) => address,
            None => {
                // Not a replica here: ask the replicas in turn.
                let members = self.node.member_addresses();
                let turn = self.next_replica.fetch_add(1, Ordering::Relaxed);
                let replica = replicas[turn.wrapping_add(attempt as usize) % replicas.len()];
                match members.get(&replica) {
                    Some(address) => address.clone(),
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(Target::Remote(
            address.clone(),
            self.client(&address)?,
        )))
    }

    /// Stores `messages` in `queue`, through its leader.
    pub(crate) async fn enqueue(
        &self,
        queue: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Enqueued>, RemoteError> {
        let (name, part) = split(queue);
        if part == Part::DeadLetters {
            return Err(RemoteError::Invalid(format!(
                "{queue} holds {name}'s dead letters; only the queue puts messages there"
            )));
        }
        let deadline = Instant::now() + self.patience();
        let mut attempt = 0;
        loop {
            match self.route(name, true, attempt).await? {
                Some(Target::Local(group)) => match group.enqueue(messages.clone()).await {
                    Ok(outcomes) => return enqueued(outcomes),
                    // Nothing was done: find the leader again.
                    Err(QueueGroupError::Cluster(ClusterError::NotLeader { .. })) => {}
                    Err(e) => return Err(group_error(e)),
                },
                Some(Target::Remote(address, client)) => {
                    if client.client().ready().await.is_err() {
                        // Never sent: safe to send elsewhere.
                        self.hint(name, None);
                    } else {
                        match client.enqueue(name.to_owned(), messages.clone()).await {
                            Ok(Ok(stored)) => {
                                self.hint(name, Some(address));
                                return Ok(stored);
                            }
                            Ok(Err(ReplicaError::NotLeader { address })) => {
                                self.hint(name, address)
                            }
                            Ok(Err(ReplicaError::NotHere)) => self.hint(name, None),
                            Ok(Err(ReplicaError::Queue(e))) => return Err(e),
                            // Sent, and maybe stored: only the caller, with
                            // its idempotency keys, may send it again.
                            Err(e) => {
                                self.hint(name, None);
                                return Err(unavailable(format!("enqueue at {address}: {e}")));
                            }
                        }
                    }
                }
                None => {}
            }
            attempt += 1;
            if Instant::now() >= deadline {
                return Err(unavailable(format!("no leader for {name}")));
            }
            self.before_rerouting(name, backoff(attempt)).await;
        }
    }

    /// Serves one consumer of `queue` to `sink` until the client goes
    /// away, following the queue's leader from member to member.
    pub(crate) async fn consume<S: DeliverySink>(&self, queue: &str, prefetch: u32, sink: S) {
        let (name, part) = split(queue);
        let owner = courier_rpc::caller();
        let guard = StreamGuard {
            tokens: self.tokens.clone(),
            stream: self.next_stream.fetch_add(1, Ordering::Relaxed),
        };
        let mut attempt = 0;
        loop {
            let target = match self.route(name, true, attempt).await {
                Ok(target) => target,
                Err(e @ (RemoteError::Invalid(_) | RemoteError::NotFound(_))) => {
                    sink.fail(e).await;
                    return;
                }
                // No leader for now: a consumer waits for one as long as
                // its client keeps the stream.
                Err(_) => None,
            };
            let stop = match target {
                Some(Target::Local(group)) => {
                    self.serve_local(&group, name, part, prefetch, &owner, guard.stream, &sink)
                        .await
                }
                Some(Target::Remote(address, client)) => {
                    self.relay(
                        &address,
                        &client,
                        name,
                        part,
                        prefetch,
                        &owner,
                        guard.stream,
                        &sink,
                    )
                    .await
                }
                None => Stop::Reroute,
            };
            match stop {
                Stop::Closed => return,
                Stop::Failed(e) => {
                    sink.fail(e).await;
                    return;
                }
                Stop::Reroute => {
                    // What the old leader gave out is given out again by
                    // the next one: answers to it would be refused anyway.
                    lock(&self.tokens).forget_stream(guard.stream);
                    attempt += 1;
                    self.before_rerouting(name, backoff(attempt.min(4))).await;
                }
            }
        }
    }

    /// Serves a consumer from the group led here, until it stops leading.
    #[allow(clippy::too_many_arguments)]
    async fn serve_local<S: DeliverySink>(
        &self,
        group: &QueueGroup,
        name: &str,
        part: Part,
        prefetch: u32,
        owner: &Option<Arc<str>>,
        stream: u64,
        sink: &S,
    ) -> Stop {
        let stop = |e: QueueGroupError| match e {
            QueueGroupError::Cluster(_) => Stop::Reroute,
            other => Stop::Failed(group_error(other)),
        };
        let prefetch = prefetch.clamp(1, MAX_PREFETCH);
        let mut consumer = match group.consumer(prefetch, part).await {
            Ok(consumer) => consumer,
            Err(e) => return stop(e),
        };
        loop {
            let first = match consumer.recv().await {
                Ok(delivery) => delivery,
                Err(e) => return stop(e),
            };
            let mut bytes = size(&first);
            let mut taken = vec![first];
            while taken.len() < DELIVERIES_PER_ITEM {
                let room = DELIVERY_BYTES_PER_ITEM.saturating_sub(bytes);
                let Some(next) = consumer.try_recv_if(|d| size(d) <= room) else {
                    break;
                };
                bytes += size(&next);
                taken.push(next);
            }
            let wire = {
                let mut tokens = lock(&self.tokens);
                taken
                    .into_iter()
                    .map(|d| {
                        let token =
                            REPLICATED_TOKEN | self.next_token.fetch_add(1, Ordering::Relaxed);
                        tokens.insert(
                            token,
                            Entry {
                                held: Held::Local {
                                    queue: name.to_owned(),
                                    consumer: consumer.id(),
                                    id: d.id,
                                    delivery: d.delivery,
                                },
                                owner: owner.clone(),
                                stream,
                            },
                            per_stream(prefetch),
                        );
                        WireDelivery {
                            token,
                            id: d.id,
                            delivery: d.delivery,
                            payload: d.message.payload,
                            headers: d.message.headers,
                        }
                    })
                    .collect()
            };
            if !sink.send(wire).await {
                return Stop::Closed;
            }
        }
    }

    /// Relays a consumer's deliveries from the leader at `address`.
    #[allow(clippy::too_many_arguments)]
    async fn relay<S: DeliverySink>(
        &self,
        address: &str,
        client: &ReplicaQueueClient,
        name: &str,
        part: Part,
        prefetch: u32,
        owner: &Option<Arc<str>>,
        stream: u64,
        sink: &S,
    ) -> Stop {
        let opened = client
            .without_deadline()
            .consume(name.to_owned(), part == Part::DeadLetters, prefetch)
            .await;
        let mut items = match opened {
            Ok(items) => items,
            Err(_) => {
                self.hint(name, None);
                return Stop::Reroute;
            }
        };
        loop {
            match items.next().await {
                Some(Ok(Ok(group))) => {
                    self.hint(name, Some(address.to_owned()));
                    let wire = {
                        let mut tokens = lock(&self.tokens);
                        group
                            .into_iter()
                            .map(|mut d| {
                                let token = REPLICATED_TOKEN
                                    | self.next_token.fetch_add(1, Ordering::Relaxed);
                                tokens.insert(
                                    token,
                                    Entry {
                                        held: Held::Forwarded {
                                            address: address.to_owned(),
                                            token: d.token,
                                        },
                                        owner: owner.clone(),
                                        stream,
                                    },
                                    per_stream(prefetch),
                                );
                                d.token = token;
                                d
                            })
                            .collect()
                    };
                    if !sink.send(wire).await {
                        return Stop::Closed;
                    }
                }
                Some(Ok(Err(ReplicaError::NotLeader { address }))) => {
                    self.hint(name, address);
                    return Stop::Reroute;
                }
                Some(Ok(Err(ReplicaError::Queue(e)))) => return Stop::Failed(e),
                // Not a replica there, the connection lost (the leader may
                // have died), or the stream ended: find the leader again.
                _ => {
                    self.hint(name, None);
                    return Stop::Reroute;
                }
            }
        }
    }

    /// Answers deliveries named by this member's tokens (given to `who`):
    /// one outcome each, in order. A token is used up by an answer that
    /// reached the queue, or that the queue can no longer take (its leader
    /// changed: the next one gives the delivery out again); an answer that
    /// may not have arrived is a retryable error and keeps its token, so it
    /// can be sent again.
    pub(crate) async fn answer(
        &self,
        answers: &[WireAnswer],
        who: &Option<Arc<str>>,
    ) -> Vec<Result<(), RemoteError>> {
        let taken: Vec<Option<Entry>> = {
            let mut tokens = lock(&self.tokens);
            answers
                .iter()
                .map(|a| tokens.take(a.token(), who))
                .collect()
        };
        let mut outcomes: Vec<Result<(), RemoteError>> =
            vec![Err(RemoteError::UnknownDelivery); answers.len()];
        // Each answer with its place in the call and its token's entry.
        type Batch<A> = Vec<(usize, A, Entry)>;
        // Answers to deliveries given out here, by (queue, consumer).
        let mut local: BTreeMap<(String, ConsumerId), Batch<Answer>> = BTreeMap::new();
        // Answers relayed to the leaders that gave them, by address.
        let mut forwarded: BTreeMap<String, Batch<WireAnswer>> = BTreeMap::new();
        for (index, (answer, entry)) in answers.iter().zip(taken).enumerate() {
            let Some(entry) = entry else { continue };
            match entry.held.clone() {
                Held::Local {
                    queue,
                    consumer,
                    id,
                    delivery,
                } => {
                    let action = match *answer {
                        WireAnswer::Ack { .. } => Action::Ack,
                        WireAnswer::Nack { delay_ms, .. } => Action::Nack { delay_ms },
                        WireAnswer::Reject { .. } => Action::Reject,
                    };
                    let answer = Answer {
                        id,
                        delivery,
                        action,
                    };
                    local
                        .entry((queue, consumer))
                        .or_default()
                        .push((index, answer, entry));
                }
                Held::Forwarded { address, token } => {
                    let relayed = match *answer {
                        WireAnswer::Ack { .. } => WireAnswer::Ack { token },
                        WireAnswer::Nack { delay_ms, .. } => WireAnswer::Nack { token, delay_ms },
                        WireAnswer::Reject { .. } => WireAnswer::Reject { token },
                    };
                    forwarded
                        .entry(address)
                        .or_default()
                        .push((index, relayed, entry));
                }
            }
        }
        // Gives tokens back and says why, for answers that may be lost.
        let keep = |batch: Vec<(usize, Entry)>,
                    why: String,
                    outcomes: &mut Vec<Result<(), RemoteError>>| {
            let mut tokens = lock(&self.tokens);
            for (index, entry) in batch {
                tokens.restore(answers[index].token(), entry);
                outcomes[index] = Err(unavailable(format!(
                    "the answer may not have arrived: {why}"
                )));
            }
        };
        for ((queue, consumer), batch) in local {
            let Some(group) = self.local(&queue) else {
                continue;
            };
            let mut indices = Vec::with_capacity(batch.len());
            let mut group_answers = Vec::with_capacity(batch.len());
            let mut entries = Vec::with_capacity(batch.len());
            for (index, answer, entry) in batch {
                indices.push(index);
                group_answers.push(answer);
                entries.push((index, entry));
            }
            match group.answer_for(consumer, group_answers).await {
                Ok(results) => {
                    for (index, result) in indices.into_iter().zip(results) {
                        outcomes[index] =
                            result.map(|_| ()).map_err(|_| RemoteError::UnknownDelivery);
                    }
                }
                // Nothing done, and the next leader gives these out again.
                Err(QueueGroupError::Cluster(ClusterError::NotLeader { .. })) => {}
                Err(QueueGroupError::Cluster(e)) => keep(entries, e.to_string(), &mut outcomes),
                // The consumer is gone (a takeover): so are its leases.
                Err(_) => {}
            }
        }
        for (address, batch) in forwarded {
            let mut indices = Vec::with_capacity(batch.len());
            let mut relayed = Vec::with_capacity(batch.len());
            let mut entries = Vec::with_capacity(batch.len());
            for (index, answer, entry) in batch {
                indices.push(index);
                relayed.push(answer);
                entries.push((index, entry));
            }
            let Ok(client) = self.client(&address) else {
                continue;
            };
            match client.answer(relayed).await {
                Ok(Ok(results)) => {
                    for (index, result) in indices.into_iter().zip(results) {
                        outcomes[index] = result;
                    }
                }
                Ok(Err(ReplicaError::Queue(e))) => {
                    for index in indices {
                        outcomes[index] = Err(e.clone());
                    }
                }
                // That member leads no more: the next leader gives these
                // deliveries out again.
                Ok(Err(_)) => {}
                Err(e) => keep(entries, e.to_string(), &mut outcomes),
            }
        }
        outcomes
    }

    /// Extends the lease of the delivery under `token` by `by_ms`.
    pub(crate) async fn extend(
        &self,
        token: u64,
        by_ms: u64,
        who: &Option<Arc<str>>,
    ) -> Result<(), RemoteError> {
        let held = lock(&self.tokens)
            .get(token, who)
            .ok_or(RemoteError::UnknownDelivery)?;
        match held {
            Held::Local {
                queue,
                consumer,
                id,
                delivery,
            } => {
                let group = self.local(&queue).ok_or(RemoteError::UnknownDelivery)?;
                let answer = Answer {
                    id,
                    delivery,
                    action: Action::Extend { by_ms },
                };
                match group.answer_for(consumer, vec![answer]).await {
                    Ok(mut results) => match results.pop() {
                        Some(Ok(_)) => Ok(()),
                        _ => Err(RemoteError::UnknownDelivery),
                    },
                    Err(QueueGroupError::Cluster(ClusterError::NotLeader { .. })) => {
                        Err(RemoteError::UnknownDelivery)
                    }
                    Err(QueueGroupError::Cluster(e)) => Err(unavailable(e)),
                    // The consumer is gone (a takeover): so are its leases.
                    Err(_) => Err(RemoteError::UnknownDelivery),
                }
            }
            Held::Forwarded { address, token } => {
                match self.client(&address)?.extend(token, by_ms).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(ReplicaError::Queue(e))) => Err(e),
                    _ => Err(RemoteError::UnknownDelivery),
                }
            }
        }
    }

    /// The counters of `queue` (or its dead letters), from its leader.
    pub(crate) async fn stats(&self, queue: &str) -> Result<QueueStats, RemoteError> {
        let (name, part) = split(queue);
        let deadline = Instant::now() + self.patience();
        let mut attempt = 0;
        loop {
            match self.route(name, false, attempt).await? {
                Some(Target::Local(group)) => return Ok(part_stats(&group, part)),
                Some(Target::Remote(address, client)) => {
                    match client
                        .stats(name.to_owned(), part == Part::DeadLetters)
                        .await
                    {
                        Ok(Ok(stats)) => return Ok(stats),
                        Ok(Err(ReplicaError::NotLeader { address })) => self.hint(name, address),
                        Ok(Err(ReplicaError::Queue(e))) => return Err(e),
                        _ => {
                            let _ = address;
                            self.hint(name, None);
                        }
                    }
                }
                None => {}
            }
            attempt += 1;
            if Instant::now() >= deadline {
                return Err(unavailable(format!("no leader for {name}")));
            }
            self.before_rerouting(name, backoff(attempt)).await;
        }
    }

    /// Removes every message of `queue` (or its dead letters) not leased
    /// to a consumer, through its leader; how many. A purge that failed
    /// after it was sent is a retryable error, not sent again here: it may
    /// have been applied, and a second one would take what came since.
    pub(crate) async fn purge(&self, queue: &str) -> Result<u64, RemoteError> {
        let (name, part) = split(queue);
        let deadline = Instant::now() + self.patience();
        let mut attempt = 0;
        loop {
            match self.route(name, false, attempt).await? {
                Some(Target::Local(group)) => match group.purge(part).await {
                    Ok(count) => return Ok(count),
                    Err(QueueGroupError::Cluster(ClusterError::NotLeader { .. })) => {}
                    Err(e) => return Err(group_error(e)),
                },
                Some(Target::Remote(address, client)) => {
                    if client.client().ready().await.is_err() {
                        self.hint(name, None);
                    } else {
                        match client
                            .purge(name.to_owned(), part == Part::DeadLetters)
                            .await
                        {
                            Ok(Ok(count)) => return Ok(count),
                            Ok(Err(ReplicaError::NotLeader { address })) => {
                                self.hint(name, address)
                            }
                            Ok(Err(ReplicaError::NotHere)) => self.hint(name, None),
                            Ok(Err(ReplicaError::Queue(e))) => return Err(e),
                            Err(e) => {
                                self.hint(name, None);
                                return Err(unavailable(format!("purge at {address}: {e}")));
                            }
                        }
                    }
                }
                None => {}
            }
            attempt += 1;
            if Instant::now() >= deadline {
                return Err(unavailable(format!("no leader for {name}")));
            }
            self.before_rerouting(name, backoff(attempt)).await;
        }
    }

    /// The next `count` ready messages of `queue` (or its dead letters),
    /// as its leader has them, changing nothing.
    pub(crate) async fn peek(&self, queue: &str, count: u32) -> Result<Vec<Peeked>, RemoteError> {
        let (name, part) = split(queue);
        let deadline = Instant::now() + self.patience();
        let mut attempt = 0;
        loop {
            match self.route(name, false, attempt).await? {
                Some(Target::Local(group)) => return Ok(bounded_peek(&group, part, count)),
                Some(Target::Remote(_, client)) => {
                    match client
                        .peek(name.to_owned(), part == Part::DeadLetters, count)
                        .await
                    {
                        Ok(Ok(peeked)) => return Ok(peeked),
                        Ok(Err(ReplicaError::NotLeader { address })) => self.hint(name, address),
                        Ok(Err(ReplicaError::Queue(e))) => return Err(e),
                        // Nothing changes: safe to ask again, elsewhere.
                        _ => self.hint(name, None),
                    }
                }
                None => {}
            }
            attempt += 1;
            if Instant::now() >= deadline {
                return Err(unavailable(format!("no leader for {name}")));
            }
            self.before_rerouting(name, backoff(attempt)).await;
        }
    }

    /// Declares `queue`: places it; options must be the broker's own.
    pub(crate) async fn declare(
        &self,
        queue: &str,
        options: &QueueDeclaration,
    ) -> Result<(), RemoteError> {
        let (name, part) = split(queue);
        if part == Part::DeadLetters {
            return Err(RemoteError::Invalid(format!(
                "{queue} is declared with {name}"
            )));
        }
        let settings = &self.config.settings;
        let differs = options
            .max_deliveries
            .is_some_and(|m| m != settings.max_deliveries)
            || options
                .lease
                .is_some_and(|l| l.as_millis() as u64 != settings.lease_ms)
            || options
                .dead_lettering
                .is_some_and(|d| d != settings.dead_lettering);
        if differs {
            return Err(RemoteError::Conflict(format!(
                "{name} is a replicated queue, which takes the broker's settings (max_deliveries {}, lease {} ms, dead_lettering {}); per-queue options are not replicated yet",
                settings.max_deliveries, settings.lease_ms, settings.dead_lettering
            )));
        }
        self.placement(name, true).await.map(|_| ())
    }

    /// The counters of every replica held here, as this member applied
    /// them (dead letters as `<queue>.dlq`).
    pub(crate) fn reports(&self) -> Vec<(String, QueueStats)> {
        let groups: Vec<(String, Arc<QueueGroup>)> = lock(&self.groups)
            .iter()
            .map(|(n, g)| (n.clone(), g.clone()))
            .collect();
        let mut reports = Vec::new();
        for (name, group) in groups {
            let stats = group.stats();
            reports.push((format!("{name}{DLQ_SUFFIX}"), stats.dead_letters));
            reports.push((name, stats.queue));
        }
        reports
    }

    /// The replicas held here and how each sees its group.
    pub(crate) fn statuses(&self) -> Vec<(String, courier_cluster::queue_group::GroupStatus)> {
        let mut statuses: Vec<_> = lock(&self.groups)
            .iter()
            .map(|(n, g)| (n.clone(), g.status()))
            .collect();
        statuses.sort_by(|a, b| a.0.cmp(&b.0));
        statuses
    }

    /// Stops every replica held here (their logs are closed as Raft
    /// drops them).
    pub(crate) async fn shutdown(&self) {
        *self.starting.lock().await = true;
        let groups: Vec<(String, Arc<QueueGroup>)> = lock(&self.groups).drain().collect();
        for (_, group) in groups {
            self.raft_host.remove(group.group());
            group.shutdown().await;
        }
    }
}

fn size(d: &GroupDelivery) -> usize {
    d.message.payload.len() + d.message.headers.total_len()
}

/// What a peek shows: at most `MAX_PEEK` messages and, after the first,
/// `PEEK_BYTES` of payloads and headers (as the local host does).
fn bounded_peek(group: &QueueGroup, part: Part, count: u32) -> Vec<Peeked> {
    let mut bytes = 0;
    let mut shown = Vec::new();
    for peeked in group.peek(part, count.min(courier_queue::remote::MAX_PEEK) as usize) {
        let size = peeked.payload.len() + peeked.headers.total_len();
        if !shown.is_empty() && bytes + size > courier_queue::remote::PEEK_BYTES {
            break;
        }
        bytes += size;
        shown.push(peeked);
    }
    shown
}

fn part_stats(group: &QueueGroup, part: Part) -> QueueStats {
    let stats = group.stats();
    match part {
        Part::Main => stats.queue,
        Part::DeadLetters => stats.dead_letters,
    }
}

/// Serves [`ReplicaQueue`] for the other members: only what this member
/// can do itself.
pub(crate) struct ReplicaHost(pub(crate) Arc<Replicated>);

impl ReplicaHost {
    /// The group of `queue` if this member leads it.
    fn leading(&self, queue: &str) -> Result<Arc<QueueGroup>, ReplicaError> {
        let group = self.0.local(queue).ok_or(ReplicaError::NotHere)?;
        match group.leading() {
            Ok(()) => Ok(group),
            Err(ClusterError::NotLeader { address, .. }) => {
                Err(ReplicaError::NotLeader { address })
            }
            Err(_) => Err(ReplicaError::NotLeader { address: None }),
        }
    }
}

struct ReplicaSink(Items<Result<Vec<WireDelivery>, ReplicaError>>);

impl DeliverySink for ReplicaSink {
    async fn send(&self, group: Vec<WireDelivery>) -> bool {
        self.0.send(Ok(group)).await.is_ok()
    }
    async fn fail(&self, err: RemoteError) {
        let _ = self.0.send(Err(ReplicaError::Queue(err))).await;
    }
}

impl ReplicaQueue for ReplicaHost {
    async fn retire(&self, queue: String, term: u64) -> Result<(), ReplicaError> {
        // In a task of its own: a caller that goes away must not leave a
        // replica taken out of the map but still running.
        let replicated = self.0.clone();
        tokio::spawn(async move { replicated.retire(&queue, term).await })
            .await
            .unwrap_or_else(|e| Err(ReplicaError::Queue(unavailable(e))))
    }

    async fn purge(&self, queue: String, dead_letters: bool) -> Result<u64, ReplicaError> {
        let group = self.leading(&queue)?;
        let part = if dead_letters {
            Part::DeadLetters
        } else {
            Part::Main
        };
        match group.purge(part).await {
            Ok(count) => Ok(count),
            Err(QueueGroupError::Cluster(ClusterError::NotLeader { address, .. })) => {
                Err(ReplicaError::NotLeader { address })
            }
            Err(e) => Err(group_error(e).into()),
        }
    }

    async fn peek(
        &self,
        queue: String,
        dead_letters: bool,
        count: u32,
    ) -> Result<Vec<Peeked>, ReplicaError> {
        let group = self.leading(&queue)?;
        let part = if dead_letters {
            Part::DeadLetters
        } else {
            Part::Main
        };
        Ok(bounded_peek(&group, part, count))
    }

    async fn place(&self, queue: String) -> Result<Vec<NodeId>, ReplicaError> {
        match self.0.node.leader() {
            Some((leader, _)) if leader == self.0.id => self.0.place_here(&queue).await,
            Some((_, address)) => Err(ReplicaError::NotLeader {
                address: Some(address),
            }),
            None => Err(ReplicaError::NotLeader { address: None }),
        }
    }

    async fn enqueue(
        &self,
        queue: String,
        messages: Vec<Message>,
    ) -> Result<Vec<Enqueued>, ReplicaError> {
        let group = self.leading(&queue)?;
        match group.enqueue(messages).await {
            Ok(outcomes) => Ok(enqueued(outcomes)?),
            Err(QueueGroupError::Cluster(ClusterError::NotLeader { address, .. })) => {
                Err(ReplicaError::NotLeader { address })
            }
            Err(e) => Err(group_error(e).into()),
        }
    }

    async fn consume(
        &self,
        queue: String,
        dead_letters: bool,
        prefetch: u32,
        items: Items<Result<Vec<WireDelivery>, ReplicaError>>,
    ) {
        let group = match self.leading(&queue) {
            Ok(group) => group,
            Err(e) => {
                let _ = items.send(Err(e)).await;
                return;
            }
        };
        let part = if dead_letters {
            Part::DeadLetters
        } else {
            Part::Main
        };
        let owner = courier_rpc::caller();
        let guard = StreamGuard {
            tokens: self.0.tokens.clone(),
            stream: self.0.next_stream.fetch_add(1, Ordering::Relaxed),
        };
        let sink = ReplicaSink(items);
        match self
            .0
            .serve_local(&group, &queue, part, prefetch, &owner, guard.stream, &sink)
            .await
        {
            Stop::Closed => {}
            Stop::Failed(e) => sink.fail(e).await,
            Stop::Reroute => {
                let address = match group.leading() {
                    Err(ClusterError::NotLeader { address, .. }) => address,
                    _ => None,
                };
                let _ = sink.0.send(Err(ReplicaError::NotLeader { address })).await;
            }
        }
    }

    async fn answer(
        &self,
        answers: Vec<WireAnswer>,
    ) -> Result<Vec<Result<(), RemoteError>>, ReplicaError> {
        if answers.len() > courier_queue::remote::MAX_ANSWER_BATCH {
            return Err(RemoteError::Invalid(format!(
                "{} answers in one call; at most {}",
                answers.len(),
                courier_queue::remote::MAX_ANSWER_BATCH
            ))
            .into());
        }
        Ok(self.0.answer(&answers, &courier_rpc::caller()).await)
    }

    async fn extend(&self, token: u64, by_ms: u64) -> Result<(), ReplicaError> {
        Ok(self.0.extend(token, by_ms, &courier_rpc::caller()).await?)
    }

    async fn stats(&self, queue: String, dead_letters: bool) -> Result<QueueStats, ReplicaError> {
        let group = self.leading(&queue)?;
        let part = if dead_letters {
            Part::DeadLetters
        } else {
            Part::Main
        };
        Ok(part_stats(&group, part))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_and_prefixes() {
        let patterns = vec!["jobs".to_string(), "orders.*".to_string()];
        assert!(matches(&patterns, "jobs"));
        assert!(!matches(&patterns, "jobs2"));
        assert!(matches(&patterns, "orders.eu"));
        assert!(!matches(&patterns, "orders"));
        assert!(matches(&["*".to_string()], "anything"));
        assert!(!matches(&[], "jobs"));
    }

    #[test]
    fn every_queue_is_replicated_under_a_star_but_durable_subscriptions() {
        let star = vec!["*".to_string()];
        assert!(replicates(&star, "jobs"));
        assert!(replicates(&star, "jobs.dlq"));
        assert!(!replicates(&star, "durable.audit"));
        assert!(!replicates(&star, "durable.audit.dlq"));
        assert!(!replicates(&["d*".to_string()], "durable.audit"));
        assert!(replicates(&["d*".to_string()], "durably"));
    }

    #[test]
    fn dead_letters_are_named_after_their_queue() {
        assert_eq!(split("jobs.dlq"), ("jobs", Part::DeadLetters));
        assert_eq!(split("jobs"), ("jobs", Part::Main));
        assert_eq!(split(".dlq"), (".dlq", Part::Main));
    }

    #[test]
    fn the_token_table_is_bounded_and_forgets_a_stream() {
        let mut tokens = Tokens::default();
        let who: Option<Arc<str>> = Some("alice".into());
        for token in 0..(MAX_TOKENS as u64 + 10) {
            tokens.insert(
                token,
                Entry {
                    held: Held::Forwarded {
                        address: "tcp://x:1".into(),
                        token,
                    },
                    owner: who.clone(),
                    stream: token % 3,
                },
                usize::MAX,
            );
        }
        assert_eq!(tokens.held.len(), MAX_TOKENS);
        // The oldest went first.
        assert!(tokens.get(0, &who).is_none());
        assert!(tokens.get(MAX_TOKENS as u64 + 9, &who).is_some());
        // Another identity cannot answer it.
        assert!(tokens.take(MAX_TOKENS as u64 + 9, &None).is_none());
        assert!(tokens.take(MAX_TOKENS as u64 + 9, &who).is_some());
        tokens.forget_stream(0);
        tokens.forget_stream(1);
        tokens.forget_stream(2);
        assert!(tokens.held.is_empty());
        assert!(tokens.by_stream.is_empty());
    }

    #[test]
    fn a_stream_keeps_its_newest_tokens_and_an_answer_can_be_put_back() {
        let mut tokens = Tokens::default();
        let entry = |stream| Entry {
            held: Held::Forwarded {
                address: "tcp://x:1".into(),
                token: 0,
            },
            owner: None,
            stream,
        };
        for token in 0..100 {
            tokens.insert(token, entry(1), 10);
        }
        tokens.insert(1000, entry(2), 10);
        let kept: Vec<u64> = tokens.by_stream[&1].iter().copied().collect();
        assert_eq!(kept, (90..100).collect::<Vec<_>>());
        assert!(
            tokens.get(1000, &None).is_some(),
            "another stream's token stays"
        );
        let taken = tokens.take(95, &None).unwrap();
        assert!(tokens.get(95, &None).is_none());
        tokens.restore(95, taken);
        assert!(tokens.take(95, &None).is_some());
    }
}
