//! The cluster as a courier-rpc service for clients: the key-value store,
//! status and membership changes. Raft's own messages travel on
//! [`crate::network::RaftTransport`] beside it, on the same listener.

use std::sync::Arc;

use courier_rpc::Items;
use serde::{Deserialize, Serialize};

use crate::node::{ClusterError, ClusterNode, KvRequest, Read, Status};
use crate::types::{Event, KeyValue, KvResponse, NodeId};

/// Most keys one `list` answers; a client pages with a later prefix or
/// start key beyond that.
pub const MAX_LIST: usize = 10_000;

/// Bytes of keys and values one `list` page carries at most (beyond a
/// single key larger than that alone): well under the smallest frame limit
/// a cluster member accepts ([`crate::node::MIN_MESSAGE`]).
pub const MAX_LIST_BYTES: usize = 1024 * 1024;

/// Events a watch sends per batch it reads from the store.
const WATCH_BATCH: usize = 256;

/// One key as read, with the revision the read is at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Got {
    /// The key, if it exists.
    pub kv: Option<KeyValue>,
    /// The store's revision the answer reflects.
    pub revision: u64,
}

/// Keys as listed, with the revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// The store's revision the answer reflects.
    pub revision: u64,
    /// Whether more keys matched than were returned.
    pub more: bool,
}

/// The cluster's client-facing service.
#[courier_rpc::service]
pub trait ClusterService {
    /// A key-value write (put, delete, leases, compaction). Only the leader
    /// accepts it; any other node answers [`ClusterError::NotLeader`] with
    /// the leader's address, and nothing is done.
    async fn kv(&self, request: KvRequest) -> Result<KvResponse, ClusterError>;
    /// One key.
    async fn get(&self, key: String, read: Read) -> Result<Got, ClusterError>;
    /// Keys under a prefix after `start_after` (for the next page: the
    /// last key of the previous one), at most `limit` (capped at
    /// [`MAX_LIST`]) and about [`MAX_LIST_BYTES`] of keys and values, so a
    /// page always fits a message; `more` says another page follows.
    async fn list(
        &self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
        read: Read,
    ) -> Result<Listed, ClusterError>;
    /// Every change under `prefix` from revision `from` on (0: from the
    /// next change), in revision order, none skipped, until the caller
    /// drops the stream. A start before the compaction point ends the
    /// stream with `Err(Kv(Compacted(oldest)))`.
    async fn watch(&self, prefix: String, from: u64, events: Items<Result<Event, ClusterError>>);
    /// This node's view of the cluster.
    async fn status(&self) -> Result<Status, ClusterError>;
    /// Add a voting member (on the leader).
    async fn add_member(&self, id: NodeId, address: String) -> Result<(), ClusterError>;
    /// Remove a member (on the leader).
    async fn remove_member(&self, id: NodeId) -> Result<(), ClusterError>;
}

/// Who may do what with the cluster, for brokers that authenticate. The
/// identity is the caller's as courier-rpc proved it (`None`: anonymous).
pub trait ClusterAccess: Send + Sync + 'static {
    /// May read `key`, or list or watch keys under the prefix `key`.
    fn may_read(&self, who: Option<&str>, key: &str) -> bool;
    /// May write (put, delete) `key`.
    fn may_write(&self, who: Option<&str>, key: &str) -> bool;
    /// May use leases (grant, keep alive, revoke).
    fn may_lease(&self, who: Option<&str>) -> bool;
    /// May change membership, compact and read the status.
    fn may_admin(&self, who: Option<&str>) -> bool;
}

/// [`ClusterService`] served by one node.
#[derive(Clone)]
pub struct ClusterHost {
    node: Arc<ClusterNode>,
    access: Option<Arc<dyn ClusterAccess>>,
    routes: Option<Arc<courier_pubsub::route::Routes>>,
}

impl std::fmt::Debug for ClusterHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHost")
            .field("node", &self.node.id())
            .field("access", &self.access.is_some())
            .finish()
    }
}

impl ClusterHost {
    /// Serve `node` to anyone.
    pub fn new(node: Arc<ClusterNode>) -> ClusterHost {
        ClusterHost {
            node,
            access: None,
            routes: None,
        }
    }

    /// The same, reporting these pub/sub routes in `status`.
    pub fn with_routes(mut self, routes: Arc<courier_pubsub::route::Routes>) -> ClusterHost {
        self.routes = Some(routes);
        self
    }

    /// The same, checking every call against `access`.
    pub fn with_access(mut self, access: Arc<dyn ClusterAccess>) -> ClusterHost {
        self.access = Some(access);
        self
    }

    fn check(
        &self,
        allowed: impl Fn(&dyn ClusterAccess, Option<&str>) -> bool,
        what: &str,
    ) -> Result<(), ClusterError> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let who = courier_rpc::caller();
        if allowed(access.as_ref(), who.as_deref()) {
            Ok(())
        } else {
            Err(ClusterError::PermissionDenied(format!(
                "{} may not {what}",
                who.as_deref().unwrap_or("an anonymous caller")
            )))
        }
    }
}

impl ClusterHost {
    /// A lease is kept alive or revoked only by the identity that granted
    /// it (ids are small numbers anyone can guess). Checked here against
    /// this node's copy, to refuse early, and again when the command is
    /// applied (`KeepAliveAs`, `RevokeLeaseAs`), which no failover can
    /// skip.
    fn check_owner(&self, lease: crate::types::LeaseId) -> Result<(), ClusterError> {
        if self.access.is_none() {
            return Ok(());
        }
        let who = courier_rpc::caller();
        match self.node.lease_owner(lease) {
            Some(Some(owner)) if Some(owner.as_str()) != who.as_deref() => {
                Err(ClusterError::PermissionDenied(format!(
                    "lease {lease} belongs to another identity"
                )))
            }
            _ => Ok(()),
        }
    }
}

impl ClusterService for ClusterHost {
    async fn kv(&self, request: KvRequest) -> Result<KvResponse, ClusterError> {
        match &request {
            KvRequest::Put { key, .. } | KvRequest::Delete { key, .. } => {
                self.check(|a, who| a.may_write(who, key), &format!("write {key:?}"))?
            }
            KvRequest::GrantLease { .. } => self.check(|a, who| a.may_lease(who), "use leases")?,
            KvRequest::KeepAlive { lease } | KvRequest::RevokeLease { lease } => {
                self.check(|a, who| a.may_lease(who), "use leases")?;
                self.check_owner(*lease)?;
            }
            KvRequest::Compact { .. } => self.check(|a, who| a.may_admin(who), "compact")?,
        }
        let who = courier_rpc::caller().map(|who| who.to_string());
        self.node.kv_as(request, who).await
    }

    async fn get(&self, key: String, read: Read) -> Result<Got, ClusterError> {
        self.check(|a, who| a.may_read(who, &key), &format!("read {key:?}"))?;
        let (kv, revision) = self.node.get(&key, read).await?;
        Ok(Got { kv, revision })
    }

    async fn list(
        &self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
        read: Read,
    ) -> Result<Listed, ClusterError> {
        self.check(
            |a, who| a.may_read(who, &prefix),
            &format!("list {prefix:?}"),
        )?;
        let limit = (limit as usize).clamp(1, MAX_LIST);
        let (kvs, more, revision) = self
            .node
            .list_page(&prefix, start_after.as_deref(), limit, MAX_LIST_BYTES, read)
            .await?;
        Ok(Listed {
            kvs,
            revision,
            more,
        })
    }

    async fn watch(&self, prefix: String, from: u64, events: Items<Result<Event, ClusterError>>) {
        if let Err(e) = self.check(
            |a, who| a.may_read(who, &prefix),
            &format!("watch {prefix:?}"),
        ) {
            let _ = events.send(Err(e)).await;
            return;
        }
        let mut next = if from == 0 {
            self.node.local_revision() + 1
        } else {
            from
        };
        loop {
            let batch = match self.node.next_events(&prefix, next, WATCH_BATCH).await {
                Ok((batch, after)) => {
                    next = next.max(after);
                    batch
                }
                Err(e) => {
                    // Compacted, or shutting down: say so and end.
                    let _ = events.send(Err(e)).await;
                    return;
                }
            };
            for event in batch {
                next = next.max(event.kv.mod_revision + 1);
                if events.send(Ok(event)).await.is_err() {
                    return; // the watcher went away
                }
            }
        }
    }

    async fn status(&self) -> Result<Status, ClusterError> {
        self.check(|a, who| a.may_admin(who), "read the cluster's status")?;
        let mut status = self.node.status();
        if let Some(routes) = &self.routes {
            status.routes = routes.stats();
        }
        Ok(status)
    }

    async fn add_member(&self, id: NodeId, address: String) -> Result<(), ClusterError> {
        self.check(|a, who| a.may_admin(who), "change membership")?;
        self.node.add_member(id, address).await
    }

    async fn remove_member(&self, id: NodeId) -> Result<(), ClusterError> {
        self.check(|a, who| a.may_admin(who), "change membership")?;
        self.node.remove_member(id).await
    }
}
