//! One cluster member: the metadata group's Raft, its storage, and the
//! key-value operations every other part (the service, the broker, tests)
//! goes through.
//!
//! # Timers
//!
//! The defaults are chosen for small, busy machines (2 cores shared with a
//! broker's data path): a heartbeat every 250 ms and an election after 1 to
//! 2 s without one. openraft also gives a leader a lease as long as the
//! longest election timeout: a follower that heard from its leader less
//! than that long ago refuses to vote, so a candidate standing early is
//! turned down and the next one wins. Measured with `kill -9` of the
//! leader (`cargo xtask bench --bench cluster`, 10 kills on a 2-vCPU VM):
//! a new leader after 3.4 s at the median, the first write accepted 3.7 s
//! after the kill. Shorter timeouts elect faster but start needless
//! elections whenever a loaded machine stalls a heartbeat; NATS uses 4–9 s,
//! Redpanda 1.5 s.
//!
//! # Writes
//!
//! Key-value writes go through one queue per node (`group_commit`):
//! the writes that arrive while an entry is being committed are proposed
//! together as the next one, so concurrent writers share one log append and
//! one fdatasync on every node.
//!
//! # Reads
//!
//! [`Read::Linearizable`] (the default) asks the leader to confirm it still
//! leads (a round of heartbeats to a majority) and waits until its state
//! machine has applied everything committed before the read began: the
//! answer reflects every write acknowledged before the read started.
//! [`Read::Stale`] answers from this node's state as it is, on any node.
//! Concurrent linearizable reads share the leader's check (`read_fence`):
//! one heartbeat round fences every read that was waiting when it began.
//!
//! # Time
//!
//! Leases end by time, but applying never reads a clock: the leader stamps
//! its wall clock into `GrantLease`, `KeepAlive` and `ExpireLeases`, and
//! proposes `ExpireLeases` itself when the earliest lease is due.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::storage::{self, SharedState};
use crate::types::{
    Command, Event, KeyValue, KvCommand, KvError, KvResponse, LeaseId, MetaCommand, MetaResponse,
    NodeId, Raft, Response, TypeConfig,
};

/// Replicas one queue may have at most.
pub const MAX_QUEUE_REPLICAS: usize = 5;

/// How long a node being added may take to copy the log before the change
/// is abandoned.
pub const CATCH_UP: Duration = Duration::from_secs(60);

/// Raft's timers, in milliseconds. See the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    /// How often a leader sends heartbeats.
    pub heartbeat_ms: u64,
    /// The shortest wait for a heartbeat before a follower stands for election.
    pub election_min_ms: u64,
    /// The longest such wait (each follower draws between the two).
    pub election_max_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: 250,
            election_min_ms: 1000,
            election_max_ms: 2000,
        }
    }
}

impl Timing {
    /// Fast timers for tests on one machine: heartbeat 50 ms, election
    /// 300–600 ms.
    pub fn fast() -> Timing {
        Timing {
            heartbeat_ms: 50,
            election_min_ms: 300,
            election_max_ms: 600,
        }
    }
}

/// How a node joins the cluster.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NodeConfig {
    /// This node's id (from 1).
    pub id: NodeId,
    /// The address the other members reach this node at.
    pub address: String,
    /// Every member the cluster starts with, this node included, with
    /// their addresses. Every founding member must be given the same set:
    /// the lowest id initializes the cluster with it at once, the others
    /// if they hear from no leader within an election timeout (safe however
    /// many do so, as long as they agree).
    pub members: BTreeMap<NodeId, String>,
    /// Where the Raft log, vote and snapshots live.
    pub data_dir: PathBuf,
    /// Raft's timers.
    pub timing: Timing,
    /// Take a snapshot (and drop the log before it) after this many
    /// entries. Default 10,000.
    pub snapshot_after: u64,
    /// Join a running cluster instead of founding one: a pristine node
    /// then waits to be added (`add_member` on the leader) and never
    /// initializes a cluster of its own. Default false.
    pub join: bool,
    /// The largest message the node's connections carry (the transport's
    /// frame limit): snapshots travel in chunks well under it. Default
    /// 4 MiB, the transport's default.
    pub max_message: usize,
    /// How long a node being added may take to copy the log. Default
    /// [`CATCH_UP`].
    pub catch_up: Duration,
    /// Take a snapshot after this many bytes of applied writes too, even
    /// before `snapshot_after` entries (entries carrying batches can be
    /// large, and the log between snapshots is kept in memory). Default
    /// 64 MiB.
    pub snapshot_bytes: u64,
}

/// The smallest frame limit a cluster member accepts: the largest value
/// the store takes, with room for its key and Raft's framing.
pub const MIN_MESSAGE: usize = crate::state::MAX_VALUE_LEN + 64 * 1024;

impl NodeConfig {
    /// A node `id` at `address`, founding a cluster of `members`, with its
    /// state under `data_dir`.
    pub fn new(
        id: NodeId,
        address: impl Into<String>,
        members: BTreeMap<NodeId, String>,
        data_dir: impl Into<PathBuf>,
    ) -> NodeConfig {
        NodeConfig {
            id,
            address: address.into(),
            members,
            data_dir: data_dir.into(),
            timing: Timing::default(),
            snapshot_after: 10_000,
            join: false,
            max_message: 4 * 1024 * 1024,
            catch_up: CATCH_UP,
            snapshot_bytes: SNAPSHOT_BYTES,
        }
    }

    /// The same with other timers.
    pub fn with_timing(mut self, timing: Timing) -> NodeConfig {
        self.timing = timing;
        self
    }

    /// The same, joining a running cluster (see [`NodeConfig::join`]).
    pub fn joining(mut self) -> NodeConfig {
        self.join = true;
        self
    }

    /// The same with another size at which to take a snapshot.
    pub fn with_snapshot_bytes(mut self, bytes: u64) -> NodeConfig {
        self.snapshot_bytes = bytes.max(1);
        self
    }

    /// The same with another catch-up limit for nodes being added.
    pub fn with_catch_up(mut self, limit: Duration) -> NodeConfig {
        self.catch_up = limit;
        self
    }

    /// The same with another frame limit (see [`NodeConfig::max_message`]).
    pub fn with_max_message(mut self, bytes: usize) -> NodeConfig {
        self.max_message = bytes;
        self
    }

    /// The same with another snapshot interval.
    pub fn with_snapshot_after(mut self, entries: u64) -> NodeConfig {
        self.snapshot_after = entries.max(1);
        self
    }
}

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Read {
    /// Reflects every write acknowledged before the read began (asks the
    /// leader).
    #[default]
    Linearizable,
    /// This node's state as it is: possibly behind, never ahead of the
    /// leader, from any node.
    Stale,
}

/// Why a cluster operation failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ClusterError {
    /// This node is not the leader; try `leader` at `address` (if known).
    /// Nothing was done.
    #[error("not the leader{}", match (leader, address) {
        (Some(id), Some(addr)) => format!(": node {id} at {addr} is"),
        (Some(id), None) => format!(": node {id} is"),
        _ => String::new(),
    })]
    NotLeader {
        /// The leader this node knows of.
        leader: Option<NodeId>,
        /// Its address.
        address: Option<String>,
    },
    /// No quorum, shutting down, or storage failing; the operation may or
    /// may not have taken effect if it was a write.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// A key-value rule refused the operation; nothing changed.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A membership change that cannot be made.
    #[error("membership: {0}")]
    Membership(String),
    /// The caller may not do this (see the broker's `[auth]`).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl ClusterError {
    /// What kind of failure this is, as an
    /// [`ErrorKind`](courier_transport::ErrorKind) shared by every Courier
    /// mechanism: not the leader, or no quorum, is `Unavailable`; a
    /// permission denial `Refused` (as it is for queues, pub/sub and RPC);
    /// a key-value rule's refusal [`KvError::kind`]; a membership change
    /// that cannot be made `Conflict`.
    pub fn kind(&self) -> courier_transport::ErrorKind {
        use courier_transport::ErrorKind;
        match self {
            ClusterError::NotLeader { .. } | ClusterError::Unavailable(_) => ErrorKind::Unavailable,
            ClusterError::Kv(err) => err.kind(),
            ClusterError::Membership(_) => ErrorKind::Conflict,
            ClusterError::PermissionDenied(_) => ErrorKind::Refused,
        }
    }

    /// Whether the same operation, sent again (to the leader), may succeed:
    /// whether its [`kind`](Self::kind) is retryable. For a write, only
    /// [`ClusterError::NotLeader`] says it was not applied; after
    /// [`ClusterError::Unavailable`] it may have been, so send it again
    /// only if applying it twice is harmless.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration does not describe a cluster this node is in.
    #[error("cluster configuration: {0}")]
    Config(String),
    /// The node's storage could not be opened.
    #[error(transparent)]
    Storage(#[from] storage::StorageOpenError),
    /// Raft refused to start.
    #[error("raft: {0}")]
    Raft(String),
}

impl StartError {
    /// What kind of failure this is: a configuration that does not
    /// describe this node's cluster is
    /// [`InvalidInput`](courier_transport::ErrorKind::InvalidInput),
    /// storage or Raft refusing to start
    /// [`Internal`](courier_transport::ErrorKind::Internal).
    pub fn kind(&self) -> courier_transport::ErrorKind {
        use courier_transport::ErrorKind;
        match self {
            StartError::Config(_) => ErrorKind::InvalidInput,
            StartError::Storage(_) | StartError::Raft(_) => ErrorKind::Internal,
        }
    }
}

/// A member as `status` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Its address.
    pub address: String,
    /// Whether it votes (a learner does not).
    pub voter: bool,
    /// On the leader: how many entries this member is behind the leader's
    /// log (`None`: unknown, or not asked of a leader).
    pub lag: Option<u64>,
}

/// One node's view of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The node answering.
    pub node: NodeId,
    /// Its role: "leader", "follower", "candidate", "learner" or "shutdown".
    pub role: String,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// Its last log index.
    pub last_log_index: u64,
    /// The last entry its state machine applied.
    pub applied_index: u64,
    /// The key-value store's revision here.
    pub revision: u64,
    /// Every member.
    pub members: Vec<Member>,
    /// Leader changes this node has seen since it started.
    pub leader_changes: u64,
    /// The answering node's pub/sub routes to the others (empty where
    /// none are hosted).
    pub routes: Vec<courier_pubsub::route::RouteStats>,
}

/// One cluster member.
pub struct ClusterNode {
    id: NodeId,
    raft: Raft,
    shared: SharedState,
    tasks: Vec<JoinHandle<()>>,
    leader_changes: Arc<std::sync::atomic::AtomicU64>,
    probe: courier_queue::log::DurableProbe,
    catch_up: Duration,
    /// Key-value writes waiting for [`group_commit`].
    writes: mpsc::Sender<QueuedWrite>,
    /// Linearizable reads waiting for [`read_fence`].
    reads: mpsc::Sender<oneshot::Sender<Result<(), ClusterError>>>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The wall clock the leader stamps into time-dependent commands.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Founds a pristine group (`initialize`) with `members`.
///
/// Every founding member calling `initialize` at once is safe (they agree
/// on the members) but slow: each stands for election in the same term,
/// the votes split, and nobody leads until a randomized election timeout
/// later (seconds, with the default timers, for every new queue). So only
/// `founder` founds at once, and wins its first election in one round
/// trip; the others found too only if, an election timeout later, nothing
/// from a leader has reached them (the founder down or slow), which is
/// the old behaviour. With no founder named, all found at once.
///
/// Returns the fallback's task, for the caller to abort when it stops.
pub(crate) async fn found(
    raft: &Raft,
    members: &BTreeMap<NodeId, String>,
    me: NodeId,
    founder: Option<NodeId>,
    timing: Timing,
    group: crate::types::GroupId,
) -> Option<tokio::task::JoinHandle<()>> {
    let members: BTreeMap<NodeId, BasicNode> = members
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr)))
        .collect();
    let founder = founder.filter(|id| members.contains_key(id));
    if founder.is_none_or(|id| id == me) {
        // `NotAllowed` means another one got there first.
        if let Err(e) = raft.initialize(members).await {
            tracing::debug!(node = me, group, "initialize: {e}");
        }
        return None;
    }
    let raft = raft.clone();
    let patience = Duration::from_millis(timing.election_max_ms);
    Some(tokio::spawn(async move {
        tokio::time::sleep(patience).await;
        if let Ok(false) = raft.is_initialized().await {
            tracing::info!(
                node = me,
                group,
                ?founder,
                "the founder is silent; founding"
            );
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(node = me, group, "initialize: {e}");
            }
        }
    }))
}

fn raft_config(config: &NodeConfig) -> Result<Config, StartError> {
    raft_config_for(config.timing, config.snapshot_after, config.max_message)
}

/// openraft's configuration for any group with these timers and limits.
pub(crate) fn raft_config_for(
    timing: Timing,
    snapshot_after: u64,
    max_message: usize,
) -> Result<Config, StartError> {
    let raft = Config {
        cluster_name: "courier".into(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_min_ms,
        election_timeout_max: timing.election_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_after),
        // Chunks of a quarter of the frame limit leave room for the
        // request's own fields and the framing.
        snapshot_max_chunk_size: (max_message / 4) as u64,
        // Keep some log behind a snapshot, so a briefly lagging follower
        // catches up from the log instead of a whole snapshot.
        max_in_snapshot_log_to_keep: snapshot_after.min(100),
        ..Default::default()
    };
    raft.validate()
        .map_err(|e| StartError::Config(e.to_string()))
}

impl ClusterNode {
    /// Open the node's storage under `config.data_dir`, start its Raft with
    /// `network`, and, if its log is pristine, found the cluster of
    /// `config.members`.
    pub async fn start<N>(config: NodeConfig, network: N) -> Result<ClusterNode, StartError>
    where
        N: RaftNetworkFactory<TypeConfig>,
    {
        if config.id == 0 {
            return Err(StartError::Config("node ids start at 1".into()));
        }
        if config.max_message < MIN_MESSAGE {
            return Err(StartError::Config(format!(
                "a frame limit of {} bytes cannot carry the store's largest value: at least {MIN_MESSAGE} is needed",
                config.max_message
            )));
        }
        if !config.members.contains_key(&config.id) {
            return Err(StartError::Config(format!(
                "node {} is not among the members {:?}",
                config.id,
                config.members.keys().collect::<Vec<_>>()
            )));
        }
        let raft_config = Arc::new(raft_config(&config)?);
        let (log, machine) = storage::open(&config.data_dir.join("raft")).await?;
        let shared = machine.shared();
        let probe = log.durable_probe();
        let raft = Raft::new(config.id, raft_config, network, log, machine)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let pristine = !raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let mut tasks = Vec::new();
        if pristine && !config.join {
            // The lowest id founds the cluster at once; the others only if
            // it has not reached them within an election timeout.
            let founder = config.members.keys().next().copied();
            tasks.extend(
                found(
                    &raft,
                    &config.members,
                    config.id,
                    founder,
                    config.timing,
                    crate::types::METADATA_GROUP,
                )
                .await,
            );
        }
        let leader_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (writes, queued) = mpsc::channel(WRITE_QUEUE);
        let (reads, waiting) = mpsc::channel(WRITE_QUEUE);
        tasks.extend([
            tokio::spawn(group_commit(raft.clone(), config.id, queued)),
            tokio::spawn(read_fence(raft.clone(), waiting)),
            tokio::spawn(snapshot_by_size(
                raft.clone(),
                shared.clone(),
                config.id,
                config.snapshot_bytes,
            )),
            tokio::spawn(expire_leases(
                raft.clone(),
                shared.clone(),
                config.id,
                writes.clone(),
            )),
            tokio::spawn(count_leader_changes(raft.clone(), leader_changes.clone())),
        ]);
        Ok(ClusterNode {
            id: config.id,
            raft,
            shared,
            tasks,
            leader_changes,
            probe,
            catch_up: config.catch_up,
            writes,
            reads,
        })
    }

    /// FOR TESTS (power loss): what of this node's Raft log is fsynced.
    #[doc(hidden)]
    pub fn durable_probe(&self) -> &courier_queue::log::DurableProbe {
        &self.probe
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The metadata group's Raft (for the network host and metrics).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Propose `command` and wait until it is committed and applied here.
    pub async fn write(&self, command: Command) -> Result<Response, ClusterError> {
        match self.raft.client_write(command).await {
            Ok(written) => Ok(written.data),
            Err(e) => Err(write_error(e)),
        }
    }

    /// Run a key-value request. Time-dependent requests are stamped with
    /// this node's clock; only the leader accepts writes, so it is always
    /// the leader's.
    pub async fn kv(&self, request: KvRequest) -> Result<KvResponse, ClusterError> {
        self.kv_as(request, None).await
    }

    /// [`Self::kv`] for the identity `who`, which owns the leases it grants
    /// (the service refuses other identities' keep-alives and revocations).
    pub async fn kv_as(
        &self,
        request: KvRequest,
        who: Option<String>,
    ) -> Result<KvResponse, ClusterError> {
        let command = match request {
            KvRequest::Put {
                key,
                value,
                condition,
                lease,
            } => KvCommand::Put {
                key,
                value,
                condition,
                lease,
            },
            KvRequest::Delete { key, condition } => KvCommand::Delete { key, condition },
            KvRequest::GrantLease { ttl_ms } => KvCommand::GrantLease {
                ttl_ms,
                now_ms: now_ms(),
                owner: who,
            },
            // On behalf of the caller: applying refuses another identity's
            // lease (anonymous callers of an open broker own nothing, so
            // they act on unowned leases only).
            KvRequest::KeepAlive { lease } => KvCommand::KeepAliveAs {
                lease,
                now_ms: now_ms(),
                by: who,
            },
            KvRequest::RevokeLease { lease } => KvCommand::RevokeLeaseAs { lease, by: who },
            KvRequest::Compact { revision } => KvCommand::Compact { revision },
        };
        // Limits that need no state are checked before the write is
        // queued: an entry too large for a frame would never replicate.
        crate::state::ClusterState::check_command(&command)?;
        let (answer, answered) = oneshot::channel();
        self.writes
            .send((command, answer))
            .await
            .map_err(|_| ClusterError::Unavailable("node shutting down".into()))?;
        match answered.await {
            Ok(Ok(KvResponse::Failed(e))) => Err(ClusterError::Kv(e)),
            Ok(answer) => answer,
            Err(_) => Err(ClusterError::Unavailable(
                "node shutting down; the write may or may not have been applied".into(),
            )),
        }
    }

    /// Wait until a read at `read` may be served here.
    async fn ready_to_read(&self, read: Read) -> Result<(), ClusterError> {
        if read == Read::Linearizable {
            let (ready, fenced) = oneshot::channel();
            self.reads
                .send(ready)
                .await
                .map_err(|_| ClusterError::Unavailable("node shutting down".into()))?;
            fenced
                .await
                .map_err(|_| ClusterError::Unavailable("node shutting down".into()))??;
        }
        Ok(())
    }

    /// One key, and the store's revision the answer is at.
    pub async fn get(
        &self,
        key: &str,
        read: Read,
    ) -> Result<(Option<KeyValue>, u64), ClusterError> {
        self.ready_to_read(read).await?;
        let state = self.shared.read();
        Ok((state.get(key).cloned(), state.revision()))
    }

    /// Keys under `prefix`, at most `limit`, and the revision.
    pub async fn list(
        &self,
        prefix: &str,
        limit: usize,
        read: Read,
    ) -> Result<(Vec<KeyValue>, u64), ClusterError> {
        self.ready_to_read(read).await?;
        let state = self.shared.read();
        Ok((state.list(prefix, limit), state.revision()))
    }

    /// One page of keys under `prefix` after `start_after`: at most `limit`
    /// keys and `max_bytes` of keys and values (one key alone may exceed
    /// it), whether more follow, and the revision.
    pub async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        max_bytes: usize,
        read: Read,
    ) -> Result<(Vec<KeyValue>, bool, u64), ClusterError> {
        self.ready_to_read(read).await?;
        let state = self.shared.read();
        let (kvs, more) = state.list_page(prefix, start_after, limit, max_bytes);
        Ok((kvs, more, state.revision()))
    }

    /// Changes under `prefix` from revision `from` on, waiting until there
    /// is at least one, with the revision to ask from next. Revisions come
    /// whole (every event of one revision in one answer), and a wait moves
    /// `from` past every revision it scanned without a match, so an idle
    /// watch on a quiet prefix never rescans history. Cancel-safe: dropping
    /// the future loses nothing, since the caller asks again from the same
    /// revision.
    pub async fn next_events(
        &self,
        prefix: &str,
        mut from: u64,
        limit: usize,
    ) -> Result<(Vec<Event>, u64), ClusterError> {
        let mut applied = self.shared.revision_watch();
        loop {
            let (events, next) =
                self.shared
                    .read()
                    .events_since_scanned(prefix, from, limit.max(1))?;
            if !events.is_empty() {
                return Ok((events, next));
            }
            from = next;
            // Wait for the store to move past what was just read.
            applied
                .changed()
                .await
                .map_err(|_| ClusterError::Unavailable("node shutting down".into()))?;
        }
    }

    /// Every retained change under `prefix` from `from` on, as this node
    /// has it (for checks and tools; watches use [`Self::next_events`]).
    pub fn history(&self, prefix: &str, from: u64) -> Result<Vec<Event>, ClusterError> {
        self.shared
            .read()
            .events_since(prefix, from, usize::MAX)
            .map_err(ClusterError::Kv)
    }

    /// Every key this node holds, in key order, as it is here.
    pub fn dump(&self) -> Vec<KeyValue> {
        self.shared.read().list("", usize::MAX)
    }

    /// Lease `id` as this node has it.
    pub fn lease(&self, id: LeaseId) -> Option<crate::state::LeaseInfo> {
        self.shared.read().lease(id)
    }

    /// The owner of lease `id` as this node knows it: `None` if there is no
    /// such lease, `Some(None)` if it has none (granted anonymously).
    pub fn lease_owner(&self, id: LeaseId) -> Option<Option<String>> {
        self.shared.read().lease(id).map(|lease| lease.owner)
    }

    /// The store's revision on this node, without asking the leader.
    pub fn local_revision(&self) -> u64 {
        self.shared.read().revision()
    }

    /// `NotLeader` (with the leader's address) unless this node leads:
    /// openraft checks a membership change against the node's own view
    /// before it checks leadership, so a follower would answer a
    /// membership error where the client needs to be sent on.
    fn lead(&self) -> Result<(), ClusterError> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.current_leader == Some(self.id) && metrics.state == ServerState::Leader {
            return Ok(());
        }
        let address = metrics.current_leader.and_then(|leader| {
            metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|node| node.addr.clone())
        });
        Err(ClusterError::NotLeader {
            leader: metrics.current_leader,
            address,
        })
    }

    /// Add `id` at `address` as a voting member: first as a learner, which
    /// must copy the whole log (or a snapshot) up to the entry that added
    /// it within [`NodeConfig::catch_up`], then into the voters. A node that does not
    /// catch up (nothing listens there, a typo) is removed again and the
    /// change fails, so a dead address never becomes a voter that the
    /// majority would then wait for. Only on the leader.
    pub async fn add_member(&self, id: NodeId, address: String) -> Result<(), ClusterError> {
        self.lead()?;
        let known = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|node| node.addr.clone());
        match known {
            Some(known) if known == address && self.voters().contains(&id) => return Ok(()),
            Some(known) if known != address => {
                return Err(ClusterError::Membership(format!(
                "node {id} is already a member at {known}; remove it first to move it to {address}"
            )))
            }
            _ => {}
        }
        let added = self
            .raft
            .add_learner(id, BasicNode::new(address.clone()), false)
            .await
            .map_err(write_error)?;
        let needed = added.log_id.index;
        let caught_up = async {
            let mut metrics = self.raft.metrics();
            loop {
                let matched = metrics
                    .borrow()
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map(|m| m.index);
                if matched.is_some_and(|m| m >= needed) {
                    return Ok(());
                }
                if metrics.changed().await.is_err() {
                    return Err(ClusterError::Unavailable("raft stopped".into()));
                }
            }
        };
        let limit = self.catch_up;
        match tokio::time::timeout(limit, caught_up).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                // Not a voter, and better not left as a learner either.
                let _ = self
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                    .await;
                return Err(ClusterError::Membership(format!(
                    "node {id} at {address} did not catch up within {limit:?} (is it running, with --join?); it was not added"
                )));
            }
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(write_error)?;
        Ok(())
    }

    /// Remove `id` from the cluster. Only on the leader; the cluster must
    /// keep at least one voter.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), ClusterError> {
        self.lead()?;
        let voters = self.voters();
        if voters.contains(&id) && voters.len() == 1 {
            return Err(ClusterError::Membership(
                "cannot remove the last voter".into(),
            ));
        }
        // One change for a voter: `retain = false` drops it from the nodes
        // too. Two would break when the leader removes itself, since it is
        // no longer the leader when the second one would be proposed.
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(write_error)?;
        Ok(())
    }

    /// The queues declared in the metadata group, as applied here: name →
    /// replicas (see [`crate::types::queue_group_id`] for each one's group).
    pub fn declared_queues(&self) -> BTreeMap<String, Vec<NodeId>> {
        self.shared.read().queues().clone()
    }

    /// The replicas of queue `name`, if it is declared (as applied here).
    pub fn declared_queue(&self, name: &str) -> Option<Vec<NodeId>> {
        self.shared.read().queues().get(name).cloned()
    }

    /// Every member (voters and learners) and its address, in the
    /// membership in effect here.
    pub fn member_addresses(&self) -> BTreeMap<NodeId, String> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect()
    }

    /// The metadata leader this node knows of, with its address.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader?;
        let address = m
            .membership_config
            .membership()
            .get_node(&leader)?
            .addr
            .clone();
        Some((leader, address))
    }

    /// On the metadata leader: declares queue `name` with `count` replicas
    /// (1 to [`MAX_QUEUE_REPLICAS`], at most the voters), placed where the fewest queues are
    /// held, this node first among equals; an existing declaration is kept
    /// as it is. Returns the replicas. `NotLeader` on any other node.
    pub async fn declare_queue(
        &self,
        name: &str,
        count: usize,
    ) -> Result<Vec<NodeId>, ClusterError> {
        if let Some(replicas) = self.declared_queue(name) {
            return Ok(replicas);
        }
        let voters = self.voters();
        let count = count.clamp(1, MAX_QUEUE_REPLICAS).min(voters.len().max(1));
        let mut load: BTreeMap<NodeId, usize> = voters.iter().map(|id| (*id, 0)).collect();
        for replicas in self.shared.read().queues().values() {
            for id in replicas {
                if let Some(held) = load.get_mut(id) {
                    *held += 1;
                }
            }
        }
        // The first replica is the preferred leader: spread the firsts by
        // rotating the order by the queue's hash.
        let mut candidates: Vec<NodeId> = load.keys().copied().collect();
        let turn = crate::types::queue_group_id(name) as usize % candidates.len().max(1);
        candidates.rotate_left(turn);
        candidates.sort_by_key(|id| load[id]);
        candidates.truncate(count);
        match self
            .write(Command::Meta(MetaCommand::DeclareQueue {
                name: name.to_owned(),
                replicas: candidates,
            }))
            .await?
        {
            Response::Meta(MetaResponse::Declared { replicas, .. }) => Ok(replicas),
            Response::Meta(MetaResponse::Invalid(why)) => {
                Err(ClusterError::Kv(KvError::Invalid(why)))
            }
            other => Err(ClusterError::Unavailable(format!(
                "unexpected answer to a declaration: {other:?}"
            ))),
        }
    }

    /// Whether this node took over its replica of queue `name` after the
    /// queue was founded: it then joins the group, never founds it.
    pub fn joined_queue(&self, name: &str) -> bool {
        self.shared.read().joined_queue(name, self.id)
    }

    /// The queues whose replicas should change to keep them on voters,
    /// `count` of each (1 to [`MAX_QUEUE_REPLICAS`], at most the voters):
    /// `(name, replicas now, replicas wanted)`, at most `limit` of them. A
    /// replica on a node that is no longer a voter is handed to the voter
    /// holding the fewest queues among those holding none of this one, or
    /// dropped if none is free; a queue with fewer replicas than `count`
    /// grows the same way. A queue with no replica left on a voter is not
    /// planned: nothing holds its data to copy from.
    pub fn queue_plans(
        &self,
        count: usize,
        limit: usize,
    ) -> Vec<(String, Vec<NodeId>, Vec<NodeId>)> {
        let voters = self.voters();
        let state = self.shared.read();
        let mut load: BTreeMap<NodeId, usize> = voters.iter().map(|id| (*id, 0)).collect();
        for held in state.queues().values() {
            for id in held {
                if let Some(n) = load.get_mut(id) {
                    *n += 1;
                }
            }
        }
        state
            .queues()
            .iter()
            .filter_map(|(name, current)| {
                let to = replan(current, &load, count)?;
                Some((name.clone(), current.clone(), to))
            })
            .take(limit)
            .collect()
    }

    /// On the metadata leader: changes queue `name`'s replicas from `from`
    /// (refused if they are no longer that) to `to`. Returns the replicas.
    pub async fn change_queue_replicas(
        &self,
        name: &str,
        from: Vec<NodeId>,
        to: Vec<NodeId>,
    ) -> Result<Vec<NodeId>, ClusterError> {
        match self
            .write(Command::Meta(MetaCommand::ChangeQueueReplicas {
                name: name.to_owned(),
                from,
                to,
            }))
            .await?
        {
            Response::Meta(MetaResponse::Declared { replicas, .. }) => Ok(replicas),
            Response::Meta(MetaResponse::Invalid(why)) => {
                Err(ClusterError::Kv(KvError::Invalid(why)))
            }
            other => Err(ClusterError::Unavailable(format!(
                "unexpected answer to a replica change: {other:?}"
            ))),
        }
    }

    /// The voters of the metadata group, in the membership in effect here.
    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.voters()
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// This node's view: role, leader, term, members and (on the leader)
    /// each member's lag.
    pub fn status(&self) -> Status {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let last = metrics.last_log_index.unwrap_or(0);
        let members = membership
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
        Status {
            node: self.id,
            role: match metrics.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .to_string(),
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_log_index: last,
            applied_index: metrics.last_applied.map_or(0, |l| l.index),
            revision: self.local_revision(),
            members,
            leader_changes: self
                .leader_changes
                .load(std::sync::atomic::Ordering::Relaxed),
            routes: Vec::new(),
        }
    }

    /// Stop Raft and the node's timers. The storage is closed (and synced)
    /// as Raft drops it.
    pub async fn shutdown(self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(node = self.id, "raft shutdown: {e}");
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A key-value request as a client sends it: like [`KvCommand`], without
/// the clock readings only the leader may supply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvRequest {
    /// See [`KvCommand::Put`].
    Put {
        /// The key.
        key: String,
        /// The value.
        value: bytes::Bytes,
        /// What must hold first.
        condition: crate::types::Condition,
        /// The lease to attach the key to.
        lease: Option<LeaseId>,
    },
    /// See [`KvCommand::Delete`].
    Delete {
        /// The key.
        key: String,
        /// What must hold first.
        condition: crate::types::Condition,
    },
    /// A new lease of `ttl_ms`.
    GrantLease {
        /// Its time to live.
        ttl_ms: u64,
    },
    /// Renew a lease for its time to live.
    KeepAlive {
        /// The lease.
        lease: LeaseId,
    },
    /// End a lease and delete its keys.
    RevokeLease {
        /// The lease.
        lease: LeaseId,
    },
    /// Forget history before `revision`.
    Compact {
        /// The oldest revision to keep.
        revision: u64,
    },
}

/// The replicas a queue on `current` should have, given the voters and
/// how many queues each holds (`load`) and the replica count wanted:
/// replicas on voters stay in place; those elsewhere are replaced, then
/// the set is filled up to `count` (at most the voters; never shrunk
/// for being over it), each time with
/// the free voter holding the fewest queues (lowest id among equals).
/// `None` if nothing should change, or if no replica is on a voter.
fn replan(current: &[NodeId], load: &BTreeMap<NodeId, usize>, count: usize) -> Option<Vec<NodeId>> {
    let count = count.clamp(1, MAX_QUEUE_REPLICAS).min(load.len());
    let mut next: Vec<NodeId> = Vec::with_capacity(count);
    let free = |next: &[NodeId]| {
        load.iter()
            .filter(|(id, _)| !current.contains(id) && !next.contains(id))
            .min_by_key(|(id, n)| (**n, **id))
            .map(|(id, _)| *id)
    };
    // In place, so the first replica (the preferred leader) stays first.
    for id in current {
        if load.contains_key(id) {
            next.push(*id);
        } else if let Some(other) = free(&next) {
            next.push(other);
        }
    }
    if !next.iter().any(|id| current.contains(id)) {
        return None;
    }
    // Never fewer than now while voters are free: another leader may be
    // configured with a smaller count, and that is no reason to shrink.
    while next.len() < count {
        let Some(other) = free(&next) else { break };
        next.push(other);
    }
    (next != current).then_some(next)
}

pub(crate) fn write_error(
    e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ClusterError::NotLeader {
                leader: forward.leader_id,
                address: forward.leader_node.map(|n| n.addr),
            }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ClusterError::Membership(e.to_string())
        }
        RaftError::Fatal(e) => ClusterError::Unavailable(e.to_string()),
    }
}

/// On the leader: propose `ExpireLeases` when the earliest lease is due.
/// Followers do nothing; a new leader picks up where the old one stopped,
/// since the deadlines live in the replicated state.
///
/// A leader that has just taken over first renews every lease from its own
/// clock (as etcd does on promotion): during the election nobody could keep
/// a lease alive, and a deadline stamped by the old leader's clock says
/// nothing about this one's.
///
/// Both go through the write queue like every other key-value write, so a
/// keep-alive that reached the leader before an expiry is logged before it.
async fn expire_leases(
    raft: Raft,
    shared: SharedState,
    id: NodeId,
    writes: mpsc::Sender<QueuedWrite>,
) {
    let write = |command: KvCommand| {
        let writes = writes.clone();
        async move {
            let (answer, answered) = oneshot::channel();
            writes
                .send((command, answer))
                .await
                .map_err(|_| ClusterError::Unavailable("node shutting down".into()))?;
            answered
                .await
                .map_err(|_| ClusterError::Unavailable("node shutting down".into()))?
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The term in which this node last renewed the leases as leader.
    let mut renewed_in: Option<u64> = None;
    loop {
        tick.tick().await;
        let (leader, term) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            (m.current_leader, m.current_term)
        };
        if leader != Some(id) {
            continue;
        }
        if renewed_in != Some(term) {
            match write(KvCommand::RenewAllLeases { now_ms: now_ms() }).await {
                Ok(_) => renewed_in = Some(term),
                Err(e) => tracing::debug!(node = id, "renewing leases: {e}"),
            }
            continue;
        }
        let now = now_ms();
        let next = shared.read().next_lease_deadline();
        let due = next.is_some_and(|deadline| deadline <= now);
        if due {
            if let Err(e) = write(KvCommand::ExpireLeases { now_ms: now }).await {
                tracing::debug!(node = id, "expiring leases: {e}");
            }
        }
    }
}

/// A key-value write and where its answer goes.
type QueuedWrite = (KvCommand, oneshot::Sender<Result<KvResponse, ClusterError>>);

/// Bytes of applied writes after which a node asks for a snapshot even if
/// fewer than `snapshot_after` entries came.
const SNAPSHOT_BYTES: u64 = 64 * 1024 * 1024;

/// How long a linearizable read waits for the leader to confirm itself.
const READ_FENCE_LIMIT: Duration = Duration::from_secs(5);

/// Writes waiting to be proposed; past this, `kv` waits (backpressure).
const WRITE_QUEUE: usize = 4096;
/// Most commands in one entry.
const BATCH_COMMANDS: usize = 512;
/// Most key and value bytes in one entry (beyond a single larger command),
/// well under the frame limit an entry travels in.
const BATCH_BYTES: usize = 512 * 1024;

/// Group commit: writes that arrive while an entry is being committed are
/// proposed together as the next entry, so many concurrent writes share
/// one log append and one fdatasync on each node (openraft flushes each
/// entry it is given before taking the next). A write alone is proposed at
/// once, as a plain `Command::Kv`. A write whose caller has gone before it
/// is proposed is dropped, never applied.
async fn group_commit(raft: Raft, id: NodeId, mut queued: mpsc::Receiver<QueuedWrite>) {
    // A write that would have pushed the last batch past its budget opens
    // the next one, so an entry holds at most BATCH_BYTES unless it is one
    // command alone (at most a value and a key: under MIN_MESSAGE).
    let mut carried: Option<QueuedWrite> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match queued.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut bytes = command_bytes(&first.0);
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS {
            match queued.try_recv() {
                Ok(next) if bytes + command_bytes(&next.0) > BATCH_BYTES => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += command_bytes(&next.0);
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        batch.retain(|(_, answer)| !answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        let (commands, answers): (Vec<KvCommand>, Vec<_>) = batch.into_iter().unzip();
        let single = commands.len() == 1;
        let entry = if single {
            Command::Kv(commands.into_iter().next().expect("one command"))
        } else {
            Command::KvBatch(commands)
        };
        let results = match propose(&raft, id, entry).await {
            Ok(Response::Kv(answer)) if single => vec![Ok(answer)],
            Ok(Response::KvBatch(results)) if results.len() == answers.len() => {
                results.into_iter().map(Ok).collect()
            }
            Ok(other) => {
                let e = ClusterError::Unavailable(format!(
                    "unexpected answer to a key-value write: {other:?}"
                ));
                vec![Err(e); answers.len()]
            }
            Err(e) => vec![Err(e); answers.len()],
        };
        for (tx, result) in answers.into_iter().zip(results) {
            let _ = tx.send(result);
        }
    }
}

/// Propose `entry` and wait for its answer, but not past this node's
/// leadership: openraft answers a proposal only when the entry is applied
/// or truncated, and an old leader's entry can be purged by an installed
/// snapshot instead, leaving it unanswered. If the node stops leading (or
/// a new term begins) while waiting, the write may or may not be applied.
pub(crate) async fn propose(
    raft: &Raft,
    id: NodeId,
    entry: Command,
) -> Result<Response, ClusterError> {
    let mut metrics = raft.metrics();
    let (term, leading) = {
        let m = metrics.borrow_and_update();
        (m.current_term, m.current_leader == Some(id))
    };
    if !leading {
        // Not (yet) the leader: openraft answers at once, with where the
        // leader is, and nothing waits on this node's log.
        return raft
            .client_write(entry)
            .await
            .map(|w| w.data)
            .map_err(write_error);
    }
    let deposed = async {
        loop {
            {
                let m = metrics.borrow_and_update();
                if m.current_term != term || m.current_leader != Some(id) {
                    return;
                }
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        biased;
        written = raft.client_write(entry) => written.map(|w| w.data).map_err(write_error),
        () = deposed => Err(ClusterError::Unavailable(
            "leadership changed while the write was in flight; it may or may not have been applied".into(),
        )),
    }
}

/// As [`propose`], in two steps, so that a caller can keep several entries
/// in flight: awaiting this hands `entry` to Raft (entries go into the log
/// in the order of these calls), and the future it returns waits until the
/// entry is committed and applied here, or this node stops leading.
pub(crate) async fn propose_ordered(
    raft: &Raft,
    id: NodeId,
    entry: Command,
) -> impl std::future::Future<Output = Result<Response, ClusterError>> + Send + 'static {
    let mut metrics = raft.metrics();
    let (term, leading) = {
        let m = metrics.borrow_and_update();
        (m.current_term, m.current_leader == Some(id))
    };
    let sent = raft.client_write_ff(entry).await;
    async move {
        let answered = match sent {
            Ok(answered) => answered,
            Err(fatal) => return Err(ClusterError::Unavailable(fatal.to_string())),
        };
        type Written = Result<
            openraft::raft::ClientWriteResponse<TypeConfig>,
            ClientWriteError<NodeId, BasicNode>,
        >;
        let answer = |answer: Result<Written, _>| match answer {
            Ok(Ok(written)) => Ok(written.data),
            Ok(Err(e)) => Err(write_error(RaftError::APIError(e))),
            Err(_) => Err(ClusterError::Unavailable(
                "raft stopped; the write may or may not have been applied".into(),
            )),
        };
        if !leading {
            // Not (yet) the leader: openraft answers at once, with where
            // the leader is.
            return answer(answered.await);
        }
        let deposed = async {
            loop {
                {
                    let m = metrics.borrow_and_update();
                    if m.current_term != term || m.current_leader != Some(id) {
                        return;
                    }
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            biased;
            written = answered => answer(written),
            () = deposed => Err(ClusterError::Unavailable(
                "leadership changed while the write was in flight; it may or may not have been applied".into(),
            )),
        }
    }
}

/// Linearizable reads share the leader's check: every read waiting when a
/// check starts is answered by it (it began after they did, so it fences
/// them all), and reads that arrive during a check wait for the next one.
/// One heartbeat round then serves any number of concurrent reads.
async fn read_fence(
    raft: Raft,
    mut waiting: mpsc::Receiver<oneshot::Sender<Result<(), ClusterError>>>,
) {
    while let Some(first) = waiting.recv().await {
        let mut readers = vec![first];
        while let Ok(next) = waiting.try_recv() {
            readers.push(next);
        }
        readers.retain(|reader| !reader.is_closed());
        if readers.is_empty() {
            continue;
        }
        // Bounded: a leader deposed before its term's first entry commits
        // would otherwise hold every read on this node behind it.
        let fenced = match tokio::time::timeout(READ_FENCE_LIMIT, raft.ensure_linearizable()).await
        {
            Err(_) => Err(ClusterError::Unavailable(
                "could not confirm the leadership in time".into(),
            )),
            Ok(fenced) => {
                fenced
                    .map(|_| ())
                    .map_err(|e| match e.forward_to_leader::<BasicNode>() {
                        Some(forward) => ClusterError::NotLeader {
                            leader: forward.leader_id,
                            address: forward.leader_node.as_ref().map(|n| n.addr.clone()),
                        },
                        None => ClusterError::Unavailable(e.to_string()),
                    })
            }
        };
        for reader in readers {
            let _ = reader.send(fenced.clone());
        }
    }
}

/// Roughly what a command adds to an entry.
fn command_bytes(command: &KvCommand) -> usize {
    match command {
        KvCommand::Put { key, value, .. } => key.len() + value.len() + 16,
        KvCommand::Delete { key, .. } => key.len() + 16,
        _ => 32,
    }
}

/// Snapshots are triggered by entry count, and an entry carrying a whole
/// batch can be large: every node also asks for one after
/// [`NodeConfig::snapshot_bytes`] of applied writes, so the log it keeps in memory
/// between snapshots stays bounded by size too.
async fn snapshot_by_size(raft: Raft, shared: SharedState, id: NodeId, limit: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut at_last = shared.applied_bytes();
    loop {
        tick.tick().await;
        let now = shared.applied_bytes();
        if now.saturating_sub(at_last) >= limit {
            at_last = now;
            if let Err(e) = raft.trigger().snapshot().await {
                tracing::debug!(node = id, "asking for a snapshot: {e}");
            }
        }
    }
}

/// Count how often the known leader changes (a metric).
async fn count_leader_changes(raft: Raft, changes: Arc<std::sync::atomic::AtomicU64>) {
    let mut metrics = raft.metrics();
    let mut leader = metrics.borrow().current_leader;
    while metrics.changed().await.is_ok() {
        let now = metrics.borrow().current_leader;
        if now != leader && now.is_some() {
            changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        leader = now;
    }
}

#[cfg(test)]
mod kind_tests {
    use courier_rpc::RpcError;
    use courier_transport::ErrorKind;

    use super::ClusterError;
    use crate::client::KvClientError;
    use crate::types::KvError;

    #[test]
    fn a_denial_is_refused_and_a_missing_lease_not_found() {
        let denied = ClusterError::PermissionDenied("kv put k".into());
        assert_eq!(denied.kind(), ErrorKind::Refused);
        assert!(!denied.is_retryable());
        let not_owner = ClusterError::Kv(KvError::NotOwner(7));
        assert_eq!(not_owner.kind(), ErrorKind::Refused);
        let denied_call = KvClientError::Rpc(RpcError::PermissionDenied("kv".into()));
        assert_eq!(denied_call.kind(), ErrorKind::Refused);
        assert_eq!(
            ClusterError::Kv(KvError::LeaseNotFound(7)).kind(),
            ErrorKind::NotFound
        );
        let stale = ClusterError::Kv(KvError::ConditionFailed {
            current: None,
            revision: 3,
        });
        assert_eq!(stale.kind(), ErrorKind::Conflict);
    }

    #[test]
    fn retryable_errors_are_exactly_those_of_a_retryable_kind() {
        let not_leader = ClusterError::NotLeader {
            leader: None,
            address: None,
        };
        assert_eq!(not_leader.kind(), ErrorKind::Unavailable);
        assert!(not_leader.is_retryable());
        assert!(ClusterError::Unavailable("no quorum".into()).is_retryable());
        assert!(!ClusterError::Membership("last voter".into()).is_retryable());
        let unreachable = KvClientError::Unreachable(RpcError::Unavailable("refused".into()));
        assert_eq!(unreachable.kind(), ErrorKind::Unavailable);
        assert!(unreachable.is_retryable());
        let late = KvClientError::Rpc(RpcError::DeadlineExceeded);
        assert_eq!(late.kind(), ErrorKind::TimedOut);
    }
}

#[cfg(test)]
mod replan_tests {
    use super::replan;
    use std::collections::BTreeMap;

    fn load(pairs: &[(u64, usize)]) -> BTreeMap<u64, usize> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn a_replica_off_the_voters_goes_to_the_least_loaded_free_voter_in_its_place() {
        // Node 2 left; 4 holds fewer queues than 5.
        let voters = load(&[(1, 3), (3, 3), (4, 1), (5, 2)]);
        assert_eq!(replan(&[1, 2, 3], &voters, 3), Some(vec![1, 4, 3]));
        // The preferred leader left: its place is taken, first.
        assert_eq!(replan(&[2, 1, 3], &voters, 3), Some(vec![4, 1, 3]));
    }

    #[test]
    fn with_no_free_voter_the_replica_is_dropped_and_grows_back_when_one_joins() {
        let two = load(&[(1, 0), (3, 0)]);
        assert_eq!(replan(&[1, 2, 3], &two, 3), Some(vec![1, 3]));
        assert_eq!(replan(&[1, 3], &two, 3), None);
        let three = load(&[(1, 0), (3, 0), (7, 0)]);
        assert_eq!(replan(&[1, 3], &three, 3), Some(vec![1, 3, 7]));
    }

    #[test]
    fn nothing_changes_when_all_is_in_place_or_nothing_is_left() {
        let voters = load(&[(1, 0), (2, 0), (3, 0), (4, 0)]);
        assert_eq!(replan(&[1, 2, 3], &voters, 3), None);
        // Over a smaller count: kept, not shrunk.
        assert_eq!(replan(&[1, 2, 3], &voters, 1), None);
        // Not one replica on a voter: the data is nowhere to copy from.
        assert_eq!(replan(&[8, 9], &voters, 3), None);
    }
}
