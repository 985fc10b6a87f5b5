//! What the cluster agrees on: the Raft type configuration, the commands
//! its log carries and what applying them answers.
//!
//! Every command is applied by every node, in log order, by
//! [`ClusterState::apply`](crate::state::ClusterState::apply). Applying
//! never reads a clock or anything else local: where time matters (lease
//! expiry) the leader stamps its clock into the command, so every replica
//! computes the same state from the same log.

use std::io::Cursor;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A node's identity: an integer from 1, stable for the node's life.
pub type NodeId = u64;

/// A Raft group. Every group's messages share the one connection between
/// two nodes, tagged with this id.
pub type GroupId = u32;

/// The metadata group: membership, declarations and the key-value store.
pub const METADATA_GROUP: GroupId = 0;

/// The group that holds the replicated queue `name`: a 32-bit FNV-1a hash
/// of the name, never [`METADATA_GROUP`]. Every node computes the same one,
/// so a queue's group needs no number in the metadata; the metadata group
/// refuses to declare a queue whose group would be another's.
pub fn queue_group_id(name: &str) -> GroupId {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    if hash == METADATA_GROUP {
        1
    } else {
        hash
    }
}

/// A key-value lease, numbered from 1 in the order leases are granted.
pub type LeaseId = u64;

openraft::declare_raft_types!(
    /// Courier's Raft types: node ids are `u64`, a node is known by one
    /// Courier address (`BasicNode::addr`, for example `tcp://10.0.0.2:7878`),
    /// snapshots are postcard bytes.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle of one group on one node.
pub type Raft = openraft::Raft<TypeConfig>;

/// One entry of the metadata group's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A change to the key-value store.
    Kv(KvCommand),
    /// A declaration (queues, durable subscriptions).
    Meta(MetaCommand),
    /// Key-value commands written together in one entry (group commit:
    /// the writes that arrived while the previous entry was in flight),
    /// applied one after another as if each had its own entry.
    KvBatch(Vec<KvCommand>),
    /// Commands of a queue group (group commit: the commands that arrived
    /// while the previous entry was in flight), applied in order; answered
    /// by [`Response::Queue`], one answer per command.
    Queue(Vec<crate::queue_state::QueueCommand>),
}

/// What a write requires of the key's current state (etcd's compare).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    /// Nothing: write whatever is there.
    #[default]
    Any,
    /// The key must not exist (create only if absent).
    Absent,
    /// The key must exist with exactly this modification revision
    /// (compare-and-set).
    ModRevision(u64),
}

/// A change to the key-value store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Set `key` to `value` if `condition` holds; attached to `lease` if
    /// given (the key goes when the lease does).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Bytes,
        /// What must hold first.
        condition: Condition,
        /// The lease the key lives under, if any.
        lease: Option<LeaseId>,
    },
    /// Remove `key` if `condition` holds.
    Delete {
        /// The key.
        key: String,
        /// What must hold first.
        condition: Condition,
    },
    /// Grant a lease of `ttl_ms`, counted from the leader's `now_ms`,
    /// owned by `owner`.
    GrantLease {
        /// How long the lease lives without a keep-alive.
        ttl_ms: u64,
        /// The proposing leader's clock (milliseconds since the Unix epoch).
        now_ms: u64,
        /// The identity that asked for the lease, stamped by the service
        /// from the authenticated caller (at most
        /// [`MAX_OWNER_LEN`](crate::state::MAX_OWNER_LEN) bytes); `None`
        /// for an anonymous caller (an open broker). Kept with the lease
        /// ([`LeaseInfo::owner`](crate::state::LeaseInfo::owner)) so the
        /// service can refuse keep-alives and revokes by anyone else.
        /// Applying only stores it: it checks nothing against it.
        owner: Option<String>,
    },
    /// Renew a lease: it now ends `ttl_ms` after `now_ms`.
    KeepAlive {
        /// The lease.
        lease: LeaseId,
        /// The proposing leader's clock.
        now_ms: u64,
    },
    /// End a lease now, deleting its keys.
    RevokeLease {
        /// The lease.
        lease: LeaseId,
    },
    /// End every lease whose end is at or before `now_ms`, deleting their
    /// keys. Proposed by the leader on its own timer.
    ExpireLeases {
        /// The proposing leader's clock.
        now_ms: u64,
    },
    /// Forget the change history before `revision`; watches from before it
    /// get [`KvError::Compacted`].
    Compact {
        /// The oldest revision still to be kept.
        revision: u64,
    },
    /// Renew every live lease from `now_ms`: each one's end becomes the
    /// later of its end and `now_ms + ttl_ms`. Proposed by a new leader,
    /// before any [`KvCommand::ExpireLeases`] of its own, so the leases
    /// clients could not keep alive during the election are not expired
    /// the moment it leads (etcd renews every lease on promotion). Moves
    /// no revision; answers [`KvResponse::LeasesRenewed`].
    RenewAllLeases {
        /// The proposing leader's clock.
        now_ms: u64,
    },
    /// [`KvCommand::KeepAlive`] on behalf of identity `by`: refused with
    /// [`KvError::NotOwner`] unless `by` granted the lease (or the lease
    /// has no owner). Checked when applied, so no failover can skip it.
    KeepAliveAs {
        /// The lease.
        lease: LeaseId,
        /// The proposing leader's clock.
        now_ms: u64,
        /// Who asks.
        by: Option<String>,
    },
    /// [`KvCommand::RevokeLease`] on behalf of identity `by`, checked like
    /// [`KvCommand::KeepAliveAs`].
    RevokeLeaseAs {
        /// The lease.
        lease: LeaseId,
        /// Who asks.
        by: Option<String>,
    },
}

/// A declaration in the metadata group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Declare a queue with its replicas (chosen by the leader when it
    /// proposes, so applying is deterministic). Declaring it again with the
    /// same replica count is a no-op.
    DeclareQueue {
        /// The queue's name.
        name: String,
        /// The nodes holding it; the first is its preferred leader.
        replicas: Vec<NodeId>,
    },
    /// Remove a queue's declaration.
    DeleteQueue {
        /// The queue's name.
        name: String,
    },
    /// Declare a durable subscription (a queue fed from a subject filter).
    DeclareDurable {
        /// The subscription's name.
        name: String,
        /// The subject filter it is fed from.
        filter: String,
        /// The nodes holding it.
        replicas: Vec<NodeId>,
    },
    /// Remove a durable subscription's declaration.
    DeleteDurable {
        /// The subscription's name.
        name: String,
    },
    /// Change a queue's replicas from `from` (as the proposer saw them:
    /// refused if they changed since) to `to`, chosen by the leader when it
    /// proposes: a replica on a node that left is handed to another, or
    /// dropped if none is free, and a queue under its replica count grows
    /// when a node joins. The nodes in `to` but not in `from` join the
    /// queue's group instead of founding it; the queue's leader then
    /// changes the group's membership to match.
    ChangeQueueReplicas {
        /// The queue's name.
        name: String,
        /// Its replicas now.
        from: Vec<NodeId>,
        /// Its replicas from then on (sharing one at least with `from`).
        to: Vec<NodeId>,
    },
}

/// A key with its value and history counters (etcd's `KeyValue`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Bytes,
    /// The revision that created the key (since it last did not exist).
    pub create_revision: u64,
    /// The revision of the key's last change.
    pub mod_revision: u64,
    /// Number of writes since creation: 1 after the creating put.
    pub version: u64,
    /// The lease the key lives under.
    pub lease: Option<LeaseId>,
}

/// What a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The key was created or changed.
    Put,
    /// The key was deleted (by a delete, a revoked or expired lease).
    Delete,
}

/// One change, as watches see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after a put; for a delete, the key as it was with
    /// `mod_revision` set to the deleting revision.
    pub kv: KeyValue,
}

/// Why a key-value operation failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    /// The condition did not hold; `current` is the key as it is (or
    /// `None` if absent), at store revision `revision`.
    #[error("condition failed: the key is at revision {}", current.as_ref().map_or(0, |kv| kv.mod_revision))]
    ConditionFailed {
        /// The key now.
        current: Option<KeyValue>,
        /// The store's revision.
        revision: u64,
    },
    /// The lease does not exist (never granted, expired or revoked).
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    /// The lease belongs to another identity.
    #[error("lease {0} belongs to another identity")]
    NotOwner(LeaseId),
    /// History before this revision has been compacted away.
    #[error("revision compacted: history starts at {0}")]
    Compacted(u64),
    /// The key or value breaks a limit, or the store is full.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl KvError {
    /// What kind of refusal this is: a failed condition is
    /// [`Conflict`](courier_transport::ErrorKind::Conflict), a missing
    /// lease or compacted history
    /// [`NotFound`](courier_transport::ErrorKind::NotFound), another
    /// identity's lease [`Refused`](courier_transport::ErrorKind::Refused),
    /// a key or value over a limit
    /// [`InvalidInput`](courier_transport::ErrorKind::InvalidInput). None
    /// is retryable.
    pub fn kind(&self) -> courier_transport::ErrorKind {
        use courier_transport::ErrorKind;
        match self {
            KvError::ConditionFailed { .. } => ErrorKind::Conflict,
            KvError::LeaseNotFound(_) | KvError::Compacted(_) => ErrorKind::NotFound,
            KvError::NotOwner(_) => ErrorKind::Refused,
            KvError::Invalid(_) => ErrorKind::InvalidInput,
        }
    }
}

/// What applying a [`KvCommand`] answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResponse {
    /// A put took effect at `revision`; `prev` is what it replaced.
    Put {
        /// The store's revision after the put.
        revision: u64,
        /// The key before, if it existed.
        prev: Option<KeyValue>,
    },
    /// A delete ran at `revision`; `prev` is what it removed (`None`: there
    /// was nothing, and the revision did not move).
    Deleted {
        /// The store's revision after the delete.
        revision: u64,
        /// The key before, if it existed.
        prev: Option<KeyValue>,
    },
    /// A lease was granted or kept alive.
    Lease {
        /// The lease.
        lease: LeaseId,
        /// Its time to live.
        ttl_ms: u64,
    },
    /// Leases ended (revoked or expired); their keys are gone.
    LeasesEnded {
        /// The leases.
        leases: Vec<LeaseId>,
        /// The store's revision after deleting their keys.
        revision: u64,
    },
    /// History before `revision` is forgotten.
    Compacted {
        /// The new compaction point.
        revision: u64,
    },
    /// The command failed; nothing changed.
    Failed(KvError),
    /// [`KvCommand::RenewAllLeases`] ran: `count` leases' ends moved later
    /// (the others already ended later than `now_ms + ttl_ms`).
    LeasesRenewed {
        /// How many leases' ends moved.
        count: u64,
    },
}

/// What applying a [`MetaCommand`] answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    /// Declared; `existed` if it was already there (and kept as it was).
    Declared {
        /// Whether the declaration was already there.
        existed: bool,
        /// Its replicas as they stand.
        replicas: Vec<NodeId>,
    },
    /// Removed; `existed` says whether there was anything.
    Removed {
        /// Whether there was a declaration.
        existed: bool,
    },
    /// The declaration is invalid (bad name, no replicas, table full).
    Invalid(String),
}

/// What applying any entry answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A blank or membership entry.
    None,
    /// From a key-value command.
    Kv(KvResponse),
    /// From a declaration.
    Meta(MetaResponse),
    /// From a [`Command::KvBatch`]: one answer per command, in order.
    KvBatch(Vec<KvResponse>),
    /// From a [`Command::Queue`]: one answer per command, in order.
    Queue(Vec<crate::queue_state::QueueResponse>),
}
