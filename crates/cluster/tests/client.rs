//! The cluster over real connections: three nodes, each a courier-rpc
//! server on loopback TCP, and `KvClient`s that know all of them. The
//! client finds the leader from any node and follows it when it dies; a
//! watch that loses its node resumes elsewhere missing nothing and seeing
//! nothing twice; leases end keys that are not kept alive.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use courier_cluster::client::KvClient;
use courier_cluster::network::{Peers, RaftHost, RaftTransportServer};
use courier_cluster::node::{ClusterNode, NodeConfig, Read, Timing};
use courier_cluster::service::{ClusterHost, ClusterServiceServer};
use courier_cluster::types::{EventKind, NodeId, METADATA_GROUP};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};
use courier_test_support::TempDir;
use courier_transport::Address;

struct Node {
    node: Arc<ClusterNode>,
    server: ServerHandle,
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    addresses: BTreeMap<NodeId, Address>,
    _dirs: Vec<TempDir>,
}

impl Cluster {
    async fn start(size: u64) -> Cluster {
        Cluster::start_with(size, u64::MAX).await
    }

    async fn start_with(size: u64, snapshot_bytes: u64) -> Cluster {
        let transport = Default::default();
        let mut listeners = BTreeMap::new();
        for id in 1..=size {
            let listener =
                courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &transport)
                    .await
                    .unwrap();
            listeners.insert(id, listener);
        }
        let addresses: BTreeMap<NodeId, Address> = listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().clone()))
            .collect();
        let members: BTreeMap<NodeId, String> = addresses
            .iter()
            .map(|(id, a)| (*id, a.to_string()))
            .collect();
        let mut nodes = BTreeMap::new();
        let mut dirs = Vec::new();
        for (id, listener) in listeners {
            let dir = TempDir::new(&format!("cluster-client-{id}"));
            let peers = Peers::new(ClientConfig::default());
            let config = NodeConfig::new(id, members[&id].clone(), members.clone(), dir.path())
                .with_timing(Timing::fast())
                .with_catch_up(Duration::from_secs(2))
                .with_snapshot_bytes(snapshot_bytes);
            let node = Arc::new(
                ClusterNode::start(config, peers.network(METADATA_GROUP))
                    .await
                    .unwrap(),
            );
            let raft = RaftHost::default();
            raft.insert(METADATA_GROUP, node.raft().clone());
            let server = Server::new(ServerConfig::default())
                .service(RaftTransportServer::new(raft))
                .service(ClusterServiceServer::new(ClusterHost::new(node.clone())))
                .spawn(listener);
            nodes.insert(id, Node { node, server });
            dirs.push(dir);
        }
        Cluster {
            nodes,
            addresses,
            _dirs: dirs,
        }
    }

    fn client(&self, first: NodeId) -> KvClient {
        // The given node first, then the others.
        let mut list = vec![self.addresses[&first].clone()];
        list.extend(
            self.addresses
                .iter()
                .filter(|(id, _)| **id != first)
                .map(|(_, a)| a.clone()),
        );
        KvClient::new(&list, ClientConfig::default()).unwrap()
    }

    async fn leader(&self) -> NodeId {
        for _ in 0..600 {
            for (id, node) in &self.nodes {
                if node.node.status().leader == Some(*id) {
                    return *id;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no leader within 15 s");
    }

    /// The node dies: its server stops answering and its Raft stops.
    async fn kill(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).expect("a live node");
        node.server.shutdown(Duration::ZERO).await;
        let _ = node.node.raft().shutdown().await;
    }

    async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_finds_the_leader_from_any_node_and_follows_it_when_it_dies() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    // Starting at a follower: it answers "not the leader, try X" and the
    // client goes there.
    let kv = cluster.client(follower);
    let first = kv.put("color", "blue").await.unwrap();
    let got = kv.get("color").await.unwrap().expect("just written");
    assert_eq!(
        (got.value.as_ref(), got.mod_revision),
        (&b"blue"[..], first)
    );

    cluster.kill(leader).await;
    // The next write reaches the new leader; the client only needs time.
    let mut second = None;
    for _ in 0..100 {
        match kv.put("color", "green").await {
            Ok(revision) => {
                second = Some(revision);
                break;
            }
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        courier_cluster::client::KvClientError::Cluster(_)
                            | courier_cluster::client::KvClientError::Unreachable(_)
                    ),
                    "{e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let second = second.expect("a write after the leader died");
    assert!(second > first);
    let got = kv.get("color").await.unwrap().expect("written");
    assert_eq!(got.value.as_ref(), b"green");
    assert_ne!(cluster.leader().await, leader);
    // Compare-and-set against the revision just read, and a stale one.
    assert!(kv.cas("color", got.mod_revision, "red").await.is_ok());
    let stale = kv.cas("color", got.mod_revision, "pink").await.unwrap_err();
    let (current, _) = stale.condition_failed().expect("a failed condition");
    assert_eq!(current.unwrap().value.as_ref(), b"red");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_loses_its_node_resumes_elsewhere_missing_nothing_and_seeing_nothing_twice() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let watched = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let writer = cluster.client(leader);
    let mut watch = cluster
        .client(watched)
        .with_read(Read::Stale)
        .watch("w/", 1);

    let mut expected = Vec::new();
    for i in 0..20 {
        expected.push(
            writer
                .put(&format!("w/{i}"), format!("v{i}"))
                .await
                .unwrap(),
        );
    }
    // Half of them seen through the watched node...
    let mut seen = Vec::new();
    for _ in 0..10 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("an event in time")
            .unwrap();
        seen.push(event.kv.mod_revision);
    }
    // ...which then dies; writes go on meanwhile.
    cluster.kill(watched).await;
    for i in 20..40 {
        expected.push(
            writer
                .put(&format!("w/{i}"), format!("v{i}"))
                .await
                .unwrap(),
        );
    }
    // A lease that ends deletes its key: one more event, a delete.
    let lease = writer
        .grant_lease(Duration::from_millis(300))
        .await
        .unwrap();
    let last = writer
        .put_if("w/leased", "brief", Default::default(), Some(lease))
        .await
        .unwrap();
    expected.push(last);
    while seen.len() < expected.len() + 1 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("an event in time (the watch resumes on another node)")
            .unwrap();
        if event.kind == EventKind::Delete {
            assert_eq!(event.kv.key, "w/leased", "only the leased key goes");
            assert!(event.kv.mod_revision > last);
        }
        seen.push(event.kv.mod_revision);
    }
    let (puts, delete) = seen.split_at(expected.len());
    assert_eq!(
        puts,
        &expected[..],
        "every put once, in order, across the reconnect"
    );
    assert!(delete[0] > last);
    assert!(
        writer.get("w/leased").await.unwrap().is_none(),
        "the lease took its key"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_kept_alive_keeps_its_keys_and_a_revoked_one_takes_them() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let kv = cluster.client(leader);
    let lease = kv.grant_lease(Duration::from_millis(400)).await.unwrap();
    kv.put_if("presence/a", "here", Default::default(), Some(lease))
        .await
        .unwrap();
    // Kept alive for well past its time to live: the key stays.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        kv.keep_alive(lease).await.unwrap();
        assert!(kv.get("presence/a").await.unwrap().is_some());
    }
    kv.revoke_lease(lease).await.unwrap();
    assert!(kv.get("presence/a").await.unwrap().is_none());
    // A put under a lease that is gone is refused.
    let refused = kv
        .put_if("presence/b", "x", Default::default(), Some(lease))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("lease"), "{refused}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_have_a_typed_face_and_a_value_of_another_type_is_a_typed_error() {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Config {
        color: String,
        replicas: u32,
    }
    let cluster = Cluster::start(1).await;
    cluster.leader().await;
    let kv = cluster.client(1);
    let wanted = Config {
        color: "blue".into(),
        replicas: 3,
    };
    let revision = kv.put_typed("config", &wanted).await.unwrap();
    let (got, at) = kv.get_typed::<Config>("config").await.unwrap().unwrap();
    assert_eq!((got, at), (wanted, revision));
    assert!(kv.get_typed::<Config>("absent").await.unwrap().is_none());
    kv.put("raw", vec![0xff]).await.unwrap();
    let err = kv.get_typed::<Config>("raw").await.unwrap_err();
    assert!(
        matches!(&err, courier_cluster::client::KvClientError::Decode { key, .. } if key == "raw"),
        "{err}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_renews_every_lease_from_its_own_clock_before_expiring_any() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let kv = cluster.client(leader);
    let lease = kv.grant_lease(Duration::from_secs(60)).await.unwrap();
    let granted = cluster.nodes[&leader]
        .node
        .lease(lease)
        .unwrap()
        .deadline_ms;
    // Let some time pass on the clock, so a renewal is visible.
    tokio::time::sleep(Duration::from_millis(50)).await;
    cluster.kill(leader).await;
    let new = cluster.leader().await;
    // The new leader's first act is to renew: the deadline moves from the
    // old leader's stamp to this one's (bounded wait for it to apply).
    let mut renewed = None;
    for _ in 0..100 {
        let deadline = cluster.nodes[&new].node.lease(lease).map(|l| l.deadline_ms);
        if deadline.is_some_and(|d| d > granted) {
            renewed = deadline;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        renewed.is_some(),
        "the new leader {new} did not renew lease {lease}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_catch_up_is_never_made_a_voter_and_followers_send_membership_changes_on(
) {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    // Sent to a follower first: it answers "not the leader", not a
    // membership error, and the client goes on to the leader.
    let admin = cluster.client(follower);
    // Nothing listens there (a typo): refused, and not left behind.
    let err = admin.add_member(9, "tcp://127.0.0.1:1").await.unwrap_err();
    assert!(err.to_string().contains("did not catch up"), "{err}");
    let status = admin.leader_status().await.unwrap();
    let voters: Vec<NodeId> = status
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    assert_eq!(voters.len(), 3, "{status:?}");
    assert!(status.members.iter().all(|m| m.id != 9), "{status:?}");
    // So losing one real node leaves a majority that still writes.
    let other = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader && **id != follower)
        .unwrap();
    cluster.kill(other).await;
    admin.put("still", "writable").await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_leads_a_cluster_of_its_own_is_refused_before_anything_changes() {
    let cluster = Cluster::start(3).await;
    let loner = Cluster::start(1).await;
    loner.leader().await;
    let leader = cluster.leader().await;
    let admin = cluster.client(leader);
    let err = admin
        .add_member(4, &loner.addresses[&1].to_string())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cluster of its own"), "{err}");
    // An id already in use at another address is refused too, and adding a
    // member that is already there is a no-op.
    let err = admin.add_member(2, "tcp://127.0.0.1:1").await.unwrap_err();
    assert!(err.to_string().contains("already a member"), "{err}");
    admin
        .add_member(2, &cluster.addresses[&2].to_string())
        .await
        .unwrap();
    let status = admin.leader_status().await.unwrap();
    assert_eq!(status.members.len(), 3, "{status:?}");
    loner.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_the_limits_is_refused_before_it_reaches_the_log() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let kv = cluster.client(leader);
    // Wait until the new leader's own first entries (its no-op, the lease
    // renewal) are in, so the log only grows if a write is proposed.
    kv.put("warm", "up").await.unwrap();
    let mut before = cluster.nodes[&leader].node.status().last_log_index;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = cluster.nodes[&leader].node.status().last_log_index;
        if now == before {
            break;
        }
        before = now;
    }
    let huge = vec![0u8; courier_cluster::state::MAX_VALUE_LEN + 1];
    let err = kv.put("big", huge).await.unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
    let err = kv.put("", "empty key").await.unwrap_err();
    assert!(err.to_string().contains("empty key"), "{err}");
    assert_eq!(
        cluster.nodes[&leader].node.status().last_log_index,
        before,
        "nothing was proposed"
    );
    kv.put("small", "fine").await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_takes_a_snapshot_by_size_long_before_the_entry_count() {
    // 64 KiB of writes, far fewer entries than snapshot_after (10,000).
    let cluster = Cluster::start_with(3, 64 * 1024).await;
    let leader = cluster.leader().await;
    let kv = cluster.client(leader);
    for i in 0..24 {
        kv.put(&format!("big/{i}"), vec![b'x'; 8 * 1024])
            .await
            .unwrap();
    }
    for (id, node) in &cluster.nodes {
        let mut snapshot = None;
        for _ in 0..100 {
            snapshot = node.node.raft().metrics().borrow().snapshot;
            if snapshot.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(snapshot.is_some(), "node {id} took no snapshot");
    }
    cluster.shutdown().await;
}
