//! An in-process cluster over a simulated network that partitions, drops,
//! duplicates and delays Raft messages, as openraft's own test fixtures
//! do. Every node runs the real `ClusterNode` on its real storage in a
//! temporary directory; only the network is simulated.
//!
//! Faults come from a seeded generator. The seed fixes the fault schedule
//! and each link's drop/duplicate/delay draws (per link, in message order);
//! openraft draws its election timeouts from its own generator and tokio
//! schedules real threads, so a replay repeats the faults exactly but not
//! necessarily every election.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_cluster::node::{ClusterError, ClusterNode, KvRequest, NodeConfig, Read, Timing};
use courier_cluster::types::{Condition, KeyValue, KvResponse, NodeId, Raft, TypeConfig};
use courier_test_support::{Rng, TempDir};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, ServerState};

/// How the network misbehaves now.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Links (from, to) that carry nothing.
    pub blocked: HashSet<(NodeId, NodeId)>,
    /// Chance a message is lost (before or after delivery, evenly).
    pub drop: f64,
    /// Chance a message is delivered twice.
    pub duplicate: f64,
    /// Delay of each message, drawn up to this.
    pub max_delay: Duration,
}

/// The simulated network between the nodes.
pub struct Router {
    rafts: Mutex<HashMap<NodeId, Raft>>,
    faults: Mutex<Faults>,
    seed: u64,
    /// One generator per link, so each link's draws follow its own
    /// message order whatever the other links do.
    links: Mutex<HashMap<(NodeId, NodeId), Rng>>,
}

struct Draw {
    blocked: bool,
    lose_request: bool,
    lose_answer: bool,
    duplicate: bool,
    delay: Duration,
}

impl Router {
    pub fn new(seed: u64) -> Arc<Router> {
        Arc::new(Router {
            rafts: Mutex::new(HashMap::new()),
            faults: Mutex::new(Faults::default()),
            seed,
            links: Mutex::new(HashMap::new()),
        })
    }

    /// Node `id`'s Raft (of the one group the simulation runs) now
    /// receives what is sent to `id`.
    pub fn register(&self, id: NodeId, raft: Raft) {
        self.rafts.lock().unwrap().insert(id, raft);
    }

    /// Node `id` is down: nothing reaches it.
    pub fn unregister(&self, id: NodeId) {
        self.rafts.lock().unwrap().remove(&id);
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
    }

    pub fn faults(&self) -> Faults {
        self.faults.lock().unwrap().clone()
    }

    fn draw(&self, from: NodeId, to: NodeId) -> Draw {
        let faults = self.faults.lock().unwrap().clone();
        let mut links = self.links.lock().unwrap();
        let rng = links
            .entry((from, to))
            .or_insert_with(|| Rng(self.seed ^ (from << 32) ^ to));
        let lost = rng.chance(faults.drop);
        let half = rng.chance(0.5);
        Draw {
            blocked: faults.blocked.contains(&(from, to)),
            lose_request: lost && half,
            lose_answer: lost && !half,
            duplicate: rng.chance(faults.duplicate),
            delay: rng.between(Duration::ZERO, faults.max_delay),
        }
    }

    fn raft(&self, node: NodeId) -> Option<Raft> {
        self.rafts.lock().unwrap().get(&node).cloned()
    }

    fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.faults.lock().unwrap().blocked.contains(&(from, to))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SimFailure(&'static str);

fn unreachable<E: std::error::Error>(why: &'static str) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&SimFailure(why)))
}

/// One node's view of the network.
#[derive(Clone)]
pub struct SimNetwork {
    from: NodeId,
    router: Arc<Router>,
}

pub struct SimLink {
    from: NodeId,
    to: NodeId,
    router: Arc<Router>,
}

impl SimNetwork {
    /// Node `from`'s view of `router`.
    pub fn new(from: NodeId, router: Arc<Router>) -> SimNetwork {
        SimNetwork { from, router }
    }
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimLink;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> SimLink {
        SimLink {
            from: self.from,
            to: target,
            router: self.router.clone(),
        }
    }
}

impl SimLink {
    async fn deliver<T, E, F, Fut>(
        &self,
        send: F,
    ) -> Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        E: std::error::Error,
        F: Fn(Raft) -> Fut,
        Fut: std::future::Future<Output = Result<T, RaftError<NodeId, E>>>,
    {
        let draw = self.router.draw(self.from, self.to);
        tokio::time::sleep(draw.delay).await;
        if draw.blocked || draw.lose_request {
            return Err(unreachable("request lost"));
        }
        let Some(raft) = self.router.raft(self.to) else {
            return Err(unreachable("node down"));
        };
        let answer = send(raft.clone()).await;
        if draw.duplicate {
            let _ = send(raft).await;
        }
        // A partition that began while the request was in flight takes
        // the answer with it.
        if draw.lose_answer || self.router.is_blocked(self.to, self.from) {
            return Err(unreachable("answer lost"));
        }
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}

impl RaftNetwork<TypeConfig> for SimLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.deliver(|raft| {
            let rpc = rpc.clone();
            async move { raft.append_entries(rpc).await }
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.deliver(|raft| {
            let rpc = rpc.clone();
            async move { raft.install_snapshot(rpc).await }
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.deliver(|raft| {
            let rpc = rpc.clone();
            async move { raft.vote(rpc).await }
        })
        .await
    }
}

/// A cluster of in-process nodes on the simulated network.
pub struct SimCluster {
    pub router: Arc<Router>,
    pub ids: Vec<NodeId>,
    nodes: Mutex<BTreeMap<NodeId, Arc<ClusterNode>>>,
    /// Per node, false from the moment it loses power: an answer it gives
    /// after that never reached anyone.
    powered: Mutex<HashMap<NodeId, Arc<AtomicBool>>>,
    dirs: BTreeMap<NodeId, TempDir>,
    members: BTreeMap<NodeId, String>,
    snapshot_after: u64,
}

impl SimCluster {
    pub async fn start(size: u64, seed: u64, snapshot_after: u64) -> SimCluster {
        let ids: Vec<NodeId> = (1..=size).collect();
        let members: BTreeMap<NodeId, String> = ids
            .iter()
            .map(|id| (*id, format!("mem://node-{id}")))
            .collect();
        let dirs = ids
            .iter()
            .map(|id| (*id, TempDir::new(&format!("sim-node-{id}"))))
            .collect();
        let cluster = SimCluster {
            router: Router::new(seed),
            ids: ids.clone(),
            nodes: Mutex::new(BTreeMap::new()),
            powered: Mutex::new(HashMap::new()),
            dirs,
            members,
            snapshot_after,
        };
        for id in ids {
            cluster.boot(id).await;
        }
        cluster
    }

    /// Start (or restart) node `id` on its directory.
    pub async fn boot(&self, id: NodeId) {
        let config = NodeConfig::new(
            id,
            self.members[&id].clone(),
            self.members.clone(),
            self.dirs[&id].path(),
        )
        .with_timing(Timing::fast())
        .with_snapshot_after(self.snapshot_after);
        let network = SimNetwork {
            from: id,
            router: self.router.clone(),
        };
        let node = ClusterNode::start(config, network)
            .await
            .expect("node starts");
        self.router
            .rafts
            .lock()
            .unwrap()
            .insert(id, node.raft().clone());
        self.powered
            .lock()
            .unwrap()
            .insert(id, Arc::new(AtomicBool::new(true)));
        self.nodes.lock().unwrap().insert(id, Arc::new(node));
    }

    /// Whether node `id` has power (an answer read after it lost power
    /// never happened).
    pub fn powered(&self, id: NodeId) -> Arc<AtomicBool> {
        self.powered
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| Arc::new(AtomicBool::new(false)))
    }

    /// Nodes `ids` lose power at once: from this moment nothing they do
    /// reaches anyone (their links are cut first, and their answers to
    /// clients no longer count), and on disk only what their fsyncs
    /// covered survives. They stay down until [`Self::boot`].
    pub async fn power_loss(&self, ids: &[NodeId]) {
        for id in ids {
            self.powered(*id).store(false, Ordering::SeqCst);
        }
        let mut faults = self.router.faults();
        for a in ids {
            for b in &self.ids {
                faults.blocked.insert((*a, *b));
                faults.blocked.insert((*b, *a));
            }
        }
        self.router.set_faults(faults);
        let images: Vec<_> = ids
            .iter()
            .filter_map(|id| self.node(*id))
            .map(|node| node.durable_probe().image())
            .collect();
        for id in ids {
            self.kill(*id).await;
        }
        for image in images {
            image.apply().expect("the power-loss image applies");
        }
        let mut faults = self.router.faults();
        faults
            .blocked
            .retain(|(a, b)| !ids.contains(a) && !ids.contains(b));
        self.router.set_faults(faults);
    }

    /// Stop node `id` (a crash: nothing is flushed beyond what every
    /// acknowledged append already fsynced).
    pub async fn kill(&self, id: NodeId) {
        self.router.rafts.lock().unwrap().remove(&id);
        let node = self.nodes.lock().unwrap().remove(&id);
        if let Some(node) = node {
            match Arc::try_unwrap(node) {
                Ok(node) => node.shutdown().await,
                Err(node) => {
                    let _ = node.raft().shutdown().await;
                }
            }
        }
    }

    pub fn node(&self, id: NodeId) -> Option<Arc<ClusterNode>> {
        self.nodes.lock().unwrap().get(&id).cloned()
    }

    pub fn live(&self) -> Vec<NodeId> {
        self.nodes.lock().unwrap().keys().copied().collect()
    }

    /// Cut `group` off from everyone else, both ways.
    pub fn partition(&self, group: &[NodeId]) {
        let mut faults = self.router.faults();
        faults.blocked.clear();
        for a in &self.ids {
            for b in &self.ids {
                if group.contains(a) != group.contains(b) {
                    faults.blocked.insert((*a, *b));
                }
            }
        }
        self.router.set_faults(faults);
    }

    /// Messages from `from` to `to` are lost; the other way still works.
    pub fn one_way(&self, from: NodeId, to: NodeId) {
        let mut faults = self.router.faults();
        faults.blocked.insert((from, to));
        self.router.set_faults(faults);
    }

    pub fn heal(&self) {
        self.router.set_faults(Faults::default());
    }

    /// The nodes that lead, with their terms: in the Leader state with a
    /// committed vote (a quorum granted it) for themselves.
    pub fn leaders(&self) -> Vec<(u64, NodeId)> {
        self.leader_votes()
            .into_iter()
            .map(|(term, id, _)| (term, id))
            .collect()
    }

    /// [`Self::leaders`], with each one's vote as openraft shows it.
    pub fn leader_votes(&self) -> Vec<(u64, NodeId, String)> {
        let nodes = self.nodes.lock().unwrap();
        nodes
            .values()
            .filter_map(|n| {
                let m = n.raft().metrics().borrow().clone();
                let leads = m.state == ServerState::Leader
                    && m.vote.is_committed()
                    && m.vote.leader_id().voted_for() == Some(m.id);
                leads.then(|| (m.vote.leader_id().get_term(), m.id, m.vote.to_string()))
            })
            .collect()
    }

    /// Wait for a leader every live node agrees on; bounded.
    pub async fn wait_for_leader(&self, within: Duration) -> Option<NodeId> {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let live = self.live();
            let seen: Vec<Option<NodeId>> = live
                .iter()
                .filter_map(|id| self.node(*id))
                .map(|n| n.raft().metrics().borrow().current_leader)
                .collect();
            if let Some(Some(leader)) = seen.first() {
                if seen.iter().all(|l| *l == Some(*leader)) && live.contains(leader) {
                    return Some(*leader);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Wait until every live node has applied the same index and revision.
    pub async fn wait_converged(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let states: HashSet<(u64, u64)> = self
                .live()
                .iter()
                .filter_map(|id| self.node(*id))
                .map(|n| {
                    let s = n.status();
                    (s.applied_index, s.revision)
                })
                .collect();
            let last: HashSet<u64> = self
                .live()
                .iter()
                .filter_map(|id| self.node(*id))
                .map(|n| n.status().last_log_index)
                .collect();
            if states.len() == 1 && last.len() == 1 {
                let (applied, _) = *states.iter().next().unwrap();
                if Some(&applied) == last.iter().next() {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub async fn shutdown(&self) {
        for id in self.live() {
            self.kill(id).await;
        }
    }
}

/// A client of the simulated cluster: finds the leader by itself.
pub struct SimClient {
    pub cluster: Arc<SimCluster>,
    pub at: NodeId,
}

/// How a simulated client's operation ended.
pub enum Outcome<T> {
    Done(T),
    /// Timed out or failed after it may have been applied.
    Unknown,
}

impl SimClient {
    pub fn new(cluster: Arc<SimCluster>, at: NodeId) -> SimClient {
        SimClient { cluster, at }
    }

    fn next_node(&mut self, hint: Option<NodeId>) {
        let live = self.cluster.live();
        self.at = match hint {
            Some(h) if live.contains(&h) => h,
            _ => {
                let i = live.iter().position(|n| *n == self.at).map_or(0, |i| i + 1);
                live.get(i % live.len().max(1)).copied().unwrap_or(1)
            }
        };
    }

    /// A write, retried only where nothing was done (not the leader).
    pub async fn write(
        &mut self,
        request: KvRequest,
        within: Duration,
    ) -> Outcome<Result<KvResponse, ClusterError>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let Some(node) = self.cluster.node(self.at) else {
                self.next_node(None);
                if tokio::time::Instant::now() >= deadline {
                    return Outcome::Unknown;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let powered = self.cluster.powered(self.at);
            let answer = tokio::time::timeout(left, node.kv(request.clone())).await;
            if !powered.load(Ordering::SeqCst) {
                return Outcome::Unknown; // the node died before answering
            }
            match answer {
                Err(_) => return Outcome::Unknown,
                Ok(Err(ClusterError::NotLeader { leader, .. })) => {
                    self.next_node(leader);
                    if tokio::time::Instant::now() >= deadline {
                        return Outcome::Done(Err(ClusterError::Unavailable("no leader".into())));
                    }
                    if leader.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Ok(Err(ClusterError::Unavailable(_))) => return Outcome::Unknown,
                Ok(answer) => return Outcome::Done(answer),
            }
        }
    }

    /// A linearizable read, retried until `within`.
    pub async fn get(&mut self, key: &str, within: Duration) -> Option<Option<KeyValue>> {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let Some(node) = self.cluster.node(self.at) else {
                self.next_node(None);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let powered = self.cluster.powered(self.at);
            let answer = tokio::time::timeout(left, node.get(key, Read::Linearizable)).await;
            if !powered.load(Ordering::SeqCst) {
                return None;
            }
            match answer {
                Err(_) => return None,
                Ok(Ok((kv, revision))) => {
                    if std::env::var_os("COURIER_SIM_TRACE").is_some() {
                        let st = node.status();
                        eprintln!(
                            "read {key} at node {} rev {revision} applied {} term {} role {} -> {:?}",
                            st.node,
                            st.applied_index,
                            st.term,
                            st.role,
                            kv.as_ref().map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                        );
                    }
                    return Some(kv);
                }
                Ok(Err(ClusterError::NotLeader { leader, .. })) => {
                    self.next_node(leader);
                    if leader.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Ok(Err(_)) => {
                    self.next_node(None);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        None
    }
}

/// A put request.
pub fn put(key: &str, value: &str, condition: Condition) -> KvRequest {
    KvRequest::Put {
        key: key.to_string(),
        value: bytes::Bytes::copy_from_slice(value.as_bytes()),
        condition,
        lease: None,
    }
}

/// The seed for a test: `COURIER_SEED` if set (to replay), else `default`;
/// printed either way.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("COURIER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("seed {seed} (replay with COURIER_SEED={seed})");
    seed
}
