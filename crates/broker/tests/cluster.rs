//! A broker with a `[cluster]` section: it hosts a cluster member, serves
//! the key-value store beside everything else, reports Raft metrics, keeps
//! its Raft state out of the queues, and under `[auth]` lets only cluster
//! peers speak Raft and only permitted users touch keys. Without the
//! section there is no Raft at all.

use std::time::Duration;

use bytes::Bytes;
use courier_broker::auth::UserConfig;
use courier_broker::config::ClusterSection;
use courier_broker::{Broker, BrokerConfig};
use courier_cluster::client::{KvClient, KvClientError};
use courier_cluster::network::{RaftKind, RaftTransportClient};
use courier_cluster::node::ClusterError;
use courier_rpc::{Client, ClientConfig, RpcError, Secret};
use courier_test_support::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(dir: &TempDir, cluster: bool) -> BrokerConfig {
    let mut config = BrokerConfig::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    config.metrics = "127.0.0.1:0".into();
    config.shutdown_grace_ms = 200;
    if cluster {
        let mut section = ClusterSection::default();
        section.node = 1;
        section.heartbeat_ms = 50;
        section.election_min_ms = 200;
        section.election_max_ms = 400;
        config.cluster = Some(section);
    }
    config
}

async fn metrics(address: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: courier\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// A put, retried while the one-node cluster elects itself.
async fn put(kv: &KvClient, key: &str, value: &str) -> Result<u64, KvClientError> {
    for _ in 0..100 {
        match kv.put(key, value.to_string()).await {
            Err(KvClientError::Cluster(e)) if e.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
    panic!("no leader within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_member_serves_the_store_reports_raft_metrics_and_keeps_it_over_a_restart() {
    let dir = TempDir::new("broker-cluster");
    let broker = Broker::start(config(&dir, true)).await.unwrap();
    let kv = KvClient::new(broker.addresses(), ClientConfig::default()).unwrap();
    let revision = put(&kv, "config/color", "blue").await.unwrap();
    assert_eq!(revision, 1);

    let text = metrics(broker.metrics_address().unwrap()).await;
    for line in [
        "courier_cluster_is_leader{group=\"0\"} 1",
        "courier_cluster_leader{group=\"0\"} 1",
        "courier_cluster_raft_rpc_errors_total 0",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert!(
        text.contains("courier_cluster_term{group=\"0\"} "),
        "{text}"
    );
    let stats = broker.stats().await;
    let cluster = stats.cluster.expect("a cluster member reports its status");
    assert_eq!((cluster.status.node, cluster.status.leader), (1, Some(1)));
    assert_eq!(cluster.status.members.len(), 1);
    broker.shutdown().await;

    // The Raft state lives beside the queues without being one.
    assert!(dir.path().join("data/.cluster").is_dir());
    let broker = Broker::start(config(&dir, true)).await.unwrap();
    assert!(
        broker.stats().await.queues.is_empty(),
        "no queue named .cluster"
    );
    let kv = KvClient::new(broker.addresses(), ClientConfig::default()).unwrap();
    // A linearizable read waits for the restarted node to lead again.
    let mut got = None;
    for _ in 0..100 {
        match kv.get("config/color").await {
            Ok(kv) => {
                got = kv;
                break;
            }
            Err(KvClientError::Cluster(e)) if e.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    let got = got.expect("the key survived the restart");
    assert_eq!((got.value.as_ref(), got.mod_revision), (&b"blue"[..], 1));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cluster_section_there_is_no_raft() {
    let dir = TempDir::new("broker-no-cluster");
    let broker = Broker::start(config(&dir, false)).await.unwrap();
    assert!(broker.stats().await.cluster.is_none());
    let text = metrics(broker.metrics_address().unwrap()).await;
    assert!(!text.contains("courier_cluster_"), "{text}");
    let kv = KvClient::new(broker.addresses(), ClientConfig::default()).unwrap();
    let err = kv.put("config/color", "blue").await.unwrap_err();
    assert!(err.to_string().contains("ClusterService"), "{err}");
    broker.shutdown().await;
    assert!(!dir.path().join("data/.cluster").exists());
}

fn user(name: &str, token: &str) -> UserConfig {
    UserConfig {
        name: name.into(),
        token: Some(Secret::new(token)),
        ..Default::default()
    }
}

fn as_user(token: &str) -> ClientConfig {
    let mut config = ClientConfig::default();
    config.token = Some(Secret::new(token));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_cluster_peers_speak_raft_and_keys_follow_the_kv_permissions() {
    let dir = TempDir::new("broker-cluster-auth");
    let mut config = config(&dir, true);
    config.auth.required = true;
    let mut peer = user("peer", "peer-token");
    peer.cluster = true;
    let mut app = user("app", "app-token");
    app.kv_read = vec!["config/".into()];
    app.kv_write = vec!["config/".into()];
    let mut rival = user("rival", "rival-token");
    rival.kv_write = vec!["rival/".into()];
    config.auth.users = vec![peer, app, rival, user("other", "other-token")];
    let broker = Broker::start(config).await.unwrap();
    let address = broker.addresses()[0].clone();

    // Raft from an identity that is not a peer never reaches Raft.
    let raft = |token: &str| RaftTransportClient::new(Client::lazy(&address, as_user(token)));
    let refused = raft("app-token")
        .raft(0, RaftKind::Vote, Bytes::from_static(b"junk"))
        .await;
    assert!(
        matches!(refused, Err(RpcError::PermissionDenied(_))),
        "{refused:?}"
    );
    // A peer's reaches it (and a message that does not decode is refused
    // by the host, not a panic).
    let reached = raft("peer-token")
        .raft(0, RaftKind::Vote, Bytes::from_static(b"junk"))
        .await;
    assert!(
        matches!(
            reached,
            Ok(Err(courier_cluster::network::RaftCallError::Undecodable(_)))
        ),
        "{reached:?}"
    );

    let app = KvClient::new(std::slice::from_ref(&address), as_user("app-token")).unwrap();
    put(&app, "config/color", "blue").await.unwrap();
    let denied = app.put("secret/key", "x").await.unwrap_err();
    assert!(
        matches!(
            denied,
            KvClientError::Cluster(ClusterError::PermissionDenied(_))
        ),
        "{denied}"
    );
    // A lease is kept alive and revoked only by whoever granted it.
    let lease = app.grant_lease(Duration::from_secs(60)).await.unwrap();
    app.put_if("config/lock", "held", Default::default(), Some(lease))
        .await
        .unwrap();
    let rival = KvClient::new(std::slice::from_ref(&address), as_user("rival-token")).unwrap();
    for refused in [
        rival.revoke_lease(lease).await,
        rival.keep_alive(lease).await,
    ] {
        assert!(
            matches!(
                refused,
                Err(KvClientError::Cluster(ClusterError::PermissionDenied(_)))
            ),
            "{refused:?}"
        );
    }
    assert!(
        app.get("config/lock").await.unwrap().is_some(),
        "the lock is still held"
    );
    app.keep_alive(lease).await.unwrap();
    app.revoke_lease(lease).await.unwrap();
    assert!(app.get("config/lock").await.unwrap().is_none());

    let other = KvClient::new(&[address], as_user("other-token")).unwrap();
    let denied = other.get("config/color").await.unwrap_err();
    assert!(
        matches!(
            denied,
            KvClientError::Cluster(ClusterError::PermissionDenied(_))
        ),
        "{denied}"
    );
    let denied = other.status().await.unwrap_err();
    assert!(
        matches!(
            denied,
            KvClientError::Cluster(ClusterError::PermissionDenied(_))
        ),
        "{denied}"
    );
    broker.shutdown().await;
}
