//! The Raft network over courier-rpc.
//!
//! Every Raft message between two nodes travels on **one** courier-rpc
//! connection per pair of nodes, whatever the group: a message is the
//! group id, its kind, and the openraft request encoded with postcard. The
//! connection is whatever the transport gives any client (TLS, the bearer
//! token, heartbeats), so cluster traffic needs no second security story;
//! replication to an unreachable peer waits out the transport's jittered
//! exponential backoff between tries.
//!
//! openraft's messages cross as opaque bytes rather than typed arguments:
//! their shape belongs to openraft, and a schema fingerprint over it would
//! make every openraft patch release look like a protocol change. They are
//! decoded on arrival like any untrusted input, and a message that does not
//! decode is refused with [`RaftCallError::Undecodable`], never a panic.
//!
//! An AppendEntries too large for the connection's frame limit is answered
//! locally with openraft's `PayloadTooLarge`, so openraft resends the
//! entries in smaller batches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use courier_rpc::{Client, ClientConfig, RpcError};
use courier_transport::Address;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::types::{GroupId, NodeId, Raft, TypeConfig};

/// Which openraft request a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftKind {
    /// `AppendEntriesRequest` (also the heartbeat).
    AppendEntries,
    /// `VoteRequest`.
    Vote,
    /// One chunk of `InstallSnapshotRequest`.
    InstallSnapshot,
}

/// Why a node refused a Raft message before Raft saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RaftCallError {
    /// This node runs no such group (yet, or any more).
    #[error("group {0} is not on this node")]
    UnknownGroup(GroupId),
    /// The body did not decode as the kind it claims.
    #[error("undecodable raft message: {0}")]
    Undecodable(String),
    /// The message decoded but breaks what Raft guarantees of it (entries
    /// out of order, a snapshot chunk beyond the size limit): refused here
    /// rather than let storage fail on it, which would stop this node.
    #[error("invalid raft message: {0}")]
    Invalid(String),
}

/// The node-to-node Raft service. Its one method carries every group.
#[courier_rpc::service]
pub trait RaftTransport {
    /// Deliver one Raft message to `group`; the answer is the postcard bytes
    /// of openraft's `Result<response, RaftError>`.
    async fn raft(
        &self,
        group: GroupId,
        kind: RaftKind,
        body: Bytes,
    ) -> Result<Bytes, RaftCallError>;
}

/// The receiving side: the Raft groups this node runs, by group id.
#[derive(Clone, Default)]
pub struct RaftHost {
    groups: Arc<RwLock<HashMap<GroupId, Raft>>>,
}

impl std::fmt::Debug for RaftHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: Vec<GroupId> = self
            .groups
            .read()
            .map(|g| g.keys().copied().collect())
            .unwrap_or_default();
        f.debug_struct("RaftHost").field("groups", &groups).finish()
    }
}

impl RaftHost {
    /// Start routing messages for `group` to `raft`.
    pub fn insert(&self, group: GroupId, raft: Raft) {
        if let Ok(mut groups) = self.groups.write() {
            groups.insert(group, raft);
        }
    }

    /// Stop routing messages for `group`.
    pub fn remove(&self, group: GroupId) {
        if let Ok(mut groups) = self.groups.write() {
            groups.remove(&group);
        }
    }

    fn group(&self, group: GroupId) -> Result<Raft, RaftCallError> {
        self.groups
            .read()
            .ok()
            .and_then(|g| g.get(&group).cloned())
            .ok_or(RaftCallError::UnknownGroup(group))
    }

    /// Handle one message: decode, hand to Raft, encode the answer.
    pub async fn deliver(
        &self,
        group: GroupId,
        kind: RaftKind,
        body: &[u8],
    ) -> Result<Bytes, RaftCallError> {
        let raft = self.group(group)?;
        match kind {
            RaftKind::AppendEntries => {
                let request: AppendEntriesRequest<TypeConfig> = decode(body)?;
                check_entries(&request)?;
                encode(&raft.append_entries(request).await)
            }
            RaftKind::Vote => {
                let request: VoteRequest<NodeId> = decode(body)?;
                encode(&raft.vote(request).await)
            }
            RaftKind::InstallSnapshot => {
                let request: InstallSnapshotRequest<TypeConfig> = decode(body)?;
                check_snapshot_chunk(&request)?;
                encode(&raft.install_snapshot(request).await)
            }
        }
    }
}

impl RaftTransport for RaftHost {
    async fn raft(
        &self,
        group: GroupId,
        kind: RaftKind,
        body: Bytes,
    ) -> Result<Bytes, RaftCallError> {
        self.deliver(group, kind, &body).await
    }
}

/// Entries must follow `prev_log_id` one index at a time, as every honest
/// leader sends them; the log store refuses anything else as a fatal error.
fn check_entries(request: &AppendEntriesRequest<TypeConfig>) -> Result<(), RaftCallError> {
    let mut next = match request.prev_log_id {
        None => Some(0),
        Some(id) => id.index.checked_add(1),
    };
    for entry in &request.entries {
        if Some(entry.log_id.index) != next {
            return Err(RaftCallError::Invalid(format!(
                "entry {} out of order (after {:?})",
                entry.log_id.index, request.prev_log_id
            )));
        }
        next = entry.log_id.index.checked_add(1);
    }
    Ok(())
}

/// A chunk lands at `offset` in a buffer: an offset far beyond any real
/// snapshot would make the buffer that large.
fn check_snapshot_chunk(request: &InstallSnapshotRequest<TypeConfig>) -> Result<(), RaftCallError> {
    let end = request.offset.saturating_add(request.data.len() as u64);
    if end > crate::storage::SNAPSHOT_LIMIT {
        return Err(RaftCallError::Invalid(format!(
            "snapshot chunk ends at byte {end}, beyond the {} limit",
            crate::storage::SNAPSHOT_LIMIT
        )));
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, RaftCallError> {
    postcard::from_bytes(body).map_err(|e| RaftCallError::Undecodable(e.to_string()))
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, RaftCallError> {
    postcard::to_allocvec(value)
        .map(Bytes::from)
        .map_err(|e| RaftCallError::Undecodable(e.to_string()))
}

/// One courier-rpc connection per peer, shared by every group's network.
#[derive(Clone)]
pub struct Peers {
    config: ClientConfig,
    clients: Arc<Mutex<HashMap<NodeId, (String, RaftTransportClient)>>>,
    errors: Arc<AtomicU64>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").finish_non_exhaustive()
    }
}

impl Peers {
    /// Peers reached with `config` (TLS, token, heartbeats as for any client).
    pub fn new(config: ClientConfig) -> Peers {
        Peers {
            config,
            clients: Arc::new(Mutex::new(HashMap::new())),
            errors: Arc::default(),
        }
    }

    /// Raft messages that failed before a peer's Raft answered
    /// (unreachable, timed out, refused, undecodable), since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The client for `node` at `addr`: the one already open, unless the
    /// node's address changed. Connects lazily, so a dead peer costs
    /// nothing until a message is sent, and then fails that message fast.
    fn client(&self, node: NodeId, addr: &str) -> Result<RaftTransportClient, String> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| "peer table poisoned".to_string())?;
        if let Some((known, client)) = clients.get(&node) {
            if known == addr {
                return Ok(client.clone());
            }
        }
        let address: Address = addr
            .parse()
            .map_err(|e| format!("node {node} has a bad address {addr:?}: {e}"))?;
        let client = RaftTransportClient::new(Client::lazy(&address, self.config.clone()));
        clients.insert(node, (addr.to_string(), client.clone()));
        Ok(client)
    }

    /// The network factory openraft uses for one group.
    pub fn network(&self, group: GroupId) -> RpcNetworkFactory {
        RpcNetworkFactory {
            peers: self.clone(),
            group,
        }
    }
}

/// openraft's network factory for one group, over [`Peers`].
#[derive(Clone, Debug)]
pub struct RpcNetworkFactory {
    peers: Peers,
    group: GroupId,
}

impl RaftNetworkFactory<TypeConfig> for RpcNetworkFactory {
    type Network = RpcNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> RpcNetwork {
        RpcNetwork {
            target,
            client: self.peers.client(target, &node.addr),
            group: self.group,
            errors: self.peers.errors.clone(),
        }
    }
}

/// openraft's connection to one peer for one group.
pub struct RpcNetwork {
    target: NodeId,
    client: Result<RaftTransportClient, String>,
    group: GroupId,
    errors: Arc<AtomicU64>,
}

impl std::fmt::Debug for RpcNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcNetwork")
            .field("target", &self.target)
            .field("group", &self.group)
            .finish()
    }
}

/// A failure before the peer's Raft answered, as openraft wants it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

impl RpcNetwork {
    /// Send one message and decode the peer's `Result<R, RaftError<E>>`,
    /// counting failures that never reached the peer's Raft.
    async fn send<Req, Resp, E>(
        &self,
        kind: RaftKind,
        request: &Req,
        entries: usize,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer = self.try_send(kind, request, entries, option).await;
        if matches!(answer, Err(ref e) if !matches!(e, RPCError::RemoteError(_))) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        answer
    }

    async fn try_send<Req, Resp, E>(
        &self,
        kind: RaftKind,
        request: &Req,
        entries: usize,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &self.client {
            Ok(client) => client,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Failure(e.clone())))),
        };
        let body = postcard::to_allocvec(request)
            .map_err(|e| RPCError::Network(NetworkError::new(&Failure(e.to_string()))))?;
        let timeout = option.hard_ttl().max(Duration::from_millis(10));
        let answer = client
            .with_timeout(timeout)
            .raft(self.group, kind, Bytes::from(body))
            .await;
        let bytes = match answer {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(refused)) => {
                return Err(RPCError::Network(NetworkError::new(&Failure(
                    refused.to_string(),
                ))))
            }
            // One entry alone that does not fit will never fit: report the
            // peer unreachable, so openraft backs off instead of resending
            // it at once forever (the node checks sizes before proposing,
            // so this takes a peer with a smaller frame limit).
            Err(e @ RpcError::TooLarge { .. })
                if kind == RaftKind::AppendEntries && entries <= 1 =>
            {
                return Err(RPCError::Unreachable(Unreachable::new(&Failure(
                    e.to_string(),
                ))));
            }
            Err(RpcError::TooLarge { .. }) if kind == RaftKind::AppendEntries => {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(
                        // Half as many next time, at least one.
                        (entries as u64 / 2).max(1),
                    ),
                ));
            }
            Err(e @ (RpcError::Unavailable(_) | RpcError::DeadlineExceeded)) => {
                return Err(RPCError::Unreachable(Unreachable::new(&Failure(
                    e.to_string(),
                ))))
            }
            Err(e) => {
                return Err(RPCError::Network(NetworkError::new(&Failure(
                    e.to_string(),
                ))))
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> = postcard::from_bytes(&bytes)
            .map_err(|e| RPCError::Network(NetworkError::new(&Failure(e.to_string()))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for RpcNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let entries = rpc.entries.len();
        self.send(RaftKind::AppendEntries, &rpc, entries, &option)
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(RaftKind::InstallSnapshot, &rpc, 0, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(RaftKind::Vote, &rpc, 0, &option).await
    }

    /// How long replication to an unreachable peer waits between tries:
    /// the transport's capped exponential backoff with jitter (100 ms
    /// doubling to 2 s), so a dead node costs a few attempts a second at
    /// first and one every second or two after, and nodes cut off together
    /// do not retry in lockstep.
    fn backoff(&self) -> openraft::network::Backoff {
        let mut delays = courier_transport::Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            self.target ^ (u64::from(self.group) << 32),
        );
        openraft::network::Backoff::new(std::iter::from_fn(move || Some(delays.next_delay())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, SnapshotMeta, Vote};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn append(prev: Option<u64>, indexes: &[u64]) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: prev.map(|i| LogId::new(CommittedLeaderId::new(1, 1), i)),
            entries: indexes.iter().map(|i| entry(*i)).collect(),
            leader_commit: None,
        }
    }

    #[test]
    fn entries_must_follow_the_previous_one_index_by_index() {
        assert!(check_entries(&append(None, &[0, 1, 2])).is_ok());
        assert!(check_entries(&append(Some(4), &[5, 6])).is_ok());
        assert!(check_entries(&append(Some(4), &[])).is_ok());
        for bad in [
            append(Some(4), &[6]),
            append(Some(4), &[5, 5]),
            append(Some(4), &[5, 7]),
            append(None, &[1]),
            // No index after u64::MAX: refused, not an overflow.
            append(Some(u64::MAX), &[0]),
        ] {
            assert!(
                matches!(check_entries(&bad), Err(RaftCallError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_snapshot_chunk_beyond_the_limit_is_refused_before_any_buffer_grows() {
        let chunk = |offset: u64| InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            meta: SnapshotMeta::default(),
            offset,
            data: vec![0; 16],
            done: false,
        };
        assert!(check_snapshot_chunk(&chunk(0)).is_ok());
        assert!(check_snapshot_chunk(&chunk(crate::storage::SNAPSHOT_LIMIT)).is_err());
        assert!(check_snapshot_chunk(&chunk(u64::MAX)).is_err());
    }

    #[test]
    fn garbage_is_refused_as_undecodable() {
        assert!(matches!(
            decode::<AppendEntriesRequest<TypeConfig>>(b"\xff\xff\xff"),
            Err(RaftCallError::Undecodable(_))
        ));
    }
}
