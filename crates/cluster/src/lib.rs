//! # courier-cluster
//!
//! Courier as a cluster of brokers: node identity and membership, Raft
//! consensus by [openraft](https://docs.rs/openraft/0.9.25) (never written
//! here), and on top of it the metadata group, which holds the cluster's
//! declarations and a replicated key-value store for shared state between
//! processes on different machines.
//!
//! - [`node::ClusterNode`]: one member. Its Raft log is Courier's own
//!   segment log ([`storage`]: entries fdatasynced before openraft hears
//!   they are flushed, the vote durable before it is answered, snapshots
//!   replaced atomically). Timers are chosen for small machines (election
//!   after 1–2 s without a heartbeat). Reads are linearizable by default
//!   (the leader confirms its leadership with a quorum and waits until it
//!   has applied everything committed), stale on request.
//! - [`network`]: Raft's messages over courier-rpc, one connection per pair
//!   of nodes for every group, with the TLS, tokens and heartbeats of any
//!   client.
//! - [`state::ClusterState`]: what the log builds, with etcd's semantics —
//!   a cluster-wide revision, per key create/modification revision and
//!   version, compare-and-set, watches from any retained revision, leases
//!   whose keys go when they are not kept alive. Applying never reads a
//!   clock: the leader stamps time into the commands.
//! - [`service`]: the store and membership as a courier-rpc service, with
//!   per-key permissions for brokers that authenticate.
//! - [`client::KvClient`]: a client that knows several nodes, follows the
//!   leader and resumes watches where they stopped.
//! - [`queue_state::QueueGroupState`] and [`queue_group::QueueGroup`]: a
//!   durable queue replicated by its own Raft group. The state machine is
//!   courier-queue's core applied to logged commands (enqueue, deliver
//!   under a lease, answers, the leader's ticks and takeover), so delivery
//!   counts, dead-letter histories and the idempotency window survive a
//!   failover; an operation returns once its command is committed on a
//!   majority's disk. The broker hosts them.
//! - [`wal::NodeWal`]: one write-ahead log per node for all its queue
//!   groups' entries, so a node with many queues pays one fsync per batch
//!   of appends, not one per queue.
//!
//! Standard Raft: openraft's `single-term-leader` feature is on, so a term
//! has at most one leader. A node restarted from disk never resumes leading
//! its old term (see [`storage`]): it must win a new one.
//!
//! A broker runs none of this unless it is given a `[cluster]` section (or
//! `courier serve --node`): a single broker has no Raft and no extra fsync.
//!
//! ## Example
//!
//! A cluster of one in this process (a real cluster passes the other
//! members' addresses and serves [`network::RaftTransportServer`] and
//! [`service::ClusterServiceServer`] on its listener, as the broker does):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::collections::BTreeMap;
//! use courier_cluster::network::Peers;
//! use courier_cluster::node::{ClusterError, ClusterNode, KvRequest, NodeConfig, Read};
//! use courier_cluster::types::{Condition, KvResponse, METADATA_GROUP};
//!
//! let dir = std::env::temp_dir().join(format!("courier-cluster-doc-{}", std::process::id()));
//! let members = BTreeMap::from([(1, "mem://node-1".to_string())]);
//! let config = NodeConfig::new(1, "mem://node-1", members, &dir);
//! let peers = Peers::new(Default::default());
//! let node = ClusterNode::start(config, peers.network(METADATA_GROUP)).await?;
//!
//! // Writes go to the leader; a cluster of one elects itself.
//! let put = KvRequest::Put {
//!     key: "config/color".into(),
//!     value: "blue".into(),
//!     condition: Condition::Absent, // create only
//!     lease: None,
//! };
//! let revision = loop {
//!     match node.kv(put.clone()).await {
//!         Ok(KvResponse::Put { revision, .. }) => break revision,
//!         Ok(other) => panic!("{other:?}"),
//!         // Not the leader (yet): nothing was done, so sending again is safe.
//!         Err(ClusterError::NotLeader { .. }) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
//!         Err(e) => return Err(e.into()),
//!     }
//! };
//! let (kv, _) = node.get("config/color", Read::Linearizable).await?;
//! assert_eq!(kv.unwrap().mod_revision, revision);
//! node.shutdown().await;
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```
//!
//! Dependencies beyond the workspace's usual ones: `openraft` (consensus,
//! pinned at `=0.9.25`, the maintained 0.9 line) and `crc32c` (the same
//! checksum as the log, for the vote and snapshot files).

#![warn(missing_docs)]

pub mod client;
pub mod network;
pub mod node;
pub mod queue_group;
pub mod queue_state;
pub mod service;
pub mod state;
pub mod storage;
pub mod types;
pub mod wal;

/// What kind of failure an error is (every error's `kind()`), shared by
/// every Courier crate.
pub use courier_transport::ErrorKind;
