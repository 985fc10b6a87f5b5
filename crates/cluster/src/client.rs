//! A client of the cluster's key-value store that finds the leader and
//! moves to a live node by itself.
//!
//! The client knows several node addresses. A write goes to the node it
//! believes leads; a node that does not lead answers with the leader's
//! address, and the client goes there and sends the write again (nothing
//! was done by the refusing node, so this never duplicates a write). A node
//! that cannot be reached is skipped for the next one.
//!
//! A write whose connection fails *after* it was sent is not resent: it may
//! have been applied, and sending it again could apply it twice (a put
//! would move the revision twice; a compare-and-set would fail against
//! itself). It fails with [`ClusterError::Unavailable`], and the caller,
//! who knows whether the write is idempotent, decides. Reads are always
//! retried.
//!
//! Watches resume by themselves: a [`Watch`] that loses its node reconnects
//! to another and continues from the revision after the last event it
//! delivered, so the caller sees every change once, in order.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use courier_cluster::client::KvClient;
//! let kv = KvClient::new(&["tcp://10.0.0.1:7878".parse()?, "tcp://10.0.0.2:7878".parse()?], Default::default())?;
//! let revision = kv.put("config/color", "blue").await?;
//! let got = kv.get("config/color").await?.expect("just written");
//! assert_eq!(got.mod_revision, revision);
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_rpc::{Client, ItemStream, RpcError};

/// Re-exported: what [`KvClient`] is made from, so a client needs no
/// other Courier crate.
pub use courier_rpc::ClientConfig;
/// Re-exported, as [`ClientConfig`].
pub use courier_transport::Address;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::node::{ClusterError, KvRequest, Read, Status};
use crate::service::{ClusterServiceClient, Listed};
use crate::types::{Condition, Event, KeyValue, KvError, KvResponse, LeaseId, NodeId};

// A watch stream has no deadline: it lives as long as the connection.

/// Rounds through every known node before an operation gives up (or the
/// client's timeout passes, whichever comes first)...
const ROUNDS: usize = 3;

/// ...but at least this many tries, backing off to half a second apart, so
/// an election in progress (which answers "no leader yet") is waited out.
const MIN_ATTEMPTS: usize = 24;

/// Reconnections in a row (about half a second apart once backed off) a
/// watch makes before it reports that it cannot go on: long enough to ride
/// out elections and restarts, bounded so a dead cluster is reported.
const WATCH_GIVE_UP: usize = 60;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvClientError {
    /// The cluster refused or could not do it.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// No node could be reached (the last failure is given).
    #[error("no cluster node reachable: {0}")]
    Unreachable(RpcError),
    /// A value did not decode as the type asked for.
    #[error("value of {key:?} is not a {type_name}: {reason}")]
    Decode {
        /// The key.
        key: String,
        /// The type asked for.
        type_name: &'static str,
        /// What postcard said.
        reason: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode value: {0}")]
    Encode(String),
    /// No addresses were given.
    #[error("no cluster addresses given")]
    NoAddresses,
    /// A call failed in a way no other node would change (refused, too
    /// large, a different protocol).
    #[error(transparent)]
    Rpc(RpcError),
}

impl KvClientError {
    /// What kind of failure this is: the cluster's
    /// ([`ClusterError::kind`]) or the call's ([`RpcError::kind`]); no
    /// reachable node is
    /// [`Unavailable`](courier_transport::ErrorKind::Unavailable), a value
    /// of another type
    /// [`Unsupported`](courier_transport::ErrorKind::Unsupported), a value
    /// that does not encode or no addresses
    /// [`InvalidInput`](courier_transport::ErrorKind::InvalidInput).
    pub fn kind(&self) -> courier_transport::ErrorKind {
        use courier_transport::ErrorKind;
        match self {
            KvClientError::Cluster(err) => err.kind(),
            KvClientError::Unreachable(_) => ErrorKind::Unavailable,
            KvClientError::Decode { .. } => ErrorKind::Unsupported,
            KvClientError::Encode(_) | KvClientError::NoAddresses => ErrorKind::InvalidInput,
            KvClientError::Rpc(err) => err.kind(),
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

impl KvClientError {
    /// The current key, if this is a failed compare-and-set.
    pub fn condition_failed(&self) -> Option<(Option<&KeyValue>, u64)> {
        match self {
            KvClientError::Cluster(ClusterError::Kv(KvError::ConditionFailed {
                current,
                revision,
            })) => Some((current.as_ref(), *revision)),
            _ => None,
        }
    }
}

struct Nodes {
    /// Every address known, given or learned from a leader hint.
    addresses: Vec<Address>,
    /// The one in use.
    current: usize,
    /// Its connection, if open.
    client: Option<ClusterServiceClient>,
}

/// The key-value store of a cluster, reached through any of its nodes.
#[derive(Clone)]
pub struct KvClient {
    nodes: Arc<Mutex<Nodes>>,
    config: ClientConfig,
    read: Read,
}

impl std::fmt::Debug for KvClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvClient")
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

/// Most addresses a client remembers (given ones plus leader hints), so a
/// stream of hints cannot grow it without bound.
const MAX_ADDRESSES: usize = 64;

impl KvClient {
    /// A client of the cluster whose nodes include `addresses`. Connects on
    /// first use.
    pub fn new(addresses: &[Address], config: ClientConfig) -> Result<KvClient, KvClientError> {
        if addresses.is_empty() {
            return Err(KvClientError::NoAddresses);
        }
        Ok(KvClient {
            nodes: Arc::new(Mutex::new(Nodes {
                addresses: addresses.iter().take(MAX_ADDRESSES).cloned().collect(),
                current: 0,
                client: None,
            })),
            config,
            read: Read::Linearizable,
        })
    }

    /// The same client, reading with `read` (stale reads may go to any node).
    pub fn with_read(&self, read: Read) -> KvClient {
        KvClient {
            nodes: self.nodes.clone(),
            config: self.config.clone(),
            read,
        }
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection to the current node, opened if needed.
    fn current(&self) -> (usize, ClusterServiceClient) {
        let mut nodes = self.nodes();
        let at = nodes.current;
        if let Some(client) = &nodes.client {
            return (at, client.clone());
        }
        let client =
            ClusterServiceClient::new(Client::lazy(&nodes.addresses[at], self.config.clone()));
        nodes.client = Some(client.clone());
        (at, client)
    }

    /// Move on from node `at` (if still current): to `hint` if given, else
    /// the next address.
    fn move_on(&self, at: usize, hint: Option<&str>) {
        let mut nodes = self.nodes();
        if nodes.current != at {
            return; // someone else moved already
        }
        let hinted = hint.and_then(|h| h.parse::<Address>().ok());
        let next = match hinted {
            Some(addr) => match nodes.addresses.iter().position(|a| *a == addr) {
                Some(i) => i,
                None if nodes.addresses.len() < MAX_ADDRESSES => {
                    nodes.addresses.push(addr);
                    nodes.addresses.len() - 1
                }
                None => (at + 1) % nodes.addresses.len(),
            },
            None => (at + 1) % nodes.addresses.len(),
        };
        nodes.current = next;
        nodes.client = None;
    }

    fn attempts(&self) -> usize {
        (self.nodes().addresses.len() * ROUNDS + 1).max(MIN_ATTEMPTS)
    }

    /// Run `op` against the current node, moving on where that is safe.
    /// `resend_after_failure`: whether a call whose connection failed may
    /// be sent again (reads), or not (writes, which may have been applied).
    async fn run<T, F, Fut>(&self, resend_after_failure: bool, op: F) -> Result<T, KvClientError>
    where
        F: Fn(ClusterServiceClient) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, ClusterError>, RpcError>>,
    {
        let mut last = None;
        // Bounded twice: rounds through the nodes, and the client's timeout
        // (an election takes 1–2 s and more under load, so a failover must
        // fit, but a dead cluster must be reported).
        let give_up = tokio::time::Instant::now() + self.config.timeout;
        for attempt in 0..self.attempts() {
            if attempt > 0 && tokio::time::Instant::now() >= give_up {
                break;
            }
            let (at, client) = self.current();
            // Connect first, sending nothing: a node that cannot be reached
            // is certainly not where a write was applied, so moving on is
            // safe; once connected, a failed call may have run.
            if let Err(e) = client.client().ready().await {
                if !e.is_retryable() {
                    // Refused credentials: every node would refuse them.
                    return Err(KvClientError::Rpc(e));
                }
                self.move_on(at, None);
                last = Some(e);
                pause(attempt).await;
                continue;
            }
            match op(client).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(ClusterError::NotLeader { address, leader })) => {
                    // Nothing was done: safe to send again, to the leader.
                    tracing::debug!(?leader, ?address, "not the leader; moving");
                    if address.is_none() {
                        // An election is on: give it a moment.
                        pause(attempt).await;
                    }
                    self.move_on(at, address.as_deref());
                    last = None;
                }
                Ok(Err(ClusterError::Unavailable(reason))) if resend_after_failure => {
                    tracing::debug!("node unavailable: {reason}");
                    self.move_on(at, None);
                    pause(attempt).await;
                }
                Ok(Err(e)) => return Err(KvClientError::Cluster(e)),
                // Refused, unknown service, too large: no node would differ.
                Err(e) if !e.is_retryable() => return Err(KvClientError::Rpc(e)),
                Err(e) if resend_after_failure || never_sent(&e) => {
                    self.move_on(at, None);
                    last = Some(e);
                    pause(attempt).await;
                }
                Err(e) => {
                    // Sent, and the answer lost: the write may have happened.
                    self.move_on(at, None);
                    return Err(KvClientError::Cluster(ClusterError::Unavailable(format!(
                        "the write may or may not have been applied: {e}"
                    ))));
                }
            }
        }
        Err(match last {
            Some(e) => KvClientError::Unreachable(e),
            None => KvClientError::Cluster(ClusterError::Unavailable("no leader found".into())),
        })
    }

    async fn write(&self, request: KvRequest) -> Result<KvResponse, KvClientError> {
        self.run(false, |c| {
            let request = request.clone();
            async move { c.kv(request).await }
        })
        .await
    }

    /// Set `key` to `value`; the store's revision after the write.
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<u64, KvClientError> {
        self.put_if(key, value, Condition::Any, None).await
    }

    /// Set `key` to `value` if `condition` holds, under `lease` if given.
    /// A failed condition is [`KvClientError::condition_failed`].
    pub async fn put_if(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        condition: Condition,
        lease: Option<LeaseId>,
    ) -> Result<u64, KvClientError> {
        let request = KvRequest::Put {
            key: key.to_string(),
            value: value.into(),
            condition,
            lease,
        };
        match self.write(request).await? {
            KvResponse::Put { revision, .. } => Ok(revision),
            other => Err(unexpected(other)),
        }
    }

    /// Set `key` to `value` only if its modification revision is `revision`.
    pub async fn cas(
        &self,
        key: &str,
        revision: u64,
        value: impl Into<Bytes>,
    ) -> Result<u64, KvClientError> {
        self.put_if(key, value, Condition::ModRevision(revision), None)
            .await
    }

    /// Create `key` only if it does not exist.
    pub async fn create(&self, key: &str, value: impl Into<Bytes>) -> Result<u64, KvClientError> {
        self.put_if(key, value, Condition::Absent, None).await
    }

    /// Delete `key`; what it held, if anything.
    pub async fn delete(&self, key: &str) -> Result<Option<KeyValue>, KvClientError> {
        let request = KvRequest::Delete {
            key: key.to_string(),
            condition: Condition::Any,
        };
        match self.write(request).await? {
            KvResponse::Deleted { prev, .. } => Ok(prev),
            other => Err(unexpected(other)),
        }
    }

    /// One key.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvClientError> {
        let read = self.read;
        self.run(true, |c| {
            let key = key.to_string();
            async move { c.get(key, read).await }
        })
        .await
        .map(|got| got.kv)
    }

    /// Keys under `prefix`, at most `limit`.
    pub async fn list(&self, prefix: &str, limit: u32) -> Result<Listed, KvClientError> {
        self.list_after(prefix, None, limit).await
    }

    /// The page of keys under `prefix` after `start_after` (the last key of
    /// the previous page), at most `limit`; `more` says another follows.
    pub async fn list_after(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Listed, KvClientError> {
        let read = self.read;
        self.run(true, |c| {
            let prefix = prefix.to_string();
            let start_after = start_after.map(str::to_string);
            async move { c.list(prefix, start_after, limit, read).await }
        })
        .await
    }

    /// Set `key` to `value` encoded with postcard.
    pub async fn put_typed<T: Serialize>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<u64, KvClientError> {
        let bytes =
            postcard::to_allocvec(value).map_err(|e| KvClientError::Encode(e.to_string()))?;
        self.put(key, bytes).await
    }

    /// `key`'s value decoded with postcard as a `T`, with its revision.
    pub async fn get_typed<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, u64)>, KvClientError> {
        let Some(kv) = self.get(key).await? else {
            return Ok(None);
        };
        let value = postcard::from_bytes(&kv.value).map_err(|e| KvClientError::Decode {
            key: key.to_string(),
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })?;
        Ok(Some((value, kv.mod_revision)))
    }

    /// A lease of `ttl`: keys put under it go when it is not kept alive.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvClientError> {
        let ttl_ms = ttl.as_millis().min(u64::MAX as u128) as u64;
        match self.write(KvRequest::GrantLease { ttl_ms }).await? {
            KvResponse::Lease { lease, .. } => Ok(lease),
            other => Err(unexpected(other)),
        }
    }

    /// Renew `lease` for its time to live. Safe to resend, so it is.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<(), KvClientError> {
        let answer = self
            .run(true, |c| async move {
                c.kv(KvRequest::KeepAlive { lease }).await
            })
            .await?;
        match answer {
            KvResponse::Lease { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// End `lease` now, deleting its keys.
    pub async fn revoke_lease(&self, lease: LeaseId) -> Result<(), KvClientError> {
        match self.write(KvRequest::RevokeLease { lease }).await? {
            KvResponse::LeasesEnded { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Forget history before `revision`.
    pub async fn compact(&self, revision: u64) -> Result<(), KvClientError> {
        match self.write(KvRequest::Compact { revision }).await? {
            KvResponse::Compacted { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The status of whichever node answers.
    pub async fn status(&self) -> Result<Status, KvClientError> {
        self.run(true, |c| async move { c.status().await }).await
    }

    /// The status of the leader: asks nodes until one that leads answers.
    pub async fn leader_status(&self) -> Result<Status, KvClientError> {
        for attempt in 0..self.attempts() {
            let status = self.status().await?;
            if status.leader == Some(status.node) {
                return Ok(status);
            }
            let hint = status
                .leader
                .and_then(|l| status.members.iter().find(|m| m.id == l))
                .map(|m| m.address.clone());
            let (at, _) = self.current();
            self.move_on(at, hint.as_deref());
            if hint.is_none() {
                pause(attempt).await;
            }
        }
        Err(KvClientError::Cluster(ClusterError::Unavailable(
            "no leader found".into(),
        )))
    }

    /// Add member `id` at `address` (sent to the leader).
    /// Add member `id` at `address` (sent to the leader), waiting while it
    /// copies the log (at most [`crate::node::CATCH_UP`]).
    ///
    /// First it asks the node itself: one that leads a cluster of its own
    /// (started without `--join`, or with another cluster's data) is
    /// refused, since adding it would throw away entries its state already
    /// applied. A node that cannot be asked is left to the leader, which
    /// adds nobody who does not catch up.
    pub async fn add_member(&self, id: NodeId, address: &str) -> Result<(), KvClientError> {
        if let Ok(target) = address.parse::<Address>() {
            let probe = ClusterServiceClient::new(Client::lazy(&target, self.config.clone()))
                .with_timeout(Duration::from_secs(2));
            if let Ok(Ok(status)) = probe.status().await {
                // Node ids are per cluster: whether the target is this
                // cluster's own leader shows in its address.
                let ours = self.leader_status().await.ok();
                let our_leader = ours.as_ref().and_then(|ours| {
                    ours.members
                        .iter()
                        .find(|m| Some(m.id) == ours.leader)
                        .map(|m| m.address.clone())
                });
                let leads_elsewhere =
                    status.leader == Some(status.node) && our_leader.as_deref() != Some(address);
                if leads_elsewhere {
                    return Err(KvClientError::Cluster(ClusterError::Membership(format!(
                        "node {} at {address} leads a cluster of its own (term {}, revision {}): \
                         wipe its data and start it with --join before adding it",
                        status.node, status.term, status.revision
                    ))));
                }
                if status.node != id {
                    return Err(KvClientError::Cluster(ClusterError::Membership(format!(
                        "{address} is node {}, not node {id}",
                        status.node
                    ))));
                }
            }
        }
        let patient = crate::node::CATCH_UP + Duration::from_secs(10);
        self.run(false, |c| {
            let address = address.to_string();
            async move { c.with_timeout(patient).add_member(id, address).await }
        })
        .await
    }

    /// Remove member `id` (sent to the leader).
    pub async fn remove_member(&self, id: NodeId) -> Result<(), KvClientError> {
        self.run(false, |c| async move { c.remove_member(id).await })
            .await
    }

    /// Every change under `prefix` from revision `from` (0: from now on).
    pub fn watch(&self, prefix: &str, from: u64) -> Watch {
        Watch {
            client: self.clone(),
            prefix: prefix.to_string(),
            from,
            last: None,
            skip: 0,
            stream: None,
            failures: 0,
        }
    }
}

/// A live watch: [`Watch::next`] gives each change once, in revision order,
/// across reconnections.
#[derive(Debug)]
pub struct Watch {
    client: KvClient,
    prefix: String,
    /// The revision to (re)start from; 0 until known when watching "from now".
    from: u64,
    /// The revision of the last event delivered, and how many of that
    /// revision's events were delivered (several changes share a revision
    /// when a lease takes many keys; every node sends them in one order).
    last: Option<(u64, usize)>,
    /// Events of `last`'s revision to skip after a reconnect.
    skip: usize,
    stream: Option<ItemStream<Result<Event, ClusterError>>>,
    failures: usize,
}

impl Watch {
    /// The revision of the last event delivered.
    pub fn last_revision(&self) -> Option<u64> {
        self.last.map(|(revision, _)| revision)
    }

    async fn open(&mut self) -> Result<(), KvClientError> {
        if self.from == 0 {
            // "From now": learn now's revision once, so a reconnect resumes
            // from it instead of from whatever "now" is later.
            // Linearizable: a lagging node's "now" would be in the past.
            let listed = self
                .client
                .with_read(Read::Linearizable)
                .list(&self.prefix, 1)
                .await?;
            self.from = listed.revision + 1;
        }
        let (from, skip) = match self.last {
            Some((revision, seen)) => (revision, seen),
            None => (self.from, 0),
        };
        let (at, client) = self.client.current();
        match client
            .without_deadline()
            .watch(self.prefix.clone(), from)
            .await
        {
            Ok(stream) => {
                self.stream = Some(stream);
                self.skip = skip;
                // A node took the watch: the outage (if any) is over, and
                // reconnections over a long quiet life are not counted up.
                self.failures = 0;
                Ok(())
            }
            Err(e) => {
                self.client.move_on(at, None);
                self.failures += 1;
                if self.failures > WATCH_GIVE_UP {
                    return Err(KvClientError::Unreachable(e));
                }
                pause(self.failures).await;
                Ok(())
            }
        }
    }

    /// The next change. Errors are final only when the cluster says so
    /// ([`KvError::Compacted`]) or no node can be reached after several
    /// rounds; a lost connection is resumed from the last revision seen.
    /// Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Result<Event, KvClientError> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                self.open().await?;
                continue;
            };
            match stream.next().await {
                Some(Ok(Ok(event))) => {
                    self.failures = 0;
                    let revision = event.kv.mod_revision;
                    match self.last {
                        Some((last, _)) if revision < last => continue,
                        Some((last, ref mut seen)) if revision == last => {
                            if self.skip > 0 {
                                self.skip -= 1;
                                continue; // delivered before the reconnect
                            }
                            *seen += 1;
                        }
                        _ => {
                            self.skip = 0;
                            self.last = Some((revision, 1));
                        }
                    }
                    return Ok(event);
                }
                Some(Ok(Err(e))) if !e.is_retryable() => {
                    self.stream = None;
                    return Err(KvClientError::Cluster(e));
                }
                Some(Err(e)) if !e.is_retryable() => {
                    // Refused, or an event too large for the connection:
                    // the same would happen on every node, every time.
                    self.stream = None;
                    return Err(KvClientError::Rpc(e));
                }
                Some(Ok(Err(_))) | Some(Err(_)) | None => {
                    // The node went or is going: resume elsewhere.
                    self.stream = None;
                    let (at, _) = self.client.current();
                    self.client.move_on(at, None);
                    self.failures += 1;
                    if self.failures > WATCH_GIVE_UP {
                        return Err(KvClientError::Cluster(ClusterError::Unavailable(
                            "the watch lost every node it knows for too long; a new watch from last_revision() resumes it"
                                .into(),
                        )));
                    }
                    pause(self.failures).await;
                }
            }
        }
    }
}

/// Failures that happen before a request is written: the server refused
/// the call as a whole (too many in flight), so it did not run.
fn never_sent(e: &RpcError) -> bool {
    matches!(
        e,
        RpcError::Overloaded | RpcError::TooManyConnections { .. }
    )
}

async fn pause(attempt: usize) {
    let ms = (20u64 << attempt.min(5)).min(500);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn unexpected(answer: KvResponse) -> KvClientError {
    KvClientError::Cluster(ClusterError::Unavailable(format!(
        "unexpected answer: {answer:?}"
    )))
}
