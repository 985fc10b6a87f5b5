//! One replicated queue on one node: the queue's Raft group (its own log,
//! vote and snapshots under the group's directory), the leader's duties,
//! and the operations producers and consumers use.
//!
//! Every replica runs a [`QueueGroup`]; only the group's leader accepts
//! operations (others answer [`ClusterError::NotLeader`] with where the
//! leader is). An operation returns once its command is *committed*: on a
//! majority of the replicas' logs, each fsynced before it counted (the
//! group's Raft log is fdatasynced on every append, whatever the queue's
//! own fsync policy on a single broker would be). So:
//!
//! - an enqueue answered `Stored` survives the loss of any minority of
//!   the replicas, their disks included;
//! - an ack answered `Ok` is as durable: the message is never delivered
//!   again;
//! - a delivery is committed before the consumer sees it, so its delivery
//!   number is never given to two consumers, and it counts towards
//!   dead-lettering even if the leader dies a moment later.
//!
//! An operation that fails with [`ClusterError::Unavailable`] may or may
//! not have been applied (the leader may have lost its office with the
//! command in flight). Enqueue again with the same idempotency key: within
//! the queue's window the retry is answered `Duplicate` with the first
//! one's id, never stored twice.
//!
//! # The leader's duties
//!
//! A node that becomes the group's leader first proposes the queue's
//! declaration (a no-op when it is the same) and [`QueueCommand::Takeover`]:
//! consumers attached to the old leader are detached and their messages
//! ready again, delivery counted. Then it proposes [`QueueCommand::Tick`]
//! whenever a lease, delay or time-to-live falls due. Followers run no
//! timer over the queue: they only apply.
//!
//! # Writes
//!
//! Commands go through one queue per group (as the metadata group's
//! writes do): those that arrive while an entry is being committed are
//! proposed together as the next entry, so concurrent producers and
//! consumers share one log append and one fdatasync on every replica.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use courier_queue::core::ConsumerId;
use courier_queue::Message;
use openraft::network::RaftNetworkFactory;
use openraft::{BasicNode, ChangeMembers, ServerState};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::node::{
    now_ms, propose_ordered, raft_config_for, write_error, ClusterError, Member, StartError, Timing,
};
use crate::queue_state::{
    Action, Answer, AnswerError, EnqueueOutcome, GroupDelivery, GroupStats, Part, QueueCommand,
    QueueGroupState, QueueResponse, QueueSettings, MAX_BATCH,
};
use crate::storage::{self, SharedState};
use crate::types::{Command, GroupId, NodeId, Raft, Response, TypeConfig};

/// Commands waiting to be proposed; past this, operations wait.
const COMMAND_QUEUE: usize = 4096;
/// Most commands in one entry.
const BATCH_COMMANDS: usize = 512;
/// Most payload bytes in one entry (beyond a single larger command).
const BATCH_BYTES: u64 = 512 * 1024;
/// How long [`QueueGroup::shutdown`] waits for the group's Raft to stop.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// Entries of one group being committed at once.
const PIPELINE: usize = 4;
/// How often the leader looks at its duties when nothing wakes it.
const LEADER_TICK: Duration = Duration::from_millis(50);

/// How one replica of a queue group starts.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct QueueGroupConfig {
    /// This node.
    pub node: NodeId,
    /// The group (never [`METADATA_GROUP`](crate::types::METADATA_GROUP)).
    pub group: GroupId,
    /// The queue's name.
    pub name: String,
    /// Its settings, proposed as its declaration by its first leader.
    pub settings: QueueSettings,
    /// The replicas (this node among them) and their addresses; every
    /// replica must be given the same set.
    pub replicas: BTreeMap<NodeId, String>,
    /// The group's own directory (its log, vote and snapshots).
    pub dir: PathBuf,
    /// Raft's timers.
    pub timing: Timing,
    /// Take a snapshot after this many entries. Default 10,000.
    pub snapshot_after: u64,
    /// The frame limit of the nodes' connections. Default 4 MiB.
    pub max_message: usize,
    /// Whether this replica took another's place after the group was
    /// founded: it then waits for the leader to add it, and never founds
    /// the group itself (which would give it a first entry that disagrees
    /// with the group's).
    pub joining: bool,
    /// The node's shared log, for the group's entries; `None` gives the
    /// group a log of its own in `dir/log`. A group keeps the kind it was
    /// created with.
    pub wal: Option<crate::wal::NodeWal>,
    /// The replica that founds the group and so leads it first (the
    /// placement's preferred leader); the others found it only if it is
    /// silent for an election timeout. `None`: the lowest id.
    pub founder: Option<NodeId>,
}

impl QueueGroupConfig {
    /// A replica of queue `name` (group `group`) on node `node`, with the
    /// default settings and timers.
    pub fn new(
        node: NodeId,
        group: GroupId,
        name: impl Into<String>,
        replicas: BTreeMap<NodeId, String>,
        dir: impl Into<PathBuf>,
    ) -> QueueGroupConfig {
        QueueGroupConfig {
            node,
            group,
            name: name.into(),
            settings: QueueSettings::default(),
            replicas,
            dir: dir.into(),
            timing: Timing::default(),
            snapshot_after: 10_000,
            max_message: 4 * 1024 * 1024,
            joining: false,
            wal: None,
            founder: None,
        }
    }

    /// With its entries in the node's shared log (see [`crate::wal`]).
    pub fn with_wal(mut self, wal: Option<crate::wal::NodeWal>) -> QueueGroupConfig {
        self.wal = wal;
        self
    }

    /// Founded by `node` (see [`QueueGroupConfig::founder`]).
    pub fn founded_by(mut self, node: NodeId) -> QueueGroupConfig {
        self.founder = Some(node);
        self
    }

    /// As a replica that joins the group (added by its leader), not one
    /// of those that founded it.
    pub fn joining(mut self, joining: bool) -> QueueGroupConfig {
        self.joining = joining;
        self
    }

    /// With these queue settings.
    pub fn with_settings(mut self, settings: QueueSettings) -> QueueGroupConfig {
        self.settings = settings;
        self
    }

    /// With these timers.
    pub fn with_timing(mut self, timing: Timing) -> QueueGroupConfig {
        self.timing = timing;
        self
    }

    /// Snapshot after this many entries.
    pub fn with_snapshot_after(mut self, entries: u64) -> QueueGroupConfig {
        self.snapshot_after = entries.max(1);
        self
    }

    /// With this frame limit (the nodes' connections').
    pub fn with_max_message(mut self, bytes: usize) -> QueueGroupConfig {
        self.max_message = bytes;
        self
    }
}

/// Why a queue operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueueGroupError {
    /// Not the leader, no quorum, or shutting down (see [`ClusterError`]:
    /// after `Unavailable` the operation may have been applied).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The queue refused the operation; nothing changed.
    #[error("refused: {0}")]
    Refused(String),
}

impl QueueGroupError {
    /// What kind of failure this is: the cluster's kind, or
    /// `InvalidInput` for a refusal.
    pub fn kind(&self) -> courier_transport::ErrorKind {
        match self {
            QueueGroupError::Cluster(e) => e.kind(),
            QueueGroupError::Refused(_) => courier_transport::ErrorKind::InvalidInput,
        }
    }
}

/// A replica's view of its group, for `courier queue stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    /// The group.
    pub group: GroupId,
    /// This node.
    pub node: NodeId,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: &'static str,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// The last entry applied here.
    pub applied_index: u64,
    /// The replicas; on the leader, each one's lag in entries.
    pub replicas: Vec<Member>,
}

type ServerMetrics = openraft::metrics::RaftServerMetrics<NodeId, BasicNode>;

type Queued = (
    QueueCommand,
    oneshot::Sender<Result<QueueResponse, ClusterError>>,
);

struct Inner {
    node: NodeId,
    group: GroupId,
    raft: Raft,
    /// openraft's server metrics (vote, role, leader, membership): sent
    /// only when one of them changes, unlike its full metrics, which are
    /// sent at every step of every entry, so what follows the leader here
    /// is not woken per entry.
    server: watch::Receiver<ServerMetrics>,
    shared: SharedState<QueueGroupState>,
    commands: mpsc::Sender<Queued>,
    consumers: std::sync::atomic::AtomicU64,
    /// The largest command accepted, in [`QueueCommand::size`] bytes: a
    /// quarter of the frame limit, so an entry (one such command, or many
    /// within the same budget) always fits a frame and can replicate.
    max_command: u64,
    /// The term in which this node, as leader, declared the queue and
    /// took it over: until then it accepts no operation.
    ready_term: std::sync::atomic::AtomicU64,
    /// Woken when `ready_term` moves, for [`QueueGroup::changed`].
    ready: tokio::sync::Notify,
}

/// One replica of a replicated queue (see the [module docs](self)).
pub struct QueueGroup {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
    probe: courier_queue::log::DurableProbe,
}

impl std::fmt::Debug for QueueGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueGroup")
            .field("node", &self.inner.node)
            .field("group", &self.inner.group)
            .finish_non_exhaustive()
    }
}

impl QueueGroup {
    /// Opens the group's storage, starts its Raft on `network` and, if its
    /// log is pristine, founds the group with `config.replicas`: at once on
    /// the founder, after an election timeout without news of a leader on
    /// the others.
    pub async fn start<N>(config: QueueGroupConfig, network: N) -> Result<QueueGroup, StartError>
    where
        N: RaftNetworkFactory<TypeConfig>,
    {
        if config.group == crate::types::METADATA_GROUP {
            return Err(StartError::Config(
                "group 0 is the metadata group, not a queue".into(),
            ));
        }
        if !config.replicas.contains_key(&config.node) {
            return Err(StartError::Config(format!(
                "node {} is not among the replicas {:?}",
                config.node,
                config.replicas.keys().collect::<Vec<_>>()
            )));
        }
        config.settings.validate().map_err(StartError::Config)?;
        let raft_config = Arc::new(raft_config_for(
            config.timing,
            config.snapshot_after,
            config.max_message,
        )?);
        let (log, machine) = storage::open_queue_group::<QueueGroupState>(
            &config.dir,
            config.wal.as_ref(),
            config.group,
        )
        .await?;
        let shared = machine.shared();
        let probe = log.durable_probe();
        let raft = Raft::new(config.node, raft_config, network, log, machine)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let pristine = !raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let mut founding = None;
        if pristine && !config.joining {
            let founder = config
                .founder
                .or_else(|| config.replicas.keys().next().copied());
            founding = crate::node::found(
                &raft,
                &config.replicas,
                config.node,
                founder,
                config.timing,
                config.group,
            )
            .await;
        }
        let (commands, queued) = mpsc::channel(COMMAND_QUEUE);
        let inner = Arc::new(Inner {
            node: config.node,
            group: config.group,
            raft: raft.clone(),
            server: raft.server_metrics(),
            shared: shared.clone(),
            commands: commands.clone(),
            consumers: std::sync::atomic::AtomicU64::new(1),
            max_command: (config.max_message / 4) as u64,
            ready_term: std::sync::atomic::AtomicU64::new(0),
            ready: tokio::sync::Notify::new(),
        });
        let batch_bytes = BATCH_BYTES.min(inner.max_command);
        let mut tasks = vec![
            tokio::spawn(group_commit(raft.clone(), config.node, queued, batch_bytes)),
            tokio::spawn(lead(
                shared,
                config.node,
                config.name,
                config.settings,
                commands,
                inner.clone(),
            )),
        ];
        tasks.extend(founding);
        Ok(QueueGroup {
            inner,
            tasks,
            probe,
        })
    }

    /// The group's Raft (for the network host and metrics).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The group's id.
    pub fn group(&self) -> GroupId {
        self.inner.group
    }

    /// Stores `messages` (at most [`MAX_BATCH`]); one outcome per message,
    /// in order, once the enqueue is committed.
    pub async fn enqueue(
        &self,
        messages: Vec<Message>,
    ) -> Result<Vec<EnqueueOutcome>, QueueGroupError> {
        if messages.len() > MAX_BATCH {
            return Err(QueueGroupError::Refused(format!(
                "{} messages in one enqueue (at most {MAX_BATCH})",
                messages.len()
            )));
        }
        let count = messages.len();
        let command = QueueCommand::Enqueue {
            now_ms: now_ms(),
            messages,
        };
        if command.size() > self.inner.max_command {
            return Err(QueueGroupError::Refused(format!(
                "an enqueue of {} bytes (payloads, keys and headers) is over the {} a replicated queue takes at once: send fewer or smaller messages",
                command.size(),
                self.inner.max_command
            )));
        }
        match self.inner.run(command).await? {
            QueueResponse::Enqueued(outcomes) if outcomes.len() == count => Ok(outcomes),
            other => Err(unexpected(other)),
        }
    }

    /// Attaches a consumer of the queue (or of its dead letters) holding
    /// at most `prefetch` deliveries. Its id is unique on this node; it is
    /// detached when dropped, or by the next leader.
    pub async fn consumer(
        &self,
        prefetch: u32,
        part: Part,
    ) -> Result<GroupConsumer, QueueGroupError> {
        // Unique per node and group: the node id in the high bits.
        let serial = self
            .inner
            .consumers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = (self.inner.node << 40) | (serial & ((1 << 40) - 1));
        let consumer = GroupConsumer {
            inner: self.inner.clone(),
            id,
            prefetch,
            part,
            buffered: VecDeque::new(),
            pending: None,
        };
        consumer.attach().await?;
        Ok(consumer)
    }

    /// Answers deliveries made to consumer `consumer` (attached through
    /// this node), as [`GroupConsumer::answer`] does, for a caller that
    /// holds the consumer's id but not the consumer itself (a host whose
    /// answers arrive on another call than the deliveries went out on).
    pub async fn answer_for(
        &self,
        consumer: ConsumerId,
        answers: Vec<Answer>,
    ) -> Result<Vec<Result<Option<u64>, AnswerError>>, QueueGroupError> {
        if answers.len() > crate::queue_state::MAX_ANSWERS {
            return Err(QueueGroupError::Refused(format!(
                "{} answers in one call (at most {})",
                answers.len(),
                crate::queue_state::MAX_ANSWERS
            )));
        }
        let count = answers.len();
        let command = QueueCommand::Answer {
            consumer,
            now_ms: now_ms(),
            answers,
        };
        match self.inner.run(command).await? {
            QueueResponse::Answered(results) if results.len() == count => Ok(results),
            other => Err(unexpected(other)),
        }
    }

    /// Whether this node leads the group now; if not, the leader it knows
    /// of and its address (as [`ClusterError::NotLeader`]).
    pub fn leading(&self) -> Result<(), ClusterError> {
        self.inner.leading()
    }

    /// Waits at most `patience` for something that may change what
    /// [`QueueGroup::leading`] says here or on the leader: the replica's
    /// Raft state (a vote, a leader elected or heard of, its role, its
    /// membership), an entry applied (such as a new leader's takeover), or
    /// this node, as leader, becoming ready. For a caller retrying while there is no
    /// leader: it retries as soon as there may be one, not at its next
    /// backoff tick.
    pub async fn changed(&self, patience: Duration) {
        let mut metrics = self.inner.server.clone();
        // A clone counts what its original has not seen (here: anything
        // since the group started) as unseen, so `changed` would return
        // at once: only what changes from here on may wake the caller.
        metrics.borrow_and_update();
        // An entry applied here: on a follower, the leader's declaration
        // and takeover, after which it is ready.
        let mut applied = self.inner.shared.revision_watch();
        let ready = self.inner.ready.notified();
        let _ = tokio::time::timeout(patience, async {
            tokio::select! {
                _ = metrics.changed() => {}
                _ = applied.changed() => {}
                _ = ready => {}
            }
        })
        .await;
    }

    /// The group's members (voters and learners) as this replica sees its
    /// membership: empty on a replica that has not joined yet.
    pub fn members(&self) -> BTreeSet<NodeId> {
        self.member_addresses().into_keys().collect()
    }

    /// The group's members and their addresses, as this replica sees its
    /// membership.
    pub fn member_addresses(&self) -> BTreeMap<NodeId, String> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect()
    }

    /// Whether the group's members are exactly `replicas`, all voters
    /// (as this replica sees its membership).
    pub fn has_replicas(&self, replicas: &BTreeSet<NodeId>) -> bool {
        let voters: BTreeSet<NodeId> = {
            let metrics = self.inner.raft.metrics();
            let m = metrics.borrow();
            m.membership_config.membership().voter_ids().collect()
        };
        &voters == replicas && &self.members() == replicas
    }

    /// On the leader: changes the group's members to exactly `replicas`
    /// (ids and addresses), through openraft's membership changes. Each
    /// new replica is first added as a learner and must catch up within
    /// `catch_up` (it must be running its replica, started as
    /// [`joining`](QueueGroupConfig::joining)); then the voters are
    /// replaced in one joint-consensus step, so a majority of the old and
    /// of the new set must agree, and members no longer wanted leave.
    /// Safe to call again after any failure: each step checks what is done.
    pub async fn change_replicas(
        &self,
        replicas: &BTreeMap<NodeId, String>,
        catch_up: Duration,
    ) -> Result<(), QueueGroupError> {
        self.inner.leading()?;
        let wanted: BTreeSet<NodeId> = replicas.keys().copied().collect();
        if wanted.is_empty() {
            return Err(QueueGroupError::Refused("a group needs replicas".into()));
        }
        let raft = &self.inner.raft;
        let known = self.members();
        for (id, address) in replicas {
            if known.contains(id) {
                continue;
            }
            // Blocking: returns once the learner has the log up to its
            // own addition, bounded so a replica that never starts does
            // not hold the group's changes forever.
            let added = raft.add_learner(*id, BasicNode::new(address.clone()), true);
            match tokio::time::timeout(catch_up, added).await {
                Ok(result) => {
                    result.map_err(write_error)?;
                }
                Err(_) => {
                    return Err(ClusterError::Membership(format!(
                        "replica {id} at {address} did not catch up within {catch_up:?}"
                    ))
                    .into())
                }
            }
        }
        raft.change_membership(ChangeMembers::ReplaceAllVoters(wanted.clone()), false)
            .await
            .map_err(write_error)?;
        let extra: BTreeSet<NodeId> = self
            .members()
            .into_iter()
            .filter(|id| !wanted.contains(id))
            .collect();
        if !extra.is_empty() {
            raft.change_membership(ChangeMembers::RemoveNodes(extra), false)
                .await
                .map_err(write_error)?;
        }
        Ok(())
    }

    /// Removes every message of `part` not leased to a consumer, once
    /// committed; how many.
    pub async fn purge(&self, part: Part) -> Result<u64, QueueGroupError> {
        match self.inner.run(QueueCommand::Purge { part }).await? {
            QueueResponse::Purged(count) => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    /// The next `limit` ready messages of `part`, as this replica has
    /// applied them (on the leader: every committed change), changing
    /// nothing.
    pub fn peek(&self, part: Part, limit: usize) -> Vec<courier_queue::Peeked> {
        self.inner.shared.read().peek(part, now_ms(), limit)
    }

    /// The queue's counters as this replica has applied them.
    pub fn stats(&self) -> GroupStats {
        self.inner.shared.read().stats()
    }

    /// The group as this replica sees it.
    pub fn status(&self) -> GroupStatus {
        let metrics = self.inner.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let last = metrics.last_log_index.unwrap_or(0);
        let replicas = membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                address: node.addr.clone(),
                voter: voters.contains(id),
                lag: metrics.replication.as_ref().map(|r| {
                    let matched = r.get(id).and_then(|m| m.as_ref()).map_or(0, |m| m.index);
                    last.saturating_sub(matched)
                }),
            })
            .collect();
        GroupStatus {
            group: self.inner.group,
            node: self.inner.node,
            role: role(metrics.state),
            leader: metrics.current_leader,
            term: metrics.current_term,
            applied_index: metrics.last_applied.map_or(0, |l| l.index),
            replicas,
        }
    }

    /// FOR TESTS (power loss): what of this replica's log is fsynced.
    #[doc(hidden)]
    pub fn durable_probe(&self) -> &courier_queue::log::DurableProbe {
        &self.probe
    }

    /// Stops the group's Raft and timers; the storage is closed as Raft
    /// drops it. Operations on it (and its consumers) fail from then on.
    pub async fn shutdown(&self) {
        for task in &self.tasks {
            task.abort();
        }
        // Bounded: a Raft whose core does not stop (seen in long
        // simulations, after power loss and partitions) must not hold up
        // the broker's shutdown; its storage closes as it drops.
        match tokio::time::timeout(SHUTDOWN_WAIT, self.inner.raft.shutdown()).await {
            Ok(_) => {}
            Err(_) => tracing::warn!(
                node = self.inner.node,
                group = self.inner.group,
                "the group's Raft did not stop within {SHUTDOWN_WAIT:?}; leaving it"
            ),
        }
    }
}

impl Drop for QueueGroup {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

fn unexpected(response: QueueResponse) -> QueueGroupError {
    match response {
        QueueResponse::Refused(why) => QueueGroupError::Refused(why),
        other => QueueGroupError::Cluster(ClusterError::Unavailable(format!(
            "unexpected answer from the queue: {other:?}"
        ))),
    }
}

impl Inner {
    /// Whether this node leads the group now, and has declared and taken
    /// over the queue in this term (before that, operations would be
    /// refused as undeclared, or their consumers detached by the takeover):
    /// a leader not ready yet answers `NotLeader` without an address.
    fn leading(&self) -> Result<(), ClusterError> {
        let m = self.server.borrow();
        if m.current_leader == Some(self.node) {
            let term = m.vote.leader_id().get_term();
            if self.ready_term.load(std::sync::atomic::Ordering::Acquire) == term {
                Ok(())
            } else {
                Err(ClusterError::NotLeader {
                    leader: Some(self.node),
                    address: None,
                })
            }
        } else {
            let address = m.current_leader.and_then(|leader| {
                m.membership_config
                    .membership()
                    .get_node(&leader)
                    .map(|n| n.addr.clone())
            });
            Err(ClusterError::NotLeader {
                leader: m.current_leader,
                address,
            })
        }
    }

    /// Queues `command` for the next entry; the receiver answers once it
    /// is committed and applied here.
    async fn submit(
        &self,
        command: QueueCommand,
    ) -> Result<oneshot::Receiver<Result<QueueResponse, ClusterError>>, ClusterError> {
        self.leading()?;
        let (answer, answered) = oneshot::channel();
        self.commands
            .send((command, answer))
            .await
            .map_err(|_| ClusterError::Unavailable("the queue group is shutting down".into()))?;
        Ok(answered)
    }

    async fn run(&self, command: QueueCommand) -> Result<QueueResponse, ClusterError> {
        let answered = self.submit(command).await?;
        answered
            .await
            .map_err(|_| ClusterError::Unavailable("the queue group is shutting down".into()))?
    }
}

/// A consumer attached to the group's leader (see [`QueueGroup::consumer`]).
///
/// [`GroupConsumer::recv`] is cancel-safe: a deliver command in flight is
/// kept in the consumer, so a `recv` dropped in a `select!` loses no
/// delivery; the next `recv` picks up its answer.
pub struct GroupConsumer {
    inner: Arc<Inner>,
    id: ConsumerId,
    prefetch: u32,
    part: Part,
    buffered: VecDeque<GroupDelivery>,
    pending: Option<oneshot::Receiver<Result<QueueResponse, ClusterError>>>,
}

impl std::fmt::Debug for GroupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumer")
            .field("id", &self.id)
            .field("part", &self.part)
            .finish_non_exhaustive()
    }
}

impl GroupConsumer {
    /// This consumer's id in the queue's state.
    pub fn id(&self) -> ConsumerId {
        self.id
    }

    /// The next delivery already here, if `fits` accepts it; never waits
    /// (for a caller that sends what is ready together).
    pub fn try_recv_if(
        &mut self,
        fits: impl FnOnce(&GroupDelivery) -> bool,
    ) -> Option<GroupDelivery> {
        if fits(self.buffered.front()?) {
            self.buffered.pop_front()
        } else {
            None
        }
    }

    async fn attach(&self) -> Result<(), QueueGroupError> {
        match self
            .inner
            .run(QueueCommand::Attach {
                consumer: self.id,
                prefetch: self.prefetch,
                part: self.part,
            })
            .await?
        {
            QueueResponse::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The next delivery, waiting for one. Fails with
    /// [`ClusterError::NotLeader`] once this node no longer leads the
    /// group: attach to the new leader (the deliveries this consumer held
    /// are given to others, their delivery counted).
    pub async fn recv(&mut self) -> Result<GroupDelivery, QueueGroupError> {
        let mut applied = self.inner.shared.revision_watch();
        loop {
            if let Some(delivery) = self.buffered.pop_front() {
                return Ok(delivery);
            }
            if let Some(pending) = self.pending.as_mut() {
                let answer = pending.await;
                self.pending = None;
                match answer {
                    Ok(Ok(QueueResponse::Delivered(deliveries))) => {
                        self.buffered.extend(deliveries);
                        continue;
                    }
                    Ok(Ok(QueueResponse::Refused(_))) => {
                        // Detached (a takeover, on this node, moments
                        // after it began leading): attach again.
                        self.attach().await?;
                        continue;
                    }
                    Ok(Ok(other)) => return Err(unexpected(other)),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        return Err(ClusterError::Unavailable(
                            "the queue group is shutting down".into(),
                        )
                        .into())
                    }
                }
            }
            self.inner.leading()?;
            let (attached, ready, deadline) = {
                let state = self.inner.shared.read();
                (
                    state.is_attached(self.id),
                    state.has_delivery_for(self.id, now_ms()),
                    state.next_deadline_ms(),
                )
            };
            if !attached {
                self.attach().await?;
                continue;
            }
            if ready {
                let deliver = QueueCommand::Deliver {
                    consumer: self.id,
                    max: self.prefetch,
                    now_ms: now_ms(),
                };
                self.pending = Some(self.inner.submit(deliver).await?);
                continue;
            }
            // Nothing for us now: wait for the state to change (an enqueue,
            // an answer giving credit back, the leader's tick) or a while.
            let wait = deadline
                .map(|d| Duration::from_millis(d.saturating_sub(now_ms())))
                .unwrap_or(LEADER_TICK * 4)
                .clamp(Duration::from_millis(1), LEADER_TICK * 4);
            tokio::select! {
                changed = applied.changed() => {
                    if changed.is_err() {
                        return Err(ClusterError::Unavailable("the queue group is shutting down".into()).into());
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Answers deliveries, in order, once the answers are committed: one
    /// result per answer (for an extension, the lease's new end).
    pub async fn answer(
        &self,
        answers: Vec<Answer>,
    ) -> Result<Vec<Result<Option<u64>, AnswerError>>, QueueGroupError> {
        let count = answers.len();
        let command = QueueCommand::Answer {
            consumer: self.id,
            now_ms: now_ms(),
            answers,
        };
        match self.inner.run(command).await? {
            QueueResponse::Answered(results) if results.len() == count => Ok(results),
            other => Err(unexpected(other)),
        }
    }

    async fn answer_one(
        &self,
        delivery: &GroupDelivery,
        action: Action,
    ) -> Result<Option<u64>, QueueGroupError> {
        let answer = Answer {
            id: delivery.id,
            delivery: delivery.delivery,
            action,
        };
        let mut results = self.answer(vec![answer]).await?;
        match results.pop() {
            Some(Ok(until)) => Ok(until),
            Some(Err(e)) => Err(QueueGroupError::Refused(e.to_string())),
            None => Err(unexpected(QueueResponse::Answered(Vec::new()))),
        }
    }

    /// Processed: the message is gone once this returns `Ok`.
    pub async fn ack(&self, delivery: &GroupDelivery) -> Result<(), QueueGroupError> {
        self.answer_one(delivery, Action::Ack).await.map(|_| ())
    }

    /// Give it back, ready again after `delay`.
    pub async fn nack(
        &self,
        delivery: &GroupDelivery,
        delay: Duration,
    ) -> Result<(), QueueGroupError> {
        let delay_ms = delay.as_millis() as u64;
        self.answer_one(delivery, Action::Nack { delay_ms })
            .await
            .map(|_| ())
    }

    /// A poison message: dead-letter it now.
    pub async fn reject(&self, delivery: &GroupDelivery) -> Result<(), QueueGroupError> {
        self.answer_one(delivery, Action::Reject).await.map(|_| ())
    }

    /// Extend the lease to `by` from now; returns its new end (ms since the
    /// Unix epoch, the leader's clock).
    pub async fn extend(
        &self,
        delivery: &GroupDelivery,
        by: Duration,
    ) -> Result<u64, QueueGroupError> {
        let by_ms = by.as_millis() as u64;
        let until = self.answer_one(delivery, Action::Extend { by_ms }).await?;
        until.ok_or_else(|| unexpected(QueueResponse::Answered(Vec::new())))
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        // Best effort: if the queue is full or this node no longer leads,
        // the next leader's takeover or the leases' end give the messages
        // back instead.
        let (answer, _) = oneshot::channel();
        let detach = QueueCommand::Detach {
            consumer: self.id,
            now_ms: now_ms(),
        };
        // Not lost to a full command queue: then it waits its turn in a
        // task of its own (one per consumer dropped, so bounded by them).
        if let Err(mpsc::error::TrySendError::Full(queued)) =
            self.inner.commands.try_send((detach, answer))
        {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let commands = self.inner.commands.clone();
                runtime.spawn(async move {
                    let _ = commands.send(queued).await;
                });
            }
        }
    }
}

/// Group commit of a queue group's commands (as the metadata group's
/// `group_commit`): what queued while entries were being committed goes
/// as the next entry. Up to [`PIPELINE`] entries are in flight at once
/// (handed to Raft in order, so the log keeps the order they were
/// formed in), which hides a commit's round trips and fsyncs from the
/// next batch. A command whose caller has gone before it is proposed is
/// dropped, except a detach (whose caller never waits).
async fn group_commit(
    raft: Raft,
    id: NodeId,
    mut queued: mpsc::Receiver<Queued>,
    batch_bytes: u64,
) {
    let room = Arc::new(tokio::sync::Semaphore::new(PIPELINE));
    // Aborted with this task, so no answer outlives the group.
    let mut committing = tokio::task::JoinSet::new();
    let mut carried: Option<Queued> = None;
    loop {
        while committing.try_join_next().is_some() {}
        let Ok(slot) = room.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(first) => first,
            None => match queued.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut bytes = first.0.size();
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS {
            match queued.try_recv() {
                Ok(next) if bytes + next.0.size() > batch_bytes => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += next.0.size();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        batch.retain(|(command, answer)| {
            !answer.is_closed() || matches!(command, QueueCommand::Detach { .. })
        });
        if batch.is_empty() {
            continue;
        }
        let (commands, answers): (Vec<QueueCommand>, Vec<_>) = batch.into_iter().unzip();
        let count = commands.len();
        let committed = propose_ordered(&raft, id, Command::Queue(commands)).await;
        committing.spawn(async move {
            let results: Vec<Result<QueueResponse, ClusterError>> = match committed.await {
                Ok(Response::Queue(results)) if results.len() == count => {
                    results.into_iter().map(Ok).collect()
                }
                Ok(other) => {
                    let e = ClusterError::Unavailable(format!(
                        "unexpected answer to a queue command: {other:?}"
                    ));
                    vec![Err(e); count]
                }
                Err(e) => vec![Err(e); count],
            };
            for (tx, result) in answers.into_iter().zip(results) {
                let _ = tx.send(result);
            }
            drop(slot);
        });
    }
}

/// The leader's duties (see the [module docs](self)).
async fn lead(
    shared: SharedState<QueueGroupState>,
    id: NodeId,
    name: String,
    settings: QueueSettings,
    commands: mpsc::Sender<Queued>,
    inner: Arc<Inner>,
) {
    let run = |command: QueueCommand| {
        let commands = commands.clone();
        async move {
            let (answer, answered) = oneshot::channel();
            commands
                .send((command, answer))
                .await
                .map_err(|_| ClusterError::Unavailable("shutting down".into()))?;
            answered
                .await
                .map_err(|_| ClusterError::Unavailable("shutting down".into()))?
        }
    };
    let mut metrics = inner.server.clone();
    let mut applied = shared.revision_watch();
    // The term in which this node last took over as leader.
    let mut took_over_in: Option<u64> = None;
    loop {
        let (leader, term) = {
            let m = metrics.borrow_and_update();
            (m.current_leader, m.vote.leader_id().get_term())
        };
        let mut wait = LEADER_TICK;
        if leader == Some(id) {
            if took_over_in != Some(term) {
                let declare = QueueCommand::Declare {
                    name: name.clone(),
                    settings: settings.clone(),
                };
                match run(declare).await {
                    Ok(QueueResponse::Refused(why)) => {
                        tracing::warn!(node = id, queue = %name, "declaring the queue: {why}")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(node = id, queue = %name, "declaring the queue: {e}");
                        tokio::time::sleep(LEADER_TICK).await;
                        continue;
                    }
                }
                match run(QueueCommand::Takeover { now_ms: now_ms() }).await {
                    Ok(_) => {
                        took_over_in = Some(term);
                        inner
                            .ready_term
                            .store(term, std::sync::atomic::Ordering::Release);
                        inner.ready.notify_waiters();
                    }
                    Err(e) => {
                        tracing::debug!(node = id, queue = %name, "taking over: {e}");
                        tokio::time::sleep(LEADER_TICK).await;
                    }
                }
                continue;
            }
            let now = now_ms();
            let next = shared.read().next_deadline_ms();
            match next {
                Some(deadline) if deadline <= now => {
                    if let Err(e) = run(QueueCommand::Tick { now_ms: now }).await {
                        tracing::debug!(node = id, queue = %name, "tick: {e}");
                    }
                    continue;
                }
                Some(deadline) => {
                    wait = wait.min(Duration::from_millis(deadline - now));
                }
                None => {}
            }
        }
        let leading = leader == Some(id);
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            // A delivery or an enqueue with a time-to-live may have brought
            // the next deadline closer (only the leader keeps the time).
            changed = applied.changed(), if leading => if changed.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}
