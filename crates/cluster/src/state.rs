//! The replicated state machine of the metadata group: the key-value store
//! and the declarations, as pure data driven only by the commands applied.
//!
//! Every node applies the same log in the same order with
//! [`ClusterState::apply`], which never reads a clock, a random number or
//! anything else local, so every replica builds the same state and gives
//! the same answers. This module is the definition of the key-value
//! store's behaviour; it follows etcd's semantics.
//!
//! # Revisions
//!
//! The store has one revision, 0 when empty. Every command that changes a
//! key increments it by exactly one:
//!
//! - a put (always: writing the same value again is still a change);
//! - a delete of a key that exists;
//! - a lease revoke or expiry that deletes at least one key: one increment
//!   for all the keys it deletes, each of which gets a delete event at that
//!   revision.
//!
//! Nothing else moves it: a failed condition, a delete of a missing key,
//! granting, keeping alive or renewing leases, ending a lease that holds no
//! keys, a compaction, a declaration.
//!
//! Each key carries `create_revision` (the revision of the put that created
//! it), `mod_revision` (of its last put) and `version` (1 after the
//! creating put, +1 per put). A delete ends the key: a later put recreates
//! it with version 1 and a new `create_revision`.
//!
//! # Conditions
//!
//! A put or delete may require [`Condition::Absent`] (the key must not
//! exist) or [`Condition::ModRevision`] (the key must exist with exactly
//! that `mod_revision`: compare-and-set). When it does not hold the answer
//! is [`KvError::ConditionFailed`] with the key as it is and the store's
//! revision, and nothing changes.
//!
//! A command's checks run in this order, the first failure answering:
//! the shape of the command (key and value limits), the condition, the
//! lease, the store's capacity.
//!
//! # Leases
//!
//! [`KvCommand::GrantLease`] numbers leases 1, 2, 3… with a counter of
//! their own (never reused, independent of the revision); the lease ends at
//! `now_ms + ttl_ms`, both taken from the command (the leader's clock).
//! [`KvCommand::KeepAlive`] moves the end to `now_ms + ttl_ms`, but never
//! earlier than it was: a new leader whose clock lags must not cut leases
//! short. [`KvCommand::RevokeLease`] ends a lease now;
//! [`KvCommand::ExpireLeases`] ends every lease whose end is at or before
//! its `now_ms` (proposed by the leader on a timer set from
//! [`ClusterState::next_lease_deadline`]). Ending a lease deletes its keys.
//!
//! A put attaches the key to the lease it names, or to none: a key is under
//! at most one lease, and a put moves it (a put without a lease detaches
//! it, as in etcd). A put naming a lease that does not exist answers
//! [`KvError::LeaseNotFound`]; so do keep-alive and revoke.
//!
//! ## Owners
//!
//! Lease ids are small consecutive numbers, trivially guessed, so a lease
//! carries its owner: the identity the service stamped into
//! [`KvCommand::GrantLease`] from the authenticated caller (`None` for an
//! anonymous caller on an open broker), at most [`MAX_OWNER_LEN`] bytes.
//! [`ClusterState::lease`] and [`ClusterState::lease_owner`] report it; the
//! service refuses a keep-alive or revoke from any other identity before it
//! proposes one. Applying stores the owner and checks nothing against it:
//! a command in the log is already authorized.
//!
//! ## Leader failover
//!
//! Deadlines are absolute times on the clock of the leader that stamped
//! them. While there is no leader (an election) no keep-alive can be
//! committed, so a new leader expiring at once every lease whose deadline
//! passed meanwhile would end leases their clients were trying to keep.
//! A new leader therefore proposes [`KvCommand::RenewAllLeases`] with its
//! clock before it proposes any [`KvCommand::ExpireLeases`]: every live
//! lease then ends at the later of its deadline and `now_ms + ttl_ms`
//! (etcd does the same on promotion). It answers
//! [`KvResponse::LeasesRenewed`] with how many ends moved, and moves no
//! revision. Log order makes it take effect before the new leader's first
//! expiry on every node; expiries an earlier leader proposed keep that
//! leader's clock, which was right when it led.
//!
//! # History and watches
//!
//! Every change is kept as an [`Event`] for watches, in revision order
//! (several events share a revision when a lease ends with several keys).
//! An event's revision is its `kv.mod_revision`. History before the
//! compaction point [`ClusterState::compacted`] is forgotten;
//! [`ClusterState::events_since`] from before it answers
//! [`KvError::Compacted`]. [`KvCommand::Compact`] moves the compaction
//! point forward (never back, never beyond the current revision).
//!
//! A watch reads with [`ClusterState::events_since_scanned`], which also
//! answers where to resume: after a scan that matched nothing, the
//! revision after the current one, so a watcher on a quiet prefix scans
//! each event once rather than all history since its last match at every
//! write. The scan starts with a binary search for `from` in the history.
//!
//! History is bounded: when it holds more than [`MAX_HISTORY_EVENTS`]
//! events or more than [`MAX_HISTORY_BYTES`] bytes of keys and values,
//! applying compacts it itself, dropping whole revisions from the oldest,
//! until it fits again. Every node drops the same events at the same log
//! position, so watches behave the same whichever node serves them; a
//! watcher that falls that far behind gets [`KvError::Compacted`] and must
//! read the keys afresh. A single revision bigger than the bounds (a lease
//! ending with very many keys) is dropped whole, moving the compaction
//! point past it.
//!
//! # Reading keys
//!
//! [`ClusterState::get`] reads one key, [`ClusterState::list`] the first
//! keys under a prefix, and [`ClusterState::list_page`] one page of them
//! after a given key, bounded by a key count and a byte budget, starting
//! from that key in the ordered map (not from the prefix's first key).
//!
//! # Limits
//!
//! Limits are constants, the same on every node of one version, so every
//! replica refuses the same commands. A command breaking one answers
//! [`KvError::Invalid`] (or [`MetaResponse::Invalid`]) and changes
//! nothing. Keys are 1 to [`MAX_KEY_LEN`] bytes, values at most
//! [`MAX_VALUE_LEN`]; the store holds at most [`MAX_KEYS`] keys and
//! [`MAX_STORE_BYTES`] bytes of keys and values; at most [`MAX_LEASES`]
//! leases live at once, each with a time to live of [`MIN_TTL_MS`] to
//! [`MAX_TTL_MS`] and an owner of at most [`MAX_OWNER_LEN`] bytes. Nothing
//! a client chooses (a key, a lease id, a name) can grow the state past
//! these.
//!
//! # Declarations
//!
//! Queues (name → replicas) and durable subscriptions (name → filter and
//! replicas) are declared here. Names are 1 to [`MAX_NAME_LEN`] bytes with
//! no whitespace or control characters; replicas are 1 to [`MAX_REPLICAS`]
//! distinct node ids, none 0; at most [`MAX_QUEUES`] queues and
//! [`MAX_DURABLES`] durable subscriptions. Declaring something that exists
//! keeps it as it is and answers `existed: true` with its replicas (for a
//! durable subscription the filter must be the same; a different one is
//! invalid). The leader validates a durable's filter fully with pub/sub's
//! parser before proposing; applying checks only what keeps the state
//! sane (1 to [`MAX_FILTER_LEN`] bytes, no whitespace or control
//! characters).
//!
//! # Snapshots
//!
//! [`ClusterState::to_snapshot`] is postcard of the whole state: a format
//! number, the counters, the keys, the leases (with their owners), the
//! history, the declarations. Indexes derived from them (lease → keys,
//! lease deadlines, byte counts) are rebuilt on reading, and reading
//! checks the state's consistency, so a damaged or hostile snapshot is an
//! error, never a panic or a state that breaks the rules above. A snapshot
//! of another format number (format 1 had no lease owners) is refused.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::types::{
    Command, Condition, Event, EventKind, KeyValue, KvCommand, KvError, KvResponse, LeaseId,
    MetaCommand, MetaResponse, NodeId, Response,
};

/// Longest key, in bytes (keys are at least 1 byte).
pub const MAX_KEY_LEN: usize = 1024;
/// Largest value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;
/// Most keys in the store.
pub const MAX_KEYS: usize = 1_000_000;
/// Most bytes of keys and values in the store. The state lives in memory
/// and a snapshot is one buffer of it, so the store is kept to a size a
/// node can copy and send (etcd's default quota is 2 GiB on disk).
pub const MAX_STORE_BYTES: u64 = 256 * 1024 * 1024;
/// Most leases alive at once.
pub const MAX_LEASES: usize = 100_000;
/// Shortest lease, in milliseconds.
pub const MIN_TTL_MS: u64 = 1;
/// Longest lease, in milliseconds: 10 days.
pub const MAX_TTL_MS: u64 = 10 * 24 * 60 * 60 * 1000;
/// Most events kept for watches; past it the oldest revisions are
/// compacted away.
pub const MAX_HISTORY_EVENTS: usize = 100_000;
/// Most bytes (keys and values) of events kept for watches; past it the
/// oldest revisions are compacted away.
pub const MAX_HISTORY_BYTES: u64 = 64 * 1024 * 1024;
/// Longest lease owner (the identity stamped into
/// [`KvCommand::GrantLease`]), in bytes.
pub const MAX_OWNER_LEN: usize = 255;
/// Longest queue or durable subscription name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest durable subscription filter, in bytes (pub/sub's own limit).
pub const MAX_FILTER_LEN: usize = 256;
/// Most replicas of one queue or durable subscription.
pub const MAX_REPLICAS: usize = 64;
/// Most queues declared.
pub const MAX_QUEUES: usize = 10_000;
/// Most durable subscriptions declared.
pub const MAX_DURABLES: usize = 10_000;

/// The snapshot layout's number: a node refuses a snapshot of a layout it
/// does not know instead of misreading it. 2: leases carry their owner.
/// 3: queues record the replicas that joined after founding.
const SNAPSHOT_FORMAT: u32 = 3;

/// Everything the metadata group's log builds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// Incremented by every change (see the module docs).
    revision: u64,
    /// The oldest revision whose events are all still in `history`.
    compacted: u64,
    keys: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, Lease>,
    /// The last lease id granted (0: none yet).
    last_lease: LeaseId,
    /// Events in revision order, from `compacted` on.
    history: VecDeque<Event>,
    queues: BTreeMap<String, Vec<NodeId>>,
    /// Per queue, the replicas that took over another's place
    /// ([`MetaCommand::ChangeQueueReplicas`]) and so join its group rather
    /// than found it. Only current replicas, and no empty sets.
    joined: BTreeMap<String, BTreeSet<NodeId>>,
    durables: BTreeMap<String, Durable>,

    // Derived from the fields above (rebuilt when reading a snapshot).
    /// Lease ends, for expiry: `(deadline_ms, lease)`.
    deadlines: BTreeSet<(u64, LeaseId)>,
    /// Bytes of keys and values in `keys`.
    store_bytes: u64,
    /// Bytes of keys and values in `history`.
    history_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Lease {
    ttl_ms: u64,
    deadline_ms: u64,
    /// Who was granted it (see the module docs).
    owner: Option<String>,
    /// The keys under the lease (derived from the keys' `lease`).
    keys: BTreeSet<String>,
}

/// A lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Its time to live, as granted.
    pub ttl_ms: u64,
    /// When it ends unless kept alive (the leader's clock, milliseconds).
    pub deadline_ms: u64,
    /// The identity it was granted to; `None`: an anonymous caller.
    pub owner: Option<String>,
}

/// A durable subscription's declaration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durable {
    /// The subject filter it is fed from.
    pub filter: String,
    /// The nodes holding it; the first is its preferred leader.
    pub replicas: Vec<NodeId>,
}

/// A snapshot that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("snapshot unreadable: {0}")]
pub struct SnapshotError(pub String);

fn invalid(reason: impl Into<String>) -> KvError {
    KvError::Invalid(reason.into())
}

/// What a key and value count towards the byte limits.
fn entry_bytes(kv: &KeyValue) -> u64 {
    (kv.key.len() as u64).saturating_add(kv.value.len() as u64)
}

/// An event's revision: puts carry their revision as `mod_revision`, and
/// deletes carry the deleting revision there too.
fn event_revision(event: &Event) -> u64 {
    event.kv.mod_revision
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(invalid("empty key"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(invalid(format!(
            "key of {} bytes, at most {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}

/// A queue or durable name, or (with `max` = [`MAX_FILTER_LEN`]) a filter.
fn check_name(what: &str, name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("empty {what}"));
    }
    if name.len() > max {
        return Err(format!("{what} of {} bytes, at most {max}", name.len()));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{what} {name:?} has whitespace or control characters"
        ));
    }
    Ok(())
}

fn check_replicas(replicas: &[NodeId]) -> Result<(), String> {
    if replicas.is_empty() {
        return Err("no replicas".into());
    }
    if replicas.len() > MAX_REPLICAS {
        return Err(format!(
            "{} replicas, at most {MAX_REPLICAS}",
            replicas.len()
        ));
    }
    if replicas.contains(&0) {
        return Err("node ids start at 1".into());
    }
    // At most MAX_REPLICAS, so comparing every pair is cheap.
    for (i, id) in replicas.iter().enumerate() {
        if replicas[..i].contains(id) {
            return Err(format!("node {id} is a replica twice"));
        }
    }
    Ok(())
}

impl ClusterState {
    /// Apply one command. Deterministic: the same commands in the same
    /// order give the same state and answers on every node. A command that
    /// fails changes nothing.
    pub fn apply(&mut self, command: &Command) -> Response {
        match command {
            Command::Kv(command) => Response::Kv(self.apply_kv(command)),
            Command::Meta(command) => Response::Meta(self.apply_meta(command)),
            // Each command on its own, exactly as in entries of their own:
            // a failed one changes nothing and does not stop the others.
            Command::KvBatch(commands) => {
                Response::KvBatch(commands.iter().map(|c| self.apply_kv(c)).collect())
            }
            // Another kind of group's command: nothing changes.
            Command::Queue(commands) => Response::Queue(
                commands
                    .iter()
                    .map(|_| {
                        crate::queue_state::QueueResponse::Refused(
                            "the metadata group holds no queue".into(),
                        )
                    })
                    .collect(),
            ),
        }
    }

    fn apply_kv(&mut self, command: &KvCommand) -> KvResponse {
        let answer = match command {
            KvCommand::Put {
                key,
                value,
                condition,
                lease,
            } => self.put(key, value, *condition, *lease),
            KvCommand::Delete { key, condition } => self.delete(key, *condition),
            KvCommand::GrantLease {
                ttl_ms,
                now_ms,
                owner,
            } => self.grant_lease(*ttl_ms, *now_ms, owner.as_deref()),
            KvCommand::KeepAlive { lease, now_ms } => self.keep_alive(*lease, *now_ms),
            KvCommand::RevokeLease { lease } => {
                if self.leases.contains_key(lease) {
                    self.end_leases(vec![*lease])
                } else {
                    Err(KvError::LeaseNotFound(*lease))
                }
            }
            KvCommand::ExpireLeases { now_ms } => {
                let mut ended: Vec<LeaseId> = self
                    .deadlines
                    .range(..=(*now_ms, LeaseId::MAX))
                    .map(|&(_, lease)| lease)
                    .collect();
                ended.sort_unstable();
                self.end_leases(ended)
            }
            KvCommand::Compact { revision } => self.compact(*revision),
            KvCommand::RenewAllLeases { now_ms } => Ok(self.renew_all_leases(*now_ms)),
            KvCommand::KeepAliveAs { lease, now_ms, by } => self
                .check_owner(*lease, by.as_deref())
                .and_then(|()| self.keep_alive(*lease, *now_ms)),
            KvCommand::RevokeLeaseAs { lease, by } => {
                match self.check_owner(*lease, by.as_deref()) {
                    Err(e) => Err(e),
                    Ok(()) if self.leases.contains_key(lease) => self.end_leases(vec![*lease]),
                    Ok(()) => Err(KvError::LeaseNotFound(*lease)),
                }
            }
        };
        answer.unwrap_or_else(KvResponse::Failed)
    }

    /// The revision a change would take; refused (rather than wrapping)
    /// if the counter is exhausted, which only a hostile snapshot can do.
    fn next_revision(&self) -> Result<u64, KvError> {
        self.revision
            .checked_add(1)
            .ok_or_else(|| invalid("the revision counter is exhausted"))
    }

    fn check_condition(&self, key: &str, condition: Condition) -> Result<(), KvError> {
        let current = self.keys.get(key);
        let holds = match condition {
            Condition::Any => true,
            Condition::Absent => current.is_none(),
            Condition::ModRevision(revision) => {
                current.is_some_and(|kv| kv.mod_revision == revision)
            }
        };
        if holds {
            Ok(())
        } else {
            Err(KvError::ConditionFailed {
                current: current.cloned(),
                revision: self.revision,
            })
        }
    }

    fn put(
        &mut self,
        key: &str,
        value: &Bytes,
        condition: Condition,
        lease: Option<LeaseId>,
    ) -> Result<KvResponse, KvError> {
        check_key(key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(invalid(format!(
                "value of {} bytes, at most {MAX_VALUE_LEN}",
                value.len()
            )));
        }
        self.check_condition(key, condition)?;
        if let Some(id) = lease {
            if !self.leases.contains_key(&id) {
                return Err(KvError::LeaseNotFound(id));
            }
        }
        let prev = self.keys.get(key).cloned();
        if prev.is_none() && self.keys.len() >= MAX_KEYS {
            return Err(invalid(format!("the store is full: {MAX_KEYS} keys")));
        }
        let store_bytes = self
            .store_bytes
            .saturating_sub(prev.as_ref().map_or(0, entry_bytes))
            .saturating_add(key.len() as u64 + value.len() as u64);
        if store_bytes > MAX_STORE_BYTES {
            return Err(invalid(format!(
                "the store is full: {MAX_STORE_BYTES} bytes of keys and values"
            )));
        }
        let revision = self.next_revision()?;

        // Every check passed: from here on the put happens.
        let kv = KeyValue {
            key: key.to_owned(),
            value: value.clone(),
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version.saturating_add(1)),
            lease,
        };
        let old_lease = prev.as_ref().and_then(|p| p.lease);
        if old_lease != lease {
            if let Some(old) = old_lease.and_then(|id| self.leases.get_mut(&id)) {
                old.keys.remove(key);
            }
            if let Some(new) = lease.and_then(|id| self.leases.get_mut(&id)) {
                new.keys.insert(key.to_owned());
            }
        }
        self.keys.insert(key.to_owned(), kv.clone());
        self.store_bytes = store_bytes;
        self.revision = revision;
        self.record(Event {
            kind: EventKind::Put,
            kv,
        });
        self.trim_history();
        Ok(KvResponse::Put { revision, prev })
    }

    fn delete(&mut self, key: &str, condition: Condition) -> Result<KvResponse, KvError> {
        check_key(key)?;
        self.check_condition(key, condition)?;
        if !self.keys.contains_key(key) {
            return Ok(KvResponse::Deleted {
                revision: self.revision,
                prev: None,
            });
        }
        let revision = self.next_revision()?;
        self.revision = revision;
        let prev = self.remove_key(key, revision);
        self.trim_history();
        Ok(KvResponse::Deleted { revision, prev })
    }

    /// Removes a key at `revision` (already the store's), with its event.
    fn remove_key(&mut self, key: &str, revision: u64) -> Option<KeyValue> {
        let prev = self.keys.remove(key)?;
        self.store_bytes = self.store_bytes.saturating_sub(entry_bytes(&prev));
        if let Some(lease) = prev.lease.and_then(|id| self.leases.get_mut(&id)) {
            lease.keys.remove(key);
        }
        self.record(Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                mod_revision: revision,
                ..prev.clone()
            },
        });
        Some(prev)
    }

    /// `by` may act on `lease`: it granted it, or nobody owns it. A lease
    /// that does not exist is left to the command to refuse.
    fn check_owner(&self, lease: LeaseId, by: Option<&str>) -> Result<(), KvError> {
        match self.leases.get(&lease).map(|l| l.owner.as_deref()) {
            Some(Some(owner)) if Some(owner) != by => Err(KvError::NotOwner(lease)),
            _ => Ok(()),
        }
    }

    /// The limits a command must meet whatever the state: key and value
    /// sizes, lease time to live, owner length. The node checks them
    /// before proposing, so an entry never outgrows what replication can
    /// carry; applying checks them again.
    pub fn check_command(command: &KvCommand) -> Result<(), KvError> {
        match command {
            KvCommand::Put { key, value, .. } => {
                check_key(key)?;
                if value.len() > MAX_VALUE_LEN {
                    return Err(invalid(format!(
                        "value of {} bytes, at most {MAX_VALUE_LEN}",
                        value.len()
                    )));
                }
            }
            KvCommand::Delete { key, .. } => check_key(key)?,
            KvCommand::GrantLease { ttl_ms, owner, .. } => {
                if !(MIN_TTL_MS..=MAX_TTL_MS).contains(ttl_ms) {
                    return Err(invalid(format!(
                        "lease ttl of {ttl_ms} ms, must be {MIN_TTL_MS} to {MAX_TTL_MS}"
                    )));
                }
                if owner.as_ref().is_some_and(|o| o.len() > MAX_OWNER_LEN) {
                    return Err(invalid(format!(
                        "lease owner longer than {MAX_OWNER_LEN} bytes"
                    )));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn grant_lease(
        &mut self,
        ttl_ms: u64,
        now_ms: u64,
        owner: Option<&str>,
    ) -> Result<KvResponse, KvError> {
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) {
            return Err(invalid(format!(
                "lease ttl of {ttl_ms} ms, must be {MIN_TTL_MS} to {MAX_TTL_MS}"
            )));
        }
        if let Some(owner) = owner {
            if owner.len() > MAX_OWNER_LEN {
                return Err(invalid(format!(
                    "lease owner of {} bytes, at most {MAX_OWNER_LEN}",
                    owner.len()
                )));
            }
        }
        if self.leases.len() >= MAX_LEASES {
            return Err(invalid(format!("too many leases: at most {MAX_LEASES}")));
        }
        let id = self
            .last_lease
            .checked_add(1)
            .ok_or_else(|| invalid("lease ids are exhausted"))?;
        let deadline_ms = now_ms.saturating_add(ttl_ms);
        self.last_lease = id;
        self.leases.insert(
            id,
            Lease {
                ttl_ms,
                deadline_ms,
                owner: owner.map(str::to_owned),
                keys: BTreeSet::new(),
            },
        );
        self.deadlines.insert((deadline_ms, id));
        Ok(KvResponse::Lease { lease: id, ttl_ms })
    }

    fn keep_alive(&mut self, id: LeaseId, now_ms: u64) -> Result<KvResponse, KvError> {
        let lease = self.leases.get_mut(&id).ok_or(KvError::LeaseNotFound(id))?;
        let deadline_ms = now_ms.saturating_add(lease.ttl_ms).max(lease.deadline_ms);
        self.deadlines.remove(&(lease.deadline_ms, id));
        self.deadlines.insert((deadline_ms, id));
        lease.deadline_ms = deadline_ms;
        Ok(KvResponse::Lease {
            lease: id,
            ttl_ms: lease.ttl_ms,
        })
    }

    /// Every live lease ends no earlier than `now_ms + ttl_ms` (see the
    /// module docs on leader failover). Cannot fail.
    fn renew_all_leases(&mut self, now_ms: u64) -> KvResponse {
        let mut count = 0u64;
        for (&id, lease) in &mut self.leases {
            let deadline_ms = now_ms.saturating_add(lease.ttl_ms);
            if deadline_ms > lease.deadline_ms {
                self.deadlines.remove(&(lease.deadline_ms, id));
                self.deadlines.insert((deadline_ms, id));
                lease.deadline_ms = deadline_ms;
                count += 1;
            }
        }
        KvResponse::LeasesRenewed { count }
    }

    /// Ends `ended` (existing leases, in id order), deleting their keys at
    /// one new revision if they hold any.
    fn end_leases(&mut self, ended: Vec<LeaseId>) -> Result<KvResponse, KvError> {
        let holds_keys = ended
            .iter()
            .any(|id| self.leases.get(id).is_some_and(|l| !l.keys.is_empty()));
        // Checked before anything changes, so a refusal changes nothing.
        let revision = if holds_keys {
            self.next_revision()?
        } else {
            self.revision
        };
        let mut keys = Vec::new();
        for id in &ended {
            if let Some(lease) = self.leases.remove(id) {
                self.deadlines.remove(&(lease.deadline_ms, *id));
                keys.extend(lease.keys);
            }
        }
        // A key is under one lease, so there are no duplicates; key order
        // makes the events' order the same on every node.
        keys.sort_unstable();
        self.revision = revision;
        for key in &keys {
            self.remove_key(key, revision);
        }
        self.trim_history();
        Ok(KvResponse::LeasesEnded {
            leases: ended,
            revision,
        })
    }

    fn compact(&mut self, revision: u64) -> Result<KvResponse, KvError> {
        if revision > self.revision {
            return Err(invalid(format!(
                "cannot compact to revision {revision}, beyond the current {}",
                self.revision
            )));
        }
        if revision > self.compacted {
            while self
                .history
                .front()
                .is_some_and(|e| event_revision(e) < revision)
            {
                self.pop_oldest_event();
            }
            self.compacted = revision;
        }
        // Compacting to a revision already compacted is a no-op, not an
        // error: a retried compaction must not fail.
        Ok(KvResponse::Compacted {
            revision: self.compacted,
        })
    }

    fn record(&mut self, event: Event) {
        self.history_bytes = self.history_bytes.saturating_add(entry_bytes(&event.kv));
        self.history.push_back(event);
    }

    fn pop_oldest_event(&mut self) {
        if let Some(event) = self.history.pop_front() {
            self.history_bytes = self.history_bytes.saturating_sub(entry_bytes(&event.kv));
        }
    }

    /// Keeps history within [`MAX_HISTORY_EVENTS`] and
    /// [`MAX_HISTORY_BYTES`] by dropping whole revisions from the oldest
    /// (a watch resumes from a revision, so a revision is kept entirely or
    /// not at all).
    fn trim_history(&mut self) {
        while self.history.len() > MAX_HISTORY_EVENTS || self.history_bytes > MAX_HISTORY_BYTES {
            let Some(oldest) = self.history.front().map(event_revision) else {
                break;
            };
            while self
                .history
                .front()
                .is_some_and(|e| event_revision(e) == oldest)
            {
                self.pop_oldest_event();
            }
            self.compacted = self.compacted.max(oldest.saturating_add(1));
        }
    }

    fn apply_meta(&mut self, command: &MetaCommand) -> MetaResponse {
        let answer = match command {
            MetaCommand::DeclareQueue { name, replicas } => self.declare_queue(name, replicas),
            MetaCommand::DeleteQueue { name } => {
                self.joined.remove(name);
                Ok(MetaResponse::Removed {
                    existed: self.queues.remove(name).is_some(),
                })
            }
            MetaCommand::ChangeQueueReplicas { name, from, to } => {
                self.change_queue_replicas(name, from, to)
            }
            MetaCommand::DeclareDurable {
                name,
                filter,
                replicas,
            } => self.declare_durable(name, filter, replicas),
            MetaCommand::DeleteDurable { name } => Ok(MetaResponse::Removed {
                existed: self.durables.remove(name).is_some(),
            }),
        };
        answer.unwrap_or_else(MetaResponse::Invalid)
    }

    fn declare_queue(&mut self, name: &str, replicas: &[NodeId]) -> Result<MetaResponse, String> {
        check_name("queue name", name, MAX_NAME_LEN)?;
        check_replicas(replicas)?;
        if let Some(existing) = self.queues.get(name) {
            return Ok(MetaResponse::Declared {
                existed: true,
                replicas: existing.clone(),
            });
        }
        if self.queues.len() >= MAX_QUEUES {
            return Err(format!("too many queues: at most {MAX_QUEUES}"));
        }
        // Deterministic on every node: the map is the same everywhere.
        let group = crate::types::queue_group_id(name);
        if let Some(other) = self
            .queues
            .keys()
            .find(|other| crate::types::queue_group_id(other) == group)
        {
            return Err(format!(
                "queue {name:?} would share Raft group {group} with queue {other:?}: choose another name"
            ));
        }
        self.queues.insert(name.to_owned(), replicas.to_vec());
        Ok(MetaResponse::Declared {
            existed: false,
            replicas: replicas.to_vec(),
        })
    }

    fn change_queue_replicas(
        &mut self,
        name: &str,
        from: &[NodeId],
        to: &[NodeId],
    ) -> Result<MetaResponse, String> {
        check_replicas(to)?;
        let replicas = self
            .queues
            .get_mut(name)
            .ok_or_else(|| format!("queue {name:?} is not declared"))?;
        if replicas.as_slice() == to {
            // Already changed (a resent proposal): the same answer again.
            return Ok(MetaResponse::Declared {
                existed: true,
                replicas: replicas.clone(),
            });
        }
        if replicas.as_slice() != from {
            return Err(format!(
                "queue {name:?} is on {replicas:?} now, not {from:?}"
            ));
        }
        // The group lives on only through a replica it already has.
        if !to.iter().any(|id| from.contains(id)) {
            return Err(format!(
                "queue {name:?} cannot move from {from:?} to {to:?} at once: keep one replica"
            ));
        }
        *replicas = to.to_vec();
        let joined = self.joined.entry(name.to_owned()).or_default();
        joined.retain(|id| to.contains(id));
        joined.extend(to.iter().filter(|id| !from.contains(id)));
        if joined.is_empty() {
            self.joined.remove(name);
        }
        Ok(MetaResponse::Declared {
            existed: true,
            replicas: to.to_vec(),
        })
    }

    fn declare_durable(
        &mut self,
        name: &str,
        filter: &str,
        replicas: &[NodeId],
    ) -> Result<MetaResponse, String> {
        check_name("durable name", name, MAX_NAME_LEN)?;
        check_name("filter", filter, MAX_FILTER_LEN)?;
        check_replicas(replicas)?;
        if let Some(existing) = self.durables.get(name) {
            // Same name, other filter: a different subscription, not a
            // re-declaration. Keeping the old one silently would feed the
            // declarer messages it did not ask for.
            if existing.filter != filter {
                return Err(format!(
                    "durable {name:?} exists with filter {:?}",
                    existing.filter
                ));
            }
            return Ok(MetaResponse::Declared {
                existed: true,
                replicas: existing.replicas.clone(),
            });
        }
        if self.durables.len() >= MAX_DURABLES {
            return Err(format!(
                "too many durable subscriptions: at most {MAX_DURABLES}"
            ));
        }
        self.durables.insert(
            name.to_owned(),
            Durable {
                filter: filter.to_owned(),
                replicas: replicas.to_vec(),
            },
        );
        Ok(MetaResponse::Declared {
            existed: false,
            replicas: replicas.to_vec(),
        })
    }

    /// The store's revision: how many changes it has seen.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The oldest revision a watch may start from: history before it is
    /// forgotten ([`Self::events_since`] answers [`KvError::Compacted`]).
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// One key.
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.keys.get(key)
    }

    /// Keys starting with `prefix`, in key order, at most `limit`.
    pub fn list(&self, prefix: &str, limit: usize) -> Vec<KeyValue> {
        self.keys
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit)
            .map(|(_, kv)| kv.clone())
            .collect()
    }

    /// One page of the keys starting with `prefix`, in key order: those
    /// strictly after `start_after` (all of them if `None`), at most
    /// `limit` keys and at most `max_bytes` bytes of keys and values,
    /// except that the first matching key comes whatever its size (so a
    /// value bigger than `max_bytes` can still be read). The flag says
    /// whether more keys matched after the page: the next page starts
    /// after the page's last key. `limit` 0 answers no keys (and whether
    /// any matched).
    ///
    /// Starts from `start_after` in the ordered map, so reading page after
    /// page costs each page, not the keys before it.
    pub fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> (Vec<KeyValue>, bool) {
        let start = match start_after {
            // A start before the prefix (which sorts before all its keys)
            // starts at the prefix's first key.
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let mut page = Vec::new();
        let mut bytes = 0usize;
        for (key, kv) in self
            .keys
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
        {
            let size = key.len().saturating_add(kv.value.len());
            if page.len() >= limit || (!page.is_empty() && bytes.saturating_add(size) > max_bytes) {
                return (page, true);
            }
            bytes = bytes.saturating_add(size);
            page.push(kv.clone());
        }
        (page, false)
    }

    /// How many keys the store holds.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Changes to keys under `prefix` from revision `from` on, in revision
    /// order (and, within a revision, in the order they were made).
    ///
    /// Whole revisions only, so a watcher resumes from the last event's
    /// revision + 1 without losing or repeating events: at most `limit`
    /// events, except that when the first revision alone has more than
    /// `limit` matching events it comes whole (history bounds it to
    /// [`MAX_HISTORY_EVENTS`]). `limit` 0 answers nothing.
    ///
    /// `from` before [`Self::compacted`] is [`KvError::Compacted`]; `from`
    /// beyond the current revision answers nothing (yet).
    ///
    /// A watcher should prefer [`Self::events_since_scanned`], which also
    /// says where to resume when nothing matched.
    pub fn events_since(
        &self,
        prefix: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Event>, KvError> {
        self.events_since_scanned(prefix, from, limit)
            .map(|(events, _)| events)
    }

    /// [`Self::events_since`], with the revision to resume from: every
    /// event under `prefix` with a revision from `from` to just before it
    /// is in the answer, so asking again from it skips nothing and repeats
    /// nothing. It is
    ///
    /// - the last answered event's revision + 1 when the answer was cut
    ///   at `limit` with history left to scan (more may follow);
    /// - otherwise the current revision + 1 (or `from` if that is later):
    ///   the scan reached the end of history, so a watcher whose prefix
    ///   saw no change moves past every change it scanned instead of
    ///   scanning them again at the next write;
    /// - `from` itself when `limit` is 0 (nothing was scanned).
    ///
    /// It is never below `from`. The scan starts with a binary search for
    /// `from` in the history, then reads it to the end or to the cut.
    pub fn events_since_scanned(
        &self,
        prefix: &str,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<Event>, u64), KvError> {
        if from < self.compacted {
            return Err(KvError::Compacted(self.compacted));
        }
        let mut out = Vec::new();
        if limit == 0 {
            return Ok((out, from));
        }
        // At the end of history everything up to the current revision has
        // been scanned (every revision has at least one event).
        let end = self.revision.saturating_add(1).max(from);
        let start = self.history.partition_point(|e| event_revision(e) < from);
        let mut events = self.history.range(start..).peekable();
        let mut group = Vec::new();
        while let Some(first) = events.next() {
            let revision = event_revision(first);
            group.clear();
            group.push(first);
            while let Some(next) = events.next_if(|e| event_revision(e) == revision) {
                group.push(next);
            }
            group.retain(|e| e.kv.key.starts_with(prefix));
            if let Some(last) = out.last().filter(|_| out.len() + group.len() > limit) {
                // Cut before `revision`: resume after the last answered one.
                let next = event_revision(last).saturating_add(1);
                return Ok((out, next));
            }
            out.extend(group.iter().map(|&e| e.clone()));
            if out.len() >= limit {
                let next = if events.peek().is_none() {
                    end
                } else {
                    revision.saturating_add(1)
                };
                return Ok((out, next));
            }
        }
        Ok((out, end))
    }

    /// A lease, if it is alive.
    pub fn lease(&self, id: LeaseId) -> Option<LeaseInfo> {
        self.leases.get(&id).map(|lease| LeaseInfo {
            ttl_ms: lease.ttl_ms,
            deadline_ms: lease.deadline_ms,
            owner: lease.owner.clone(),
        })
    }

    /// A live lease's owner, without copying it: `None` if the lease is
    /// not alive, `Some(None)` if it was granted to an anonymous caller.
    pub fn lease_owner(&self, id: LeaseId) -> Option<Option<&str>> {
        self.leases.get(&id).map(|lease| lease.owner.as_deref())
    }

    /// How many leases are alive.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// The earliest end of a live lease: when the leader should propose
    /// [`KvCommand::ExpireLeases`] next. `None`: no leases.
    pub fn next_lease_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }

    /// The declared queues: name → replicas.
    pub fn queues(&self) -> &BTreeMap<String, Vec<NodeId>> {
        &self.queues
    }

    /// Whether `node` took over a replica of queue `name` after the queue
    /// was founded (so it must join the group, never found it).
    pub fn joined_queue(&self, name: &str, node: NodeId) -> bool {
        self.joined.get(name).is_some_and(|j| j.contains(&node))
    }

    /// The declared durable subscriptions.
    pub fn durables(&self) -> &BTreeMap<String, Durable> {
        &self.durables
    }

    /// The state as bytes, for a snapshot.
    pub fn to_snapshot(&self) -> Vec<u8> {
        // Cannot fail: every sequence has a known length and postcard
        // writes into a growing buffer. Were it ever to, the empty result
        // fails to read back rather than passing for an empty state.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// The state from a snapshot's bytes: the whole input must be one
    /// consistent state.
    pub fn from_snapshot(bytes: &[u8]) -> Result<ClusterState, SnapshotError> {
        let (state, rest) = postcard::take_from_bytes::<ClusterState>(bytes)
            .map_err(|e| SnapshotError(e.to_string()))?;
        if !rest.is_empty() {
            return Err(SnapshotError(format!(
                "{} bytes after the state",
                rest.len()
            )));
        }
        Ok(state)
    }

    /// The state from a snapshot's parts, checking every invariant the
    /// rest of this module relies on and rebuilding the derived indexes.
    fn from_parts(parts: SnapshotParts) -> Result<ClusterState, String> {
        if parts.format != SNAPSHOT_FORMAT {
            return Err(format!(
                "snapshot format {}, this node reads {SNAPSHOT_FORMAT}",
                parts.format
            ));
        }
        let revision = parts.revision;
        if parts.compacted > revision.saturating_add(1) {
            return Err(format!(
                "compacted to {} beyond revision {revision}",
                parts.compacted
            ));
        }
        let mut state = ClusterState {
            revision,
            compacted: parts.compacted,
            last_lease: parts.last_lease,
            queues: parts.queues,
            joined: parts.joined,
            durables: parts.durables,
            ..ClusterState::default()
        };
        for (name, joined) in &state.joined {
            let replicas = state
                .queues
                .get(name)
                .ok_or_else(|| format!("replicas joined undeclared queue {name:?}"))?;
            if !joined.iter().all(|id| replicas.contains(id)) {
                return Err(format!("a joined replica of {name:?} is not a replica"));
            }
        }
        for (id, ttl_ms, deadline_ms, owner) in parts.leases {
            if owner.as_ref().is_some_and(|o| o.len() > MAX_OWNER_LEN) {
                return Err(format!(
                    "lease {id} has an owner over {MAX_OWNER_LEN} bytes"
                ));
            }
            if id == 0 || id > parts.last_lease {
                return Err(format!(
                    "lease {id} beyond the last granted {}",
                    parts.last_lease
                ));
            }
            if state
                .leases
                .last_key_value()
                .is_some_and(|(&last, _)| last >= id)
            {
                return Err(format!("lease {id} out of order"));
            }
            state.leases.insert(
                id,
                Lease {
                    ttl_ms,
                    deadline_ms,
                    owner,
                    keys: BTreeSet::new(),
                },
            );
            state.deadlines.insert((deadline_ms, id));
        }
        for kv in parts.keys {
            if state
                .keys
                .last_key_value()
                .is_some_and(|(last, _)| *last >= kv.key)
            {
                return Err(format!("key {:?} out of order", kv.key));
            }
            if kv.key.is_empty()
                || kv.version == 0
                || kv.create_revision == 0
                || kv.create_revision > kv.mod_revision
                || kv.mod_revision > revision
            {
                return Err(format!("key {:?} has inconsistent counters", kv.key));
            }
            if let Some(id) = kv.lease {
                let lease = state
                    .leases
                    .get_mut(&id)
                    .ok_or_else(|| format!("key {:?} under missing lease {id}", kv.key))?;
                lease.keys.insert(kv.key.clone());
            }
            state.store_bytes = state.store_bytes.saturating_add(entry_bytes(&kv));
            state.keys.insert(kv.key.clone(), kv);
        }
        let mut previous = state.compacted.max(1);
        for event in parts.history {
            let at = event_revision(&event);
            if at < previous || at > revision {
                return Err(format!("event at revision {at} out of order"));
            }
            previous = at;
            state.record(event);
        }
        Ok(state)
    }
}

/// The snapshot layout as read: the canonical data, no derived indexes.
/// Field order is the format; [`SnapshotRef`] must write the same.
#[derive(Deserialize)]
struct SnapshotParts {
    format: u32,
    revision: u64,
    compacted: u64,
    last_lease: LeaseId,
    /// `(id, ttl_ms, deadline_ms, owner)` in id order.
    leases: Vec<(LeaseId, u64, u64, Option<String>)>,
    /// In key order (the key is in each `KeyValue`, not written twice).
    keys: Vec<KeyValue>,
    history: Vec<Event>,
    queues: BTreeMap<String, Vec<NodeId>>,
    joined: BTreeMap<String, BTreeSet<NodeId>>,
    durables: BTreeMap<String, Durable>,
}

/// The snapshot layout as written, borrowing the state.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    format: u32,
    revision: u64,
    compacted: u64,
    last_lease: LeaseId,
    #[serde(serialize_with = "write_leases")]
    leases: &'a BTreeMap<LeaseId, Lease>,
    #[serde(serialize_with = "write_keys")]
    keys: &'a BTreeMap<String, KeyValue>,
    history: &'a VecDeque<Event>,
    queues: &'a BTreeMap<String, Vec<NodeId>>,
    joined: &'a BTreeMap<String, BTreeSet<NodeId>>,
    durables: &'a BTreeMap<String, Durable>,
}

fn write_leases<S: Serializer>(
    leases: &&BTreeMap<LeaseId, Lease>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(
        leases
            .iter()
            .map(|(&id, lease)| (id, lease.ttl_ms, lease.deadline_ms, &lease.owner)),
    )
}

fn write_keys<S: Serializer>(
    keys: &&BTreeMap<String, KeyValue>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(keys.values())
}

impl Serialize for ClusterState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        SnapshotRef {
            format: SNAPSHOT_FORMAT,
            revision: self.revision,
            compacted: self.compacted,
            last_lease: self.last_lease,
            leases: &self.leases,
            keys: &self.keys,
            history: &self.history,
            queues: &self.queues,
            joined: &self.joined,
            durables: &self.durables,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ClusterState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let parts = SnapshotParts::deserialize(deserializer)?;
        ClusterState::from_parts(parts).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use courier_test_support::Rng;
    use proptest::prelude::*;

    fn kv(state: &mut ClusterState, command: KvCommand) -> KvResponse {
        match state.apply(&Command::Kv(command)) {
            Response::Kv(answer) => answer,
            other => panic!("a key-value command answered {other:?}"),
        }
    }

    fn meta(state: &mut ClusterState, command: MetaCommand) -> MetaResponse {
        match state.apply(&Command::Meta(command)) {
            Response::Meta(answer) => answer,
            other => panic!("a declaration answered {other:?}"),
        }
    }

    fn put_cmd(key: &str, value: &str, condition: Condition, lease: Option<LeaseId>) -> KvCommand {
        KvCommand::Put {
            key: key.into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
            condition,
            lease,
        }
    }

    fn put(state: &mut ClusterState, key: &str, value: &str) -> KvResponse {
        kv(state, put_cmd(key, value, Condition::Any, None))
    }

    fn put_leased(state: &mut ClusterState, key: &str, lease: LeaseId) -> KvResponse {
        kv(state, put_cmd(key, "v", Condition::Any, Some(lease)))
    }

    fn delete(state: &mut ClusterState, key: &str) -> KvResponse {
        kv(
            state,
            KvCommand::Delete {
                key: key.into(),
                condition: Condition::Any,
            },
        )
    }

    fn grant(state: &mut ClusterState, ttl_ms: u64, now_ms: u64) -> LeaseId {
        grant_owned(state, ttl_ms, now_ms, None)
    }

    fn grant_owned(
        state: &mut ClusterState,
        ttl_ms: u64,
        now_ms: u64,
        owner: Option<&str>,
    ) -> LeaseId {
        let command = KvCommand::GrantLease {
            ttl_ms,
            now_ms,
            owner: owner.map(String::from),
        };
        match kv(state, command) {
            KvResponse::Lease { lease, .. } => lease,
            other => panic!("grant answered {other:?}"),
        }
    }

    fn is_invalid(answer: &KvResponse) -> bool {
        matches!(answer, KvResponse::Failed(KvError::Invalid(_)))
    }

    /// Applies `command` expecting it to fail with `Invalid` and change
    /// nothing.
    fn assert_refused(state: &mut ClusterState, command: KvCommand) {
        let before = state.clone();
        let answer = kv(state, command);
        assert!(is_invalid(&answer), "expected Invalid, got {answer:?}");
        assert_eq!(*state, before);
    }

    fn value_of(state: &ClusterState, key: &str) -> Option<Vec<u8>> {
        state.get(key).map(|kv| kv.value.to_vec())
    }

    /// Every invariant the module promises, checked from outside the
    /// indexes (recomputed) and through a snapshot round trip (which
    /// rebuilds them).
    fn assert_consistent(state: &ClusterState) {
        let mut store_bytes = 0;
        for (key, kv) in &state.keys {
            assert_eq!(*key, kv.key);
            assert!(!key.is_empty() && key.len() <= MAX_KEY_LEN);
            assert!(kv.create_revision >= 1, "{kv:?}");
            assert!(kv.create_revision <= kv.mod_revision, "{kv:?}");
            assert!(kv.mod_revision <= state.revision, "{kv:?}");
            assert!(kv.version >= 1, "{kv:?}");
            if let Some(id) = kv.lease {
                assert!(state.leases[&id].keys.contains(key), "{kv:?}");
            }
            store_bytes += entry_bytes(kv);
        }
        assert_eq!(state.store_bytes, store_bytes);
        assert!(state.keys.len() <= MAX_KEYS && store_bytes <= MAX_STORE_BYTES);
        let mut deadlines = BTreeSet::new();
        for (&id, lease) in &state.leases {
            assert!(id >= 1 && id <= state.last_lease);
            assert!(lease.owner.as_ref().map_or(0, String::len) <= MAX_OWNER_LEN);
            for key in &lease.keys {
                assert_eq!(state.keys[key].lease, Some(id));
            }
            deadlines.insert((lease.deadline_ms, id));
        }
        assert_eq!(state.deadlines, deadlines);
        assert!(state.leases.len() <= MAX_LEASES);
        assert!(state.compacted <= state.revision + 1);
        let mut previous = state.compacted.max(1);
        let mut history_bytes = 0;
        for event in &state.history {
            let at = event_revision(event);
            assert!(at >= previous && at <= state.revision, "{event:?}");
            previous = at;
            history_bytes += entry_bytes(&event.kv);
        }
        assert_eq!(state.history_bytes, history_bytes);
        assert!(state.history.len() <= MAX_HISTORY_EVENTS);
        assert!(history_bytes <= MAX_HISTORY_BYTES);
        let restored = ClusterState::from_snapshot(&state.to_snapshot()).expect("own snapshot");
        assert_eq!(restored, *state);
    }

    #[test]
    fn a_put_creates_then_updates_the_counters() {
        let mut state = ClusterState::default();
        assert_eq!(state.revision(), 0);
        assert_eq!(
            put(&mut state, "a", "1"),
            KvResponse::Put {
                revision: 1,
                prev: None
            }
        );
        assert_eq!(
            put(&mut state, "b", "1"),
            KvResponse::Put {
                revision: 2,
                prev: None
            }
        );
        let first = state.get("a").cloned().unwrap();
        assert_eq!(
            (first.create_revision, first.mod_revision, first.version),
            (1, 1, 1)
        );
        // The same value again is still a change.
        assert_eq!(
            put(&mut state, "a", "1"),
            KvResponse::Put {
                revision: 3,
                prev: Some(first)
            }
        );
        put(&mut state, "a", "2");
        let a = state.get("a").unwrap();
        assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 4, 3));
        assert_eq!(a.value, "2");
        assert_eq!(state.revision(), 4);
        assert_consistent(&state);
    }

    #[test]
    fn a_delete_ends_the_key_and_a_later_put_recreates_it() {
        let mut state = ClusterState::default();
        put(&mut state, "a", "1");
        put(&mut state, "a", "2");
        let before = state.get("a").cloned();
        assert_eq!(
            delete(&mut state, "a"),
            KvResponse::Deleted {
                revision: 3,
                prev: before
            }
        );
        assert_eq!(state.get("a"), None);
        put(&mut state, "a", "3");
        let a = state.get("a").unwrap();
        assert_eq!((a.create_revision, a.mod_revision, a.version), (4, 4, 1));
        assert_consistent(&state);
    }

    #[test]
    fn a_delete_of_a_missing_key_changes_nothing() {
        let mut state = ClusterState::default();
        put(&mut state, "a", "1");
        let before = state.clone();
        assert_eq!(
            delete(&mut state, "b"),
            KvResponse::Deleted {
                revision: 1,
                prev: None
            }
        );
        assert_eq!(state, before);
    }

    #[test]
    fn conditions_decide_whether_a_put_happens() {
        let mut state = ClusterState::default();
        assert!(matches!(
            kv(
                &mut state,
                put_cmd("a", "1", Condition::ModRevision(0), None)
            ),
            KvResponse::Failed(KvError::ConditionFailed {
                current: None,
                revision: 0
            })
        ));
        assert_eq!(
            kv(&mut state, put_cmd("a", "1", Condition::Absent, None)),
            KvResponse::Put {
                revision: 1,
                prev: None
            }
        );
        put(&mut state, "other", "x");
        let before = state.clone();
        let current = state.get("a").cloned();
        for condition in [
            Condition::Absent,
            Condition::ModRevision(2),
            Condition::ModRevision(0),
        ] {
            assert_eq!(
                kv(&mut state, put_cmd("a", "2", condition, None)),
                KvResponse::Failed(KvError::ConditionFailed {
                    current: current.clone(),
                    revision: 2
                }),
                "{condition:?}"
            );
            assert_eq!(state, before, "a failed condition changes nothing");
        }
        assert!(matches!(
            kv(
                &mut state,
                put_cmd("a", "2", Condition::ModRevision(1), None)
            ),
            KvResponse::Put { revision: 3, .. }
        ));
        assert_eq!(value_of(&state, "a"), Some(b"2".to_vec()));
        assert_consistent(&state);
    }

    #[test]
    fn conditions_guard_deletes_too() {
        let mut state = ClusterState::default();
        put(&mut state, "a", "1");
        let before = state.clone();
        for condition in [Condition::Absent, Condition::ModRevision(7)] {
            let answer = kv(
                &mut state,
                KvCommand::Delete {
                    key: "a".into(),
                    condition,
                },
            );
            assert!(matches!(
                answer,
                KvResponse::Failed(KvError::ConditionFailed { .. })
            ));
            assert_eq!(state, before);
        }
        let answer = kv(
            &mut state,
            KvCommand::Delete {
                key: "a".into(),
                condition: Condition::ModRevision(1),
            },
        );
        assert!(matches!(
            answer,
            KvResponse::Deleted {
                revision: 2,
                prev: Some(_)
            }
        ));
        // Absent holds for a missing key: a delete that deletes nothing.
        let answer = kv(
            &mut state,
            KvCommand::Delete {
                key: "a".into(),
                condition: Condition::Absent,
            },
        );
        assert_eq!(
            answer,
            KvResponse::Deleted {
                revision: 2,
                prev: None
            }
        );
    }

    #[test]
    fn lease_ids_count_from_one_apart_from_the_revision() {
        let mut state = ClusterState::default();
        put(&mut state, "a", "1");
        assert_eq!(grant(&mut state, 1000, 0), 1);
        assert_eq!(grant(&mut state, 2000, 0), 2);
        kv(&mut state, KvCommand::RevokeLease { lease: 2 });
        // Never reused, even after the newest ends.
        assert_eq!(grant(&mut state, 3000, 50), 3);
        assert_eq!(
            state.revision(),
            1,
            "granting leases is not a change of keys"
        );
        assert_eq!(
            state.lease(3),
            Some(LeaseInfo {
                ttl_ms: 3000,
                deadline_ms: 3050,
                owner: None,
            })
        );
        assert_eq!(state.lease(2), None);
        assert_eq!(state.lease_count(), 2);
        assert_eq!(state.next_lease_deadline(), Some(1000));
        assert_consistent(&state);
    }

    #[test]
    fn keep_alive_moves_the_deadline_but_never_back() {
        let mut state = ClusterState::default();
        let lease = grant(&mut state, 1000, 0);
        assert_eq!(
            kv(&mut state, KvCommand::KeepAlive { lease, now_ms: 500 }),
            KvResponse::Lease {
                lease,
                ttl_ms: 1000
            }
        );
        assert_eq!(state.lease(lease).unwrap().deadline_ms, 1500);
        assert_eq!(state.next_lease_deadline(), Some(1500));
        // A leader whose clock lags does not cut the lease short.
        kv(&mut state, KvCommand::KeepAlive { lease, now_ms: 100 });
        assert_eq!(state.lease(lease).unwrap().deadline_ms, 1500);
        assert_eq!(state.revision(), 0);
        assert_eq!(
            kv(
                &mut state,
                KvCommand::KeepAlive {
                    lease: 9,
                    now_ms: 0
                }
            ),
            KvResponse::Failed(KvError::LeaseNotFound(9))
        );
        assert_consistent(&state);
    }

    #[test]
    fn revoking_a_lease_deletes_its_keys_at_one_revision() {
        let mut state = ClusterState::default();
        let lease = grant(&mut state, 1000, 0);
        let other = grant(&mut state, 1000, 0);
        put_leased(&mut state, "b", lease);
        put_leased(&mut state, "a", lease);
        put_leased(&mut state, "c", other);
        put(&mut state, "d", "free");
        assert_eq!(
            kv(&mut state, KvCommand::RevokeLease { lease }),
            KvResponse::LeasesEnded {
                leases: vec![lease],
                revision: 5
            }
        );
        assert_eq!(state.revision(), 5);
        assert_eq!(state.get("a"), None);
        assert_eq!(state.get("b"), None);
        assert!(state.get("c").is_some() && state.get("d").is_some());
        let events = state.events_since("", 5, 100).unwrap();
        let deleted: Vec<_> = events
            .iter()
            .map(|e| (e.kind, e.kv.key.as_str(), e.kv.mod_revision))
            .collect();
        assert_eq!(
            deleted,
            [(EventKind::Delete, "a", 5), (EventKind::Delete, "b", 5)]
        );
        assert_eq!(
            kv(&mut state, KvCommand::RevokeLease { lease }),
            KvResponse::Failed(KvError::LeaseNotFound(lease))
        );
        assert_consistent(&state);
    }

    #[test]
    fn expiry_ends_the_leases_due_and_only_those() {
        let mut state = ClusterState::default();
        let early = grant(&mut state, 100, 0);
        let exact = grant(&mut state, 200, 0);
        let late = grant(&mut state, 300, 0);
        let empty = grant(&mut state, 50, 0);
        put_leased(&mut state, "early", early);
        put_leased(&mut state, "exact", exact);
        put_leased(&mut state, "late", late);
        assert_eq!(state.next_lease_deadline(), Some(50));
        assert_eq!(
            kv(&mut state, KvCommand::ExpireLeases { now_ms: 200 }),
            KvResponse::LeasesEnded {
                leases: vec![early, exact, empty],
                revision: 4
            }
        );
        assert_eq!(state.list("", 10).len(), 1);
        assert_eq!(state.next_lease_deadline(), Some(300));
        assert_eq!(
            kv(&mut state, KvCommand::ExpireLeases { now_ms: 299 }),
            KvResponse::LeasesEnded {
                leases: vec![],
                revision: 4
            }
        );
        // A put under an ended lease is refused, and changes nothing.
        let before = state.clone();
        assert_eq!(
            put_leased(&mut state, "early", early),
            KvResponse::Failed(KvError::LeaseNotFound(early))
        );
        assert_eq!(state, before);
        assert_consistent(&state);
    }

    #[test]
    fn ending_leases_without_keys_does_not_move_the_revision() {
        let mut state = ClusterState::default();
        let lease = grant(&mut state, 100, 0);
        put_leased(&mut state, "a", lease);
        delete(&mut state, "a");
        assert_eq!(
            kv(&mut state, KvCommand::RevokeLease { lease }),
            KvResponse::LeasesEnded {
                leases: vec![lease],
                revision: 2
            }
        );
        assert_eq!(state.revision(), 2);
        assert_eq!(state.events_since("", 3, 10).unwrap(), []);
    }

    #[test]
    fn a_put_moves_a_key_between_leases() {
        let mut state = ClusterState::default();
        let one = grant(&mut state, 100, 0);
        let two = grant(&mut state, 100, 0);
        put_leased(&mut state, "k", one);
        put_leased(&mut state, "k", two);
        assert_eq!(state.get("k").unwrap().lease, Some(two));
        assert_consistent(&state);
        kv(&mut state, KvCommand::RevokeLease { lease: one });
        assert!(state.get("k").is_some(), "the key left lease one");
        // A put without a lease detaches the key (as in etcd).
        put(&mut state, "k", "free");
        kv(&mut state, KvCommand::RevokeLease { lease: two });
        assert_eq!(value_of(&state, "k"), Some(b"free".to_vec()));
        // A deleted key leaves its lease: recreated without one, the
        // lease's end does not touch it.
        let three = grant(&mut state, 100, 0);
        put_leased(&mut state, "j", three);
        delete(&mut state, "j");
        put(&mut state, "j", "free");
        let revision = state.revision();
        kv(&mut state, KvCommand::RevokeLease { lease: three });
        assert_eq!(state.revision(), revision);
        assert!(state.get("j").is_some());
        assert_consistent(&state);
    }

    #[test]
    fn lease_ttls_and_count_are_bounded() {
        let mut state = ClusterState::default();
        assert_refused(
            &mut state,
            KvCommand::GrantLease {
                ttl_ms: 0,
                now_ms: 0,
                owner: None,
            },
        );
        assert_refused(
            &mut state,
            KvCommand::GrantLease {
                ttl_ms: MAX_TTL_MS + 1,
                now_ms: 0,
                owner: None,
            },
        );
        grant(&mut state, MAX_TTL_MS, u64::MAX);
        assert_eq!(state.next_lease_deadline(), Some(u64::MAX), "saturates");
        for _ in 1..MAX_LEASES {
            grant(&mut state, MIN_TTL_MS, 0);
        }
        assert_eq!(state.lease_count(), MAX_LEASES);
        assert_refused(
            &mut state,
            KvCommand::GrantLease {
                ttl_ms: 1,
                now_ms: 0,
                owner: None,
            },
        );
        kv(&mut state, KvCommand::RevokeLease { lease: 7 });
        assert_eq!(grant(&mut state, 1, 0), MAX_LEASES as u64 + 1);
    }

    #[test]
    fn keys_and_values_are_bounded() {
        let mut state = ClusterState::default();
        let long = "k".repeat(MAX_KEY_LEN);
        assert!(matches!(
            put(&mut state, &long, "v"),
            KvResponse::Put { .. }
        ));
        assert_refused(&mut state, put_cmd("", "v", Condition::Any, None));
        assert_refused(
            &mut state,
            put_cmd(&format!("{long}k"), "v", Condition::Any, None),
        );
        assert_refused(
            &mut state,
            KvCommand::Delete {
                key: String::new(),
                condition: Condition::Any,
            },
        );
        let value = Bytes::from(vec![0u8; MAX_VALUE_LEN]);
        let answer = kv(
            &mut state,
            KvCommand::Put {
                key: "big".into(),
                value,
                condition: Condition::Any,
                lease: None,
            },
        );
        assert!(matches!(answer, KvResponse::Put { .. }));
        assert_refused(
            &mut state,
            KvCommand::Put {
                key: "big".into(),
                value: Bytes::from(vec![0u8; MAX_VALUE_LEN + 1]),
                condition: Condition::Any,
                lease: None,
            },
        );
        assert_consistent(&state);
    }

    #[test]
    fn the_store_holds_at_most_max_keys() {
        // Filled directly: a million applies would only be slower.
        let mut state = ClusterState {
            revision: 1,
            ..ClusterState::default()
        };
        state.keys = (0..MAX_KEYS)
            .map(|i| {
                let key = format!("k{i:07}");
                let kv = KeyValue {
                    key: key.clone(),
                    value: Bytes::new(),
                    create_revision: 1,
                    mod_revision: 1,
                    version: 1,
                    lease: None,
                };
                (key, kv)
            })
            .collect();
        state.store_bytes = state.keys.values().map(entry_bytes).sum();
        assert_refused(&mut state, put_cmd("new", "v", Condition::Any, None));
        // A full store still takes changes to the keys it has.
        assert!(matches!(
            put(&mut state, "k0000000", "v"),
            KvResponse::Put { .. }
        ));
        delete(&mut state, "k0000001");
        assert!(matches!(
            put(&mut state, "new", "v"),
            KvResponse::Put { .. }
        ));
        assert_eq!(state.key_count(), MAX_KEYS);
    }

    #[test]
    fn the_store_holds_at_most_max_store_bytes() {
        let mut state = ClusterState::default();
        let mib = Bytes::from(vec![7u8; MAX_VALUE_LEN]);
        let put_mib = |state: &mut ClusterState, key: &str| {
            kv(
                state,
                KvCommand::Put {
                    key: key.into(),
                    value: mib.clone(),
                    condition: Condition::Any,
                    lease: None,
                },
            )
        };
        let fit = MAX_STORE_BYTES / (MAX_VALUE_LEN as u64 + 4);
        for i in 0..fit {
            let answer = put_mib(&mut state, &format!("{i:04}"));
            assert!(matches!(answer, KvResponse::Put { .. }), "{i}: {answer:?}");
        }
        let before = state.clone();
        assert!(is_invalid(&put_mib(&mut state, "full")));
        assert_eq!(state, before);
        // Replacing a value by one no bigger still fits.
        assert!(matches!(
            put_mib(&mut state, "0000"),
            KvResponse::Put { .. }
        ));
        assert!(matches!(
            put(&mut state, "0001", "small"),
            KvResponse::Put { .. }
        ));
        assert!(matches!(
            put_mib(&mut state, "full"),
            KvResponse::Put { .. }
        ));
        assert_consistent(&state);
    }

    #[test]
    fn events_come_in_revision_order_filtered_by_prefix() {
        let mut state = ClusterState::default();
        put(&mut state, "a/1", "x");
        put(&mut state, "b/1", "x");
        put(&mut state, "a/2", "x");
        delete(&mut state, "a/1");
        let events = state.events_since("a/", 0, 100).unwrap();
        let seen: Vec<_> = events
            .iter()
            .map(|e| (e.kind, e.kv.key.as_str(), e.kv.mod_revision))
            .collect();
        assert_eq!(
            seen,
            [
                (EventKind::Put, "a/1", 1),
                (EventKind::Put, "a/2", 3),
                (EventKind::Delete, "a/1", 4)
            ]
        );
        // The delete event is the key as it was, at the deleting revision.
        assert_eq!(events[2].kv.value, "x");
        assert_eq!(events[2].kv.create_revision, 1);
        assert_eq!(state.events_since("a/", 3, 100).unwrap().len(), 2);
        assert_eq!(state.events_since("", 2, 1).unwrap()[0].kv.key, "b/1");
        assert_eq!(state.events_since("", 5, 100).unwrap(), []);
        assert_eq!(state.events_since("", u64::MAX, 100).unwrap(), []);
        assert_eq!(state.events_since("", 0, 0).unwrap(), []);
    }

    #[test]
    fn compaction_forgets_history_and_never_goes_back() {
        let mut state = ClusterState::default();
        for i in 0..5 {
            put(&mut state, "k", &i.to_string());
        }
        assert_eq!(state.compacted(), 0);
        let before = state.clone();
        assert!(is_invalid(&kv(
            &mut state,
            KvCommand::Compact { revision: 6 }
        )));
        assert_eq!(state, before);
        assert_eq!(
            kv(&mut state, KvCommand::Compact { revision: 3 }),
            KvResponse::Compacted { revision: 3 }
        );
        assert_eq!(state.revision(), 5, "compaction is not a change");
        assert_eq!(state.compacted(), 3);
        assert_eq!(state.events_since("", 2, 10), Err(KvError::Compacted(3)));
        assert_eq!(state.events_since("", 3, 10).unwrap().len(), 3);
        // Backwards is a no-op answering where it stands.
        assert_eq!(
            kv(&mut state, KvCommand::Compact { revision: 1 }),
            KvResponse::Compacted { revision: 3 }
        );
        assert_eq!(
            kv(&mut state, KvCommand::Compact { revision: 5 }),
            KvResponse::Compacted { revision: 5 }
        );
        assert_eq!(state.events_since("", 5, 10).unwrap().len(), 1);
        assert_consistent(&state);
    }

    #[test]
    fn a_limit_never_splits_a_revision() {
        let mut state = ClusterState::default();
        put(&mut state, "x", "1"); // 1
        let lease = grant(&mut state, 100, 0);
        for key in ["a", "b", "c"] {
            put_leased(&mut state, key, lease); // 2, 3, 4
        }
        kv(&mut state, KvCommand::RevokeLease { lease }); // 5: three deletes
        put(&mut state, "x", "2"); // 6
        let revisions =
            |events: Vec<Event>| -> Vec<u64> { events.iter().map(|e| e.kv.mod_revision).collect() };
        assert_eq!(revisions(state.events_since("", 3, 3).unwrap()), [3, 4]);
        assert_eq!(
            revisions(state.events_since("", 3, 5).unwrap()),
            [3, 4, 5, 5, 5]
        );
        // A first revision bigger than the limit comes whole: progress.
        assert_eq!(revisions(state.events_since("", 5, 1).unwrap()), [5, 5, 5]);
        // Filtering happens before counting.
        assert_eq!(revisions(state.events_since("x", 0, 2).unwrap()), [1, 6]);
    }

    #[test]
    fn history_is_bounded_by_event_count() {
        let mut state = ClusterState::default();
        let extra = 10;
        for i in 0..MAX_HISTORY_EVENTS + extra {
            put(&mut state, &format!("k{}", i % 100), "v");
        }
        assert_eq!(state.history.len(), MAX_HISTORY_EVENTS);
        assert_eq!(state.compacted(), extra as u64 + 1);
        assert_eq!(
            state.events_since("", extra as u64, 1),
            Err(KvError::Compacted(extra as u64 + 1))
        );
        assert_eq!(
            state.events_since("", 0, 1).unwrap_err(),
            KvError::Compacted(extra as u64 + 1)
        );
        let first = state.events_since("", state.compacted(), 1).unwrap();
        assert_eq!(first[0].kv.mod_revision, extra as u64 + 1);
        assert_consistent(&state);
    }

    #[test]
    fn history_is_bounded_by_bytes() {
        let mut state = ClusterState::default();
        let mib = Bytes::from(vec![1u8; MAX_VALUE_LEN]);
        let puts = MAX_HISTORY_BYTES / MAX_VALUE_LEN as u64 + 5;
        for _ in 0..puts {
            kv(
                &mut state,
                KvCommand::Put {
                    key: "big".into(),
                    value: mib.clone(),
                    condition: Condition::Any,
                    lease: None,
                },
            );
        }
        assert!(state.history_bytes <= MAX_HISTORY_BYTES);
        // Every event is 1 MiB and 3 bytes, so 63 fit.
        assert_eq!(state.history.len(), 63);
        assert_eq!(state.compacted(), puts - 63 + 1);
        assert_consistent(&state);
    }

    #[test]
    fn one_revision_bigger_than_the_history_bound_is_dropped_whole() {
        let mut state = ClusterState::default();
        let lease = grant(&mut state, 100, 0);
        let mib = Bytes::from(vec![1u8; MAX_VALUE_LEN]);
        for i in 0..MAX_HISTORY_BYTES / MAX_VALUE_LEN as u64 {
            kv(
                &mut state,
                KvCommand::Put {
                    key: format!("k{i:03}"),
                    value: mib.clone(),
                    condition: Condition::Any,
                    lease: Some(lease),
                },
            );
        }
        kv(&mut state, KvCommand::ExpireLeases { now_ms: 100 });
        let revision = state.revision();
        assert_eq!(state.key_count(), 0);
        assert_eq!(state.compacted(), revision + 1);
        assert_eq!(state.history.len(), 0);
        assert_eq!(
            state.events_since("", revision, 10),
            Err(KvError::Compacted(revision + 1))
        );
        assert_eq!(state.events_since("", revision + 1, 10).unwrap(), []);
        // And the store carries on.
        put(&mut state, "after", "v");
        assert_eq!(state.events_since("", revision + 1, 10).unwrap().len(), 1);
        assert_consistent(&state);
    }

    fn declare(state: &mut ClusterState, name: &str, replicas: &[NodeId]) -> MetaResponse {
        meta(
            state,
            MetaCommand::DeclareQueue {
                name: name.into(),
                replicas: replicas.to_vec(),
            },
        )
    }

    fn declare_durable(
        state: &mut ClusterState,
        name: &str,
        filter: &str,
        replicas: &[NodeId],
    ) -> MetaResponse {
        meta(
            state,
            MetaCommand::DeclareDurable {
                name: name.into(),
                filter: filter.into(),
                replicas: replicas.to_vec(),
            },
        )
    }

    #[test]
    fn a_queue_whose_group_would_be_anothers_is_refused() {
        // Find two names with the same group id (32-bit FNV-1a: a few
        // hundred thousand tries at most).
        let mut seen = std::collections::HashMap::new();
        let (first, second) = (0u64..)
            .find_map(|n| {
                let name = format!("q{n}");
                let group = crate::types::queue_group_id(&name);
                seen.insert(group, name.clone())
                    .map(|earlier| (earlier, name))
            })
            .unwrap();
        let mut state = ClusterState::default();
        assert!(matches!(
            declare(&mut state, &first, &[1, 2, 3]),
            MetaResponse::Declared { existed: false, .. }
        ));
        match declare(&mut state, &second, &[1, 2, 3]) {
            MetaResponse::Invalid(why) => assert!(why.contains("choose another name"), "{why}"),
            other => panic!("{second} declared beside {first}: {other:?}"),
        }
        assert_eq!(state.queues().len(), 1);
        assert_ne!(
            crate::types::queue_group_id(""),
            crate::types::METADATA_GROUP
        );
    }

    #[test]
    fn a_queue_is_declared_once_and_keeps_its_replicas() {
        let mut state = ClusterState::default();
        assert_eq!(
            declare(&mut state, "orders", &[1, 2, 3]),
            MetaResponse::Declared {
                existed: false,
                replicas: vec![1, 2, 3]
            }
        );
        assert_eq!(
            declare(&mut state, "orders", &[4, 5]),
            MetaResponse::Declared {
                existed: true,
                replicas: vec![1, 2, 3]
            }
        );
        assert_eq!(state.queues()["orders"], [1, 2, 3]);
        assert_eq!(state.revision(), 0, "declarations are not key changes");
        let delete = |state: &mut ClusterState| {
            meta(
                state,
                MetaCommand::DeleteQueue {
                    name: "orders".into(),
                },
            )
        };
        assert_eq!(delete(&mut state), MetaResponse::Removed { existed: true });
        assert_eq!(delete(&mut state), MetaResponse::Removed { existed: false });
        assert!(state.queues().is_empty());
        assert_consistent(&state);
    }

    #[test]
    fn a_durable_is_declared_once_with_its_filter() {
        let mut state = ClusterState::default();
        assert_eq!(
            declare_durable(&mut state, "audit", "orders.>", &[2, 1]),
            MetaResponse::Declared {
                existed: false,
                replicas: vec![2, 1]
            }
        );
        assert_eq!(
            declare_durable(&mut state, "audit", "orders.>", &[3]),
            MetaResponse::Declared {
                existed: true,
                replicas: vec![2, 1]
            }
        );
        let before = state.clone();
        assert!(matches!(
            declare_durable(&mut state, "audit", "payments.>", &[2, 1]),
            MetaResponse::Invalid(_)
        ));
        assert_eq!(state, before);
        assert_eq!(
            state.durables()["audit"],
            Durable {
                filter: "orders.>".into(),
                replicas: vec![2, 1]
            }
        );
        // Queues and durables are separate tables.
        assert!(state.queues().is_empty());
        let removed = meta(
            &mut state,
            MetaCommand::DeleteDurable {
                name: "audit".into(),
            },
        );
        assert_eq!(removed, MetaResponse::Removed { existed: true });
        assert!(state.durables().is_empty());
    }

    #[test]
    fn changed_replicas_join_and_only_current_ones_are_remembered() {
        let mut state = ClusterState::default();
        declare(&mut state, "jobs", &[1, 2, 3]);
        let change = |state: &mut ClusterState, from: &[NodeId], to: &[NodeId]| {
            meta(
                state,
                MetaCommand::ChangeQueueReplicas {
                    name: "jobs".into(),
                    from: from.to_vec(),
                    to: to.to_vec(),
                },
            )
        };
        let declared = |replicas: &[NodeId]| MetaResponse::Declared {
            existed: true,
            replicas: replicas.to_vec(),
        };
        // Node 2 left: node 4 takes its place, and joins.
        assert_eq!(
            change(&mut state, &[1, 2, 3], &[1, 4, 3]),
            declared(&[1, 4, 3])
        );
        assert!(state.joined_queue("jobs", 4));
        assert!(!state.joined_queue("jobs", 1));
        // Sent again: the same answer, nothing more changes.
        let before = state.clone();
        assert_eq!(
            change(&mut state, &[1, 2, 3], &[1, 4, 3]),
            declared(&[1, 4, 3])
        );
        assert_eq!(state, before);
        // Refused, changing nothing: a stale `from`, no replica kept, bad
        // replica sets, an undeclared queue.
        let refused: [(&[NodeId], &[NodeId]); 5] = [
            (&[1, 2, 3], &[1, 5, 3]),
            (&[1, 4, 3], &[5, 6]),
            (&[1, 4, 3], &[]),
            (&[1, 4, 3], &[1, 1]),
            (&[1, 4, 3], &[1, 0]),
        ];
        for (from, to) in refused {
            let answer = change(&mut state, from, to);
            assert!(
                matches!(answer, MetaResponse::Invalid(_)),
                "{from:?} -> {to:?}: {answer:?}"
            );
        }
        let undeclared = meta(
            &mut state,
            MetaCommand::ChangeQueueReplicas {
                name: "other".into(),
                from: vec![1],
                to: vec![1, 2],
            },
        );
        assert!(matches!(undeclared, MetaResponse::Invalid(_)));
        assert_eq!(state, before);
        // Shrinking forgets a joined replica that goes; growing adds one.
        assert_eq!(change(&mut state, &[1, 4, 3], &[1, 3]), declared(&[1, 3]));
        assert!(!state.joined_queue("jobs", 4));
        assert_eq!(
            change(&mut state, &[1, 3], &[1, 3, 5]),
            declared(&[1, 3, 5])
        );
        assert!(state.joined_queue("jobs", 5));
        let back = ClusterState::from_snapshot(&state.to_snapshot()).unwrap();
        assert_eq!(back, state);
        meta(
            &mut state,
            MetaCommand::DeleteQueue {
                name: "jobs".into(),
            },
        );
        assert!(!state.joined_queue("jobs", 5));
        assert_eq!(state, ClusterState::default());
    }

    #[test]
    fn declarations_are_validated() {
        let mut state = ClusterState::default();
        let long = "q".repeat(MAX_NAME_LEN);
        assert!(matches!(
            declare(&mut state, &long, &[1]),
            MetaResponse::Declared { .. }
        ));
        let too_many: Vec<NodeId> = (1..=MAX_REPLICAS as u64 + 1).collect();
        let before = state.clone();
        let bad: [(&str, &[NodeId]); 10] = [
            ("", &[1]),
            (&format!("{long}q"), &[1]),
            ("a b", &[1]),
            ("a\tb", &[1]),
            ("a\u{7}b", &[1]),
            ("a\u{a0}b", &[1]),
            ("ok", &[]),
            ("ok", &[1, 2, 1]),
            ("ok", &[0]),
            ("ok", &too_many),
        ];
        for (name, replicas) in bad {
            let answer = declare(&mut state, name, replicas);
            assert!(
                matches!(answer, MetaResponse::Invalid(_)),
                "{name:?} {replicas:?}"
            );
            let answer = declare_durable(&mut state, name, "a.b", replicas);
            assert!(
                matches!(answer, MetaResponse::Invalid(_)),
                "{name:?} {replicas:?}"
            );
        }
        for filter in ["", "a b", &"f".repeat(MAX_FILTER_LEN + 1)] {
            let answer = declare_durable(&mut state, "d", filter, &[1]);
            assert!(matches!(answer, MetaResponse::Invalid(_)), "{filter:?}");
        }
        assert_eq!(state, before);
        let most: Vec<NodeId> = (1..=MAX_REPLICAS as u64).collect();
        assert!(matches!(
            declare(&mut state, "ok", &most),
            MetaResponse::Declared { .. }
        ));
    }

    #[test]
    fn declarations_are_bounded() {
        let mut state = ClusterState::default();
        for i in 0..MAX_QUEUES {
            declare(&mut state, &format!("q{i}"), &[1]);
            declare_durable(&mut state, &format!("d{i}"), "a.>", &[1]);
        }
        let before = state.clone();
        assert!(matches!(
            declare(&mut state, "one-more", &[1]),
            MetaResponse::Invalid(_)
        ));
        assert!(matches!(
            declare_durable(&mut state, "one-more", "a.>", &[1]),
            MetaResponse::Invalid(_)
        ));
        assert_eq!(state, before);
        // A full table still answers re-declarations.
        assert_eq!(
            declare(&mut state, "q7", &[2]),
            MetaResponse::Declared {
                existed: true,
                replicas: vec![1]
            }
        );
        meta(&mut state, MetaCommand::DeleteQueue { name: "q7".into() });
        assert!(matches!(
            declare(&mut state, "one-more", &[1]),
            MetaResponse::Declared { .. }
        ));
    }

    /// A state using every part: keys with and without leases, deleted and
    /// recreated keys, a compaction, declarations.
    fn busy_state() -> ClusterState {
        let mut state = ClusterState::default();
        let lease = grant(&mut state, 100, 10);
        grant_owned(&mut state, 500, 10, Some("alice"));
        put(&mut state, "a", "1");
        put_leased(&mut state, "b", lease);
        put(&mut state, "c", "1");
        delete(&mut state, "c");
        put(&mut state, "c", "2");
        kv(&mut state, KvCommand::Compact { revision: 2 });
        declare(&mut state, "orders", &[1, 2]);
        declare_durable(&mut state, "audit", "orders.>", &[2]);
        state
    }

    #[test]
    fn a_snapshot_reads_back_as_the_same_state() {
        let state = busy_state();
        let mut restored = ClusterState::from_snapshot(&state.to_snapshot()).unwrap();
        assert_eq!(restored, state);
        assert_consistent(&restored);
        assert_eq!(restored.next_lease_deadline(), Some(110));
        // The rebuilt lease index works: the lease's key goes with it.
        kv(&mut restored, KvCommand::ExpireLeases { now_ms: 110 });
        assert_eq!(restored.get("b"), None);
        assert_eq!(
            ClusterState::from_snapshot(&ClusterState::default().to_snapshot()).unwrap(),
            ClusterState::default()
        );
    }

    #[test]
    fn garbage_snapshots_are_errors_not_panics() {
        let good = busy_state().to_snapshot();
        let check = |bytes: &[u8]| {
            if let Ok(state) = ClusterState::from_snapshot(bytes) {
                assert_consistent(&state);
            }
        };
        for len in 0..good.len() {
            assert!(
                ClusterState::from_snapshot(&good[..len]).is_err(),
                "truncated to {len}"
            );
        }
        let mut rng = Rng(0x5eed);
        for i in 0..good.len() {
            for _ in 0..8 {
                let mut bytes = good.clone();
                bytes[i] = rng.next_u64() as u8;
                check(&bytes);
            }
        }
        for _ in 0..2000 {
            let len = rng.index(300);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            check(&bytes);
        }
        // A huge claimed length with nothing behind it.
        check(&[SNAPSHOT_FORMAT as u8, 5, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(ClusterState::from_snapshot(&trailing).is_err());
    }

    #[test]
    fn inconsistent_snapshots_are_refused() {
        let refused = |broken: &dyn Fn(&mut ClusterState)| {
            let mut state = busy_state();
            broken(&mut state);
            let bytes = state.to_snapshot();
            let answer = ClusterState::from_snapshot(&bytes);
            assert!(answer.is_err(), "{state:?}");
        };
        refused(&|s| s.keys.get_mut("b").unwrap().lease = Some(9));
        refused(&|s| s.keys.get_mut("a").unwrap().version = 0);
        refused(&|s| s.keys.get_mut("a").unwrap().create_revision = 99);
        refused(&|s| s.keys.get_mut("a").unwrap().mod_revision = 99);
        refused(&|s| s.keys.get_mut("a").unwrap().key = "z".into());
        refused(&|s| s.last_lease = 1);
        refused(&|s| s.compacted = 99);
        refused(&|s| s.history.swap(0, 2));
        refused(&|s| s.revision = 2);
        refused(&|s| s.leases.get_mut(&2).unwrap().owner = Some("o".repeat(MAX_OWNER_LEN + 1)));
        let mut bytes = busy_state().to_snapshot();
        // The format number: the one before (leases without owners) and
        // the next are both refused.
        for format in [SNAPSHOT_FORMAT - 1, SNAPSHOT_FORMAT + 1] {
            bytes[0] = format as u8;
            assert!(ClusterState::from_snapshot(&bytes).is_err(), "{format}");
        }
    }

    #[test]
    fn counters_at_their_end_refuse_instead_of_wrapping() {
        let mut state = ClusterState {
            revision: u64::MAX,
            last_lease: u64::MAX,
            ..ClusterState::default()
        };
        assert_refused(&mut state, put_cmd("a", "v", Condition::Any, None));
        assert_refused(
            &mut state,
            KvCommand::GrantLease {
                ttl_ms: 1,
                now_ms: 0,
                owner: None,
            },
        );
    }

    #[test]
    fn only_the_owner_keeps_a_lease_alive_or_revokes_it() {
        let mut state = ClusterState::default();
        let lease = match kv(
            &mut state,
            KvCommand::GrantLease {
                ttl_ms: 1000,
                now_ms: 0,
                owner: Some("alice".into()),
            },
        ) {
            KvResponse::Lease { lease, .. } => lease,
            other => panic!("{other:?}"),
        };
        for by in [None, Some("mallory".to_string())] {
            assert_eq!(
                kv(
                    &mut state,
                    KvCommand::KeepAliveAs {
                        lease,
                        now_ms: 10,
                        by: by.clone()
                    }
                ),
                KvResponse::Failed(KvError::NotOwner(lease))
            );
            assert_eq!(
                kv(&mut state, KvCommand::RevokeLeaseAs { lease, by }),
                KvResponse::Failed(KvError::NotOwner(lease))
            );
        }
        assert!(state.lease(lease).is_some(), "refusals changed nothing");
        let alice = Some("alice".to_string());
        assert!(matches!(
            kv(
                &mut state,
                KvCommand::KeepAliveAs {
                    lease,
                    now_ms: 10,
                    by: alice.clone()
                }
            ),
            KvResponse::Lease { .. }
        ));
        assert!(matches!(
            kv(&mut state, KvCommand::RevokeLeaseAs { lease, by: alice }),
            KvResponse::LeasesEnded { .. }
        ));
        // An unowned lease (an open broker) is anyone's.
        let open = match kv(
            &mut state,
            KvCommand::GrantLease {
                ttl_ms: 1000,
                now_ms: 0,
                owner: None,
            },
        ) {
            KvResponse::Lease { lease, .. } => lease,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            kv(
                &mut state,
                KvCommand::RevokeLeaseAs {
                    lease: open,
                    by: Some("bob".into())
                }
            ),
            KvResponse::LeasesEnded { .. }
        ));
    }

    #[test]
    fn a_lease_keeps_its_owner() {
        let mut state = ClusterState::default();
        let alice = grant_owned(&mut state, 1000, 0, Some("alice"));
        let open = grant(&mut state, 1000, 0);
        let longest = "o".repeat(MAX_OWNER_LEN);
        let long = grant_owned(&mut state, 1000, 0, Some(&longest));
        assert_eq!(
            state.lease(alice),
            Some(LeaseInfo {
                ttl_ms: 1000,
                deadline_ms: 1000,
                owner: Some("alice".into()),
            })
        );
        assert_eq!(state.lease_owner(alice), Some(Some("alice")));
        assert_eq!(state.lease_owner(open), Some(None));
        assert_eq!(state.lease(open).unwrap().owner, None);
        assert_eq!(state.lease_owner(long), Some(Some(longest.as_str())));
        assert_eq!(state.lease_owner(99), None);
        // Keep-alives keep it; it goes with the lease.
        kv(
            &mut state,
            KvCommand::KeepAlive {
                lease: alice,
                now_ms: 500,
            },
        );
        assert_eq!(state.lease_owner(alice), Some(Some("alice")));
        kv(&mut state, KvCommand::RevokeLease { lease: alice });
        assert_eq!(state.lease_owner(alice), None);
        // Through a snapshot.
        let restored = ClusterState::from_snapshot(&state.to_snapshot()).unwrap();
        assert_eq!(restored.lease_owner(long), Some(Some(longest.as_str())));
        assert_eq!(restored.lease_owner(open), Some(None));
        assert_consistent(&state);
    }

    #[test]
    fn a_lease_owner_is_bounded() {
        let mut state = ClusterState::default();
        grant(&mut state, 1000, 0);
        let before_id = state.last_lease;
        assert_refused(
            &mut state,
            KvCommand::GrantLease {
                ttl_ms: 1000,
                now_ms: 0,
                owner: Some("o".repeat(MAX_OWNER_LEN + 1)),
            },
        );
        // The refusal used no lease id.
        assert_eq!(grant_owned(&mut state, 1000, 0, Some("")), before_id + 1);
        assert_eq!(state.lease_owner(before_id + 1), Some(Some("")));
        assert_consistent(&state);
    }

    #[test]
    fn renewing_all_leases_moves_only_the_ends_that_would_be_earlier() {
        let mut state = ClusterState::default();
        let short = grant(&mut state, 100, 0); // ends at 100
        let long = grant(&mut state, 10_000, 5000); // ends at 15,000
        let kept = grant(&mut state, 100, 0);
        kv(
            &mut state,
            KvCommand::KeepAlive {
                lease: kept,
                now_ms: 5000,
            },
        ); // ends at 5,100
        put_leased(&mut state, "k", short);
        let revision = state.revision();
        let history = state.history.clone();
        // A new leader at 1,000, after an election in which `short`'s end
        // passed: it gets its whole ttl again; the others end later anyway.
        assert_eq!(
            kv(&mut state, KvCommand::RenewAllLeases { now_ms: 1000 }),
            KvResponse::LeasesRenewed { count: 1 }
        );
        assert_eq!(state.lease(short).unwrap().deadline_ms, 1100);
        assert_eq!(state.lease(long).unwrap().deadline_ms, 15_000);
        assert_eq!(state.lease(kept).unwrap().deadline_ms, 5100);
        assert_eq!(state.next_lease_deadline(), Some(1100));
        assert_eq!(state.revision(), revision, "renewing is not a change");
        assert_eq!(state.history, history);
        assert_consistent(&state);
        // The new leader's first expiry at its clock ends nothing.
        assert_eq!(
            kv(&mut state, KvCommand::ExpireLeases { now_ms: 1000 }),
            KvResponse::LeasesEnded {
                leases: vec![],
                revision
            }
        );
        assert!(state.get("k").is_some());
        // Every lease renewed; a clock that lags moves nothing back.
        assert_eq!(
            kv(&mut state, KvCommand::RenewAllLeases { now_ms: 20_000 }),
            KvResponse::LeasesRenewed { count: 3 }
        );
        assert_eq!(state.lease(long).unwrap().deadline_ms, 30_000);
        let before = state.clone();
        assert_eq!(
            kv(&mut state, KvCommand::RenewAllLeases { now_ms: 0 }),
            KvResponse::LeasesRenewed { count: 0 }
        );
        assert_eq!(state, before);
        // Saturates at the end of time.
        kv(&mut state, KvCommand::RenewAllLeases { now_ms: u64::MAX });
        assert_eq!(state.next_lease_deadline(), Some(u64::MAX));
        assert_consistent(&state);
        let mut empty = ClusterState::default();
        assert_eq!(
            kv(&mut empty, KvCommand::RenewAllLeases { now_ms: 5 }),
            KvResponse::LeasesRenewed { count: 0 }
        );
        assert_eq!(empty, ClusterState::default());
    }

    #[test]
    fn a_scan_says_where_to_resume() {
        let mut state = ClusterState::default();
        put(&mut state, "a/1", "x"); // 1
        put(&mut state, "b/1", "x"); // 2
        put(&mut state, "a/2", "x"); // 3
        put(&mut state, "b/2", "x"); // 4
                                     // Nothing more matched: resume after the current revision.
        let (events, next) = state.events_since_scanned("a/", 1, 10).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(next, 5);
        // An idle watcher on a quiet prefix moves past what it scanned.
        let (events, next) = state.events_since_scanned("quiet/", 0, 10).unwrap();
        assert_eq!((events.len(), next), (0, 5));
        put(&mut state, "b/3", "x"); // 5
        let (events, next) = state.events_since_scanned("quiet/", next, 10).unwrap();
        assert_eq!((events.len(), next), (0, 6));
        // Cut at the limit: resume after the last answered revision.
        let (events, next) = state.events_since_scanned("", 1, 2).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(next, 3);
        let (events, next) = state.events_since_scanned("a/", 0, 1).unwrap();
        assert_eq!(events[0].kv.mod_revision, 1);
        assert_eq!(next, 2);
        // Cut exactly at the end of history: nothing more to scan.
        let (events, next) = state.events_since_scanned("", 4, 2).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(next, 6);
        // Beyond the current revision: nothing, and never backwards.
        assert_eq!(state.events_since_scanned("", 6, 10).unwrap(), (vec![], 6));
        assert_eq!(
            state.events_since_scanned("", u64::MAX, 10).unwrap(),
            (vec![], u64::MAX)
        );
        // A limit of 0 scans nothing, so moves nothing.
        assert_eq!(state.events_since_scanned("", 2, 0).unwrap(), (vec![], 2));
        kv(&mut state, KvCommand::Compact { revision: 3 });
        assert_eq!(
            state.events_since_scanned("", 2, 10),
            Err(KvError::Compacted(3))
        );
        assert_eq!(state.events_since("a/", 3, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_scan_cut_inside_a_lease_end_resumes_at_whole_revisions() {
        let mut state = ClusterState::default();
        put(&mut state, "x", "1"); // 1
        let lease = grant(&mut state, 100, 0);
        for key in ["a", "b", "c"] {
            put_leased(&mut state, key, lease); // 2, 3, 4
        }
        kv(&mut state, KvCommand::RevokeLease { lease }); // 5: three deletes
        put(&mut state, "x", "2"); // 6
        let (events, next) = state.events_since_scanned("", 3, 3).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(next, 5);
        // A first revision bigger than the limit comes whole.
        let (events, next) = state.events_since_scanned("", next, 1).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(next, 6);
        let (events, next) = state.events_since_scanned("", next, 1).unwrap();
        assert_eq!((events.len(), next), (1, 7));
    }

    /// Reads every event under `prefix` from `from` by resuming with the
    /// answered revision, `limit` at a time.
    fn resume_all(state: &ClusterState, prefix: &str, mut from: u64, limit: usize) -> Vec<Event> {
        let mut all = Vec::new();
        loop {
            let (events, next) = state.events_since_scanned(prefix, from, limit).unwrap();
            assert!(next >= from, "went back from {from} to {next}");
            for event in &events {
                assert!(event.kv.mod_revision >= from && event.kv.mod_revision < next);
            }
            if next == from {
                assert!(events.is_empty());
                return all;
            }
            all.extend(events);
            from = next;
            if from > state.revision() {
                // One more read answers nothing and stays put.
                let (events, next) = state.events_since_scanned(prefix, from, limit).unwrap();
                assert_eq!((events.len(), next), (0, from));
                return all;
            }
        }
    }

    #[test]
    fn resuming_where_a_scan_says_misses_nothing_and_repeats_nothing() {
        let mut state = ClusterState::default();
        let mut rng = Rng(7);
        let keys = ["a/1", "a/2", "b/1", "b/2", "c"];
        for _ in 0..200 {
            match rng.index(10) {
                0 => {
                    let lease = grant(&mut state, 100, 0);
                    for _ in 0..rng.index(4) {
                        put_leased(&mut state, keys[rng.index(keys.len())], lease);
                    }
                    kv(&mut state, KvCommand::RevokeLease { lease });
                }
                1 | 2 => {
                    delete(&mut state, keys[rng.index(keys.len())]);
                }
                _ => {
                    put(&mut state, keys[rng.index(keys.len())], "v");
                }
            }
        }
        for prefix in ["", "a/", "b/", "c", "zzz"] {
            let everything = state.events_since(prefix, 0, usize::MAX).unwrap();
            for limit in [1, 2, 3, 7, 1000] {
                assert_eq!(
                    resume_all(&state, prefix, 0, limit),
                    everything,
                    "{prefix:?} {limit}"
                );
            }
        }
    }

    fn keys_of(page: &[KeyValue]) -> Vec<&str> {
        page.iter().map(|kv| kv.key.as_str()).collect()
    }

    #[test]
    fn a_page_lists_keys_after_the_start() {
        let mut state = ClusterState::default();
        for key in ["a", "p/1", "p/2", "p/3", "p/4", "q"] {
            put(&mut state, key, "vv");
        }
        let (page, more) = state.list_page("p/", None, 2, usize::MAX);
        assert_eq!((keys_of(&page), more), (vec!["p/1", "p/2"], true));
        let (page, more) = state.list_page("p/", Some("p/2"), 2, usize::MAX);
        assert_eq!((keys_of(&page), more), (vec!["p/3", "p/4"], false));
        let (page, more) = state.list_page("p/", Some("p/4"), 2, usize::MAX);
        assert_eq!((page.len(), more), (0, false));
        // Exactly the limit left: no more.
        let (page, more) = state.list_page("p/", Some("p/1"), 3, usize::MAX);
        assert_eq!((keys_of(&page), more), (vec!["p/2", "p/3", "p/4"], false));
        // A start that is not a key, or before the prefix, or after it.
        let (page, _) = state.list_page("p/", Some("p/25"), 1, usize::MAX);
        assert_eq!(keys_of(&page), ["p/3"]);
        let (page, _) = state.list_page("p/", Some("a"), 10, usize::MAX);
        assert_eq!(keys_of(&page), ["p/1", "p/2", "p/3", "p/4"]);
        let (page, more) = state.list_page("p/", Some("p0"), 10, usize::MAX);
        assert_eq!((page.len(), more), (0, false));
        // Strictly after: the start key itself is not listed.
        let (page, _) = state.list_page("", Some("a"), 1, usize::MAX);
        assert_eq!(keys_of(&page), ["p/1"]);
        // The whole store, and a prefix matching nothing.
        let (page, more) = state.list_page("", None, 100, usize::MAX);
        assert_eq!((page.len(), more), (6, false));
        assert_eq!(page, state.list("", 100));
        assert_eq!(state.list_page("r", None, 10, usize::MAX), (vec![], false));
        // A limit of 0 lists nothing but says whether anything matched.
        assert_eq!(state.list_page("p/", None, 0, usize::MAX), (vec![], true));
        assert_eq!(state.list_page("r", None, 0, usize::MAX), (vec![], false));
    }

    #[test]
    fn a_page_stops_at_its_byte_budget_but_lists_at_least_one_key() {
        let mut state = ClusterState::default();
        put(&mut state, "k1", "12345678"); // 10 bytes
        put(&mut state, "k2", "12345678"); // 10 bytes
        put(&mut state, "k3", &"x".repeat(100)); // 102 bytes
        put(&mut state, "k4", ""); // 2 bytes
        let (page, more) = state.list_page("k", None, 10, 20);
        assert_eq!((keys_of(&page), more), (vec!["k1", "k2"], true));
        let (page, more) = state.list_page("k", None, 10, 19);
        assert_eq!((keys_of(&page), more), (vec!["k1"], true));
        // A key bigger than the budget still comes, alone.
        let (page, more) = state.list_page("k", Some("k2"), 10, 20);
        assert_eq!((keys_of(&page), more), (vec!["k3"], true));
        let (page, more) = state.list_page("k", Some("k3"), 10, 20);
        assert_eq!((keys_of(&page), more), (vec!["k4"], false));
        let (page, more) = state.list_page("k", None, 10, 0);
        assert_eq!((keys_of(&page), more), (vec!["k1"], true));
        let (page, more) = state.list_page("k", None, 10, 124);
        assert_eq!((page.len(), more), (4, false));
    }

    #[test]
    fn paging_through_a_prefix_lists_each_key_once() {
        let mut state = ClusterState::default();
        for i in 0..50 {
            put(&mut state, &format!("p/{i:02}"), &"v".repeat(i));
            put(&mut state, &format!("q/{i:02}"), "v");
        }
        let whole = state.list("p/", usize::MAX);
        for (limit, max_bytes) in [(1, usize::MAX), (7, usize::MAX), (100, 60), (3, 1)] {
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let (page, more) = state.list_page("p/", after.as_deref(), limit, max_bytes);
                assert!(!page.is_empty() || !more);
                assert!(page.len() <= limit);
                after = page.last().map(|kv| kv.key.clone()).or(after);
                seen.extend(page);
                if !more {
                    break;
                }
            }
            assert_eq!(seen, whole, "{limit} {max_bytes}");
        }
    }

    fn key() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "a/1", "a/2", "b", "b/1", ""]).prop_map(String::from)
    }

    fn condition() -> impl Strategy<Value = Condition> {
        prop_oneof![
            2 => Just(Condition::Any),
            1 => Just(Condition::Absent),
            1 => (0u64..40).prop_map(Condition::ModRevision),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["q1", "q2", "bad name", ""]).prop_map(String::from)
    }

    fn owner() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            2 => Just(None),
            2 => prop::sample::select(vec!["alice", "bob", ""]).prop_map(|o| Some(o.into())),
            1 => Just(Some("o".repeat(MAX_OWNER_LEN))),
            1 => Just(Some("o".repeat(MAX_OWNER_LEN + 1))),
        ]
    }

    fn replicas() -> impl Strategy<Value = Vec<NodeId>> {
        prop::collection::vec(0u64..4, 0..4)
    }

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            5 => (key(), any::<u8>(), condition(), prop::option::of(0u64..6)).prop_map(
                |(key, value, condition, lease)| Command::Kv(KvCommand::Put {
                    key,
                    value: Bytes::from(vec![value]),
                    condition,
                    lease,
                })
            ),
            2 => (key(), condition())
                .prop_map(|(key, condition)| Command::Kv(KvCommand::Delete { key, condition })),
            2 => (0u64..300, 0u64..1000, owner()).prop_map(|(ttl_ms, now_ms, owner)| {
                Command::Kv(KvCommand::GrantLease {
                    ttl_ms,
                    now_ms,
                    owner,
                })
            }),
            1 => (0u64..1300).prop_map(|now_ms| Command::Kv(KvCommand::RenewAllLeases { now_ms })),
            1 => (0u64..6, 0u64..1000)
                .prop_map(|(lease, now_ms)| Command::Kv(KvCommand::KeepAlive { lease, now_ms })),
            1 => (0u64..6).prop_map(|lease| Command::Kv(KvCommand::RevokeLease { lease })),
            1 => (0u64..1300).prop_map(|now_ms| Command::Kv(KvCommand::ExpireLeases { now_ms })),
            1 => (0u64..40).prop_map(|revision| Command::Kv(KvCommand::Compact { revision })),
            1 => (name(), replicas())
                .prop_map(|(name, replicas)| Command::Meta(MetaCommand::DeclareQueue { name, replicas })),
            1 => name().prop_map(|name| Command::Meta(MetaCommand::DeleteQueue { name })),
            1 => (name(), prop::sample::select(vec!["a.>", "b.*", "x y"]), replicas()).prop_map(
                |(name, filter, replicas)| Command::Meta(MetaCommand::DeclareDurable {
                    name,
                    filter: filter.into(),
                    replicas,
                })
            ),
            1 => name().prop_map(|name| Command::Meta(MetaCommand::DeleteDurable { name })),
            1 => (name(), replicas(), replicas()).prop_map(|(name, from, to)| {
                Command::Meta(MetaCommand::ChangeQueueReplicas { name, from, to })
            }),
        ]
    }

    /// Whether an answer reports a change of keys (so a new revision).
    fn changes_keys(answer: &Response, before: &ClusterState, after: &ClusterState) -> bool {
        match answer {
            Response::Kv(KvResponse::Put { .. }) => true,
            Response::Kv(KvResponse::Deleted { prev, .. }) => prev.is_some(),
            // Ending leases only deletes keys.
            Response::Kv(KvResponse::LeasesEnded { .. }) => after.key_count() < before.key_count(),
            _ => false,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 200,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn replaying_from_a_snapshot_gives_the_same_state_and_answers(
            commands in prop::collection::vec(command(), 0..80),
            split in any::<prop::sample::Index>(),
        ) {
            let mut whole = ClusterState::default();
            let mut answers = Vec::new();
            for command in &commands {
                let before = whole.clone();
                let answer = whole.apply(command);
                let moved = whole.revision() - before.revision();
                prop_assert!(moved <= 1, "{command:?} moved the revision by {moved}");
                prop_assert_eq!(moved == 1, changes_keys(&answer, &before, &whole), "{:?} -> {:?}", command, answer);
                if matches!(
                    answer,
                    Response::Kv(KvResponse::Failed(_)) | Response::Meta(MetaResponse::Invalid(_))
                ) {
                    prop_assert_eq!(&whole, &before, "a failure changed the state");
                }
                assert_consistent(&whole);
                answers.push(answer);
            }
            let at = split.index(commands.len() + 1);
            let mut first = ClusterState::default();
            for command in &commands[..at] {
                first.apply(command);
            }
            let mut restored = ClusterState::from_snapshot(&first.to_snapshot()).unwrap();
            let rest: Vec<Response> = commands[at..].iter().map(|c| restored.apply(c)).collect();
            prop_assert_eq!(&rest[..], &answers[at..]);
            prop_assert_eq!(&restored, &whole);
            prop_assert_eq!(restored.to_snapshot(), whole.to_snapshot());
            // Watching by resuming where each scan says, and listing page
            // by page, see what one big read sees.
            for prefix in ["", "a", "a/", "b/1"] {
                let from = whole.compacted();
                let everything = whole.events_since(prefix, from, usize::MAX).unwrap();
                for limit in [1, 2] {
                    prop_assert_eq!(&resume_all(&whole, prefix, from, limit), &everything);
                    let mut listed = Vec::new();
                    let mut after: Option<String> = None;
                    loop {
                        let (page, more) = whole.list_page(prefix, after.as_deref(), limit, 2);
                        after = page.last().map(|kv| kv.key.clone()).or(after);
                        listed.extend(page);
                        if !more {
                            break;
                        }
                    }
                    prop_assert_eq!(&listed, &whole.list(prefix, usize::MAX));
                }
            }
        }
    }
}
